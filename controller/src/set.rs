//! A controller set: several `modi serve` on one etcd, one of them active.
//!
//! The active controller holds the key `<prefix>active` (its advertised
//! URL), attached to its etcd lease: it serves the agents, drives every
//! run and answers the admin API. The others are on standby: they keep
//! their mirror of the store current, answer `UNAVAILABLE` ("on standby;
//! the active controller is ...") to agents and operators, whose clients
//! then try the next controller they know, and report NOT_SERVING on the
//! gRPC health service. When the active controller dies its lease expires
//! after its TTL (5 s by default), the key goes with it, and the first
//! standby to write it takes over: it waits until its mirror has every
//! write made before, resumes every unfinished run from its journal (as a
//! restarted controller does), and only then lets agents in. Everything a
//! run needs is in the journal, and the journal is in etcd; the
//! exactly-once rules (dispatch ids, the agents' result journals, acks
//! after the journal write) hold across controllers as across restarts.
//!
//! A controller that lost its lease while active (cut off from etcd for
//! longer than the TTL) has been replaced: it exits at once (status 75),
//! and the store's write lock keeps it from writing in between. Its
//! service manager starts it again, on standby.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

use crate::store::etcd::{self, Link};

/// How often a standby checks whether the active controller's key is
/// still there.
pub const CAMPAIGN_EVERY: Duration = Duration::from_millis(250);
/// Exit status of a controller that lost its lease while active.
pub const EXIT_REPLACED: i32 = 75;

/// Whether this controller is the active one of its set.
#[derive(Clone)]
pub struct Role {
    active: tokio::sync::watch::Sender<bool>,
    /// Active, but cut off from etcd for longer than its lease's TTL.
    cut_off: Arc<std::sync::atomic::AtomicBool>,
    /// The active controller's URL, as the standby last saw it.
    leader: Arc<std::sync::Mutex<String>>,
}

impl Role {
    /// A lone controller (sled): always active.
    pub fn alone() -> Role {
        Role {
            active: tokio::sync::watch::Sender::new(true),
            cut_off: Arc::default(),
            leader: Arc::default(),
        }
    }

    /// A member of a set, on standby until it wins.
    pub fn standby() -> Role {
        Role {
            active: tokio::sync::watch::Sender::new(false),
            cut_off: Arc::default(),
            leader: Arc::default(),
        }
    }

    /// Whether this controller is active now.
    pub fn is_active(&self) -> bool {
        *self.active.borrow()
    }

    /// Changes of [`Role::is_active`].
    pub fn changes(&self) -> tokio::sync::watch::Receiver<bool> {
        self.active.subscribe()
    }

    /// It became active (again).
    pub fn activate(&self) {
        self.cut_off
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.active.send_replace(true);
    }

    /// It is cut off from etcd: it serves nobody until etcd answers.
    pub fn suspend(&self) {
        self.cut_off
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.active.send_replace(false);
    }

    /// The active controller's URL, while this one is on standby and
    /// knows it (what a relay dials); `None` when active or cut off.
    pub fn leader(&self) -> Option<String> {
        if self.is_active() || self.cut_off.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let leader = self.leader.lock().expect("leader").clone();
        (!leader.is_empty()).then_some(leader)
    }

    /// Why a call is refused on standby.
    pub fn refusal(&self) -> Status {
        if self.cut_off.load(std::sync::atomic::Ordering::Relaxed) {
            return Status::unavailable(
                "this controller cannot reach its store (etcd) and serves nobody until it can; \
                 another controller of the set takes over if etcd has a quorum",
            );
        }
        let leader = self.leader.lock().expect("leader").clone();
        let active = if leader.is_empty() {
            "no controller is active yet (one takes over within the lease TTL)".to_string()
        } else {
            format!("the active controller is {leader}")
        };
        Status::unavailable(format!("this controller is on standby; {active}"))
    }
}

