//! `modi runs`, `modi status`, `modi logs`, and the run controls
//! (approve, deny, abort, pause, resume).

use std::path::PathBuf;

use modi_proto::v1 as pb;
use serde::Serialize;

use super::output::{escape_controls, table, when};
use super::{CliError, Client, Outcome, Output};
use crate::rollout::RunStatus;
use crate::typed;

/// Lists runs, newest last.
pub async fn list(out: &Output, client: &Client, limit: u32) -> Result<Outcome, CliError> {
    let runs = client
        .admin()
        .list_runs(pb::ListRunsRequest { limit })
        .await
        .map_err(|s| client.error(s))?
        .into_inner()
        .runs;
    #[derive(Serialize)]
    struct Run<'a> {
        run: &'a str,
        name: &'a str,
        state: &'a str,
        hosts: u32,
        submitted_by: &'a str,
        created_at_ms: u64,
        finished_at_ms: u64,
    }
    let states = runs
        .iter()
        .enumerate()
        .map(|(i, r)| typed::run_state_from(r.state, &format!("runs[{i}].state")))
        .collect::<Result<Vec<_>, _>>()?;
    let json: Vec<Run> = runs
        .iter()
        .zip(&states)
        .map(|(r, state)| Run {
            run: &r.run_id,
            name: &r.name,
            state: state.as_str(),
            hosts: r.hosts,
            submitted_by: &r.submitted_by,
            created_at_ms: r.created_at_ms,
            finished_at_ms: r.finished_at_ms,
        })
        .collect();
    out.data(&json, || {
        if runs.is_empty() {
            return "no runs yet".into();
        }
        let rows: Vec<Vec<String>> = runs
            .iter()
            .zip(&states)
            .map(|(r, state)| {
                vec![
                    r.run_id.clone(),
                    r.name.clone(),
                    state.as_str().to_string(),
                    r.hosts.to_string(),
                    r.submitted_by.clone(),
                    when(r.created_at_ms),
                    when(r.finished_at_ms),
                ]
            })
            .collect();
        table(
            &[
                "RUN",
                "CHANGESET",
                "STATE",
                "HOSTS",
                "BY",
                "STARTED (UTC)",
                "ENDED (UTC)",
            ],
            &rows,
        )
    });
    Ok(Outcome::Ok)
}

/// The run's status document.
pub async fn fetch_status(
    client: &Client,
    run: &str,
) -> Result<(pb::RunSummary, RunStatus), CliError> {
    let r = client
        .admin()
        .get_run(pb::GetRunRequest {
            run_id: run.to_string(),
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    let status = r
        .status
        .ok_or_else(|| typed::Malformed::missing_field("status"))?;
    Ok((
        r.summary.unwrap_or_default(),
        typed::run_status_from(status)?,
    ))
}

/// Counts of hosts per state, over every change.
pub fn host_counts(status: &RunStatus) -> std::collections::BTreeMap<&'static str, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for c in &status.changes {
        for h in &c.hosts {
            *counts.entry(h.state.as_str()).or_insert(0) += 1;
        }
    }
    counts
}

/// Longest failure text per host in `modi status`.
const FAILURE_WIDTH: usize = 100;

/// Which hosts `modi status` lists: by default only those not in
/// `success` or `skipped` (a fleet-size run prints its counts and its
/// problems); `--all`, `--host`, `--state` choose otherwise.
#[derive(Clone, Debug, Default)]
pub struct HostFilter {
    /// Every host.
    pub all: bool,
    /// Only these hosts.
    pub hosts: Vec<String>,
    /// Only hosts in these states (`failed`, `backout_ok`, ...).
    pub states: Vec<String>,
}

impl HostFilter {
    /// Is `h` listed?
    pub fn shows(&self, h: &crate::rollout::HostStatus) -> bool {
        let state = h.state.as_str();
        if !self.hosts.is_empty() && !self.hosts.contains(&h.name) {
            return false;
        }
        if !self.states.is_empty() {
            return self.states.iter().any(|s| s == state);
        }
        self.all || !self.hosts.is_empty() || !matches!(state, "success" | "skipped")
    }
}

