//! README walkthroughs run as written: a section's `sh` blocks read from
//! README.md, one command a line, each run by `bash` as a user types it
//! (`... &` in the background), each paired with what it must show
//! ([`Expect`]). The README's own paths and names are replaced by the
//! test's ([`Shell::replace`]) and `target/release` by this build's target
//! directory, so several runs do not collide and nothing of the user's is
//! touched.
//!
//! Every process a [`Shell`] starts is killed when it is dropped, panics
//! included, and then its cleanup commands run.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::PATIENCE;

/// The MCP example's processes, one executable (and so one identity) each.
const EXAMPLES: &[&str] = &["mcp-agent", "mcp-notes-server", "notes-publish-api"];

/// What one walkthrough command must do.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// `cargo build`: the test suite built the binaries already.
    Built,
    /// `export PATH=...`: this build's target directory first.
    Path,
    /// `export K=V ...`.
    Export,
    /// `... &`, ready as [`Ready`] says.
    Background(Ready),
    /// Exits 0; stdout contains each string.
    Succeeds(&'static [&'static str]),
    /// Exits 0 with these strings once the agent has caught up (its audit
    /// trail is written by a job of its own, after the answer; a fleet
    /// agent gets its entries from the server after it listens): retried.
    SoonSucceeds(&'static [&'static str]),
    /// Exits non-zero; stdout contains each string.
    Fails(&'static [&'static str]),
    /// Exits non-zero with these strings once the agent has caught up
    /// (an owner's exit is noticed by tether, not by the caller; another
    /// node's end comes over the sync stream): retried.
    SoonFails(&'static [&'static str]),
    /// `kill -SIG $!`: the last background process gets the signal and
    /// exits, successfully unless it was killed.
    Signal(Signal),
    /// `kill $(jobs -p)`: every background process stops cleanly.
    StopAll,
}

/// When a background process is ready for the next command.
#[derive(Debug, Clone, Copy)]
pub enum Ready {
    /// Once its stdout has a line containing this.
    Line(&'static str),
    /// Once this Unix socket (a README path) accepts connections.
    Socket(&'static str),
}

/// The `sh` blocks of README's section `heading` (`## ...`), one command
/// per line (a trailing `\` joins lines).
pub fn section_commands(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let section = &readme[start + 1..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let mut commands = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    for line in section.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if !in_sh || line.trim().is_empty() {
            continue;
        }
        if !pending.is_empty() {
            pending.push(' ');
        }
        pending.push_str(line.trim());
        if pending.ends_with('\\') {
            pending.pop();
            let kept = pending.trim_end().len();
            pending.truncate(kept);
            continue;
        }
        commands.push(std::mem::take(&mut pending));
    }
    commands
}

/// The repository: where the walkthroughs run.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// This build's target profile directory (`target/debug`): the test
/// binary lives in its `deps/`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the target directory")
        .to_owned();
    for name in EXAMPLES {
        assert!(
            dir.join("examples").join(name).exists(),
            "{} is not built: `cargo build --examples` (cargo test and nextest build examples)",
            dir.join("examples").join(name).display()
        );
    }
    dir
}

/// A shell session of a walkthrough: its environment, its working
/// directory (the repository), its background processes.
pub struct Shell {
    /// The README directory's stand-in, deleted with the shell.
    _dir: tempfile::TempDir,
    env: BTreeMap<String, String>,
    /// The README's words and the test's, in the order they are replaced.
    replacements: Vec<(String, String)>,
    /// Run when the shell is dropped, after its processes are killed.
    cleanups: Vec<String>,
    background: Vec<Background>,
}

/// A process started with `&`, its stdout read line by line.
pub struct Background {
    /// The process (bash exec'd into the command).
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// The lines it printed so far (see [`Background::drain`]).
    pub seen: Vec<String>,
}

impl Shell {
    /// A session in which the README's directory `readme_dir` is a
    /// temporary directory's `name`.
    pub fn new(readme_dir: &str, name: &str) -> Self {
        // The caller's own identity settings must not leak in.
        let env = std::env::vars()
            .filter(|(k, _)| !k.starts_with("TETHER_") && k != "SPIFFE_ENDPOINT_SOCKET")
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let local = dir.path().join(name).display().to_string();
        Self {
            _dir: dir,
            env,
            replacements: vec![(readme_dir.to_owned(), local)],
            cleanups: Vec::new(),
            background: Vec::new(),
        }
    }

