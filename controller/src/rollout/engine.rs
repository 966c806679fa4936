//! The [`Engine`]: the run as a whole. It routes events to changes, starts
//! changes along the `requires` DAG, applies the changeset-level (and
//! group-level) `on_failure`, bails out on abort/deny/approval timeout,
//! pauses, and decides the run's final state.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::spec::{ChangesetFailure, RunSpec};

use super::change::{ChangeRun, Ctx};
use super::model::{
    Action, AlertKind, ChangeStatus, Decision, Event, HostStatus, Judge, Millis, OpenGate,
    Progress, RunState, RunStatus,
};

/// A changeset's scope: the top-level changeset or one included group.
#[derive(Debug)]
struct Scope {
    /// For messages.
    name: String,
    /// Its changeset-level `on_failure`.
    policy: ChangesetFailure,
    /// Nesting depth (top = 0); inner scopes back out first.
    depth: usize,
    /// A change in it failed: no new change of it starts.
    halted: bool,
    /// Its `backout_all` state.
    backout: ScopeBackout,
    /// Why it backs out, for messages.
    why: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ScopeBackout {
    /// Not asked.
    No,
    /// Asked; waits until none of its changes runs.
    Wanted,
    /// Its changes are queued or done.
    Started,
}

/// The rollout engine for one run: a pure, deterministic state machine.
///
/// Feed it [`Event`]s with [`Engine::handle`], carry out the [`Action`]s it
/// returns, and call `handle(Event::Timer, now)` once `now` reaches
/// [`Engine::next_deadline`]. See the module documentation of `rollout` for
/// the states and the rules.
pub struct Engine {
    spec: Arc<RunSpec>,
    judge: Arc<dyn Judge>,
    changes: Vec<ChangeRun>,
    /// Per change: its scopes, innermost first, the top-level last.
    chains: Vec<Vec<usize>>,
    /// Per change: its `requires` can never be met (bad index or a cycle).
    unsatisfiable: Vec<bool>,
    /// Groups by index, then the top-level scope.
    scopes: Vec<Scope>,
    started: bool,
    paused: bool,
    bail: Option<bool>,
    now: Millis,
    seq: u64,
    /// Changes waiting for their changeset-level backout, in order.
    cs_queue: VecDeque<usize>,
    /// The change whose changeset-level backout runs.
    cs_active: Option<usize>,
    concluded: Option<RunState>,
    shown: RunState,
    /// Operator decisions taken, for the status.
    decisions: Vec<Decision>,
}

/// Who decided what, for an operator's event.
fn decision(event: &Event) -> Option<(&str, &'static str)> {
    match event {
        Event::Approve { by } => Some((by, "approve")),
        Event::Deny { by, backout: true } => Some((by, "deny")),
        Event::Deny { by, backout: false } => Some((by, "deny --no-backout")),
        Event::Abort { by, backout: true } => Some((by, "abort")),
        Event::Abort { by, backout: false } => Some((by, "abort --no-backout")),
        Event::Pause { by } => Some((by, "pause")),
        Event::Resume { by } => Some((by, "resume")),
        _ => None,
    }
}

impl Engine {
    /// An engine for `spec`, judging conditions with `judge`. Nothing
    /// happens until `handle(Event::Start, now)`.
    pub fn new(spec: Arc<RunSpec>, judge: Arc<dyn Judge>) -> Engine {
        let top = spec.groups.len();
        let mut scopes: Vec<Scope> = spec
            .groups
            .iter()
            .enumerate()
            .map(|(g, group)| Scope {
                name: format!("{} ({})", group.name, group.file),
                policy: group.on_failure,
                depth: group_chain(&spec, Some(g)).len(),
                halted: false,
                backout: ScopeBackout::No,
                why: String::new(),
            })
            .collect();
        scopes.push(Scope {
            name: spec.name.clone(),
            policy: spec.on_failure,
            depth: 0,
            halted: false,
            backout: ScopeBackout::No,
            why: String::new(),
        });
        let chains = spec
            .changes
            .iter()
            .map(|c| {
                let mut chain = group_chain(&spec, c.group);
                chain.push(top);
                chain
            })
            .collect();
        let changes = spec
            .changes
            .iter()
            .enumerate()
            .map(|(i, c)| ChangeRun::new(i, c))
            .collect();
        Engine {
            unsatisfiable: unsatisfiable(&spec),
            spec,
            judge,
            changes,
            chains,
            scopes,
            started: false,
            paused: false,
            bail: None,
            now: 0,
            seq: 0,
            cs_queue: VecDeque::new(),
            cs_active: None,
            concluded: None,
            shown: RunState::Pending,
            decisions: Vec::new(),
        }
    }

