//! One host's sequence within one change.
//!
//! A [`HostRun`] walks the forward steps of an attempt (skip_if → check →
//! apply → verify) and, once asked, its backout (backout check → automatic
//! restores of `file` steps, newest first → backout steps → backout
//! verify), one step at a time. It records what was really sent (a step that
//! came back `unreachable` never was) so it knows whether the change was
//! applied and which files to restore.
//!
//! It decides nothing about the fleet: whether to retry, back out now,
//! queue the backout or stop is the change's business (`change.rs`), which
//! also sets [`HostRun::state`] and reports progress.

use std::collections::BTreeMap;

use crate::spec::{BackoutSpec, HostPlan, Location, Step, StepAction};

use super::model::{
    DispatchId, Failure, FailureReason, HostState, Judge, Millis, Phase, StepResult, StepStatus,
    Termination,
};
use super::verdict::judge_result;

/// The next step of a host: its phase and index within the phase.
pub(super) type Cursor = (Phase, usize);

const FORWARD: [Phase; 4] = [Phase::SkipIf, Phase::Check, Phase::Apply, Phase::Verify];
const BACKOUT: [Phase; 4] = [
    Phase::BackoutCheck,
    Phase::Restore,
    Phase::Backout,
    Phase::BackoutVerify,
];

/// What a finished step means for its host.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Another step is next (in [`HostRun::next`]).
    Next,
    /// Every `skip_if` step passed: the host is already done.
    Skipped,
    /// The forward sequence passed.
    Succeeded,
    /// The forward sequence failed.
    Failed(Failure),
    /// The backout ended: `Ok` (backout_ok) or the failing backout step.
    BackoutEnded(Result<(), Failure>),
}

/// What asking a host to back out did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BackoutStart {
    /// Backout steps are next.
    Started,
    /// A procedure matched but has nothing to run and no file to restore:
    /// backed out at once.
    Done,
    /// No procedure matched and something other than a `file` step was
    /// applied: the host must be left as it is (alert).
    NoProcedure,
    /// Nothing was ever applied: nothing to back out.
    NotApplied,
}

/// One host of one change.
#[derive(Debug)]
pub(super) struct HostRun {
    /// DESIGN.md's host state (set by the change).
    pub state: HostState,
    /// The attempt it is on (0 = first try).
    pub attempt: u32,
    /// The next step to dispatch, if one is due.
    pub next: Option<Cursor>,
    /// The step in flight, if any.
    pub in_flight: Option<DispatchId>,
    /// A cancel was sent for the step in flight.
    pub cancel_sent: bool,
    /// At least one apply step was really sent (in any attempt).
    pub applied: bool,
    /// An apply step other than `file` was really sent.
    applied_other: bool,
    /// Every `file` apply step really sent, in dispatch order.
    files: Vec<(DispatchId, String)>,
    /// The chosen backout procedure (`None`: restores only).
    procedure: Option<usize>,
    /// The restores of this backout: (`of` dispatch id, path), newest first.
    restores: Vec<(String, String)>,
    /// Why it failed (or why it was backed out).
    pub failure: Option<Failure>,
    /// The last forward step that finished, for synthetic failures.
    last_forward: Option<Cursor>,
    /// When its last attempt ended (a run-wide sequence number).
    pub completed: Option<u64>,
    /// When its retry is due, while `retry_pending`.
    pub retry_at: Option<Millis>,
    /// Waiting for a one-host-at-a-time backout of the whole change.
    pub queued: bool,
    /// A backout was started (a host is backed out at most once).
    pub backed_out: bool,
    /// Every step dispatched to it, in order.
    pub steps: Vec<StepStatus>,
}

impl HostRun {
    /// A host that has not started.
    pub fn new() -> HostRun {
        HostRun {
            state: HostState::Pending,
            attempt: 0,
            next: None,
            in_flight: None,
            cancel_sent: false,
            applied: false,
            applied_other: false,
            files: Vec::new(),
            procedure: None,
            restores: Vec::new(),
            failure: None,
            last_forward: None,
            completed: None,
            retry_at: None,
            queued: false,
            backed_out: false,
            steps: Vec::new(),
        }
    }

