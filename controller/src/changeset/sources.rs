//! The files of a changeset: the root file and every file it `include`s,
//! read by the caller (the module does no I/O) and shipped as [`Sources`].

use std::collections::BTreeMap;

use saphyr::{ScalarOwned, YamlDataOwned};
use serde::{Deserialize, Serialize};

use super::diag::{Diagnostic, Diagnostics, finish};
use super::yaml::{self, Node};
use crate::spec::Location;

/// A changeset's files: the root and everything it includes, by path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sources {
    /// The top-level file, as the operator named it.
    pub root: String,
    /// Every file's text, by path (include paths resolved relative to the
    /// including file).
    pub files: BTreeMap<String, String>,
}

impl Sources {
    /// Sources made of one file.
    pub fn single(root: &str, text: &str) -> Sources {
        Sources {
            root: root.to_string(),
            files: BTreeMap::from([(root.to_string(), text.to_string())]),
        }
    }
}

/// Resolves `target` as written in an `include:` of `including`: relative
/// paths are relative to the including file's directory. Purely lexical
/// (`a/./b/../c` → `a/c`); the file system is never consulted.
pub fn resolve_include(including: &str, target: &str) -> String {
    let joined = if target.starts_with('/') {
        target.to_string()
    } else {
        match including.rfind('/') {
            Some(i) => format!("{}/{target}", &including[..i]),
            None => target.to_string(),
        }
    };
    let absolute = joined.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&p) if p != ".." => {
                    parts.pop();
                }
                _ if absolute => {}
                _ => parts.push(".."),
            },
            p => parts.push(p),
        }
    }
    let body = parts.join("/");
    if absolute { format!("/{body}") } else { body }
}

/// The `include:` entries of a parsed file: (path as written, its node).
pub(crate) fn includes(top: &Node) -> Vec<(String, &Node)> {
    let YamlDataOwned::Mapping(m) = &top.data else {
        return Vec::new();
    };
    let Some((_, changes)) = m.iter().find(|(k, _)| k.data.as_str() == Some("changes")) else {
        return Vec::new();
    };
    let YamlDataOwned::Sequence(items) = &changes.data else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        if let YamlDataOwned::Mapping(c) = &item.data
            && let Some((_, inc)) = c.iter().find(|(k, _)| k.data.as_str() == Some("include"))
            && let YamlDataOwned::Value(ScalarOwned::String(path)) = &inc.data
        {
            out.push((path.clone(), inc));
        }
    }
    out
}

/// The message for an include loop: the chain of files, back to the start.
pub(crate) fn loop_message(chain: &[String], again: &str) -> String {
    let start = chain.iter().position(|f| f == again).unwrap_or(0);
    let mut names: Vec<&str> = chain[start..].iter().map(String::as_str).collect();
    names.push(again);
    format!("include loop: {}", names.join(" -> "))
}

/// Reads `root` and, following `include:`, every file it needs, with `read`
/// (the caller's file access). Include loops and unreadable files are
/// reported at the `include:` that leads to them; a file that is not valid
/// YAML is kept as it is, for `validate` to report.
pub fn collect_sources(
    root: &str,
    read: &mut dyn FnMut(&str) -> std::io::Result<String>,
) -> Result<Sources, Diagnostics> {
    let mut sources = Sources {
        root: root.to_string(),
        files: BTreeMap::new(),
    };
    let mut diags = Vec::new();
    match read(root) {
        Ok(text) => {
            let mut chain = vec![root.to_string()];
            follow(root, text, read, &mut sources, &mut chain, &mut diags);
        }
        Err(e) => {
            let loc = Location {
                file: root.to_string(),
                line: 1,
                column: 1,
                path: String::new(),
            };
            diags.push(Diagnostic::new(
                loc,
                format!("cannot read the changeset: {e}"),
            ));
        }
    }
    finish(sources, diags)
}

fn follow(
    file: &str,
    text: String,
    read: &mut dyn FnMut(&str) -> std::io::Result<String>,
    sources: &mut Sources,
    chain: &mut Vec<String>,
    diags: &mut Vec<Diagnostic>,
) {
    let top = yaml::load(file, &text).ok().flatten();
    sources.files.insert(file.to_string(), text);
    let Some(top) = top else {
        return;
    };
    for (target, node) in includes(&top) {
        let resolved = resolve_include(file, &target);
        let loc = Location {
            file: file.to_string(),
            line: node.span.start.line() as u32,
            column: node.span.start.col() as u32 + 1,
            path: String::new(),
        };
        if chain.contains(&resolved) {
            diags.push(Diagnostic::new(loc, loop_message(chain, &resolved)));
            continue;
        }
        if sources.files.contains_key(&resolved) {
            continue;
        }
        match read(&resolved) {
            Ok(text) => {
                chain.push(resolved.clone());
                follow(&resolved, text, read, sources, chain, diags);
                chain.pop();
            }
            Err(e) => diags.push(Diagnostic::new(
                loc,
                format!("cannot read included file `{resolved}`: {e}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_paths_are_relative_to_the_including_file() {
        assert_eq!(
            resolve_include("examples/nested.yaml", "db-migrate.yaml"),
            "examples/db-migrate.yaml"
        );
        assert_eq!(resolve_include("nested.yaml", "sub/x.yaml"), "sub/x.yaml");
        assert_eq!(resolve_include("a/b/c.yaml", "../d.yaml"), "a/d.yaml");
        assert_eq!(resolve_include("a/c.yaml", "../../d.yaml"), "../d.yaml");
        assert_eq!(resolve_include("a/c.yaml", "/etc/d.yaml"), "/etc/d.yaml");
        assert_eq!(resolve_include("/x/c.yaml", "./y/../d.yaml"), "/x/d.yaml");
    }

    fn reader(files: &[(&str, &str)]) -> impl FnMut(&str) -> std::io::Result<String> {
        let files: BTreeMap<String, String> = files
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |p: &str| {
            files
                .get(p)
                .cloned()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "not found"))
        }
    }

    #[test]
    fn follows_includes_once_each() {
        let mut read = reader(&[
            (
                "top/a.yaml",
                "changes:\n  - name: x\n    include: b.yaml\n  - name: y\n    include: sub/c.yaml\n",
            ),
            (
                "top/b.yaml",
                "changes:\n  - name: z\n    include: sub/c.yaml\n",
            ),
            ("top/sub/c.yaml", "name: c\n"),
        ]);
        let s = collect_sources("top/a.yaml", &mut read).unwrap();
        assert_eq!(
            s.files.keys().collect::<Vec<_>>(),
            ["top/a.yaml", "top/b.yaml", "top/sub/c.yaml"]
        );
    }

    #[test]
    fn loops_and_missing_files_point_at_the_include() {
        let mut read = reader(&[
            (
                "a.yaml",
                "changes:\n  - name: x\n    include: b.yaml\n  - name: y\n    include: gone.yaml\n",
            ),
            ("b.yaml", "changes:\n  - name: z\n    include: a.yaml\n"),
        ]);
        let err = collect_sources("a.yaml", &mut read)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "a.yaml:5:14: cannot read included file `gone.yaml`: not found\n\
             b.yaml:3:14: include loop: a.yaml -> b.yaml -> a.yaml"
        );
        let err = collect_sources("nope.yaml", &mut read)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "nope.yaml:1:1: cannot read the changeset: not found");
    }
}