    /// Handles one event at time `now` and returns what to do, in order.
    /// An event that makes no sense now (a duplicate or unknown step
    /// result, an approval with no gate, ...) changes nothing and returns
    /// no action.
    pub fn handle(&mut self, event: Event, now: Millis) -> Vec<Action> {
        if !self.accepts(&event) {
            return Vec::new();
        }
        if let Some((by, action)) = decision(&event) {
            self.decisions.push(Decision {
                at: now,
                by: by.to_string(),
                action: action.to_string(),
            });
        }
        let spec = Arc::clone(&self.spec);
        self.now = self.now.max(now);
        let mut ctx = Ctx {
            judge: Arc::clone(&self.judge),
            now: self.now,
            paused: self.paused,
            seq: self.seq,
            out: Vec::new(),
        };
        self.fire_gate_timeouts(&mut ctx);
        match event {
            Event::Start => self.started = true,
            Event::StepFinished { id, result } => {
                if self.changes[id.change].is_in_flight(id) {
                    self.changes[id.change].on_step(&spec.changes[id.change], &mut ctx, id, result);
                }
            }
            Event::Approve { .. } => {
                if let Some(c) = self.oldest_gate() {
                    self.changes[c].approve();
                }
            }
            Event::Deny { by, backout } => {
                if let Some(c) = self.oldest_gate() {
                    let label = self.changes[c].gate.as_ref().map_or("", |g| &g.label);
                    let why = format!("denied by {by} at the gate for {label}");
                    self.bail(&mut ctx, backout, &why);
                }
            }
            Event::Abort { by, backout } => {
                let why = match backout {
                    true => format!("aborted by {by}"),
                    false => format!("aborted by {by} with --no-backout"),
                };
                self.bail(&mut ctx, backout, &why);
            }
            Event::Pause { .. } => self.paused = true,
            Event::Resume { .. } => self.paused = false,
            Event::Timer => {}
        }
        self.pump(&mut ctx);
        self.sync(&mut ctx);
        self.seq = ctx.seq;
        ctx.out
    }

    /// When `handle(Event::Timer, now)` must next be called (a retry
    /// delay, a batch pause or an approval timeout), if ever.
    pub fn next_deadline(&self) -> Option<Millis> {
        if self.concluded.is_some() {
            return None;
        }
        self.changes
            .iter()
            .filter_map(|c| c.next_deadline(self.now))
            .min()
    }

    /// The run's state.
    pub fn state(&self) -> RunState {
        match self.concluded {
            Some(state) => state,
            None if !self.started => RunState::Pending,
            None if self.paused => RunState::Paused,
            None if self.changes.iter().any(|c| c.gate.is_some()) => RunState::AwaitingApproval,
            None => RunState::Running,
        }
    }

    /// A snapshot of the run: every change, host and dispatched step.
    pub fn status(&self) -> RunStatus {
        let changes = self
            .changes
            .iter()
            .zip(&self.spec.changes)
            .map(|(run, spec)| ChangeStatus {
                name: spec.name.clone(),
                state: run.display_state(self.paused),
                gate: run.gate.as_ref().map(|g| OpenGate {
                    id: g.opened,
                    label: g.label.clone(),
                    deadline: g.deadline,
                    since: g.since,
                }),
                hosts: run
                    .hosts
                    .iter()
                    .zip(&spec.hosts)
                    .map(|(host, plan)| HostStatus {
                        name: plan.host.name.clone(),
                        state: host.state,
                        attempt: host.attempt,
                        failure: host.failure.clone(),
                        steps: host.steps.clone(),
                    })
                    .collect(),
            })
            .collect();
        RunStatus {
            state: self.state(),
            changes,
            decisions: self.decisions.clone(),
            held: None,
            late: Vec::new(),
        }
    }

