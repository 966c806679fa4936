//! Approval gates: once, each_batch, each_host; approve, deny, timeout.

use super::sim::*;
use crate::rollout::{Action, AlertKind, Event, HostState, Phase, Progress, RunState};
use crate::spec::{Amount, Approve, ApproveAt, ChangeSpec, RolloutMode};

fn gated(hosts: usize, at: ApproveAt) -> ChangeSpec {
    let mut c = change("gated", hosts);
    c.approve = Approve { at, timeout: None };
    c
}

fn approve() -> Event {
    Event::Approve { by: "alice".into() }
}

fn deny() -> Event {
    Event::Deny {
        by: "bob".into(),
        backout: true,
    }
}

/// Runs, approving every gate; returns the gate labels in order.
fn approve_all(sim: &mut Sim) -> Vec<String> {
    sim.start();
    loop {
        sim.run();
        if sim.engine.state() != RunState::AwaitingApproval {
            break;
        }
        sim.feed(approve());
    }
    sim.check_end();
    gates(sim)
}

fn gates(sim: &Sim) -> Vec<String> {
    sim.progress()
        .into_iter()
        .filter_map(|(_, p)| match p {
            Progress::AwaitingApproval { gate, .. } => Some(gate),
            _ => None,
        })
        .collect()
}

#[test]
fn approve_once_waits_before_the_first_host_only() {
    let mut sim = Sim::new(run_spec(vec![gated(3, ApproveAt::Once)]));
    sim.start();
    sim.run();
    assert_eq!(sim.engine.state(), RunState::AwaitingApproval);
    assert_eq!(sim.change_state(0), RunState::AwaitingApproval);
    assert!(sim.dispatches().is_empty());
    assert_eq!(
        sim.engine.next_deadline(),
        None,
        "no timeout: waits forever"
    );
    let labels = approve_all(&mut sim);
    assert_eq!(labels, ["change gated: 3 hosts"]);
    assert_eq!(sim.host_states(0), [HostState::Success; 3]);
    assert_eq!(sim.engine.state(), RunState::Success);
}

#[test]
fn approve_each_batch_gates_every_batch() {
    let mut c = gated(5, ApproveAt::EachBatch);
    c.rollout.mode = RolloutMode::Rolling;
    c.rollout.batches = vec![Amount::Count(1), Amount::Count(2)];
    let mut sim = Sim::new(run_spec(vec![c]));
    let labels = approve_all(&mut sim);
    assert_eq!(
        labels,
        [
            "batch 1 of 3 of change gated: h0",
            "batch 2 of 3 of change gated: h1, h2",
            "batch 3 of 3 of change gated: h3, h4",
        ]
    );
    assert_eq!(sim.engine.state(), RunState::Success);
}

#[test]
fn approve_each_host_gates_every_host_even_in_parallel() {
    let mut c = gated(3, ApproveAt::EachHost);
    c.rollout.mode = RolloutMode::Parallel;
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.start();
    sim.feed(approve());
    sim.feed(approve());
    // Two hosts run at once; the third waits at its gate.
    assert_eq!(sim.in_flight(), 2);
    assert_eq!(sim.host_state(0, 2), HostState::Pending);
    let labels = approve_all(&mut sim);
    assert_eq!(labels.len(), 3);
    assert_eq!(labels[2], "host h2 of change gated");
}

#[test]
fn deny_at_the_first_gate_bails_out_with_nothing_done() {
    let mut sim = Sim::new(run_spec(vec![gated(2, ApproveAt::Once), change("next", 1)]));
    sim.start();
    sim.run();
    let actions = sim.feed(deny());
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Alert {
            kind: AlertKind::BailedOut,
            ..
        }
    )));
    sim.run_to_end();
    assert_eq!(sim.change_state(0), RunState::BailedOut);
    assert_eq!(sim.host_states(0), [HostState::Cancelled; 2]);
    assert_eq!(
        sim.change_state(1),
        RunState::Success,
        "independent: ran before the deny"
    );
    assert_eq!(sim.engine.state(), RunState::BailedOut);
    assert_eq!(sim.alerts(AlertKind::BailedOut).len(), 1);
}

#[test]
fn deny_at_a_later_batch_backs_out_what_the_change_applied() {
    let mut c = gated(3, ApproveAt::EachBatch);
    c.rollout.mode = RolloutMode::Serial;
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.start();
    sim.feed(approve());
    sim.run();
    assert_eq!(sim.engine.state(), RunState::AwaitingApproval);
    sim.feed(deny());
    sim.run_to_end();
    assert_eq!(
        sim.host_states(0),
        [
            HostState::BackoutOk,
            HostState::Cancelled,
            HostState::Cancelled
        ]
    );
    assert_eq!(sim.change_state(0), RunState::BailedOut);
    assert_eq!(sim.engine.state(), RunState::BailedOut);
}

