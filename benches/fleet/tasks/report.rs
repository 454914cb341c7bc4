//! The task part's markdown: the section "Tasks across the fleet (issue
//! 18)" of BENCHMARKS.md (the reading of it is written by hand).

use std::fmt::Write as _;
use std::time::Duration;

use super::{Results, Samples, TaskArgs, Whose};
use crate::report::micros;
use crate::stats::ratio;

/// The p99 the issue asks of cross-node revocation.
const TARGET_P99: Duration = Duration::from_millis(100);

/// The report. `load` is the load average before and after the run.
pub fn render(
    args: &TaskArgs,
    duration: Duration,
    clients: &[usize],
    results: &Results,
    load: (&str, &str),
) -> String {
    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let clients: Vec<String> = clients.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "## Tasks across the fleet (issue 18)\n");
    let _ = writeln!(
        out,
        "Produced by `cargo bench --bench fleet -- --tasks --nodes {} --live-tasks {} --end-samples {} \
         --kill-samples {} --poll {} --ends-rate {} --ends-for {} --duration {} --clients {}`. \
         {cores} cores; load average {} before the run, {} after. Every process is the release \
         `tether` binary on loopback: one `tether server` (SQLite store, its per-node request \
         budget raised out of the way) and {} agents in fleet mode, one entry for the benchmark's \
         uid served on every node; the benchmark's clients share the cores.\n",
        args.nodes,
        args.live_tasks,
        args.end_samples,
        args.kill_samples,
        humantime::format_duration(args.poll),
        args.ends_rate,
        humantime::format_duration(args.ends_for),
        humantime::format_duration(duration),
        clients.join(","),
        load.0,
        load.1,
        args.nodes,
    );
    let fill = &results.fill;
    let begun = fill.begun.max(1) as f64;
    let _ = writeln!(
        out,
        "The live tasks: {} begun through the agents' Task API ({} clients a node), {:.1} s \
         ({:.0} a second); server CPU {:.2} ms and the agents' {:.2} ms per BeginTask; server \
         RSS {:.1} MiB before, {:.1} MiB after. They stay live through every measurement below \
         until the last, which ends them.\n",
        fill.begun,
        super::FILL_CLIENTS_PER_NODE,
        fill.wall.as_secs_f64(),
        begun / fill.wall.as_secs_f64().max(f64::EPSILON),
        fill.server_cpu.as_secs_f64() * 1e3 / begun,
        fill.agents_cpu.as_secs_f64() * 1e3 / begun,
        mib(fill.server_rss_kib.0),
        mib(fill.server_rss_kib.1),
    );
    revocation(&mut out, args, results);
    validation(&mut out, results);
    ends(&mut out, results);
    out
}

fn revocation(out: &mut String, args: &TaskArgs, results: &Results) {
    let resolution = results
        .validation
        .iter()
        .find(|row| row.whose == Whose::Foreign && row.clients == 1)
        .map_or_else(|| "—".to_owned(), |row| micros(row.summary.p50));
    let _ = writeln!(
        out,
        "### Cross-node revocation latency\n\n\
         A task of node A ends; node B is asked ValidateTaskToken of its token until it refuses \
         it, with {} between two asks. Timed from the end (the EndTask answer to its owner, or \
         the `kill(SIGKILL)` of its owner, a `tether task run -- sleep 600`) to B's first \
         refusal: a sample is late by at most one pause (the tokio timer rounds it up to the \
         next millisecond) and one ValidateTaskToken round trip (p50 {resolution} at 1 client). \
         Each sample begins a new task on A first (so the fleet keeps {} live tasks) and checks \
         that B accepts it; A and B walk every pair of nodes.\n",
        humantime::format_duration(args.poll),
        args.live_tasks,
    );
    let _ = writeln!(
        out,
        "| the task ends by | samples | refused on B: p50 | p99 | max | still accepted after 10 s | p99 against the target (100 ms) |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | --- |");
    for (how, samples) in [
        ("EndTask by its owner", &results.end_task),
        (
            "its owner process killed (SIGKILL; the agent sees the exit by pidfd)",
            &results.kill,
        ),
    ] {
        let p99 = samples.at(0.99);
        let verdict = if samples.latencies.is_empty() {
            "—".to_owned()
        } else if p99 <= TARGET_P99 {
            "met".to_owned()
        } else {
            format!("**missed by {}**", micros(p99 - TARGET_P99))
        };
        let _ = writeln!(
            out,
            "| {how} | {} | {} | {} | {} | {} | {verdict} |",
            samples.latencies.len() + samples.timeouts,
            micros(samples.at(0.5)),
            micros(p99),
            micros(samples.max()),
            samples.timeouts,
        );
    }
    let end = &results.end_task;
    let _ = writeln!(
        out,
        "\nThe EndTask calls themselves (not in the figures above): p50 {}, p99 {}. B was asked {:.1} \
         times per sample on average. Its refusals: {}.\n",
        micros(crate::stats::quantile(&end.end_calls, 0.5)),
        micros(crate::stats::quantile(&end.end_calls, 0.99)),
        (end.polls + results.kill.polls) as f64
            / (end.latencies.len() + results.kill.latencies.len()).max(1) as f64,
        reasons(&[&results.end_task, &results.kill]),
    );
}

