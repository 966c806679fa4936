//! The controller's durable state in sled, behind one writer.
//!
//! Trees:
//! - `hosts`: name → [`HostRecord`] (labels, facts, enrolment, last seen).
//! - `tokens`: SHA-256 of a join token → [`TokenRecord`]; the token itself
//!   is never stored.
//! - `revoked`: certificate serial → [`Revocation`].
//! - `runs`: run id (u64, big-endian) → [`RunMeta`], a summary derived from
//!   the journal, kept for listing.
//! - `journal`: run id + sequence number (both u64 big-endian) →
//!   [`JournalEntry`]: the append-only event journal of each run, from which
//!   its state is replayed.
//! - `meta`: counters.
//! - `operators`: name → [`OperatorRecord`] (role, certificate serials).
//! - `audit`: sequence number (u64 big-endian) → [`AuditEntry`]: every
//!   admin call that changed something.
//!
//! Values are JSON.
//!
//! **One writer.** Reads go straight to sled. Every write is a job sent to
//! the store's one writer thread, which takes every job queued, applies
//! them in order, flushes once and only then answers each caller (group
//! commit): a write that returned `Ok` is durable. Nothing else flushes
//! (sled 0.34 deadlocks when `flush_async` runs concurrently, and its own
//! background flusher is off). A write waits at most [`WRITE_DEADLINE`].
//!
//! **A store that cannot write** (disk full, I/O error): sled refuses every
//! write after its first I/O error, so the writer marks the store
//! unwritable with the cause ([`Store::health`]), fails every write at once
//! with it ([`StoreError::Unwritable`]), and probes with backoff; when a
//! probe file can be written it reopens sled (which recovers exactly what
//! was flushed) and the store is writable again ([`Store::writable`]).
//! Reads keep working throughout. Runs whose creation was never durable
//! are never listed.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::rollout::{DispatchId, Event, Millis, RunState, StepResult};

pub mod access;
pub mod dump;
pub mod etcd;
use crate::spec::RunSpec;
pub use access::{AuditEntry, OperatorRecord, OperatorRole};
pub use etcd::EtcdConfig;

/// How long [`Store::open`] waits for the store's lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// The longest a write may wait to be durable before its caller is told.
pub const WRITE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// sled's page cache. Its default, 1 GiB, fills with journals as runs
/// accumulate, on top of what a large fleet's sessions take (about 470
/// MiB for 10,000 agents); old journals are read rarely (`modi status` of
/// an ended run, a restart's replay of unfinished ones), so the cache only
/// has to hold what runs now.
const CACHE_BYTES: u64 = 128 << 20;
/// Most jobs the writer applies under one flush.
pub const GROUP_COMMIT: usize = 4096;
/// First wait between probes of an unwritable store; doubles up to
/// [`PROBE_MAX`].
pub const PROBE_MIN: std::time::Duration = std::time::Duration::from_millis(100);
/// Longest wait between probes of an unwritable store.
pub const PROBE_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// Bytes the probe writes (and removes) next to the store: a little more
/// than one write needs.
const PROBE_BYTES: usize = 256 << 10;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process has the store open.
    #[error(
        "the store {0} is in use by another process (is another `modi serve` running on this data dir?)"
    )]
    Busy(std::path::PathBuf),
    /// sled failed.
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// The store cannot write now (disk full, I/O error); reads work, and
    /// the writer retries by itself.
    #[error("the store cannot write: {0}")]
    Unwritable(Arc<str>),
    /// A write was not durable within [`WRITE_DEADLINE`].
    #[error("the store did not finish a write within {0:?}")]
    Timeout(std::time::Duration),
    /// etcd cannot be used (unreachable at start, a bad `[store]`).
    #[error("{0}")]
    Etcd(Arc<str>),
    /// The store was closed (the controller is stopping).
    #[error("the store is closed (the controller is stopping)")]
    Closed,
    /// A record does not decode (written by another version?).
    #[error("store: damaged record in {tree}: {detail}")]
    Corrupt {
        /// The tree.
        tree: &'static str,
        /// The decoder's complaint.
        detail: String,
    },
}

/// Why a join token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenRefused {
    /// Not a token we issued.
    #[error("unknown join token")]
    Unknown,
    /// Already used (as many times as it may be).
    #[error("this join token was already used (by {0:?})")]
    Used(String),
    /// The name is held by an enrolled agent.
    #[error("an agent named {0:?} is already enrolled; revoke it first (modi agents revoke {0})")]
    NameTaken(String),
    /// Past its expiry.
    #[error("this join token expired")]
    Expired,
    /// Revoked by an operator.
    #[error("this join token was revoked")]
    Revoked,
}

/// A known agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The name in its certificate.
    pub name: String,
    /// Labels it reported.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Facts it reported.
    #[serde(default)]
    pub facts: BTreeMap<String, String>,
    /// When it enrolled.
    pub enrolled_at: Millis,
    /// When it was last heard from.
    #[serde(default)]
    pub last_seen: Millis,
    /// Connected when last written: set on connect, cleared on a
    /// disconnect (not on the controller's own shutdown), so after a
    /// restart every host that was connected is waited for, however long
    /// it had been connected.
    #[serde(default)]
    pub connected: bool,
    /// When its newest certificate expires.
    #[serde(default)]
    pub cert_expires_at: Millis,
    /// Serial numbers of every certificate issued to this name.
    #[serde(default)]
    pub serials: Vec<Vec<u8>>,
    /// Revoked (refused at the handshake).
    #[serde(default)]
    pub revoked: bool,
}

/// A join token, by hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// When it was made.
    pub created_at: Millis,
    /// When it stops working.
    pub expires_at: Millis,
    /// Who made it (operator name).
    pub created_by: String,
    /// The agent names that used it, in order.
    #[serde(default, deserialize_with = "one_or_many")]
    pub used_by: Vec<String>,
    /// How many hosts may enrol with it.
    #[serde(default = "one_use")]
    pub uses: u32,
    /// Labels every host enrolled with it gets (winning over the join's).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Revoked by an operator.
    #[serde(default)]
    pub revoked: bool,
    /// Who enrolled with it, with the key they enrolled: the same name
    /// and key coming again (a join that failed on its host after the
    /// controller answered) is a retry, not a new use.
    #[serde(default)]
    pub joined: Vec<Joined>,
    /// Enrolments recorded in the `token_uses` tree (one entry per name,
    /// so a token for 10,000 hosts is not rewritten whole at each join;
    /// `used_by` and `joined` hold those made before). Reads
    /// ([`Store::tokens`]) list them in `used_by` again.
    #[serde(default)]
    pub used: u32,
}

