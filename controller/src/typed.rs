//! The admin API's typed run messages (run.proto) and our own types, both
//! ways: the controller sends a run's spec, status and progress as
//! `pb::RunSpec`, `pb::RunStatus` and `pb::Progress`; the CLI reads them
//! back into ours to print them. Reading refuses what it does not know (an
//! enum value from a newer controller, a missing oneof) with the field's
//! path, never skips it.

mod spec;
mod status;
#[cfg(test)]
mod tests;

use modi_proto::v1 as pb;

use crate::rollout::{FailureReason, HostState, Phase, RunState, Termination};
use crate::spec::{ApproveAt, ChangesetFailure, OnFailure, RolloutMode};

pub use spec::{run_spec, run_spec_from};
pub use status::{progress, progress_from, run_status, run_status_from};

/// A message the CLI cannot read: the field's path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the controller sent {field}: {problem} (is it newer than this CLI? `modi version` shows both)"
)]
pub struct Malformed {
    /// e.g. `status.changes[1].hosts[0].state`.
    pub field: String,
    /// e.g. `unknown value 42`.
    pub problem: String,
}

impl Malformed {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Malformed {
        Malformed {
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// A message or oneof that must be set and was not.
    pub fn missing_field(field: impl Into<String>) -> Malformed {
        Malformed::new(field, "missing")
    }
}

/// An enum of ours and its run.proto counterpart.
trait Wire: Sized + Copy {
    /// The proto enum.
    type Pb: Copy + Into<i32> + TryFrom<i32>;
    /// Ours → theirs.
    fn to_pb(self) -> Self::Pb;
    /// Theirs → ours; `None` for UNSPECIFIED.
    fn from_pb(pb: Self::Pb) -> Option<Self>;

    /// Ours as the i32 prost stores.
    fn wire(self) -> i32 {
        self.to_pb().into()
    }

    /// The i32 prost stores, read at `field`.
    fn read(value: i32, field: &str) -> Result<Self, Malformed> {
        Self::Pb::try_from(value)
            .ok()
            .and_then(Self::from_pb)
            .ok_or_else(|| Malformed::new(field, format!("unknown value {value}")))
    }
}

/// Pairs our enum's variants with the proto enum's, both ways.
macro_rules! wire_enum {
    ($ours:ty, $pb:ty, { $($a:ident => $b:ident),+ $(,)? }) => {
        impl Wire for $ours {
            type Pb = $pb;
            fn to_pb(self) -> $pb {
                match self {
                    $(<$ours>::$a => <$pb>::$b,)+
                }
            }
            fn from_pb(pb: $pb) -> Option<Self> {
                match pb {
                    $(<$pb>::$b => Some(<$ours>::$a),)+
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
        }
    };
}

wire_enum!(ChangesetFailure, pb::ChangesetFailure, {
    Halt => Halt,
    BackoutAll => BackoutAll,
});
wire_enum!(RolloutMode, pb::RolloutMode, {
    Serial => Serial,
    Parallel => Parallel,
    Rolling => Rolling,
});
wire_enum!(OnFailure, pb::OnFailure, {
    Halt => Halt,
    Continue => Continue,
    BackoutAll => BackoutAll,
});
wire_enum!(ApproveAt, pb::ApproveAt, {
    None => None,
    Once => Once,
    EachBatch => EachBatch,
    EachHost => EachHost,
});
wire_enum!(Phase, pb::Phase, {
    SkipIf => SkipIf,
    Check => Check,
    Apply => Apply,
    Verify => Verify,
    BackoutCheck => BackoutCheck,
    Restore => Restore,
    Backout => Backout,
    BackoutVerify => BackoutVerify,
});
wire_enum!(FailureReason, pb::FailureReason, {
    NonzeroExit => NonzeroExit,
    ConditionFailed => ConditionFailed,
    Timeout => Timeout,
    Lost => Lost,
    Unreachable => Unreachable,
    Cancelled => Cancelled,
});
wire_enum!(Termination, pb::Termination, {
    Exited => Exited,
    TimedOut => TimedOut,
    Cancelled => Cancelled,
    Lost => Lost,
    Unreachable => Unreachable,
    FailedToStart => FailedToStart,
});
wire_enum!(HostState, pb::HostState, {
    Pending => Pending,
    Running => Running,
    RetryPending => RetryPending,
    Success => Success,
    Skipped => Skipped,
    Failed => Failed,
    BackingOut => BackingOut,
    BackoutOk => BackoutOk,
    BackoutFailed => BackoutFailed,
    Cancelled => Cancelled,
    Lost => Lost,
    BackoutPending => BackoutPending,
    Queued => Queued,
});
wire_enum!(RunState, pb::RunState, {
    Pending => Pending,
    Running => Running,
    AwaitingApproval => AwaitingApproval,
    Paused => Paused,
    Success => Success,
    PartialFailure => PartialFailure,
    TotalFailure => TotalFailure,
    BackoutOk => BackoutOk,
    BackoutFailed => BackoutFailed,
    BailedOut => BailedOut,
    Cancelled => Cancelled,
});

/// A run state for the wire (`RunSummary.state`, `ControlResponse.state`).
pub fn run_state(state: RunState) -> i32 {
    state.wire()
}

/// A run state from the wire, read at `field`.
pub fn run_state_from(value: i32, field: &str) -> Result<RunState, Malformed> {
    RunState::read(value, field)
}

/// An index for the wire (indexes are positions in lists far below 2^32).
fn index(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

/// An index from the wire.
fn unindex(i: u32) -> usize {
    i as usize
}
