//! Bounds on everything that crosses the wire into the controller, each a
//! named constant, each check an error that says the limit. What an agent
//! sends is bounded here too (not only by the agent): a compromised host
//! must not grow the controller's memory or store.

use std::collections::BTreeMap;

/// Largest message an agent may send (a result carries at most
/// [`MAX_STREAM`] of stdout and of stderr).
pub const MAX_AGENT_MESSAGE: usize = 4 << 20;
/// Output kept per stream of a step result (as the agent keeps it).
pub const MAX_STREAM: usize = 1 << 20;
/// Largest live output chunk passed on to watchers.
pub const MAX_CHUNK: usize = 64 << 10;
/// Labels per host.
pub const MAX_LABELS: usize = 64;
/// Facts per host.
pub const MAX_FACTS: usize = 64;
/// Length of a label or fact key.
pub const MAX_KEY: usize = 63;
/// Length of a label value.
pub const MAX_LABEL_VALUE: usize = 255;
/// Length of a fact value.
pub const MAX_FACT_VALUE: usize = 1024;
/// Steps an agent may say it runs in its Hello.
pub const MAX_RUNNING: usize = 4096;
/// Total size of a changeset's files in a plan or apply.
pub const MAX_SOURCES: usize = 16 << 20;
/// `--var` values per request.
pub const MAX_VARS: usize = 1000;
/// Length of one `--var` value.
pub const MAX_VAR_VALUE: usize = 64 << 10;
/// `--secret`s per request.
pub const MAX_SECRETS: usize = 64;
/// Length of one `--secret` value.
pub const MAX_SECRET_VALUE: usize = 64 << 10;
/// `modi plan --diff`: files larger than this are not compared (the agent
/// sends at most this much of one).
pub const MAX_DIFF_FILE: u64 = 1 << 20;
/// `modi plan --diff`: at most this many `file` steps are compared in one
/// plan (the rest are listed as not compared).
pub const MAX_DIFFS: usize = 2000;

/// A limit that was passed, for people.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what}: {detail}")]
pub struct TooMuch {
    /// What was checked ("Hello facts", "label role").
    pub what: String,
    /// How it broke the limit.
    pub detail: String,
}

fn too_much(what: impl Into<String>, detail: String) -> TooMuch {
    TooMuch {
        what: what.into(),
        detail,
    }
}

fn check_key(what: &str, key: &str) -> Result<(), TooMuch> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(too_much(
            what,
            format!("key {key:?} must be 1 to {MAX_KEY} characters of A-Z a-z 0-9 . _ - /"),
        ))
    }
}

/// Checks a set of key/value pairs against a count and a value length.
pub fn check_map(
    what: &str,
    map: &BTreeMap<String, String>,
    max_count: usize,
    max_value: usize,
) -> Result<(), TooMuch> {
    if map.len() > max_count {
        return Err(too_much(
            what,
            format!("{} given; at most {max_count}", map.len()),
        ));
    }
    for (k, v) in map {
        check_key(what, k)?;
        if v.len() > max_value || v.chars().any(char::is_control) {
            return Err(too_much(
                format!("{what} {k}"),
                format!(
                    "the value must be at most {max_value} bytes without control characters ({} bytes given)",
                    v.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Checks host labels.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), TooMuch> {
    check_map("labels", labels, MAX_LABELS, MAX_LABEL_VALUE)
}

/// Checks facts an agent reports.
pub fn check_facts(facts: &BTreeMap<String, String>) -> Result<(), TooMuch> {
    check_map("facts", facts, MAX_FACTS, MAX_FACT_VALUE)
}

/// Cuts `text` to at most `max` bytes (on a character boundary); returns
/// how many bytes were cut.
pub fn truncate(text: &mut String, max: usize) -> u64 {
    if text.len() <= max {
        return 0;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = (text.len() - cut) as u64;
    text.truncate(cut);
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_bounded_in_count_key_and_value() {
        let ok = BTreeMap::from([("role".to_string(), "web".to_string())]);
        assert!(check_labels(&ok).is_ok());
        let many: BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let e = check_labels(&many).unwrap_err();
        assert!(e.to_string().contains("at most 64"), "{e}");
        let long = BTreeMap::from([("k".to_string(), "x".repeat(MAX_LABEL_VALUE + 1))]);
        assert!(check_labels(&long).unwrap_err().to_string().contains("255"));
        let bad_key = BTreeMap::from([("a b".to_string(), "v".to_string())]);
        assert!(check_labels(&bad_key).is_err());
        let control = BTreeMap::from([("k".to_string(), "\u{1b}[31m".to_string())]);
        assert!(check_facts(&control).is_err());
    }

    #[test]
    fn truncation_keeps_whole_characters_and_counts_the_rest() {
        let mut s = "aé".repeat(10);
        let dropped = truncate(&mut s, 4);
        assert_eq!(s, "aéa");
        assert_eq!(dropped, 30 - 4);
        let mut short = "abc".to_string();
        assert_eq!(truncate(&mut short, 10), 0);
    }
}
