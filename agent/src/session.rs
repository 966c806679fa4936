//! The connection loop: dial the controller, hold one `Connect` stream,
//! run what it sends, report back; on any failure, reconnect with
//! exponential backoff and jitter. Steps keep running while disconnected;
//! their results wait in the journal and are re-reported on reconnect.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use modi_proto::tls::{self, ClientIdentity, Trust};
use modi_proto::v1 as pb;
use nix::fcntl::{Flock, FlockArg};
use pb::agent_message::Msg as Up;
use pb::agent_service_client::AgentServiceClient;
use pb::controller_message::Msg as Down;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, AgentConfig};
use crate::exec::{self, Executor};
use crate::journal::{self, Begin, Journal};
use crate::secrets::Secrets;

/// Why the agent could not run at all (as opposed to a lost connection,
/// which it retries for ever).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A state file is missing or bad.
    #[error("cannot read {path}: {detail}")]
    State {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        detail: String,
    },
    /// The configuration cannot work.
    #[error("{0}")]
    Config(String),
    /// This data dir holds no enrolled agent (`modi-agent join` has not
    /// run, or did not finish).
    #[error("not enrolled: run `modi-agent join ...` first (the line `modi token create` prints); {} is missing", missing.display())]
    NotEnrolled {
        /// The file that is not there.
        missing: PathBuf,
    },
    /// The controller refuses this agent for good (revoked): retrying
    /// cannot help, so the agent stops.
    #[error("{0}; stopping (re-enrol with a new token to bring this host back)")]
    Refused(String),
    /// Another agent holds the data dir's lock: two agents on one journal
    /// could both run the same step.
    #[error("another modi-agent is running with data dir {}", data_dir.display())]
    AlreadyRunning {
        /// The data dir.
        data_dir: PathBuf,
    },
}

/// How many step events (live output, results) wait for the session.
const INTERNAL_QUEUE: usize = 1024;
/// How many messages wait to go up the stream.
const OUTBOUND_QUEUE: usize = 1024;

/// What step tasks tell the session.
enum Internal {
    Output(pb::OutputChunk),
    Finished(pb::StepResult),
    FileContent(pb::FileContent),
}

struct Agent {
    config: AgentConfig,
    journal: Arc<Journal>,
    exec: Executor,
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
    internal_tx: mpsc::Sender<Internal>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    /// Certificate renewal in progress, if any.
    renewal: crate::renew::Renewal,
    /// A renewed certificate was installed: reconnect with it.
    renewed: std::sync::atomic::AtomicBool,
}

/// How often the agent checks whether its certificate is due for renewal.
const RENEW_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// The most of a file `modi plan --diff` may read (whatever the controller
/// asks): 1 MiB, as the controller's own cap.
const MAX_READ: u64 = 1 << 20;

fn read_state(config: &AgentConfig, file: &str) -> Result<String, RunError> {
    let path = config.data_dir.join(file);
    std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            RunError::NotEnrolled { missing: path }
        } else {
            RunError::State {
                path,
                detail: e.to_string(),
            }
        }
    })
}

/// How a session attempt ended badly.
enum Failed {
    /// Try again later (network, controller down, TLS trouble).
    Retry(String),
    /// The controller refuses this agent for good.
    Refused(String),
}

/// Tells a refusal that retrying cannot cure from any other failure, by
/// the status code: the controller answers `PermissionDenied` to a
/// revoked or unknown agent. (A certificate refused at the handshake is
/// found by [`crate::probe`].)
fn classify(status: &tonic::Status, name: &str) -> Failed {
    if status.code() == tonic::Code::PermissionDenied {
        return Failed::Refused(format!(
            "the controller refuses agent {name:?}: {}",
            status.message()
        ));
    }
    Failed::Retry(crate::error_chain(status))
}

