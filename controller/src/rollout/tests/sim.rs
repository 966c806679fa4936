//! The simulation harness (quinn-proto `Pair` style): a fake fleet answers
//! `Dispatch` actions with scripted results after a fixed step time, a fake
//! clock jumps to the next result or engine deadline, and the engine is
//! stepped until quiet. Also: spec builders and the test [`Judge`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::rollout::{
    Action, AlertKind, DispatchId, Engine, Event, Failure, HostState, Judge, Millis, Phase,
    Progress, RunState, StepResult, Termination,
};
use crate::spec::{
    Approve, BackoutSpec, ChangeSpec, ChangesetFailure, Condition, FileSpec, HostInfo, HostPlan,
    Location, OnFailure, Retry, Rollout, RunSpec, Step, StepAction,
};

// ---------------------------------------------------------------- judge

/// The judge: the real CEL one. Test conditions are plain CEL
/// (`exit_code == 3`, `failure.phase == "verify"`; `error` is an undeclared
/// name, so it fails to evaluate).
pub fn judge() -> Arc<dyn Judge> {
    Arc::new(crate::changeset::CelJudge::new())
}

// ---------------------------------------------------------------- specs

/// A `run:` step.
pub fn run(command: &str) -> Step {
    step(StepAction::Run {
        command: command.into(),
    })
}

/// A `file:` step.
pub fn file(path: &str) -> Step {
    step(StepAction::File(FileSpec {
        path: path.into(),
        content: "new\n".into(),
        mode: None,
        owner: None,
        validate: None,
    }))
}

fn step(action: StepAction) -> Step {
    Step {
        action,
        timeout: None,
        env: BTreeMap::new(),
        cwd: None,
        user: None,
        stdin: None,
        expect: None,
        location: Location::default(),
        secrets: Default::default(),
    }
}

/// A condition.
pub fn cond(expr: &str) -> Condition {
    Condition {
        expr: expr.into(),
        location: Location::default(),
    }
}

/// `step` with `expect: expr`.
pub fn expecting(mut step: Step, expr: &str) -> Step {
    step.expect = Some(cond(expr));
    step
}

/// A backout procedure with `when` and the given steps.
pub fn backout(when: Option<&str>, check: usize, steps: usize, verify: usize) -> BackoutSpec {
    let list = |n: usize, what: &str| (0..n).map(|i| run(&format!("{what} {i}"))).collect();
    BackoutSpec {
        when: when.map(cond),
        check: list(check, "backout-check"),
        steps: list(steps, "backout"),
        verify: list(verify, "backout-verify"),
        location: Location::default(),
    }
}

/// A host with one `run` apply step and one catch-all backout step.
pub fn host(name: &str) -> HostPlan {
    HostPlan {
        host: HostInfo {
            name: name.into(),
            ..HostInfo::default()
        },
        vars: Default::default(),
        skip_if: vec![],
        check: vec![],
        apply: vec![run("apply 0")],
        verify: vec![],
        backout: vec![backout(None, 0, 1, 0)],
    }
}

/// A serial, halt change over `hosts` hosts named h0.. (see [`host`]).
pub fn change(name: &str, hosts: usize) -> ChangeSpec {
    ChangeSpec {
        name: name.into(),
        group: None,
        requires: vec![],
        rollout: Rollout::default(),
        on_failure: OnFailure::Halt,
        retry: Retry::default(),
        approve: Approve::default(),
        hosts: (0..hosts).map(|i| host(&format!("h{i}"))).collect(),
        location: Location::default(),
    }
}

/// Applies `f` to every host plan of `change`.
pub fn each_host(change: &mut ChangeSpec, f: impl Fn(&mut HostPlan)) {
    change.hosts.iter_mut().for_each(f);
}

/// A run of `changes` with changeset `on_failure: halt`.
pub fn run_spec(changes: Vec<ChangeSpec>) -> RunSpec {
    RunSpec {
        name: "test".into(),
        description: String::new(),
        source: "test.yaml".into(),
        on_failure: ChangesetFailure::Halt,
        changes,
        groups: vec![],
    }
}

/// Seconds as a `Duration`.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

