//! Who may do what, kept in the store: join tokens, host labels,
//! operators with their roles, and the audit journal of every change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{HostRecord, Store, StoreError, TokenRecord, decode, encode, get};
use crate::rollout::Millis;

/// What an operator may do. Ordered: each role may do what the ones
/// before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorRole {
    /// Read: hosts, runs, status, watch, logs, plan.
    Viewer,
    /// Also apply, approve, deny, pause, resume, abort.
    Operator,
    /// Also tokens, hosts (label, revoke), operators, the audit journal.
    Admin,
}

impl OperatorRole {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRole::Viewer => "viewer",
            OperatorRole::Operator => "operator",
            OperatorRole::Admin => "admin",
        }
    }
}

impl std::fmt::Display for OperatorRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for OperatorRole {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(OperatorRole::Viewer),
            "operator" => Ok(OperatorRole::Operator),
            "admin" => Ok(OperatorRole::Admin),
            other => Err(format!(
                "unknown role {other:?}: expected viewer, operator or admin"
            )),
        }
    }
}

/// A named operator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperatorRecord {
    /// The name in its certificates.
    pub name: String,
    /// What it may do.
    pub role: OperatorRole,
    /// When it was added.
    pub created_at: Millis,
    /// By whom.
    pub created_by: String,
    /// Serials of every certificate issued to it.
    #[serde(default)]
    pub serials: Vec<Vec<u8>>,
    /// When its newest certificate expires.
    #[serde(default)]
    pub cert_expires_at: Millis,
    /// Revoked: refused from its next call on.
    #[serde(default)]
    pub revoked: bool,
}

/// One entry of the audit journal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When.
    pub at: Millis,
    /// Who (operator name).
    pub operator: String,
    /// With which role.
    pub role: String,
    /// The admin method.
    pub method: String,
    /// What it was about.
    pub target: String,
    /// "ok", or the error.
    pub outcome: String,
}

/// Why an operator could not be added.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OperatorRefused {
    /// The name is taken by a live operator.
    #[error("an operator named {0:?} exists; revoke it first or renew its certificate")]
    Exists(String),
    /// No such operator.
    #[error("no operator named {0:?}")]
    Unknown(String),
    /// Revoked operators are not renewed.
    #[error("operator {0:?} was revoked; add it again under a new name")]
    Revoked(String),
}

