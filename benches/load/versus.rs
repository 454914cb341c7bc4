//! `--versus-spire <bin dir>`: tether and SPIRE v1.13.3 in one run, same
//! machine, same clients. A tether agent ([`Agent::start`]) and a SPIRE
//! server and agent ([`Spire::start`]) run side by side with the same
//! entries; each measurement runs on one side and then the other, with the
//! same client code (tether's `WorkloadClient`, the standard Workload API).
//!
//! Measured: the unary and first-message operations at each client count,
//! the CPU per operation of each process (SPIRE's agent and server apart),
//! idle RSS, RSS with 1,000 and 10,000 open FetchX509SVID streams, and the
//! time from an entry's creation to its SVID on an open stream.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use tether::client::workload::WorkloadClient;
use tether::proto::admin as admin_pb;

use crate::agent::{Agent, cpu_time, status_kib};
use crate::ops::{self, Op, Row};
use crate::scale::StreamProcesses;
use crate::spire::{self, Spire};
use crate::{TIMEOUT, Targets};

/// The operations compared, in the table's order.
pub(crate) const OPS: [Op; 5] = [
    Op::X509First,
    Op::FetchJwt,
    Op::ValidateJwt,
    Op::NewConnection,
    Op::ProcessCached,
];

/// Open streams: (streams, processes), 100 streams a process.
pub(crate) const STREAM_STEPS: [(usize, usize); 2] = [(1_000, 10), (10_000, 100)];
const STREAMS_PER_PROCESS: usize = 100;
/// Entry creations timed on each side.
pub(crate) const ENTRY_SAMPLES: usize = 5;

