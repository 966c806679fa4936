//! modi's agent: a small program on each managed host that enrols with the
//! controller, holds one mutual-TLS gRPC stream to it, runs the steps it
//! is sent, and reports their results exactly once.
//!
//! Where to start reading:
//! - [`session`]: the connection loop (`run`), the heart of the agent.
//! - [`exec`]: how a step runs (process groups, timeouts, output caps,
//!   `file`, `restore` and `interact` steps).
//! - [`journal`]: the local record that makes steps exactly-once and has
//!   a restarting agent kill the steps its previous life left running.
//! - [`pgroup`]: steps' process groups as the journal records them, and
//!   how they are found and killed after a restart.
//! - [`secrets`]: a step's secrets, in memory only: filled in where the
//!   step holds their placeholders, masked in its output.
//! - [`enroll`]: `modi-agent join`.
//! - [`probe`]: asks the controller whether it refuses this agent's
//!   certificate as revoked (then the agent stops instead of retrying).
//! - [`config`]: the typed configuration and its defaults.
//! - [`facts`]: what the agent reports about its host.
//! - `fsutil`, `shutdown_signal`, `error_chain`: from `modi-common`, the
//!   small crate both binaries share.
//!
//! The agent depends on the protocol crate and what it needs to run
//! commands; it never links sled, the changeset language or the CLI.

pub mod config;
pub mod enroll;
pub mod exec;
pub mod facts;
pub mod journal;
pub mod pgroup;
pub mod probe;
pub mod renew;
pub mod secrets;
pub mod session;

pub use config::AgentConfig;
pub use enroll::{JoinError, JoinRequest, join};
pub use modi_common::{error_chain, fsutil, shutdown_signal};
pub use session::{RunError, run};