/// One enrolment with a token, in the `token_uses` tree under the token's
/// hash and the agent's name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct TokenUse {
    /// Its place among the token's uses.
    seq: u32,
    /// SHA-256 (hex) of the public key it enrolled.
    key_sha256: String,
}

/// The `token_uses` key of `name`'s enrolment with token `hash`.
fn token_use_key(hash: &str, name: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(hash.len() + 1 + name.len());
    key.extend_from_slice(hash.as_bytes());
    key.push(0);
    key.extend_from_slice(name.as_bytes());
    key
}

/// Every name that enrolled with token `hash`, in order (the record's own
/// list first, then the `token_uses` tree's).
fn token_users(trees: &Trees, hash: &str, token: &TokenRecord) -> Result<Vec<String>, StoreError> {
    let mut prefix = hash.as_bytes().to_vec();
    prefix.push(0);
    let mut uses = Vec::new();
    for kv in trees.token_uses.scan_prefix(&prefix) {
        let (k, v) = kv?;
        let u: TokenUse = decode("token_uses", &v)?;
        uses.push((
            u.seq,
            String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
        ));
    }
    uses.sort();
    let mut names = token.used_by.clone();
    names.extend(uses.into_iter().map(|(_, n)| n));
    Ok(names)
}

/// One enrolment made with a token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Joined {
    /// The agent's name.
    pub name: String,
    /// SHA-256 (hex) of the public key it enrolled.
    pub key_sha256: String,
}

fn one_use() -> u32 {
    1
}

/// `used_by` was one name before tokens could be used more than once.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(name)) => vec![name],
        Some(OneOrMany::Many(names)) => names,
    })
}

/// A revoked certificate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    /// The name the certificate was issued to.
    pub name: String,
    /// When.
    pub at: Millis,
    /// By whom (admin cert name).
    pub by: String,
}

/// A run's summary for `modi runs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    /// Run id.
    pub id: u64,
    /// The changeset's name.
    pub name: String,
    /// Current state.
    pub state: RunState,
    /// When it was submitted.
    pub created_at: Millis,
    /// When it reached a final state.
    #[serde(default)]
    pub finished_at: Option<Millis>,
    /// Admin cert name of the submitter.
    pub submitted_by: String,
    /// Distinct hosts in the run.
    pub hosts: u32,
}

/// One record of a run's journal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// When it was recorded (controller clock).
    pub at: Millis,
    /// What.
    pub record: Record,
}

/// What a journal entry says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Record {
    /// The run was created with this rendered spec. Always first.
    Created {
        /// The rendered run.
        spec: Box<RunSpec>,
        /// Admin cert name of the submitter.
        submitted_by: String,
    },
    /// An event fed to the engine.
    Event {
        /// The event.
        event: Event,
    },
    /// A step was sent to its agent (recorded before sending).
    Dispatched {
        /// Which.
        id: DispatchId,
    },
    /// A result that came back after its step was declared `lost`: kept
    /// and shown, never fed to the engine.
    Late {
        /// Which dispatch.
        id: DispatchId,
        /// The agent that reported it.
        host: String,
        /// What really happened.
        result: StepResult,
    },
}

/// sled's trees, as readers and the writer see them.
#[derive(Clone)]
struct Trees {
    db: sled::Db,
    hosts: sled::Tree,
    tokens: sled::Tree,
    revoked: sled::Tree,
    runs: sled::Tree,
    journal: sled::Tree,
    meta: sled::Tree,
    operators: sled::Tree,
    audit: sled::Tree,
    token_uses: sled::Tree,
}

impl Trees {
    fn open(path: &Path, deadline: std::time::Instant) -> Result<Trees, StoreError> {
        let db = loop {
            // sled's own lock is released a moment after its previous
            // holder in this process closed it.
            match sled::Config::new()
                .path(path)
                .flush_every_ms(None)
                .cache_capacity(CACHE_BYTES)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if std::time::Instant::now() < deadline
                        && e.kind() != std::io::ErrorKind::StorageFull =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        Trees::of(db)
    }

    /// A store's copy held only while the process lives (the etcd
    /// backend's mirror): never flushed.
    fn temporary() -> Result<Trees, StoreError> {
        Trees::of(
            sled::Config::new()
                .temporary(true)
                .flush_every_ms(None)
                .cache_capacity(CACHE_BYTES)
                .open()?,
        )
    }

    fn of(db: sled::Db) -> Result<Trees, StoreError> {
        Ok(Trees {
            hosts: db.open_tree("hosts")?,
            tokens: db.open_tree("tokens")?,
            revoked: db.open_tree("revoked")?,
            runs: db.open_tree("runs")?,
            journal: db.open_tree("journal")?,
            meta: db.open_tree("meta")?,
            operators: db.open_tree("operators")?,
            audit: db.open_tree("audit")?,
            token_uses: db.open_tree("token_uses")?,
            db,
        })
    }

    /// Every tree, by name.
    fn all(&self) -> [&sled::Tree; 9] {
        [
            &self.hosts,
            &self.tokens,
            &self.revoked,
            &self.runs,
            &self.journal,
            &self.meta,
            &self.operators,
            &self.audit,
            &self.token_uses,
        ]
    }
}

/// What the writer hands a job: the trees to write to.
pub struct Tx<'a> {
    trees: &'a Trees,
    /// Run ids created by this job (listed once durable).
    created: &'a mut Vec<u64>,
    /// With the etcd backend, every write of the group in order, with the
    /// value it replaced: what is sent to etcd, or undone if etcd refuses.
    log: Option<&'a std::cell::RefCell<Vec<etcd::Op>>>,
}

