//! The malformed-changeset corpus (`testdata/bad/`): one mistake per file
//! (`multiple_errors.yaml` has several). Each file starts with a comment
//! saying what is wrong and one `# expect: FILE:LINE:COL: PATH: MESSAGE`
//! line per diagnostic, in order; the diagnostics must be exactly these
//! (each expected line is a prefix of the diagnostic, so long messages may
//! be cut short). Files under `inc/` are only ever included.

use std::collections::BTreeMap;

use crate::changeset::{Diagnostics, collect_sources, validate};

macro_rules! files {
    ($($name:literal,)*) => {
        &[$(($name, include_str!(concat!("../testdata/bad/", $name))),)*]
    };
}

const CASES: &[(&str, &str)] = files![
    "backout_unreachable.yaml",
    "bad_approve_timeout.yaml",
    "bad_batches.yaml",
    "bad_duration.yaml",
    "bad_env_name.yaml",
    "bad_mode.yaml",
    "bad_on_failure.yaml",
    "bad_owner.yaml",
    "bad_regex.yaml",
    "bad_selector.yaml",
    "batches_without_rolling.yaml",
    "cel_syntax.yaml",
    "cel_undefined_var_field.yaml",
    "cel_unknown_function.yaml",
    "cel_unknown_variable.yaml",
    "duplicate_change_name.yaml",
    "duplicate_yaml_key.yaml",
    "empty_file.yaml",
    "file_with_env.yaml",
    "foreach_empty.yaml",
    "foreach_item_key.yaml",
    "foreach_item_missing_param.yaml",
    "host_attribute.yaml",
    "include_loop.yaml",
    "include_missing.yaml",
    "include_with_hosts.yaml",
    "interact_without_run.yaml",
    "invalid_yaml.yaml",
    "max_failures_without_continue.yaml",
    "max_parallel_serial.yaml",
    "missing_change_name.yaml",
    "missing_hosts.yaml",
    "multiple_errors.yaml",
    "name_not_string.yaml",
    "nested_file_error.yaml",
    "no_apply.yaml",
    "no_step_kind.yaml",
    "requires_cycle.yaml",
    "requires_self.yaml",
    "requires_unknown.yaml",
    "reserved_variable.yaml",
    "retry_below_minus_one.yaml",
    "rolling_without_batches.yaml",
    "secret_declared_and_set.yaml",
    "secret_not_given.yaml",
    "template_param_unset.yaml",
    "template_phase_conflict.yaml",
    "template_syntax_in_block.yaml",
    "two_step_kinds.yaml",
    "undefined_variable.yaml",
    "unknown_change_key.yaml",
    "unknown_filter.yaml",
    "unknown_template.yaml",
    "unknown_top_key.yaml",
    "variable_cycle.yaml",
    "when_unknown_field.yaml",
    "with_unknown_param.yaml",
    "with_without_use.yaml",
    "zero_timeout.yaml",
];

const INCLUDED: &[(&str, &str)] = files!["inc/broken.yaml", "inc/loop_b.yaml", "inc/ok.yaml",];

fn run(name: &str) -> Diagnostics {
    let files: BTreeMap<&str, &str> = CASES.iter().chain(INCLUDED).copied().collect();
    let mut read = |path: &str| {
        files
            .get(path)
            .map(|t| t.to_string())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
    };
    match collect_sources(name, &mut read)
        .and_then(|s| validate(&s, &BTreeMap::new(), &Default::default()))
    {
        Ok(_) => Diagnostics::default(),
        Err(d) => d,
    }
}

fn expectations(text: &str) -> Vec<&str> {
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(str::trim_end)
        .collect()
}

#[test]
fn every_malformed_changeset_is_reported_exactly() {
    assert!(CASES.len() >= 30, "the corpus has {} cases", CASES.len());
    let mut failures = Vec::new();
    for (name, text) in CASES {
        let expected = expectations(text);
        assert!(!expected.is_empty(), "{name} has no `# expect:` line");
        let actual: Vec<String> = run(name).iter().map(|d| d.to_string()).collect();
        let matches = actual.len() == expected.len()
            && actual.iter().zip(&expected).all(|(a, e)| a.starts_with(e));
        if !matches {
            failures.push(format!(
                "{name}:\n  expected:\n    {}\n  actual:\n    {}",
                expected.join("\n    "),
                actual.join("\n    ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn several_errors_in_one_file_are_all_reported() {
    let (name, _) = CASES
        .iter()
        .find(|(n, _)| *n == "multiple_errors.yaml")
        .expect("in the corpus");
    assert!(run(name).len() >= 5);
}
