//! The run driver: the one task per run that owns the I/O around its
//! engine. It receives events (results from agents, operator controls,
//! timers), journals them durably, feeds them to the engine, and carries
//! out the engine's actions: dispatch (journaled before sending), cancel,
//! alert, progress for watchers.
//!
//! A run is resumed after a controller restart by replaying its journal
//! through a fresh engine with the journaled timestamps: the engine is
//! deterministic, so it ends in the state it was in, with the same steps
//! in flight. Those already journaled as dispatched wait for their agents
//! to reconnect (which re-reports, never re-runs); the others are sent now.
//!
//! The values of the secrets a run uses live only here, in memory (see
//! [`crate::secret`]): each dispatch carries those its step uses. A run
//! resumed after a restart has lost them: it is held, `paused` with reason
//! `secrets` (nothing new is sent; results still come in), until
//! `modi resume RUN --secret ...` gives every one of them again
//! (`driver/secrets.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::alert::{AlertEvent, Alerts};
use crate::clock::Clock;
use crate::fleet::{Fleet, RunRef, full_id};
use crate::rollout::AlertKind;
use crate::rollout::{
    Action, DispatchId, Engine, Event, HostState, Judge, LateResult, Millis, Progress, RunState,
    RunStatus, StepResult, Termination,
};
/// Where it was before it moved below the fleet; `modi-tests`'
/// fanout-bench still names it here.
use crate::run_ports::{DriverMsg, RunPorts, WatchItem};
use crate::secret::{self, Secrets};
use crate::spec::{RunSpec, Step};
use crate::store::{JournalEntry, Record, RunMeta, Store, StoreError};

mod secrets;

/// Inbox length of a run driver.
const INBOX: usize = 4096;
/// Most inputs journaled together in one flush.
const BATCH: usize = 1024;
/// How often a run held by an unwritable store tries its write again, even
/// if the store has not said it can write.
const STORE_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Everything a driver needs from the controller.
#[derive(Clone)]
pub struct Context {
    /// The store.
    pub store: Store,
    /// The live fleet.
    pub fleet: Fleet,
    /// Where alerts go.
    pub alerts: Alerts,
    /// Condition evaluation.
    pub judge: Arc<dyn Judge>,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
    /// Tracks driver tasks for a clean shutdown.
    pub tasks: tokio_util::task::TaskTracker,
    /// How long a backout waits for its host to come back.
    pub backout_wait: std::time::Duration,
    /// Counters of steps sent and finished.
    pub metrics: crate::metrics::Metrics,
    /// What time it is (the fleet's clock).
    pub clock: Clock,
}

struct Driver {
    run: u64,
    ctx: Context,
    spec: Arc<RunSpec>,
    engine: Engine,
    seq: u64,
    meta: RunMeta,
    inbox: mpsc::Receiver<DriverMsg>,
    watch: broadcast::Sender<WatchItem>,
    /// Results synthesized locally (unreachable hosts), handled next.
    local: Vec<(DispatchId, StepResult, Option<String>)>,
    /// Dispatches held until their host is free: not (yet) back after a
    /// controller restart (during the startup grace), a backout whose host
    /// is away (up to `backout_wait`), a host another run holds. Tried
    /// again only when the fleet says their host may be free (`ready`) or
    /// at `deferred_due`, never on every event.
    deferred: BTreeMap<DispatchId, Action>,
    /// The held dispatches of each host.
    deferred_hosts: HashMap<String, BTreeSet<DispatchId>>,
    /// The earliest time a held dispatch stops waiting whatever happens
    /// (the grace ends, a `backout_wait` runs out): all are tried then.
    deferred_due: Option<Millis>,
    /// Hosts the fleet says may be free now.
    ready: Arc<crate::run_ports::Ready>,
    /// Why the run is held by the driver (the store cannot write).
    held: Option<String>,
    /// Dispatches waiting (in `deferred`) for a reason people see: a
    /// backout whose host is away, or a host another run holds.
    waiting: BTreeMap<DispatchId, Waiting>,
    /// Changes of this run active on each host (it holds the host while
    /// any is).
    active: HashMap<String, BTreeSet<usize>>,
    /// Steps declared `lost` (a late result for them is journaled).
    lost: HashSet<DispatchId>,
    /// Late results, journaled.
    late: Vec<LateResult>,
    /// Late results to journal.
    late_in: Vec<(DispatchId, StepResult, String)>,
    /// The values of the secrets the run uses: in memory only.
    secrets: Secrets,
    /// Secrets the run uses and does not have (lost in a controller
    /// restart). While there are any, the run is held (`paused`, reason
    /// `secrets`): dispatches wait in `parked`.
    missing: BTreeSet<String>,
    /// Dispatches held until the missing secrets are given.
    parked: Vec<Action>,
    /// Steps in flight since before a restart, not sent again for want of
    /// their secrets: (id, the secrets it uses).
    unsent: Vec<(DispatchId, BTreeSet<String>)>,
}

