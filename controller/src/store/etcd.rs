//! The store kept in etcd, for a set of controllers sharing one fleet.
//!
//! **Layout.** Everything lives under one key prefix (`modi/` unless
//! configured, so two fleets can share an etcd): `<prefix>t/<tree>/<key>`
//! holds what the sled store keeps in tree `<tree>` under `<key>` (the
//! same bytes), `<prefix>lock/writer` is the write lock, and
//! `<prefix>active` names the active controller of a set (see
//! `crate::set`).
//!
//! **Reads** go to a mirror: a temporary sled database, loaded from etcd
//! when the store opens and kept current by one watch of the prefix. So a
//! read costs what it costs with sled, and every controller of a set sees
//! the others' writes a moment after they are made.
//!
//! **Writes** keep the store's one writer and its group commit. Before a
//! group, the writer takes the write lock (a key attached to this
//! controller's lease) and waits until its mirror holds every write made
//! before it (the watch has delivered the lock's own revision). It applies
//! the group's jobs to the mirror, recording each write with the value it
//! replaced, then sends them as etcd transactions, each guarded by "the
//! lock is still ours" — a controller that lost its lease (a pause, a
//! partition) can never overwrite what its successor wrote. A group is
//! answered `Ok` once etcd has committed all of it. If etcd refuses or
//! cannot be reached, the mirror's writes are undone (keeping those etcd
//! did commit) and the group fails, as a full disk fails a sled write; the
//! store is unwritable until a quorum answers again. The lock is let go
//! after [`IDLE_RELEASE`] without writes, so controllers take turns.
//!
//! A transaction carries at most [`TXN_OPS`] operations and about
//! [`TXN_BYTES`] bytes (etcd's defaults allow 128 and 1.5 MiB); a larger
//! group is sent as several, in order, so a crash keeps a prefix of it —
//! what a sled flush cut short keeps too.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

pub use modi_proto::etcd as pb;
use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use super::{StoreError, Trees};

/// How long the writer keeps the write lock with nothing to write.
pub const IDLE_RELEASE: Duration = Duration::from_millis(20);
/// Most operations in one etcd transaction (etcd's `--max-txn-ops`
/// default is 128).
pub const TXN_OPS: usize = 128;
/// Bytes of keys and values after which a transaction is cut (etcd's
/// `--max-request-bytes` default is 1.5 MiB; a single larger value is sent
/// alone and needs that limit raised, see docs/operations.md).
pub const TXN_BYTES: usize = 1 << 20;
/// How long one call to etcd may take, over every endpoint it tries.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one endpoint may take to answer before the next is tried (a
/// member that died or lost its peers; an election takes about a second).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);
/// The default time to live of a controller's lease.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// Keys read per page when the mirror is loaded.
const PAGE: i64 = 256;
/// The largest answer taken from etcd: a page of large records (a big
/// run's summary), or a watch message carrying a whole transaction.
const MAX_ANSWER: usize = 256 << 20;

/// `[store]` with `backend = "etcd"`, as `controller.toml` gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// etcd's client URLs (`http://host:2379`, or `https://` with `ca`).
    pub endpoints: Vec<String>,
    /// The key prefix everything is kept under.
    pub prefix: String,
    /// The CA that signed etcd's server certificate (PEM), for `https`.
    pub ca: Option<std::path::PathBuf>,
    /// A client certificate (PEM) for etcd's `--client-cert-auth`.
    pub cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM).
    pub key: Option<std::path::PathBuf>,
    /// The controller's lease: when it stops renewing it (it died), its
    /// write lock and the runs it drove are free after this long.
    pub lease_ttl: Duration,
}

/// The prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "modi/";

impl EtcdConfig {
    /// A configuration for `endpoints` with every default.
    pub fn new(endpoints: Vec<String>, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: prefix.into(),
            ca: None,
            cert: None,
            key: None,
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }
}

/// One write recorded by the writer: what it set (`None`: removed) and
/// what it replaced.
pub(super) struct Op {
    pub tree: sled::IVec,
    pub key: sled::IVec,
    pub value: Option<sled::IVec>,
    pub old: Option<sled::IVec>,
}

/// Why etcd did not take a write.
pub enum Failure {
    /// etcd cannot be reached or has no quorum: the store is unwritable
    /// until it answers.
    Down(Arc<str>),
    /// etcd answered, and said no (the write lock is another's).
    Refused(Arc<str>),
}

impl Failure {
    /// Whether etcd could not be reached (or had no quorum).
    pub fn is_down(&self) -> bool {
        matches!(self, Failure::Down(_))
    }

