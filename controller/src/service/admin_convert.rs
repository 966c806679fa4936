//! Conversions between `pb::` admin types and ours, and our errors as gRPC
//! statuses.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use modi_proto::v1 as pb;
use tokio::sync::oneshot;
use tonic::Status;

use crate::changeset;
use crate::driver;
use crate::fleet::{Presence, RunRef, full_id};
use crate::limits;
use crate::rollout::{DispatchId, Event, FailureReason, Phase, RunState, StepResult, Termination};
use crate::run_ports::{DriverMsg, WatchItem};
use crate::secret::{self, Secrets};
use crate::server::Shared;
use crate::spec::{HostInfo, RunSpec, Step};
use crate::store::{HostRecord, RunMeta, StoreError};

/// Store failures are the controller's problem, not the caller's.
pub fn store_error(e: StoreError) -> Status {
    tracing::error!(error = %e, "store failure");
    match e {
        StoreError::Unwritable(_) | StoreError::Closed => Status::unavailable(e.to_string()),
        StoreError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// A run id as the operator typed it (`12` or `r12`).
pub fn run_id(text: &str) -> Result<u64, Status> {
    text.trim().trim_start_matches('r').parse().map_err(|_| {
        Status::invalid_argument(format!(
            "{text:?} is not a run id (expected a number, e.g. 12)"
        ))
    })
}

/// What templates and selectors see of a host.
pub fn host_info(h: &HostRecord) -> HostInfo {
    HostInfo {
        name: h.name.clone(),
        labels: h.labels.clone(),
        facts: h.facts.clone(),
    }
}

/// A host for `modi hosts`.
pub fn host(h: &HostRecord, presence: Option<&Presence>) -> pb::Host {
    pb::Host {
        name: h.name.clone(),
        labels: h.labels.clone(),
        facts: h.facts.clone(),
        connected: presence.is_some(),
        last_seen_ms: presence.map_or(h.last_seen, |p| p.last_seen),
        enrolled_at_ms: h.enrolled_at,
        connected_since_ms: presence.map_or(0, |p| p.since),
        revoked: h.revoked,
        certificates: h.serials.len() as u32,
        cert_expires_at_ms: h.cert_expires_at,
    }
}

/// A run for `modi runs`.
pub fn run_summary(m: &RunMeta) -> pb::RunSummary {
    pb::RunSummary {
        run_id: m.id.to_string(),
        name: m.name.clone(),
        state: crate::typed::run_state(m.state),
        created_at_ms: m.created_at,
        finished_at_ms: m.finished_at.unwrap_or(0),
        submitted_by: m.submitted_by.clone(),
        hosts: m.hosts,
    }
}

/// What looks wrong in a plan but is not an error: a `--var` whose name
/// appears nowhere in the changeset's files (so nothing reads it), and a
/// change whose selector matches no host.
pub fn warnings(
    files: &BTreeMap<String, String>,
    vars: &BTreeMap<String, String>,
    spec: &RunSpec,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let read = files.values().any(|text| {
            text.match_indices(name.as_str()).any(|(i, _)| {
                let before = text[..i].chars().next_back();
                let after = text[i + name.len()..].chars().next();
                let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
                !word(before) && !word(after)
            })
        });
        if !read {
            out.push(format!("--var {name}: nothing in the changeset reads it"));
        }
    }
    for c in &spec.changes {
        if c.hosts.is_empty() {
            out.push(format!("change `{}`: its hosts select no host", c.name));
        }
    }
    out
}

/// [`render`], and the plan's [`warnings`].
pub fn render_and_warn(
    shared: &Shared,
    req: pb::PlanRequest,
) -> Result<(RunSpec, Vec<String>), Status> {
    let files = req
        .sources
        .as_ref()
        .map(|s| s.files.clone())
        .unwrap_or_default();
    let vars = req.vars.clone();
    let spec = render(shared, req)?;
    let warnings = warnings(&files, &vars, &spec);
    Ok((spec, warnings))
}

/// Validates and renders a changeset against the current inventory. A bad
/// changeset is `invalid_argument` with every diagnostic, one per line.
pub fn render(shared: &Shared, req: pb::PlanRequest) -> Result<RunSpec, Status> {
    let sources = req
        .sources
        .ok_or_else(|| Status::invalid_argument("no changeset sent"))?;
    let size: usize = sources.files.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > limits::MAX_SOURCES {
        return Err(Status::invalid_argument(format!(
            "the changeset and its includes are {size} bytes; at most {} are accepted",
            limits::MAX_SOURCES
        )));
    }
    if req.secrets.len() > limits::MAX_SECRETS
        || req
            .secrets
            .values()
            .any(|v| v.len() > limits::MAX_SECRET_VALUE)
    {
        return Err(Status::invalid_argument(format!(
            "at most {} --secret values of at most {} bytes each are accepted",
            limits::MAX_SECRETS,
            limits::MAX_SECRET_VALUE
        )));
    }
    if req.vars.len() > limits::MAX_VARS
        || req.vars.values().any(|v| v.len() > limits::MAX_VAR_VALUE)
    {
        return Err(Status::invalid_argument(format!(
            "at most {} --var values of at most {} bytes each are accepted",
            limits::MAX_VARS,
            limits::MAX_VAR_VALUE
        )));
    }
    let sources = changeset::Sources {
        root: sources.root,
        files: sources.files,
    };
    let inventory: Vec<HostInfo> = shared
        .store
        .hosts()
        .map_err(store_error)?
        .iter()
        .filter(|h| !h.revoked)
        .map(host_info)
        .collect();
    // The language sees secrets by name only.
    let secrets: BTreeSet<String> = req.secrets.keys().cloned().collect();
    let cs = changeset::validate_with_inventory(&sources, &req.vars, &secrets, &shared.config.vars)
        .map_err(|d| Status::invalid_argument(d.to_string()))?;
    changeset::render(&cs, &inventory, &shared.config.vars, &req.vars)
        .map_err(|d| Status::invalid_argument(d.to_string()))
}

/// The values of `--secret`s, checked: what `apply` and `resume` hand to a
/// run's driver (they go nowhere else).
pub fn secrets(given: BTreeMap<String, String>) -> Result<Secrets, Status> {
    secret::from_request(given).map_err(Status::invalid_argument)
}

/// What a `Control` request asks of a run's driver: the control itself,
/// or, for `resume` with `--secret`s, the secrets the run waits for.
pub fn control_msg(
    event: Event,
    secrets: BTreeMap<String, String>,
    reply: oneshot::Sender<Result<RunState, String>>,
) -> Result<DriverMsg, Status> {
    if secrets.is_empty() {
        return Ok(DriverMsg::Control { event, reply });
    }
    match event {
        Event::Resume { by } => Ok(DriverMsg::Secrets {
            secrets: self::secrets(secrets)?,
            by,
            reply,
        }),
        _ => Err(Status::invalid_argument(
            "--secret goes with `modi resume` only",
        )),
    }
}

/// The rendered spec of a run, from its journal.
pub fn spec_of(shared: &Shared, run: u64) -> Result<Arc<RunSpec>, Status> {
    driver::replay(&shared.store, shared.judge.clone(), run)
        .map_err(store_error)?
        .map(|r| r.spec)
        .ok_or_else(|| Status::not_found(format!("no run {run}")))
}

/// Which try `id` is (1-based) and how many the change allows (0 =
/// unlimited).
fn attempts(spec: &RunSpec, id: &DispatchId) -> (u32, u32) {
    let allowed = spec.changes.get(id.change).map_or(1, |c| {
        u32::try_from(c.retry.max_retries).map_or(0, |r| r.saturating_add(1))
    });
    (id.attempt + 1, allowed)
}

fn label(spec: &RunSpec, id: &DispatchId, step: &str) -> String {
    let change = spec.changes.get(id.change).map_or("?", |c| c.name.as_str());
    format!("{change} {}[{}]: {step}", id.phase, id.step)
}

fn host_of(spec: &RunSpec, id: &DispatchId) -> String {
    spec.changes
        .get(id.change)
        .and_then(|c| c.hosts.get(id.host))
        .map(|h| h.host.name.clone())
        .unwrap_or_default()
}

fn change_of(spec: &RunSpec, id: &DispatchId) -> String {
    spec.changes
        .get(id.change)
        .map(|c| c.name.clone())
        .unwrap_or_default()
}

fn outcome(result: &StepResult) -> String {
    match result.termination {
        Some(Termination::Exited) | None => match result.exit_code {
            Some(code) => format!("exit {code}"),
            None => "no exit code".into(),
        },
        Some(Termination::TimedOut) => "timed out".into(),
        Some(Termination::Cancelled) => "cancelled".into(),
        Some(Termination::Lost) => "lost".into(),
        Some(Termination::Unreachable) => "unreachable".into(),
        Some(Termination::FailedToStart) => "failed to start".into(),
    }
}

/// How the engine judged a step: passed, or why not.
type Judged = (bool, Option<FailureReason>);

/// A finished step's outcome for people, from the engine's verdict:
/// `passed (exit 0)`, or `failed:` and why, with what a failed `expect`
/// saw. The raw outcome when there is no verdict (yet).
fn verdict(step: Option<&Step>, r: &StepResult, judged: Option<Judged>) -> String {
    let raw = outcome(r);
    match judged {
        None => raw,
        Some((true, _)) => format!("passed ({raw})"),
        Some((false, Some(FailureReason::ConditionFailed))) => {
            let last = |text: &str| {
                let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
                let mut line = line.trim().to_string();
                if let Some((cut, _)) = line.char_indices().nth(120) {
                    line.truncate(cut);
                    line.push('…');
                }
                Some(line)
            };
            let mut saw = raw;
            if let Some(l) = last(&r.stdout) {
                saw.push_str(&format!(", stdout {l:?}"));
            }
            if let Some(l) = last(&r.stderr) {
                saw.push_str(&format!(", stderr {l:?}"));
            }
            match step.and_then(|s| s.expect.as_ref()) {
                Some(cond) => format!("failed: expect `{}` was false; it saw {saw}", cond.expr),
                None => format!("failed: its condition was false; it saw {saw}"),
            }
        }
        Some((false, reason)) => format!(
            "failed: {} ({raw})",
            reason.map_or("failed", FailureReason::as_str)
        ),
    }
}

/// A step of the forward sequence by its id (a backout's steps depend on
/// the procedure chosen, which only the journal knows).
fn forward_step<'a>(spec: &'a RunSpec, id: &DispatchId) -> Option<&'a Step> {
    let plan = spec.changes.get(id.change)?.hosts.get(id.host)?;
    let phase = match id.phase {
        Phase::SkipIf => &plan.skip_if,
        Phase::Check => &plan.check,
        Phase::Apply => &plan.apply,
        Phase::Verify => &plan.verify,
        _ => return None,
    };
    phase.get(id.step)
}