// ---------------------------------------------------------------- fleet

/// How the fake agent answers a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0.
    Pass,
    /// Exit with this code.
    Fail(i32),
    /// Exit with this code and stdout.
    Out(i32, &'static str),
    /// Killed after its timeout.
    Timeout,
    /// The agent lost it.
    Lost,
    /// The agent was not connected (answered at once).
    Unreachable,
    /// Could not start.
    FailToStart,
    /// Runs until cancelled.
    Hang,
}

impl Outcome {
    fn result(self) -> StepResult {
        let (termination, exit_code, stdout) = match self {
            Outcome::Pass => (Termination::Exited, Some(0), ""),
            Outcome::Fail(code) => (Termination::Exited, Some(code), ""),
            Outcome::Out(code, out) => (Termination::Exited, Some(code), out),
            Outcome::Timeout => (Termination::TimedOut, None, ""),
            Outcome::Lost => (Termination::Lost, None, ""),
            Outcome::Unreachable => (Termination::Unreachable, None, ""),
            Outcome::FailToStart => (Termination::FailedToStart, None, ""),
            Outcome::Hang => (Termination::Cancelled, None, ""),
        };
        StepResult {
            termination: Some(termination),
            exit_code,
            stdout: stdout.into(),
            stderr: if self == Outcome::FailToStart {
                "unknown user".into()
            } else {
                String::new()
            },
            duration_ms: 10,
            ..StepResult::default()
        }
    }
}

/// Which dispatches a scripted outcome applies to (`None` = any).
#[derive(Clone, Copy, Debug, Default)]
pub struct Rule {
    /// Change index.
    pub change: Option<usize>,
    /// Host index.
    pub host: Option<usize>,
    /// Phase.
    pub phase: Option<Phase>,
    /// Step index.
    pub step: Option<usize>,
    /// Attempt.
    pub attempt: Option<u32>,
}

impl Rule {
    fn matches(&self, id: &DispatchId) -> bool {
        self.change.is_none_or(|c| c == id.change)
            && self.host.is_none_or(|h| h == id.host)
            && self.phase.is_none_or(|p| p == id.phase)
            && self.step.is_none_or(|s| s == id.step)
            && self.attempt.is_none_or(|a| a == id.attempt)
    }
}

/// A rule for (change, host, phase, step), any attempt.
pub fn at(change: usize, host: usize, phase: Phase, step: usize) -> Rule {
    Rule {
        change: Some(change),
        host: Some(host),
        phase: Some(phase),
        step: Some(step),
        attempt: None,
    }
}

/// Step time of the fake agents.
pub const STEP_MS: Millis = 1_000;

/// The engine with a fake fleet and clock.
pub struct Sim {
    /// The engine under test.
    pub engine: Engine,
    /// Its spec.
    pub spec: Arc<RunSpec>,
    /// The fake clock.
    pub now: Millis,
    rules: Vec<(Rule, Outcome)>,
    /// (finish time, dispatch number) -> (id, result); hanging steps wait
    /// in `hanging` until cancelled.
    queue: BTreeMap<(Millis, u64), (DispatchId, StepResult)>,
    hanging: BTreeSet<DispatchId>,
    seq: u64,
    /// Every action, in order, with the time it was emitted.
    pub actions: Vec<(Millis, Action)>,
    /// Every event fed, with its time.
    pub log: Vec<(Event, Millis)>,
    /// (change, host) where an apply step was really sent (not unreachable).
    pub applied: BTreeSet<(usize, usize)>,
    events_left: usize,
}

impl Sim {
    /// A simulation of `spec` with every step passing unless scripted.
    pub fn new(spec: RunSpec) -> Sim {
        let spec = Arc::new(spec);
        Sim {
            engine: Engine::new(Arc::clone(&spec), judge()),
            spec,
            now: 0,
            rules: Vec::new(),
            queue: BTreeMap::new(),
            hanging: BTreeSet::new(),
            seq: 0,
            actions: Vec::new(),
            log: Vec::new(),
            applied: BTreeSet::new(),
            events_left: 20_000,
        }
    }

