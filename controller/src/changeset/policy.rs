//! The small value types of the file: durations, host counts, rollout,
//! retry and approval policies, file modes and owners.

use std::sync::OnceLock;
use std::time::Duration;

use regex::Regex;
use saphyr::{ScalarOwned, YamlDataOwned};

use super::yaml::{Node, Reader, index_path, key_path};
use crate::spec::{
    Amount, Approve, ApproveAt, ChangesetFailure, OnFailure, Retry, Rollout, RolloutMode,
};

const DURATION: &str = "a duration like 500ms, 10s, 2m or 1h";

/// `10s`, `2m`, `1h`, `500ms`, `1h 30m`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("`{t}` has no unit; expected {DURATION}"));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("bad duration `{t}` ({e}); expected {DURATION}"))
}

/// `"25%"` → 25.
fn parse_percent(text: &str) -> Option<u32> {
    let n = text.trim().strip_suffix('%')?.trim();
    n.parse::<u32>().ok().filter(|p| *p <= 100)
}

fn owner_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(:[A-Za-z0-9_][A-Za-z0-9_.\-]*)?$")
            .expect("valid regex")
    })
}

/// `user` or `user:group`.
pub(crate) fn check_owner(owner: &str) -> Result<(), String> {
    if owner_re().is_match(owner) {
        Ok(())
    } else {
        Err(format!(
            "bad owner `{owner}`: expected `user` or `user:group`"
        ))
    }
}

/// Parses a file mode written as octal digits: `"0644"`, `0644`, `644`,
/// `0o644` all mean rw-r--r--.
pub(crate) fn parse_mode(raw: &str) -> Result<u32, String> {
    let t = raw.trim().trim_matches(|c| c == '"' || c == '\'');
    let digits = t.strip_prefix("0o").unwrap_or(t);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if !digits.is_empty() && m <= 0o7777 => Ok(m),
        _ => Err(format!(
            "bad mode `{t}`: expected octal permission digits like \"0644\" or \"0755\""
        )),
    }
}

