//! A change journal for a workspace that is an ext4 file system of its own
//! (`HEIST_DISK_QUOTA=fs`), so a capture after a few changes examines the entries that changed
//! instead of every entry of the tree.
//!
//! One fanotify group per session, with a filesystem mark on the workspace's file system, in
//! `FAN_REPORT_DFID_NAME` mode: every create, delete, rename, write, close after writing and
//! attribute change anywhere on that file system, by any process in any mount namespace (the
//! sandboxed commands as well as the worker's own tools), is queued by the kernel in the system
//! call that makes it, as (directory inode, name). A capture reads the queue to the end, so every
//! change made before the capture began is in what it reads.
//!
//! The journal only narrows what a capture looks at; [`super::manifest`] still stats every entry
//! it names, exactly as a walk would. A capture walks the whole tree instead when the journal
//! cannot vouch for everything since the last capture: the kernel's queue overflowed
//! (`fs.fanotify.max_queued_events`), more than [`MAX_NAMED`] entries changed, an event could not
//! be read, a command is running in the session (a live `mmap` writes without events; its
//! `CLOSE_WRITE` comes when the mapping goes), or a file with other hard links appeared (a
//! write through one link names only that path).

use std::{
    collections::{HashMap, hash_map::Entry},
    os::fd::{AsFd as _, BorrowedFd},
};

use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};
use rustix::io::Errno;

/// Most entries named between two captures before the next capture walks the whole tree.
pub const MAX_NAMED: usize = 4096;

/// `FAN_REPORT_DIR_FID | FAN_REPORT_NAME` (`<linux/fanotify.h>`; not in nix's flags).
const FAN_REPORT_DFID_NAME: u32 = 0x0000_0400 | 0x0000_0800;
/// Info record types: directory fid with a name, directory fid alone.
const INFO_DFID_NAME: u8 = 2;
const INFO_DFID: u8 = 3;
/// The handle type ext4 reports for a directory: a 32-bit inode number and a generation.
const FILEID_INO32_GEN: i32 = 1;
/// `struct fanotify_event_metadata` as of `FANOTIFY_METADATA_VERSION` 3.
const METADATA_VERSION: u8 = 3;
const METADATA_LEN: usize = 24;
/// Info header (4 bytes) and fsid (8 bytes) before the `struct file_handle`.
const HANDLE_AT: usize = 12;
/// `struct file_handle`'s header: `handle_bytes` and `handle_type`.
const HANDLE_HEADER: usize = 8;
/// ext4's super block magic (`statfs.f_type`).
const EXT4_MAGIC: u64 = 0xEF53;
/// Bytes read from the group per `read`.
const READ_BUF: usize = 64 * 1024;

/// Event bits (`<linux/fanotify.h>`).
pub mod bits {
    /// A file's content changed.
    pub const MODIFY: u64 = 0x0000_0002;
    /// Mode, owner, timestamps or link count changed.
    pub const ATTRIB: u64 = 0x0000_0004;
    /// A file opened for writing was closed (also after writes through a mapping).
    pub const CLOSE_WRITE: u64 = 0x0000_0008;
    /// Renamed out of the directory.
    pub const MOVED_FROM: u64 = 0x0000_0040;
    /// Renamed into the directory.
    pub const MOVED_TO: u64 = 0x0000_0080;
    /// Created in the directory.
    pub const CREATE: u64 = 0x0000_0100;
    /// Deleted from the directory.
    pub const DELETE: u64 = 0x0000_0200;
    /// The queue overflowed: events were lost.
    pub const Q_OVERFLOW: u64 = 0x0000_4000;
    /// The object is a directory.
    pub const ONDIR: u64 = 0x4000_0000;
}

/// What a capture asks the kernel to report.
const WATCHED: u64 = bits::MODIFY
    | bits::ATTRIB
    | bits::CLOSE_WRITE
    | bits::MOVED_FROM
    | bits::MOVED_TO
    | bits::CREATE
    | bits::DELETE
    | bits::ONDIR;

/// Changes read from a journal since it was last taken.
#[derive(Debug, Default)]
pub struct Changes {
    /// (directory inode, entry name) -> the events' bits, or-ed. The name `.` stands for the
    /// directory itself.
    pub named: HashMap<(u64, Vec<u8>), u64>,
    /// Something may be missing: the capture must walk.
    pub lost: bool,
}

