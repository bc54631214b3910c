//! Directories only the service's own user may enter.

use std::{
    io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::Path,
};

/// Creates `dir` (and missing parents) mode 0700, and makes an existing `dir` 0700: what the
/// binaries keep there (stores, blobs, workspaces, keys) is no other local user's to read.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn new_and_existing_directories_become_0700() {
        let tmp = std::env::temp_dir().join(format!("heist-files-{}", uuid::Uuid::new_v4()));
        let new = tmp.join("a/b");
        private_dir(&new).expect("create");
        assert_eq!(mode(&new), 0o700);
        assert_eq!(mode(&tmp.join("a")), 0o700);
        let open = tmp.join("open");
        std::fs::create_dir(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        private_dir(&open).expect("tighten");
        assert_eq!(mode(&open), 0o700);
        std::fs::remove_dir_all(&tmp).expect("cleanup");
    }
}
