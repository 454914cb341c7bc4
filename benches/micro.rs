//! Micro-benchmarks of tether's hot paths, in-process, through the crate's
//! public API (criterion):
//!
//! - `matching`: [`EntrySet::matching`] for one realistic unix caller
//!   (uid, gid, user, group, supplementary gids, path, sha256) over 10 to
//!   10,000 entries, of which three match (a fixed ID, a template, a
//!   pinned binary) and the rest share some of the caller's selectors.
//! - `sign`: a JWT-SVID ([`tether::svid::jwt::issue`]), a task token
//!   ([`Tasks::token_for`], audit record included) and the bare ES256
//!   signature under both ([`tether::authority::jwt_keys::JwtKey::sign`]).
//! - `task_validate`: [`Tasks::validate`] of a live and of a revoked task's
//!   token with 10 and 10,000 tasks known, half of them revoked.
//!
//! ```text
//! cargo bench --bench micro -- [--warm-up-time 1 --measurement-time 3] [FILTER]
//! ```
//!
//! The agent's state lives in a temporary directory (on `/dev/shm` when
//! there is one: the store's fsyncs are setup cost here, not what is
//! measured). The load generator against a real agent is `benches/load/`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark fails by panicking"
)]

use std::collections::BTreeSet;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use serde::Serialize;
use spiffe::{SpiffeId, TrustDomain};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use tether::attestation::Caller;
use tether::audit::{AuditConfig, AuditLog};
use tether::authority::{Authority as _, AuthorityConfig, LocalAuthority};
use tether::registration::{EntrySet, EntrySpec, Match, RegistrationEntry, Registry, SelectorSet};
use tether::store::Store;
use tether::task::{BeginRequest, IssuedToken, Owner, Task, TaskConfig, Tasks};

const TRUST_DOMAIN: &str = "example.org";
const CALLER_SHA256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const AUDIENCE: &str = "spiffe://example.org/mcp/notes";
const TOOLS: [&str; 3] = ["notes.read", "notes.search", "notes.write"];

/// Entry counts for `matching`.
const ENTRY_COUNTS: [usize; 4] = [10, 100, 1_000, 10_000];
/// Task counts for `task_validate`.
const TASK_COUNTS: [usize; 2] = [10, 10_000];

fn trust_domain() -> TrustDomain {
    TrustDomain::new(TRUST_DOMAIN).unwrap()
}

/// A scratch directory, in memory when the machine has `/dev/shm`.
fn scratch_dir() -> TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("tether-micro-")
            .tempdir_in(shm)
            .unwrap()
    } else {
        tempfile::tempdir().unwrap()
    }
}

