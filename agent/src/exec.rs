//! The step executor: runs one step on this host and returns its result.
//!
//! - `run` (through `/bin/sh -c`) and `argv` steps run as children in their
//!   own process group, with `kill_on_drop`; stdout and stderr are read
//!   concurrently, the first [`OUTPUT_CAP`] bytes of each kept and the rest
//!   counted, chunks streamed live as they come. A timeout or a cancel
//!   kills the whole group (TERM, then KILL after [`KILL_GRACE`]); the
//!   child is always reaped.
//! - Every step process (`run`, `argv`, a `file` step's `validate`,
//!   `interact`) is recorded in the journal, once spawned, as the leader
//!   of its process group ([`Executor::record_groups_in`]): `kill_on_drop`
//!   does nothing when the agent itself is SIGKILLed, so the next agent
//!   kills the orphaned group before it reports the step `lost`. A group
//!   that cannot be recorded is killed at once and the step is `lost`.
//! - `file` and `restore` steps live in [`file`]; `interact` in
//!   [`interact`].
//! - A step's secrets ([`crate::secrets`]) are filled in in memory just
//!   before it runs, and every output stream goes through a mask that
//!   replaces their values with `<secret NAME>` before anything is kept
//!   or streamed.

mod file;
mod interact;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use modi_proto::v1 as pb;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::journal::Journal;
use crate::secrets::Secrets;

/// Bytes of each output stream kept per step.
pub const OUTPUT_CAP: usize = 1 << 20;
/// Time between TERM and KILL when a step's group is stopped.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// How long to keep reading output after the step's process exited (a
/// background child may hold the pipe open).
pub const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// How long a `file` step's backup is kept: past this, a `restore` of it
/// finds nothing to put back. Older backups are deleted when the agent
/// starts.
pub const BACKUP_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// How long the record of what a `file` step replaced is kept (after its
/// data is gone, a restore fails with "expired" rather than passing).
pub const BACKUP_RECORD_RETENTION: Duration = Duration::from_secs(365 * 86_400);

/// Runs steps for one agent.
#[derive(Clone, Debug)]
pub struct Executor {
    work_dir: PathBuf,
    backups: PathBuf,
    /// Where each step's process group is recorded, if anywhere.
    journal: Option<Arc<Journal>>,
}

/// Where live output goes (the session forwards it to the controller when
/// connected, and drops it otherwise).
pub type OutputSink = mpsc::Sender<pb::OutputChunk>;

/// The first bytes of one output stream, and how many more there were.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    kept: Vec<u8>,
    dropped: u64,
}

impl Capture {
    pub(crate) fn push(&mut self, data: &[u8]) {
        let room = OUTPUT_CAP.saturating_sub(self.kept.len());
        let take = room.min(data.len());
        self.kept.extend_from_slice(&data[..take]);
        self.dropped += (data.len() - take) as u64;
    }
}

/// How a process ended, before it becomes a result.
pub(crate) enum Ended {
    Exited(std::process::ExitStatus),
    TimedOut,
    Cancelled,
}

impl Executor {
    /// An executor whose steps run in `work_dir` and whose `file` steps keep
    /// what they replaced in `backups`. Backups older than
    /// [`BACKUP_RETENTION`] are deleted now.
    pub fn new(work_dir: PathBuf, backups: PathBuf) -> std::io::Result<Executor> {
        std::fs::create_dir_all(&work_dir)?;
        crate::fsutil::private_dir(&backups)?;
        match file::prune_backups(&backups, BACKUP_RETENTION, BACKUP_RECORD_RETENTION) {
            Ok(0) => {}
            Ok(n) => tracing::info!(files = n, dir = %backups.display(), "deleted old backups"),
            Err(e) => {
                tracing::warn!(dir = %backups.display(), error = %e, "cannot prune old backups");
            }
        }
        Ok(Executor {
            work_dir,
            backups,
            journal: None,
        })
    }

    /// Records the process group of every step it spawns in `journal`,
    /// under the step's dispatch id, so that an agent restarting after a
    /// crash can kill what is left of it (see [`crate::journal`]).
    pub fn record_groups_in(mut self, journal: Arc<Journal>) -> Executor {
        self.journal = Some(journal);
        self
    }

    /// Records the group `child` leads (it was just spawned with a group of
    /// its own) in the journal. If that fails the step must not go on
    /// unrecorded: its group is killed at once and `Err` holds the result
    /// to report.
    pub(crate) async fn record_group(
        &self,
        id: &str,
        child: &mut Child,
    ) -> Result<(), pb::StepResult> {
        let (Some(journal), Some(pid)) = (&self.journal, child.id()) else {
            return Ok(());
        };
        let Err(e) = journal.record_group(id, pid) else {
            return Ok(());
        };
        tracing::error!(id, pid, error = %e, "cannot record a step's process group; killing it");
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        let _ = child.wait().await;
        Err(pb::StepResult {
            termination: pb::Termination::Lost as i32,
            stderr: format!(
                "modi-agent: cannot record the step's process group {pid} in the journal ({e}); \
                 it was killed as soon as it started, its outcome is unknown\n"
            )
            .into_bytes(),
            ..Default::default()
        })
    }

