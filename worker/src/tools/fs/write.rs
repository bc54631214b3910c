//! `fs.write`: create, replace or append to a file.
//!
//! A replacing write is atomic: the content goes to a temp file in the same directory, which is
//! then renamed over the target, so readers see the old or the new file, never a torn one (the
//! data is not fsynced: a crash may lose the write, but not half of it). Renaming replaces the
//! directory entry, so a pre-existing hard link to a file elsewhere is unlinked, not written
//! through. A symlink target is written only when the link resolves inside the workspace.
//!
//! Writes respect the session's disk and file quotas (see [`crate::quota`]): a write that would
//! take the workspace over one is RESOURCE_EXHAUSTED naming it, and nothing is changed.

use std::{
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use base64::Engine as _;
use cap_std::fs::{Dir, MetadataExt, OpenOptions, OpenOptionsExt as _};
use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value as Json, json};

use super::{blocking, checked_path, display, io_failure, is_root, read::Encoding};
use crate::{
    Error,
    quota::{self, Quotas, UsageGuard},
    sessions::Workspace,
    tools::{Limits, Tool, ToolContext, ToolOutput, parse_args},
};

/// The fs.write tool.
pub(crate) struct Write;

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct Args {
    path: String,
    content: String,
    #[serde(default)]
    encoding: Encoding,
    #[serde(default)]
    append: bool,
    #[serde(default = "yes")]
    create_parents: bool,
}

impl Tool for Write {
    fn name(&self) -> &'static str {
        "fs.write"
    }

    fn description(&self) -> &'static str {
        "Writes a file in the session workspace: replaces it atomically, or appends with \
         append: true. Parent directories are created unless create_parents is false. The \
         resulting file may not exceed the worker's size limit."
    }

    fn input_schema(&self) -> Json {
        json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "minLength": 1, "description": "File path relative to the workspace."},
                "content": {"type": "string", "description": "The data, as text or base64 (see encoding)."},
                "encoding": {"enum": ["utf8", "base64"], "default": "utf8"},
                "append": {"type": "boolean", "default": false, "description": "Append instead of replacing."},
                "create_parents": {"type": "boolean", "default": true, "description": "Create missing parent directories."}
            },
            "required": ["path", "content"],
            "additionalProperties": false
        })
    }

    fn read_only(&self) -> bool {
        false
    }

    fn call<'a>(
        &'a self,
        ctx: &'a ToolContext,
        args: Json,
    ) -> BoxFuture<'a, Result<ToolOutput, Error>> {
        Box::pin(async move {
            let args: Args = parse_args(args)?;
            let limits = ctx.limits;
            let quotas = ctx.sandbox.quotas().clone();
            blocking(ctx, move |ws| write(ws, args, limits, &quotas)).await
        })
    }
}

