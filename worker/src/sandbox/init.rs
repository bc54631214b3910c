//! The command's first process: `heist-sandbox` started again by the helper, with [`INIT_ARG`],
//! as PID 1 of the new pid namespace (only a process inside it can mount its `/proc`). It
//! reads the [`Spec`] from its stdin (a socket to the helper), enters the minimal root, and
//! then, in this order: gives the command its stdin (a memfd holding the bytes, or /dev/null),
//! applies the rlimits and niceness, empties every capability set, sets no_new_privs, applies
//! Landlock, reports the isolation in force, installs the seccomp filter, and executes the
//! command in its own place (it stays PID 1 and the leader of its process group).
//!
//! Its socket is close-on-exec: the helper reads report lines until end of file; end of file
//! after a `started` report means the command runs. A `failed` line means it does not.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::AsFd as _,
        unix::{net::UnixStream, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use base64::Engine as _;
use nix::sys::memfd::{MFdFlags, memfd_create};

use super::{
    confine::{self, Rules, StepError},
    protocol::{Confinement, HELPER_FAILED, Report, Spec, WORKSPACE},
    rootfs, seccomp,
};

/// The argument that makes `heist-sandbox` the command's first process.
pub const INIT_ARG: &str = "--init";

fn step(stage: &'static str, error: impl Into<String>) -> StepError {
    StepError {
        stage,
        error: error.into(),
    }
}

/// Runs the first process; returns only when the command could not be started.
pub fn main() -> ExitCode {
    // Should the helper die, the command dies with it (and with it the whole pid namespace).
    if nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).is_err() {
        return ExitCode::from(HELPER_FAILED);
    }
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return ExitCode::from(HELPER_FAILED);
    };
    let mut socket = UnixStream::from(fd);
    let Ok(reader) = socket.try_clone() else {
        return ExitCode::from(HELPER_FAILED);
    };
    // Loaded and running: the helper may now move the host's root away.
    if socket.write_all(b"r").is_err() {
        return ExitCode::from(HELPER_FAILED);
    }
    let mut line = String::new();
    if BufReader::new(reader).read_line(&mut line).is_err() {
        return ExitCode::from(HELPER_FAILED);
    }
    let err = match serde_json::from_str::<Spec>(&line) {
        Ok(spec) => run(&spec, &mut socket),
        Err(e) => step("spec", format!("bad spec: {e}")),
    };
    let mut report = serde_json::to_vec(&Report::Failed {
        stage: err.stage.to_owned(),
        error: err.error,
    })
    .unwrap_or_default();
    report.push(b'\n');
    let _ = socket.write_all(&report);
    ExitCode::from(HELPER_FAILED)
}

/// Confines this process and executes the command; returns why it could not.
fn run(spec: &Spec, socket: &mut UnixStream) -> StepError {
    match prepare(spec, socket) {
        Ok(mut command) => {
            let err = command.exec();
            step(
                "spawn",
                format!("cannot run `{}`: {err}", spec.argv[0].escape_debug()),
            )
        }
        Err(err) => err,
    }
}

fn prepare(spec: &Spec, socket: &mut UnixStream) -> Result<Command, StepError> {
    let confine = spec
        .confine
        .as_ref()
        .ok_or_else(|| step("spec", "the first process needs a confinement"))?;
    if spec.argv.is_empty() {
        return Err(step("spec", "argv is empty"));
    }
    rootfs::enter()?;
    let mut features = vec!["pivot_root".to_owned()];

    let ws = confine.workspace.as_path();
    let argv: Vec<String> = spec.argv.iter().map(|a| rootfs::translate(ws, a)).collect();
    let env = spec.env.iter().map(|(key, value)| {
        let value = if key == "TMPDIR" && Path::new(value) == ws {
            "/tmp".to_owned()
        } else {
            rootfs::translate(ws, value)
        };
        (key.clone(), value)
    });
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .env_clear()
        .envs(env)
        .current_dir(rootfs::inside(ws, &spec.cwd))
        .stdin(stdin(&spec.stdin_b64)?);

    confine::apply_rlimits(&spec.limits, true)?;
    rustix::process::nice(spec.nice)
        .map_err(|e| step("nice", format!("cannot lower the command's priority: {e}")))?;
    features.push("rlimits".to_owned());
    confine::drop_capabilities()?;
    features.push("caps:none".to_owned());
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| step("no_new_privs", format!("cannot set no_new_privs: {e}")))?;
    features.push("no_new_privs".to_owned());
    let abi = confine::landlock(&rules(confine))?;
    features.push(format!("landlock:v{abi}"));
    if abi >= 6 {
        features.push("landlock:scoped".to_owned());
    }
    let programs = seccomp::programs()?;
    features.push("seccomp".to_owned());

    let mut report = serde_json::to_vec(&Report::Started { pid: 1, features })
        .map_err(|e| step("report", e.to_string()))?;
    report.push(b'\n');
    socket
        .write_all(&report)
        .map_err(|e| step("report", format!("the helper is gone: {e}")))?;
    // Last: everything above may need calls the filter denies.
    seccomp::install(&programs)?;
    Ok(command)
}

/// The command's stdin: the bytes in a memfd (read like a file, then end of file), or
/// /dev/null when there are none.
fn stdin(b64: &str) -> Result<Stdio, StepError> {
    let data = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .map_err(|e| step("spec", format!("stdin is not base64: {e}")))?;
    if data.is_empty() {
        let null = std::fs::File::open("/dev/null")
            .map_err(|e| step("stdin", format!("cannot open /dev/null: {e}")))?;
        return Ok(Stdio::from(null));
    }
    let fd = memfd_create("stdin", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| step("stdin", format!("cannot create a memfd for stdin: {e}")))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&data)
        .map_err(|e| step("stdin", format!("cannot buffer stdin: {e}")))?;
    std::io::Seek::rewind(&mut file).map_err(|e| step("stdin", e.to_string()))?;
    Ok(Stdio::from(file))
}

/// The Landlock rules, as paths in the command's root.
fn rules(confine: &Confinement) -> Rules {
    let mut read_only: Vec<PathBuf> = confine.system.clone();
    read_only.extend(confine.extra.iter().cloned());
    read_only.extend(["/etc", "/proc"].map(PathBuf::from));
    Rules {
        read_write: vec![PathBuf::from(WORKSPACE), PathBuf::from("/tmp")],
        read_only,
        devices: confine.devices.clone(),
    }
}