/// `n thing` or `n things`.
pub fn plural(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// A run's status as text.
pub fn status_text(run: &str, name: &str, status: &RunStatus, filter: &HostFilter) -> String {
    let mut s = format!("run {run} ({name}): {}\n", status.state.as_str());
    if let Some(why) = &status.held {
        s.push_str(&format!("held: {why}\n"));
    }
    for c in &status.changes {
        s.push_str(&format!("\nchange {}: {}\n", c.name, c.state.as_str()));
        if let Some(g) = &c.gate {
            let timeout = g.deadline.map_or(String::new(), |d| {
                format!(" (counted as deny at {} UTC)", when(d))
            });
            s.push_str(&format!(
                "  waiting since {} UTC for approval of {}{timeout}\n  approve: modi approve {run}    deny (backs out): modi deny {run}\n",
                when(g.since),
                g.label
            ));
        }
        let mut counts = std::collections::BTreeMap::new();
        for h in &c.hosts {
            *counts.entry(h.state.as_str()).or_insert(0usize) += 1;
        }
        let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
        s.push_str(&format!(
            "  {}: {}\n",
            plural(c.hosts.len(), "host"),
            counts.join(", ")
        ));
        // The host whose failure backed the others out, for theirs.
        let culprit = c.hosts.iter().find_map(|h| {
            h.failure
                .as_ref()
                .filter(|f| f.reason != crate::rollout::FailureReason::Cancelled)
                .map(|f| format!("backed out: {} failed {}[{}]", h.name, f.phase, f.step))
        });
        let rows: Vec<Vec<String>> = c
            .hosts
            .iter()
            .filter(|h| filter.shows(h))
            .map(|h| {
                let backed_out = matches!(
                    h.state.as_str(),
                    "backout_ok" | "backout_failed" | "backing_out" | "backout_pending"
                );
                let why = h.failure.as_ref().map_or_else(
                    || {
                        if backed_out {
                            culprit.clone().unwrap_or_default()
                        } else {
                            String::new()
                        }
                    },
                    |f| {
                        let last = f.stderr.lines().rev().find(|l| !l.trim().is_empty());
                        let text = format!(
                            "{} ({}){}",
                            f.message,
                            f.reason.as_str(),
                            last.map_or(String::new(), |l| format!(" | stderr: {}", l.trim()))
                        );
                        // One line per host; `--output json` has it all.
                        match text.char_indices().nth(FAILURE_WIDTH) {
                            Some((cut, _)) => format!("{}…", &text[..cut]),
                            None => text,
                        }
                    },
                );
                let why = escape_controls(&why);
                vec![
                    format!("  {}", h.name),
                    h.state.as_str().to_string(),
                    if h.attempt > 0 {
                        format!("attempt {}", h.attempt + 1)
                    } else {
                        String::new()
                    },
                    why,
                ]
            })
            .collect();
        if !rows.is_empty() {
            s.push_str(&table(&["  HOST", "STATE", "", "FAILURE"], &rows));
        }
    }
    if !status.late.is_empty() {
        s.push_str("\nlate results (their steps were declared lost; the outcome stands):\n");
        for l in &status.late {
            let what = match (l.result.termination, l.result.exit_code) {
                (Some(t), _) => format!("{t:?}").to_lowercase(),
                (None, Some(code)) => format!("exit {code}"),
                (None, None) => "finished".to_string(),
            };
            s.push_str(&format!(
                "  {} {}: {what} at {} UTC\n",
                l.host,
                l.id,
                when(l.at)
            ));
        }
    }
    if !status.decisions.is_empty() {
        s.push('\n');
        for d in &status.decisions {
            s.push_str(&format!("{} UTC: {} by {}\n", when(d.at), d.action, d.by));
        }
    }
    let counts = host_counts(status);
    let summary: Vec<String> = counts.iter().map(|(k, v)| format!("{v} {k}")).collect();
    if !summary.is_empty() {
        s.push_str(&format!("\nhosts: {}\n", summary.join(", ")));
    }
    s
}

/// `modi status RUN [--all] [--host H]... [--state S]...`: exit 1 if the
/// run ended in anything but success. JSON is the whole status unless a
/// filter was given.
pub async fn status(
    out: &Output,
    client: &Client,
    run: &str,
    filter: &HostFilter,
) -> Result<Outcome, CliError> {
    let (summary, mut status) = fetch_status(client, run).await?;
    if !filter.hosts.is_empty() || !filter.states.is_empty() {
        for c in &mut status.changes {
            c.hosts.retain(|h| filter.shows(h));
        }
    }
    out.data(&status, || {
        status_text(&summary.run_id, &summary.name, &status, filter)
    });
    Ok(if status.state.is_final() && !status.state.succeeded() {
        Outcome::RunFailed
    } else {
        Outcome::Ok
    })
}

/// `modi logs RUN [--host H] [--follow]`.
/// What `modi logs` shows.
#[derive(Clone, Debug, Default)]
pub struct LogsView {
    /// Only this host.
    pub host: Option<String>,
    /// Only this change.
    pub change: Option<String>,
    /// Keep following the running steps.
    pub follow: bool,
    /// Only the last N lines of each step's output.
    pub tail: Option<usize>,
}

/// The last `n` lines of `text` (all when `None`).
fn last_lines(text: &str, n: Option<usize>) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    match n {
        Some(n) if lines.len() > n => lines[lines.len() - n..].to_vec(),
        _ => lines,
    }
}

/// The attempt of a dispatch id (`....a2` → 2), counted from 0.
/// ` (attempt 2/3)` for a change that retries; nothing for one that
/// does not.
fn attempt_text(attempt: u32, attempts: u32) -> String {
    match attempts {
        1 => String::new(),
        0 => format!(" (attempt {attempt}, retried without limit)"),
        n => format!(" (attempt {attempt}/{n})"),
    }
}

