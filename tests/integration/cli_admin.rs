//! The operator commands (`tether entry|svid|bundle|healthcheck|reload`):
//! the built binary against a real agent started in this process, over its
//! admin socket. Exit codes and output are the contract checked here;
//! timeouts are failure guards only.

use crate::common;

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Output, Stdio};

use common::cli::{assert_exit, assert_fails, json, output, path_str, run, stderr, stdout, tether};
use common::{PATIENCE, TestAgent, uid};
use serde_json::Value;
use tempfile::TempDir;
use tether::config::{Config, MapEnv};
use tether::daemon::{self, Running};

/// An agent started from a config file, so that `tether reload` has a file
/// to re-read.
struct FileAgent {
    running: Running,
    dir: TempDir,
    config: PathBuf,
    base: String,
}

impl FileAgent {
    /// Starts on `extra` appended to the shared test config, with this
    /// test's uid allowed on the admin socket (root always is).
    async fn start(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("agent.toml");
        let base = format!(
            "{}admin_uids = [{}]\n",
            common::config_text(dir.path(), ""),
            uid()
        );
        std::fs::write(&config, format!("{base}{extra}")).unwrap();
        let loaded = Config::load(Some(&config), &MapEnv::default()).unwrap();
        tether::telemetry::init(&loaded.log);
        let running = daemon::start(loaded).await.unwrap();
        Self {
            running,
            dir,
            config,
            base,
        }
    }

    /// Replaces the config file's entries (and anything else) with `extra`.
    fn rewrite(&self, extra: &str) {
        std::fs::write(&self.config, format!("{}{extra}", self.base)).unwrap();
    }

    fn socket(&self) -> String {
        path_str(self.running.socket_path())
    }

    fn admin_socket(&self) -> String {
        path_str(self.running.admin_socket_path())
    }

    /// `tether <args> --admin-socket <this agent's>`.
    async fn admin(&self, args: &[&str]) -> Output {
        let socket = self.admin_socket();
        let mut command = tether(args);
        command.args(["--admin-socket", &socket]);
        output(command, None).await
    }

    /// `tether <args> --json --admin-socket ...`, exit 0, parsed.
    async fn admin_json(&self, args: &[&str]) -> Value {
        let out = self.admin(&[args, &["--json"]].concat()).await;
        assert_exit(&out, 0);
        json(&out)
    }

    /// `tether api fetch x509 --socket <this agent's>`.
    async fn fetch_x509(&self) -> Output {
        let socket = self.socket();
        run(&["api", "fetch", "x509", "--json", "--socket", &socket]).await
    }

    async fn stop(self) {
        self.running.stop().await.unwrap();
        drop(self.dir);
    }
}

fn config_entry(path: &str, selector: &str) -> String {
    format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/{path}\"\nselectors = [\"{selector}\"]\n"
    )
}

fn me() -> String {
    format!("unix:uid:{}", uid())
}

