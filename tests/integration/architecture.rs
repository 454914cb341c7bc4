//! The layering in ARCHITECTURE.md, enforced: parses every `src/**/*.rs`
//! with `syn` and fails on a path that points up or sideways where the
//! table does not allow it. Every path is seen: `use` trees however nested,
//! `super::` and `self::` resolved against the module the code is in
//! (inline `mod` blocks included), `crate::` and `tether::` paths, paths
//! written inline without a `use`, and paths inside macro invocations
//! (read token by token). Comments and doc comments are not code and are
//! not read. Also keeps the crypto stack to one provider.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::buffer::{Cursor, TokenBuffer};
use syn::visit::{self, Visit};

/// Which crate-internal modules each module may name. A module may always
/// name itself. One row per top-level module: a new module adds its row
/// (the test fails until it does).
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
        "introspect",
        "fleet",
        "audit",
        "task",
        "attestation",
        "authority",
        "error",
        "federation",
        "oidc",
        "policy",
        "registration",
        "svid",
        "telemetry",
        "workload_api",
    ];
    const ROOT: &[&str] = &[
        "admin_api",
        "introspect",
        "fleet",
        "mtls",
        "web",
        "attestation",
        "audit",
        "authority",
        "bundle",
        "config",
        "edge",
        "error",
        "federation",
        "oidc",
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
        // Unit-test helpers (`cfg(test)` only): see TEST_SUPPORT.
        ("testing", &[][..]),
        // How every error is printed (its source chain): anyone may use it.
        ("error", &[][..]),
        ("proto", &[][..]),
        // The HTTP kit: a key file is trusted only as trusted_fs says.
        ("web", &["error", "trusted_fs"][..]),
        ("telemetry", &["error", "web"][..]),
        ("bundle", &["error"][..]),
        ("store", &["trusted_fs"][..]),
        ("audit", &["error", "trusted_fs"][..]),
        // 1: core
        // Core modules record their decisions in the audit trail (a leaf).
        ("registration", &["audit", "error", "store"][..]),
        // Every layer records metrics (telemetry, a leaf).
        ("attestation", &["error", "registration", "telemetry"][..]),
        ("authority", &["bundle", "error", "trusted_fs"][..]),
        // The fleet's mutual TLS: bundles as values, never the keys
        // (its tests serve a generated service over it).
        ("mtls", &["bundle", "error", "proto"][..]),
        // OIDC discovery: the bundle's JWT keys served over the HTTP kit
        // (never a key, never the authority).
        ("oidc", &["bundle", "error", "web"][..]),
        // Federated bundles; an https_spiffe bundle endpoint is verified
        // with the fleet's SVID verifier (mtls); our own bundle endpoint is
        // served on the web kit.
        (
            "federation",
            &["bundle", "error", "mtls", "telemetry", "web"][..],
        ),
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
        // (server: the fleet server's error types, mapped here like every
        // other domain error so a code means the same on every API)
        (
            "edge",
            &[
                "attestation",
                "audit",
                "authority",
                "error",
                "policy",
                "registration",
                "server",
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
        // Token introspection (RFC 7662) over the HTTP kit and mutual TLS:
        // verifies with svid's validation and task's rules, records to
        // audit, counts in telemetry.
        (
            "introspect",
            &[
                "audit",
                "authority",
                "bundle",
                "error",
                "mtls",
                "svid",
                "task",
                "telemetry",
                "web",
            ][..],
        ),
        // Fleet mode's link to the server and the authority that signs
        // through it (an `Authority` beside `authority::local`); it takes
        // the server's entries in the admin API's wire form.
        (
            "fleet",
            &[
                "admin_api",
                "authority",
                "bundle",
                "error",
                "mtls",
                "oidc",
                "proto",
                "registration",
                "task",
                "telemetry",
            ][..],
        ),
        // 4: config composes every domain's settings type
        ("config", CONFIG),
        // 5: the composition root, and beside it the client of the sockets
        // (the wire protocol and the socket defaults, no service module)
        ("daemon", ROOT),
        ("client", &["config", "proto", "trusted_fs"][..]),
        // The fleet's server, beside the agent's root; so far the
        // node-scope rule over entries and the attestor's pod selectors,
        // and its SQLite store (opened as the agent's store opens its own,
        // whose file checks are trusted_fs's).
        (
            "server",
            &[
                "admin_api",
                "attestation",
                "audit",
                "authority",
                "bundle",
                "config",
                "daemon",
                "edge",
                "error",
                "introspect",
                "federation",
                "mtls",
                "oidc",
                "proto",
                "registration",
                "store",
                "svid",
                "transport",
                "trusted_fs",
                "web",
            ][..],
        ),
        // 6: the command line
        (
            "cli",
            // `policy validate|check` run the agent's own loader and
            // evaluator offline.
            &[
                "audit",
                "client",
                "config",
                "daemon",
                "error",
                "policy",
                "proto",
                "server",
                "telemetry",
                "trusted_fs",
            ][..],
        ),
    ])
}

