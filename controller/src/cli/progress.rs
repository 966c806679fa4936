//! Live progress of a run for `modi apply` and `modi watch`: progress bars
//! on a terminal, plain timestamped lines when piped, one JSON event per
//! line with `--output json`.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::Output;
use crate::rollout::{HostState, Phase, Progress, RunStatus};
use crate::run_ports::WatchItem;

struct ChangeView {
    name: String,
    hosts: Vec<(String, HostState)>,
    bar: Option<ProgressBar>,
}

/// What the operator sees while a run goes on.
pub struct Display {
    out: Output,
    /// The run id, for the commands it suggests.
    run: String,
    changes: Vec<ChangeView>,
    multi: Option<MultiProgress>,
}

fn done(state: HostState) -> bool {
    state.is_final()
}

impl Display {
    /// Starts from a status snapshot.
    pub fn new(out: &Output, run: &str, status: &RunStatus) -> Display {
        let multi = out
            .is_tty()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        let style = ProgressStyle::with_template(
            "{prefix:>16.bold} [{bar:30.cyan/blue}] {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let changes = status
            .changes
            .iter()
            .map(|c| {
                let hosts: Vec<(String, HostState)> =
                    c.hosts.iter().map(|h| (h.name.clone(), h.state)).collect();
                let bar = multi.as_ref().map(|m| {
                    let bar = m.add(ProgressBar::new(hosts.len() as u64));
                    bar.set_style(style.clone());
                    bar.set_prefix(c.name.clone());
                    bar.set_position(hosts.iter().filter(|(_, s)| done(*s)).count() as u64);
                    bar.set_message(c.state.as_str());
                    bar
                });
                ChangeView {
                    name: c.name.clone(),
                    hosts,
                    bar,
                }
            })
            .collect();
        if out.is_json() {
            out.event(&serde_json::json!({ "type": "status", "status": status }));
        }
        Display {
            out: out.clone(),
            run: run.to_string(),
            changes,
            multi,
        }
    }

    fn say(&self, text: String) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => self.out.line(format!(
                "{} {text}",
                super::output::when(crate::clock::now())
                    .get(11..)
                    .unwrap_or("")
            )),
        }
    }

    fn change_name(&self, change: usize) -> &str {
        self.changes.get(change).map_or("?", |c| c.name.as_str())
    }

    fn host_name(&self, change: usize, host: usize) -> &str {
        self.changes
            .get(change)
            .and_then(|c| c.hosts.get(host))
            .map_or("?", |h| h.0.as_str())
    }

    /// Shows one event.
    pub fn item(&mut self, item: &WatchItem) {
        if self.out.is_json() {
            self.out.event(item);
            return;
        }
        let WatchItem::Progress { progress } = item else {
            return;
        };
        match progress {
            Progress::Run { state } => self.say(format!("run: {}", state.as_str())),
            Progress::Change { change, state } => {
                if let Some(bar) = self.changes.get(*change).and_then(|c| c.bar.as_ref()) {
                    bar.set_message(state.as_str());
                }
                self.say(format!("{}: {}", self.change_name(*change), state.as_str()));
            }
            Progress::Batch {
                change,
                batch,
                hosts,
            } => {
                let names: Vec<&str> = hosts.iter().map(|h| self.host_name(*change, *h)).collect();
                self.say(format!(
                    "{}: batch {} ({})",
                    self.change_name(*change),
                    batch + 1,
                    names.join(", ")
                ));
            }
            Progress::Host {
                change,
                host,
                state,
                attempt,
            } => {
                let text = format!(
                    "{} {}: {}{}",
                    self.change_name(*change),
                    self.host_name(*change, *host),
                    state.as_str(),
                    if *attempt > 0 {
                        format!(" (attempt {})", attempt + 1)
                    } else {
                        String::new()
                    }
                );
                if let Some(c) = self.changes.get_mut(*change) {
                    if let Some(h) = c.hosts.get_mut(*host) {
                        h.1 = *state;
                    }
                    if let Some(bar) = &c.bar {
                        bar.set_position(c.hosts.iter().filter(|(_, s)| done(*s)).count() as u64);
                    }
                }
                // On a terminal the bars show routine progress; say what
                // needs attention. Plain output says everything.
                let notable = !matches!(
                    state,
                    HostState::Running | HostState::Pending | HostState::Success
                );
                if self.multi.is_none() || notable {
                    self.say(text);
                }
            }
            Progress::Step { id, passed, reason } => {
                // A skip_if that does not pass just means "not done yet".
                if !passed && id.phase != Phase::SkipIf {
                    self.say(format!(
                        "{} {}: {}[{}] failed ({})",
                        self.change_name(id.change),
                        self.host_name(id.change, id.host),
                        id.phase,
                        id.step,
                        reason.map_or("failed", |r| r.as_str())
                    ));
                }
            }
            Progress::AwaitingApproval { change, gate, .. } => {
                let run = &self.run;
                self.say(format!(
                    "{}: waiting for approval: {gate} (modi approve {run} | modi deny {run})",
                    self.change_name(*change)
                ));
            }
        }
    }

    /// Clears the bars.
    pub fn finish(&mut self) {
        for c in &self.changes {
            if let Some(bar) = &c.bar {
                bar.finish();
            }
        }
    }
}
