//! `heistctl checkpoint create|ls|show|restore|rm`: snapshots of a session's workspace that
//! restore in place or fork into a new session (`heistctl session fork`) on any worker.

pub mod create;
pub mod ls;
pub mod progress;
pub mod restore;
pub mod rm;
pub mod show;

use std::collections::BTreeMap;

use heist_proto::v1::{self, EntryKind};
use serde::Serialize;

use crate::{
    cli::Context,
    error::Error,
    output::{self, Format, Table, labels_text},
};

/// Verbs of `checkpoint`.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Snapshot a session's workspace (only changed files are hashed and uploaded).
    #[command(alias = "new")]
    Create(create::Args),
    /// List your checkpoints, newest first.
    #[command(alias = "list")]
    Ls(ls::Args),
    /// Show one checkpoint (and its file list with --manifest).
    #[command(alias = "get")]
    Show(show::Args),
    /// Replace a session's workspace with a checkpoint's content.
    Restore(restore::Args),
    /// Delete a checkpoint and the blobs only it used.
    #[command(alias = "delete")]
    Rm(rm::Args),
}

/// Runs a `checkpoint` verb.
pub async fn run(ctx: &Context, cmd: Command) -> Result<u8, Error> {
    match cmd {
        Command::Create(args) => create::run(ctx, args).await,
        Command::Ls(args) => ls::run(ctx, args).await,
        Command::Show(args) => show::run(ctx, args).await,
        Command::Restore(args) => restore::run(ctx, args).await,
        Command::Rm(args) => rm::run(ctx, args).await,
    }
}

/// A checkpoint as printed (`--output json` is stable).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckpointView {
    /// Checkpoint id.
    pub id: String,
    /// Session it was taken from.
    pub session_id: String,
    /// Owning principal.
    pub owner: String,
    /// The checkpoint it descends from, or null.
    pub parent_id: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Commit time (RFC 3339).
    pub created_at: Option<String>,
    /// Worker that captured it.
    pub worker_id: String,
    /// Files in it.
    pub files: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// What the capture cost.
    pub stats: Option<StatsView>,
    /// The tree, with `show --manifest`.
    pub manifest: Option<Vec<EntryView>>,
}

/// What a capture cost.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatsView {
    /// Files whose content was read (the rest came from the stat cache).
    pub hashed_files: u64,
    /// Bytes read.
    pub hashed_bytes: u64,
    /// Blobs uploaded (the store lacked them).
    pub uploaded_blobs: u64,
    /// Bytes uploaded.
    pub uploaded_bytes: u64,
    /// Capture time on the worker, ms.
    pub duration_ms: f64,
}

/// One manifest entry as printed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EntryView {
    /// Path in the workspace.
    pub path: String,
    /// file | dir | symlink.
    pub kind: &'static str,
    /// Permission bits, octal (`0644`).
    pub mode: String,
    /// Size (files).
    pub size: u64,
    /// BLAKE3, hex (files), or null.
    pub hash: Option<String>,
    /// Symlink target, or null.
    pub target: Option<String>,
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

#[allow(clippy::cast_precision_loss)]
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl From<&v1::Checkpoint> for CheckpointView {
    fn from(c: &v1::Checkpoint) -> Self {
        Self {
            id: c.id.clone(),
            session_id: c.session_id.clone(),
            owner: c.owner.clone(),
            parent_id: non_empty(&c.parent_id),
            labels: c
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            created_at: c.created_at.map(|t| t.to_string()),
            worker_id: c.worker_id.clone(),
            files: c.file_count,
            bytes: c.total_bytes,
            stats: c.stats.as_ref().map(|s| StatsView {
                hashed_files: s.hashed_files,
                hashed_bytes: s.hashed_bytes,
                uploaded_blobs: s.uploaded_blobs,
                uploaded_bytes: s.uploaded_bytes,
                duration_ms: ms(s.duration_us),
            }),
            manifest: c.manifest.as_ref().map(|m| {
                m.entries
                    .iter()
                    .map(|e| {
                        let kind = match EntryKind::try_from(e.kind) {
                            Ok(EntryKind::Dir) => "dir",
                            Ok(EntryKind::Symlink) => "symlink",
                            _ => "file",
                        };
                        EntryView {
                            path: e.path.clone(),
                            kind,
                            mode: format!("{:04o}", e.mode),
                            size: e.size,
                            hash: (e.hash.len() == 32)
                                .then(|| e.hash.iter().map(|b| format!("{b:02x}")).collect()),
                            target: non_empty(&e.symlink_target),
                        }
                    })
                    .collect()
            }),
        }
    }
}

