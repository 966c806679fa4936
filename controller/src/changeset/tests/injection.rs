//! Values are data: whatever a variable, label or `--var` holds, a `run`
//! command passes it to the program as one argument, byte for byte, and the
//! shell never executes any of it.

use std::path::Path;
use std::process::Command;

use proptest::prelude::*;

use super::{command, host, vars};
use crate::changeset::{Sources, render, validate};
use crate::spec::HostInfo;

/// Runs `cmd` with `/bin/sh -c` in `dir`; returns its stdout.
fn sh(cmd: &str, dir: &Path) -> Vec<u8> {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn hostile(dir: &Path) -> Vec<String> {
    let x = dir.join("x");
    let x = x.display();
    vec![
        format!("'; touch {x} #"),
        format!("$(touch {x})"),
        format!("a\ntouch {x}"),
        format!("`touch {x}`"),
        format!("\"; touch {x}; echo \""),
        format!("it's \"quoted\" & {{ braces }} | touch {x}"),
        format!("\\$(touch {x}) \\ ~ * ?"),
        "-n".to_string(),
        String::new(),
        "  spaces  around  ".to_string(),
    ]
}

/// The value, put in by each route: `--var`, a changeset var, a host label,
/// and a changeset var that reads the label.
const CHANGESET: &str = r#"
name: injection
vars:
  from_changeset: VALUE
  via_label: "{{ host.labels.evil }}"
changes:
  - name: x
    hosts: all
    apply:
      - run: printf %s {{ from_cli }}
      - run: printf %s {{ from_changeset }}
      - run: printf %s {{ host.labels.evil }}
      - run: printf %s {{ via_label }}
"#;

fn yaml_string(v: &str) -> String {
    serde_json::to_string(v).expect("a JSON string is a YAML string")
}

#[test]
fn hostile_values_reach_the_program_as_one_argument_and_run_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    for value in hostile(dir.path()) {
        let text = CHANGESET.replace("VALUE", &yaml_string(&value));
        let cli = vars(&[("from_cli", value.as_str())]);
        let cs = validate(
            &Sources::single("cs.yaml", &text),
            &cli,
            &Default::default(),
        )
        .expect("valid");
        let evil = host("h1", &[("evil", value.as_str())]);
        let spec = render(&cs, &[evil], &Default::default(), &cli).expect("renders");
        for step in &spec.changes[0].hosts[0].apply {
            let out = sh(command(step), dir.path());
            assert_eq!(String::from_utf8_lossy(&out), value, "{}", command(step));
        }
        assert!(!dir.path().join("x").exists(), "{value:?} ran a command");
    }
}

#[test]
fn safe_inserts_raw_text_on_purpose() {
    let text = "name: s\nvars: { flags: \"-v -x\" }\nchanges:\n  - name: x\n    hosts: all\n    apply:\n      - run: ls {{ flags | safe }} {{ flags }}\n";
    let cs = validate(
        &Sources::single("cs.yaml", text),
        &vars(&[]),
        &Default::default(),
    )
    .unwrap();
    let spec = render(&cs, &[host("h", &[])], &Default::default(), &vars(&[])).unwrap();
    assert_eq!(
        command(&spec.changes[0].hosts[0].apply[0]),
        "ls -v -x '-v -x'"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_value_round_trips_through_sh(value in "[^\u{0}]{0,40}") {
        let text = "name: p\nchanges:\n  - name: x\n    hosts: all\n    apply:\n      - run: printf %s {{ v }}\n";
        let cli = vars(&[("v", value.as_str())]);
        let cs = validate(&Sources::single("cs.yaml", text), &cli, &Default::default()).expect("valid");
        let hosts = [HostInfo { name: "h".into(), ..HostInfo::default() }];
        let spec = render(&cs, &hosts, &Default::default(), &cli).expect("renders");
        let dir = tempfile::tempdir().expect("temp dir");
        let out = sh(command(&spec.changes[0].hosts[0].apply[0]), dir.path());
        prop_assert_eq!(out, value.as_bytes().to_vec());
        prop_assert_eq!(std::fs::read_dir(dir.path()).expect("readable").count(), 0);
    }
}
