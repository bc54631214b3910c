//! Logging setup shared by every binary: LOG_LEVEL (an EnvFilter directive such as `info` or
//! `heist_coordinator=debug,info`) and LOG_FORMAT (`text`, the default, or `json`). Logs go to
//! stderr so stdout stays free for data.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber. A malformed LOG_LEVEL is an error naming the bad directive.
pub fn init(level: &str, format: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(level)
        .map_err(|e| format!("LOG_LEVEL {level:?} is not a valid filter: {e}"))?;
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format {
        "json" => builder.json().flatten_event(true).try_init(),
        "text" | "" => builder.try_init(),
        other => {
            return Err(format!(
                "LOG_FORMAT {other:?} is not known: use text or json"
            ));
        }
    };
    result.map_err(|e| format!("cannot install the log subscriber: {e}"))
}