#[test]
fn a_gate_that_times_out_is_a_deny() {
    let mut c = gated(2, ApproveAt::EachBatch);
    c.approve.timeout = Some(secs(3600));
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.start();
    sim.feed(approve());
    sim.run_until(STEP_MS);
    assert_eq!(sim.engine.next_deadline(), Some(STEP_MS + 3_600_000));
    sim.run_to_end();
    let bailed_at = sim.actions.iter().find_map(|(t, a)| match a {
        Action::Alert {
            kind: AlertKind::BailedOut,
            message,
            ..
        } => Some((*t, message.clone())),
        _ => None,
    });
    let (t, message) = bailed_at.unwrap();
    assert_eq!(t, STEP_MS + 3_600_000);
    assert!(message.contains("timed out"), "{message}");
    assert_eq!(
        sim.host_states(0),
        [HostState::BackoutOk, HostState::Cancelled]
    );
    assert_eq!(sim.engine.state(), RunState::BailedOut);
}

#[test]
fn an_approval_after_the_timeout_is_too_late() {
    let mut c = gated(1, ApproveAt::Once);
    c.approve.timeout = Some(secs(10));
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.start();
    sim.now = 10_001;
    sim.feed(approve());
    sim.run_to_end();
    assert!(sim.dispatches().is_empty());
    assert_eq!(sim.engine.state(), RunState::BailedOut);
}

#[test]
fn approve_or_deny_without_a_gate_is_ignored() {
    let mut sim = Sim::new(run_spec(vec![change("c", 2)]));
    assert!(sim.feed(approve()).is_empty(), "before start");
    sim.start();
    assert!(sim.feed(approve()).is_empty());
    assert!(sim.feed(deny()).is_empty());
    sim.run_to_end();
    assert!(sim.feed(approve()).is_empty(), "after the end");
    assert_eq!(sim.engine.state(), RunState::Success);
}

#[test]
fn approve_answers_the_oldest_gate_first() {
    // `b` gates at once; `later` gates once its prerequisite is done.
    let mut later = gated(1, ApproveAt::Once);
    later.name = "later".into();
    later.requires = vec![2];
    let mut b = gated(1, ApproveAt::Once);
    b.name = "b".into();
    let mut sim = Sim::new(run_spec(vec![later, b, change("first", 1)]));
    sim.start();
    sim.run();
    assert_eq!(gates(&sim), ["change b: 1 hosts", "change later: 1 hosts"]);
    sim.feed(approve());
    assert_eq!(sim.change_state(1), RunState::Running, "b's gate was older");
    assert_eq!(sim.change_state(0), RunState::AwaitingApproval);
    approve_all(&mut sim);
    assert_eq!(sim.engine.state(), RunState::Success);
}

#[test]
fn deny_cancels_steps_in_flight_in_other_changes() {
    let mut busy = change("busy", 1);
    busy.hosts[0].apply = vec![run("long")];
    let mut sim = Sim::new(run_spec(vec![busy, gated(1, ApproveAt::Once)]));
    sim.script(at(0, 0, Phase::Apply, 0), Outcome::Hang);
    sim.start();
    let actions = sim.feed(deny());
    assert!(actions.iter().any(|a| matches!(a, Action::Cancel { .. })));
    sim.run_to_end();
    assert_eq!(
        sim.host_state(0, 0),
        HostState::BackoutOk,
        "applied: backed out"
    );
    assert_eq!(sim.change_state(0), RunState::BailedOut);
    assert_eq!(sim.change_state(1), RunState::BailedOut);
}

#[test]
fn a_gate_times_out_even_while_paused() {
    let mut c = gated(1, ApproveAt::Once);
    c.approve.timeout = Some(secs(10));
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.start();
    sim.feed(Event::Pause { by: "dan".into() });
    assert_eq!(sim.engine.state(), RunState::Paused);
    assert_eq!(sim.change_state(0), RunState::AwaitingApproval);
    assert_eq!(sim.engine.next_deadline(), Some(10_000));
    sim.run_to_end();
    assert_eq!(sim.engine.state(), RunState::BailedOut);
}

#[test]
fn an_approval_given_while_paused_takes_effect_at_resume() {
    let mut sim = Sim::new(run_spec(vec![gated(1, ApproveAt::Once)]));
    sim.start();
    sim.feed(Event::Pause { by: "dan".into() });
    let actions = sim.feed(approve());
    assert!(!actions.iter().any(|a| matches!(a, Action::Dispatch { .. })));
    assert_eq!(sim.change_state(0), RunState::Paused);
    let actions = sim.feed(Event::Resume { by: "dan".into() });
    assert!(actions.iter().any(|a| matches!(a, Action::Dispatch { .. })));
    sim.run_to_end();
    assert_eq!(sim.engine.state(), RunState::Success);
}
