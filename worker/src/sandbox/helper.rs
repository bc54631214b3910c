//! The `heist-sandbox` helper: the small program the worker starts for every command, so that
//! namespaces, a minimal root, capabilities, rlimits, Landlock and seccomp can be applied
//! without `unsafe` code in the worker (a `pre_exec` hook would need it). It reads a [`Spec`]
//! from its stdin (a Unix socket to the worker), enters new namespaces, gets its uid/gid maps
//! (and the id-mapped workspace) from the worker, builds the command's root (`rootfs`), and
//! starts itself again as the command's first process (`init`, PID 1 of the new pid namespace
//! and leader of its own process group), which confines itself further and becomes the
//! command. The helper reports, and then waits in one poll loop (a process that created a pid
//! namespace cannot start threads): a `term`/`kill` line from the worker (or the socket
//! closing) signals the command's process group, SIGCHLD (via a signalfd) ends the loop. When
//! PID 1 exits, the kernel kills everything else in its namespace.
//!
//! Unconfined (no [`Confinement`](super::protocol::Confinement)), the helper applies the
//! rlimits and starts the command directly.
//!
//! The helper never writes to stdout or stderr: they belong to the command.

use std::{
    io::{BufRead as _, BufReader, IoSliceMut, IsTerminal as _, Read as _, Write as _},
    os::{
        fd::{AsFd as _, OwnedFd},
        unix::{
            net::UnixStream,
            process::{CommandExt as _, ExitStatusExt as _},
        },
    },
    process::{Child, Command, ExitCode, Stdio},
};

use base64::Engine as _;
use nix::{
    errno::Errno,
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::{
        memfd::{MFdFlags, memfd_create},
        resource::{UsageWho, getrusage},
        signal::{SigSet, Signal, killpg},
        signalfd::{SfdFlags, SignalFd},
        time::TimeVal,
        wait::{Id, WaitPidFlag, WaitStatus, waitid},
    },
    unistd::Pid,
};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};

use super::{
    confine::{self, StepError},
    init::{self, INIT_ARG},
    protocol::{HELPER_FAILED, KILL, MAPPED, MAX_EXTRA, Report, Spec, TERM},
    rootfs,
};

