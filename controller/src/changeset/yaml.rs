//! Reading YAML with positions. saphyr's marked nodes carry a span, so every
//! node read here knows its file, line and column; the reader adds the field
//! path and turns every type mismatch or unknown key into a [`Diagnostic`]
//! (and carries on, so several problems are reported at once).

use saphyr::{LoadableYamlNode, MarkedYamlOwned, ScalarOwned, YamlDataOwned};

use super::diag::{Diagnostic, suggestion};
use crate::spec::Location;

/// A YAML node with its span.
pub(crate) type Node = MarkedYamlOwned;

/// `path.key` (or `key` at the top).
pub(crate) fn key_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// `path[i]`.
pub(crate) fn index_path(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// Parses one file into its single YAML document. `Ok(None)` for an empty
/// file.
pub(crate) fn load(file: &str, text: &str) -> Result<Option<Node>, Diagnostic> {
    let at = |line: usize, col: usize| Location {
        file: file.to_string(),
        line: line as u32,
        column: col as u32 + 1,
        path: String::new(),
    };
    let mut docs = Node::load_from_str(text).map_err(|e| {
        Diagnostic::new(
            at(e.marker().line(), e.marker().col()),
            format!("invalid YAML: {}", e.info()),
        )
    })?;
    if docs.len() > 1 {
        let s = docs[1].span.start;
        return Err(Diagnostic::new(
            at(s.line(), s.col()),
            format!(
                "expected one YAML document, found {} (remove the `---` separators)",
                docs.len()
            ),
        ));
    }
    Ok(docs
        .pop()
        .filter(|d| !matches!(d.data, YamlDataOwned::Value(ScalarOwned::Null))))
}

/// The entries of a mapping node, in file order.
pub(crate) struct Map<'n> {
    /// The mapping node itself.
    pub node: &'n Node,
    /// (key, key node, value node).
    pub entries: Vec<(String, &'n Node, &'n Node)>,
}

impl<'n> Map<'n> {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries.iter().find(|(k, _, _)| k == key).map(|e| e.2)
    }

    /// The key node of `key`, if present.
    pub fn key_node(&self, key: &str) -> Option<&'n Node> {
        self.entries.iter().find(|(k, _, _)| k == key).map(|e| e.1)
    }

    /// Is `key` present?
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }
}

/// Reads the nodes of one file, collecting diagnostics.
pub(crate) struct Reader<'a> {
    /// The file, as named in the sources.
    pub file: &'a str,
    text: &'a str,
    /// Byte offset of each char (plus one past the end), to cut raw text.
    offsets: Vec<usize>,
    /// Problems found so far.
    pub diags: Vec<Diagnostic>,
}

