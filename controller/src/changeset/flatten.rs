//! Expanding a changeset into the flat list of changes a run executes:
//! templates applied (`use` + `with`), `foreach` unrolled, `include`d
//! changesets flattened into groups, `requires` resolved to indices, and
//! each change's variable [`Scope`] built.
//!
//! Names in the run: `NAME`, `NAME[i]` for `foreach` items, `INCLUDE/NAME`
//! inside an included changeset. A change that requires a `foreach` change
//! requires its last item (items run in order); one that requires an
//! include change requires every change of the group; the roots of a group
//! take the include change's own `requires`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::ast::{ChangeDef, ChangesetDef, Phases, TemplateDef, VarDef, VarValue};
use super::diag::{Diagnostic, suggestion};
use super::parse::parse_file;
use super::selector::Selector;
use super::sources::{Sources, loop_message, resolve_include};
use crate::spec::{Approve, GroupSpec, Location, OnFailure, Retry, Rollout};

/// Where a variable's value comes from.
#[derive(Clone, Debug)]
pub(crate) enum Def {
    /// Written in the changeset, evaluated in the scope that holds it.
    Value(VarValue),
    /// The including change's variable of that name, evaluated in the
    /// including change's scope (an `include`'s `vars` and `with`).
    Import(Arc<Scope>, String),
}

/// One variable definition of a scope.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// The definition.
    pub def: Def,
    /// Where it is written.
    pub loc: Location,
}

/// The variables one change defines: the changeset's `vars`, an include's
/// `vars`/`with`, the change's `vars`, template defaults, `with`, the
/// `foreach` item, merged by precedence so each name has one definition.
/// Inventory vars, `host` and `--var` are added at render time.
#[derive(Clone, Debug, Default)]
pub(crate) struct Scope {
    /// By name.
    pub defs: BTreeMap<String, Entry>,
    /// The change this scope belongs to, for messages.
    pub owner: String,
}

impl Scope {
    fn layer(&mut self, defs: &[VarDef]) {
        for d in defs {
            self.defs.insert(
                d.name.clone(),
                Entry {
                    def: Def::Value(d.value.clone()),
                    loc: d.loc.clone(),
                },
            );
        }
    }
}

/// One change of the run, ready to render per host.
#[derive(Clone, Debug)]
pub(crate) struct FlatChange {
    /// Its name in the run.
    pub name: String,
    /// The name as written (with the include prefix, without `[i]`).
    pub origin: String,
    /// Its group, if included.
    pub group: Option<usize>,
    /// Indices of the changes it requires.
    pub requires: Vec<usize>,
    /// Its hosts.
    pub hosts: Selector,
    /// Its rollout policy.
    pub rollout: Rollout,
    /// Its failure policy.
    pub on_failure: OnFailure,
    /// Its retries.
    pub retry: Retry,
    /// Its approval gates.
    pub approve: Approve,
    /// Where it is written.
    pub location: Location,
    /// Its variables.
    pub scope: Arc<Scope>,
    /// Its body (the template's, with the change's own phases added).
    pub phases: Phases,
    /// The required (`~`) parameters of its template: an unset one is
    /// reported once, at `use`, not again at every template line.
    pub params: Vec<String>,
}

/// What an included changeset sees of the including change: all of its
/// variables, those it sets itself (`vars`, `with`) above the included
/// file's own `vars`, the others below them.
pub(crate) struct Import {
    parent: Arc<Scope>,
    explicit: BTreeSet<String>,
}

/// What one entry of `changes:` became in the flat list.
#[derive(Clone, Debug, Default)]
struct Unit {
    /// Take the entry's `requires`.
    roots: Vec<usize>,
    /// What "requires this entry" means.
    last: Vec<usize>,
    /// Everything it became.
    all: Vec<usize>,
}

pub(crate) struct Flattener<'a> {
    sources: &'a Sources,
    cli: &'a BTreeMap<String, String>,
    parsed: BTreeMap<String, Option<Arc<ChangesetDef>>>,
    pub diags: Vec<Diagnostic>,
    pub changes: Vec<FlatChange>,
    pub groups: Vec<GroupSpec>,
}

