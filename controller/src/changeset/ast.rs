//! What a changeset file says, as parsed and checked field by field, before
//! templates, `foreach` and `include` are expanded. Every piece keeps its
//! [`Location`] so later checks and rendering still point at the file.

use std::collections::BTreeSet;
use std::time::Duration;

use super::selector::Selector;
use crate::spec::{Approve, ChangesetFailure, Location, OnFailure, Retry, Rollout};

/// A minijinja template string written in the file.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Tmpl {
    /// The template text.
    pub src: String,
    /// Where the scalar starts.
    pub loc: Location,
    /// A quoted scalar: its text starts one column after `loc`.
    pub quoted: bool,
    /// Written over several lines (a block scalar): template line n is file
    /// line `loc.line + n - 1`.
    pub multiline: bool,
    /// Variables it reads, with attribute paths (`host.name`, `version`).
    pub names: BTreeSet<String>,
}

impl Tmpl {
    /// The top-level variable names it reads.
    pub fn roots(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|n| n.split('.').next().unwrap_or(n))
    }

    /// Does it use any template syntax at all?
    pub fn is_literal(&self) -> bool {
        !self.src.contains("{{") && !self.src.contains("{%") && !self.src.contains("{#")
    }
}

/// A variable's value as written: strings are templates.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum VarValue {
    /// `~`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A string: a template rendered without shell quoting.
    Str(Tmpl),
    /// A list.
    List(Vec<VarValue>),
    /// A mapping, in file order.
    Map(Vec<(String, VarValue)>),
}

impl VarValue {
    /// Every template inside.
    pub fn templates<'a>(&'a self, out: &mut Vec<&'a Tmpl>) {
        match self {
            VarValue::Str(t) => out.push(t),
            VarValue::List(l) => l.iter().for_each(|v| v.templates(out)),
            VarValue::Map(m) => m.iter().for_each(|(_, v)| v.templates(out)),
            _ => {}
        }
    }

    /// The keys of a mapping value (a `foreach` item), else none.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            VarValue::Map(m) => m.iter().map(|(k, _)| k.as_str()).collect(),
            _ => Vec::new(),
        }
    }
}

/// One variable definition (`vars`, `with`, a template parameter default, a
/// `foreach` item key).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct VarDef {
    /// The variable's name.
    pub name: String,
    /// Its value.
    pub value: VarValue,
    /// Where its key is written.
    pub loc: Location,
}

/// A CEL condition (`expect`, `when`), compiled once to check it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Cond {
    /// The expression.
    pub expr: String,
    /// Where it is written.
    pub loc: Location,
    /// `vars.NAME` fields it reads (checked against the namespace of every
    /// change that uses it).
    pub var_fields: Vec<String>,
}

/// A step as written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StepDef {
    /// What it does.
    pub action: ActionDef,
    /// `timeout`.
    pub timeout: Option<Duration>,
    /// `env`, in file order.
    pub env: Vec<(String, Tmpl)>,
    /// `cwd`.
    pub cwd: Option<Tmpl>,
    /// `user`.
    pub user: Option<Tmpl>,
    /// `stdin`.
    pub stdin: Option<Tmpl>,
    /// `expect`.
    pub expect: Option<Cond>,
    /// Where the step is written.
    pub loc: Location,
}

/// The kinds of step as written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ActionDef {
    /// `run:` (shell-quoted interpolation).
    Run(Tmpl),
    /// `argv:`.
    Argv(Vec<Tmpl>),
    /// `file:`.
    File(Box<FileDef>),
    /// `run:` + `interact:`.
    Interact {
        /// The command.
        run: Tmpl,
        /// The expect/send pairs.
        script: Vec<ExchangeDef>,
    },
}

/// A `file:` step as written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FileDef {
    /// `path`.
    pub path: Tmpl,
    /// `content`.
    pub content: Tmpl,
    /// `mode`, already read as octal.
    pub mode: Option<u32>,
    /// `owner` (a template; checked again once rendered).
    pub owner: Option<Tmpl>,
    /// `validate` (shell-quoted interpolation; `file.tmp` available).
    pub validate: Option<Tmpl>,
}

/// One `interact` pair as written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ExchangeDef {
    /// The regex (checked, not a template).
    pub expect: String,
    /// The text to send (a template, not quoted).
    pub send: Tmpl,
    /// Its timeout.
    pub timeout: Option<Duration>,
}

/// One backout procedure as written.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BackoutDef {
    /// `when`.
    pub when: Option<Cond>,
    /// `check` (pre-backout).
    pub check: Vec<StepDef>,
    /// `steps`.
    pub steps: Vec<StepDef>,
    /// `verify` (post-backout).
    pub verify: Vec<StepDef>,
    /// Where it is written.
    pub loc: Location,
}

