//! Property tests over random fleets, changes (a random DAG), rollout
//! plans, failure patterns, approvals, pauses and aborts.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::sim::*;
use crate::rollout::{Action, Event, HostState, Phase, Progress, RunState};
use crate::spec::{
    Amount, Approve, ApproveAt, ChangeSpec, ChangesetFailure, HostPlan, OnFailure, Retry, Rollout,
    RolloutMode, RunSpec,
};

#[derive(Clone, Debug)]
struct Plan {
    /// Fleet indices of its hosts, in order.
    hosts: Vec<usize>,
    /// Bit j: requires change j (j < own index).
    requires: u8,
    rollout: Rollout,
    on_failure: OnFailure,
    retries: i64,
    approve: ApproveAt,
    /// (skip_if, check, apply steps (true = file), verify)
    steps: (bool, bool, Vec<bool>, bool),
    /// `when`s of procedures before the catch-all, and the catch-all's
    /// (check, steps, verify) counts.
    backout: (Vec<&'static str>, (usize, usize, usize)),
}

#[derive(Clone, Copy, Debug)]
enum Control {
    Abort(bool),
    /// Pause, resume this many events later.
    Pause(usize),
}

/// A scripted outcome: (change, host, phase, step, attempt, outcome).
type Failing = (usize, Option<usize>, Phase, usize, Option<u32>, Outcome);

#[derive(Clone, Debug)]
struct Scenario {
    changes: Vec<Plan>,
    changeset: ChangesetFailure,
    /// (change, host, phase, step, attempt, outcome)
    failures: Vec<Failing>,
    /// (event number, control)
    controls: Vec<(usize, Control)>,
    /// Deny the n-th gate (approve the others).
    deny_gate: Option<usize>,
    /// Host indices (within each change) whose skip_if passes.
    skipped: Vec<usize>,
}

fn amount() -> impl Strategy<Value = Amount> {
    prop_oneof![
        (0u32..4).prop_map(Amount::Count),
        (0u32..=100).prop_map(Amount::Percent)
    ]
}

fn plan(fleet: usize) -> impl Strategy<Value = Plan> {
    let rollout = (
        prop_oneof![
            Just(RolloutMode::Serial),
            Just(RolloutMode::Parallel),
            Just(RolloutMode::Rolling)
        ],
        proptest::collection::vec(amount(), 0..3),
        proptest::option::of(1u32..5),
        proptest::option::of(amount()),
        proptest::option::of(0u64..3),
    )
        .prop_map(
            |(mode, batches, max_parallel, max_failures, pause)| Rollout {
                mode,
                max_parallel,
                batches,
                max_failures,
                pause: pause.map(secs),
            },
        );
    let steps = (
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec(any::<bool>(), 1..4),
        any::<bool>(),
    );
    let whens = proptest::collection::vec(
        prop_oneof![
            Just("failure.phase == \"verify\""),
            Just("failure.reason == \"lost\""),
            Just("false"),
            Just("error"),
        ],
        0..2,
    );
    (
        proptest::sample::subsequence((0..fleet).collect::<Vec<_>>(), 1..=fleet),
        any::<u8>(),
        rollout,
        prop_oneof![
            Just(OnFailure::Halt),
            Just(OnFailure::Continue),
            Just(OnFailure::BackoutAll)
        ],
        prop_oneof![3 => Just(0i64), 2 => Just(1), 1 => Just(2)],
        prop_oneof![
            6 => Just(ApproveAt::None),
            1 => Just(ApproveAt::Once),
            1 => Just(ApproveAt::EachBatch),
            1 => Just(ApproveAt::EachHost),
        ],
        steps,
        (whens, (0usize..2, 0usize..2, 0usize..2)),
    )
        .prop_map(
            |(hosts, requires, rollout, on_failure, retries, approve, steps, backout)| Plan {
                hosts,
                requires,
                rollout,
                on_failure,
                retries,
                approve,
                steps,
                backout,
            },
        )
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        1 => Just(Outcome::Pass),
        4 => Just(Outcome::Fail(1)),
        1 => Just(Outcome::Timeout),
        1 => Just(Outcome::Lost),
        1 => Just(Outcome::Unreachable),
        1 => Just(Outcome::FailToStart),
    ]
}