    /// What went wrong, in words.
    pub fn cause(&self) -> Arc<str> {
        match self {
            Failure::Down(c) | Failure::Refused(c) => c.clone(),
        }
    }
}

/// Revisions the mirror has, guarded together.
#[derive(Default)]
struct Applied {
    /// Every event up to this revision is in the mirror.
    seen: i64,
    /// The last revision this controller committed itself (its writes are
    /// in the mirror already; the watch skips them).
    local: i64,
}

/// A connection to etcd and what this controller holds there.
pub struct Link {
    rt: tokio::runtime::Handle,
    /// One channel per endpoint; calls go to `current` and move on to the
    /// next when it cannot be reached.
    channels: Vec<Channel>,
    current: std::sync::atomic::AtomicUsize,
    prefix: Vec<u8>,
    /// Who this controller is, in the keys it holds.
    id: String,
    ttl: Duration,
    /// This controller's lease (0 while it has none).
    lease: AtomicI64,
    mirror: Trees,
    applied: Mutex<Applied>,
    caught_up: Condvar,
    /// The write lock's creation revision while this controller holds it.
    held: Mutex<Option<i64>>,
    durable_run: Arc<AtomicU64>,
    /// True while etcd has not renewed the lease for longer than its TTL.
    cut_off: tokio::sync::watch::Sender<bool>,
    /// Set once this controller is active: losing the lease then exits
    /// the process with this status (another controller took over).
    exit_on_loss: std::sync::atomic::AtomicI32,
    stop: CancellationToken,
}

fn down(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::Down(format!("etcd: {what}: {e}").into())
}

/// The first key after every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The key-value client on `channel`.
fn kv(channel: Channel) -> KvClient<Channel> {
    KvClient::new(channel)
        .max_decoding_message_size(MAX_ANSWER)
        .max_encoding_message_size(MAX_ANSWER)
}

