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
    /// The program ended first.
    Ended(String),
    /// Cancelled from the controller.
    Cancelled,
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
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));
    let (mut reader, mut writer) = pty.into_split();

    let started = Instant::now();
    let step_deadline = ctx.timeout.map(|t| started + t);
    let mut transcript = Capture::default();
    let mut text = String::new();
    let mut seen = 0usize;
    let mut buf = vec![0u8; 8192];
    let mut stop = None;

    'script: for (re, x) in &script {
        let wait = if x.timeout_ms > 0 {
            Duration::from_millis(x.timeout_ms)
        } else {
            DEFAULT_EXPECT_TIMEOUT
        };
        let mut deadline = Instant::now() + wait;
        if let Some(d) = step_deadline {
            deadline = deadline.min(d);
        }
        loop {
            if let Some(m) = re.find(&text[seen..]) {
                seen += m.end();
                break;
            }
            let read = tokio::select! {
                r = reader.read(&mut buf) => r,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    stop = Some(Stop::Timeout(format!(
                        "timed out after {:?} waiting for /{}/", wait, x.expect)));
                    break 'script;
                }
                _ = ctx.cancel.cancelled() => {
                    stop = Some(Stop::Cancelled);
                    break 'script;
                }
            };
            match read {
                Ok(n) if n > 0 => {
                    transcript.push(&buf[..n]);
                    ctx.stream(pb::OutputStream::Stdout, &buf[..n]);
                    text.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                // EOF, or EIO once the program has closed the terminal.
                _ => {
                    stop = Some(Stop::Ended(format!(
                        "the program ended before /{}/ appeared",
                        x.expect
                    )));
                    break 'script;
                }
            }
        }
        if let Err(e) = writer.write_all(x.send.as_bytes()).await {
            stop = Some(Stop::Ended(format!("cannot send to the program: {e}")));
            break;
        }
    }

    // The script is done (or stopped): read the rest until the program
    // exits, within the step's timeout.
    let ended = match stop {
        Some(Stop::Cancelled) => None,
        Some(Stop::Timeout(_)) => None,
        _ => loop {
            let until =
                step_deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
            let read = tokio::select! {
                r = reader.read(&mut buf) => r,
                _ = tokio::time::sleep_until(until.into()) => break None,
                _ = ctx.cancel.cancelled() => break None,
            };
            match read {
                Ok(n) if n > 0 => {
                    transcript.push(&buf[..n]);
                    ctx.stream(pb::OutputStream::Stdout, &buf[..n]);
                }
                _ => break Some(()),
            }
        },
    };

    let status = if ended.is_some() {
        match tokio::time::timeout(super::KILL_GRACE, child.wait()).await {
            Ok(Ok(status)) => Some(status),
            _ => None,
        }
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
    let mut result = match (&stop, ended) {
        (Some(Stop::Ended(why)), Ended::Exited(_)) => {
            // The script was not completed: a failure whatever the exit
            // code says.
            note.push(format!("modi-agent: interact: {why}\n").as_bytes());
            let mut r = result_of(
                Ended::Exited(std::process::ExitStatus::default()),
                transcript,
                note,
            );
            r.exit_code = None;
            r
        }
        (Some(Stop::Timeout(why)), ended) => {
            note.push(format!("modi-agent: interact: {why}\n").as_bytes());
            result_of(ended, transcript, note)
        }
        (_, ended) => result_of(ended, transcript, note),
    };
    if let (Some(Stop::Ended(_)), Some(status)) = (&stop, status) {
        result.stderr.extend_from_slice(
            format!("modi-agent: the program exited with {status}\n").as_bytes(),
        );
    }
    Ok(result)
}
