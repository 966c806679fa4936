//! A run's ports: what its driver receives and what its watchers see.
//!
//! The fleet and the services talk to a running run only through these
//! (the fleet routes agents' results and output to them; the admin service
//! sends controls and status requests, and watches), so none of them
//! depends on the driver, which owns the other ends.

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::rollout::{DispatchId, Event, Progress, RunState, RunStatus, StepResult};
use crate::secret::Secrets;

/// A run's inbox and its watchers.
#[derive(Clone)]
pub struct RunPorts {
    /// The run driver's inbox.
    pub inbox: mpsc::Sender<DriverMsg>,
    /// What watchers of the run see.
    pub watch: broadcast::Sender<WatchItem>,
    /// Hosts the run waits for that became free (connected, or let go
    /// by another run): its driver tries their held dispatches again.
    pub ready: std::sync::Arc<Ready>,
}

/// What a run driver receives.
#[derive(Debug)]
pub enum DriverMsg {
    /// A step's result from its agent (or `lost`, from the fleet).
    Result {
        /// Which dispatch.
        id: DispatchId,
        /// The result.
        result: StepResult,
        /// The agent to ack once it is durable (`None` for a result the
        /// controller made up, e.g. `lost`).
        agent: Option<String>,
    },
    /// A result for a step no longer in flight (declared `lost`, or a
    /// repeat of one already journaled): journaled as late if it was lost,
    /// then acked either way.
    Late {
        /// Which dispatch.
        id: DispatchId,
        /// The result.
        result: StepResult,
        /// The agent that reported it.
        agent: String,
    },
    /// An operator's approve/deny/abort/pause/resume.
    Control {
        /// The event.
        event: Event,
        /// The run's state after it, or why it was refused.
        reply: oneshot::Sender<Result<RunState, String>>,
    },
    /// `modi resume RUN --secret ...`: the secrets a run lost in a
    /// controller restart. Checked against what the run needs; a run that
    /// was also paused by an operator is resumed.
    Secrets {
        /// The values.
        secrets: Secrets,
        /// The name on the admin certificate.
        by: String,
        /// The run's state after it, or why they were refused.
        reply: oneshot::Sender<Result<RunState, String>>,
    },
    /// A status snapshot, please.
    Status {
        /// Where to send it.
        reply: oneshot::Sender<RunStatus>,
    },
}

/// What watchers of a run see.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum WatchItem {
    /// A progress event from the engine.
    Progress {
        /// The event.
        progress: Progress,
    },
    /// A step was sent.
    Dispatched {
        /// Which dispatch.
        id: DispatchId,
        /// To which host.
        host: String,
        /// What it runs, for people.
        step: String,
    },
    /// A step's result arrived (judged by the next `Progress::Step`).
    Result {
        /// Which dispatch.
        id: DispatchId,
        /// The result.
        result: StepResult,
    },
    /// A result that came back after its step was declared `lost`; the
    /// outcome stands.
    Late {
        /// Which dispatch.
        id: DispatchId,
        /// What really happened.
        result: StepResult,
    },
    /// Live output of a step.
    Output {
        /// Which dispatch.
        id: DispatchId,
        /// stderr (else stdout).
        stderr: bool,
        /// The text.
        data: String,
    },
}

/// Wake-ups for a run's dispatches held for a host: the fleet names the
/// host, the driver takes the names and tries only those hosts' held
/// dispatches again (never every held dispatch on every event).
#[derive(Debug, Default)]
pub struct Ready {
    hosts: std::sync::Mutex<std::collections::HashSet<String>>,
    notify: tokio::sync::Notify,
}

impl Ready {
    /// `host` may be free now.
    pub fn wake(&self, host: &str) {
        self.hosts
            .lock()
            .expect("ready lock")
            .insert(host.to_string());
        // Kept as a permit if the driver is not waiting now.
        self.notify.notify_one();
    }

    /// The hosts named since the last call.
    pub fn take(&self) -> std::collections::HashSet<String> {
        std::mem::take(&mut *self.hosts.lock().expect("ready lock"))
    }

    /// Waits until a host is named.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}
