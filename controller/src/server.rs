//! `modi serve`: the controller daemon's life. Load the CA and certs, open
//! the store, bind, resume unfinished runs from their journals, serve both
//! gRPC services (and the agent install paths, see `install`) on one TLS
//! 1.3 port, and on shutdown stop accepting, let
//! drivers finish their journal writes, and flush the store last.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use modi_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alert::Alerts;
use crate::clock::Clock;
use crate::config::{ADMIN_DEADLINE, ControllerConfig, SHUTDOWN_GRACE, files};
use crate::driver;
use crate::fleet::Fleet;
use crate::pki::{self, Ca, RevokedSerials};
use crate::rollout::Judge;
use crate::service::admin::AdminApi;
use crate::service::agent::AgentApi;
use crate::service::authz::Authz;
use crate::store::{Store, StoreError};

/// Largest gRPC message (plans of big fleets are large).
pub const MAX_MESSAGE: usize = 64 << 20;
/// How long a TLS handshake may take, waiting for its turn included.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// TLS handshakes done at once. A reconnect storm (every agent of a large
/// fleet dialling a restarted controller) queues here instead of starting
/// thousands of handshakes that all share the cores and all time out;
/// those not served within [`HANDSHAKE_TIMEOUT`] are dropped, and their
/// agents come back after a jittered backoff.
pub const MAX_HANDSHAKES: usize = 128;

