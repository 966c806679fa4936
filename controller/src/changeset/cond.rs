//! Conditions in CEL: `expect` on a step and `when` on a backout procedure.
//!
//! At validate time every condition is compiled and its names are checked
//! (variables, `host.*` and `failure.*` fields, function names), so a typo
//! is an error before any host is touched. At run time [`CelJudge`] is the
//! engine's [`Judge`].
//!
//! The environment is CEL's standard library plus the strings extension
//! (`trim`, `lowerAscii`, `split`, `replace`, `indexOf`, ...); the standard
//! library already has `contains`, `startsWith`, `endsWith`, `matches` and
//! `size`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::{Context, ExecutionError, Program, Value};

use super::diag::suggestion;
use crate::rollout::{Failure, Judge, StepResult, Termination};
use crate::spec::{Condition, HostPlan, Step};

/// The shared CEL environment.
pub(crate) fn env() -> &'static Arc<cel::Env> {
    static ENV: OnceLock<Arc<cel::Env>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = cel::Env::stdlib();
        env.add_extension(cel::extensions::strings)
            .expect("the strings extension registers once");
        Arc::new(env)
    })
}

/// Which kind of condition, and so which variables it sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CondKind {
    /// A step's `expect`.
    Expect,
    /// A backout's `when`.
    When,
}

impl CondKind {
    fn variables(self) -> &'static [&'static str] {
        match self {
            CondKind::Expect => &[
                "exit_code",
                "stdout",
                "stderr",
                "duration_ms",
                "vars",
                "host",
            ],
            CondKind::When => &["failure", "vars", "host"],
        }
    }
}

const HOST_FIELDS: &[&str] = &["name", "labels", "facts"];
const FAILURE_FIELDS: &[&str] = &[
    "phase",
    "step",
    "reason",
    "exit_code",
    "stdout",
    "stderr",
    "message",
];
/// Identifiers CEL itself gives meaning to (type names, namespaces).
const BUILTIN_IDENTS: &[&str] = &[
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
    "dyn",
    "duration",
    "timestamp",
    "strings",
    "base64",
    "math",
    "optional",
];

/// A problem in a condition, at (line, column) inside the expression (both
/// 1-based).
pub(crate) type CondError = ((u32, u32), String);

#[derive(Default)]
struct Walk {
    idents: Vec<(String, u64)>,
    selects: Vec<(String, String, u64)>,
    calls: Vec<(String, bool, u64)>,
    bound: BTreeSet<String>,
}

fn walk(e: &IdedExpr, w: &mut Walk) {
    match &e.expr {
        Expr::Ident(name) => w.idents.push((name.clone(), e.id)),
        Expr::Select(s) => {
            if let Expr::Ident(root) = &s.operand.expr
                && !s.test
            {
                w.selects.push((root.clone(), s.field.clone(), e.id));
            }
            walk(&s.operand, w);
        }
        Expr::Call(c) => {
            let namespaced = matches!(&c.target, Some(t) if matches!(&t.expr, Expr::Ident(n) if BUILTIN_IDENTS.contains(&n.as_str())));
            if !namespaced {
                w.calls
                    .push((c.func_name.clone(), c.target.is_some(), e.id));
            }
            if let Some(t) = &c.target {
                walk(t, w);
            }
            c.args.iter().for_each(|a| walk(a, w));
        }
        Expr::Comprehension(c) => {
            w.bound.insert(c.iter_var.clone());
            w.bound.extend(c.iter_var2.clone());
            w.bound.insert(c.accu_var.clone());
            for x in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                walk(x, w);
            }
        }
        Expr::List(l) => l.elements.iter().for_each(|x| walk(x, w)),
        Expr::Map(m) => m.entries.iter().for_each(|en| walk_entry(&en.expr, w)),
        Expr::Struct(s) => s.entries.iter().for_each(|en| walk_entry(&en.expr, w)),
        Expr::Literal(_) | Expr::Unspecified => {}
    }
}

fn walk_entry(e: &EntryExpr, w: &mut Walk) {
    match e {
        EntryExpr::MapEntry(m) => {
            walk(&m.key, w);
            walk(&m.value, w);
        }
        EntryExpr::StructField(f) => walk(&f.value, w),
    }
}

