//! The live fleet: which agents are connected, what is in flight on each,
//! and where their results go.
//!
//! - A connected agent has one [`Session`]: the queue of what goes down its
//!   `Connect` stream (as [`ToAgent`]; the agent service converts) and a
//!   token that ends its reader. A newer session for the same name
//!   replaces the older; a session whose queue is full or closed is
//!   dropped, so the agent reconnects and gets everything again.
//! - Every step sent to an agent sits in the in-flight table under its full
//!   dispatch id until its result is durable. When an agent (re)connects,
//!   everything in flight on it is sent again: the agent runs what it never
//!   saw and re-reports what it already ran, never running anything twice.
//! - A result is acked to the agent only once its run's driver has
//!   journaled it (see [`Fleet::complete`]); a repeat of a result that is
//!   on its way to the journal is dropped, not acked.
//! - When an agent stays away longer than `lost_after` with steps in flight,
//!   those steps are reported `lost` to their runs; if it comes back still
//!   running one of them, it is told to cancel it.
//! - An agent can report results only for steps dispatched to it.
//! - A step goes out with the values of the secrets it uses. One whose
//!   values are not here (its run lost them in a controller restart) is
//!   in flight but not sent, even to an agent that reconnects, until its
//!   run is given them ([`Fleet::supply`]).
//!
//! The fleet speaks only our types ([`Hello`], [`AgentResult`],
//! [`OutputChunk`] in, [`ToAgent`] out): the agent service converts from
//! and to the wire. It tells a run what happened through the run's
//! [`RunPorts`], never by calling its driver, and reads the time from the
//! [`Clock`] it was given.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::rollout::Event;
use crate::rollout::{DispatchId, Millis, StepResult, Termination};
use crate::run_ports::{DriverMsg, RunPorts, WatchItem};
use crate::secret::Secrets;
use crate::spec::Step;
use crate::store::{HostRecord, JournalEntry, Record, Store};

/// Output kept per stream of a step in flight, for `modi logs` attaching
/// mid-step (the whole output, up to 1 MiB, comes with the result).
pub const OUTPUT_KEPT: usize = 64 << 10;
/// Outbound queue length per agent session.
const SESSION_QUEUE: usize = 4096;
/// After the controller starts, hosts whose agents have not reconnected yet
/// are waited for this long before a step for them counts as unreachable:
/// agents come back with a jittered backoff of up to 30 s.
pub const STARTUP_GRACE: Duration = Duration::from_secs(45);
/// A host seen this long before the controller started counts as one that
/// was connected to the previous controller, and is expected back.
pub const RECENTLY_SEEN: Duration = Duration::from_secs(600);

/// What an agent said about itself when it connected.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its facts (hostname, os, ...).
    pub facts: BTreeMap<String, String>,
    /// Full dispatch ids of the steps it is running right now.
    pub running: Vec<String>,
    /// How often it sends a heartbeat (`None`: it did not say).
    pub heartbeat: Option<Duration>,
}

/// A step's result, as an agent reported it.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentResult {
    /// The full dispatch id (see [`full_id`]).
    pub full_id: String,
    /// What happened.
    pub result: StepResult,
}

/// Live output of a step, as an agent sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputChunk {
    /// The full dispatch id (see [`full_id`]).
    pub full_id: String,
    /// stderr (else stdout).
    pub stderr: bool,
    /// The bytes, as they came.
    pub data: Vec<u8>,
}

/// What goes down an agent's session, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum ToAgent {
    /// Run this step (or, if it ran already, report its result again).
    Run {
        /// Its run.
        run: RunRef,
        /// Its engine id (with `run`, its full dispatch id).
        id: DispatchId,
        /// What to run.
        step: Arc<Step>,
        /// The values of the secrets it uses.
        secrets: Arc<Secrets>,
    },
    /// Stop the step with this full dispatch id.
    Cancel(String),
    /// The result for this full dispatch id is durable: forget it.
    Ack(String),
    /// The agent's renewed certificate (PEM).
    Renewed(String),
    /// Read a file, read-only, for `modi plan --diff` (see [`peek`]).
    ReadFile {
        /// Echoed in the answer.
        request_id: u64,
        /// As a `file` step names it.
        path: String,
        /// At most this many bytes come back.
        max_bytes: u64,
    },
}

