//! The report: BENCHMARKS.md's text from the rows of one run (the limits,
//! the operations table, attestation, memory, and the figures at scale).

use std::fmt::Write as _;
use std::time::Duration;

use crate::limits::Limits;
use crate::ops::{Op, Row};
use crate::{Args, scale};

#[allow(
    clippy::too_many_arguments,
    reason = "one call, each argument a section"
)]
pub(crate) fn report(
    args: &Args,
    cores: usize,
    limits: &Limits,
    rows: &[Row],
    attestations: &[(usize, f64, f64)],
    idle_rss_kib: u64,
    peak_rss_kib: u64,
    scale: Option<&scale::Scale>,
) -> String {
    let mut out = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let clients: Vec<String> = args.clients.iter().map(ToString::to_string).collect();
    let ops: Vec<&str> = args.ops.iter().map(|op| op.name()).collect();
    let _ = writeln!(out, "# tether benchmarks\n");
    let _ = writeln!(
        out,
        "Produced by `cargo bench --bench load -- --duration {} --clients {} --ops {}{} --write BENCHMARKS.md`.\n",
        humantime::format_duration(args.duration),
        clients.join(","),
        ops.join(","),
        if args.scale { " --scale" } else { "" },
    );
    let _ = writeln!(
        out,
        "Machine: {cores} cores ({cpu}), Linux. The agent is the release-profile `tether` binary \
         (a child process); the clients share its cores.\n"
    );
    let _ = writeln!(
        out,
        "## The limits of this machine (in-process, all cores)\n"
    );
    let _ = writeln!(out, "| limit | per second |\n| --- | ---: |");
    let _ = writeln!(
        out,
        "| ES256 sign (jsonwebtoken, aws-lc-rs) | {:.0} |",
        limits.sign
    );
    let _ = writeln!(out, "| ES256 verify | {:.0} |", limits.verify);
    let _ = writeln!(
        out,
        "| P-256 key generation + X.509 signing (rcgen) | {:.0} |\n",
        limits.keygen_x509
    );
    let _ = writeln!(out, "## Operations over the Unix socket\n");
    let _ = writeln!(
        out,
        "| operation | clients | per second | p50 | p99 | p99.9 | agent CPU / op | of its limit | agent alone | of the empty call | errors |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in rows {
        let (limit, limit_name) = row.op.limit(limits);
        let of_limit = if limit.is_finite() {
            format!("{:.0}% of {limit_name}", 100.0 * row.ops_per_sec / limit)
        } else {
            "—".to_owned()
        };
        let empty = rows
            .iter()
            .find(|r| r.op == Op::Empty && r.clients == row.clients)
            .filter(|_| row.op != Op::Empty)
            .map_or_else(
                || "—".to_owned(),
                |empty| format!("{:.0}%", 100.0 * row.ops_per_sec / empty.ops_per_sec),
            );
        // What the agent's own CPU cost per operation would allow on all
        // cores, as a share of the limit: the clients' share of the cores
        // taken out.
        let alone = if limit.is_finite() && row.cpu_per_op > Duration::ZERO {
            let ceiling = cores as f64 / row.cpu_per_op.as_secs_f64();
            format!("{:.0}%", 100.0 * ceiling / limit)
        } else {
            "—".to_owned()
        };
        let cpu = if row.op == Op::Empty {
            "—".to_owned()
        } else {
            micros(row.cpu_per_op)
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.op.describe(),
            row.clients,
            row.ops_per_sec,
            micros(row.p50),
            micros(row.p99),
            micros(row.p999),
            cpu,
            of_limit,
            alone,
            empty,
            row.errors,
        );
    }
    if !attestations.is_empty() {
        let _ = writeln!(
            out,
            "\nA new connection's attestation (hash cached), as the agent timed it \
             (`tether_attestation_seconds`; upper bounds of its power-of-two buckets):\n"
        );
        let _ = writeln!(
            out,
            "| clients | p50 at most | p99 at most |\n| ---: | ---: | ---: |"
        );
        for (clients, p50, p99) in attestations {
            let bound = |s: f64| {
                if s.is_finite() {
                    micros(Duration::from_secs_f64(s))
                } else {
                    "over the last bucket".to_owned()
                }
            };
            let _ = writeln!(out, "| {clients} | {} | {} |", bound(*p50), bound(*p99));
        }
    }
    let _ = writeln!(
        out,
        "\nAgent memory: {:.1} MiB resident when idle (after start), {:.1} MiB at its peak during the run.",
        idle_rss_kib as f64 / 1024.0,
        peak_rss_kib as f64 / 1024.0
    );
    if let Some(scale) = scale {
        scale_report(&mut out, scale);
    }
    out
}

