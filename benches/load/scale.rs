//! Figures at scale, each on a fresh agent: memory with many live tasks,
//! revocation latency when a task's owner dies, and CPU over time with
//! thousands of X.509-SVID streams rotating.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tether::client::task::TaskClient;
use tether::client::workload::WorkloadClient;
use tether::proto::task as task_pb;

use crate::agent::Agent;
use crate::ops::begin_request;
use crate::{AUDIENCE, TIMEOUT};

/// Set in a child process: open this many X.509 streams and count updates.
pub(crate) const CHILD_STREAMS: &str = "TETHER_BENCH_CHILD_STREAMS";
const CHILD_SOCKET: &str = "TETHER_BENCH_CHILD_SOCKET";

const TASK_STEPS: [usize; 2] = [10_000, 100_000];
const BEGIN_CLIENTS: usize = 32;
const REVOCATION_SAMPLES: usize = 100;
const STREAM_PROCESSES: usize = 100;
const STREAMS_PER_PROCESS: usize = 100;
const STREAM_TTL: Duration = Duration::from_secs(30);
/// Two and a half rotations of every SVID.
const STREAM_WINDOW: Duration = Duration::from_secs(40);

pub(crate) struct Scale {
    pub(crate) idle_rss_kib: u64,
    /// Live tasks, the agent's RSS then, and BeginTask/s getting there.
    pub(crate) tasks: Vec<(usize, u64, f64)>,
    /// Owner exit (SIGKILL sent) to the first refused validation, sorted.
    pub(crate) revocation: Vec<Duration>,
    pub(crate) streams: Streams,
}

pub(crate) struct Streams {
    pub(crate) streams: usize,
    pub(crate) processes: usize,
    pub(crate) ttl: Duration,
    /// The agent's CPU use in each second of the window (1.0 = one core).
    pub(crate) cpu_per_second: Vec<f64>,
    /// Updates the streams received after their first message.
    pub(crate) pushes: u64,
    /// Of those, the ones carrying a new certificate of the stream's own.
    pub(crate) rotations: u64,
    pub(crate) rss_kib: u64,
}

pub(crate) fn run(runtime: &tokio::runtime::Runtime, dir: &Path) -> Scale {
    let agent = Agent::start(&dir.join("tasks"));
    let idle_rss_kib = agent.rss_kib();
    let socket = agent.socket.clone();
    let tasks = runtime.block_on(fill_tasks(&agent));
    eprintln!("tasks: {tasks:?}");
    let revocation = runtime.block_on(revocation(&socket));
    agent.stop();
    let streams = streams(dir);
    Scale {
        idle_rss_kib,
        tasks,
        revocation,
        streams,
    }
}

/// Begins tasks from [`BEGIN_CLIENTS`] connections up to each step of
/// [`TASK_STEPS`], reading the agent's RSS at each.
async fn fill_tasks(agent: &Agent) -> Vec<(usize, u64, f64)> {
    let mut clients = Vec::new();
    for _ in 0..BEGIN_CLIENTS {
        clients.push(TaskClient::connect(&agent.socket, TIMEOUT).await.unwrap());
    }
    let mut live = 0;
    let mut out = Vec::new();
    for step in TASK_STEPS {
        let each = (step - live).div_ceil(BEGIN_CLIENTS);
        let began = Instant::now();
        let mut workers = Vec::new();
        for mut client in clients.drain(..) {
            workers.push(tokio::spawn(async move {
                for _ in 0..each {
                    client.begin(begin_request()).await.unwrap();
                }
                client
            }));
        }
        for worker in workers {
            clients.push(worker.await.unwrap());
        }
        live += each * BEGIN_CLIENTS;
        let rate = (each * BEGIN_CLIENTS) as f64 / began.elapsed().as_secs_f64();
        out.push((live, agent.rss_kib(), rate));
    }
    out
}

/// Starts `tether task run` owning a task, kills it, and validates the
/// task's token until the agent refuses it.
async fn revocation(socket: &Path) -> Vec<Duration> {
    let mut validator = TaskClient::connect(socket, TIMEOUT).await.unwrap();
    let mut samples = Vec::new();
    for _ in 0..REVOCATION_SAMPLES {
        let mut runner = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["task", "run", "--socket"])
            .arg(socket)
            .args([
                "--audience",
                AUDIENCE,
                "--intent",
                "revocation",
                "--tool",
                "search",
            ])
            .args([
                "--",
                "sh",
                "-c",
                "echo \"$TETHER_TASK_TOKEN\"; exec sleep 600",
            ])
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let stdout = runner.stdout.take().unwrap();
        let token = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).unwrap();
            line.trim().to_owned()
        })
        .await
        .unwrap();
        let request = task_pb::ValidateTaskTokenRequest {
            token,
            audience: AUDIENCE.into(),
            tool: "search".into(),
            presenter_certificate: Vec::new(),
        };
        assert!(validator.validate(request.clone()).await.unwrap().valid);
        let pid = Pid::from_raw(i32::try_from(runner.id()).unwrap());
        let killed = Instant::now();
        kill(pid, Signal::SIGKILL).unwrap();
        while validator.validate(request.clone()).await.unwrap().valid {
            assert!(killed.elapsed() < TIMEOUT, "the task outlived its owner");
        }
        samples.push(killed.elapsed());
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = runner.wait();
    }
    samples.sort();
    samples
}

