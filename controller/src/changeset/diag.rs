//! Diagnostics: every error of the language points at file:line:col and a
//! field path, and several are reported at once.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::Location;

/// One problem found in a changeset, at the spot it was found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostic {
    /// Where: file, line, column and field path (e.g.
    /// `changes[1].verify[0].expect`).
    pub location: Location,
    /// What is wrong and what was expected.
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic at `location`.
    pub fn new(location: Location, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            location,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    /// `file:line:col: field.path: message` (the path is left out when the
    /// problem is about the whole file).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.location;
        write!(f, "{}:{}:{}: ", l.file, l.line, l.column)?;
        if !l.path.is_empty() {
            write!(f, "{}: ", l.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Diagnostic {}

/// Every problem found, in file order (one per line when displayed).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// The diagnostics, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sorts by file, line, column, path and message and drops exact
    /// duplicates (a template used by several changes reports a problem in
    /// its own text once).
    pub(crate) fn normalized(mut list: Vec<Diagnostic>) -> Diagnostics {
        list.sort_by(|a, b| {
            let (x, y) = (&a.location, &b.location);
            (&x.file, x.line, x.column, &x.path, &a.message)
                .cmp(&(&y.file, y.line, y.column, &y.path, &b.message))
        });
        list.dedup();
        Diagnostics(list)
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl<'a> IntoIterator for &'a Diagnostics {
    type Item = &'a Diagnostic;
    type IntoIter = std::slice::Iter<'a, Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// `Ok(value)` when `diags` is empty, else every diagnostic, sorted.
pub(crate) fn finish<T>(value: T, diags: Vec<Diagnostic>) -> Result<T, Diagnostics> {
    if diags.is_empty() {
        Ok(value)
    } else {
        Err(Diagnostics::normalized(diags))
    }
}

/// The closest candidate to `word`, if one is close enough to be a typo.
pub(crate) fn did_you_mean<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    let limit = (word.chars().count() / 3).max(1);
    let prefix = |c: &str| word.len() >= 3 && c.starts_with(word);
    candidates
        .into_iter()
        .map(|c| {
            (
                if prefix(c) {
                    1
                } else {
                    strsim::damerau_levenshtein(word, c)
                },
                c,
            )
        })
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// `; did you mean `x`?` or nothing.
pub(crate) fn suggestion<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> String {
    match did_you_mean(word, candidates) {
        Some(c) => format!("; did you mean `{c}`?"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(file: &str, line: u32, column: u32, path: &str) -> Location {
        Location {
            file: file.into(),
            line,
            column,
            path: path.into(),
        }
    }

    #[test]
    fn displays_file_line_column_path_and_message() {
        let d = Diagnostic::new(at("a.yaml", 7, 9, "changes[0].retry"), "expected a mapping");
        assert_eq!(
            d.to_string(),
            "a.yaml:7:9: changes[0].retry: expected a mapping"
        );
        let d = Diagnostic::new(at("a.yaml", 1, 1, ""), "empty file");
        assert_eq!(d.to_string(), "a.yaml:1:1: empty file");
    }

    #[test]
    fn normalizes_in_file_order_without_duplicates() {
        let b = Diagnostic::new(at("a.yaml", 9, 1, "x"), "b");
        let a = Diagnostic::new(at("a.yaml", 2, 5, "y"), "a");
        let all = Diagnostics::normalized(vec![b.clone(), a.clone(), b.clone()]);
        assert_eq!(all.0, vec![a, b]);
        assert_eq!(all.to_string().lines().count(), 2);
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(
            did_you_mean("retires", ["retry", "requires"]),
            Some("requires")
        );
        assert_eq!(did_you_mean("verfy", ["verify", "apply"]), Some("verify"));
        assert_eq!(did_you_mean("zzz", ["verify", "apply"]), None);
        assert_eq!(
            did_you_mean("backout", ["halt", "backout_all"]),
            Some("backout_all")
        );
    }
}
