//! Host selectors: which hosts a change runs on. Also used by
//! `modi hosts [SELECTOR]`.
//!
//! Grammar (comma = and):
//! - `all`: every host.
//! - host names: `web-1,web-2` (or a YAML list). Names keep the order they
//!   are written in, which is the rollout order.
//! - label expressions: `key=value`, `key!=value`, `key in (a,b)`,
//!   `key notin (a,b)`. `key` is a host label; `facts.key` is a fact the
//!   agent reported. There is no fallback from labels to facts: a selector
//!   says which of the two it means. `!=` and `notin` also match hosts that
//!   lack the key.
//!
//! Names and expressions cannot be mixed in one selector.

use std::fmt;
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::spec::HostInfo;

/// A parsed host selector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// Every host.
    All,
    /// These hosts, in this order.
    Names(Vec<String>),
    /// Hosts matching every term.
    Terms(Vec<Term>),
}

/// One `key OP value` term.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Term {
    /// What is compared.
    pub key: Key,
    /// How.
    pub op: Op,
}

/// A label or a fact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Key {
    /// `key`: a host label.
    Label(String),
    /// `facts.key`: a fact the agent reported.
    Fact(String),
}

/// The comparison of a [`Term`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `key=value`.
    Eq(String),
    /// `key!=value` (also true when the key is absent).
    Ne(String),
    /// `key in (a,b)`.
    In(Vec<String>),
    /// `key notin (a,b)` (also true when the key is absent).
    NotIn(Vec<String>),
}

const EXPECTED: &str = "expected `all`, host names (`web-1,web-2`) or label expressions (`key=value`, `key!=value`, `key in (a,b)`, comma = and)";

fn name_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$").expect("valid regex"))
}

fn key_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9_.\-/]*$").expect("valid regex"))
}

fn set_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^(?P<key>\S+)\s+(?P<op>in|notin)\s*\((?P<vals>[^()]*)\)$")
            .expect("valid regex")
    })
}

fn check_value(v: &str, term: &str) -> Result<String, String> {
    let v = v.trim();
    if v.is_empty() {
        return Err(format!("`{term}`: empty value"));
    }
    if v.chars().any(|c| c.is_whitespace() || "=!(),".contains(c)) {
        return Err(format!(
            "`{term}`: bad value `{v}` (no spaces, `=`, `!`, `(`, `)` or `,`)"
        ));
    }
    Ok(v.to_string())
}

fn parse_key(k: &str, term: &str) -> Result<Key, String> {
    let k = k.trim();
    if !key_re().is_match(k) {
        return Err(format!("`{term}`: bad key `{k}`; {EXPECTED}"));
    }
    match k.strip_prefix("facts.") {
        Some(f) if !f.is_empty() => Ok(Key::Fact(f.to_string())),
        _ => Ok(Key::Label(k.to_string())),
    }
}

/// Splits on commas outside parentheses.
fn split_terms(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unbalanced `)` in `{s}`"));
                }
            }
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unclosed `(` in `{s}`"));
    }
    out.push(&s[start..]);
    Ok(out)
}

impl Selector {
    /// Parses the text form.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err(format!("empty selector; {EXPECTED}"));
        }
        if text == "all" {
            return Ok(Selector::All);
        }
        let mut names = Vec::new();
        let mut terms = Vec::new();
        for raw in split_terms(text)? {
            let t = raw.trim();
            if t.is_empty() {
                return Err(format!("empty term in `{text}`; {EXPECTED}"));
            }
            if t == "all" {
                return Err(format!(
                    "`all` cannot be combined with other terms in `{text}`"
                ));
            }
            if let Some(c) = set_re().captures(t) {
                let key = parse_key(&c["key"], t)?;
                let vals = c["vals"]
                    .split(',')
                    .map(|v| check_value(v, t))
                    .collect::<Result<Vec<_>, _>>()?;
                let op = if &c["op"] == "in" {
                    Op::In(vals)
                } else {
                    Op::NotIn(vals)
                };
                terms.push(Term { key, op });
            } else if let Some((k, v)) = t.split_once("!=") {
                terms.push(Term {
                    key: parse_key(k, t)?,
                    op: Op::Ne(check_value(v, t)?),
                });
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                terms.push(Term {
                    key: parse_key(k, t)?,
                    op: Op::Eq(check_value(v, t)?),
                });
            } else if name_re().is_match(t) {
                names.push(t.to_string());
            } else {
                return Err(format!(
                    "`{t}` is not a host name or a label expression; {EXPECTED}"
                ));
            }
        }
        match (names.is_empty(), terms.is_empty()) {
            (false, false) => Err(format!(
                "`{text}` mixes host names with label expressions; use one or the other"
            )),
            (true, _) => Ok(Selector::Terms(terms)),
            (false, true) => Selector::names(names),
        }
    }

    /// A list of host names (a YAML list under `hosts:`), duplicates removed.
    pub fn names(list: Vec<String>) -> Result<Selector, String> {
        if list.is_empty() {
            return Err(format!("empty list of hosts; {EXPECTED}"));
        }
        let mut out: Vec<String> = Vec::with_capacity(list.len());
        for n in list {
            let n = n.trim().to_string();
            if !name_re().is_match(&n) {
                return Err(format!(
                    "`{n}` is not a host name (letters, digits, `_`, `.`, `-`)"
                ));
            }
            if !out.contains(&n) {
                out.push(n);
            }
        }
        Ok(Selector::Names(out))
    }

    /// Does `host` match?
    pub fn matches(&self, host: &HostInfo) -> bool {
        match self {
            Selector::All => true,
            Selector::Names(names) => names.contains(&host.name),
            Selector::Terms(terms) => terms.iter().all(|t| t.matches(host)),
        }
    }

    /// The matching hosts in rollout order: in the order written for a list
    /// of names, else by host name.
    pub fn select<'a>(&self, inventory: &'a [HostInfo]) -> Vec<&'a HostInfo> {
        match self {
            Selector::Names(names) => names
                .iter()
                .filter_map(|n| inventory.iter().find(|h| h.name == *n))
                .collect(),
            _ => {
                let mut out: Vec<&HostInfo> =
                    inventory.iter().filter(|h| self.matches(h)).collect();
                out.sort_by(|a, b| a.name.cmp(&b.name));
                out
            }
        }
    }
}

