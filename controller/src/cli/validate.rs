//! `modi validate` (local, touches nothing) and `modi plan` (renders on
//! the controller against today's fleet; ModiPY's noop).

use std::path::Path;

use modi_proto::v1 as pb;
use serde::Serialize;

use super::{CliError, Client, Outcome, Output, Vars, parse_vars};
use crate::changeset::{self, Sources};
use crate::spec::{RunSpec, Step, StepAction};

/// Reads `file` and every file it includes, from this machine.
pub fn read_sources(file: &Path) -> Result<Sources, CliError> {
    let root = file.to_string_lossy().into_owned();
    changeset::collect_sources(&root, &mut |path: &str| std::fs::read_to_string(path))
        .map_err(|d| CliError::Input(d.to_string()))
}

/// Validates a changeset locally.
pub fn validate(out: &Output, file: &Path, vars: &Vars) -> Result<Outcome, CliError> {
    let secrets = vars.secrets.read()?.into_keys().collect();
    let vars = parse_vars(vars)?;
    let sources = read_sources(file)?;
    let cs = changeset::validate(&sources, &vars, &secrets)
        .map_err(|d| CliError::Input(d.to_string()))?;
    let changes = cs.change_names();
    let summary = serde_json::json!({
        "file": file,
        "name": cs.name(),
        "valid": true,
        "changes": changes,
        "files": sources.files.keys().collect::<Vec<_>>(),
    });
    out.data(&summary, || {
        format!(
            "{}: valid ({} change{}, {} file{})",
            file.display(),
            changes.len(),
            if changes.len() == 1 { "" } else { "s" },
            sources.files.len(),
            if sources.files.len() == 1 { "" } else { "s" }
        )
    });
    Ok(Outcome::Ok)
}

/// The request `plan` and `apply` send. The secrets' values go only with
/// `apply` (`with_values`): `plan` sends their names.
pub fn plan_request(
    file: &Path,
    vars: &Vars,
    with_values: bool,
) -> Result<pb::PlanRequest, CliError> {
    let mut secrets = vars.secrets.read()?;
    if !with_values {
        secrets.values_mut().for_each(String::clear);
    }
    let vars = parse_vars(vars)?;
    let sources = read_sources(file)?;
    Ok(pb::PlanRequest {
        sources: Some(pb::Sources {
            root: sources.root,
            files: sources.files,
        }),
        vars,
        secrets: secrets.into_iter().collect(),
        diff: false,
    })
}

#[derive(Serialize)]
struct Plan<'a> {
    spec: &'a RunSpec,
    warnings: &'a [String],
    /// Per change, its batches as host names.
    batches: Vec<Vec<Vec<&'a str>>>,
    /// `--diff`: each file step against the file on its host.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    diffs: Vec<FileDiff<'a>>,
}

/// One `file` step against the file on its host, for `--output json`.
#[derive(Serialize)]
struct FileDiff<'a> {
    change: &'a str,
    host: &'a str,
    step: &'a str,
    path: &'a str,
    diff: &'a str,
    note: &'a str,
}

impl<'a> From<&'a pb::FileDiff> for FileDiff<'a> {
    fn from(d: &'a pb::FileDiff) -> FileDiff<'a> {
        FileDiff {
            change: &d.change,
            host: &d.host,
            step: &d.step,
            path: &d.path,
            diff: &d.diff,
            note: &d.note,
        }
    }
}

/// `--diff` for people: hosts whose diff is the same are shown once
/// (`web-01..web-17`), in plan order.
pub fn diffs_text(diffs: &[pb::FileDiff]) -> String {
    if diffs.is_empty() {
        return "\nno file steps to compare\n".to_string();
    }
    // (change, step, path, diff without its host-named header, note) →
    // hosts, in first-seen order.
    type Same<'a> = (&'a str, &'a str, &'a str, String, &'a str);
    let mut groups: Vec<(Same, Vec<&str>)> = Vec::new();
    for d in diffs {
        let body: String = d
            .diff
            .lines()
            .skip_while(|l| l.starts_with("--- ") || l.starts_with("+++ "))
            .map(|l| format!("{l}\n"))
            .collect();
        let key = (
            d.change.as_str(),
            d.step.as_str(),
            d.path.as_str(),
            body,
            d.note.as_str(),
        );
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, hosts)) => hosts.push(&d.host),
            None => groups.push((key, vec![&d.host])),
        }
    }
    let mut out = String::new();
    for ((change, step, path, body, note), hosts) in groups {
        let hosts = host_ranges(&hosts);
        out.push_str(&format!("\n{change} {step} {path} on {hosts}"));
        if !note.is_empty() {
            out.push_str(&format!(": {note}"));
        }
        out.push('\n');
        if !body.is_empty() {
            let from = if note == "new file" {
                "/dev/null".to_string()
            } else {
                format!("{path} (now)")
            };
            out.push_str(&format!("--- {from}\n+++ {path} ({step} of {change})\n"));
            out.push_str(&body);
        }
    }
    out
}

