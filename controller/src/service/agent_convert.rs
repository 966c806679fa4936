//! Conversions between `pb::` agent-protocol types and ours.

use modi_proto::v1 as pb;

use crate::rollout::{DispatchId, Phase, StepResult, Termination};
use crate::spec::{Step, StepAction};

const PHASES: [Phase; 8] = [
    Phase::SkipIf,
    Phase::Check,
    Phase::Apply,
    Phase::Verify,
    Phase::BackoutCheck,
    Phase::Restore,
    Phase::Backout,
    Phase::BackoutVerify,
];

/// Parses an engine dispatch id (`c0.h1.apply.0.a0`), the inverse of its
/// `Display`.
pub fn parse_dispatch_id(s: &str) -> Option<DispatchId> {
    let mut parts = s.split('.');
    let change = parts.next()?.strip_prefix('c')?.parse().ok()?;
    let host = parts.next()?.strip_prefix('h')?.parse().ok()?;
    let phase_name = parts.next()?;
    let phase = *PHASES.iter().find(|p| p.as_str() == phase_name)?;
    let step = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.strip_prefix('a')?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(DispatchId {
        change,
        host,
        phase,
        step,
        attempt,
    })
}

/// The `RunStep` for one dispatch of run `run`.
pub fn run_step(run: crate::fleet::RunRef, id: &DispatchId, step: &Step) -> pb::RunStep {
    use pb::step::Action;
    let action = match &step.action {
        StepAction::Run { command } => Action::Run(command.clone()),
        StepAction::Argv { argv } => Action::Argv(pb::Argv { args: argv.clone() }),
        StepAction::File(f) => Action::File(pb::FileWrite {
            path: f.path.clone(),
            content: f.content.clone().into_bytes(),
            mode: f.mode,
            owner: f.owner.clone().unwrap_or_default(),
            validate: f.validate.clone().unwrap_or_default(),
        }),
        StepAction::Interact { command, script } => Action::Interact(pb::Interact {
            command: command.clone(),
            script: script
                .iter()
                .map(|x| pb::Exchange {
                    expect: x.expect.clone(),
                    send: x.send.clone(),
                    timeout_ms: x.timeout.map_or(0, |t| t.as_millis() as u64),
                })
                .collect(),
        }),
        StepAction::Restore { of, .. } => Action::Restore(pb::Restore {
            of: format!("r{}-{}.{of}", run.id, run.stamp),
        }),
    };
    pb::RunStep {
        dispatch_id: crate::fleet::full_id(run, id),
        step: Some(pb::Step {
            action: Some(action),
            timeout_ms: step.timeout.map_or(0, |t| t.as_millis() as u64),
            env: step.env.clone(),
            cwd: step.cwd.clone().unwrap_or_default(),
            user: step.user.clone().unwrap_or_default(),
            stdin: step.stdin.clone().map(String::into_bytes),
        }),
    }
}

/// An agent's result as the engine sees it.
pub fn step_result(r: pb::StepResult) -> StepResult {
    let termination = match pb::Termination::try_from(r.termination) {
        Ok(pb::Termination::Exited) => Termination::Exited,
        Ok(pb::Termination::TimedOut) => Termination::TimedOut,
        Ok(pb::Termination::Cancelled) => Termination::Cancelled,
        Ok(pb::Termination::Lost) => Termination::Lost,
        Ok(pb::Termination::FailedToStart) => Termination::FailedToStart,
        // An agent that says nothing useful: its outcome is unknown.
        Ok(pb::Termination::Unspecified) | Err(_) => Termination::Lost,
    };
    StepResult {
        termination: Some(termination),
        exit_code: r.exit_code,
        stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        stdout_dropped: r.stdout_dropped,
        stderr_dropped: r.stderr_dropped,
        duration_ms: r.duration_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_ids_round_trip() {
        for phase in PHASES {
            let id = DispatchId {
                change: 3,
                host: 17,
                phase,
                step: 2,
                attempt: 1,
            };
            assert_eq!(parse_dispatch_id(&id.to_string()), Some(id));
            let run = crate::fleet::RunRef {
                id: 42,
                stamp: 1_764_000_000_000,
            };
            let full = crate::fleet::full_id(run, &id);
            assert_eq!(full, format!("r42-1764000000000.{id}"));
            assert_eq!(crate::fleet::parse_full_id(&full), Some((42, id)));
        }
        assert_eq!(parse_dispatch_id("c0.h0.apply.0"), None);
        assert_eq!(parse_dispatch_id("c0.h0.nope.0.a0"), None);
    }

    #[test]
    fn the_placeholder_is_the_protocols() {
        assert_eq!(
            crate::spec::FILE_TMP_PLACEHOLDER,
            modi_proto::FILE_TMP_PLACEHOLDER
        );
    }
}