impl Tx<'_> {
    /// Writes `key` = `value` in `tree`.
    fn put(
        &self,
        tree: &sled::Tree,
        key: impl AsRef<[u8]>,
        value: impl Into<sled::IVec>,
    ) -> Result<(), StoreError> {
        let (key, value) = (key.as_ref(), value.into());
        let old = tree.insert(key, value.clone())?;
        if let Some(log) = self.log {
            log.borrow_mut().push(etcd::Op {
                tree: tree.name(),
                key: key.into(),
                value: Some(value),
                old,
            });
        }
        Ok(())
    }

    /// Removes `key` from `tree`.
    fn del(&self, tree: &sled::Tree, key: impl AsRef<[u8]>) -> Result<(), StoreError> {
        let key = key.as_ref();
        let old = tree.remove(key)?;
        if let Some(log) = self.log {
            log.borrow_mut().push(etcd::Op {
                tree: tree.name(),
                key: key.into(),
                value: None,
                old,
            });
        }
        Ok(())
    }

    /// Writes every pair into `tree` (one sled batch when the store is
    /// sled).
    fn put_all<K: AsRef<[u8]>, V: Into<sled::IVec>>(
        &self,
        tree: &sled::Tree,
        items: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(), StoreError> {
        if self.log.is_some() {
            for (k, v) in items {
                self.put(tree, k, v)?;
            }
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (k, v) in items {
            batch.insert(k.as_ref(), v.into());
        }
        Ok(tree.apply_batch(batch)?)
    }
}

/// Called once the job's writes are durable (or not), with the outcome.
type Done = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// A write in the writer's queue.
type Job = Box<dyn Write>;

/// A queued write: applied then answered after the flush, or refused
/// without being applied.
trait Write: Send {
    /// Applies the write; returns what to call once flushed.
    fn apply(self: Box<Self>, tx: &mut Tx<'_>) -> Done;
    /// Answers without applying.
    fn refuse(self: Box<Self>, why: StoreError);
}

struct Pending<F, R> {
    job: F,
    reply: tokio::sync::oneshot::Sender<Result<R, StoreError>>,
}

impl<F, R> Write for Pending<F, R>
where
    F: FnOnce(&mut Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    R: Send + 'static,
{
    fn apply(self: Box<Self>, tx: &mut Tx<'_>) -> Done {
        let Pending { job, reply } = *self;
        let outcome = job(tx);
        Box::new(move |flushed: Result<(), StoreError>| {
            let _ = reply.send(flushed.and(outcome));
        })
    }

    fn refuse(self: Box<Self>, why: StoreError) {
        let _ = self.reply.send(Err(why));
    }
}

/// The writer's and the readers' shared state.
struct Shared {
    /// The sled store's path (the etcd backend's mirror has none).
    path: std::path::PathBuf,
    /// The etcd backend, when the store is etcd.
    etcd: Option<Arc<etcd::Link>>,
    trees: std::sync::RwLock<Option<Trees>>,
    /// `None` while writable, else why not.
    health: tokio::sync::watch::Sender<Option<Arc<str>>>,
    /// Highest run id whose creation is durable: listings stop there.
    durable_run: Arc<std::sync::atomic::AtomicU64>,
    /// Told how long each flush took (metrics).
    on_flush: std::sync::OnceLock<Box<dyn Fn(std::time::Duration) + Send + Sync>>,
}

/// Counters of the writer's work, for benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Jobs applied.
    pub jobs: u64,
    /// Flushes made.
    pub flushes: u64,
}

/// The open store. Cheap to clone; the writer stops when the last clone
/// is dropped (after a last flush).
#[derive(Clone)]
pub struct Store {
    /// Held while any clone is alive (sled: the data dir's lock file).
    _lock: Option<Arc<nix::fcntl::Flock<std::fs::File>>>,
    shared: Arc<Shared>,
    writer: std::sync::mpsc::SyncSender<Job>,
    stats: Arc<std::sync::Mutex<WriterStats>>,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("store records always serialize")
}

fn decode<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        detail: e.to_string(),
    })
}

fn journal_key(run: u64, seq: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&run.to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn get<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
    key: impl AsRef<[u8]>,
) -> Result<Option<T>, StoreError> {
    tree.get(key)?.map(|v| decode(name, &v)).transpose()
}

