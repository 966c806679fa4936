//! Rendering a validated [`Changeset`] against the inventory into the
//! [`RunSpec`] the engine runs: hosts selected per change, the variable
//! namespace evaluated per host, every step rendered for every host.
//!
//! Variables are evaluated lazily against the final namespace: each name
//! has one definition (the highest-precedence one), and a value that is a
//! template is rendered after the variables it reads. So `--var version=2`
//! also changes `url: "https://x/{{ version }}"` defined lower down.
//!
//! Secrets are variables of the highest precedence whose value is not
//! known here (see `jinja.rs`): every step records the secrets it uses in
//! [`Step::secrets`], and a secret in a field that takes none (`cwd`,
//! `user`, `file.path`, `file.owner`) or pasted into a shell command as
//! text is an error.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use minijinja::value::Value;
use serde_json::{Map, Value as Json};

use super::Changeset;
use super::ast::{ActionDef, BackoutDef, Cond, StepDef, Tmpl, VarValue};
use super::diag::{Diagnostic, Diagnostics, finish};
use super::flatten::{Def, FlatChange, Scope};
use super::jinja::{Escape, Secret, jinja, secret_ref, to_value};
use crate::spec::{
    BackoutSpec, ChangeSpec, Condition, Exchange, FILE_TMP_PLACEHOLDER, FileSpec, HostInfo,
    HostPlan, Location, RunSpec, Step, StepAction,
};

type Failure = (Location, String);

/// Renders `cs` for the hosts in `inventory` (see the module docs).
pub fn render(
    cs: &Changeset,
    inventory: &[HostInfo],
    inventory_vars: &Map<String, Json>,
    cli_vars: &BTreeMap<String, String>,
) -> Result<RunSpec, Diagnostics> {
    let mut diags = super::check_cli_vars(cli_vars);
    let given = super::with_secrets(cli_vars, &cs.secrets);
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    let mut changes = Vec::with_capacity(cs.changes.len());
    for fc in &cs.changes {
        let mut hosts = Vec::new();
        let mut failed = Vec::new();
        let selected = fc.hosts.select(inventory);
        let count = selected.len();
        for host in selected {
            match render_host(fc, host, inventory_vars, &given, &cs.secrets) {
                Ok(plan) => hosts.push(plan),
                Err(failure) => failed.push((host, failure)),
            }
        }
        if !failed.is_empty() && failed.len() == count {
            // Every host fails the same way: the changeset is wrong, not
            // the hosts.
            for (host, (loc, msg)) in failed {
                if seen.insert((format!("{loc}"), msg.clone())) {
                    let msg = format!("{msg} (change `{}`, host `{}`)", fc.name, host.name);
                    diags.push(Diagnostic::new(loc, msg));
                }
            }
        } else {
            // Some hosts lack what a template reads (a label, a fact of a
            // host that never connected): each fails alone, saying why.
            for (host, (loc, msg)) in failed {
                hosts.push(unrenderable(host, &loc, &msg));
            }
        }
        changes.push(ChangeSpec {
            name: fc.name.clone(),
            group: fc.group,
            requires: fc.requires.clone(),
            rollout: fc.rollout.clone(),
            on_failure: fc.on_failure,
            retry: fc.retry,
            approve: fc.approve,
            hosts,
            location: fc.location.clone(),
        });
    }
    let spec = RunSpec {
        name: cs.name.clone(),
        description: cs.description.clone(),
        source: cs.source.clone(),
        on_failure: cs.on_failure,
        changes,
        groups: cs.groups.clone(),
    };
    finish(spec, diags).map_err(|d| Diagnostics::normalized(d.0))
}

/// The plan of a host the changeset cannot be rendered for: one `check`
/// step the controller fails at once (nothing is sent, nothing applied).
fn unrenderable(host: &HostInfo, loc: &Location, msg: &str) -> HostPlan {
    HostPlan {
        host: host.clone(),
        vars: Map::new(),
        skip_if: Vec::new(),
        check: vec![Step {
            action: StepAction::Unrenderable {
                reason: format!("{msg} on {} ({loc})", host.name),
            },
            timeout: None,
            env: BTreeMap::new(),
            cwd: None,
            user: None,
            stdin: None,
            expect: None,
            location: loc.clone(),
            secrets: BTreeSet::new(),
        }],
        apply: Vec::new(),
        verify: Vec::new(),
        backout: Vec::new(),
    }
}