/// An operator's answer to a control: the run's state, or why not.
type Reply = oneshot::Sender<Result<RunState, String>>;

/// Why a dispatch waits.
#[derive(Clone, Copy, Debug)]
struct Waiting {
    /// Since when.
    since: Millis,
    /// Its host shows this meanwhile.
    shows: HostState,
}

fn distinct_hosts(spec: &RunSpec) -> u32 {
    spec.changes
        .iter()
        .flat_map(|c| c.hosts.iter().map(|h| h.host.name.as_str()))
        .collect::<BTreeSet<_>>()
        .len() as u32
}

/// Creates run and starts its driver. Returns the run id once the run is
/// durable. `secrets` holds the values of the secrets the run uses (any
/// other is dropped); they are kept in memory only.
pub async fn start(
    ctx: &Context,
    spec: RunSpec,
    mut secrets: Secrets,
    submitted_by: &str,
) -> Result<u64, StoreError> {
    let used = spec.secrets();
    secrets.retain(|name, _| used.contains(name));
    let now = ctx.clock.now();
    let spec = Arc::new(spec);
    let meta = RunMeta {
        id: 0,
        name: spec.name.clone(),
        state: RunState::Pending,
        created_at: now,
        finished_at: None,
        submitted_by: submitted_by.to_string(),
        hosts: distinct_hosts(&spec),
    };
    let entries = [
        JournalEntry {
            at: now,
            record: Record::Created {
                spec: Box::new((*spec).clone()),
                submitted_by: submitted_by.to_string(),
            },
        },
        JournalEntry {
            at: now,
            record: Record::Event {
                event: Event::Start,
            },
        },
    ];
    let seq = entries.len() as u64;
    let meta = ctx.store.create_run(meta, entries.to_vec()).await?;
    let run = meta.id;
    let mut driver = Driver::new(ctx.clone(), run, spec, meta, seq);
    driver.secrets = secrets;
    driver.missing = used
        .into_iter()
        .filter(|n| !driver.secrets.contains_key(n))
        .collect();
    let actions = driver.engine.handle(Event::Start, now);
    driver.spawn(actions);
    Ok(run)
}

/// A run rebuilt from its journal (see [`replay`]).
pub struct Replayed {
    /// The rendered run.
    pub spec: Arc<RunSpec>,
    /// The engine, in the state the journal leads to.
    pub engine: Engine,
    /// Journal entries read.
    pub entries: u64,
    /// Steps in flight: id → (host, step, journaled as dispatched, cancelled).
    pub in_flight: BTreeMap<DispatchId, InFlight>,
    /// Every step the engine dispatched, in order, with its host.
    pub dispatches: Vec<(DispatchId, String, Step)>,
    /// Every result journaled.
    pub results: BTreeMap<DispatchId, StepResult>,
    /// When each step was dispatched and when its result was journaled.
    pub times: BTreeMap<DispatchId, (Millis, Option<Millis>)>,
    /// Results that came back after their step was declared lost.
    pub late: Vec<LateResult>,
    /// Who submitted it.
    pub submitted_by: String,
    /// When it was created.
    pub created_at: Millis,
}

/// A step the engine considers in flight after a replay.
pub struct InFlight {
    /// Host name.
    pub host: String,
    /// The step.
    pub step: Step,
    /// Journaled as dispatched before the crash?
    pub dispatched: bool,
    /// A cancel was asked for.
    pub cancelled: bool,
}

