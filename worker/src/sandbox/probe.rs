//! Startup checks: find the helper and the Python interpreter, list the system paths commands
//! may read, and run one real command (`true`) through the backend so that the isolation the
//! worker reports is the isolation that works.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::time::timeout;

use super::{
    CommandLimits, Event, Execution as _, Job, Mode, Settings,
    process::{IdMaps, ProcessBackend},
};

/// How long the startup probes may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// System directories every command may read and execute from (those that exist).
const SYSTEM_DIRS: [&str; 7] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];
/// The only parts of the host's /etc a command sees (read-only): the dynamic loader's cache and
/// configuration, Debian's alternatives (e.g. `awk`), TLS certificates and the time zone. Its
/// passwd, group and hosts are written for it (see `rootfs`).
const ETC_FILES: [&str; 7] = [
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/localtime",
];
/// Asks an interpreter where it lives.
const PYTHON_SCRIPT: &str = "import sys\nfor p in (sys.executable, sys.prefix, sys.base_prefix, \
                             sys.exec_prefix, sys.base_exec_prefix): print(p)\nprint(sys.version.split()[0])";

/// The Python interpreter run.python uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Python {
    /// The real interpreter binary (`sys.executable`).
    pub executable: PathBuf,
    /// Its installation prefixes (read-only inside the sandbox).
    pub prefixes: Vec<PathBuf>,
    /// Its version, e.g. "3.11.2".
    pub version: String,
}

/// Finds the interpreter: `configured`, else `python3` on PATH; it is asked for its real
/// executable (a pyenv shim resolves to the interpreter behind it).
pub async fn find_python(configured: Option<&Path>) -> Result<Python, String> {
    let program = configured.map_or_else(|| PathBuf::from("python3"), Path::to_path_buf);
    let run = tokio::process::Command::new(&program)
        .args(["-c", PYTHON_SCRIPT])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match timeout(PROBE_TIMEOUT, run).await {
        Ok(Ok(output)) if output.status.success() => output,
        Ok(Ok(output)) => {
            return Err(format!(
                "{} exited with {}: {}",
                program.display(),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Err(e)) => {
            return Err(format!(
                "cannot run {} ({e}): install python3 or set HEIST_PYTHON",
                program.display()
            ));
        }
        Err(_) => return Err(format!("{} did not answer in time", program.display())),
    };
    parse_python(&String::from_utf8_lossy(&output.stdout))
        .ok_or_else(|| format!("{} gave an unexpected answer", program.display()))
}

fn parse_python(text: &str) -> Option<Python> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let [executable, prefixes @ .., version] = lines.as_slice() else {
        return None;
    };
    if executable.is_empty() || prefixes.len() != 4 {
        return None;
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for prefix in prefixes.iter().map(PathBuf::from) {
        if !dirs.contains(&prefix) {
            dirs.push(prefix);
        }
    }
    Some(Python {
        executable: PathBuf::from(executable),
        prefixes: dirs,
        version: (*version).to_owned(),
    })
}

/// Paths every confined command may read and execute: [`SYSTEM_DIRS`], the loader files,
/// Debian's `/etc/python3*` (sitecustomize lives there) and the interpreter's prefixes.
pub fn system_paths(python: Option<&Python>) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = SYSTEM_DIRS
        .iter()
        .chain(ETC_FILES.iter())
        .map(PathBuf::from)
        .collect();
    if let Ok(entries) = std::fs::read_dir("/etc") {
        let mut python_dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        python_dirs.sort();
        paths.extend(python_dirs);
    }
    if let Some(python) = python {
        let covered = |p: &Path| SYSTEM_DIRS.iter().any(|d| p.starts_with(d));
        for prefix in &python.prefixes {
            if !covered(prefix) && !paths.contains(prefix) {
                paths.push(prefix.clone());
            }
        }
        if let Some(dir) = python.executable.parent()
            && !covered(dir)
            && !paths.iter().any(|p| dir.starts_with(p))
        {
            paths.push(dir.to_path_buf());
        }
    }
    paths
}

/// The helper binary: configured, else `heist-sandbox` next to the running executable.
fn helper_path(configured: Option<&Path>) -> Result<PathBuf, String> {
    let path = match configured {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find the worker's own executable: {e}"))?
            .with_file_name("heist-sandbox"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the sandbox helper {} is missing: build it with the worker (`make build` installs \
             bin/heist-sandbox next to bin/worker) or set HEIST_SANDBOX_HELPER",
            path.display()
        ))
    }
}