/// A connected agent.
struct Session {
    id: u64,
    tx: mpsc::Sender<ToAgent>,
    /// Cancelled when the session is replaced, dropped or kicked: its
    /// reader stops accepting anything from it.
    token: CancellationToken,
    since: Millis,
    last_seen: Millis,
}

/// A step sent (or about to be sent) to an agent.
struct Inflight {
    agent: String,
    run: RunRef,
    id: DispatchId,
    step: Arc<Step>,
    /// The values of the secrets it uses; `None` while they are not here
    /// (it is not sent until they are).
    secrets: Option<Arc<Secrets>>,
    cancelled: bool,
    /// Its result is on its way to the journal.
    reported: bool,
    /// The last of what it printed so far (stdout, stderr), for a `modi
    /// logs` that attaches while it runs.
    output: [Tail; 2],
}

/// The last [`OUTPUT_KEPT`] bytes of a stream, and how many came before.
#[derive(Default)]
struct Tail {
    text: String,
    cut: u64,
}

impl Tail {
    fn push(&mut self, data: &str) {
        self.text.push_str(data);
        if self.text.len() > OUTPUT_KEPT {
            let mut from = self.text.len() - OUTPUT_KEPT;
            while !self.text.is_char_boundary(from) {
                from += 1;
            }
            self.cut += from as u64;
            self.text.drain(..from);
        }
    }

    fn shown(&self) -> String {
        if self.cut == 0 {
            self.text.clone()
        } else {
            format!("[... {} earlier bytes not kept]\n{}", self.cut, self.text)
        }
    }
}

impl Inflight {
    /// The message that sends it, if it can be sent.
    fn to_agent(&self) -> Option<ToAgent> {
        Some(ToAgent::Run {
            run: self.run,
            id: self.id,
            step: self.step.clone(),
            secrets: self.secrets.clone()?,
        })
    }
}

/// Where an agent's result goes.
enum ResultRoute {
    /// To the run driving the step.
    Run(mpsc::Sender<DriverMsg>, DispatchId),
    /// To the run, as a result for a step no longer in flight.
    Late(mpsc::Sender<DriverMsg>, DispatchId),
    /// The run has ended: checked against its journal.
    Ended(u64, DispatchId),
    /// Nowhere: acked again.
    Ack,
}

/// What `modi hosts` shows of a live agent.
#[derive(Clone, Copy, Debug)]
pub struct Presence {
    /// Connected since.
    pub since: Millis,
    /// Last message.
    pub last_seen: Millis,
}

/// A new session's handles, for the service that serves it.
pub struct SessionHandle {
    /// The session's id.
    pub id: u64,
    /// What to send down its stream.
    pub outbound: mpsc::Receiver<ToAgent>,
    /// Cancelled when the session must end.
    pub token: CancellationToken,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    inflight: BTreeMap<String, Inflight>,
    /// The keys of `inflight` by agent: what a (re)connecting, leaving or
    /// lost agent has in flight, without walking every step in flight.
    by_agent: HashMap<String, BTreeSet<String>>,
    runs: HashMap<u64, RunPorts>,
    /// Agents away with steps in flight: name → generation of the absence.
    away: HashMap<String, u64>,
    /// Agents that have connected to this controller since it started.
    seen: std::collections::HashSet<String>,
    /// Which run holds each host (one host, one run's change at a time).
    holders: HashMap<String, u64>,
    /// File reads waiting for their agent's answer (see [`peek`]).
    reads: peek::Reads,
    /// Runs holding dispatches for each host until it is free (connects,
    /// or another run lets it go): woken through their [`RunPorts`].
    waiters: HashMap<String, HashSet<u64>>,
}

impl State {
    /// Run `run` is to be woken when `host` may be free.
    fn add_waiter(&mut self, host: &str, run: u64) {
        self.waiters
            .entry(host.to_string())
            .or_default()
            .insert(run);
    }