/// [`STREAM_PROCESSES`] processes, each with [`STREAMS_PER_PROCESS`]
/// FetchX509SVID streams and its own SVID (a process-bound entry), on
/// an agent issuing [`STREAM_TTL`] SVIDs; the agent's CPU each second.
fn streams(dir: &Path) -> Streams {
    let exe = std::env::current_exe().unwrap();
    let uid = nix::unistd::geteuid().as_raw();
    let agent = Agent::start_with(
        &dir.join("streams"),
        &format!("x509_svid_ttl = \"{}s\"", STREAM_TTL.as_secs()),
        &format!(
            r#"[[entries]]
spiffe_id = "spiffe://bench.local/streams"
selectors = ["unix:uid:{uid}", "unix:path:{}"]
process_bound = true
"#,
            exe.display()
        ),
    );
    let opened = StreamProcesses::open(&agent.socket, STREAM_PROCESSES, STREAMS_PER_PROCESS);
    let mut cpu_per_second = Vec::new();
    let mut last = agent.cpu_time();
    let started = Instant::now();
    while started.elapsed() < STREAM_WINDOW {
        std::thread::sleep(Duration::from_secs(1));
        let now = agent.cpu_time();
        cpu_per_second.push((now - last).as_secs_f64());
        last = now;
    }
    let rss_kib = agent.rss_kib();
    let (pushes, rotations) = opened.close();
    agent.stop();
    Streams {
        streams: STREAM_PROCESSES * STREAMS_PER_PROCESS,
        processes: STREAM_PROCESSES,
        ttl: STREAM_TTL,
        cpu_per_second,
        pushes,
        rotations,
        rss_kib,
    }
}

/// Stream processes (this benchmark's executable, as [`child`]), each
/// with its FetchX509SVID streams open and their first messages in.
pub(crate) struct StreamProcesses {
    children: Vec<Child>,
    outputs: Vec<BufReader<ChildStdout>>,
}

impl StreamProcesses {
    /// Starts `processes` processes opening `per_process` streams each on
    /// `socket`, one connection a process; returns once every stream has
    /// its first message.
    pub(crate) fn open(socket: &Path, processes: usize, per_process: usize) -> Self {
        let exe = std::env::current_exe().unwrap();
        let mut children = Vec::new();
        for _ in 0..processes {
            children.push(
                Command::new(&exe)
                    .env(CHILD_STREAMS, per_process.to_string())
                    .env(CHILD_SOCKET, socket)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap(),
            );
        }
        let mut outputs = Vec::new();
        for child in &mut children {
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "a stream process did not start");
            outputs.push(out);
        }
        Self { children, outputs }
    }

    /// Asks every process for its counts, then ends them: updates pushed
    /// after the first messages, and how many carried a new certificate.
    pub(crate) fn close(mut self) -> (u64, u64) {
        let (mut pushes, mut rotations) = (0, 0);
        for child in &mut self.children {
            let stdin = child.stdin.as_mut().unwrap();
            stdin.write_all(b"report\n").unwrap();
            stdin.flush().unwrap();
        }
        for out in &mut self.outputs {
            let mut counts = String::new();
            out.read_line(&mut counts).unwrap();
            let (updates, rotated) = counts.trim().split_once(' ').unwrap();
            pushes += updates.parse::<u64>().unwrap();
            rotations += rotated.parse::<u64>().unwrap();
        }
        for child in &mut self.children {
            drop(child.stdin.take());
            child.wait().unwrap();
        }
        (pushes, rotations)
    }
}

/// A panic between open and close still ends the processes.
impl Drop for StreamProcesses {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A stream process: opens `streams` FetchX509SVID streams on one
/// connection, says `ready` once each has its first message, counts
/// the updates after that, and prints the count when stdin closes.
pub(crate) fn child(streams: usize) {
    let socket = std::env::var_os(CHILD_SOCKET).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = WorkloadClient::connect(Path::new(&socket), TIMEOUT)
            .await
            .unwrap();
        let updates = Arc::new(AtomicU64::new(0));
        let rotations = Arc::new(AtomicU64::new(0));
        for _ in 0..streams {
            let mut stream = client.fetch_x509_svid().await.unwrap();
            let first = client.first(&mut stream).await.unwrap().unwrap();
            let mut held = first.svids[0].x509_svid.clone();
            let (updates, rotations) = (Arc::clone(&updates), Arc::clone(&rotations));
            tokio::spawn(async move {
                loop {
                    match stream.message().await {
                        Ok(Some(update)) => {
                            updates.fetch_add(1, Ordering::Relaxed);
                            // A new certificate of its own, not another
                            // change (a CRL, a bundle).
                            if update.svids[0].x509_svid != held {
                                held = update.svids[0].x509_svid.clone();
                                rotations.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            eprintln!("stream ended: {status}");
                            break;
                        }
                    }
                }
            });
        }
        println!("ready");
        std::io::stdout().flush().unwrap();
        // A line on stdin asks for the counts, before any stream
        // process exits (an exit changes every stream's CRL).
        tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
        })
        .await
        .unwrap();
        println!(
            "{} {}",
            updates.load(Ordering::Relaxed),
            rotations.load(Ordering::Relaxed)
        );
        std::io::stdout().flush().unwrap();
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await
        .unwrap();
    });
}
