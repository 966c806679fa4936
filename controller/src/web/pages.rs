//! The pages: runs, a run (live), a host's steps in a run, hosts, plan.
//! Each reads through [`super::call`], so it sees and may do exactly what
//! the operator's role allows through the CLI.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};
use modi_proto::v1 as pb;
use modi_proto::v1::admin_service_server::AdminService;
use serde::Deserialize;
use tokio_stream::StreamExt;

use super::session::{COOKIE, SESSION_TTL_MS, Session};
use super::{SignedIn, call, redirect, same_origin_form};
use crate::rollout::{HostState, RunState, RunStatus};
use crate::server::Shared;
use crate::spec::RunSpec;
use crate::store::OperatorRole;
use crate::typed;

type Shared_ = State<Arc<Shared>>;

/// Runs listed per page.
const PAGE: usize = 50;

/// A page that says what went wrong (and what to do).
pub fn problem(status: StatusCode, title: &str, text: &str) -> Response {
    let body = html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "modi: " (title) } link rel="stylesheet" href="/static/style.css"; }
            body { main { h1 { (title) } p role="alert" { (text) } p { a href="/runs" { "Runs" } } } }
        }
    };
    (status, body).into_response()
}

fn status_problem(s: &tonic::Status) -> Response {
    let code = match s.code() {
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let title = match code {
        StatusCode::FORBIDDEN => "Not allowed",
        StatusCode::NOT_FOUND => "Not found",
        _ => "Could not do that",
    };
    problem(code, title, s.message())
}

/// The frame of every page: navigation, who is signed in, sign out.
fn page(title: &str, session: &Session, data: &[(&str, String)], body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "modi: " (title) }
                link rel="stylesheet" href="/static/style.css";
                script src="/static/app.js" defer {}
            }
            body data-run=[data.iter().find(|(k, _)| *k == "run").map(|(_, v)| v)]
                 data-live=[data.iter().find(|(k, _)| *k == "live").map(|(_, v)| v)]
                 data-host=[data.iter().find(|(k, _)| *k == "host").map(|(_, v)| v)] {
                header {
                    nav aria-label="main" {
                        a href="/runs" { "Runs" }
                        a href="/hosts" { "Hosts" }
                        a href="/plan" { "Plan" }
                    }
                    form.signout method="post" action="/logout" {
                        span.who { (session.caller.name) " (" (session.caller.role) ")" }
                        input type="hidden" name="csrf" value=(session.csrf);
                        button type="submit" { "Sign out" }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A state's icon: colour is never the only sign.
fn icon(state: &str) -> &'static str {
    match state {
        "success" | "backout_ok" => "✔",
        "skipped" => "↷",
        "failed" | "total_failure" | "partial_failure" | "backout_failed" | "lost" => "✖",
        "running" | "backing_out" => "▶",
        "awaiting_approval" => "‖",
        "paused" => "‖",
        "cancelled" | "bailed_out" => "⊘",
        "queued" | "retry_pending" | "backout_pending" => "⧗",
        _ => "·",
    }
}

fn state_badge(state: &str) -> Markup {
    html! { span class={"badge s-" (state)} { (icon(state)) " " (state.replace('_', " ")) } }
}

fn when(at: u64) -> String {
    if at == 0 {
        return "-".into();
    }
    let t = crate::clock::rfc3339(at);
    t.get(..19).map_or(t.clone(), |s| s.replace('T', " "))
}

fn duration(from: u64, to: u64) -> String {
    if from == 0 || to < from {
        return "-".into();
    }
    let s = (to - from) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

#[derive(Deserialize)]
pub struct LoginQuery {
    token: String,
}

/// `GET /login?token=...`: the one-time link from `modi ui`.
pub async fn login(State(shared): Shared_, Query(q): Query<LoginQuery>) -> Response {
    match shared.web.sign_in(&q.token) {
        Ok((id, session)) => {
            tracing::info!(operator = %session.caller.name, "web: signed in");
            let cookie = format!(
                "{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
                SESSION_TTL_MS / 1000
            );
            let mut resp = redirect("/runs");
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        Err(e) => problem(StatusCode::UNAUTHORIZED, "Cannot sign in", &e),
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /logout`.
pub async fn logout(
    State(shared): Shared_,
    SignedIn(id, session): SignedIn,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(r) = same_origin_form(&headers, &session, &form.csrf) {
        return r;
    }
    shared.web.sign_out(&id);
    tracing::info!(operator = %session.caller.name, "web: signed out");
    let mut resp = problem(
        StatusCode::OK,
        "Signed out",
        "Run `modi ui` to sign in again.",
    );
    let clear = format!("{COOKIE}=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0");
    if let Ok(v) = HeaderValue::from_str(&clear) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
pub struct RunsQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    page: usize,
}

/// `GET /runs[?state=S&page=N]`: newest first, paged.
pub async fn runs(
    State(shared): Shared_,
    SignedIn(_, session): SignedIn,
    Query(q): Query<RunsQuery>,
) -> Response {
    let listed = call(
        &shared,
        &session.caller,
        "ListRuns",
        pb::ListRunsRequest::default(),
        |api, r| async move { api.list_runs(r).await },
    )
    .await;
    let mut runs = match listed {
        Ok(r) => r.runs,
        Err(s) => return status_problem(&s),
    };
    runs.sort_by_key(|r| std::cmp::Reverse(r.run_id.parse::<u64>().unwrap_or(0)));
    let state_of = |r: &pb::RunSummary| {
        typed::run_state_from(r.state, "state").map_or("unknown", RunState::as_str)
    };
    let shown: Vec<&pb::RunSummary> = runs
        .iter()
        .filter(|r| q.state.is_empty() || state_of(r) == q.state)
        .collect();
    let pages = shown.len().div_ceil(PAGE).max(1);
    let page_no = q.page.min(pages - 1);
    let now = shared.drivers.clock.now();
    let states = [
        "running",
        "awaiting_approval",
        "paused",
        "success",
        "partial_failure",
        "total_failure",
        "backout_ok",
        "backout_failed",
        "bailed_out",
    ];
    let body = html! {
        h1 { "Runs" }
        form.filter method="get" action="/runs" {
            label for="state" { "State " }
            select id="state" name="state" {
                option value="" selected[q.state.is_empty()] { "any" }
                @for s in states { option value=(s) selected[q.state == s] { (s.replace('_', " ")) } }
            }
            button type="submit" { "Filter" }
        }
        @if shown.is_empty() {
            p { "No runs" @if !q.state.is_empty() { " in state " (q.state) } "." }
        } @else {
            table.runs {
                thead { tr { th { "Run" } th { "Changeset" } th { "State" } th { "Hosts" } th { "By" } th { "Started (UTC)" } th { "Took" } } }
                tbody {
                    @for r in shown.iter().skip(page_no * PAGE).take(PAGE) {
                        tr {
                            td { a href={"/runs/" (r.run_id)} { "run " (r.run_id) } }
                            td { (r.name) }
                            td { (state_badge(state_of(r))) }
                            td { (r.hosts) }
                            td { (r.submitted_by) }
                            td { (when(r.created_at_ms)) }
                            td { (duration(r.created_at_ms, if r.finished_at_ms == 0 { now } else { r.finished_at_ms })) }
                        }
                    }
                }
            }
            @if pages > 1 {
                nav.pager aria-label="pages" {
                    @if page_no > 0 { a href={"/runs?state=" (q.state) "&page=" (page_no - 1)} { "← newer" } }
                    span { "page " (page_no + 1) " of " (pages) }
                    @if page_no + 1 < pages { a href={"/runs?state=" (q.state) "&page=" (page_no + 1)} { "older →" } }
                }
            }
        }
    };
    page("runs", &session, &[], body).into_response()
}

/// The run's summary and status, through GetRun.
async fn fetch_run(
    shared: &Arc<Shared>,
    session: &Session,
    run: &str,
) -> Result<(pb::RunSummary, RunStatus), Response> {
    let req = pb::GetRunRequest {
        run_id: run.to_string(),
    };
    let r = call(
        shared,
        &session.caller,
        "GetRun",
        req,
        |api, r| async move { api.get_run(r).await },
    )
    .await
    .map_err(|s| status_problem(&s))?;
    let status = r
        .status
        .ok_or_else(|| {
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "No status",
                "the controller sent no status",
            )
        })
        .and_then(|s| {
            typed::run_status_from(s).map_err(|e| {
                problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Unreadable status",
                    &e.to_string(),
                )
            })
        })?;
    Ok((r.summary.unwrap_or_default(), status))
}

/// The part of a run page that changes with gates and states: the run's
/// state, why it is held, the gate that waits with its buttons, the
/// controls, the decisions. Re-fetched by the page when it changes.
fn panel_markup(run: &str, status: &RunStatus, session: &Session) -> Markup {
    let operator = session.caller.role >= OperatorRole::Operator;
    let state = status.state;
    let gate = status
        .changes
        .iter()
        .find_map(|c| c.gate.as_ref().map(|g| (c, g)));
    html! {
        section #panel aria-live="polite" data-state=(state.as_str()) {
            p { "State: " (state_badge(state.as_str())) }
            @if let Some(held) = &status.held { p.held { "Held: " (held) } }
            @if let Some((change, g)) = gate {
                div.gate role="region" aria-label="approval gate" {
                    h2 { "Waiting for approval" }
                    p { (g.label) " (change " (change.name) ", since " (when(g.since)) " UTC"
                        @if let Some(d) = g.deadline { "; a deny at " (when(d)) " UTC" } ")" }
                    @if operator {
                        (control_button(run, session, "approve", "Approve", "primary"))
                        (control_button(run, session, "deny", "Deny (backs out)", "danger"))
                    } @else {
                        p.note { "An operator may approve or deny: modi approve " (run) " / modi deny " (run) }
                    }
                }
            }
            @if operator && !state.is_final() {
                div.controls {
                    @if state == RunState::Paused {
                        (control_button(run, session, "resume", "Resume", ""))
                    } @else {
                        (control_button(run, session, "pause", "Pause", ""))
                    }
                    (control_button(run, session, "abort", "Abort (backs out)", "danger"))
                }
            }
            @if !status.decisions.is_empty() {
                h2 { "Decisions" }
                ul.decisions {
                    @for d in &status.decisions { li { (when(d.at)) " UTC: " (d.action) " by " (d.by) } }
                }
            }
        }
    }
}

fn control_button(run: &str, session: &Session, action: &str, text: &str, class: &str) -> Markup {
    html! {
        form.control method="post" action={"/runs/" (run) "/control"} {
            input type="hidden" name="csrf" value=(session.csrf);
            input type="hidden" name="action" value=(action);
            button type="submit" class=(class) data-action=(action) { (text) }
        }
    }
}

/// `GET /runs/{run}`: each change as a grid of its hosts by batch, live.
pub async fn run(
    State(shared): Shared_,
    SignedIn(_, session): SignedIn,
    Path(run): Path<String>,
) -> Response {
    let (summary, status) = match fetch_run(&shared, &session, &run).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let spec: Option<Arc<RunSpec>> = summary
        .run_id
        .parse()
        .ok()
        .and_then(|id| crate::service::admin_convert::spec_of(&shared, id).ok());
    let live = !status.state.is_final();
    let body = html! {
        h1 { "Run " (summary.run_id) ": " (summary.name) }
        p.meta { "By " (summary.submitted_by) ", started " (when(summary.created_at_ms)) " UTC" }
        (panel_markup(&summary.run_id, &status, &session))
        @for (c, change) in status.changes.iter().enumerate() {
            section.change aria-labelledby={"c-" (c)} {
                h2 id={"c-" (c)} { (change.name) " " span.cstate id={"cs-" (c)} { (state_badge(change.state.as_str())) } }
                @let batches = spec.as_ref().and_then(|s| s.changes.get(c)).map(|cs| cs.batches()).unwrap_or_else(|| vec![(0..change.hosts.len()).collect()]);
                @for (b, hosts) in batches.iter().enumerate() {
                    div.batch role="group" aria-label={"batch " (b + 1)} {
                        h3 { "batch " (b + 1) " · " (hosts.len()) @if hosts.len() == 1 { " host" } @else { " hosts" } }
                        div.grid {
                            @for h in hosts {
                                @if let Some(host) = change.hosts.get(*h) {
                                    a.host class={"s-" (host.state.as_str())} id={"h-" (c) "-" (h)}
                                      data-state=(host.state.as_str())
                                      href={"/runs/" (summary.run_id) "/hosts/" (host.name)}
                                      title={(host.name) ": " (host.state.as_str())} {
                                        span.name { (host.name) }
                                        span.st { (icon(host.state.as_str())) " " (host.state.as_str().replace('_', " ")) }
                                    }
                                }
                            }
                        }
                    }
                }
                @let failed: Vec<_> = change.hosts.iter().filter(|h| h.failure.is_some()).collect();
                @if !failed.is_empty() {
                    details.failures open {
                        summary { "Why hosts failed" }
                        ul { @for h in failed { @if let Some(f) = &h.failure { li { a href={"/runs/" (summary.run_id) "/hosts/" (h.name)} { (h.name) } ": " (f.message) " (" (f.reason.as_str()) ")" } } } }
                    }
                }
            }
        }
    };
    let data = [
        ("run", summary.run_id.clone()),
        ("live", if live { "1".into() } else { "0".into() }),
    ];
    page(&format!("run {}", summary.run_id), &session, &data, body).into_response()
}

/// `GET /runs/{run}/panel`: the panel alone, for the live page.
pub async fn panel(
    State(shared): Shared_,
    SignedIn(_, session): SignedIn,
    Path(run): Path<String>,
) -> Response {
    match fetch_run(&shared, &session, &run).await {
        Ok((summary, status)) => panel_markup(&summary.run_id, &status, &session).into_response(),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
pub struct ControlForm {
    #[serde(default)]
    csrf: String,
    action: String,
}

/// `POST /runs/{run}/control`: approve, deny, pause, resume, abort.
pub async fn control(
    State(shared): Shared_,
    SignedIn(_, session): SignedIn,
    headers: HeaderMap,
    Path(run): Path<String>,
    Form(form): Form<ControlForm>,
) -> Response {
    if let Err(r) = same_origin_form(&headers, &session, &form.csrf) {
        return r;
    }
    let action = match form.action.as_str() {
        "approve" => pb::ControlAction::Approve,
        "deny" => pb::ControlAction::Deny,
        "pause" => pb::ControlAction::Pause,
        "resume" => pb::ControlAction::Resume,
        "abort" => pb::ControlAction::Abort,
        other => {
            return problem(
                StatusCode::BAD_REQUEST,
                "Unknown action",
                &format!("{other:?} is not an action"),
            );
        }
    };
    let req = pb::ControlRequest {
        run_id: run.clone(),
        action: action as i32,
        ..Default::default()
    };
    match call(
        &shared,
        &session.caller,
        "Control",
        req,
        |api, r| async move { api.control(r).await },
    )
    .await
    {
        Ok(_) => redirect(&format!("/runs/{run}")),
        Err(s) => status_problem(&s),
    }
}

/// `GET /runs/{run}/hosts/{host}`: the host's steps in the run, with exit
/// codes, durations, outcomes and output (secrets masked by the agent);
/// live while a step runs.
pub async fn host(
    State(shared): Shared_,
    SignedIn(_, session): SignedIn,
    Path((run, host)): Path<(String, String)>,
) -> Response {
    let (summary, status) = match fetch_run(&shared, &session, &run).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let req = pb::LogsRequest {
        run_id: run.clone(),
        host: host.clone(),
        follow: false,
    };
    let stream = call(&shared, &session.caller, "Logs", req, |api, r| async move {
        api.logs(r).await
    })
    .await;
    let mut entries = Vec::new();
    match stream {
        Ok(mut s) => {
            while let Some(e) = s.next().await {
                match e {
                    Ok(e) => entries.push(e),
                    Err(s) => return status_problem(&s),
                }
            }
        }
        Err(s) => return status_problem(&s),
    }
    let states: Vec<(String, HostState)> = status
        .changes
        .iter()
        .filter_map(|c| {
            c.hosts
                .iter()
                .find(|h| h.name == host)
                .map(|h| (c.name.clone(), h.state))
        })
        .collect();
    let live = !status.state.is_final();
    let body = html! {
        h1 { (host) " in run " a href={"/runs/" (summary.run_id)} { (summary.run_id) } }
        ul.hoststates { @for (c, s) in &states { li { (c) ": " (state_badge(s.as_str())) } } }
        @if entries.is_empty() { p { "Nothing was dispatched to " (host) " yet." } }
        ol.steps {
            @for e in &entries {
                li.step {
                    h2 { (e.step) }
                    p.outcome {
                        (state_badge(if e.finished { if e.outcome.starts_with("passed") { "success" } else { "failed" } } else { "running" }))
                        " " (e.outcome)
                        @if let Some(code) = e.exit_code { ", exit " (code) }
                        @if e.finished { ", " (e.duration_ms) " ms" }
                        @if e.attempts != 1 { ", attempt " (e.attempt) @if e.attempts > 1 { "/" (e.attempts) } }
                    }
                    @if !e.stdout.is_empty() { pre.out aria-label="stdout" { (e.stdout) } }
                    @if !e.stderr.is_empty() { pre.err aria-label="stderr" { (e.stderr) } }
                }
            }
        }
        @if live { h2 { "Live output" } pre #live aria-live="polite" {} }
    };
    let data = [
        ("run", summary.run_id.clone()),
        ("host", host.clone()),
        ("live", if live { "1".into() } else { "0".into() }),
    ];
    page(&format!("{host} in run {run}"), &session, &data, body).into_response()
}

#[derive(Deserialize)]
pub struct HostsQuery {
    #[serde(default)]
    selector: String,
}

/// `GET /hosts[?selector=...]`: the selector grammar of the CLI.
pub async fn hosts(
    State(shared): Shared_,
    SignedIn(_, session): SignedIn,
    Query(q): Query<HostsQuery>,
) -> Response {
    let req = pb::ListHostsRequest {
        selector: q.selector.clone(),
    };
    let hosts = match call(
        &shared,
        &session.caller,
        "ListHosts",
        req,
        |api, r| async move { api.list_hosts(r).await },
    )
    .await
    {
        Ok(r) => r.hosts,
        Err(s) => return status_problem(&s),
    };
    let presence = crate::cli::hosts::host_state;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for h in &hosts {
        *counts.entry(presence(h)).or_default() += 1;
    }
    let body = html! {
        h1 { "Hosts" }
        form.filter method="get" action="/hosts" {
            label for="selector" { "Selector " }
            input id="selector" name="selector" value=(q.selector) placeholder="role=web,zone in (a,b)";
            button type="submit" { "Filter" }
        }
        p.counts { (hosts.len()) @if hosts.len() == 1 { " host" } @else { " hosts" }
            @for (k, n) in &counts { ", " (n) " " (k) } }
        table.hosts {
            thead { tr { th { "Host" } th { "State" } th { "Labels" } th { "Facts" } th { "Last seen (UTC)" } } }
            tbody {
                @for h in &hosts {
                    tr {
                        td { (h.name) }
                        td { (state_badge(match presence(h) { "connected" => "success", "never" => "pending", "revoked" => "cancelled", _ => "lost" })) " " (presence(h)) }
                        td { @for (k, v) in &h.labels { code { (k) "=" (v) } " " } }
                        td.facts {
                            @for (k, v) in h.facts.iter().filter(|(k, _)| ["os", "arch"].contains(&k.as_str())) { code { (k) "=" (v) } " " }
                            @if !h.facts.is_empty() {
                                details { summary { "all " (h.facts.len()) } @for (k, v) in &h.facts { div { code { (k) "=" (v) } } } }
                            }
                        }
                        td { (when(h.last_seen_ms)) }
                    }
                }
            }
        }
    };
    page("hosts", &session, &[], body).into_response()
}

fn plan_body(
    session: &Session,
    text: &str,
    vars: &str,
    diff: bool,
    result: Option<Markup>,
) -> Markup {
    html! {
        h1 { "Plan" }
        p { "Paste a changeset (one file; includes are not read here): the plan shows what it would do on today's fleet, and touches nothing." }
        form.plan method="post" action="/plan" {
            input type="hidden" name="csrf" value=(session.csrf);
            label for="upload" { "Upload a changeset file (fills the box below)" }
            input type="file" id="upload" accept=".yaml,.yml,text/yaml";
            label for="changeset" { "Changeset (YAML)" }
            textarea id="changeset" name="changeset" rows="16" spellcheck="false" { (text) }
            label for="vars" { "Variables (one NAME=value per line)" }
            textarea id="vars" name="vars" rows="3" spellcheck="false" { (vars) }
            label { input type="checkbox" name="diff" value="1" checked[diff]; " Compare file steps with the files on the hosts (--diff; operator role)" }
            button type="submit" class="primary" { "Plan" }
        }
        @if let Some(r) = result { (r) }
    }
}

/// `GET /plan`.
pub async fn plan_form(SignedIn(_, session): SignedIn) -> Response {
    page(
        "plan",
        &session,
        &[],
        plan_body(&session, "", "", false, None),
    )
    .into_response()
}

#[derive(Deserialize)]
pub struct PlanForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    changeset: String,
    #[serde(default)]
    vars: String,
    #[serde(default)]
    diff: String,
}

/// `POST /plan`: the plan (and `--diff`) of a pasted changeset.
pub async fn plan(
    State(shared): Shared_,
    SignedIn(_, session): SignedIn,
    headers: HeaderMap,
    Form(form): Form<PlanForm>,
) -> Response {
    if let Err(r) = same_origin_form(&headers, &session, &form.csrf) {
        return r;
    }
    let diff = !form.diff.is_empty();
    let mut vars = BTreeMap::new();
    for line in form.vars.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match line.split_once('=') {
            Some((k, v)) => {
                vars.insert(k.trim().to_string(), v.to_string());
            }
            None => {
                let body = plan_body(
                    &session,
                    &form.changeset,
                    &form.vars,
                    diff,
                    Some(html! {
                        p.error role="alert" { "Variables: " (line) " is not NAME=value" }
                    }),
                );
                return (StatusCode::BAD_REQUEST, page("plan", &session, &[], body))
                    .into_response();
            }
        }
    }
    let req = pb::PlanRequest {
        sources: Some(pb::Sources {
            root: "web.yaml".into(),
            files: [("web.yaml".to_string(), form.changeset.clone())].into(),
        }),
        vars,
        secrets: Default::default(),
        diff,
    };
    let result = match call(&shared, &session.caller, "Plan", req, |api, r| async move {
        api.plan(r).await
    })
    .await
    {
        Ok(r) => match r.spec.map(typed::run_spec_from) {
            Some(Ok(spec)) => {
                let mut text = crate::cli::validate::plan_text(&spec);
                if diff {
                    text.push_str(&crate::cli::validate::diffs_text(&r.diffs));
                }
                html! {
                    @for w in &r.warnings { p.warning role="status" { "warning: " (w) } }
                    pre.planout { (text) }
                }
            }
            Some(Err(e)) => html! { p.error role="alert" { (e.to_string()) } },
            None => html! { p.error role="alert" { "the controller sent no plan" } },
        },
        Err(s) => html! { pre.error role="alert" { (s.message()) } },
    };
    page(
        "plan",
        &session,
        &[],
        plan_body(&session, &form.changeset, &form.vars, diff, Some(result)),
    )
    .into_response()
}
