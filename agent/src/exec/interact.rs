//! `interact` steps: drive an interactive program on a pseudo-terminal
//! with expect/send pairs (ModiPY's expect/send). The program gets the PTY
//! as its controlling terminal in a session of its own; everything it
//! prints (including the echo of what was sent) is the step's stdout, the
//! transcript. `expect` patterns see what it printed; the transcript and
//! the live output have secrets' values masked.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use modi_proto::v1 as pb;
use nix::unistd::Pid;
use regex::bytes::Regex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use super::{Capture, Ctx, DRAIN_GRACE, Ended, Executor, kill_group, result_of};
use crate::secrets::Mask;

/// How long an `expect` waits when neither it nor the step has a timeout.
pub const DEFAULT_EXPECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How much output an `expect` matches against: the last this many bytes
/// the program printed since the previous match. (The transcript is capped
/// separately, at [`super::OUTPUT_CAP`].)
pub const EXPECT_WINDOW: usize = 64 * 1024;

/// Why the script stopped early.
enum Stop {
    /// The pattern did not show up in time (or the send could not be made
    /// in time).
    Timeout(String),
    /// The program ended (or could not be written to) first.
    Ended(String),
    /// Cancelled from the controller.
    Cancelled,
}

/// The program on its PTY.
struct Terminal<'a> {
    child: &'a mut Child,
    reader: pty_process::OwnedReadPty,
    writer: pty_process::OwnedWritePty,
    screen: Screen<'a>,
    /// The step's deadline.
    deadline: Option<Instant>,
}

/// What the program printed.
struct Screen<'a> {
    /// Everything: the step's stdout.
    transcript: Capture,
    /// What no `expect` has consumed yet, at most [`EXPECT_WINDOW`] bytes.
    unseen: Vec<u8>,
    /// Until the terminal reports end of file (EIO once every process has
    /// closed it).
    open: bool,
    /// Masks secrets' values in the transcript and the live output.
    mask: Mask,
    ctx: &'a Ctx<'a>,
}

impl Screen<'_> {
    /// Reads one chunk; `false` at end of file.
    async fn read(&mut self, reader: &mut pty_process::OwnedReadPty) -> bool {
        let mut buf = [0u8; 8192];
        match reader.read(&mut buf).await {
            Ok(n) if n > 0 => {
                self.keep(buf[..n].to_vec());
                self.unseen.extend_from_slice(&buf[..n]);
                let excess = self.unseen.len().saturating_sub(EXPECT_WINDOW);
                self.unseen.drain(..excess);
                true
            }
            _ => {
                self.open = false;
                false
            }
        }
    }

    /// Keeps what the program printed, masked (part of a value cut at
    /// the end waits for the next read, or [`Screen::flush`]).
    fn keep(&mut self, data: Vec<u8>) {
        let data = self.mask.feed(&data);
        self.show(&data);
    }

    /// Keeps what the mask still holds: the transcript is complete.
    fn flush(&mut self) {
        let data = self.mask.finish();
        self.show(&data);
    }

    fn show(&mut self, data: &[u8]) {
        if !data.is_empty() {
            self.transcript.push(data);
            self.ctx.stream(pb::OutputStream::Stdout, data);
        }
    }

    /// Reads until end of file.
    async fn read_to_end(&mut self, reader: &mut pty_process::OwnedReadPty) {
        while self.read(reader).await {}
    }

    /// Consumes the output up to the end of the first match of `re`.
    fn consume(&mut self, re: &Regex) -> bool {
        match re.find(&self.unseen) {
            Some(m) => {
                let end = m.end();
                self.unseen.drain(..end);
                true
            }
            None => false,
        }
    }
}

/// Resolves at `deadline`, or never.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

impl Terminal<'_> {
    /// Plays the expect/send pairs in order.
    async fn script(&mut self, script: &[(Regex, &pb::Exchange)]) -> Result<(), Stop> {
        let cancel = self.screen.ctx.cancel.clone();
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
            while !self.screen.consume(re) {
                let more = tokio::select! {
                    more = self.screen.read(&mut self.reader) => more,
                    _ = until(Some(deadline)) => {
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
            // A program that does not read can fill the terminal's input
            // buffer: the send too must give way to the deadline or a cancel.
            tokio::select! {
                sent = self.writer.write_all(x.send.as_bytes()) => sent
                    .map_err(|e| Stop::Ended(format!("cannot send to the program: {e}")))?,
                _ = until(Some(deadline)) => {
                    return Err(Stop::Timeout(format!(
                        "timed out after {wait:?} sending the answer to /{}/", x.expect)));
                }
                _ = cancel.cancelled() => return Err(Stop::Cancelled),
            }
        }
        Ok(())
    }

    /// After the script: reads on until the program exits, then for at
    /// most [`DRAIN_GRACE`] more (a process it left in the background may
    /// hold the terminal open for ever). `None` if the step's timeout or a
    /// cancel came first.
    async fn finish(&mut self) -> Option<ExitStatus> {
        let cancel = self.screen.ctx.cancel.clone();
        let status = loop {
            tokio::select! {
                status = self.child.wait() => break status.ok()?,
                // Reading keeps the program from blocking on a full terminal.
                _ = self.screen.read_to_end(&mut self.reader), if self.screen.open => {}
                _ = until(self.deadline) => return None,
                _ = cancel.cancelled() => return None,
            }
        };
        if self.screen.open {
            let _ =
                tokio::time::timeout(DRAIN_GRACE, self.screen.read_to_end(&mut self.reader)).await;
        }
        Some(status)
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
    cmd.env(crate::pgroup::DISPATCH_ENV, ctx.id);
    let mut child = pty_process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn(pts)
        .map_err(|e| format!("cannot start on a pty: {e}"))?;
    if let Err(result) = exec.record_group(ctx.id, &mut child).await {
        return Ok(result);
    }
    // A session leader: its pid is its process group.
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));
    let (reader, writer) = pty.into_split();
    let mut term = Terminal {
        child: &mut child,
        reader,
        writer,
        screen: Screen {
            transcript: Capture::default(),
            unseen: Vec::new(),
            open: true,
            mask: ctx.secrets.mask(),
            ctx,
        },
        deadline: ctx.timeout.map(|t| Instant::now() + t),
    };

    let stop = term.script(&script).await.err();
    let status = match stop {
        Some(Stop::Timeout(_) | Stop::Cancelled) => None,
        None | Some(Stop::Ended(_)) => term.finish().await,
    };
    term.screen.flush();
    let transcript = term.screen.transcript;
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
    let mut result = result_of(ended, transcript, note);
    if let (Some(Stop::Ended(_)), Some(status)) = (&stop, status) {
        // The script was not completed: a failure whatever the exit code.
        result.exit_code = None;
        result.stderr.extend_from_slice(
            format!("modi-agent: the program exited with {status}\n").as_bytes(),
        );
    }
    Ok(result)
}
