use std::collections::BTreeSet;
use std::time::Duration;

use spiffe::TrustDomain;

use super::*;
use crate::registration::EntrySpec;

const LIFE: Duration = Duration::from_secs(300);
const KID: &str = "kid-1";

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

fn entry_with(name: &str, hint: Option<&str>) -> Arc<RegistrationEntry> {
    let td = TrustDomain::new("example.org").expect("trust domain");
    Arc::new(
        RegistrationEntry::from_config(
            &EntrySpec {
                spiffe_id: format!("spiffe://example.org/{name}"),
                selectors: vec!["unix:uid:1".into()],
                hint: hint.map(str::to_owned),
                ..EntrySpec::default()
            },
            &td,
            &BTreeSet::new(),
        )
        .expect("entry"),
    )
}

fn entry(name: &str) -> Arc<RegistrationEntry> {
    entry_with(name, None)
}

fn id_of(entry: &RegistrationEntry) -> SpiffeId {
    SpiffeId::new(entry.spiffe_id.as_str()).expect("a fixed ID")
}

fn auds(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| (*a).to_owned()).collect()
}

/// A token for `entry`, signed at `issued_at`, living [`LIFE`]; its `jti`
/// tells tokens apart.
fn token(entry: &RegistrationEntry, jti: &str, issued_at: SystemTime) -> JwtSvid {
    JwtSvid {
        spiffe_id: id_of(entry),
        token: format!("header.{jti}.signature"),
        hint: entry.hint.clone(),
        expiry: issued_at + LIFE,
        jti: jti.to_owned(),
        kid: KID.to_owned(),
    }
}

fn trusted(kid: &str) -> bool {
    kid == KID
}

/// The `jti` of the token cached for `entry` and `audiences` at `now`.
fn cached(
    cache: &JwtSvidCache,
    entry: &RegistrationEntry,
    audiences: &[&str],
    now: SystemTime,
) -> Option<String> {
    cache
        .get(entry, &id_of(entry), &auds(audiences), now, trusted)
        .map(|svid| svid.jti)
}

#[test]
fn a_token_is_served_again_for_the_same_identity_and_audience_set() {
    let cache = JwtSvidCache::default();
    let web = entry("web");
    assert_eq!(cached(&cache, &web, &["a"], at(0)), None, "empty: a miss");
    cache.put(&web, &auds(&["b", "a"]), token(&web, "t1", at(0)), at(0));

    // The audiences are a set: any order, duplicates or not.
    for audiences in [&["a", "b"][..], &["b", "a"], &["a", "b", "a"]] {
        assert_eq!(
            cached(&cache, &web, audiences, at(10)).as_deref(),
            Some("t1"),
            "{audiences:?}"
        );
    }
    // Another audience set, another identity: misses.
    assert_eq!(cached(&cache, &web, &["a"], at(10)), None);
    assert_eq!(cached(&cache, &web, &["a", "b", "c"], at(10)), None);
    let api = entry("api");
    assert_eq!(cached(&cache, &api, &["a", "b"], at(10)), None);
    // The same entry resolved to another ID (a template) is another
    // identity.
    let other_id = SpiffeId::new("spiffe://example.org/web/other").expect("id");
    assert!(
        cache
            .get(&web, &other_id, &auds(&["a", "b"]), at(10), trusted)
            .is_none()
    );
    assert_eq!(cache.len(), 1, "misses cache nothing");
}

#[test]
fn a_token_is_not_served_once_half_its_life_is_over() {
    let cache = JwtSvidCache::default();
    let web = entry("web");
    cache.put(&web, &auds(&["a"]), token(&web, "t1", at(0)), at(0));
    let half = LIFE.as_secs() / 2;
    assert_eq!(
        cached(&cache, &web, &["a"], at(half - 1)).as_deref(),
        Some("t1")
    );
    assert_eq!(
        cached(&cache, &web, &["a"], at(half)),
        None,
        "half life: a miss"
    );
    assert!(cache.is_empty(), "and the token is dropped");

    // A clock stepped back before the token's `iat`: validators would see
    // it issued in the future.
    cache.put(&web, &auds(&["a"]), token(&web, "t2", at(100)), at(100));
    assert_eq!(cached(&cache, &web, &["a"], at(99)), None);
    assert!(cache.is_empty());

    // A token with no life left before half of it (the authority capped
    // `exp` at its key's expiry) is not cached at all.
    let mut capped = token(&web, "t3", at(0));
    capped.expiry = at(0);
    cache.put(&web, &auds(&["a"]), capped, at(0));
    assert!(cache.is_empty());
}

