//! One changeset file → [`ChangesetDef`]: every key and type checked, every
//! template compiled, every condition compiled, with all problems reported.
//! Cross-file and cross-change checks (templates used, `requires`,
//! `include`) come later, in `flatten` and `check`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use regex::Regex;
use saphyr::{ScalarOwned, YamlDataOwned};

use super::ast::{ChangeDef, ChangesetDef, Param, TemplateDef, VarDef, VarValue};
use super::diag::Diagnostic;
use super::jinja::Escape;
use super::selector::Selector;
use super::yaml::{self, Map, Node, Reader, index_path, key_path};
use crate::spec::{Approve, ChangesetFailure, Location, OnFailure, Retry, Rollout};

const CHANGESET_KEYS: &[&str] = &[
    "name",
    "description",
    "vars",
    "secrets",
    "on_failure",
    "templates",
    "changes",
];
const CHANGE_KEYS: &[&str] = &[
    "name",
    "description",
    "hosts",
    "requires",
    "rollout",
    "on_failure",
    "retry",
    "approve",
    "vars",
    "skip_if",
    "check",
    "apply",
    "verify",
    "backout",
    "use",
    "with",
    "foreach",
    "include",
];
const TEMPLATE_KEYS: &[&str] = &[
    "description",
    "vars",
    "skip_if",
    "check",
    "apply",
    "verify",
    "backout",
];
/// Keys an `include` change may not have: the included changeset decides.
const NOT_ON_INCLUDE: &[&str] = &[
    "hosts",
    "rollout",
    "on_failure",
    "retry",
    "approve",
    "skip_if",
    "check",
    "apply",
    "verify",
    "backout",
    "use",
    "foreach",
];
/// Names the namespace reserves.
const RESERVED: &[&str] = &["host"];

fn name_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$").expect("valid regex"))
}

fn ident_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*$").expect("valid regex"))
}

/// Parses one file. Returns what could be read (even with errors, so later
/// files and checks can still run) and the problems found.
pub(crate) fn parse_file(file: &str, text: &str) -> (Option<ChangesetDef>, Vec<Diagnostic>) {
    let top = match yaml::load(file, text) {
        Ok(Some(top)) => top,
        Ok(None) => {
            let loc = Location {
                file: file.to_string(),
                line: 1,
                column: 1,
                path: String::new(),
            };
            let msg = "empty file: expected a changeset (a mapping with `name` and `changes`)";
            return (None, vec![Diagnostic::new(loc, msg)]);
        }
        Err(d) => return (None, vec![d]),
    };
    let mut r = Reader::new(file, text);
    let def = r.changeset(&top);
    (def, r.diags)
}