    /// The run reached its final state and nothing is in flight.
    pub fn is_finished(&self) -> bool {
        self.concluded.is_some()
    }

    fn accepts(&self, event: &Event) -> bool {
        if self.concluded.is_some() {
            return false;
        }
        if !self.started {
            return matches!(event, Event::Start);
        }
        match event {
            Event::Start => false,
            Event::StepFinished { id, .. } => self
                .changes
                .get(id.change)
                .is_some_and(|c| c.is_in_flight(*id)),
            Event::Approve { .. } | Event::Deny { .. } => self.oldest_gate().is_some(),
            Event::Abort { backout, .. } => match self.bail {
                None => true,
                Some(previous) => previous && !backout,
            },
            Event::Pause { .. } => !self.paused && self.bail.is_none(),
            Event::Resume { .. } => self.paused,
            Event::Timer => true,
        }
    }

    /// The change whose gate opened first, if any gate is open.
    fn oldest_gate(&self) -> Option<usize> {
        (0..self.changes.len())
            .filter_map(|c| self.changes[c].gate.as_ref().map(|g| (g.opened, c)))
            .min()
            .map(|(_, c)| c)
    }

    /// A gate that waited past its timeout is a deny.
    fn fire_gate_timeouts(&mut self, ctx: &mut Ctx) {
        let expired = self
            .changes
            .iter()
            .filter_map(|c| c.gate.as_ref())
            .filter(|g| g.deadline.is_some_and(|d| d <= ctx.now))
            .min_by_key(|g| (g.deadline, g.opened))
            .map(|g| (g.label.clone(), g.deadline.unwrap_or(g.since) - g.since));
        if let Some((label, waited)) = expired {
            let waited = std::time::Duration::from_millis(waited);
            // Journaled with the run (the timer that fired it is), shown
            // with the other decisions.
            self.decisions.push(Decision {
                at: ctx.now,
                by: "timeout".into(),
                action: format!(
                    "deny: the gate for {label} timed out after {}, counted as deny",
                    humantime::format_duration(waited)
                ),
            });
            let why = format!("the gate for {label} timed out: denied");
            self.bail(ctx, true, &why);
        }
    }

    /// Abort, deny or approval timeout.
    fn bail(&mut self, ctx: &mut Ctx, backout: bool, why: &str) {
        match self.bail {
            Some(false) => return,
            Some(true) if backout => return,
            Some(true) => {}
            None => {
                self.paused = false;
                ctx.paused = false;
                ctx.out.push(Action::Alert {
                    kind: AlertKind::BailedOut,
                    change: None,
                    host: None,
                    message: format!("run {} bails out: {why}", self.spec.name),
                });
            }
        }
        self.bail = Some(backout);
        let spec = Arc::clone(&self.spec);
        for (c, change) in self.changes.iter_mut().enumerate() {
            if change.reopened {
                if !backout {
                    change.stop_backouts(&spec.changes[c], ctx);
                }
            } else if change.is_active() {
                change.bail(&spec.changes[c], ctx, backout, why);
            }
        }
        if !backout {
            self.cs_queue.clear();
            for scope in &mut self.scopes {
                if scope.backout == ScopeBackout::Wanted {
                    scope.backout = ScopeBackout::Started;
                }
            }
        }
    }

    /// Starts and drives everything that may go on, until nothing changes.
    fn pump(&mut self, ctx: &mut Ctx) {
        if !self.started {
            return;
        }
        ctx.paused = self.paused;
        let spec = Arc::clone(&self.spec);
        loop {
            let mut progressed = self.start_changes(ctx);
            for c in 0..self.changes.len() {
                progressed |= self.changes[c].drive(&spec.changes[c], ctx);
                if self.changes[c].take_just_concluded() {
                    self.on_concluded(c);
                    progressed = true;
                }
            }
            progressed |= self.drive_changeset_backouts(ctx);
            if !progressed {
                break;
            }
        }
        self.try_conclude(ctx);
    }

