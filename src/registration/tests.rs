//! Unit tests of the registry: entry sets, matching, runtime changes and
//! their persistence and audit records.

use std::collections::HashSet;

use super::*;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn spec(id: &str, selectors: &[&str], hint: Option<&str>) -> EntrySpec {
    EntrySpec {
        spiffe_id: id.into(),
        selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
        hint: hint.map(str::to_owned),
        ..EntrySpec::default()
    }
}

fn entry(id: &str, selectors: &[&str], hint: Option<&str>) -> RegistrationEntry {
    RegistrationEntry::from_config(&spec(id, selectors, hint), &td(), &BTreeSet::new()).unwrap()
}

fn selectors(s: &[&str]) -> SelectorSet {
    s.iter().map(|s| s.parse().unwrap()).collect()
}

/// A real audit trail under `dir`; its writer runs on the test's
/// runtime when there is one (sync tests record nothing).
fn audit(dir: &tempfile::TempDir) -> AuditLog {
    // A registry reopened in the same test gets its own trail: the
    // first writer still holds its directory's lock.
    static OPENED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (log, writer) = AuditLog::open(
        &dir.path().join(format!("audit-{n}")),
        &crate::audit::AuditConfig::default(),
        Arc::new(crate::audit::SigningKey::generate().unwrap().0),
    )
    .unwrap();
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(writer.run(tokio_util::sync::CancellationToken::new()));
    }
    log
}

fn registry(dir: &tempfile::TempDir, config: Vec<RegistrationEntry>) -> Registry {
    let store = Store::open(dir.path()).unwrap();
    Registry::open(config, store, audit(dir), td(), BTreeSet::new()).unwrap()
}

#[test]
fn matching_keeps_order_and_drops_duplicate_hints() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(
        &dir,
        vec![
            entry("spiffe://example.org/a", &["unix:uid:1"], Some("one")),
            entry(
                "spiffe://example.org/b",
                &["unix:uid:1", "unix:gid:2"],
                Some("two"),
            ),
            entry("spiffe://example.org/c", &["unix:uid:1"], Some("one")),
            entry("spiffe://example.org/d", &["unix:uid:9"], None),
        ],
    );
    let got: Vec<String> = reg
        .snapshot()
        .matching(&selectors(&["unix:uid:1", "unix:gid:2"]))
        .iter()
        .map(|m| m.spiffe_id.to_string())
        .collect();
    assert_eq!(got, ["spiffe://example.org/a", "spiffe://example.org/b"]);
    assert!(
        reg.snapshot()
            .matching(&selectors(&["unix:uid:3"]))
            .is_empty()
    );
}

/// The contract, stated as the plain scan over every entry that
/// `matching` replaces: (entry id, resolved ID) in registration order.
fn linear_matching(set: &EntrySet, caller: &SelectorSet) -> Vec<(EntryId, String)> {
    let mut hints = HashSet::new();
    let mut ids = HashSet::new();
    let mut out = Vec::new();
    for entry in set.iter() {
        if !entry.selectors.is_subset(caller) {
            continue;
        }
        let Some(spiffe_id) = entry.spiffe_id.resolve(caller) else {
            continue;
        };
        if entry
            .hint
            .as_ref()
            .is_some_and(|h| !hints.insert(h.clone()))
        {
            continue;
        }
        if ids.insert(spiffe_id.to_string()) {
            out.push((entry.id.clone(), spiffe_id.to_string()));
        }
    }
    out
}

fn indexed_matching(set: &EntrySet, caller: &SelectorSet) -> Vec<(EntryId, String)> {
    set.matching(caller)
        .into_iter()
        .map(|m| (m.entry.id.clone(), m.spiffe_id.to_string()))
        .collect()
}

/// splitmix64: a fixed, dependency-free sequence per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Few values, so entries overlap and callers match often. Two users
/// leave `{unix:user}` unresolved; `x y` is no path segment.
const VOCABULARY: &[&str] = &[
    "unix:uid:0",
    "unix:uid:1000",
    "unix:gid:1000",
    "unix:gid:50",
    "unix:user:alice",
    "unix:user:bob",
    "unix:user:x y",
    "unix:group:staff",
    "unix:supplementary_gid:4",
    "unix:supplementary_gid:27",
    "unix:path:/usr/bin/python3",
    "unix:path:/bin/sh",
    "unix:sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "k8s:ns:agents",
    "k8s:ns:default",
    "k8s:sa:planner",
];

const IDS: &[&str] = &[
    "spiffe://example.org/a",
    "spiffe://example.org/b",
    "spiffe://example.org/c",
    "spiffe://example.org/user/{unix:user}",
    "spiffe://example.org/uid/{unix:uid}/{unix:gid}",
    "spiffe://example.org/ns/{k8s:ns}/sa/{k8s:sa}",
];

