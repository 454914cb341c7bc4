//! The process side of `tether task run`: this process as a child
//! subreaper, the command it spawns, the signals it forwards, the exit
//! statuses it reaps, and the clean-up of descendants left behind. Knows
//! nothing of tasks or the agent.
//!
//! Invariant: only direct children are ever signalled. Their pids cannot
//! be reused until this process reaps them, so a signal never reaches a
//! stranger; deeper descendants become direct children (as orphans) when
//! their parents die, and are signalled then.

use std::collections::HashSet;
use std::io;
use std::process::Command;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

/// How often descendants are looked for while they are being stopped:
/// an orphan adopted from deeper down is not announced by SIGCHLD.
const SCAN_EVERY: Duration = Duration::from_millis(100);

/// The signals `task run` handles: SIGCHLD, and the three it forwards.
#[derive(Debug)]
pub(crate) struct Signals {
    child: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

/// What arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A child changed state (exited): time to reap.
    ChildChanged,
    /// SIGINT, SIGTERM or SIGHUP for this process: to be forwarded.
    Forward(Signal),
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommandExit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(Signal),
}

/// What one round of reaping found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reaped {
    /// The watched child's end, if it was among the reaped.
    watched: Option<CommandExit>,
    /// No child is left at all.
    none_left: bool,
}

/// The stages of stopping what the command left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Let them finish on their own.
    Wait,
    /// SIGTERM each.
    Terminate,
    /// SIGKILL each.
    Kill,
}

// === impl Signals ===

impl Signals {
    /// Installs the handlers. From here on SIGINT, SIGTERM and SIGHUP no
    /// longer end this process: they are the caller's to forward.
    pub(crate) fn install() -> io::Result<Self> {
        Ok(Self {
            child: signal(SignalKind::child())?,
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal. Cancel-safe: nothing is lost when another branch of
    /// a `select!` wins.
    pub(crate) async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.child.recv() => Event::ChildChanged,
            _ = self.interrupt.recv() => Event::Forward(Signal::SIGINT),
            _ = self.terminate.recv() => Event::Forward(Signal::SIGTERM),
            _ = self.hangup.recv() => Event::Forward(Signal::SIGHUP),
        }
    }
}

// === impl CommandExit ===

impl CommandExit {
    /// The exit status a shell would report: the code, or 128 + the
    /// signal's number.
    pub(crate) fn exit_code(self) -> u8 {
        let code = match self {
            Self::Code(code) => code,
            Self::Signal(signal) => 128 + signal as i32,
        };
        u8::try_from(code & 0xff).unwrap_or(u8::MAX)
    }
}

// === impl Stage ===

impl Stage {
    fn next(self) -> Self {
        match self {
            Self::Wait => Self::Terminate,
            Self::Terminate | Self::Kill => Self::Kill,
        }
    }
}

/// Makes this process a child subreaper: descendants orphaned below it are
/// re-parented to it instead of to init, so none escapes the clean-up.
pub(crate) fn become_subreaper() -> Result<(), Errno> {
    nix::sys::prctl::set_child_subreaper(true)
}

/// Spawns `command` and returns its pid. Its status is collected by
/// [`reap`], never through `std::process::Child`.
pub(crate) fn spawn(mut command: Command) -> io::Result<Pid> {
    let child = command.spawn()?;
    let pid = i32::try_from(child.id())
        .map_err(|_| io::Error::other("the kernel returned a pid beyond i32"))?;
    Ok(Pid::from_raw(pid))
}

/// Sends `signal` to `pid`, a direct child not yet reaped. A child that
/// is already gone is not an error.
pub(crate) fn send(pid: Pid, signal: Signal) {
    if let Err(error) = kill(pid, signal)
        && error != Errno::ESRCH
    {
        eprintln!("tether: warning: could not send {signal} to process {pid}: {error}");
    }
}

/// Reaps every child that has exited; `Some` once `watched` is among them.
pub(crate) fn reap(watched: Pid) -> Option<CommandExit> {
    reap_exited(Some(watched)).watched
}

/// Waits for the descendants still running once the command has exited:
/// `grace` for them to finish, then SIGTERM and `grace` again, then
/// SIGKILL and a last `grace`, after which the stragglers are left to init
/// with a warning. A forwarded signal skips to the next stage.
pub(crate) async fn reap_descendants(signals: &mut Signals, grace: Duration) {
    let mut stage = Stage::Wait;
    let mut stage_ends = Instant::now() + grace;
    let mut terminated: HashSet<Pid> = HashSet::new();
    loop {
        if reap_exited(None).none_left {
            return;
        }
        match stage {
            Stage::Wait => {}
            Stage::Terminate => {
                for pid in direct_children() {
                    if terminated.insert(pid) {
                        send(pid, Signal::SIGTERM);
                    }
                }
            }
            Stage::Kill => {
                for pid in direct_children() {
                    send(pid, Signal::SIGKILL);
                }
            }
        }
        tokio::select! {
            event = signals.next() => {
                if let Event::Forward(_) = event {
                    stage = stage.next();
                    stage_ends = Instant::now() + grace;
                }
            }
            () = tokio::time::sleep_until(stage_ends) => {
                if stage == Stage::Kill {
                    let left = direct_children().len();
                    eprintln!("tether: warning: {left} process(es) the command left behind did not die after SIGKILL; leaving them");
                    return;
                }
                stage = stage.next();
                stage_ends = Instant::now() + grace;
            }
            () = tokio::time::sleep(SCAN_EVERY), if stage != Stage::Wait => {}
        }
    }
}

/// Reaps every exited child without blocking.
fn reap_exited(watched: Option<Pid>) -> Reaped {
    let mut reaped = Reaped {
        watched: None,
        none_left: false,
    };
    loop {
        let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, CommandExit::Code(code)),
            Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, CommandExit::Signal(signal)),
            Ok(WaitStatus::StillAlive) => return reaped,
            // Stops and continues are not asked for; nothing to collect.
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(Errno::ECHILD) => {
                reaped.none_left = true;
                return reaped;
            }
            Err(error) => {
                eprintln!("tether: warning: waiting for child processes failed: {error}");
                return reaped;
            }
        };
        if Some(pid) == watched {
            reaped.watched = Some(exit);
        }
    }
}

