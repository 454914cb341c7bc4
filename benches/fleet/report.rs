//! The fleet benchmark's markdown: the section "The fleet (issue 17)" of
//! BENCHMARKS.md, every fleet figure beside the same run's standalone one
//! and as a ratio to it.

use std::fmt::Write as _;
use std::time::Duration;

use crate::latency::Op;
use crate::many_agents::Fleet;
use crate::stats::{self, ratio};
use crate::{Args, Pair};

/// Peak resident memory of the processes of the per-request part.
#[derive(Debug)]
pub struct Memory {
    /// The standalone agent, KiB.
    pub standalone_kib: u64,
    /// The fleet agent, KiB.
    pub fleet_kib: u64,
    /// The server, KiB.
    pub server_kib: u64,
}

/// Seconds after a rotation event counted in the rotation window.
const AFTER_EVENT: usize = 2;

/// The report. `load` is the load average before and after the run.
pub fn render(
    args: &Args,
    pairs: &[Pair],
    memory: &Memory,
    fleet: Option<&Fleet>,
    load: (&str, &str),
) -> String {
    let mut out = String::new();
    let clients: Vec<String> = args.clients.iter().map(ToString::to_string).collect();
    let ops: Vec<&str> = args.ops.iter().map(|op| op.name()).collect();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let _ = writeln!(out, "## The fleet (issue 17)\n");
    let _ = writeln!(
        out,
        "Produced by `cargo bench --bench fleet -- --duration {} --clients {} --ops {} --paced {} --agents {} --key-ttl {}`. \
         {cores} cores; load average {} before the run, {} after. Every process is the release \
         `tether` binary on loopback: a `tether server` (SQLite store), agents in fleet mode \
         (`[server]`, a join token each) and a standalone agent, with the clients on the same cores.\n",
        humantime::format_duration(args.duration),
        clients.join(","),
        ops.join(","),
        args.paced,
        args.agents,
        humantime::format_duration(args.key_ttl),
        load.0,
        load.1,
    );
    let _ = writeln!(
        out,
        "| operation | clients | standalone /s | p50 | p99 | fleet /s | p50 | p99 | fleet / standalone: throughput | p50 | p99 | agent CPU / op, standalone | fleet agent | server | errors (s / f) |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for pair in pairs {
        let (s, f) = (&pair.standalone.summary, &pair.fleet.summary);
        let times = |value: f64, base: f64| {
            ratio(value, base).map_or_else(|| "—".to_owned(), |r| format!("{r:.2}×"))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |",
            describe(pair.op, args.paced),
            pair.clients,
            s.per_second,
            micros(s.p50),
            micros(s.p99),
            f.per_second,
            micros(f.p50),
            micros(f.p99),
            times(f.per_second, s.per_second),
            times(f.p50.as_secs_f64(), s.p50.as_secs_f64()),
            times(f.p99.as_secs_f64(), s.p99.as_secs_f64()),
            micros(pair.standalone.agent_cpu_per_op),
            micros(pair.fleet.agent_cpu_per_op),
            pair.fleet
                .server_cpu_per_op
                .map_or_else(|| "—".to_owned(), micros),
            s.errors,
            f.errors,
        );
    }
    let mib = |kib: u64| kib as f64 / 1024.0;
    let _ = writeln!(
        out,
        "\nPeak RSS over these runs: standalone agent {:.1} MiB, fleet agent {:.1} MiB ({}), server {:.1} MiB.",
        mib(memory.standalone_kib),
        mib(memory.fleet_kib),
        ratio(memory.fleet_kib as f64, memory.standalone_kib as f64).map_or_else(
            || "—".to_owned(),
            |r| format!("{r:.2}× the standalone agent")
        ),
        mib(memory.server_kib),
    );
    if let Some(fleet) = fleet {
        many(&mut out, fleet);
    }
    out
}

