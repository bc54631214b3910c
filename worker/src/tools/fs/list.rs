//! `fs.list` and `fs.stat`: directory entries and file metadata. Symlinks are reported as
//! symlinks and never followed (a recursive listing does not descend into them).

use std::path::{Path, PathBuf};

use cap_std::fs::{Dir, MetadataExt};
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};
use tokio_util::sync::CancellationToken;

use super::{blocking, checked_path, display, entry_json, io_failure, rfc3339};
use crate::{
    Error,
    sessions::Workspace,
    tools::{Content, Tool, ToolContext, ToolOutput, parse_args},
};

/// The fs.list tool.
pub(crate) struct List;

fn dot() -> String {
    ".".to_owned()
}

#[derive(Deserialize)]
struct ListArgs {
    #[serde(default = "dot")]
    path: String,
    #[serde(default)]
    recursive: bool,
}

impl Tool for List {
    fn name(&self) -> &'static str {
        "fs.list"
    }

    fn description(&self) -> &'static str {
        "Lists a directory of the session workspace (optionally recursively): entries {path, \
         type (file|dir|symlink), size, mode} with paths relative to the workspace root. Stops at \
         the worker's entry limit and says so (truncated: true)."
    }

    fn input_schema(&self) -> Json {
        json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "default": ".", "description": "Directory relative to the workspace (default: the root)."},
                "recursive": {"type": "boolean", "default": false, "description": "Include subdirectories (symlinks are not followed)."}
            },
            "additionalProperties": false
        })
    }

    fn read_only(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        ctx: &'a ToolContext,
        args: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, Error>> {
        Box::pin(async move {
            let args: ListArgs = parse_args(args)?;
            let max = ctx.limits.max_list_entries;
            let cancel = ctx.cancel.clone();
            blocking(ctx, move |ws| list(ws, &args, max, &cancel)).await
        })
    }
}

fn list(
    ws: &Workspace,
    args: &ListArgs,
    max_entries: usize,
    cancel: &CancellationToken,
) -> Result<ToolOutput, Error> {
    let rel = checked_path(&args.path)?;
    let root = ws.dir();
    // The real location (symlinks resolved beneath the root) names the entries correctly.
    let start = match root.canonicalize(&rel) {
        Ok(start) if start == Path::new(".") => PathBuf::new(),
        Ok(start) => start,
        Err(err) => return io_failure(&err, &args.path, "list"),
    };
    let dir = if start.as_os_str().is_empty() {
        root.try_clone()
    } else {
        root.open_dir(&start)
    };
    let dir = match dir {
        Ok(dir) => dir,
        Err(err) if err.kind() == std::io::ErrorKind::NotADirectory => {
            return Ok(ToolOutput::failed(format!(
                "cannot list `{}`: it is not a directory (use fs.stat or fs.read)",
                args.path
            )));
        }
        Err(err) => return io_failure(&err, &args.path, "list"),
    };

    let mut entries: Vec<Map<String, Json>> = Vec::new();
    let mut truncated = false;
    let mut pending: Vec<(Dir, PathBuf)> = vec![(dir, start)];
    'walk: while let Some((dir, prefix)) = pending.pop() {
        if cancel.is_cancelled() {
            return Ok(ToolOutput::failed("fs.list was cancelled"));
        }
        let read = match dir.entries() {
            Ok(read) => read,
            Err(err) => return io_failure(&err, &display(&prefix), "list"),
        };
        let mut names: Vec<_> = read.filter_map(Result::ok).map(|e| e.file_name()).collect();
        names.sort();
        for name in names {
            if entries.len() == max_entries {
                truncated = true;
                break 'walk;
            }
            // Entries can vanish while we list; skip those.
            let Ok(meta) = dir.symlink_metadata(&name) else {
                continue;
            };
            let path = prefix.join(&name);
            entries.push(entry_json(&display(&path), &meta));
            if args.recursive
                && meta.is_dir()
                && let Ok(child) = dir.open_dir(&name)
            {
                pending.push((child, path));
            }
        }
    }
    entries.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));

    let count = entries.len();
    let mut result = Map::new();
    result.insert("path".to_owned(), json!(args.path));
    result.insert(
        "entries".to_owned(),
        Json::Array(entries.into_iter().map(Json::Object).collect()),
    );
    result.insert("truncated".to_owned(), json!(truncated));
    let mut out = ToolOutput::object(result);
    if truncated {
        out.content.push(Content::Text(format!(
            "listing stopped at {count} entries (the worker's HEIST_MAX_LIST_ENTRIES limit): list \
             a subdirectory or without recursive to see the rest"
        )));
    }
    Ok(out)
}

/// The fs.stat tool.
pub(crate) struct Stat;

#[derive(Deserialize)]
struct StatArgs {
    path: String,
}

impl Tool for Stat {
    fn name(&self) -> &'static str {
        "fs.stat"
    }

    fn description(&self) -> &'static str {
        "Metadata of a path in the session workspace: {path, type (file|dir|symlink), size, \
         mode, modified (RFC 3339), modified_unix}. A symlink is described itself (with its \
         target), not followed."
    }

    fn input_schema(&self) -> Json {
        json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "Path relative to the workspace."}
            },
            "required": ["path"],
            "additionalProperties": false
        })
    }

    fn read_only(&self) -> bool {
        true
    }

    fn call<'a>(
        &'a self,
        ctx: &'a ToolContext,
        args: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, Error>> {
        Box::pin(async move {
            let args: StatArgs = parse_args(args)?;
            blocking(ctx, move |ws| stat(ws, &args)).await
        })
    }
}

fn stat(ws: &Workspace, args: &StatArgs) -> Result<ToolOutput, Error> {
    let rel = checked_path(&args.path)?;
    let meta = match ws.dir().symlink_metadata(&rel) {
        Ok(meta) => meta,
        Err(err) => return io_failure(&err, &args.path, "stat"),
    };
    let mut info = entry_json(&args.path, &meta);
    info.insert("modified".to_owned(), json!(rfc3339(meta.mtime())));
    info.insert("modified_unix".to_owned(), json!(meta.mtime()));
    if meta.is_symlink()
        && let Ok(target) = ws.dir().read_link_contents(&rel)
    {
        info.insert("target".to_owned(), json!(display(&target)));
    }
    Ok(ToolOutput::object(info))
}