/// Modules any module may name: compiled only for unit tests, they are no
/// part of the layering the agent runs with.
const TEST_SUPPORT: &[&str] = &["testing"];

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

/// The module a file holds, as a path from the crate root
/// (`src/svid/jwt.rs` -> `svid::jwt`, `src/svid/mod.rs` -> `svid`,
/// `src/lib.rs` -> the root).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut path: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        path.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        path.pop();
    }
    path
}

/// Every crate-internal path a file names, resolved from the crate root
/// (`super::x` in `svid::jwt` is `svid::x`). `module` is the file's module.
/// `tether::` is the library seen from outside (the binary, tests): the
/// same root as `crate::`.
fn crate_paths(source: &str, module: &[String]) -> Vec<Vec<String>> {
    placed_paths(source, module)
        .into_iter()
        .map(|(_, path)| path)
        .collect()
}

/// Like [`crate_paths`], each with the module it was written in (an inline
/// `mod tests` included), resolved from the crate root.
fn placed_paths(source: &str, module: &[String]) -> Vec<(Vec<String>, Vec<String>)> {
    let file = syn::parse_file(source).unwrap_or_else(|e| panic!("does not parse: {e}"));
    let mut paths = Paths {
        module: module.to_vec(),
        found: Vec::new(),
    };
    paths.visit_file(&file);
    paths.found
}

/// The top-level modules a file names (`svid` for `crate::svid::jwt::X`).
fn crate_refs(source: &str, module: &[String]) -> BTreeSet<String> {
    crate_paths(source, module)
        .into_iter()
        .filter_map(|path| path.into_iter().next())
        .collect()
}

/// Collects resolved paths while walking a file, tracking inline modules.
struct Paths {
    module: Vec<String>,
    /// The module each path was written in, and the path.
    found: Vec<(Vec<String>, Vec<String>)>,
}

impl Paths {
    /// Resolves a path written in the current module; `None` when it is
    /// not crate-relative (`std::`, a local name, a dependency).
    fn resolve(&self, segments: &[String]) -> Option<Vec<String>> {
        let (first, rest) = segments.split_first()?;
        let mut base = match first.as_str() {
            "crate" | "tether" => Vec::new(),
            "self" => self.module.clone(),
            "super" => {
                let mut base = self.module.clone();
                base.pop();
                base
            }
            _ => return None,
        };
        let mut rest = rest;
        if first == "super" {
            while let Some((next, after)) = rest.split_first() {
                if next != "super" {
                    break;
                }
                base.pop();
                rest = after;
            }
        }
        base.extend(rest.iter().filter(|s| *s != "self").cloned());
        Some(base)
    }

    fn record(&mut self, segments: &[String]) {
        if let Some(path) = self.resolve(segments)
            && !path.is_empty()
        {
            self.found.push((self.module.clone(), path));
        }
    }

    /// Every leaf of a `use` tree, with the prefix that leads to it.
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.record(prefix);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.record(prefix);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.record(prefix),
            syn::UseTree::Group(g) => {
                for item in &g.items {
                    self.use_tree(prefix, item);
                }
            }
        }
    }

    /// Paths inside a macro's tokens (`info!(n = crate::x::y())`), which
    /// `syn` leaves unparsed: every `crate`, `tether`, `self` or `super`
    /// that starts a `::` chain.
    fn macro_tokens(&mut self, mut cursor: Cursor<'_>) {
        // The punctuation just before: a path start never follows `::`
        // (`a::crate_like`) or `$` (`$crate`).
        let mut prev: Option<char> = None;
        let mut continues = false;
        while !cursor.eof() {
            if let Some((inside, _, _, next)) = cursor.any_group() {
                self.macro_tokens(inside);
                (cursor, prev, continues) = (next, None, false);
                continue;
            }
            if let Some((ident, next)) = cursor.ident() {
                let word = ident.to_string();
                cursor = next;
                if !continues && matches!(word.as_str(), "crate" | "tether" | "self" | "super") {
                    let (segments, next) = path_from(word, cursor);
                    self.record(&segments);
                    cursor = next;
                }
                (prev, continues) = (None, false);
                continue;
            }
            if let Some((punct, next)) = cursor.punct() {
                let c = punct.as_char();
                continues = c == '$' || (c == ':' && prev == Some(':'));
                (cursor, prev) = (next, Some(c));
                continue;
            }
            match cursor.token_tree() {
                Some((_, next)) => cursor = next,
                None => break,
            }
            (prev, continues) = (None, false);
        }
    }
}