#[test]
fn a_token_whose_key_left_the_bundle_is_not_served() {
    let cache = JwtSvidCache::default();
    let web = entry("web");
    cache.put(&web, &auds(&["a"]), token(&web, "t1", at(0)), at(0));
    let served = cache.get(&web, &id_of(&web), &auds(&["a"]), at(1), |_| false);
    assert!(served.is_none());
    assert!(cache.is_empty());
}

#[test]
fn the_cache_is_bounded_per_identity_and_in_all_by_least_recent_use() {
    let cache = JwtSvidCache::with_bounds(4, 2);
    let web = entry("web");
    // One identity, ever new audiences (caller input): it keeps two.
    cache.put(&web, &auds(&["a"]), token(&web, "a", at(0)), at(0));
    cache.put(&web, &auds(&["b"]), token(&web, "b", at(0)), at(0));
    // `a` used since `b` was cached: `b` is the least recently used.
    assert!(cached(&cache, &web, &["a"], at(1)).is_some());
    cache.put(&web, &auds(&["c"]), token(&web, "c", at(0)), at(0));
    assert_eq!(cache.len(), 2);
    assert!(cached(&cache, &web, &["b"], at(1)).is_none(), "evicted");
    assert!(cached(&cache, &web, &["a"], at(1)).is_some());
    assert!(cached(&cache, &web, &["c"], at(1)).is_some());

    // Replacing a key's token does not count twice.
    cache.put(&web, &auds(&["c"]), token(&web, "c2", at(0)), at(0));
    assert_eq!(cache.len(), 2);
    assert_eq!(cached(&cache, &web, &["c"], at(1)).as_deref(), Some("c2"));

    // In all: four tokens; the fifth evicts the least recently used of
    // any identity (`web`'s `a`, last used before `c` was replaced).
    let others: Vec<_> = ["x", "y", "z"].iter().map(|n| entry(n)).collect();
    for other in &others {
        cache.put(other, &auds(&["a"]), token(other, "o", at(0)), at(0));
    }
    assert_eq!(cache.len(), 4);
    assert!(cached(&cache, &web, &["a"], at(1)).is_none(), "evicted");
    assert!(cached(&cache, &web, &["c"], at(1)).is_some());
    for other in &others {
        assert!(cached(&cache, other, &["a"], at(1)).is_some());
    }

    // Many distinct audience sets stay within the bounds.
    for i in 0..100 {
        let audience = format!("aud-{i}");
        cache.put(&web, &auds(&[&audience]), token(&web, "n", at(0)), at(0));
        assert!(cache.len() <= 4);
    }
}

#[test]
fn an_entry_removed_or_changed_drops_its_tokens() {
    let cache = JwtSvidCache::default();
    let (web, api) = (entry("web"), entry("api"));
    cache.put(&web, &auds(&["a"]), token(&web, "w1", at(0)), at(0));
    cache.put(&web, &auds(&["b"]), token(&web, "w2", at(0)), at(0));
    cache.put(&api, &auds(&["a"]), token(&api, "a1", at(0)), at(0));

    // `web` is gone, `api` is unchanged.
    let dropped = cache.retain_with(|id| (*id == api.id).then_some(&*api));
    assert_eq!(dropped, 2);
    assert!(cached(&cache, &web, &["a"], at(1)).is_none());
    assert_eq!(cached(&cache, &api, &["a"], at(1)).as_deref(), Some("a1"));

    // `api` changed its hint, which its tokens carry: dropped too.
    let changed = entry_with("api", Some("new hint"));
    assert_eq!(changed.id, api.id, "the same entry, changed");
    assert_eq!(
        cache.retain_with(|id| (*id == api.id).then_some(&*changed)),
        1
    );
    assert!(cache.is_empty());

    // Served through a changed entry before the registry change reached
    // the cache: a miss, not the old entry's token.
    cache.put(&api, &auds(&["a"]), token(&api, "a2", at(0)), at(0));
    assert_eq!(cached(&cache, &changed, &["a"], at(1)), None);
    assert!(cache.is_empty());
}
