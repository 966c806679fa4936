//! Everything the admin API sends comes back as it was, and what a client
//! cannot read is refused with the field's path.

use modi_proto::v1 as pb;
use prost::Message;

use super::*;
use crate::changeset::tests::{host, plan_files, vars};
use crate::rollout::{
    ChangeStatus, Decision, DispatchId, Failure, FailureReason, HostState, HostStatus, LateResult,
    OpenGate, Phase, Progress, RunState, RunStatus, StepResult, StepStatus, Termination,
};
use crate::run_ports::WatchItem;
use crate::spec::{HostInfo, RunSpec, Step, StepAction};

/// Every example in examples/, rendered against a small fleet.
fn examples() -> Vec<RunSpec> {
    let fleet: Vec<HostInfo> = (1..=4)
        .map(|i| host(&format!("web-{i}"), &[("role", "web")]))
        .chain([host("db-1", &[("role", "db")])])
        .collect();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let db = std::fs::read_to_string(format!("{dir}/db-migrate.yaml")).unwrap();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let name = format!("examples/{}", path.file_name().unwrap().to_string_lossy());
        let text = std::fs::read_to_string(&path).unwrap();
        let files = [
            (name.as_str(), text.as_str()),
            ("examples/db-migrate.yaml", db.as_str()),
        ];
        let cli = vars(&[("version", "2.0"), ("user", "ops")]);
        match plan_files(&files, &fleet, &serde_json::Value::Null, &cli) {
            Ok(spec) => out.push(spec),
            // An example that needs a --secret or other vars: the others
            // still cover every kind of step.
            Err(_) => continue,
        }
    }
    assert!(out.len() >= 5, "only {} examples rendered", out.len());
    out
}

#[test]
fn every_example_spec_survives_the_wire() {
    let specs = examples();
    let kinds: std::collections::BTreeSet<&str> = specs
        .iter()
        .flat_map(|s| &s.changes)
        .flat_map(|c| &c.hosts)
        .flat_map(|h| h.apply.iter().chain(&h.check).chain(&h.verify))
        .map(|s| match s.action {
            StepAction::Run { .. } => "run",
            StepAction::Argv { .. } => "argv",
            StepAction::File(_) => "file",
            StepAction::Interact { .. } => "interact",
            StepAction::Restore { .. } => "restore",
            StepAction::Unrenderable { .. } => "unrenderable",
        })
        .collect();
    assert!(kinds.contains("run") && kinds.contains("file"), "{kinds:?}");
    for spec in specs {
        let bytes = run_spec(&spec).encode_to_vec();
        let back = run_spec_from(pb::RunSpec::decode(bytes.as_slice()).unwrap()).unwrap();
        assert_eq!(back, spec, "{}", spec.name);
    }
}

#[test]
fn every_kind_of_step_survives_the_wire() {
    let mut spec = examples().remove(0);
    let actions = [
        StepAction::Argv {
            argv: vec!["echo".into(), "hi there".into()],
        },
        StepAction::Interact {
            command: "passwd".into(),
            script: vec![crate::spec::Exchange {
                expect: "word:".into(),
                send: "x\n".into(),
                timeout: Some(std::time::Duration::from_secs(3)),
            }],
        },
        StepAction::Restore {
            of: "c0.h0.apply.0.a0".into(),
            path: "/etc/x".into(),
        },
        StepAction::Unrenderable {
            reason: "host.labels.zone is not set on db-1".into(),
        },
    ];
    let host = &mut spec.changes[0].hosts[0];
    let template = host.apply[0].clone();
    for action in actions {
        host.apply.push(Step {
            action,
            user: Some("nobody".into()),
            stdin: Some("input".into()),
            secrets: ["pw".to_string()].into(),
            ..template.clone()
        });
    }
    host.vars.insert(
        "nested".into(),
        serde_json::json!({"n": 3, "f": 1.5, "neg": -2, "list": [true, null, "s"]}),
    );
    let back = run_spec_from(run_spec(&spec)).unwrap();
    assert_eq!(back, spec);
}

fn dispatch(phase: Phase) -> DispatchId {
    DispatchId {
        change: 1,
        host: 2,
        phase,
        step: 3,
        attempt: 1,
    }
}

fn result() -> StepResult {
    StepResult {
        termination: Some(Termination::Exited),
        exit_code: Some(3),
        stdout: "out".into(),
        stderr: "err".into(),
        stdout_dropped: 7,
        stderr_dropped: 0,
        duration_ms: 42,
    }
}

