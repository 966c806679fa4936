//! The engine's vocabulary: events in, actions out, states, ids, and the
//! [`Judge`] that evaluates conditions. Shared with the driver.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::{Condition, HostPlan, Step};

/// Milliseconds since the UNIX epoch. The engine never reads a clock: the
/// driver passes `now` with every event.
pub type Millis = u64;

/// Which part of a host's sequence a step belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// `skip_if`.
    SkipIf,
    /// `check` (pre-implementation).
    Check,
    /// `apply`.
    Apply,
    /// `verify` (post-implementation).
    Verify,
    /// The chosen backout's `check` (pre-backout).
    BackoutCheck,
    /// Automatic restore of `file` steps, newest first.
    Restore,
    /// The chosen backout's `steps`.
    Backout,
    /// The chosen backout's `verify` (post-backout).
    BackoutVerify,
}

impl Phase {
    /// Every phase, in sequence order.
    pub const ALL: [Phase; 8] = [
        Phase::SkipIf,
        Phase::Check,
        Phase::Apply,
        Phase::Verify,
        Phase::BackoutCheck,
        Phase::Restore,
        Phase::Backout,
        Phase::BackoutVerify,
    ];

    /// The name used in dispatch ids, CEL (`failure.phase`) and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::SkipIf => "skip_if",
            Phase::Check => "check",
            Phase::Apply => "apply",
            Phase::Verify => "verify",
            Phase::BackoutCheck => "backout_check",
            Phase::Restore => "restore",
            Phase::Backout => "backout",
            Phase::BackoutVerify => "backout_verify",
        }
    }

    /// Is this a step of a backout (backout check, restore, backout steps,
    /// backout verify) rather than of the forward sequence?
    pub fn is_backout(self) -> bool {
        matches!(
            self,
            Phase::BackoutCheck | Phase::Restore | Phase::Backout | Phase::BackoutVerify
        )
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one dispatch of one step within a run: (change, host, phase,
/// step, attempt). The driver prefixes the run id to make it globally unique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DispatchId {
    /// Index into `RunSpec::changes`.
    pub change: usize,
    /// Index into `ChangeSpec::hosts`.
    pub host: usize,
    /// Phase.
    pub phase: Phase,
    /// Index of the step within its phase (for `Restore`, the position in
    /// the restore sequence).
    pub step: usize,
    /// 0 for the first try, 1.. for retries.
    pub attempt: u32,
}

impl fmt::Display for DispatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "c{}.h{}.{}.{}.a{}",
            self.change, self.host, self.phase, self.step, self.attempt
        )
    }
}

impl DispatchId {
    /// Parses a dispatch id (`c0.h1.apply.0.a0`), the inverse of its
    /// `Display`.
    pub fn parse(s: &str) -> Option<DispatchId> {
        let mut parts = s.split('.');
        let change = parts.next()?.strip_prefix('c')?.parse().ok()?;
        let host = parts.next()?.strip_prefix('h')?.parse().ok()?;
        let phase_name = parts.next()?;
        let phase = *Phase::ALL.iter().find(|p| p.as_str() == phase_name)?;
        let step = parts.next()?.parse().ok()?;
        let attempt = parts.next()?.strip_prefix('a')?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        Some(DispatchId {
            change,
            host,
            phase,
            step,
            attempt,
        })
    }
}

/// Why a step did not pass (DESIGN.md's `failure.reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// Exited non-zero and had no `expect`.
    NonzeroExit,
    /// `expect` evaluated to false (or could not be evaluated).
    ConditionFailed,
    /// Killed after its timeout.
    Timeout,
    /// Its outcome cannot be known (the agent died while it ran).
    Lost,
    /// The agent was not connected, so nothing was sent.
    Unreachable,
    /// Cancelled by an abort.
    Cancelled,
}

impl FailureReason {
    /// The name used in CEL and output.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::NonzeroExit => "nonzero_exit",
            FailureReason::ConditionFailed => "condition_failed",
            FailureReason::Timeout => "timeout",
            FailureReason::Lost => "lost",
            FailureReason::Unreachable => "unreachable",
            FailureReason::Cancelled => "cancelled",
        }
    }
}