/// Why the controller could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A data-dir file is missing or unreadable.
    #[error("cannot read {path}: {source} (did you run `modi init`?)")]
    Missing {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Certificates or keys are unusable.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// What every part of the running controller shares.
pub struct Shared {
    /// The configuration.
    pub config: ControllerConfig,
    /// The store.
    pub store: Store,
    /// The live fleet.
    pub fleet: Fleet,
    /// The CA.
    pub ca: Ca,
    /// Revoked certificate serials (read at every handshake).
    pub revoked: RevokedSerials,
    /// Condition evaluation.
    pub judge: Arc<dyn Judge>,
    /// What run drivers need.
    pub drivers: driver::Context,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
    /// Every background task.
    pub tasks: TaskTracker,
    /// Who is signed in to the web view.
    pub web: crate::web::Sessions,
    /// Agent sessions being set up at once (Hello read, connection
    /// recorded): see [`crate::service::agent::MAX_HELLOS`].
    pub hellos: Arc<tokio::sync::Semaphore>,
    /// Active, or on standby in a controller set (see [`crate::set`]).
    pub role: crate::set::Role,
    /// The certificate a standby relays its agents with.
    pub relay: crate::service::relay::RelayIdentity,
}

/// A bound, not yet serving, controller.
pub struct Server {
    shared: Arc<Shared>,
    listener: TcpListener,
    /// `/metrics`, when `metrics_listen` is set.
    metrics_listener: Option<TcpListener>,
    /// The web view, when `web_listen` is set, with its TLS.
    web_listener: Option<(TcpListener, TlsAcceptor)>,
    tls: TlsAcceptor,
}

fn read(config: &ControllerConfig, name: &str) -> Result<String, ServeError> {
    let path = config.file(name);
    std::fs::read_to_string(&path).map_err(|source| ServeError::Missing { path, source })
}

impl Server {
    /// Loads the CA, certificates and store, and binds the listen address.
    /// `shutdown` stops everything.
    pub async fn bind(
        config: ControllerConfig,
        shutdown: CancellationToken,
    ) -> Result<Server, ServeError> {
        let ca = Ca::load(
            &read(&config, files::CA_CERT)?,
            &read(&config, files::CA_KEY)?,
        )?;
        let cert = read(&config, files::SERVER_CERT)?;
        let key = read(&config, files::SERVER_KEY)?;
        let store = match &config.etcd {
            None => Store::open(&config.file(files::DB))?,
            Some(etcd) => Store::open_etcd(etcd).await?,
        };
        bootstrap_operator(&store, &config).await?;
        let revoked: RevokedSerials = Arc::new(RwLock::new(store.revoked_serials()?));
        let tls = pki::server_config(&ca, &cert, &key, revoked.clone())?;
        let listener =
            TcpListener::bind(&config.listen)
                .await
                .map_err(|source| ServeError::Bind {
                    addr: config.listen.clone(),
                    source,
                })?;
        let tasks = TaskTracker::new();
        let clock = Clock::system();
        let fleet = Fleet::new(
            store.clone(),
            config.agent_lost_after,
            clock,
            tasks.clone(),
            shutdown.clone(),
        );
        let judge: Arc<dyn Judge> = Arc::new(crate::changeset::CelJudge::new());
        let drivers = driver::Context {
            store: store.clone(),
            fleet: fleet.clone(),
            alerts: Alerts::new(
                config.webhook.clone(),
                config.alert_command.clone(),
                tasks.clone(),
                shutdown.clone(),
            ),
            judge: judge.clone(),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            backout_wait: config.backout_wait,
            metrics: crate::metrics::Metrics::new(),
            clock,
        };
        let metrics = drivers.metrics.clone();
        store.on_flush(move |took| metrics.flushed(took));
        let metrics_listener = match &config.metrics_listen {
            Some(addr) => {
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| ServeError::Bind {
                            addr: addr.clone(),
                            source,
                        })?,
                )
            }
            None => None,
        };
        let web_listener = match &config.web_listen {
            Some(addr) => {
                let l = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::Bind {
                        addr: addr.clone(),
                        source,
                    })?;
                let tls = pki::web_server_config(&ca, &cert, &key)?;
                Some((l, TlsAcceptor::from(Arc::new(tls))))
            }
            None => None,
        };
        let web = crate::web::Sessions::new(store.clone(), clock);
        let role = match store.etcd() {
            None => crate::set::Role::alone(),
            Some(_) => crate::set::Role::standby(),
        };
        let shared = Arc::new(Shared {
            role,
            relay: Default::default(),
            web,
            config,
            store,
            fleet,
            ca,
            revoked,
            judge,
            drivers,
            shutdown,
            tasks,
            hellos: Arc::new(tokio::sync::Semaphore::new(
                crate::service::agent::MAX_HELLOS,
            )),
        });
        Ok(Server {
            shared,
            listener,
            metrics_listener,
            web_listener,
            tls: TlsAcceptor::from(Arc::new(tls)),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Resumes unfinished runs, then serves until shutdown; drains with a
    /// deadline and flushes the store last.
    pub async fn run(self) -> Result<(), ServeError> {
        let Server {
            shared,
            listener,
            metrics_listener,
            web_listener,
            tls,
        } = self;
        match shared.store.etcd().cloned() {
            None => resume_runs(&shared)?,
            // In a set: serve at once (on standby), take over when the
            // active controller's key is free.
            Some(link) => {
                let campaign = crate::set::member(shared.clone(), link);
                let stop = shared.shutdown.clone();
                shared.tasks.spawn(async move {
                    tokio::select! {
                        _ = campaign => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        }
        if let Some((l, tls)) = web_listener {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "serving the web view");
            }
            shared
                .tasks
                .spawn(crate::web::serve(l, tls, shared.clone()));
        }
        if let Some(l) = metrics_listener {
            if let Ok(addr) = l.local_addr() {
                tracing::info!(%addr, "serving /metrics");
            }
            shared.tasks.spawn(crate::metrics::serve(
                l,
                shared.drivers.metrics.clone(),
                shared.fleet.clone(),
                shared.store.clone(),
                shared.shutdown.clone(),
            ));
        }
        let shutdown = shared.shutdown.clone();
        let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(256);
        let accept_shutdown = shutdown.clone();
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        shared.tasks.spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "accept failed");
                            continue;
                        }
                    },
                    _ = accept_shutdown.cancelled() => break,
                };
                let _ = tcp.set_nodelay(true);
                let tls = tls.clone();
                let conn_tx = conn_tx.clone();
                let handshakes = handshakes.clone();
                tokio::spawn(async move {
                    let handshake = async {
                        let _turn = handshakes.acquire().await;
                        tls.accept(tcp).await
                    };
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => {
                            let _ = conn_tx.send(Ok::<_, std::io::Error>(stream)).await;
                        }
                        Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        // What an agent sends is bounded on the way in too.
        // On standby, agents are relayed to the active controller (see
        // `service::relay`) and operators sent to it.
        let agent =
            pb::agent_service_server::AgentServiceServer::new(AgentApi::new(shared.clone()))
                .max_decoding_message_size(crate::limits::MAX_AGENT_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
        // Every admin call passes the one authorisation layer first.
        let admin = crate::set::Standby::new(
            Authz::new(
                pb::admin_service_server::AdminServiceServer::new(AdminApi::new(shared.clone()))
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
                shared.store.clone(),
                shared.revoked.clone(),
                shared.drivers.clock,
            ),
            &shared,
        );
        // The standard gRPC health service: SERVING while the store can
        // write and this controller is active, NOT_SERVING otherwise.
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<pb::admin_service_server::AdminServiceServer<AdminApi>>()
            .await;
        let mut store_health = shared.store.health_changes();
        let mut active = shared.role.changes();
        shared.tasks.spawn({
            let shutdown = shutdown.clone();
            async move {
                loop {
                    let ok =
                        store_health.borrow_and_update().is_none() && *active.borrow_and_update();
                    let status = if ok {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    };
                    health_reporter.set_service_status("", status).await;
                    tokio::select! {
                        changed = store_health.changed() => if changed.is_err() { break },
                        changed = active.changed() => if changed.is_err() { break },
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        });
        // The one-line agent install is served on the same port.
        let routes = crate::install::routes(
            tonic::service::Routes::new(agent)
                .add_service(admin)
                .add_service(health),
            shared.clone(),
        );
        let serve_shutdown = shutdown.clone();
        let mut serving = tokio::spawn(
            tonic::transport::Server::builder()
                // HTTP/1.1 too, for curl fetching the install paths.
                .accept_http1(true)
                // No call waits forever: past this it is answered
                // "deadline exceeded" (a stream counts until it starts).
                .timeout(ADMIN_DEADLINE)
                .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
                .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
                .add_routes(routes)
                .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
                    serve_shutdown.cancelled().await
                }),
        );
        let served = tokio::select! {
            served = &mut serving => served,
            _ = shutdown.cancelled() => {
                // Open streams (watchers, agents) are given the grace to
                // end, then cut.
                match tokio::time::timeout(SHUTDOWN_GRACE, &mut serving).await {
                    Ok(served) => served,
                    Err(_) => {
                        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
                        serving.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        let served = served.unwrap_or(Ok(()));
        // Drain: drivers finish the journal write they are in.
        shutdown.cancel();
        shared.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, shared.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within {SHUTDOWN_GRACE:?}");
        }
        // Last: everything written is durable (the writer answers at once
        // with the cause if the store cannot write).
        if let Err(e) = shared.store.flush().await {
            tracing::warn!(error = %e, "final flush of the store failed");
        }
        served?;
        Ok(())
    }
}

/// The first operator: with no operator on record (a new controller, or
/// one from before operators were named), the holder of the admin
/// certificate `modi init` made is the admin.
async fn bootstrap_operator(store: &Store, config: &ControllerConfig) -> Result<(), ServeError> {
    if !store.operators()?.is_empty() {
        return Ok(());
    }
    let Ok(pem) = std::fs::read_to_string(config.file(files::ADMIN_CERT)) else {
        tracing::warn!("no operators and no admin certificate: nobody can use the admin API");
        return Ok(());
    };
    let der = modi_proto::tls::certs_from_pem("admin certificate", &pem)
        .map_err(|e| pki::PkiError::BadInput {
            what: "admin certificate",
            detail: e.to_string(),
        })?
        .remove(0);
    let id = modi_proto::identity::from_der(&der).map_err(|e| pki::PkiError::BadInput {
        what: "admin certificate",
        detail: e.to_string(),
    })?;
    let op = crate::store::OperatorRecord {
        name: id.name.clone(),
        role: crate::store::OperatorRole::Admin,
        created_at: crate::clock::now(),
        created_by: "modi init".into(),
        serials: pki::serial_of(&der).into_iter().collect(),
        cert_expires_at: 0,
        revoked: false,
    };
    // The store was just checked empty; a failure here is a store failure.
    let _ = store.add_operator(op).await?;
    tracing::info!(operator = %id.name, "first operator (role admin) from the admin certificate");
    Ok(())
}

/// Carries every run that was not finished on to its end.
pub(crate) fn resume_runs(shared: &Arc<Shared>) -> Result<(), ServeError> {
    for meta in shared.store.runs()? {
        if meta.finished_at.is_some() {
            continue;
        }
        let Some(replayed) = driver::replay(&shared.store, shared.judge.clone(), meta.id)? else {
            continue;
        };
        driver::resume(&shared.drivers, meta.id, replayed, meta);
    }
    Ok(())
}