    /// Begins attempt `attempt` from its first `skip_if` step. Returns
    /// false when the host has no forward step at all (it passes at once).
    pub fn start_attempt(&mut self, plan: &HostPlan, attempt: u32) -> bool {
        self.attempt = attempt;
        self.retry_at = None;
        self.next = self.first_from(plan, &FORWARD, 0);
        self.next.is_some()
    }

    /// Takes the next step for dispatch, recording it as in flight.
    pub fn take_dispatch(
        &mut self,
        change: usize,
        host: usize,
        plan: &HostPlan,
    ) -> Option<(DispatchId, Step)> {
        if self.in_flight.is_some() {
            return None;
        }
        let (phase, step) = self.next.take()?;
        let id = DispatchId {
            change,
            host,
            phase,
            step,
            attempt: self.attempt,
        };
        let body = self.step_at(plan, phase, step)?;
        self.in_flight = Some(id);
        self.cancel_sent = false;
        self.steps.push(StepStatus {
            id,
            passed: None,
            reason: None,
            exit_code: None,
            duration_ms: 0,
        });
        Some((id, body))
    }

    /// Stops the sequence: nothing more is dispatched.
    pub fn stop(&mut self) {
        self.next = None;
    }

    /// Records and judges the result of the step in flight, moves the
    /// cursor, and says what it means. Returns the verdict too.
    pub fn finish(
        &mut self,
        plan: &HostPlan,
        judge: &dyn Judge,
        id: DispatchId,
        result: &StepResult,
    ) -> (Result<(), Failure>, Outcome) {
        self.in_flight = None;
        self.cancel_sent = false;
        let Some(step) = self.step_at(plan, id.phase, id.step) else {
            // Cannot happen: the cursor only ever points at real steps.
            let failure = self.synthetic_failure("the step is not in the plan".into());
            return (Err(failure.clone()), Outcome::Failed(failure));
        };
        let verdict = judge_result(judge, id, &step, plan, result);
        if let Some(status) = self.steps.iter_mut().rev().find(|s| s.id == id) {
            status.passed = Some(verdict.is_ok());
            status.reason = verdict.as_ref().err().map(|f| f.reason);
            status.exit_code = result.exit_code;
            status.duration_ms = result.duration_ms;
        }
        let sent = result.termination != Some(Termination::Unreachable);
        if id.phase == Phase::Apply && sent {
            self.applied = true;
            match &step.action {
                StepAction::File(file) => self.files.push((id, file.path.clone())),
                _ => self.applied_other = true,
            }
        }
        if !id.phase.is_backout() {
            self.last_forward = Some((id.phase, id.step));
        }
        let outcome = match (id.phase, &verdict) {
            (Phase::SkipIf, Ok(())) => {
                if id.step + 1 < self.len(plan, Phase::SkipIf) {
                    self.next = Some((Phase::SkipIf, id.step + 1));
                    Outcome::Next
                } else {
                    Outcome::Skipped
                }
            }
            // A skip_if that ran and said "no" means "not done yet": go on.
            (Phase::SkipIf, Err(f))
                if matches!(
                    f.reason,
                    FailureReason::NonzeroExit | FailureReason::ConditionFailed
                ) =>
            {
                self.next = self.first_from(plan, &FORWARD, 1);
                if self.next.is_some() {
                    Outcome::Next
                } else {
                    Outcome::Succeeded
                }
            }
            (phase, Ok(())) if !phase.is_backout() => {
                self.next = self.after(plan, &FORWARD, id);
                if self.next.is_some() {
                    Outcome::Next
                } else {
                    Outcome::Succeeded
                }
            }
            (phase, Err(f)) if !phase.is_backout() => Outcome::Failed(f.clone()),
            (_, Ok(())) => {
                self.next = self.after(plan, &BACKOUT, id);
                if self.next.is_some() {
                    Outcome::Next
                } else {
                    Outcome::BackoutEnded(Ok(()))
                }
            }
            (_, Err(f)) => Outcome::BackoutEnded(Err(f.clone())),
        };
        (verdict, outcome)
    }

