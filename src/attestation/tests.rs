//! Unit tests of the attestor: selectors, the liveness and exec checks
//! and the memo, on real processes.

use std::time::Duration;

use aws_lc_rs::digest;
use tokio::net::UnixStream;

use super::caller::PidfdSource;
use super::*;
use crate::registration::selector::Selector;

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

fn values(attested: &Attested, key: &str) -> Vec<String> {
    attested
        .selectors
        .iter()
        .filter(|s| s.key() == key)
        .map(|s| s.value()[key.len() + 1..].to_owned())
        .collect()
}

fn expected_sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    digest::digest(&digest::SHA256, &bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn attests_this_process() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let caller = Caller::from_stream(&ours).unwrap();
    assert_eq!(caller.pidfd_source(), PidfdSource::PeerPidfd);
    let attestor = Attestor::new(&AttestorConfig::default()).unwrap();
    let attested = attestor.attest(&caller).await.unwrap();

    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    assert_eq!(attested.pid, i32::try_from(std::process::id()).unwrap());
    assert_eq!((attested.uid, attested.gid), (uid, gid));
    let s = &attested.selectors;
    assert!(s.contains(&sel(&format!("unix:uid:{uid}"))));
    assert!(s.contains(&sel(&format!("unix:gid:{gid}"))));
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .unwrap()
        .unwrap();
    assert!(s.contains(&sel(&format!("unix:user:{}", user.name))));
    let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .unwrap()
        .unwrap();
    assert!(s.contains(&sel(&format!("unix:group:{}", group.name))));

    let mut want_groups: Vec<String> = nix::unistd::getgroups()
        .unwrap()
        .iter()
        .map(|g| g.as_raw().to_string())
        .collect();
    want_groups.sort();
    want_groups.dedup();
    let mut got_groups = values(&attested, "supplementary_gid");
    got_groups.sort();
    assert_eq!(got_groups, want_groups);

    let exe = std::env::current_exe().unwrap().canonicalize().unwrap();
    assert_eq!(attested.executable.as_deref(), Some(exe.as_path()));
    assert!(s.contains(&sel(&format!("unix:path:{}", exe.display()))));
    assert_eq!(values(&attested, "sha256"), [expected_sha256(&exe)]);

    // Every selector is one an entry could be written with.
    for selector in s {
        assert_eq!(sel(&selector.to_string()), *selector);
    }
}

#[tokio::test]
async fn hash_cache_hits_on_the_same_binary() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let caller = Caller::from_stream(&ours).unwrap();
    let attestor = Attestor::new(&AttestorConfig::default()).unwrap();
    let first = attestor.attest(&caller).await.unwrap();
    assert_eq!(
        (attestor.unix.cache_len(), attestor.unix.cache_hits()),
        (1, 0)
    );
    // A clone shares the cache; a new connection attests in full.
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let caller = Caller::from_stream(&ours).unwrap();
    let second = attestor.clone().attest(&caller).await.unwrap();
    assert_eq!(
        (attestor.unix.cache_len(), attestor.unix.cache_hits()),
        (1, 1)
    );
    assert_eq!(first.selectors, second.selectors);
}

#[tokio::test]
async fn a_connection_reuses_its_attestation_while_the_process_is_unchanged() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let caller = Caller::from_stream(&ours).unwrap();
    let attestor = Attestor::new(&AttestorConfig::default()).unwrap();
    let first = attestor.attest(&caller).await.unwrap();
    let memo = caller.memo().unwrap();
    let again = attestor.attest(&caller.clone()).await.unwrap();
    assert_eq!(first.selectors, again.selectors);
    // Reused, not redone: the same memo, and the hash cache never asked.
    assert!(Arc::ptr_eq(&memo, &caller.memo().unwrap()));
    assert_eq!(attestor.unix.cache_hits(), 0);
}

#[tokio::test]
async fn a_caller_that_execs_after_connecting_is_refused() {
    // With and without an attestation remembered from before the exec.
    for attest_first in [true, false] {
        let exec_sleep = "print('ready', flush=True); sys.stdin.readline(); \
                          os.execv('/bin/sleep', ['sleep', '60'])";
        let (mut peer, stream) = test_peer::connect(exec_sleep, true).await;
        let caller = Caller::from_stream(&stream).unwrap();
        let attestor = Attestor::new(&AttestorConfig::default()).unwrap();
        if attest_first {
            let attested = attestor.attest(&caller).await.unwrap();
            assert!(values(&attested, "path")[0].contains("python"));
        }
        peer.say("exec now");
        let exe = PathBuf::from(format!("/proc/{}/exe", peer.pid()));
        crate::testing::eventually("the peer to exec sleep", || {
            std::fs::read_link(&exe).is_ok_and(|p| p.ends_with("sleep"))
        })
        .await;
        let err = attestor.attest(&caller).await.unwrap_err();
        assert!(
            matches!(err, AttestationError::ExecutableChanged { pid } if pid == peer.pid()),
            "attest_first {attest_first}: {err:?}"
        );
        assert!(err.is_caller_fault());
        peer.child.kill().unwrap();
        peer.child.wait().unwrap();
    }
}

