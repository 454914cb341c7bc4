//! Real peer processes for tests: a Python child that connects to a
//! socket, so attestation is tested on a process that is not this one.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, Command, Stdio};

use tempfile::TempDir;
use tokio::net::{UnixListener, UnixStream};

/// A child process connected to our listener, waiting for its stdin to close.
pub(crate) struct Peer {
    pub(crate) child: Child,
    stdin: Option<ChildStdin>,
    _dir: TempDir,
}

/// Spawns a child that connects, runs `after_connect` (Python), says
/// ready, then waits for stdin to close (or exits at once if `linger`
/// is false). Returns once the child has connected, with the server side.
pub(crate) async fn connect(after_connect: &str, linger: bool) -> (Peer, UnixStream) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let wait = if linger { "sys.stdin.read()" } else { "" };
    let script = format!(
        "import os, socket, sys\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.connect(sys.argv[1])\n\
             {after_connect}\n\
             print('ready', flush=True)\n\
             {wait}\n"
    );
    let python = if std::path::Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let mut child = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    // The connection sits in the backlog until accept, so blocking here is fine.
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "child did not connect");
    let (stream, _) = listener.accept().await.unwrap();
    let peer = Peer {
        child,
        stdin,
        _dir: dir,
    };
    (peer, stream)
}

impl Peer {
    pub(crate) fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// Writes a line to the child's stdin.
    pub(crate) fn say(&mut self, line: &str) {
        use std::io::Write as _;
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Lets the child exit normally and reaps it.
    pub(crate) fn finish(&mut self) {
        drop(self.stdin.take());
        self.child.wait().unwrap();
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