/// Does CEL know a function of this name (as a global or a method)?
fn function_exists(name: &str) -> bool {
    let ctx = Context::with_env(Arc::clone(env()));
    for probe in [
        format!("{name}()"),
        format!("''.{name}()"),
        format!("[].{name}()"),
        format!("{{}}.{name}()"),
    ] {
        let Ok(p) = env().compile(&probe) else {
            return true;
        };
        match p.execute(&ctx) {
            Err(ExecutionError::UndeclaredReference(n)) if n.as_str() == name => {}
            _ => return true,
        }
    }
    false
}

fn position(p: &Program, expr: &str, id: u64) -> (u32, u32) {
    let Some((start, _)) = p.source_info().offset_for(id) else {
        return (1, 1);
    };
    let start = (start as usize).min(expr.len());
    let before = expr.get(..start).unwrap_or(expr);
    let line = before.matches('\n').count() as u32 + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() as u32 + 1)
}

/// Compiles `expr` and checks its names. Returns the `vars.NAME` fields it
/// reads, for the caller to check against the namespace.
pub(crate) fn check(expr: &str, kind: CondKind) -> Result<Vec<String>, Vec<CondError>> {
    if expr.trim().is_empty() {
        return Err(vec![(
            (1, 1),
            "empty condition: expected a CEL expression".into(),
        )]);
    }
    let program = env().compile(expr).map_err(|errs| {
        errs.errors
            .iter()
            .map(|e| {
                let (l, c) = e.pos;
                (
                    (l.max(1) as u32, c.max(1) as u32),
                    format!("bad CEL: {}", e.msg),
                )
            })
            .collect::<Vec<_>>()
    })?;
    let mut w = Walk::default();
    walk(program.expression(), &mut w);
    let allowed = kind.variables();
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for (name, id) in &w.idents {
        if w.bound.contains(name)
            || allowed.contains(&name.as_str())
            || BUILTIN_IDENTS.contains(&name.as_str())
            || !seen.insert(name.clone())
        {
            continue;
        }
        let hint = suggestion(name, allowed.iter().copied());
        errors.push((
            position(&program, expr, *id),
            format!(
                "unknown variable `{name}`{hint} (a condition here sees: {})",
                allowed.join(", ")
            ),
        ));
    }
    let mut var_fields = Vec::new();
    for (root, field, id) in &w.selects {
        if w.bound.contains(root) {
            continue;
        }
        let fields = match root.as_str() {
            "host" => HOST_FIELDS,
            "failure" if kind == CondKind::When => FAILURE_FIELDS,
            "vars" => {
                if !var_fields.contains(field) {
                    var_fields.push(field.clone());
                }
                continue;
            }
            _ => continue,
        };
        if !fields.contains(&field.as_str()) {
            let hint = suggestion(field, fields.iter().copied());
            errors.push((
                position(&program, expr, *id),
                format!(
                    "`{root}` has no field `{field}`{hint} (it has: {})",
                    fields.join(", ")
                ),
            ));
        }
    }
    let mut probed = BTreeSet::new();
    for (name, _, id) in &w.calls {
        let is_named = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
        if is_named && probed.insert(name.clone()) && !function_exists(name) {
            errors.push((
                position(&program, expr, *id),
                format!("unknown function `{name}`"),
            ));
        }
    }
    if errors.is_empty() {
        Ok(var_fields)
    } else {
        Err(errors)
    }
}

/// The real [`Judge`]: evaluates `expect` and `when` with CEL. Programs are
/// compiled once per expression text and cached (compiling is pure, so the
/// cache never changes an answer).
#[derive(Default)]
pub struct CelJudge {
    programs: Mutex<BTreeMap<String, Arc<Program>>>,
}

impl std::fmt::Debug for CelJudge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CelJudge").finish_non_exhaustive()
    }
}

fn to_cel(v: serde_json::Value) -> Result<Value, String> {
    cel::to_value(v).map_err(|e| format!("cannot pass a value to CEL: {e}"))
}

fn host_value(host: &HostPlan) -> Result<Value, String> {
    to_cel(serde_json::json!({
        "name": host.host.name,
        "labels": host.host.labels,
        "facts": host.host.facts,
    }))
}

impl CelJudge {
    /// A judge with an empty cache.
    pub fn new() -> CelJudge {
        CelJudge::default()
    }

    fn program(&self, expr: &str) -> Result<Arc<Program>, String> {
        let mut cache = self.programs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(expr) {
            return Ok(Arc::clone(p));
        }
        let p = Arc::new(
            env()
                .compile(expr)
                .map_err(|e| format!("bad CEL `{expr}`: {e}"))?,
        );
        cache.insert(expr.to_string(), Arc::clone(&p));
        Ok(p)
    }