    /// Scripts `outcome` for dispatches matching `rule` (first rule wins).
    pub fn script(&mut self, rule: Rule, outcome: Outcome) -> &mut Sim {
        self.rules.push((rule, outcome));
        self
    }

    /// Feeds `Event::Start`.
    pub fn start(&mut self) -> Vec<Action> {
        self.feed(Event::Start)
    }

    /// Feeds one event at the current time and carries out its actions.
    pub fn feed(&mut self, event: Event) -> Vec<Action> {
        self.events_left = self.events_left.checked_sub(1).expect("too many events");
        self.log.push((event.clone(), self.now));
        let actions = self.engine.handle(event, self.now);
        for action in &actions {
            self.actions.push((self.now, action.clone()));
            match action {
                Action::Dispatch { id, .. } => {
                    let outcome = self
                        .rules
                        .iter()
                        .find(|(rule, _)| rule.matches(id))
                        .map_or(Outcome::Pass, |(_, o)| *o);
                    if id.phase == Phase::Apply && outcome != Outcome::Unreachable {
                        self.applied.insert((id.change, id.host));
                    }
                    match outcome {
                        Outcome::Hang => {
                            self.hanging.insert(*id);
                        }
                        Outcome::Unreachable => self.enqueue(*id, 0, outcome.result()),
                        _ => self.enqueue(*id, STEP_MS, outcome.result()),
                    }
                }
                Action::Cancel { id, .. } => {
                    // An unreachable step was never sent: nothing to cancel.
                    let queued = self
                        .queue
                        .iter()
                        .find(|(_, (q, r))| {
                            q == id && r.termination != Some(Termination::Unreachable)
                        })
                        .map(|(k, _)| *k);
                    if self.hanging.remove(id) || queued.is_some() {
                        if let Some(key) = queued {
                            self.queue.remove(&key);
                        }
                        self.enqueue(*id, 0, Outcome::Hang.result());
                    }
                }
                _ => {}
            }
        }
        actions
    }

    fn enqueue(&mut self, id: DispatchId, after: Millis, result: StepResult) {
        self.seq += 1;
        self.queue
            .insert((self.now + after, self.seq), (id, result));
    }

    /// Delivers the next result or fires the next deadline, whichever is
    /// first. Returns false when nothing is left to happen.
    pub fn step(&mut self) -> bool {
        let result_at = self.queue.keys().next().map(|k| k.0);
        let deadline = self.engine.next_deadline();
        match (result_at, deadline) {
            (Some(r), d) if d.is_none_or(|d| r <= d) => {
                let (_, (id, result)) = self.queue.pop_first().expect("a result");
                self.now = self.now.max(r);
                self.feed(Event::StepFinished { id, result });
            }
            (_, Some(d)) => {
                self.now = self.now.max(d);
                self.feed(Event::Timer);
            }
            _ => return false,
        }
        true
    }

    /// Steps until quiet.
    pub fn run(&mut self) -> &mut Sim {
        while self.step() {}
        self
    }

    /// Steps while time stays at or before `t`, then sets the clock to `t`.
    pub fn run_until(&mut self, t: Millis) -> &mut Sim {
        loop {
            let result_at = self.queue.keys().next().map(|k| k.0);
            let next = [result_at, self.engine.next_deadline()]
                .into_iter()
                .flatten()
                .min();
            if next.is_none_or(|n| n > t) || !self.step() {
                break;
            }
        }
        self.now = self.now.max(t);
        self
    }

    /// Starts, runs to the end, and checks the end: finished, nothing in
    /// flight, and a replay of the event log gives the same actions.
    pub fn run_to_end(&mut self) -> &mut Sim {
        if self.log.is_empty() {
            self.start();
        }
        self.run();
        self.check_end();
        self
    }

    /// Asserts the run is over and replays deterministically.
    pub fn check_end(&self) {
        assert!(
            self.engine.is_finished(),
            "not finished: {:?}",
            self.engine.status()
        );
        assert!(self.engine.state().is_final());
        assert!(
            self.queue.is_empty() && self.hanging.is_empty(),
            "steps left in flight"
        );
        assert_eq!(self.engine.next_deadline(), None);
        self.check_replay();
        self.check_unique_ids();
        let finished = self.alerts(AlertKind::RunFinished);
        assert_eq!(finished.len(), 1, "one RunFinished alert");
    }