    /// Starts every change whose `requires` all succeeded; cancels every
    /// change that can no longer start.
    fn start_changes(&mut self, ctx: &mut Ctx) -> bool {
        let mut progressed = false;
        for c in 0..self.changes.len() {
            if self.changes[c].started || self.changes[c].concluded.is_some() {
                continue;
            }
            let requires = &self.spec.changes[c].requires;
            let required = |r: &usize| self.changes.get(*r);
            let blocked = self.bail.is_some()
                || self.unsatisfiable[c]
                || self.chains[c].iter().any(|&s| self.scopes[s].halted)
                || requires
                    .iter()
                    .filter_map(required)
                    .any(|r| r.concluded.is_some_and(|s| s != RunState::Success));
            let ready = requires
                .iter()
                .map(required)
                .all(|r| r.is_some_and(|r| r.concluded == Some(RunState::Success) && !r.reopened));
            if blocked {
                self.changes[c].cancel(ctx);
                progressed = true;
            } else if ready && !ctx.paused {
                self.changes[c].start();
                self.changes[c].show(ctx, RunState::Running);
                progressed = true;
            }
        }
        progressed
    }

    /// A change reached a final state.
    fn on_concluded(&mut self, c: usize) {
        if self.cs_active == Some(c) {
            self.cs_active = None;
            return;
        }
        let state = self.changes[c].concluded;
        let failed = matches!(
            state,
            Some(
                RunState::PartialFailure
                    | RunState::TotalFailure
                    | RunState::BackoutOk
                    | RunState::BackoutFailed
            )
        );
        if !failed || self.changes[c].bail.is_some() {
            return;
        }
        let name = &self.spec.changes[c].name;
        for &s in &self.chains[c] {
            let scope = &mut self.scopes[s];
            scope.halted = true;
            if scope.policy == ChangesetFailure::BackoutAll && scope.backout == ScopeBackout::No {
                scope.backout = ScopeBackout::Wanted;
                scope.why = format!(
                    "changeset {} backs out (on_failure: backout_all): change {name} failed",
                    scope.name
                );
            }
        }
    }

    /// Changeset-level `backout_all`: once none of a scope's changes runs,
    /// back out its concluded changes newest first (children before
    /// parents), one change at a time, inner scopes before outer ones.
    fn drive_changeset_backouts(&mut self, ctx: &mut Ctx) -> bool {
        if self.bail == Some(false) || self.cs_active.is_some() {
            return false;
        }
        let mut progressed = false;
        if self.cs_queue.is_empty() {
            let mut wanted: Vec<usize> = (0..self.scopes.len())
                .filter(|&s| self.scopes[s].backout == ScopeBackout::Wanted)
                .collect();
            wanted.sort_by_key(|&s| std::cmp::Reverse(self.scopes[s].depth));
            for s in wanted {
                let in_scope = |c: &usize| self.chains[*c].contains(&s);
                let busy = (0..self.changes.len())
                    .filter(in_scope)
                    .any(|c| self.changes[c].is_active());
                if busy {
                    continue;
                }
                let mut done: Vec<usize> = (0..self.changes.len())
                    .filter(in_scope)
                    .filter(|&c| self.changes[c].completed.is_some())
                    .collect();
                done.sort_by_key(|&c| std::cmp::Reverse(self.changes[c].completed));
                self.scopes[s].backout = ScopeBackout::Started;
                self.cs_queue.extend(done);
                progressed = true;
                break;
            }
        }
        if !ctx.paused {
            while let Some(c) = self.cs_queue.pop_front() {
                progressed = true;
                let why = self.scope_reason(c);
                if self.changes[c].reopen(&why) {
                    self.cs_active = Some(c);
                    break;
                }
            }
        }
        progressed
    }

