//! `calc`'s tokenizer, parser and evaluator on any text: never a panic or a stack overflow, a
//! value is always finite, and an error's column points into the expression (or just past it).
#![no_main]

use std::collections::HashMap;

use heist_worker::fuzzing;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(expression) = std::str::from_utf8(data) else {
        return;
    };
    let variables = HashMap::from([
        ("x".to_owned(), 2.5),
        ("e".to_owned(), -1.0),
        ("big".to_owned(), 1e308),
        ("tiny".to_owned(), 5e-324),
    ]);
    match fuzzing::calc(expression, &variables) {
        Ok(value) => assert!(value.is_finite(), "{expression:?} evaluated to {value}"),
        Err((message, column)) => {
            assert!(!message.is_empty(), "an empty error for {expression:?}");
            if let Some(column) = column {
                let chars = expression.chars().count();
                assert!(
                    (1..=chars + 1).contains(&column),
                    "column {column} is outside {expression:?} ({chars} characters): {message}"
                );
            }
        }
    }
});