/// Takes the data dir's lock, held until the returned value is dropped.
fn lock_data_dir(data_dir: &Path) -> Result<Flock<File>, RunError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(config::LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&path)
        .map_err(|e| RunError::State {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            RunError::AlreadyRunning {
                data_dir: data_dir.to_path_buf(),
            }
        } else {
            RunError::State {
                path,
                detail: format!("cannot lock: {errno}"),
            }
        }
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs the agent until `shutdown` is cancelled. Steps in flight at
/// shutdown are killed (their results are `lost` on the next start only if
/// the agent dies before recording them).
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    // A certificate renewal a crash cut short is finished first.
    crate::renew::recover(&config.data_dir).map_err(|e| RunError::State {
        path: config.data_dir.join(config::CERT_FILE),
        detail: e.to_string(),
    })?;
    let ca = read_state(&config, config::CA_FILE)?;
    // Before the journal: its recovery must not race another agent's steps.
    let _lock = lock_data_dir(&config.data_dir)?;
    let state = |what: &str, e: std::io::Error| RunError::State {
        path: config.data_dir.join(what),
        detail: e.to_string(),
    };
    // Opening may wait for steps a crashed agent left running to be killed.
    let journal_dir = config.data_dir.join("journal");
    let (journal, recovered) = tokio::task::spawn_blocking(move || Journal::open(&journal_dir))
        .await
        .map_err(std::io::Error::other)
        .and_then(|opened| opened)
        .map_err(|e| state("journal", e))?;
    if !recovered.is_empty() {
        tracing::info!(count = recovered.len(), "results waiting to be reported");
    }
    let journal = Arc::new(journal);
    let exec = Executor::new(config.work_dir(), config.data_dir.join("backups"))
        .map_err(|e| state("work", e))?
        .record_groups_in(journal.clone());
    let (internal_tx, mut internal_rx) = mpsc::channel(INTERNAL_QUEUE);
    let agent = Agent {
        config,
        journal,
        exec,
        running: Arc::default(),
        internal_tx,
        tasks: TaskTracker::new(),
        shutdown: shutdown.clone(),
        renewal: crate::renew::Renewal::default(),
        renewed: false.into(),
    };
    // The controllers of its set, tried in turn (one, usually).
    let urls = agent.config.urls();
    let mut at = 0;
    let mut client = agent.client(&ca, &urls[at])?;
    let mut backoff = config::BACKOFF_MIN;
    // Controllers tried without a session since the last one.
    let mut failed_in_a_row = 0;
    tracing::info!(controller = %urls.join(", "), name = %agent.config.name, "agent starting");
    let mut refused = None;
    while !shutdown.is_cancelled() {
        match agent.session(&mut client, &mut internal_rx).await {
            Ok(()) => {
                backoff = config::BACKOFF_MIN;
                failed_in_a_row = 0;
            }
            Err(Failed::Retry(e)) => {
                tracing::warn!(controller = %urls[at], error = %e, "session ended");
                failed_in_a_row += 1;
                let revoked = match agent.identity() {
                    Ok(identity) => {
                        crate::probe::certificate_revoked(&urls[at], &ca, &identity).await
                    }
                    Err(_) => false,
                };
                if revoked {
                    let why = format!(
                        "agent {:?} was revoked: the controller refuses its certificate (certificate_revoked)",
                        agent.config.name
                    );
                    tracing::error!(error = %why, "refused by the controller; stopping");
                    refused = Some(why);
                    break;
                }
            }
            Err(Failed::Refused(why)) => {
                tracing::error!(error = %why, "refused by the controller; stopping");
                refused = Some(why);
                break;
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        if agent
            .renewed
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            // Reconnect at once with the new certificate.
            client = agent.client(&ca, &urls[at])?;
            tracing::info!("certificate renewed; reconnecting with it");
            continue;
        }
        if urls.len() > 1 {
            // In a set, the next controller may be the active one (this
            // one died, or is on standby): try each once before waiting.
            at = (at + 1) % urls.len();
            client = agent.client(&ca, &urls[at])?;
            if failed_in_a_row < urls.len() {
                continue;
            }
            failed_in_a_row = 0;
        }
        // Full jitter on the upper half, so a fleet that lost its
        // controller does not come back all at once.
        let delay = rand::rng().random_range(backoff / 2..=backoff);
        tracing::debug!(?delay, "reconnecting");
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = shutdown.cancelled() => break,
                // Results are journaled; live output has nowhere to go.
                Some(_) = internal_rx.recv() => {}
            }
        }
        // A set takes over within its lease's TTL: its agents keep
        // looking often enough to be back a moment after.
        let most = if urls.len() > 1 {
            config::SET_BACKOFF_MAX
        } else {
            config::BACKOFF_MAX
        };
        backoff = (backoff * 2).min(most);
    }
    agent.stop(internal_rx).await;
    match refused {
        Some(why) => Err(RunError::Refused(why)),
        None => Ok(()),
    }
}

