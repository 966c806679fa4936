//! Authorisation of every admin call, in one place: a layer in front of
//! the admin service reads the caller's operator certificate, looks the
//! operator up on the controller (its role lives here, not in the
//! certificate), and lets the call through only if the method's rule
//! allows that role. A method missing from [`rule`] is refused: default
//! deny. Every call that changes something, allowed or not, is written to
//! the audit journal with its outcome.

use std::task::{Context, Poll};

use modi_proto::identity::{self, Role};
use tonic::Status;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::pki::{RevokedSerials, serial_of};
use crate::store::{AuditEntry, OperatorRole, Store};

/// What a method needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The least role that may call it.
    pub role: OperatorRole,
    /// It changes something: audited.
    pub changes: bool,
}

/// The rule of each admin method; `None` for a method without one, which
/// is refused.
pub fn rule(method: &str) -> Option<Rule> {
    use OperatorRole::{Admin, Operator, Viewer};
    let (role, changes) = match method {
        "ListHosts" | "ListRuns" | "GetRun" | "Watch" | "Logs" | "Plan" | "Version" => {
            (Viewer, false)
        }
        // Any operator may sign themselves in to the web view.
        "WebLogin" => (Viewer, true),
        "Apply" | "Control" => (Operator, true),
        "ListTokens" | "ListOperators" | "ListAudit" => (Admin, false),
        "CreateToken" | "RevokeToken" | "RevokeAgent" | "RemoveAgent" | "LabelHost"
        | "AddOperator" | "RenewOperator" | "RevokeOperator" => (Admin, true),
        _ => return None,
    };
    Some(Rule { role, changes })
}

/// Writes one audit entry (a failure to write is logged: the call has
/// happened already).
pub async fn audit(store: &Store, entry: AuditEntry) {
    if let Err(e) = store.audit(entry).await {
        tracing::error!(error = %e, "could not write the audit journal");
    }
}

/// Refuses `caller` for `method` unless the method's rule allows its role.
pub fn allow(caller: &Caller, method: &str) -> Result<Rule, Status> {
    let Some(rule) = rule(method) else {
        return Err(Status::permission_denied(format!(
            "{method} has no authorisation rule on this controller; refused"
        )));
    };
    if caller.role < rule.role {
        return Err(Status::permission_denied(format!(
            "operator {:?} ({}) may not call {method}: it needs the {} role",
            caller.name, caller.role, rule.role
        )));
    }
    Ok(rule)
}

/// The operator behind a call, for the handlers (a request extension).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The operator's name.
    pub name: String,
    /// Its role.
    pub role: OperatorRole,
}

/// What a call that changed something was about, for the audit journal
/// (a response extension the handlers set).
#[derive(Clone, Debug)]
pub struct AuditTarget(pub String);

/// The caller of an admin request; set by [`Authz`] before any handler
/// runs.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::internal("the admin call was not authorised (no authz layer)"))
}

/// Decides a call from its peer certificate: who, with which role, and
/// whether that role may call `method`.
fn decide<B>(
    req: &http::Request<B>,
    method: &str,
    store: &Store,
    revoked: &RevokedSerials,
) -> Result<Caller, (Option<Caller>, Status)> {
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
        .ok_or_else(|| {
            (
                None,
                Status::unauthenticated(
                    "this call needs a client certificate with the admin role (an operator's)",
                ),
            )
        })?;
    let leaf = certs.first().ok_or_else(|| {
        (
            None,
            Status::unauthenticated("empty client certificate chain"),
        )
    })?;
    // A standby of the set relays its operators' calls with their
    // certificate in a header (see `relay::admin_call`).
    let relayed = super::relay::relayed_operator(req, leaf).map_err(|status| (None, status))?;
    let leaf = relayed.as_deref().unwrap_or(leaf.as_ref());
    let id = identity::expect_role(leaf, Role::Admin).map_err(|e| match e {
        identity::IdentityError::WrongRole { .. } => {
            (None, Status::permission_denied(e.to_string()))
        }
        other => (None, Status::unauthenticated(other.to_string())),
    })?;
    let serial = serial_of(leaf).unwrap_or_default();
    if revoked.read().expect("revoked lock").contains(&serial) {
        tracing::warn!(operator = %id.name, "refused a revoked operator certificate");
        return Err((
            None,
            Status::permission_denied(format!("operator {:?} was revoked", id.name)),
        ));
    }
    let op = store
        .operator(&id.name)
        .map_err(|e| (None, Status::unavailable(e.to_string())))?
        .filter(|op| !op.revoked)
        .ok_or_else(|| {
            (
                None,
                Status::permission_denied(format!(
                    "{:?} is not an operator of this controller",
                    id.name
                )),
            )
        })?;
    let caller = Caller {
        name: id.name,
        role: op.role,
    };
    match allow(&caller, method) {
        Ok(_) => Ok(caller),
        Err(status) => Err((Some(caller), status)),
    }
}