    /// Replaces `readme` by `local` in every command from now on.
    pub fn replace(&mut self, readme: &str, local: &str) {
        self.replacements
            .push((readme.to_owned(), local.to_owned()));
    }

    /// Sets a variable of the session's environment.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.insert(key.to_owned(), value.to_owned());
    }

    /// Runs `command` (as written in the README) when the shell is dropped,
    /// after its processes are killed.
    pub fn cleanup_on_drop(&mut self, command: &str) {
        self.cleanups.push(command.to_owned());
    }

    /// Runs `commands` (a README section's), each paired in order with
    /// `walkthrough`'s expectation; fails on a command that does not begin
    /// as its pair says, or on counts that differ.
    pub fn run_walkthrough(&mut self, heading: &str, walkthrough: &[(&str, Expect)]) {
        let commands = section_commands(heading);
        assert_eq!(
            commands.len(),
            walkthrough.len(),
            "README's {heading:?} has {} commands, the test knows {}: {commands:#?}",
            commands.len(),
            walkthrough.len()
        );
        for (command, (start, expect)) in commands.iter().zip(walkthrough) {
            assert!(
                command.starts_with(start),
                "README command {command:?} is not the expected {start:?}..."
            );
            eprintln!("$ {command}");
            self.step(command, *expect);
        }
    }

    /// The command with the README's words replaced by this test's.
    pub fn localize(&self, command: &str) -> String {
        self.replacements
            .iter()
            .fold(command.to_owned(), |command, (readme, local)| {
                command.replace(readme, local)
            })
    }

    /// Runs one command as `expect` says.
    pub fn step(&mut self, command: &str, expect: Expect) {
        match expect {
            Expect::Built => {
                target_dir();
            }
            Expect::Path => {
                let target = target_dir();
                let path = format!(
                    "{}:{}:{}",
                    target.display(),
                    target.join("examples").display(),
                    self.env.get("PATH").map_or("/usr/bin:/bin", String::as_str)
                );
                self.env.insert("PATH".into(), path);
            }
            Expect::Export => {
                let assignments = self.localize(command.trim_start_matches("export "));
                for assignment in assignments.split_whitespace() {
                    let (key, value) = assignment
                        .split_once('=')
                        .unwrap_or_else(|| panic!("{command}: not K=V"));
                    self.env.insert(key.into(), value.into());
                }
            }
            Expect::Background(ready) => self.spawn(command, ready),
            Expect::Succeeds(wanted) => {
                let output = self.run(command);
                assert_shows(command, &output, true, wanted);
            }
            Expect::Fails(wanted) => {
                let output = self.run(command);
                assert_shows(command, &output, false, wanted);
            }
            Expect::SoonSucceeds(wanted) => self.retry(command, true, wanted),
            Expect::SoonFails(wanted) => self.retry(command, false, wanted),
            Expect::Signal(signal) => {
                let mut last = self.pop_background();
                signal_process(&last.child, signal);
                let status = last.child.wait().expect("waiting for $!");
                if signal != Signal::SIGKILL {
                    last.drain();
                    assert!(
                        status.success(),
                        "{status:?}; it printed:\n{}",
                        last.seen.join("\n")
                    );
                }
            }
            Expect::StopAll => self.stop_all(),
        }
    }

