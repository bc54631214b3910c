//! The `heist-sandbox` helper: the small program the worker starts for every command, so that
//! namespaces, rlimits and Landlock can be applied without `unsafe` code in the worker (a
//! `pre_exec` hook would need it). It reads a [`Spec`] from its stdin (a Unix socket to the
//! worker), confines itself, starts the command with `std::process::Command` (the command
//! becomes PID 1 of the new pid namespace and leads its own process group), reports, and then
//! waits in one poll loop (a process that created a pid namespace cannot start threads): a
//! `term`/`kill` line from the worker (or the socket closing) signals the command's process
//! group, stdin is fed as the command reads it, SIGCHLD (via a signalfd) ends the loop. When
//! PID 1 exits, the kernel kills everything else in its namespace.
//!
//! The helper never writes to stdout or stderr: they belong to the command.

use std::{
    io::{BufRead as _, BufReader, IsTerminal as _, Read as _, Write as _},
    os::{
        fd::AsFd as _,
        unix::{
            net::UnixStream,
            process::{CommandExt as _, ExitStatusExt as _},
        },
    },
    process::{ChildStdin, Command, ExitCode, Stdio},
};

use base64::Engine as _;
use nix::{
    errno::Errno,
    fcntl::{FcntlArg, OFlag, fcntl},
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        resource::{UsageWho, getrusage},
        signal::{SigSet, Signal, killpg},
        signalfd::{SfdFlags, SignalFd},
        time::TimeVal,
        wait::{Id, WaitPidFlag, WaitStatus, waitid},
    },
    unistd::Pid,
};

use super::{
    confine::{self, StepError},
    protocol::{HELPER_FAILED, KILL, MAPPED, Report, Spec, TERM},
};

/// Runs the helper; the exit code is 0 once the command ran (its status goes over the socket),
/// [`HELPER_FAILED`] when it could not be run.
pub fn main() -> ExitCode {
    if std::io::stdin().is_terminal() {
        eprintln!(
            "heist-sandbox is started by the heist worker for each command; it reads its \
             instructions from a socket on stdin and is not meant to be run by hand"
        );
        return ExitCode::from(HELPER_FAILED);
    }
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return ExitCode::from(HELPER_FAILED);
    };
    let socket = UnixStream::from(fd);
    let Ok(reader) = socket.try_clone() else {
        return ExitCode::from(HELPER_FAILED);
    };
    let mut control = Control {
        reader: BufReader::new(reader),
        writer: socket,
    };
    match run(&mut control) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stop::Failed(step)) => {
            let _ = control.report(&Report::Failed {
                stage: step.stage.to_owned(),
                error: step.error,
            });
            ExitCode::from(HELPER_FAILED)
        }
        Err(Stop::WorkerGone) => ExitCode::from(HELPER_FAILED),
    }
}

/// Why the helper stopped early.
enum Stop {
    /// A step failed: report it.
    Failed(StepError),
    /// The worker closed the socket: nobody to report to.
    WorkerGone,
}

impl From<StepError> for Stop {
    fn from(step: StepError) -> Self {
        Self::Failed(step)
    }
}

fn step(stage: &'static str, error: impl Into<String>) -> Stop {
    Stop::Failed(StepError {
        stage,
        error: error.into(),
    })
}

/// Both directions of the socket to the worker.
struct Control {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Control {
    /// The next line from the worker; `None` at end of file or on error.
    fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end().to_owned()),
        }
    }

    fn report(&mut self, report: &Report) -> Result<(), Stop> {
        let mut line = serde_json::to_vec(report).map_err(|e| step("report", e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|_| Stop::WorkerGone)
    }
}

