//! Who is signed in to the web view. `modi ui` asks for a one-time login
//! token (short-lived, for the operator whose CLI certificate asked); the
//! page trades it for a session cookie. Sessions and tokens live in the
//! controller's memory only: a restart signs everyone out. Every request
//! looks the operator up again, so a revoked operator's sessions end at
//! once and a changed role applies at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::clock::Clock;
use crate::rollout::Millis;
use crate::service::authz::Caller;
use crate::store::Store;

/// How long a login token may wait to be used.
pub const LOGIN_TTL_MS: Millis = 120_000;

/// How long a session lasts.
pub const SESSION_TTL_MS: Millis = 8 * 3600 * 1000;

/// The session cookie's name.
pub const COOKIE: &str = "modi_session";

/// At most this many sessions and waiting tokens are kept; the oldest go
/// first.
const MAX_KEPT: usize = 10_000;

/// A signed-in operator.
#[derive(Clone, Debug)]
pub struct Session {
    /// The operator (role as it is now, read at every request).
    pub caller: Caller,
    /// The form token every POST of this session must carry.
    pub csrf: String,
    /// When it ends.
    pub expires: Millis,
}

#[derive(Default)]
struct Inner {
    /// sha256(login token) → (operator, expires).
    logins: HashMap<String, (String, Millis)>,
    /// sha256(session id) → (operator, csrf, expires).
    sessions: HashMap<String, (String, String, Millis)>,
}

/// Login tokens and sessions. Cheap to clone.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Mutex<Inner>>,
    store: Store,
    clock: Clock,
}

fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn secret(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(rand::random::<[u8; 24]>()))
}

/// Drops what expired, then the oldest past `MAX_KEPT`.
fn prune<V>(map: &mut HashMap<String, V>, now: Millis, expires: impl Fn(&V) -> Millis) {
    map.retain(|_, v| expires(v) > now);
    if map.len() > MAX_KEPT {
        let mut by_age: Vec<(Millis, String)> =
            map.iter().map(|(k, v)| (expires(v), k.clone())).collect();
        by_age.sort();
        for (_, k) in by_age.into_iter().take(map.len() - MAX_KEPT) {
            map.remove(&k);
        }
    }
}

impl Sessions {
    /// Empty.
    pub fn new(store: Store, clock: Clock) -> Sessions {
        Sessions {
            inner: Arc::new(Mutex::new(Inner::default())),
            store,
            clock,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("sessions lock")
    }

    /// A one-time login token for `operator`.
    pub fn login_token(&self, operator: &str) -> String {
        let token = secret("ml_");
        let now = self.clock.now();
        let mut inner = self.lock();
        prune(&mut inner.logins, now, |v| v.1);
        inner
            .logins
            .insert(digest(&token), (operator.to_string(), now + LOGIN_TTL_MS));
        token
    }

    /// Trades a login token for a new session: `(session id, session)`.
    /// A token works once, and only before it expires.
    pub fn sign_in(&self, token: &str) -> Result<(String, Session), String> {
        let now = self.clock.now();
        let operator = {
            let mut inner = self.lock();
            match inner.logins.remove(&digest(token)) {
                Some((op, expires)) if expires > now => op,
                Some(_) => return Err("this login link has expired; run `modi ui` again".into()),
                None => {
                    return Err(
                        "this login link is not valid (each works once); run `modi ui` again"
                            .into(),
                    );
                }
            }
        };
        let caller = self.operator(&operator)?;
        let id = secret("ms_");
        let csrf = secret("");
        let expires = now + SESSION_TTL_MS;
        let mut inner = self.lock();
        prune(&mut inner.sessions, now, |v| v.2);
        inner
            .sessions
            .insert(digest(&id), (operator, csrf.clone(), expires));
        Ok((
            id,
            Session {
                caller,
                csrf,
                expires,
            },
        ))
    }

    /// The session with cookie value `id`, if it is live and its operator
    /// still is one.
    pub fn session(&self, id: &str) -> Result<Session, String> {
        let now = self.clock.now();
        let (operator, csrf, expires) = {
            let inner = self.lock();
            match inner.sessions.get(&digest(id)) {
                Some((op, csrf, expires)) if *expires > now => (op.clone(), csrf.clone(), *expires),
                _ => return Err("not signed in (or the session ended)".into()),
            }
        };
        match self.operator(&operator) {
            Ok(caller) => Ok(Session {
                caller,
                csrf,
                expires,
            }),
            Err(e) => {
                self.sign_out(id);
                Err(e)
            }
        }
    }

    /// Ends the session with cookie value `id`.
    pub fn sign_out(&self, id: &str) {
        self.lock().sessions.remove(&digest(id));
    }

    /// The operator as the store knows it now.
    fn operator(&self, name: &str) -> Result<Caller, String> {
        match self.store.operator(name) {
            Ok(Some(op)) if !op.revoked => Ok(Caller {
                name: op.name,
                role: op.role,
            }),
            Ok(_) => Err(format!(
                "{name} is no longer an operator of this controller"
            )),
            Err(e) => Err(format!("the controller cannot read its store: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{OperatorRecord, OperatorRole};

    async fn with_operator(role: OperatorRole) -> (tempfile::TempDir, Store, Sessions) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        store
            .add_operator(OperatorRecord {
                name: "ann".into(),
                role,
                created_at: 0,
                created_by: "test".into(),
                serials: vec![],
                cert_expires_at: 0,
                revoked: false,
            })
            .await
            .unwrap()
            .unwrap();
        let sessions = Sessions::new(store.clone(), Clock::tokio());
        (dir, store, sessions)
    }

    #[tokio::test]
    async fn a_login_token_works_once_and_only_in_time() {
        let (_dir, _store, sessions) = with_operator(OperatorRole::Operator).await;
        // Time moves only when told from here on (no store write follows).
        tokio::time::pause();
        let token = sessions.login_token("ann");
        let (id, session) = sessions.sign_in(&token).unwrap();
        assert_eq!(session.caller.name, "ann");
        assert_eq!(session.caller.role, OperatorRole::Operator);
        assert!(sessions.sign_in(&token).unwrap_err().contains("works once"));
        assert!(sessions.session(&id).is_ok());
        assert!(sessions.session("ms_forged").is_err());

        let late = sessions.login_token("ann");
        tokio::time::advance(std::time::Duration::from_millis(LOGIN_TTL_MS + 1)).await;
        assert!(sessions.sign_in(&late).unwrap_err().contains("expired"));
        tokio::time::advance(std::time::Duration::from_millis(SESSION_TTL_MS)).await;
        assert!(sessions.session(&id).is_err(), "a session ends");
    }

    #[tokio::test]
    async fn sign_out_and_revocation_end_a_session() {
        let (_dir, store, sessions) = with_operator(OperatorRole::Viewer).await;
        let (id, _) = sessions.sign_in(&sessions.login_token("ann")).unwrap();
        let (other, _) = sessions.sign_in(&sessions.login_token("ann")).unwrap();
        sessions.sign_out(&id);
        assert!(sessions.session(&id).is_err());
        assert!(sessions.session(&other).is_ok(), "only that session ends");
        store.revoke_operator("ann", "test", 1).await.unwrap();
        let err = sessions.session(&other).unwrap_err();
        assert!(err.contains("no longer an operator"), "{err}");
    }
}
