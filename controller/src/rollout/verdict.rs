//! Judging one step's raw result: pass, or a [`Failure`] with its reason.

use crate::spec::{HostPlan, Step};

use super::model::{DispatchId, Failure, FailureReason, Judge, StepResult, Termination};

/// Judges `result` of the step `id`: `Ok(())` if it passed, else the
/// [`Failure`] a backout's `when` will see.
///
/// Termination decides first (timed out, cancelled, lost, unreachable,
/// failed to start); only a step that exited is handed to the [`Judge`]. A
/// result without a termination is taken as `Exited`.
pub(super) fn judge_result(
    judge: &dyn Judge,
    id: DispatchId,
    step: &Step,
    plan: &HostPlan,
    result: &StepResult,
) -> Result<(), Failure> {
    let termination = result.termination.unwrap_or(Termination::Exited);
    let (reason, message) = match termination {
        Termination::TimedOut => (FailureReason::Timeout, "timed out".to_string()),
        Termination::Cancelled => (FailureReason::Cancelled, "cancelled".to_string()),
        Termination::Lost => (
            FailureReason::Lost,
            "lost: the agent lost track of it, its outcome is unknown".to_string(),
        ),
        Termination::Unreachable => (
            FailureReason::Unreachable,
            "unreachable: the agent was not connected, nothing was sent".to_string(),
        ),
        Termination::FailedToStart => (
            FailureReason::NonzeroExit,
            format!("failed to start: {}", first_line(&result.stderr)),
        ),
        Termination::Exited => match (judge.passed(step, plan, result), &step.expect) {
            (Ok(true), _) => return Ok(()),
            (Ok(false), Some(cond)) => (
                FailureReason::ConditionFailed,
                format!("expect `{}` was false", cond.expr),
            ),
            (Err(err), Some(cond)) => (
                FailureReason::ConditionFailed,
                format!("expect `{}` could not be evaluated: {err}", cond.expr),
            ),
            (Ok(false), None) => (FailureReason::NonzeroExit, exit_message(result)),
            (Err(err), None) => (
                FailureReason::NonzeroExit,
                format!("{}: {err}", exit_message(result)),
            ),
        },
    };
    Err(Failure {
        phase: id.phase,
        step: id.step,
        reason,
        exit_code: result.exit_code,
        stdout: result.stdout.clone(),
        stderr: result.stderr.clone(),
        message: if id.attempt > 0 {
            format!(
                "{}[{}] (attempt {}): {message}",
                id.phase,
                id.step,
                id.attempt + 1
            )
        } else {
            format!("{}[{}]: {message}", id.phase, id.step)
        },
    })
}

fn exit_message(result: &StepResult) -> String {
    match result.exit_code {
        Some(code) => format!("exited {code}"),
        None => "killed by a signal".to_string(),
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("").trim()
}
