//! `RunSpec` ⇄ `pb::RunSpec`.

use std::time::Duration;

use modi_proto::v1 as pb;
use pb::planned_step::Action;

use super::{Malformed, Wire, index, unindex};
use crate::spec::{
    Amount, Approve, BackoutSpec, ChangeSpec, Condition, Exchange, FileSpec, GroupSpec, HostInfo,
    HostPlan, Location, Retry, Rollout, RunSpec, Step, StepAction,
};

/// A rendered run for the wire.
pub fn run_spec(spec: &RunSpec) -> pb::RunSpec {
    pb::RunSpec {
        name: spec.name.clone(),
        description: spec.description.clone(),
        source: spec.source.clone(),
        on_failure: spec.on_failure.wire(),
        changes: spec.changes.iter().map(change).collect(),
        groups: spec
            .groups
            .iter()
            .map(|g| pb::GroupSpec {
                name: g.name.clone(),
                file: g.file.clone(),
                parent: g.parent.map(index),
                on_failure: g.on_failure.wire(),
            })
            .collect(),
    }
}

/// A rendered run from the wire.
pub fn run_spec_from(spec: pb::RunSpec) -> Result<RunSpec, Malformed> {
    Ok(RunSpec {
        on_failure: Wire::read(spec.on_failure, "spec.on_failure")?,
        name: spec.name,
        description: spec.description,
        source: spec.source,
        changes: spec
            .changes
            .into_iter()
            .enumerate()
            .map(|(i, c)| change_from(c, &format!("spec.changes[{i}]")))
            .collect::<Result<_, _>>()?,
        groups: spec
            .groups
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                Ok(GroupSpec {
                    on_failure: Wire::read(g.on_failure, &format!("spec.groups[{i}].on_failure"))?,
                    name: g.name,
                    file: g.file,
                    parent: g.parent.map(unindex),
                })
            })
            .collect::<Result<_, Malformed>>()?,
    })
}

fn location(l: &Location) -> Option<pb::Location> {
    Some(pb::Location {
        file: l.file.clone(),
        line: l.line,
        column: l.column,
        path: l.path.clone(),
    })
}

