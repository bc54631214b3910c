//! The `fs.*` tools and the confinement they share.
//!
//! Every path is resolved beneath the session workspace through a `cap_std::fs::Dir` opened on
//! it (openat2 with RESOLVE_BENEATH where the kernel has it, a checked component walk
//! elsewhere). Absolute paths and NUL bytes are refused up front with a clear message; `..` and
//! symlinks are followed only while they stay inside; anything that would leave is INVALID_ARGUMENT
//! with reason PATH_OUTSIDE_WORKSPACE. Symlinks themselves are reported as symlinks (fs.stat,
//! fs.list) and never followed outward.
//!
//! Hard links are invisible to path resolution: a hard link inside the workspace to a file
//! outside it is just a file. The worker never creates hard links, and fs.write never writes
//! through one: a plain write replaces the directory entry (temp file + rename), leaving the
//! other file untouched, and an append to a file with more than one link is refused. fs.read
//! reads such a file (only someone with access to the host can plant one).

mod delete;
mod list;
mod pool;
mod read;
mod write;

use std::{
    io,
    path::{Component, Path, PathBuf},
    sync::Arc,
};

use cap_std::fs::{Dir, File, FileType, Metadata, MetadataExt, OpenOptions, OpenOptionsExt as _};
use serde_json::{Map, Value as Json, json};

pub use self::pool::{FsPool, PoolLimits};
use super::{Tool, ToolContext, ToolOutput};
use crate::{Error, sessions::Workspace};

/// The fs tools.
pub(crate) fn tools() -> Vec<Box<dyn Tool>> {
    vec![
        Box::new(read::Read),
        Box::new(write::Write),
        Box::new(list::List),
        Box::new(list::Stat),
        Box::new(delete::Delete),
    ]
}

/// Checks a caller's path before it reaches the filesystem: no NUL bytes, not absolute, and no
/// `..` that climbs above the workspace root. Symlinks are left to the capability-based open.
/// The empty path means the workspace root.
pub(crate) fn checked_path(raw: &str) -> Result<PathBuf, Error> {
    let outside = |why| Error::PathOutside {
        path: raw.escape_debug().to_string(),
        why,
    };
    if raw.contains('\0') {
        return Err(outside("contains a NUL byte"));
    }
    let path = Path::new(raw);
    let mut depth: usize = 0;
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => return Err(outside("is absolute")),
            Component::CurDir => {}
            Component::ParentDir => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| outside("leaves the workspace"))?;
            }
            Component::Normal(_) => depth += 1,
        }
    }
    Ok(if raw.is_empty() {
        PathBuf::from(".")
    } else {
        path.to_path_buf()
    })
}

/// Whether a path lexically names the workspace root ("", ".", "a/..").
pub(crate) fn is_root(path: &Path) -> bool {
    let mut depth: usize = 0;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    depth == 0
}

/// Whether an I/O error is cap-std refusing to leave the workspace.
pub(crate) fn is_escape(err: &io::Error) -> bool {
    // cap-std reports escapes as a PermissionDenied error it constructs itself (no OS errno);
    // a real EACCES carries its errno.
    err.kind() == io::ErrorKind::PermissionDenied && err.raw_os_error().is_none()
}

/// An I/O failure on `raw`: an escape is a request error, anything else an `is_error` result.
pub(crate) fn io_failure(err: &io::Error, raw: &str, action: &str) -> Result<ToolOutput, Error> {
    if is_escape(err) {
        return Err(Error::PathOutside {
            path: raw.to_owned(),
            why: "resolves outside the workspace (through `..` or a symlink)",
        });
    }
    Ok(ToolOutput::failed(format!(
        "cannot {action} `{raw}`: {}",
        describe(err)
    )))
}