/// How the agent says a step ended, before any `expect` is judged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Termination {
    /// The process exited (or the file was written); see `exit_code`.
    Exited,
    /// Killed after its timeout.
    TimedOut,
    /// Killed by a cancel.
    Cancelled,
    /// The agent lost track of it (restarted while it ran).
    Lost,
    /// Never sent: the agent was not connected.
    Unreachable,
    /// The agent could not start it (bad cwd, unknown user, ...); counts as
    /// a non-zero exit with the message in `stderr`.
    FailedToStart,
}

/// The raw result of one dispatched step, as journaled.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepResult {
    /// How it ended.
    pub termination: Option<Termination>,
    /// Exit code when it exited; `None` when killed by a signal or never run.
    pub exit_code: Option<i32>,
    /// Captured stdout (first 1 MiB).
    pub stdout: String,
    /// Captured stderr (first 1 MiB).
    pub stderr: String,
    /// Bytes of stdout past the cap that were counted but not kept.
    pub stdout_dropped: u64,
    /// Bytes of stderr past the cap that were counted but not kept.
    pub stderr_dropped: u64,
    /// Wall time on the agent.
    pub duration_ms: u64,
}

/// What a failed host's backout `when` sees as `failure`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The phase of the failing step.
    pub phase: Phase,
    /// Index of the failing step within its phase.
    pub step: usize,
    /// Why it failed.
    pub reason: FailureReason,
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
    /// A one-line explanation for people.
    pub message: String,
}

/// Evaluates conditions. The real one is CEL (`crate::changeset::cond`);
/// the engine only sees this trait so it stays independent of the language.
pub trait Judge: Send + Sync {
    /// Did `step` pass, given its result? (No `expect`: exit code 0.)
    /// `Err` carries a message; the step then fails `condition_failed`.
    fn passed(&self, step: &Step, host: &HostPlan, result: &StepResult) -> Result<bool, String>;
    /// Does a backout's `when` match this failure?
    fn matches(&self, when: &Condition, host: &HostPlan, failure: &Failure)
    -> Result<bool, String>;
}

/// DESIGN.md's host states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Not started.
    Pending,
    /// A step is in flight or next.
    Running,
    /// Failed; waiting for the retry delay.
    RetryPending,
    /// Applied and verified.
    Success,
    /// `skip_if` passed: already done.
    Skipped,
    /// Failed (and not backed out: a failed check, or no backout).
    Failed,
    /// Its backout is running.
    BackingOut,
    /// Backed out successfully.
    BackoutOk,
    /// Its backout failed.
    BackoutFailed,
    /// Never started, or stopped, because of an abort/deny/halt.
    Cancelled,
    /// Its outcome cannot be known.
    Lost,
    /// Its backout waits for its agent to come back (shown by the driver;
    /// the engine sees the backout as in flight).
    BackoutPending,
    /// Waiting for another run to finish with the host (shown by the
    /// driver; one host runs one change at a time).
    Queued,
}

impl HostState {
    /// The name used in output (`backout_ok`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Pending => "pending",
            HostState::Running => "running",
            HostState::RetryPending => "retry_pending",
            HostState::Success => "success",
            HostState::Skipped => "skipped",
            HostState::Failed => "failed",
            HostState::BackingOut => "backing_out",
            HostState::BackoutOk => "backout_ok",
            HostState::BackoutFailed => "backout_failed",
            HostState::Cancelled => "cancelled",
            HostState::Lost => "lost",
            HostState::BackoutPending => "backout_pending",
            HostState::Queued => "queued",
        }
    }

    /// Is this a final state?
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            HostState::Pending
                | HostState::Running
                | HostState::RetryPending
                | HostState::BackingOut
                | HostState::BackoutPending
                | HostState::Queued
        )
    }
}