fn write(ws: &Workspace, args: Args, limits: Limits, quotas: &Quotas) -> Result<ToolOutput, Error> {
    let rel = checked_path(&args.path)?;
    let not_a_file = || Error::InvalidArgument {
        field: "path".to_owned(),
        message: format!(
            "path {:?} does not name a file: give a file path such as \"notes/a.txt\"",
            args.path
        ),
    };
    if is_root(&rel) {
        return Err(not_a_file());
    }
    let bytes = match args.encoding {
        Encoding::Utf8 => args.content.into_bytes(),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(args.content.as_bytes())
            .map_err(|e| Error::InvalidArgument {
                field: "content".to_owned(),
                message: format!("content is not valid base64: {e}"),
            })?,
    };
    let limit_error = |size: u64| Error::LimitExceeded {
        limit: "max_file_bytes",
        message: format!(
            "writing `{}` would make it {size} bytes, over the worker's {}-byte file limit \
             (HEIST_MAX_FILE_BYTES); the file was not changed",
            args.path, limits.max_file_bytes
        ),
    };
    let len = bytes.len() as u64;
    if len > limits.max_file_bytes {
        return Err(limit_error(len));
    }

    let dir = ws.dir();
    let (parent, name) = match split(&rel) {
        Some(split) => split,
        None => return Err(not_a_file()),
    };
    // Held until the write is done, so concurrent writes cannot share the same free space.
    let mut usage = ws.usage().lock();
    let change = make_room(ws, &mut usage, quotas, &rel, len, args.append, &args.path)?;
    if args.create_parents
        && !parent.as_os_str().is_empty()
        && let Err(err) = dir.create_dir_all(&parent)
    {
        return io_failure(&err, &args.path, "create the parent directories of");
    }
    let mut target = match open_parent(dir, &parent) {
        Ok(target) => target,
        Err(err) if err.kind() == io::ErrorKind::NotFound && !args.create_parents => {
            return Ok(ToolOutput::failed(format!(
                "cannot write `{}`: the directory `{}` does not exist (pass create_parents: true to create it)",
                args.path,
                display(&parent)
            )));
        }
        Err(err) => return io_failure(&err, &args.path, "write"),
    };
    let mut name = name;
    // A symlink is written through only when it resolves inside the workspace.
    if target
        .symlink_metadata(&name)
        .is_ok_and(|meta| meta.is_symlink())
    {
        let resolved = match dir.canonicalize(&rel) {
            Ok(resolved) => resolved,
            Err(err) => return io_failure(&err, &args.path, "write through the symlink"),
        };
        let Some((resolved_parent, resolved_name)) = split(&resolved) else {
            return Err(not_a_file());
        };
        target = match open_parent(dir, &resolved_parent) {
            Ok(target) => target,
            Err(err) => return io_failure(&err, &args.path, "write"),
        };
        name = resolved_name;
    }
    // Never write to (or replace) a FIFO, socket or device: say what it is instead.
    if let Ok(meta) = target.symlink_metadata(&name) {
        super::refuse_special(meta.file_type(), &args.path)?;
    }

    let outcome = if args.append {
        append(&target, &name, &bytes, limits.max_file_bytes, &args.path)
    } else {
        replace(&target, &name, &bytes).map(|()| Outcome::Written(len))
    };
    let size = match outcome {
        Ok(Outcome::Written(size)) => size,
        Ok(Outcome::TooBig(size)) => return Err(limit_error(size)),
        Ok(Outcome::Refused(output)) => return Ok(output),
        Err(err) if is_full(&err) => {
            // Something the cache did not see filled it (a command's unlinked file): measure
            // again next time.
            drop(usage);
            ws.usage().invalidate();
            return Err(Error::LimitExceeded {
                limit: "disk_bytes",
                message: format!(
                    "cannot write `{}`: the session's workspace is full; its disk quota of {} \
                     bytes (HEIST_QUOTA_DISK_BYTES) is enforced by the file system and the \
                     write got ENOSPC (No space left on device); delete files to make room",
                    args.path, quotas.disk_bytes
                ),
            });
        }
        Err(err) => return io_failure(&err, &args.path, "write"),
    };
    usage.adjust(change.bytes, change.files);
    let mut info = Map::new();
    info.insert("path".to_owned(), json!(args.path));
    info.insert("bytes_written".to_owned(), json!(len));
    info.insert("size".to_owned(), json!(size));
    info.insert("appended".to_owned(), json!(args.append));
    Ok(ToolOutput::object(info))
}

/// Whether `err` says the file system (the session's own, under the `fs` disk quota) is full.
fn is_full(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::StorageFull
        || err.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
}

/// How a write changes the workspace's usage.
struct Change {
    bytes: i64,
    files: i64,
}