    /// Evaluates `expr` with `variables`; it must give a bool.
    pub(crate) fn evaluate(
        &self,
        expr: &str,
        variables: Vec<(&str, Value)>,
    ) -> Result<bool, String> {
        let program = self.program(expr)?;
        let mut ctx = Context::with_env(Arc::clone(env()));
        for (name, value) in variables {
            ctx.add_variable_from_value(name, value);
        }
        match program.execute(&ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!(
                "`{expr}` must give true or false, but gave {}",
                describe(&other)
            )),
            Err(e) => Err(format!("cannot evaluate `{expr}`: {e}")),
        }
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Int(i) => format!("the int {i}"),
        Value::UInt(u) => format!("the uint {u}"),
        Value::Float(f) => format!("the double {f}"),
        Value::String(s) => format!("the string {:?}", s.as_str()),
        Value::Null => "null".into(),
        Value::List(_) => "a list".into(),
        Value::Map(_) => "a map".into(),
        other => format!("{other:?}"),
    }
}

fn exit_code_value(code: Option<i32>) -> Value {
    code.map_or(Value::Null, |c| Value::Int(i64::from(c)))
}

impl Judge for CelJudge {
    fn passed(&self, step: &Step, host: &HostPlan, result: &StepResult) -> Result<bool, String> {
        if !matches!(result.termination, None | Some(Termination::Exited)) {
            return Ok(false);
        }
        let Some(expect) = &step.expect else {
            return Ok(result.exit_code == Some(0));
        };
        self.evaluate(
            &expect.expr,
            vec![
                ("exit_code", exit_code_value(result.exit_code)),
                ("stdout", Value::from(result.stdout.clone())),
                ("stderr", Value::from(result.stderr.clone())),
                (
                    "duration_ms",
                    Value::Int(result.duration_ms.min(i64::MAX as u64) as i64),
                ),
                (
                    "vars",
                    to_cel(serde_json::Value::Object(host.vars.clone()))?,
                ),
                ("host", host_value(host)?),
            ],
        )
    }

