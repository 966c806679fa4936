//! One change across its hosts: batches, `max_parallel`, `pause`, approval
//! gates, retries, and the per-change `on_failure` policy.
//!
//! A [`ChangeRun`] is driven by the engine: [`ChangeRun::on_step`] for each
//! result, [`ChangeRun::drive`] to start whatever may start now,
//! [`ChangeRun::bail`] on abort/deny and [`ChangeRun::reopen`] for a
//! changeset-level backout. Everything it wants done goes into the
//! [`Ctx`]'s action list, in a deterministic order (host order, then time).
//!
//! "Mass backout" is the one-host-at-a-time backout of every host where the
//! change was applied, newest completion first, once no host of the change
//! is running any more. `on_failure: backout_all`, an abort/deny with
//! backout, and a changeset-level `backout_all` all use it.

mod backout;
mod schedule;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use crate::spec::{ChangeSpec, OnFailure};

use schedule::{Gate, GateFor};

use super::host::{HostRun, Outcome, left_state};
use super::model::{
    Action, AlertKind, DispatchId, Failure, FailureReason, HostState, Judge, Millis, Progress,
    RunState, StepResult,
};

/// What the engine hands a change while handling one event.
pub(super) struct Ctx {
    /// Evaluates conditions.
    pub judge: Arc<dyn Judge>,
    /// The event's time.
    pub now: Millis,
    /// The run is paused: nothing new is dispatched or started.
    pub paused: bool,
    /// The run-wide sequence counter (completion order, gate order).
    pub seq: u64,
    /// The actions produced so far.
    pub out: Vec<Action>,
}

impl Ctx {
    /// The next run-wide sequence number.
    pub fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn progress(&mut self, progress: Progress) {
        self.out.push(Action::Progress(progress));
    }

    fn alert(&mut self, kind: AlertKind, change: &ChangeSpec, host: usize, message: String) {
        self.out.push(Action::Alert {
            kind,
            change: Some(change.name.clone()),
            host: change.hosts.get(host).map(|h| h.host.name.clone()),
            message,
        });
    }
}

/// One change of the run.
#[derive(Debug)]
pub(super) struct ChangeRun {
    index: usize,
    /// Its hosts, in spec (rollout) order.
    pub hosts: Vec<HostRun>,
    batches: Vec<Vec<usize>>,
    batch: usize,
    batch_open: bool,
    next_in_batch: usize,
    pause_until: Option<Millis>,
    /// The open approval gate, if any.
    pub gate: Option<Gate>,
    approved: BTreeSet<GateFor>,
    failed_hosts: usize,
    stop_new: bool,
    /// Why the change is being backed out everywhere, once it is.
    mass: Option<String>,
    /// `Some(backout)` once the run bailed out while this change ran.
    pub bail: Option<bool>,
    /// Its hosts started being scheduled.
    pub started: bool,
    /// Its final state, once it has one.
    pub concluded: Option<RunState>,
    /// A changeset-level backout is running on it after it concluded.
    pub reopened: bool,
    /// When it first concluded (a run-wide sequence number).
    pub completed: Option<u64>,
    just_concluded: bool,
    shown: RunState,
    /// Hosts whose next step may be ready to dispatch: those whose
    /// sequence moved (started, a step finished, a backout began).
    /// [`ChangeRun::drive`] looks at these, not at every host, so an event
    /// costs the same in a change of 10 hosts or of 10,000.
    ready: BTreeSet<usize>,
    /// Hosts in `retry_pending` (kept by `set_state`).
    retrying: BTreeSet<usize>,
    /// The batch of each host.
    batch_of: Vec<usize>,
    /// Hosts of the current batch in a final state (kept by `set_state`,
    /// counted afresh when the next batch begins).
    batch_final: usize,
}

