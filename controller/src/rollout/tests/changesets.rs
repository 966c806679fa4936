//! The `requires` DAG, changeset-level `on_failure` and included groups.

use super::policies::{positions, rich};
use super::sim::*;
use crate::rollout::{Action, HostState, Millis, Phase, Progress, RunState};
use crate::spec::{ChangeSpec, ChangesetFailure, GroupSpec, OnFailure};

use RunState::*;

fn requiring(name: &str, hosts: usize, requires: &[usize]) -> ChangeSpec {
    let mut c = change(name, hosts);
    c.requires = requires.to_vec();
    c
}

fn first_dispatch(sim: &Sim, c: usize) -> Option<Millis> {
    sim.actions.iter().find_map(|(t, a)| match a {
        Action::Dispatch { id, .. } if id.change == c => Some(*t),
        _ => None,
    })
}

fn reached(sim: &Sim, c: usize, state: RunState) -> Option<Millis> {
    sim.progress().into_iter().find_map(|(t, p)| match p {
        Progress::Change { change, state: s } if change == c && s == state => Some(t),
        _ => None,
    })
}

/// The change of every backout dispatch, in order, deduplicated in runs.
fn backed_out_changes(sim: &Sim) -> Vec<usize> {
    let mut order: Vec<usize> = Vec::new();
    for id in sim.dispatches() {
        if id.phase.is_backout() && order.last() != Some(&id.change) {
            order.push(id.change);
        }
    }
    order
}

#[test]
fn changes_start_when_their_requires_succeeded_and_independent_ones_run_at_once() {
    let spec = run_spec(vec![
        requiring("a", 2, &[]),
        requiring("b", 1, &[0]),
        requiring("c", 1, &[0]),
        requiring("d", 1, &[]),
        requiring("e", 1, &[1, 2]),
    ]);
    let mut sim = Sim::new(spec);
    sim.run_to_end();
    let a_done = reached(&sim, 0, Success).unwrap();
    assert_eq!(first_dispatch(&sim, 3), Some(0), "d runs beside a");
    assert_eq!(first_dispatch(&sim, 1), Some(a_done));
    assert_eq!(first_dispatch(&sim, 2), Some(a_done), "b and c at once");
    let bc_done = reached(&sim, 1, Success)
        .max(reached(&sim, 2, Success))
        .unwrap();
    assert_eq!(first_dispatch(&sim, 4), Some(bc_done));
    assert_eq!(sim.engine.state(), Success);
}

