//! Another user on the same machine, out to take the agent's place: a
//! socket directory made first (the non-root defaults under `/tmp`), a data
//! dir under a directory they may write, keys and a store planted among the
//! agent's. Each is refused with the path, its owner and its mode, and
//! nothing is touched. These need root (files of other uids, processes as
//! other uids): ignored by a plain `cargo nextest run`, run by
//! `scripts/test`.

use crate::common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The attacker: a uid that is neither root nor the agent's.
const ATTACKER: u32 = 4_242_424;

/// A uid for a non-root agent of this test run only, so its `/tmp`
/// defaults (`/tmp/tether-<uid>`) are its own; what it leaves there is
/// removed on drop.
struct Victim {
    uid: u32,
    home: tempfile::TempDir,
}

impl Victim {
    fn new(salt: u32) -> Self {
        let uid = 3_000_000 + (std::process::id() % 100_000) * 10 + salt;
        let home = tempfile::tempdir().unwrap();
        chown(home.path(), uid);
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let victim = Self { uid, home };
        victim.clean();
        victim
    }

    fn socket_dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/tether-{}", self.uid))
    }

    fn admin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/tmp/tether-{}-admin", self.uid))
    }

    /// `tether ARGS` as this user, with no runtime dir (as under su, cron
    /// or a service), so every path is the agent's `/tmp` default.
    fn tether(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command
            .args(args)
            .env_clear()
            .env("HOME", self.home.path())
            .env("PATH", "/usr/bin:/bin")
            .uid(self.uid)
            .gid(self.uid)
            .stdin(Stdio::null());
        command
    }

    fn clean(&self) {
        let _ = std::fs::remove_dir_all(self.socket_dir());
        let _ = std::fs::remove_dir_all(self.admin_dir());
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        self.clean();
    }
}

fn chown(path: &Path, uid: u32) {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(uid)),
    )
    .unwrap();
}

/// A directory the attacker made, with `mode`.
fn attackers_dir(path: &Path, mode: u32) {
    std::fs::create_dir(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    chown(path, ATTACKER);
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `tether run` as the victim, which must refuse to start; its stderr.
fn refused_start(victim: &Victim) -> String {
    let out = victim.tether(&["run"]).output().expect("tether runs");
    assert!(!out.status.success(), "the agent started: {}", stderr(&out));
    stderr(&out)
}

#[tokio::test]
#[ignore = "needs root (other uids): scripts/test runs it"]
async fn a_socket_directory_another_user_made_first_stops_the_agent_and_its_cli() {
    common::require_root("running the agent as another uid");
    let victim = Victim::new(1);
    // The attack: the victim's default socket directory, made first by
    // someone else, open to all.
    attackers_dir(&victim.socket_dir(), 0o777);
    let said = refused_start(&victim);
    for part in [
        victim.socket_dir().display().to_string(),
        format!("owned by uid {ATTACKER}"),
        "mode 0777".to_owned(),
    ] {
        assert!(said.contains(&part), "{part:?} not in: {said}");
    }
    // Nothing was moved or changed in it.
    let meta = std::fs::symlink_metadata(victim.socket_dir()).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (ATTACKER, 0o777));
    assert_eq!(std::fs::read_dir(victim.socket_dir()).unwrap().count(), 0);

    // The victim's CLI will not talk to whatever listens there.
    let out = victim.tether(&["api", "fetch", "x509"]).output().unwrap();
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("owned by uid {ATTACKER}")),
        "{}",
        stderr(&out)
    );

    // Closed but theirs is no better: the admin socket's directory.
    std::fs::remove_dir(victim.socket_dir()).unwrap();
    attackers_dir(&victim.admin_dir(), 0o700);
    let said = refused_start(&victim);
    assert!(
        said.contains(&victim.admin_dir().display().to_string())
            && said.contains(&format!("owned by uid {ATTACKER}")),
        "{said}"
    );
    let out = victim.tether(&["entry", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(77), "{}", stderr(&out));
}