fn reasons(all: &[&Samples]) -> String {
    let mut merged = std::collections::BTreeMap::<&str, usize>::new();
    for samples in all {
        for (reason, n) in &samples.reasons {
            *merged.entry(reason).or_default() += n;
        }
    }
    merged
        .iter()
        .map(|(reason, n)| format!("{n} × \"{reason}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn validation(out: &mut String, results: &Results) {
    let _ = writeln!(
        out,
        "### Validating another node's task\n\n\
         ValidateTaskToken on node B (`node-01`) of a token of B's own task and of a token of \
         node A's (`node-00`): the same audience, tool and claims, only the owner differs. Each \
         client its own connection, calls one after another as fast as it can; B's CPU from \
         `/proc`. Every call is also an audit record on B.\n"
    );
    let _ = writeln!(
        out,
        "| token | clients | validations /s | p50 | p99 | B's CPU / validation | refused | foreign / own: throughput | p50 | p99 |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for row in &results.validation {
        let own = results
            .validation
            .iter()
            .find(|r| r.whose == Whose::Own && r.clients == row.clients);
        let times = |f: fn(&super::Row) -> f64| match (row.whose, own) {
            (Whose::Foreign, Some(own)) => {
                ratio(f(row), f(own)).map_or_else(|| "—".to_owned(), |r| format!("{r:.2}×"))
            }
            _ => "—".to_owned(),
        };
        let s = &row.summary;
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            row.whose.describe(),
            row.clients,
            s.per_second,
            micros(s.p50),
            micros(s.p99),
            micros(row.cpu_per_op),
            s.errors,
            times(|r| r.summary.per_second),
            times(|r| r.summary.p50.as_secs_f64()),
            times(|r| r.summary.p99.as_secs_f64()),
        );
    }
    let _ = writeln!(out);
}

fn ends(out: &mut String, results: &Results) {
    let load = &results.ends;
    let seconds = load.duration.as_secs_f64().max(f64::EPSILON);
    let ended = load.summary.done as f64;
    let per_second = ended / seconds;
    let _ = writeln!(
        out,
        "### What ends cost\n\n\
         The live tasks of {} nodes ended by their owner's EndTask, paced at {} a second for all \
         of them together ({} clients a node), for {:.1} s; the last node ends nothing and only \
         applies the ends the server pushes. Each end: the owner's agent stores it, sends it \
         (EndTasks), the server stores it in the fleet's index and pushes it on every node's \
         sync stream. Before the run, an idle window as long, for the baseline. CPU is utime + \
         stime from `/proc`; 100% is one core.\n",
        load.ending_nodes,
        load.rate,
        super::ends::CLIENTS_PER_NODE,
        seconds,
    );
    let _ = writeln!(
        out,
        "| window | ends | ends /s | server CPU | server, % of a core | server per 1,000 ends/s | the applying-only agent, % of a core | each ending agent, mean % | busiest ending agent % |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (name, usage, ends) in [
        ("idle (before)", &load.idle, 0.0),
        ("ending tasks", &load.busy, ended),
    ] {
        let percent = |d: Duration| 100.0 * d.as_secs_f64() / seconds;
        let server = percent(usage.server_cpu);
        let per_thousand = if ends > 0.0 {
            format!("{:.1}%", server / (ends / seconds / 1000.0))
        } else {
            "—".to_owned()
        };
        let mean = usage.ending_cpu.iter().map(|d| percent(*d)).sum::<f64>()
            / usage.ending_cpu.len().max(1) as f64;
        let busiest = usage
            .ending_cpu
            .iter()
            .map(|d| percent(*d))
            .fold(0.0, f64::max);
        let _ = writeln!(
            out,
            "| {name} | {ends:.0} | {:.0} | {:.2} s | {server:.1}% | {per_thousand} | {:.1}% | {mean:.1}% | {busiest:.1}% |",
            ends / seconds,
            usage.server_cpu.as_secs_f64(),
            percent(usage.observer_cpu),
        );
    }
    let (before, after, peak) = load.server_rss_kib;
    let _ = writeln!(
        out,
        "\nEndTask at that pace: {:.0} a second reached of {} asked, p50 {}, p99 {}, {} failed. \
         Server RSS {:.1} MiB before the run, {:.1} MiB after, {:.1} MiB at its peak (VmHWM, the \
         whole benchmark). The applying-only agent's RSS: {:.1} MiB before, {:.1} MiB after. \
         {} s after the run, that agent refused {} of {} ended tasks' tokens it was asked about.",
        per_second,
        load.rate,
        micros(load.summary.p50),
        micros(load.summary.p99),
        load.summary.errors,
        mib(before),
        mib(after),
        mib(peak),
        mib(load.observer_rss_kib.0),
        mib(load.observer_rss_kib.1),
        super::ends::SETTLE.as_secs(),
        load.checked.1,
        load.checked.0,
    );
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