/// `host` as templates and conditions see it.
fn host_json(host: &HostInfo) -> Json {
    serde_json::json!({"name": host.name, "labels": host.labels, "facts": host.facts})
}

/// The template context for namespace `ns`: every secret as a [`Secret`].
fn context(ns: &Map<String, Json>, secrets: &BTreeSet<String>) -> BTreeMap<String, Value> {
    ns.iter()
        .map(|(k, v)| {
            let value = if secrets.contains(k) {
                Value::from_object(Secret(k.clone()))
            } else {
                to_value(v)
            };
            (k.clone(), value)
        })
        .collect()
}

/// Evaluates variables for one host.
struct Eval<'a> {
    base: Map<String, Json>,
    /// `--var`s and secrets (as their placeholders).
    cli: &'a BTreeMap<String, String>,
    secrets: &'a BTreeSet<String>,
    /// Evaluated scopes (an include's scope, shared by its changes).
    memo: BTreeMap<usize, Map<String, Json>>,
}

impl Eval<'_> {
    /// All of `scope`'s variables, evaluated.
    fn scope(&mut self, scope: &Arc<Scope>) -> Result<Map<String, Json>, Failure> {
        let id = Arc::as_ptr(scope) as usize;
        if let Some(done) = self.memo.get(&id) {
            return Ok(done.clone());
        }
        let mut out = Map::new();
        let mut visiting = Vec::new();
        for key in scope.defs.keys() {
            self.key(scope, key, &mut out, &mut visiting)?;
        }
        self.memo.insert(id, out.clone());
        Ok(out)
    }

    fn key(
        &mut self,
        scope: &Arc<Scope>,
        key: &str,
        out: &mut Map<String, Json>,
        visiting: &mut Vec<String>,
    ) -> Result<(), Failure> {
        if out.contains_key(key) || self.cli.contains_key(key) {
            return Ok(());
        }
        let entry = &scope.defs[key];
        if visiting.iter().any(|k| k == key) {
            return Err((
                entry.loc.clone(),
                format!(
                    "variables refer to each other in a cycle: {} -> {key}",
                    visiting.join(" -> ")
                ),
            ));
        }
        let value = match &entry.def {
            Def::Import(parent, name) => {
                let parent_vals = self.scope(parent)?;
                match parent_vals.get(name) {
                    Some(v) => v.clone(),
                    None => return Ok(()),
                }
            }
            Def::Value(v) => {
                let mut ts = Vec::new();
                v.templates(&mut ts);
                visiting.push(key.to_string());
                for dep in ts
                    .iter()
                    .flat_map(|t| t.roots())
                    .filter(|r| scope.defs.contains_key(*r))
                {
                    if dep != key || visiting.len() > 1 {
                        self.key(scope, dep, out, visiting)?;
                    } else {
                        visiting.pop();
                        return Err((
                            entry.loc.clone(),
                            format!("variable `{key}` refers to itself"),
                        ));
                    }
                }
                visiting.pop();
                let ctx = Value::from(context(&self.namespace(out), self.secrets));
                render_value(v, &ctx)?
            }
        };
        out.insert(key.to_string(), value);
        Ok(())
    }

    /// The namespace with `defs`: inventory vars < host < defs < `--var`.
    fn namespace(&self, defs: &Map<String, Json>) -> Map<String, Json> {
        let mut ns = self.base.clone();
        ns.extend(defs.iter().map(|(k, v)| (k.clone(), v.clone())));
        ns.extend(
            self.cli
                .iter()
                .map(|(k, v)| (k.clone(), Json::String(v.clone()))),
        );
        ns
    }
}

fn render_value(v: &VarValue, ctx: &Value) -> Result<Json, Failure> {
    Ok(match v {
        VarValue::Null => Json::Null,
        VarValue::Bool(b) => Json::Bool(*b),
        VarValue::Int(i) => Json::from(*i),
        VarValue::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        VarValue::Str(t) => Json::String(jinja().render(t, Escape::Raw, ctx)?),
        VarValue::List(l) => Json::Array(
            l.iter()
                .map(|x| render_value(x, ctx))
                .collect::<Result<_, _>>()?,
        ),
        VarValue::Map(m) => Json::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), render_value(x, ctx)?)))
                .collect::<Result<_, Failure>>()?,
        ),
    })
}

