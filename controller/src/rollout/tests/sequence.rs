//! One host's sequence: skip_if, check, apply, verify, judging, backout
//! selection and the backout itself, with a failure at every position.

use super::sim::*;
use crate::rollout::{AlertKind, FailureReason, HostState, Phase, RunState};
use crate::spec::StepAction;

use Phase::*;

fn full_change() -> crate::spec::ChangeSpec {
    let mut c = change("web", 1);
    each_host(&mut c, |h| {
        h.skip_if = vec![];
        h.check = vec![run("check 0")];
        h.apply = vec![file("/etc/a"), run("apply 1"), run("apply 2")];
        h.verify = vec![run("verify 0")];
        h.backout = vec![backout(None, 1, 1, 1)];
    });
    c
}

#[test]
fn a_host_runs_check_apply_verify_in_order() {
    let mut sim = Sim::new(run_spec(vec![full_change()]));
    sim.run_to_end();
    assert_eq!(
        sim.steps_of(0, 0),
        vec![
            (Check, 0, 0),
            (Apply, 0, 0),
            (Apply, 1, 0),
            (Apply, 2, 0),
            (Verify, 0, 0)
        ]
    );
    assert_eq!(
        sim.history(0, 0),
        vec![HostState::Running, HostState::Success]
    );
    assert_eq!(sim.change_state(0), RunState::Success);
    assert_eq!(sim.engine.state(), RunState::Success);
    let status = sim.engine.status();
    assert_eq!(status.changes[0].hosts[0].steps.len(), 5);
    assert!(
        status.changes[0].hosts[0]
            .steps
            .iter()
            .all(|s| s.passed == Some(true))
    );
}

#[test]
fn skip_if_all_pass_skips_the_host() {
    let mut c = full_change();
    each_host(&mut c, |h| h.skip_if = vec![run("done 0"), run("done 1")]);
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.run_to_end();
    assert_eq!(sim.steps_of(0, 0), vec![(SkipIf, 0, 0), (SkipIf, 1, 0)]);
    assert_eq!(sim.host_state(0, 0), HostState::Skipped);
    assert_eq!(sim.engine.state(), RunState::Success);
}

#[test]
fn a_failing_skip_if_goes_on_with_the_change() {
    let mut c = full_change();
    each_host(&mut c, |h| h.skip_if = vec![run("done 0"), run("done 1")]);
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(at(0, 0, SkipIf, 0), Outcome::Fail(1));
    sim.run_to_end();
    let steps = sim.steps_of(0, 0);
    assert_eq!(steps[..2], [(SkipIf, 0, 0), (Check, 0, 0)]);
    assert_eq!(steps.len(), 6);
    assert_eq!(sim.host_state(0, 0), HostState::Success);
}

#[test]
fn an_empty_skip_if_never_skips() {
    let mut sim = Sim::new(run_spec(vec![change("c", 1)]));
    sim.run_to_end();
    assert_eq!(sim.steps_of(0, 0), vec![(Apply, 0, 0)]);
    assert_eq!(sim.host_state(0, 0), HostState::Success);
}

#[test]
fn a_skip_if_that_times_out_fails_the_host_without_backout() {
    let mut c = full_change();
    each_host(&mut c, |h| h.skip_if = vec![run("done 0")]);
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(at(0, 0, SkipIf, 0), Outcome::Timeout);
    sim.run_to_end();
    assert_eq!(sim.steps_of(0, 0), vec![(SkipIf, 0, 0)]);
    assert_eq!(sim.host_state(0, 0), HostState::Failed);
    assert_eq!(sim.failure(0, 0).unwrap().reason, FailureReason::Timeout);
    assert!(sim.alerts(AlertKind::FailedNoBackout).is_empty());
}