    /// Tells the runs waiting for `host` that it may be free now.
    fn wake_waiters(&mut self, host: &str) {
        if let Some(runs) = self.waiters.remove(host) {
            for run in runs {
                if let Some(p) = self.runs.get(&run) {
                    p.ready.wake(host);
                }
            }
        }
    }

    /// Puts a step in flight under its full dispatch id.
    fn add_inflight(&mut self, full: String, f: Inflight) {
        let agent = f.agent.clone();
        if let Some(old) = self.inflight.insert(full.clone(), f)
            && old.agent != agent
            && let Some(ids) = self.by_agent.get_mut(&old.agent)
        {
            ids.remove(&full);
            if ids.is_empty() {
                self.by_agent.remove(&old.agent);
            }
        }
        self.by_agent.entry(agent).or_default().insert(full);
    }

    /// Takes a step out of flight.
    fn remove_inflight(&mut self, full: &str) -> Option<Inflight> {
        let f = self.inflight.remove(full)?;
        if let Some(ids) = self.by_agent.get_mut(&f.agent) {
            ids.remove(full);
            if ids.is_empty() {
                self.by_agent.remove(&f.agent);
            }
        }
        Some(f)
    }

    /// The full ids of the steps in flight on `agent`.
    fn inflight_on(&self, agent: &str) -> Vec<String> {
        self.by_agent
            .get(agent)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Sends `msg` to `agent`'s session. A full or closed queue drops the
    /// session (the agent reconnects and is sent everything again); returns
    /// whether it was queued.
    fn send(&mut self, agent: &str, msg: ToAgent) -> bool {
        let Some(session) = self.sessions.get(agent) else {
            return false;
        };
        if session.tx.try_send(msg).is_ok() {
            return true;
        }
        tracing::warn!(agent, "session queue full or closed; dropping the session");
        if let Some(s) = self.sessions.remove(agent) {
            s.token.cancel();
        }
        false
    }
}

/// The live fleet. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    state: Arc<Mutex<State>>,
    store: Store,
    lost_after: Duration,
    clock: Clock,
    /// When the controller started serving agents (for the startup
    /// grace).
    started: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// A run as agents see it: its id and its creation time, which together
/// keep dispatch ids unique even if the store is restored from a backup
/// and run ids repeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunRef {
    /// The run id.
    pub id: u64,
    /// When it was created (ms).
    pub stamp: Millis,
}

/// The full dispatch id the agent sees: `r<run>-<stamp>.<engine id>`.
pub fn full_id(run: RunRef, id: &DispatchId) -> String {
    format!("r{}-{}.{id}", run.id, run.stamp)
}

/// The run id and engine id of a full dispatch id.
pub fn parse_full_id(full: &str) -> Option<(u64, DispatchId)> {
    let rest = full.strip_prefix('r')?;
    let (run, id) = rest.split_once('.')?;
    let (run, _stamp) = run.split_once('-')?;
    Some((run.parse().ok()?, DispatchId::parse(id)?))
}