fn next_run_counter(meta: &sled::Tree) -> Result<u64, StoreError> {
    Ok(meta
        .get("next_run")?
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
}

impl Store {
    /// Opens (creating) the store at `path` and starts its writer. The
    /// store is ours alone: a lock file next to it is held while it is
    /// open, and a second controller on the same data dir is refused
    /// ([`StoreError::Busy`]).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let lock = loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path.with_extension("lock"))
                .map_err(|e| StoreError::Sled(e.into()))?;
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(lock) => break lock,
                Err((_, nix::errno::Errno::EWOULDBLOCK))
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(StoreError::Busy(path.to_path_buf()));
                }
                Err((_, e)) => return Err(StoreError::Sled(std::io::Error::from(e).into())),
            }
        };
        let trees = Trees::open(path, deadline)?;
        let durable_run = next_run_counter(&trees.meta)?;
        Store::start(
            Shared {
                path: path.to_path_buf(),
                etcd: None,
                trees: std::sync::RwLock::new(Some(trees)),
                health: tokio::sync::watch::Sender::new(None),
                durable_run: Arc::new(durable_run.into()),
                on_flush: std::sync::OnceLock::new(),
            },
            Some(Arc::new(lock)),
        )
    }

    /// Opens the store kept in etcd (see [`etcd`]): connects, takes this
    /// controller's lease, reads everything under the prefix into a
    /// mirror that etcd's watch keeps current, and starts the writer.
    /// Fails if etcd cannot be reached within its timeout.
    pub async fn open_etcd(config: &EtcdConfig) -> Result<Store, StoreError> {
        let trees = Trees::temporary()?;
        let durable_run = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let link = etcd::Link::open(config, trees.clone(), durable_run.clone()).await?;
        durable_run.store(
            next_run_counter(&trees.meta)?,
            std::sync::atomic::Ordering::Release,
        );
        Store::start(
            Shared {
                path: std::path::PathBuf::new(),
                etcd: Some(link),
                trees: std::sync::RwLock::new(Some(trees)),
                health: tokio::sync::watch::Sender::new(None),
                durable_run,
                on_flush: std::sync::OnceLock::new(),
            },
            None,
        )
    }

    /// Starts the writer thread over `shared`.
    fn start(
        shared: Shared,
        lock: Option<Arc<nix::fcntl::Flock<std::fs::File>>>,
    ) -> Result<Store, StoreError> {
        let shared = Arc::new(shared);
        let (writer, jobs) = std::sync::mpsc::sync_channel::<Job>(GROUP_COMMIT);
        let stats = Arc::new(std::sync::Mutex::new(WriterStats::default()));
        let thread_shared = shared.clone();
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("modi-store-writer".into())
            .spawn(move || write_loop(&thread_shared, &jobs, &thread_stats))
            .map_err(|e| StoreError::Sled(e.into()))?;
        Ok(Store {
            _lock: lock,
            shared,
            writer,
            stats,
        })
    }

    /// The etcd backend's link, when the store is etcd (controller sets
    /// share runs through it).
    pub fn etcd(&self) -> Option<&Arc<etcd::Link>> {
        self.shared.etcd.as_ref()
    }

    /// The trees, for a read.
    fn trees(&self) -> Result<Trees, StoreError> {
        self.shared
            .trees
            .read()
            .expect("store trees lock")
            .clone()
            .ok_or_else(|| {
                StoreError::Unwritable("the store is being reopened after a write failure".into())
            })
    }

    /// Runs `job` in the writer and returns its result once it is durable.
    /// Fails at once while the store cannot write, and after
    /// [`WRITE_DEADLINE`].
    pub async fn write<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        if let Some(cause) = self.health() {
            return Err(StoreError::Unwritable(cause));
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(Pending { job, reply });
        let writer = self.writer.clone();
        // The queue is bounded: a full queue waits (off the runtime's
        // threads) rather than growing without end.
        let queued = match writer.try_send(job) {
            Ok(()) => true,
            Err(std::sync::mpsc::TrySendError::Full(job)) => {
                let sent = tokio::time::timeout(
                    WRITE_DEADLINE,
                    tokio::task::spawn_blocking(move || writer.send(job).is_ok()),
                )
                .await;
                match sent {
                    Ok(Ok(queued)) => queued,
                    Ok(Err(_)) => false,
                    Err(_) => return Err(StoreError::Timeout(WRITE_DEADLINE)),
                }
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => false,
        };
        if !queued {
            return Err(StoreError::Closed);
        }
        match tokio::time::timeout(WRITE_DEADLINE, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError::Closed),
            Err(_) => Err(StoreError::Timeout(WRITE_DEADLINE)),
        }
    }

    /// Waits until everything written before is durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.write(|_| Ok(())).await
    }

    /// Why the store cannot write now; `None` while it can.
    pub fn health(&self) -> Option<Arc<str>> {
        self.shared.health.borrow().clone()
    }

    /// Waits until the store can write.
    pub async fn writable(&self) {
        let mut rx = self.shared.health.subscribe();
        let _ = rx.wait_for(Option::is_none).await;
    }

    /// A receiver of the store's health changes (`None` = writable).
    pub fn health_changes(&self) -> tokio::sync::watch::Receiver<Option<Arc<str>>> {
        self.shared.health.subscribe()
    }

    /// Calls `f` with the duration of every flush from now on (once; a
    /// second observer is ignored).
    pub fn on_flush(&self, f: impl Fn(std::time::Duration) + Send + Sync + 'static) {
        let _ = self.shared.on_flush.set(Box::new(f));
    }

    /// The store's size on disk in bytes (0 if it cannot be read now).
    pub fn size_on_disk(&self) -> u64 {
        self.trees()
            .ok()
            .and_then(|t| t.db.size_on_disk().ok())
            .unwrap_or(0)
    }

    /// What the writer did so far.
    pub fn writer_stats(&self) -> WriterStats {
        *self.stats.lock().expect("writer stats lock")
    }

    // ---- hosts -------------------------------------------------------

    /// The host called `name`.
    pub fn host(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        get(&self.trees()?.hosts, "hosts", name)
    }

    /// Updates the host called `name`: `f` gets the current record (if
    /// any) and returns the new one. Durable on return.
    pub async fn update_host(
        &self,
        name: &str,
        f: impl FnOnce(Option<HostRecord>) -> HostRecord + Send + 'static,
    ) -> Result<HostRecord, StoreError> {
        let name = name.to_string();
        self.write(move |t| {
            let new = f(get(&t.trees.hosts, "hosts", &name)?);
            t.put(&t.trees.hosts, name.as_bytes(), encode(&new))?;
            Ok(new)
        })
        .await
    }

    /// Every host, by name.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.trees()?
            .hosts
            .iter()
            .values()
            .map(|v| decode("hosts", &v?))
            .collect()
    }

    // ---- tokens ------------------------------------------------------

    /// The token with this hash, if there is one.
    pub fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        get(&self.trees()?.tokens, "tokens", hash)
    }

    /// Records a token by its hash. Durable on return.
    pub async fn put_token(&self, hash: &str, token: TokenRecord) -> Result<(), StoreError> {
        let hash = hash.to_string();
        self.write(move |t| {
            t.put(&t.trees.tokens, hash.as_bytes(), encode(&token))?;
            Ok(())
        })
        .await
    }

    /// Enrols agent `name` with the public key whose SHA-256 is `key`:
    /// uses the token with this hash (once per host, up to its `uses`)
    /// and records the host with the certificate serial it was issued and
    /// its labels — the token's if it names any, else `asked` — in one
    /// write (a token is never used up without its host). The same name
    /// and key coming again with the same token is a retry (the host lost
    /// the answer, or failed writing it): it is let through without using
    /// the token again, as long as neither the host nor the token is
    /// revoked. Durable on return.
    pub async fn enroll(
        &self,
        hash: &str,
        name: &str,
        key: &str,
        serial: (Vec<u8>, Millis),
        asked: BTreeMap<String, String>,
        now: Millis,
    ) -> Result<Result<HostRecord, TokenRefused>, StoreError> {
        let (hash, name, key) = (hash.to_string(), name.to_string(), key.to_string());
        // The one writer decides between agents racing for one token or
        // one name: each sees what the one before it wrote.
        self.write(move |t| {
            let Some(mut token) = get::<TokenRecord>(&t.trees.tokens, "tokens", &hash)? else {
                return Ok(Err(TokenRefused::Unknown));
            };
            if token.revoked {
                return Ok(Err(TokenRefused::Revoked));
            }
            let existing = get::<HostRecord>(&t.trees.hosts, "hosts", &name)?;
            let use_key = token_use_key(&hash, &name);
            let recorded = get::<TokenUse>(&t.trees.token_uses, "token_uses", &use_key)?;
            let retry = (token
                .joined
                .iter()
                .any(|j| j.name == name && j.key_sha256 == key)
                || recorded.is_some_and(|u| u.key_sha256 == key))
                && existing.as_ref().is_some_and(|h| !h.revoked);
            if !retry {
                let used = token.used_by.len() + token.used as usize;
                if used >= token.uses.max(1) as usize {
                    let names = token_users(t.trees, &hash, &token)?;
                    let shown = match names.len() {
                        n if n > 10 => format!("{}, and {} more", names[..10].join(", "), n - 10),
                        _ => names.join(", "),
                    };
                    return Ok(Err(TokenRefused::Used(shown)));
                }
                if now >= token.expires_at {
                    return Ok(Err(TokenRefused::Expired));
                }
                if existing.as_ref().is_some_and(|h| !h.revoked) {
                    return Ok(Err(TokenRefused::NameTaken(name)));
                }
                // The one writer decides between agents racing with one
                // token: the last one past its uses finds it used.
                t.put(
                    &t.trees.token_uses,
                    use_key,
                    encode(&TokenUse {
                        seq: used as u32,
                        key_sha256: key,
                    }),
                )?;
                token.used += 1;
            }
            let mut host = existing.unwrap_or_else(|| HostRecord {
                name: name.clone(),
                ..HostRecord::default()
            });
            host.enrolled_at = now;
            host.revoked = false;
            host.serials.push(serial.0);
            host.cert_expires_at = serial.1;
            host.labels = if token.labels.is_empty() {
                asked
            } else {
                token.labels.clone()
            };
            t.put(&t.trees.tokens, hash.as_bytes(), encode(&token))?;
            t.put(&t.trees.hosts, name.as_bytes(), encode(&host))?;
            Ok(Ok(host))
        })
        .await
    }

    // ---- revocation --------------------------------------------------

    /// Revokes every certificate issued to host `name`, and either marks it
    /// revoked or, with `forget`, removes its record; `None` if there is no
    /// such host. Returns the host as it was revoked. Durable on return.
    pub async fn revoke(
        &self,
        name: &str,
        by: &str,
        now: Millis,
        forget: bool,
    ) -> Result<Option<HostRecord>, StoreError> {
        let (name, by) = (name.to_string(), by.to_string());
        self.write(move |t| {
            let Some(mut host) = get::<HostRecord>(&t.trees.hosts, "hosts", &name)? else {
                return Ok(None);
            };
            host.revoked = true;
            if forget {
                t.del(&t.trees.hosts, name.as_bytes())?;
            } else {
                t.put(&t.trees.hosts, name.as_bytes(), encode(&host))?;
            }
            revoke_serials(t, &host.name, &host.serials, &by, now)?;
            Ok(Some(host))
        })
        .await
    }

    /// Every revoked serial.
    pub fn revoked_serials(&self) -> Result<HashSet<Vec<u8>>, StoreError> {
        self.trees()?
            .revoked
            .iter()
            .keys()
            .map(|k| Ok(k?.to_vec()))
            .collect()
    }

    // ---- runs --------------------------------------------------------

    /// Creates a run: a new id (never reused once durable), its summary
    /// (`meta.id` is set) and the first entries of its journal, all in one
    /// write. Durable on return; listed from then on.
    pub async fn create_run(
        &self,
        mut meta: RunMeta,
        entries: Vec<JournalEntry>,
    ) -> Result<RunMeta, StoreError> {
        self.write(move |t| {
            let id = next_run_counter(&t.trees.meta)? + 1;
            meta.id = id;
            t.put(&t.trees.meta, "next_run", &id.to_be_bytes())?;
            t.put_all(
                &t.trees.journal,
                entries
                    .iter()
                    .enumerate()
                    .map(|(i, entry)| (journal_key(id, i as u64), encode(entry))),
            )?;
            t.put(&t.trees.runs, id.to_be_bytes(), encode(&meta))?;
            t.created.push(id);
            Ok(meta)
        })
        .await
    }

    /// Appends `entries` to run `run`'s journal from sequence `first_seq`
    /// (the caller, the run's only writer, keeps the count; writing the
    /// same entries again is harmless) and, if given, its new summary, in
    /// one write. Durable on return.
    pub async fn record(
        &self,
        run: u64,
        first_seq: u64,
        entries: Vec<JournalEntry>,
        meta: Option<RunMeta>,
    ) -> Result<(), StoreError> {
        self.write(move |t| {
            if !entries.is_empty() {
                t.put_all(
                    &t.trees.journal,
                    entries
                        .iter()
                        .enumerate()
                        .map(|(i, entry)| (journal_key(run, first_seq + i as u64), encode(entry))),
                )?;
            }
            if let Some(meta) = meta {
                t.put(&t.trees.runs, run.to_be_bytes(), encode(&meta))?;
            }
            Ok(())
        })
        .await
    }

    /// Appends one entry at the end of a run that no driver writes any
    /// more (a late result for a finished run). Durable on return.
    pub async fn append_at_end(&self, run: u64, entry: JournalEntry) -> Result<(), StoreError> {
        self.write(move |t| {
            let next = t
                .trees
                .journal
                .range(journal_key(run, 0)..=journal_key(run, u64::MAX))
                .next_back()
                .transpose()?
                .map_or(0, |(k, _)| {
                    u64::from_be_bytes(<[u8; 8]>::try_from(&k[8..16]).expect("16-byte key")) + 1
                });
            t.put(&t.trees.journal, journal_key(run, next), encode(&entry))?;
            Ok(())
        })
        .await
    }

    /// A run's summary (only runs whose creation is durable).
    pub fn run(&self, id: u64) -> Result<Option<RunMeta>, StoreError> {
        if id > self.durable_run() {
            return Ok(None);
        }
        get(&self.trees()?.runs, "runs", id.to_be_bytes())
    }

    fn durable_run(&self) -> u64 {
        self.shared
            .durable_run
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Every run, oldest first (only runs whose creation is durable).
    pub fn runs(&self) -> Result<Vec<RunMeta>, StoreError> {
        let upto = self.durable_run();
        self.trees()?
            .runs
            .range(..=upto.to_be_bytes())
            .values()
            .map(|v| decode("runs", &v?))
            .collect()
    }

    /// The newest `limit` runs, oldest first (only runs whose creation is
    /// durable): read from the end, so a long history costs nothing.
    pub fn newest_runs(&self, limit: usize) -> Result<Vec<RunMeta>, StoreError> {
        let upto = self.durable_run();
        let mut runs = self
            .trees()?
            .runs
            .range(..=upto.to_be_bytes())
            .values()
            .rev()
            .take(limit)
            .map(|v| decode("runs", &v?))
            .collect::<Result<Vec<RunMeta>, _>>()?;
        runs.reverse();
        Ok(runs)
    }

    /// A run's journal, in order.
    pub fn journal(&self, run: u64) -> Result<Vec<JournalEntry>, StoreError> {
        self.trees()?
            .journal
            .range(journal_key(run, 0)..=journal_key(run, u64::MAX))
            .values()
            .map(|v| decode("journal", &v?))
            .collect()
    }
}