fn phase() -> impl Strategy<Value = Phase> {
    prop_oneof![
        1 => Just(Phase::SkipIf),
        2 => Just(Phase::Check),
        4 => Just(Phase::Apply),
        2 => Just(Phase::Verify),
        1 => Just(Phase::BackoutCheck),
        1 => Just(Phase::Restore),
        1 => Just(Phase::Backout),
        1 => Just(Phase::BackoutVerify),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..20)
        .prop_flat_map(|fleet| {
            let failure = (
                0usize..4,
                proptest::option::of(0..fleet),
                phase(),
                0usize..3,
                proptest::option::of(0u32..2),
                outcome(),
            );
            let control = prop_oneof![
                any::<bool>().prop_map(Control::Abort),
                (1usize..30).prop_map(Control::Pause),
            ];
            (
                proptest::collection::vec(plan(fleet), 1..=4),
                prop_oneof![
                    Just(ChangesetFailure::Halt),
                    Just(ChangesetFailure::BackoutAll)
                ],
                proptest::collection::vec(failure, 0..12),
                proptest::collection::vec((0usize..120, control), 0..2),
                proptest::option::weighted(0.2, 0usize..4),
                proptest::collection::vec(0..fleet, 0..3),
            )
        })
        .prop_map(
            |(changes, changeset, failures, controls, deny_gate, skipped)| Scenario {
                changes,
                changeset,
                failures,
                controls,
                deny_gate,
                skipped,
            },
        )
}

fn build(s: &Scenario) -> RunSpec {
    let changes = s
        .changes
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (skip_if, check, apply, verify) = &p.steps;
            let (whens, (bc, bs, bv)) = &p.backout;
            let mut backouts: Vec<_> = whens.iter().map(|w| backout(Some(w), 1, 1, 0)).collect();
            backouts.push(backout(None, *bc, *bs, *bv));
            let hosts = p
                .hosts
                .iter()
                .map(|&f| HostPlan {
                    skip_if: if *skip_if { vec![run("done")] } else { vec![] },
                    check: if *check { vec![run("check")] } else { vec![] },
                    apply: apply
                        .iter()
                        .enumerate()
                        .map(|(k, &is_file)| {
                            if is_file {
                                file(&format!("/f{k}"))
                            } else {
                                run("x")
                            }
                        })
                        .collect(),
                    verify: if *verify { vec![run("verify")] } else { vec![] },
                    backout: backouts.clone(),
                    ..host(&format!("h{f}"))
                })
                .collect();
            ChangeSpec {
                requires: (0..i).filter(|j| p.requires & (1 << j) != 0).collect(),
                rollout: p.rollout.clone(),
                on_failure: p.on_failure,
                retry: Retry {
                    max_retries: p.retries,
                    delay: secs(2),
                },
                approve: Approve {
                    at: p.approve,
                    timeout: None,
                },
                hosts,
                ..change(&format!("c{i}"), 0)
            }
        })
        .collect();
    let mut spec = run_spec(changes);
    spec.on_failure = s.changeset;
    spec
}

