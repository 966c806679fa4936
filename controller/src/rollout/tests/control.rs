//! Operator control and the driver's edge cases: abort (with and without
//! backout) while steps are in flight, pause/resume, rolling batches with
//! `pause` and `max_parallel`, duplicate and unknown results.

use std::collections::BTreeSet;

use super::sim::*;
use crate::rollout::{
    Action, AlertKind, DispatchId, Event, FailureReason, HostState, Phase, Progress, RunState,
    StepResult,
};
use crate::spec::{Amount, ChangeSpec, Retry, RolloutMode};

use HostState::*;

fn abort(backout: bool) -> Event {
    Event::Abort {
        by: "carol".into(),
        backout,
    }
}

fn pause() -> Event {
    Event::Pause { by: "dan".into() }
}

fn resume() -> Event {
    Event::Resume { by: "dan".into() }
}

/// Four parallel hosts (at most three at once), whose second apply step
/// hangs until cancelled.
fn hanging() -> Sim {
    let mut c = change("slow", 4);
    c.rollout.mode = RolloutMode::Parallel;
    c.rollout.max_parallel = Some(3);
    each_host(&mut c, |h| h.apply = vec![run("a0"), run("sleep 1000")]);
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(
        Rule {
            phase: Some(Phase::Apply),
            step: Some(1),
            ..Rule::default()
        },
        Outcome::Hang,
    );
    sim.start();
    sim.run_until(1_500);
    sim
}

fn cancels(actions: &[Action]) -> Vec<DispatchId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Cancel { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

/// The most hosts of change `c` that were unfinished at the same time.
fn max_concurrent(sim: &Sim, c: usize) -> usize {
    let mut busy = BTreeSet::new();
    let mut max = 0;
    for (_, p) in sim.progress() {
        if let Progress::Host {
            change,
            host,
            state,
            ..
        } = p
        {
            if change != c {
                continue;
            }
            if state.is_final() {
                busy.remove(&host);
            } else {
                busy.insert(host);
            }
            max = max.max(busy.len());
        }
    }
    max
}

#[test]
fn abort_cancels_steps_in_flight_and_backs_out_where_applied() {
    let mut sim = hanging();
    assert_eq!(sim.in_flight(), 3);
    let actions = sim.feed(abort(true));
    let cancelled = cancels(&actions);
    assert_eq!(cancelled.len(), 3);
    assert!(
        cancelled
            .iter()
            .all(|id| id.phase == Phase::Apply && id.step == 1)
    );
    assert!(actions.iter().any(|a| matches!(
        a,
        Action::Alert {
            kind: AlertKind::BailedOut,
            ..
        }
    )));
    sim.run_to_end();
    assert_eq!(
        sim.host_states(0),
        [BackoutOk, BackoutOk, BackoutOk, Cancelled]
    );
    assert_eq!(
        sim.backout_order(0),
        [2, 1, 0],
        "reverse completion, one at a time"
    );
    assert_eq!(sim.failure(0, 0).unwrap().reason, FailureReason::Cancelled);
    assert!(sim.steps_of(0, 3).is_empty(), "nothing new started");
    assert_eq!(sim.change_state(0), RunState::BailedOut);
    assert_eq!(sim.engine.state(), RunState::BailedOut);
}

#[test]
fn a_result_for_a_step_decided_by_an_abort_changes_nothing() {
    let mut sim = hanging();
    let actions = sim.feed(abort(true));
    let cancelled = cancels(&actions);
    sim.run_to_end();
    let decided = sim.engine.status();
    // The cancelled step's process says it finished after all.
    let late = Event::StepFinished {
        id: cancelled[0],
        result: StepResult {
            termination: Some(crate::rollout::Termination::Exited),
            exit_code: Some(0),
            ..StepResult::default()
        },
    };
    assert!(sim.feed(late).is_empty(), "no action");
    assert_eq!(sim.engine.status(), decided, "no state changes");
    assert_eq!(sim.engine.state(), RunState::BailedOut);
}

#[test]
fn abort_without_backout_leaves_hosts_as_they_are() {
    let mut sim = hanging();
    let actions = sim.feed(abort(false));
    assert_eq!(cancels(&actions).len(), 3);
    sim.run_to_end();
    assert_eq!(sim.host_states(0), [Cancelled; 4]);
    assert!(sim.dispatches().iter().all(|id| !id.phase.is_backout()));
    assert!(sim.alerts(AlertKind::FailedNoBackout).is_empty());
    assert_eq!(sim.engine.state(), RunState::BailedOut);
}

#[test]
fn a_second_abort_is_ignored_unless_it_stops_the_backouts() {
    let mut sim = hanging();
    sim.script(
        Rule {
            phase: Some(Phase::Backout),
            ..Rule::default()
        },
        Outcome::Hang,
    );
    sim.feed(abort(true));
    assert!(sim.feed(abort(true)).is_empty());
    sim.run();
    assert_eq!(sim.host_state(0, 2), BackingOut);
    let actions = sim.feed(abort(false));
    let cancelled = cancels(&actions);
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].phase, Phase::Backout);
    sim.run_to_end();
    assert_eq!(
        sim.host_states(0),
        [Cancelled, Cancelled, BackoutFailed, Cancelled]
    );
    assert_eq!(sim.alerts(AlertKind::BackoutFailed).len(), 1);
    assert_eq!(sim.alerts(AlertKind::BailedOut).len(), 1);
}