impl Changes {
    fn add(&mut self, dir: u64, name: &[u8], mask: u64) {
        if self.lost {
            return;
        }
        let full = self.named.len() >= MAX_NAMED;
        match self.named.entry((dir, name.to_vec())) {
            Entry::Occupied(mut seen) => *seen.get_mut() |= mask,
            Entry::Vacant(_) if full => self.lose(),
            Entry::Vacant(new) => {
                new.insert(mask);
            }
        }
    }

    fn lose(&mut self) {
        self.lost = true;
        self.named = HashMap::new();
    }
}

/// One session's journal: a fanotify group marking the workspace's file system.
pub struct Journal {
    group: Fanotify,
    /// Read since the last [`Journal::take`].
    pending: Changes,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("pending", &self.pending.named.len())
            .field("lost", &self.pending.lost)
            .finish_non_exhaustive()
    }
}

/// Why a workspace has no journal.
#[derive(Debug)]
pub enum Unavailable {
    /// The workspace is not the root of an ext4 file system of its own.
    NotOwnFileSystem,
    /// The kernel refused (no CAP_SYS_ADMIN, too many groups: `fs.fanotify.max_user_groups`).
    Refused(Errno),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotOwnFileSystem => {
                f.write_str("the workspace is not an ext4 file system of its own")
            }
            Self::Refused(e) => write!(f, "fanotify: {e}"),
        }
    }
}

impl Journal {
    /// Starts a journal of the file system whose root directory is `root`. Changes made from
    /// now on are reported.
    pub fn watch(root: BorrowedFd<'_>, own_file_system: bool) -> Result<Self, Unavailable> {
        let root = super::manifest::open_dir(root).map_err(Unavailable::Refused)?;
        let fs = rustix::fs::fstatfs(&root).map_err(Unavailable::Refused)?;
        #[allow(clippy::useless_conversion, clippy::unnecessary_cast)]
        let magic = fs.f_type as u64;
        if !own_file_system || magic != EXT4_MAGIC {
            return Err(Unavailable::NotOwnFileSystem);
        }
        let flags = InitFlags::FAN_CLASS_NOTIF
            | InitFlags::FAN_CLOEXEC
            | InitFlags::FAN_NONBLOCK
            | InitFlags::from_bits_retain(FAN_REPORT_DFID_NAME);
        let group = Fanotify::init(flags, EventFFlags::O_RDONLY)
            .map_err(|e| Unavailable::Refused(Errno::from_raw_os_error(e as i32)))?;
        group
            .mark(
                MarkFlags::FAN_MARK_ADD | MarkFlags::FAN_MARK_FILESYSTEM,
                MaskFlags::from_bits_retain(WATCHED),
                &root,
                None::<&std::path::Path>,
            )
            .map_err(|e| Unavailable::Refused(Errno::from_raw_os_error(e as i32)))?;
        Ok(Self {
            group,
            pending: Changes::default(),
        })
    }

    /// Everything reported since the last call (or since [`Journal::watch`]): the queue is read
    /// to its end first.
    pub fn take(&mut self) -> Changes {
        self.read();
        std::mem::take(&mut self.pending)
    }

    /// Reads the queue until it is empty.
    fn read(&mut self) {
        let mut buf = vec![0u8; READ_BUF];
        loop {
            match rustix::io::read(self.group.as_fd(), &mut buf) {
                Ok(0) => return,
                Ok(n) => parse(buf.get(..n).unwrap_or_default(), &mut self.pending),
                Err(Errno::AGAIN) => return,
                Err(Errno::INTR) => {}
                Err(_) => {
                    self.pending.lose();
                    return;
                }
            }
        }
    }
}

fn u16_at(buf: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_ne_bytes(
        buf.get(at..at + 2)?.try_into().ok()?,
    )))
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// Adds the events in `buf` (whole events, as `read` returns them) to `into`.
fn parse(buf: &[u8], into: &mut Changes) {
    let mut at = 0;
    while at < buf.len() {
        let Some(event) = one_event(buf, at, into) else {
            into.lose();
            return;
        };
        at += event;
    }
}