/// A channel to each endpoint.
fn connect(config: &EtcdConfig) -> Result<Vec<Channel>, StoreError> {
    let bad = |detail: String| StoreError::Etcd(detail.into());
    if config.endpoints.is_empty() {
        return Err(bad(
            "[store] endpoints is empty: name at least one etcd client URL".into(),
        ));
    }
    let tls = match &config.ca {
        None => None,
        Some(ca) => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p)
                    .map_err(|e| bad(format!("cannot read {}: {e}", p.display())))
            };
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
            match (&config.cert, &config.key) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(tonic::transport::Identity::from_pem(
                        read(cert)?,
                        read(key)?,
                    ));
                }
                (None, None) => {}
                _ => return Err(bad("[store] cert and key go together".into())),
            }
            Some(tls)
        }
    };
    let mut endpoints = Vec::new();
    for url in &config.endpoints {
        let mut e = tonic::transport::Endpoint::from_shared(url.clone())
            .map_err(|e| bad(format!("[store] endpoints: {url:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true);
        if url.starts_with("https://") {
            let Some(tls) = &tls else {
                return Err(bad(format!(
                    "[store] endpoints: {url:?} is https but no `ca` is given"
                )));
            };
            e = e
                .tls_config(tls.clone())
                .map_err(|e| bad(format!("[store] TLS: {e}")))?;
        }
        endpoints.push(e.connect_lazy());
    }
    Ok(endpoints)
}

impl Link {
    /// Connects, takes a lease, loads `mirror` and starts the watch and
    /// the lease's renewal.
    pub(super) async fn open(
        config: &EtcdConfig,
        mirror: Trees,
        durable_run: Arc<AtomicU64>,
    ) -> Result<Arc<Link>, StoreError> {
        let channels = connect(config)?;
        let id = format!(
            "{}-{}-{:08x}",
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "controller".into()),
            std::process::id(),
            rand::random::<u32>()
        );
        let link = Arc::new(Link {
            rt: tokio::runtime::Handle::current(),
            channels,
            current: 0.into(),
            prefix: config.prefix.as_bytes().to_vec(),
            id,
            ttl: config.lease_ttl.max(Duration::from_secs(1)),
            lease: AtomicI64::new(0),
            mirror,
            applied: Mutex::new(Applied::default()),
            caught_up: Condvar::new(),
            held: Mutex::new(None),
            durable_run,
            exit_on_loss: 0.into(),
            cut_off: tokio::sync::watch::Sender::new(false),
            stop: CancellationToken::new(),
        });
        let opened = async {
            link.grant().await?;
            link.load().await
        };
        opened.await.map_err(|f| {
            StoreError::Etcd(
                format!(
                    "cannot open the store in etcd at {}: {}",
                    config.endpoints.join(", "),
                    f.cause()
                )
                .into(),
            )
        })?;
        tokio::spawn(link.clone().watch());
        tokio::spawn(link.clone().keep_alive());
        Ok(link)
    }

    /// The full key for `rest` under the prefix.
    pub fn key(&self, rest: &[u8]) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(rest);
        k
    }

    fn tree_key(&self, tree: &[u8], key: &[u8]) -> Vec<u8> {
        let mut k = self.key(b"t/");
        k.extend_from_slice(tree);
        k.push(b'/');
        k.extend_from_slice(key);
        k
    }

    fn lock_key(&self) -> Vec<u8> {
        self.key(b"lock/writer")
    }

    /// The channel calls go to now.
    fn channel(&self) -> (usize, Channel) {
        let i = self.current.load(Ordering::Relaxed) % self.channels.len();
        (i, self.channels[i].clone())
    }

    /// The next calls go to the endpoint after `failed`.
    fn move_on(&self, failed: usize) {
        let _ = self.current.compare_exchange(
            failed,
            (failed + 1) % self.channels.len(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Calls `f` on the current endpoint, moving on to the next ones while
    /// they are unavailable (or their connection broke); the whole call takes at most
    /// [`CALL_TIMEOUT`]. (What is retried is safe to repeat: reads, and
    /// transactions of absolute writes guarded by the write lock.)
    async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, Failure>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last = None;
        let attempts = async {
            // Round the endpoints until one answers or time is up.
            loop {
                let (i, channel) = self.channel();
                match tokio::time::timeout(ATTEMPT_TIMEOUT, f(channel)).await {
                    Ok(Ok(r)) => return Ok::<T, Failure>(r.into_inner()),
                    // The member is down, its connection broke, or it
                    // has no leader: the next one may answer.
                    Ok(Err(s))
                        if matches!(
                            s.code(),
                            tonic::Code::Unavailable
                                | tonic::Code::Cancelled
                                | tonic::Code::Unknown
                        ) =>
                    {
                        last = Some(s.message().to_string());
                    }
                    Ok(Err(s)) => return Err(down(what, s.message())),
                    Err(_) => last = Some(format!("no answer within {ATTEMPT_TIMEOUT:?}")),
                }
                self.move_on(i);
                if self.channels.len() == 1 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        match tokio::time::timeout(CALL_TIMEOUT, attempts).await {
            Ok(outcome) => outcome,
            Err(_) => Err(down(
                what,
                match last {
                    Some(why) => {
                        format!("no member answered within {CALL_TIMEOUT:?} (last: {why})")
                    }
                    None => format!("no answer within {CALL_TIMEOUT:?}"),
                },
            )),
        }
    }

    /// A transaction.
    pub async fn txn(&self, what: &str, req: pb::TxnRequest) -> Result<pb::TxnResponse, Failure> {
        self.call(what, |ch| {
            let req = req.clone();
            async move { kv(ch).txn(req).await }
        })
        .await
    }

    /// A read.
    pub async fn range(
        &self,
        what: &str,
        req: pb::RangeRequest,
    ) -> Result<pb::RangeResponse, Failure> {
        self.call(what, |ch| {
            let req = req.clone();
            async move { kv(ch).range(req).await }
        })
        .await
    }

    /// This controller's lease now (0 while it has none).
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Acquire)
    }

    async fn grant(&self) -> Result<(), Failure> {
        let ttl = self.ttl.as_secs() as i64;
        let granted = self
            .call("lease grant", |ch| async move {
                LeaseClient::new(ch)
                    .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
                    .await
            })
            .await?;
        if !granted.error.is_empty() {
            return Err(down("lease grant", granted.error));
        }
        self.lease.store(granted.id, Ordering::Release);
        Ok(())
    }

    /// Renews the lease a few times per time to live; takes a new one when
    /// it expired (the controller was cut off longer than its TTL).
    async fn keep_alive(self: Arc<Link>) {
        let every = self.ttl / 3;
        let mut renewed_at = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let lease = self.lease();
            let alive = if lease == 0 {
                Some(false)
            } else {
                self.renew(lease).await
            };
            match alive {
                Some(true) => {
                    renewed_at = std::time::Instant::now();
                    self.cut_off
                        .send_if_modified(|c| std::mem::replace(c, false));
                }
                // etcd cannot be reached (or has no quorum): the lease may
                // well be alive (etcd refreshes every lease when a quorum
                // returns), but past its TTL another controller may have
                // taken over: cut off until etcd answers again.
                None => {
                    if renewed_at.elapsed() >= self.ttl
                        && self
                            .cut_off
                            .send_if_modified(|c| !std::mem::replace(c, true))
                    {
                        tracing::warn!(
                            lease,
                            "etcd has not renewed this controller's lease for its TTL; cut off until it answers"
                        );
                    } else {
                        tracing::warn!(
                            lease,
                            "renewing this controller's etcd lease failed; retrying"
                        );
                    }
                }
                // Expired, as etcd says: what was attached to it (the
                // write lock, the active key) is gone.
                Some(false) => {
                    let code = self.exit_on_loss.load(Ordering::Acquire);
                    if code != 0 {
                        tracing::error!(
                            lease,
                            "this controller lost its etcd lease while active: \
                            another controller takes over; exiting (status {code})"
                        );
                        std::process::exit(code);
                    }
                    if lease != 0 {
                        tracing::warn!(
                            lease,
                            "this controller's etcd lease expired; taking a new one"
                        );
                    }
                    *self.held.lock().expect("lock state") = None;
                    self.lease.store(0, Ordering::Release);
                    match self.grant().await {
                        Ok(()) => {
                            renewed_at = std::time::Instant::now();
                            self.cut_off
                                .send_if_modified(|c| std::mem::replace(c, false));
                        }
                        Err(f) => {
                            tracing::warn!(error = %f.cause(), "cannot take a new etcd lease yet");
                        }
                    }
                }
            }
        }
    }

    /// One renewal: `Some(false)` if the lease had expired, `None` if etcd
    /// did not answer.
    async fn renew(&self, lease: i64) -> Option<bool> {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.send(pb::LeaseKeepAliveRequest { id: lease }).await;
        let (i, channel) = self.channel();
        let mut client = LeaseClient::new(channel);
        let call = async {
            let mut answers = client
                .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            answers.message().await
        };
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(Some(answer))) => Some(answer.ttl > 0),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => Some(false),
            _ => {
                self.move_on(i);
                None
            }
        }
    }

    /// Reads every tree key into the mirror (emptied first), at one
    /// revision; the watch goes on from there.
    async fn load(&self) -> Result<(), Failure> {
        let start = self.key(b"t/");
        let end = prefix_end(&start);
        let mut from = start.clone();
        let mut at = 0;
        let mut kvs = Vec::new();
        loop {
            let page = self
                .range(
                    "load",
                    pb::RangeRequest {
                        key: from.clone(),
                        range_end: end.clone(),
                        limit: PAGE,
                        revision: at,
                        ..Default::default()
                    },
                )
                .await?;
            if at == 0 {
                at = page.header.as_ref().map_or(0, |h| h.revision);
            }
            let more = page.more;
            if let Some(last) = page.kvs.last() {
                from = last.key.clone();
                from.push(0);
            }
            kvs.extend(page.kvs);
            if !more {
                break;
            }
        }
        let mut applied = self.applied.lock().expect("mirror state");
        for tree in self.mirror.all() {
            tree.clear().map_err(|e| down("mirror", e))?;
        }
        for kv in &kvs {
            self.apply_kv(&kv.key, Some(&kv.value));
        }
        applied.seen = at;
        // Events after `at` apply, this controller's own included (the
        // mirror was emptied).
        applied.local = at;
        self.caught_up.notify_all();
        Ok(())
    }

    /// Writes one etcd key into the mirror (`None`: deleted), if it is a
    /// tree key.
    fn apply_kv(&self, key: &[u8], value: Option<&[u8]>) {
        let Some(rest) = key.strip_prefix(self.key(b"t/").as_slice()) else {
            return;
        };
        let Some(slash) = rest.iter().position(|&b| b == b'/') else {
            return;
        };
        let (name, k) = (&rest[..slash], &rest[slash + 1..]);
        let Ok(tree) = self.mirror.db.open_tree(name) else {
            return;
        };
        let done = match value {
            Some(v) => tree.insert(k, v).map(drop),
            None => tree.remove(k).map(drop),
        };
        if let Err(e) = done {
            tracing::error!(error = %e, "the store's mirror cannot be written");
        }
        if name == b"runs"
            && let Ok(id) = <[u8; 8]>::try_from(k)
        {
            self.durable_run
                .fetch_max(u64::from_be_bytes(id), Ordering::AcqRel);
        }
    }

    /// Follows every change under the prefix into the mirror; reloads it
    /// when etcd no longer has the revisions it missed.
    async fn watch(self: Arc<Link>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let from = self.applied.lock().expect("mirror state").seen + 1;
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let _ = tx
                .send(pb::WatchRequest {
                    request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                        pb::WatchCreateRequest {
                            key: self.prefix.clone(),
                            range_end: prefix_end(&self.prefix),
                            start_revision: from,
                            progress_notify: true,
                            ..Default::default()
                        },
                    )),
                })
                .await;
            let (endpoint, channel) = self.channel();
            let mut client = WatchClient::new(channel)
                .max_decoding_message_size(MAX_ANSWER)
                .max_encoding_message_size(MAX_ANSWER);
            let mut delivered = false;
            let followed = async {
                let mut stream = client
                    .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                while let Some(answer) = stream.message().await? {
                    delivered = true;
                    if answer.compact_revision > 0 {
                        return Ok::<_, tonic::Status>(true);
                    }
                    if answer.canceled {
                        return Ok(false);
                    }
                    self.apply_events(&answer);
                }
                Ok(false)
            };
            let outcome = tokio::select! {
                _ = self.stop.cancelled() => return,
                outcome = followed => outcome,
            };
            drop(tx);
            if delivered {
                backoff = Duration::from_millis(50);
            }
            match outcome {
                Ok(true) => {
                    tracing::warn!(
                        "etcd compacted revisions the mirror had not seen; reloading it"
                    );
                    if let Err(f) = self.load().await {
                        tracing::warn!(error = %f.cause(), "reloading the store's mirror failed");
                    }
                }
                Ok(false) => {}
                Err(status) => {
                    self.move_on(endpoint);
                    tracing::warn!(error = %status.message(), "the etcd watch ended; following again");
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn apply_events(&self, answer: &pb::WatchResponse) {
        let mut applied = self.applied.lock().expect("mirror state");
        for event in &answer.events {
            let Some(kv) = &event.kv else { continue };
            if kv.mod_revision > applied.local {
                let deleted = event.r#type == pb::event::EventType::Delete as i32;
                self.apply_kv(&kv.key, (!deleted).then_some(kv.value.as_slice()));
            }
            applied.seen = applied.seen.max(kv.mod_revision);
        }
        if answer.events.is_empty()
            && !answer.created
            && let Some(h) = &answer.header
        {
            // A progress notice: nothing before this revision is missing.
            applied.seen = applied.seen.max(h.revision);
        }
        self.caught_up.notify_all();
    }

    /// Tells when this controller is cut off from etcd for longer than its
    /// lease's TTL (true), and when etcd answers again (false).
    pub fn cut_off(&self) -> tokio::sync::watch::Receiver<bool> {
        self.cut_off.subscribe()
    }

    /// From now on, losing the lease exits the process with `code`.
    pub fn exit_on_lease_loss(&self, code: i32) {
        self.exit_on_loss.store(code, Ordering::Release);
    }

    /// Waits (off the runtime's threads) until the mirror has every event
    /// up to `revision`; false if it did not within [`CALL_TIMEOUT`].
    pub async fn caught_up(self: &Arc<Link>, revision: i64) -> bool {
        let link = self.clone();
        tokio::task::spawn_blocking(move || link.wait_for(revision).is_ok())
            .await
            .unwrap_or(false)
    }

    /// Waits until the mirror has every event up to `revision`.
    fn wait_for(&self, revision: i64) -> Result<(), Failure> {
        let applied = self.applied.lock().expect("mirror state");
        let (applied, timeout) = self
            .caught_up
            .wait_timeout_while(applied, CALL_TIMEOUT, |a| a.seen < revision)
            .expect("mirror state");
        if timeout.timed_out() && applied.seen < revision {
            return Err(down(
                "watch",
                format!("the mirror is at revision {}, not {revision}", applied.seen),
            ));
        }
        Ok(())
    }

    /// Takes the write lock (waiting while another controller holds it)
    /// and waits until the mirror has every write made before. Called by
    /// the writer before each group.
    pub(super) fn hold(&self) -> Result<(), Failure> {
        if self.held.lock().expect("lock state").is_some() {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + super::WRITE_DEADLINE;
        let mut wait = Duration::from_millis(1);
        loop {
            let lease = self.lease();
            if lease == 0 {
                return Err(Failure::Down(
                    "etcd: this controller has no lease yet".into(),
                ));
            }
            let key = self.lock_key();
            let answer = self.rt.block_on(self.txn(
                "write lock",
                pb::TxnRequest {
                    compare: vec![absent(key.clone())],
                    success: vec![put_op(key.clone(), self.id.clone().into_bytes(), lease)],
                    failure: vec![range_op(key)],
                },
            ))?;
            let revision = answer.header.as_ref().map_or(0, |h| h.revision);
            let holder = first_kv(&answer);
            let taken = if answer.succeeded {
                Some(revision)
            } else {
                // Ours already (an answer lost on the way)?
                holder
                    .as_ref()
                    .filter(|kv| kv.lease == lease)
                    .map(|kv| kv.create_revision)
            };
            if let Some(created) = taken {
                self.wait_for(revision)?;
                *self.held.lock().expect("lock state") = Some(created);
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                let who = holder
                    .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
                    .unwrap_or_default();
                return Err(Failure::Refused(
                    format!(
                        "controller {who} held the store's write lock for {:?}",
                        super::WRITE_DEADLINE
                    )
                    .into(),
                ));
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_millis(20));
        }
    }

    /// Lets the write lock go (the writer is idle).
    pub(super) fn release(&self) {
        let Some(created) = self.held.lock().expect("lock state").take() else {
            return;
        };
        let key = self.lock_key();
        let _ = self.rt.block_on(self.txn(
            "write lock",
            pb::TxnRequest {
                compare: vec![held_by(key.clone(), created)],
                success: vec![delete_op(key)],
                failure: vec![],
            },
        ));
    }

    /// Sends a group's writes; on failure undoes them in the mirror
    /// (keeping what etcd committed).
    pub(super) fn commit(&self, ops: Vec<Op>) -> Result<(), Failure> {
        if ops.is_empty() {
            return Ok(());
        }
        let Some(created) = *self.held.lock().expect("lock state") else {
            self.undo(&ops, &[], None);
            return Err(Failure::Refused(
                "this controller's etcd lease expired while it wrote".into(),
            ));
        };
        // etcd refuses a key twice in one transaction: each key's last
        // write stands for the group's.
        let writes = coalesce(&ops);
        let mut sent = 0;
        let mut last_rev = None;
        while sent < writes.len() {
            let mut chunk = Vec::new();
            let mut bytes = 0;
            let mut end = sent;
            while end < writes.len() && chunk.len() < TXN_OPS {
                let op = writes[end];
                let size = op.key.len() + op.tree.len() + op.value.as_ref().map_or(0, |v| v.len());
                if !chunk.is_empty() && bytes + size > TXN_BYTES {
                    break;
                }
                bytes += size;
                let key = self.tree_key(&op.tree, &op.key);
                chunk.push(match &op.value {
                    Some(v) => put_op(key, v.to_vec(), 0),
                    None => delete_op(key),
                });
                end += 1;
            }
            let answer = self.rt.block_on(self.txn(
                "write",
                pb::TxnRequest {
                    compare: vec![held_by(self.lock_key(), created)],
                    success: chunk,
                    failure: vec![],
                },
            ));
            let failure = match answer {
                Ok(a) if a.succeeded => {
                    last_rev = a.header.map(|h| h.revision);
                    sent = end;
                    continue;
                }
                Ok(_) => {
                    *self.held.lock().expect("lock state") = None;
                    Failure::Refused(
                        "this controller lost the store's write lock (its etcd lease expired)"
                            .into(),
                    )
                }
                Err(f) => {
                    // Unknown whether it committed: the watch will tell.
                    *self.held.lock().expect("lock state") = None;
                    f
                }
            };
            self.undo(&ops, &writes[..sent], last_rev);
            return Err(failure);
        }
        let mut applied = self.applied.lock().expect("mirror state");
        // Written again, now that they are committed: the mirror may have
        // been reloaded meanwhile (and the watch skips them).
        for op in &writes {
            self.write_mirror(op, op.value.as_ref());
        }
        if let Some(rev) = last_rev {
            applied.local = applied.local.max(rev);
            applied.seen = applied.seen.max(rev);
        }
        self.caught_up.notify_all();
        Ok(())
    }

    /// Undoes every op in the mirror, then redoes `committed` (etcd has
    /// them, at revisions up to `rev`).
    fn undo(&self, ops: &[Op], committed: &[&Op], rev: Option<i64>) {
        let mut applied = self.applied.lock().expect("mirror state");
        for op in ops.iter().rev() {
            self.write_mirror(op, op.old.as_ref());
        }
        for op in committed {
            self.write_mirror(op, op.value.as_ref());
        }
        if let Some(rev) = rev {
            applied.local = applied.local.max(rev);
        }
    }

    /// Sets `op`'s key in the mirror to `value` (`None`: removed).
    fn write_mirror(&self, op: &Op, value: Option<&sled::IVec>) {
        let written = self
            .mirror
            .db
            .open_tree(&op.tree)
            .and_then(|t| match value {
                Some(v) => t.insert(&op.key, v.clone()).map(drop),
                None => t.remove(&op.key).map(drop),
            });
        if let Err(e) = written {
            tracing::error!(error = %e, "the store's mirror cannot be written");
        }
    }

    /// Runs whose creation was answered "failed" because etcd did not
    /// answer may still have been applied when its quorum returned (etcd
    /// keeps such a proposal). Taking the write lock (itself a write that
    /// comes after any such proposal) settles it; a run that is there is
    /// removed, so it never runs after its submitter was told it failed.
    /// Its id is not given again.
    pub(super) fn settle(&self, runs: &[u64]) -> Result<(), Arc<str>> {
        if runs.is_empty() {
            return Ok(());
        }
        self.hold().map_err(|f| f.cause())?;
        let Some(created) = *self.held.lock().expect("lock state") else {
            return Err("the store's write lock was lost".into());
        };
        let mut ops = Vec::new();
        for &run in runs {
            if self
                .mirror
                .runs
                .get(run.to_be_bytes())
                .ok()
                .flatten()
                .is_none()
            {
                continue;
            }
            tracing::warn!(
                run,
                "run {run} was created by etcd after its submitter was told it failed (etcd had no quorum); removing it"
            );
            ops.push(delete_op(self.tree_key(b"runs", &run.to_be_bytes())));
            let from = self.tree_key(b"journal", &super::journal_key(run, 0));
            let to = self.tree_key(b"journal", &super::journal_key(run + 1, 0));
            ops.push(pb::RequestOp {
                request: Some(pb::request_op::Request::RequestDeleteRange(
                    pb::DeleteRangeRequest {
                        key: from,
                        range_end: to,
                        ..Default::default()
                    },
                )),
            });
        }
        if ops.is_empty() {
            return Ok(());
        }
        let answer = self
            .rt
            .block_on(self.txn(
                "settle",
                pb::TxnRequest {
                    compare: vec![held_by(self.lock_key(), created)],
                    success: ops,
                    failure: vec![],
                },
            ))
            .map_err(|f| f.cause())?;
        if !answer.succeeded {
            return Err("the store's write lock was lost".into());
        }
        // The mirror follows through the watch.
        self.wait_for(answer.header.map_or(0, |h| h.revision))
            .map_err(|f| f.cause())
    }

    /// Whether etcd answers a linearizable read (a quorum is there).
    pub(super) fn probe(&self) -> Result<(), Arc<str>> {
        self.rt
            .block_on(self.range(
                "probe",
                pb::RangeRequest {
                    key: self.lock_key(),
                    count_only: true,
                    ..Default::default()
                },
            ))
            .map(drop)
            .map_err(|f| f.cause())
    }

    /// The store is closing: lets the lock and the lease go (what this
    /// controller held is free at once, not after its TTL).
    pub(super) fn close(&self) {
        self.release();
        let lease = self.lease();
        if lease != 0 {
            let _ = self.rt.block_on(self.call("lease revoke", |ch| async move {
                LeaseClient::new(ch)
                    .lease_revoke(pb::LeaseRevokeRequest { id: lease })
                    .await
            }));
        }
        self.stop.cancel();
    }
}

/// Each key's last write, in the order of those last writes.
fn coalesce(ops: &[Op]) -> Vec<&Op> {
    let mut last = std::collections::HashMap::new();
    for (i, op) in ops.iter().enumerate() {
        last.insert((&op.tree, &op.key), i);
    }
    ops.iter()
        .enumerate()
        .filter(|(i, op)| last[&(&op.tree, &op.key)] == *i)
        .map(|(_, op)| op)
        .collect()
}

/// A put of `key` = `value` (attached to `lease` unless 0).
pub fn put_op(key: Vec<u8>, value: Vec<u8>, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        })),
    }
}

