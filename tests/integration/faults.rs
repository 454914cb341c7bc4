//! Faults the agent brings on itself or meets on the node, injected for
//! real: kill -9 under load, a corrupted store or key file, a data dir
//! that fills up (a small tmpfs) or that the kernel turns read-only (ext4
//! on a loop file), both mounted here, and the wall clock stepping forward
//! and back (libfaketime under the agent). The disk tests need root and
//! the clock test libfaketime: they are ignored by a plain `cargo nextest
//! run` and run by `scripts/test`, where a missing prerequisite fails
//! them with the reason. A kubelet that is down or silent is in
//! `k8s_attestor`.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{PATIENCE, admin_client, claims_of, spec, task_client, uid};
use tether::proto::admin as admin_pb;
use tether::proto::task as task_pb;

const AUDIENCE: &str = "spiffe://example.org/mcp/jira";

fn tether() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tether"))
}

/// An agent's files: its config, sockets and data dir under `dir`.
struct Layout {
    config: PathBuf,
    socket: PathBuf,
    admin: PathBuf,
    data: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Self {
        let layout = Self {
            config: dir.join("agent.toml"),
            socket: dir.join("agent.sock"),
            admin: dir.join("admin/admin.sock"),
            data: dir.join("data"),
        };
        let me = uid();
        let text = format!(
            "trust_domain = \"example.org\"\nsocket_path = \"{}\"\nadmin_socket_path = \"{}\"\n\
             data_dir = \"{}\"\nlog.level = \"warn\"\n\
             [[entries]]\nspiffe_id = \"spiffe://example.org/agent\"\nselectors = [\"unix:uid:{me}\"]\n\
             [[entries]]\nspiffe_id = \"spiffe://example.org/mcp/jira\"\nselectors = [\"unix:uid:{me}\"]\n",
            layout.socket.display(),
            layout.admin.display(),
            layout.data.display(),
        );
        std::fs::write(&layout.config, text).unwrap();
        layout
    }

    fn start(&self) -> Child {
        self.start_with(&[])
    }

    fn start_with(&self, env: &[(&str, &Path)]) -> Child {
        tether()
            .args(["run", "--config"])
            .arg(&self.config)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tether starts")
    }

    /// Waits until the agent serves its Workload API.
    async fn serving(&self) {
        common::eventually("the agent to serve", async || {
            let endpoint = format!("unix://{}", self.socket.display());
            let client = spiffe::WorkloadApiClient::connect_to(endpoint).await?;
            client.fetch_x509_svid().await.map(drop)
        })
        .await;
    }

    /// `tether run` to its end: it must refuse to start.
    fn refused(&self) -> Output {
        let mut child = self.start();
        // An agent that starts anyway is stopped before the test fails.
        let exited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            common::eventually_blocking("the agent to refuse the damaged data dir", || {
                child.try_wait().unwrap()
            })
        }));
        if let Err(panic) = exited {
            let _ = child.kill();
            std::panic::resume_unwind(panic);
        }
        child.wait_with_output().unwrap()
    }
}

/// The `spiffe` crate's client on `socket`.
async fn workload(socket: &Path) -> spiffe::WorkloadApiClient {
    spiffe::WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap()
}

/// A JWT-SVID for audience `validator`.
async fn validator_jwt(client: &spiffe::WorkloadApiClient) -> String {
    client
        .fetch_jwt_svid(&["validator"], None)
        .await
        .unwrap()
        .token()
        .to_owned()
}