/// Runs a scenario; returns the simulation and whether an abort without
/// backout reached the engine before the end.
fn drive(s: &Scenario) -> (Sim, bool) {
    let mut sim = Sim::new(build(s));
    // Skip_if says "not done" unless scripted otherwise.
    for &(change, host, phase, step, attempt, outcome) in &s.failures {
        let rule = Rule {
            change: Some(change),
            host,
            phase: Some(phase),
            step: Some(step),
            attempt,
        };
        sim.script(rule, outcome);
    }
    for &h in &s.skipped {
        sim.script(
            Rule {
                host: Some(h),
                phase: Some(Phase::SkipIf),
                ..Rule::default()
            },
            Outcome::Pass,
        );
    }
    sim.script(
        Rule {
            phase: Some(Phase::SkipIf),
            ..Rule::default()
        },
        Outcome::Fail(1),
    );
    sim.start();
    let mut no_backout = false;
    let mut resume_at = None;
    let mut gates = 0;
    for n in 0.. {
        for &(at, control) in &s.controls {
            if at != n || sim.engine.is_finished() {
                continue;
            }
            match control {
                Control::Abort(backout) => {
                    no_backout |= !backout;
                    sim.feed(Event::Abort {
                        by: "prop".into(),
                        backout,
                    });
                }
                Control::Pause(k) => {
                    sim.feed(Event::Pause { by: "prop".into() });
                    resume_at = Some(n + k);
                }
            }
        }
        if resume_at == Some(n) {
            sim.feed(Event::Resume { by: "prop".into() });
        }
        if sim.engine.state() == RunState::AwaitingApproval {
            let by = "prop".to_string();
            if s.deny_gate == Some(gates) {
                sim.feed(Event::Deny { by, backout: true });
            } else {
                sim.feed(Event::Approve { by });
            }
            gates += 1;
        } else if !sim.step() {
            if sim.engine.state() == RunState::Paused {
                sim.feed(Event::Resume { by: "prop".into() });
                resume_at = None;
            } else {
                break;
            }
        }
    }
    (sim, no_backout)
}

/// The first final state each change reached.
fn first_final(sim: &Sim) -> BTreeMap<usize, (usize, RunState)> {
    let mut out = BTreeMap::new();
    for (i, (_, a)) in sim.actions.iter().enumerate() {
        if let Action::Progress(Progress::Change { change, state }) = a
            && state.is_final()
        {
            out.entry(*change).or_insert((i, *state));
        }
    }
    out
}

fn is_failure(state: RunState) -> bool {
    matches!(
        state,
        RunState::PartialFailure
            | RunState::TotalFailure
            | RunState::BackoutOk
            | RunState::BackoutFailed
    )
}