    fn matches(
        &self,
        when: &Condition,
        host: &HostPlan,
        failure: &Failure,
    ) -> Result<bool, String> {
        let failure = to_cel(serde_json::json!({
            "phase": failure.phase.as_str(),
            "step": failure.step,
            "reason": failure.reason.as_str(),
            "exit_code": failure.exit_code,
            "stdout": failure.stdout,
            "stderr": failure.stderr,
            "message": failure.message,
        }))?;
        self.evaluate(
            &when.expr,
            vec![
                ("failure", failure),
                (
                    "vars",
                    to_cel(serde_json::Value::Object(host.vars.clone()))?,
                ),
                ("host", host_value(host)?),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::{FailureReason, Phase};
    use crate::spec::{HostInfo, Location, StepAction};

    fn plan() -> HostPlan {
        HostPlan {
            host: HostInfo {
                name: "web-1".into(),
                labels: [("role".to_string(), "web".to_string())].into(),
                facts: [("os".to_string(), "linux".to_string())].into(),
            },
            vars: serde_json::json!({"version": "2.4.1", "port": 8080})
                .as_object()
                .cloned()
                .unwrap(),
            skip_if: vec![],
            check: vec![],
            apply: vec![],
            verify: vec![],
            backout: vec![],
        }
    }

    fn step(expect: Option<&str>) -> Step {
        Step {
            action: StepAction::Run {
                command: "true".into(),
            },
            timeout: None,
            env: Default::default(),
            cwd: None,
            user: None,
            stdin: None,
            expect: expect.map(|e| Condition {
                expr: e.into(),
                location: Location::default(),
            }),
            location: Location::default(),
            secrets: Default::default(),
        }
    }

    fn result(code: Option<i32>, stdout: &str) -> StepResult {
        StepResult {
            termination: Some(Termination::Exited),
            exit_code: code,
            stdout: stdout.into(),
            ..StepResult::default()
        }
    }

    #[test]
    fn without_expect_exit_zero_passes() {
        let j = CelJudge::new();
        assert_eq!(
            j.passed(&step(None), &plan(), &result(Some(0), "")),
            Ok(true)
        );
        assert_eq!(
            j.passed(&step(None), &plan(), &result(Some(1), "")),
            Ok(false)
        );
        assert_eq!(j.passed(&step(None), &plan(), &result(None, "")), Ok(false));
        let mut timed_out = result(Some(0), "");
        timed_out.termination = Some(Termination::TimedOut);
        assert_eq!(
            j.passed(&step(Some("true")), &plan(), &timed_out),
            Ok(false)
        );
    }

    #[test]
    fn expect_sees_output_vars_and_host() {
        let j = CelJudge::new();
        let p = plan();
        for (expr, want) in [
            (r#"exit_code == 0 && stdout.trim() == "active""#, true),
            (
                r#"stdout.contains("act") && stdout.startsWith(" ") && stdout.matches("^ a")"#,
                true,
            ),
            (r#"vars.version == "2.4.1" && vars.port == 8080"#, true),
            (
                r#"host.name == "web-1" && host.labels.role == "web" && host.facts.os == "linux""#,
                true,
            ),
            (r#"stdout.trim().lowerAscii() == "inactive""#, false),
            ("duration_ms < 1000 && stderr == ''", true),
        ] {
            assert_eq!(
                j.passed(&step(Some(expr)), &p, &result(Some(0), " active\n")),
                Ok(want),
                "{expr}"
            );
        }
    }

    #[test]
    fn non_bool_and_failing_evaluation_are_errors() {
        let j = CelJudge::new();
        let err = j
            .passed(&step(Some("exit_code + 1")), &plan(), &result(Some(0), ""))
            .unwrap_err();
        assert!(
            err.contains("must give true or false, but gave the int 1"),
            "{err}"
        );
        let err = j
            .passed(
                &step(Some("host.labels.missing == 'x'")),
                &plan(),
                &result(Some(0), ""),
            )
            .unwrap_err();
        assert!(err.contains("cannot evaluate"), "{err}");
    }

    #[test]
    fn when_sees_the_failure() {
        let j = CelJudge::new();
        let f = Failure {
            phase: Phase::Verify,
            step: 1,
            reason: FailureReason::NonzeroExit,
            exit_code: Some(3),
            stdout: String::new(),
            stderr: "boom".into(),
            message: "exit 3".into(),
        };
        let when = |e: &str| Condition {
            expr: e.into(),
            location: Location::default(),
        };
        let p = plan();
        assert_eq!(
            j.matches(
                &when(r#"failure.phase == "verify" && failure.step == 1"#),
                &p,
                &f
            ),
            Ok(true)
        );
        assert_eq!(
            j.matches(&when(r#"failure.reason == "timeout""#), &p, &f),
            Ok(false)
        );
        assert_eq!(
            j.matches(
                &when(r#"failure.exit_code == 3 && failure.stderr.contains("bo")"#),
                &p,
                &f
            ),
            Ok(true)
        );
    }

    #[test]
    fn check_reports_syntax_unknown_names_and_functions() {
        assert_eq!(
            check(
                "vars.a == 1 && has(vars.b) && stdout != ''",
                CondKind::Expect
            ),
            Ok(vec!["a".to_string()])
        );
        assert!(check("[1, 2].exists(x, x > exit_code)", CondKind::Expect).is_ok());
        assert!(
            check(
                "int(stdout.trim()) > 2 && type(exit_code) == int",
                CondKind::Expect
            )
            .is_ok()
        );
        let errs = |e: &str, k| {
            check(e, k)
                .unwrap_err()
                .into_iter()
                .map(|(_, m)| m)
                .collect::<Vec<_>>()
                .join("|")
        };
        assert!(errs("exit_code == ", CondKind::Expect).starts_with("bad CEL"));
        assert!(
            errs("exitcode == 0", CondKind::Expect)
                .contains("unknown variable `exitcode`; did you mean `exit_code`?")
        );
        assert!(
            errs("failure.phase == 'apply'", CondKind::Expect)
                .contains("unknown variable `failure`")
        );
        assert!(errs("stdout == ''", CondKind::When).contains("unknown variable `stdout`"));
        assert!(
            errs("host.label.x == 'a'", CondKind::Expect)
                .contains("`host` has no field `label`; did you mean `labels`?")
        );
        assert!(errs("failure.phse == 'x'", CondKind::When).contains("did you mean `phase`?"));
        assert!(
            errs("stdout.contain('x')", CondKind::Expect).contains("unknown function `contain`")
        );
        let ((line, col), _) = check("exit_code == 0 &&\n  bogus", CondKind::Expect)
            .unwrap_err()
            .remove(0);
        assert_eq!((line, col), (2, 3));
    }
}