pub(crate) fn scale_report(out: &mut String, scale: &scale::Scale) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let _ = writeln!(out, "\n## At scale\n");
    let _ = writeln!(
        out,
        "Live tasks (each begun over the socket, stored and watched; one owner process):\n"
    );
    let _ = writeln!(
        out,
        "| live tasks | agent RSS | BeginTask/s getting there |"
    );
    let _ = writeln!(out, "| ---: | ---: | ---: |");
    let _ = writeln!(out, "| 0 | {:.1} MiB | — |", mib(scale.idle_rss_kib));
    for (live, rss, rate) in &scale.tasks {
        let _ = writeln!(out, "| {live} | {:.1} MiB | {rate:.0} |", mib(*rss));
    }
    let at = |q: f64| {
        let n = scale.revocation.len();
        scale
            .revocation
            .get(((n as f64 * q) as usize).min(n.saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let _ = writeln!(
        out,
        "\nRevocation: a `tether task run` owning a task is killed (SIGKILL) and the \
         task's token is validated in a loop until refused, with 100,000 other tasks live; \
         {} samples: p50 {}, p99 {}, max {}.",
        scale.revocation.len(),
        micros(at(0.5)),
        micros(at(0.99)),
        micros(scale.revocation.last().copied().unwrap_or_default()),
    );
    let streams = &scale.streams;
    let mut cpu = streams.cpu_per_second.clone();
    cpu.sort_by(f64::total_cmp);
    let pct = |q: f64| {
        cpu.get(((cpu.len() as f64 * q) as usize).min(cpu.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
            * 100.0
    };
    let mean = cpu.iter().sum::<f64>() / cpu.len().max(1) as f64 * 100.0;
    let _ = writeln!(
        out,
        "\nX.509 streams: {} FetchX509SVID streams from {} processes, each process with its \
         own SVID (a process-bound entry) living {}, watched for {} seconds (each SVID rotates \
         at about half its life, jittered by ±10% of that): {} updates pushed, {} of them a \
         rotated SVID (a stream sees each of its process's rotations once); agent RSS {:.1} MiB; \
         agent CPU per second (100% = one core): mean {mean:.1}%, median {:.1}%, max {:.1}%.",
        streams.streams,
        streams.processes,
        humantime::format_duration(streams.ttl),
        streams.cpu_per_second.len(),
        streams.pushes,
        streams.rotations,
        mib(streams.rss_kib),
        pct(0.5),
        pct(1.0),
    );
    let seconds: Vec<String> = streams
        .cpu_per_second
        .iter()
        .map(|c| format!("{:.0}", c * 100.0))
        .collect();
    let _ = writeln!(out, "\nCPU % each second: {}.", seconds.join(" "));
}

/// Per-bucket counts added between two scrapes of a cumulative histogram.
pub(crate) fn bucket_diff(before: &[(f64, u64)], after: &[(f64, u64)]) -> Vec<(f64, u64)> {
    after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|(b, _)| *b == le).map_or(0, |(_, n)| *n);
            (le, n.saturating_sub(was))
        })
        .collect()
}

/// The upper bound of the bucket holding quantile `q` of a cumulative histogram.
pub(crate) fn bucket_quantile(buckets: &[(f64, u64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0, |(_, n)| *n);
    let want = (total as f64 * q).ceil() as u64;
    buckets
        .iter()
        .find(|(_, n)| *n >= want.max(1))
        .map_or(f64::NAN, |(le, _)| *le)
}

pub(crate) fn micros(d: Duration) -> String {
    if d >= Duration::from_millis(10) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{} µs", d.as_micros())
    }
}