/// DESIGN.md's change and run states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Not started (a change waiting on its `requires`).
    Pending,
    /// Hosts are running.
    Running,
    /// Waiting at an approval gate.
    AwaitingApproval,
    /// `modi pause`: nothing new starts until `modi resume`.
    Paused,
    /// Every host succeeded or was skipped.
    Success,
    /// Some hosts failed.
    PartialFailure,
    /// Every host failed.
    TotalFailure,
    /// Failed and backed out everywhere it was applied.
    BackoutOk,
    /// A backout failed somewhere.
    BackoutFailed,
    /// Aborted or denied.
    BailedOut,
    /// A change that never started: a prerequisite did not succeed, or the
    /// run stopped starting changes (changeset `on_failure`, abort, deny)
    /// first. Its hosts are all `cancelled`. Never a run's state.
    Cancelled,
}

impl RunState {
    /// The name used in output (`partial_failure`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Pending => "pending",
            RunState::Running => "running",
            RunState::AwaitingApproval => "awaiting_approval",
            RunState::Paused => "paused",
            RunState::Success => "success",
            RunState::PartialFailure => "partial_failure",
            RunState::TotalFailure => "total_failure",
            RunState::BackoutOk => "backout_ok",
            RunState::BackoutFailed => "backout_failed",
            RunState::BailedOut => "bailed_out",
            RunState::Cancelled => "cancelled",
        }
    }

    /// Is this a final state?
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            RunState::Pending | RunState::Running | RunState::AwaitingApproval | RunState::Paused
        )
    }

    /// Exit status for the CLI: 0 success, 1 anything else final.
    pub fn succeeded(self) -> bool {
        self == RunState::Success
    }
}

/// What the driver feeds the engine. Every event is journaled (with `now`)
/// before it is handled, so replay reproduces the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Event {
    /// The run was created; start it.
    Start,
    /// A dispatched step ended.
    StepFinished {
        /// Which dispatch.
        id: DispatchId,
        /// Its raw result.
        result: StepResult,
    },
    /// `modi approve RUN`.
    Approve {
        /// The name on the admin cert.
        by: String,
    },
    /// `modi deny RUN`.
    Deny {
        /// The name on the admin cert.
        by: String,
        /// Back out what the change applied (`deny --no-backout` leaves
        /// hosts as they are).
        #[serde(default = "yes")]
        backout: bool,
    },
    /// `modi abort RUN [--no-backout]`.
    Abort {
        /// The name on the admin cert.
        by: String,
        /// false with `--no-backout`.
        backout: bool,
    },
    /// `modi pause RUN`.
    Pause {
        /// The name on the admin cert.
        by: String,
    },
    /// `modi resume RUN`.
    Resume {
        /// The name on the admin cert.
        by: String,
    },
    /// `now` reached `next_deadline()`.
    Timer,
}

/// Kinds of alert ("a human must look").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A host failed and had no backout: it was left as it is.
    FailedNoBackout,
    /// A backout failed.
    BackoutFailed,
    /// The run was aborted or denied.
    BailedOut,
    /// The run ended (any final state).
    RunFinished,
    /// The controller's store cannot write: the run waits, paused, and
    /// goes on by itself once it can.
    StoreUnwritable,
    /// The controller restarted and the run needs secrets it no longer
    /// has: it waits, paused, until `modi resume RUN --secret ...`.
    SecretsNeeded,
}

fn yes() -> bool {
    true
}

/// What the engine asks the driver to do.
// `Dispatch` carries a whole `Step`; actions are short-lived and moved once,
// so boxing it would only add an allocation per dispatch.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Action {
    /// Send this step to the host's agent (journal "dispatched" first). If
    /// the agent is not connected, answer at once with a `StepFinished`
    /// whose termination is `Unreachable`.
    Dispatch {
        /// Unique id.
        id: DispatchId,
        /// The host's name.
        host: String,
        /// The step to run (a `Restore` for automatic file backout).
        step: Step,
    },
    /// Cancel an in-flight step (kill its process group). The engine still
    /// expects a `StepFinished` for it.
    Cancel {
        /// Which dispatch.
        id: DispatchId,
        /// The host's name.
        host: String,
    },
    /// Tell a human.
    Alert {
        /// What happened.
        kind: AlertKind,
        /// The change, if about one.
        change: Option<String>,
        /// The host, if about one.
        host: Option<String>,
        /// A sentence for people.
        message: String,
    },
    /// Something watchers may show. Informational only.
    Progress(Progress),
}

