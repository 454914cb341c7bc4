//! A real PostgreSQL for the fleet's store tests: Debian's binaries
//! (`/usr/lib/postgresql/<version>/bin`, the `postgresql` package that
//! `.ci/run` installs), run as the `postgres` system user on a temporary
//! data dir and a free loopback port, with its socket in that dir. The
//! distribution's own cluster is never used. Needs root (to run as
//! `postgres` and give it the data dir).

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

use super::{prerequisite, require_root};

/// The role the cluster is created with (`initdb -U`), trusted locally.
pub const USER: &str = "tether";

/// A PostgreSQL cluster of its own, stopped when dropped.
pub struct TestPostgres {
    bin: PathBuf,
    data: PathBuf,
    sockets: PathBuf,
    port: u16,
    _dir: TempDir,
}

impl TestPostgres {
    /// Creates and starts a cluster; a missing PostgreSQL or root fails the
    /// test as a missing prerequisite, with the reason.
    pub fn start() -> TestPostgres {
        require_root("running PostgreSQL as the postgres user");
        prerequisite(TestPostgres::try_start())
    }

    fn try_start() -> Result<TestPostgres, String> {
        let bin = bin_dir()?;
        let (uid, gid) = postgres_user()?;
        let dir = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
        // The postgres user must reach its dirs inside ours.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .map_err(|e| format!("chmod {}: {e}", dir.path().display()))?;
        let (data, sockets) = (dir.path().join("data"), dir.path().join("run"));
        for path in [&data, &sockets] {
            std::fs::create_dir(path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| format!("chmod {}: {e}", path.display()))?;
            nix::unistd::chown(path.as_path(), Some(uid), Some(gid))
                .map_err(|e| format!("chown {} to postgres: {e}", path.display()))?;
        }
        let port = free_port()?;
        let pg = TestPostgres {
            bin,
            data,
            sockets,
            port,
            _dir: dir,
        };
        pg.run(
            "initdb",
            &[
                "-D".into(),
                pg.data.clone().into(),
                "-A".into(),
                "trust".into(),
                "-U".into(),
                USER.into(),
                "-E".into(),
                "UTF8".into(),
                "--no-locale".into(),
                "--no-sync".into(),
            ],
        )?;
        pg.ctl("start")?;
        Ok(pg)
    }

    /// `postgres://tether@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/postgres", self.port)
    }

    /// The same database through the Unix socket in the cluster's dir.
    #[allow(dead_code, reason = "for tests that connect over the socket")]
    pub fn socket_url(&self) -> String {
        format!(
            "postgres://{USER}@{}:{}/postgres",
            percent_path(&self.sockets),
            self.port
        )
    }

    /// Stops the cluster (fast: open connections are closed).
    pub fn stop(&self) {
        self.ctl("stop").unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts it again after [`TestPostgres::stop`], on the same port.
    pub fn start_again(&self) {
        self.ctl("start").unwrap_or_else(|e| panic!("{e}"));
    }

    /// Restarts it: every open connection is dropped.
    #[allow(dead_code, reason = "for tests that drop connections without downtime")]
    pub fn restart(&self) {
        self.ctl("restart").unwrap_or_else(|e| panic!("{e}"));
    }

    fn ctl(&self, action: &str) -> Result<(), String> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.sockets.display()
        );
        let log = self.data.join("server.log");
        let mut args: Vec<OsString> = vec![
            "-D".into(),
            self.data.clone().into(),
            "-l".into(),
            log.clone().into(),
            "-w".into(),
        ];
        if action != "stop" {
            args.extend(["-o".into(), options.into()]);
        }
        args.extend(["-m".into(), "fast".into(), action.into()]);
        self.run("pg_ctl", &args).map_err(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            format!("{e}\nserver log:\n{log}")
        })
    }

    /// Runs one of the cluster's programs as the postgres user.
    fn run(&self, program: &str, args: &[OsString]) -> Result<(), String> {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .current_dir("/")
            .output()
            .map_err(|e| format!("running {program} as postgres (runuser): {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{program} {args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .current_dir("/")
            .output();
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `initdb`.
fn bin_dir() -> Result<PathBuf, String> {
    let root = Path::new("/usr/lib/postgresql");
    let entries = std::fs::read_dir(root).map_err(|e| {
        format!(
            "PostgreSQL ({}: {e}); install Debian's postgresql package",
            root.display()
        )
    })?;
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or_else(|| {
        format!(
            "PostgreSQL (no {}/<version>/bin/initdb); install Debian's postgresql package",
            root.display()
        )
    })
}

fn postgres_user() -> Result<(nix::unistd::Uid, nix::unistd::Gid), String> {
    match nix::unistd::User::from_name("postgres") {
        Ok(Some(user)) => Ok((user.uid, user.gid)),
        Ok(None) => Err("the postgres system user (Debian's postgresql package makes it)".into()),
        Err(e) => Err(format!("looking up the postgres user: {e}")),
    }
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("a free loopback port: {e}"))?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(|e| format!("a free loopback port: {e}"))
}

/// A path as a URL host (`%2F` for each `/`).
fn percent_path(path: &Path) -> String {
    path.display().to_string().replace('/', "%2F")
}
