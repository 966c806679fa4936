//! The changeset language: YAML files in, a fully rendered
//! [`RunSpec`](crate::spec::RunSpec) out. Pure: no file, clock or network
//! access; the caller reads files (see [`collect_sources`]).
//!
//! The pipeline, and where to start reading:
//!
//! 1. [`collect_sources`] (`sources.rs`): the root file and every
//!    `include`d file, read through the caller's function → [`Sources`].
//! 2. [`validate`] (this file) → [`Changeset`]: each file parsed
//!    (`yaml.rs` keeps positions, `parse.rs` + `steps.rs` + `policy.rs`
//!    read every key into `ast.rs`), then expanded (`flatten.rs`: templates,
//!    `foreach`, `include`, `requires`) and checked as a whole (`check.rs`:
//!    undefined variables, variable cycles). Templates are compiled by
//!    `jinja.rs`, conditions by `cond.rs`, selectors by `selector.rs`.
//! 3. [`render`] (`render.rs`): hosts selected, variables evaluated and
//!    every step rendered per host → `RunSpec`, which `modi plan` prints and
//!    the rollout engine runs.
//! 4. At run time the engine judges results with [`CelJudge`] (`cond.rs`).
//!
//! Every problem is a [`Diagnostic`] pointing at file:line:col and a field
//! path; all problems found are reported together as [`Diagnostics`].
//! `docs/changeset-format.md` is the language reference.

mod ast;
mod check;
mod cond;
mod diag;
mod flatten;
mod jinja;
mod parse;
mod policy;
mod render;
mod selector;
mod sources;
mod steps;
mod yaml;

#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, BTreeSet};

pub use cond::CelJudge;
pub use diag::{Diagnostic, Diagnostics};
pub use render::render;
pub use selector::{Key, Op, Selector, Term};
pub use sources::{Sources, collect_sources, resolve_include};

use crate::spec::{ChangesetFailure, GroupSpec, Location};
use diag::finish;
use flatten::{FlatChange, Flattener};

/// A validated changeset: parsed, expanded (templates, `foreach`,
/// `include`) and checked. Render it with [`render`].
#[derive(Clone, Debug)]
pub struct Changeset {
    name: String,
    description: String,
    source: String,
    on_failure: ChangesetFailure,
    changes: Vec<FlatChange>,
    groups: Vec<GroupSpec>,
    /// The names of the secrets given (`--secret`). Their values never
    /// reach the language: templates see each as a stand-in that renders
    /// to `<secret NAME>`, or to `"$MODI_SECRET_NAME"` in a shell command.
    secrets: BTreeSet<String>,
}

impl Changeset {
    /// The changeset's `name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The changeset's `description`.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// The root file.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The changes of the run, flattened, in order (`NAME`, `NAME[i]`,
    /// `INCLUDE/NAME`).
    pub fn change_names(&self) -> Vec<&str> {
        self.changes.iter().map(|c| c.name.as_str()).collect()
    }

    /// The names of the secrets given.
    pub fn secrets(&self) -> &BTreeSet<String> {
        &self.secrets
    }

    /// The hosts selector of each change, in order (for `modi plan` to
    /// show what would be selected).
    pub fn selectors(&self) -> Vec<(&str, &Selector)> {
        self.changes
            .iter()
            .map(|c| (c.name.as_str(), &c.hosts))
            .collect()
    }
}

/// Parses and checks `sources` without knowing the inventory (what
/// `modi validate` runs on the operator's machine): every check that does
/// not need hosts. A variable that only the controller's inventory vars
/// define is reported as undefined; use [`validate_with_inventory`] where
/// they are known. `secrets` are the names given with `--secret` (only
/// names: values never reach the language); a secret the changeset
/// declares in `secrets:` and that is not among them is an error.
pub fn validate(
    sources: &Sources,
    cli_vars: &BTreeMap<String, String>,
    secrets: &BTreeSet<String>,
) -> Result<Changeset, Diagnostics> {
    validate_with_inventory(sources, cli_vars, secrets, &serde_json::Map::new())
}

