//! Per-change `on_failure`: halt, continue with `max_failures`, and
//! backout_all, against a failure at every position.

use super::sim::*;
use crate::rollout::{AlertKind, HostState, Phase, RunState};
use crate::spec::{Amount, ChangeSpec, OnFailure, Retry, RolloutMode};

use HostState::*;
use Phase::*;

/// A change whose hosts run skip_if (says "not done"), check, a file and
/// two run apply steps, verify, with one catch-all backout with a check,
/// a step and a verify.
pub(super) fn rich(hosts: usize, on_failure: OnFailure) -> ChangeSpec {
    let mut c = change("web", hosts);
    c.on_failure = on_failure;
    each_host(&mut c, |h| {
        h.skip_if = vec![run("done")];
        h.check = vec![run("check")];
        h.apply = vec![file("/etc/x"), run("apply 1"), run("apply 2")];
        h.verify = vec![run("verify")];
        h.backout = vec![backout(None, 1, 1, 1)];
    });
    c
}

/// (phase, step, outcome) scripted on the failing host.
pub(super) type Script = Vec<(Phase, usize, Outcome)>;

/// Every failure position, as the scripts that cause it and the state the
/// failing host ends in when it is backed out at once.
pub(super) fn positions() -> Vec<(&'static str, Script, HostState)> {
    vec![
        (
            "skip_if timeout",
            vec![(SkipIf, 0, Outcome::Timeout)],
            Failed,
        ),
        ("check", vec![(Check, 0, Outcome::Fail(1))], Failed),
        (
            "check unreachable",
            vec![(Check, 0, Outcome::Unreachable)],
            Failed,
        ),
        ("apply 0", vec![(Apply, 0, Outcome::Fail(1))], BackoutOk),
        ("apply 1", vec![(Apply, 1, Outcome::Fail(1))], BackoutOk),
        ("apply 2 lost", vec![(Apply, 2, Outcome::Lost)], BackoutOk),
        ("verify", vec![(Verify, 0, Outcome::Fail(1))], BackoutOk),
        (
            "verify timeout",
            vec![(Verify, 0, Outcome::Timeout)],
            BackoutOk,
        ),
        (
            "backout check",
            vec![
                (Verify, 0, Outcome::Fail(1)),
                (BackoutCheck, 0, Outcome::Fail(1)),
            ],
            BackoutFailed,
        ),
        (
            "restore",
            vec![
                (Verify, 0, Outcome::Fail(1)),
                (Restore, 0, Outcome::Fail(1)),
            ],
            BackoutFailed,
        ),
        (
            "backout step",
            vec![(Verify, 0, Outcome::Fail(1)), (Backout, 0, Outcome::Lost)],
            BackoutFailed,
        ),
        (
            "backout verify",
            vec![
                (Verify, 0, Outcome::Fail(1)),
                (BackoutVerify, 0, Outcome::Fail(1)),
            ],
            BackoutFailed,
        ),
    ]
}

fn sim_with(change: ChangeSpec, failing: usize, scripts: &[(Phase, usize, Outcome)]) -> Sim {
    let mut sim = Sim::new(run_spec(vec![change]));
    for &(phase, step, outcome) in scripts {
        sim.script(at(0, failing, phase, step), outcome);
    }
    sim.script(
        Rule {
            phase: Some(SkipIf),
            ..Rule::default()
        },
        Outcome::Fail(1),
    );
    sim.run_to_end();
    sim
}

#[test]
fn halt_backs_out_the_failed_host_and_starts_no_other_at_every_position() {
    for (name, scripts, end) in positions() {
        let sim = sim_with(rich(4, OnFailure::Halt), 1, &scripts);
        assert_eq!(
            sim.host_states(0),
            [Success, end, Cancelled, Cancelled],
            "{name}"
        );
        assert!(
            sim.steps_of(0, 2).is_empty() && sim.steps_of(0, 3).is_empty(),
            "{name}"
        );
        assert_eq!(sim.change_state(0), RunState::PartialFailure, "{name}");
        assert_eq!(sim.engine.state(), RunState::PartialFailure, "{name}");
        let backout_failed = sim.alerts(AlertKind::BackoutFailed).len();
        assert_eq!(backout_failed, usize::from(end == BackoutFailed), "{name}");
    }
}