const HINTS: &[Option<&str>] = &[None, None, Some("internal"), Some("external")];

fn random_selectors(rng: &mut Rng, max: usize) -> Vec<String> {
    (0..rng.below(max + 1))
        .map(|_| (*rng.pick(VOCABULARY)).to_owned())
        .collect()
}

/// Up to 40 entries: config-file ones (the same rule twice is the same
/// id), API ones (fresh ids), now and then one requiring nothing (which
/// validation refuses, built by hand).
fn random_entries(rng: &mut Rng) -> Vec<Arc<RegistrationEntry>> {
    let now = SystemTime::now();
    (0..rng.below(41))
        .map(|_| {
            let mut selectors = random_selectors(rng, 4);
            if selectors.is_empty() {
                selectors.push((*rng.pick(VOCABULARY)).to_owned());
            }
            let spec = EntrySpec {
                spiffe_id: (*rng.pick(IDS)).to_owned(),
                selectors,
                hint: rng.pick(HINTS).map(str::to_owned),
                ..EntrySpec::default()
            };
            let mut entry = if rng.below(2) == 0 {
                RegistrationEntry::from_config(&spec, &td(), &BTreeSet::new()).unwrap()
            } else {
                let id = EntryId::random().unwrap();
                RegistrationEntry::from_api(&spec, &td(), &BTreeSet::new(), id, 1, now, now)
                    .unwrap()
            };
            if rng.below(25) == 0 {
                entry.selectors.clear();
            }
            Arc::new(entry)
        })
        .collect()
}

#[test]
fn indexed_matching_equals_a_linear_scan() {
    let mut nonempty = 0;
    for seed in 0..400 {
        let mut rng = Rng(seed);
        let set = EntrySet::new(random_entries(&mut rng), 1);
        let mut callers: Vec<SelectorSet> = (0..30)
            .map(|_| {
                random_selectors(&mut rng, 10)
                    .iter()
                    .map(|s| s.parse().unwrap())
                    .collect()
            })
            .collect();
        callers.push(VOCABULARY.iter().map(|s| s.parse().unwrap()).collect());
        for caller in &callers {
            let want = linear_matching(&set, caller);
            assert_eq!(
                indexed_matching(&set, caller),
                want,
                "seed {seed}, caller {caller:?}"
            );
            nonempty += usize::from(!want.is_empty());
        }
        for entry in set.iter() {
            let first = set.entries.iter().find(|e| e.id == entry.id).unwrap();
            assert!(Arc::ptr_eq(set.get(&entry.id).unwrap(), first));
        }
    }
    assert!(nonempty > 5000, "the callers must match often: {nonempty}");
}

#[tokio::test]
async fn the_index_follows_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(
        &dir,
        vec![
            entry("spiffe://example.org/cfg", &["unix:uid:1000"], None),
            entry(
                "spiffe://example.org/user/{unix:user}",
                &["unix:uid:1000", "unix:gid:50"],
                None,
            ),
        ],
    );
    let callers = [
        selectors(&["unix:uid:1000"]),
        selectors(&["unix:uid:1000", "unix:gid:50", "unix:user:alice"]),
        selectors(&["unix:uid:1000", "unix:path:/bin/sh"]),
        selectors(&["unix:uid:7", "unix:path:/bin/sh"]),
    ];
    let check = |step: &str| {
        let set = reg.snapshot();
        for caller in &callers {
            assert_eq!(
                indexed_matching(&set, caller),
                linear_matching(&set, caller),
                "after {step}, caller {caller:?}"
            );
        }
        for entry in set.iter() {
            assert!(Arc::ptr_eq(set.get(&entry.id).unwrap(), entry), "{step}");
        }
    };
    check("open");
    let created = reg
        .create(&spec(
            "spiffe://example.org/sh",
            &["unix:uid:1000", "unix:path:/bin/sh"],
            None,
        ))
        .await
        .unwrap();
    check("create");
    assert_eq!(
        indexed_matching(&reg.snapshot(), &callers[2]).len(),
        2,
        "the new entry matches"
    );
    reg.update(
        &created.id,
        &spec("spiffe://example.org/sh", &["unix:path:/bin/sh"], None),
        None,
    )
    .await
    .unwrap();
    check("update");
    assert_eq!(
        indexed_matching(&reg.snapshot(), &callers[3]).len(),
        1,
        "the updated entry matches on its new selectors"
    );
    reg.replace_config(
        vec![entry(
            "spiffe://example.org/cfg2",
            &["unix:path:/bin/sh"],
            None,
        )],
        BTreeSet::new(),
    )
    .await
    .unwrap();
    check("reload");
    reg.delete(&created.id).await.unwrap();
    check("delete");
    assert!(reg.snapshot().get(&created.id).is_none());
    let left: Vec<String> = reg
        .snapshot()
        .matching(&callers[2])
        .iter()
        .map(|m| m.spiffe_id.to_string())
        .collect();
    assert_eq!(left, ["spiffe://example.org/cfg2"]);
}

