//! `modi serve`: the daemon's life.

use std::path::PathBuf;

use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::config::{self, ControllerConfig};
use crate::server::{ServeError, Server};

/// Logging, config (a bad config exits 2 before any port opens), bind and
/// log the address, serve until SIGTERM/SIGINT, drain.
pub async fn run(config: Option<PathBuf>) -> Result<(), CliError> {
    let path = config.unwrap_or_else(|| config::default_data_dir().join(config::CONTROLLER_FILE));
    let config = ControllerConfig::load(&path).map_err(|e| CliError::Input(e.to_string()))?;
    let shutdown = CancellationToken::new();
    let server = Server::bind(config, shutdown.clone())
        .await
        .map_err(|e| match e {
            ServeError::Missing { .. }
            | ServeError::Pki(_)
            | ServeError::Bind { .. }
            | ServeError::Store(crate::store::StoreError::Busy(_)) => {
                CliError::Input(e.to_string())
            }
            other => CliError::Failed(other.to_string()),
        })?;
    let addr = server
        .local_addr()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    tracing::info!(%addr, "modi controller listening");
    tokio::spawn(async move {
        modi_common::shutdown_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    server
        .run()
        .await
        .map_err(|e| CliError::Failed(e.to_string()))
}
