//! `retry`: whole-sequence retries after a delay, `retry_pending`, and
//! backout only after the last attempt.

use super::sim::*;
use crate::rollout::{FailureReason, HostState, Phase, Progress, RunState};
use crate::spec::{ChangeSpec, OnFailure, Retry, RolloutMode, StepAction};

use Phase::*;

fn flaky(max_retries: i64) -> ChangeSpec {
    let mut c = change("flaky", 1);
    c.retry = Retry {
        max_retries,
        delay: secs(5),
    };
    each_host(&mut c, |h| {
        h.skip_if = vec![run("done")];
        h.check = vec![run("check")];
        h.apply = vec![file("/etc/f"), run("install")];
    });
    c
}

#[test]
fn a_flaky_step_passes_on_its_second_attempt() {
    let mut sim = Sim::new(run_spec(vec![flaky(3)]));
    sim.script(
        Rule {
            phase: Some(SkipIf),
            ..Rule::default()
        },
        Outcome::Fail(1),
    );
    sim.script(
        Rule {
            phase: Some(Apply),
            step: Some(1),
            attempt: Some(0),
            ..Rule::default()
        },
        Outcome::Fail(1),
    );
    sim.run_to_end();
    assert_eq!(
        sim.steps_of(0, 0),
        vec![
            (SkipIf, 0, 0),
            (Check, 0, 0),
            (Apply, 0, 0),
            (Apply, 1, 0),
            (SkipIf, 0, 1),
            (Check, 0, 1),
            (Apply, 0, 1),
            (Apply, 1, 1),
        ],
        "the whole sequence again, no backout between attempts"
    );
    assert_eq!(
        sim.history(0, 0),
        vec![
            HostState::Running,
            HostState::RetryPending,
            HostState::Running,
            HostState::Success
        ]
    );
    let status = sim.engine.status();
    assert_eq!(status.changes[0].hosts[0].attempt, 1);
    assert_eq!(
        status.changes[0].hosts[0].failure, None,
        "the failure is gone once it passed"
    );
    // The retry waited for the delay.
    let times: Vec<_> = sim
        .actions
        .iter()
        .filter_map(|(t, a)| match a {
            crate::rollout::Action::Dispatch { id, .. } if id.phase == SkipIf => Some(*t),
            _ => None,
        })
        .collect();
    assert_eq!(times[1] - times[0], 4 * STEP_MS + 5_000);
    assert_eq!(sim.engine.state(), RunState::Success);
}

#[test]
fn retries_run_out_then_the_host_is_backed_out_once_with_every_restore() {
    let mut sim = Sim::new(run_spec(vec![flaky(2)]));
    sim.script(
        Rule {
            phase: Some(SkipIf),
            ..Rule::default()
        },
        Outcome::Fail(1),
    );
    sim.script(at(0, 0, Apply, 1), Outcome::Fail(1));
    sim.run_to_end();
    let attempts: Vec<u32> = sim
        .steps_of(0, 0)
        .iter()
        .filter(|s| s.0 == Apply && s.1 == 1)
        .map(|s| s.2)
        .collect();
    assert_eq!(attempts, [0, 1, 2]);
    let restores: Vec<String> = sim
        .dispatched_steps(0, 0, Restore)
        .into_iter()
        .map(|s| match s.action {
            StepAction::Restore { of, .. } => of,
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        restores,
        ["c0.h0.apply.0.a2", "c0.h0.apply.0.a1", "c0.h0.apply.0.a0"]
    );
    assert_eq!(
        sim.steps_of(0, 0).iter().filter(|s| s.0 == Backout).count(),
        1
    );
    assert_eq!(sim.host_state(0, 0), HostState::BackoutOk);
}

#[test]
fn retry_forever_goes_on_until_it_passes() {
    let mut sim = Sim::new(run_spec(vec![flaky(-1)]));
    sim.script(
        Rule {
            phase: Some(SkipIf),
            ..Rule::default()
        },
        Outcome::Fail(1),
    );
    for attempt in 0..7 {
        sim.script(
            Rule {
                phase: Some(Check),
                attempt: Some(attempt),
                ..Rule::default()
            },
            Outcome::Fail(1),
        );
    }
    sim.run_to_end();
    assert_eq!(sim.host_state(0, 0), HostState::Success);
    assert_eq!(sim.engine.status().changes[0].hosts[0].attempt, 7);
    let retry_pending = sim
        .history(0, 0)
        .iter()
        .filter(|s| **s == HostState::RetryPending)
        .count();
    assert_eq!(retry_pending, 7);
}

#[test]
fn a_failed_check_is_retried_and_then_fails_without_backout() {
    let mut sim = Sim::new(run_spec(vec![flaky(1)]));
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
    assert_eq!(
        sim.steps_of(0, 0).iter().filter(|s| s.0 == Check).count(),
        2
    );
    assert_eq!(sim.host_state(0, 0), HostState::Failed);
    assert!(sim.steps_of(0, 0).iter().all(|s| !s.0.is_backout()));
}

#[test]
fn retry_pending_is_visible_and_counts_against_max_parallel() {
    let mut c = flaky(1);
    c.hosts.push(c.hosts[0].clone());
    c.hosts[1].host.name = "h1".into();
    c.rollout.mode = RolloutMode::Parallel;
    c.rollout.max_parallel = Some(1);
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(
        Rule {
            phase: Some(SkipIf),
            ..Rule::default()
        },
        Outcome::Fail(1),
    );
    sim.script(at(0, 0, Check, 0).attempt_only(0), Outcome::Fail(1));
    sim.start();
    sim.run_until(2 * STEP_MS);
    assert_eq!(sim.host_state(0, 0), HostState::RetryPending);
    assert_eq!(
        sim.host_state(0, 1),
        HostState::Pending,
        "the retrying host holds the slot"
    );
    sim.run_to_end();
    assert_eq!(sim.host_states(0), [HostState::Success, HostState::Success]);
}

#[test]
fn a_halted_change_lets_hosts_in_flight_finish_with_their_retries() {
    // halt: the failed host's neighbours in flight still finish, with retries.
    let mut c = flaky(1);
    c.rollout.mode = RolloutMode::Parallel;
    c.on_failure = OnFailure::Halt;
    c.hosts.push(c.hosts[0].clone());
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(
        Rule {
            phase: Some(SkipIf),
            ..Rule::default()
        },
        Outcome::Fail(1),
    );
    sim.script(at(0, 0, Check, 0), Outcome::Fail(1));
    sim.script(at(0, 1, Apply, 1).attempt_only(0), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(sim.host_states(0), [HostState::Failed, HostState::Success]);
    assert_eq!(
        sim.failure(0, 0).unwrap().reason,
        FailureReason::NonzeroExit
    );
    assert!(sim.progress().iter().any(|(_, p)| matches!(
        p,
        Progress::Host {
            host: 1,
            attempt: 1,
            ..
        }
    )));
}

impl Rule {
    /// This rule, for one attempt only.
    pub fn attempt_only(mut self, attempt: u32) -> Rule {
        self.attempt = Some(attempt);
        self
    }
}
