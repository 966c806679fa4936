//! Every field and enum value of the API's messages has a comment: the
//! .proto files are the schema any client reads, so nothing in them may
//! be left to guess.

use std::path::Path;

/// `(line number, line)` of every field or enum value with no comment on
/// the line before it (or at its end).
fn uncommented(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut previous = "";
    let mut depth = 0usize;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let opens = line.matches('{').count();
        let closes = line.matches('}').count();
        let declaration = ["message ", "enum ", "oneof ", "service ", "rpc "]
            .iter()
            .any(|k| line.starts_with(k));
        let field = depth > 0
            && !declaration
            && line.ends_with(';')
            && line.contains('=')
            && !line.starts_with("reserved")
            && !line.starts_with("option")
            && !line.starts_with("//");
        if field && !previous.starts_with("//") && !line.contains("//") {
            out.push((i + 1, line.to_string()));
        }
        depth = (depth + opens).saturating_sub(closes);
        if !line.is_empty() {
            previous = line;
        }
    }
    out
}

#[test]
fn every_admin_field_and_enum_value_is_commented() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/modi/v1");
    let mut missing = Vec::new();
    for file in ["admin.proto", "run.proto"] {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        for (line, what) in uncommented(&text) {
            missing.push(format!("{file}:{line}: {what}"));
        }
    }
    assert!(
        missing.is_empty(),
        "fields and enum values without a comment:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_check_finds_an_uncommented_field() {
    let text = "message A {\n  // The name.\n  string name = 1;\n  uint32 age = 2;\n}\n";
    assert_eq!(uncommented(text), vec![(4, "uint32 age = 2;".to_string())]);
}