/// Runs the helper; the exit code is 0 once the command ran (its status goes over the socket),
/// [`HELPER_FAILED`] when it could not be run.
pub fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == INIT_ARG) {
        return init::main();
    }
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

    /// Waits for [`MAPPED`] and takes the mounts that come with it.
    fn mapped(&mut self) -> Result<Vec<OwnedFd>, Stop> {
        if !self.reader.buffer().is_empty() {
            return Err(step("handshake", "the worker sent more than the spec"));
        }
        let mut buf = [0u8; 64];
        let mut space =
            [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_EXTRA + 1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(
            &self.writer,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|_| Stop::WorkerGone)?;
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        match buf.get(..got.bytes).map(<[u8]>::trim_ascii) {
            Some([]) | None => Err(Stop::WorkerGone),
            Some(line) if line == MAPPED.as_bytes() => Ok(fds),
            Some(other) => Err(step(
                "handshake",
                format!(
                    "expected {MAPPED}, got {:?}",
                    String::from_utf8_lossy(other)
                ),
            )),
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

    // SIGCHLD is blocked and read from a signalfd, so one thread can wait for the command and
    // the worker's lines at once (a process in a new pid namespace cannot start threads).
    let mut sigchld = SigSet::empty();
    sigchld.add(Signal::SIGCHLD);
    sigchld
        .thread_block()
        .map_err(|e| step("signals", format!("cannot block SIGCHLD: {e}")))?;
    let signals = SignalFd::with_flags(&sigchld, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
        .map_err(|e| step("signals", format!("cannot create a signalfd: {e}")))?;

    let mut features = Vec::new();
    let child = if let Some(confine) = &spec.confine {
        let sources = rootfs::sources(confine)?;
        confine::unshare_all()?;
        control.report(&Report::Unshared)?;
        let mounts = control.mapped()?;
        confine::settle_in(confine)?;
        features.extend(
            [
                "userns",
                "userns:own-ids",
                "mountns",
                "pidns",
                "netns",
                "ipcns",
                "utsns",
            ]
            .map(str::to_owned),
        );
        if confine.idmapped {
            features.push("idmap".to_owned());
        }
        // Started before the host's root moves away (its loader must still be found).
        let init = spawn_init()?;
        rootfs::build(confine, sources, mounts)?;
        hand_over(init, &spec, &mut features)?
    } else {
        features.push("rlimits".to_owned());
        start_unconfined(&spec, stdin)?
    };
    let mut child = child;
    let pid = i32::try_from(child.id()).map_err(|_| step("spawn", "pid out of range"))?;
    control.report(&Report::Started { pid, features })?;

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
        if commands.socket().is_some() && ready.get(1) == Some(&true) {
            for signal in commands.read() {
                let _ = killpg(group, signal);
            }
        }
    }
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

/// Starts the command's first process (`init`) in the new namespaces; it waits for its spec.
fn spawn_init() -> Result<(Child, UnixStream), Stop> {
    let (ours, theirs) = UnixStream::pair()
        .map_err(|e| step("spawn", format!("cannot create a socket pair: {e}")))?;
    let mut command = Command::new("/proc/self/exe");
    command
        .arg(INIT_ARG)
        .env_clear()
        .process_group(0)
        .stdin(Stdio::from(OwnedFd::from(theirs)))
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let child = command.spawn().map_err(|e| {
        step(
            "spawn",
            format!("cannot start the sandbox's first process: {e}"),
        )
    })?;
    // It says when it runs: until then its loader may still need the host's root.
    let mut ready = [0u8; 1];
    (&ours).read_exact(&mut ready).map_err(|e| {
        step(
            "spawn",
            format!("the sandbox's first process did not start: {e}"),
        )
    })?;
    Ok((child, ours))
}

/// Hands the first process its spec (once its root is ready) and waits until it executed the
/// command (its socket closes) or says why it could not.
fn hand_over(
    (mut child, ours): (Child, UnixStream),
    spec: &Spec,
    features: &mut Vec<String>,
) -> Result<Child, Stop> {
    let mut line = serde_json::to_vec(spec).map_err(|e| step("spec", e.to_string()))?;
    line.push(b'\n');
    let mut writer = ours.try_clone().map_err(|e| step("spawn", e.to_string()))?;
    let _ = writer.write_all(&line);
    drop(writer);
    let mut last = None;
    for line in BufReader::new(ours).lines() {
        let Ok(line) = line else { break };
        last = serde_json::from_str::<Report>(&line).ok();
    }
    match last {
        Some(Report::Started { features: more, .. }) => {
            features.extend(more);
            Ok(child)
        }
        Some(Report::Failed { stage, error }) => {
            let _ = child.wait();
            Err(if stage == "spawn" {
                step("spawn", error)
            } else {
                step("init", format!("{stage}: {error}"))
            })
        }
        _ => {
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            Err(step(
                "init",
                format!("the sandbox's first process ended without a report ({status})"),
            ))
        }
    }
}

/// Starts the command directly (unconfined: rlimits only).
fn start_unconfined(spec: &Spec, stdin: Vec<u8>) -> Result<Child, Stop> {
    let stdin = if stdin.is_empty() {
        Stdio::null()
    } else {
        let fd = memfd_create("stdin", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| step("stdin", format!("cannot create a memfd for stdin: {e}")))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&stdin)
            .map_err(|e| step("stdin", format!("cannot buffer stdin: {e}")))?;
        std::io::Seek::rewind(&mut file).map_err(|e| step("stdin", e.to_string()))?;
        Stdio::from(file)
    };
    confine::apply_rlimits(&spec.limits, false)?;
    rustix::process::nice(spec.nice)
        .map_err(|e| step("nice", format!("cannot lower the command's priority: {e}")))?;
    let mut command = Command::new(&spec.argv[0]);
    command
        .args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .process_group(0)
        .stdin(stdin)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    command.spawn().map_err(|e| {
        step(
            "spawn",
            format!("cannot run `{}`: {e}", spec.argv[0].escape_debug()),
        )
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