impl<'a> Flattener<'a> {
    pub fn new(sources: &'a Sources, cli: &'a BTreeMap<String, String>) -> Flattener<'a> {
        Flattener {
            sources,
            cli,
            parsed: BTreeMap::new(),
            diags: Vec::new(),
            changes: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// The parsed file (parsed once; its problems reported once).
    pub fn file(&mut self, file: &str) -> Option<Arc<ChangesetDef>> {
        if let Some(p) = self.parsed.get(file) {
            return p.clone();
        }
        let def = match self.sources.files.get(file) {
            Some(text) => {
                let (def, diags) = parse_file(file, text);
                self.diags.extend(diags);
                def.map(Arc::new)
            }
            None => None,
        };
        self.parsed.insert(file.to_string(), def.clone());
        def
    }

    /// Every secret declared in `secrets:` by the files parsed so far (the
    /// root and everything it includes), with where it is declared.
    pub fn declared_secrets(&self) -> Vec<(String, Location)> {
        self.parsed
            .values()
            .flatten()
            .flat_map(|def| def.secrets.iter().cloned())
            .collect()
    }

    /// Flattens `def` (the root when `group` is `None`).
    pub fn changeset(
        &mut self,
        def: &ChangesetDef,
        prefix: &str,
        group: Option<usize>,
        import: Option<&Import>,
        chain: &mut Vec<String>,
    ) -> Vec<usize> {
        let mut base = Scope::default();
        let imports = |base: &mut Scope, explicit: bool| {
            let Some(imp) = import else {
                return;
            };
            for (k, entry) in &imp.parent.defs {
                if imp.explicit.contains(k) == explicit {
                    let def = Def::Import(Arc::clone(&imp.parent), k.clone());
                    base.defs.insert(
                        k.clone(),
                        Entry {
                            def,
                            loc: entry.loc.clone(),
                        },
                    );
                }
            }
        };
        imports(&mut base, false);
        base.layer(&def.vars);
        imports(&mut base, true);
        let templates: BTreeMap<&str, &TemplateDef> =
            def.templates.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut units: BTreeMap<&str, Unit> = BTreeMap::new();
        for c in &def.changes {
            let unit = if let Some((target, loc)) = &c.include {
                self.include(c, target, loc, &base, prefix, group, chain)
            } else {
                self.change(c, &templates, &base, prefix, group)
            };
            units.insert(&c.name, unit);
        }
        let names: Vec<&str> = def.changes.iter().map(|c| c.name.as_str()).collect();
        for c in &def.changes {
            let unit = &units[c.name.as_str()];
            let mut needs = Vec::new();
            for (r, loc) in &c.requires {
                match units.get(r.as_str()) {
                    Some(u) if *r != c.name => needs.extend(u.last.iter().copied()),
                    Some(_) => {}
                    None => {
                        let hint = suggestion(r, names.iter().copied());
                        self.diags.push(Diagnostic::new(
                            loc.clone(),
                            format!("unknown change `{r}` in `requires`{hint}"),
                        ));
                    }
                }
            }
            for &i in &unit.roots {
                self.changes[i].requires.extend(needs.iter().copied());
                self.changes[i].requires.sort_unstable();
                self.changes[i].requires.dedup();
            }
        }
        self.cycles(def);
        units.values().flat_map(|u| u.all.iter().copied()).collect()
    }

    /// Reports every `requires` cycle once, naming it, at the `requires`
    /// entry that closes it.
    fn cycles(&mut self, def: &ChangesetDef) {
        let index: BTreeMap<&str, usize> = def
            .changes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str(), i))
            .collect();
        let edges: Vec<Vec<(usize, &Location)>> = def
            .changes
            .iter()
            .map(|c| {
                c.requires
                    .iter()
                    .filter_map(|(r, l)| Some((*index.get(r.as_str())?, l)))
                    .collect()
            })
            .collect();
        let mut walk = CycleWalk {
            edges: &edges,
            color: vec![0; edges.len()],
            stack: Vec::new(),
            found: Vec::new(),
            seen: BTreeSet::new(),
        };
        for v in 0..edges.len() {
            if walk.color[v] == 0 {
                walk.visit(v);
            }
        }
        for (cycle, loc) in walk.found {
            let names: Vec<&str> = cycle
                .iter()
                .map(|&i| def.changes[i].name.as_str())
                .collect();
            let msg = if names.len() == 2 {
                format!("`{}` requires itself", names[0])
            } else {
                format!("requires cycle: {}", names.join(" -> "))
            };
            self.diags.push(Diagnostic::new(loc, msg));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn include(
        &mut self,
        c: &ChangeDef,
        target: &str,
        loc: &Location,
        base: &Scope,
        prefix: &str,
        group: Option<usize>,
        chain: &mut Vec<String>,
    ) -> Unit {
        let resolved = resolve_include(&loc.file, target);
        if chain.contains(&resolved) {
            self.diags
                .push(Diagnostic::new(loc.clone(), loop_message(chain, &resolved)));
            return Unit::default();
        }
        if !self.sources.files.contains_key(&resolved) {
            self.diags.push(Diagnostic::new(loc.clone(), format!(
                "included file `{resolved}` is not in the changeset's sources (was it collected?)"
            )));
            return Unit::default();
        }
        let Some(nested) = self.file(&resolved) else {
            return Unit::default();
        };
        let mut scope = base.clone();
        scope.owner = format!("{prefix}{}", c.name);
        scope.layer(&c.vars);
        scope.layer(&c.with);
        let import = Import {
            parent: Arc::new(scope),
            explicit: c
                .vars
                .iter()
                .chain(&c.with)
                .map(|d| d.name.clone())
                .collect(),
        };
        let g = self.groups.len();
        self.groups.push(GroupSpec {
            name: format!("{prefix}{}", c.name),
            file: resolved.clone(),
            parent: group,
            on_failure: nested.on_failure,
        });
        let first = self.changes.len();
        chain.push(resolved);
        let all = self.changeset(
            &nested,
            &format!("{prefix}{}/", c.name),
            Some(g),
            Some(&import),
            chain,
        );
        chain.pop();
        let roots = (first..self.changes.len())
            .filter(|&i| self.changes[i].requires.iter().all(|&r| r < first))
            .collect();
        Unit {
            roots,
            last: all.clone(),
            all,
        }
    }

    fn change(
        &mut self,
        c: &ChangeDef,
        templates: &BTreeMap<&str, &TemplateDef>,
        base: &Scope,
        prefix: &str,
        group: Option<usize>,
    ) -> Unit {
        let origin = format!("{prefix}{}", c.name);
        let mut scope = base.clone();
        scope.owner = origin.clone();
        scope.layer(&c.vars);
        let mut phases = c.phases.clone();
        let mut params = Vec::new();
        if let Some((name, loc)) = &c.use_ {
            match templates.get(name.as_str()) {
                Some(t) => {
                    self.use_template(c, t, &mut scope);
                    phases = c.phases.merged_with(&t.phases);
                    params = t
                        .params
                        .iter()
                        .filter(|p| p.default.is_none())
                        .map(|p| p.name.clone())
                        .collect();
                }
                None => {
                    let hint = suggestion(name, templates.keys().copied());
                    let known = if templates.is_empty() {
                        " (this changeset defines no templates)".to_string()
                    } else {
                        String::new()
                    };
                    self.diags.push(Diagnostic::new(
                        loc.clone(),
                        format!("unknown template `{name}`{hint}{known}"),
                    ));
                }
            }
        }
        scope.layer(&c.with);
        let Some(hosts) = c.hosts.clone() else {
            return Unit::default();
        };
        let make = |name: String, scope: Scope| FlatChange {
            name,
            origin: origin.clone(),
            group,
            requires: Vec::new(),
            hosts: hosts.clone(),
            rollout: c.rollout.clone(),
            on_failure: c.on_failure,
            retry: c.retry,
            approve: c.approve,
            location: c.loc.clone(),
            scope: Arc::new(scope),
            phases: phases.clone(),
            params: params.clone(),
        };
        let Some(items) = &c.foreach else {
            let i = self.changes.len();
            self.changes.push(make(origin.clone(), scope));
            return Unit {
                roots: vec![i],
                last: vec![i],
                all: vec![i],
            };
        };
        let first = self.changes.len();
        for (k, (item, loc)) in items.iter().enumerate() {
            let mut s = scope.clone();
            if let VarValue::Map(entries) = item {
                if entries.iter().any(|(key, _)| key == "item") {
                    // `item` is the whole item; a key of that name would
                    // hide it (or be hidden), so neither wins: refused.
                    self.diags.push(Diagnostic::new(
                        loc.clone(),
                        "a key named `item` collides with `item`, the whole item; rename the key"
                            .to_string(),
                    ));
                }
                for (key, value) in entries {
                    s.defs.insert(
                        key.clone(),
                        Entry {
                            def: Def::Value(value.clone()),
                            loc: loc.clone(),
                        },
                    );
                }
            }
            s.defs.insert(
                "item".into(),
                Entry {
                    def: Def::Value(item.clone()),
                    loc: loc.clone(),
                },
            );
            let mut fc = make(format!("{origin}[{k}]"), s);
            if k > 0 {
                fc.requires.push(first + k - 1);
            }
            self.changes.push(fc);
        }
        let all: Vec<usize> = (first..self.changes.len()).collect();
        Unit {
            roots: all.first().copied().into_iter().collect(),
            last: all.last().copied().into_iter().collect(),
            all,
        }
    }

    /// Applies template `t` to change `c`: phase conflicts, parameters.
    fn use_template(&mut self, c: &ChangeDef, t: &TemplateDef, scope: &mut Scope) {
        let (name, use_loc) = c.use_.as_ref().expect("only called with `use`");
        for phase in c.phases.written() {
            if t.phases.written().contains(&phase) {
                let at = phase_location(&c.phases, phase).unwrap_or_else(|| c.loc.clone());
                let at = Location {
                    path: format!("{}.{phase}", c.path),
                    ..at
                };
                self.diags.push(Diagnostic::new(at, format!(
                    "template `{name}` already defines `{phase}`; a change using a template may only add the phases it lacks"
                )));
            }
        }
        let params: Vec<&str> = t.params.iter().map(|p| p.name.as_str()).collect();
        for w in &c.with {
            if !params.contains(&w.name.as_str()) {
                let hint = suggestion(&w.name, params.iter().copied());
                let list = if params.is_empty() {
                    "none".to_string()
                } else {
                    params.join(", ")
                };
                self.diags.push(Diagnostic::new(
                    w.loc.clone(),
                    format!(
                        "template `{name}` has no parameter `{}`{hint} (its parameters: {list})",
                        w.name
                    ),
                ));
            }
        }
        for p in &t.params {
            match &p.default {
                Some(v) => {
                    scope.defs.insert(
                        p.name.clone(),
                        Entry {
                            def: Def::Value(v.clone()),
                            loc: p.loc.clone(),
                        },
                    );
                }
                None => self.required_param(c, name, use_loc, &p.name),
            }
        }
    }

    fn required_param(&mut self, c: &ChangeDef, template: &str, use_loc: &Location, param: &str) {
        if c.with.iter().any(|w| w.name == param) || self.cli.contains_key(param) {
            return;
        }
        match &c.foreach {
            Some(items) if !items.is_empty() => {
                for (item, loc) in items {
                    if !item.keys().contains(&param) {
                        let typo = match super::diag::did_you_mean(param, item.keys()) {
                            Some(k) => format!("; is `{k}` a typo?"),
                            None => String::new(),
                        };
                        self.diags.push(Diagnostic::new(loc.clone(), format!(
                            "this item does not set `{param}`, a parameter of template `{template}` (change `{}`){typo}", c.name
                        )));
                    }
                }
            }
            _ => self.diags.push(Diagnostic::new(use_loc.clone(), format!(
                "template `{template}` parameter `{param}` is not set: give it in `with`, in every `foreach` item, or with --var {param}=... (change `{}`)",
                c.name
            ))),
        }
    }
}

/// Depth-first search for `requires` cycles (white 0, grey 1, black 2).
struct CycleWalk<'e> {
    edges: &'e [Vec<(usize, &'e Location)>],
    color: Vec<u8>,
    stack: Vec<usize>,
    found: Vec<(Vec<usize>, Location)>,
    seen: BTreeSet<Vec<usize>>,
}

impl CycleWalk<'_> {
    fn visit(&mut self, v: usize) {
        self.color[v] = 1;
        self.stack.push(v);
        for &(w, loc) in &self.edges[v] {
            match self.color[w] {
                0 => self.visit(w),
                1 => {
                    let pos = self.stack.iter().position(|&x| x == w).unwrap_or(0);
                    let mut cycle: Vec<usize> = self.stack[pos..].to_vec();
                    let mut key = cycle.clone();
                    key.sort_unstable();
                    if self.seen.insert(key) {
                        cycle.push(w);
                        self.found.push((cycle, loc.clone()));
                    }
                }
                _ => {}
            }
        }
        self.stack.pop();
        self.color[v] = 2;
    }
}

fn phase_location(p: &Phases, phase: &str) -> Option<Location> {
    let steps = match phase {
        "skip_if" => &p.skip_if,
        "check" => &p.check,
        "apply" => &p.apply,
        "verify" => &p.verify,
        _ => return p.backout.as_ref()?.first().map(|b| b.loc.clone()),
    };
    steps.as_ref()?.first().map(|s| s.loc.clone())
}