impl<'a> Reader<'a> {
    /// A reader for `file` whose text is `text`.
    pub fn new(file: &'a str, text: &'a str) -> Reader<'a> {
        let mut offsets: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        offsets.push(text.len());
        Reader {
            file,
            text,
            offsets,
            diags: Vec::new(),
        }
    }

    /// Where `node` is.
    pub fn loc(&self, node: &Node, path: &str) -> Location {
        Location {
            file: self.file.to_string(),
            line: node.span.start.line().max(1) as u32,
            column: node.span.start.col() as u32 + 1,
            path: path.to_string(),
        }
    }

    /// Records a problem at `node`.
    pub fn error(&mut self, node: &Node, path: &str, message: impl Into<String>) {
        let loc = self.loc(node, path);
        self.diags.push(Diagnostic::new(loc, message));
    }

    /// Records a problem at a location.
    pub fn error_at(&mut self, location: Location, message: impl Into<String>) {
        self.diags.push(Diagnostic::new(location, message));
    }

    /// The source text of `node` as written.
    pub fn raw(&self, node: &Node) -> &'a str {
        let last = self.offsets.len() - 1;
        let start = self.offsets[node.span.start.index().min(last)];
        let end = self.offsets[node.span.end.index().min(last)];
        if start <= end {
            &self.text[start..end]
        } else {
            ""
        }
    }

    /// Is `node` a quoted scalar (so its content starts one column later)?
    pub fn is_quoted(&self, node: &Node) -> bool {
        matches!(self.raw(node).chars().next(), Some('"' | '\''))
    }

    /// "a mapping", "a string", ... for messages.
    pub fn describe(node: &Node) -> &'static str {
        match &node.data {
            YamlDataOwned::Mapping(_) => "a mapping",
            YamlDataOwned::Sequence(_) => "a list",
            YamlDataOwned::Value(ScalarOwned::String(_)) => "a string",
            YamlDataOwned::Value(ScalarOwned::Integer(_)) => "an integer",
            YamlDataOwned::Value(ScalarOwned::FloatingPoint(_)) => "a number",
            YamlDataOwned::Value(ScalarOwned::Boolean(_)) => "a boolean",
            YamlDataOwned::Value(ScalarOwned::Null) => "nothing (null)",
            YamlDataOwned::Tagged(..) => "a tagged value",
            _ => "an unreadable value",
        }
    }

    fn mismatch(&mut self, node: &Node, path: &str, expected: &str) {
        let found = Self::describe(node);
        self.error(node, path, format!("expected {expected}, found {found}"));
    }

    /// A mapping whose keys must all be in `allowed` (an unknown key is
    /// reported, with a suggestion, and skipped).
    pub fn map<'n>(&mut self, node: &'n Node, path: &str, allowed: &[&str]) -> Option<Map<'n>> {
        let map = self.any_map(node, path)?;
        let mut entries = Vec::with_capacity(map.entries.len());
        for (key, knode, value) in map.entries {
            if allowed.contains(&key.as_str()) {
                entries.push((key, knode, value));
            } else {
                let hint = suggestion(&key, allowed.iter().copied());
                let msg = if hint.is_empty() {
                    format!(
                        "unknown key `{key}` (expected one of: {})",
                        allowed.join(", ")
                    )
                } else {
                    format!("unknown key `{key}`{hint}")
                };
                self.error(knode, &key_path(path, &key), msg);
            }
        }
        Some(Map { node, entries })
    }

    /// A mapping with any string keys.
    pub fn any_map<'n>(&mut self, node: &'n Node, path: &str) -> Option<Map<'n>> {
        let YamlDataOwned::Mapping(m) = &node.data else {
            self.mismatch(node, path, "a mapping");
            return None;
        };
        let mut entries = Vec::with_capacity(m.len());
        for (k, v) in m {
            match &k.data {
                YamlDataOwned::Value(ScalarOwned::String(s)) => entries.push((s.clone(), k, v)),
                YamlDataOwned::Value(ScalarOwned::Integer(i)) => {
                    entries.push((i.to_string(), k, v))
                }
                _ => {
                    let found = Self::describe(k);
                    self.error(k, path, format!("expected a string key, found {found}"));
                }
            }
        }
        Some(Map { node, entries })
    }

    /// A list.
    pub fn list<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.data {
            YamlDataOwned::Sequence(s) => Some(s),
            _ => {
                self.mismatch(node, path, "a list");
                None
            }
        }
    }

    /// A string (quoted or plain; numbers and booleans are refused).
    pub fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.data {
            YamlDataOwned::Value(ScalarOwned::String(s)) => Some(s.clone()),
            _ => {
                self.mismatch(node, path, "a string");
                None
            }
        }
    }

    /// A string, or a number or boolean taken as the text it prints as.
    pub fn scalar_text(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.data {
            YamlDataOwned::Value(ScalarOwned::String(s)) => Some(s.clone()),
            YamlDataOwned::Value(ScalarOwned::Integer(i)) => Some(i.to_string()),
            YamlDataOwned::Value(ScalarOwned::FloatingPoint(f)) => Some(f.to_string()),
            YamlDataOwned::Value(ScalarOwned::Boolean(b)) => Some(b.to_string()),
            _ => {
                self.mismatch(node, path, "a string");
                None
            }
        }
    }

    /// An integer.
    pub fn int(&mut self, node: &Node, path: &str) -> Option<i64> {
        match &node.data {
            YamlDataOwned::Value(ScalarOwned::Integer(i)) => Some(*i),
            _ => {
                self.mismatch(node, path, "an integer");
                None
            }
        }
    }

    /// A string or a list of strings (`requires: a` or `requires: [a, b]`),
    /// each with its node.
    pub fn names<'n>(&mut self, node: &'n Node, path: &str) -> Vec<(String, &'n Node, String)> {
        match &node.data {
            YamlDataOwned::Value(ScalarOwned::String(s)) => {
                vec![(s.clone(), node, path.to_string())]
            }
            YamlDataOwned::Sequence(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let p = index_path(path, i);
                    if let Some(s) = self.string(item, &p) {
                        out.push((s, item, p));
                    }
                }
                out
            }
            _ => {
                self.mismatch(node, path, "a name or a list of names");
                Vec::new()
            }
        }
    }
}

/// Is this node YAML null (`~`, `null` or nothing)?
pub(crate) fn is_null(node: &Node) -> bool {
    matches!(node.data, YamlDataOwned::Value(ScalarOwned::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_paths_are_built() {
        let text = "a: 1\nb:\n  c: [x, \"y\"]\n";
        let doc = load("f.yaml", text).unwrap().unwrap();
        let mut r = Reader::new("f.yaml", text);
        let top = r.map(&doc, "", &["a", "b"]).unwrap();
        let b = r.map(top.get("b").unwrap(), "b", &["c"]).unwrap();
        let c = r.list(b.get("c").unwrap(), "b.c").unwrap();
        assert_eq!(
            r.loc(&c[1], &index_path("b.c", 1)).to_string(),
            "f.yaml:3:10 (b.c[1])"
        );
        assert!(r.is_quoted(&c[1]));
        assert!(!r.is_quoted(&c[0]));
        assert!(r.diags.is_empty());
    }

    #[test]
    fn unknown_keys_and_type_mismatches_are_reported_and_skipped() {
        let text = "nmae: x\nb: [1]\n";
        let doc = load("f.yaml", text).unwrap().unwrap();
        let mut r = Reader::new("f.yaml", text);
        let top = r.map(&doc, "", &["name", "b"]).unwrap();
        assert!(r.string(top.get("b").unwrap(), "b").is_none());
        let all: Vec<String> = r.diags.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            all,
            vec![
                "f.yaml:1:1: nmae: unknown key `nmae`; did you mean `name`?",
                "f.yaml:2:4: b: expected a string, found a list",
            ]
        );
    }

    #[test]
    fn bad_yaml_and_several_documents_are_errors() {
        let e = load("f.yaml", "a: [1, 2\n").unwrap_err();
        assert!(e.to_string().starts_with("f.yaml:2:1: invalid YAML"), "{e}");
        let e = load("f.yaml", "a: 1\n---\nb: 2\n").unwrap_err();
        assert!(e.to_string().contains("expected one YAML document"), "{e}");
        assert!(load("f.yaml", "").unwrap().is_none());
        assert!(load("f.yaml", "# nothing\n").unwrap().is_none());
    }

    #[test]
    fn raw_text_keeps_what_was_written() {
        let text = "mode: 0644\n";
        let doc = load("f.yaml", text).unwrap().unwrap();
        let mut r = Reader::new("f.yaml", text);
        let m = r.any_map(&doc, "").unwrap();
        assert_eq!(r.raw(m.get("mode").unwrap()), "0644");
    }
}
