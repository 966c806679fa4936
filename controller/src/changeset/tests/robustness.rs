//! The language never panics on bad input: arbitrary text, and the
//! examples with random damage, always give a result or diagnostics (the
//! cargo-fuzz target in `controller/fuzz` pushes the same idea further).

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::host;
use crate::changeset::{Sources, render, validate};

const SEEDS: &[&str] = &[
    include_str!("../../../../examples/demo.yaml"),
    include_str!("../../../../examples/web-upgrade.yaml"),
    include_str!("../../../../examples/template-foreach.yaml"),
    include_str!("../../../../examples/config-push.yaml"),
];

fn run(text: &str) {
    let cli = BTreeMap::new();
    if let Ok(cs) = validate(&Sources::single("f.yaml", text), &cli, &Default::default()) {
        let fleet = [
            host("web-1", &[("role", "web")]),
            host("db-1", &[("role", "db")]),
        ];
        let _ = render(&cs, &fleet, &Default::default(), &cli);
    }
}

/// `text` with up to 3 chars at `at` replaced by `insert`, kept
/// valid UTF-8.
fn damage(text: &str, at: usize, what: u8, insert: &str) -> String {
    let mut i = at % (text.len() + 1);
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    let mut j = (i + usize::from(what % 4)).min(text.len());
    while !text.is_char_boundary(j) {
        j += 1;
    }
    format!("{}{insert}{}", &text[..i], &text[j..])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        run(&text);
    }

    #[test]
    fn damaged_examples_never_panic(
        seed in 0..SEEDS.len(),
        at in any::<usize>(),
        what in any::<u8>(),
        insert in prop::sample::select(vec!["", ":", "- ", "{{", "}}", "{%", "\n", "  ", "[", "]", "~", "\"", "'", "*a", "&a ", "!!str ", "%", "\t"]),
    ) {
        run(&damage(SEEDS[seed], at, what, insert));
    }
}