/// Checks that writing `len` bytes to `rel` (appending or replacing) keeps the workspace
/// within its disk and file quotas; returns the change to record once written. A write that
/// shrinks the workspace is always allowed, even over quota.
fn make_room(
    ws: &Workspace,
    usage: &mut UsageGuard<'_>,
    quotas: &Quotas,
    rel: &Path,
    len: u64,
    append: bool,
    raw: &str,
) -> Result<Change, Error> {
    let current = usage
        .current(ws.path(), quotas)
        .map_err(|e| Error::io("cannot measure the workspace for its quota", e))?;
    let dir = ws.dir();
    let existing = dir.metadata(rel).ok().filter(|m| m.is_file());
    let old_len = existing.as_ref().map_or(0, |m| m.len());
    let new_len = if append {
        old_len.saturating_add(len)
    } else {
        len
    };
    // The file itself and every missing parent directory are new entries.
    let mut new_entries = u64::from(dir.symlink_metadata(rel).is_err());
    let mut prefix = PathBuf::new();
    if let Some(parent) = rel.parent() {
        for component in parent.components() {
            prefix.push(component);
            if dir.symlink_metadata(&prefix).is_err() {
                new_entries += 1;
            }
        }
    }
    let bytes_after = current
        .bytes
        .saturating_sub(old_len)
        .saturating_add(new_len);
    if bytes_after > quotas.disk_bytes && bytes_after > current.bytes {
        let what = format!("writing `{raw}` ({len} bytes)");
        return Err(quota::exceeded(
            "disk_bytes",
            bytes_after,
            quotas.disk_bytes,
            &what,
        ));
    }
    let files_after = current.files.saturating_add(new_entries);
    if new_entries > 0 && files_after > quotas.files {
        let what = format!("creating `{raw}`");
        return Err(quota::exceeded("files", files_after, quotas.files, &what));
    }
    let delta = |after: u64, before: u64| {
        i64::try_from(after).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(i64::MAX)
    };
    Ok(Change {
        bytes: delta(new_len, old_len),
        files: i64::try_from(new_entries).unwrap_or(i64::MAX),
    })
}

/// `a/b/c.txt` -> (`a/b`, `c.txt`); `None` when the last component is not a name.
fn split(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let name = path.file_name()?;
    let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Some((parent, PathBuf::from(name)))
}

fn open_parent(dir: &Dir, parent: &Path) -> io::Result<Dir> {
    if parent.as_os_str().is_empty() {
        dir.try_clone()
    } else {
        dir.open_dir(parent)
    }
}

/// Writes `bytes` to a temp file next to `name` and renames it over `name`.
fn replace(dir: &Dir, name: &Path, bytes: &[u8]) -> io::Result<()> {
    let existing = dir.symlink_metadata(name).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(io::Error::from(io::ErrorKind::IsADirectory));
    }
    let tmp = PathBuf::from(format!(
        ".{}.heist-tmp-{:016x}",
        name.to_string_lossy(),
        fastrand::u64(..)
    ));
    let written = (|| {
        let mut file = dir.open_with(&tmp, OpenOptions::new().write(true).create_new(true))?;
        file.write_all(bytes)?;
        if let Some(meta) = &existing {
            file.set_permissions(meta.permissions())?;
        }
        dir.rename(&tmp, dir, name)
    })();
    if written.is_err() {
        // Best effort: the temp file is ours and must not linger.
        let _ = dir.remove_file(&tmp);
    }
    written
}

/// How a write ended, short of an I/O error.
enum Outcome {
    /// The file now has this size.
    Written(u64),
    /// The file would grow to this size, over the limit; nothing was written.
    TooBig(u64),
    /// Refused for a reason the caller should read; nothing was written.
    Refused(ToolOutput),
}

/// Appends `bytes` to `name` unless the file has other hard links or would exceed `max_bytes`.
fn append(dir: &Dir, name: &Path, bytes: &[u8], max_bytes: u64, raw: &str) -> io::Result<Outcome> {
    // O_NONBLOCK: a FIFO swapped in since the type check must not block the open.
    let mut file = dir.open_with(
        name,
        OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits()),
    )?;
    let meta = file.metadata()?;
    if !meta.is_file() && !meta.is_dir() {
        return Ok(Outcome::Refused(ToolOutput::failed(format!(
            "cannot append to `{raw}`: it is not a regular file"
        ))));
    }
    if meta.is_dir() {
        return Err(io::Error::from(io::ErrorKind::IsADirectory));
    }
    if meta.nlink() > 1 {
        return Ok(Outcome::Refused(ToolOutput::failed(format!(
            "cannot append to `{raw}`: it has {} hard links, so appending could change a file \
             outside the workspace; write the whole file without append instead",
            meta.nlink()
        ))));
    }
    let size = meta.len().saturating_add(bytes.len() as u64);
    if size > max_bytes {
        return Ok(Outcome::TooBig(size));
    }
    file.write_all(bytes)?;
    Ok(Outcome::Written(size))
}