fn render_host(
    fc: &FlatChange,
    host: &HostInfo,
    inventory_vars: &Map<String, Json>,
    cli: &BTreeMap<String, String>,
    secrets: &BTreeSet<String>,
) -> Result<HostPlan, Failure> {
    let mut base = inventory_vars.clone();
    base.insert("host".into(), host_json(host));
    let mut eval = Eval {
        base,
        cli,
        secrets,
        memo: BTreeMap::new(),
    };
    let defs = eval.scope(&fc.scope)?;
    let ns = eval.namespace(&defs);
    let ctx = Value::from(context(&ns, secrets));
    let r = StepRenderer {
        ctx: &ctx,
        ns: &ns,
        secrets,
    };
    let p = &fc.phases;
    let mut vars = ns.clone();
    vars.remove("host");
    Ok(HostPlan {
        host: host.clone(),
        vars,
        skip_if: r.steps(p.skip_if.as_deref())?,
        check: r.steps(p.check.as_deref())?,
        apply: r.steps(p.apply.as_deref())?,
        verify: r.steps(p.verify.as_deref())?,
        backout: p
            .backout
            .iter()
            .flatten()
            .map(|b| r.backout(b))
            .collect::<Result<_, _>>()?,
    })
}

struct StepRenderer<'a> {
    ctx: &'a Value,
    ns: &'a Map<String, Json>,
    secrets: &'a BTreeSet<String>,
}

fn condition(c: &Cond) -> Condition {
    Condition {
        expr: c.expr.clone(),
        location: c.loc.clone(),
    }
}

/// The fields where a secret may go, for the error that says so.
const SECRET_FIELDS: &str =
    "`run`, `argv`, `env`, `stdin`, `interact` (`run`, `send`), `file.content` and `file.validate`";