/// The phases of a change or template body; `None` = not written.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Phases {
    /// `skip_if`.
    pub skip_if: Option<Vec<StepDef>>,
    /// `check`.
    pub check: Option<Vec<StepDef>>,
    /// `apply`.
    pub apply: Option<Vec<StepDef>>,
    /// `verify`.
    pub verify: Option<Vec<StepDef>>,
    /// `backout`.
    pub backout: Option<Vec<BackoutDef>>,
}

impl Phases {
    /// The names of the phases written.
    pub fn written(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.skip_if.is_some() {
            out.push("skip_if");
        }
        if self.check.is_some() {
            out.push("check");
        }
        if self.apply.is_some() {
            out.push("apply");
        }
        if self.verify.is_some() {
            out.push("verify");
        }
        if self.backout.is_some() {
            out.push("backout");
        }
        out
    }

    /// Each phase's steps, backout procedures' included, for checks.
    pub fn all_steps(&self) -> Vec<&StepDef> {
        let mut out: Vec<&StepDef> = Vec::new();
        for p in [&self.skip_if, &self.check, &self.apply, &self.verify] {
            out.extend(p.iter().flatten());
        }
        for b in self.backout.iter().flatten() {
            out.extend(b.check.iter().chain(&b.steps).chain(&b.verify));
        }
        out
    }

    /// Every condition (`expect` and `when`).
    pub fn all_conds(&self) -> Vec<&Cond> {
        let mut out: Vec<&Cond> = self
            .all_steps()
            .into_iter()
            .filter_map(|s| s.expect.as_ref())
            .collect();
        out.extend(
            self.backout
                .iter()
                .flatten()
                .filter_map(|b| b.when.as_ref()),
        );
        out
    }

    /// `self` with the phases `other` has and `self` lacks.
    pub fn merged_with(&self, other: &Phases) -> Phases {
        Phases {
            skip_if: self.skip_if.clone().or_else(|| other.skip_if.clone()),
            check: self.check.clone().or_else(|| other.check.clone()),
            apply: self.apply.clone().or_else(|| other.apply.clone()),
            verify: self.verify.clone().or_else(|| other.verify.clone()),
            backout: self.backout.clone().or_else(|| other.backout.clone()),
        }
    }
}

/// One entry of `changes:` as written.
#[derive(Clone, Debug)]
pub(crate) struct ChangeDef {
    /// `name`.
    pub name: String,
    /// The field path, `changes[i]`.
    pub path: String,
    /// Where the change's mapping starts.
    pub loc: Location,
    /// `hosts` (absent on an include change).
    pub hosts: Option<Selector>,
    /// `requires`, each with where it is written.
    pub requires: Vec<(String, Location)>,
    /// `rollout`.
    pub rollout: Rollout,
    /// `on_failure`.
    pub on_failure: OnFailure,
    /// `retry`.
    pub retry: Retry,
    /// `approve`.
    pub approve: Approve,
    /// `vars`.
    pub vars: Vec<VarDef>,
    /// The phases written on the change itself.
    pub phases: Phases,
    /// `use`: a template name.
    pub use_: Option<(String, Location)>,
    /// `with`.
    pub with: Vec<VarDef>,
    /// `foreach` items, each with where it is written.
    pub foreach: Option<Vec<(VarValue, Location)>>,
    /// `include`: the path as written.
    pub include: Option<(String, Location)>,
}

/// A template parameter (`vars:` of a template); `None` default = `~`, a
/// parameter the using change must supply.
#[derive(Clone, Debug)]
pub(crate) struct Param {
    /// Its name.
    pub name: String,
    /// Its default.
    pub default: Option<VarValue>,
    /// Where it is written.
    pub loc: Location,
}

/// One entry of `templates:` as written.
#[derive(Clone, Debug)]
pub(crate) struct TemplateDef {
    /// Its name.
    pub name: String,
    /// Its parameters, in file order.
    pub params: Vec<Param>,
    /// Its body.
    pub phases: Phases,
}

/// One changeset file as written.
#[derive(Clone, Debug)]
pub(crate) struct ChangesetDef {
    /// `name`.
    pub name: String,
    /// `description`.
    pub description: String,
    /// `vars`.
    pub vars: Vec<VarDef>,
    /// `secrets`: names that must be given with `--secret`, each where it
    /// is declared.
    pub secrets: Vec<(String, Location)>,
    /// `on_failure`.
    pub on_failure: ChangesetFailure,
    /// `templates`.
    pub templates: Vec<TemplateDef>,
    /// `changes`.
    pub changes: Vec<ChangeDef>,
}
