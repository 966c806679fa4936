//! Conversions between `pb::` agent-protocol types and ours. The only
//! place that sees both: the fleet takes and gives our types.

use std::time::Duration;

use modi_proto::v1 as pb;

use crate::fleet::{AgentResult, Hello, OutputChunk, RunRef, ToAgent, full_id};
use crate::limits;
use crate::rollout::{DispatchId, StepResult, Termination};
use crate::secret::Secrets;
use crate::spec::{Step, StepAction};

/// What an agent said about itself, as the fleet sees it; refused when it
/// is more than the controller keeps (the agent is told the limit).
pub fn hello(h: pb::Hello) -> Result<Hello, limits::TooMuch> {
    let labels = h.labels.into_iter().collect();
    let facts = h.facts.into_iter().collect();
    // Labels from a Hello are ignored, but still bounded: they are logged.
    limits::check_map(
        "Hello labels",
        &labels,
        limits::MAX_LABELS,
        limits::MAX_LABEL_VALUE,
    )?;
    limits::check_facts(&facts)?;
    if h.running.len() > limits::MAX_RUNNING || h.running.iter().any(|r| r.len() > 200) {
        return Err(limits::TooMuch {
            what: "Hello running".into(),
            detail: format!(
                "at most {} dispatch ids of at most 200 bytes",
                limits::MAX_RUNNING
            ),
        });
    }
    Ok(Hello {
        labels,
        facts,
        running: h.running,
        heartbeat: match h.heartbeat_interval_ms {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        },
    })
}

/// A message for an agent, as the wire carries it.
pub fn to_agent(msg: ToAgent) -> pb::ControllerMessage {
    use pb::controller_message::Msg as Down;
    let msg = match msg {
        ToAgent::Run {
            run,
            id,
            step,
            secrets,
        } => Down::Run(run_step(run, &id, &step, &secrets)),
        ToAgent::Cancel(dispatch_id) => Down::Cancel(pb::CancelStep { dispatch_id }),
        ToAgent::Ack(dispatch_id) => Down::Ack(pb::Ack { dispatch_id }),
        ToAgent::Renewed(cert_pem) => Down::Renewed(pb::Renewed { cert_pem }),
        ToAgent::ReadFile {
            request_id,
            path,
            max_bytes,
        } => Down::ReadFile(pb::ReadFile {
            request_id,
            path,
            max_bytes,
        }),
    };
    pb::ControllerMessage { msg: Some(msg) }
}

/// The `RunStep` for one dispatch of run `run`, with the values of the
/// secrets it uses.
pub fn run_step(run: RunRef, id: &DispatchId, step: &Step, secrets: &Secrets) -> pb::RunStep {
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
        // Never sent: the driver fails it at once. Should it ever reach
        // here, the agent is told to run a command that fails saying why.
        StepAction::Unrenderable { reason } => Action::Argv(pb::Argv {
            args: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo \"$1\" >&2; exit 1".into(),
                "modi".into(),
                format!("not rendered: {reason}"),
            ],
        }),
        StepAction::Restore { of, .. } => Action::Restore(pb::Restore {
            of: format!("r{}-{}.{of}", run.id, run.stamp),
        }),
    };
    pb::RunStep {
        dispatch_id: full_id(run, id),
        step: Some(pb::Step {
            action: Some(action),
            timeout_ms: step.timeout.map_or(0, |t| t.as_millis() as u64),
            env: step.env.clone(),
            cwd: step.cwd.clone().unwrap_or_default(),
            user: step.user.clone().unwrap_or_default(),
            stdin: step.stdin.clone().map(String::into_bytes),
        }),
        secrets: secrets
            .iter()
            .map(|(name, value)| (name.clone(), value.expose().to_string()))
            .collect(),
    }
}

/// An agent's result, as the fleet sees it.
pub fn agent_result(mut r: pb::StepResult) -> AgentResult {
    AgentResult {
        full_id: std::mem::take(&mut r.dispatch_id),
        result: step_result(r),
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
        // Unreachable is the controller's word, never an agent's.
        Ok(pb::Termination::Unspecified | pb::Termination::Unreachable) | Err(_) => {
            Termination::Lost
        }
    };
    // Each stream is kept to MAX_STREAM whatever the agent sent: the rest
    // is counted, not journaled.
    let mut stdout = String::from_utf8_lossy(&r.stdout).into_owned();
    let mut stderr = String::from_utf8_lossy(&r.stderr).into_owned();
    let stdout_cut = limits::truncate(&mut stdout, limits::MAX_STREAM);
    let stderr_cut = limits::truncate(&mut stderr, limits::MAX_STREAM);
    StepResult {
        termination: Some(termination),
        exit_code: r.exit_code,
        stdout,
        stderr,
        stdout_dropped: r.stdout_dropped.saturating_add(stdout_cut),
        stderr_dropped: r.stderr_dropped.saturating_add(stderr_cut),
        duration_ms: r.duration_ms,
    }
}

/// Live output, as the fleet sees it.
pub fn output_chunk(mut c: pb::OutputChunk) -> OutputChunk {
    c.data.truncate(limits::MAX_CHUNK);
    OutputChunk {
        stderr: c.stream == pb::OutputStream::Stderr as i32,
        full_id: c.dispatch_id,
        data: c.data,
    }
}

/// An agent's answer to a file read, kept to what was asked at most.
pub fn file_content(c: pb::FileContent) -> (u64, crate::fleet::peek::FileRead) {
    let mut content = c.content;
    content.truncate(crate::limits::MAX_DIFF_FILE as usize);
    (
        c.request_id,
        crate::fleet::peek::FileRead {
            exists: c.exists,
            content,
            size: c.size,
            error: c.error,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_oversize_hello_is_refused_and_an_oversize_result_is_cut() {
        let mut h = pb::Hello::default();
        for i in 0..=limits::MAX_FACTS {
            h.facts.insert(format!("f{i}"), "v".into());
        }
        let e = hello(h).unwrap_err();
        assert!(e.to_string().contains("facts"), "{e}");
        let mut h = pb::Hello::default();
        h.labels.insert("role".into(), "x".repeat(10 << 20));
        assert!(hello(h).is_err(), "10 MiB of labels");
        let r = step_result(pb::StepResult {
            termination: pb::Termination::Exited as i32,
            stdout: vec![b'a'; 60 << 20],
            stdout_dropped: 5,
            ..pb::StepResult::default()
        });
        assert_eq!(r.stdout.len(), limits::MAX_STREAM);
        assert_eq!(r.stdout_dropped, 5 + (60 << 20) - limits::MAX_STREAM as u64);
    }

    #[test]
    fn the_placeholder_is_the_protocols() {
        assert_eq!(
            crate::spec::FILE_TMP_PLACEHOLDER,
            modi_proto::FILE_TMP_PLACEHOLDER
        );
    }
}
