//! The connection loop: dial the controller, hold one `Connect` stream,
//! run what it sends, report back; on any failure, reconnect with
//! exponential backoff and jitter. Steps keep running while disconnected;
//! their results wait in the journal and are re-reported on reconnect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use modi_proto::tls::{self, ClientIdentity, Trust};
use modi_proto::v1 as pb;
use pb::agent_message::Msg as Up;
use pb::agent_service_client::AgentServiceClient;
use pb::controller_message::Msg as Down;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, AgentConfig};
use crate::exec::Executor;
use crate::journal::{self, Begin, Journal};

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
}

/// What step tasks tell the session.
enum Internal {
    Output(pb::OutputChunk),
    Finished(pb::StepResult),
}

struct Agent {
    config: AgentConfig,
    journal: Arc<Journal>,
    exec: Executor,
    running: Arc<Mutex<HashMap<String, CancellationToken>>>,
    internal_tx: mpsc::Sender<Internal>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

fn read_state(config: &AgentConfig, file: &str) -> Result<String, RunError> {
    let path = config.data_dir.join(file);
    std::fs::read_to_string(&path).map_err(|e| RunError::State {
        path,
        detail: e.to_string(),
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
    let ca = read_state(&config, config::CA_FILE)?;
    let identity = ClientIdentity {
        cert_pem: read_state(&config, config::CERT_FILE)?,
        key_pem: read_state(&config, config::KEY_FILE)?,
    };
    let state = |what: &str, e: std::io::Error| RunError::State {
        path: config.data_dir.join(what),
        detail: e.to_string(),
    };
    let (journal, recovered) =
        Journal::open(&config.data_dir.join("journal")).map_err(|e| state("journal", e))?;
    if !recovered.is_empty() {
        tracing::info!(count = recovered.len(), "results waiting to be reported");
    }
    let exec = Executor::new(config.work_dir(), config.data_dir.join("backups"))
        .map_err(|e| state("work", e))?;
    let channel = tls::channel(
        &config.controller,
        Trust::Ca(&ca),
        Some(&identity),
        config::CONNECT_TIMEOUT,
    )
    .map_err(|e| RunError::Config(e.to_string()))?;
    let (internal_tx, mut internal_rx) = mpsc::channel(1024);
    let agent = Agent {
        config,
        journal: Arc::new(journal),
        exec,
        running: Arc::default(),
        internal_tx,
        tasks: TaskTracker::new(),
        shutdown: shutdown.clone(),
    };
    let mut client = AgentServiceClient::new(channel);
    let mut backoff = config::BACKOFF_MIN;
    tracing::info!(controller = %agent.config.controller, name = %agent.config.name, "agent starting");
    while !shutdown.is_cancelled() {
        match agent.session(&mut client, &mut internal_rx).await {
            Ok(()) => backoff = config::BACKOFF_MIN,
            Err(e) => tracing::warn!(error = %e, "session ended"),
        }
        if shutdown.is_cancelled() {
            break;
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
        backoff = (backoff * 2).min(config::BACKOFF_MAX);
    }
    agent.tasks.close();
    for token in agent.running.lock().expect("running lock").values() {
        token.cancel();
    }
    agent.tasks.wait().await;
    Ok(())
}

impl Agent {
    /// One session. `Ok` when it was established and later ended (reset
    /// the backoff); `Err` when it could not be established.
    async fn session(
        &self,
        client: &mut AgentServiceClient<tonic::transport::Channel>,
        internal_rx: &mut mpsc::Receiver<Internal>,
    ) -> Result<(), String> {
        let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(1024);
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
        };
        let send = |tx: &mpsc::Sender<pb::AgentMessage>, msg: Up| {
            tx.try_send(pb::AgentMessage { msg: Some(msg) }).is_ok()
        };
        send(&out_tx, Up::Hello(hello));
        let pending = self.journal.pending().map_err(|e| e.to_string())?;
        let mut inbound = client
            .connect(ReceiverStream::new(out_rx))
            .await
            .map_err(|s| crate::error_chain(&s))?
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
        let mut heartbeat = tokio::time::interval(self.config.heartbeat());
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => self.handle(msg, &out_tx).await,
                    Ok(None) => {
                        tracing::info!("controller closed the session");
                        return Ok(());
                    }
                    Err(status) => {
                        tracing::warn!(error = %crate::error_chain(&status), "session lost");
                        return Ok(());
                    }
                },
                Some(event) = internal_rx.recv() => {
                    let msg = match event {
                        Internal::Output(chunk) => Up::Output(chunk),
                        Internal::Finished(result) => Up::Result(result),
                    };
                    // A full queue drops live output only; results are
                    // journaled and re-sent on the next session.
                    if out_tx.is_closed() {
                        return Ok(());
                    }
                    send(&out_tx, msg);
                }
                _ = heartbeat.tick() => {
                    send(&out_tx, Up::Heartbeat(pb::Heartbeat { sent_at_ms: now_ms() }));
                }
                _ = self.shutdown.cancelled() => return Ok(()),
            }
        }
    }

    async fn handle(&self, msg: pb::ControllerMessage, out_tx: &mpsc::Sender<pb::AgentMessage>) {
        match msg.msg {
            Some(Down::Run(step)) => self.start(step, out_tx).await,
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
            None => {}
        }
    }

    async fn start(&self, step: pb::RunStep, out_tx: &mpsc::Sender<pb::AgentMessage>) {
        let id = step.dispatch_id.clone();
        if !journal::valid_id(&id) {
            tracing::warn!(id = %id, "refusing a malformed dispatch id");
            return;
        }
        let begin = match self.journal.begin(&step) {
            Ok(b) => b,
            Err(e) => {
                // Without a durable record we must not run it: the
                // controller will resend it on the next session.
                tracing::error!(id = %id, error = %e, "cannot record the step; not running it");
                return;
            }
        };
        match begin {
            Begin::Running => tracing::debug!(id = %id, "already running"),
            Begin::Done(result) => {
                tracing::debug!(id = %id, "already ran; re-reporting");
                let _ = out_tx
                    .send(pb::AgentMessage {
                        msg: Some(Up::Result(result)),
                    })
                    .await;
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
                    let result = exec.execute(&id, spec, chunk_tx, token).await;
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
    }
}