/// A short human description of an I/O error.
pub(crate) fn describe(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::NotFound => "no such file or directory".to_owned(),
        io::ErrorKind::NotADirectory => "a path component is not a directory".to_owned(),
        io::ErrorKind::IsADirectory => "it is a directory".to_owned(),
        io::ErrorKind::DirectoryNotEmpty => "the directory is not empty".to_owned(),
        io::ErrorKind::AlreadyExists => "it already exists".to_owned(),
        io::ErrorKind::PermissionDenied => "permission denied".to_owned(),
        _ => err.to_string(),
    }
}

/// Runs blocking filesystem work on the worker's bounded fs pool (see [`FsPool`]).
pub(crate) async fn blocking<F>(ctx: &ToolContext, work: F) -> Result<ToolOutput, Error>
where
    F: FnOnce(&Workspace) -> Result<ToolOutput, Error> + Send + 'static,
{
    let workspace = Arc::clone(&ctx.workspace);
    let session = workspace.id().to_string();
    ctx.sandbox
        .fs_pool()
        .run(&session, move || work(&workspace))
        .await?
}

/// Opens `path` beneath `dir` for reading without ever blocking: O_NONBLOCK (a FIFO with no
/// writer would otherwise block the open), and anything that is not a regular file or a
/// directory is refused with [`Error::NotRegularFile`] before a byte is read. Symlinks are
/// followed only while they stay inside the workspace (cap-std's beneath resolution).
pub(crate) fn open_regular(dir: &Dir, path: &Path, raw: &str) -> Result<io::Result<File>, Error> {
    let mut options = OpenOptions::new();
    options
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits());
    let file = match dir.open_with(path, &options) {
        Ok(file) => file,
        // Opening a socket fails with ENXIO: say what it is.
        Err(err) if err.raw_os_error() == Some(nix::libc::ENXIO) => {
            return Err(Error::NotRegularFile {
                path: raw.to_owned(),
                kind: "socket",
            });
        }
        Err(err) => return Ok(Err(err)),
    };
    match file.metadata() {
        Ok(meta) => {
            refuse_special(meta.file_type(), raw)?;
            Ok(Ok(file))
        }
        Err(err) => Ok(Err(err)),
    }
}

/// [`Error::NotRegularFile`] unless `file_type` is a regular file, directory or symlink.
pub(crate) fn refuse_special(file_type: FileType, raw: &str) -> Result<(), Error> {
    use cap_std::fs::FileTypeExt as _;
    let kind = if file_type.is_fifo() {
        "fifo"
    } else if file_type.is_socket() {
        "socket"
    } else if file_type.is_char_device() {
        "character device"
    } else if file_type.is_block_device() {
        "block device"
    } else {
        return Ok(());
    };
    Err(Error::NotRegularFile {
        path: raw.to_owned(),
        kind,
    })
}

/// "file", "dir", "symlink" or "other".
pub(crate) fn type_name(file_type: FileType) -> &'static str {
    if file_type.is_symlink() {
        "symlink"
    } else if file_type.is_dir() {
        "dir"
    } else if file_type.is_file() {
        "file"
    } else {
        "other"
    }
}

/// Permission bits as an octal string, e.g. "0644".
pub(crate) fn mode_string(meta: &Metadata) -> String {
    format!("{:04o}", meta.mode() & 0o7777)
}

/// `{path, type, size, mode}` for one entry (`path` relative to the workspace root).
pub(crate) fn entry_json(path: &str, meta: &Metadata) -> Map<String, Json> {
    let mut entry = Map::new();
    entry.insert("path".to_owned(), json!(path));
    entry.insert("type".to_owned(), json!(type_name(meta.file_type())));
    entry.insert("size".to_owned(), json!(meta.len()));
    entry.insert("mode".to_owned(), json!(mode_string(meta)));
    entry
}

/// Seconds since the Unix epoch as RFC 3339 UTC (`2024-05-01T12:00:00Z`).
pub(crate) fn rfc3339(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm), proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// A path as text for results (lossy for non-UTF-8 names, which the tools never create).
pub(crate) fn display(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests;
