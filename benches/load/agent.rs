//! A tether agent under load: the `tether` binary as a child process with
//! the bench's entries, its socket, and what /proc and its `/metrics` say
//! about it (CPU time, RSS, the attestation histogram).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{AUDIENCE, TIMEOUT};

pub(crate) struct Agent {
    pub(crate) child: Child,
    pub(crate) socket: PathBuf,
    /// The agent's `/healthz`, `/readyz` and `/metrics` listener.
    pub(crate) http: std::net::SocketAddr,
}

impl Agent {
    /// Starts an agent in `dir` with the bench's entries: two for the
    /// uid, and a process-bound one for [`bound_exe`] only.
    pub(crate) fn start(dir: &Path) -> Self {
        let uid = nix::unistd::geteuid().as_raw();
        let bound = bound_exe(dir);
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(env!("CARGO_BIN_EXE_tether"), &bound).unwrap();
        let entries = format!(
            r#"[[entries]]
spiffe_id = "spiffe://bench.local/agent"
selectors = ["unix:uid:{uid}"]

[[entries]]
spiffe_id = "{AUDIENCE}"
selectors = ["unix:uid:{uid}"]

[[entries]]
spiffe_id = "spiffe://bench.local/bound"
selectors = ["unix:uid:{uid}", "unix:path:{bound}"]
process_bound = true
"#,
            bound = bound.display(),
        );
        Self::start_with(dir, "", &entries)
    }

    /// Starts an agent in `dir` with `head` among the top-level settings
    /// and `tail` (entries) at the end of its config file.
    pub(crate) fn start_with(dir: &Path, head: &str, tail: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        // A port free a moment ago; the agent refuses to start if it is taken.
        let http = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"trust_domain = "bench.local"
socket_path = "{socket}"
admin_socket_path = "{admin}"
data_dir = "{data}"
log.level = "warn"
{head}

[tasks]
max_tasks_per_process = 100000

[limits]
max_connections = 8192
max_connections_per_process = 8192

# Every client of the benchmark is one uid: its audit budget (64 KiB/s by
# default, issue 15) would measure refusals, not the paths.
[audit]
caller_bytes_per_second = 1073741824
caller_burst_bytes = 1073741824

[http]
listen = "{http}"

{tail}
"#,
                socket = dir.join("agent.sock").display(),
                admin = dir.join("admin/admin.sock").display(),
                data = dir.join("data").display(),
            ),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let socket = dir.join("agent.sock");
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(started.elapsed() < TIMEOUT, "the agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            socket,
            http,
        }
    }

    /// The executable the process-bound entry selects.
    pub(crate) fn bound_exe(&self) -> PathBuf {
        bound_exe(self.socket.parent().unwrap())
    }

    /// The agent's attestation-time histogram: (upper bound in seconds,
    /// cumulative count) per bucket, from `/metrics`.
    pub(crate) fn attestation_buckets(&self) -> Vec<(f64, u64)> {
        use std::io::{Read as _, Write as _};
        let mut conn = std::net::TcpStream::connect(self.http).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        conn.read_to_string(&mut text).unwrap();
        text.lines()
            .filter_map(|line| line.strip_prefix("tether_attestation_seconds_bucket{le=\""))
            .filter_map(|rest| {
                let (le, count) = rest.split_once("\"} ")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, count.trim().parse().ok()?))
            })
            .collect()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// utime + stime of the agent so far.
    pub(crate) fn cpu_time(&self) -> Duration {
        cpu_time(self.pid())
    }

    pub(crate) fn status_kib(&self, field: &str) -> u64 {
        status_kib(self.pid(), field)
    }

    /// The agent's admin socket.
    pub(crate) fn admin_socket(&self) -> PathBuf {
        self.socket.parent().unwrap().join("admin/admin.sock")
    }

    pub(crate) fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    pub(crate) fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    /// Stops the agent (SIGTERM) and waits for it.
    pub(crate) fn stop(self) {
        drop(self);
    }
}

/// A benchmark that panics still stops its agent.
impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(self.pid()).unwrap()),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = self.child.wait();
        }
    }
}

/// utime + stime of process `pid` so far, from /proc/<pid>/stat.
pub(crate) fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after_comm.split(' ').collect();
    // Fields 14 and 15 of stat (utime, stime), counted from `state` (3).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

/// A `kB` field of /proc/<pid>/status (`VmRSS:`, `VmHWM:`), in KiB.
pub(crate) fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// The copy of `tether` the process-bound entry of the agent in `dir`
/// selects (by `unix:path`): its processes each get their own SVID, and
/// the processes of every other operation do not match it.
pub(crate) fn bound_exe(dir: &Path) -> PathBuf {
    dir.join("tether-bound")
}
