//! `RunStatus` ⇄ `pb::RunStatus` and `WatchItem` ⇄ `pb::Progress`.

use modi_proto::v1 as pb;
use pb::progress::Event as P;

use super::{Malformed, Wire, index, unindex};
use crate::rollout::{
    ChangeStatus, Decision, DispatchId, Failure, HostStatus, LateResult, OpenGate, Progress,
    RunStatus, StepResult, StepStatus,
};
use crate::run_ports::WatchItem;

/// A run's status for the wire.
pub fn run_status(s: &RunStatus) -> pb::RunStatus {
    pb::RunStatus {
        state: s.state.wire(),
        changes: s.changes.iter().map(change).collect(),
        decisions: s
            .decisions
            .iter()
            .map(|d| pb::Decision {
                at_ms: d.at,
                by: d.by.clone(),
                action: d.action.clone(),
            })
            .collect(),
        held: s.held.clone(),
        late: s
            .late
            .iter()
            .map(|l| pb::LateResult {
                id: Some(dispatch(&l.id)),
                host: l.host.clone(),
                at_ms: l.at,
                result: Some(result(&l.result)),
            })
            .collect(),
    }
}

/// A run's status from the wire.
pub fn run_status_from(s: pb::RunStatus) -> Result<RunStatus, Malformed> {
    Ok(RunStatus {
        state: Wire::read(s.state, "status.state")?,
        changes: s
            .changes
            .into_iter()
            .enumerate()
            .map(|(i, c)| change_from(c, &format!("status.changes[{i}]")))
            .collect::<Result<_, _>>()?,
        decisions: s
            .decisions
            .into_iter()
            .map(|d| Decision {
                at: d.at_ms,
                by: d.by,
                action: d.action,
            })
            .collect(),
        held: s.held,
        late: s
            .late
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let at = format!("status.late[{i}]");
                Ok(LateResult {
                    id: dispatch_from(l.id, &format!("{at}.id"))?,
                    host: l.host,
                    at: l.at_ms,
                    result: result_from(l.result, &format!("{at}.result"))?,
                })
            })
            .collect::<Result<_, Malformed>>()?,
    })
}

fn change(c: &ChangeStatus) -> pb::ChangeStatus {
    pb::ChangeStatus {
        name: c.name.clone(),
        state: c.state.wire(),
        hosts: c.hosts.iter().map(host).collect(),
        gate: c.gate.as_ref().map(|g| pb::OpenGate {
            id: g.id,
            label: g.label.clone(),
            deadline_ms: g.deadline,
            since_ms: g.since,
        }),
    }
}

fn change_from(c: pb::ChangeStatus, at: &str) -> Result<ChangeStatus, Malformed> {
    Ok(ChangeStatus {
        state: Wire::read(c.state, &format!("{at}.state"))?,
        hosts: c
            .hosts
            .into_iter()
            .enumerate()
            .map(|(i, h)| host_from(h, &format!("{at}.hosts[{i}]")))
            .collect::<Result<_, _>>()?,
        gate: c.gate.map(|g| OpenGate {
            id: g.id,
            label: g.label,
            deadline: g.deadline_ms,
            since: g.since_ms,
        }),
        name: c.name,
    })
}

fn host(h: &HostStatus) -> pb::HostStatus {
    pb::HostStatus {
        name: h.name.clone(),
        state: h.state.wire(),
        attempt: h.attempt,
        failure: h.failure.as_ref().map(|f| pb::Failure {
            phase: f.phase.wire(),
            step: index(f.step),
            reason: f.reason.wire(),
            exit_code: f.exit_code,
            stdout: f.stdout.clone(),
            stderr: f.stderr.clone(),
            message: f.message.clone(),
        }),
        steps: h
            .steps
            .iter()
            .map(|s| pb::StepStatus {
                id: Some(dispatch(&s.id)),
                passed: s.passed,
                reason: s.reason.map_or(0, Wire::wire),
                exit_code: s.exit_code,
                duration_ms: s.duration_ms,
            })
            .collect(),
    }
}

fn host_from(h: pb::HostStatus, at: &str) -> Result<HostStatus, Malformed> {
    let failure = match h.failure {
        Some(f) => Some(Failure {
            phase: Wire::read(f.phase, &format!("{at}.failure.phase"))?,
            step: unindex(f.step),
            reason: Wire::read(f.reason, &format!("{at}.failure.reason"))?,
            exit_code: f.exit_code,
            stdout: f.stdout,
            stderr: f.stderr,
            message: f.message,
        }),
        None => None,
    };
    Ok(HostStatus {
        state: Wire::read(h.state, &format!("{at}.state"))?,
        attempt: h.attempt,
        failure,
        steps: h
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let at = format!("{at}.steps[{i}]");
                Ok(StepStatus {
                    id: dispatch_from(s.id, &format!("{at}.id"))?,
                    passed: s.passed,
                    reason: optional(s.reason, &format!("{at}.reason"))?,
                    exit_code: s.exit_code,
                    duration_ms: s.duration_ms,
                })
            })
            .collect::<Result<_, Malformed>>()?,
        name: h.name,
    })
}

/// An enum field where UNSPECIFIED (0) means "none".
fn optional<T: Wire>(value: i32, field: &str) -> Result<Option<T>, Malformed> {
    if value == 0 {
        Ok(None)
    } else {
        T::read(value, field).map(Some)
    }
}

fn dispatch(id: &DispatchId) -> pb::DispatchId {
    pb::DispatchId {
        change: index(id.change),
        host: index(id.host),
        phase: id.phase.wire(),
        step: index(id.step),
        attempt: id.attempt,
    }
}