impl Agent {
    /// A client for the controller with the certificate now on disk.
    /// The agent's certificate and key as they are on disk now.
    fn identity(&self) -> Result<ClientIdentity, RunError> {
        Ok(ClientIdentity {
            cert_pem: read_state(&self.config, config::CERT_FILE)?,
            key_pem: read_state(&self.config, config::KEY_FILE)?,
        })
    }

    fn client(
        &self,
        ca: &str,
        url: &str,
    ) -> Result<AgentServiceClient<tonic::transport::Channel>, RunError> {
        let identity = self.identity()?;
        let channel = tls::channel(url, Trust::Ca(ca), Some(&identity), config::CONNECT_TIMEOUT)
            .map_err(|e| RunError::Config(e.to_string()))?;
        Ok(AgentServiceClient::new(channel))
    }

    /// Kills the steps in flight and waits for their tasks.
    async fn stop(self, internal_rx: mpsc::Receiver<Internal>) {
        // Nobody reads step events any more: a step finishing now must not
        // wait on a full queue (its result is journaled already).
        drop(internal_rx);
        self.tasks.close();
        for token in self.running.lock().expect("running lock").values() {
            token.cancel();
        }
        self.tasks.wait().await;
    }

    /// One session. `Ok` when it was established and later ended (reset
    /// the backoff); `Err` when it could not be established.
    async fn session(
        &self,
        client: &mut AgentServiceClient<tonic::transport::Channel>,
        internal_rx: &mut mpsc::Receiver<Internal>,
    ) -> Result<(), Failed> {
        let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(OUTBOUND_QUEUE);
        let running: Vec<String> = self
            .running
            .lock()
            .expect("running lock")
            .keys()
            .cloned()
            .collect();
        let hello = pb::Hello {
            agent_version: crate::facts::VERSION.into(),
            labels: self.config.labels.clone(),
            facts: crate::facts::gather(),
            running,
            heartbeat_interval_ms: self.config.heartbeat().as_millis() as u64,
        };
        // The first message on an empty queue: there is room.
        let _ = out_tx.try_send(pb::AgentMessage {
            msg: Some(Up::Hello(hello)),
        });
        let pending = self
            .journal
            .pending()
            .map_err(|e| Failed::Retry(e.to_string()))?;
        let inbound = client
            .connect(ReceiverStream::new(out_rx))
            .await
            .map_err(|s| classify(&s, &self.config.name))?
            .into_inner();
        tracing::info!(pending = pending.len(), "connected");
        for result in pending {
            if out_tx
                .send(pb::AgentMessage {
                    msg: Some(Up::Result(result)),
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        self.serve(inbound, &out_tx, internal_rx).await;
        Ok(())
    }

    /// Carries an established session until it ends: runs what comes
    /// down, sends step events, results and heartbeats up.
    async fn serve<S>(
        &self,
        mut inbound: S,
        out_tx: &mpsc::Sender<pb::AgentMessage>,
        internal_rx: &mut mpsc::Receiver<Internal>,
    ) where
        S: Stream<Item = Result<pb::ControllerMessage, tonic::Status>> + Unpin,
    {
        let up = |msg: Up| pb::AgentMessage { msg: Some(msg) };
        // Results wait here for room on the stream: live output may be
        // dropped when it is full, a result never. Those still here when
        // the session ends are journaled, and sent again by the next one.
        let mut results: VecDeque<pb::StepResult> = VecDeque::new();
        let mut heartbeat = tokio::time::interval(self.config.heartbeat());
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renew_check = tokio::time::interval(RENEW_CHECK);
        renew_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let renew_due = crate::renew::due(&self.config.data_dir);
        loop {
            tokio::select! {
                msg = inbound.next() => match msg {
                    Some(Ok(msg)) => {
                        results.extend(self.handle(msg));
                        if self.renewed.load(std::sync::atomic::Ordering::Relaxed) {
                            return;
                        }
                    }
                    None => {
                        tracing::info!("controller closed the session");
                        return;
                    }
                    Some(Err(status)) => {
                        tracing::warn!(error = %crate::error_chain(&status), "session lost");
                        return;
                    }
                },
                Some(event) = internal_rx.recv() => match event {
                    Internal::Output(chunk) => {
                        if out_tx.is_closed() {
                            return;
                        }
                        let _ = out_tx.try_send(up(Up::Output(chunk)));
                    }
                    Internal::Finished(result) => results.push_back(result),
                    Internal::FileContent(content) => {
                        let _ = out_tx.try_send(up(Up::FileContent(content)));
                    }
                },
                permit = out_tx.reserve(), if !results.is_empty() => match permit {
                    Ok(permit) => {
                        let result = results.pop_front().expect("a result is waiting");
                        permit.send(up(Up::Result(result)));
                    }
                    Err(_) => return,
                },
                _ = heartbeat.tick() => {
                    let _ = out_tx.try_send(up(Up::Heartbeat(pb::Heartbeat { sent_at_ms: now_ms() })));
                }
                _ = renew_check.tick(), if renew_due.is_some_and(|at| now_ms() >= at) => {
                    if let Some(csr_pem) = self.renewal.request(&self.config.name) {
                        tracing::info!("certificate two thirds through its life; asking for a new one");
                        let _ = out_tx.try_send(up(Up::Renew(pb::RenewRequest { csr_pem })));
                    }
                }
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    /// Acts on one message from the controller; returns a result to report
    /// now, if there is one.
    fn handle(&self, msg: pb::ControllerMessage) -> Option<pb::StepResult> {
        match msg.msg {
            Some(Down::Run(step)) => return self.start(step),
            Some(Down::Cancel(c)) => {
                if let Some(token) = self
                    .running
                    .lock()
                    .expect("running lock")
                    .get(&c.dispatch_id)
                {
                    tracing::info!(id = %c.dispatch_id, "cancelling");
                    token.cancel();
                }
            }
            Some(Down::Ack(ack)) if journal::valid_id(&ack.dispatch_id) => {
                if let Err(e) = self.journal.ack(&ack.dispatch_id) {
                    tracing::error!(id = %ack.dispatch_id, error = %e, "cannot forget an acked result");
                }
            }
            Some(Down::Ack(_)) => {}
            Some(Down::Renewed(r)) => {
                match self
                    .renewal
                    .install(&self.config.data_dir, &self.config.name, &r.cert_pem)
                {
                    Ok(()) => self
                        .renewed
                        .store(true, std::sync::atomic::Ordering::Relaxed),
                    Err(e) => tracing::error!(error = %e, "certificate renewal failed"),
                }
            }
            Some(Down::ReadFile(read)) => {
                let exec = self.exec.clone();
                let internal = self.internal_tx.clone();
                let max = read.max_bytes.min(MAX_READ);
                self.tasks.spawn(async move {
                    let mut content = exec.read_file(&read.path, max).await;
                    content.request_id = read.request_id;
                    let _ = internal.send(Internal::FileContent(content)).await;
                });
            }
            None => {}
        }
        None
    }

    /// Starts a step unless its id is known; returns a result to report
    /// now (one recorded before, or why it cannot run).
    fn start(&self, mut step: pb::RunStep) -> Option<pb::StepResult> {
        // The secrets' values stay in memory: the journal gets the step
        // without them.
        let secrets = Secrets::take(&mut step);
        let id = step.dispatch_id.clone();
        if !journal::valid_id(&id) {
            tracing::warn!(id = %id, "refusing a malformed dispatch id");
            return None;
        }
        let begin = match self.journal.begin(&step) {
            Ok(b) => b,
            Err(e) => {
                // Without a durable record we must not run it. Nothing ran,
                // so an unjournaled answer is safe, and it must come now:
                // there may be no next session to resend the step on.
                tracing::error!(id = %id, error = %e, "cannot record the step; not running it");
                let mut result = exec::failed_to_start(format!(
                    "cannot record the step in the journal {}: {e}; it was not run",
                    self.config.data_dir.join("journal").display()
                ));
                result.dispatch_id = id;
                return Some(result);
            }
        };
        match begin {
            Begin::Running => tracing::debug!(id = %id, "already running"),
            Begin::Done(result) => {
                tracing::debug!(id = %id, "already ran; re-reporting");
                return Some(result);
            }
            Begin::New => {
                let token = self.shutdown.child_token();
                self.running
                    .lock()
                    .expect("running lock")
                    .insert(id.clone(), token.clone());
                let exec = self.exec.clone();
                let journal = self.journal.clone();
                let running = self.running.clone();
                let internal = self.internal_tx.clone();
                let (chunk_tx, mut chunk_rx) = mpsc::channel(64);
                let forward = internal.clone();
                self.tasks.spawn(async move {
                    while let Some(chunk) = chunk_rx.recv().await {
                        let _ = forward.try_send(Internal::Output(chunk));
                    }
                });
                let shutdown = self.shutdown.clone();
                self.tasks.spawn(async move {
                    tracing::info!(id = %id, "running");
                    let spec = step.step.unwrap_or_default();
                    let result = exec.execute(&id, spec, &secrets, chunk_tx, token).await;
                    // Killed by our own shutdown: leave it unrecorded, so
                    // the next start reports it lost instead of claiming a
                    // cancel nobody asked for.
                    if shutdown.is_cancelled()
                        && result.termination == pb::Termination::Cancelled as i32
                    {
                        running.lock().expect("running lock").remove(&id);
                        return;
                    }
                    if let Err(e) = journal.finish(&result) {
                        tracing::error!(id = %id, error = %e, "cannot record the result");
                    }
                    running.lock().expect("running lock").remove(&id);
                    tracing::info!(id = %id, exit_code = ?result.exit_code, "finished");
                    let _ = internal.send(Internal::Finished(result)).await;
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An agent on a fresh data dir, with no controller.
    fn agent(dir: &Path, queue: usize) -> (Agent, mpsc::Receiver<Internal>) {
        let (journal, _) = Journal::open(&dir.join("journal")).unwrap();
        let journal = Arc::new(journal);
        let exec = Executor::new(dir.join("work"), dir.join("backups"))
            .unwrap()
            .record_groups_in(journal.clone());
        let (internal_tx, internal_rx) = mpsc::channel(queue);
        let agent = Agent {
            config: AgentConfig {
                controller: "https://127.0.0.1:1".into(),
                controllers: Vec::new(),
                name: "test".into(),
                labels: Default::default(),
                work_dir: None,
                heartbeat_secs: 3600,
                data_dir: dir.to_path_buf(),
            },
            journal,
            exec,
            running: Arc::default(),
            internal_tx,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            renewal: crate::renew::Renewal::default(),
            renewed: false.into(),
        };
        (agent, internal_rx)
    }

    fn chunk() -> Internal {
        Internal::Output(pb::OutputChunk {
            dispatch_id: "r1.a".into(),
            stream: pb::OutputStream::Stdout as i32,
            data: b"chatter\n".to_vec(),
        })
    }

    #[tokio::test]
    async fn a_result_is_not_dropped_when_output_fills_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, mut internal_rx) = agent(dir.path(), 64);
        let (out_tx, mut out_rx) = mpsc::channel::<pb::AgentMessage>(4);
        for _ in 0..10 {
            agent.internal_tx.try_send(chunk()).unwrap();
        }
        let result = pb::StepResult {
            dispatch_id: "r1.a".into(),
            ..Default::default()
        };
        agent
            .internal_tx
            .try_send(Internal::Finished(result.clone()))
            .unwrap();
        let controller = async {
            // Slow to read: the stream is full before it starts.
            tokio::time::sleep(Duration::from_millis(50)).await;
            while let Some(msg) = out_rx.recv().await {
                if let Some(Up::Result(r)) = msg.msg {
                    agent.shutdown.cancel();
                    return Some(r);
                }
            }
            None
        };
        let session = agent.serve(tokio_stream::pending(), &out_tx, &mut internal_rx);
        let ((), got) = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(session, controller)
        })
        .await
        .expect("the result never came");
        assert_eq!(got, Some(result));
    }

    /// Every file under `dir`, recursively, as (path, bytes).
    fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(files(&path));
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.push((path, bytes));
            }
        }
        out
    }

    #[tokio::test]
    async fn a_step_is_journaled_and_reported_without_its_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, mut internal_rx) = agent(dir.path(), 64);
        let value = "correct horse battery staple";
        let step = pb::RunStep {
            dispatch_id: "r1.s".into(),
            step: Some(pb::Step {
                action: Some(pb::step::Action::Run(
                    r#"echo "got $MODI_SECRET_pw""#.into(),
                )),
                ..Default::default()
            }),
            secrets: [("pw".to_string(), value.to_string())].into(),
        };
        assert!(agent.start(step).is_none());
        let result = loop {
            match tokio::time::timeout(Duration::from_secs(10), internal_rx.recv()).await {
                Ok(Some(Internal::Finished(r))) => break r,
                Ok(Some(Internal::Output(c))) => {
                    assert!(!String::from_utf8_lossy(&c.data).contains(value));
                }
                other => panic!("no result: {:?}", other.is_ok()),
            }
        };
        assert_eq!(String::from_utf8_lossy(&result.stdout), "got <secret pw>\n");
        // The journal (the step, its result) holds no trace of the value.
        let all = files(dir.path());
        assert!(all.iter().any(|(p, _)| p.ends_with("r1.s.run")));
        for (path, bytes) in all {
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "{} holds the secret",
                path.display()
            );
        }
    }

    #[tokio::test]
    async fn a_step_the_journal_cannot_record_fails_at_once_and_does_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, _internal_rx) = agent(dir.path(), 64);
        // A journal that can no longer be written (as on a full disk).
        std::fs::remove_dir_all(dir.path().join("journal")).unwrap();
        let marker = dir.path().join("ran");
        let step = pb::RunStep {
            dispatch_id: "r1.b".into(),
            step: Some(pb::Step {
                action: Some(pb::step::Action::Run(format!("touch {}", marker.display()))),
                ..Default::default()
            }),
            ..Default::default()
        };
        let result = agent.start(step).expect("an answer at once");
        assert_eq!(result.dispatch_id, "r1.b");
        assert_eq!(result.termination, pb::Termination::FailedToStart as i32);
        let why = String::from_utf8_lossy(&result.stderr);
        assert!(
            why.contains("cannot record the step in the journal"),
            "{why}"
        );
        agent.tasks.close();
        agent.tasks.wait().await;
        assert!(!marker.exists(), "the step ran");
    }

    #[tokio::test]
    async fn shutdown_does_not_wait_on_a_full_event_queue() {
        let dir = tempfile::tempdir().unwrap();
        let (agent, internal_rx) = agent(dir.path(), 1);
        agent.internal_tx.try_send(chunk()).unwrap();
        // A step finishing as the agent stops, with the queue full.
        let internal = agent.internal_tx.clone();
        agent.tasks.spawn(async move {
            let _ = internal
                .send(Internal::Finished(pb::StepResult::default()))
                .await;
        });
        agent.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), agent.stop(internal_rx))
            .await
            .expect("shutdown hung on a full queue");
    }

    #[test]
    fn one_agent_per_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_data_dir(dir.path()).unwrap();
        match lock_data_dir(dir.path()) {
            Err(e @ RunError::AlreadyRunning { .. }) => assert_eq!(
                e.to_string(),
                format!(
                    "another modi-agent is running with data dir {}",
                    dir.path().display()
                )
            ),
            other => panic!("expected AlreadyRunning, got {other:?}"),
        }
        drop(held);
        lock_data_dir(dir.path()).expect("free once the first agent is gone");
    }
}