/// Builds the backend for the configured mode and runs `true` through it (with the base system
/// paths; the caller adds the interpreter's); returns the backend and the isolation it reported.
pub async fn probe(settings: &Settings) -> Result<(ProcessBackend, Vec<String>), String> {
    let helper = helper_path(settings.helper.as_deref())?;
    let ids = match settings.mode {
        Mode::Process => Some(IdMaps::for_this_process((settings.uid, settings.gid))),
        Mode::Unconfined | Mode::Docker => None,
    };
    // /tmp may hold as much as the workspace may.
    let backend = ProcessBackend::new(helper, ids, system_paths(None), settings.quotas.disk_bytes);
    let dir = tempfile::Builder::new()
        .prefix("heist-sandbox-probe-")
        .tempdir()
        .map_err(|e| format!("cannot create a probe directory: {e}"))?;
    let root = dir.path().to_path_buf();
    let job = Job {
        session: "probe".to_owned(),
        root: root.clone(),
        argv: vec!["true".to_owned()],
        cwd: root.clone(),
        env: super::env::build(&root, &root, None, Vec::new()),
        stdin: Vec::new(),
        timeout: PROBE_TIMEOUT,
        read_only: Vec::new(),
        limits: CommandLimits {
            file_size: 1 << 20,
            processes: 16,
            cpu_seconds: 10,
            memory_bytes: 1 << 30,
            open_files: 64,
            nice: 0,
        },
    };
    let run = async {
        let (mut execution, features) = backend.start(&job).await.map_err(|e| e.to_string())?;
        let mut output = Vec::new();
        loop {
            match execution.next().await.map_err(|e| e.to_string())? {
                Event::Exited(exit) if exit.code == Some(0) => return Ok(features),
                Event::Exited(exit) => {
                    return Err(format!(
                        "the probe command `true` failed in the sandbox ({exit:?}): {}",
                        String::from_utf8_lossy(&output).trim()
                    ));
                }
                Event::Output(chunk) if output.len() < 4096 => output.extend(chunk.data),
                Event::Output(_) => {}
            }
        }
    };
    let features = timeout(PROBE_TIMEOUT, run)
        .await
        .map_err(|_| "the sandbox probe did not finish in time".to_owned())??;
    Ok((backend, features))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_interpreter_answer() {
        let py = parse_python("/opt/py/bin/python3\n/opt/py\n/opt/py\n/opt/py\n/opt/py\n3.11.7\n")
            .expect("parsed");
        assert_eq!(py.executable, PathBuf::from("/opt/py/bin/python3"));
        assert_eq!(py.prefixes, vec![PathBuf::from("/opt/py")]);
        assert_eq!(py.version, "3.11.7");
        assert!(parse_python("only\n").is_none());
    }

    #[test]
    fn system_paths_add_the_interpreter_but_never_passwd() {
        let py = Python {
            executable: PathBuf::from("/opt/py/bin/python3"),
            prefixes: vec![PathBuf::from("/opt/py"), PathBuf::from("/usr")],
            version: "3".into(),
        };
        let paths = system_paths(Some(&py));
        assert!(paths.contains(&PathBuf::from("/usr")));
        assert!(paths.contains(&PathBuf::from("/opt/py")));
        assert_eq!(
            paths
                .iter()
                .filter(|p| p.as_path() == Path::new("/usr"))
                .count(),
            1
        );
        assert!(
            !paths
                .iter()
                .any(|p| p == Path::new("/etc") || p == Path::new("/etc/passwd"))
        );
        assert!(!paths.iter().any(|p| p.starts_with("/etc/shadow")));
    }
}