impl ChangeRun {
    /// A change that has not started.
    pub fn new(index: usize, spec: &ChangeSpec) -> ChangeRun {
        let batches = spec.batches();
        let mut batch_of = vec![usize::MAX; spec.hosts.len()];
        for (b, hosts) in batches.iter().enumerate() {
            for &h in hosts {
                batch_of[h] = b;
            }
        }
        ChangeRun {
            index,
            hosts: spec.hosts.iter().map(|_| HostRun::new()).collect(),
            batches,
            batch: 0,
            batch_open: false,
            next_in_batch: 0,
            pause_until: None,
            gate: None,
            approved: BTreeSet::new(),
            failed_hosts: 0,
            stop_new: false,
            mass: None,
            bail: None,
            started: false,
            concluded: None,
            reopened: false,
            completed: None,
            just_concluded: false,
            shown: RunState::Pending,
            ready: BTreeSet::new(),
            retrying: BTreeSet::new(),
            batch_of,
            batch_final: 0,
        }
    }

    /// Started and not (or no longer) in a final state.
    pub fn is_active(&self) -> bool {
        self.started && (self.concluded.is_none() || self.reopened)
    }

    /// The state shown to watchers.
    pub fn display_state(&self, paused: bool) -> RunState {
        match self.concluded {
            Some(state) if !self.reopened => state,
            _ if !self.started => RunState::Pending,
            _ if self.gate.is_some() => RunState::AwaitingApproval,
            _ if paused => RunState::Paused,
            _ => RunState::Running,
        }
    }

    /// Emits `Progress::Change` if the shown state changed.
    pub fn show(&mut self, ctx: &mut Ctx, state: RunState) {
        if self.shown != state {
            self.shown = state;
            ctx.progress(Progress::Change {
                change: self.index,
                state,
            });
        }
    }

    /// Did it conclude since the last call?
    pub fn take_just_concluded(&mut self) -> bool {
        std::mem::take(&mut self.just_concluded)
    }

    /// Starts scheduling its hosts.
    pub fn start(&mut self) {
        self.started = true;
    }

    /// A change that will never start: it and its hosts are `cancelled`.
    pub fn cancel(&mut self, ctx: &mut Ctx) {
        for h in 0..self.hosts.len() {
            self.set_state(ctx, h, HostState::Cancelled);
        }
        self.concluded = Some(RunState::Cancelled);
        self.show(ctx, RunState::Cancelled);
    }

