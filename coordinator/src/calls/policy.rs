//! A session's tool policy: the tools callable in it, set when the session is created
//! (`allowed_tools`: exact names or `prefix.*` globs) and kept in its record, so it survives
//! restarts and failover; a fork takes its checkpoint's. Empty means no narrowing.

use std::collections::BTreeSet;

use heist_proto::errors;

use crate::error::Error;

/// Most entries a policy may have.
pub const MAX_ENTRIES: usize = 64;
/// Longest entry, in bytes.
const MAX_ENTRY_BYTES: usize = 128;

/// The tools a session allows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolPolicy {
    /// Checked entries; empty allows every tool.
    entries: Vec<String>,
}

impl ToolPolicy {
    /// The policy stored in a session record (checked when it was created).
    pub fn stored(entries: &[String]) -> Self {
        Self {
            entries: entries.to_vec(),
        }
    }

    /// Whether the session narrows the tools at all.
    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `tool` may be called in the session.
    pub fn allows(&self, tool: &str) -> bool {
        self.is_open() || self.entries.iter().any(|e| matches(e, tool))
    }

    /// The entries, comma-separated, for messages.
    pub fn describe(&self) -> String {
        self.entries.join(", ")
    }
}

/// Whether the policy entry `entry` (a name, or `prefix.*`) matches `tool`.
pub fn matches(entry: &str, tool: &str) -> bool {
    match glob_prefix(entry) {
        Some(prefix) => tool.len() > prefix.len() && tool.starts_with(prefix),
        None => entry == tool,
    }
}

/// `fs.` for the glob `fs.*`; `None` for an exact name.
fn glob_prefix(entry: &str) -> Option<&str> {
    entry.strip_suffix('*').filter(|p| p.ends_with('.'))
}

/// Checks the `allowed_tools` of a new session against the tools that exist (`known`: the
/// built-in ones and those connected workers offer): each entry must name one of them or be a
/// `prefix.*` glob matching at least one. Duplicates are dropped; order is kept.
pub fn check<'a>(
    entries: &[String],
    known: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<String>, Error> {
    let known: BTreeSet<&str> = known.into_iter().collect();
    let bad = |message: String| {
        Err(Error::Status(errors::invalid_argument(
            "allowed_tools",
            message,
        )))
    };
    if entries.len() > MAX_ENTRIES {
        return bad(format!(
            "{} entries given; at most {MAX_ENTRIES} are allowed",
            entries.len()
        ));
    }
    let mut checked: Vec<String> = Vec::with_capacity(entries.len());
    for entry in entries {
        let valid = entry.len() <= MAX_ENTRY_BYTES
            && match glob_prefix(entry) {
                Some(prefix) => {
                    !prefix[..prefix.len() - 1].contains('*')
                        && known.iter().any(|t| matches(entry, t))
                }
                None => known.contains(entry.as_str()),
            };
        if !valid {
            return bad(format!(
                "{entry:?} is neither a tool nor a glob of tools: use tool names ({}) or \
                 globs ({}); `heistctl tools ls` lists the tools",
                known.iter().copied().collect::<Vec<_>>().join(", "),
                globs(&known).join(", "),
            ));
        }
        if !checked.contains(entry) {
            checked.push(entry.clone());
        }
    }
    Ok(checked)
}

/// The `prefix.*` globs of the first name segments among `known` (`fs.*`, `memory.*`, ...).
fn globs(known: &BTreeSet<&str>) -> Vec<String> {
    let prefixes: BTreeSet<&str> = known
        .iter()
        .filter_map(|t| t.split_once('.').map(|(p, _)| p))
        .collect();
    prefixes.into_iter().map(|p| format!("{p}.*")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: &[&str] = &[
        "calc",
        "exec",
        "fs.read",
        "fs.write",
        "memory.store",
        "w1.x.y",
    ];

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn globs_match_by_prefix_and_names_exactly() {
        assert!(matches("fs.*", "fs.read"));
        assert!(matches("fs.*", "fs.a.b"));
        assert!(!matches("fs.*", "fs."));
        assert!(!matches("fs.*", "fsx.read"));
        assert!(!matches("fs.*", "fs"));
        assert!(matches("calc", "calc"));
        assert!(!matches("calc", "calculator"));
        assert!(!matches("cal*", "calc"), "only `prefix.*` is a glob");
        assert!(matches("w1.x.*", "w1.x.y"));

        let policy = ToolPolicy::stored(&strings(&["fs.*", "calc"]));
        assert!(policy.allows("fs.write") && policy.allows("calc"));
        assert!(!policy.allows("exec") && !policy.allows("memory.store"));
        assert_eq!(policy.describe(), "fs.*, calc");
        assert!(ToolPolicy::default().allows("anything"));
    }

    #[test]
    fn entries_must_name_known_tools() {
        let known = || KNOWN.iter().copied();
        let ok = check(&strings(&["fs.*", "calc", "fs.*", "w1.x.*"]), known()).expect("valid");
        assert_eq!(ok, strings(&["fs.*", "calc", "w1.x.*"]));
        assert_eq!(check(&[], known()).expect("empty"), Vec::<String>::new());

        for bad in [
            "nope", "db.*", "*", "fs*", "*.read", "f*.*", "", "fs.read ", "calc.*",
        ] {
            let err = check(&strings(&[bad]), known()).expect_err(bad);
            let status = tonic::Status::from(err);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad:?}");
            assert!(
                status.message().contains("fs.*, memory.*, w1.*"),
                "{}",
                status.message()
            );
            assert!(
                status.message().contains("calc, exec"),
                "{}",
                status.message()
            );
        }
        let many: Vec<String> = (0..=MAX_ENTRIES).map(|_| "calc".to_owned()).collect();
        assert!(check(&many, known()).is_err());
    }
}