#[test]
fn halt_on_the_first_host_is_a_total_failure() {
    let sim = sim_with(rich(3, OnFailure::Halt), 0, &[(Apply, 1, Outcome::Fail(1))]);
    assert_eq!(sim.host_states(0), [BackoutOk, Cancelled, Cancelled]);
    assert_eq!(sim.change_state(0), RunState::TotalFailure);
    assert_eq!(sim.engine.state(), RunState::TotalFailure);
}

#[test]
fn halt_lets_hosts_in_flight_finish() {
    let mut c = rich(4, OnFailure::Halt);
    c.rollout.mode = RolloutMode::Parallel;
    c.rollout.max_parallel = Some(2);
    let sim = sim_with(c, 0, &[(Check, 0, Outcome::Fail(1))]);
    assert_eq!(sim.host_states(0), [Failed, Success, Cancelled, Cancelled]);
    assert_eq!(sim.steps_of(0, 1).len(), 6, "host 1 ran to its end");
}

#[test]
fn continue_carries_on_at_every_position() {
    for (name, scripts, end) in positions() {
        let sim = sim_with(rich(3, OnFailure::Continue), 1, &scripts);
        assert_eq!(sim.host_states(0), [Success, end, Success], "{name}");
        assert_eq!(sim.change_state(0), RunState::PartialFailure, "{name}");
    }
}