/// The layer in front of the admin service.
#[derive(Clone)]
pub struct Authz<S> {
    inner: S,
    store: Store,
    revoked: RevokedSerials,
    clock: crate::clock::Clock,
}

impl<S> Authz<S> {
    /// Guards `inner`.
    pub fn new(
        inner: S,
        store: Store,
        revoked: RevokedSerials,
        clock: crate::clock::Clock,
    ) -> Self {
        Authz {
            inner,
            store,
            revoked,
            clock,
        }
    }
}

impl<S: NamedService> NamedService for Authz<S> {
    const NAME: &'static str = S::NAME;
}

/// The outcome of a call as its response headers say ("ok" unless a
/// trailers-only error response carries `grpc-status`).
fn outcome<B>(resp: &http::Response<B>) -> String {
    let headers = resp.headers();
    match headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
        None | Some("0") => "ok".into(),
        Some(code) => {
            let msg = headers
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .map(percent_decode)
                .unwrap_or_default();
            let code = tonic::Code::from_bytes(code.as_bytes());
            format!("{code:?}: {msg}")
        }
    }
}

/// gRPC percent-encodes `grpc-message`.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl<S, B> Service<http::Request<B>> for Authz<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let method = req
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let decided = decide(&req, &method, &self.store, &self.revoked);
        // The service that was polled ready handles this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let store = self.store.clone();
        let at = self.clock.now();
        let audited = rule(&method).is_none_or(|r| r.changes);
        Box::pin(async move {
            let (caller, resp) = match decided {
                Ok(caller) => {
                    req.extensions_mut().insert(caller.clone());
                    (Some(caller), inner.call(req).await?)
                }
                Err((caller, status)) => {
                    tracing::warn!(method, error = %status.message(), "admin call refused");
                    (caller, status.into_http())
                }
            };
            if audited && let Some(caller) = caller {
                let target = resp
                    .extensions()
                    .get::<AuditTarget>()
                    .map(|t| t.0.clone())
                    .unwrap_or_default();
                let entry = AuditEntry {
                    at,
                    operator: caller.name,
                    role: caller.role.to_string(),
                    method,
                    target,
                    outcome: outcome(&resp),
                };
                audit(&store, entry).await;
            }
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method of the admin service has a rule: a new method cannot
    /// be added without one (it would be refused anyway).
    #[test]
    fn every_admin_method_has_a_rule() {
        let proto = include_str!("../../../proto/proto/modi/v1/admin.proto");
        let methods: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split('(').next().unwrap_or_default().trim())
            .collect();
        assert!(methods.len() >= 18, "{methods:?}");
        for m in &methods {
            assert!(
                rule(m).is_some(),
                "admin method {m} has no authorisation rule"
            );
        }
        assert_eq!(rule("NoSuchMethod"), None, "default deny");
    }

    #[test]
    fn roles_are_ordered_and_each_rule_is_what_the_design_says() {
        use OperatorRole::*;
        assert!(Viewer < Operator && Operator < Admin);
        for (m, role) in [
            ("ListRuns", Viewer),
            ("Plan", Viewer),
            ("Watch", Viewer),
            ("Apply", Operator),
            ("Control", Operator),
            ("CreateToken", Admin),
            ("AddOperator", Admin),
            ("ListAudit", Admin),
        ] {
            assert_eq!(rule(m).map(|r| r.role), Some(role), "{m}");
        }
        assert_eq!(percent_decode("a%20b%25"), "a b%");
    }
}