#[test]
fn a_failed_prerequisite_cancels_its_dependents_and_halt_starts_no_new_change() {
    let mut a = requiring("a", 1, &[]);
    a.on_failure = OnFailure::Halt;
    let spec = run_spec(vec![
        a,
        requiring("b", 2, &[0]),
        requiring("d", 3, &[]),
        requiring("e", 1, &[2]),
    ]);
    let mut sim = Sim::new(spec);
    sim.script(at(0, 0, Phase::Apply, 0), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(sim.change_state(0), TotalFailure);
    assert_eq!(sim.change_state(1), Cancelled);
    assert_eq!(sim.host_states(1), [HostState::Cancelled; 2]);
    assert_eq!(sim.change_state(2), Success, "d was running: it finishes");
    assert_eq!(sim.change_state(3), Cancelled, "e is new: it never starts");
    assert_eq!(first_dispatch(&sim, 1), None);
    assert_eq!(first_dispatch(&sim, 3), None);
    assert_eq!(sim.engine.state(), PartialFailure);
}

#[test]
fn changeset_backout_all_backs_out_done_changes_children_before_parents() {
    let mut spec = run_spec(vec![
        requiring("a", 1, &[]),
        requiring("b", 1, &[0]),
        requiring("c", 1, &[1]),
        requiring("d", 2, &[]),
        requiring("long", 5, &[]),
    ]);
    spec.on_failure = ChangesetFailure::BackoutAll;
    let mut sim = Sim::new(spec);
    sim.script(at(2, 0, Phase::Apply, 0), Outcome::Fail(1));
    sim.run_to_end();
    // `long` was still running when c failed: it finishes, then everything
    // done is backed out newest first, one change at a time.
    assert_eq!(backed_out_changes(&sim), [2, 4, 3, 1, 0]);
    assert_eq!(sim.backout_order(4), [4, 3, 2, 1, 0]);
    assert_eq!(sim.backout_order(3), [1, 0]);
    let c_failed = reached(&sim, 2, TotalFailure).unwrap();
    let first_changeset_backout = sim
        .actions
        .iter()
        .find_map(|(t, a)| match a {
            Action::Dispatch { id, .. } if id.phase.is_backout() && id.change != 2 => Some(*t),
            _ => None,
        })
        .unwrap();
    assert!(first_changeset_backout >= c_failed);
    assert!(first_changeset_backout >= reached(&sim, 4, Success).unwrap());
    for c in [0, 1, 3, 4] {
        assert_eq!(sim.change_state(c), BackoutOk, "change {c}");
    }
    assert_eq!(sim.change_state(2), TotalFailure);
    assert_eq!(sim.engine.state(), BackoutOk);
}

#[test]
fn changeset_backout_all_takes_the_failed_change_s_remaining_hosts_too() {
    let mut spec = run_spec(vec![requiring("a", 1, &[]), requiring("b", 3, &[0])]);
    spec.on_failure = ChangesetFailure::BackoutAll;
    let mut sim = Sim::new(spec);
    sim.script(at(1, 2, Phase::Apply, 0), Outcome::Fail(1));
    sim.script(at(0, 0, Phase::Backout, 0), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(sim.backout_order(1), [2, 1, 0]);
    assert_eq!(sim.change_state(1), BackoutOk);
    assert_eq!(sim.change_state(0), BackoutFailed);
    assert_eq!(sim.engine.state(), BackoutFailed);
}

fn grouped(spec: &mut crate::spec::RunSpec, groups: Vec<(Option<usize>, ChangesetFailure)>) {
    spec.groups = groups
        .into_iter()
        .enumerate()
        .map(|(i, (parent, on_failure))| GroupSpec {
            name: format!("group{i}"),
            file: format!("group{i}.yaml"),
            parent,
            on_failure,
        })
        .collect();
}

#[test]
fn a_group_backs_out_its_own_changes_and_fails_what_required_it() {
    let mut changes = vec![
        requiring("x", 1, &[]),
        requiring("schema/g1", 1, &[0]),
        requiring("schema/g2", 1, &[1]),
        requiring("y", 1, &[1, 2]),
        requiring("z", 4, &[]),
    ];
    changes[1].group = Some(0);
    changes[2].group = Some(0);
    let mut spec = run_spec(changes);
    grouped(&mut spec, vec![(None, ChangesetFailure::BackoutAll)]);
    let mut sim = Sim::new(spec);
    sim.script(at(2, 0, Phase::Apply, 0), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(sim.change_state(1), BackoutOk, "the group backs out g1");
    assert_eq!(sim.change_state(2), TotalFailure);
    assert_eq!(sim.change_state(3), Cancelled, "y required the group");
    assert_eq!(sim.change_state(0), Success, "x is outside the group");
    assert_eq!(sim.change_state(4), Success, "z was running");
    assert_eq!(sim.engine.state(), PartialFailure);
}

#[test]
fn nested_groups_pass_a_failure_up_to_the_top_level_policy() {
    let mut changes = vec![
        requiring("x", 2, &[]),
        requiring("outer/a", 1, &[0]),
        requiring("outer/inner/b", 1, &[1]),
        requiring("outer/inner/c", 1, &[2]),
        requiring("outer/d", 1, &[1]),
    ];
    changes[1].group = Some(0);
    changes[2].group = Some(1);
    changes[3].group = Some(1);
    changes[4].group = Some(0);
    let mut spec = run_spec(changes);
    spec.on_failure = ChangesetFailure::BackoutAll;
    grouped(
        &mut spec,
        vec![
            (None, ChangesetFailure::Halt),
            (Some(0), ChangesetFailure::Halt),
        ],
    );
    let mut sim = Sim::new(spec);
    sim.script(at(3, 0, Phase::Apply, 0), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(sim.change_state(3), TotalFailure);
    // d ran beside b/c (it only needed a): backed out like everything done.
    for c in [0, 1, 2, 4] {
        assert_eq!(sim.change_state(c), BackoutOk, "change {c}");
    }
    let order = backed_out_changes(&sim);
    assert_eq!(order.last(), Some(&0), "x, the root, last: {order:?}");
    let pos = |c| order.iter().position(|&o| o == c).unwrap();
    assert!(pos(2) < pos(1), "b before a");
    assert_eq!(sim.engine.state(), BackoutOk);
}

#[test]
fn an_inner_group_backout_runs_before_the_outer_one() {
    let mut changes = vec![
        requiring("x", 1, &[]),
        requiring("g/a", 1, &[0]),
        requiring("g/b", 1, &[1]),
    ];
    changes[1].group = Some(0);
    changes[2].group = Some(0);
    let mut spec = run_spec(changes);
    spec.on_failure = ChangesetFailure::BackoutAll;
    grouped(&mut spec, vec![(None, ChangesetFailure::BackoutAll)]);
    let mut sim = Sim::new(spec);
    sim.script(at(2, 0, Phase::Apply, 0), Outcome::Fail(1));
    sim.run_to_end();
    assert_eq!(
        backed_out_changes(&sim),
        [2, 1, 0],
        "b's own, then the group, then the top"
    );
    assert_eq!(sim.change_state(2), TotalFailure);
    assert_eq!(sim.engine.state(), BackoutOk);
}

#[test]
fn impossible_requires_are_cancelled_instead_of_hanging() {
    let spec = run_spec(vec![
        requiring("ok", 1, &[]),
        requiring("missing", 1, &[7]),
        requiring("loop-a", 1, &[3]),
        requiring("loop-b", 1, &[2]),
        requiring("self", 1, &[4]),
    ]);
    let mut sim = Sim::new(spec);
    sim.run_to_end();
    assert_eq!(sim.change_state(0), Success);
    for c in 1..5 {
        assert_eq!(sim.change_state(c), Cancelled, "change {c}");
    }
    assert_eq!(sim.engine.state(), PartialFailure);
}

/// Changeset-level and group-level `backout_all` against a failure at every
/// position of the failing change: what was done is put back.
#[test]
fn changeset_and_group_backout_all_at_every_position() {
    for grouped_run in [false, true] {
        for (name, scripts, end) in positions() {
            let mut a = rich(1, OnFailure::Halt);
            a.name = "a".into();
            a.requires = vec![0];
            let mut b = rich(2, OnFailure::Halt);
            b.name = "b".into();
            b.requires = vec![1];
            let mut spec = run_spec(vec![requiring("x", 1, &[]), a, b]);
            if grouped_run {
                spec.changes[1].group = Some(0);
                spec.changes[2].group = Some(0);
                grouped(&mut spec, vec![(None, ChangesetFailure::BackoutAll)]);
            } else {
                spec.on_failure = ChangesetFailure::BackoutAll;
            }
            let mut sim = Sim::new(spec);
            for &(phase, step, outcome) in &scripts {
                sim.script(at(2, 1, phase, step), outcome);
            }
            sim.script(
                Rule {
                    phase: Some(Phase::SkipIf),
                    ..Rule::default()
                },
                Outcome::Fail(1),
            );
            sim.run_to_end();
            let what = format!("{name} (group: {grouped_run})");
            assert_eq!(sim.host_states(2), [HostState::BackoutOk, end], "{what}");
            assert_eq!(sim.host_states(1), [HostState::BackoutOk], "{what}");
            let b_state = if end == HostState::BackoutFailed {
                BackoutFailed
            } else {
                BackoutOk
            };
            assert_eq!(sim.change_state(2), b_state, "{what}");
            assert_eq!(sim.change_state(1), BackoutOk, "{what}");
            let x_state = if grouped_run { Success } else { BackoutOk };
            assert_eq!(sim.change_state(0), x_state, "{what}");
            let run = match (b_state, grouped_run) {
                (BackoutFailed, _) => BackoutFailed,
                (_, true) => PartialFailure,
                (_, false) => BackoutOk,
            };
            assert_eq!(sim.engine.state(), run, "{what}");
        }
    }
}