    /// Runs `step` under dispatch id `id`, with the values of the secrets
    /// it uses. Never fails: anything that goes wrong is in the result.
    pub async fn execute(
        &self,
        id: &str,
        mut step: pb::Step,
        secrets: &Secrets,
        output: OutputSink,
        cancel: CancellationToken,
    ) -> pb::StepResult {
        let started = Instant::now();
        secrets.fill(&mut step);
        let mut result = match self.dispatch(id, &step, secrets, &output, &cancel).await {
            Ok(r) => r,
            Err(message) => failed_to_start(message),
        };
        result.dispatch_id = id.to_string();
        result.duration_ms = started.elapsed().as_millis() as u64;
        result
    }

    async fn dispatch(
        &self,
        id: &str,
        step: &pb::Step,
        secrets: &Secrets,
        output: &OutputSink,
        cancel: &CancellationToken,
    ) -> Result<pb::StepResult, String> {
        let timeout = (step.timeout_ms > 0).then(|| Duration::from_millis(step.timeout_ms));
        let ctx = Ctx {
            id,
            output,
            cancel,
            timeout,
            secrets,
        };
        match &step.action {
            Some(pb::step::Action::Run(command)) => {
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c").arg(command);
                self.run_command(cmd, step, &ctx).await
            }
            Some(pb::step::Action::Argv(argv)) => {
                let (program, args) = argv.args.split_first().ok_or("argv step with no program")?;
                let mut cmd = Command::new(program);
                cmd.args(args);
                self.run_command(cmd, step, &ctx).await
            }
            Some(pb::step::Action::File(f)) => file::write(self, id, f, step, &ctx).await,
            Some(pb::step::Action::Restore(r)) => file::restore(self, &r.of).await,
            Some(pb::step::Action::Interact(i)) => interact::run(self, i, step, &ctx).await,
            None => Err("step has no action (controller and agent versions differ?)".into()),
        }
    }

    /// The file at `path` (as a `file` step names it), read-only and at
    /// most `max_bytes`, for `modi plan --diff`.
    pub async fn read_file(&self, path: &str, max_bytes: u64) -> pb::FileContent {
        let path = self.resolve(path);
        tokio::task::spawn_blocking(move || file::read(&path, max_bytes))
            .await
            .unwrap_or_else(|e| pb::FileContent {
                error: format!("the read failed: {e}"),
                ..Default::default()
            })
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.work_dir.join(p)
        }
    }

    /// Applies the step's cwd, env and user to `cmd`.
    fn prepare(&self, cmd: &mut Command, step: &pb::Step) -> Result<(), String> {
        let cwd = if step.cwd.is_empty() {
            self.work_dir.clone()
        } else {
            self.resolve(&step.cwd)
        };
        if !cwd.is_dir() {
            return Err(format!("cwd {} is not a directory", cwd.display()));
        }
        cmd.current_dir(cwd);
        cmd.envs(&step.env);
        if !step.user.is_empty() {
            let user = nix::unistd::User::from_name(&step.user)
                .map_err(|e| format!("cannot look up user {:?}: {e}", step.user))?
                .ok_or_else(|| format!("no such user {:?}", step.user))?;
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
            cmd.env("USER", &user.name)
                .env("LOGNAME", &user.name)
                .env("HOME", &user.dir);
        }
        Ok(())
    }

    async fn run_command(
        &self,
        mut cmd: Command,
        step: &pb::Step,
        ctx: &Ctx<'_>,
    ) -> Result<pb::StepResult, String> {
        self.prepare(&mut cmd, step)?;
        // Marks every process of the step, so a restarted agent finds it
        // even if it died before recording the process group.
        cmd.env(crate::pgroup::DISPATCH_ENV, ctx.id);
        cmd.process_group(0)
            .kill_on_drop(true)
            .stdin(if step.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
        if let Err(result) = self.record_group(ctx.id, &mut child).await {
            return Ok(result);
        }
        if let (Some(mut pipe), Some(bytes)) = (child.stdin.take(), step.stdin.clone()) {
            tokio::spawn(async move {
                // A child that exits without reading its input is fine.
                let _ = pipe.write_all(&bytes).await;
            });
        }
        let out = spawn_reader(child.stdout.take(), ctx, pb::OutputStream::Stdout);
        let err = spawn_reader(child.stderr.take(), ctx, pb::OutputStream::Stderr);
        let ended = wait_or_kill(&mut child, ctx).await;
        let (stdout, stderr) = collect(out, err).await;
        Ok(result_of(ended, stdout, stderr))
    }
}

/// What every step kind needs from the dispatch.
pub(crate) struct Ctx<'a> {
    pub(crate) id: &'a str,
    pub(crate) output: &'a OutputSink,
    pub(crate) cancel: &'a CancellationToken,
    pub(crate) timeout: Option<Duration>,
    /// The step's secrets, whose values its output must not show.
    pub(crate) secrets: &'a Secrets,
}