/// The pids whose parent is this process, from `/proc`.
fn direct_children() -> Vec<Pid> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            (parent_of(&stat)? == me).then_some(Pid::from_raw(pid))
        })
        .collect()
}

/// The parent pid in a `/proc/<pid>/stat` line. The command name (field 2)
/// is in parentheses and may itself contain spaces and parentheses, so the
/// fields are counted from the last `)`.
fn parent_of(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_ascii_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_like_a_shell() {
        assert_eq!(CommandExit::Code(0).exit_code(), 0);
        assert_eq!(CommandExit::Code(7).exit_code(), 7);
        assert_eq!(CommandExit::Signal(Signal::SIGTERM).exit_code(), 143);
        assert_eq!(CommandExit::Signal(Signal::SIGKILL).exit_code(), 137);
        assert_eq!(CommandExit::Signal(Signal::SIGINT).exit_code(), 130);
    }

    #[test]
    fn the_parent_is_counted_from_the_last_parenthesis() {
        let cases = [
            ("1234 (sleep) S 99 1234 1 0 -1", Some(99)),
            ("1234 (a) b (c) R 7 1 1", Some(7)),
            ("1234 (x y) Z 1 0", Some(1)),
            ("garbage", None),
            ("1 (init) S", None),
        ];
        for (stat, want) in cases {
            assert_eq!(parent_of(stat), want, "{stat}");
        }
    }

    #[test]
    fn stages_only_escalate() {
        assert_eq!(Stage::Wait.next(), Stage::Terminate);
        assert_eq!(Stage::Terminate.next(), Stage::Kill);
        assert_eq!(Stage::Kill.next(), Stage::Kill);
    }
}