/// [`validate`], with the names of the inventory vars known (what the
/// controller runs for `plan` and `apply`).
pub fn validate_with_inventory(
    sources: &Sources,
    cli_vars: &BTreeMap<String, String>,
    secrets: &BTreeSet<String>,
    inventory_vars: &serde_json::Map<String, serde_json::Value>,
) -> Result<Changeset, Diagnostics> {
    let mut diags = check_cli_vars(cli_vars);
    diags.extend(check_secret_names(cli_vars, secrets));
    // Secrets are variables of the highest precedence, like `--var`:
    // for every check they count as given.
    let given = with_secrets(cli_vars, secrets);
    let mut f = Flattener::new(sources, &given);
    let root = &sources.root;
    let Some(def) = f.file(root) else {
        if !sources.files.contains_key(root) {
            let loc = Location {
                file: root.clone(),
                line: 1,
                column: 1,
                path: String::new(),
            };
            diags.push(Diagnostic::new(loc, "the root file is not in the sources"));
        }
        diags.append(&mut f.diags);
        return Err(Diagnostics::normalized(diags));
    };
    let mut chain = vec![root.clone()];
    f.changeset(&def, "", None, None, &mut chain);
    diags.append(&mut f.diags);
    // A declared secret that is not given is reported once, here, not
    // again as an undefined variable wherever it is used.
    let mut known = given.clone();
    for (name, loc) in f.declared_secrets() {
        known
            .entry(name.clone())
            .or_insert_with(|| modi_proto::secret_placeholder(&name));
        if !secrets.contains(&name) {
            diags.push(Diagnostic::new(
                loc,
                format!(
                    "secret `{name}` is not given: pass it with --secret {name}=VALUE, {name}=@FILE or {name}=env:VAR"
                ),
            ));
        }
    }
    let outside = check::Outside {
        cli: &known,
        inventory: inventory_vars,
    };
    diags.extend(check::check_changes(&f.changes, &outside));
    let cs = Changeset {
        name: def.name.clone(),
        description: def.description.clone(),
        source: root.clone(),
        on_failure: def.on_failure,
        changes: f.changes,
        groups: f.groups,
        secrets: secrets.clone(),
    };
    finish(cs, diags)
}

/// `--var`s with every secret added as a variable whose value is its
/// placeholder, `<secret NAME>` (what variables built from a secret hold,
/// and what `modi plan` shows).
pub(crate) fn with_secrets(
    cli_vars: &BTreeMap<String, String>,
    secrets: &BTreeSet<String>,
) -> BTreeMap<String, String> {
    let mut given = cli_vars.clone();
    for name in secrets {
        given.insert(name.clone(), modi_proto::secret_placeholder(name));
    }
    given
}

/// `--secret` names follow the `--var` rules, and a name is given one way.
fn check_secret_names(
    cli_vars: &BTreeMap<String, String>,
    secrets: &BTreeSet<String>,
) -> Vec<Diagnostic> {
    let as_vars: BTreeMap<String, String> =
        secrets.iter().map(|s| (s.clone(), String::new())).collect();
    let mut out: Vec<Diagnostic> = check_cli_vars(&as_vars)
        .into_iter()
        .map(|mut d| {
            d.location.path = d.location.path.replacen("--var", "--secret", 1);
            d
        })
        .collect();
    for name in secrets.iter().filter(|s| cli_vars.contains_key(*s)) {
        let loc = Location {
            file: "<command line>".into(),
            line: 1,
            column: 1,
            path: format!("--secret {name}"),
        };
        out.push(Diagnostic::new(
            loc,
            "given both as --var and as --secret: give it one way",
        ));
    }
    out
}

/// `--var` names must be usable in templates and must not hide `host`.
fn check_cli_vars(cli_vars: &BTreeMap<String, String>) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for name in cli_vars.keys() {
        let ok = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let problem = if name == "host" {
            "`host` is reserved: templates see the host as `host`"
        } else if !ok {
            "bad variable name: expected letters, digits and `_`, not starting with a digit"
        } else {
            continue;
        };
        let loc = Location {
            file: "<command line>".into(),
            line: 1,
            column: 1,
            path: format!("--var {name}"),
        };
        out.push(Diagnostic::new(loc, problem));
    }
    out
}