/// Progress notifications for `modi watch` / `modi apply`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Progress {
    /// The run's state changed.
    Run {
        /// New state.
        state: RunState,
    },
    /// A change's state changed.
    Change {
        /// Index into `RunSpec::changes`.
        change: usize,
        /// New state.
        state: RunState,
    },
    /// A batch of a change started.
    Batch {
        /// Index into `RunSpec::changes`.
        change: usize,
        /// 0-based batch number.
        batch: usize,
        /// Host indices in the batch.
        hosts: Vec<usize>,
    },
    /// A host's state changed.
    Host {
        /// Index into `RunSpec::changes`.
        change: usize,
        /// Index into `ChangeSpec::hosts`.
        host: usize,
        /// New state.
        state: HostState,
        /// The attempt it is on.
        attempt: u32,
    },
    /// A step ended and was judged.
    Step {
        /// Which dispatch.
        id: DispatchId,
        /// Did it pass?
        passed: bool,
        /// Why not, if not.
        reason: Option<FailureReason>,
    },
    /// The run waits at an approval gate.
    AwaitingApproval {
        /// Index into `RunSpec::changes`.
        change: usize,
        /// The gate's id, unique in the run (one prompt per gate).
        id: u64,
        /// What the gate is for, for people ("batch 2 of web-upgrade: ...").
        gate: String,
    },
}

/// A snapshot of a run for `modi status`, derived from the engine's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    /// The run's state.
    pub state: RunState,
    /// Each change, in spec order.
    pub changes: Vec<ChangeStatus>,
    /// Every operator decision the engine took, in order.
    #[serde(default)]
    pub decisions: Vec<Decision>,
    /// Why the run is held although the engine would go on (the driver
    /// says so: `store: the store cannot write: ...`); its state then shows
    /// `paused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
    /// Results that came back after their step was declared `lost`: shown,
    /// never changing the outcome already decided.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late: Vec<LateResult>,
}

/// A result that arrived after its step was declared `lost`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LateResult {
    /// Which dispatch.
    pub id: DispatchId,
    /// The host.
    pub host: String,
    /// When it arrived (controller clock).
    pub at: Millis,
    /// What really happened.
    pub result: StepResult,
}

/// An approve, deny, abort, pause or resume, with who gave it (the name on
/// the admin certificate) and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// When (controller clock).
    pub at: Millis,
    /// The name on the admin certificate.
    pub by: String,
    /// approve, deny, abort, abort --no-backout, pause or resume.
    pub action: String,
}

/// One change's part of a [`RunStatus`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeStatus {
    /// The change's name.
    pub name: String,
    /// Its state.
    pub state: RunState,
    /// Each host, in rollout order.
    pub hosts: Vec<HostStatus>,
    /// The approval gate open now, if any.
    #[serde(default)]
    pub gate: Option<OpenGate>,
}

/// An open approval gate in a [`ChangeStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenGate {
    /// Its id, as in `Progress::AwaitingApproval`.
    pub id: u64,
    /// What it is for, for people.
    pub label: String,
    /// When it times out (a deny), if it does.
    pub deadline: Option<Millis>,
    /// When it opened.
    #[serde(default)]
    pub since: Millis,
}

/// One host's part of a [`ChangeStatus`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    /// The host's name.
    pub name: String,
    /// Its state.
    pub state: HostState,
    /// The attempt it is on (0 = first try).
    pub attempt: u32,
    /// Why it failed, if it did.
    pub failure: Option<Failure>,
    /// Every step dispatched to it, in order.
    pub steps: Vec<StepStatus>,
}

/// One dispatched step in a [`HostStatus`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepStatus {
    /// Which dispatch.
    pub id: DispatchId,
    /// `None` while in flight.
    pub passed: Option<bool>,
    /// Why it failed.
    pub reason: Option<FailureReason>,
    /// Its exit code.
    pub exit_code: Option<i32>,
    /// Its duration.
    pub duration_ms: u64,
}
