//! Turning a JSON Schema validation failure into an error a caller can act on: the offending
//! property path ("path", "variables.x"; "" for the root object) and a message naming it. A
//! property whose name is empty or holds a `.` is written as a JSON string (`""`, `"a.b"`), so
//! the path stays unambiguous.

use jsonschema::{Validator, error::ValidationErrorKind, paths::LocationSegment};
use serde_json::Value as Json;

use crate::Error;

/// Longest message kept from the validator (it quotes the offending value, which may be large).
const MAX_MESSAGE_CHARS: usize = 300;

/// Checks `args`; the first violation becomes [`Error::SchemaViolation`].
pub(crate) fn check(validator: &Validator, args: &Json) -> Result<(), Error> {
    let Err(err) = validator.validate(args) else {
        return Ok(());
    };
    let mut field: Vec<String> = err
        .instance_path()
        .iter()
        .map(|part| match part {
            LocationSegment::Property(name) => segment(&name),
            LocationSegment::Index(i) => i.to_string(),
        })
        .collect();
    // For "required" and "additionalProperties" the instance is the parent object: name the
    // property itself so the caller sees which argument to add or remove.
    let message = match err.kind() {
        ValidationErrorKind::Required { property } => {
            let name = property
                .as_str()
                .map_or_else(|| property.to_string(), str::to_owned);
            field.push(segment(&name));
            format!("argument `{}` is required", field.join("."))
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            if let Some(name) = unexpected.first() {
                field.push(segment(name));
            }
            format!("`{}` is not an argument this tool accepts", field.join("."))
        }
        _ if field.is_empty() => format!("arguments: {}", truncate(&err.to_string())),
        _ => format!(
            "argument `{}`: {}",
            field.join("."),
            truncate(&err.to_string())
        ),
    };
    let field = field.join(".");
    Err(Error::SchemaViolation { field, message })
}

/// One property name in a dotted path: as is, or JSON-quoted when it is empty or has a `.`.
fn segment(name: &str) -> String {
    if name.is_empty() || name.contains('.') {
        Json::String(name.to_owned()).to_string()
    } else {
        name.to_owned()
    }
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= MAX_MESSAGE_CHARS {
        return text.to_owned();
    }
    let mut short: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
    short.push_str("...");
    short
}

#[cfg(test)]
mod tests {
    use super::*;
    use heist_proto::errors;
    use serde_json::json;

    fn violation(schema: Json, args: Json) -> (String, String) {
        let validator = jsonschema::draft202012::new(&schema).expect("schema");
        match check(&validator, &args) {
            Err(Error::SchemaViolation { field, message }) => (field, message),
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    fn fs_like() -> Json {
        json!({
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "variables": {"type": "object", "additionalProperties": {"type": "number"}},
                "items": {"type": "array", "items": {"type": "integer"}}
            },
            "required": ["path"],
            "additionalProperties": false
        })
    }

    #[test]
    fn wrong_type_names_the_field() {
        let (field, message) = violation(fs_like(), json!({"path": 5}));
        assert_eq!(field, "path");
        assert_eq!(message, "argument `path`: 5 is not of type \"string\"");
    }

    #[test]
    fn nested_fields_are_dotted() {
        let (field, message) =
            violation(fs_like(), json!({"path": "a", "variables": {"x": "one"}}));
        assert_eq!(field, "variables.x");
        assert!(
            message.starts_with("argument `variables.x`: \"one\""),
            "{message}"
        );

        let (field, _) = violation(fs_like(), json!({"path": "a", "items": [1, 2.5]}));
        assert_eq!(field, "items.1");
    }

    #[test]
    fn missing_and_unknown_arguments_are_named() {
        let (field, message) = violation(fs_like(), json!({}));
        assert_eq!(field, "path");
        assert_eq!(message, "argument `path` is required");

        let (field, message) = violation(fs_like(), json!({"path": "a", "bogus": 1}));
        assert_eq!(field, "bogus");
        assert_eq!(message, "`bogus` is not an argument this tool accepts");
    }

    #[test]
    fn empty_and_dotted_names_are_quoted_so_the_field_is_never_the_root() {
        // Found by the tool_args fuzz target: `{"": 1}` was refused with field "", the root.
        let (field, message) = violation(fs_like(), json!({"path": "a", "": 1}));
        assert_eq!(field, r#""""#);
        assert_eq!(message, r#"`""` is not an argument this tool accepts"#);
        let (field, _) = violation(fs_like(), json!({"path": "a", "a.b": 1}));
        assert_eq!(field, r#""a.b""#);
        let (field, _) = violation(fs_like(), json!({"path": "a", "variables": {"x.y": "one"}}));
        assert_eq!(field, r#"variables."x.y""#);
    }

    #[test]
    fn root_violations_have_an_empty_field() {
        let (field, message) = violation(json!({"type": "object"}), json!([1]));
        assert_eq!(field, "");
        assert!(message.starts_with("arguments: "), "{message}");
    }

    #[test]
    fn long_values_are_truncated_in_messages() {
        let (_, message) = violation(
            json!({"type": "object", "properties": {"s": {"maxLength": 3}}}),
            json!({"s": "x".repeat(10_000)}),
        );
        assert!(message.len() < 400, "{}", message.len());
    }

    #[test]
    fn violations_map_to_invalid_argument_with_field_metadata() {
        let validator = jsonschema::draft202012::new(&fs_like()).expect("schema");
        let err = check(&validator, &json!({"path": 5})).expect_err("violation");
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            errors::reason_of(&status).as_deref(),
            Some(errors::reason::SCHEMA_VIOLATION)
        );
        assert_eq!(
            errors::metadata_of(&status, "field").as_deref(),
            Some("path")
        );
    }
}
