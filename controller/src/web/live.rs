//! Live updates as server-sent events: a run page gets one small event per
//! host state change (the page recolours that one cell) and a nudge to
//! re-fetch its panel when the run, a change or a gate changes; a host
//! page gets its running step's output. Both read the admin API's own
//! Watch and Logs streams.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use modi_proto::v1 as pb;
use modi_proto::v1::admin_service_server::AdminService;
use serde_json::json;
use tokio_stream::{Stream, StreamExt};

use super::{SignedIn, call};
use crate::rollout::Progress;
use crate::run_ports::WatchItem;
use crate::server::Shared;
use crate::typed;

fn sse(stream: impl Stream<Item = serde_json::Value> + Send + 'static) -> Response {
    let stream = stream.map(|v| Ok::<_, Infallible>(Event::default().data(v.to_string())));
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// What the run page needs of one watch item, if anything.
fn grid_event(item: WatchItem) -> Option<serde_json::Value> {
    let WatchItem::Progress { progress } = item else {
        return None;
    };
    Some(match progress {
        Progress::Host {
            change,
            host,
            state,
            ..
        } => json!({ "k": "host", "c": change, "h": host, "s": state.as_str() }),
        Progress::Change { change, state } => {
            json!({ "k": "change", "c": change, "s": state.as_str() })
        }
        Progress::Run { state } => {
            json!({ "k": "run", "s": state.as_str(), "end": state.is_final() })
        }
        Progress::AwaitingApproval { .. } => json!({ "k": "gate" }),
        Progress::Batch { .. } | Progress::Step { .. } => return None,
    })
}

/// `GET /runs/{run}/events`.
pub async fn run_events(
    State(shared): State<Arc<Shared>>,
    SignedIn(_, session): SignedIn,
    Path(run): Path<String>,
) -> Response {
    let req = pb::WatchRequest { run_id: run };
    let stream = match call(
        &shared,
        &session.caller,
        "Watch",
        req,
        |api, r| async move { api.watch(r).await },
    )
    .await
    {
        Ok(s) => s,
        Err(s) => {
            return super::pages::problem(axum::http::StatusCode::NOT_FOUND, "No run", s.message());
        }
    };
    let events = stream.filter_map(|e| {
        let event = e.ok()?.event?;
        match event {
            // The page was rendered from a status of its own: a nudge to
            // catch up with anything between the two.
            pb::watch_event::Event::Status(_) => Some(json!({ "k": "gate" })),
            pb::watch_event::Event::Progress(p) => {
                typed::progress_from(p).ok().and_then(grid_event)
            }
        }
    });
    sse(events)
}

/// `GET /runs/{run}/hosts/{host}/output`: the host's step output as it
/// comes.
pub async fn host_output(
    State(shared): State<Arc<Shared>>,
    SignedIn(_, session): SignedIn,
    Path((run, host)): Path<(String, String)>,
) -> Response {
    let req = pb::LogsRequest {
        run_id: run,
        host,
        follow: true,
    };
    let stream = match call(&shared, &session.caller, "Logs", req, |api, r| async move {
        api.logs(r).await
    })
    .await
    {
        Ok(s) => s,
        Err(s) => {
            return super::pages::problem(axum::http::StatusCode::NOT_FOUND, "No run", s.message());
        }
    };
    let events = stream.filter_map(|e| {
        let e = e.ok()?;
        Some(json!({
            "step": e.step,
            "stdout": e.stdout,
            "stderr": e.stderr,
            "finished": e.finished,
            "outcome": e.outcome,
        }))
    });
    sse(events)
}