/// Records every serial in `serials` (issued to `name`) as revoked.
fn revoke_serials(
    t: &Tx<'_>,
    name: &str,
    serials: &[Vec<u8>],
    by: &str,
    now: Millis,
) -> Result<(), StoreError> {
    for serial in serials {
        let r = Revocation {
            name: name.to_string(),
            at: now,
            by: by.to_string(),
        };
        t.put(&t.trees.revoked, serial.as_slice(), encode(&r))?;
    }
    Ok(())
}

/// The writer thread: batches, applies, makes durable once (a sled flush,
/// or etcd transactions), answers; on a failure, marks the store
/// unwritable and probes until it can write.
fn write_loop(
    shared: &Shared,
    jobs: &std::sync::mpsc::Receiver<Job>,
    stats: &std::sync::Mutex<WriterStats>,
) {
    // Runs created in groups etcd did not answer for (see `recover`).
    let mut doubtful = Vec::new();
    loop {
        let first = match &shared.etcd {
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => break,
            },
            // Idle: etcd's write lock is let go for other controllers.
            Some(link) => match jobs.recv_timeout(etcd::IDLE_RELEASE) {
                Ok(job) => job,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    link.release();
                    continue;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            },
        };
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Some(trees) = shared.trees.read().expect("store trees lock").clone() else {
            for job in batch {
                refuse(shared, job);
            }
            continue;
        };
        // etcd: this controller writes only while it holds the write lock
        // and its mirror has every write made before it took it.
        if let Some(link) = &shared.etcd
            && let Err(failure) = link.hold()
        {
            let down = failure.is_down();
            let cause = failure.cause();
            if down {
                unwritable(shared, cause.clone());
            }
            for job in batch {
                job.refuse(StoreError::Unwritable(cause.clone()));
            }
            if down {
                recover(shared, jobs, &mut doubtful);
            }
            continue;
        }
        let mut created = Vec::new();
        let mut done = Vec::with_capacity(batch.len());
        let log = std::cell::RefCell::new(Vec::new());
        {
            let mut tx = Tx {
                trees: &trees,
                created: &mut created,
                log: shared.etcd.as_ref().map(|_| &log),
            };
            for job in batch {
                done.push(job.apply(&mut tx));
            }
        }
        let started = std::time::Instant::now();
        let durable = match &shared.etcd {
            None => trees
                .db
                .flush()
                .map(drop)
                .map_err(|e| etcd::Failure::Down(cause_of(&e).into())),
            Some(link) => link.commit(log.into_inner()),
        };
        if let Some(observe) = shared.on_flush.get() {
            observe(started.elapsed());
        }
        {
            let mut s = stats.lock().expect("writer stats lock");
            s.jobs += done.len() as u64;
            s.flushes += 1;
        }
        match durable {
            Ok(()) => {
                if let Some(&last) = created.iter().max() {
                    shared
                        .durable_run
                        .fetch_max(last, std::sync::atomic::Ordering::AcqRel);
                }
                for d in done {
                    d(Ok(()));
                }
            }
            Err(failure) => {
                let down = failure.is_down();
                let cause = failure.cause();
                // Unwritable before anyone is answered: a caller that asks
                // right away hears why.
                if down {
                    unwritable(shared, cause.clone());
                }
                for d in done {
                    d(Err(StoreError::Unwritable(cause.clone())));
                }
                if down {
                    // etcd may still apply what it did not answer for:
                    // runs created here are checked once it answers.
                    if shared.etcd.is_some() {
                        doubtful.extend(created);
                    }
                    drop(trees);
                    recover(shared, jobs, &mut doubtful);
                }
            }
        }
    }
    match &shared.etcd {
        // Every handle is gone: a last flush of whatever sled holds.
        None => {
            if let Some(trees) = shared.trees.read().expect("store trees lock").as_ref() {
                let _ = trees.db.flush();
            }
        }
        // Let the write lock and this controller's lease go at once.
        Some(link) => link.close(),
    }
}