    /// Every dispatch in flight.
    pub fn in_flight(&self) -> impl Iterator<Item = DispatchId> + '_ {
        self.hosts.iter().filter_map(|h| h.in_flight)
    }

    /// Is `id` the step in flight on its host?
    pub fn is_in_flight(&self, id: DispatchId) -> bool {
        self.hosts.get(id.host).and_then(|h| h.in_flight) == Some(id)
    }

    /// The earliest future timer (retry delay, batch pause) or gate timeout.
    /// Timers already due are left out: they wait for a resume.
    pub fn next_deadline(&self, now: Millis) -> Option<Millis> {
        let retries = self.retrying.iter().filter_map(|&h| {
            let h = &self.hosts[h];
            match h.state {
                HostState::RetryPending => h.retry_at,
                _ => None,
            }
        });
        let timers = retries.chain(self.pause_until).filter(|&t| t > now);
        timers
            .chain(self.gate.as_ref().and_then(|g| g.deadline))
            .min()
    }

    /// Handles the result of the step `id`, in flight on this change.
    pub fn on_step(
        &mut self,
        spec: &ChangeSpec,
        ctx: &mut Ctx,
        id: DispatchId,
        result: StepResult,
    ) {
        let h = id.host;
        let judge = Arc::clone(&ctx.judge);
        let (verdict, outcome) = self.hosts[h].finish(&spec.hosts[h], &*judge, id, &result);
        self.ready.insert(h);
        ctx.progress(Progress::Step {
            id,
            passed: verdict.is_ok(),
            reason: verdict.err().map(|f| f.reason),
        });
        match outcome {
            Outcome::Next => match self.bail {
                Some(_) if !id.phase.is_backout() => {
                    let failure = self.hosts[h].synthetic_failure(
                        "stopped at a step boundary: the run is bailing out".into(),
                    );
                    self.hosts[h].stop();
                    self.attempt_failed(spec, ctx, h, failure);
                }
                Some(false) => {
                    self.hosts[h].stop();
                    self.backout_interrupted(spec, ctx, h);
                }
                _ => {}
            },
            Outcome::Skipped => self.forward_done(ctx, h, HostState::Skipped),
            Outcome::Succeeded => self.forward_done(ctx, h, HostState::Success),
            Outcome::Failed(failure) => self.attempt_failed(spec, ctx, h, failure),
            Outcome::BackoutEnded(result) => self.backout_ended(spec, ctx, h, result),
        }
    }

    /// Starts whatever may start now: due retries, the next mass backout,
    /// new hosts and batches (behind gates and pauses), the next step of
    /// every host; then concludes the change if it is done. Returns whether
    /// anything changed.
    pub fn drive(&mut self, spec: &ChangeSpec, ctx: &mut Ctx) -> bool {
        if !self.is_active() {
            return false;
        }
        let mut progressed = false;
        if !ctx.paused {
            if self.mass.is_none() && self.bail.is_none() {
                let retrying: Vec<usize> = self.retrying.iter().copied().collect();
                for h in retrying {
                    let host = &self.hosts[h];
                    if host.state == HostState::RetryPending
                        && host.retry_at.is_some_and(|t| t <= ctx.now)
                    {
                        let attempt = host.attempt.saturating_add(1);
                        self.start_host(spec, ctx, h, attempt);
                        progressed = true;
                    }
                }
            }
            progressed |= self.drive_mass(spec, ctx);
            if !self.stop_new {
                progressed |= self.schedule(spec, ctx);
            }
            // In host order, as a walk over every host would.
            let mut blocked = Vec::new();
            for h in std::mem::take(&mut self.ready) {
                if let Some((id, step)) = self.hosts[h].take_dispatch(self.index, h, &spec.hosts[h])
                {
                    ctx.out.push(Action::Dispatch {
                        id,
                        host: spec.hosts[h].host.name.clone(),
                        step,
                    });
                    progressed = true;
                } else if self.hosts[h].next.is_some() {
                    // A step still in flight: its next goes after it.
                    blocked.push(h);
                }
            }
            self.ready.extend(blocked);
            debug_assert!(
                self.hosts
                    .iter()
                    .all(|h| h.next.is_none() || h.in_flight.is_some()),
                "a host with a step to dispatch was not in `ready`"
            );
        }
        progressed | self.try_conclude(ctx)
    }

    fn halt(&mut self) {
        self.stop_new = true;
        self.gate = None;
        self.pause_until = None;
    }

    fn set_state(&mut self, ctx: &mut Ctx, h: usize, state: HostState) {
        let host = &mut self.hosts[h];
        if host.state != state {
            let was_final = host.state.is_final();
            host.state = state;
            if state == HostState::RetryPending {
                self.retrying.insert(h);
            } else {
                self.retrying.remove(&h);
            }
            if self.batch_of.get(h) == Some(&self.batch) && was_final != state.is_final() {
                if state.is_final() {
                    self.batch_final += 1;
                } else {
                    self.batch_final -= 1;
                }
            }
            let host = &self.hosts[h];
            ctx.progress(Progress::Host {
                change: self.index,
                host: h,
                state,
                attempt: host.attempt,
            });
        }
    }

    fn start_host(&mut self, spec: &ChangeSpec, ctx: &mut Ctx, h: usize, attempt: u32) {
        let has_steps = self.hosts[h].start_attempt(&spec.hosts[h], attempt);
        self.ready.insert(h);
        self.set_state(ctx, h, HostState::Running);
        if !has_steps {
            self.forward_done(ctx, h, HostState::Success);
        }
    }

    fn forward_done(&mut self, ctx: &mut Ctx, h: usize, state: HostState) {
        let seq = ctx.tick();
        let host = &mut self.hosts[h];
        host.completed = Some(seq);
        host.failure = None;
        if self.mass.is_some() && self.bail != Some(false) && host.applied && !host.backed_out {
            host.queued = true;
        }
        self.set_state(ctx, h, state);
    }

    /// An attempt failed: retry it, or make the failure final.
    fn attempt_failed(&mut self, spec: &ChangeSpec, ctx: &mut Ctx, h: usize, failure: Failure) {
        let seq = ctx.tick();
        let host = &mut self.hosts[h];
        host.completed = Some(seq);
        let retry = spec.retry;
        let may_retry = self.bail.is_none()
            && self.mass.is_none()
            && !matches!(
                failure.reason,
                FailureReason::Unreachable | FailureReason::Cancelled
            )
            && (retry.max_retries < 0 || i64::from(host.attempt) < retry.max_retries);
        host.failure = Some(failure);
        if may_retry {
            host.retry_at = Some(ctx.now.saturating_add(millis(retry.delay)));
            self.set_state(ctx, h, HostState::RetryPending);
        } else {
            self.final_failure(spec, ctx, h);
        }
    }

    /// A host's failure is final: apply the change's policy, then back the
    /// host out now, queue it for the mass backout, or leave it.
    fn final_failure(&mut self, spec: &ChangeSpec, ctx: &mut Ctx, h: usize) {
        let Some(failure) = self.hosts[h].failure.clone() else {
            return;
        };
        if self.bail.is_none() {
            self.failed_hosts += 1;
            match spec.on_failure {
                OnFailure::Halt => self.halt(),
                OnFailure::Continue => {
                    let limit = spec.rollout.max_failures.map(|m| m.of(spec.hosts.len()));
                    if limit.is_some_and(|limit| self.failed_hosts > limit) {
                        self.halt();
                    }
                }
                OnFailure::BackoutAll if self.mass.is_none() => {
                    let why = format!(
                        "backed out: {} failed {} (change {}, on_failure: backout_all)",
                        spec.hosts[h].host.name, failure.message, spec.name
                    );
                    self.enter_mass(spec, ctx, why);
                }
                OnFailure::BackoutAll => {}
            }
        }
        let left = left_state(failure.reason);
        if self.mass.is_some() || self.bail.is_some() {
            let host = &mut self.hosts[h];
            host.queued = self.bail != Some(false) && host.applied && !host.backed_out;
            self.set_state(ctx, h, left);
        } else {
            self.back_out(spec, ctx, h, &failure, left);
        }
    }

    /// Concludes the change once every host is final, nothing is in
    /// flight or queued, and nothing more will start.
    fn try_conclude(&mut self, ctx: &mut Ctx) -> bool {
        let scheduled = self.stop_new || self.batch >= self.batches.len();
        // Every host is looked at only once nothing more will start.
        if !scheduled || self.gate.is_some() {
            return false;
        }
        let settled = self.hosts.iter().all(|h| {
            (h.state.is_final() || (self.stop_new && h.state == HostState::Pending))
                && !h.queued
                && h.in_flight.is_none()
        });
        if !settled {
            return false;
        }
        for h in 0..self.hosts.len() {
            if self.hosts[h].state == HostState::Pending {
                self.set_state(ctx, h, HostState::Cancelled);
            }
        }
        let state = self.conclusion();
        self.concluded = Some(state);
        self.reopened = false;
        if self.completed.is_none() {
            self.completed = Some(ctx.tick());
        }
        self.just_concluded = true;
        self.show(ctx, state);
        true
    }

    /// The final state (see the rules in `rollout.rs`).
    fn conclusion(&self) -> RunState {
        if self.bail.is_some() && self.completed.is_none() {
            return RunState::BailedOut;
        }
        if self.mass.is_some() {
            let failed = self.hosts.iter().any(|h| {
                h.state == HostState::BackoutFailed
                    || (h.applied && h.state != HostState::BackoutOk)
            });
            return if failed {
                RunState::BackoutFailed
            } else {
                RunState::BackoutOk
            };
        }
        let ok = self
            .hosts
            .iter()
            .filter(|h| matches!(h.state, HostState::Success | HostState::Skipped))
            .count();
        if ok == self.hosts.len() {
            RunState::Success
        } else if ok > 0 {
            RunState::PartialFailure
        } else {
            RunState::TotalFailure
        }
    }
}

fn millis(d: Duration) -> Millis {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