#[test]
fn a_failed_check_fails_the_host_with_no_backout_and_no_alert() {
    let mut sim = Sim::new(run_spec(vec![full_change()]));
    sim.script(at(0, 0, Check, 0), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(sim.steps_of(0, 0), vec![(Check, 0, 0)]);
    assert_eq!(sim.host_state(0, 0), HostState::Failed);
    let failure = sim.failure(0, 0).unwrap();
    assert_eq!((failure.phase, failure.step), (Check, 0));
    assert_eq!(failure.reason, FailureReason::NonzeroExit);
    assert_eq!(failure.exit_code, Some(1));
    assert!(sim.alerts(AlertKind::FailedNoBackout).is_empty());
    assert_eq!(sim.change_state(0), RunState::TotalFailure);
    assert_eq!(sim.engine.state(), RunState::TotalFailure);
}

#[test]
fn a_failed_apply_step_runs_the_whole_backout_with_restores() {
    for k in 0..3 {
        let mut sim = Sim::new(run_spec(vec![full_change()]));
        sim.script(at(0, 0, Apply, k), Outcome::Fail(2));
        sim.run_to_end();
        let mut want: Vec<_> = (0..=k).map(|s| (Apply, s, 0)).collect();
        want.insert(0, (Check, 0, 0));
        want.extend([
            (BackoutCheck, 0, 0),
            (Restore, 0, 0),
            (Backout, 0, 0),
            (BackoutVerify, 0, 0),
        ]);
        assert_eq!(sim.steps_of(0, 0), want, "apply step {k} fails");
        let restore = &sim.dispatched_steps(0, 0, Restore)[0];
        match &restore.action {
            StepAction::Restore { of, path } => {
                assert_eq!(of, "c0.h0.apply.0.a0");
                assert_eq!(path, "/etc/a");
            }
            other => panic!("not a restore: {other:?}"),
        }
        assert_eq!(
            sim.history(0, 0),
            vec![
                HostState::Running,
                HostState::BackingOut,
                HostState::BackoutOk
            ]
        );
        let failure = sim.failure(0, 0).unwrap();
        assert_eq!((failure.phase, failure.step), (Apply, k));
        assert_eq!(sim.change_state(0), RunState::TotalFailure);
    }
}

#[test]
fn a_file_step_that_fails_is_restored_too() {
    let mut sim = Sim::new(run_spec(vec![full_change()]));
    sim.script(at(0, 0, Apply, 0), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(sim.dispatched_steps(0, 0, Restore).len(), 1);
    assert_eq!(sim.host_state(0, 0), HostState::BackoutOk);
}

#[test]
fn backout_selection_follows_when() {
    let mut c = full_change();
    each_host(&mut c, |h| {
        h.backout = vec![
            backout(Some("failure.phase == \"verify\""), 0, 2, 0),
            backout(Some("error"), 0, 3, 0),
            backout(None, 0, 1, 0),
        ]
    });
    // verify fails: the first procedure (two steps).
    let mut sim = Sim::new(run_spec(vec![c.clone()]));
    sim.script(at(0, 0, Verify, 0), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(sim.dispatched_steps(0, 0, Backout).len(), 2);
    // apply fails: `error` counts as no match; the fallback (one step).
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(at(0, 0, Apply, 1), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(sim.dispatched_steps(0, 0, Backout).len(), 1);
    assert_eq!(sim.host_state(0, 0), HostState::BackoutOk);
}

#[test]
fn a_failed_backout_check_means_the_backout_is_not_attempted() {
    let mut sim = Sim::new(run_spec(vec![full_change()]));
    sim.script(at(0, 0, Verify, 0), Outcome::Fail(1));
    sim.script(at(0, 0, BackoutCheck, 0), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(sim.steps_of(0, 0).last(), Some(&(BackoutCheck, 0, 0)));
    assert_eq!(sim.host_state(0, 0), HostState::BackoutFailed);
    assert_eq!(sim.alerts(AlertKind::BackoutFailed).len(), 1);
}

#[test]
fn a_failure_at_each_backout_position_is_backout_failed() {
    for phase in [Restore, Backout, BackoutVerify] {
        let mut sim = Sim::new(run_spec(vec![full_change()]));
        sim.script(at(0, 0, Verify, 0), Outcome::Fail(1));
        sim.script(at(0, 0, phase, 0), Outcome::Fail(1));
        sim.run_to_end();
        assert_eq!(sim.steps_of(0, 0).last(), Some(&(phase, 0, 0)), "{phase}");
        assert_eq!(sim.host_state(0, 0), HostState::BackoutFailed);
        let alerts = sim.alerts(AlertKind::BackoutFailed);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].1.as_deref(), Some("h0"));
    }
}

#[test]
fn no_matching_procedure_leaves_the_host_and_alerts() {
    let mut c = full_change();
    each_host(&mut c, |h| {
        h.backout = vec![backout(Some("failure.phase == \"check\""), 0, 1, 0)]
    });
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(at(0, 0, Apply, 1), Outcome::Fail(1));
    sim.run_to_end();
    assert!(sim.dispatched_steps(0, 0, Restore).is_empty());
    assert_eq!(sim.host_state(0, 0), HostState::Failed);
    let alerts = sim.alerts(AlertKind::FailedNoBackout);
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].0.as_deref(), Some("web"));
}

#[test]
fn only_file_steps_applied_and_no_procedure_runs_the_restores() {
    let mut c = change("files", 1);
    each_host(&mut c, |h| {
        h.apply = vec![file("/a"), file("/b"), run("after")];
        h.backout = vec![];
    });
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(at(0, 0, Apply, 1), Outcome::Fail(1));
    sim.run_to_end();
    let of: Vec<String> = sim
        .dispatched_steps(0, 0, Restore)
        .into_iter()
        .map(|s| match s.action {
            StepAction::Restore { of, .. } => of,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(of, ["c0.h0.apply.1.a0", "c0.h0.apply.0.a0"], "newest first");
    assert_eq!(sim.host_state(0, 0), HostState::BackoutOk);
    assert!(sim.alerts(AlertKind::FailedNoBackout).is_empty());
}

#[test]
fn a_lost_step_is_a_failure_with_reason_lost() {
    let mut c = full_change();
    each_host(&mut c, |h| {
        h.backout = vec![backout(Some("failure.reason == \"lost\""), 0, 2, 0)]
    });
    let mut sim = Sim::new(run_spec(vec![c.clone()]));
    sim.script(at(0, 0, Apply, 2), Outcome::Lost);
    sim.run_to_end();
    assert_eq!(sim.dispatched_steps(0, 0, Backout).len(), 2);
    assert_eq!(sim.host_state(0, 0), HostState::BackoutOk);
    // No procedure for a lost verify... the host ends `lost`, with an alert.
    each_host(&mut c, |h| {
        h.backout = vec![backout(Some("false"), 0, 1, 0)]
    });
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(at(0, 0, Verify, 0), Outcome::Lost);
    sim.run_to_end();
    assert_eq!(sim.host_state(0, 0), HostState::Lost);
    assert_eq!(sim.alerts(AlertKind::FailedNoBackout).len(), 1);
    assert_eq!(sim.change_state(0), RunState::TotalFailure);
}

#[test]
fn an_unreachable_host_fails_at_once_and_nothing_is_backed_out() {
    let mut c = full_change();
    c.hosts.push(host("h1"));
    c.on_failure = crate::spec::OnFailure::Continue;
    c.retry.max_retries = 3;
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(
        Rule {
            host: Some(0),
            ..Rule::default()
        },
        Outcome::Unreachable,
    );
    sim.run_to_end();
    assert_eq!(
        sim.steps_of(0, 0),
        vec![(Check, 0, 0)],
        "not retried, not backed out"
    );
    assert_eq!(sim.host_state(0, 0), HostState::Failed);
    assert_eq!(
        sim.failure(0, 0).unwrap().reason,
        FailureReason::Unreachable
    );
    assert_eq!(sim.host_state(0, 1), HostState::Success, "the run went on");
    assert_eq!(sim.change_state(0), RunState::PartialFailure);
    assert_eq!(sim.engine.state(), RunState::PartialFailure);
}

#[test]
fn unreachable_after_apply_started_still_backs_out() {
    let mut sim = Sim::new(run_spec(vec![full_change()]));
    sim.script(at(0, 0, Apply, 1), Outcome::Unreachable);
    sim.script(
        Rule {
            phase: Some(BackoutCheck),
            ..Rule::default()
        },
        Outcome::Unreachable,
    );
    sim.run_to_end();
    assert_eq!(sim.steps_of(0, 0).last(), Some(&(BackoutCheck, 0, 0)));
    assert_eq!(sim.host_state(0, 0), HostState::BackoutFailed);
}

#[test]
fn results_are_judged_by_termination_then_expect() {
    let cases = [
        (Outcome::Timeout, None, Some(FailureReason::Timeout)),
        (Outcome::FailToStart, None, Some(FailureReason::NonzeroExit)),
        (Outcome::Fail(3), None, Some(FailureReason::NonzeroExit)),
        (Outcome::Fail(3), Some("exit_code == 3"), None),
        (
            Outcome::Pass,
            Some("exit_code == 3"),
            Some(FailureReason::ConditionFailed),
        ),
        (
            Outcome::Out(0, "ok\n"),
            Some("stdout.trim() == \"ok\""),
            None,
        ),
        (
            Outcome::Pass,
            Some("error"),
            Some(FailureReason::ConditionFailed),
        ),
    ];
    for (outcome, expect, want) in cases {
        let mut c = change("c", 1);
        if let Some(expr) = expect {
            each_host(&mut c, |h| h.apply = vec![expecting(run("x"), expr)]);
        }
        let mut sim = Sim::new(run_spec(vec![c]));
        sim.script(at(0, 0, Apply, 0), outcome);
        sim.run_to_end();
        let status = sim.engine.status();
        let step = &status.changes[0].hosts[0].steps[0];
        assert_eq!(step.reason, want, "{outcome:?} with {expect:?}");
        assert_eq!(step.passed, Some(want.is_none()));
        if let Some(want) = want {
            let failure = sim.failure(0, 0).unwrap();
            assert_eq!(failure.reason, want);
            assert!(
                failure.message.starts_with("apply[0]: ") && !failure.message.contains("c0.h0"),
                "names the step for people, not the dispatch id: {}",
                failure.message
            );
        }
    }
}

#[test]
fn a_host_with_no_steps_succeeds_at_once_and_an_empty_change_succeeds() {
    let mut c = change("empty-host", 1);
    each_host(&mut c, |h| h.apply.clear());
    let mut sim = Sim::new(run_spec(vec![c, change("no-hosts", 0)]));
    sim.run_to_end();
    assert!(sim.dispatches().is_empty());
    assert_eq!(sim.host_state(0, 0), HostState::Success);
    assert_eq!(sim.change_state(1), RunState::Success);
    assert_eq!(sim.engine.state(), RunState::Success);
}