fn with_dropped(text: &str, dropped: u64) -> String {
    if dropped == 0 {
        text.to_string()
    } else {
        format!("{text}\n[... {dropped} more bytes not kept]\n")
    }
}

fn finished_entry(
    spec: &RunSpec,
    run: RunRef,
    id: &DispatchId,
    host: &str,
    step: &str,
    r: &StepResult,
) -> pb::LogEntry {
    pb::LogEntry {
        host: host.to_string(),
        change: change_of(spec, id),
        dispatch_id: full_id(run, id),
        step: label(spec, id, step),
        stdout: with_dropped(&r.stdout, r.stdout_dropped),
        stderr: with_dropped(&r.stderr, r.stderr_dropped),
        finished: true,
        exit_code: r.exit_code,
        outcome: outcome(r),
        duration_ms: r.duration_ms,
        attempt: attempts(spec, id).0,
        attempts: attempts(spec, id).1,
        ..Default::default()
    }
}

/// Every step of run `run` (of `host`, or all hosts if empty) with its
/// output, from the journal; and the run's spec.
pub fn logs(
    shared: &Shared,
    run: u64,
    host: &str,
) -> Result<(Vec<pb::LogEntry>, Arc<RunSpec>), Status> {
    let replayed = driver::replay(&shared.store, shared.judge.clone(), run)
        .map_err(store_error)?
        .ok_or_else(|| Status::not_found(format!("no run {run}")))?;
    if !host.is_empty()
        && !replayed
            .spec
            .changes
            .iter()
            .any(|c| c.hosts.iter().any(|h| h.host.name == host))
    {
        return Err(Status::not_found(format!("run {run} has no host {host:?}")));
    }
    let spec = &replayed.spec;
    let run = RunRef {
        id: run,
        stamp: replayed.created_at,
    };
    // The engine's verdict on every step it judged.
    let judged: HashMap<DispatchId, Judged> = replayed
        .engine
        .status()
        .changes
        .into_iter()
        .flat_map(|c| c.hosts)
        .flat_map(|h| h.steps)
        .filter_map(|s| Some((s.id, (s.passed?, s.reason))))
        .collect();
    let mut entries: Vec<pb::LogEntry> = replayed
        .dispatches
        .iter()
        .filter(|(_, h, _)| host.is_empty() || h == host)
        .map(|(id, h, dispatched)| {
            let step = driver::describe(dispatched);
            let (started, finished) = replayed.times.get(id).copied().unwrap_or((0, None));
            let mut entry = match replayed.results.get(id) {
                Some(r) => {
                    let mut e = finished_entry(spec, run, id, h, &step, r);
                    e.outcome = verdict(Some(dispatched), r, judged.get(id).copied());
                    e
                }
                None => {
                    // Running: what it printed so far, kept by the fleet.
                    let full = full_id(run, id);
                    let (stdout, stderr) = shared.fleet.output_so_far(&full).unwrap_or_default();
                    pb::LogEntry {
                        host: h.clone(),
                        change: change_of(spec, id),
                        dispatch_id: full,
                        step: label(spec, id, &step),
                        outcome: "running".into(),
                        stdout,
                        stderr,
                        attempt: attempts(spec, id).0,
                        attempts: attempts(spec, id).1,
                        ..Default::default()
                    }
                }
            };
            entry.started_at_ms = started;
            entry.finished_at_ms = finished.unwrap_or(0);
            entry
        })
        .collect();
    // Results that came back after their step was declared lost: shown,
    // marked late; the outcome above stands.
    for late in replayed
        .late
        .iter()
        .filter(|l| host.is_empty() || l.host == host)
    {
        let step = replayed
            .dispatches
            .iter()
            .find(|(id, _, _)| *id == late.id)
            .map(|(_, _, step)| driver::describe(step))
            .unwrap_or_default();
        let mut e = finished_entry(spec, run, &late.id, &late.host, &step, &late.result);
        e.outcome = format!(
            "late result (the step was declared lost; the outcome stands): {}",
            e.outcome
        );
        entries.push(e);
    }
    Ok((entries, replayed.spec))
}

