//! `modi apply` and `modi watch`: submit a run and follow it to its end,
//! answering approval gates at the terminal.

use std::io::{IsTerminal, Write};
use std::path::Path;

use modi_proto::v1 as pb;

use super::progress::Display;
use super::runs::{Control, fetch_status, send_control, status_text};
use super::validate::plan_request;
use super::{CliError, Client, Outcome, Output, Vars};
use crate::rollout::{Progress, RunStatus};
use crate::run_ports::WatchItem;
use crate::typed;

/// Submits the changeset; follows the run unless `detach`.
pub async fn apply(
    out: &Output,
    client: &Client,
    file: &Path,
    vars: &Vars,
    detach: bool,
) -> Result<Outcome, CliError> {
    let req = plan_request(file, vars, true)?;
    let req = pb::ApplyRequest {
        sources: req.sources,
        vars: req.vars,
        secrets: req.secrets,
    };
    // Ctrl-C is ours from before the run exists, so it never kills the
    // CLI mid-run without the detach line.
    let interrupt = interrupt_handler()?;
    let applied = client
        .admin()
        .apply(req)
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    let run = applied.run_id;
    if out.is_json() {
        for w in &applied.warnings {
            out.event(&serde_json::json!({ "type": "warning", "message": w }));
        }
    } else {
        super::validate::warn(out, &applied.warnings);
    }
    if detach {
        out.data(&serde_json::json!({ "run": run }), || {
            format!("run {run} started; follow it with: modi watch {run}")
        });
        return Ok(Outcome::Ok);
    }
    if out.is_json() {
        out.event(&serde_json::json!({ "type": "started", "run": run }));
    } else {
        out.line(format!("run {run} started"));
    }
    follow(out, client, &run, true, interrupt).await
}

/// Catches Ctrl-C (SIGINT) from now on.
fn interrupt_handler() -> Result<tokio::signal::unix::Signal, CliError> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CliError::Failed(format!("cannot handle Ctrl-C: {e}")))
}

/// `modi watch RUN`.
pub async fn watch(out: &Output, client: &Client, run: &str) -> Result<Outcome, CliError> {
    follow(out, client, run, false, interrupt_handler()?).await
}

/// Opens the run's watch stream.
async fn open_watch(
    client: &Client,
    run: &str,
) -> Result<tonic::Streaming<pb::WatchEvent>, CliError> {
    Ok(client
        .admin()
        .watch(pb::WatchRequest {
            run_id: run.to_string(),
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner())
}

/// Whether the run is known to have ended (false when that cannot be
/// asked now).
pub(super) async fn run_ended(client: &Client, run: &str) -> bool {
    fetch_status(client, run)
        .await
        .is_ok_and(|(_, status)| status.state.is_final())
}

/// Asks "continue? [y/N]" on the terminal.
async fn ask(question: String) -> bool {
    tokio::task::spawn_blocking(move || {
        eprint!("{question} continue? [y/N] ");
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        if std::io::stdin().read_line(&mut answer).is_err() {
            return false;
        }
        matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes")
    })
    .await
    .unwrap_or(false)
}

/// Follows a run until it ends; prints the summary; exit 1 unless success.
pub async fn follow(
    out: &Output,
    client: &Client,
    run: &str,
    gates: bool,
    mut interrupt: tokio::signal::unix::Signal,
) -> Result<Outcome, CliError> {
    let (mut client, mut stream) = match open_watch(client, run).await {
        Ok(stream) => (client.clone(), stream),
        // In a set that is taking over: the next active controller.
        Err(CliError::Unreachable(why)) if client.in_set() => {
            out.note(format!(
                "{why}; following run {run} on the active controller of the set"
            ));
            client
                .failover(|c| async move { open_watch(&c, run).await })
                .await?
        }
        Err(e) => return Err(e),
    };
    let interactive = gates
        && !out.is_json()
        && std::io::stdin().is_terminal()
        && std::io::stderr().is_terminal();
    let mut display: Option<Display> = None;
    // Gates this CLI has asked about: each is asked once, whether it was
    // already open when we started watching or opened later.
    let mut asked = std::collections::BTreeSet::new();
    loop {
        let event = tokio::select! {
            event = stream.message() => event,
            _ = interrupt.recv() => {
                if let Some(d) = display.as_mut() {
                    d.finish();
                }
                out.note(format!("detached; run {run} continues (modi abort {run} stops it)"));
                return Ok(Outcome::Ok);
            }
        };
        let event = match event {
            Ok(Some(event)) => event,
            // The stream ends after the final event; before it, the
            // controller went away: in a set, follow on the active one
            // (the watch starts again from the run's status now).
            Ok(None) | Err(_) if client.in_set() && !run_ended(&client, run).await => {
                out.note(format!(
                    "lost the controller at {}; following run {run} on the active controller of the set",
                    client.url()
                ));
                (client, stream) = client
                    .failover(|c| async move { open_watch(&c, run).await })
                    .await?;
                continue;
            }
            Ok(None) => break,
            Err(s) => return Err(client.error(s)),
        };
        let mut open = Vec::new();
        match event.event {
            Some(pb::watch_event::Event::Status(status)) => {
                let status: RunStatus = typed::run_status_from(status)?;
                open.extend(
                    status
                        .changes
                        .iter()
                        .filter_map(|c| c.gate.as_ref())
                        .map(|g| (g.id, g.label.clone())),
                );
                if let Some(mut old) = display.take() {
                    old.finish();
                }
                display = Some(Display::new(out, run, &status));
            }
            Some(pb::watch_event::Event::Progress(progress)) => {
                let item = typed::progress_from(progress)?;
                if let Some(d) = display.as_mut() {
                    d.item(&item);
                }
                if let WatchItem::Progress {
                    progress: Progress::AwaitingApproval { id, gate, .. },
                } = item
                {
                    open.push((id, gate));
                }
            }
            None => return Err(typed::Malformed::missing_field("watch_event.event").into()),
        }
        if !interactive {
            continue;
        }
        for (id, gate) in open {
            if !asked.insert(id) {
                continue;
            }
            let answer = tokio::select! {
                answer = ask(gate) => answer,
                _ = interrupt.recv() => {
                    eprintln!();
                    out.note(format!("detached; run {run} continues (modi abort {run} stops it)"));
                    return Ok(Outcome::Ok);
                }
            };
            let control = if answer {
                Control::Approve
            } else {
                Control::Deny { no_backout: false }
            };
            if let Err(e) = send_control(&client, run, control).await {
                out.note(format!("modi: {e}"));
            }
        }
    }
    if let Some(d) = display.as_mut() {
        d.finish();
    }
    let (summary, status) = match fetch_status(&client, run).await {
        Err(CliError::Unreachable(_)) if client.in_set() => {
            client
                .failover(|c| async move { fetch_status(&c, run).await })
                .await?
                .1
        }
        other => other?,
    };
    if !status.state.is_final() {
        return Err(CliError::Unreachable(format!(
            "lost the controller while following run {run} (it is {}); follow it again with: modi watch {run}",
            status.state.as_str()
        )));
    }
    out.data(
        &serde_json::json!({ "type": "end", "status": status }),
        || status_text(&summary.run_id, &summary.name, &status, &Default::default()),
    );
    Ok(if status.state.succeeded() {
        Outcome::Ok
    } else {
        Outcome::RunFailed
    })
}
