//! The web view (`web_listen` in `controller.toml`, off by default): runs,
//! a run live, hosts and plans, rendered on the server (maud) with a little
//! plain JavaScript embedded in the binary; no external fonts, scripts or
//! CDNs. HTTPS with the controller's certificate.
//!
//! Sign-in is `modi ui`: a one-time link for the operator whose CLI asked
//! ([`session`]). Every page reads through the admin API's own handlers,
//! with the same rule per method (role) and the same audit journal as the
//! gRPC calls ([`call`]); every POST carries the session's form token
//! (CSRF), and the cookie is HttpOnly, Secure and SameSite=Strict.

// A handler's early return is the page it answers with: `Result<_, Response>`
// is the idiom here, and boxing it would buy nothing.
#![allow(clippy::result_large_err)]

mod live;
mod pages;
pub mod session;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tonic::Status;

pub use session::Sessions;

use crate::config::ControllerConfig;
use crate::server::Shared;
use crate::service::admin::AdminApi;
use crate::service::authz::{self, AuditTarget, Caller};
use crate::store::AuditEntry;

/// A browser that does not finish its TLS handshake in this long is
/// dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The web view's address as browsers reach it: `web_url`, or `https://`,
/// the host the controller advertises, and the `web_listen` port.
pub fn base_url(config: &ControllerConfig) -> Option<String> {
    let listen = config.web_listen.as_ref()?;
    if let Some(url) = &config.web_url {
        return Some(url.trim_end_matches('/').to_string());
    }
    let port = listen.rsplit(':').next()?;
    let host = config
        .advertise
        .trim_start_matches("https://")
        .split('/')
        .next()?;
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    Some(format!("https://{host}:{port}"))
}

/// Serves the web view on `listener` until the controller stops.
pub async fn serve(listener: TcpListener, tls: TlsAcceptor, shared: Arc<Shared>) {
    let app = router(shared.clone());
    let shutdown = shared.shutdown.clone();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "web: accept failed");
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let tls = tls.clone();
        let app = app.clone();
        let shutdown = shutdown.clone();
        shared.tasks.spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "web: TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(
                TokioIo::new(stream),
                TowerToHyperService::new(app),
            );
            tokio::select! {
                served = conn => {
                    if let Err(e) = served {
                        tracing::debug!(%peer, error = %e, "web: connection ended");
                    }
                }
                _ = shutdown.cancelled() => {}
            }
        });
    }
}

/// Every page and action.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { redirect("/runs") }))
        .route("/login", get(pages::login))
        .route("/logout", post(pages::logout))
        .route("/runs", get(pages::runs))
        .route("/runs/{run}", get(pages::run))
        .route("/runs/{run}/panel", get(pages::panel))
        .route("/runs/{run}/events", get(live::run_events))
        .route("/runs/{run}/control", post(pages::control))
        .route("/runs/{run}/hosts/{host}", get(pages::host))
        .route("/runs/{run}/hosts/{host}/output", get(live::host_output))
        .route("/hosts", get(pages::hosts))
        .route("/plan", get(pages::plan_form).post(pages::plan))
        .route(
            "/static/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .route(
            "/static/style.css",
            get(|| async { asset("text/css", STYLE_CSS) }),
        )
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            only_when_active,
        ))
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(shared)
}

/// A standby controller of a set (or one cut off from its store) serves
/// no page: it says which controller is active instead.
async fn only_when_active(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if shared.role.is_active() {
        return next.run(req).await;
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        shared.role.refusal().message().to_string(),
    )
        .into_response()
}

const APP_JS: &str = include_str!("web/static/app.js");
const STYLE_CSS: &str = include_str!("web/static/style.css");

fn asset(kind: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, kind)], body).into_response()
}

/// Headers every response carries: nothing but our own scripts and styles
/// run, no framing, no referrer (a login link carries its token).
async fn secure_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// 303 to `to`.
fn redirect(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response()
}

/// The session cookie's value, if the request has one.
fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == session::COOKIE)
        .map(|(_, v)| v.to_string())
}

/// The signed-in operator of a request (its cookie value and session); a
/// request without one is answered with the page that says how to sign
/// in.
pub struct SignedIn(pub String, pub session::Session);

impl axum::extract::FromRequestParts<Arc<Shared>> for SignedIn {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        shared: &Arc<Shared>,
    ) -> Result<SignedIn, Response> {
        signed_in(shared, &parts.headers).map(|(id, s)| SignedIn(id, s))
    }
}

/// The signed-in session, or the page that says how to sign in.
fn signed_in(shared: &Shared, headers: &HeaderMap) -> Result<(String, session::Session), Response> {
    let refused = |why: String| pages::problem(StatusCode::UNAUTHORIZED, "Not signed in", &why);
    let id = cookie(headers).ok_or_else(|| {
        refused("Run `modi ui` and open the link it prints to sign in.".to_string())
    })?;
    shared
        .web
        .session(&id)
        .map(|s| (id, s))
        .map_err(|e| refused(format!("{e}. Run `modi ui` to sign in again.")))
}

/// A POST is this session's own: its form token matches, and the browser
/// does not say it came from another site.
fn same_origin_form(
    headers: &HeaderMap,
    session: &session::Session,
    csrf: &str,
) -> Result<(), Response> {
    let cross_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v != "same-origin" && v != "none");
    let token_ok = !csrf.is_empty() && constant_time_eq(csrf.as_bytes(), session.csrf.as_bytes());
    if cross_site || !token_ok {
        tracing::warn!(operator = %session.caller.name, "web: a POST without this session's form token refused");
        return Err(pages::problem(
            StatusCode::FORBIDDEN,
            "Refused",
            "This form did not come from this session's own page (CSRF check); nothing was done.",
        ));
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One admin call on behalf of `caller`, with the gRPC API's rule for
/// `method` and, for a call that changes something, its audit entry
/// (allowed or refused), marked as coming from the web view.
async fn call<Req, Resp, Fut>(
    shared: &Arc<Shared>,
    caller: &Caller,
    method: &str,
    req: Req,
    handler: impl FnOnce(AdminApi, tonic::Request<Req>) -> Fut,
) -> Result<Resp, Status>
where
    Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
{
    let at = shared.drivers.clock.now();
    let audited = authz::rule(method).is_none_or(|r| r.changes);
    let result = match authz::allow(caller, method) {
        Ok(_) => {
            let mut request = tonic::Request::new(req);
            request.extensions_mut().insert(caller.clone());
            handler(AdminApi::new(shared.clone()), request).await
        }
        Err(status) => Err(status),
    };
    if audited {
        let (target, outcome) = match &result {
            Ok(resp) => (
                resp.extensions()
                    .get::<AuditTarget>()
                    .map(|t| t.0.clone())
                    .unwrap_or_default(),
                "ok".to_string(),
            ),
            Err(s) => (String::new(), format!("{:?}: {}", s.code(), s.message())),
        };
        let entry = AuditEntry {
            at,
            operator: caller.name.clone(),
            role: caller.role.to_string(),
            method: method.to_string(),
            target: if target.is_empty() {
                "(web)".to_string()
            } else {
                format!("{target} (web)")
            },
            outcome,
        };
        authz::audit(&shared.store, entry).await;
    }
    result.map(tonic::Response::into_inner)
}