/// `1.5 MiB`-style sizes for tables.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    #[allow(clippy::cast_precision_loss)]
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Prints one checkpoint: JSON, or `key: value` lines (and the manifest as a table).
pub fn print_one(format: Format, checkpoint: &v1::Checkpoint) -> Result<(), Error> {
    let view = CheckpointView::from(checkpoint);
    let mut out = std::io::stdout().lock();
    if format == Format::Json {
        return output::write_json(&mut out, &view);
    }
    let mut text = String::new();
    let mut line = |k: &str, v: String| text.push_str(&format!("{k:<13}{v}\n"));
    line("id:", view.id.clone());
    line("session:", view.session_id.clone());
    line(
        "parent:",
        view.parent_id.clone().unwrap_or_else(|| "-".to_owned()),
    );
    line("worker:", view.worker_id.clone());
    line(
        "created:",
        view.created_at.clone().unwrap_or_else(|| "-".to_owned()),
    );
    line("labels:", labels_text(&view.labels));
    line("files:", view.files.to_string());
    line(
        "bytes:",
        format!("{} ({})", view.bytes, human_bytes(view.bytes)),
    );
    if let Some(s) = &view.stats {
        line(
            "capture:",
            format!(
                "{:.1} ms, hashed {} files ({}), uploaded {} blobs ({})",
                s.duration_ms,
                s.hashed_files,
                human_bytes(s.hashed_bytes),
                s.uploaded_blobs,
                human_bytes(s.uploaded_bytes)
            ),
        );
    }
    if let Some(entries) = &view.manifest {
        let mut t = Table::new(&["MODE", "KIND", "SIZE", "HASH", "PATH"]);
        for e in entries {
            let path = match &e.target {
                Some(target) => format!("{} -> {target}", e.path),
                None => e.path.clone(),
            };
            let hash = e.hash.as_deref().map_or("-", |h| &h[..12]).to_owned();
            t.row(vec![
                e.mode.clone(),
                e.kind.to_owned(),
                e.size.to_string(),
                hash,
                path,
            ]);
        }
        text.push('\n');
        text.push_str(&t.render());
    }
    output::write_text(&mut out, &text)
}

/// Prints checkpoints: JSON array or a table.
pub fn print_many(format: Format, checkpoints: &[v1::Checkpoint]) -> Result<(), Error> {
    let views: Vec<CheckpointView> = checkpoints.iter().map(CheckpointView::from).collect();
    let mut out = std::io::stdout().lock();
    if format == Format::Json {
        return output::write_json(&mut out, &views);
    }
    let mut t = Table::new(&[
        "ID", "SESSION", "PARENT", "FILES", "SIZE", "CREATED", "LABELS",
    ]);
    for v in &views {
        t.row(vec![
            v.id.clone(),
            v.session_id.clone(),
            v.parent_id.clone().unwrap_or_else(|| "-".to_owned()),
            v.files.to_string(),
            human_bytes(v.bytes),
            v.created_at.clone().unwrap_or_else(|| "-".to_owned()),
            labels_text(&v.labels),
        ]);
    }
    output::write_text(&mut out, &t.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_stable_and_sizes_readable() {
        let c = v1::Checkpoint {
            id: "c-1".to_owned(),
            session_id: "s-1".to_owned(),
            manifest: Some(v1::Manifest {
                entries: vec![v1::ManifestEntry {
                    path: "a".to_owned(),
                    kind: EntryKind::File as i32,
                    mode: 0o644,
                    size: 3,
                    hash: vec![0xab; 32],
                    symlink_target: String::new(),
                }],
                ..v1::Manifest::default()
            }),
            ..v1::Checkpoint::default()
        };
        let v = CheckpointView::from(&c);
        assert_eq!(v.parent_id, None);
        let m = v.manifest.expect("manifest");
        assert_eq!(m[0].mode, "0644");
        assert_eq!(m[0].hash.as_deref().map(str::len), Some(64));
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
