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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::alert::{AlertEvent, Alerts};
use crate::fleet::{Fleet, RunPorts, RunRef, full_id};
use crate::rollout::{
    Action, DispatchId, Engine, Event, Judge, Millis, Progress, RunState, RunStatus, StepResult,
    Termination,
};
use crate::service::agent_convert;
use crate::spec::{RunSpec, Step};
use crate::store::{JournalEntry, Record, RunMeta, Store, StoreError};

/// Inbox length of a run driver.
const INBOX: usize = 4096;
/// Most inputs journaled together in one flush.
const BATCH: usize = 1024;
/// How often dispatches held for a host that is not back yet are retried.
const DEFERRED_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// What a run driver receives.
#[derive(Debug)]
pub enum DriverMsg {
    /// A step's result from its agent (or `lost`, from the fleet).
    Result {
        /// Which dispatch.
        id: DispatchId,
        /// The result.
        result: StepResult,
        /// The agent to ack once it is durable (`None` for a result the
        /// controller made up, e.g. `lost`).
        agent: Option<String>,
    },
    /// An operator's approve/deny/abort/pause/resume.
    Control {
        /// The event.
        event: Event,
        /// The run's state after it, or why it was refused.
        reply: oneshot::Sender<Result<RunState, String>>,
    },
    /// A status snapshot, please.
    Status {
        /// Where to send it.
        reply: oneshot::Sender<RunStatus>,
    },
}

/// What watchers of a run see.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum WatchItem {
    /// A progress event from the engine.
    Progress {
        /// The event.
        progress: Progress,
    },
    /// A step was sent.
    Dispatched {
        /// Which dispatch.
        id: DispatchId,
        /// To which host.
        host: String,
        /// What it runs, for people.
        step: String,
    },
    /// A step's result arrived (judged by the next `Progress::Step`).
    Result {
        /// Which dispatch.
        id: DispatchId,
        /// The result.
        result: StepResult,
    },
    /// Live output of a step.
    Output {
        /// Which dispatch.
        id: DispatchId,
        /// stderr (else stdout).
        stderr: bool,
        /// The text.
        data: String,
    },
}

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
    /// Dispatches for hosts not (yet) back after a controller restart,
    /// held during the startup grace.
    deferred: Vec<Action>,
}

fn distinct_hosts(spec: &RunSpec) -> u32 {
    spec.changes
        .iter()
        .flat_map(|c| c.hosts.iter().map(|h| h.host.name.as_str()))
        .collect::<BTreeSet<_>>()
        .len() as u32
}