    /// Chooses and starts this host's backout for `failure`: the first
    /// procedure whose `when` matches (an error evaluating `when` counts as
    /// no match); with none, restores alone if only `file` steps were
    /// applied. A host is backed out at most once.
    pub fn begin_backout(
        &mut self,
        plan: &HostPlan,
        judge: &dyn Judge,
        failure: &Failure,
    ) -> BackoutStart {
        if !self.applied || self.backed_out {
            return BackoutStart::NotApplied;
        }
        let chosen = plan.backout.iter().position(|b| match &b.when {
            None => true,
            Some(when) => judge.matches(when, plan, failure) == Ok(true),
        });
        if chosen.is_none() && (self.applied_other || self.files.is_empty()) {
            return BackoutStart::NoProcedure;
        }
        self.procedure = chosen;
        self.restores = self
            .files
            .iter()
            .rev()
            .map(|(id, path)| (id.to_string(), path.clone()))
            .collect();
        self.backed_out = true;
        self.next = self.first_from(plan, &BACKOUT, 0);
        if self.next.is_some() {
            BackoutStart::Started
        } else {
            BackoutStart::Done
        }
    }

    /// A failure for a host stopped or backed out by the fleet rather than
    /// by its own step: reason `cancelled`, at the last forward step it ran.
    pub fn synthetic_failure(&self, message: String) -> Failure {
        let (phase, step) = self.last_forward.unwrap_or((Phase::Apply, 0));
        Failure {
            phase,
            step,
            reason: FailureReason::Cancelled,
            exit_code: None,
            stdout: String::new(),
            stderr: String::new(),
            message,
        }
    }

    fn procedure<'p>(&self, plan: &'p HostPlan) -> Option<&'p BackoutSpec> {
        self.procedure.and_then(|p| plan.backout.get(p))
    }

    fn len(&self, plan: &HostPlan, phase: Phase) -> usize {
        let proc_len = |f: fn(&BackoutSpec) -> usize| self.procedure(plan).map_or(0, f);
        match phase {
            Phase::SkipIf => plan.skip_if.len(),
            Phase::Check => plan.check.len(),
            Phase::Apply => plan.apply.len(),
            Phase::Verify => plan.verify.len(),
            Phase::BackoutCheck => proc_len(|b| b.check.len()),
            Phase::Restore => self.restores.len(),
            Phase::Backout => proc_len(|b| b.steps.len()),
            Phase::BackoutVerify => proc_len(|b| b.verify.len()),
        }
    }

    /// The first step of the first non-empty phase of `seq` from `from`.
    fn first_from(&self, plan: &HostPlan, seq: &[Phase; 4], from: usize) -> Option<Cursor> {
        seq[from..]
            .iter()
            .find(|&&phase| self.len(plan, phase) > 0)
            .map(|&phase| (phase, 0))
    }

    /// The step after `id` within `seq`.
    fn after(&self, plan: &HostPlan, seq: &[Phase; 4], id: DispatchId) -> Option<Cursor> {
        if id.step + 1 < self.len(plan, id.phase) {
            return Some((id.phase, id.step + 1));
        }
        let at = seq.iter().position(|&p| p == id.phase)?;
        self.first_from(plan, seq, at + 1)
    }

    fn step_at(&self, plan: &HostPlan, phase: Phase, index: usize) -> Option<Step> {
        let list = match phase {
            Phase::SkipIf => &plan.skip_if,
            Phase::Check => &plan.check,
            Phase::Apply => &plan.apply,
            Phase::Verify => &plan.verify,
            Phase::BackoutCheck => &self.procedure(plan)?.check,
            Phase::Backout => &self.procedure(plan)?.steps,
            Phase::BackoutVerify => &self.procedure(plan)?.verify,
            Phase::Restore => {
                let (of, path) = self.restores.get(index)?;
                return Some(restore_step(of, path));
            }
        };
        list.get(index).cloned()
    }
}

/// The step that puts back what the `file` step `of` replaced.
fn restore_step(of: &str, path: &str) -> Step {
    Step {
        action: StepAction::Restore {
            of: of.to_string(),
            path: path.to_string(),
        },
        timeout: None,
        env: BTreeMap::new(),
        cwd: None,
        user: None,
        stdin: None,
        expect: None,
        location: Location::default(),
        secrets: Default::default(),
    }
}

/// The state a host is left in after a final failure it is not backed out
/// for: `lost` when its outcome is unknown, `cancelled` when it was stopped
/// by a bailout, else `failed`.
pub(super) fn left_state(reason: FailureReason) -> HostState {
    match reason {
        FailureReason::Lost => HostState::Lost,
        FailureReason::Cancelled => HostState::Cancelled,
        _ => HostState::Failed,
    }
}