    /// Runs `command` until it exits successfully or not, as `success`
    /// says, with each of `wanted` on stdout; fails after [`PATIENCE`].
    fn retry(&self, command: &str, success: bool, wanted: &[&str]) {
        let started = Instant::now();
        loop {
            let output = self.run(command);
            let stdout = String::from_utf8_lossy(&output.stdout);
            if output.status.success() == success && wanted.iter().all(|w| stdout.contains(w)) {
                eprintln!("as expected after {:?}", started.elapsed());
                return;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{command} never {} as expected; last output:\n{stdout}",
                if success { "succeeded" } else { "failed" }
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn command(&self, command: &str) -> Command {
        let mut shell = Command::new("bash");
        shell
            .arg("-c")
            .arg(self.localize(command))
            .current_dir(repo())
            .env_clear()
            .envs(&self.env);
        shell
    }

    /// Runs `command` in the foreground, its output echoed to the test's.
    pub fn run(&self, command: &str) -> Output {
        let output = self
            .command(command)
            .stdin(Stdio::null())
            .output()
            .expect("bash runs");
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn spawn(&mut self, command: &str, ready: Ready) {
        let command = command.trim_end_matches('&').trim();
        // `$!` is the command itself: bash execs it. With assignments in
        // front (`K=$(...) cmd`) `exec` cannot lead, and bash execs a
        // single simple command of `-c` by itself.
        let first = command.split_whitespace().next().unwrap_or_default();
        let script = if first.contains('=') {
            command.to_owned()
        } else {
            format!("exec {command}")
        };
        let mut child = self
            .command(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("bash runs");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut background = Background {
            child,
            lines,
            seen: Vec::new(),
        };
        let outcome = match ready {
            Ready::Line(wanted) => background.wait_for(command, wanted),
            Ready::Socket(path) => background.wait_for_socket(command, &self.localize(path)),
        };
        // Killed on drop from here, whatever the outcome.
        self.background.push(background);
        if let Err(problem) = outcome {
            panic!("{problem}");
        }
    }

    /// The URL the last background process announced (`... on URL`).
    pub fn announced_url(&self) -> String {
        let last = self.background.last().expect("a background process");
        let line = last
            .seen
            .iter()
            .find(|line| line.contains(" on http"))
            .expect("an announced address");
        line.rsplit(' ').next().unwrap_or_default().to_owned()
    }

    /// What the last background process printed so far.
    pub fn background_output(&self) -> &[String] {
        &self.background.last().expect("a background process").seen
    }

    /// The last background process (`$!`), now the caller's.
    pub fn pop_background(&mut self) -> Background {
        self.background.pop().expect("a background process for $!")
    }

    /// `kill $(jobs -p)`: every background process stops cleanly, the
    /// last started first.
    pub fn stop_all(&mut self) {
        while let Some(mut background) = self.background.pop() {
            signal_process(&background.child, Signal::SIGTERM);
            let status = background.child.wait().expect("waiting for a job");
            background.drain();
            assert!(
                status.success(),
                "{status:?}; it printed:\n{}",
                background.seen.join("\n")
            );
        }
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        while let Some(mut background) = self.background.pop() {
            let _ = background.child.kill();
            let _ = background.child.wait();
        }
        for cleanup in &self.cleanups {
            if let Ok(output) = self.command(cleanup).stdin(Stdio::null()).output() {
                eprintln!(
                    "{cleanup}: {}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
    }
}

impl Background {
    /// Waits for a line containing `wanted`; the error says what the
    /// process printed instead.
    fn wait_for(&mut self, command: &str, wanted: &str) -> Result<(), String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    eprintln!("{line}");
                    let found = line.contains(wanted);
                    self.seen.push(line);
                    if found {
                        return Ok(());
                    }
                }
                Err(_) => {
                    return Err(format!(
                        "{command} never printed {wanted:?}; it printed:\n{}",
                        self.seen.join("\n")
                    ));
                }
            }
        }
    }

    /// Waits until `socket` accepts connections; the error says whether
    /// the process exited first.
    fn wait_for_socket(&mut self, command: &str, socket: &str) -> Result<(), String> {
        let started = Instant::now();
        while UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("{command} exited ({status}) before listening"));
            }
            if started.elapsed() > PATIENCE {
                return Err(format!("{command} never listened on {socket}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Adds what the process printed since to [`Background::seen`].
    pub fn drain(&mut self) {
        self.seen.extend(self.lines.try_iter());
    }
}

fn signal_process(child: &Child, signal: Signal) {
    let pid = i32::try_from(child.id()).expect("a pid fits i32");
    kill(Pid::from_raw(pid), signal).expect("signalling a job");
}

fn assert_shows(command: &str, output: &Output, success: bool, wanted: &[&str]) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.success(),
        success,
        "{command}: {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    for want in wanted {
        assert!(
            stdout.contains(want),
            "{command}: no {want:?} in:\n{stdout}"
        );
    }
}