    /// Replays the event log into a fresh engine: same actions.
    pub fn check_replay(&self) {
        let mut fresh = Engine::new(Arc::clone(&self.spec), judge());
        let replayed: Vec<Action> = self
            .log
            .iter()
            .flat_map(|(event, now)| fresh.handle(event.clone(), *now))
            .collect();
        let original: Vec<Action> = self.actions.iter().map(|(_, a)| a.clone()).collect();
        assert_eq!(replayed, original, "replay differs");
        assert_eq!(fresh.status(), self.engine.status());
    }

    /// No dispatch id was emitted twice.
    pub fn check_unique_ids(&self) {
        let mut seen = BTreeSet::new();
        for id in self.dispatches() {
            assert!(seen.insert(id), "{id} dispatched twice");
        }
    }

    // ------------------------------------------------------------ queries

    /// Every dispatched id, in order.
    pub fn dispatches(&self) -> Vec<DispatchId> {
        self.actions
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Dispatch { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// (phase, step, attempt) of every dispatch to host `h` of change `c`.
    pub fn steps_of(&self, c: usize, h: usize) -> Vec<(Phase, usize, u32)> {
        self.dispatches()
            .into_iter()
            .filter(|id| id.change == c && id.host == h)
            .map(|id| (id.phase, id.step, id.attempt))
            .collect()
    }

    /// The step of every dispatch of phase `phase` to host `h` of change `c`.
    pub fn dispatched_steps(&self, c: usize, h: usize, phase: Phase) -> Vec<Step> {
        self.actions
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Dispatch { id, step, .. }
                    if id.change == c && id.host == h && id.phase == phase =>
                {
                    Some(step.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Every alert of `kind`: (change, host, message).
    pub fn alerts(&self, kind: AlertKind) -> Vec<(Option<String>, Option<String>, String)> {
        self.actions
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Alert {
                    kind: k,
                    change,
                    host,
                    message,
                } if *k == kind => Some((change.clone(), host.clone(), message.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every progress notification, with its time.
    pub fn progress(&self) -> Vec<(Millis, Progress)> {
        self.actions
            .iter()
            .filter_map(|(t, a)| match a {
                Action::Progress(p) => Some((*t, p.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every state host `h` of change `c` went through.
    pub fn history(&self, c: usize, h: usize) -> Vec<HostState> {
        self.progress()
            .into_iter()
            .filter_map(|(_, p)| match p {
                Progress::Host {
                    change,
                    host,
                    state,
                    ..
                } if change == c && host == h => Some(state),
                _ => None,
            })
            .collect()
    }

    /// Host `h` of change `c`, in order, each time it started backing out.
    pub fn backout_order(&self, c: usize) -> Vec<usize> {
        self.progress()
            .into_iter()
            .filter_map(|(_, p)| match p {
                Progress::Host {
                    change,
                    host,
                    state: HostState::BackingOut,
                    ..
                } if change == c => Some(host),
                _ => None,
            })
            .collect()
    }

    /// The state of host `h` of change `c`.
    pub fn host_state(&self, c: usize, h: usize) -> HostState {
        self.engine.status().changes[c].hosts[h].state
    }

    /// The states of every host of change `c`.
    pub fn host_states(&self, c: usize) -> Vec<HostState> {
        let status = self.engine.status();
        status.changes[c].hosts.iter().map(|h| h.state).collect()
    }

    /// The state of change `c`.
    pub fn change_state(&self, c: usize) -> RunState {
        self.engine.status().changes[c].state
    }

    /// The failure recorded for host `h` of change `c`.
    pub fn failure(&self, c: usize, h: usize) -> Option<Failure> {
        self.engine.status().changes[c].hosts[h].failure.clone()
    }

    /// Steps currently in flight (dispatched, not answered).
    pub fn in_flight(&self) -> usize {
        self.queue.len() + self.hanging.len()
    }
}
