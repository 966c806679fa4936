//! Rendering a validated [`Changeset`] against the inventory into the
//! [`RunSpec`] the engine runs: hosts selected per change, the variable
//! namespace evaluated per host, every step rendered for every host.
//!
//! Variables are evaluated lazily against the final namespace: each name
//! has one definition (the highest-precedence one), and a value that is a
//! template is rendered after the variables it reads. So `--var version=2`
//! also changes `url: "https://x/{{ version }}"` defined lower down.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use minijinja::value::Value;
use serde_json::{Map, Value as Json};

use super::Changeset;
use super::ast::{ActionDef, BackoutDef, Cond, StepDef, Tmpl, VarValue};
use super::diag::{Diagnostic, Diagnostics, finish};
use super::flatten::{Def, FlatChange, Scope};
use super::jinja::{Escape, jinja, to_value};
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
    let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
    let mut changes = Vec::with_capacity(cs.changes.len());
    for fc in &cs.changes {
        let mut hosts = Vec::new();
        let mut failed = Vec::new();
        let selected = fc.hosts.select(inventory);
        let count = selected.len();
        for host in selected {
            match render_host(fc, host, inventory_vars, cli_vars) {
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

/// Evaluates variables for one host.
struct Eval<'a> {
    base: Map<String, Json>,
    cli: &'a BTreeMap<String, String>,
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
                let ctx = to_value(&Json::Object(self.namespace(out)));
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
) -> Result<HostPlan, Failure> {
    let mut base = inventory_vars.clone();
    base.insert("host".into(), host_json(host));
    let mut eval = Eval {
        base,
        cli,
        memo: BTreeMap::new(),
    };
    let defs = eval.scope(&fc.scope)?;
    let ns = eval.namespace(&defs);
    let ctx = to_value(&Json::Object(ns.clone()));
    let r = StepRenderer { ctx: &ctx, ns: &ns };
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
}

fn condition(c: &Cond) -> Condition {
    Condition {
        expr: c.expr.clone(),
        location: c.loc.clone(),
    }
}

impl StepRenderer<'_> {
    fn raw(&self, t: &Tmpl) -> Result<String, Failure> {
        jinja().render(t, Escape::Raw, self.ctx)
    }

    fn shell(&self, t: &Tmpl) -> Result<String, Failure> {
        jinja().render(t, Escape::Shell, self.ctx)
    }

    fn opt(&self, t: &Option<Tmpl>) -> Result<Option<String>, Failure> {
        t.as_ref().map(|t| self.raw(t)).transpose()
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
                let path = self.raw(&f.path)?;
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
                        let mut ns: BTreeMap<String, Value> = self
                            .ns
                            .iter()
                            .map(|(k, v)| (k.clone(), to_value(v)))
                            .collect();
                        ns.insert("file".into(), file);
                        let ctx = Value::from(ns);
                        Some(jinja().render(v, Escape::Shell, &ctx)?)
                    }
                    None => None,
                };
                StepAction::File(FileSpec {
                    path,
                    content: self.raw(&f.content)?,
                    mode: f.mode,
                    owner: match &f.owner {
                        Some(t) => {
                            let owner = self.raw(t)?;
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
        Ok(Step {
            action,
            timeout: s.timeout,
            env: s
                .env
                .iter()
                .map(|(k, t)| Ok((k.clone(), self.raw(t)?)))
                .collect::<Result<_, Failure>>()?,
            cwd: self.opt(&s.cwd)?,
            user: self.opt(&s.user)?,
            stdin: self.opt(&s.stdin)?,
            expect: s.expect.as_ref().map(condition),
            location: s.loc.clone(),
        })
    }
}