/// `logs --follow`: live watch items as log entries, for one host (or
/// every host when empty). A step's result is held until the engine's
/// verdict on it, which follows at once, so its ending says how it went.
pub struct LiveLog {
    spec: Arc<RunSpec>,
    host: String,
    waiting: HashMap<DispatchId, (String, StepResult)>,
}

impl LiveLog {
    /// Follows `spec`'s run for `host` ("" = every host).
    pub fn new(spec: Arc<RunSpec>, host: String) -> LiveLog {
        LiveLog {
            spec,
            host,
            waiting: HashMap::new(),
        }
    }

    /// The entry `item` makes, if any.
    pub fn entry(&mut self, item: WatchItem, now: u64) -> Option<pb::LogEntry> {
        let spec = &self.spec;
        let keep = |h: &str| self.host.is_empty() || h == self.host;
        match item {
            WatchItem::Dispatched { id, host: h, step } if keep(&h) => Some(pb::LogEntry {
                change: change_of(spec, &id),
                step: label(spec, &id, &step),
                host: h,
                outcome: "running".into(),
                started_at_ms: now,
                attempt: attempts(spec, &id).0,
                attempts: attempts(spec, &id).1,
                ..Default::default()
            }),
            WatchItem::Output { id, stderr, data } => {
                let h = host_of(spec, &id);
                keep(&h).then(|| pb::LogEntry {
                    change: change_of(spec, &id),
                    host: h,
                    stdout: if stderr { String::new() } else { data.clone() },
                    stderr: if stderr { data } else { String::new() },
                    ..Default::default()
                })
            }
            WatchItem::Result { id, result } => {
                let h = host_of(spec, &id);
                if keep(&h) {
                    self.waiting.insert(id, (h, result));
                }
                None
            }
            WatchItem::Progress {
                progress: crate::rollout::Progress::Step { id, passed, reason },
            } => {
                let (h, result) = self.waiting.remove(&id)?;
                let mut e = finished_entry(spec, RunRef { id: 0, stamp: 0 }, &id, &h, "", &result);
                e.outcome = verdict(forward_step(spec, &id), &result, Some((passed, reason)));
                // The output was streamed already.
                e.stdout.clear();
                e.stderr.clear();
                e.dispatch_id.clear();
                e.finished_at_ms = now;
                Some(e)
            }
            _ => None,
        }
    }
}