#[test]
fn a_status_with_everything_survives_the_wire() {
    let status = RunStatus {
        state: RunState::AwaitingApproval,
        changes: vec![ChangeStatus {
            name: "web".into(),
            state: RunState::BackoutFailed,
            hosts: vec![
                HostStatus {
                    name: "web-1".into(),
                    state: HostState::BackoutPending,
                    attempt: 2,
                    failure: Some(Failure {
                        phase: Phase::Verify,
                        step: 0,
                        reason: FailureReason::ConditionFailed,
                        exit_code: None,
                        stdout: "o".into(),
                        stderr: "e".into(),
                        message: "verify[0] failed".into(),
                    }),
                    steps: vec![
                        StepStatus {
                            id: dispatch(Phase::Apply),
                            passed: Some(false),
                            reason: Some(FailureReason::Timeout),
                            exit_code: Some(1),
                            duration_ms: 5,
                        },
                        StepStatus {
                            id: dispatch(Phase::BackoutVerify),
                            passed: None,
                            reason: None,
                            exit_code: None,
                            duration_ms: 0,
                        },
                    ],
                },
                HostStatus {
                    name: "web-2".into(),
                    state: HostState::Queued,
                    attempt: 0,
                    failure: None,
                    steps: vec![],
                },
            ],
            gate: Some(OpenGate {
                id: 4,
                label: "batch 2 of web".into(),
                deadline: Some(99),
                since: 12,
            }),
        }],
        decisions: vec![Decision {
            at: 10,
            by: "alice".into(),
            action: "deny --no-backout".into(),
        }],
        held: Some("store: full".into()),
        late: vec![LateResult {
            id: dispatch(Phase::Restore),
            host: "web-1".into(),
            at: 77,
            result: StepResult {
                termination: None,
                ..result()
            },
        }],
    };
    let bytes = run_status(&status).encode_to_vec();
    let back = run_status_from(pb::RunStatus::decode(bytes.as_slice()).unwrap()).unwrap();
    assert_eq!(back, status);
}

#[test]
fn every_watch_item_survives_the_wire() {
    let items = vec![
        WatchItem::Progress {
            progress: Progress::Run {
                state: RunState::BailedOut,
            },
        },
        WatchItem::Progress {
            progress: Progress::Change {
                change: 2,
                state: RunState::Cancelled,
            },
        },
        WatchItem::Progress {
            progress: Progress::Batch {
                change: 0,
                batch: 1,
                hosts: vec![3, 4],
            },
        },
        WatchItem::Progress {
            progress: Progress::Host {
                change: 0,
                host: 3,
                state: HostState::RetryPending,
                attempt: 1,
            },
        },
        WatchItem::Progress {
            progress: Progress::Step {
                id: dispatch(Phase::SkipIf),
                passed: false,
                reason: Some(FailureReason::Unreachable),
            },
        },
        WatchItem::Progress {
            progress: Progress::AwaitingApproval {
                change: 1,
                id: 9,
                gate: "before db".into(),
            },
        },
        WatchItem::Dispatched {
            id: dispatch(Phase::Check),
            host: "web-3".into(),
            step: "check[3]: true".into(),
        },
        WatchItem::Result {
            id: dispatch(Phase::Backout),
            result: result(),
        },
        WatchItem::Late {
            id: dispatch(Phase::BackoutCheck),
            result: StepResult {
                termination: Some(Termination::Unreachable),
                ..result()
            },
        },
        WatchItem::Output {
            id: dispatch(Phase::Apply),
            stderr: true,
            data: "line\n".into(),
        },
    ];
    for item in items {
        let back = progress_from(progress(&item)).unwrap();
        // WatchItem has no PartialEq (it is never compared in the
        // controller); its JSON is a faithful picture of it.
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&item).unwrap()
        );
    }
}

#[test]
fn an_unknown_value_is_refused_with_its_field() {
    let mut status = run_status(&RunStatus {
        state: RunState::Running,
        changes: vec![ChangeStatus {
            name: "web".into(),
            state: RunState::Running,
            hosts: vec![HostStatus {
                name: "web-1".into(),
                state: HostState::Running,
                attempt: 0,
                failure: None,
                steps: vec![],
            }],
            gate: None,
        }],
        decisions: vec![],
        held: None,
        late: vec![],
    });
    status.changes[0].hosts[0].state = 99;
    let err = run_status_from(status.clone()).unwrap_err();
    assert_eq!(err.field, "status.changes[0].hosts[0].state");
    assert_eq!(err.problem, "unknown value 99");
    status.changes[0].hosts[0].state = 0;
    assert!(
        run_status_from(status).is_err(),
        "UNSPECIFIED is not a state"
    );
    let empty = pb::Progress { event: None };
    assert_eq!(progress_from(empty).unwrap_err().field, "progress.event");
}