fn check(s: &Scenario, sim: &Sim, no_backout: bool) {
    sim.check_end();
    let spec = &sim.spec;
    let status = sim.engine.status();
    let finals = first_final(sim);
    for (c, change) in status.changes.iter().enumerate() {
        assert!(change.state.is_final(), "change {c} not final");
        assert!(
            change.hosts.iter().all(|h| h.state.is_final()),
            "change {c} has unfinished hosts"
        );
    }

    // A change starts only after all its requires succeeded; after a change
    // failed, no change starts (changeset halt and backout_all both halt).
    let first_failure = finals
        .values()
        .filter(|(_, s)| is_failure(*s))
        .map(|(i, _)| *i)
        .min();
    let mut started = BTreeSet::new();
    for (i, (_, a)) in sim.actions.iter().enumerate() {
        let Action::Progress(Progress::Change { change, state }) = a else {
            continue;
        };
        if !started.insert(*change) || *state == RunState::Cancelled {
            continue;
        }
        for &r in &spec.changes[*change].requires {
            let done = finals
                .get(&r)
                .is_some_and(|&(at, s)| at < i && s == RunState::Success);
            assert!(done, "change {change} started before change {r} succeeded");
        }
        assert!(
            first_failure.is_none_or(|f| f > i),
            "change {change} started after a failure"
        );
    }
    for id in sim.dispatches() {
        assert!(
            started.contains(&id.change),
            "{id} dispatched before its change started"
        );
    }

    for (c, change) in spec.changes.iter().enumerate() {
        let batches = change.batches();
        let batch_of: BTreeMap<usize, usize> = batches
            .iter()
            .enumerate()
            .flat_map(|(b, hosts)| hosts.iter().map(move |&h| (h, b)))
            .collect();
        let biggest = batches.iter().map(Vec::len).max().unwrap_or(0);
        let cap = change
            .rollout
            .max_parallel
            .map_or(biggest, |m| (m as usize).max(1).min(biggest));
        let limit = match change.on_failure {
            OnFailure::Continue => change
                .rollout
                .max_failures
                .map_or(usize::MAX, |m| m.of(change.hosts.len())),
            _ => 0,
        };
        let mut states = vec![HostState::Pending; change.hosts.len()];
        let mut failed = BTreeSet::new();
        let mut backing_out = Vec::new();
        let mut completion: BTreeMap<usize, usize> = BTreeMap::new();
        let mut after_running = vec![false; change.hosts.len()];
        for (i, (_, a)) in sim.actions.iter().enumerate() {
            let Action::Progress(Progress::Host {
                change: hc,
                host,
                state,
                ..
            }) = a
            else {
                continue;
            };
            if *hc != c {
                continue;
            }
            let (h, state) = (*host, *state);
            if state == HostState::Running && states[h] == HostState::Pending {
                // A host starts: its earlier batches are all final, and no
                // halt (or max_failures) has been reached.
                let b = batch_of[&h];
                for (&other, &ob) in &batch_of {
                    assert!(
                        ob >= b || states[other].is_final(),
                        "change {c}: host {h} started before batch {ob} ended"
                    );
                }
                assert!(
                    failed.len() <= limit,
                    "change {c}: host {h} started after the change halted"
                );
            }
            if matches!(
                state,
                HostState::Failed
                    | HostState::Lost
                    | HostState::BackingOut
                    | HostState::BackoutOk
                    | HostState::BackoutFailed
            ) {
                failed.insert(h);
            }
            if state == HostState::Running {
                after_running[h] = true;
            } else if after_running[h]
                && matches!(
                    state,
                    HostState::Success
                        | HostState::Skipped
                        | HostState::RetryPending
                        | HostState::Failed
                        | HostState::Lost
                        | HostState::Cancelled
                )
            {
                after_running[h] = false;
                completion.insert(h, i);
            }
            if state == HostState::BackingOut {
                if change.on_failure == OnFailure::BackoutAll {
                    let busy = states
                        .iter()
                        .filter(|s| **s == HostState::BackingOut)
                        .count();
                    assert_eq!(busy, 0, "change {c}: two hosts backing out at once");
                }
                backing_out.push(h);
            }
            states[h] = state;
            let busy = states
                .iter()
                .filter(|s| !s.is_final() && **s != HostState::Pending)
                .count();
            assert!(busy <= cap, "change {c}: {busy} hosts at once, cap {cap}");
        }
        // backout_all: reverse completion order.
        if change.on_failure == OnFailure::BackoutAll {
            let order: Vec<usize> = backing_out.iter().map(|h| completion[h]).collect();
            assert!(
                order.windows(2).all(|w| w[0] > w[1]),
                "change {c}: backouts {backing_out:?} not in reverse completion order {order:?}"
            );
        }
        // Wherever the change was backed out everywhere (its backout_all,
        // an abort or deny), every host where apply started was backed out.
        let everywhere = match finals.get(&c) {
            Some((_, RunState::BailedOut)) => true,
            Some((_, RunState::BackoutOk | RunState::BackoutFailed)) => {
                change.on_failure == OnFailure::BackoutAll
            }
            _ => false,
        };
        let changeset = s.changeset == ChangesetFailure::BackoutAll && first_failure.is_some();
        if (everywhere || changeset) && !no_backout {
            for h in 0..change.hosts.len() {
                if sim.applied.contains(&(c, h)) {
                    let end = status.changes[c].hosts[h].state;
                    assert!(
                        matches!(end, HostState::BackoutOk | HostState::BackoutFailed),
                        "change {c} host {h}: applied but ended {end:?}"
                    );
                }
            }
        }
    }

    // The run's final state follows the rules.
    let bailed = !sim.alerts(crate::rollout::AlertKind::BailedOut).is_empty();
    let run = sim.engine.state();
    if bailed {
        assert_eq!(run, RunState::BailedOut);
    } else if status.changes.iter().all(|c| c.state == RunState::Success) {
        assert_eq!(run, RunState::Success);
    } else {
        assert!(
            !matches!(run, RunState::Success | RunState::BailedOut),
            "{run:?}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn random_runs_keep_every_invariant(s in scenario()) {
        let (sim, no_backout) = drive(&s);
        check(&s, &sim, no_backout);
    }
}