/// What a step does, as shown by plan.
pub fn step_text(step: &Step) -> String {
    let mut s = match &step.action {
        StepAction::Run { command } => format!("run: {command}"),
        StepAction::Argv { argv } => format!("argv: {argv:?}"),
        StepAction::File(f) => {
            let mut s = format!("file: {} ({} bytes", f.path, f.content.len());
            if let Some(m) = f.mode {
                s.push_str(&format!(", mode {m:04o}"));
            }
            if let Some(o) = &f.owner {
                s.push_str(&format!(", owner {o}"));
            }
            s.push(')');
            if let Some(v) = &f.validate {
                s.push_str(&format!(" validate: {v}"));
            }
            s
        }
        StepAction::Interact { command, script } => {
            format!("interact: {command} ({} exchanges)", script.len())
        }
        StepAction::Restore { path, .. } => format!("restore: {path}"),
        StepAction::Unrenderable { reason } => {
            format!("cannot be rendered for this host: {reason}; it fails alone")
        }
    };
    if !step.env.is_empty() {
        let env: Vec<String> = step.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        s.push_str(&format!("  [env {}]", env.join(" ")));
    }
    if let Some(t) = step.timeout {
        s.push_str(&format!("  [timeout {}]", humantime::format_duration(t)));
    }
    if let Some(e) = &step.expect {
        s.push_str(&format!("  [expect {}]", e.expr));
    }
    s
}

/// Renders the plan as text.
pub fn plan_text(spec: &RunSpec) -> String {
    use crate::spec::{ApproveAt, OnFailure, RolloutMode};
    let mut s = format!("plan for {} ({})\n", spec.name, spec.source);
    for change in &spec.changes {
        let requires: Vec<&str> = change
            .requires
            .iter()
            .filter_map(|i| spec.changes.get(*i).map(|c| c.name.as_str()))
            .collect();
        let mode = match change.rollout.mode {
            RolloutMode::Serial => "one host at a time".to_string(),
            RolloutMode::Parallel => match change.rollout.max_parallel {
                Some(n) => format!("in parallel, at most {n} at once"),
                None => "all hosts in parallel".to_string(),
            },
            RolloutMode::Rolling => "in rolling batches".to_string(),
        };
        let on_failure = match change.on_failure {
            OnFailure::Halt => "a failure backs out that host and starts no other".to_string(),
            OnFailure::Continue => match change.rollout.max_failures {
                Some(m) => format!(
                    "a failure backs out that host and carries on, up to {} failed",
                    amount(m)
                ),
                None => "a failure backs out that host and carries on".to_string(),
            },
            OnFailure::BackoutAll => {
                "a failure backs out every host the change was applied to".to_string()
            }
        };
        s.push_str(&format!(
            "\nchange {}: {}, {mode}; {on_failure}{}\n",
            change.name,
            super::runs::plural(change.hosts.len(), "host"),
            if requires.is_empty() {
                String::new()
            } else {
                format!("; after {}", requires.join(", "))
            }
        ));
        if change.retry.max_retries != 0 {
            let times = if change.retry.max_retries < 0 {
                "forever".to_string()
            } else {
                super::runs::plural(change.retry.max_retries as usize, "time")
            };
            s.push_str(&format!(
                "  a failed host is tried again {times}, {} apart\n",
                humantime::format_duration(change.retry.delay)
            ));
        }
        let gate = match change.approve.at {
            ApproveAt::None => None,
            ApproveAt::Once => Some("before the change starts"),
            ApproveAt::EachBatch => Some("before each batch"),
            ApproveAt::EachHost => Some("before each host"),
        };
        if let Some(gate) = gate {
            let timeout = change.approve.timeout.map_or(String::new(), |t| {
                format!(" (a deny after {})", humantime::format_duration(t))
            });
            s.push_str(&format!("  waits for approval {gate}{timeout}\n"));
        }
        if change.hosts.is_empty() {
            s.push_str("  (no host matches its selector today)\n");
            continue;
        }
        let batches = change.batches();
        for (b, batch) in batches.iter().enumerate() {
            let names: Vec<&str> = batch
                .iter()
                .map(|h| change.hosts[*h].host.name.as_str())
                .collect();
            let pause = match change.rollout.pause {
                Some(p) if b + 1 < batches.len() => {
                    format!(", then a pause of {}", humantime::format_duration(p))
                }
                _ => String::new(),
            };
            s.push_str(&format!(
                "  batch {}: {}{pause}\n",
                b + 1,
                host_ranges(&names)
            ));
        }
        // Hosts whose rendered steps are the same are shown once.
        let mut groups: Vec<(Vec<&str>, String)> = Vec::new();
        for host in &change.hosts {
            let text = host_steps_text(host);
            match groups.iter_mut().find(|(_, t)| *t == text) {
                Some((names, _)) => names.push(&host.host.name),
                None => groups.push((vec![&host.host.name], text)),
            }
        }
        for (names, text) in groups {
            s.push_str(&format!("  {}\n{text}", host_ranges(&names)));
        }
    }
    s
}