fn location_from(l: Option<pb::Location>) -> Location {
    l.map(|l| Location {
        file: l.file,
        line: l.line,
        column: l.column,
        path: l.path,
    })
    .unwrap_or_default()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn amount(a: Amount) -> pb::Amount {
    pb::Amount {
        amount: Some(match a {
            Amount::Count(n) => pb::amount::Amount::Count(n),
            Amount::Percent(p) => pb::amount::Amount::Percent(p),
        }),
    }
}

fn amount_from(a: pb::Amount, field: &str) -> Result<Amount, Malformed> {
    match a.amount {
        Some(pb::amount::Amount::Count(n)) => Ok(Amount::Count(n)),
        Some(pb::amount::Amount::Percent(p)) => Ok(Amount::Percent(p)),
        None => Err(Malformed::missing_field(field)),
    }
}

fn change(c: &ChangeSpec) -> pb::ChangeSpec {
    let r = &c.rollout;
    pb::ChangeSpec {
        name: c.name.clone(),
        group: c.group.map(index),
        requires: c.requires.iter().copied().map(index).collect(),
        rollout: Some(pb::Rollout {
            mode: r.mode.wire(),
            max_parallel: r.max_parallel,
            batches: r.batches.iter().copied().map(amount).collect(),
            max_failures: r.max_failures.map(amount),
            pause_ms: r.pause.map(millis),
        }),
        on_failure: c.on_failure.wire(),
        retry: Some(pb::Retry {
            max_retries: c.retry.max_retries,
            delay_ms: millis(c.retry.delay),
        }),
        approve: Some(pb::Approve {
            at: c.approve.at.wire(),
            timeout_ms: c.approve.timeout.map(millis),
        }),
        hosts: c.hosts.iter().map(host_plan).collect(),
        location: location(&c.location),
    }
}

fn change_from(c: pb::ChangeSpec, at: &str) -> Result<ChangeSpec, Malformed> {
    let r = c
        .rollout
        .ok_or_else(|| Malformed::missing_field(format!("{at}.rollout")))?;
    let rollout = Rollout {
        mode: Wire::read(r.mode, &format!("{at}.rollout.mode"))?,
        max_parallel: r.max_parallel,
        batches: r
            .batches
            .into_iter()
            .enumerate()
            .map(|(i, a)| amount_from(a, &format!("{at}.rollout.batches[{i}]")))
            .collect::<Result<_, _>>()?,
        max_failures: r
            .max_failures
            .map(|a| amount_from(a, &format!("{at}.rollout.max_failures")))
            .transpose()?,
        pause: r.pause_ms.map(Duration::from_millis),
    };
    let retry = c.retry.unwrap_or_default();
    let approve = c
        .approve
        .ok_or_else(|| Malformed::missing_field(format!("{at}.approve")))?;
    Ok(ChangeSpec {
        rollout,
        on_failure: Wire::read(c.on_failure, &format!("{at}.on_failure"))?,
        retry: Retry {
            max_retries: retry.max_retries,
            delay: Duration::from_millis(retry.delay_ms),
        },
        approve: Approve {
            at: Wire::read(approve.at, &format!("{at}.approve.at"))?,
            timeout: approve.timeout_ms.map(Duration::from_millis),
        },
        hosts: c
            .hosts
            .into_iter()
            .enumerate()
            .map(|(i, h)| host_plan_from(h, &format!("{at}.hosts[{i}]")))
            .collect::<Result<_, _>>()?,
        location: location_from(c.location),
        name: c.name,
        group: c.group.map(unindex),
        requires: c.requires.into_iter().map(unindex).collect(),
    })
}

fn host_plan(h: &HostPlan) -> pb::HostPlan {
    pb::HostPlan {
        host: Some(pb::HostInfo {
            name: h.host.name.clone(),
            labels: h.host.labels.clone(),
            facts: h.host.facts.clone(),
        }),
        vars: Some(object(&h.vars)),
        skip_if: steps(&h.skip_if),
        check: steps(&h.check),
        apply: steps(&h.apply),
        verify: steps(&h.verify),
        backout: h
            .backout
            .iter()
            .map(|b| pb::BackoutSpec {
                when: b.when.as_ref().map(condition),
                check: steps(&b.check),
                steps: steps(&b.steps),
                verify: steps(&b.verify),
                location: location(&b.location),
            })
            .collect(),
    }
}

fn host_plan_from(h: pb::HostPlan, at: &str) -> Result<HostPlan, Malformed> {
    let host = h
        .host
        .ok_or_else(|| Malformed::missing_field(format!("{at}.host")))?;
    let phase = |list: Vec<pb::PlannedStep>, name: &str| steps_from(list, &format!("{at}.{name}"));
    Ok(HostPlan {
        host: HostInfo {
            name: host.name,
            labels: host.labels,
            facts: host.facts,
        },
        vars: h.vars.map(object_from).unwrap_or_default(),
        skip_if: phase(h.skip_if, "skip_if")?,
        check: phase(h.check, "check")?,
        apply: phase(h.apply, "apply")?,
        verify: phase(h.verify, "verify")?,
        backout: h
            .backout
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let at = format!("{at}.backout[{i}]");
                Ok(BackoutSpec {
                    when: b.when.map(condition_from),
                    check: steps_from(b.check, &format!("{at}.check"))?,
                    steps: steps_from(b.steps, &format!("{at}.steps"))?,
                    verify: steps_from(b.verify, &format!("{at}.verify"))?,
                    location: location_from(b.location),
                })
            })
            .collect::<Result<_, Malformed>>()?,
    })
}

fn condition(c: &Condition) -> pb::Condition {
    pb::Condition {
        expr: c.expr.clone(),
        location: location(&c.location),
    }
}

fn condition_from(c: pb::Condition) -> Condition {
    Condition {
        expr: c.expr,
        location: location_from(c.location),
    }
}

