//! A store's whole content as lines of JSON, and back: how a single sled
//! controller moves to etcd (`modi store export` with the old
//! `controller.toml`, `modi store import` with the new one), or a backup
//! that any backend reads.
//!
//! One line per record: `{"tree":"hosts","key":"<base64>","value":"<base64>"}`,
//! trees in a fixed order, keys in order within each. The first line is a
//! header naming the format.

use std::io::{BufRead, Write};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError};

/// The header's format name.
pub const FORMAT: &str = "modi-store-export";
/// Records written per store job on import.
const IMPORT_BATCH: usize = 1000;

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    version: u32,
}

#[derive(Serialize, Deserialize)]
struct Line {
    tree: String,
    key: String,
    value: String,
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading or writing the file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A line is not what `export` writes.
    #[error("line {line}: {why}")]
    Bad {
        /// 1-based.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// The target store holds something already.
    #[error("the target store is not empty (tree {0} has records): import only into a new store")]
    NotEmpty(String),
}

impl Store {
    /// Writes every record to `out`; returns how many.
    pub fn export(&self, out: &mut impl Write) -> Result<usize, DumpError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let trees = self.trees()?;
        serde_json::to_writer(
            &mut *out,
            &Header {
                format: FORMAT.into(),
                version: 1,
            },
        )
        .map_err(std::io::Error::from)?;
        writeln!(out)?;
        let mut n = 0;
        for tree in trees.all() {
            let name = String::from_utf8_lossy(&tree.name()).into_owned();
            for kv in tree.iter() {
                let (k, v) = kv.map_err(StoreError::from)?;
                serde_json::to_writer(
                    &mut *out,
                    &Line {
                        tree: name.clone(),
                        key: b64.encode(&k),
                        value: b64.encode(&v),
                    },
                )
                .map_err(std::io::Error::from)?;
                writeln!(out)?;
                n += 1;
            }
        }
        out.flush()?;
        Ok(n)
    }

    /// Reads what [`Store::export`] wrote into this store, which must be
    /// empty; returns how many records. Nothing is written unless the
    /// whole input reads.
    pub async fn import(&self, input: impl BufRead) -> Result<usize, DumpError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let trees = self.trees()?;
        if let Some(busy) = trees.all().into_iter().find(|t| !t.is_empty()) {
            return Err(DumpError::NotEmpty(
                String::from_utf8_lossy(&busy.name()).into_owned(),
            ));
        }
        let names: Vec<String> = trees
            .all()
            .iter()
            .map(|t| String::from_utf8_lossy(&t.name()).into_owned())
            .collect();
        let mut records = Vec::new();
        for (i, line) in input.lines().enumerate() {
            let line = line?;
            let bad = |why: String| DumpError::Bad { line: i + 1, why };
            if i == 0 {
                let h: Header = serde_json::from_str(&line)
                    .map_err(|e| bad(format!("not a {FORMAT} header: {e}")))?;
                if h.format != FORMAT || h.version != 1 {
                    return Err(bad(format!("format {:?} version {}", h.format, h.version)));
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let l: Line = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
            if !names.contains(&l.tree) {
                return Err(bad(format!("unknown tree {:?}", l.tree)));
            }
            let key = b64.decode(&l.key).map_err(|e| bad(format!("key: {e}")))?;
            let value = b64
                .decode(&l.value)
                .map_err(|e| bad(format!("value: {e}")))?;
            records.push((l.tree, key, value));
        }
        let n = records.len();
        let mut rest = records.into_iter().peekable();
        while rest.peek().is_some() {
            let chunk: Vec<_> = rest.by_ref().take(IMPORT_BATCH).collect();
            self.write(move |t| {
                for (tree, key, value) in chunk {
                    let tree = t.trees.db.open_tree(tree.as_bytes())?;
                    t.put(&tree, key, value)?;
                }
                Ok(())
            })
            .await?;
        }
        // Runs imported are listed from now on.
        let last = super::next_run_counter(&trees.meta)?;
        self.shared
            .durable_run
            .fetch_max(last, std::sync::atomic::Ordering::AcqRel);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Backing, approve, meta};
    use super::*;

    /// sled → export → import into etcd: every record, runs listed,
    /// journals whole; a second import is refused; a damaged line
    /// names its number.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sled_store_moves_to_etcd_whole() {
        let sled = Backing::sled();
        let from = sled.open().await;
        from.create_run(meta("one"), vec![approve("a"), approve("b")])
            .await
            .unwrap();
        from.update_host("web-1", |_| crate::store::HostRecord {
            name: "web-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut text = Vec::new();
        let n = from.export(&mut text).unwrap();
        assert!(n >= 4, "{n} records");

        let etcd = Backing::etcd();
        let to = etcd.open().await;
        assert_eq!(to.import(text.as_slice()).await.unwrap(), n);
        assert_eq!(to.runs().unwrap().len(), 1);
        assert_eq!(to.journal(1).unwrap().len(), 2);
        assert_eq!(to.hosts().unwrap()[0].name, "web-1");
        drop(to);
        let again = etcd.open().await;
        assert_eq!(
            again.runs().unwrap().len(),
            1,
            "in etcd, not just the mirror"
        );
        let refused = again.import(text.as_slice()).await.unwrap_err();
        assert!(matches!(refused, DumpError::NotEmpty(_)), "{refused}");
        let mut broken = text.clone();
        broken.extend_from_slice(b"{\"tree\":\"hosts\"}\n");
        let empty = Backing::sled();
        let bad = empty
            .open()
            .await
            .import(broken.as_slice())
            .await
            .unwrap_err();
        assert!(
            bad.to_string().starts_with(&format!("line {}:", n + 2)),
            "{bad}"
        );
        assert!(
            empty.open().await.hosts().unwrap().is_empty(),
            "nothing half-imported"
        );
    }
}
