//! A caller's path resolved beneath a session workspace, as the fs tools check it and as exec
//! resolves its `cwd`: whatever the input (`..`, absolute paths, NUL bytes, symlinks that point
//! up, out or at themselves), an accepted path is inside the workspace and of the kind asked
//! for, and the file next to the workspace is never reached.
#![no_main]

use std::{
    os::unix::fs::symlink,
    path::{Component, Path, PathBuf},
    sync::OnceLock,
};

use heist_worker::fuzzing::{self, FuzzWorkspace};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    _root: tempfile::TempDir,
    workspace: FuzzWorkspace,
    /// The workspace's canonical path.
    inside: PathBuf,
    /// A file beside the workspace, which no resolved path may name.
    secret: PathBuf,
}

/// `root/secret`, and `root/ws` holding files, directories and symlinks that stay inside,
/// climb out (relative and absolute) and loop.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = tempfile::tempdir().expect("tempdir");
        let base = root.path().canonicalize().expect("canonical");
        let secret = base.join("secret");
        std::fs::write(&secret, "outside").expect("secret");
        let ws = base.join("ws");
        std::fs::create_dir_all(ws.join("dir/sub")).expect("dirs");
        std::fs::write(ws.join("file"), "in").expect("file");
        std::fs::write(ws.join("dir/file"), "in").expect("file");
        for (link, target) in [
            ("up", ".."),
            ("abs", "/"),
            ("etc", "/etc"),
            ("in", "dir"),
            ("loop", "loop"),
            ("dir/back", "../file"),
            ("dir/out", "../../secret"),
            ("dir/sub/top", "../.."),
        ] {
            symlink(target, ws.join(link)).expect("symlink");
        }
        let workspace = FuzzWorkspace::open(&ws).expect("workspace");
        Fixture {
            _root: root,
            workspace,
            inside: ws,
            secret,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let Ok(raw) = std::str::from_utf8(rest) else {
        return;
    };
    let f = fixture();

    // The lexical check: what it accepts is relative and never climbs above the root.
    if let Ok(checked) = fuzzing::checked_path(raw) {
        assert!(!raw.contains('\0'), "{raw:?} with a NUL byte was accepted");
        let mut depth = 0usize;
        for component in checked.components() {
            match component {
                Component::Normal(_) => depth += 1,
                Component::CurDir => {}
                Component::ParentDir => {
                    depth = depth
                        .checked_sub(1)
                        .unwrap_or_else(|| panic!("{raw:?} climbs above the workspace"));
                }
                Component::RootDir | Component::Prefix(_) => panic!("{raw:?} is absolute"),
            }
        }
    }

    // The full resolution: inside, of the wanted kind, never the secret.
    let want_dir = selector & 1 == 0;
    if let Ok(resolved) = f.workspace.resolve(raw, want_dir) {
        let real = resolved
            .canonicalize()
            .unwrap_or_else(|e| panic!("{raw:?} resolved to {resolved:?}, which is gone: {e}"));
        assert!(
            real.starts_with(&f.inside),
            "{raw:?} resolved to {real:?}, outside {:?}",
            f.inside
        );
        assert_ne!(
            real, f.secret,
            "{raw:?} reached the file beside the workspace"
        );
        let is_dir = Path::new(&real).is_dir();
        assert_eq!(
            is_dir, want_dir,
            "{raw:?} resolved to {real:?} of the wrong kind"
        );
    }
});