/// Reads the event at `at` into `into`; its length, or None when it cannot be read.
fn one_event(buf: &[u8], at: usize, into: &mut Changes) -> Option<usize> {
    let len = usize::try_from(u32_at(buf, at)?).ok()?;
    let version = *buf.get(at + 4)?;
    let meta = u16_at(buf, at + 6)?;
    let mask = u64_at(buf, at + 8)?;
    if version != METADATA_VERSION || len < METADATA_LEN || meta < METADATA_LEN || meta > len {
        return None;
    }
    let event = buf.get(at..at + len)?;
    if mask & bits::Q_OVERFLOW != 0 {
        into.lose();
        return Some(len);
    }
    let mut found = false;
    let mut info = meta;
    while info < len {
        let kind = *event.get(info)?;
        let size = u16_at(event, info + 2)?;
        if size < 4 {
            return None;
        }
        let record = event.get(info..info + size)?;
        if kind == INFO_DFID_NAME || kind == INFO_DFID {
            let handle_len = usize::try_from(u32_at(record, HANDLE_AT)?).ok()?;
            let handle_type =
                i32::from_ne_bytes(record.get(HANDLE_AT + 4..HANDLE_AT + 8)?.try_into().ok()?);
            let handle =
                record.get(HANDLE_AT + HANDLE_HEADER..HANDLE_AT + HANDLE_HEADER + handle_len)?;
            if handle_type != FILEID_INO32_GEN {
                return None;
            }
            let dir = u64::from(u32_at(handle, 0)?);
            let name = if kind == INFO_DFID_NAME {
                let rest = record.get(HANDLE_AT + HANDLE_HEADER + handle_len..)?;
                let end = rest.iter().position(|&b| b == 0)?;
                rest.get(..end)?
            } else {
                b"."
            };
            into.add(dir, name, mask);
            found = true;
        }
        info += size;
    }
    // An event we cannot place is a change we would miss.
    found.then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(mask: u64, dir: u32, name: &[u8]) -> Vec<u8> {
        let mut record = vec![INFO_DFID_NAME, 0, 0, 0];
        record.extend_from_slice(&[0u8; 8]); // fsid
        record.extend_from_slice(&8u32.to_ne_bytes());
        record.extend_from_slice(&FILEID_INO32_GEN.to_ne_bytes());
        record.extend_from_slice(&dir.to_ne_bytes());
        record.extend_from_slice(&7u32.to_ne_bytes()); // generation
        record.extend_from_slice(name);
        record.push(0);
        while record.len() % 4 != 0 {
            record.push(0);
        }
        let size = u16::try_from(record.len()).unwrap_or(u16::MAX);
        record[2..4].copy_from_slice(&size.to_ne_bytes());
        let len = METADATA_LEN + record.len();
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(len).unwrap_or(0).to_ne_bytes());
        out.push(METADATA_VERSION);
        out.push(0);
        out.extend_from_slice(&24u16.to_ne_bytes());
        out.extend_from_slice(&mask.to_ne_bytes());
        out.extend_from_slice(&(-1i32).to_ne_bytes());
        out.extend_from_slice(&0i32.to_ne_bytes());
        out.extend_from_slice(&record);
        out
    }

    #[test]
    fn events_are_merged_by_directory_and_name() {
        let mut buf = event(bits::MODIFY, 12, b"f");
        buf.extend(event(bits::CLOSE_WRITE, 12, b"f"));
        buf.extend(event(bits::CREATE | bits::ONDIR, 2, b"d"));
        let mut changes = Changes::default();
        parse(&buf, &mut changes);
        assert!(!changes.lost);
        assert_eq!(
            changes.named.get(&(12, b"f".to_vec())),
            Some(&(bits::MODIFY | bits::CLOSE_WRITE))
        );
        assert_eq!(
            changes.named.get(&(2, b"d".to_vec())),
            Some(&(bits::CREATE | bits::ONDIR))
        );
    }

    #[test]
    fn overflow_truncation_and_foreign_handles_lose_the_journal() {
        let mut changes = Changes::default();
        parse(&event(bits::Q_OVERFLOW, 0, b""), &mut changes);
        assert!(changes.lost, "an overflow");

        let mut changes = Changes::default();
        let whole = event(bits::MODIFY, 12, b"f");
        parse(&whole[..whole.len() - 3], &mut changes);
        assert!(changes.lost, "a cut event");

        let mut changes = Changes::default();
        let mut other = event(bits::MODIFY, 12, b"f");
        other[METADATA_LEN + HANDLE_AT + 4..METADATA_LEN + HANDLE_AT + 8]
            .copy_from_slice(&0x81i32.to_ne_bytes());
        parse(&other, &mut changes);
        assert!(changes.lost, "a handle that is not ext4's");
    }

    #[test]
    fn too_many_names_lose_the_journal() {
        let mut changes = Changes::default();
        for i in 0..=MAX_NAMED {
            changes.add(2, format!("f{i}").as_bytes(), bits::CREATE);
        }
        assert!(changes.lost);
        assert!(changes.named.is_empty());
    }
}
