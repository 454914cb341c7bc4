//! tether's load generator: a real agent (the `tether` binary, a child
//! process) driven over its Unix socket by N concurrent clients, one
//! connection each, beside the limits of this machine measured in the same
//! run (in-process ES256 sign and verify, P-256 key generation plus X.509
//! signing).
//!
//! ```text
//! cargo bench --bench load -- [--duration 2s] [--clients 1,16,64,256,1024]
//!                             [--ops fetch_jwt,validate_jwt,...] [--write BENCHMARKS.md]
//! ```
//!
//! Each operation runs for `--duration` at each client count. Reported:
//! throughput, p50/p99/p99.9 latency, the agent's CPU time per operation
//! (from /proc/<pid>/stat), the agent's peak RSS (VmHWM), and the ratio of
//! the throughput to the limit the operation is bound by.
//!
//! `--versus-spire <SPIRE bin dir>` runs instead tether beside SPIRE
//! v1.13.3 ([`versus`]; `scripts/spire bench` builds SPIRE and passes it):
//! `--clients` defaults to 1,16,64 there, and `--write` replaces only the
//! generated part of BENCHMARKS.md's "tether and SPIRE" section
//! ([`versus_report`]).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark fails by panicking"
)]

mod agent;
mod empty;
mod limits;
mod ops;
mod report;
mod scale;
mod spire;
mod versus;
mod versus_report;

use std::path::PathBuf;
use std::time::Duration;

use agent::Agent;
use limits::measure_limits;
use ops::{Op, Row, run};
use report::{bucket_diff, bucket_quantile, report};

pub(crate) const AUDIENCE: &str = "spiffe://bench.local/mcp";
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Args {
    pub(crate) duration: Duration,
    pub(crate) clients: Vec<usize>,
    /// Whether `--clients` was given.
    pub(crate) clients_given: bool,
    pub(crate) ops: Vec<Op>,
    pub(crate) write: Option<PathBuf>,
    pub(crate) scale: bool,
    /// `--versus-spire`: the directory holding `spire-server` and `spire-agent`.
    pub(crate) versus_spire: Option<PathBuf>,
}

/// Where the clients connect, and a directory for what they make.
pub(crate) struct Targets {
    pub(crate) agent: PathBuf,
    /// The copy of `tether` the process-bound entry selects.
    pub(crate) bound: PathBuf,
    pub(crate) empty: PathBuf,
    pub(crate) work: PathBuf,
}

fn main() {
    if let Ok(streams) = std::env::var(scale::CHILD_STREAMS) {
        scale::child(streams.parse().unwrap());
        return;
    }
    let args = parse_args();
    if let Some(bin) = &args.versus_spire {
        versus_spire(&args, bin);
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    eprintln!("measuring this machine's limits ({cores} cores)...");
    let limits = measure_limits(cores, Duration::from_secs(1));
    eprintln!("{limits:?}");

    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("load"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // The empty service gets a runtime of its own, as an agent would.
    let empty_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()
        .unwrap();
    let targets = Targets {
        agent: agent.socket.clone(),
        bound: agent.bound_exe(),
        empty: empty::serve(&empty_runtime, dir.path()),
        work: dir.path().to_owned(),
    };
    let idle_rss = agent.rss_kib();
    let mut rows = Vec::new();
    // (clients, p50 bound, p99 bound) of full attestations on new connections.
    let mut attestations = Vec::new();
    for &op in &args.ops {
        for &clients in &args.clients {
            if op.spawns_processes() && clients > Op::MAX_PROCESS_CLIENTS {
                continue;
            }
            let cpu_before = agent.cpu_time();
            let buckets_before = agent.attestation_buckets();
            let row = runtime.block_on(run(op, clients, args.duration, &targets));
            if op == Op::NewConnection {
                let during = bucket_diff(&buckets_before, &agent.attestation_buckets());
                attestations.push((
                    clients,
                    bucket_quantile(&during, 0.5),
                    bucket_quantile(&during, 0.99),
                ));
            }
            let cpu = agent.cpu_time().saturating_sub(cpu_before);
            let done = (row.ops_per_sec * args.duration.as_secs_f64()).max(1.0);
            let row = Row {
                cpu_per_op: cpu.div_f64(done),
                ..row
            };
            eprintln!(
                "{:<15} {:>5} clients: {:>9.0}/s p50 {:?} p99 {:?} errors {}",
                op.name(),
                clients,
                row.ops_per_sec,
                row.p50,
                row.p99,
                row.errors
            );
            rows.push(row);
        }
    }
    let peak_rss = agent.peak_rss_kib();
    agent.stop();
    let scale = args.scale.then(|| scale::run(&runtime, dir.path()));

    let report = report(
        &args,
        cores,
        &limits,
        &rows,
        &attestations,
        idle_rss,
        peak_rss,
        scale.as_ref(),
    );
    println!("{report}");
    if let Some(path) = &args.write {
        std::fs::write(path, &report).unwrap();
        eprintln!("wrote {}", path.display());
    }
}

fn parse_args() -> Args {
    let mut args = Args {
        duration: Duration::from_secs(2),
        clients: vec![1, 16, 64, 256, 1024],
        ops: Op::ALL.to_vec(),
        clients_given: false,
        write: None,
        scale: false,
        versus_spire: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--duration" => {
                args.duration = humantime::parse_duration(&it.next().unwrap()).unwrap();
            }
            "--clients" => {
                args.clients_given = true;
                args.clients = it
                    .next()
                    .unwrap()
                    .split(',')
                    .map(|n| n.parse().unwrap())
                    .collect();
            }
            "--ops" => {
                let wanted = it.next().unwrap();
                args.ops = wanted
                    .split(',')
                    .map(|name| {
                        *Op::ALL
                            .iter()
                            .find(|op| op.name() == name)
                            .unwrap_or_else(|| panic!("unknown op {name}"))
                    })
                    .collect();
            }
            "--write" => args.write = Some(it.next().unwrap().into()),
            "--scale" => args.scale = true,
            "--versus-spire" => args.versus_spire = Some(it.next().unwrap().into()),
            // cargo bench passes --bench to every harness.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    if args.versus_spire.is_some() && !args.clients_given {
        args.clients = vec![1, 16, 64];
    }
    args
}

/// `--versus-spire`: tether and SPIRE side by side, the table printed and,
/// with `--write`, put in its section of the file.
fn versus_spire(args: &Args, bin: &std::path::Path) {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let measured = versus::run(&runtime, dir.path(), bin, args.duration, &args.clients);
    let section = versus_report::section(&measured, args.duration, &args.clients);
    println!("{section}");
    if let Some(path) = &args.write {
        versus_report::write(path, &section);
        eprintln!("wrote the tether and SPIRE section of {}", path.display());
    }
}