fn dispatch_from(id: Option<pb::DispatchId>, at: &str) -> Result<DispatchId, Malformed> {
    let id = id.ok_or_else(|| Malformed::missing_field(at))?;
    Ok(DispatchId {
        change: unindex(id.change),
        host: unindex(id.host),
        phase: Wire::read(id.phase, &format!("{at}.phase"))?,
        step: unindex(id.step),
        attempt: id.attempt,
    })
}

fn result(r: &StepResult) -> pb::RunStepResult {
    pb::RunStepResult {
        termination: r.termination.map_or(0, Wire::wire),
        exit_code: r.exit_code,
        stdout: r.stdout.clone(),
        stderr: r.stderr.clone(),
        stdout_dropped: r.stdout_dropped,
        stderr_dropped: r.stderr_dropped,
        duration_ms: r.duration_ms,
    }
}

fn result_from(r: Option<pb::RunStepResult>, at: &str) -> Result<StepResult, Malformed> {
    let r = r.ok_or_else(|| Malformed::missing_field(at))?;
    Ok(StepResult {
        termination: optional(r.termination, &format!("{at}.termination"))?,
        exit_code: r.exit_code,
        stdout: r.stdout,
        stderr: r.stderr,
        stdout_dropped: r.stdout_dropped,
        stderr_dropped: r.stderr_dropped,
        duration_ms: r.duration_ms,
    })
}

/// A watch item for the wire.
pub fn progress(item: &WatchItem) -> pb::Progress {
    let event = match item {
        WatchItem::Progress { progress } => match progress {
            Progress::Run { state } => P::Run(state.wire()),
            Progress::Change { change, state } => P::Change(pb::ChangeProgress {
                change: index(*change),
                state: state.wire(),
            }),
            Progress::Batch {
                change,
                batch,
                hosts,
            } => P::Batch(pb::BatchProgress {
                change: index(*change),
                batch: index(*batch),
                hosts: hosts.iter().copied().map(index).collect(),
            }),
            Progress::Host {
                change,
                host,
                state,
                attempt,
            } => P::Host(pb::HostProgress {
                change: index(*change),
                host: index(*host),
                state: state.wire(),
                attempt: *attempt,
            }),
            Progress::Step { id, passed, reason } => P::Step(pb::StepProgress {
                id: Some(dispatch(id)),
                passed: *passed,
                reason: reason.map_or(0, Wire::wire),
            }),
            Progress::AwaitingApproval { change, id, gate } => {
                P::AwaitingApproval(pb::GateProgress {
                    change: index(*change),
                    id: *id,
                    gate: gate.clone(),
                })
            }
        },
        WatchItem::Dispatched { id, host, step } => P::Dispatched(pb::Dispatched {
            id: Some(dispatch(id)),
            host: host.clone(),
            step: step.clone(),
        }),
        WatchItem::Result { id, result: r } => P::Result(pb::ResultProgress {
            id: Some(dispatch(id)),
            result: Some(result(r)),
        }),
        WatchItem::Late { id, result: r } => P::Late(pb::ResultProgress {
            id: Some(dispatch(id)),
            result: Some(result(r)),
        }),
        WatchItem::Output { id, stderr, data } => P::Output(pb::OutputProgress {
            id: Some(dispatch(id)),
            stderr: *stderr,
            data: data.clone(),
        }),
    };
    pb::Progress { event: Some(event) }
}

/// A watch item from the wire.
pub fn progress_from(p: pb::Progress) -> Result<WatchItem, Malformed> {
    let engine = |progress| Ok(WatchItem::Progress { progress });
    match p
        .event
        .ok_or_else(|| Malformed::missing_field("progress.event"))?
    {
        P::Run(state) => engine(Progress::Run {
            state: Wire::read(state, "progress.run")?,
        }),
        P::Change(c) => engine(Progress::Change {
            change: unindex(c.change),
            state: Wire::read(c.state, "progress.change.state")?,
        }),
        P::Batch(b) => engine(Progress::Batch {
            change: unindex(b.change),
            batch: unindex(b.batch),
            hosts: b.hosts.into_iter().map(unindex).collect(),
        }),
        P::Host(h) => engine(Progress::Host {
            change: unindex(h.change),
            host: unindex(h.host),
            state: Wire::read(h.state, "progress.host.state")?,
            attempt: h.attempt,
        }),
        P::Step(s) => engine(Progress::Step {
            id: dispatch_from(s.id, "progress.step.id")?,
            passed: s.passed,
            reason: optional(s.reason, "progress.step.reason")?,
        }),
        P::AwaitingApproval(g) => engine(Progress::AwaitingApproval {
            change: unindex(g.change),
            id: g.id,
            gate: g.gate,
        }),
        P::Dispatched(d) => Ok(WatchItem::Dispatched {
            id: dispatch_from(d.id, "progress.dispatched.id")?,
            host: d.host,
            step: d.step,
        }),
        P::Result(r) => Ok(WatchItem::Result {
            id: dispatch_from(r.id, "progress.result.id")?,
            result: result_from(r.result, "progress.result.result")?,
        }),
        P::Late(r) => Ok(WatchItem::Late {
            id: dispatch_from(r.id, "progress.late.id")?,
            result: result_from(r.result, "progress.late.result")?,
        }),
        P::Output(o) => Ok(WatchItem::Output {
            id: dispatch_from(o.id, "progress.output.id")?,
            stderr: o.stderr,
            data: o.data,
        }),
    }
}