#[test]
fn templates_resolve_per_caller() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(
        &dir,
        vec![entry(
            "spiffe://example.org/user/{unix:user}",
            &["unix:gid:100"],
            None,
        )],
    );
    let alice = reg
        .snapshot()
        .matching(&selectors(&["unix:gid:100", "unix:user:alice"]));
    assert_eq!(
        alice[0].spiffe_id.to_string(),
        "spiffe://example.org/user/alice"
    );
    let nameless = reg.snapshot().matching(&selectors(&["unix:gid:100"]));
    assert!(
        nameless.is_empty(),
        "a template without its value does not match"
    );
}

#[test]
fn duplicate_config_entries_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = Registry::open(
        vec![
            entry("spiffe://example.org/a", &["unix:uid:1"], None),
            entry("spiffe://example.org/b", &["unix:uid:1"], None),
            entry("spiffe://example.org/a", &["unix:uid:1"], None),
        ],
        store,
        audit(&dir),
        td(),
        BTreeSet::new(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("entries 1 and 3 are duplicates"),
        "{err}"
    );
}

#[tokio::test]
async fn api_entries_persist_and_config_entries_are_protected() {
    let dir = tempfile::tempdir().unwrap();
    let config = vec![entry("spiffe://example.org/cfg", &["unix:uid:1"], None)];
    let reg = registry(&dir, config.clone());
    let mut rx = reg.subscribe();
    rx.mark_unchanged();

    let created = reg
        .create(&spec(
            "spiffe://example.org/api",
            &["unix:uid:2"],
            Some("h"),
        ))
        .await
        .unwrap();
    assert!(rx.has_changed().unwrap(), "subscribers wake");
    assert_eq!(created.source, EntrySource::Api);
    assert!(created.id.as_str().starts_with("ent-"));

    let dup = reg
        .create(&spec("spiffe://example.org/api", &["unix:uid:2"], None))
        .await
        .unwrap_err();
    assert!(matches!(dup, RegistrationError::Duplicate { .. }), "{dup}");
    let dup_of_config = reg
        .create(&spec("spiffe://example.org/cfg", &["unix:uid:1"], None))
        .await
        .unwrap_err();
    assert!(matches!(dup_of_config, RegistrationError::Duplicate { .. }));

    let cfg_id = reg.snapshot().iter().next().unwrap().id.clone();
    let err = reg.delete(&cfg_id).await.unwrap_err();
    assert!(matches!(err, RegistrationError::FromConfig(_)), "{err}");

    let updated = reg
        .update(
            &created.id,
            &spec("spiffe://example.org/api2", &["unix:uid:2"], None),
            Some(1),
        )
        .await
        .unwrap();
    assert_eq!(updated.revision, 2);
    let stale = reg
        .update(
            &created.id,
            &spec("spiffe://example.org/api3", &["unix:uid:2"], None),
            Some(1),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(stale, RegistrationError::Conflict { found: 2, .. }),
        "{stale}"
    );

    // A restart: the stored entry is back, after the config entries.
    drop(reg);
    let reopened = registry(&dir, config);
    let ids: Vec<String> = reopened
        .snapshot()
        .iter()
        .map(|e| e.spiffe_id.to_string())
        .collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/cfg", "spiffe://example.org/api2"]
    );
    let stored = reopened.snapshot().get(&created.id).unwrap().clone();
    assert_eq!(stored.revision, 2);
    assert_eq!(stored.hint, None);

    reopened.delete(&created.id).await.unwrap();
    assert!(matches!(
        reopened.delete(&created.id).await.unwrap_err(),
        RegistrationError::NotFound(_)
    ));
}

#[tokio::test]
async fn reload_replaces_config_entries_and_keeps_api_entries() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(
        &dir,
        vec![entry("spiffe://example.org/old", &["unix:uid:1"], None)],
    );
    reg.create(&spec("spiffe://example.org/api", &["unix:uid:2"], None))
        .await
        .unwrap();
    reg.replace_config(
        vec![entry("spiffe://example.org/new", &["unix:uid:1"], None)],
        BTreeSet::new(),
    )
    .await
    .unwrap();
    let ids: Vec<String> = reg
        .snapshot()
        .iter()
        .map(|e| e.spiffe_id.to_string())
        .collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/new", "spiffe://example.org/api"]
    );
}