impl Fleet {
    /// An empty fleet. `started` (for the startup grace) is `clock`'s now.
    pub fn new(
        store: Store,
        lost_after: Duration,
        clock: Clock,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Fleet {
        Fleet {
            state: Arc::default(),
            store,
            lost_after,
            clock,
            started: Arc::new(AtomicU64::new(clock.now())),
            generation: Arc::new(AtomicU64::new(1)),
            tasks,
            shutdown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fleet lock")
    }

    /// Is `name` expected back soon? True during the startup grace for a
    /// host that was around shortly before this controller started and has
    /// not connected to it yet: after a controller restart, agents come
    /// back with a jittered backoff, and a step for them is held, not
    /// failed as unreachable. A host that left this controller is not
    /// waited for.
    pub fn expected_back(&self, name: &str) -> bool {
        let started = self.started.load(Ordering::Relaxed);
        if self.clock.now() >= started + STARTUP_GRACE.as_millis() as Millis
            || self.lock().seen.contains(name)
        {
            return false;
        }
        let recent = started.saturating_sub(RECENTLY_SEEN.as_millis() as Millis);
        matches!(self.store.host(name), Ok(Some(h)) if (h.connected || h.last_seen >= recent) && !h.revoked)
    }

    /// The startup grace begins now: a standby controller of a set took
    /// over and the agents of the one it replaced are coming, or this
    /// controller was cut off from etcd and its agents are coming back.
    /// Steps for them are held, not failed as unreachable.
    pub fn restart_grace(&self) {
        self.started.store(self.clock.now(), Ordering::Relaxed);
        self.lock().seen.clear();
    }

    /// Registers a new session for `name` (replacing any older one),
    /// records what it said about itself, sends it everything in flight on
    /// it, and tells it to cancel what it still runs that is no longer in
    /// flight here (a step already declared lost).
    pub async fn connect(
        &self,
        name: &str,
        hello: &Hello,
    ) -> Result<SessionHandle, crate::store::StoreError> {
        let now = self.clock.now();
        // Labels belong to the controller: what the agent says of them is
        // ignored, and logged when it differs.
        if let Ok(Some(known)) = self.store.host(name)
            && !hello.labels.is_empty()
            && known.labels != hello.labels
        {
            tracing::warn!(agent = name, said = ?hello.labels, kept = ?known.labels,
                "agent reported labels other than its own; ignored (change them with `modi hosts label`)");
        }
        let (owned, facts) = (name.to_string(), hello.facts.clone());
        let recorded = self
            .store
            .update_host(name, move |host| {
                let mut host = host.unwrap_or_else(|| HostRecord {
                    name: owned,
                    enrolled_at: now,
                    ..HostRecord::default()
                });
                host.facts = facts;
                host.last_seen = now;
                host.connected = true;
                host
            })
            .await;
        if let Err(e) = recorded {
            // The session still serves: results reach their runs, which
            // wait for the store themselves.
            tracing::warn!(agent = name, error = %e, "could not record the agent's connection");
        }

        let (tx, outbound) = mpsc::channel(SESSION_QUEUE);
        let token = self.shutdown.child_token();
        let id = self.generation.fetch_add(1, Ordering::Relaxed);
        let mut state = self.lock();
        state.away.remove(name);
        state.seen.insert(name.to_string());
        let mut msgs = Vec::new();
        for full in state.inflight_on(name) {
            let Some(f) = state.inflight.get(&full).filter(|f| !f.reported) else {
                continue;
            };
            msgs.extend(f.to_agent());
            if f.cancelled {
                msgs.push(ToAgent::Cancel(full_id(f.run, &f.id)));
            }
        }
        for running in &hello.running {
            if !state.inflight.contains_key(running) {
                tracing::warn!(agent = name, id = %running, "agent runs a step no longer in flight; cancelling it");
                msgs.push(ToAgent::Cancel(running.clone()));
            }
        }
        for msg in msgs {
            if tx.try_send(msg).is_err() {
                tracing::warn!(agent = name, "too much in flight to resend at once");
                break;
            }
        }
        let session = Session {
            id,
            tx,
            token: token.clone(),
            since: now,
            last_seen: now,
        };
        if let Some(old) = state.sessions.insert(name.to_string(), session) {
            old.token.cancel();
        }
        state.wake_waiters(name);
        Ok(SessionHandle {
            id,
            outbound,
            token,
        })
    }

    /// The session `session` of `name` ended.
    pub async fn disconnect(&self, name: &str, session: u64) {
        let last_seen = {
            let mut state = self.lock();
            match state.sessions.get(name) {
                Some(s) if s.id == session => {}
                _ => return, // replaced by a newer session already
            }
            let s = state.sessions.remove(name).expect("checked above");
            s.token.cancel();
            s.last_seen
        };
        self.watch_absence(name);
        if self.shutdown.is_cancelled() {
            // The controller is stopping, not the agent leaving: it stays
            // marked connected so the next start waits for it.
            return;
        }
        let owned = name.to_string();
        let recorded = self
            .store
            .update_host(name, move |host| {
                let mut host = host.unwrap_or_default();
                host.name = owned;
                host.last_seen = host.last_seen.max(last_seen);
                host.connected = false;
                host
            })
            .await;
        if let Err(e) = recorded {
            tracing::warn!(agent = name, error = %e, "could not record the agent's disconnection");
        }
    }

    /// Starts the lost timer for `name` if it has steps in flight, is not
    /// connected and no timer runs yet.
    fn watch_absence(&self, name: &str) {
        let generation = {
            let mut state = self.lock();
            if state.sessions.contains_key(name)
                || state.away.contains_key(name)
                || !state.by_agent.contains_key(name)
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
            // A result already on its way to the journal is not lost.
            let ids: Vec<String> = state
                .inflight_on(name)
                .into_iter()
                .filter(|k| state.inflight.get(k).is_some_and(|f| !f.reported))
                .collect();
            let mut lost = Vec::new();
            for k in ids {
                if let Some(f) = state.remove_inflight(&k)
                    && let Some(p) = state.runs.get(&f.run.id)
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
                    agent: None,
                })
                .await;
        }
    }

    /// Notes a heartbeat from `name`.
    pub fn heartbeat(&self, name: &str, session: u64) {
        if let Some(s) = self.lock().sessions.get_mut(name)
            && s.id == session
        {
            s.last_seen = self.clock.now();
        }
    }

    /// Is `name` connected?
    pub fn is_connected(&self, name: &str) -> bool {
        self.lock().sessions.contains_key(name)
    }

    /// How many agents are connected.
    pub fn connected_count(&self) -> usize {
        self.lock().sessions.len()
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

    /// Drops `name`'s session at once (revoked).
    pub async fn kick(&self, name: &str) {
        let session = self.lock().sessions.get(name).map(|s| s.id);
        if let Some(id) = session {
            self.disconnect(name, id).await;
        }
    }

    /// Ends every agent session (this controller is cut off from its
    /// store: its agents go to another controller of the set, or come
    /// back when it answers again).
    pub async fn kick_all(&self) {
        let names: Vec<String> = self.lock().sessions.keys().cloned().collect();
        for name in names {
            self.kick(&name).await;
        }
    }

    /// Puts step `id` of `run` in flight on `agent` and sends it, with the
    /// values of the secrets it uses, if connected. With `secrets` `None`
    /// (its run does not have them) it is in flight but not sent until
    /// [`Fleet::supply`]. The caller has journaled the dispatch already.
    pub fn send_step(
        &self,
        run: RunRef,
        id: DispatchId,
        agent: &str,
        step: Arc<Step>,
        secrets: Option<Arc<Secrets>>,
    ) {
        let sent = {
            let mut state = self.lock();
            let f = Inflight {
                agent: agent.to_string(),
                run,
                id,
                step,
                secrets,
                cancelled: false,
                reported: false,
                output: Default::default(),
            };
            let msg = f.to_agent();
            state.add_inflight(full_id(run, &id), f);
            match msg {
                Some(msg) => state.send(agent, msg),
                None => false,
            }
        };
        if !sent {
            // It goes out when the agent is back, or is lost.
            self.watch_absence(agent);
        }
    }

    /// The secrets of the step in flight `full_id`, which was held for
    /// them: it is sent now (if its agent is connected and its result is
    /// not on its way already).
    pub fn supply(&self, full_id: &str, secrets: Arc<Secrets>) {
        let mut state = self.lock();
        let Some(f) = state.inflight.get_mut(full_id) else {
            return;
        };
        f.secrets = Some(secrets);
        if f.reported {
            return;
        }
        let (agent, msg, cancelled) = (f.agent.clone(), f.to_agent(), f.cancelled);
        if let Some(msg) = msg
            && state.send(&agent, msg)
            && cancelled
        {
            // Cancelled while it waited: it goes out only to be reported.
            state.send(&agent, ToAgent::Cancel(full_id.to_string()));
        }
    }

    /// Asks an agent to cancel a step in flight (now, or when it is back).
    pub fn cancel_step(&self, full_id: &str) {
        let mut state = self.lock();
        let Some(f) = state.inflight.get_mut(full_id) else {
            return;
        };
        f.cancelled = true;
        let agent = f.agent.clone();
        state.send(&agent, ToAgent::Cancel(full_id.to_string()));
    }

    fn ack(&self, agent: &str, full_id: &str) {
        self.lock().send(agent, ToAgent::Ack(full_id.to_string()));
    }

    /// The result for `full_id` is durable: forget the step and, if an
    /// agent reported it, tell the agent it may forget it too.
    pub fn complete(&self, agent: Option<&str>, full_id: &str) {
        self.lock().remove_inflight(full_id);
        if let Some(agent) = agent {
            self.ack(agent, full_id);
        }
    }

    /// A result from `agent`. Goes to its run if the step was dispatched to
    /// this agent and its result is not already on its way; a result for a
    /// step no longer in flight (its result is durable, or its run ended)
    /// is acked again; a result for another agent's step is refused.
    pub async fn result(&self, agent: &str, result: AgentResult) {
        let AgentResult {
            full_id: full,
            result,
        } = result;
        let route = {
            let mut state = self.lock();
            match state.inflight.get_mut(&full) {
                Some(f) if f.agent != agent => {
                    tracing::warn!(agent, id = %full, owner = %f.agent,
                        "agent reported a result for another agent's step; ignored");
                    return;
                }
                // A repeat: the first copy is being journaled, and the ack
                // follows once it is durable.
                Some(f) if f.reported => return,
                Some(f) => {
                    f.reported = true;
                    let (run, id) = (f.run.id, f.id);
                    match state.runs.get(&run) {
                        Some(p) => ResultRoute::Run(p.inbox.clone(), id),
                        None => {
                            state.remove_inflight(&full);
                            ResultRoute::Ack
                        }
                    }
                }
                // Not in flight: its result is durable already (a repeat),
                // or the step was declared lost. Its run decides which.
                None => match parse_full_id(&full) {
                    Some((run, id)) => match state.runs.get(&run) {
                        Some(p) => ResultRoute::Late(p.inbox.clone(), id),
                        None => ResultRoute::Ended(run, id),
                    },
                    None => ResultRoute::Ack,
                },
            }
        };
        match route {
            ResultRoute::Run(inbox, id) => {
                let msg = DriverMsg::Result {
                    id,
                    result,
                    agent: Some(agent.to_string()),
                };
                if inbox.send(msg).await.is_err() {
                    // The driver is gone: leave the result with the agent.
                    if let Some(f) = self.lock().inflight.get_mut(&full) {
                        f.reported = false;
                    }
                }
            }
            ResultRoute::Late(inbox, id) => {
                let msg = DriverMsg::Late {
                    id,
                    result,
                    agent: agent.to_string(),
                };
                if inbox.send(msg).await.is_err() {
                    tracing::debug!(agent, id = %full, "result for a run that just ended; not acked");
                }
            }
            ResultRoute::Ended(run, id) => {
                self.late_for_ended_run(agent, run, id, &full, result).await
            }
            ResultRoute::Ack => self.ack(agent, &full),
        }
    }

    /// A result for a step of a run that has ended: journaled as late if
    /// the step was declared lost on this agent, then acked.
    async fn late_for_ended_run(
        &self,
        agent: &str,
        run: u64,
        id: DispatchId,
        full: &str,
        result: StepResult,
    ) {
        let journal = match self.store.journal(run) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(agent, id = %full, error = %e, "cannot read the journal for a late result; not acked");
                return;
            }
        };
        let mut entries = journal.into_iter();
        let ours = match entries.next().map(|e| e.record) {
            Some(Record::Created { spec, .. }) => spec
                .changes
                .get(id.change)
                .and_then(|c| c.hosts.get(id.host))
                .is_some_and(|h| h.host.name == agent),
            _ => false,
        };
        let mut was_lost = false;
        for entry in entries {
            match entry.record {
                Record::Event {
                    event: Event::StepFinished { id: done, result },
                } if done == id => {
                    was_lost = result.termination == Some(Termination::Lost);
                }
                Record::Late { id: late, .. } if late == id => was_lost = false,
                _ => {}
            }
        }
        if ours && was_lost {
            tracing::warn!(agent, run, %id, "late result for a step declared lost in an ended run; journaled, the outcome stands");
            let entry = JournalEntry {
                at: self.clock.now(),
                record: Record::Late {
                    id,
                    host: agent.to_string(),
                    result,
                },
            };
            if let Err(e) = self.store.append_at_end(run, entry).await {
                tracing::warn!(agent, id = %full, error = %e, "cannot journal a late result; not acked");
                return;
            }
        }
        self.ack(agent, full);
    }

