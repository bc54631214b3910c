//! What the numbers were measured on (CPU count and model, kernel, build profile), and the
//! resident memory of processes, read from /proc (Linux only; elsewhere the values are absent).

use std::path::Path;

use serde::Serialize;

use crate::cluster::ProcessInfo;

/// The machine and build a report was made on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub nproc: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
    /// heistctl version.
    pub version: String,
    /// `release` or `debug` (debug numbers are not worth comparing).
    pub profile: String,
    /// When the run started, seconds since the Unix epoch.
    pub started_at_unix_s: u64,
}

impl Machine {
    /// Reads the machine description.
    pub fn detect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            nproc: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".to_owned()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned()),
            version: heist_proto::VERSION.to_owned(),
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .to_owned(),
            started_at_unix_s: heist_proto::token::unix_now(),
        }
    }

    /// One line for the table header.
    pub fn summary(&self) -> String {
        format!(
            "{} CPUs ({}), Linux {}, heistctl {} {}",
            self.nproc, self.cpu_model, self.kernel, self.version, self.profile
        )
    }
}

/// The first `model name` in /proc/cpuinfo text.
fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "model name").then(|| value.trim().to_owned())
    })
}

/// VmRSS of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    vm_rss(&status)
}

/// The `VmRSS:` value (KiB) of /proc/<pid>/status text.
fn vm_rss(status: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix("VmRSS:")?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The pid of a local-cluster process: the child of this process whose GRPC_PORT is the port of
/// `info.url` (every cluster process gets its own port).
pub fn cluster_pid(info: &ProcessInfo) -> Option<u32> {
    let port = info.url.rsplit_once(':')?.1.trim_end_matches('/');
    let wanted = format!("GRPC_PORT={port}");
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| {
            parent_pid(pid) == Some(me)
                && environ_has(&Path::new("/proc").join(pid.to_string()), &wanted)
        })
}

/// PPid of `pid`.
fn parent_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("PPid:")?.trim().parse().ok())
}

/// Whether /proc/<pid>/environ holds exactly `entry` (`KEY=value`).
fn environ_has(proc_dir: &Path, entry: &str) -> bool {
    std::fs::read(proc_dir.join("environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|e| e == entry.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpuinfo_and_status() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(cpuinfo).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor: 0\n"), None);
        let status = "Name:\tworker\nVmPeak:\t  9000 kB\nVmRSS:\t    4321 kB\n";
        assert_eq!(vm_rss(status), Some(4321));
        assert_eq!(vm_rss("Name: x\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let machine = Machine::detect();
        assert!(machine.nproc >= 1);
        assert!(!machine.kernel.is_empty());
        assert!(rss_kib(std::process::id()).is_some_and(|kib| kib > 0));
    }

    #[tokio::test]
    async fn finds_a_child_by_its_port() {
        let mut child = tokio::process::Command::new("/bin/sleep")
            .arg("30")
            .env("GRPC_PORT", "61234")
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sleep");
        let info = |port: u16| ProcessInfo {
            name: "x".into(),
            url: format!("http://127.0.0.1:{port}"),
            log: "x.log".into(),
        };
        assert_eq!(cluster_pid(&info(61234)), child.id());
        assert_eq!(cluster_pid(&info(61235)), None);
        child.kill().await.expect("kill");
    }
}
