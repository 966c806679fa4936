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
//! - [`config`]: the typed configuration and its defaults.
//! - [`facts`]: what the agent reports about its host.
//! - [`fsutil`]: crash-safe file writes.
//!
//! The agent depends on the protocol crate and what it needs to run
//! commands; it never links sled, the changeset language or the CLI.

pub mod config;
pub mod enroll;
pub mod exec;
pub mod facts;
pub mod fsutil;
pub mod journal;
pub mod pgroup;
pub mod renew;
pub mod secrets;
pub mod session;

pub use config::AgentConfig;
pub use enroll::{JoinError, JoinRequest, join};
pub use session::{RunError, run};

/// Resolves on SIGTERM or SIGINT: how both daemons learn to stop.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// A gRPC status and all its sources, `: `-separated, for people. tonic's
/// transport errors keep the real reason (a refused certificate, a
/// connection refused) a few sources down.
pub fn error_chain(status: &tonic::Status) -> String {
    use std::error::Error;
    let mut out = status.message().to_string();
    let mut source = status.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
