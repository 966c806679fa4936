//! Checks that need the whole flattened changeset: every variable a
//! template or condition reads is defined for every change that uses it,
//! and variables do not refer to each other in a cycle.
//!
//! `host.*` is known only at render time, so here `host.name`,
//! `host.labels` and `host.facts` are defined-but-opaque; a missing label
//! key is caught by `render`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::ast::{ActionDef, StepDef, Tmpl};
use super::diag::{Diagnostic, suggestion};
use super::flatten::{Def, FlatChange, Scope};

const HOST_FIELDS: &[&str] = &["name", "labels", "facts"];
const FILE_FIELDS: &[&str] = &["tmp", "path"];

/// Names defined outside the changeset.
pub(crate) struct Outside<'a> {
    /// `--var` names.
    pub cli: &'a BTreeMap<String, String>,
    /// Inventory var names known at validate time (may be empty).
    pub inventory: &'a serde_json::Map<String, serde_json::Value>,
}

impl Outside<'_> {
    /// Every name a template in `scope` can read (besides `host`).
    fn names<'s>(&'s self, scope: &'s Scope) -> BTreeSet<&'s str> {
        scope
            .defs
            .keys()
            .map(String::as_str)
            .chain(self.cli.keys().map(String::as_str))
            .chain(self.inventory.keys().map(String::as_str))
            .collect()
    }
}

/// Runs every check over `changes`.
pub(crate) fn check_changes(changes: &[FlatChange], outside: &Outside<'_>) -> Vec<Diagnostic> {
    let mut c = Checker {
        outside,
        diags: Vec::new(),
        scopes_done: BTreeSet::new(),
    };
    for fc in changes {
        c.scope(&fc.scope);
        let mut names = outside.names(&fc.scope);
        names.extend(fc.params.iter().map(String::as_str));
        for step in fc.phases.all_steps() {
            c.step(step, &names, &fc.origin);
        }
        for cond in fc.phases.all_conds() {
            for field in &cond.var_fields {
                if !names.contains(field.as_str()) {
                    let hint = suggestion(field, names.iter().copied());
                    c.diags.push(Diagnostic::new(
                        cond.loc.clone(),
                        format!(
                            "`vars.{field}` is not defined{hint} (change `{}`)",
                            fc.origin
                        ),
                    ));
                }
            }
        }
    }
    c.diags
}

struct Checker<'a> {
    outside: &'a Outside<'a>,
    diags: Vec<Diagnostic>,
    /// Scopes already checked (by address; foreach items share parents).
    scopes_done: BTreeSet<usize>,
}

