//! The Go programs on go-spiffe in `tests/go`: the federation peer
//! (`cmd/federation-peer`) and the Workload API client (`cmd/workload-check`),
//! built with the machine's `go` and run as child processes.
//!
//! Each program is built once per test process (each nextest test is one),
//! under a lock file so parallel tests never build at once; a warm build is a
//! no-op of a fraction of a second, so a changed Go source is always
//! rebuilt. The binary is written under a temporary name and renamed into
//! place, so a test running the previous one is not disturbed.
//!
//! The module and build caches live outside the clone: `$TETHER_CACHE/go`
//! when `TETHER_CACHE` is set (CI), else `~/.cache/tether/go`. `go.sum` is
//! committed and the build runs in Go's default read-only module mode, so
//! it fetches exactly the pinned go-spiffe v2.9.0 from the module proxy the
//! machine is configured with, and `GOTOOLCHAIN=local` never downloads a
//! toolchain. No `go` on the machine is a missing prerequisite.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::OnceLock;

use super::prerequisite;

/// The built federation peer, building it first in this process.
pub fn federation_peer() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    prerequisite(BUILT.get_or_init(|| build("federation-peer")).clone())
}

/// The built Workload API client, building it first in this process.
pub fn workload_check() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    prerequisite(BUILT.get_or_init(|| build("workload-check")).clone())
}

/// Where the Go caches live: `$TETHER_CACHE/go`, else `~/.cache/tether/go`.
fn cache_dir() -> Result<PathBuf, String> {
    if let Some(cache) = std::env::var_os("TETHER_CACHE").filter(|c| !c.is_empty()) {
        return Ok(PathBuf::from(cache).join("go"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or("neither TETHER_CACHE nor HOME is set, for the Go caches")?;
    Ok(PathBuf::from(home).join(".cache/tether/go"))
}

/// Builds `tests/go/cmd/{program}` into `$CARGO_TARGET_TMPDIR/go-bin`.
fn build(program: &str) -> Result<PathBuf, String> {
    let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/go");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-bin");
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("mkdir {}: {e}", out_dir.display()))?;
    let cache = cache_dir()?;
    let lock_path = out_dir.join("build.lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|e| format!("creating {}: {e}", lock_path.display()))?;
    // Released when `lock` drops, at the end of this function.
    lock.lock()
        .map_err(|e| format!("locking {}: {e}", lock_path.display()))?;

    let binary = out_dir.join(program);
    let partial = out_dir.join(format!("{program}.{}", std::process::id()));
    let output = Command::new("go")
        .args(["build", "-trimpath", "-o"])
        .arg(&partial)
        .arg(format!("./cmd/{program}"))
        .current_dir(&module)
        .env("GOMODCACHE", cache.join("mod"))
        .env("GOCACHE", cache.join("build"))
        .env("GOTOOLCHAIN", "local")
        .env("GOWORK", "off")
        // A module cache that can be deleted like any other cache.
        .env("GOFLAGS", "-modcacherw")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "the Go tests need `go` (1.24 or later) and the Go module proxy: running go: {e}"
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "go build ./cmd/{program} in {} failed ({}):\n{}",
            module.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    std::fs::rename(&partial, &binary)
        .map_err(|e| format!("renaming {} into place: {e}", partial.display()))?;
    Ok(binary)
}

/// `federation-peer fetch ARGS`, run to its end off the runtime.
pub async fn fetch(args: Vec<String>) -> Output {
    let binary = federation_peer();
    tokio::task::spawn_blocking(move || {
        Command::new(binary)
            .arg("fetch")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("the federation peer runs")
    })
    .await
    .expect("the fetch's thread")
}

/// A running Go server, killed when dropped.
pub struct GoServer {
    child: Child,
    stdout: BufReader<ChildStdout>,
    /// The address it listens on, as it printed it.
    pub addr: String,
}

impl GoServer {
    /// Starts `federation-peer serve ARGS` and waits for its address.
    pub fn start(args: &[String]) -> GoServer {
        let mut command = Command::new(federation_peer());
        command.arg("serve").args(args);
        GoServer::spawn(command)
    }

    /// Starts `command`, a server that prints the address it listens on as
    /// its first line, and waits for that line.
    pub fn spawn(mut command: Command) -> GoServer {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the Go server starts");
        let stdout = BufReader::new(child.stdout.take().expect("its stdout"));
        let mut server = GoServer {
            child,
            stdout,
            addr: String::new(),
        };
        let addr = server.next_line();
        assert!(
            !addr.is_empty(),
            "the Go server exited before listening: {:?}",
            server.child.wait()
        );
        server.addr = addr;
        server
    }

    /// The next line it prints, trimmed; empty once it has exited.
    pub fn next_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("reading the Go server's output");
        line.trim().to_owned()
    }
}

impl Drop for GoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
