//! The window between `connect` and `accept` on the workload socket
//! (issue 15, finding 4): how long a connection waits in the kernel's
//! listen queue before the agent accepts it and pins the executable of the
//! process at the other end. A process that execs another program inside
//! that window is attested as the new program: nothing in the kernel
//! records what ran at `connect`.
//!
//! ```text
//! cargo bench --bench accept_window -- [--samples 2000] [--duration 20s] [--flooders 1,4,16]
//! ```
//!
//! A real agent (the `tether` binary, a child process) and a probe that
//! connects `--samples` times (or for `--duration`, whichever ends first:
//! under a flood each probe waits out the listen queue), one connection at
//! a time, timing each from
//! the moment `connect` returns (the connection is in the listen queue)
//! to the first byte the agent sends (its HTTP/2 SETTINGS, written once it
//! has accepted the connection, identified the peer and pinned its
//! executable; or the end of the stream, for a connection it refused).
//! That is an upper bound on the window: it also holds the agent's first
//! write and the probe's own wake-up. Measured with the agent idle, while
//! threads of another process connect and hang up as fast as they can
//! (each connection accepted, identified and served until it ends), and
//! with every connection slot held while they do (each new connection
//! accepted and closed at once). The table goes to stdout, in Markdown.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark fails by panicking"
)]

use std::io::Read as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long anything may take before the bench gives up.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two probes, so the probe itself is no flood.
const PROBE_GAP: Duration = Duration::from_millis(1);
/// The connection slots of the agent whose slots are all held.
const HELD: usize = 256;

fn main() {
    let Args {
        samples,
        duration,
        flooders,
    } = parse_args();
    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();

    let agent = Agent::start(&dir.path().join("open"), 8192);
    let probes = Probes { samples, duration };
    rows.push(measure("the agent idle", &agent.socket, 0, probes));
    for &threads in &flooders {
        rows.push(measure(
            &format!("{threads} threads connecting and hanging up"),
            &agent.socket,
            threads,
            probes,
        ));
    }
    agent.stop();

    let agent = Agent::start(&dir.path().join("full"), HELD);
    let held = hold(&agent.socket, HELD);
    let threads = flooders.iter().copied().max().unwrap_or(16);
    rows.push(measure(
        &format!("all {HELD} slots held, {threads} threads connecting and hanging up"),
        &agent.socket,
        threads,
        probes,
    ));
    drop(held);
    agent.stop();

    report(&rows);
}

struct Args {
    samples: usize,
    duration: Duration,
    flooders: Vec<usize>,
}

/// How many probes one scenario makes, at most, and for how long.
#[derive(Clone, Copy)]
struct Probes {
    samples: usize,
    duration: Duration,
}

fn parse_args() -> Args {
    let mut parsed = Args {
        samples: 2000,
        duration: Duration::from_secs(20),
        flooders: vec![1, 4, 16],
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--samples" => parsed.samples = args.next().unwrap().parse().unwrap(),
            "--duration" => {
                parsed.duration = humantime::parse_duration(&args.next().unwrap()).unwrap();
            }
            "--flooders" => {
                parsed.flooders = args
                    .next()
                    .unwrap()
                    .split(',')
                    .map(|n| n.parse().unwrap())
                    .collect();
            }
            // cargo bench passes --bench.
            _ => {}
        }
    }
    parsed
}

// === the agent ===

/// The `tether` binary serving in `dir`.
struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Agent {
    /// Starts an agent in `dir` with `max_connections` slots and an entry
    /// for this uid (so the per-uid budget is the common one). Silent
    /// connections are closed only after two minutes, longer than a run.
    fn start(dir: &Path, max_connections: usize) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"trust_domain = "bench.local"
socket_path = "{socket}"
admin_socket_path = "{admin}"
data_dir = "{data}"
log.level = "error"

[limits]
max_connections = {max_connections}
max_connections_per_process = 8192
max_connections_per_uid = 8192
handshake_timeout = "120s"

[[entries]]
spiffe_id = "spiffe://bench.local/probe"
selectors = ["unix:uid:{uid}"]
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
        while UnixStream::connect(&socket).is_err() {
            assert!(started.elapsed() < TIMEOUT, "the agent did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, socket }
    }

    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// `n` connections the agent accepted (its SETTINGS arrived), held silent.
fn hold(socket: &Path, n: usize) -> Vec<UnixStream> {
    (0..n)
        .map(|_| {
            let mut conn = UnixStream::connect(socket).unwrap();
            conn.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut first = [0u8; 9];
            conn.read_exact(&mut first).unwrap();
            conn
        })
        .collect()
}

// === the measurement ===

/// What one scenario measured.
struct Row {
    scenario: String,
    /// From `connect` returning to the agent's first byte (or EOF).
    windows: Vec<Duration>,
    /// How long `connect` itself took (it blocks while the queue is full).
    connects: Vec<Duration>,
    /// The flood's connections per second, while the probe ran.
    flood_rate: f64,
}

/// Probes while `threads` threads flood the socket.
fn measure(scenario: &str, socket: &Path, threads: usize, probes: Probes) -> Row {
    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicU64::new(0));
    let flood: Vec<_> = (0..threads)
        .map(|_| {
            let (stop, flooded, socket) =
                (Arc::clone(&stop), Arc::clone(&flooded), socket.to_owned());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if UnixStream::connect(&socket).is_ok() {
                        flooded.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Let the flood reach its pace.
    std::thread::sleep(Duration::from_millis(500));
    let (started, before) = (Instant::now(), flooded.load(Ordering::Relaxed));
    let mut windows = Vec::with_capacity(probes.samples);
    let mut connects = Vec::with_capacity(probes.samples);
    while windows.len() < probes.samples && started.elapsed() < probes.duration {
        let connecting = Instant::now();
        let mut conn = UnixStream::connect(socket).unwrap();
        let queued = Instant::now();
        conn.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut first = [0u8; 1];
        // One byte of the agent's SETTINGS, or EOF (refused): either way
        // the agent has accepted the connection by now.
        match conn.read(&mut first) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("no answer from the agent: {e}"),
        }
        windows.push(queued.elapsed());
        connects.push(queued - connecting);
        drop(conn);
        std::thread::sleep(PROBE_GAP);
    }
    let elapsed = started.elapsed();
    let flood_rate = (flooded.load(Ordering::Relaxed) - before) as f64 / elapsed.as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for thread in flood {
        thread.join().unwrap();
    }
    let row = Row {
        scenario: scenario.to_owned(),
        windows,
        connects,
        flood_rate,
    };
    eprintln!(
        "{}: {} probes, p50 {}, max {}",
        row.scenario,
        row.windows.len(),
        micros(quantile(&row.windows, 0.5)),
        micros(quantile(&row.windows, 1.0)),
    );
    row
}

fn quantile(samples: &[Duration], q: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let at = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(at).copied().unwrap_or_default()
}

fn micros(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn report(rows: &[Row]) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    println!(
        "{cores} cores; listen queue: somaxconn = {somaxconn} (the agent asks for the \
         most the kernel allows).\n"
    );
    println!(
        "| while | probes | connect -> accepted, p50 | p99 | p99.9 | max | connect itself, p99 | max | flood, connections/s |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            row.scenario,
            row.windows.len(),
            micros(quantile(&row.windows, 0.5)),
            micros(quantile(&row.windows, 0.99)),
            micros(quantile(&row.windows, 0.999)),
            micros(quantile(&row.windows, 1.0)),
            micros(quantile(&row.connects, 0.99)),
            micros(quantile(&row.connects, 1.0)),
            row.flood_rate,
        );
    }
}