fn run(control: &mut Control) -> Result<(), Stop> {
    let line = control.line().ok_or(Stop::WorkerGone)?;
    let spec: Spec =
        serde_json::from_str(&line).map_err(|e| step("spec", format!("bad spec: {e}")))?;
    if spec.argv.is_empty() {
        return Err(step("spec", "argv is empty"));
    }
    let stdin = base64::engine::general_purpose::STANDARD
        .decode(spec.stdin_b64.as_bytes())
        .map_err(|e| step("spec", format!("stdin is not base64: {e}")))?;

    let mut features = Vec::new();
    if let Some(confine) = &spec.confine {
        confine::unshare_all()?;
        control.report(&Report::Unshared)?;
        match control.line() {
            Some(line) if line == MAPPED => {}
            Some(other) => {
                return Err(step(
                    "handshake",
                    format!("expected {MAPPED}, got {other:?}"),
                ));
            }
            None => return Err(Stop::WorkerGone),
        }
        confine::settle_in(confine)?;
        features
            .extend(["userns", "mountns", "pidns", "netns", "ipcns", "utsns"].map(str::to_owned));
    }
    confine::apply_rlimits(&spec.limits, spec.confine.is_some())?;
    rustix::process::nice(spec.nice)
        .map_err(|e| step("nice", format!("cannot lower the command's priority: {e}")))?;
    features.push("rlimits".to_owned());
    if let Some(confine) = &spec.confine {
        confine::drop_capabilities(confine.keep_file_caps)?;
        let abi = confine::landlock(confine)?;
        features.push(format!("landlock:v{abi}"));
    }

    // SIGCHLD is blocked and read from a signalfd, so one thread can wait for the command, the
    // worker's lines and stdin at once (a process in a new pid namespace cannot start threads).
    let mut sigchld = SigSet::empty();
    sigchld.add(Signal::SIGCHLD);
    sigchld
        .thread_block()
        .map_err(|e| step("signals", format!("cannot block SIGCHLD: {e}")))?;
    let signals = SignalFd::with_flags(&sigchld, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| step("signals", format!("cannot create a signalfd: {e}")))?;

    let mut command = Command::new(&spec.argv[0]);
    command
        .args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .process_group(0)
        .stdin(if stdin.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let mut child = command.spawn().map_err(|e| {
        step(
            "spawn",
            format!("cannot run `{}`: {e}", spec.argv[0].escape_debug()),
        )
    })?;
    let pid = i32::try_from(child.id()).map_err(|_| step("spawn", "pid out of range"))?;
    control.report(&Report::Started { pid, features })?;

    let mut feeder = match child.stdin.take() {
        Some(pipe) => Some(Feeder::new(pipe, stdin)?),
        None => None,
    };
    let mut commands = Commands::new(control)?;
    let group = Pid::from_raw(pid);
    // Only signals sent before the command is reaped can reach it: its pid (its process group
    // id) is not reused while it is a zombie.
    loop {
        if exited(group) {
            break;
        }
        let mut fds = vec![PollFd::new(signals.as_fd(), PollFlags::POLLIN)];
        if let Some(socket) = commands.socket() {
            fds.push(PollFd::new(socket, PollFlags::POLLIN));
        }
        if let Some(feeder) = &feeder {
            fds.push(PollFd::new(feeder.pipe.as_fd(), PollFlags::POLLOUT));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(step("poll", e.to_string())),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        if ready.first() == Some(&true) {
            while let Ok(Some(_)) = signals.read_signal() {}
        }
        let mut next = 1;
        if commands.socket().is_some() {
            if ready.get(next) == Some(&true) {
                for signal in commands.read() {
                    let _ = killpg(group, signal);
                }
            }
            next += 1;
        }
        if feeder.is_some() && ready.get(next) == Some(&true) {
            let done = feeder.as_mut().is_none_or(Feeder::feed);
            if done {
                feeder = None;
            }
        }
    }
    drop(feeder);
    let _ = control.writer.set_nonblocking(false);
    if spec.confine.is_none() {
        // No pid namespace to take the rest down with it: stop what the command left behind.
        let _ = killpg(group, Signal::SIGKILL);
    }
    let status = child
        .wait()
        .map_err(|e| step("wait", format!("cannot wait for the command: {e}")))?;
    let cpu_ms = getrusage(UsageWho::RUSAGE_CHILDREN)
        .map(|u| millis(u.user_time()) + millis(u.system_time()))
        .unwrap_or(0);
    control.report(&Report::Exited {
        code: status.code(),
        signal: status.signal(),
        cpu_ms,
    })
}

fn millis(t: TimeVal) -> u64 {
    u64::try_from(t.tv_sec()).unwrap_or(0) * 1000 + u64::try_from(t.tv_usec()).unwrap_or(0) / 1000
}

/// Whether the command has exited (it stays a zombie until `wait` reaps it).
fn exited(pid: Pid) -> bool {
    !matches!(
        waitid(
            Id::Pid(pid),
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        ),
        Ok(WaitStatus::StillAlive)
    )
}

/// Writes the command's stdin without blocking.
struct Feeder {
    pipe: ChildStdin,
    data: Vec<u8>,
    sent: usize,
}

impl Feeder {
    fn new(pipe: ChildStdin, data: Vec<u8>) -> Result<Self, Stop> {
        let flags = fcntl(&pipe, FcntlArg::F_GETFL).map_err(|e| step("stdin", e.to_string()))?;
        let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
        fcntl(&pipe, FcntlArg::F_SETFL(flags)).map_err(|e| step("stdin", e.to_string()))?;
        Ok(Self {
            pipe,
            data,
            sent: 0,
        })
    }

    /// Writes what the pipe takes; true when done (everything written, or the reader is gone).
    fn feed(&mut self) -> bool {
        loop {
            match self.pipe.write(&self.data[self.sent..]) {
                Ok(n) if n > 0 => {
                    self.sent += n;
                    if self.sent == self.data.len() {
                        return true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                _ => return true,
            }
        }
    }
}

/// The worker's `term`/`kill` lines, read without blocking.
struct Commands<'a> {
    control: &'a mut Control,
    pending: Vec<u8>,
    open: bool,
}

impl<'a> Commands<'a> {
    fn new(control: &'a mut Control) -> Result<Self, Stop> {
        // Whatever the line reader already buffered comes first.
        let pending = control.reader.buffer().to_vec();
        control
            .writer
            .set_nonblocking(true)
            .map_err(|e| step("control", e.to_string()))?;
        Ok(Self {
            control,
            pending,
            open: true,
        })
    }

    fn socket(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.open.then(|| self.control.writer.as_fd())
    }

    /// Reads what arrived; returns the signals to send. End of file means SIGKILL.
    fn read(&mut self) -> Vec<Signal> {
        let mut buf = [0u8; 256];
        loop {
            match self.control.writer.read(&mut buf) {
                Ok(0) => {
                    self.open = false;
                    break;
                }
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.open = false;
                    break;
                }
            }
        }
        let mut signals = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=end).collect();
            match line.trim_ascii() {
                l if l == TERM.as_bytes() => signals.push(Signal::SIGTERM),
                l if l == KILL.as_bytes() => signals.push(Signal::SIGKILL),
                _ => {}
            }
        }
        if !self.open {
            signals.push(Signal::SIGKILL);
        }
        signals
    }
}
