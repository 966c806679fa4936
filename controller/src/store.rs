//! The controller's durable state in sled.
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
//!
//! Values are JSON. Every append is flushed before the caller acts on it.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::rollout::{DispatchId, Event, Millis, RunState};
use crate::spec::RunSpec;

/// How long [`Store::open`] waits for the store's lock.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

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
    /// Already used.
    #[error("this join token was already used (by {0:?})")]
    Used(String),
    /// Past its expiry.
    #[error("this join token expired")]
    Expired,
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
    /// Who made it (admin cert name).
    pub created_by: String,
    /// Set once used: by which agent name.
    #[serde(default)]
    pub used_by: Option<String>,
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
}

/// The open store.
#[derive(Clone)]
pub struct Store {
    /// Held while any clone is alive.
    _lock: Arc<nix::fcntl::Flock<std::fs::File>>,
    db: sled::Db,
    hosts: sled::Tree,
    tokens: sled::Tree,
    revoked: sled::Tree,
    runs: sled::Tree,
    journal: sled::Tree,
    meta: sled::Tree,
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

impl Store {
    /// Opens (creating) the store at `path`. The store is ours alone: a
    /// lock file next to it is held while it is open, and a second
    /// controller on the same data dir is refused ([`StoreError::Busy`]).
    /// sled's own lock is released a moment after its previous holder in
    /// this process closed it (its flusher thread exits late), so opening
    /// sled is retried for up to [`LOCK_WAIT`].
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
        let db = loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => break db,
                Err(sled::Error::Io(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(Store {
            _lock: Arc::new(lock),
            hosts: db.open_tree("hosts")?,
            tokens: db.open_tree("tokens")?,
            revoked: db.open_tree("revoked")?,
            runs: db.open_tree("runs")?,
            journal: db.open_tree("journal")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    // ---- hosts -------------------------------------------------------

    /// The host called `name`.
    pub fn host(&self, name: &str) -> Result<Option<HostRecord>, StoreError> {
        self.hosts
            .get(name)?
            .map(|v| decode("hosts", &v))
            .transpose()
    }

    /// Writes a host record.
    pub fn put_host(&self, host: &HostRecord) -> Result<(), StoreError> {
        self.hosts.insert(host.name.as_bytes(), encode(host))?;
        Ok(())
    }

    /// Updates the host called `name` atomically: `f` gets the current
    /// record (if any) and returns the new one; a concurrent writer makes
    /// it run again on the newer record, so no update is lost.
    pub fn update_host(
        &self,
        name: &str,
        f: impl Fn(Option<HostRecord>) -> HostRecord,
    ) -> Result<HostRecord, StoreError> {
        loop {
            let old = self.hosts.get(name)?;
            let current = old.as_ref().map(|v| decode("hosts", v)).transpose()?;
            let new = f(current);
            let swapped = self.hosts.compare_and_swap(name, old, Some(encode(&new)))?;
            if swapped.is_ok() {
                return Ok(new);
            }
        }
    }

    /// Every host, by name.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.hosts
            .iter()
            .values()
            .map(|v| decode("hosts", &v?))
            .collect()
    }

    // ---- tokens ------------------------------------------------------

    /// Records a token by its hash.
    pub fn put_token(&self, hash: &str, token: &TokenRecord) -> Result<(), StoreError> {
        self.tokens.insert(hash.as_bytes(), encode(token))?;
        Ok(())
    }

    /// Uses the token with this hash for agent `name`, exactly once: two
    /// agents racing with one token cannot both win.
    pub fn consume_token(
        &self,
        hash: &str,
        name: &str,
        now: Millis,
    ) -> Result<Result<TokenRecord, TokenRefused>, StoreError> {
        loop {
            let Some(old) = self.tokens.get(hash.as_bytes())? else {
                return Ok(Err(TokenRefused::Unknown));
            };
            let mut token: TokenRecord = decode("tokens", &old)?;
            if let Some(by) = token.used_by {
                return Ok(Err(TokenRefused::Used(by)));
            }
            if now >= token.expires_at {
                return Ok(Err(TokenRefused::Expired));
            }
            token.used_by = Some(name.to_string());
            let swapped =
                self.tokens
                    .compare_and_swap(hash.as_bytes(), Some(old), Some(encode(&token)))?;
            if swapped.is_ok() {
                return Ok(Ok(token));
            }
        }
    }

    // ---- revocation --------------------------------------------------

    /// Revokes every certificate issued to `name`; `None` if there is no
    /// such host. Returns the host as revoked.
    pub fn revoke(
        &self,
        name: &str,
        by: &str,
        now: Millis,
    ) -> Result<Option<HostRecord>, StoreError> {
        if self.host(name)?.is_none() {
            return Ok(None);
        }
        let host = self.update_host(name, |host| {
            let mut host = host.unwrap_or_default();
            host.revoked = true;
            host
        })?;
        for serial in &host.serials {
            let r = Revocation {
                name: host.name.clone(),
                at: now,
                by: by.to_string(),
            };
            self.revoked.insert(serial.as_slice(), encode(&r))?;
        }
        Ok(Some(host))
    }

    /// Every revoked serial.
    pub fn revoked_serials(&self) -> Result<HashSet<Vec<u8>>, StoreError> {
        self.revoked
            .iter()
            .keys()
            .map(|k| Ok(k?.to_vec()))
            .collect()
    }

    // ---- runs --------------------------------------------------------

    /// A new run id, never reused.
    pub fn next_run_id(&self) -> Result<u64, StoreError> {
        let next = self.meta.update_and_fetch("next_run", |old| {
            let n = old
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(0, u64::from_be_bytes);
            Some((n + 1).to_be_bytes().to_vec())
        })?;
        let bytes = next.expect("update_and_fetch always stores a value");
        Ok(u64::from_be_bytes(
            <[u8; 8]>::try_from(bytes.as_ref()).expect("8 bytes"),
        ))
    }

    /// Writes a run's summary.
    pub fn put_run(&self, run: &RunMeta) -> Result<(), StoreError> {
        self.runs.insert(run.id.to_be_bytes(), encode(run))?;
        Ok(())
    }

    /// A run's summary.
    pub fn run(&self, id: u64) -> Result<Option<RunMeta>, StoreError> {
        self.runs
            .get(id.to_be_bytes())?
            .map(|v| decode("runs", &v))
            .transpose()
    }

    /// Every run, oldest first.
    pub fn runs(&self) -> Result<Vec<RunMeta>, StoreError> {
        self.runs
            .iter()
            .values()
            .map(|v| decode("runs", &v?))
            .collect()
    }

    /// Appends entries to a run's journal starting at sequence `first_seq`
    /// (the caller, the run's only writer, keeps the count). Not durable
    /// until [`Store::flush`].
    pub fn append(
        &self,
        run: u64,
        first_seq: u64,
        entries: &[JournalEntry],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (i, entry) in entries.iter().enumerate() {
            batch.insert(&journal_key(run, first_seq + i as u64), encode(entry));
        }
        self.journal.apply_batch(batch)?;
        Ok(())
    }

    /// A run's journal, in order.
    pub fn journal(&self, run: u64) -> Result<Vec<JournalEntry>, StoreError> {
        self.journal
            .range(journal_key(run, 0)..=journal_key(run, u64::MAX))
            .values()
            .map(|v| decode("journal", &v?))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        (dir, store)
    }

    #[test]
    fn a_token_works_once_and_not_after_expiry() {
        let (_d, s) = store();
        let t = TokenRecord {
            created_at: 0,
            expires_at: 1000,
            created_by: "admin".into(),
            used_by: None,
        };
        s.put_token("h1", &t).unwrap();
        s.put_token("h2", &t).unwrap();
        assert!(s.consume_token("h1", "web-1", 10).unwrap().is_ok());
        assert_eq!(
            s.consume_token("h1", "web-2", 10).unwrap(),
            Err(TokenRefused::Used("web-1".into()))
        );
        assert_eq!(
            s.consume_token("h2", "web-2", 1000).unwrap(),
            Err(TokenRefused::Expired)
        );
        assert_eq!(
            s.consume_token("nope", "web-2", 1).unwrap(),
            Err(TokenRefused::Unknown)
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

    #[tokio::test]
    async fn journals_are_per_run_ordered_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let s = Store::open(&path).unwrap();
            assert_eq!(s.next_run_id().unwrap(), 1);
            assert_eq!(s.next_run_id().unwrap(), 2);
            let e = |by: &str| JournalEntry {
                at: 5,
                record: Record::Event {
                    event: Event::Approve { by: by.into() },
                },
            };
            s.append(1, 0, &[e("a"), e("b")]).unwrap();
            s.append(2, 0, &[e("x")]).unwrap();
            s.append(1, 2, &[e("c")]).unwrap();
            s.flush().await.unwrap();
        }
        let s = Store::open(&path).unwrap();
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
        assert_eq!(by, ["a", "b", "c"]);
        assert_eq!(s.journal(2).unwrap().len(), 1);
        assert_eq!(s.next_run_id().unwrap(), 3, "ids are never reused");
    }
}