    /// Live output from `agent`, for the run's watchers.
    pub fn output(&self, agent: &str, chunk: OutputChunk) {
        let mut state = self.lock();
        let Some(f) = state.inflight.get_mut(&chunk.full_id) else {
            return;
        };
        if f.agent != agent {
            return;
        }
        let data = String::from_utf8_lossy(&chunk.data).into_owned();
        f.output[usize::from(chunk.stderr)].push(&data);
        let (run, id) = (f.run.id, f.id);
        if let Some(p) = state.runs.get(&run) {
            let _ = p.watch.send(WatchItem::Output {
                id,
                stderr: chunk.stderr,
                data,
            });
        }
    }

    /// What the step with this full dispatch id printed so far (stdout,
    /// stderr; the last [`OUTPUT_KEPT`] bytes of each), while it runs.
    pub fn output_so_far(&self, full_id: &str) -> Option<(String, String)> {
        let state = self.lock();
        let f = state.inflight.get(full_id)?;
        Some((f.output[0].shown(), f.output[1].shown()))
    }

    /// Sends `msg` to session `session` of `name`, if it is still the
    /// current one.
    pub fn tell(&self, name: &str, session: u64, msg: ToAgent) {
        let mut state = self.lock();
        if state.sessions.get(name).is_some_and(|s| s.id == session) {
            state.send(name, msg);
        }
    }