/// The short id of a token (for listing and revoking): the start of its
/// hash, never the token.
pub fn token_id(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

impl Store {
    // ---- tokens ------------------------------------------------------

    /// Every token, with its hash.
    pub fn tokens(&self) -> Result<Vec<(String, TokenRecord)>, StoreError> {
        let trees = self.trees()?;
        trees
            .tokens
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let hash = String::from_utf8_lossy(&k).into_owned();
                let mut token: TokenRecord = decode("tokens", &v)?;
                // Every enrolment, wherever it is recorded.
                token.used_by = super::token_users(&trees, &hash, &token)?;
                token.used = 0;
                Ok((hash, token))
            })
            .collect()
    }

    /// Revokes the token whose id is `id`; false if there is none.
    pub async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.write(move |t| {
            let mut found = None;
            for kv in t.trees.tokens.iter() {
                let (k, v) = kv?;
                if token_id(&String::from_utf8_lossy(&k)) == id {
                    found = Some((k, decode::<TokenRecord>("tokens", &v)?));
                    break;
                }
            }
            let Some((key, mut token)) = found else {
                return Ok(false);
            };
            token.revoked = true;
            t.put(&t.trees.tokens, key, encode(&token))?;
            Ok(true)
        })
        .await
    }

    // ---- labels ------------------------------------------------------

    /// Sets and removes labels of host `name`; `None` if there is no such
    /// host. Durable on return.
    pub async fn label_host(
        &self,
        name: &str,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<Option<HostRecord>, StoreError> {
        let name = name.to_string();
        self.write(move |t| {
            let Some(mut host) = get::<HostRecord>(&t.trees.hosts, "hosts", &name)? else {
                return Ok(None);
            };
            for key in &remove {
                host.labels.remove(key);
            }
            host.labels.extend(set);
            t.put(&t.trees.hosts, name.as_bytes(), encode(&host))?;
            Ok(Some(host))
        })
        .await
    }

    // ---- operators ---------------------------------------------------

    /// The operator called `name`.
    pub fn operator(&self, name: &str) -> Result<Option<OperatorRecord>, StoreError> {
        get(&self.trees()?.operators, "operators", name)
    }

    /// Every operator, by name.
    pub fn operators(&self) -> Result<Vec<OperatorRecord>, StoreError> {
        self.trees()?
            .operators
            .iter()
            .values()
            .map(|v| decode("operators", &v?))
            .collect()
    }

    /// Adds operator `op` (a revoked one of the same name is replaced).
    /// Durable on return.
    pub async fn add_operator(
        &self,
        op: OperatorRecord,
    ) -> Result<Result<(), OperatorRefused>, StoreError> {
        self.write(move |t| {
            if let Some(old) = get::<OperatorRecord>(&t.trees.operators, "operators", &op.name)?
                && !old.revoked
            {
                return Ok(Err(OperatorRefused::Exists(op.name)));
            }
            t.put(&t.trees.operators, op.name.as_bytes(), encode(&op))?;
            Ok(Ok(()))
        })
        .await
    }

    /// Records a new certificate for operator `name`. Durable on return.
    pub async fn renew_operator(
        &self,
        name: &str,
        serial: Vec<u8>,
        expires_at: Millis,
    ) -> Result<Result<OperatorRecord, OperatorRefused>, StoreError> {
        let name = name.to_string();
        self.write(move |t| {
            let Some(mut op) = get::<OperatorRecord>(&t.trees.operators, "operators", &name)?
            else {
                return Ok(Err(OperatorRefused::Unknown(name)));
            };
            if op.revoked {
                return Ok(Err(OperatorRefused::Revoked(name)));
            }
            op.serials.push(serial);
            op.cert_expires_at = expires_at;
            t.put(&t.trees.operators, name.as_bytes(), encode(&op))?;
            Ok(Ok(op))
        })
        .await
    }

    /// Revokes operator `name` and every certificate issued to it; `None`
    /// if there is no such operator. Durable on return.
    pub async fn revoke_operator(
        &self,
        name: &str,
        by: &str,
        now: Millis,
    ) -> Result<Option<OperatorRecord>, StoreError> {
        let (name, by) = (name.to_string(), by.to_string());
        self.write(move |t| {
            let Some(mut op) = get::<OperatorRecord>(&t.trees.operators, "operators", &name)?
            else {
                return Ok(None);
            };
            op.revoked = true;
            t.put(&t.trees.operators, name.as_bytes(), encode(&op))?;
            super::revoke_serials(t, &op.name, &op.serials, &by, now)?;
            Ok(Some(op))
        })
        .await
    }

    // ---- audit -------------------------------------------------------

    /// Appends to the audit journal. Durable on return.
    pub async fn audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        self.write(move |t| {
            let next = t
                .trees
                .audit
                .last()?
                .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_ref()).ok())
                .map_or(0, |k| u64::from_be_bytes(k) + 1);
            t.put(&t.trees.audit, next.to_be_bytes(), encode(&entry))?;
            Ok(())
        })
        .await
    }

    /// The newest `limit` audit entries (all when 0), oldest first.
    pub fn audit_entries(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let trees = self.trees()?;
        let mut entries: Vec<AuditEntry> = if limit == 0 {
            trees
                .audit
                .iter()
                .values()
                .map(|v| decode("audit", &v?))
                .collect::<Result<_, _>>()?
        } else {
            trees
                .audit
                .iter()
                .values()
                .rev()
                .take(limit)
                .map(|v| decode("audit", &v?))
                .collect::<Result<_, _>>()?
        };
        if limit != 0 {
            entries.reverse();
        }
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(name: &str, role: OperatorRole) -> OperatorRecord {
        OperatorRecord {
            name: name.into(),
            role,
            created_at: 1,
            created_by: "admin".into(),
            serials: vec![name.as_bytes().to_vec()],
            cert_expires_at: 10,
            revoked: false,
        }
    }

    #[tokio::test]
    async fn operators_are_added_once_revoked_with_their_certificates_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        s.add_operator(op("ann", OperatorRole::Viewer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            s.add_operator(op("ann", OperatorRole::Admin))
                .await
                .unwrap(),
            Err(OperatorRefused::Exists("ann".into()))
        );
        let revoked = s.revoke_operator("ann", "admin", 5).await.unwrap().unwrap();
        assert!(revoked.revoked);
        assert!(s.revoked_serials().unwrap().contains(b"ann".as_slice()));
        assert_eq!(
            s.renew_operator("ann", vec![9], 20).await.unwrap(),
            Err(OperatorRefused::Revoked("ann".into()))
        );
        // The name may be given again after a revocation.
        s.add_operator(op("ann", OperatorRole::Operator))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            s.operator("ann").unwrap().unwrap().role,
            OperatorRole::Operator
        );
        for i in 0..5 {
            s.audit(AuditEntry {
                at: i,
                operator: "admin".into(),
                role: "admin".into(),
                method: "CreateToken".into(),
                target: format!("token {i}"),
                outcome: "ok".into(),
            })
            .await
            .unwrap();
        }
        let last: Vec<Millis> = s.audit_entries(2).unwrap().iter().map(|e| e.at).collect();
        assert_eq!(last, [3, 4]);
        assert_eq!(s.audit_entries(0).unwrap().len(), 5);
    }

    #[tokio::test]
    async fn a_token_with_uses_and_labels_enrols_that_many_hosts_with_its_labels() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("db")).unwrap();
        let labels = BTreeMap::from([("role".to_string(), "web".to_string())]);
        s.put_token(
            "abcdef0123456789",
            TokenRecord {
                created_at: 0,
                expires_at: 100,
                created_by: "admin".into(),
                used_by: Vec::new(),
                uses: 2,
                labels: labels.clone(),
                revoked: false,
                joined: Vec::new(),
                used: 0,
            },
        )
        .await
        .unwrap();
        let asked = BTreeMap::from([("role".to_string(), "db".to_string())]);
        for name in ["a", "b"] {
            let host = s
                .enroll(
                    "abcdef0123456789",
                    name,
                    name,
                    (vec![1], 0),
                    asked.clone(),
                    1,
                )
                .await
                .unwrap()
                .unwrap();
            assert_eq!(host.labels, labels, "the token's labels win");
        }
        assert!(matches!(
            s.enroll("abcdef0123456789", "c", "c", (vec![1], 0), asked, 1)
                .await
                .unwrap(),
            Err(super::super::TokenRefused::Used(_))
        ));
        assert!(s.revoke_token("abcdef012345").await.unwrap());
        assert!(!s.revoke_token("nope").await.unwrap());
        assert!(s.tokens().unwrap()[0].1.revoked);
    }
}