#[cfg(test)]
mod quota_tests {
    use std::sync::Arc;

    use serde_json::json;

    use crate::{
        Error,
        quota::Quotas,
        sandbox::Sandbox,
        tools::test_support::{context, run},
    };

    #[tokio::test]
    async fn a_write_into_a_full_session_file_system_names_the_disk_quota() {
        use std::io::Write as _;

        use crate::{diskfs, sessions::Workspace};
        let quotas = Quotas {
            disk_bytes: 8 << 20,
            files: 100,
            ..Quotas::default()
        };
        let (tmp, mut ctx) = context();
        let Some(disk) = diskfs::DiskFs::start(
            diskfs::DiskQuotaMode::Auto,
            &tmp.path().join("img"),
            &quotas,
        )
        .expect("start") else {
            eprintln!("skipped: this host cannot loop-mount (not root?)");
            return;
        };
        let id = heist_proto::ids::SessionId::parse("s-full").expect("id");
        let ws = tmp.path().join("s-full");
        std::fs::create_dir(&ws).expect("mkdir");
        disk.attach(&id, &ws).expect("attach");
        ctx.workspace = Arc::new(Workspace::open(id.clone(), ws.clone()).expect("open"));
        // A file nobody can see (unlinked, held open) fills the file system: the walk-based
        // check lets the write through, the kernel does not.
        let mut ghost = std::fs::File::create(ws.join("ghost")).expect("ghost");
        std::fs::remove_file(ws.join("ghost")).expect("unlink");
        loop {
            while ghost.write_all(&[0u8; 4096]).is_ok() {}
            ghost.sync_all().ok();
            if ghost.write_all(&[0u8; 1]).is_err() {
                break;
            }
        }
        let err = run(
            &ctx,
            "fs.write",
            json!({"path": "a", "content": "x".repeat(1000)}),
        )
        .await
        .expect_err("the file system is full");
        assert!(
            matches!(&err, Error::LimitExceeded { limit: "disk_bytes", message } if message.contains("ENOSPC")),
            "{err:?}"
        );
        drop(ghost);
        drop(ctx);
        disk.detach(&id, &ws).expect("detach");
    }

    #[tokio::test]
    async fn writes_stay_within_the_disk_and_file_quotas() {
        let (_tmp, mut ctx) = context();
        ctx.sandbox = Arc::new(Sandbox::disabled(
            "test",
            Quotas {
                disk_bytes: 10,
                files: 3,
                ..Quotas::default()
            },
        ));
        let write = |path: &str, content: &str, append: bool| json!({"path": path, "content": content, "append": append});
        run(&ctx, "fs.write", write("a", "12345678", false))
            .await
            .expect("fits");
        let err = run(&ctx, "fs.write", write("b", "123", false))
            .await
            .expect_err("over the disk quota");
        assert!(
            matches!(&err, Error::LimitExceeded { limit: "disk_bytes", message } if message.contains("HEIST_QUOTA_DISK_BYTES")),
            "{err:?}"
        );
        assert!(!ctx.workspace.path().join("b").exists(), "nothing written");
        let err = run(&ctx, "fs.write", write("a", "123", true))
            .await
            .expect_err("appending over the quota");
        assert!(matches!(
            err,
            Error::LimitExceeded {
                limit: "disk_bytes",
                ..
            }
        ));
        // Replacing with something smaller is fine, and frees room.
        run(&ctx, "fs.write", write("a", "1", false))
            .await
            .expect("shrinks");
        run(&ctx, "fs.write", write("b", "123456789", false))
            .await
            .expect("fits again");
        let err = run(&ctx, "fs.write", write("d/e", "", false))
            .await
            .expect_err("two more entries is over the file quota");
        assert!(
            matches!(err, Error::LimitExceeded { limit: "files", .. }),
            "{err:?}"
        );
        assert!(
            !ctx.workspace.path().join("d").exists(),
            "no parent left behind"
        );
        run(&ctx, "fs.write", write("c", "", false))
            .await
            .expect("a third entry fits");
    }
}