#[test]
fn abort_lets_a_running_backout_finish() {
    let mut c = change("c", 2);
    c.hosts[0].backout = vec![backout(None, 0, 2, 0)];
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(at(0, 0, Phase::Apply, 0), Outcome::Fail(1));
    sim.start();
    sim.run_until(1_500);
    assert_eq!(sim.host_state(0, 0), BackingOut);
    let actions = sim.feed(abort(true));
    assert!(
        cancels(&actions).is_empty(),
        "backout steps are not cancelled"
    );
    sim.run_to_end();
    assert_eq!(sim.host_states(0), [BackoutOk, Cancelled]);
    assert_eq!(sim.dispatched_steps(0, 0, Phase::Backout).len(), 2);
}

#[test]
fn pause_stops_at_the_next_step_boundary_until_resume() {
    let mut c = change("c", 2);
    each_host(&mut c, |h| h.apply = vec![run("a0"), run("a1")]);
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.start();
    sim.now = 500;
    let actions = sim.feed(pause());
    assert!(actions.contains(&Action::Progress(Progress::Run {
        state: RunState::Paused
    })));
    assert_eq!(sim.change_state(0), RunState::Paused);
    assert!(sim.feed(pause()).is_empty(), "already paused");
    sim.run();
    assert_eq!(sim.now, 1_000, "the step in flight finished");
    assert_eq!(sim.dispatches().len(), 1, "not even the host's next step");
    assert_eq!(sim.host_state(0, 0), Running);
    assert_eq!(sim.engine.next_deadline(), None);
    sim.now = 60_000;
    let actions = sim.feed(resume());
    assert!(matches!(actions[0], Action::Dispatch { .. }));
    assert!(sim.feed(resume()).is_empty(), "not paused");
    sim.run_to_end();
    assert_eq!(sim.engine.state(), RunState::Success);
}

#[test]
fn timers_that_fire_while_paused_wait_for_resume() {
    let mut c = change("c", 1);
    c.retry = Retry {
        max_retries: 1,
        delay: secs(5),
    };
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(at(0, 0, Phase::Apply, 0).attempt_only(0), Outcome::Fail(1));
    sim.start();
    sim.run_until(STEP_MS);
    assert_eq!(sim.host_state(0, 0), RetryPending);
    sim.feed(pause());
    sim.run();
    assert_eq!(sim.now, STEP_MS + 5_000, "the retry timer fired");
    assert_eq!(sim.host_state(0, 0), RetryPending, "but nothing started");
    assert_eq!(sim.engine.next_deadline(), None);
    sim.now = 100_000;
    sim.feed(resume());
    sim.run_to_end();
    assert_eq!(sim.host_state(0, 0), Success);
    // A batch pause that ends while paused waits too.
    let mut c = change("c", 2);
    c.rollout.pause = Some(secs(10));
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.start();
    sim.run_until(STEP_MS);
    sim.feed(pause());
    sim.run();
    assert_eq!(sim.steps_of(0, 1).len(), 0);
    sim.feed(resume());
    sim.run_to_end();
    assert_eq!(sim.host_states(0), [Success, Success]);
}

#[test]
fn abort_while_paused_ends_the_pause_and_backs_out() {
    let mut c = change("c", 2);
    each_host(&mut c, |h| h.apply = vec![run("a0"), run("a1")]);
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.start();
    sim.feed(pause());
    sim.run();
    sim.feed(abort(true));
    sim.run_to_end();
    assert_eq!(sim.host_states(0), [BackoutOk, Cancelled]);
    assert!(sim.feed(pause()).is_empty(), "after the end");
}

