//! What both modi binaries share, and nothing else: the controller does
//! not link the agent, and the agent does not link the controller.
//!
//! - [`fsutil`]: crash-safe file writes (temp file, fsync, rename).
//! - [`shutdown_signal`]: SIGTERM or SIGINT, how both daemons learn to stop.
//! - [`error_chain`]: a gRPC status and its sources, for people.
//!
//! The wire protocol and the trust scheme both ends agree on live in
//! `modi-proto`.

pub mod fsutil;

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
