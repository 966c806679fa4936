//! The live fleet: which agents are connected, what is in flight on each,
//! and where their results go.
//!
//! - A connected agent has one [`Session`]: the sender half of its
//!   `Connect` stream. A newer session for the same name replaces the older.
//! - Every step sent to an agent sits in the in-flight table under its full
//!   dispatch id until its result arrives. When an agent (re)connects,
//!   everything in flight on it is sent again: the agent runs what it never
//!   saw and re-reports what it already ran, never running anything twice.
//! - When an agent stays away longer than `lost_after` with steps in flight,
//!   those steps are reported `lost` to their runs.
//! - An agent can report results only for steps dispatched to it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use modi_proto::v1 as pb;
use pb::controller_message::Msg as Down;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::driver::{DriverMsg, WatchItem};
use crate::rollout::{DispatchId, Millis, StepResult, Termination};
use crate::service::agent_convert;
use crate::store::{HostRecord, Store};

/// Outbound queue length per agent session.
const SESSION_QUEUE: usize = 4096;

/// A connected agent.
struct Session {
    id: u64,
    tx: mpsc::Sender<pb::ControllerMessage>,
    since: Millis,
    last_seen: Millis,
}

/// A step sent (or about to be sent) to an agent.
struct Inflight {
    agent: String,
    run: u64,
    id: DispatchId,
    msg: pb::RunStep,
    cancelled: bool,
}

/// A run's inbox and its watchers.
#[derive(Clone)]
pub struct RunPorts {
    /// The run driver's inbox.
    pub inbox: mpsc::Sender<DriverMsg>,
    /// What watchers of the run see.
    pub watch: broadcast::Sender<WatchItem>,
}

/// What `modi hosts` shows of a live agent.
#[derive(Clone, Copy, Debug)]
pub struct Presence {
    /// Connected since.
    pub since: Millis,
    /// Last message.
    pub last_seen: Millis,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    inflight: BTreeMap<String, Inflight>,
    runs: HashMap<u64, RunPorts>,
    /// Agents away with steps in flight: name → generation of the absence.
    away: HashMap<String, u64>,
}

/// The live fleet. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    state: Arc<Mutex<State>>,
    store: Store,
    lost_after: Duration,
    generation: Arc<AtomicU64>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// The run id and engine id of a full dispatch id (`r12.c0.h1.apply.0.a0`).
pub fn parse_full_id(full: &str) -> Option<(u64, DispatchId)> {
    let rest = full.strip_prefix('r')?;
    let (run, id) = rest.split_once('.')?;
    Some((run.parse().ok()?, agent_convert::parse_dispatch_id(id)?))
}

/// The full dispatch id the agent sees.
pub fn full_id(run: u64, id: &DispatchId) -> String {
    format!("r{run}.{id}")
}

fn now() -> Millis {
    crate::clock::now()
}