#[test]
fn rolling_batches_respect_max_parallel_and_pause() {
    let mut c: ChangeSpec = change("roll", 7);
    c.rollout.mode = RolloutMode::Rolling;
    c.rollout.batches = vec![Amount::Count(2), Amount::Count(3)];
    c.rollout.max_parallel = Some(2);
    c.rollout.pause = Some(secs(10));
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.run_to_end();
    let batches: Vec<_> = sim
        .progress()
        .into_iter()
        .filter_map(|(t, p)| match p {
            Progress::Batch { batch, hosts, .. } => Some((t, batch, hosts)),
            _ => None,
        })
        .collect();
    assert_eq!(
        batches,
        [
            (0, 0, vec![0, 1]),
            (STEP_MS + 10_000, 1, vec![2, 3, 4]),
            (3 * STEP_MS + 20_000, 2, vec![5, 6]),
        ]
    );
    assert_eq!(max_concurrent(&sim, 0), 2);
    assert_eq!(sim.engine.state(), RunState::Success);
}

#[test]
fn duplicate_and_unknown_results_are_ignored() {
    let mut sim = Sim::new(run_spec(vec![change("c", 2)]));
    sim.start();
    sim.run_until(STEP_MS);
    let first = sim.dispatches()[0];
    let before = sim.engine.status();
    let again = Event::StepFinished {
        id: first,
        result: StepResult::default(),
    };
    assert!(sim.feed(again).is_empty(), "a re-reported result");
    let mut unknown = first;
    unknown.attempt = 9;
    let mut elsewhere = first;
    elsewhere.change = 5;
    for id in [unknown, elsewhere] {
        let event = Event::StepFinished {
            id,
            result: StepResult::default(),
        };
        assert!(sim.feed(event).is_empty());
    }
    assert_eq!(sim.engine.status(), before);
    sim.run_to_end();
    assert_eq!(sim.engine.state(), RunState::Success);
}

#[test]
fn nothing_happens_before_start_and_start_is_once() {
    let mut sim = Sim::new(run_spec(vec![change("c", 1)]));
    assert_eq!(sim.engine.state(), RunState::Pending);
    assert!(sim.feed(Event::Timer).is_empty());
    assert!(sim.feed(pause()).is_empty());
    assert!(sim.feed(abort(true)).is_empty());
    assert!(!sim.start().is_empty());
    assert!(sim.start().is_empty());
    sim.run_to_end();
    assert!(sim.feed(Event::Timer).is_empty());
}

#[test]
fn the_engine_is_send() {
    fn send<T: Send>() {}
    send::<crate::rollout::Engine>();
}

#[test]
fn pause_is_ignored_while_bailing_out() {
    let mut sim = hanging();
    sim.feed(abort(true));
    assert!(sim.feed(pause()).is_empty());
    sim.run_to_end();
    assert_eq!(sim.engine.state(), RunState::BailedOut);
}

#[test]
fn the_run_finished_alert_counts_changes_and_hosts() {
    let mut sim = Sim::new(run_spec(vec![change("a", 3), change("b", 1)]));
    sim.script(at(0, 1, Phase::Apply, 0), Outcome::Fail(1));
    sim.run_to_end();
    let finished = sim.alerts(AlertKind::RunFinished);
    assert_eq!(
        finished[0].2,
        "run test ended partial_failure: changes: 1 partial_failure, 1 success; \
         hosts: 1 backout_ok, 1 cancelled, 2 success"
    );
}

#[test]
fn a_batch_waits_for_its_hosts_backouts() {
    let mut c = change("c", 4);
    c.on_failure = crate::spec::OnFailure::Continue;
    c.rollout.mode = RolloutMode::Rolling;
    c.rollout.batches = vec![Amount::Count(2)];
    c.hosts[0].backout = vec![backout(None, 0, 3, 0)];
    let mut sim = Sim::new(run_spec(vec![c]));
    sim.script(at(0, 0, Phase::Apply, 0), Outcome::Fail(1));
    sim.run_to_end();
    let second = sim.progress().into_iter().find_map(|(t, p)| match p {
        Progress::Batch { batch: 1, .. } => Some(t),
        _ => None,
    });
    assert_eq!(second, Some(4 * STEP_MS), "after h0's three backout steps");
    assert_eq!(sim.host_states(0), [BackoutOk, Success, Success, Success]);
}