/// `3` or `10%`.
fn amount(a: crate::spec::Amount) -> String {
    match a {
        crate::spec::Amount::Count(n) => n.to_string(),
        crate::spec::Amount::Percent(p) => format!("{p}%"),
    }
}

/// Host names, runs of numbered names shortened: `web-01..web-17, db-1`.
pub fn host_ranges(names: &[&str]) -> String {
    fn split(name: &str) -> (&str, Option<(u64, usize)>) {
        let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 {
            return (name, None);
        }
        let (stem, num) = name.split_at(name.len() - digits);
        (stem, num.parse().ok().map(|n| (n, digits)))
    }
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < names.len() {
        let (stem, num) = split(names[i]);
        let mut j = i;
        if let Some((n, width)) = num {
            while j + 1 < names.len() {
                match split(names[j + 1]) {
                    (s, Some((m, w))) if s == stem && w == width && m == n + (j + 1 - i) as u64 => {
                        j += 1
                    }
                    _ => break,
                }
            }
        }
        if j >= i + 2 {
            out.push(format!("{}..{}", names[i], names[j]));
        } else {
            out.extend(names[i..=j].iter().map(|n| n.to_string()));
        }
        i = j + 1;
    }
    out.join(", ")
}

/// One host's steps, as the plan prints them.
fn host_steps_text(host: &crate::spec::HostPlan) -> String {
    let mut s = String::new();
    for (phase, steps) in [
        ("skip_if", &host.skip_if),
        ("check", &host.check),
        ("apply", &host.apply),
        ("verify", &host.verify),
    ] {
        for (i, step) in steps.iter().enumerate() {
            s.push_str(&format!("    {phase}[{i}] {}\n", step_text(step)));
        }
    }
    for (p, b) in host.backout.iter().enumerate() {
        let when = b
            .when
            .as_ref()
            .map_or(String::new(), |w| format!(" when {}", w.expr));
        s.push_str(&format!("    backout[{p}]{when}\n"));
        for (phase, steps) in [
            ("check", &b.check),
            ("steps", &b.steps),
            ("verify", &b.verify),
        ] {
            for (i, step) in steps.iter().enumerate() {
                s.push_str(&format!("      {phase}[{i}] {}\n", step_text(step)));
            }
        }
    }
    s
}

/// Prints warnings on stderr, one per line.
pub fn warn(out: &Output, warnings: &[String]) {
    for w in warnings {
        out.note(format!("modi: warning: {w}"));
    }
}

/// `--strict`: plans first and refuses (exit 2) if the plan has warnings.
pub async fn strict_check(client: &Client, file: &Path, vars: &Vars) -> Result<(), CliError> {
    let req = plan_request(file, vars, false)?;
    let warnings = client
        .admin()
        .plan(req)
        .await
        .map_err(|s| client.error(s))?
        .into_inner()
        .warnings;
    if warnings.is_empty() {
        return Ok(());
    }
    Err(CliError::Input(format!(
        "--strict: {} warning{}, nothing applied:\n  {}",
        warnings.len(),
        if warnings.len() == 1 { "" } else { "s" },
        warnings.join("\n  ")
    )))
}

/// Asks the controller to render the changeset; prints the plan, then
/// its warnings (exit 2 with `--strict` if there are any).
pub async fn plan(
    out: &Output,
    client: &Client,
    file: &Path,
    vars: &Vars,
    strict: bool,
    diff: bool,
) -> Result<Outcome, CliError> {
    let mut req = plan_request(file, vars, false)?;
    req.diff = diff;
    let r = client
        .admin()
        .plan(req)
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    let spec = r
        .spec
        .ok_or_else(|| crate::typed::Malformed::missing_field("spec"))?;
    let spec: RunSpec = crate::typed::run_spec_from(spec)?;
    let plan = Plan {
        spec: &spec,
        warnings: &r.warnings,
        batches: spec
            .changes
            .iter()
            .map(|c| {
                c.batches()
                    .iter()
                    .map(|b| b.iter().map(|h| c.hosts[*h].host.name.as_str()).collect())
                    .collect()
            })
            .collect(),
        diffs: r.diffs.iter().map(FileDiff::from).collect(),
    };
    out.data(&plan, || {
        let mut text = plan_text(&spec);
        if diff {
            text.push_str(&diffs_text(&r.diffs));
        }
        text
    });
    warn(out, &r.warnings);
    if strict && !r.warnings.is_empty() {
        return Err(CliError::Input(format!(
            "--strict: {} warning{}",
            r.warnings.len(),
            if r.warnings.len() == 1 { "" } else { "s" }
        )));
    }
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbered_hosts_are_shown_as_ranges() {
        let names = ["web-01", "web-02", "web-03", "web-05", "db-1", "db-2", "x"];
        assert_eq!(
            super::host_ranges(&names),
            "web-01..web-03, web-05, db-1, db-2, x"
        );
    }
}
