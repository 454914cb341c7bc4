//! The layering in ARCHITECTURE.md, enforced: reads `src/**/*.rs` and fails
//! on a `crate::x` reference that points up or sideways where the table
//! does not allow it. Also keeps the crypto stack to one provider.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Which crate-internal modules each module may name. A module may always
/// name itself.
fn allowed() -> BTreeMap<&'static str, &'static [&'static str]> {
    const EDGE: &[&str] = &[
        "attestation",
        "audit",
        "authority",
        "bundle",
        "edge",
        "error",
        "federation",
        "policy",
        "proto",
        "registration",
        "svid",
        "task",
        "telemetry",
        "transport",
        "trusted_fs",
    ];
    const CONFIG: &[&str] = &[
        "admin_api",
        "audit",
        "task",
        "attestation",
        "authority",
        "federation",
        "policy",
        "registration",
        "svid",
        "telemetry",
        "workload_api",
    ];
    const ROOT: &[&str] = &[
        "admin_api",
        "attestation",
        "audit",
        "authority",
        "bundle",
        "config",
        "edge",
        "error",
        "federation",
        "policy",
        "registration",
        "store",
        "svid",
        "task",
        "task_api",
        "telemetry",
        "transport",
        "trusted_fs",
        "workload_api",
    ];
    BTreeMap::from([
        // 0: leaves; what keeps state on disk trusts only trusted_fs's paths
        ("trusted_fs", &[][..]),
        // How every error is printed (its source chain): anyone may use it.
        ("error", &[][..]),
        ("proto", &[][..]),
        ("telemetry", &["error"][..]),
        ("bundle", &[][..]),
        ("store", &["trusted_fs"][..]),
        ("audit", &["error", "trusted_fs"][..]),
        // 1: core
        // Core modules record their decisions in the audit trail (a leaf).
        ("registration", &["audit", "store"][..]),
        // Every layer records metrics (telemetry, a leaf).
        ("attestation", &["error", "registration", "telemetry"][..]),
        ("authority", &["bundle", "trusted_fs"][..]),
        ("federation", &["bundle", "error"][..]),
        // 2: services and the shared transport
        (
            "svid",
            &[
                "attestation",
                "audit",
                "authority",
                "bundle",
                "error",
                "registration",
                "store",
                "telemetry",
            ][..],
        ),
        (
            "task",
            &[
                "attestation",
                "audit",
                "authority",
                "bundle",
                "error",
                "registration",
                "store",
                "svid",
                "telemetry",
            ][..],
        ),
        (
            "transport",
            &[
                "attestation",
                "audit",
                "error",
                "policy",
                "registration",
                "telemetry",
                "trusted_fs",
            ][..],
        ),
        // Decisions only: policy sees registration types and nothing else.
        ("policy", &["error", "registration"][..]),
        // 3: the gRPC-edge kit every API shares (identify, gate, the one
        // error-to-status mapping), then the edges (the Workload API never
        // touches the authority directly)
        // (authority and store: its tests build the errors that carry them)
        (
            "edge",
            &[
                "attestation",
                "audit",
                "authority",
                "error",
                "policy",
                "registration",
                "store",
                "svid",
                "task",
                "telemetry",
                "transport",
            ][..],
        ),
        ("workload_api", EDGE),
        ("admin_api", EDGE),
        ("task_api", EDGE),
        // 4: config composes every domain's settings type
        ("config", CONFIG),
        // 5: the composition root
        ("daemon", ROOT),
        // 6: the command line
        (
            "cli",
            // `policy validate|check` run the agent's own loader and
            // evaluator offline.
            &[
                "audit",
                "config",
                "daemon",
                "policy",
                "proto",
                "telemetry",
                "trusted_fs",
            ][..],
        ),
    ])
}

/// The Workload API may not name the authority (it reaches keys only
/// through `svid`); checked separately so the edge table can be shared.
fn extra_denials() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([("workload_api", &["authority"][..])])
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/svid/jwt.rs` -> `svid`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_owned()
}

/// Every `crate::name` in the text, code only (line comments skipped).
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                refs.insert(name);
            }
            rest = after;
        }
        // `use crate::{a, b}` groups
        if let Some(i) = code.find("crate::{") {
            let group = &code[i + "crate::{".len()..];
            for part in group.split(['{', '}', ',']) {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                    refs.insert(name);
                }
            }
        }
    }
    refs
}

#[test]
fn modules_only_import_downwards() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let table = allowed();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    for file in files {
        let module = module_of(&src, &file);
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(allowed) = table.get(module.as_str()) else {
            violations.push(format!(
                "{}: module {module} is missing from the layer table",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        let denied = extra_denials().get(module.as_str()).copied().unwrap_or(&[]);
        for name in crate_refs(&text) {
            let forbidden = !allowed.contains(&name.as_str()) || denied.contains(&name.as_str());
            if name != module && forbidden && table.contains_key(name.as_str()) {
                violations.push(format!(
                    "{}: {module} may not use crate::{name}",
                    file.display()
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn one_crypto_provider() {
    // aws-lc-rs everywhere (rustls' default); ring must not creep in. Asked
    // of `cargo tree` (what any target, test or build script would compile)
    // rather than of Cargo.lock: a weak feature (`ring?/alloc` in
    // rustls-webpki) lists ring in the lock file although nothing enables it
    // (rust-lang/cargo#10801).
    for banned in ["ring", "openssl", "openssl-sys"] {
        let out = std::process::Command::new(env!("CARGO"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["tree", "--offline", "--locked", "--target", "all"])
            .args(["-e", "normal,build,dev", "--prefix", "none", "-i", banned])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let absent = stderr.contains("did not match any packages");
        assert!(
            absent || (out.status.success() && stdout.trim().is_empty()),
            "{banned} would be built; use aws-lc-rs. Who needs it:\n{stdout}{stderr}"
        );
    }
}

#[test]
fn the_scanner_sees_grouped_and_inline_references() {
    let refs = crate_refs(
        "use crate::{svid::X, bundle};\nlet a = crate::config::load(); // crate::daemon\n",
    );
    assert_eq!(
        refs,
        BTreeSet::from(["svid".to_owned(), "bundle".to_owned(), "config".to_owned()])
    );
}