/// An audit trail whose writer runs on `runtime` (with no writer, recording
/// fills the queue and then refuses).
fn audit_log(dir: &Path, runtime: &tokio::runtime::Runtime) -> AuditLog {
    let config = AuditConfig {
        queue: 1 << 20,
        ..AuditConfig::default()
    };
    let (log, writer) = AuditLog::open(&dir.join("audit"), &config, audit_key()).unwrap();
    runtime.spawn(writer.run(CancellationToken::new()));
    log
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

// === matching ===

/// A process run by alice as python, in a few supplementary groups.
fn caller_selectors() -> SelectorSet {
    [
        "unix:uid:1000",
        "unix:gid:1000",
        "unix:user:alice",
        "unix:group:alice",
        "unix:supplementary_gid:4",
        "unix:supplementary_gid:24",
        "unix:supplementary_gid:27",
        "unix:supplementary_gid:1000",
        "unix:supplementary_group:adm",
        "unix:supplementary_group:sudo",
        "unix:path:/usr/bin/python3.12",
        &format!("unix:sha256:{CALLER_SHA256}"),
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect()
}

/// Entry `i` of `n`: three match the caller (at a quarter, half and the
/// end); the others are a mix that shares one of the caller's selectors,
/// but never all that they require.
fn bench_entry(i: usize, n: usize) -> EntrySpec {
    let other_uid = 2000 + i;
    let sha = format!("{i:064x}");
    let (spiffe_id, selectors): (String, Vec<String>) = if i == n / 4 {
        (
            "spiffe://example.org/user/{unix:user}".into(),
            vec!["unix:gid:1000".into(), "unix:supplementary_gid:27".into()],
        )
    } else if i == n / 2 {
        (
            "spiffe://example.org/agent/python".into(),
            vec![
                "unix:uid:1000".into(),
                "unix:path:/usr/bin/python3.12".into(),
            ],
        )
    } else if i == n - 1 {
        (
            "spiffe://example.org/agent/pinned".into(),
            vec![format!("unix:sha256:{CALLER_SHA256}")],
        )
    } else {
        let id = format!("spiffe://example.org/svc/{i}");
        match i % 10 {
            0 => (
                id,
                vec![
                    "unix:uid:1000".into(),
                    format!("unix:path:/opt/agent-{i}/bin/agent"),
                ],
            ),
            1 => (id, vec![format!("unix:uid:{other_uid}")]),
            2 => (
                id,
                vec![
                    format!("unix:uid:{other_uid}"),
                    format!("unix:gid:{other_uid}"),
                ],
            ),
            3 => (
                id,
                vec!["unix:gid:1000".into(), format!("unix:path:/opt/tool-{i}")],
            ),
            4 => (id, vec![format!("unix:sha256:{sha}")]),
            5 => (
                id,
                vec![
                    "unix:supplementary_gid:27".into(),
                    format!("unix:user:svc-{i}"),
                ],
            ),
            6 => (
                id,
                vec![
                    format!("unix:user:svc-{i}"),
                    "unix:path:/usr/bin/python3.12".into(),
                ],
            ),
            7 => (
                id,
                vec![format!("k8s:ns:team-{}", i % 50), format!("k8s:sa:sa-{i}")],
            ),
            8 => (
                format!("spiffe://example.org/group/{{unix:group}}/n{i}"),
                vec![format!("unix:group:grp-{i}")],
            ),
            _ => (
                id,
                vec![
                    format!("unix:uid:{other_uid}"),
                    format!("unix:sha256:{sha}"),
                ],
            ),
        }
    };
    EntrySpec {
        spiffe_id,
        selectors,
        ..EntrySpec::default()
    }
}

/// The entry set of a registry holding `n` config-file entries.
fn entry_set(n: usize, dir: &Path) -> Arc<EntrySet> {
    let td = trust_domain();
    let entries = (0..n)
        .map(|i| RegistrationEntry::from_config(&bench_entry(i, n), &td, &BTreeSet::new()))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let store = Store::open(dir).unwrap();
    let (audit, _writer) =
        AuditLog::open(&dir.join("audit"), &AuditConfig::default(), audit_key()).unwrap();
    let registry = Registry::open(entries, store, audit, td, BTreeSet::new()).unwrap();
    registry.snapshot()
}

fn matching(c: &mut Criterion) {
    let caller = caller_selectors();
    let mut group = c.benchmark_group("matching");
    for n in ENTRY_COUNTS {
        let dir = scratch_dir();
        let set = entry_set(n, dir.path());
        let matched: Vec<String> = set
            .matching(&caller)
            .iter()
            .map(|m| m.spiffe_id.to_string())
            .collect();
        assert_eq!(
            matched,
            [
                "spiffe://example.org/user/alice",
                "spiffe://example.org/agent/python",
                "spiffe://example.org/agent/pinned",
            ],
            "{n} entries"
        );
        group.bench_with_input(BenchmarkId::new("entries", n), &set, |b, set| {
            b.iter(|| set.matching(black_box(&caller)));
        });
    }
    group.finish();
}

// === signing and validation ===

/// An agent's signing and task state in a scratch directory.
struct Agent {
    _dir: TempDir,
    runtime: tokio::runtime::Runtime,
    authority: LocalAuthority,
    tasks: Tasks,
    caller: Caller,
    owner: Owner,
    matched: Match,
}

impl Agent {
    fn new() -> Self {
        let dir = scratch_dir();
        let runtime = runtime();
        let td = trust_domain();
        let authority =
            LocalAuthority::load_or_create(td.clone(), AuthorityConfig::default(), dir.path())
                .unwrap();
        let store = Store::open(dir.path()).unwrap();
        let audit = audit_log(dir.path(), &runtime);
        let config = TaskConfig {
            token_ttl: Duration::from_secs(5 * 60),
            max_tasks_per_process: 100_000,
            ..TaskConfig::default()
        };
        let (tasks, _owners) = Tasks::new(config, Arc::new(authority.clone()), store, audit);
        // The bench process is the owner of every task: the peer of its own
        // socket pair.
        let caller = runtime.block_on(async {
            let (ours, _theirs) = tokio::net::UnixStream::pair().unwrap();
            Caller::from_stream(&ours).unwrap()
        });
        let owner = Owner {
            process: caller.key(),
            uid: caller.uid(),
            executable: None,
            exe_sha256: None,
        };
        let entry = RegistrationEntry::from_config(
            &EntrySpec {
                spiffe_id: "spiffe://example.org/agent/python".into(),
                selectors: vec!["unix:uid:1000".into()],
                ..EntrySpec::default()
            },
            &td,
            &BTreeSet::new(),
        )
        .unwrap();
        let matched = Match {
            spiffe_id: entry.spiffe_id.as_fixed().unwrap().clone(),
            entry: Arc::new(entry),
        };
        Self {
            _dir: dir,
            runtime,
            authority,
            tasks,
            caller,
            owner,
            matched,
        }
    }

    /// Begins a task; returns it with its first token.
    fn begin(&self) -> (Arc<Task>, IssuedToken) {
        let request = BeginRequest {
            audience: AUDIENCE.into(),
            intent: "summarise this week's notes".into(),
            tools: TOOLS.iter().map(|t| (*t).to_owned()).collect(),
            ttl: Some(Duration::from_secs(60 * 60)),
            bind_x5t: None,
            scope_descendants: false,
            decided_by: Vec::new(),
        };
        self.runtime
            .block_on(
                self.tasks
                    .begin(&self.caller, self.owner.clone(), &self.matched, request),
            )
            .unwrap()
    }

    /// Begins `n` tasks and revokes every other one; returns the token of
    /// a live task and of a revoked one, issued last so they are fresh.
    fn with_tasks(&self, n: usize) -> (IssuedToken, IssuedToken) {
        let mut live = None;
        let mut revoked = None;
        for i in 0..n {
            let (task, token) = self.begin();
            if i % 2 == 1 {
                self.runtime.block_on(self.tasks.revoke(&task.id)).unwrap();
                revoked = Some(token);
            } else {
                live = Some(task);
            }
        }
        let live = self
            .runtime
            .block_on(self.tasks.token_for(&live.unwrap(), Vec::new()))
            .unwrap();
        (live, revoked.unwrap())
    }
}

#[derive(Serialize)]
struct BareClaims<'a> {
    sub: &'a str,
    aud: &'a str,
    exp: u64,
    iat: u64,
}

fn sign(c: &mut Criterion) {
    let agent = Agent::new();
    let (task, _) = agent.begin();
    let audiences = vec![AUDIENCE.to_owned()];
    let mut group = c.benchmark_group("sign");
    group.bench_function("jwt_svid", |b| {
        b.iter(|| {
            agent
                .runtime
                .block_on(tether::svid::jwt::issue(
                    &agent.authority,
                    &agent.matched.entry,
                    &agent.matched.spiffe_id,
                    black_box(&audiences),
                    Duration::from_secs(300),
                    SystemTime::now(),
                ))
                .unwrap()
        });
    });
    group.bench_function("task_token", |b| {
        b.iter(|| {
            agent
                .runtime
                .block_on(agent.tasks.token_for(black_box(&task), Vec::new()))
                .unwrap()
        });
    });
    let key = agent.authority.jwt_signer().unwrap();
    let claims = BareClaims {
        sub: "spiffe://example.org/agent/python",
        aud: AUDIENCE,
        exp: 4_000_000_000,
        iat: 3_999_999_700,
    };
    group.bench_function("es256_bare", |b| {
        b.iter(|| key.sign(black_box(&claims)).unwrap());
    });
    group.finish();
}

fn task_validate(c: &mut Criterion) {
    let mut group = c.benchmark_group("task_validate");
    for n in TASK_COUNTS {
        let agent = Agent::new();
        let (live, revoked) = agent.with_tasks(n);
        let bundle = agent.authority.bundle();
        let bundle_for =
            |td: &TrustDomain| (td == agent.authority.trust_domain()).then(|| bundle.clone());
        let validate = |token: &IssuedToken| {
            agent
                .tasks
                .validate(&token.token, AUDIENCE, Some("notes.read"), None, bundle_for)
        };
        let ok = validate(&live).unwrap();
        assert_eq!(
            ok.spiffe_id,
            SpiffeId::new("spiffe://example.org/agent/python").unwrap()
        );
        assert!(
            validate(&revoked)
                .unwrap_err()
                .to_string()
                .contains("has ended: revoked"),
            "a revoked task's token is refused"
        );
        group.bench_with_input(BenchmarkId::new("live", n), &live, |b, token| {
            b.iter(|| validate(black_box(token)).unwrap());
        });
        group.bench_with_input(BenchmarkId::new("revoked", n), &revoked, |b, token| {
            b.iter(|| validate(black_box(token)).unwrap_err());
        });
    }
    group.finish();
}

criterion_group!(benches, matching, sign, task_validate);
criterion_main!(benches);

/// A fresh audit signing key.
fn audit_key() -> Arc<tether::audit::SigningKey> {
    Arc::new(tether::audit::SigningKey::generate().unwrap().0)
}