/// Marks the store unwritable because of `cause`.
fn unwritable(shared: &Shared, cause: Arc<str>) {
    tracing::error!(error = %cause, "the store cannot write");
    shared.health.send_replace(Some(cause));
}

/// The OS's words for a sled error.
fn cause_of(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// Probes with backoff until a file can be written next to the store, then
/// reopens sled (it refuses every write after an I/O error). Jobs that
/// arrive meanwhile are answered "cannot write" without being applied.
fn recover(shared: &Shared, jobs: &std::sync::mpsc::Receiver<Job>, doubtful: &mut Vec<u64>) {
    let mut wait = PROBE_MIN;
    loop {
        match jobs.recv_timeout(wait) {
            Ok(job) => {
                refuse(shared, job);
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
        wait = (wait * 2).min(PROBE_MAX);
        if let Some(link) = &shared.etcd {
            // etcd keeps what it acknowledged; the mirror follows its
            // watch. Writable again as soon as a quorum answers, and the
            // runs whose creation failed were settled.
            match link.probe().and_then(|()| link.settle(doubtful)) {
                Ok(()) => {
                    doubtful.clear();
                    tracing::info!("the store can write again");
                    shared.health.send_replace(None);
                    return;
                }
                Err(cause) => {
                    shared.health.send_replace(Some(cause));
                    continue;
                }
            }
        }
        if let Err(e) = probe(&shared.path) {
            let cause: Arc<str> = e.to_string().into();
            shared.health.send_replace(Some(cause));
            continue;
        }
        // Reopen: readers wait on the lock for the few ms it takes.
        let mut slot = shared.trees.write().expect("store trees lock");
        *slot = None;
        match Trees::open(&shared.path, std::time::Instant::now() + LOCK_WAIT) {
            Ok(trees) => {
                let counter = next_run_counter(&trees.meta).unwrap_or(0);
                // What was listed was durable; ids above it were never
                // acknowledged and may be given again.
                shared
                    .durable_run
                    .store(counter, std::sync::atomic::Ordering::Release);
                *slot = Some(trees);
                drop(slot);
                tracing::info!("the store can write again");
                shared.health.send_replace(None);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reopening the store failed; retrying");
                shared.health.send_replace(Some(e.to_string().into()));
            }
        }
    }
}

/// Answers a job "cannot write" without applying it.
fn refuse(shared: &Shared, job: Job) {
    let cause = shared
        .health
        .borrow()
        .clone()
        .unwrap_or_else(|| "the store is recovering from a write failure".into());
    job.refuse(StoreError::Unwritable(cause));
}

/// Writes, syncs and removes a probe file next to the store.
fn probe(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let probe = path.with_extension("probe");
    let result = (|| {
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(&vec![0u8; PROBE_BYTES])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    result
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Where a test's store lives: the same tests run on both backends.
    pub(super) enum Backing {
        Sled(tempfile::TempDir),
        Etcd(crate::testetcd::Etcd),
    }

    impl Backing {
        pub(super) fn sled() -> Backing {
            Backing::Sled(tempfile::tempdir().unwrap())
        }

        pub(super) fn etcd() -> Backing {
            Backing::Etcd(crate::testetcd::Etcd::start(1))
        }

        /// Opens the store (again: what a restarted controller finds).
        pub(super) async fn open(&self) -> Store {
            match self {
                Backing::Sled(dir) => Store::open(&dir.path().join("db")).unwrap(),
                Backing::Etcd(etcd) => {
                    Store::open_etcd(&EtcdConfig::new(etcd.endpoints(), "test/"))
                        .await
                        .unwrap()
                }
            }
        }
    }

    /// Runs `test` on a sled store and on an etcd store.
    macro_rules! both_backends {
        ($name:ident, $body:ident) => {
            mod $name {
                use super::*;
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sled() {
                    $body(Backing::sled()).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn etcd() {
                    $body(Backing::etcd()).await;
                }
            }
        };
    }

    both_backends!(a_token_works_once_and_not_after_expiry, token_once);
    both_backends!(
        a_token_is_used_once_per_host_and_a_retry_is_not_a_use,
        token_retry
    );
    both_backends!(journals_are_per_run_ordered_and_survive_reopen, journals);
    both_backends!(
        concurrent_writes_of_every_kind_all_finish_in_group_commits,
        concurrent_writes
    );

    pub(super) fn token(expires_at: Millis) -> TokenRecord {
        TokenRecord {
            created_at: 0,
            expires_at,
            created_by: "admin".into(),
            used_by: Vec::new(),
            uses: 1,
            labels: BTreeMap::new(),
            revoked: false,
            joined: Vec::new(),
            used: 0,
        }
    }

    pub(super) fn meta(name: &str) -> RunMeta {
        RunMeta {
            id: 0,
            name: name.into(),
            state: RunState::Pending,
            created_at: 1,
            finished_at: None,
            submitted_by: "admin".into(),
            hosts: 1,
        }
    }

    pub(super) fn approve(by: &str) -> JournalEntry {
        JournalEntry {
            at: 5,
            record: Record::Event {
                event: Event::Approve { by: by.into() },
            },
        }
    }

    async fn token_once(b: Backing) {
        let s = b.open().await;
        s.put_token("h1", token(1000)).await.unwrap();
        s.put_token("h2", token(1000)).await.unwrap();
        let none = BTreeMap::new;
        let host = s
            .enroll("h1", "web-1", "k1", (vec![1], 0), none(), 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((host.name.as_str(), host.serials.len()), ("web-1", 1));
        assert_eq!(
            s.enroll("h1", "web-2", "k2", (vec![2], 0), none(), 10)
                .await
                .unwrap(),
            Err(TokenRefused::Used("web-1".into()))
        );
        assert_eq!(
            s.enroll("h2", "web-2", "k2", (vec![2], 0), none(), 1000)
                .await
                .unwrap(),
            Err(TokenRefused::Expired)
        );
        assert_eq!(
            s.enroll("nope", "web-2", "k2", (vec![2], 0), none(), 1)
                .await
                .unwrap(),
            Err(TokenRefused::Unknown)
        );
        assert!(
            s.host("web-2").unwrap().is_none(),
            "a refused token records no host"
        );
    }

    async fn token_retry(b: Backing) {
        let s = b.open().await;
        let mut three = token(1000);
        three.uses = 3;
        s.put_token("t", three).await.unwrap();
        s.enroll("t", "web-1", "k1", (vec![1], 0), BTreeMap::new(), 10)
            .await
            .unwrap()
            .unwrap();
        // web-1 lost the answer and asks again with the same key: a retry,
        // even after the token expired.
        let again = s
            .enroll("t", "web-1", "k1", (vec![2], 0), BTreeMap::new(), 2000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again.serials, vec![vec![1], vec![2]]);
        // The same name with another key is someone else.
        assert_eq!(
            s.enroll("t", "web-1", "evil", (vec![3], 0), BTreeMap::new(), 10)
                .await
                .unwrap(),
            Err(TokenRefused::NameTaken("web-1".into()))
        );
        s.enroll("t", "web-2", "k2", (vec![4], 0), BTreeMap::new(), 10)
            .await
            .unwrap()
            .unwrap();
        s.enroll("t", "web-3", "k3", (vec![5], 0), BTreeMap::new(), 10)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            s.enroll("t", "web-4", "k4", (vec![6], 0), BTreeMap::new(), 10)
                .await
                .unwrap(),
            Err(TokenRefused::Used("web-1, web-2, web-3".into()))
        );
        // A revoked host cannot come back through a retry.
        s.revoke("web-2", "admin", 20, false).await.unwrap();
        assert_eq!(
            s.enroll("t", "web-2", "k2", (vec![7], 0), BTreeMap::new(), 30)
                .await
                .unwrap(),
            Err(TokenRefused::Used("web-1, web-2, web-3".into()))
        );
    }

    #[test]
    fn a_store_in_use_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(&dir.path().join("db")).unwrap();
        let second = Store::open(&dir.path().join("db")).err().unwrap();
        assert!(matches!(second, StoreError::Busy(_)), "{second}");
        assert!(second.to_string().contains("another `modi serve`"));
    }

    async fn journals(b: Backing) {
        {
            let s = b.open().await;
            let one = s.create_run(meta("one"), vec![approve("a")]).await.unwrap();
            let two = s.create_run(meta("two"), vec![approve("x")]).await.unwrap();
            assert_eq!((one.id, two.id), (1, 2));
            s.record(1, 1, vec![approve("b"), approve("c")], None)
                .await
                .unwrap();
            s.append_at_end(1, approve("d")).await.unwrap();
        }
        let s = b.open().await;
        let by: Vec<String> = s
            .journal(1)
            .unwrap()
            .into_iter()
            .map(|e| match e.record {
                Record::Event {
                    event: Event::Approve { by },
                } => by,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(by, ["a", "b", "c", "d"]);
        assert_eq!(s.journal(2).unwrap().len(), 1);
        assert_eq!(s.runs().unwrap().len(), 2);
        let three = s.create_run(meta("three"), vec![]).await.unwrap();
        assert_eq!(three.id, 3, "ids are never reused");
    }

    /// Many writers at once: every write is answered, durable, and far
    /// fewer flushes than writes are made (sled 0.34 deadlocks when
    /// flushes run concurrently; the one writer makes that impossible).
    async fn concurrent_writes(b: Backing) {
        let s = b.open().await;
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..200u64 {
            let s = s.clone();
            calls.spawn(async move {
                let started = std::time::Instant::now();
                match i % 4 {
                    0 => s
                        .put_token(&format!("t{i}"), token(u64::MAX))
                        .await
                        .map(|_| ()),
                    1 => s
                        .update_host(&format!("h{i}"), move |h| {
                            let mut h = h.unwrap_or_default();
                            h.name = format!("h{i}");
                            h
                        })
                        .await
                        .map(|_| ()),
                    2 => s
                        .create_run(meta(&format!("r{i}")), vec![approve("a")])
                        .await
                        .map(|_| ()),
                    _ => s.flush().await,
                }
                .unwrap();
                started.elapsed()
            });
        }
        let mut slowest = std::time::Duration::ZERO;
        while let Some(took) = calls.join_next().await {
            slowest = slowest.max(took.unwrap());
        }
        assert!(slowest < WRITE_DEADLINE, "a write took {slowest:?}");
        let stats = s.writer_stats();
        assert_eq!(stats.jobs, 200);
        assert!(stats.flushes < 200, "group commit: {stats:?}");
        drop(s);
        let s = b.open().await;
        assert_eq!(s.runs().unwrap().len(), 50);
        assert_eq!(s.hosts().unwrap().len(), 50);
        let ids: HashSet<u64> = s.runs().unwrap().iter().map(|r| r.id).collect();
        assert_eq!(ids.len(), 50, "every run got its own id");
    }

    /// A real full filesystem (a 4 MiB tmpfs, mounted here when we may):
    /// writes fail at once with the cause, reads keep working, nothing
    /// acknowledged is lost, a run whose creation failed is never listed,
    /// and once space is freed the store writes again by itself.
    #[tokio::test]
    async fn a_full_disk_fails_writes_with_the_cause_and_recovers_by_itself() {
        let Some(mnt) = crate::testfs::Tmpfs::mount(4) else {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return;
        };
        let path = mnt.path().join("db");
        let s = Store::open(&path).unwrap();
        let kept = s
            .create_run(meta("kept"), vec![approve("a")])
            .await
            .unwrap();
        let filler = mnt.fill();
        let mut failed = None;
        for i in 0..10_000u64 {
            let big = JournalEntry {
                at: i,
                record: Record::Event {
                    event: Event::Approve {
                        by: "x".repeat(16 << 10),
                    },
                },
            };
            if let Err(e) = s.record(kept.id, 1 + i, vec![big], None).await {
                failed = Some(e);
                break;
            }
        }
        let failed = failed.expect("the disk filled up");
        assert!(
            failed.to_string().contains("No space left on device"),
            "{failed}"
        );
        assert!(s.health().is_some());
        // Fails at once now, with the cause, and is never listed.
        let started = std::time::Instant::now();
        let e = s.create_run(meta("refused"), vec![]).await.unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(e.to_string().contains("cannot write"), "{e}");
        // Reads keep working.
        let listed: Vec<String> = s.runs().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(listed, ["kept"]);
        // Free the space: the writer notices by itself.
        drop(filler);
        tokio::time::timeout(std::time::Duration::from_secs(20), s.writable())
            .await
            .expect("writable again within 20 s");
        let again = s
            .create_run(meta("after"), vec![approve("b")])
            .await
            .unwrap();
        let listed: Vec<String> = s.runs().unwrap().into_iter().map(|r| r.name).collect();
        assert_eq!(listed, ["kept", "after"]);
        assert!(again.id > kept.id);
        assert_eq!(s.journal(kept.id).unwrap()[0], approve("a"));
    }
}
