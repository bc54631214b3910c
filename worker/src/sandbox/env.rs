//! The environment a command gets: a fixed allow-list (nothing of the worker's own environment
//! leaks in: no tokens, no addresses) plus the caller's validated entries, which win.

use std::path::Path;

use crate::Error;

/// Directories on every command's PATH (after the Python interpreter's, when there is one).
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Longest variable name accepted.
const MAX_NAME: usize = 256;
/// Most variables a caller may set.
pub const MAX_VARS: usize = 256;

/// The command's whole environment: the allow-list, then `extra` (already validated) on top.
pub fn build(
    root: &Path,
    cwd: &Path,
    python_bin: Option<&Path>,
    extra: Vec<(String, String)>,
) -> Vec<(String, String)> {
    let home = root.display().to_string();
    let path = match python_bin.map(|p| p.display().to_string()) {
        Some(dir) if !SYSTEM_PATH.split(':').any(|d| d == dir) => format!("{dir}:{SYSTEM_PATH}"),
        _ => SYSTEM_PATH.to_owned(),
    };
    let mut env: Vec<(String, String)> = [
        ("PATH", path),
        ("HOME", home.clone()),
        ("TMPDIR", home),
        ("PWD", cwd.display().to_string()),
        ("LANG", "C.UTF-8".to_owned()),
        ("TERM", "dumb".to_owned()),
        ("USER", "sandbox".to_owned()),
        ("LOGNAME", "sandbox".to_owned()),
        ("SHELL", "/bin/sh".to_owned()),
        // Live output: Python flushes every write instead of buffering until exit.
        ("PYTHONUNBUFFERED", "1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for (key, value) in extra {
        match env.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => env.push((key, value)),
        }
    }
    env
}

/// Checks a caller's `env` object: names like `FOO_1`, values without NUL bytes, at most
/// [`MAX_VARS`] entries. Values must be strings (numbers and booleans are refused so that
/// nothing is converted silently).
pub fn validate_env(
    env: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<(String, String)>, Error> {
    let bad = |field: String, message: String| Error::InvalidArgument { field, message };
    if env.len() > MAX_VARS {
        return Err(bad(
            "env".to_owned(),
            format!(
                "env has {} entries; at most {MAX_VARS} are allowed",
                env.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(env.len());
    for (key, value) in env {
        let field = format!("env.{key}");
        let valid_name = !key.is_empty()
            && key.len() <= MAX_NAME
            && key
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(bad(
                field,
                format!(
                    "environment variable name {:?} is not valid: use letters, digits and _ \
                     (not starting with a digit), e.g. MY_VAR",
                    key.escape_debug().to_string()
                ),
            ));
        }
        let Some(text) = value.as_str() else {
            return Err(bad(
                field,
                format!("environment variable {key} must be a string, e.g. \"1\""),
            ));
        };
        if text.contains('\0') {
            return Err(bad(
                field,
                format!("environment variable {key} contains a NUL byte"),
            ));
        }
        out.push((key.clone(), text.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn the_allow_list_sets_home_to_the_workspace_and_callers_win() {
        let env = build(
            Path::new("/ws/s-1"),
            Path::new("/ws/s-1/src"),
            Some(Path::new("/opt/py/bin")),
            vec![
                ("LANG".into(), "de_DE.UTF-8".into()),
                ("X".into(), "1".into()),
            ],
        );
        assert_eq!(get(&env, "HOME"), Some("/ws/s-1"));
        assert_eq!(get(&env, "PWD"), Some("/ws/s-1/src"));
        assert_eq!(get(&env, "LANG"), Some("de_DE.UTF-8"));
        assert_eq!(get(&env, "X"), Some("1"));
        assert!(get(&env, "PATH").is_some_and(|p| p.starts_with("/opt/py/bin:/usr/local/sbin")));
        let keys: Vec<_> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert!(!keys.contains(&"HEIST_JOIN_TOKEN"));
        let env = build(
            Path::new("/w"),
            Path::new("/w"),
            Some(Path::new("/usr/bin")),
            vec![],
        );
        assert_eq!(get(&env, "PATH"), Some(SYSTEM_PATH));
    }

    #[test]
    fn bad_names_and_values_are_refused_with_the_field() {
        for (env, field) in [
            (json!({"1X": "a"}), "env.1X"),
            (json!({"A-B": "a"}), "env.A-B"),
            (json!({"": "a"}), "env."),
            (json!({"A": 1}), "env.A"),
            (json!({"A": "x\u{0}y"}), "env.A"),
        ] {
            match validate_env(env.as_object().expect("object")) {
                Err(Error::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{env}: {other:?}"),
            }
        }
        let ok = validate_env(
            json!({"MY_VAR": "v", "_x2": ""})
                .as_object()
                .expect("object"),
        )
        .expect("valid");
        assert_eq!(ok.len(), 2);
    }
}