/// The `::`-separated idents after `first` in a token stream, and where
/// they end.
fn path_from(first: String, mut cursor: Cursor<'_>) -> (Vec<String>, Cursor<'_>) {
    let mut segments = vec![first];
    while let Some((a, after_a)) = cursor.punct() {
        let Some((b, after_b)) = after_a.punct() else {
            break;
        };
        if a.as_char() != ':' || b.as_char() != ':' {
            break;
        }
        let Some((ident, next)) = after_b.ident() else {
            break;
        };
        segments.push(ident.to_string());
        cursor = next;
    }
    (segments, cursor)
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        // `mod x;` is another file (its own module path); `mod x { .. }`
        // is code in module `x` of this one.
        self.module.push(item.ident.to_string());
        visit::visit_item_mod(self, item);
        self.module.pop();
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        let mut prefix = Vec::new();
        self.use_tree(&mut prefix, &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.record(&segments);
        visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        let buffer = TokenBuffer::new2(mac.tokens.clone());
        self.macro_tokens(buffer.begin());
        visit::visit_macro(self, mac);
    }
}

/// The layering violations in one file of module `owner` (its path from
/// the crate root in `module`).
fn violations_in(
    source: &str,
    module: &[String],
    owner: &str,
    table: &BTreeMap<&'static str, &'static [&'static str]>,
) -> Vec<String> {
    let Some(allowed) = table.get(owner) else {
        return vec![format!("module {owner} is missing from the layer table")];
    };
    let denied = extra_denials().get(owner).copied().unwrap_or(&[]);
    crate_refs(source, module)
        .into_iter()
        .filter(|name| {
            let forbidden = !allowed.contains(&name.as_str()) || denied.contains(&name.as_str());
            name != owner
                && forbidden
                && table.contains_key(name.as_str())
                && !TEST_SUPPORT.contains(&name.as_str())
        })
        .map(|name| format!("{owner} may not use crate::{name}"))
        .collect()
}

#[test]
fn modules_only_import_downwards() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let table = allowed();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    for file in files {
        let module = module_path(&src, &file);
        // The crate root declares the modules; `main.rs` is the entry
        // layer beside `cli` and answers to the same row.
        let owner = match module.first() {
            Some(top) => top.clone(),
            None if file.ends_with("main.rs") => "cli".to_owned(),
            None => continue,
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for violation in violations_in(&text, &module, &owner, &table) {
            violations.push(format!("{}: {violation}", file.display()));
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.join("\n")
    );
}

/// Names that choose an authority implementation: in production code only
/// `authority` itself and the composition root may write them; everything
/// above the seam holds an `Arc<dyn authority::Authority>`.
fn names_an_authority_implementation(path: &[String]) -> bool {
    matches!(
        path,
        [a, b, ..] if a == "authority" && (b == "LocalAuthority" || b == "local")
    )
}

/// The seam violations in one file of module `module`: paths naming an
/// authority implementation outside `authority` and the two composition
/// roots (`daemon`, the agent's; `server::run`, the server's), except in
/// test code (a file or inline module named `tests`).
fn seam_violations_in(source: &str, module: &[String]) -> Vec<String> {
    let top: Vec<&str> = module.iter().take(2).map(String::as_str).collect();
    if matches!(
        top.as_slice(),
        ["authority", ..] | ["daemon", ..] | ["server", "run"]
    ) {
        return Vec::new();
    }
    placed_paths(source, module)
        .into_iter()
        .filter(|(place, path)| {
            !place.iter().any(|m| m == "tests") && names_an_authority_implementation(path)
        })
        .map(|(place, path)| {
            format!(
                "{} names crate::{}; only the composition roots pick the authority",
                place.join("::"),
                path.join("::")
            )
        })
        .collect()
}

#[test]
fn only_the_composition_root_names_an_authority_implementation() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    for file in files {
        let module = module_path(&src, &file);
        let text = std::fs::read_to_string(&file).unwrap();
        for violation in seam_violations_in(&text, &module) {
            violations.push(format!("{}: {violation}", file.display()));
        }
    }
    assert!(
        violations.is_empty(),
        "authority seam violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_seam_check_sees_an_implementation_named_above_the_seam_but_not_in_tests() {
    let source = "use crate::authority::{Authority, LocalAuthority};\n\
                  fn f() { let _ = crate::authority::local::state::x(); }\n\
                  #[cfg(test)] mod tests { use crate::authority::LocalAuthority; }\n";
    let found = seam_violations_in(source, &module("svid"));
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found.iter().all(|v| v.starts_with("svid names")),
        "{found:?}"
    );
    assert!(seam_violations_in(source, &module("daemon")).is_empty());
    assert!(seam_violations_in(source, &module("svid::tests")).is_empty());
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

fn module(path: &str) -> Vec<String> {
    path.split("::").map(str::to_owned).collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn the_checker_sees_nested_groups() {
    let source = "use crate::{svid::{jwt::X, cache}, audit::{self, Outcome}};\n\
                  use crate::{self as root, bundle::*};\n";
    assert_eq!(
        crate_refs(source, &module("task::token")),
        names(&["audit", "bundle", "svid"])
    );
}

#[test]
fn the_checker_resolves_super_and_self_from_the_files_module() {
    // In `svid::x509`, `super::super::audit` is `crate::audit`; inside an
    // inline `mod tests`, one more `super` is needed to get as far.
    let source = "use super::super::audit::AuditLog;\n\
                  use super::cache::Key;\n\
                  use self::inner::Thing;\n\
                  #[cfg(test)] mod tests { use super::super::super::daemon::start; use super::*; }\n";
    let paths = crate_paths(source, &module("svid::x509"));
    assert!(paths.contains(&module("audit::AuditLog")));
    assert!(paths.contains(&module("svid::cache::Key")));
    assert!(paths.contains(&module("svid::x509::inner::Thing")));
    assert!(paths.contains(&module("daemon::start")));
    assert!(paths.contains(&module("svid::x509")));
    assert_eq!(
        crate_refs(source, &module("svid::x509")),
        names(&["audit", "daemon", "svid"])
    );
}

#[test]
fn the_checker_sees_inline_paths_macros_and_tether_paths_but_not_comments() {
    let source = "// crate::cli in a comment\n\
                  /// [`crate::admin_api`] in a doc comment\n\
                  fn f() -> crate::policy::Decision {\n\
                      let _ = crate::config::load();\n\
                      tracing::info!(n = crate::telemetry::metrics(), \"{}\", tether::daemon::X);\n\
                      assert!(matches!(x, crate::store::Row { .. }));\n\
                      let s: std::string::String = a::crate_like::b();\n\
                      todo!()\n\
                  }\n";
    assert_eq!(
        crate_refs(source, &module("audit")),
        names(&["config", "daemon", "policy", "store", "telemetry"])
    );
}

#[test]
fn the_checker_reports_what_the_table_forbids() {
    let table = allowed();
    // A leaf naming a service, in a nested group, an inline path and a
    // `super::` chain that climbs out of it.
    let source = "use crate::{trusted_fs::Dir, svid::{X509Svid}};\n\
                  fn f() { crate::policy::Policy::new(); }\n\
                  mod inner { use super::super::super::registration::Entry; }\n";
    let found = violations_in(source, &module("audit::writer"), "audit", &table);
    assert_eq!(
        found,
        [
            "audit may not use crate::policy",
            "audit may not use crate::registration",
            "audit may not use crate::svid",
        ]
    );
    // The same from the Workload API: only the explicit denial applies.
    let source = "use crate::{svid::X509Svid, authority::Authority};";
    let found = violations_in(source, &module("workload_api"), "workload_api", &table);
    assert_eq!(found, ["workload_api may not use crate::authority"]);
    assert_eq!(
        violations_in("", &module("newcomer"), "newcomer", &table),
        ["module newcomer is missing from the layer table"]
    );
}