impl Reader<'_> {
    fn changeset(&mut self, top: &Node) -> Option<ChangesetDef> {
        let m = self.map(top, "", CHANGESET_KEYS)?;
        let name = self.required_name(&m, "", "changeset");
        let description = self.opt_string(&m, "", "description");
        let vars = m
            .get("vars")
            .map(|n| self.vars(n, "vars"))
            .unwrap_or_default();
        let secrets = m
            .get("secrets")
            .map(|n| self.secrets(n, &vars))
            .unwrap_or_default();
        let on_failure = m
            .get("on_failure")
            .and_then(|n| self.changeset_failure(n, "on_failure"))
            .unwrap_or(ChangesetFailure::Halt);
        let templates = m
            .get("templates")
            .map(|n| self.templates(n))
            .unwrap_or_default();
        let mut changes = Vec::new();
        match m.get("changes") {
            None => self.error(
                top,
                "changes",
                "missing `changes`: a changeset needs at least one change",
            ),
            Some(n) => {
                if let Some(items) = self.list(n, "changes") {
                    if items.is_empty() {
                        self.error(
                            n,
                            "changes",
                            "expected at least one change, found an empty list",
                        );
                    }
                    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
                    for (i, item) in items.iter().enumerate() {
                        let Some(c) = self.change(item, &index_path("changes", i)) else {
                            continue;
                        };
                        if let Some(line) = seen.get(&c.name) {
                            let p = key_path(&c.path, "name");
                            let loc = Location {
                                path: p,
                                ..c.loc.clone()
                            };
                            self.error_at(
                                loc,
                                format!(
                                    "duplicate change name `{}` (first defined on line {line})",
                                    c.name
                                ),
                            );
                        } else {
                            seen.insert(c.name.clone(), c.loc.line);
                        }
                        changes.push(c);
                    }
                }
            }
        }
        Some(ChangesetDef {
            name: name?,
            description,
            vars,
            secrets,
            on_failure,
            templates,
            changes,
        })
    }

    /// `secrets: [NAME, ...]`: variable names, each once, none also given a
    /// value in the file's `vars` (a secret's value only ever comes from
    /// `--secret`).
    fn secrets(&mut self, node: &Node, vars: &[VarDef]) -> Vec<(String, Location)> {
        let mut out: Vec<(String, Location)> = Vec::new();
        for (name, n, p) in self.names(node, "secrets") {
            if !self.var_name(n, &p, &name) {
                continue;
            }
            if let Some((_, first)) = out.iter().find(|(s, _)| *s == name) {
                let line = first.line;
                self.error(
                    n,
                    &p,
                    format!("secret `{name}` is declared twice (first on line {line})"),
                );
                continue;
            }
            if let Some(v) = vars.iter().find(|v| v.name == name) {
                let line = v.loc.line;
                self.error(
                    n,
                    &p,
                    format!(
                        "`{name}` is a secret and also a variable in `vars` (line {line}): a secret's value comes only from --secret"
                    ),
                );
                continue;
            }
            out.push((name, self.loc(n, &p)));
        }
        out
    }

    fn required_name(&mut self, m: &Map<'_>, path: &str, what: &str) -> Option<String> {
        let p = key_path(path, "name");
        let Some(n) = m.get("name") else {
            self.error(
                m.node,
                &p,
                format!("missing `name`: every {what} needs one"),
            );
            return None;
        };
        let name = self.string(n, &p)?;
        self.check_name(n, &p, &name).then_some(name)
    }

    fn check_name(&mut self, node: &Node, path: &str, name: &str) -> bool {
        if name_re().is_match(name) {
            return true;
        }
        self.error(node, path, format!(
            "bad name `{name}`: expected letters, digits, `_`, `.` and `-` (no spaces, `/` or brackets)"
        ));
        false
    }

    fn opt_string(&mut self, m: &Map<'_>, path: &str, key: &str) -> String {
        m.get(key)
            .and_then(|n| self.string(n, &key_path(path, key)))
            .unwrap_or_default()
    }

    /// A value under `vars`, `with` or a `foreach` item: strings are
    /// templates.
    fn var_value(&mut self, node: &Node, path: &str) -> Option<VarValue> {
        Some(match &node.data {
            YamlDataOwned::Value(ScalarOwned::Null) => VarValue::Null,
            YamlDataOwned::Value(ScalarOwned::Boolean(b)) => VarValue::Bool(*b),
            YamlDataOwned::Value(ScalarOwned::Integer(i)) => VarValue::Int(*i),
            YamlDataOwned::Value(ScalarOwned::FloatingPoint(f)) => VarValue::Float(f.into_inner()),
            YamlDataOwned::Value(ScalarOwned::String(_)) => {
                VarValue::Str(self.template(node, path, Escape::Raw, false)?)
            }
            YamlDataOwned::Sequence(items) => VarValue::List(
                items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| self.var_value(n, &index_path(path, i)))
                    .collect(),
            ),
            YamlDataOwned::Mapping(_) => {
                let m = self.any_map(node, path)?;
                VarValue::Map(
                    m.entries
                        .into_iter()
                        .filter_map(|(k, _, v)| {
                            let value = self.var_value(v, &key_path(path, &k))?;
                            Some((k, value))
                        })
                        .collect(),
                )
            }
            _ => {
                let found = Self::describe(node);
                self.error(node, path, format!("expected a value, found {found}"));
                return None;
            }
        })
    }

    /// A variable name: usable in templates as `{{ name }}`.
    fn var_name(&mut self, key_node: &Node, path: &str, name: &str) -> bool {
        if RESERVED.contains(&name) {
            self.error(
                key_node,
                path,
                format!("`{name}` is reserved: templates see the host as `host`"),
            );
            return false;
        }
        if !ident_re().is_match(name) {
            self.error(key_node, path, format!(
                "bad variable name `{name}`: expected letters, digits and `_`, not starting with a digit"
            ));
            return false;
        }
        true
    }

    /// `vars:` / `with:`.
    fn vars(&mut self, node: &Node, path: &str) -> Vec<VarDef> {
        let Some(m) = self.any_map(node, path) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, kn, v) in m.entries {
            let p = key_path(path, &k);
            if !self.var_name(kn, &p, &k) {
                continue;
            }
            if let Some(value) = self.var_value(v, &p) {
                out.push(VarDef {
                    name: k,
                    value,
                    loc: self.loc(kn, &p),
                });
            }
        }
        out
    }

    fn templates(&mut self, node: &Node) -> Vec<TemplateDef> {
        let Some(m) = self.any_map(node, "templates") else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (name, kn, body) in m.entries {
            let path = key_path("templates", &name);
            if !self.check_name(kn, &path, &name) {
                continue;
            }
            let Some(b) = self.map(body, &path, TEMPLATE_KEYS) else {
                continue;
            };
            let mut params = Vec::new();
            if let Some(vn) = b.get("vars") {
                let vp = key_path(&path, "vars");
                if let Some(vm) = self.any_map(vn, &vp) {
                    for (k, pk, v) in vm.entries {
                        let p = key_path(&vp, &k);
                        if !self.var_name(pk, &p, &k) {
                            continue;
                        }
                        let default = if yaml::is_null(v) {
                            None
                        } else {
                            self.var_value(v, &p)
                        };
                        params.push(Param {
                            name: k,
                            default,
                            loc: self.loc(pk, &p),
                        });
                    }
                }
            }
            let phases = self.phases(&b, &path);
            if phases.apply.is_none() {
                self.error(
                    body,
                    &key_path(&path, "apply"),
                    "a template needs `apply`: the change itself",
                );
            }
            let _ = self.opt_string(&b, &path, "description");
            out.push(TemplateDef {
                name,
                params,
                phases,
            });
        }
        out
    }

    fn change(&mut self, node: &Node, path: &str) -> Option<ChangeDef> {
        let m = self.map(node, path, CHANGE_KEYS)?;
        let name = self.required_name(&m, path, "change");
        let _ = self.opt_string(&m, path, "description");
        let include = m.get("include").and_then(|n| {
            let p = key_path(path, "include");
            let s = self.string(n, &p)?;
            if s.trim().is_empty() {
                self.error(
                    n,
                    &p,
                    "expected a changeset file path, found an empty string",
                );
                return None;
            }
            Some((s, self.loc(n, &p)))
        });
        if m.has("include") {
            for key in NOT_ON_INCLUDE {
                if let Some(kn) = m.key_node(key) {
                    self.error(kn, &key_path(path, key), format!(
                        "`{key}` is not allowed on an `include` change: the included changeset says how its changes run"
                    ));
                }
            }
        }
        let hosts = match m.get("hosts") {
            Some(n) => self.hosts(n, &key_path(path, "hosts")),
            None => {
                if !m.has("include") {
                    self.error(node, &key_path(path, "hosts"), "missing `hosts`: say which hosts this change runs on (`all`, host names or a label selector like role=web); there is no default");
                }
                None
            }
        };
        let requires = match m.get("requires") {
            Some(n) => {
                let p = key_path(path, "requires");
                self.names(n, &p)
                    .into_iter()
                    .map(|(s, n, p)| (s, self.loc(n, &p)))
                    .collect()
            }
            None => Vec::new(),
        };
        let on_failure = m
            .get("on_failure")
            .and_then(|n| self.on_failure(n, &key_path(path, "on_failure")))
            .unwrap_or(OnFailure::Halt);
        let rollout = m
            .get("rollout")
            .map(|n| self.rollout(n, &key_path(path, "rollout")))
            .unwrap_or_else(Rollout::default);
        if rollout.max_failures.is_some() && on_failure != OnFailure::Continue {
            let n = m.get("rollout").expect("rollout was read");
            let at = self
                .any_map(n, "")
                .and_then(|rm| rm.key_node("max_failures"))
                .unwrap_or(n);
            self.error(
                at,
                &key_path(path, "rollout.max_failures"),
                "`max_failures` only applies with `on_failure: continue`",
            );
        }
        let use_ = m.get("use").and_then(|n| {
            let p = key_path(path, "use");
            Some((self.string(n, &p)?, self.loc(n, &p)))
        });
        let with = m
            .get("with")
            .map(|n| self.vars(n, &key_path(path, "with")))
            .unwrap_or_default();
        if let Some(kn) = m.key_node("with")
            && !m.has("use")
            && !m.has("include")
        {
            self.error(
                kn,
                &key_path(path, "with"),
                "`with` sets a template's parameters: it needs `use` (or `include`)",
            );
        }
        let foreach = m
            .get("foreach")
            .map(|n| self.foreach(n, &key_path(path, "foreach")));
        let phases = self.phases(&m, path);
        if phases.apply.is_none() && !m.has("use") && !m.has("include") {
            self.error(
                node,
                &key_path(path, "apply"),
                "a change needs `apply` (or `use` a template, or `include` a changeset)",
            );
        }
        Some(ChangeDef {
            name: name?,
            path: path.to_string(),
            loc: self.loc(node, path),
            hosts,
            requires,
            rollout,
            on_failure,
            retry: m
                .get("retry")
                .map(|n| self.retry(n, &key_path(path, "retry")))
                .unwrap_or_else(Retry::default),
            approve: m
                .get("approve")
                .map(|n| self.approve(n, &key_path(path, "approve")))
                .unwrap_or_else(Approve::default),
            vars: m
                .get("vars")
                .map(|n| self.vars(n, &key_path(path, "vars")))
                .unwrap_or_default(),
            phases,
            use_,
            with,
            foreach,
            include,
        })
    }

    fn hosts(&mut self, node: &Node, path: &str) -> Option<Selector> {
        let parsed = match &node.data {
            YamlDataOwned::Sequence(items) => {
                let names: Vec<String> = items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, n)| self.scalar_text(n, &index_path(path, i)))
                    .collect();
                if names.len() != items.len() {
                    return None;
                }
                Selector::names(names)
            }
            YamlDataOwned::Value(ScalarOwned::String(s)) => Selector::parse(s),
            _ => {
                let found = Self::describe(node);
                self.error(node, path, format!("expected a selector (`all`, `role=web`, ...) or a list of host names, found {found}"));
                return None;
            }
        };
        parsed
            .map_err(|e| self.error(node, path, format!("bad selector: {e}")))
            .ok()
    }

    fn foreach(&mut self, node: &Node, path: &str) -> Vec<(VarValue, Location)> {
        let Some(items) = self.list(node, path) else {
            return Vec::new();
        };
        if items.is_empty() {
            self.error(
                node,
                path,
                "expected at least one item, found an empty list",
            );
        }
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = index_path(path, i);
            if let YamlDataOwned::Mapping(_) = item.data
                && let Some(m) = self.any_map(item, &p)
            {
                for (k, kn, _) in &m.entries {
                    self.var_name(kn, &key_path(&p, k), k);
                }
            }
            if let Some(v) = self.var_value(item, &p) {
                out.push((v, self.loc(item, &p)));
            }
        }
        out
    }
}
