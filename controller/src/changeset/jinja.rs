//! minijinja, set up the way the language needs it: strict undefined, no
//! loader (templates cannot include files), and two flavours of output.
//!
//! - **shell** (`run`, `interact.run`, `file.validate`): a custom auto-escape
//!   format whose formatter shell-quotes every interpolated value, so a
//!   value is always one word to `/bin/sh` whatever it holds. `| safe`
//!   inserts text raw on purpose; `| args` quotes each item of a list and
//!   joins them with spaces.
//! - **raw** (everything no shell sees: `argv`, `file.path`, `file.content`,
//!   `env`, `cwd`, `user`, `stdin`, `send`, and variable values).
//!
//! Values from host labels, facts, inventory vars and `--var` are passed in
//! as data and are never rendered as templates themselves.
//!
//! A secret is in the context as a [`Secret`]: its value never reaches the
//! language. Raw, it renders as `<secret NAME>` (the agent puts the value
//! there); in a shell command as `"$MODI_SECRET_NAME"`, an environment
//! variable only the step's process receives, so the value never appears
//! in a command line. A string built from a secret (`"u:{{ pw }}@db"`, a
//! variable defined so) carries the placeholder, which the shell formatter
//! turns into the same reference inside the quoted word.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

use minijinja::value::{Enumerator, Object, ObjectRepr, Value};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, State, UndefinedBehavior};

use super::ast::Tmpl;
use crate::spec::Location;

/// How a rendered value is inserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Escape {
    /// Shell-quote every interpolated value.
    Shell,
    /// Insert values as they are.
    Raw,
}

const SHELL: &str = "shell";

/// The two environments.
pub(crate) struct Jinja {
    shell: Environment<'static>,
    raw: Environment<'static>,
}

/// The shared environments (they hold no state between renders).
pub(crate) fn jinja() -> &'static Jinja {
    static J: OnceLock<Jinja> = OnceLock::new();
    J.get_or_init(Jinja::new)
}

fn quote(s: &str) -> Result<String, Error> {
    shlex::try_quote(s).map(|q| q.into_owned()).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            "a value holding a NUL byte cannot be passed to a shell",
        )
    })
}

/// A secret in a template's context, known by name only (see the module
/// docs).
#[derive(Debug)]
pub(crate) struct Secret(pub String);

impl Object for Secret {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&modi_proto::secret_placeholder(&self.0))
    }
}

/// How a shell command reads secret `name`: `"$MODI_SECRET_name"`.
pub(crate) fn secret_ref(name: &str) -> String {
    format!("\"${}\"", modi_proto::secret_env(name))
}

/// Is `name` a secret in this render's context?
fn is_secret(state: &State, name: &str) -> bool {
    state.lookup(name).is_some_and(|v| {
        v.downcast_object_ref::<Secret>()
            .is_some_and(|s| s.0 == name)
    })
}

/// `value` as one shell word: a secret is read from its environment
/// variable; text is quoted, with every `<secret NAME>` placeholder of a
/// secret of this render turned into that variable's reference inside the
/// word (`'u:'"$MODI_SECRET_pw"'@db'`).
fn shell_word(state: &State, value: &Value) -> Result<String, Error> {
    if let Some(secret) = value.downcast_object_ref::<Secret>() {
        return Ok(secret_ref(&secret.0));
    }
    let text = value.to_string();
    const OPEN: &str = "<secret ";
    let mut out = String::new();
    let mut literal = String::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let name = after.find('>').map(|end| &after[..end]);
        match name {
            Some(name) if is_secret(state, name) => {
                literal.push_str(&rest[..start]);
                if !literal.is_empty() {
                    out.push_str(&quote(&literal)?);
                    literal.clear();
                }
                out.push_str(&secret_ref(name));
                rest = &after[name.len() + 1..];
            }
            _ => {
                literal.push_str(&rest[..start + 1]);
                rest = &rest[start + 1..];
            }
        }
    }
    literal.push_str(rest);
    if !literal.is_empty() || out.is_empty() {
        out.push_str(&quote(&literal)?);
    }
    Ok(out)
}

/// `{{ list | args }}`: each item shell-quoted, joined with spaces.
fn args(state: &State, value: Value) -> Result<Value, Error> {
    let mut words = Vec::new();
    for item in value.try_iter()? {
        if item.is_safe() {
            words.push(item.to_string());
        } else {
            words.push(shell_word(state, &item)?);
        }
    }
    Ok(Value::from_safe_string(words.join(" ")))
}