fn many(out: &mut String, fleet: &Fleet) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let n = fleet.agents.max(1) as f64;
    let (steady, rotation) = stats::split(&fleet.seconds, AFTER_EVENT);
    let events: usize = fleet.seconds.iter().map(|s| s.events).sum();
    let renewals: Vec<String> = fleet
        .seconds
        .iter()
        .enumerate()
        .filter(|(_, s)| s.renewals > 0)
        .map(|(i, s)| format!("{} in second {}", s.renewals, i + 1))
        .collect();
    let _ = writeln!(
        out,
        "\n### One server, {} agents\n\n{} agent processes (`tether run`, each its own data dir, \
         sockets, join token and an entry named to its node), started one after another on loopback \
         against one server whose `authority.ca_ttl` and `jwt_key_ttl` are {}: the server prepares \
         each key's successor at half its life, activates it at five sixths and retires the old key \
         at its end, pushing each bundle change to every agent. Server CPU is its utime + stime \
         from `/proc`; 100% is one core.\n",
        fleet.agents,
        fleet.agents,
        humantime::format_duration(fleet.key_ttl),
    );
    let _ = writeln!(
        out,
        "| phase | wall | server CPU | per agent | server CPU, mean of a core | busiest second | server RSS at most |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let sync_cpu = fleet.sync_cpu.as_secs_f64();
    let _ = writeln!(
        out,
        "| start-up: spawn, attest (join token), first sync | {:.1} s | {:.2} s | {:.1} ms | {:.0}% | — | {:.1} MiB |",
        fleet.sync_wall.as_secs_f64(),
        sync_cpu,
        sync_cpu * 1e3 / n,
        100.0 * sync_cpu / fleet.sync_wall.as_secs_f64().max(f64::EPSILON),
        mib(fleet.synced_rss_kib),
    );
    for (name, window) in [
        ("steady state (no key change)", steady),
        (
            "key rotation: each second with a key prepared or retired or node SVIDs renewed, and the 2 after",
            rotation,
        ),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {} s | {:.2} s | {:.2} ms/s | {:.1}% | {:.0}% | {:.1} MiB |",
            window.seconds,
            window.cpu,
            window.mean_cpu() * 1e3 / n,
            100.0 * window.mean_cpu(),
            100.0 * window.max_cpu,
            mib(window.max_rss_kib),
        );
    }
    let _ = writeln!(
        out,
        "\nServer RSS: {:.1} MiB before any agent, {:.1} MiB with {} synced ({:.1} KiB per agent), \
         {:.1} MiB at its peak (VmHWM). The {} agents together: {:.1} MiB resident at the end \
         ({:.1} MiB each). Key changes logged by the server in the window: {events}; node SVID \
         renewals on its audit trail: {}. \
         At the end, {} of {} agents served exactly the server's JWT keys (the rotated bundle \
         reached them).",
        mib(fleet.idle_rss_kib),
        mib(fleet.synced_rss_kib),
        fleet.agents,
        fleet.synced_rss_kib.saturating_sub(fleet.idle_rss_kib) as f64 / n,
        mib(fleet.peak_rss_kib),
        fleet.agents,
        mib(fleet.agents_rss_kib),
        mib(fleet.agents_rss_kib) / n,
        if renewals.is_empty() {
            "none".to_owned()
        } else {
            renewals.join(", ")
        },
        fleet.bundle_current,
        fleet.agents,
    );
    let seconds: Vec<String> = fleet
        .seconds
        .iter()
        .map(|s| {
            if s.events > 0 {
                format!("**{:.0}**", s.cpu * 100.0)
            } else if s.renewals > 0 {
                format!("_{:.0}_", s.cpu * 100.0)
            } else {
                format!("{:.0}", s.cpu * 100.0)
            }
        })
        .collect();
    let _ = writeln!(
        out,
        "\nServer CPU % each second after the sync (bold: a key prepared or retired in that second; italic: node SVIDs renewed): {}.",
        seconds.join(" ")
    );
}

/// The operation's name, with its pace when it ran paced.
fn describe(op: Op, paced: f64) -> String {
    if op.is_paced() && paced > 0.0 {
        format!("{}, paced at {paced}/s", op.describe())
    } else {
        op.describe().to_owned()
    }
}

/// A latency as the tables print it: µs below 10 ms, ms with a decimal above.
pub fn micros(d: Duration) -> String {
    if d >= Duration::from_millis(10) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{} µs", d.as_micros())
    }
}
