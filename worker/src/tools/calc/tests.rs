//! calc: values, precedence, functions, variables and every error path.

use std::collections::HashMap;

use serde_json::json;

use super::{evaluate, parser::MAX_DEPTH};
use crate::tools::test_support::{context, run, text};

fn eval(src: &str) -> f64 {
    evaluate(src, &HashMap::new()).unwrap_or_else(|e| panic!("{src}: {e}"))
}

fn eval_err(src: &str) -> String {
    match evaluate(src, &HashMap::new()) {
        Ok(v) => panic!("{src}: expected an error, got {v}"),
        Err(e) => e.to_string(),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn arithmetic_and_precedence() {
    let cases = [
        ("1 + 2", 3.0),
        ("1 + 2 * 3", 7.0),
        ("(1 + 2) * 3", 9.0),
        ("10 - 4 - 3", 3.0),
        ("100 / 10 / 5", 2.0),
        ("7 % 3", 1.0),
        ("-7 % 3", -1.0),
        ("7.5 % 2", 1.5),
        ("2 ^ 10", 1024.0),
        ("2 ^ 3 ^ 2", 512.0),
        ("-2 ^ 2", -4.0),
        ("(-2) ^ 2", 4.0),
        ("2 ^ -1", 0.5),
        ("-2 * 3", -6.0),
        ("2 * -3", -6.0),
        ("2 - -3", 5.0),
        ("--2", 2.0),
        ("+2", 2.0),
        ("-+-2", 2.0),
        ("1e3 + .5", 1000.5),
        ("  42  ", 42.0),
        ("2 * 3 ^ 2", 18.0),
        ("(((1)))", 1.0),
        ("1 + 2 * 3 - 4 / 2", 5.0),
    ];
    for (src, want) in cases {
        assert!(
            close(eval(src), want),
            "{src} = {} (want {want})",
            eval(src)
        );
    }
}

#[test]
fn functions_and_constants() {
    let cases = [
        ("sqrt(16)", 4.0),
        ("abs(-3.5)", 3.5),
        ("round(2.5)", 3.0),
        ("round(-2.5)", -3.0),
        ("floor(-1.5)", -2.0),
        ("ceil(1.2)", 2.0),
        ("min(3)", 3.0),
        ("min(3, 1, 2)", 1.0),
        ("max(3, 1, 2)", 3.0),
        ("max(1, min(5, 4), -1)", 4.0),
        ("sqrt(2) ^ 2", 2.000_000_000_000_000_4),
        ("pi", std::f64::consts::PI),
        ("e", std::f64::consts::E),
        ("2 * pi", std::f64::consts::TAU),
    ];
    for (src, want) in cases {
        assert!(
            close(eval(src), want),
            "{src} = {} (want {want})",
            eval(src)
        );
    }
}

#[test]
fn variables_and_shadowing() {
    let vars: HashMap<String, f64> = [
        ("x".to_owned(), 3.0),
        ("e".to_owned(), 10.0),
        ("rate_2".to_owned(), 0.5),
    ]
    .into_iter()
    .collect();
    assert_eq!(evaluate("x * x + 1", &vars).expect("x"), 10.0);
    assert_eq!(evaluate("e", &vars).expect("e"), 10.0);
    assert_eq!(evaluate("rate_2 * 4", &vars).expect("rate"), 2.0);
    let err = evaluate("y + 1", &vars).expect_err("unknown").to_string();
    assert_eq!(err, "unknown variable `y` at column 1");
}

#[test]
fn arithmetic_errors_name_the_column() {
    assert_eq!(eval_err("1 / 0"), "division by zero at column 3");
    assert_eq!(eval_err("1 / (2 - 2)"), "division by zero at column 3");
    assert_eq!(eval_err("5 % 0"), "modulo by zero at column 3");
    assert_eq!(
        eval_err("10 ^ 400"),
        "overflow: the result of `^` is too large at column 4"
    );
    assert_eq!(
        eval_err("1e308 * 10"),
        "overflow: the result of `*` is too large at column 7"
    );
    assert_eq!(
        eval_err("1e999"),
        "overflow: number `1e999` is too large at column 1"
    );
    assert_eq!(
        eval_err("0 ^ -1"),
        "overflow: the result of `^` is too large at column 3"
    );
    assert_eq!(
        eval_err("(-8) ^ (1/3)"),
        "`^` has no real result here at column 6"
    );
    assert_eq!(
        eval_err("sqrt(-4)"),
        "sqrt of a negative number (-4) at column 1"
    );
}

#[test]
fn name_errors() {
    assert_eq!(
        eval_err("foo(1)"),
        "unknown function `foo` (available: sqrt, abs, min, max, round, floor, ceil) at column 1"
    );
    assert_eq!(eval_err("2 * zz"), "unknown variable `zz` at column 5");
    assert_eq!(
        eval_err("sqrt(1, 2)"),
        "`sqrt` takes exactly 1 argument, got 2 at column 1"
    );
    assert_eq!(
        eval_err("abs()"),
        "`abs` takes exactly 1 argument, got 0 at column 1"
    );
    assert_eq!(
        eval_err("max()"),
        "`max` needs at least 1 argument at column 1"
    );
}

#[test]
fn syntax_errors_name_the_column() {
    let cases = [
        (
            "",
            "syntax error: the expression ends where a value was expected at column 1",
        ),
        (
            "1 +",
            "syntax error: the expression ends where a value was expected at column 4",
        ),
        (
            "(1 + 2",
            "syntax error: expected `)` to close the `(` at column 1, found the end of the expression at column 7",
        ),
        (
            "1 + 2)",
            "syntax error: expected an operator, found `)` at column 6",
        ),
        (
            "2 3",
            "syntax error: expected an operator, found number 3 at column 3",
        ),
        (
            "2x",
            "syntax error: expected an operator, found `x` at column 2",
        ),
        (
            "1 $ 2",
            "syntax error: unexpected character `$` at column 3",
        ),
        (
            "* 2",
            "syntax error: expected a value, found `*` at column 1",
        ),
        (
            "1e+",
            "syntax error: the exponent of this number has no digits at column 1",
        ),
        (
            "max(1 2)",
            "syntax error: expected `,` or `)` in the call to `max`, found number 2 at column 7",
        ),
        (
            "min(1,)",
            "syntax error: expected a value, found `)` at column 7",
        ),
    ];
    for (src, want) in cases {
        assert_eq!(eval_err(src), want, "{src}");
    }
}

#[test]
fn columns_count_characters_not_bytes() {
    assert_eq!(
        eval_err("\u{e9} + 1"),
        "syntax error: unexpected character `\u{e9}` at column 1"
    );
    assert_eq!(
        eval_err("1 + \u{e9}"),
        "syntax error: unexpected character `\u{e9}` at column 5"
    );
}

#[test]
fn nesting_is_capped() {
    let ok = format!("{}1{}", "(".repeat(100), ")".repeat(100));
    assert_eq!(eval(&ok), 1.0);
    let deep = format!(
        "{}1{}",
        "(".repeat(MAX_DEPTH + 1),
        ")".repeat(MAX_DEPTH + 1)
    );
    assert!(
        eval_err(&deep).contains("nests deeper than 256 levels"),
        "{}",
        eval_err(&deep)
    );
    let unary = format!("{}1", "-".repeat(MAX_DEPTH + 1));
    assert!(eval_err(&unary).contains("nests deeper"));
    let pow = vec!["1"; MAX_DEPTH + 2].join("^");
    assert!(eval_err(&pow).contains("nests deeper"));
}

#[test]
fn long_flat_expressions_do_not_recurse() {
    // 2047 additions: flat chains are evaluated iteratively, so no depth error and no overflow.
    let src = vec!["1"; 2048].join("+");
    assert_eq!(eval(&src), 2048.0);
    let too_long = "1+".repeat(2049);
    assert!(eval_err(&too_long).contains("longer than 4096 characters"));
}

#[tokio::test]
async fn tool_returns_text_and_structured_result() {
    let (_tmp, ctx) = context();
    let out = run(
        &ctx,
        "calc",
        json!({"expression": "x ^ 2 / 4", "variables": {"x": 3}}),
    )
    .await
    .expect("calc");
    assert!(!out.is_error);
    assert_eq!(text(&out), "2.25");
    let structured = out.structured.expect("structured");
    assert_eq!(structured["result"], json!(2.25));
    assert_eq!(structured["expression"], json!("x ^ 2 / 4"));

    let out = run(&ctx, "calc", json!({"expression": "6 * 7"}))
        .await
        .expect("calc");
    assert_eq!(text(&out), "42");
    assert_eq!(out.structured.expect("structured")["result"], json!(42));
}

#[tokio::test]
async fn tool_errors_are_is_error_results() {
    let (_tmp, ctx) = context();
    let out = run(&ctx, "calc", json!({"expression": "1/0"}))
        .await
        .expect("calc");
    assert!(out.is_error);
    assert_eq!(text(&out), "calc: division by zero at column 2");
}

#[tokio::test]
async fn tool_arguments_are_schema_checked() {
    let (_tmp, ctx) = context();
    for (args, field) in [
        (json!({}), "expression"),
        (json!({"expression": 5}), "expression"),
        (
            json!({"expression": "x", "variables": {"x": "1"}}),
            "variables.x",
        ),
        (
            json!({"expression": "x", "variables": {"bad name": 1}}),
            "variables",
        ),
        (json!({"expression": "x".repeat(4097)}), "expression"),
    ] {
        match run(&ctx, "calc", args.clone()).await {
            Err(crate::Error::SchemaViolation { field: got, .. }) => {
                assert_eq!(got, field, "{args}")
            }
            other => panic!("{args}: {other:?}"),
        }
    }
}