/// A delete of `key`.
pub fn delete_op(key: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key,
                ..Default::default()
            },
        )),
    }
}

/// A read of `key`.
pub fn range_op(key: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

/// "`key` does not exist".
pub fn absent(key: Vec<u8>) -> pb::Compare {
    held_by(key, 0)
}

/// The first key a transaction's first operation read, if it was a read
/// that found one.
pub fn first_kv(answer: &pb::TxnResponse) -> Option<pb::KeyValue> {
    answer.responses.first().and_then(|r| match &r.response {
        Some(pb::response_op::Response::ResponseRange(r)) => r.kvs.first().cloned(),
        _ => None,
    })
}

/// "`key` was created at `revision`": a lock still held by who took it.
pub fn held_by(key: Vec<u8>, revision: i64) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal as i32,
        target: pb::compare::CompareTarget::Create as i32,
        key,
        target_union: Some(pb::compare::TargetUnion::CreateRevision(revision)),
        range_end: vec![],
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use super::*;
    use crate::store::{AuditEntry, Store, TokenRefused};
    use crate::testetcd::Etcd;

    async fn open(etcd: &Etcd, endpoints: Option<Vec<String>>) -> Store {
        Store::open_etcd(&EtcdConfig::new(
            endpoints.unwrap_or_else(|| etcd.endpoints()),
            "set/",
        ))
        .await
        .unwrap()
    }

    fn audit(by: &str, i: usize) -> AuditEntry {
        AuditEntry {
            at: i as u64,
            operator: by.into(),
            role: "admin".into(),
            method: format!("call {i}"),
            target: String::new(),
            outcome: "ok".into(),
        }
    }

    /// Two controllers on one etcd: each sees what the other wrote, and
    /// their writers, racing, never lose an update nor let a one-use token
    /// enrol two hosts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_controllers_share_one_store_and_never_lose_a_racing_write() {
        let etcd = Etcd::start(1);
        let (a, b) = (open(&etcd, None).await, open(&etcd, None).await);
        let run = a
            .create_run(
                crate::store::tests::meta("from-a"),
                vec![crate::store::tests::approve("x")],
            )
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while b.run(run.id).unwrap().is_none() {
            assert!(std::time::Instant::now() < deadline, "b never saw a's run");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(b.journal(run.id).unwrap().len(), 1);
        let two = b
            .create_run(crate::store::tests::meta("from-b"), vec![])
            .await
            .unwrap();
        assert_eq!(two.id, run.id + 1, "run ids are shared, never reused");

        a.put_token("one-use", crate::store::tests::token(u64::MAX))
            .await
            .unwrap();
        b.flush().await.unwrap();
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..40usize {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            calls.spawn(async move {
                let joined = s
                    .enroll(
                        "one-use",
                        &format!("host-{i}"),
                        &format!("key-{i}"),
                        (vec![i as u8], 0),
                        BTreeMap::new(),
                        1,
                    )
                    .await
                    .unwrap();
                s.audit(audit(if i % 2 == 0 { "a" } else { "b" }, i))
                    .await
                    .unwrap();
                joined
            });
        }
        let mut enrolled = 0;
        while let Some(joined) = calls.join_next().await {
            match joined.unwrap() {
                Ok(_) => enrolled += 1,
                Err(TokenRefused::Used(_)) => {}
                Err(other) => panic!("{other}"),
            }
        }
        assert_eq!(enrolled, 1, "a one-use token enrolled {enrolled} hosts");
        a.flush().await.unwrap();
        b.flush().await.unwrap();
        // Every audit entry of both, each under its own key, on both.
        for s in [&a, &b] {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let calls: HashSet<String> = s
                    .audit_entries(0)
                    .unwrap()
                    .into_iter()
                    .map(|e| e.method)
                    .collect();
                if calls.len() == 40 {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{} audit entries of 40",
                    calls.len()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // A third controller starting now loads all of it.
        let c = open(&etcd, None).await;
        assert_eq!(c.runs().unwrap().len(), 2);
        assert_eq!(c.audit_entries(0).unwrap().len(), 40);
        assert_eq!(c.hosts().unwrap().len(), 1);
    }

    /// One member of three lost: writes go on. Two lost (no quorum):
    /// writes fail with etcd's cause while reads keep working, and the
    /// store writes again by itself once a quorum is back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn losing_a_member_is_unnoticed_and_losing_quorum_fails_writes_until_it_returns() {
        let mut etcd = Etcd::start(3);
        let s = open(&etcd, None).await;
        let first = s
            .create_run(crate::store::tests::meta("one"), vec![])
            .await
            .unwrap();
        etcd.kill(0);
        let second = s
            .create_run(crate::store::tests::meta("two"), vec![])
            .await
            .unwrap();
        assert_eq!(second.id, first.id + 1);
        etcd.kill(1);
        let failed = s
            .create_run(crate::store::tests::meta("three"), vec![])
            .await
            .expect_err("no quorum: the write fails");
        assert!(
            matches!(failed, StoreError::Unwritable(_)) && failed.to_string().contains("etcd"),
            "{failed}"
        );
        assert!(s.health().is_some(), "the store says it cannot write");
        assert_eq!(s.runs().unwrap().len(), 2, "reads keep working");
        etcd.restart(1);
        tokio::time::timeout(Duration::from_secs(40), s.writable())
            .await
            .expect("writable again once a quorum is back");
        let third = s
            .create_run(crate::store::tests::meta("three"), vec![])
            .await
            .unwrap();
        assert!(third.id > second.id);
        assert_eq!(
            s.runs().unwrap().len(),
            3,
            "the failed creation is not listed"
        );
    }
}
