//! Every fuzz target's seeds, and every input a fuzz run ever failed on,
//! replayed through the target's own harness (`fuzz/harness/<target>.rs`,
//! the code `cargo fuzz` runs) as ordinary tests. A parser regression on a
//! known input fails the suite without an instrumented build; finding new
//! inputs is `scripts/fuzz SECONDS`.
//!
//! Inputs: `fuzz/seeds/<target>/` (real examples) and
//! `fuzz/regressions/<target>/` (what a fuzz run failed on, kept once
//! fixed; see fuzz/README.md).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

#[path = "../../fuzz/harness/api_requests.rs"]
mod api_requests;
#[path = "../../fuzz/harness/audit_lines.rs"]
mod audit_lines;
#[path = "../../fuzz/harness/bundle.rs"]
mod bundle;
#[path = "../../fuzz/harness/cgroup.rs"]
mod cgroup;
#[path = "../../fuzz/harness/config.rs"]
mod config;
#[path = "../../fuzz/harness/jwt.rs"]
mod jwt;
#[path = "../../fuzz/harness/pod_list.rs"]
mod pod_list;
#[path = "../../fuzz/harness/policy.rs"]
mod policy;
#[path = "../../fuzz/harness/procfs.rs"]
mod procfs;
#[path = "../../fuzz/harness/selectors.rs"]
mod selectors;

/// One test per fuzz target, named for it, and the list of them.
macro_rules! replay_each {
    ($($target:ident),* $(,)?) => {
        const TARGETS: &[&str] = &[$(stringify!($target)),*];
        $(
            #[test]
            fn $target() {
                replay(stringify!($target), $target::run);
            }
        )*
    };
}

replay_each!(
    api_requests,
    audit_lines,
    bundle,
    cgroup,
    config,
    jwt,
    pod_list,
    policy,
    procfs,
    selectors,
);

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files directly in `dir`, sorted; none when it does not exist.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs every seed and regression input of `target` through `run`; fails
/// naming the first input that panics.
fn replay(target: &str, run: fn(&[u8])) {
    let seeds = files_in(&fuzz_dir().join("seeds").join(target));
    assert!(
        !seeds.is_empty(),
        "fuzz/seeds/{target}/ has no seeds: every target starts from real examples"
    );
    let regressions = files_in(&fuzz_dir().join("regressions").join(target));
    for input in seeds.iter().chain(&regressions) {
        let data = std::fs::read(input).unwrap();
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            panic!(
                "fuzz target {target} fails on {} (the panic is above)",
                input.display()
            );
        }
    }
}

#[test]
fn every_fuzz_target_is_replayed() {
    let mut on_disk: Vec<String> = files_in(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    assert_eq!(
        on_disk, TARGETS,
        "a fuzz target without a replay here (or one replayed that is gone)"
    );
}