fn base_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .trim_blocks(true)
            .build()
            .expect("default delimiters are valid"),
    );
    env.add_filter("args", args);
    env
}

impl Jinja {
    fn new() -> Jinja {
        let mut shell = base_env();
        shell.set_auto_escape_callback(|_| AutoEscape::Custom(SHELL.into()));
        shell.set_formatter(|out, state, value| {
            if !matches!(state.auto_escape(), AutoEscape::Custom(name) if name == SHELL) {
                return minijinja::escape_formatter(out, state, value);
            }
            if value.is_safe() {
                return out.write_str(&value.to_string()).map_err(Error::from);
            }
            if value.is_none() {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "a null value cannot be put into a command (give it a value, or use `| default(\"\", true)`)",
                ));
            }
            out.write_str(&shell_word(state, value)?).map_err(Error::from)
        });
        let mut raw = base_env();
        raw.set_auto_escape_callback(|_| AutoEscape::None);
        Jinja { shell, raw }
    }

    fn env(&self, escape: Escape) -> &Environment<'static> {
        match escape {
            Escape::Shell => &self.shell,
            Escape::Raw => &self.raw,
        }
    }

    /// Renders `t` with `ctx`; an error points into the file.
    pub fn render(
        &self,
        t: &Tmpl,
        escape: Escape,
        ctx: &Value,
    ) -> Result<String, (Location, String)> {
        if t.is_literal() {
            return Ok(t.src.clone());
        }
        let env = self.env(escape);
        let tmpl = env
            .template_from_named_str(&t.loc.path, &t.src)
            .map_err(|e| (error_location(t, &e), message(&e)))?;
        tmpl.render(ctx)
            .map_err(|e| (error_location(t, &e), message(&e)))
    }

    /// Compiles `src` and lists the variables it reads (`host.name`,
    /// `version`, ...).
    pub fn analyze(&self, src: &str) -> Result<BTreeSet<String>, Error> {
        let tmpl = self.raw.template_from_str(src)?;
        Ok(tmpl.undeclared_variables(true).into_iter().collect())
    }

    /// Renders `t` with every variable it reads set to an opaque stand-in,
    /// to find unknown filters, tests, functions and methods before any host
    /// is known. Errors that stand-in values could cause are not reported.
    pub fn trial(&self, t: &Tmpl, escape: Escape) -> Option<(Location, String)> {
        if t.is_literal() {
            return None;
        }
        let ctx: BTreeMap<String, Value> = t
            .roots()
            .map(|n| (n.to_string(), Value::from_object(Opaque)))
            .collect();
        match self.render(t, escape, &Value::from(ctx)) {
            Err(e) if is_static_error(&e.1) => Some(e),
            _ => None,
        }
    }
}

/// Errors a trial render reports: those no value could fix.
fn is_static_error(msg: &str) -> bool {
    [
        "unknown filter",
        "unknown test",
        "unknown function",
        "unknown method",
        "syntax error",
    ]
    .iter()
    .any(|k| msg.starts_with(k))
}

/// A value not known before render time (a host label, say): any attribute
/// or item is another opaque value.
#[derive(Debug)]
struct Opaque;

impl Object for Opaque {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, _key: &Value) -> Option<Value> {
        Some(Value::from_object(Opaque))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Empty
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("opaque")
    }
}

/// A message for people: what kind of error, and the detail.
pub(crate) fn message(e: &Error) -> String {
    let kind = match e.kind() {
        ErrorKind::UndefinedError => "undefined variable".to_string(),
        k => k.to_string(),
    };
    match e.detail() {
        Some(d) => format!("{kind}: {d}"),
        None => kind,
    }
}

/// Where in the file a template error is: the template's line and column
/// mapped onto the scalar it was written in (exact for single-line and
/// `|` block scalars, the scalar's start otherwise).
pub(crate) fn error_location(t: &Tmpl, e: &Error) -> Location {
    let mut loc = t.loc.clone();
    let line_in = e.line().unwrap_or(1).max(1);
    let col_in = e
        .range()
        .filter(|r| r.start <= t.src.len() && t.src.is_char_boundary(r.start))
        .map(|r| {
            let before = &t.src[..r.start];
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            before[line_start..].chars().count() as u32
        });
    if t.multiline {
        loc.line += line_in as u32 - 1;
        if let Some(c) = col_in {
            loc.column += c;
        }
    } else if line_in == 1 {
        loc.column += u32::from(t.quoted) + col_in.unwrap_or(0);
    }
    loc
}