#[tokio::test]
#[ignore = "needs root (other uids): scripts/test runs it"]
async fn a_non_root_agent_makes_its_own_socket_directories_and_serves() {
    common::require_root("running the agent as another uid");
    let victim = Victim::new(2);
    let mut agent = Running(
        victim
            .tether(&["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let socket = victim.socket_dir().join("agent.sock");
    common::eventually("the agent's socket", async || socket.exists()).await;
    for (dir, mode) in [(victim.socket_dir(), 0o755), (victim.admin_dir(), 0o700)] {
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (victim.uid, mode));
    }
    // Its CLI trusts those and gets the embedded default identity.
    let out = common::eventually("the victim's CLI to fetch its SVID", async || {
        let out = victim
            .tether(&["api", "fetch", "x509", "--timeout", "5s"])
            .output()
            .unwrap();
        if out.status.success() {
            Ok(out)
        } else {
            Err(stderr(&out))
        }
    })
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("spiffe://tether.local/uid/{}", victim.uid)),
        "{stdout}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || agent.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

/// An agent process, killed if the test fails before stopping it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
#[ignore = "needs root (other uids): scripts/test runs it"]
async fn a_data_dir_under_a_directory_others_may_write_is_refused() {
    common::require_root("files of another uid");
    let tmp = tempfile::tempdir().unwrap();
    // `/tmp/tether/data` when someone else made `/tmp/tether` first.
    let shared = tmp.path().join("tether");
    attackers_dir(&shared, 0o777);
    let error = refused(tmp.path(), &shared.join("data")).await;
    assert!(
        error.contains(&shared.display().to_string()) && error.contains(&format!("{ATTACKER}")),
        "{error}"
    );
    assert!(!shared.join("data").exists(), "nothing is created there");

    // Theirs, however closed, under a sticky /tmp-like parent.
    let sticky = tmp.path().join("sticky");
    std::fs::create_dir(&sticky).unwrap();
    std::fs::set_permissions(&sticky, std::fs::Permissions::from_mode(0o1777)).unwrap();
    attackers_dir(&sticky.join("data"), 0o700);
    let error = refused(tmp.path(), &sticky.join("data")).await;
    assert!(
        error.contains(&format!("owned by uid {ATTACKER}")),
        "{error}"
    );
}

#[tokio::test]
#[ignore = "needs root (other uids): scripts/test runs it"]
async fn keys_a_store_and_an_audit_trail_someone_else_planted_are_refused() {
    common::require_root("files of another uid");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    start_at(tmp.path(), &data)
        .await
        .unwrap()
        .stop()
        .await
        .unwrap();
    let key = std::fs::read_dir(data.join("authority/keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_file())
        .expect("a key file");
    // The red-team rerun found the lock files, HEAD and the audit files
    // were not checked: someone else's lock file kept the agent from
    // starting, someone else's HEAD or segment could be rewritten or read.
    for planted in [
        key,
        data.join("tether.db"),
        data.join("audit"),
        data.join("audit.key"),
        data.join("audit.pub"),
        data.join("tether.lock"),
        data.join("audit/audit.lock"),
        data.join("audit/HEAD"),
    ] {
        let before = std::fs::symlink_metadata(&planted).unwrap();
        chown(&planted, ATTACKER);
        let error = refused(tmp.path(), &data).await;
        assert!(
            error.contains(&planted.display().to_string())
                && error.contains(&format!("owned by uid {ATTACKER}")),
            "{error}"
        );
        let after = std::fs::symlink_metadata(&planted).unwrap();
        assert_eq!(
            (after.mtime(), after.mode(), after.len()),
            (before.mtime(), before.mode(), before.len()),
            "left as found"
        );
        chown(&planted, 0);
    }

    // A second name for a file the agent trusts, made while it could be
    // reached (a hard link elsewhere): refused, so it cannot leak or change
    // what the agent writes there.
    let elsewhere = tmp.path().join("leak");
    std::fs::hard_link(data.join("audit.key"), &elsewhere).unwrap();
    let error = refused(tmp.path(), &data).await;
    assert!(error.contains("has 2 hard links"), "{error}");
    std::fs::remove_file(&elsewhere).unwrap();
    start_at(tmp.path(), &data)
        .await
        .unwrap()
        .stop()
        .await
        .unwrap();
}

/// An agent with its sockets in `dir` and its state in `data_dir`.
async fn start_at(dir: &Path, data_dir: &Path) -> anyhow::Result<tether::daemon::Running> {
    let text = format!(
        "trust_domain = \"example.org\"\nsocket_path = \"{}\"\nadmin_socket_path = \"{}\"\n\
         data_dir = \"{}\"\nlog.level = \"warn\"\n",
        dir.join("agent.sock").display(),
        dir.join("admin/admin.sock").display(),
        data_dir.display(),
    );
    let config = tether::config::Config::from_toml(&text, &tether::config::MapEnv::default())?;
    tether::daemon::start(config).await
}

/// Starts an agent that must refuse to start; its error, with causes.
async fn refused(dir: &Path, data_dir: &Path) -> String {
    match start_at(dir, data_dir).await {
        Ok(running) => {
            running.stop().await.unwrap();
            panic!("the agent started");
        }
        Err(error) => format!("{error:#}"),
    }
}

// The agent runs in this process: the blocking CLI calls need a second
// worker thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (a private mount namespace): scripts/test runs it"]
async fn a_path_forged_in_a_private_mount_namespace_gets_no_unix_path() {
    common::require_root("unshare -m");
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    std::fs::create_dir(&target).unwrap();
    let bin = target.join("bin");
    let agent = common::TestAgent::start(&format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/target\"\nselectors = [\"unix:path:{}\"]\n",
        bin.display()
    ))
    .await;
    let fetch = |command: &mut Command| {
        command
            .args(["api", "fetch", "x509", "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap()
    };
    // The real file at that path, in the agent's own namespace.
    std::fs::copy(env!("CARGO_BIN_EXE_tether"), &bin).unwrap();
    // The attack: the caller's own mount namespace, where the entry's path
    // is a file of its choosing (here, another copy of tether, which asks).
    let forged = fetch(Command::new("unshare").args(["-m", "--propagation", "private"]).args([
        "sh",
        "-c",
        r#"mount -t tmpfs none "$1" && cp "$2" "$1/bin" && t=$1 && shift 2 && exec "$t/bin" "$@""#,
        "forge",
    ]).arg(&target).arg(env!("CARGO_BIN_EXE_tether")));
    assert_eq!(forged.status.code(), Some(77), "{}", stderr(&forged));
    assert!(
        !String::from_utf8_lossy(&forged.stdout).contains("spiffe://example.org/target"),
        "forged path got the identity"
    );
    // The file at that path in the agent's own namespace gets it.
    let real = fetch(&mut Command::new(&bin));
    assert!(real.status.success(), "{}", stderr(&real));
    assert!(
        String::from_utf8_lossy(&real.stdout).contains("spiffe://example.org/target"),
        "{}",
        String::from_utf8_lossy(&real.stdout)
    );
    agent.stop().await;
}

/// The audit records of processes of `uid`, as written so far.
fn records_of(agent: &common::TestAgent, uid: u32) -> Vec<tether::audit::AuditRecord> {
    tether::audit::read(
        &agent.dir.path().join("data/audit"),
        &tether::audit::ReadFilter::default(),
    )
    .unwrap()
    .into_iter()
    .filter(|r| r.event.uid == Some(uid))
    .collect()
}

// The agent runs in this process: the blocking CLI calls need a second
// worker thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (a client as another uid): scripts/test runs it"]
async fn callers_with_no_identity_cannot_validate_or_write_to_the_trail() {
    common::require_root("running a client as another uid");
    const NOBODY: u32 = 65534;
    for allowed in [false, true] {
        let agent = common::TestAgent::start(&format!(
            "allow_unauthenticated_verifiers = {allowed}\n{}",
            common::entry_for_me("svc", "main")
        ))
        .await;
        std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let token = agent
            .spiffe_client()
            .await
            .fetch_jwt_svid(&["api"], None)
            .await
            .unwrap()
            .token()
            .to_owned();
        let as_nobody = |args: &[&str]| {
            Command::new(env!("CARGO_BIN_EXE_tether"))
                .args(args)
                .arg("--socket")
                .arg(&agent.socket)
                .env_clear()
                .uid(NOBODY)
                .gid(NOBODY)
                .output()
                .unwrap()
        };
        // A long audience, as the finding's flood used (within the
        // Workload API's own limit, 1 KiB).
        let audience = "a".repeat(1000);
        let jwt = as_nobody(&[
            "api",
            "validate",
            "jwt",
            "--audience",
            &audience,
            "--token",
            &token,
        ]);
        let task = as_nobody(&[
            "token",
            "validate",
            "--audience",
            &audience,
            "--token",
            &token,
        ]);
        // What this test process validates is recorded: once its record is
        // in the trail, nobody's would be too.
        agent
            .spiffe_client()
            .await
            .validate_jwt_token("api", &token)
            .await
            .unwrap();
        let me = common::uid();
        common::eventually("the registered caller's record", async || {
            records_of(&agent, me)
                .iter()
                .any(|r| r.event.event == tether::audit::EventKind::Validate)
        })
        .await;
        let theirs = records_of(&agent, NOBODY);
        if allowed {
            // Answered (invalid: the audience is not the token's),
            // recorded, and bounded.
            for out in [&jwt, &task] {
                assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
            }
            assert_eq!(theirs.len(), 2, "{theirs:?}");
            for record in &theirs {
                let kept = record.event.audience.as_deref().unwrap();
                assert!(kept.len() < 400 && kept.contains("sha256"), "{kept}");
            }
        } else {
            for out in [&jwt, &task] {
                assert_eq!(out.status.code(), Some(77), "{}", stderr(out));
                assert!(
                    stderr(out).contains("allow_unauthenticated_verifiers is off"),
                    "{}",
                    stderr(out)
                );
            }
            assert!(theirs.is_empty(), "{theirs:?}");
        }
        agent.stop().await;
    }
}