impl StepRenderer<'_> {
    /// A field that may hold secrets: their placeholders, which the agent
    /// fills in.
    fn raw(&self, t: &Tmpl) -> Result<String, Failure> {
        jinja().render(t, Escape::Raw, self.ctx)
    }

    /// A field no secret may go into (`what` names it): it is journaled by
    /// the agent and shown as it is.
    fn plain(&self, t: &Tmpl, what: &str) -> Result<String, Failure> {
        let text = self.raw(t)?;
        let found = self.placeholders(&text).next().map(str::to_string);
        match found {
            Some(name) => Err((
                t.loc.clone(),
                format!(
                    "secret `{name}` cannot be used in `{what}`: a secret can go into {SECRET_FIELDS}"
                ),
            )),
            None => Ok(text),
        }
    }

    /// A shell command: secrets are read from their environment variables;
    /// one pasted in as text (`| safe`) would be a command line holding a
    /// placeholder, and is an error.
    fn shell_with(&self, t: &Tmpl, ctx: &Value) -> Result<String, Failure> {
        let text = jinja().render(t, Escape::Shell, ctx)?;
        let found = self.placeholders(&text).next().map(str::to_string);
        match found {
            Some(name) => Err((
                t.loc.clone(),
                format!(
                    "secret `{name}` would be pasted into the shell command as text (`| safe`?): write `{{{{ {name} }}}}`, which the command reads from ${}",
                    modi_proto::secret_env(&name)
                ),
            )),
            None => Ok(text),
        }
    }

    fn shell(&self, t: &Tmpl) -> Result<String, Failure> {
        self.shell_with(t, self.ctx)
    }

    /// The secrets whose placeholder `text` holds.
    fn placeholders<'t>(&'t self, text: &'t str) -> impl Iterator<Item = &'t str> + 't {
        self.secrets
            .iter()
            .filter(move |s| text.contains(&modi_proto::secret_placeholder(s)))
            .map(String::as_str)
    }

    fn opt_plain(&self, t: &Option<Tmpl>, what: &str) -> Result<Option<String>, Failure> {
        t.as_ref().map(|t| self.plain(t, what)).transpose()
    }

    /// The secrets `step` uses: in shell commands, read from the
    /// environment; elsewhere, as placeholders.
    fn used(&self, step: &Step) -> BTreeSet<String> {
        let mut shell: Vec<&str> = Vec::new();
        let mut values: Vec<&str> = step.env.values().map(String::as_str).collect();
        values.extend(step.stdin.as_deref());
        match &step.action {
            StepAction::Run { command } => shell.push(command),
            StepAction::Argv { argv } => values.extend(argv.iter().map(String::as_str)),
            StepAction::File(f) => {
                values.push(&f.content);
                shell.extend(f.validate.as_deref());
            }
            StepAction::Interact { command, script } => {
                shell.push(command);
                values.extend(script.iter().map(|x| x.send.as_str()));
            }
            StepAction::Restore { .. } | StepAction::Unrenderable { .. } => {}
        }
        self.secrets
            .iter()
            .filter(|name| {
                let reference = secret_ref(name);
                let placeholder = modi_proto::secret_placeholder(name);
                shell.iter().any(|c| c.contains(&reference))
                    || values.iter().any(|v| v.contains(&placeholder))
            })
            .cloned()
            .collect()
    }

    fn steps(&self, steps: Option<&[StepDef]>) -> Result<Vec<Step>, Failure> {
        steps
            .unwrap_or_default()
            .iter()
            .map(|s| self.step(s))
            .collect()
    }

    fn backout(&self, b: &BackoutDef) -> Result<BackoutSpec, Failure> {
        Ok(BackoutSpec {
            when: b.when.as_ref().map(condition),
            check: self.steps(Some(&b.check))?,
            steps: self.steps(Some(&b.steps))?,
            verify: self.steps(Some(&b.verify))?,
            location: b.loc.clone(),
        })
    }

    fn step(&self, s: &StepDef) -> Result<Step, Failure> {
        let action = match &s.action {
            ActionDef::Run(t) => StepAction::Run {
                command: self.shell(t)?,
            },
            ActionDef::Argv(a) => {
                let argv: Vec<String> = a.iter().map(|t| self.raw(t)).collect::<Result<_, _>>()?;
                if argv[0].is_empty() {
                    return Err((
                        a[0].loc.clone(),
                        "the program (argv[0]) rendered to an empty string".into(),
                    ));
                }
                StepAction::Argv { argv }
            }
            ActionDef::File(f) => {
                let path = self.plain(&f.path, "file.path")?;
                if path.trim().is_empty() {
                    return Err((
                        f.path.loc.clone(),
                        "the file path rendered to an empty string".into(),
                    ));
                }
                let validate = match &f.validate {
                    Some(v) => {
                        let file = Value::from(BTreeMap::from([
                            (
                                "tmp".to_string(),
                                Value::from_safe_string(FILE_TMP_PLACEHOLDER.to_string()),
                            ),
                            ("path".to_string(), Value::from(path.clone())),
                        ]));
                        let mut ns = context(self.ns, self.secrets);
                        ns.insert("file".into(), file);
                        let ctx = Value::from(ns);
                        Some(self.shell_with(v, &ctx)?)
                    }
                    None => None,
                };
                StepAction::File(FileSpec {
                    path,
                    content: self.raw(&f.content)?,
                    mode: f.mode,
                    owner: match &f.owner {
                        Some(t) => {
                            let owner = self.plain(t, "file.owner")?;
                            super::policy::check_owner(&owner).map_err(|e| (t.loc.clone(), e))?;
                            Some(owner)
                        }
                        None => None,
                    },
                    validate,
                })
            }
            ActionDef::Interact { run, script } => StepAction::Interact {
                command: self.shell(run)?,
                script: script
                    .iter()
                    .map(|x| {
                        Ok(Exchange {
                            expect: x.expect.clone(),
                            send: self.raw(&x.send)?,
                            timeout: x.timeout,
                        })
                    })
                    .collect::<Result<_, Failure>>()?,
            },
        };
        let mut step = Step {
            action,
            timeout: s.timeout,
            env: s
                .env
                .iter()
                .map(|(k, t)| Ok((k.clone(), self.raw(t)?)))
                .collect::<Result<_, Failure>>()?,
            cwd: self.opt_plain(&s.cwd, "cwd")?,
            user: self.opt_plain(&s.user, "user")?,
            stdin: s.stdin.as_ref().map(|t| self.raw(t)).transpose()?,
            expect: s.expect.as_ref().map(condition),
            location: s.loc.clone(),
            secrets: BTreeSet::new(),
        };
        step.secrets = self.used(&step);
        Ok(step)
    }
}