#[test]
fn continue_behaves_as_halt_once_failures_exceed_max_failures() {
    let mut c = rich(6, OnFailure::Continue);
    c.rollout.max_failures = Some(Amount::Count(1));
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(
        Rule {
            phase: Some(SkipIf),
            ..Rule::default()
        },
        Outcome::Fail(1),
    );
    sim.script(at(0, 1, Verify, 0), Outcome::Fail(1));
    sim.script(at(0, 3, Check, 0), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(
        sim.host_states(0),
        [Success, BackoutOk, Success, Failed, Cancelled, Cancelled]
    );

    // 20% of 10 is 2: the third failure halts.
    let mut c = rich(10, OnFailure::Continue);
    c.rollout.max_failures = Some(Amount::Percent(20));
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(
        Rule {
            phase: Some(SkipIf),
            ..Rule::default()
        },
        Outcome::Fail(1),
    );
    for h in [0, 2, 4] {
        sim.script(at(0, h, Apply, 0), Outcome::Fail(1));
    }
    sim.run_to_end();
    let states = sim.host_states(0);
    assert_eq!(
        states[..6],
        [BackoutOk, Success, BackoutOk, Success, BackoutOk, Cancelled]
    );

    // No max_failures: every host runs.
    let mut sim = Sim::new(run_spec(vec![rich(4, OnFailure::Continue)]));
    sim.script(
        Rule {
            phase: Some(SkipIf),
            ..Rule::default()
        },
        Outcome::Fail(1),
    );
    sim.script(
        Rule {
            phase: Some(Check),
            ..Rule::default()
        },
        Outcome::Fail(1),
    );
    sim.run_to_end();
    assert_eq!(sim.host_states(0), [Failed; 4]);
    assert_eq!(sim.change_state(0), RunState::TotalFailure);
}

#[test]
fn backout_all_backs_out_every_applied_host_in_reverse_completion_order() {
    for (name, scripts, _) in positions() {
        let sim = sim_with(rich(5, OnFailure::BackoutAll), 3, &scripts);
        let states = sim.host_states(0);
        assert_eq!(states[..3], [BackoutOk; 3], "{name}");
        assert_eq!(states[4], Cancelled, "{name}");
        let applied = !matches!(scripts[0].0, SkipIf | Check);
        let failing_backs_out = scripts.len() == 1 && applied;
        let want_order: Vec<usize> = if applied {
            vec![3, 2, 1, 0]
        } else {
            vec![2, 1, 0]
        };
        assert_eq!(sim.backout_order(0), want_order, "{name}");
        match (applied, failing_backs_out) {
            (false, _) => assert_eq!(states[3], Failed, "{name}"),
            (true, true) => assert_eq!(states[3], BackoutOk, "{name}"),
            (true, false) => assert_eq!(states[3], BackoutFailed, "{name}"),
        }
        let want = if applied && !failing_backs_out {
            RunState::BackoutFailed
        } else {
            RunState::BackoutOk
        };
        assert_eq!(sim.change_state(0), want, "{name}");
        assert_eq!(sim.engine.state(), want, "{name}");
    }
}

#[test]
fn backout_all_waits_for_hosts_in_flight_and_backs_out_one_at_a_time() {
    let mut c = change("roll", 4);
    c.on_failure = OnFailure::BackoutAll;
    c.rollout.mode = RolloutMode::Rolling;
    c.rollout.batches = vec![Amount::Count(1), Amount::Count(3)];
    each_host(&mut c, |h| h.apply = vec![run("a0"), run("a1")]);
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(at(0, 2, Apply, 0), Outcome::Fail(1));
    sim.run_to_end();
    // h0 done at 2s, h2 failed at 3s, h1 and h3 done at 4s (h1 first).
    assert_eq!(sim.backout_order(0), [3, 1, 2, 0]);
    assert_eq!(sim.host_states(0), [BackoutOk; 4]);
    // One at a time: every backout step starts after the previous ended.
    let backouts: Vec<_> = sim
        .actions
        .iter()
        .filter_map(|(t, a)| match a {
            crate::rollout::Action::Dispatch { id, .. } if id.phase == Backout => Some(*t),
            _ => None,
        })
        .collect();
    assert_eq!(backouts, [4_000, 5_000, 6_000, 7_000]);
    assert_eq!(sim.change_state(0), RunState::BackoutOk);
}

#[test]
fn backout_all_ends_pending_retries_and_retries_nothing() {
    let mut c = change("retrying", 2);
    c.on_failure = OnFailure::BackoutAll;
    c.rollout.mode = RolloutMode::Parallel;
    c.retry = Retry {
        max_retries: 3,
        delay: secs(5),
    };
    each_host(&mut c, |h| h.apply = vec![run("a0"), run("a1")]);
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(at(0, 0, Apply, 0), Outcome::Fail(1));
    sim.script(at(0, 1, Apply, 1), Outcome::Unreachable);
    sim.run_to_end();
    assert_eq!(
        sim.history(0, 0),
        [Running, RetryPending, Failed, BackingOut, BackoutOk]
    );
    assert!(
        sim.dispatches().iter().all(|id| id.attempt == 0),
        "no retry"
    );
    assert_eq!(sim.backout_order(0), [1, 0]);
    assert_eq!(sim.change_state(0), RunState::BackoutOk);
}

#[test]
fn backout_all_alerts_for_a_host_it_cannot_back_out() {
    let mut c = change("c", 2);
    c.on_failure = OnFailure::BackoutAll;
    each_host(&mut c, |h| {
        h.backout = vec![backout(Some("failure.reason == \"nonzero_exit\""), 0, 1, 0)]
    });
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(at(0, 1, Apply, 0), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(sim.host_states(0), [Success, BackoutOk]);
    let alerts = sim.alerts(AlertKind::FailedNoBackout);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].1.as_deref(), Some("h0"));
    assert_eq!(sim.change_state(0), RunState::BackoutFailed);
    assert_eq!(sim.engine.state(), RunState::BackoutFailed);
}

#[test]
fn backout_all_with_nothing_applied_is_backout_ok_without_steps() {
    let sim = sim_with(
        rich(3, OnFailure::BackoutAll),
        0,
        &[(Check, 0, Outcome::Fail(1))],
    );
    assert_eq!(sim.host_states(0), [Failed, Cancelled, Cancelled]);
    assert!(sim.dispatches().iter().all(|id| !id.phase.is_backout()));
    assert_eq!(sim.change_state(0), RunState::BackoutOk);
}

#[test]
fn backout_all_sees_success_hosts_as_cancelled_at_their_last_step() {
    let sim = sim_with(
        rich(2, OnFailure::BackoutAll),
        1,
        &[(Apply, 0, Outcome::Fail(1))],
    );
    let failure = sim.failure(0, 0).unwrap();
    assert_eq!(failure.reason, crate::rollout::FailureReason::Cancelled);
    assert_eq!((failure.phase, failure.step), (Verify, 0));
    assert!(
        failure.message.contains("backout_all"),
        "{}",
        failure.message
    );
}
