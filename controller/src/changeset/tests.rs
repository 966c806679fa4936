//! Tests of the whole pipeline (each module's own tests sit beside it).

mod corpus;
mod examples;
mod injection;
mod rendering;
mod robustness;
mod secrets;

use std::collections::BTreeMap;

use crate::changeset::{Diagnostics, Sources, render, validate, validate_with_inventory};
use crate::spec::{HostInfo, RunSpec, Step, StepAction};

/// A host with labels.
pub(crate) fn host(name: &str, labels: &[(&str, &str)]) -> HostInfo {
    HostInfo {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        facts: [("os".to_string(), "linux".to_string())].into(),
    }
}

/// `k=v` pairs as `--var`s.
pub(crate) fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Validates and renders `files` (the first is the root).
pub(crate) fn plan_files(
    files: &[(&str, &str)],
    inventory: &[HostInfo],
    inventory_vars: &serde_json::Value,
    cli: &BTreeMap<String, String>,
) -> Result<RunSpec, Diagnostics> {
    let sources = Sources {
        root: files[0].0.to_string(),
        files: files
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect(),
    };
    let inv_vars = inventory_vars.as_object().cloned().unwrap_or_default();
    let cs = if inv_vars.is_empty() {
        validate(&sources, cli, &Default::default())?
    } else {
        validate_with_inventory(&sources, cli, &Default::default(), &inv_vars)?
    };
    render(&cs, inventory, &inv_vars, cli)
}

/// Validates and renders one file.
pub(super) fn plan(
    text: &str,
    inventory: &[HostInfo],
    cli: &[(&str, &str)],
) -> Result<RunSpec, Diagnostics> {
    plan_files(
        &[("cs.yaml", text)],
        inventory,
        &serde_json::Value::Null,
        &vars(cli),
    )
}

/// The shell command of a `run` step.
pub(super) fn command(step: &Step) -> &str {
    match &step.action {
        StepAction::Run { command } | StepAction::Interact { command, .. } => command,
        other => panic!("not a run step: {other:?}"),
    }
}