impl Fleet {
    /// An empty fleet.
    pub fn new(
        store: Store,
        lost_after: Duration,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Fleet {
        Fleet {
            state: Arc::default(),
            store,
            lost_after,
            generation: Arc::new(AtomicU64::new(1)),
            tasks,
            shutdown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fleet lock")
    }

    /// Registers a new session for `name` (replacing any older one),
    /// records what it said about itself, and sends it everything in
    /// flight on it. Returns the session id and its outbound queue.
    pub fn connect(
        &self,
        name: &str,
        hello: &pb::Hello,
    ) -> Result<(u64, mpsc::Receiver<pb::ControllerMessage>), crate::store::StoreError> {
        let now = now();
        let mut host = self.store.host(name)?.unwrap_or_else(|| HostRecord {
            name: name.to_string(),
            enrolled_at: now,
            ..HostRecord::default()
        });
        host.labels = hello.labels.clone();
        host.facts = hello.facts.clone();
        host.last_seen = now;
        self.store.put_host(&host)?;

        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let id = self.generation.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        state.away.remove(name);
        for f in state.inflight.values().filter(|f| f.agent == name) {
            let _ = tx.try_send(pb::ControllerMessage {
                msg: Some(Down::Run(f.msg.clone())),
            });
            if f.cancelled {
                let _ = tx.try_send(pb::ControllerMessage {
                    msg: Some(Down::Cancel(pb::CancelStep {
                        dispatch_id: f.msg.dispatch_id.clone(),
                    })),
                });
            }
        }
        state.sessions.insert(
            name.to_string(),
            Session {
                id,
                tx,
                since: now,
                last_seen: now,
            },
        );
        Ok((id, rx))
    }

    /// The session `session` of `name` ended.
    pub fn disconnect(&self, name: &str, session: u64) {
        let last_seen = {
            let mut state = self.lock();
            match state.sessions.get(name) {
                Some(s) if s.id == session => {}
                _ => return, // replaced by a newer session already
            }
            let s = state.sessions.remove(name).expect("checked above");
            s.last_seen
        };
        if let Ok(Some(mut host)) = self.store.host(name) {
            host.last_seen = last_seen;
            let _ = self.store.put_host(&host);
        }
        self.watch_absence(name);
    }

    /// Starts the lost timer for `name` if it has steps in flight and no
    /// timer runs yet.
    fn watch_absence(&self, name: &str) {
        let generation = {
            let mut state = self.lock();
            if state.sessions.contains_key(name)
                || state.away.contains_key(name)
                || !state.inflight.values().any(|f| f.agent == name)
            {
                return;
            }
            let g = self.generation.fetch_add(1, Ordering::Relaxed);
            state.away.insert(name.to_string(), g);
            g
        };
        let fleet = self.clone();
        let name = name.to_string();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(fleet.lost_after) => fleet.declare_lost(&name, generation).await,
                _ = shutdown.cancelled() => {}
            }
        });
    }

    async fn declare_lost(&self, name: &str, generation: u64) {
        let lost: Vec<(RunPorts, DispatchId)> = {
            let mut state = self.lock();
            if state.away.get(name) != Some(&generation) {
                return; // came back meanwhile
            }
            state.away.remove(name);
            let ids: Vec<String> = state
                .inflight
                .iter()
                .filter(|(_, f)| f.agent == name)
                .map(|(k, _)| k.clone())
                .collect();
            let mut lost = Vec::new();
            for k in ids {
                if let Some(f) = state.inflight.remove(&k)
                    && let Some(p) = state.runs.get(&f.run)
                {
                    lost.push((p.clone(), f.id));
                }
            }
            lost
        };
        for (ports, id) in lost {
            tracing::warn!(agent = name, %id, "agent stayed away; step lost");
            let result = StepResult {
                termination: Some(Termination::Lost),
                stderr: format!(
                    "agent {name} was away for more than {:?} while this step ran",
                    self.lost_after
                ),
                ..StepResult::default()
            };
            let _ = ports
                .inbox
                .send(DriverMsg::Result {
                    id,
                    result,
                    agent: name.to_string(),
                })
                .await;
        }
    }

    /// Notes a heartbeat from `name`.
    pub fn heartbeat(&self, name: &str, session: u64) {
        if let Some(s) = self.lock().sessions.get_mut(name)
            && s.id == session
        {
            s.last_seen = now();
        }
    }

    /// Is `name` connected?
    pub fn is_connected(&self, name: &str) -> bool {
        self.lock().sessions.contains_key(name)
    }

    /// Live presence of every connected agent.
    pub fn presence(&self) -> HashMap<String, Presence> {
        self.lock()
            .sessions
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    Presence {
                        since: s.since,
                        last_seen: s.last_seen,
                    },
                )
            })
            .collect()
    }

    /// Drops `name`'s session (revoked).
    pub fn kick(&self, name: &str) {
        let session = self.lock().sessions.get(name).map(|s| s.id);
        if let Some(id) = session {
            self.disconnect(name, id);
        }
    }

    /// Puts `msg` in flight on `agent` and sends it if connected. The
    /// caller has journaled the dispatch already.
    pub fn send_step(&self, run: u64, id: DispatchId, agent: &str, msg: pb::RunStep) {
        let connected = {
            let mut state = self.lock();
            let sent = state.sessions.get(agent).map(|s| {
                s.tx.try_send(pb::ControllerMessage {
                    msg: Some(Down::Run(msg.clone())),
                })
                .is_ok()
            });
            state.inflight.insert(
                msg.dispatch_id.clone(),
                Inflight {
                    agent: agent.to_string(),
                    run,
                    id,
                    msg,
                    cancelled: false,
                },
            );
            sent == Some(true)
        };
        if !connected {
            // It will go out when the agent is back, or be lost.
            self.watch_absence(agent);
        }
    }

    /// Asks `agent` to cancel a step in flight (now, or when it is back).
    pub fn cancel_step(&self, full_id: &str) {
        let mut state = self.lock();
        let Some(f) = state.inflight.get_mut(full_id) else {
            return;
        };
        f.cancelled = true;
        let agent = f.agent.clone();
        if let Some(s) = state.sessions.get(&agent) {
            let _ = s.tx.try_send(pb::ControllerMessage {
                msg: Some(Down::Cancel(pb::CancelStep {
                    dispatch_id: full_id.to_string(),
                })),
            });
        }
    }

    /// Tells `agent` its result for `full_id` is durable.
    pub fn ack(&self, agent: &str, full_id: &str) {
        if let Some(s) = self.lock().sessions.get(agent) {
            let _ = s.tx.try_send(pb::ControllerMessage {
                msg: Some(Down::Ack(pb::Ack {
                    dispatch_id: full_id.to_string(),
                })),
            });
        }
    }

    /// A result from `agent`. Goes to its run if the step was dispatched to
    /// this agent; a result for a step no longer in flight (a repeat after
    /// a reconnect) is acked again; a result for another agent's step is
    /// refused.
    pub async fn result(&self, agent: &str, result: pb::StepResult) {
        let full = result.dispatch_id.clone();
        let route = {
            let mut state = self.lock();
            match state.inflight.get(&full) {
                Some(f) if f.agent != agent => {
                    tracing::warn!(agent, id = %full, owner = %f.agent,
                        "agent reported a result for another agent's step; ignored");
                    return;
                }
                Some(_) => {
                    let f = state.inflight.remove(&full).expect("present");
                    state.runs.get(&f.run).map(|p| (p.inbox.clone(), f.id))
                }
                None => None,
            }
        };
        match route {
            Some((inbox, id)) => {
                let msg = DriverMsg::Result {
                    id,
                    result: agent_convert::step_result(result),
                    agent: agent.to_string(),
                };
                if inbox.send(msg).await.is_err() {
                    self.ack(agent, &full);
                }
            }
            None => self.ack(agent, &full),
        }
    }

    /// Live output from `agent`, for the run's watchers.
    pub fn output(&self, agent: &str, chunk: pb::OutputChunk) {
        let state = self.lock();
        let Some(f) = state.inflight.get(&chunk.dispatch_id) else {
            return;
        };
        if f.agent != agent {
            return;
        }
        if let Some(p) = state.runs.get(&f.run) {
            let _ = p.watch.send(WatchItem::Output {
                id: f.id,
                stderr: chunk.stream == pb::OutputStream::Stderr as i32,
                data: String::from_utf8_lossy(&chunk.data).into_owned(),
            });
        }
    }

    /// Registers a running run's ports.
    pub fn register_run(&self, run: u64, ports: RunPorts) {
        self.lock().runs.insert(run, ports);
    }

    /// Forgets a run that ended.
    pub fn unregister_run(&self, run: u64) {
        let mut state = self.lock();
        state.runs.remove(&run);
        state.inflight.retain(|_, f| f.run != run);
    }

    /// A running run's ports.
    pub fn run_ports(&self, run: u64) -> Option<RunPorts> {
        self.lock().runs.get(&run).cloned()
    }
}