/// One side of the comparison.
pub(crate) struct Side {
    pub(crate) name: &'static str,
    pub(crate) socket: PathBuf,
    /// The processes whose CPU and memory count: (role, pid).
    pub(crate) procs: Vec<(&'static str, u32)>,
}

/// Per process of a side: (role, value).
pub(crate) type PerProc<T> = Vec<(&'static str, T)>;

/// One operation at one client count on one side.
pub(crate) struct Sample {
    pub(crate) row: Row,
    /// CPU per operation of each of the side's processes.
    pub(crate) cpu: PerProc<Duration>,
}

/// Everything one `--versus-spire` run measured; index 0 is tether, 1 is
/// SPIRE.
pub(crate) struct Versus {
    pub(crate) ops: Vec<(Op, usize, [Sample; 2])>,
    pub(crate) idle_kib: [PerProc<u64>; 2],
    /// (streams, RSS of each process with them open).
    pub(crate) streams: Vec<(usize, [PerProc<u64>; 2])>,
    /// Entry creation to the SVID on an open stream, sorted.
    pub(crate) entry: [Vec<Duration>; 2],
    /// SVIDs in one FetchJWTSVID answer (no SPIFFE ID asked for).
    pub(crate) jwt_svids: [usize; 2],
    /// The load average before and after.
    pub(crate) load: (String, String),
}

/// Runs the comparison in `dir` with SPIRE's binaries from `bin`.
pub(crate) fn run(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    bin: &Path,
    duration: Duration,
    clients: &[usize],
) -> Versus {
    let load_before = load_average();
    let agent = Agent::start(&dir.join("tether"));
    eprintln!("starting SPIRE from {}...", bin.display());
    let spire = Spire::start(bin, &dir.join("spire"));
    let sides = [
        Side {
            name: "tether",
            socket: agent.socket.clone(),
            procs: vec![("agent", agent.pid())],
        },
        Side {
            name: "SPIRE",
            socket: spire.socket.clone(),
            procs: vec![("agent", spire.agent_pid()), ("server", spire.server_pid())],
        },
    ];
    // Both at rest: the first SVIDs issued, the start-up garbage settled.
    std::thread::sleep(Duration::from_secs(2));
    let idle_kib = sides.each(|side| side.rss());
    let jwt_svids = sides.each(|side| runtime.block_on(jwt_svids(&side.socket)));

    let mut measured = Vec::new();
    for op in OPS {
        for &n in clients {
            if op.spawns_processes() && n > Op::MAX_PROCESS_CLIENTS {
                continue;
            }
            let samples = sides.each(|side| {
                let targets = Targets {
                    agent: side.socket.clone(),
                    bound: dir.join("unused-bound"),
                    empty: dir.join("unused-empty"),
                    work: dir.to_owned(),
                };
                let before = side.cpu();
                let row = runtime.block_on(ops::run(op, n, duration, &targets));
                let done = (row.ops_per_sec * duration.as_secs_f64()).max(1.0);
                let cpu = side
                    .cpu()
                    .into_iter()
                    .zip(before)
                    .map(|((role, after), (_, before))| {
                        (role, after.saturating_sub(before).div_f64(done))
                    })
                    .collect();
                eprintln!(
                    "{:<7} {:<15} {:>3} clients: {:>9.0}/s p50 {:?} p99 {:?} errors {}",
                    side.name,
                    op.name(),
                    n,
                    row.ops_per_sec,
                    row.p50,
                    row.p99,
                    row.errors
                );
                Sample { row, cpu }
            });
            measured.push((op, n, samples));
        }
    }

    let mut streams = Vec::new();
    for (count, processes) in STREAM_STEPS {
        let rss = sides.each(|side| {
            let open = StreamProcesses::open(&side.socket, processes, STREAMS_PER_PROCESS);
            std::thread::sleep(Duration::from_secs(1));
            let rss = side.rss();
            open.close();
            eprintln!("{:<7} {count} streams: {rss:?}", side.name);
            rss
        });
        streams.push((count, rss));
    }

    let tether_admin = agent.admin_socket();
    let entry = [
        runtime.block_on(entry_to_svid(&sides[0].socket, |id| {
            let admin = tether_admin.clone();
            Box::pin(async move { create_tether_entry(&admin, &id).await })
        })),
        runtime.block_on(entry_to_svid(&sides[1].socket, |id| {
            let child = spire.create_entry(&id);
            Box::pin(async move {
                tokio::task::spawn_blocking(move || spire::wait_success(child))
                    .await
                    .unwrap();
            })
        })),
    ];
    eprintln!("entry to SVID: tether {:?}, SPIRE {:?}", entry[0], entry[1]);
    drop(spire);
    agent.stop();
    Versus {
        ops: measured,
        idle_kib,
        streams,
        entry,
        jwt_svids,
        load: (load_before, load_average()),
    }
}

impl Side {
    fn cpu(&self) -> PerProc<Duration> {
        self.procs
            .iter()
            .map(|&(role, pid)| (role, cpu_time(pid)))
            .collect()
    }

    fn rss(&self) -> PerProc<u64> {
        self.procs
            .iter()
            .map(|&(role, pid)| (role, status_kib(pid, "VmRSS:")))
            .collect()
    }
}

/// `f` on tether's side, then on SPIRE's.
trait Each {
    fn each<T>(&self, f: impl FnMut(&Side) -> T) -> [T; 2];
}

impl Each for [Side; 2] {
    fn each<T>(&self, mut f: impl FnMut(&Side) -> T) -> [T; 2] {
        let first = f(&self[0]);
        [first, f(&self[1])]
    }
}

/// How many JWT-SVIDs one FetchJWTSVID without a SPIFFE ID returns.
async fn jwt_svids(socket: &Path) -> usize {
    let mut client = WorkloadClient::connect(socket, TIMEOUT).await.unwrap();
    client
        .fetch_jwt_svid(tether::proto::workload::JwtsvidRequest {
            audience: vec![crate::AUDIENCE.into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .svids
        .len()
}

/// Creates an entry for `spiffe_id` (this uid) through tether's admin API.
async fn create_tether_entry(admin_socket: &Path, spiffe_id: &str) {
    let channel = tether::client::channel::dial(admin_socket, TIMEOUT)
        .await
        .unwrap();
    let uid = nix::unistd::geteuid().as_raw();
    admin_pb::admin_client::AdminClient::new(channel)
        .create_entry(admin_pb::CreateEntryRequest {
            spec: Some(admin_pb::EntrySpec {
                spiffe_id: spiffe_id.to_owned(),
                selectors: vec![format!("unix:uid:{uid}")],
                ..admin_pb::EntrySpec::default()
            }),
        })
        .await
        .unwrap();
}

type Creation = Pin<Box<dyn Future<Output = ()>>>;

/// [`ENTRY_SAMPLES`] times: with a FetchX509SVID stream open on `socket`
/// (its first message in), `create` an entry for a new SPIFFE ID of this
/// uid; the time from just before the create call until the stream
/// carries the new ID. Sorted.
async fn entry_to_svid(socket: &Path, mut create: impl FnMut(String) -> Creation) -> Vec<Duration> {
    let mut samples = Vec::new();
    for i in 0..ENTRY_SAMPLES {
        let id = format!("spiffe://bench.local/new-{i}");
        let mut client = WorkloadClient::connect(socket, TIMEOUT).await.unwrap();
        let mut stream = client.fetch_x509_svid().await.unwrap();
        client.first(&mut stream).await.unwrap().unwrap();
        let began = Instant::now();
        let seen = async {
            loop {
                let message =
                    tokio::time::timeout(Duration::from_secs(120), client.next(&mut stream))
                        .await
                        .expect("the new entry's SVID within two minutes")
                        .unwrap()
                        .expect("the stream stays open");
                if message.svids.iter().any(|svid| svid.spiffe_id == id) {
                    return began.elapsed();
                }
            }
        };
        let ((), took) = tokio::join!(create(id.clone()), seen);
        samples.push(took);
    }
    samples.sort();
    samples
}

/// /proc/loadavg's first three fields.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