/// Campaigns until this controller holds `<prefix>active`, then waits
/// until its mirror has every write made before. `url` is what the key
/// says (the controller's advertised URL).
pub async fn campaign(link: &Arc<Link>, url: &str, role: &Role) {
    let key = link.key(b"active");
    let mut told = String::new();
    loop {
        let lease = link.lease();
        if lease != 0 {
            let answer = link
                .txn(
                    "campaign",
                    etcd::pb::TxnRequest {
                        compare: vec![etcd::absent(key.clone())],
                        success: vec![etcd::put_op(key.clone(), url.as_bytes().to_vec(), lease)],
                        failure: vec![etcd::range_op(key.clone())],
                    },
                )
                .await;
            match answer {
                Ok(a) => {
                    let holder = etcd::first_kv(&a);
                    let won = a.succeeded || holder.as_ref().is_some_and(|kv| kv.lease == lease);
                    if won {
                        let revision = a.header.map_or(0, |h| h.revision);
                        if link.caught_up(revision).await {
                            // From here on, losing the lease means
                            // another controller takes over: exit.
                            link.exit_on_lease_loss(EXIT_REPLACED);
                            *role.leader.lock().expect("leader") = url.to_string();
                            tracing::info!("this controller is now the active one of its set");
                            return;
                        }
                    } else if let Some(kv) = holder {
                        let leader = String::from_utf8_lossy(&kv.value).into_owned();
                        if leader != told {
                            tracing::info!(active = %leader, "on standby");
                            told = leader.clone();
                        }
                        *role.leader.lock().expect("leader") = leader;
                    }
                }
                Err(f) => tracing::warn!(error = %f.cause(), "cannot reach etcd to campaign"),
            }
        }
        tokio::time::sleep(CAMPAIGN_EVERY).await;
    }
}

/// A member's life in its set: on standby until it wins the campaign;
/// then it takes over (the startup grace for the agents coming, the
/// revocations the previous active controller made, every unfinished run
/// resumed from its journal), lets agents in, and follows etcd.
pub async fn member(shared: Arc<crate::server::Shared>, link: Arc<Link>) {
    campaign(&link, &shared.config.advertise, &shared.role).await;
    shared.fleet.restart_grace();
    match shared.store.revoked_serials() {
        Ok(serials) => *shared.revoked.write().expect("revoked lock") = serials,
        Err(e) => tracing::error!(error = %e, "cannot read revocations"),
    }
    if let Err(e) = crate::server::resume_runs(&shared) {
        tracing::error!(error = %e, "cannot resume the set's runs; exiting");
        std::process::exit(EXIT_REPLACED);
    }
    shared.role.activate();
    follow_etcd(&link, &shared.role, &shared.fleet).await;
}

/// While active: when this controller is cut off from etcd for longer
/// than its lease's TTL, it stops serving (its agents leave: another
/// controller may take over, and they must reach that one), and serves
/// again when etcd answers with its lease still alive (etcd keeps leases
/// through a lost quorum). If etcd says the lease expired, the process
/// exits instead (see [`Link::exit_on_lease_loss`]).
pub async fn follow_etcd(link: &Arc<Link>, role: &Role, fleet: &crate::fleet::Fleet) {
    let mut cut_off = link.cut_off();
    while cut_off.changed().await.is_ok() {
        if *cut_off.borrow_and_update() {
            tracing::warn!("cut off from etcd: serving nobody until it answers");
            role.suspend();
            fleet.restart_grace();
            fleet.kick_all().await;
        } else {
            tracing::info!("etcd answers again: serving");
            fleet.restart_grace();
            role.activate();
        }
    }
}

/// In front of the admin service: on standby, every call is relayed to
/// the active controller (see `service::relay`), with the caller's
/// certificate in [`crate::service::relay::OPERATOR_HEADER`], so admin
/// calls work on any controller of a set; refused with
/// [`Role::refusal`] while no active controller is known.
#[derive(Clone)]
pub struct Standby<S> {
    inner: S,
    shared: std::sync::Weak<crate::server::Shared>,
}

impl<S> Standby<S> {
    /// Guards `inner`.
    pub fn new(inner: S, shared: &Arc<crate::server::Shared>) -> Self {
        Standby {
            inner,
            shared: Arc::downgrade(shared),
        }
    }
}

impl<S: NamedService> NamedService for Standby<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Standby<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let Some(shared) = self.shared.upgrade() else {
            let closed = Status::unavailable("the controller is stopping").into_http();
            return Box::pin(async move { Ok(closed) });
        };
        if !shared.role.is_active() {
            return Box::pin(async move {
                Ok(crate::service::relay::admin_call(&shared, req)
                    .await
                    .unwrap_or_else(Status::into_http))
            });
        }
        // The service that was polled ready handles this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move { inner.call(req).await })
    }
}