/// The agent's answer to ValidateTaskToken for `token` and [`AUDIENCE`].
async fn task_token_answer(socket: &Path, token: &str) -> task_pb::ValidateTaskTokenResponse {
    task_client(socket)
        .await
        .validate_task_token(task_pb::ValidateTaskTokenRequest {
            token: token.into(),
            audience: AUDIENCE.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn begin(intent: &str) -> task_pb::BeginTaskRequest {
    task_pb::BeginTaskRequest {
        audience: AUDIENCE.into(),
        intent: intent.into(),
        tools: vec!["search".into()],
        spiffe_id: "spiffe://example.org/agent".into(),
        ..Default::default()
    }
}

// --- kill -9 under load --------------------------------------------------------

/// What the load saw acknowledged before the agent died.
#[derive(Default)]
struct Acknowledged {
    entries: Vec<String>,
    /// Ended tasks and their (now revoked) tokens.
    ended: Vec<(String, String)>,
    /// The `jti` of every JWT-SVID handed out.
    issued: Vec<String>,
}

#[tokio::test]
async fn kill_9_under_load_loses_nothing_acknowledged_and_streams_resume() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    let mut agent = layout.start();
    layout.serving().await;

    // A long-lived stream, through the spiffe crate's X509Source, which
    // reconnects on its own.
    let source = spiffe::X509Source::builder()
        .endpoint(format!("unix://{}", layout.socket.display()))
        .reconnect_backoff(Duration::from_millis(50), Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let before = source.svid().unwrap().leaf().as_ref().to_vec();

    let seen = Arc::new(Mutex::new(Acknowledged::default()));
    let mut load = Vec::new();
    {
        let (seen, admin) = (Arc::clone(&seen), layout.admin.clone());
        load.push(tokio::spawn(async move {
            let mut admin = admin_client(&admin).await;
            for i in 0.. {
                let selector = format!("unix:uid:{}", 100_000 + i);
                let spec = spec(&format!("spiffe://example.org/load/{i}"), &[&selector]);
                let request = admin_pb::CreateEntryRequest { spec: Some(spec) };
                let Ok(entry) = admin.create_entry(request).await else {
                    return;
                };
                seen.lock().unwrap().entries.push(entry.into_inner().id);
            }
        }));
    }
    {
        let (seen, socket) = (Arc::clone(&seen), layout.socket.clone());
        load.push(tokio::spawn(async move {
            let mut tasks = task_client(&socket).await;
            for i in 0.. {
                let Ok(begun) = tasks.begin_task(begin(&format!("load {i}"))).await else {
                    return;
                };
                let begun = begun.into_inner();
                let end = task_pb::EndTaskRequest {
                    task_id: begun.task_id.clone(),
                };
                if tasks.end_task(end).await.is_err() {
                    return;
                }
                let token = begun.token.unwrap().token;
                seen.lock().unwrap().ended.push((begun.task_id, token));
            }
        }));
    }
    for _ in 0..4 {
        let (seen, socket) = (Arc::clone(&seen), layout.socket.clone());
        load.push(tokio::spawn(async move {
            let Ok(client) =
                spiffe::WorkloadApiClient::connect_to(format!("unix://{}", socket.display())).await
            else {
                return;
            };
            while let Ok(svid) = client.fetch_jwt_svid(&["load"], None).await {
                let jti = claims_of(svid.token())["jti"].as_str().unwrap().to_owned();
                seen.lock().unwrap().issued.push(jti);
            }
        }));
    }
    common::eventually("load acknowledged", async || {
        let seen = seen.lock().unwrap();
        seen.entries.len() >= 30 && seen.ended.len() >= 10 && seen.issued.len() >= 10
    })
    .await;
    agent.kill().unwrap();
    agent.wait().unwrap();
    for job in load {
        tokio::time::timeout(PATIENCE, job).await.unwrap().unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());

    let mut agent = layout.start();
    layout.serving().await;
    // Every acknowledged entry is there.
    let listed = common::entry_ids(&mut admin_client(&layout.admin).await).await;
    for id in &seen.entries {
        assert!(
            listed.contains(id),
            "entry {id} was acknowledged, then lost"
        );
    }
    // Every acknowledged end is a revocation that held: the tokens are
    // refused, and the trail records each end.
    for (task, token) in &seen.ended {
        let answer = task_token_answer(&layout.socket, token).await;
        assert!(!answer.valid, "task {task} ended, yet its token is valid");
        assert_eq!(claims_of(token)["txn"], task.as_str());
    }
    let audit = layout.data.join("audit");
    let out = tether()
        .args(["audit", "tail", "--json", "-n", "1000000", "--dir"])
        .arg(&audit)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    for (task, _) in &seen.ended {
        assert!(
            records
                .iter()
                .any(|r| r["event"] == "task-end" && r["task_id"] == task.as_str()),
            "task {task}'s end was acknowledged, and is not in the trail"
        );
    }
    // Every credential acknowledged (issued to its caller) is in the trail.
    let recorded: std::collections::HashSet<&str> = records
        .iter()
        .filter(|r| r["event"] == "issue-jwt" && r["decision"] == "allow")
        .filter_map(|r| r["token_id"].as_str())
        .collect();
    for jti in &seen.issued {
        assert!(
            recorded.contains(jti.as_str()),
            "JWT-SVID {jti} was handed out, and is not in the trail"
        );
    }
    let out = tether()
        .args(["audit", "verify", "--dir"])
        .arg(&audit)
        .output()
        .unwrap();
    assert!(out.status.success(), "the trail after a crash: {out:?}");

    // The stream resumed by itself on the restarted agent.
    common::eventually("the X509Source to get a new SVID", async || {
        source
            .svid()
            .is_ok_and(|svid| svid.leaf().as_ref() != before.as_slice())
    })
    .await;
    agent.kill().unwrap();
    agent.wait().unwrap();
}

// --- damaged files ---------------------------------------------------------------

/// Stops an agent as an operator would (SIGTERM), once it handles it.
async fn stop(mut agent: Child) {
    use nix::sys::signal::{Signal, kill};
    common::until_handling(agent.id(), Signal::SIGTERM).await;
    kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::task::spawn_blocking(move || agent.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// Runs an agent once (it creates its data dir), then stops it.
async fn initialised(dir: &Path) -> Layout {
    let layout = Layout::new(dir);
    let agent = layout.start();
    layout.serving().await;
    stop(agent).await;
    layout
}

fn first_file(dir: &Path, suffix: &str) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    files.into_iter().next().unwrap_or_else(|| {
        panic!("no *{suffix} in {}", dir.display());
    })
}

#[tokio::test]
async fn a_corrupted_store_or_key_file_refuses_to_start_and_is_left_as_found() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = initialised(tmp.path()).await;
    let cases = [
        ("store", layout.data.join("tether.db")),
        (
            "key",
            first_file(&layout.data.join("authority/keys"), ".pem"),
        ),
    ];
    for (what, file) in cases {
        let original = std::fs::read(&file).unwrap();
        let garbage: Vec<u8> = (0..original.len().max(64))
            .map(|i| u8::try_from(i * 7 % 251).unwrap())
            .collect();
        std::fs::write(&file, &garbage).unwrap();
        let out = layout.refused();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: {stderr}");
        let name = file.file_name().unwrap().to_string_lossy();
        assert!(
            stderr.contains(name.as_ref()),
            "{what}: the message names the file: {stderr}"
        );
        // Never started empty: the damaged file is kept for the operator.
        assert_eq!(
            std::fs::read(&file).unwrap(),
            garbage,
            "{what}: the file was replaced"
        );
        assert!(!layout.socket.exists(), "{what}: a socket was left serving");
        // Put back, the agent starts again with what it had.
        std::fs::write(&file, &original).unwrap();
        let agent = layout.start();
        layout.serving().await;
        stop(agent).await;
    }
}

// --- a data dir that fills up or turns read-only ---------------------------------

/// A small tmpfs mounted at a path for the test's life (root only).
struct Tmpfs(PathBuf);

/// A small ext4 file system on a loop file, mounted with
/// `errors=remount-ro`, for the test's life (root only): the kernel turns
/// it read-only under the agent's open files when it meets an error,
/// which [`Ext4Loop::fail`] triggers.
struct Ext4Loop(PathBuf);

impl Tmpfs {
    /// Mounts one at `path`, or says why it cannot.
    fn mount(path: &Path, size: &str) -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("mounting a tmpfs needs root".into());
        }
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self(path.to_owned()))
    }

    /// Writes a file until the file system is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let path = self.0.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
        // Whatever space is left below a chunk, too.
        let mut byte = 0;
        while file.write(&chunk[..1]).is_ok_and(|n| n == 1) {
            byte += 1;
            if byte > 64 * 1024 {
                break;
            }
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs `command`, or says why it failed.
fn run(command: &mut Command) -> Result<(), String> {
    let out = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Ext4Loop {
    /// Makes a 32 MiB file system in `image` and mounts it at `path`, or
    /// says why it cannot.
    fn mount(image: &Path, path: &Path) -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("mounting a loop file needs root".into());
        }
        std::fs::create_dir_all(path).unwrap();
        std::fs::File::create(image)
            .and_then(|f| f.set_len(32 * 1024 * 1024))
            .map_err(|e| e.to_string())?;
        run(Command::new("mkfs.ext4").arg("-q").arg(image))?;
        run(Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(image)
            .arg(path))?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        Ok(Self(path.to_owned()))
    }

    /// A file system error, as a failing disk would raise: the kernel
    /// remounts the file system read-only.
    fn fail(&self) {
        let out = Command::new("findmnt")
            .args(["-n", "-o", "SOURCE"])
            .arg(&self.0)
            .output()
            .unwrap();
        let device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let name = Path::new(&device).file_name().unwrap().to_owned();
        let trigger = Path::new("/sys/fs/ext4")
            .join(name)
            .join("trigger_fs_error");
        std::fs::write(&trigger, "1").unwrap();
        assert!(
            std::fs::write(self.0.join("probe"), "x").is_err(),
            "the file system is still writable"
        );
    }
}

impl Drop for Ext4Loop {
    fn drop(&mut self) {
        if run(Command::new("umount").arg(&self.0)).is_err() {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Waits until a FetchJWTSVID and a BeginTask are both refused, and
/// returns the refusals' messages.
async fn issuance_refused(socket: &Path) -> Vec<String> {
    let client = workload(socket).await;
    let mut tasks = task_client(socket).await;
    let issuance = common::eventually("issuance to be refused", async || {
        client.fetch_jwt_svid(&["while-broken"], None).await.err()
    })
    .await;
    let status = common::eventually("BeginTask to be refused", async || {
        tasks.begin_task(begin("while broken")).await.err()
    })
    .await;
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    vec![issuance.to_string(), status.message().to_owned()]
}

/// Waits until issuance works again.
async fn issuance_back(socket: &Path) {
    let client = workload(socket).await;
    let mut tasks = task_client(socket).await;
    common::eventually("issuance to come back", async || {
        client.fetch_jwt_svid(&["again"], None).await.is_ok()
            && tasks.begin_task(begin("again")).await.is_ok()
    })
    .await;
}

/// Validation answers as before: the JWT-SVID and the task token issued
/// while the disk was fine still validate.
async fn validation_works(socket: &Path, jwt: &str, task_token: &str) {
    workload(socket)
        .await
        .validate_jwt_token("validator", jwt)
        .await
        .unwrap();
    let answer = task_token_answer(socket, task_token).await;
    assert!(answer.valid, "{}", answer.reason);
}

/// An agent whose data dir is `tmp/data`, and a JWT-SVID (audience
/// `validator`) and a task token it issued.
async fn agent_with_tokens(tmp: &Path) -> (tether::daemon::Running, PathBuf, String, String) {
    let extra = format!(
        "{}{}",
        common::entry_for_me("agent", "agent"),
        common::entry_for_me("mcp/jira", "mcp")
    );
    let running = common::start_in(tmp, &extra).await.unwrap();
    let socket = running.socket_path().to_owned();
    let client = workload(&socket).await;
    let jwt = validator_jwt(&client).await;
    let task_token = task_client(&socket)
        .await
        .begin_task(begin("before"))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap()
        .token;
    assert!(running.readiness_problems().is_empty());
    (running, socket, jwt, task_token)
}

/// The admin API's Health: not serving, and why.
async fn unhealthy(running: &tether::daemon::Running) -> Vec<String> {
    let health = admin_client(running.admin_socket_path())
        .await
        .health(admin_pb::HealthRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!health.serving && !health.problems.is_empty(), "{health:?}");
    health.problems
}

#[tokio::test]
#[ignore = "needs root (mounts a tmpfs): scripts/test runs it"]
async fn a_full_data_dir_fails_issuance_closed_says_why_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::prerequisite(Tmpfs::mount(&tmp.path().join("data"), "16m"));
    let (running, socket, jwt, task_token) = agent_with_tokens(tmp.path()).await;
    let filler = data.fill();
    let refusals = issuance_refused(&socket).await;
    assert!(
        refusals
            .iter()
            .any(|r| r.contains("No space left on device")),
        "{refusals:?}"
    );
    let problems = unhealthy(&running).await;
    assert!(
        problems
            .iter()
            .any(|p| p.contains("No space left on device")),
        "{problems:?}"
    );
    validation_works(&socket, &jwt, &task_token).await;
    // Space again: issuance comes back by itself.
    std::fs::remove_file(filler).unwrap();
    issuance_back(&socket).await;
    common::eventually("readiness back", async || {
        running.readiness_problems().is_empty()
    })
    .await;
    running.stop().await.unwrap();
}

#[tokio::test]
#[ignore = "needs root, mkfs.ext4 and a loop device: scripts/test runs it"]
async fn a_data_dir_turned_read_only_fails_issuance_closed_and_says_why() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::prerequisite(Ext4Loop::mount(
        &tmp.path().join("data.img"),
        &tmp.path().join("data"),
    ));
    let (running, socket, jwt, task_token) = agent_with_tokens(tmp.path()).await;
    data.fail();
    let refusals = issuance_refused(&socket).await;
    assert!(
        refusals.iter().any(|r| r.contains("Read-only file system")),
        "{refusals:?}"
    );
    let problems = unhealthy(&running).await;
    assert!(
        problems.iter().any(|p| p.contains("Read-only file system")),
        "{problems:?}"
    );
    validation_works(&socket, &jwt, &task_token).await;
    running.stop().await.unwrap();
    drop(data);
}

// --- the wall clock steps ----------------------------------------------------------

/// Where Debian's `faketime` package puts the library.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The first X.509-SVID on `stream` whose validity (not before, not
/// after, in Unix seconds) satisfies `wanted`. Others may come first: an
/// SVID issued on demand and its renewal by the rotation loop can both be
/// pushed around a step of the clock.
async fn svid_where(
    stream: &mut tonic::Streaming<tether::proto::workload::X509svidResponse>,
    wanted: impl Fn(i64, i64) -> bool,
) -> (i64, i64) {
    use x509_parser::prelude::*;
    let guard = tokio::time::Instant::now() + 2 * PATIENCE;
    loop {
        let message = tokio::time::timeout_at(guard, stream.message())
            .await
            .expect("the SVID wanted, in time")
            .unwrap()
            .expect("the stream goes on");
        let (_, cert) = X509Certificate::from_der(&message.svids[0].x509_svid).unwrap();
        let validity = cert.validity();
        let times = (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        );
        if wanted(times.0, times.1) {
            return times;
        }
    }
}

fn unix_now() -> i64 {
    i64::try_from(common::unix_now()).unwrap()
}

#[tokio::test]
#[ignore = "needs libfaketime (apt-get install faketime): scripts/test runs it"]
async fn the_wall_clock_stepping_forward_and_back_gets_fresh_svids_and_honest_validation() {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "prerequisite missing: libfaketime is not installed ({LIBFAKETIME}; apt-get install faketime)"
    );
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    // The agent's wall clock is real time plus what this file says; its
    // monotonic clock (timers, sleeps) is left alone, as an NTP step does.
    let offset = dir.path().join("clock-offset");
    std::fs::write(&offset, "+0").unwrap();
    let agent = layout.start_with(&[
        ("LD_PRELOAD", Path::new(LIBFAKETIME)),
        ("FAKETIME_TIMESTAMP_FILE", &offset),
        ("FAKETIME_NO_CACHE", Path::new("1")),
        ("FAKETIME_DONT_FAKE_MONOTONIC", Path::new("1")),
    ]);
    layout.serving().await;
    let mut raw = common::raw_client(&layout.socket, true).await;
    let mut stream = raw
        .fetch_x509svid(tether::proto::workload::X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let (_, first_not_after) = svid_where(&mut stream, |_, _| true).await;

    // Two hours forward: the SVID held is expired by the agent's clock; a
    // fresh one comes, valid from the new time.
    std::fs::write(&offset, "+2h").unwrap();
    let (ahead_not_before, _) =
        svid_where(&mut stream, |not_before, _| not_before > first_not_after).await;
    assert!(ahead_not_before > unix_now() + 3600);
    let client = workload(&layout.socket).await;
    let jwt = validator_jwt(&client).await;
    client.validate_jwt_token("validator", &jwt).await.unwrap();

    // And back: the SVID held is not valid yet by anyone's clock; a fresh
    // one comes, valid now. The token issued in the future is refused.
    std::fs::write(&offset, "+0").unwrap();
    svid_where(&mut stream, |not_before, not_after| {
        let now = unix_now();
        not_before <= now && now < not_after
    })
    .await;
    let refused = client
        .validate_jwt_token("validator", &jwt)
        .await
        .expect_err("a token issued two hours ahead is not valid yet");
    assert!(
        refused.to_string().contains("issued in the future"),
        "{refused}"
    );
    // Issuance and validation go on at the restored time.
    let jwt = validator_jwt(&client).await;
    client.validate_jwt_token("validator", &jwt).await.unwrap();
    stop(agent).await;
}