impl Ctx<'_> {
    /// Sends a live chunk, dropping it if the session cannot keep up: the
    /// result carries the output anyway.
    pub(crate) fn stream(&self, stream: pb::OutputStream, data: &[u8]) {
        let _ = self.output.try_send(pb::OutputChunk {
            dispatch_id: self.id.to_string(),
            stream: stream as i32,
            data: data.to_vec(),
        });
    }
}

/// A task reading one output stream until end of file or told to stop.
struct Reader {
    task: tokio::task::JoinHandle<Capture>,
    stop: CancellationToken,
}

fn spawn_reader<R>(pipe: Option<R>, ctx: &Ctx<'_>, stream: pb::OutputStream) -> Reader
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let id = ctx.id.to_string();
    let output = ctx.output.clone();
    let mut mask = ctx.secrets.mask();
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut capture = Capture::default();
        let Some(mut pipe) = pipe else {
            return capture;
        };
        let mut buf = vec![0u8; 16 * 1024];
        let mut keep = |data: Vec<u8>| {
            if data.is_empty() {
                return;
            }
            capture.push(&data);
            let _ = output.try_send(pb::OutputChunk {
                dispatch_id: id.clone(),
                stream: stream as i32,
                data,
            });
        };
        loop {
            let read = tokio::select! {
                biased;
                read = pipe.read(&mut buf) => read,
                _ = stopped.cancelled() => break,
            };
            match read {
                Ok(0) | Err(_) => break,
                Ok(n) => keep(mask.feed(&buf[..n])),
            }
        }
        keep(mask.finish());
        capture
    });
    Reader { task, stop }
}

/// Waits for both readers to reach end of file, but not for ever: a
/// process left in the background may hold a pipe open. Past
/// [`DRAIN_GRACE`] they stop and what they read so far is the capture.
async fn collect(out: Reader, err: Reader) -> (Capture, Capture) {
    let grace = tokio::time::sleep(DRAIN_GRACE);
    tokio::pin!(grace);
    let stdout = out.finish(grace.as_mut()).await;
    let stderr = err.finish(grace.as_mut()).await;
    (stdout, stderr)
}

impl Reader {
    /// The capture at end of file, or what was read when `grace` ends.
    async fn finish(mut self, grace: std::pin::Pin<&mut tokio::time::Sleep>) -> Capture {
        tokio::select! {
            capture = &mut self.task => return capture.unwrap_or_default(),
            _ = grace => {}
        }
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

/// Waits for the child; on timeout or cancel kills its whole process group.
/// The child is reaped either way.
pub(crate) async fn wait_or_kill(child: &mut Child, ctx: &Ctx<'_>) -> Ended {
    let pgid = child.id().map(|p| Pid::from_raw(p as i32));
    let deadline = async {
        match ctx.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        status = child.wait() => match status {
            Ok(status) => return Ended::Exited(status),
            Err(_) => Ended::Cancelled,
        },
        _ = deadline => Ended::TimedOut,
        _ = ctx.cancel.cancelled() => Ended::Cancelled,
    };
    if let Some(pgid) = pgid {
        kill_group(child, pgid).await;
    }
    ended
}

/// TERM the group, KILL it after the grace period, reap the child.
pub(crate) async fn kill_group(child: &mut Child, pgid: Pid) {
    let _ = killpg(pgid, Signal::SIGTERM);
    if tokio::time::timeout(KILL_GRACE, child.wait())
        .await
        .is_err()
    {
        let _ = child.start_kill();
    }
    // Whatever else is left in the group goes too.
    let _ = killpg(pgid, Signal::SIGKILL);
    let _ = child.wait().await;
}

pub(crate) fn result_of(ended: Ended, stdout: Capture, stderr: Capture) -> pb::StepResult {
    let (termination, exit_code) = match ended {
        Ended::Exited(status) => (pb::Termination::Exited, status.code()),
        Ended::TimedOut => (pb::Termination::TimedOut, None),
        Ended::Cancelled => (pb::Termination::Cancelled, None),
    };
    let mut stderr = stderr;
    if let Ended::Exited(status) = ended {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            stderr.push(format!("\n[modi-agent: killed by signal {sig}]\n").as_bytes());
        }
    }
    pb::StepResult {
        termination: termination as i32,
        exit_code,
        stdout_dropped: stdout.dropped,
        stderr_dropped: stderr.dropped,
        stdout: stdout.kept,
        stderr: stderr.kept,
        ..Default::default()
    }
}

pub(crate) fn failed_to_start(message: String) -> pb::StepResult {
    pb::StepResult {
        termination: pb::Termination::FailedToStart as i32,
        stderr: format!("modi-agent: {message}\n").into_bytes(),
        ..Default::default()
    }
}

/// Quotes `s` for `/bin/sh`.
pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests;
