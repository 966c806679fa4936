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

/// `modi store export|import`: opens the store the config names (the
/// controller must be stopped: sled's lock says so) and moves records.
pub async fn store(
    out: &super::Output,
    command: super::StoreCommand,
) -> Result<super::Outcome, CliError> {
    let (config, file) = match &command {
        super::StoreCommand::Export { config, .. } => (config.clone(), None),
        super::StoreCommand::Import { config, file } => (config.clone(), Some(file.clone())),
    };
    let path = config.unwrap_or_else(|| config::default_data_dir().join(config::CONTROLLER_FILE));
    let config = ControllerConfig::load(&path).map_err(|e| CliError::Input(e.to_string()))?;
    let store = match &config.etcd {
        None => crate::store::Store::open(&config.file(config::files::DB)),
        Some(etcd) => crate::store::Store::open_etcd(etcd).await,
    }
    .map_err(|e| match e {
        crate::store::StoreError::Busy(_) => CliError::Input(e.to_string()),
        other => CliError::Failed(other.to_string()),
    })?;
    let failed = |e: crate::store::dump::DumpError| match e {
        crate::store::dump::DumpError::Store(s) => CliError::Failed(s.to_string()),
        other => CliError::Input(other.to_string()),
    };
    match command {
        super::StoreCommand::Export { to, .. } => {
            let n = match &to {
                Some(p) => {
                    let file = std::fs::File::create(p).map_err(|e| {
                        CliError::Input(format!("cannot write {}: {e}", p.display()))
                    })?;
                    store
                        .export(&mut std::io::BufWriter::new(file))
                        .map_err(failed)?
                }
                None => store
                    .export(&mut std::io::BufWriter::new(std::io::stdout().lock()))
                    .map_err(failed)?,
            };
            out.note(format!("exported {n} records"));
        }
        super::StoreCommand::Import { .. } => {
            let file = file.expect("import names a file");
            let reader = std::fs::File::open(&file)
                .map_err(|e| CliError::Input(format!("cannot read {}: {e}", file.display())))?;
            let n = store
                .import(std::io::BufReader::new(reader))
                .await
                .map_err(|e| match e {
                    crate::store::dump::DumpError::Bad { .. } => {
                        CliError::Input(format!("{}: {e}", file.display()))
                    }
                    other => failed(other),
                })?;
            store
                .flush()
                .await
                .map_err(|e| CliError::Failed(e.to_string()))?;
            out.note(format!("imported {n} records"));
        }
    }
    Ok(super::Outcome::Ok)
}