fn spiffe_ids(fetched: &Value) -> Vec<String> {
    fetched["svids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["spiffe_id"].as_str().unwrap().to_owned())
        .collect()
}

/// The line of a readable table or block that contains `needle`.
fn line_with<'t>(text: &'t str, needle: &str) -> &'t str {
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_session_from_create_to_delete() {
    // The config-file entry is for another uid: this process starts with
    // no identity.
    let file_entry = config_entry("from-config", "unix:uid:4242");
    let agent = FileAgent::start(&file_entry).await;
    assert_exit(&agent.fetch_x509().await, 77);

    // Create, --json: the entry comes back with its id.
    let created = agent
        .admin_json(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/operator",
            "--selector",
            &me(),
            "--x509-ttl",
            "10m",
            "--dns",
            "op.example.org",
            "--hint",
            "op",
        ])
        .await;
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("ent-"), "{created}");
    assert_eq!(created["spiffe_id"], "spiffe://example.org/operator");
    assert_eq!(created["selectors"], serde_json::json!([me()]));
    assert_eq!(created["source"], "api");
    assert_eq!(created["revision"], 1);
    assert_eq!(created["x509_svid_ttl"], "10m");
    assert_eq!(created["jwt_svid_ttl"], Value::Null);
    assert_eq!(created["dns_names"], serde_json::json!(["op.example.org"]));
    assert_eq!(created["hint"], "op");
    assert!(created["created_at"].as_str().unwrap().ends_with('Z'));

    // Create, readable: the id comes first.
    let out = agent
        .admin(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/bystander",
            "--selector",
            "unix:uid:4343",
            "--selector",
            "unix:gid:4343",
        ])
        .await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    let first = text.lines().next().unwrap();
    let bystander = first.strip_prefix("ID:").unwrap().trim().to_owned();
    assert!(bystander.starts_with("ent-"), "{text}");
    assert!(text.contains("spiffe://example.org/bystander"), "{text}");

    // List: a table with both sources.
    let out = agent.admin(&["entry", "list"]).await;
    assert_exit(&out, 0);
    let table = stdout(&out);
    let header = table.lines().next().unwrap();
    for column in ["ID", "SPIFFE ID", "SELECTORS", "SOURCE", "TTL", "HINT"] {
        assert!(header.contains(column), "{table}");
    }
    let row = line_with(&table, &id);
    assert!(row.contains("spiffe://example.org/operator"), "{table}");
    assert!(row.contains(" api "), "{table}");
    assert!(row.contains("10m"), "{table}");
    let row = line_with(&table, "spiffe://example.org/from-config");
    assert!(row.contains(" config "), "{table}");
    assert!(row.contains("unix:uid:4242"), "{table}");
    let row = line_with(&table, &bystander);
    assert!(
        row.contains("unix:uid:4343,unix:gid:4343") || row.contains("unix:gid:4343,unix:uid:4343"),
        "{table}"
    );
    let listed = agent.admin_json(&["entry", "list"]).await;
    assert_eq!(listed["entries"].as_array().unwrap().len(), 3, "{listed}");
    let filtered = agent
        .admin_json(&["entry", "list", "--selector", "unix:uid:4242"])
        .await;
    let entries = filtered["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{filtered}");
    assert_eq!(entries[0]["source"], "config");
    let config_id = entries[0]["id"].as_str().unwrap().to_owned();
    let by_id = agent
        .admin_json(&[
            "entry",
            "list",
            "--spiffe-id",
            "spiffe://example.org/operator",
        ])
        .await;
    assert_eq!(by_id["entries"][0]["id"], id.as_str());

    // Show.
    let out = agent.admin(&["entry", "show", &id]).await;
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("ID:              {id}\n")),
        "{text}"
    );
    assert!(line_with(&text, "Revision:").ends_with('1'), "{text}");
    assert!(
        line_with(&text, "DNS names:").contains("op.example.org"),
        "{text}"
    );
    let shown = agent.admin_json(&["entry", "show", &id]).await;
    assert_eq!(shown, created);

    // The workload now has that identity.
    let out = agent.fetch_x509().await;
    assert_exit(&out, 0);
    assert_eq!(spiffe_ids(&json(&out)), ["spiffe://example.org/operator"]);

    // Update replaces the whole spec (the hint and DNS name go).
    let updated = agent
        .admin_json(&[
            "entry",
            "update",
            &id,
            "--spiffe-id",
            "spiffe://example.org/renamed",
            "--selector",
            &me(),
            "--jwt-ttl",
            "90s",
            "--revision",
            "1",
        ])
        .await;
    assert_eq!(updated["id"], id.as_str());
    assert_eq!(updated["revision"], 2);
    assert_eq!(updated["spiffe_id"], "spiffe://example.org/renamed");
    assert_eq!(updated["hint"], "");
    assert_eq!(updated["dns_names"], serde_json::json!([]));
    assert_eq!(updated["x509_svid_ttl"], Value::Null);
    assert_eq!(updated["jwt_svid_ttl"], "1m 30s");
    // A stale revision is refused with the agent's reason.
    let out = agent
        .admin(&[
            "entry",
            "update",
            &id,
            "--spiffe-id",
            "spiffe://example.org/again",
            "--selector",
            &me(),
            "--revision",
            "1",
        ])
        .await;
    assert_fails(&out, 1, "revision");
    let out = agent.fetch_x509().await;
    assert_exit(&out, 0);
    assert_eq!(spiffe_ids(&json(&out)), ["spiffe://example.org/renamed"]);

    // A workload holding the SVID on an open stream is listed as holder.
    let watch = spawn_watch(&agent.socket()).await;
    let pid = i64::from(watch.pid);
    let svid = common::eventually("the watching process to show as holder", async || {
        let listed = agent.admin_json(&["svid", "list"]).await;
        let held = listed["svids"].as_array().unwrap().iter().find(|s| {
            s["spiffe_id"] == "spiffe://example.org/renamed"
                && s["holders"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|h| h["pid"] == pid)
        });
        held.cloned().ok_or_else(|| listed.to_string())
    })
    .await;
    assert_eq!(svid["entry_id"], id.as_str());
    assert!(!svid["serial"].as_str().unwrap().is_empty());
    assert!(svid["not_after"].as_str().unwrap().ends_with('Z'));
    let holder = svid["holders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["pid"] == pid)
        .unwrap();
    assert_eq!(holder["uid"], uid());
    assert!(
        holder["executable"].as_str().unwrap().ends_with("tether"),
        "{holder}"
    );
    let out = agent.admin(&["svid", "list"]).await;
    assert_exit(&out, 0);
    let table = stdout(&out);
    for column in [
        "SPIFFE ID",
        "SERIAL",
        "EXPIRES",
        "ENTRY",
        "PID",
        "UID",
        "EXECUTABLE",
    ] {
        assert!(table.lines().next().unwrap().contains(column), "{table}");
    }
    let row = line_with(&table, &format!(" {pid} "));
    assert!(row.contains("spiffe://example.org/renamed"), "{table}");
    assert!(row.contains(svid["serial"].as_str().unwrap()), "{table}");
    assert!(row.contains("(in "), "{table}");
    watch.interrupt().await;

    // The bundle, as a SPIFFE document and as PEM.
    let out = agent.admin(&["bundle", "show"]).await;
    assert_exit(&out, 0);
    let document = json(&out);
    let keys = document["keys"].as_array().unwrap();
    assert!(keys.iter().any(|k| k["use"] == "x509-svid"), "{document}");
    assert!(keys.iter().any(|k| k["use"] == "jwt-svid"), "{document}");
    let compact = agent.admin(&["bundle", "show", "--json"]).await;
    assert_exit(&compact, 0);
    assert_eq!(stdout(&compact).lines().count(), 1);
    assert_eq!(json(&compact), document);
    let out = agent.admin(&["bundle", "show", "--format", "pem"]).await;
    assert_exit(&out, 0);
    let blocks = pem::parse_many(&out.stdout).unwrap();
    assert!(!blocks.is_empty());
    for block in &blocks {
        assert_eq!(block.tag(), "CERTIFICATE");
        let (rest, ca) = x509_parser::parse_x509_certificate(block.contents()).unwrap();
        assert!(rest.is_empty());
        assert!(ca.is_ca());
    }
    let out = agent
        .admin(&["bundle", "show", "--format", "pem", "--json"])
        .await;
    assert_fails(&out, 64, "--format pem");

    // Health.
    let out = agent.admin(&["healthcheck"]).await;
    assert_exit(&out, 0);
    let line = stdout(&out);
    assert!(
        line.starts_with("serving: trust domain example.org, 3 entries"),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1);
    let health = agent.admin_json(&["healthcheck"]).await;
    assert_eq!(health["serving"], true);
    assert_eq!(health["trust_domain"], "example.org");
    assert_eq!(health["entries"], 3);

    // Reload: a second config entry appears; a broken file is refused
    // with the agent's reason and changes nothing.
    agent.rewrite(&format!(
        "{file_entry}{}",
        config_entry("also-from-config", "unix:uid:4444")
    ));
    let out = agent.admin(&["reload"]).await;
    assert_exit(&out, 0);
    assert!(
        stdout(&out).starts_with("reloaded: 2 config entries"),
        "{}",
        stdout(&out)
    );
    let reloaded = agent.admin_json(&["reload"]).await;
    assert_eq!(reloaded["config_entries"], 2);
    let listed = agent.admin_json(&["entry", "list"]).await;
    let sources: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["source"].as_str().unwrap())
        .collect();
    assert_eq!(
        sources.iter().filter(|s| **s == "config").count(),
        2,
        "{listed}"
    );
    agent.rewrite("[[entries]]\nspiffe_id = \"oops\"\n");
    let out = agent.admin(&["reload"]).await;
    assert_fails(&out, 1, "entries[0]");
    assert!(stderr(&out).contains("reload refused"), "{}", stderr(&out));
    assert_eq!(agent.admin_json(&["entry", "list"]).await, listed);

    // Config-file entries belong to the file.
    let out = agent.admin(&["entry", "delete", &config_id]).await;
    assert_fails(&out, 1, "config file");

    // Delete: the workload loses its identity.
    let out = agent.admin(&["entry", "delete", &id]).await;
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), format!("Deleted entry {id}\n"));
    let deleted = agent.admin_json(&["entry", "delete", &bystander]).await;
    assert_eq!(deleted, serde_json::json!({"deleted": bystander}));
    let out = agent.fetch_x509().await;
    assert_exit(&out, 77);
    let out = agent.admin(&["entry", "show", &id]).await;
    assert_fails(&out, 1, &id);

    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field_and_bad_flags_are_usage_errors() {
    let agent = FileAgent::start("").await;
    let out = agent
        .admin(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/x",
            "--selector",
            "nocolon",
        ])
        .await;
    assert_fails(&out, 1, "selectors");
    let out = agent
        .admin(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://other.org/x",
            "--selector",
            &me(),
        ])
        .await;
    assert_fails(&out, 1, "trust domain");
    let out = agent
        .admin(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/x",
            "--selector",
            &me(),
            "--federates-with",
            "nowhere.example",
        ])
        .await;
    assert_exit(&out, 1);
    let out = agent.admin(&["entry", "show", "../etc"]).await;
    assert_fails(&out, 1, "id");
    // The workload socket is not the admin socket.
    let socket = agent.socket();
    let out = run(&["entry", "list", "--admin-socket", &socket]).await;
    assert_fails(&out, 1, "does not serve the admin API");

    // clap's own: no selector, a bad duration, an unknown flag.
    for args in [
        &["entry", "create", "--spiffe-id", "spiffe://example.org/x"][..],
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/x",
            "--selector",
            "unix:uid:1",
            "--x509-ttl",
            "soon",
        ],
        &["svid", "list", "--no-such-flag"],
        &["healthcheck", "--timeout", "0s"],
    ] {
        let out = agent.admin(args).await;
        assert_exit(&out, 2);
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_69_naming_a_dead_socket() {
    let dir = tempfile::tempdir().unwrap();
    let dead = path_str(&dir.path().join("admin.sock"));
    for args in [
        &["healthcheck", "--admin-socket", &dead][..],
        &["entry", "list", "--admin-socket", &dead],
        &["reload", "--admin-socket", &dead, "--json"],
    ] {
        let out = run(args).await;
        assert_fails(&out, 69, &dead);
        assert!(stderr(&out).contains("tether run"), "{}", stderr(&out));
    }
    // TETHER_ADMIN_SOCKET is read when the flag is absent.
    let mut command = tether(&["healthcheck"]);
    command.env("TETHER_ADMIN_SOCKET", &dead);
    assert_fails(&output(command, None).await, 69, &dead);

    // A live agent, for contrast, through the variable.
    let agent = TestAgent::start("").await;
    let mut command = tether(&["healthcheck"]);
    command.env("TETHER_ADMIN_SOCKET", agent.running().admin_socket_path());
    let out = output(command, None).await;
    if uid() == 0 {
        assert_exit(&out, 0);
        assert!(stdout(&out).starts_with("serving: trust domain example.org"));
    } else {
        // Not root and not in admin_uids: refused by the agent.
        assert_exit(&out, 77);
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (the CLI under another uid): scripts/test runs it"]
async fn other_uids_are_refused_by_the_agent_or_by_the_socket() {
    common::require_root("running the CLI as another uid");
    // The socket lets group 65534 connect (0660); the agent's uid check
    // refuses: 77 with the agent's message.
    let agent = TestAgent::start("admin_group = \"65534\"\n").await;
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let admin_socket = path_str(agent.running().admin_socket_path());
    for args in [
        &["entry", "list", "--admin-socket", &admin_socket][..],
        &["healthcheck", "--admin-socket", &admin_socket],
        &["reload", "--admin-socket", &admin_socket],
    ] {
        let mut command = tether(args);
        command.uid(65534).gid(65534);
        let out = output(command, None).await;
        assert_fails(&out, 77, "uid 65534 is not allowed");
    }
    agent.stop().await;

    // The default socket is 0600: the connection itself is refused, and
    // the message says who the socket is for.
    let agent = TestAgent::start("").await;
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let admin_socket = path_str(agent.running().admin_socket_path());
    let mut command = tether(&["svid", "list", "--admin-socket", &admin_socket]);
    command.uid(65534).gid(65534);
    let out = output(command, None).await;
    assert_fails(&out, 69, "admin_uids");
    assert!(stderr(&out).contains(&admin_socket), "{}", stderr(&out));
    agent.stop().await;
}

/// A running `tether api watch --json` that has received its first update.
struct Watch {
    child: std::process::Child,
    pid: u32,
    // Kept open so that the child never writes into a closed pipe.
    _lines: BufReader<std::process::ChildStdout>,
}

async fn spawn_watch(socket: &str) -> Watch {
    let socket = socket.to_owned();
    let started = tokio::task::spawn_blocking(move || {
        let mut child = tether(&["api", "watch", "--json", "--socket", &socket])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        lines.read_line(&mut first).unwrap();
        let update: Value = serde_json::from_str(&first)
            .unwrap_or_else(|e| panic!("watch printed no update ({e}): {first:?}"));
        assert_eq!(update["update"], 1, "{update}");
        let pid = child.id();
        Watch {
            child,
            pid,
            _lines: lines,
        }
    });
    tokio::time::timeout(PATIENCE, started)
        .await
        .expect("watch prints its first update")
        .unwrap()
}

impl Watch {
    /// Ctrl-C, and wait for a clean exit.
    async fn interrupt(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid.try_into().unwrap()),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let status = tokio::time::timeout(
            PATIENCE,
            tokio::task::spawn_blocking(move || self.child.wait()),
        )
        .await
        .expect("watch ends on SIGINT")
        .unwrap()
        .unwrap();
        assert_eq!(status.code(), Some(0));
    }
}