impl Checker<'_> {
    fn tmpl(&mut self, t: &Tmpl, names: &BTreeSet<&str>, with_file: bool, owner: &str) {
        let mut reported = BTreeSet::new();
        for full in &t.names {
            let mut parts = full.split('.');
            let root = parts.next().unwrap_or_default();
            let field = parts.next();
            let (known_fields, is_special) = match root {
                "host" => (HOST_FIELDS, true),
                "file" if with_file => (FILE_FIELDS, true),
                _ => (&[][..], false),
            };
            if is_special {
                if let Some(f) = field
                    && !known_fields.contains(&f)
                    && reported.insert(full.clone())
                {
                    let hint = suggestion(f, known_fields.iter().copied());
                    self.diags.push(Diagnostic::new(
                        t.loc.clone(),
                        format!(
                            "`{root}` has no attribute `{f}`{hint} (it has: {})",
                            known_fields.join(", ")
                        ),
                    ));
                }
                continue;
            }
            if names.contains(root) || !reported.insert(root.to_string()) {
                continue;
            }
            let hint = suggestion(root, names.iter().copied().chain(["host"]));
            let msg = if hint.is_empty() {
                format!(
                    "undefined variable `{root}`: not set in `vars`, `with`, a `foreach` item, the inventory, --var or --secret (change `{owner}`)"
                )
            } else {
                format!("undefined variable `{root}`{hint} (change `{owner}`)")
            };
            self.diags.push(Diagnostic::new(t.loc.clone(), msg));
        }
    }

    fn step(&mut self, s: &StepDef, names: &BTreeSet<&str>, owner: &str) {
        let mut plain: Vec<&Tmpl> = Vec::new();
        match &s.action {
            ActionDef::Run(t) => plain.push(t),
            ActionDef::Argv(a) => plain.extend(a),
            ActionDef::File(f) => {
                plain.push(&f.path);
                plain.push(&f.content);
                plain.extend(&f.owner);
                if let Some(v) = &f.validate {
                    self.tmpl(v, names, true, owner);
                }
            }
            ActionDef::Interact { run, script } => {
                plain.push(run);
                plain.extend(script.iter().map(|x| &x.send));
            }
        }
        plain.extend(s.env.iter().map(|(_, t)| t));
        plain.extend(s.cwd.iter().chain(&s.user).chain(&s.stdin));
        for t in plain {
            self.tmpl(t, names, false, owner);
        }
    }

    /// Checks a scope's variable values (and those it imports), and that they
    /// do not refer to each other in a cycle.
    fn scope(&mut self, scope: &Arc<Scope>) {
        if !self.scopes_done.insert(Arc::as_ptr(scope) as usize) {
            return;
        }
        let names = self.outside.names(scope);
        let mut deps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (key, entry) in &scope.defs {
            if self.outside.cli.contains_key(key) {
                continue;
            }
            match &entry.def {
                Def::Import(parent, _) => self.scope(parent),
                Def::Value(v) => {
                    let mut ts = Vec::new();
                    v.templates(&mut ts);
                    let mut d = Vec::new();
                    for t in ts {
                        self.tmpl(t, &names, false, &scope.owner);
                        d.extend(t.roots().filter(|r| {
                            scope.defs.contains_key(*r) && !self.outside.cli.contains_key(*r)
                        }));
                    }
                    d.sort_unstable();
                    d.dedup();
                    deps.insert(key.as_str(), d);
                }
            }
        }
        self.var_cycles(scope, &deps);
    }

    fn var_cycles(&mut self, scope: &Scope, deps: &BTreeMap<&str, Vec<&str>>) {
        let mut color: BTreeMap<&str, u8> = BTreeMap::new();
        let mut seen: BTreeSet<Vec<&str>> = BTreeSet::new();
        fn visit<'k>(
            v: &'k str,
            deps: &BTreeMap<&'k str, Vec<&'k str>>,
            color: &mut BTreeMap<&'k str, u8>,
            stack: &mut Vec<&'k str>,
            found: &mut Vec<Vec<&'k str>>,
            seen: &mut BTreeSet<Vec<&'k str>>,
        ) {
            color.insert(v, 1);
            stack.push(v);
            for &w in deps.get(v).into_iter().flatten() {
                match color.get(w).copied().unwrap_or(0) {
                    0 => visit(w, deps, color, stack, found, seen),
                    1 => {
                        let pos = stack.iter().position(|x| *x == w).unwrap_or(0);
                        let mut cycle = stack[pos..].to_vec();
                        let mut key = cycle.clone();
                        key.sort_unstable();
                        if seen.insert(key) {
                            cycle.push(w);
                            found.push(cycle);
                        }
                    }
                    _ => {}
                }
            }
            stack.pop();
            color.insert(v, 2);
        }
        let mut found = Vec::new();
        for &v in deps.keys() {
            if color.get(v).copied().unwrap_or(0) == 0 {
                visit(v, deps, &mut color, &mut Vec::new(), &mut found, &mut seen);
            }
        }
        for cycle in found {
            let last = cycle[cycle.len() - 2];
            let loc = scope.defs[last].loc.clone();
            let msg = if cycle.len() == 2 {
                format!(
                    "variable `{last}` refers to itself (change `{}`)",
                    scope.owner
                )
            } else {
                format!(
                    "variables refer to each other in a cycle: {} (change `{}`)",
                    cycle.join(" -> "),
                    scope.owner
                )
            };
            self.diags.push(Diagnostic::new(loc, msg));
        }
    }
}
