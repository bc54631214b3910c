//! Finding the `coordinator` and `worker` binaries: an explicit directory, else next to the
//! running heistctl (that is where `make build` and cargo put them), else on PATH.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use crate::error::Error;

/// The path of binary `name`. With `bin_dir` only that directory is searched.
pub fn find_binary(name: &str, bin_dir: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(dir) = bin_dir {
        let candidate = dir.join(name);
        return if is_executable(&candidate) {
            Ok(candidate)
        } else {
            Err(Error::BinaryNotFound {
                name: name.to_owned(),
                searched: dir.display().to_string(),
            })
        };
    }
    let own_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_default();
    let beside = own_dir.join(name);
    if is_executable(&beside) {
        return Ok(beside);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| Error::BinaryNotFound {
            name: name.to_owned(),
            searched: format!("{} and on PATH", own_dir.display()),
        })
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_directory_is_the_only_place_searched() {
        let dir = std::env::temp_dir().join(format!("heistctl-bin-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let err = find_binary("sh", Some(&dir)).expect_err("not there");
        assert!(err.to_string().contains("make build"), "{err}");
        let bin = dir.join("coordinator");
        std::fs::write(&bin, "#!/bin/sh\n").expect("write");
        assert!(
            find_binary("coordinator", Some(&dir)).is_err(),
            "not executable"
        );
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(find_binary("coordinator", Some(&dir)).expect("found"), bin);
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[test]
    fn falls_back_to_path() {
        // `sh` is on PATH on every unix machine and never next to heistctl.
        assert!(find_binary("sh", None).is_ok());
        assert!(find_binary("heist-no-such-binary", None).is_err());
    }
}