/// `HH:MM:SS ` (UTC) of a time, or nothing when it is not known.
fn time_of_day(at_ms: u64) -> String {
    if at_ms == 0 {
        return String::new();
    }
    let text = crate::clock::rfc3339(at_ms);
    text.get(11..19).map_or(String::new(), |t| format!("{t} "))
}

/// `modi logs RUN [--host H] [--change C] [--tail N] [--follow]`.
pub async fn logs(
    out: &Output,
    client: &Client,
    run: &str,
    view: LogsView,
) -> Result<Outcome, CliError> {
    let LogsView {
        host,
        change,
        follow,
        tail,
    } = view;
    let open = |client: Client| {
        let host = host.clone().unwrap_or_default();
        async move {
            client
                .admin()
                .logs(pb::LogsRequest {
                    run_id: run.to_string(),
                    host,
                    follow,
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| client.error(s))
        }
    };
    let mut client = client.clone();
    let mut stream = open(client.clone()).await?;
    #[derive(Serialize)]
    struct Entry<'a> {
        host: &'a str,
        change: &'a str,
        step: &'a str,
        stdout: &'a str,
        stderr: &'a str,
        finished: bool,
        exit_code: Option<i32>,
        outcome: &'a str,
        duration_ms: u64,
        started_at_ms: u64,
        finished_at_ms: u64,
        attempt: u32,
        attempts: u32,
    }
    loop {
        let e = match stream.message().await {
            Ok(Some(e)) => e,
            Ok(None) | Err(_)
                if follow && client.in_set() && !super::apply::run_ended(&client, run).await =>
            {
                out.note(format!(
                    "lost the controller at {}; following the logs of run {run} on the active controller of the set, from the start",
                    client.url()
                ));
                // The new controller's log starts from the beginning.
                (client, stream) = client.failover(&open).await?;
                continue;
            }
            Ok(None) => break,
            Err(s) => return Err(client.error(s)),
        };
        if change.as_ref().is_some_and(|c| *c != e.change) {
            continue;
        }
        if out.is_json() {
            out.event(&Entry {
                host: &e.host,
                change: &e.change,
                step: &e.step,
                stdout: &e.stdout,
                stderr: &e.stderr,
                finished: e.finished,
                exit_code: e.exit_code,
                outcome: &e.outcome,
                duration_ms: e.duration_ms,
                started_at_ms: e.started_at_ms,
                finished_at_ms: e.finished_at_ms,
                attempt: e.attempt,
                attempts: e.attempts,
            });
            continue;
        }
        let who = if host.is_some() {
            String::new()
        } else {
            format!("[{}] ", e.host)
        };
        if !e.step.is_empty() {
            let at = time_of_day(e.started_at_ms);
            out.line(format!(
                "{who}{at}== {}{}",
                e.step,
                attempt_text(e.attempt, e.attempts)
            ));
        }
        for line in last_lines(&e.stdout, tail) {
            out.line(format!("{who}{}", escape_controls(line)));
        }
        for line in last_lines(&e.stderr, tail) {
            out.line(format!("{who}stderr: {}", escape_controls(line)));
        }
        if e.finished {
            let at = time_of_day(e.finished_at_ms);
            out.line(format!("{who}{at}-> {} ({} ms)", e.outcome, e.duration_ms));
        }
    }
    Ok(Outcome::Ok)
}

/// The run controls.
#[derive(Clone, Copy, Debug)]
pub enum Control {
    /// Go on at the gate.
    Approve,
    /// Bail out at the gate.
    Deny {
        /// Leave hosts as they are.
        no_backout: bool,
    },
    /// Bail out now.
    Abort {
        /// Leave hosts as they are.
        no_backout: bool,
    },
    /// Stop at the next step boundary.
    Pause,
    /// Carry on.
    Resume,
}

/// Sends a control to a run.
pub async fn send_control(
    client: &Client,
    run: &str,
    control: Control,
) -> Result<String, CliError> {
    let (action, no_backout) = match control {
        Control::Approve => (pb::ControlAction::Approve, false),
        Control::Deny { no_backout } => (pb::ControlAction::Deny, no_backout),
        Control::Abort { no_backout } => (pb::ControlAction::Abort, no_backout),
        Control::Pause => (pb::ControlAction::Pause, false),
        Control::Resume => (pb::ControlAction::Resume, false),
    };
    let r = client
        .admin()
        .control(pb::ControlRequest {
            run_id: run.to_string(),
            action: action as i32,
            no_backout,
            ..Default::default()
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    Ok(typed::run_state_from(r.state, "state")?
        .as_str()
        .to_string())
}

/// `modi approve|deny|abort|pause|resume RUN`.
pub async fn control(
    out: &Output,
    config: Option<PathBuf>,
    run: &str,
    control: Control,
) -> Result<Outcome, CliError> {
    let client = Client::connect(config).await?;
    let state = send_control(&client, run, control).await?;
    out.data(&serde_json::json!({ "run": run, "state": state }), || {
        format!("run {run}: {state}")
    });
    Ok(Outcome::Ok)
}
