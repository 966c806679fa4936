//! `interact` steps: drive an interactive program on a pseudo-terminal
//! with expect/send pairs (ModiPY's expect/send). The program gets the PTY
//! as its controlling terminal in a session of its own; everything it
//! prints (including the echo of what was sent) is the step's stdout, the
//! transcript.

use std::time::{Duration, Instant};

use modi_proto::v1 as pb;
use nix::unistd::Pid;
use regex::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{Capture, Ctx, Ended, Executor, kill_group, result_of};

/// How long an `expect` waits when neither it nor the step has a timeout.
pub const DEFAULT_EXPECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the script stopped early.
enum Stop {
    /// The pattern did not show up in time.
    Timeout(String),
    /// The program ended (or could not be written to) first.
    Ended(String),
    /// Cancelled from the controller.
    Cancelled,
}

/// The controlling side of the PTY and what has been read from it.
struct Terminal<'a> {
    reader: pty_process::OwnedReadPty,
    writer: pty_process::OwnedWritePty,
    /// Everything the program printed: the step's stdout.
    transcript: Capture,
    /// The same, as text, for matching.
    text: String,
    /// How much of `text` earlier expects consumed.
    seen: usize,
    ctx: &'a Ctx<'a>,
    deadline: Option<Instant>,
}

impl Terminal<'_> {
    /// Reads one chunk into the transcript; `false` at end of file (or EIO
    /// once the program has closed the terminal).
    async fn read(&mut self) -> bool {
        let mut buf = [0u8; 8192];
        match self.reader.read(&mut buf).await {
            Ok(n) if n > 0 => {
                self.transcript.push(&buf[..n]);
                self.ctx.stream(pb::OutputStream::Stdout, &buf[..n]);
                self.text.push_str(&String::from_utf8_lossy(&buf[..n]));
                true
            }
            _ => false,
        }
    }

    /// Plays the expect/send pairs in order.
    async fn script(&mut self, script: &[(Regex, &pb::Exchange)]) -> Result<(), Stop> {
        for (re, x) in script {
            let wait = if x.timeout_ms > 0 {
                Duration::from_millis(x.timeout_ms)
            } else {
                DEFAULT_EXPECT_TIMEOUT
            };
            let mut deadline = Instant::now() + wait;
            if let Some(d) = self.deadline {
                deadline = deadline.min(d);
            }
            let cancel = self.ctx.cancel.clone();
            loop {
                if let Some(m) = re.find(&self.text[self.seen..]) {
                    self.seen += m.end();
                    break;
                }
                let more = tokio::select! {
                    more = self.read() => more,
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        return Err(Stop::Timeout(format!(
                            "timed out after {wait:?} waiting for /{}/", x.expect)));
                    }
                    _ = cancel.cancelled() => return Err(Stop::Cancelled),
                };
                if !more {
                    return Err(Stop::Ended(format!(
                        "the program ended before /{}/ appeared",
                        x.expect
                    )));
                }
            }
            self.writer
                .write_all(x.send.as_bytes())
                .await
                .map_err(|e| Stop::Ended(format!("cannot send to the program: {e}")))?;
        }
        Ok(())
    }

    /// Reads the rest until the program closes the terminal; `false` if
    /// the step's timeout or a cancel came first.
    async fn drain(&mut self) -> bool {
        let until = self
            .deadline
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 86_400));
        let cancel = self.ctx.cancel.clone();
        loop {
            let more = tokio::select! {
                more = self.read() => more,
                _ = tokio::time::sleep_until(until.into()) => return false,
                _ = cancel.cancelled() => return false,
            };
            if !more {
                return true;
            }
        }
    }
}

pub(super) async fn run(
    exec: &Executor,
    interact: &pb::Interact,
    step: &pb::Step,
    ctx: &Ctx<'_>,
) -> Result<pb::StepResult, String> {
    let script = interact
        .script
        .iter()
        .map(|x| {
            Regex::new(&x.expect)
                .map(|re| (re, x))
                .map_err(|e| format!("bad expect pattern {:?}: {e}", x.expect))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let (pty, pts) = pty_process::open().map_err(|e| format!("cannot open a pty: {e}"))?;
    let _ = pty.resize(pty_process::Size::new(24, 200));
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(&interact.command);
    exec.prepare(&mut cmd, step)?;
    let mut child = pty_process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn(pts)
        .map_err(|e| format!("cannot start on a pty: {e}"))?;
    // A session leader: its pid is its process group.
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));
    let (reader, writer) = pty.into_split();
    let mut term = Terminal {
        reader,
        writer,
        transcript: Capture::default(),
        text: String::new(),
        seen: 0,
        ctx,
        deadline: ctx.timeout.map(|t| Instant::now() + t),
    };

    let stop = term.script(&script).await.err();
    let closed = match stop {
        Some(Stop::Timeout(_) | Stop::Cancelled) => false,
        None | Some(Stop::Ended(_)) => term.drain().await,
    };
    let status = if closed {
        tokio::time::timeout(super::KILL_GRACE, child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    } else {
        None
    };
    let ended = match status {
        Some(status) => Ended::Exited(status),
        None => {
            if let Some(pgid) = pgid {
                kill_group(&mut child, pgid).await;
            }
            if ctx.cancel.is_cancelled() {
                Ended::Cancelled
            } else {
                Ended::TimedOut
            }
        }
    };
    let mut note = Capture::default();
    if let Some(Stop::Timeout(why) | Stop::Ended(why)) = &stop {
        note.push(format!("modi-agent: interact: {why}\n").as_bytes());
    }
    let mut result = result_of(ended, term.transcript, note);
    if let (Some(Stop::Ended(_)), Some(status)) = (&stop, status) {
        // The script was not completed: a failure whatever the exit code.
        result.exit_code = None;
        result.stderr.extend_from_slice(
            format!("modi-agent: the program exited with {status}\n").as_bytes(),
        );
    }
    Ok(result)
}