    /// Why change `c` is backed out by its changeset: the innermost scope
    /// of it that backs out.
    fn scope_reason(&self, c: usize) -> String {
        self.chains[c]
            .iter()
            .map(|&s| &self.scopes[s])
            .find(|s| s.backout == ScopeBackout::Started)
            .map_or_else(String::new, |s| s.why.clone())
    }

    /// Reports change and run states that changed.
    fn sync(&mut self, ctx: &mut Ctx) {
        for change in &mut self.changes {
            let state = change.display_state(self.paused);
            change.show(ctx, state);
        }
        let state = self.state();
        if state != self.shown {
            self.shown = state;
            ctx.out.push(Action::Progress(Progress::Run { state }));
        }
    }

    /// Concludes the run once every change concluded and nothing else is
    /// pending. See `rollout.rs` for the rules.
    fn try_conclude(&mut self, ctx: &mut Ctx) {
        let pending = self.concluded.is_some()
            || !self.started
            || self
                .changes
                .iter()
                .any(|c| c.concluded.is_none() || c.reopened)
            || self.changes.iter().any(|c| c.in_flight().next().is_some())
            || self.cs_active.is_some()
            || !self.cs_queue.is_empty()
            || (self.bail != Some(false)
                && self
                    .scopes
                    .iter()
                    .any(|s| s.backout == ScopeBackout::Wanted));
        if pending {
            return;
        }
        let states: Vec<RunState> = self.changes.iter().filter_map(|c| c.concluded).collect();
        let any = |wanted: &[RunState]| states.iter().any(|s| wanted.contains(s));
        let state = if self.bail.is_some() {
            RunState::BailedOut
        } else if states.iter().all(|&s| s == RunState::Success) {
            RunState::Success
        } else if any(&[RunState::BackoutFailed]) {
            RunState::BackoutFailed
        } else if any(&[RunState::Success, RunState::PartialFailure]) {
            RunState::PartialFailure
        } else if any(&[RunState::BackoutOk]) {
            RunState::BackoutOk
        } else {
            RunState::TotalFailure
        };
        self.concluded = Some(state);
        self.sync(ctx);
        let message = self.summary(state);
        ctx.out.push(Action::Alert {
            kind: AlertKind::RunFinished,
            change: None,
            host: None,
            message,
        });
    }

    /// "run NAME ended STATE: changes: 2 success, 1 cancelled; hosts: ..."
    fn summary(&self, state: RunState) -> String {
        let mut changes = BTreeMap::new();
        let mut hosts = BTreeMap::new();
        for change in &self.changes {
            let s = change.concluded.unwrap_or(RunState::Pending);
            *changes.entry(s.as_str()).or_insert(0) += 1;
            for host in &change.hosts {
                *hosts.entry(host.state.as_str()).or_insert(0) += 1;
            }
        }
        let counts = |m: BTreeMap<&str, usize>| {
            m.iter()
                .map(|(k, v)| format!("{v} {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "run {} ended {}: changes: {}; hosts: {}",
            self.spec.name,
            state.as_str(),
            counts(changes),
            counts(hosts)
        )
    }
}

/// The groups enclosing `group`, innermost first (bounded against a bad
/// `parent` cycle).
fn group_chain(spec: &RunSpec, mut group: Option<usize>) -> Vec<usize> {
    let mut chain = Vec::new();
    while let Some(g) = group {
        if g >= spec.groups.len() || chain.contains(&g) {
            break;
        }
        chain.push(g);
        group = spec.groups[g].parent;
    }
    chain
}

/// Changes whose `requires` can never all succeed: an index out of range,
/// or a cycle (the spec promises neither, but a bad spec must not hang).
fn unsatisfiable(spec: &RunSpec) -> Vec<bool> {
    let n = spec.changes.len();
    let mut resolved = vec![false; n];
    loop {
        let mut changed = false;
        for c in 0..n {
            if !resolved[c]
                && spec.changes[c]
                    .requires
                    .iter()
                    .all(|&r| r < n && resolved[r])
            {
                resolved[c] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    resolved.iter().map(|r| !r).collect()
}