fn steps(list: &[Step]) -> Vec<pb::PlannedStep> {
    list.iter().map(step).collect()
}

fn steps_from(list: Vec<pb::PlannedStep>, at: &str) -> Result<Vec<Step>, Malformed> {
    list.into_iter()
        .enumerate()
        .map(|(i, s)| step_from(s, &format!("{at}[{i}]")))
        .collect()
}

fn step(s: &Step) -> pb::PlannedStep {
    let action = match &s.action {
        StepAction::Run { command } => Action::Run(command.clone()),
        StepAction::Argv { argv } => Action::Argv(pb::Argv { args: argv.clone() }),
        StepAction::File(f) => Action::File(pb::PlannedFile {
            path: f.path.clone(),
            content: f.content.clone(),
            mode: f.mode,
            owner: f.owner.clone(),
            validate: f.validate.clone(),
        }),
        StepAction::Interact { command, script } => Action::Interact(pb::PlannedInteract {
            command: command.clone(),
            script: script
                .iter()
                .map(|e| pb::PlannedExchange {
                    expect: e.expect.clone(),
                    send: e.send.clone(),
                    timeout_ms: e.timeout.map(millis),
                })
                .collect(),
        }),
        StepAction::Restore { of, path } => Action::Restore(pb::PlannedRestore {
            of: of.clone(),
            path: path.clone(),
        }),
        StepAction::Unrenderable { reason } => Action::Unrenderable(reason.clone()),
    };
    pb::PlannedStep {
        action: Some(action),
        timeout_ms: s.timeout.map(millis),
        env: s.env.clone(),
        cwd: s.cwd.clone(),
        user: s.user.clone(),
        stdin: s.stdin.clone(),
        expect: s.expect.as_ref().map(condition),
        location: location(&s.location),
        secrets: s.secrets.iter().cloned().collect(),
    }
}

fn step_from(s: pb::PlannedStep, at: &str) -> Result<Step, Malformed> {
    let action = match s.action {
        Some(Action::Run(command)) => StepAction::Run { command },
        Some(Action::Argv(a)) => StepAction::Argv { argv: a.args },
        Some(Action::File(f)) => StepAction::File(FileSpec {
            path: f.path,
            content: f.content,
            mode: f.mode,
            owner: f.owner,
            validate: f.validate,
        }),
        Some(Action::Interact(i)) => StepAction::Interact {
            command: i.command,
            script: i
                .script
                .into_iter()
                .map(|e| Exchange {
                    expect: e.expect,
                    send: e.send,
                    timeout: e.timeout_ms.map(Duration::from_millis),
                })
                .collect(),
        },
        Some(Action::Restore(r)) => StepAction::Restore {
            of: r.of,
            path: r.path,
        },
        Some(Action::Unrenderable(reason)) => StepAction::Unrenderable { reason },
        None => return Err(Malformed::missing_field(format!("{at}.action"))),
    };
    Ok(Step {
        action,
        timeout: s.timeout_ms.map(Duration::from_millis),
        env: s.env,
        cwd: s.cwd,
        user: s.user,
        stdin: s.stdin,
        expect: s.expect.map(condition_from),
        location: location_from(s.location),
        secrets: s.secrets.into_iter().collect(),
    })
}

/// A JSON object as a `google.protobuf.Struct`.
fn object(map: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
    }
}

fn value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(object(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A `google.protobuf.Struct` as a JSON object. Numbers travel as doubles:
/// whole ones come back as integers.
fn object_from(s: prost_types::Struct) -> serde_json::Map<String, serde_json::Value> {
    s.fields
        .into_iter()
        .map(|(k, v)| (k, value_from(v)))
        .collect()
}

fn value_from(v: prost_types::Value) -> serde_json::Value {
    use prost_types::value::Kind;
    use serde_json::Value;
    match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::from(n as i64)
            } else {
                serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::ListValue(l)) => Value::Array(l.values.into_iter().map(value_from).collect()),
        Some(Kind::StructValue(s)) => Value::Object(object_from(s)),
    }
}
