//! Secrets' values on the controller.
//!
//! A secret (`modi apply --secret NAME=...`) is known to the changeset
//! language by name only: rendered steps hold `<secret NAME>` placeholders
//! and `"$MODI_SECRET_NAME"` references, and so does everything journaled,
//! planned or shown. The values live here, in the memory of the run's
//! driver, and go out only inside a dispatch (`RunStep.secrets`) to the
//! agent that runs a step using them. A controller restart loses them: the
//! run then waits, paused with reason `secrets`, until `modi resume RUN
//! --secret ...` gives them again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use crate::limits::{MAX_SECRET_VALUE, MAX_SECRETS};

/// A secret's value. It prints as `<secret value>` (`Debug` included), so
/// it cannot slip into a log by accident; [`SecretValue::expose`] is the
/// one way to the text.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Arc<str>);

impl SecretValue {
    /// The value, checked: not empty, no NUL byte (it becomes an
    /// environment variable), at most [`MAX_SECRET_VALUE`].
    pub fn new(value: String) -> Result<SecretValue, String> {
        if value.is_empty() {
            return Err("the value is empty".into());
        }
        if value.len() > MAX_SECRET_VALUE {
            return Err(format!(
                "the value is {} bytes, more than the limit of {MAX_SECRET_VALUE}",
                value.len()
            ));
        }
        if value.contains('\0') {
            return Err("the value holds a NUL byte, which no environment variable can".into());
        }
        Ok(SecretValue(value.into()))
    }

    /// The value itself. Only the dispatch to an agent reads it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret value>")
    }
}

/// Secrets by name.
pub type Secrets = BTreeMap<String, SecretValue>;

/// The secrets of a request, checked (count, each value): what the admin
/// service turns `--secret`s into. An error names the secret.
pub fn from_request(given: BTreeMap<String, String>) -> Result<Secrets, String> {
    if given.len() > MAX_SECRETS {
        return Err(format!(
            "{} secrets given, more than the limit of {MAX_SECRETS}",
            given.len()
        ));
    }
    given
        .into_iter()
        .map(|(name, value)| {
            SecretValue::new(value)
                .map(|v| (name.clone(), v))
                .map_err(|why| format!("--secret {name}: {why}"))
        })
        .collect()
}

/// The part of `all` that `names` asks for (a dispatch carries only the
/// secrets its step uses), or the first name missing from `all`.
pub fn subset(all: &Secrets, names: &BTreeSet<String>) -> Result<Secrets, String> {
    names
        .iter()
        .map(|n| {
            all.get(n)
                .map(|v| (n.clone(), v.clone()))
                .ok_or_else(|| n.clone())
        })
        .collect()
}

/// `a, b and c`, each in backticks.
pub fn list(names: &BTreeSet<String>) -> String {
    let names: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_never_prints() {
        let v = SecretValue::new("hunter2".into()).unwrap();
        assert_eq!(format!("{v:?}"), "<secret value>");
        let all: Secrets = [("pw".to_string(), v)].into();
        assert!(!format!("{all:?}").contains("hunter2"));
        assert_eq!(all["pw"].expose(), "hunter2");
    }

    #[test]
    fn values_are_checked_and_the_error_names_the_secret() {
        let bad = |v: &str| from_request([("pw".to_string(), v.to_string())].into()).unwrap_err();
        assert!(bad("").contains("--secret pw: the value is empty"));
        assert!(bad("a\0b").contains("NUL"));
        assert!(bad(&"x".repeat(MAX_SECRET_VALUE + 1)).contains("limit"));
        let many: BTreeMap<String, String> = (0..=MAX_SECRETS)
            .map(|i| (format!("s{i}"), "v".to_string()))
            .collect();
        assert!(from_request(many).unwrap_err().contains("limit of 64"));
    }

    #[test]
    fn subset_takes_what_a_step_uses_or_names_what_is_missing() {
        let all =
            from_request([("a".into(), "1".into()), ("b".into(), "2".into())].into()).unwrap();
        let want: BTreeSet<String> = ["a".to_string()].into();
        assert_eq!(subset(&all, &want).unwrap().len(), 1);
        let want: BTreeSet<String> = ["a".to_string(), "c".to_string()].into();
        assert_eq!(subset(&all, &want).unwrap_err(), "c");
        let three: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        assert_eq!(list(&three), "`a`, `b` and `c`");
    }
}