    /// Lets run `run` hold `host` (it may already): false while another
    /// run holds it, and then `run` is woken (see [`RunPorts::ready`]) when
    /// the host is let go.
    pub fn hold(&self, host: &str, run: u64) -> bool {
        let mut state = self.lock();
        if *state.holders.entry(host.to_string()).or_insert(run) == run {
            return true;
        }
        state.add_waiter(host, run);
        false
    }

    /// Is `host` connected? If not, run `run` is woken (see
    /// [`RunPorts::ready`]) when it connects.
    pub fn connected_or_wake(&self, host: &str, run: u64) -> bool {
        let mut state = self.lock();
        if state.sessions.contains_key(host) {
            return true;
        }
        state.add_waiter(host, run);
        false
    }

    /// When the startup grace (see [`Fleet::expected_back`]) ends.
    pub fn grace_end(&self) -> Millis {
        self.started.load(Ordering::Relaxed) + STARTUP_GRACE.as_millis() as Millis
    }

    /// Run `run` is done with `host` for now.
    pub fn release(&self, host: &str, run: u64) {
        let mut state = self.lock();
        if state.holders.get(host) == Some(&run) {
            state.holders.remove(host);
            state.wake_waiters(host);
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
        let gone: Vec<String> = state
            .inflight
            .iter()
            .filter(|(_, f)| f.run.id == run)
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            state.remove_inflight(&k);
        }
        let held: Vec<String> = state
            .holders
            .iter()
            .filter(|(_, r)| **r == run)
            .map(|(h, _)| h.clone())
            .collect();
        for host in held {
            state.holders.remove(&host);
            state.wake_waiters(&host);
        }
        state.waiters.retain(|_, runs| {
            runs.remove(&run);
            !runs.is_empty()
        });
    }

    /// A running run's ports.
    pub fn run_ports(&self, run: u64) -> Option<RunPorts> {
        self.lock().runs.get(&run).cloned()
    }
}

pub mod peek;
#[cfg(test)]
mod tests;