impl Reader<'_> {
    /// A duration (`10s`, `2m`, ...).
    pub fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let YamlDataOwned::Value(ScalarOwned::String(s)) = &node.data else {
            let found = Self::describe(node);
            self.error(node, path, format!("expected {DURATION}, found {found}"));
            return None;
        };
        match parse_duration(s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error(node, path, e);
                None
            }
        }
    }

    /// A host count: a positive integer, or a percentage `"N%"` (1..=100),
    /// or (with `zero_ok`) 0 / `"0%"`.
    pub fn amount(&mut self, node: &Node, path: &str, zero_ok: bool) -> Option<Amount> {
        let min = u32::from(!zero_ok);
        let expected = if zero_ok {
            "a number of hosts (0 or more) or a percentage like \"10%\""
        } else {
            "a number of hosts (1 or more) or a percentage like \"25%\""
        };
        let amount = match &node.data {
            YamlDataOwned::Value(ScalarOwned::Integer(i)) => u32::try_from(*i)
                .ok()
                .filter(|n| *n >= min)
                .map(Amount::Count),
            YamlDataOwned::Value(ScalarOwned::String(s)) => {
                parse_percent(s).filter(|p| *p >= min).map(Amount::Percent)
            }
            _ => None,
        };
        if amount.is_none() {
            let found = match &node.data {
                YamlDataOwned::Value(ScalarOwned::Integer(i)) => format!("{i}"),
                YamlDataOwned::Value(ScalarOwned::String(s)) => format!("{s:?}"),
                _ => Self::describe(node).to_string(),
            };
            self.error(node, path, format!("expected {expected}, found {found}"));
        }
        amount
    }

    /// One of `choices`, as written.
    pub fn choice(&mut self, node: &Node, path: &str, choices: &[&str]) -> Option<String> {
        let s = self.string(node, path)?;
        if choices.contains(&s.as_str()) {
            return Some(s);
        }
        let hint = super::diag::suggestion(&s, choices.iter().copied());
        self.error(
            node,
            path,
            format!("expected one of {}, found `{s}`{hint}", choices.join(" | ")),
        );
        None
    }

    /// `on_failure` of a change.
    pub fn on_failure(&mut self, node: &Node, path: &str) -> Option<OnFailure> {
        Some(
            match self
                .choice(node, path, &["halt", "continue", "backout_all"])?
                .as_str()
            {
                "continue" => OnFailure::Continue,
                "backout_all" => OnFailure::BackoutAll,
                _ => OnFailure::Halt,
            },
        )
    }

    /// `on_failure` of a changeset.
    pub fn changeset_failure(&mut self, node: &Node, path: &str) -> Option<ChangesetFailure> {
        Some(
            match self.choice(node, path, &["halt", "backout_all"])?.as_str() {
                "backout_all" => ChangesetFailure::BackoutAll,
                _ => ChangesetFailure::Halt,
            },
        )
    }

    /// `rollout:`.
    pub fn rollout(&mut self, node: &Node, path: &str) -> Rollout {
        let mut out = Rollout::default();
        let Some(m) = self.map(
            node,
            path,
            &["mode", "batches", "max_parallel", "max_failures", "pause"],
        ) else {
            return out;
        };
        if let Some(n) = m.get("mode") {
            out.mode = match self
                .choice(
                    n,
                    &key_path(path, "mode"),
                    &["serial", "parallel", "rolling"],
                )
                .as_deref()
            {
                Some("parallel") => RolloutMode::Parallel,
                Some("rolling") => RolloutMode::Rolling,
                _ => RolloutMode::Serial,
            };
        }
        let mode_given = m.get("mode").is_some();
        if let Some(n) = m.get("batches") {
            let p = key_path(path, "batches");
            if out.mode != RolloutMode::Rolling && mode_given {
                self.error(n, &p, "`batches` only applies to `mode: rolling`");
            } else if out.mode != RolloutMode::Rolling {
                self.error(
                    n,
                    &p,
                    "`batches` only applies to `mode: rolling` (the default mode is serial)",
                );
            }
            if let Some(items) = self.list(n, &p) {
                if items.is_empty() {
                    self.error(n, &p, "expected at least one batch size, like [1, \"25%\"]");
                }
                for (i, item) in items.iter().enumerate() {
                    if let Some(a) = self.amount(item, &index_path(&p, i), false) {
                        out.batches.push(a);
                    }
                }
            }
        } else if out.mode == RolloutMode::Rolling {
            self.error(m.node, path, "`mode: rolling` needs `batches`, like [1, \"25%\"] (a canary of 1, then 25% at a time)");
        }
        if let Some(n) = m.get("max_parallel") {
            let p = key_path(path, "max_parallel");
            if out.mode == RolloutMode::Serial {
                self.error(
                    n,
                    &p,
                    "`max_parallel` does not apply to `mode: serial` (one host at a time)",
                );
            }
            match self.int(n, &p) {
                Some(i) if i >= 1 => out.max_parallel = u32::try_from(i).ok(),
                Some(i) => self.error(
                    n,
                    &p,
                    format!("expected 1 or more hosts at once, found {i}"),
                ),
                None => {}
            }
        }
        if let Some(n) = m.get("max_failures") {
            out.max_failures = self.amount(n, &key_path(path, "max_failures"), true);
        }
        if let Some(n) = m.get("pause") {
            let p = key_path(path, "pause");
            if out.mode == RolloutMode::Parallel {
                self.error(
                    n,
                    &p,
                    "`pause` does not apply to `mode: parallel` (there is one batch)",
                );
            }
            out.pause = self.duration(n, &p);
        }
        out
    }

    /// `retry: { max_retries, delay }`.
    pub fn retry(&mut self, node: &Node, path: &str) -> Retry {
        let mut out = Retry::default();
        let Some(m) = self.map(node, path, &["max_retries", "delay"]) else {
            return out;
        };
        match m.get("max_retries") {
            Some(n) => {
                let p = key_path(path, "max_retries");
                match self.int(n, &p) {
                    Some(i) if i >= -1 => out.max_retries = i,
                    Some(i) => self.error(
                        n,
                        &p,
                        format!("expected -1 (retry forever), 0 or more, found {i}"),
                    ),
                    None => {}
                }
            }
            None => self.error(
                node,
                &key_path(path, "max_retries"),
                "missing `max_retries` (how many tries after the first; -1 = forever)",
            ),
        }
        if let Some(n) = m.get("delay") {
            out.delay = self
                .duration(n, &key_path(path, "delay"))
                .unwrap_or_default();
        }
        out
    }

    /// `approve: none|once|each_batch|each_host` or `{at, timeout}`.
    pub fn approve(&mut self, node: &Node, path: &str) -> Approve {
        const AT: [&str; 4] = ["none", "once", "each_batch", "each_host"];
        let at = |s: &str| match s {
            "once" => ApproveAt::Once,
            "each_batch" => ApproveAt::EachBatch,
            "each_host" => ApproveAt::EachHost,
            _ => ApproveAt::None,
        };
        if let YamlDataOwned::Mapping(_) = node.data {
            let mut out = Approve::default();
            let Some(m) = self.map(node, path, &["at", "timeout"]) else {
                return out;
            };
            match m.get("at") {
                Some(n) => {
                    if let Some(s) = self.choice(n, &key_path(path, "at"), &AT) {
                        out.at = at(&s);
                    }
                }
                None => self.error(
                    node,
                    &key_path(path, "at"),
                    "missing `at` (once | each_batch | each_host)",
                ),
            }
            if let Some(n) = m.get("timeout") {
                let p = key_path(path, "timeout");
                out.timeout = self.duration(n, &p);
                if out.at == ApproveAt::None && m.get("at").is_some() {
                    self.error(n, &p, "a timeout needs a gate: `at` is `none`");
                }
            }
            return out;
        }
        Approve {
            at: self
                .choice(node, path, &AT)
                .map_or(ApproveAt::None, |s| at(&s)),
            timeout: None,
        }
    }

    /// A file mode.
    pub fn mode(&mut self, node: &Node, path: &str) -> Option<u32> {
        let raw = match &node.data {
            YamlDataOwned::Value(ScalarOwned::Integer(_)) => self.raw(node).to_string(),
            YamlDataOwned::Value(ScalarOwned::String(s)) => s.clone(),
            _ => {
                let found = Self::describe(node);
                self.error(
                    node,
                    path,
                    format!("expected a mode like \"0644\", found {found}"),
                );
                return None;
            }
        };
        match parse_mode(&raw) {
            Ok(m) => Some(m),
            Err(e) => {
                self.error(node, path, e);
                None
            }
        }
    }

    /// A file owner: `user` or `user:group` (a template: checked here when
    /// it is literal, by `render` once rendered otherwise).
    pub fn owner(&mut self, node: &Node, path: &str) -> Option<super::ast::Tmpl> {
        let t = self.template(node, path, super::jinja::Escape::Raw, true)?;
        if t.is_literal()
            && let Err(e) = check_owner(&t.src)
        {
            self.error(node, path, e);
            return None;
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(
            parse_duration("10 parsecs")
                .unwrap_err()
                .contains("bad duration")
        );
    }

    #[test]
    fn modes_are_octal_digits() {
        assert_eq!(parse_mode("0644"), Ok(0o644));
        assert_eq!(parse_mode("644"), Ok(0o644));
        assert_eq!(parse_mode("0o755"), Ok(0o755));
        assert_eq!(parse_mode("4755"), Ok(0o4755));
        assert!(parse_mode("0988").is_err());
        assert!(parse_mode("rw-r--r--").is_err());
        assert!(parse_mode("77777").is_err());
    }

    #[test]
    fn percentages_are_bounded() {
        assert_eq!(parse_percent("25%"), Some(25));
        assert_eq!(parse_percent("100%"), Some(100));
        assert_eq!(parse_percent("101%"), None);
        assert_eq!(parse_percent("25"), None);
    }
}