/// Creates run and starts its driver. Returns the run id once the run is
/// durable.
pub async fn start(ctx: &Context, spec: RunSpec, submitted_by: &str) -> Result<u64, StoreError> {
    let run = ctx.store.next_run_id()?;
    let now = crate::clock::now();
    let spec = Arc::new(spec);
    let meta = RunMeta {
        id: run,
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
    ctx.store.append(run, 0, &entries)?;
    ctx.store.put_run(&meta)?;
    ctx.store.flush().await?;
    let mut driver = Driver::new(ctx.clone(), run, spec, meta, entries.len() as u64);
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
    let mut count = 1;
    for entry in entries {
        count += 1;
        match entry.record {
            Record::Created { .. } => {}
            Record::Dispatched { id } => {
                if let Some(f) = in_flight.get_mut(&id) {
                    f.dispatched = true;
                }
            }
            Record::Event { event } => {
                if let Event::StepFinished { id, result } = &event {
                    in_flight.remove(id);
                    results.entry(*id).or_insert_with(|| result.clone());
                }
                for action in engine.handle(event, entry.at) {
                    match action {
                        Action::Dispatch { id, host, step } => {
                            dispatches.push((id, host.clone(), step.clone()));
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
        ..
    } = replayed;
    let mut driver = Driver::new(ctx.clone(), run, spec, meta, entries);
    driver.engine = engine;
    let key = driver.key();
    let mut fresh = Vec::new();
    for (id, f) in in_flight {
        if f.dispatched {
            // It may have run: the agent re-reports it, or runs it if it
            // never got it. A cancel asked for before the crash goes too.
            let msg = agent_convert::run_step(key, &id, &f.step);
            ctx.fleet.send_step(run, id, &f.host, msg);
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
        ctx.fleet.register_run(
            run,
            RunPorts {
                inbox: tx,
                watch: watch.clone(),
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
            deferred: Vec::new(),
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
            if let Err(e) = self.run_loop(first).await {
                tracing::error!(run = self.run, error = %e, "run driver stopped: the journal cannot be written");
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
        self.ctx.store.append(self.run, self.seq, &entries)?;
        self.seq += entries.len() as u64;
        self.ctx.store.flush().await
    }

    async fn run_loop(&mut self, first: Vec<Action>) -> Result<(), StoreError> {
        self.act(first).await?;
        while !self.engine.is_finished() {
            if !self.deferred.is_empty() {
                let again = std::mem::take(&mut self.deferred);
                self.act(again).await?;
            }
            let mut results = std::mem::take(&mut self.local);
            let mut controls = Vec::new();
            if results.is_empty() {
                let mut wake = self.engine.next_deadline();
                if !self.deferred.is_empty() {
                    let soon = crate::clock::now() + DEFERRED_POLL.as_millis() as Millis;
                    wake = Some(wake.map_or(soon, |w| w.min(soon)));
                }
                let sleep = async {
                    match wake {
                        Some(at) => {
                            let wait = at.saturating_sub(crate::clock::now());
                            tokio::time::sleep(std::time::Duration::from_millis(wait)).await
                        }
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    msg = self.inbox.recv() => match msg {
                        Some(msg) => self.sort(msg, &mut results, &mut controls),
                        None => return Ok(()),
                    },
                    _ = sleep => {}
                    _ = self.ctx.shutdown.cancelled() => return Ok(()),
                }
                while results.len() + controls.len() < BATCH {
                    match self.inbox.try_recv() {
                        Ok(msg) => self.sort(msg, &mut results, &mut controls),
                        Err(_) => break,
                    }
                }
            }

            // Journal everything first: an event is durable before the
            // engine acts on it.
            let now = crate::clock::now();
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
                // Durable now: the agent may forget it.
                self.ctx.fleet.complete(agent.as_deref(), &full_id(key, id));
                let _ = self.watch.send(WatchItem::Result {
                    id: *id,
                    result: result.clone(),
                });
            }
            let mut actions = Vec::new();
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
        controls: &mut Vec<(Event, oneshot::Sender<Result<RunState, String>>)>,
    ) {
        match msg {
            DriverMsg::Result { id, result, agent } => results.push((id, result, agent)),
            DriverMsg::Control { event, reply } => controls.push((event, reply)),
            DriverMsg::Status { reply } => {
                let _ = reply.send(self.engine.status());
            }
        }
    }

    /// Refuses controls that make no sense now, with a reason for people.
    fn check_control(&self, event: &Event) -> Result<(), String> {
        let state = self.engine.state();
        let run = self.run;
        match event {
            // A paused run may still have a gate open: the engine answers it.
            Event::Approve { .. } | Event::Deny { .. }
                if !matches!(state, RunState::AwaitingApproval | RunState::Paused) =>
            {
                Err(format!(
                    "run {run} is not waiting for approval (it is {})",
                    state_name(state)
                ))
            }
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
                Action::Dispatch { id, host, step } => {
                    if self.ctx.fleet.is_connected(&host) {
                        dispatch.push((id, host, step));
                    } else if self.ctx.fleet.expected_back(&host) {
                        self.deferred.push(Action::Dispatch { id, host, step });
                    } else {
                        let why = format!("agent {host} is not connected; nothing was sent");
                        self.local
                            .push((id, not_sent(Termination::Unreachable, &why), None));
                    }
                }
                Action::Cancel { id, .. } => {
                    if let Some(i) = self
                        .deferred
                        .iter()
                        .position(|a| matches!(a, Action::Dispatch { id: d, .. } if *d == id))
                    {
                        self.deferred.remove(i);
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
                    at: crate::clock::now(),
                }),
                Action::Progress(progress) => {
                    if let Progress::Run { state } = &progress {
                        self.meta.state = *state;
                        self.ctx.store.put_run(&self.meta)?;
                    }
                    let _ = self.watch.send(WatchItem::Progress { progress });
                }
            }
        }
        let key = self.key();
        if !dispatch.is_empty() {
            // Durable before sent.
            let records = dispatch
                .iter()
                .map(|(id, _, _)| Record::Dispatched { id: *id })
                .collect();
            self.journal(records, crate::clock::now()).await?;
            for (id, host, step) in dispatch {
                let _ = self.watch.send(WatchItem::Dispatched {
                    id,
                    host: host.clone(),
                    step: describe(&step),
                });
                let msg = agent_convert::run_step(key, &id, &step);
                self.ctx.fleet.send_step(self.run, id, &host, msg);
            }
        }
        for id in cancels {
            self.ctx.fleet.cancel_step(&full_id(key, &id));
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), StoreError> {
        self.meta.state = self.engine.state();
        self.meta.finished_at = Some(crate::clock::now());
        self.ctx.store.put_run(&self.meta)?;
        self.ctx.store.flush().await?;
        self.ctx.fleet.unregister_run(self.run);
        tracing::info!(
            run = self.run,
            state = state_name(self.meta.state),
            "run finished"
        );
        Ok(())
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
    }
}

fn state_name(state: RunState) -> &'static str {
    state.as_str()
}
