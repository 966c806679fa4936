//! Reading steps, phases and backout procedures, and the template strings
//! and conditions inside them.

use std::sync::OnceLock;

use regex::Regex;
use saphyr::YamlDataOwned;

use super::ast::{ActionDef, BackoutDef, Cond, ExchangeDef, FileDef, Phases, StepDef, Tmpl};
use super::cond::{self, CondKind};
use super::jinja::{Escape, error_location, jinja, message};
use super::yaml::{Map, Node, Reader, index_path, key_path};

const STEP_KEYS: &[&str] = &[
    "run", "argv", "file", "interact", "timeout", "env", "cwd", "user", "stdin", "expect",
];
const BACKOUT_KEYS: &[&str] = &["when", "check", "steps", "verify"];

/// Environment variable names.
fn env_name_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^[A-Za-z_][A-Za-z0-9_]*$").expect("valid regex"))
}

impl Reader<'_> {
    /// A template string; `lenient` also takes numbers and booleans as text.
    /// Syntax errors and unknown filters are reported here.
    pub fn template(
        &mut self,
        node: &Node,
        path: &str,
        escape: Escape,
        lenient: bool,
    ) -> Option<Tmpl> {
        let src = if lenient {
            self.scalar_text(node, path)?
        } else {
            self.string(node, path)?
        };
        let quoted = self.is_quoted(node);
        let mut t = Tmpl {
            src,
            loc: self.loc(node, path),
            quoted,
            multiline: !quoted && self.raw(node).contains('\n'),
            names: Default::default(),
        };
        if t.is_literal() {
            return Some(t);
        }
        match jinja().analyze(&t.src) {
            Ok(names) => t.names = names,
            Err(e) => {
                self.error_at(error_location(&t, &e), message(&e));
                return None;
            }
        }
        if let Some((loc, msg)) = jinja().trial(&t, escape) {
            self.error_at(loc, msg);
        }
        Some(t)
    }

    /// A CEL condition, compiled and checked.
    pub fn cond(&mut self, node: &Node, path: &str, kind: CondKind) -> Option<Cond> {
        let expr = self.string(node, path)?;
        let loc = self.loc(node, path);
        let quoted = self.is_quoted(node);
        let multiline = !quoted && self.raw(node).contains('\n');
        match cond::check(&expr, kind) {
            Ok(var_fields) => Some(Cond {
                expr,
                loc,
                var_fields,
            }),
            Err(errors) => {
                for ((line, col), msg) in errors {
                    let mut at = loc.clone();
                    if multiline {
                        at.line += line - 1;
                        at.column += col - 1;
                    } else if line == 1 {
                        at.column += u32::from(quoted) + col - 1;
                    }
                    self.error_at(at, msg);
                }
                None
            }
        }
    }

    /// A list of steps (`apply:`, `check:`, a backout's `steps:`, ...).
    pub fn steps(&mut self, node: &Node, path: &str) -> Option<Vec<StepDef>> {
        let items = self.list(node, path)?;
        if items.is_empty() {
            self.error(
                node,
                path,
                "empty list: expected at least one step (or leave the key out)",
            );
        }
        let steps: Vec<StepDef> = items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| self.step(item, &index_path(path, i)))
            .collect();
        Some(steps)
    }

    /// One step.
    pub fn step(&mut self, node: &Node, path: &str) -> Option<StepDef> {
        let m = self.map(node, path, STEP_KEYS)?;
        let kinds: Vec<&str> = ["run", "argv", "file"]
            .into_iter()
            .filter(|k| m.has(k))
            .collect();
        match kinds.as_slice() {
            [] => {
                self.error(node, path, "a step needs one of `run`, `argv` or `file`");
                return None;
            }
            [_] => {}
            [first, rest @ ..] => {
                for k in rest {
                    let kn = m.key_node(k).unwrap_or(node);
                    self.error(kn, &key_path(path, k), format!(
                        "a step has exactly one of `run`, `argv` or `file`; this one already has `{first}`"
                    ));
                }
                return None;
            }
        }
        let kind = kinds[0];
        if let Some(kn) = m.key_node("interact")
            && kind != "run"
        {
            self.error(
                kn,
                &key_path(path, "interact"),
                format!("`interact` goes with `run`, not `{kind}`"),
            );
        }
        if let Some(kn) = m.key_node("stdin")
            && m.has("interact")
        {
            self.error(
                kn,
                &key_path(path, "stdin"),
                "`stdin` cannot be used with `interact`: the program's input is the `send` texts",
            );
        }
        if kind == "file" {
            for k in ["stdin", "env", "cwd"] {
                if let Some(kn) = m.key_node(k) {
                    self.error(
                        kn,
                        &key_path(path, k),
                        format!("`{k}` is not used by a `file` step"),
                    );
                }
            }
        }
        let action = match kind {
            "run" => {
                let run =
                    self.template(m.get("run")?, &key_path(path, "run"), Escape::Shell, false);
                match m.get("interact") {
                    Some(n) => ActionDef::Interact {
                        run: run?,
                        script: self.interact(n, &key_path(path, "interact"))?,
                    },
                    None => ActionDef::Run(run?),
                }
            }
            "argv" => ActionDef::Argv(self.argv(m.get("argv")?, &key_path(path, "argv"))?),
            _ => ActionDef::File(Box::new(
                self.file(m.get("file")?, &key_path(path, "file"))?,
            )),
        };
        Some(StepDef {
            action,
            timeout: self.positive_duration(&m, path, "timeout"),
            env: self.env(&m, path),
            cwd: self.opt_template(&m, path, "cwd"),
            user: self.opt_template(&m, path, "user"),
            stdin: self.opt_template(&m, path, "stdin"),
            expect: m
                .get("expect")
                .and_then(|n| self.cond(n, &key_path(path, "expect"), CondKind::Expect)),
            loc: self.loc(node, path),
        })
    }

    fn positive_duration(
        &mut self,
        m: &Map<'_>,
        path: &str,
        key: &str,
    ) -> Option<std::time::Duration> {
        let n = m.get(key)?;
        let p = key_path(path, key);
        let d = self.duration(n, &p)?;
        if d.is_zero() {
            self.error(n, &p, "a timeout must be longer than 0s");
            return None;
        }
        Some(d)
    }

    fn opt_template(&mut self, m: &Map<'_>, path: &str, key: &str) -> Option<Tmpl> {
        self.template(m.get(key)?, &key_path(path, key), Escape::Raw, false)
    }

    fn env(&mut self, m: &Map<'_>, path: &str) -> Vec<(String, Tmpl)> {
        let Some(n) = m.get("env") else {
            return Vec::new();
        };
        let p = key_path(path, "env");
        let Some(env) = self.any_map(n, &p) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, kn, v) in env.entries {
            let vp = key_path(&p, &k);
            if !env_name_re().is_match(&k) {
                self.error(
                    kn,
                    &vp,
                    format!(
                        "bad environment variable name `{k}`: expected letters, digits and `_`"
                    ),
                );
                continue;
            }
            if let Some(t) = self.template(v, &vp, Escape::Raw, true) {
                out.push((k, t));
            }
        }
        out
    }

    fn argv(&mut self, node: &Node, path: &str) -> Option<Vec<Tmpl>> {
        let items = self.list(node, path)?;
        if items.is_empty() {
            self.error(
                node,
                path,
                "expected the program and its arguments, found an empty list",
            );
            return None;
        }
        let out: Vec<Tmpl> = items
            .iter()
            .enumerate()
            .filter_map(|(i, n)| self.template(n, &index_path(path, i), Escape::Raw, true))
            .collect();
        (out.len() == items.len()).then_some(out)
    }

    fn file(&mut self, node: &Node, path: &str) -> Option<FileDef> {
        let m = self.map(
            node,
            path,
            &["path", "content", "mode", "owner", "validate"],
        )?;
        let required = |this: &mut Self, key: &str| {
            let got = m.get(key);
            if got.is_none() {
                this.error(
                    node,
                    &key_path(path, key),
                    format!("a `file` step needs `{key}`"),
                );
            }
            got
        };
        let path_node = required(self, "path");
        let content_node = required(self, "content");
        let file_path = self.template(path_node?, &key_path(path, "path"), Escape::Raw, false);
        if let Some(t) = &file_path
            && t.src.trim().is_empty()
        {
            self.error(
                path_node?,
                &key_path(path, "path"),
                "expected a file path, found an empty string",
            );
        }
        let content = self.template(content_node?, &key_path(path, "content"), Escape::Raw, true);
        let mode = m
            .get("mode")
            .and_then(|n| self.mode(n, &key_path(path, "mode")));
        let owner = m
            .get("owner")
            .and_then(|n| self.owner(n, &key_path(path, "owner")));
        let validate = m
            .get("validate")
            .map(|n| self.template(n, &key_path(path, "validate"), Escape::Shell, false));
        Some(FileDef {
            path: file_path?,
            content: content?,
            mode,
            owner,
            validate: validate.flatten(),
        })
    }

    fn interact(&mut self, node: &Node, path: &str) -> Option<Vec<ExchangeDef>> {
        let items = self.list(node, path)?;
        if items.is_empty() {
            self.error(node, path, "expected at least one `{expect, send}` pair");
        }
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = index_path(path, i);
            let Some(m) = self.map(item, &p, &["expect", "send", "timeout"]) else {
                continue;
            };
            let expect = match m.get("expect") {
                Some(n) => self.regex(n, &key_path(&p, "expect")),
                None => {
                    self.error(
                        item,
                        &key_path(&p, "expect"),
                        "missing `expect`: the regex to wait for",
                    );
                    None
                }
            };
            let send = match m.get("send") {
                Some(n) => self.template(n, &key_path(&p, "send"), Escape::Raw, true),
                None => {
                    self.error(
                        item,
                        &key_path(&p, "send"),
                        "missing `send`: the text to answer with (add \\n yourself)",
                    );
                    None
                }
            };
            let timeout = self.positive_duration(&m, &p, "timeout");
            if let (Some(expect), Some(send)) = (expect, send) {
                out.push(ExchangeDef {
                    expect,
                    send,
                    timeout,
                });
            }
        }
        (out.len() == items.len()).then_some(out)
    }

    fn regex(&mut self, node: &Node, path: &str) -> Option<String> {
        let s = self.string(node, path)?;
        match Regex::new(&s) {
            Ok(_) => Some(s),
            Err(e) => {
                let detail = e
                    .to_string()
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                self.error(node, path, format!("bad regex `{s}`: {detail}"));
                None
            }
        }
    }

    /// `backout:`: one procedure (a mapping), a list of procedures, or (a
    /// shorthand for one procedure) a list of steps.
    pub fn backout(&mut self, node: &Node, path: &str) -> Option<Vec<BackoutDef>> {
        if let YamlDataOwned::Mapping(_) = node.data {
            return Some(vec![self.procedure(node, path)?]);
        }
        let items = self.list(node, path)?;
        if items.is_empty() {
            self.error(
                node,
                path,
                "empty backout: expected steps or procedures (or leave `backout` out)",
            );
            return None;
        }
        let is_procedure = |n: &Node| match &n.data {
            YamlDataOwned::Mapping(m) => m
                .keys()
                .any(|k| k.data.as_str().is_some_and(|k| BACKOUT_KEYS.contains(&k))),
            _ => false,
        };
        if !items.iter().any(is_procedure) {
            let steps = self.steps(node, path)?;
            return Some(vec![BackoutDef {
                when: None,
                check: Vec::new(),
                steps,
                verify: Vec::new(),
                loc: self.loc(node, path),
            }]);
        }
        let mut out: Vec<BackoutDef> = Vec::new();
        let mut catch_all: Option<usize> = None;
        for (i, item) in items.iter().enumerate() {
            let p = index_path(path, i);
            if !is_procedure(item) && matches!(item.data, YamlDataOwned::Mapping(_)) {
                self.error(item, &p, "expected a backout procedure (`when`, `check`, `steps`, `verify`); a list mixes procedures and steps");
                continue;
            }
            if let Some(j) = catch_all {
                self.error(item, &p, format!(
                    "unreachable: the procedure at {path}[{j}] has no `when`, so it always matches first"
                ));
            }
            if let Some(b) = self.procedure(item, &p) {
                if b.when.is_none() && catch_all.is_none() {
                    catch_all = Some(i);
                }
                out.push(b);
            }
        }
        Some(out)
    }

    fn procedure(&mut self, node: &Node, path: &str) -> Option<BackoutDef> {
        let m = self.map(node, path, BACKOUT_KEYS)?;
        let phase = |this: &mut Self, key: &str| {
            m.get(key)
                .and_then(|n| this.steps(n, &key_path(path, key)))
                .unwrap_or_default()
        };
        let check = phase(self, "check");
        let steps = phase(self, "steps");
        let verify = phase(self, "verify");
        let when = m
            .get("when")
            .and_then(|n| self.cond(n, &key_path(path, "when"), CondKind::When));
        Some(BackoutDef {
            when,
            check,
            steps,
            verify,
            loc: self.loc(node, path),
        })
    }

    /// The phases of a change or template body.
    pub fn phases(&mut self, m: &Map<'_>, path: &str) -> Phases {
        // A phase that is written but unreadable still counts as written, so
        // one mistake does not cascade into "no `apply`".
        let steps = |this: &mut Self, key: &str| {
            m.get(key)
                .map(|n| this.steps(n, &key_path(path, key)).unwrap_or_default())
        };
        Phases {
            skip_if: steps(self, "skip_if"),
            check: steps(self, "check"),
            apply: steps(self, "apply"),
            verify: steps(self, "verify"),
            backout: m.get("backout").map(|n| {
                self.backout(n, &key_path(path, "backout"))
                    .unwrap_or_default()
            }),
        }
    }
}
