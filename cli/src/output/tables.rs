//! Tables for people: aligned columns, short times, first clauses of descriptions. Their
//! layout may change between versions; scripts use `--output json`.

use std::collections::BTreeMap;

use super::{SessionView, ToolView, WorkerView};

/// `k=v,k2=v2` (sorted), or `-` when empty.
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".to_owned();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Aligned columns: a header row and data rows, two spaces between columns.
#[derive(Clone, Debug)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) -> &mut Self {
        self.rows.push(cells);
        self
    }

    /// The table as text.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[c].saturating_sub(cell.chars().count());
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Sessions as a table.
pub fn sessions_table(sessions: &[SessionView]) -> String {
    let mut t = Table::new(&["ID", "STATE", "WORKER", "CONNECTED", "LABELS", "CREATED"]);
    for s in sessions {
        t.row(vec![
            s.id.clone(),
            s.state.clone(),
            s.worker_id.clone(),
            yes_no(s.worker_connected),
            labels_text(&s.labels),
            short_time(&s.created_at),
        ]);
    }
    t.render()
}

/// A session's tool policy: its entries, or `(all the token allows)`.
fn allowed_tools_text(allowed: &[String]) -> String {
    if allowed.is_empty() {
        "(all the token allows)".to_owned()
    } else {
        allowed.join(",")
    }
}

/// One session as `key: value` lines.
pub fn session_details(s: &SessionView) -> String {
    let mut t = Table::new(&["id:", &s.id]);
    t.row(vec!["state:".into(), s.state.clone()])
        .row(vec!["owner:".into(), s.owner.clone()])
        .row(vec!["worker_id:".into(), s.worker_id.clone()])
        .row(vec!["worker_connected:".into(), yes_no(s.worker_connected)])
        .row(vec!["labels:".into(), labels_text(&s.labels)])
        .row(vec![
            "allowed_tools:".into(),
            allowed_tools_text(&s.allowed_tools),
        ])
        .row(vec!["created_at:".into(), or_dash(&s.created_at)])
        .row(vec!["updated_at:".into(), or_dash(&s.updated_at)]);
    if let Some(reason) = &s.failure_reason {
        t.row(vec!["failure_reason:".into(), reason.clone()]);
    }
    if let Some(r) = &s.recovered_from {
        t.row(vec![
            "recovered_from:".into(),
            format!(
                "{} ({} lost; {} calls after the checkpoint lost)",
                r.checkpoint_id, r.lost_worker_id, r.lost_calls
            ),
        ])
        .row(vec!["recovered_at:".into(), or_dash(&r.recovered_at)]);
    }
    t.render()
}

/// Workers as a table.
pub fn workers_table(workers: &[WorkerView]) -> String {
    let mut t = Table::new(&[
        "ID",
        "STATE",
        "ADDRESS",
        "SESSIONS",
        "IN-FLIGHT",
        "LABELS",
        "VERSION",
    ]);
    for w in workers {
        t.row(vec![
            w.id.clone(),
            w.state.clone(),
            w.address.clone(),
            format!("{}/{}", w.active_sessions, w.capacity),
            w.in_flight_calls.to_string(),
            labels_text(&w.labels),
            w.version.clone(),
        ]);
    }
    t.render()
}

/// One worker as `key: value` lines.
pub fn worker_details(w: &WorkerView) -> String {
    let mut t = Table::new(&["id:", &w.id]);
    t.row(vec!["state:".into(), w.state.clone()])
        .row(vec!["address:".into(), w.address.clone()])
        .row(vec![
            "sessions:".into(),
            format!("{}/{}", w.active_sessions, w.capacity),
        ])
        .row(vec![
            "in_flight_calls:".into(),
            w.in_flight_calls.to_string(),
        ])
        .row(vec!["labels:".into(), labels_text(&w.labels)])
        .row(vec!["version:".into(), w.version.clone()])
        .row(vec!["sandbox_backend:".into(), w.sandbox_backend.clone()])
        .row(vec!["isolation:".into(), or_dash_list(&w.isolation)])
        .row(vec!["tools:".into(), w.tools.join(", ")])
        .row(vec!["registered_at:".into(), or_dash(&w.registered_at)])
        .row(vec!["last_seen_at:".into(), or_dash(&w.last_seen_at)]);
    t.render()
}

/// Tools as a table.
pub fn tools_table(tools: &[ToolView]) -> String {
    let mut t = Table::new(&["NAME", "READ-ONLY", "DESCRIPTION"]);
    for tool in tools {
        t.row(vec![
            tool.name.clone(),
            yes_no(tool.read_only),
            summary(&tool.description),
        ]);
    }
    t.render()
}

/// An RFC 3339 time without its fractional seconds (tables only; JSON keeps them).
fn short_time(t: &Option<String>) -> String {
    match t {
        Some(t) => match (t.find('.'), t.ends_with('Z')) {
            (Some(dot), true) => format!("{}Z", &t[..dot]),
            _ => t.clone(),
        },
        None => "-".to_owned(),
    }
}

/// The first clause of a description, at most 80 characters (tables only).
fn summary(description: &str) -> String {
    const MAX: usize = 80;
    let first = description
        .split_inclusive(['.', ':', '\n'])
        .next()
        .unwrap_or_default()
        .trim_end_matches(['.', ':', '\n']);
    if first.chars().count() <= MAX {
        first.to_owned()
    } else {
        let cut: String = first.chars().take(MAX - 3).collect();
        format!("{cut}...")
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn or_dash(s: &Option<String>) -> String {
    s.clone().unwrap_or_else(|| "-".to_owned())
}

fn or_dash_list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_shorten_times_and_descriptions() {
        assert_eq!(
            short_time(&Some("2026-01-02T03:04:05.123456Z".into())),
            "2026-01-02T03:04:05Z"
        );
        assert_eq!(
            short_time(&Some("2026-01-02T03:04:05Z".into())),
            "2026-01-02T03:04:05Z"
        );
        assert_eq!(short_time(&None), "-");
        assert_eq!(summary("Reads a file. More text."), "Reads a file");
        assert_eq!(summary("Evaluates: numbers"), "Evaluates");
        assert_eq!(summary(&"x".repeat(100)).chars().count(), 80);
        assert_eq!(summary(""), "");
    }

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&["A", "BBB"]);
        t.row(vec!["xxxx".into(), "y".into()]);
        assert_eq!(t.render(), "A     BBB\nxxxx  y\n");
    }
}