impl Term {
    fn matches(&self, host: &HostInfo) -> bool {
        let value = match &self.key {
            Key::Label(k) => host.labels.get(k),
            Key::Fact(k) => host.facts.get(k),
        };
        match (&self.op, value) {
            (Op::Eq(v), Some(x)) => x == v,
            (Op::Ne(v), Some(x)) => x != v,
            (Op::Ne(_), None) => true,
            (Op::In(vs), Some(x)) => vs.contains(x),
            (Op::NotIn(vs), Some(x)) => !vs.contains(x),
            (Op::NotIn(_), None) => true,
            (Op::Eq(_) | Op::In(_), None) => false,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Label(k) => f.write_str(k),
            Key::Fact(k) => write!(f, "facts.{k}"),
        }
    }
}

impl fmt::Display for Selector {
    /// The canonical text form (parses back to the same selector).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::All => f.write_str("all"),
            Selector::Names(n) => f.write_str(&n.join(",")),
            Selector::Terms(terms) => {
                for (i, t) in terms.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    match &t.op {
                        Op::Eq(v) => write!(f, "{}={v}", t.key)?,
                        Op::Ne(v) => write!(f, "{}!={v}", t.key)?,
                        Op::In(vs) => write!(f, "{} in ({})", t.key, vs.join(","))?,
                        Op::NotIn(vs) => write!(f, "{} notin ({})", t.key, vs.join(","))?,
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, labels: &[(&str, &str)], facts: &[(&str, &str)]) -> HostInfo {
        HostInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            facts: facts
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn fleet() -> Vec<HostInfo> {
        vec![
            host("web-2", &[("role", "web"), ("dc", "a")], &[("os", "linux")]),
            host("db-1", &[("role", "db"), ("dc", "b")], &[("os", "linux")]),
            host(
                "web-1",
                &[("role", "web"), ("dc", "b")],
                &[("os", "freebsd")],
            ),
            host("bare", &[], &[]),
        ]
    }

    fn names(sel: &str) -> Vec<String> {
        let inv = fleet();
        Selector::parse(sel)
            .unwrap()
            .select(&inv)
            .into_iter()
            .map(|h| h.name.clone())
            .collect()
    }

    #[test]
    fn selects_by_labels_facts_and_names() {
        assert_eq!(names("all"), ["bare", "db-1", "web-1", "web-2"]);
        assert_eq!(names("role=web"), ["web-1", "web-2"]);
        assert_eq!(names("role==web, dc=b"), ["web-1"]);
        assert_eq!(names("role!=web"), ["bare", "db-1"]);
        assert_eq!(names("dc in (a, b)"), ["db-1", "web-1", "web-2"]);
        assert_eq!(names("dc notin (a)"), ["bare", "db-1", "web-1"]);
        assert_eq!(names("facts.os=freebsd"), ["web-1"]);
        assert_eq!(names("web-2,db-1,gone"), ["web-2", "db-1"]);
        assert_eq!(names("os=linux"), Vec::<String>::new());
    }

    #[test]
    fn bad_selectors_say_what_was_expected() {
        for (text, fragment) in [
            ("", "empty selector"),
            ("role:web", "is not a host name or a label expression"),
            ("role=", "empty value"),
            ("web-1,role=web", "mixes host names"),
            ("dc in (a,", "unclosed `(`"),
            ("dc in ()", "empty value"),
            ("all,role=web", "`all` cannot be combined"),
            ("a,,b", "empty term"),
        ] {
            let err = Selector::parse(text).unwrap_err();
            assert!(err.contains(fragment), "{text:?}: {err}");
        }
        assert!(Selector::names(vec!["web 1".into()]).is_err());
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "all",
            "web-1,web-2",
            "role=web,dc!=a",
            "dc in (a,b),facts.os notin (x)",
        ] {
            let sel = Selector::parse(text).unwrap();
            assert_eq!(sel.to_string(), text);
            assert_eq!(Selector::parse(&sel.to_string()).unwrap(), sel);
        }
    }
}