/// JSON data (inventory vars, labels, `--var`) as a template value.
pub(crate) fn to_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::from(i),
            (_, Some(u), _) => Value::from(u),
            (_, _, Some(f)) => Value::from(f),
            _ => Value::from(n.to_string()),
        },
        J::String(s) => Value::from(s.as_str()),
        J::Array(a) => Value::from(a.iter().map(to_value).collect::<Vec<_>>()),
        J::Object(m) => Value::from(
            m.iter()
                .map(|(k, v)| (k.clone(), to_value(v)))
                .collect::<BTreeMap<String, Value>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpl(src: &str) -> Tmpl {
        Tmpl {
            src: src.into(),
            loc: Location {
                file: "f.yaml".into(),
                line: 10,
                column: 5,
                path: "changes[0].apply[0].run".into(),
            },
            quoted: false,
            multiline: src.contains('\n'),
            names: jinja().analyze(src).unwrap(),
        }
    }

    fn ctx(pairs: &[(&str, serde_json::Value)]) -> Value {
        to_value(&serde_json::Value::Object(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        ))
    }

    #[test]
    fn shell_output_quotes_every_value_and_safe_opts_out() {
        let c = ctx(&[
            ("x", "a b'c".into()),
            ("n", 3.into()),
            ("l", serde_json::json!(["a b", "c"])),
        ]);
        let out = jinja()
            .render(
                &tmpl("echo {{ x }} {{ x | safe }} {{ n }} {{ l | args }} {{ '' }}"),
                Escape::Shell,
                &c,
            )
            .unwrap();
        assert_eq!(out, r#"echo "a b'c" a b'c 3 'a b' c ''"#);
        let raw = jinja().render(&tmpl("{{ x }}"), Escape::Raw, &c).unwrap();
        assert_eq!(raw, "a b'c");
    }

    #[test]
    fn null_and_nul_are_refused_in_commands() {
        let c = ctx(&[("x", serde_json::Value::Null), ("z", "a\0b".into())]);
        let (_, msg) = jinja()
            .render(&tmpl("echo {{ x }}"), Escape::Shell, &c)
            .unwrap_err();
        assert!(msg.contains("null value"), "{msg}");
        let (_, msg) = jinja()
            .render(&tmpl("echo {{ z }}"), Escape::Shell, &c)
            .unwrap_err();
        assert!(msg.contains("NUL byte"), "{msg}");
    }

    #[test]
    fn undefined_is_an_error_pointing_at_the_line() {
        let (loc, msg) = jinja()
            .render(
                &tmpl("echo ok\necho {{ nope }}\n"),
                Escape::Shell,
                &ctx(&[]),
            )
            .unwrap_err();
        assert_eq!((loc.line, loc.column), (11, 13), "{msg}");
        assert!(msg.starts_with("undefined variable"), "{msg}");
    }

    #[test]
    fn analyze_lists_nested_names_and_trial_finds_unknown_filters() {
        let names = jinja()
            .analyze("{{ host.name }} {% for p in pkgs %}{{ p }}{% endfor %}")
            .unwrap();
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["host.name", "pkgs"]);
        let (_, msg) = jinja()
            .trial(&tmpl("{{ host.labels.x | uppper }}"), Escape::Shell)
            .unwrap();
        assert!(msg.starts_with("unknown filter"), "{msg}");
        assert!(
            jinja()
                .trial(&tmpl("{{ host.facts.cpus | int + 1 }}"), Escape::Shell)
                .is_none()
        );
        assert!(jinja().analyze("{{ x ").is_err());
        for ok in [
            "{% for k, v in host.labels | items %}{{ k }}{% endfor %}",
            "{% for k, v in host.labels.items() %}{{ k }}{% endfor %}",
            "{{ host.labels.get('zone', 'a') }}",
            "{{ host.labels.keys() | list }}",
        ] {
            assert!(jinja().trial(&tmpl(ok), Escape::Shell).is_none(), "{ok}");
        }
    }
}