/// Replays run `run`'s journal through a fresh engine with the journaled
/// timestamps: the engine ends in the state it was in, with the same steps
/// in flight (each marked with whether it was journaled as dispatched and
/// whether a cancel was asked for). `None` if there is no such run.
pub fn replay(
    store: &Store,
    judge: Arc<dyn Judge>,
    run: u64,
) -> Result<Option<Replayed>, StoreError> {
    let journal = store.journal(run)?;
    let mut entries = journal.into_iter();
    let Some(first) = entries.next() else {
        return Ok(None);
    };
    let Record::Created { spec, submitted_by } = first.record else {
        return Err(StoreError::Corrupt {
            tree: "journal",
            detail: format!("run {run}: the first entry is not the run's creation"),
        });
    };
    let spec: Arc<RunSpec> = Arc::from(spec);
    let mut engine = Engine::new(spec.clone(), judge);
    let mut in_flight: BTreeMap<DispatchId, InFlight> = BTreeMap::new();
    let mut dispatches = Vec::new();
    let mut results = BTreeMap::new();
    let mut times: BTreeMap<DispatchId, (Millis, Option<Millis>)> = BTreeMap::new();
    let mut late = Vec::new();
    let mut count = 1;
    for entry in entries {
        count += 1;
        match entry.record {
            Record::Created { .. } => {}
            Record::Late { id, host, result } => late.push(LateResult {
                id,
                host,
                at: entry.at,
                result,
            }),
            Record::Dispatched { id } => {
                if let Some(f) = in_flight.get_mut(&id) {
                    f.dispatched = true;
                }
            }
            Record::Event { event } => {
                if let Event::StepFinished { id, result } = &event {
                    in_flight.remove(id);
                    results.entry(*id).or_insert_with(|| result.clone());
                    if let Some(t) = times.get_mut(id) {
                        t.1.get_or_insert(entry.at);
                    }
                }
                for action in engine.handle(event, entry.at) {
                    match action {
                        Action::Dispatch { id, host, step } => {
                            dispatches.push((id, host.clone(), step.clone()));
                            times.insert(id, (entry.at, None));
                            in_flight.insert(
                                id,
                                InFlight {
                                    host,
                                    step,
                                    dispatched: false,
                                    cancelled: false,
                                },
                            );
                        }
                        Action::Cancel { id, .. } => {
                            if let Some(f) = in_flight.get_mut(&id) {
                                f.cancelled = true;
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    Ok(Some(Replayed {
        spec,
        engine,
        entries: count,
        in_flight,
        dispatches,
        results,
        times,
        late,
        submitted_by,
        created_at: first.at,
    }))
}

/// Resumes an unfinished run after a restart.
pub fn resume(ctx: &Context, run: u64, replayed: Replayed, meta: RunMeta) {
    let Replayed {
        spec,
        engine,
        entries,
        in_flight,
        results,
        late,
        ..
    } = replayed;
    let mut driver = Driver::new(ctx.clone(), run, spec, meta, entries);
    driver.engine = engine;
    driver.late = late;
    // The values of its secrets went with the previous controller.
    driver.missing = driver.spec.secrets();
    driver.lost = results
        .iter()
        .filter(|(_, r)| r.termination == Some(Termination::Lost))
        .map(|(id, _)| *id)
        .collect();
    // Hosts this run was in the middle of hold them again.
    for (id, f) in &in_flight {
        driver
            .active
            .entry(f.host.clone())
            .or_default()
            .insert(id.change);
        ctx.fleet.hold(&f.host, run);
    }
    let key = driver.key();
    let mut fresh = Vec::new();
    for (id, f) in in_flight {
        if f.dispatched {
            // It may have run: the agent re-reports it, or runs it if it
            // never got it. A cancel asked for before the crash goes too.
            // One that uses secrets is in flight but goes out only once
            // they are given again (the agent reports it if it has it).
            let secrets = if f.step.secrets.is_empty() {
                Some(Arc::default())
            } else {
                driver.unsent.push((id, f.step.secrets.clone()));
                None
            };
            ctx.fleet
                .send_step(key, id, &f.host, Arc::new(f.step), secrets);
            if f.cancelled {
                ctx.fleet.cancel_step(&full_id(key, &id));
            }
        } else if f.cancelled {
            // Never sent, and no longer wanted.
            driver.local.push((
                id,
                not_sent(Termination::Cancelled, "cancelled before it was sent"),
                None,
            ));
        } else {
            fresh.push(Action::Dispatch {
                id,
                host: f.host,
                step: f.step,
            });
        }
    }
    tracing::info!(run, "resumed from the journal");
    driver.spawn(fresh);
}

impl Driver {
    fn new(ctx: Context, run: u64, spec: Arc<RunSpec>, meta: RunMeta, seq: u64) -> Driver {
        let (tx, inbox) = mpsc::channel(INBOX);
        let (watch, _) = broadcast::channel(4096);
        let ready = Arc::new(crate::run_ports::Ready::default());
        ctx.fleet.register_run(
            run,
            RunPorts {
                inbox: tx,
                watch: watch.clone(),
                ready: ready.clone(),
            },
        );
        let engine = Engine::new(spec.clone(), ctx.judge.clone());
        Driver {
            run,
            ctx,
            spec,
            engine,
            seq,
            meta,
            inbox,
            watch,
            local: Vec::new(),
            deferred: BTreeMap::new(),
            deferred_hosts: HashMap::new(),
            deferred_due: None,
            ready,
            held: None,
            waiting: BTreeMap::new(),
            active: HashMap::new(),
            lost: HashSet::new(),
            late: Vec::new(),
            late_in: Vec::new(),
            secrets: Secrets::new(),
            missing: BTreeSet::new(),
            parked: Vec::new(),
            unsent: Vec::new(),
        }
    }

    /// The run as agents see it.
    fn key(&self) -> RunRef {
        RunRef {
            id: self.run,
            stamp: self.meta.created_at,
        }
    }

    fn spawn(mut self, first: Vec<Action>) {
        let tasks = self.ctx.tasks.clone();
        tasks.spawn(async move {
            match self.run_loop(first).await {
                Ok(()) | Err(StoreError::Closed) => {}
                Err(e) => {
                    tracing::error!(run = self.run, error = %e, "run driver stopped");
                }
            }
        });
    }

    async fn journal(&mut self, records: Vec<Record>, at: Millis) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let entries: Vec<JournalEntry> = records
            .into_iter()
            .map(|record| JournalEntry { at, record })
            .collect();
        let n = entries.len() as u64;
        self.persist(entries, None).await?;
        self.seq += n;
        Ok(())
    }

    /// Writes journal entries (from `self.seq`) and/or the run's summary,
    /// durably. While the store cannot write, the run is held: it shows
    /// `paused` (reason `store`), an alert goes out once, status requests
    /// are answered, results wait their turn, and the write is tried again
    /// when the store can write. Only a closed store (shutdown) stops it.
    async fn persist(
        &mut self,
        entries: Vec<JournalEntry>,
        meta: Option<RunMeta>,
    ) -> Result<(), StoreError> {
        let mut alerted = false;
        loop {
            let written = self
                .ctx
                .store
                .record(self.run, self.seq, entries.clone(), meta.clone())
                .await;
            let why = match written {
                Ok(()) => {
                    if alerted {
                        tracing::info!(run = self.run, "the store can write again; run goes on");
                        let _ = self.watch.send(WatchItem::Progress {
                            progress: Progress::Run {
                                state: self.engine.state(),
                            },
                        });
                    }
                    self.held = None;
                    return Ok(());
                }
                Err(StoreError::Closed) => return Err(StoreError::Closed),
                Err(e) => e.to_string(),
            };
            if self.ctx.shutdown.is_cancelled() {
                return Err(StoreError::Closed);
            }
            self.held = Some(format!("store: {why}"));
            if !alerted {
                alerted = true;
                tracing::error!(run = self.run, error = %why, "run paused: its journal cannot be written");
                self.ctx.alerts.fire(AlertEvent {
                    run: self.run,
                    changeset: self.spec.name.clone(),
                    kind: AlertKind::StoreUnwritable,
                    change: None,
                    host: None,
                    message: format!(
                        "run {} is paused: {why}; it goes on by itself once the store can write",
                        self.run
                    ),
                    at: self.ctx.clock.now(),
                });
                let _ = self.watch.send(WatchItem::Progress {
                    progress: Progress::Run {
                        state: RunState::Paused,
                    },
                });
            }
            self.wait_for_store().await?;
        }
    }

    /// Waits (answering status requests, keeping results for later,
    /// refusing controls) until the store says it can write, or a retry is
    /// due anyway.
    async fn wait_for_store(&mut self) -> Result<(), StoreError> {
        let store = self.ctx.store.clone();
        let retry = tokio::time::sleep(STORE_RETRY);
        tokio::pin!(retry);
        let writable = store.writable();
        tokio::pin!(writable);
        loop {
            tokio::select! {
                _ = &mut writable => return Ok(()),
                _ = &mut retry => return Ok(()),
                _ = self.ctx.shutdown.cancelled() => return Err(StoreError::Closed),
                msg = self.inbox.recv() => match msg {
                    None => return Err(StoreError::Closed),
                    Some(DriverMsg::Status { reply }) => {
                        let _ = reply.send(self.status());
                    }
                    Some(DriverMsg::Result { id, result, agent }) => {
                        self.local.push((id, result, agent));
                    }
                    Some(DriverMsg::Late { id, result, agent }) => {
                        self.late_in.push((id, result, agent));
                    }
                    Some(DriverMsg::Control { reply, .. } | DriverMsg::Secrets { reply, .. }) => {
                        let why = self.held.clone().unwrap_or_default();
                        let _ = reply.send(Err(format!(
                            "run {} is paused ({why}); it goes on by itself once the store can write",
                            self.run
                        )));
                    }
                },
            }
        }
    }

    /// The engine's status, with the driver's hold if any.
    fn status(&self) -> RunStatus {
        let mut status = self.engine.status();
        if let Some(why) = &self.held {
            status.state = RunState::Paused;
            status.held = Some(why.clone());
        } else if !self.missing.is_empty() && !status.state.is_final() {
            status.state = RunState::Paused;
            status.held = Some(self.secrets_hold());
        }
        for (id, w) in &self.waiting {
            if let Some(h) = status
                .changes
                .get_mut(id.change)
                .and_then(|c| c.hosts.get_mut(id.host))
            {
                h.state = w.shows;
            }
        }
        status.late = self.late.clone();
        status
    }

    /// The host a dispatch goes to.
    fn host_of(&self, id: &DispatchId) -> Option<&str> {
        self.spec
            .changes
            .get(id.change)?
            .hosts
            .get(id.host)
            .map(|h| h.host.name.as_str())
    }

    /// Journals the late results that came in, and acks every result that
    /// is no longer in flight. A late result never reaches the engine.
    async fn take_late(&mut self) -> Result<(), StoreError> {
        let incoming = std::mem::take(&mut self.late_in);
        if incoming.is_empty() {
            return Ok(());
        }
        let now = self.ctx.clock.now();
        let mut records = Vec::new();
        let mut acks = Vec::new();
        for (id, result, agent) in incoming {
            if self.host_of(&id) != Some(agent.as_str()) {
                tracing::warn!(run = self.run, %id, agent, "late result for another host's step; ignored");
                continue;
            }
            if self.lost.remove(&id) {
                tracing::warn!(run = self.run, %id, agent, "late result for a step declared lost; journaled, the outcome stands");
                records.push(Record::Late {
                    id,
                    host: agent.clone(),
                    result: result.clone(),
                });
                self.late.push(LateResult {
                    id,
                    host: agent.clone(),
                    at: now,
                    result: result.clone(),
                });
                let _ = self.watch.send(WatchItem::Late { id, result });
            }
            acks.push((id, agent));
        }
        self.journal(records, now).await?;
        let key = self.key();
        for (id, agent) in acks {
            self.ctx.fleet.complete(Some(&agent), &full_id(key, &id));
        }
        Ok(())
    }

    async fn run_loop(&mut self, first: Vec<Action>) -> Result<(), StoreError> {
        if !self.missing.is_empty() {
            self.hold_for_secrets().await?;
        }
        self.act(first).await?;
        while !self.engine.is_finished() {
            self.take_late().await?;
            let again = self.take_deferred_due();
            if !again.is_empty() {
                self.act(again).await?;
            }
            let mut results = std::mem::take(&mut self.local);
            let mut controls = Vec::new();
            let mut supplies = Vec::new();
            if results.is_empty() {
                let clock = self.ctx.clock;
                let mut wake = self.engine.next_deadline();
                if let Some(due) = self.deferred_due {
                    wake = Some(wake.map_or(due, |w| w.min(due)));
                }
                let ready = self.ready.clone();
                let sleep = async {
                    match wake {
                        Some(at) => {
                            let wait = at.saturating_sub(clock.now());
                            tokio::time::sleep(std::time::Duration::from_millis(wait)).await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    msg = self.inbox.recv() => match msg {
                        Some(msg) => self.sort(msg, &mut results, &mut controls, &mut supplies),
                        None => return Ok(()),
                    },
                    _ = sleep => {}
                    _ = ready.notified() => {}
                    _ = self.ctx.shutdown.cancelled() => return Ok(()),
                }
                while results.len() + controls.len() + supplies.len() < BATCH {
                    match self.inbox.try_recv() {
                        Ok(msg) => self.sort(msg, &mut results, &mut controls, &mut supplies),
                        Err(_) => break,
                    }
                }
            }

            // Journal everything first: an event is durable before the
            // engine acts on it.
            let now = self.ctx.clock.now();
            let mut events: Vec<Event> = results
                .iter()
                .map(|(id, result, _)| Event::StepFinished {
                    id: *id,
                    result: result.clone(),
                })
                .collect();
            let mut replies = Vec::new();
            for (event, reply) in controls {
                match self.check_control(&event) {
                    Ok(()) => {
                        events.push(event);
                        replies.push(reply);
                    }
                    Err(why) => {
                        let _ = reply.send(Err(why));
                    }
                }
            }
            let mut released = false;
            for (secrets, by, reply) in supplies {
                match self.take_secrets(secrets) {
                    Ok(()) => {
                        released = true;
                        // `modi resume` resumes a run an operator paused too.
                        if self.engine.state() == RunState::Paused
                            && !events.iter().any(|e| matches!(e, Event::Resume { .. }))
                        {
                            events.push(Event::Resume { by });
                        }
                        replies.push(reply);
                    }
                    Err(why) => {
                        let _ = reply.send(Err(why));
                    }
                }
            }
            // A deadline that passed is due, whichever branch woke us.
            if self.engine.next_deadline().is_some_and(|d| d <= now) {
                events.push(Event::Timer);
            }
            self.journal(
                events
                    .iter()
                    .cloned()
                    .map(|event| Record::Event { event })
                    .collect(),
                now,
            )
            .await?;
            let key = self.key();
            for (id, result, agent) in &results {
                if result.termination == Some(Termination::Lost) {
                    self.lost.insert(*id);
                }
                self.ctx.metrics.finished(result);
                self.waiting.remove(id);
                // Durable now: the agent may forget it.
                self.ctx.fleet.complete(agent.as_deref(), &full_id(key, id));
                let _ = self.watch.send(WatchItem::Result {
                    id: *id,
                    result: result.clone(),
                });
            }
            let mut actions = Vec::new();
            if released {
                actions = self.release_secrets_hold().await?;
            }
            for event in events {
                actions.extend(self.engine.handle(event, now));
            }
            let state = self.engine.state();
            for reply in replies {
                let _ = reply.send(Ok(state));
            }
            self.act(actions).await?;
        }
        self.finish().await
    }

    fn sort(
        &mut self,
        msg: DriverMsg,
        results: &mut Vec<(DispatchId, StepResult, Option<String>)>,
        controls: &mut Vec<(Event, Reply)>,
        supplies: &mut Vec<(Secrets, String, Reply)>,
    ) {
        match msg {
            DriverMsg::Result { id, result, agent } => results.push((id, result, agent)),
            DriverMsg::Late { id, result, agent } => self.late_in.push((id, result, agent)),
            DriverMsg::Control { event, reply } => controls.push((event, reply)),
            DriverMsg::Secrets { secrets, by, reply } => supplies.push((secrets, by, reply)),
            DriverMsg::Status { reply } => {
                let _ = reply.send(self.status());
            }
        }
    }

    /// Refuses controls that make no sense now, with a reason for people.
    fn check_control(&self, event: &Event) -> Result<(), String> {
        let state = self.engine.state();
        let run = self.run;
        let waits = !self.missing.is_empty() && !state.is_final();
        match event {
            // Held for its secrets, it shows paused: the same rule.
            Event::Approve { .. } | Event::Deny { .. } if waits => Err(format!(
                "run {run} is paused, waiting for its secrets {}; resume it first (modi resume {run} --secret NAME=...), then approve or deny",
                secret::list(&self.missing)
            )),
            // A decision on a paused run would be lost or misread: the
            // operator resumes first, then decides at the gate.
            Event::Approve { .. } | Event::Deny { .. } if state == RunState::Paused => {
                Err(format!(
                    "run {run} is paused; resume it first (modi resume {run}), then approve or deny"
                ))
            }
            Event::Approve { .. } | Event::Deny { .. } if state != RunState::AwaitingApproval => {
                Err(format!(
                    "run {run} is not waiting for approval (it is {})",
                    state_name(state)
                ))
            }
            Event::Resume { .. } if waits => Err(format!(
                "run {run} waits for its secrets {}: resume it with `modi resume {run} --secret NAME=...` for each",
                secret::list(&self.missing)
            )),
            Event::Pause { .. } if state == RunState::Paused => {
                Err(format!("run {run} is already paused"))
            }
            Event::Resume { .. } if state != RunState::Paused => Err(format!(
                "run {run} is not paused (it is {})",
                state_name(state)
            )),
            _ if state.is_final() => Err(format!("run {run} has ended ({})", state_name(state))),
            _ => Ok(()),
        }
    }

    /// Carries out the engine's actions: dispatches (journaled, then
    /// sent), then cancels (so a step dispatched and cancelled in one batch
    /// is cancelled after it is sent), alerts and progress in order.
    async fn act(&mut self, actions: Vec<Action>) -> Result<(), StoreError> {
        let mut dispatch = Vec::new();
        let mut cancels = Vec::new();
        for action in actions {
            match action {
                Action::Dispatch { id, step, .. }
                    if matches!(step.action, crate::spec::StepAction::Unrenderable { .. }) =>
                {
                    let crate::spec::StepAction::Unrenderable { reason } = &step.action else {
                        unreachable!("matched above")
                    };
                    self.local
                        .push((id, not_sent(Termination::FailedToStart, reason), None));
                }
                Action::Dispatch { id, host, step } if !self.missing.is_empty() => {
                    self.parked.push(Action::Dispatch { id, host, step });
                }
                Action::Dispatch { id, host, step } => match self.route(&id, &host) {
                    Route::Send => {
                        self.waiting.remove(&id);
                        dispatch.push((id, host, step));
                    }
                    Route::Wait(due) => self.defer(Action::Dispatch { id, host, step }, due),
                    Route::Fail(why) => {
                        self.waiting.remove(&id);
                        self.local
                            .push((id, not_sent(Termination::Unreachable, &why), None));
                    }
                },
                Action::Cancel { id, .. } => {
                    let held = |list: &Vec<Action>| {
                        list.iter()
                            .position(|a| matches!(a, Action::Dispatch { id: d, .. } if *d == id))
                    };
                    if let Some(i) = held(&self.parked) {
                        self.parked.remove(i);
                        self.local.push((
                            id,
                            not_sent(Termination::Cancelled, "cancelled before it was sent"),
                            None,
                        ));
                    } else if self.undefer(&id).is_some() {
                        self.waiting.remove(&id);
                        self.local.push((
                            id,
                            not_sent(Termination::Cancelled, "cancelled before it was sent"),
                            None,
                        ));
                    } else {
                        cancels.push(id);
                    }
                }
                Action::Alert {
                    kind,
                    change,
                    host,
                    message,
                } => self.ctx.alerts.fire(AlertEvent {
                    run: self.run,
                    changeset: self.spec.name.clone(),
                    kind,
                    change,
                    host,
                    message,
                    at: self.ctx.clock.now(),
                }),
                Action::Progress(progress) => {
                    if let Progress::Host {
                        change,
                        host,
                        state,
                        ..
                    } = &progress
                    {
                        self.track_host(*change, *host, *state);
                    }
                    let mut progress = progress;
                    if let Progress::Run { state } = &mut progress {
                        if !self.missing.is_empty() && !state.is_final() {
                            // Held for its secrets: it shows paused.
                            *state = RunState::Paused;
                        }
                        self.meta.state = *state;
                        self.persist(Vec::new(), Some(self.meta.clone())).await?;
                    }
                    let _ = self.watch.send(WatchItem::Progress { progress });
                }
            }
        }
        let key = self.key();
        let mut with_secrets = Vec::with_capacity(dispatch.len());
        for (id, host, step) in dispatch {
            match secret::subset(&self.secrets, &step.secrets) {
                Ok(values) => with_secrets.push((id, host, step, Arc::new(values))),
                Err(name) => {
                    // Not given, or lost: the run waits for it.
                    self.missing.insert(name);
                    self.parked.push(Action::Dispatch { id, host, step });
                }
            }
        }
        let dispatch = with_secrets;
        if !dispatch.is_empty() {
            // Durable before sent.
            let records = dispatch
                .iter()
                .map(|(id, _, _, _)| Record::Dispatched { id: *id })
                .collect();
            self.journal(records, self.ctx.clock.now()).await?;
            for (id, host, step, secrets) in dispatch {
                let _ = self.watch.send(WatchItem::Dispatched {
                    id,
                    host: host.clone(),
                    step: describe(&step),
                });
                self.ctx
                    .fleet
                    .send_step(key, id, &host, Arc::new(step), Some(secrets));
                self.ctx.metrics.dispatched();
            }
        }
        for id in cancels {
            self.ctx.fleet.cancel_step(&full_id(key, &id));
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), StoreError> {
        for (host, _) in std::mem::take(&mut self.active) {
            self.ctx.fleet.release(&host, self.run);
        }
        self.meta.state = self.engine.state();
        self.meta.finished_at = Some(self.ctx.clock.now());
        self.persist(Vec::new(), Some(self.meta.clone())).await?;
        self.ctx.fleet.unregister_run(self.run);
        tracing::info!(
            run = self.run,
            state = state_name(self.meta.state),
            "run finished"
        );
        Ok(())
    }
}

/// Where a dispatch goes now.
enum Route {
    /// To its agent.
    Send,
    /// Nowhere yet: held in `deferred` until the fleet says its host may
    /// be free, or until this time if any.
    Wait(Option<Millis>),
    /// Nowhere: it fails as `unreachable`, with this reason.
    Fail(String),
}

impl Driver {
    /// Decides where a dispatch goes: one host runs one run's change at a
    /// time (another run's host waits, `queued`); a backout whose host is
    /// away waits for it up to `backout_wait` (`backout_pending`); after a
    /// controller restart a host that was connected is waited for during
    /// the grace; any other step for an absent host is `unreachable`.
    fn route(&mut self, id: &DispatchId, host: &str) -> Route {
        let now = self.ctx.clock.now();
        if !self.ctx.fleet.hold(host, self.run) {
            self.waiting.entry(*id).or_insert(Waiting {
                since: now,
                shows: HostState::Queued,
            });
            // Woken when the run holding it lets it go.
            return Route::Wait(None);
        }
        self.active
            .entry(host.to_string())
            .or_default()
            .insert(id.change);
        // Not connected: woken when it connects.
        if self.ctx.fleet.connected_or_wake(host, self.run) {
            return Route::Send;
        }
        if id.phase.is_backout() {
            let w = self.waiting.entry(*id).or_insert(Waiting {
                since: now,
                shows: HostState::BackoutPending,
            });
            if w.shows != HostState::BackoutPending {
                // It was queued behind another run until now.
                *w = Waiting {
                    since: now,
                    shows: HostState::BackoutPending,
                };
            }
            let until = w.since + self.ctx.backout_wait.as_millis() as Millis;
            if now < until {
                return Route::Wait(Some(until));
            }
            return Route::Fail(format!(
                "agent {host} did not come back within backout_wait ({}); the backout was never sent",
                humantime::format_duration(self.ctx.backout_wait)
            ));
        }
        // No longer queued behind another run.
        self.waiting.remove(id);
        if self.ctx.fleet.expected_back(host) {
            return Route::Wait(Some(self.ctx.fleet.grace_end()));
        }
        Route::Fail(format!("agent {host} is not connected; nothing was sent"))
    }

    /// Holds a dispatch until its host may be free (or until `due`).
    fn defer(&mut self, action: Action, due: Option<Millis>) {
        let Action::Dispatch { id, host, .. } = &action else {
            return;
        };
        self.deferred_hosts
            .entry(host.clone())
            .or_default()
            .insert(*id);
        if let Some(due) = due {
            self.deferred_due = Some(self.deferred_due.map_or(due, |d| d.min(due)));
        }
        self.deferred.insert(*id, action);
    }

    /// Takes a held dispatch out of `deferred`.
    fn undefer(&mut self, id: &DispatchId) -> Option<Action> {
        let action = self.deferred.remove(id)?;
        if let Action::Dispatch { host, .. } = &action
            && let Some(ids) = self.deferred_hosts.get_mut(host)
        {
            ids.remove(id);
            if ids.is_empty() {
                self.deferred_hosts.remove(host);
            }
        }
        Some(action)
    }

    /// The held dispatches to try again now: every one once a deadline
    /// has come (they are few: the end of the grace, a `backout_wait`),
    /// else those of the hosts the fleet said may be free.
    fn take_deferred_due(&mut self) -> Vec<Action> {
        let ready = self.ready.take();
        if self.deferred.is_empty() {
            self.deferred_due = None;
            return Vec::new();
        }
        if self
            .deferred_due
            .is_some_and(|due| due <= self.ctx.clock.now())
        {
            self.deferred_due = None;
            self.deferred_hosts.clear();
            return std::mem::take(&mut self.deferred).into_values().collect();
        }
        let mut again = Vec::new();
        for host in ready {
            for id in self.deferred_hosts.remove(&host).unwrap_or_default() {
                again.extend(self.deferred.remove(&id));
            }
        }
        again
    }

    /// Follows a host's state in a change: this run holds the host while
    /// any of its changes is active there, and lets it go after.
    fn track_host(&mut self, change: usize, host: usize, state: HostState) {
        if !state.is_final() {
            return;
        }
        let Some(name) = self
            .spec
            .changes
            .get(change)
            .and_then(|c| c.hosts.get(host))
            .map(|h| h.host.name.clone())
        else {
            return;
        };
        let idle = match self.active.get_mut(&name) {
            Some(changes) => {
                changes.remove(&change);
                changes.is_empty()
            }
            None => true,
        };
        if idle {
            self.active.remove(&name);
            self.ctx.fleet.release(&name, self.run);
        }
    }
}

/// The result of a step that was never sent.
fn not_sent(termination: Termination, why: &str) -> StepResult {
    StepResult {
        termination: Some(termination),
        stderr: why.to_string(),
        ..StepResult::default()
    }
}

/// What a step runs, in one line for people.
pub fn describe(step: &Step) -> String {
    use crate::spec::StepAction;
    match &step.action {
        StepAction::Run { command } => format!("run: {command}"),
        StepAction::Argv { argv } => format!("argv: {}", argv.join(" ")),
        StepAction::File(f) => format!("file: {}", f.path),
        StepAction::Interact { command, .. } => format!("interact: {command}"),
        StepAction::Restore { path, .. } => format!("restore: {path}"),
        StepAction::Unrenderable { reason } => format!("not rendered: {reason}"),
    }
}

fn state_name(state: RunState) -> &'static str {
    state.as_str()
}