#[tokio::test]
async fn attests_through_the_pidfd_open_fallback() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let caller = Caller::from_stream_with(&ours, PidfdSource::PidfdOpen).unwrap();
    assert_eq!(caller.pidfd_source(), PidfdSource::PidfdOpen);
    let attested = Attestor::new(&AttestorConfig::default())
        .unwrap()
        .attest(&caller)
        .await
        .unwrap();
    let uid = nix::unistd::geteuid().as_raw();
    assert!(
        attested
            .selectors
            .contains(&sel(&format!("unix:uid:{uid}")))
    );
    assert_eq!(values(&attested, "sha256").len(), 1);
}

#[tokio::test]
async fn caller_that_exited_is_refused() {
    for source in [PidfdSource::PeerPidfd, PidfdSource::PidfdOpen] {
        let (mut peer, stream) = test_peer::connect("", true).await;
        let caller = Caller::from_stream_with(&stream, source).unwrap();
        assert_eq!(caller.pid(), peer.pid());
        assert_eq!(caller.pidfd_source(), source);
        let attestor = Attestor::new(&AttestorConfig::default()).unwrap();
        // Alive: attested as the Python interpreter it runs.
        let attested = attestor.attest(&caller).await.unwrap();
        assert!(
            values(&attested, "path")[0].contains("python"),
            "{attested:?}"
        );

        peer.finish();
        let err = attestor.attest(&caller).await.unwrap_err();
        assert!(
            matches!(err, AttestationError::CallerExited { pid } if pid == peer.pid()),
            "{source:?}: {err:?}"
        );
        assert!(err.is_caller_fault());
        assert!(matches!(
            caller.ensure_alive(),
            Err(AttestationError::CallerExited { .. })
        ));
        tokio::time::timeout(Duration::from_secs(60), caller.exited())
            .await
            .unwrap();
    }
}

#[tokio::test]
#[ignore = "needs root (changes a child's credentials): scripts/test runs it"]
async fn changed_credentials_are_refused() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "prerequisite missing: changing a child's credentials needs root"
    );
    let (_peer, stream) = test_peer::connect("os.setegid(65534); os.seteuid(65534)", true).await;
    let caller = Caller::from_stream(&stream).unwrap();
    assert_eq!(caller.uid(), 0);
    let err = Attestor::new(&AttestorConfig::default())
        .unwrap()
        .attest(&caller)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AttestationError::CredentialsChanged {
                peer_uid: 0,
                proc_uid: 65534,
                proc_gid: 65534,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_caller_fault());
}

#[tokio::test]
async fn size_limit_omits_only_the_hash() {
    let config = AttestorConfig {
        unix: UnixAttestorConfig {
            workload_size_limit: 1,
            ..UnixAttestorConfig::default()
        },
        ..AttestorConfig::default()
    };
    let attestor = Attestor::new(&config).unwrap();
    for _ in 0..2 {
        // A new connection each time: attested in full, not remembered.
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let caller = Caller::from_stream(&ours).unwrap();
        let attested = attestor.attest(&caller).await.unwrap();
        assert!(values(&attested, "sha256").is_empty());
        assert_eq!(values(&attested, "path").len(), 1);
    }
    // The "too large" verdict is cached too, so it is logged once.
    assert_eq!(attestor.unix.cache_hits(), 1);
}

#[tokio::test]
async fn path_discovery_can_be_turned_off() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let caller = Caller::from_stream(&ours).unwrap();
    let config = AttestorConfig {
        unix: UnixAttestorConfig {
            discover_workload_path: false,
            ..UnixAttestorConfig::default()
        },
        ..AttestorConfig::default()
    };
    let attested = Attestor::new(&config)
        .unwrap()
        .attest(&caller)
        .await
        .unwrap();
    assert!(attested.executable.is_none());
    assert!(values(&attested, "path").is_empty());
    assert!(values(&attested, "sha256").is_empty());
    assert_eq!(values(&attested, "uid").len(), 1);
}

#[tokio::test]
async fn unreadable_proc_is_an_agent_fault() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let caller = Caller::from_stream(&ours).unwrap();
    let attestor = Attestor::with_proc_root(
        &AttestorConfig::default(),
        PathBuf::from("/nonexistent-proc"),
    )
    .unwrap();
    let err = attestor.attest(&caller).await.unwrap_err();
    assert!(matches!(err, AttestationError::ReadProc { .. }), "{err:?}");
    assert!(!err.is_caller_fault());
}

#[test]
fn config_defaults_and_unknown_fields() {
    let config: AttestorConfig = toml::from_str("").unwrap();
    assert!(config.unix.discover_workload_path);
    assert_eq!(config.unix.workload_size_limit, 256 * 1024 * 1024);

    let config: AttestorConfig =
        toml::from_str("[unix]\ndiscover_workload_path = false\n").unwrap();
    assert!(!config.unix.discover_workload_path);
    assert_eq!(config.unix.workload_size_limit, 256 * 1024 * 1024);

    assert!(toml::from_str::<AttestorConfig>("[unix]\nworkload_size_limt = 1\n").is_err());
    assert!(toml::from_str::<AttestorConfig>("[k8]\n").is_err());
    assert!(toml::from_str::<AttestorConfig>("[unix]\nworkload_size_limit = -1\n").is_err());
}
