//! The tool-argument validator on any JSON, for every built-in tool, in the form the worker
//! receives it (JSON → google.protobuf.Struct → JSON, as the coordinator forwards arguments):
//! never a panic, a refusal always names the argument it is about, and the Struct conversion
//! round-trips.
#![no_main]

use std::sync::OnceLock;

use heist_worker::fuzzing::Validators;
use libfuzzer_sys::fuzz_target;
use serde_json::Value as Json;

fn validators() -> &'static (Validators, Vec<String>) {
    static VALIDATORS: OnceLock<(Validators, Vec<String>)> = OnceLock::new();
    VALIDATORS.get_or_init(|| {
        let validators = Validators::builtin().expect("the built-in schemas compile");
        let names = validators.names();
        (validators, names)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(args) = serde_json::from_slice::<Json>(rest) else {
        return;
    };
    let (validators, names) = validators();
    let tool = &names[usize::from(selector) % names.len()];

    // The wire form: only objects travel as a Struct.
    let Some(wire) = heist_proto::json::json_to_struct(&args) else {
        return;
    };
    let received = heist_proto::json::struct_to_json(&wire);
    assert_eq!(
        heist_proto::json::json_to_struct(&received).as_ref(),
        Some(&wire),
        "the Struct form of {args} does not round-trip"
    );

    if let Err((field, message)) = validators.check(tool, &received) {
        if field.is_empty() {
            assert!(
                message.starts_with("arguments: "),
                "{tool}: a root refusal says so: {message}"
            );
        } else {
            assert!(
                message.contains(&format!("`{field}`")),
                "{tool}: the refusal of {received} does not name `{field}`: {message}"
            );
        }
    }
});
