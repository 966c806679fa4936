//! Secrets in the language: known by name only, rendered as placeholders
//! and environment references, refused where they would be shown or
//! pasted into a command line.

use std::collections::BTreeSet;
use std::process::Command;

use super::{command, host, vars};
use crate::changeset::{Diagnostics, Sources, render, validate};
use crate::spec::{RunSpec, Step, StepAction};

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Validates and renders `text` for one host with `--secret`s `secrets`
/// (names only: the language never sees a value).
fn plan_with(text: &str, secrets: &[&str]) -> Result<RunSpec, Diagnostics> {
    let cli = vars(&[]);
    let cs = validate(&Sources::single("cs.yaml", text), &cli, &names(secrets))?;
    render(&cs, &[host("h1", &[])], &Default::default(), &cli)
}

fn apply(spec: &RunSpec) -> &[Step] {
    &spec.changes[0].hosts[0].apply
}

/// What `/bin/sh -c command` prints with `MODI_SECRET_pw` set as the
/// agent sets it.
fn sh(command: &str, value: &str) -> String {
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .env("MODI_SECRET_pw", value)
        .output()
        .expect("sh runs");
    assert!(out.status.success(), "{command}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

const EVIL: &str = "p@ss w0rd'\"$(touch /tmp/modi-pwned) `id` *";

#[test]
fn in_run_a_secret_is_read_from_the_environment_as_one_word() {
    let spec = plan_with(
        r#"
name: s
secrets: [pw]
vars: { dsn: "u:{{ pw }}@db" }
changes:
  - name: c
    hosts: all
    apply:
      - run: printf '%s\n' {{ pw }}
      - run: printf '%s\n' {{ dsn }} {{ [pw, "a b"] | args }}
      - run: echo plain
"#,
        &["pw"],
    )
    .unwrap();
    let steps = apply(&spec);
    assert_eq!(command(&steps[0]), r#"printf '%s\n' "$MODI_SECRET_pw""#);
    assert_eq!(
        command(&steps[1]),
        r#"printf '%s\n' u:"$MODI_SECRET_pw"@db "$MODI_SECRET_pw" 'a b'"#
    );
    assert_eq!(steps[0].secrets, names(&["pw"]));
    assert_eq!(steps[1].secrets, names(&["pw"]));
    assert!(steps[2].secrets.is_empty());
    // The shell gets the value whole, whatever it holds, and runs none of it.
    assert_eq!(sh(command(&steps[0]), EVIL), format!("{EVIL}\n"));
    assert_eq!(
        sh(command(&steps[1]), EVIL),
        format!("u:{EVIL}@db\n{EVIL}\na b\n")
    );
    // Variables built from it hold the placeholder, as plans show them.
    let vars = &spec.changes[0].hosts[0].vars;
    assert_eq!(vars["pw"], "<secret pw>");
    assert_eq!(vars["dsn"], "u:<secret pw>@db");
    assert_eq!(spec.secrets(), names(&["pw"]));
}

#[test]
fn elsewhere_a_secret_is_a_placeholder_the_agent_fills_in() {
    let spec = plan_with(
        r#"
name: s
changes:
  - name: c
    hosts: all
    apply:
      - argv: [tool, "--token={{ tok }}"]
        env: { PGPASSWORD: "{{ pw }}", LANG: C }
        stdin: "{{ pw }}\n"
      - file: { path: /etc/app.conf, content: "password={{ pw }}\n" }
      - run: passwd app
        interact:
          - { expect: "New password:", send: "{{ pw }}\n" }
"#,
        &["pw", "tok"],
    )
    .unwrap();
    let steps = apply(&spec);
    let StepAction::Argv { argv } = &steps[0].action else {
        panic!("argv")
    };
    assert_eq!(argv[1], "--token=<secret tok>");
    assert_eq!(steps[0].env["PGPASSWORD"], "<secret pw>");
    assert_eq!(steps[0].stdin.as_deref(), Some("<secret pw>\n"));
    assert_eq!(steps[0].secrets, names(&["pw", "tok"]));
    let StepAction::File(f) = &steps[1].action else {
        panic!("file")
    };
    assert_eq!(f.content, "password=<secret pw>\n");
    assert_eq!(steps[1].secrets, names(&["pw"]));
    let StepAction::Interact { script, .. } = &steps[2].action else {
        panic!("interact")
    };
    assert_eq!(script[0].send, "<secret pw>\n");
    assert_eq!(steps[2].secrets, names(&["pw"]));
}

#[test]
fn a_placeholder_text_that_is_no_secret_stays_text() {
    let spec = plan_with(
        r#"
name: s
vars: { note: "<secret pw>" }
changes:
  - name: c
    hosts: all
    apply: [ { run: "echo {{ note }}" } ]
"#,
        &[],
    )
    .unwrap();
    assert_eq!(command(&apply(&spec)[0]), "echo '<secret pw>'");
    assert!(apply(&spec)[0].secrets.is_empty());
}

fn errors(text: &str, secrets: &[&str]) -> String {
    plan_with(text, secrets).unwrap_err().to_string()
}

#[test]
fn a_declared_secret_that_is_not_given_is_named_at_its_line() {
    let text = "name: s\nsecrets: [pw, token]\nchanges:\n  - name: c\n    hosts: all\n    apply: [ { run: \"echo {{ pw }} {{ token }}\" } ]\n";
    let e = errors(text, &["pw"]);
    assert_eq!(
        e,
        "cs.yaml:2:15: secrets[1]: secret `token` is not given: pass it with --secret token=VALUE, token=@FILE or token=env:VAR"
    );
    assert!(plan_with(text, &["pw", "token"]).is_ok());
}

#[test]
fn a_secret_where_it_would_be_kept_or_shown_is_an_error() {
    for (field, step) in [
        ("cwd", r#"{ run: "true", cwd: "/srv/{{ pw }}" }"#),
        ("user", r#"{ run: "true", user: "{{ pw }}" }"#),
        (
            "file.path",
            r#"{ file: { path: "/etc/{{ pw }}", content: x } }"#,
        ),
        (
            "file.owner",
            r#"{ file: { path: /etc/x, content: x, owner: "{{ pw }}" } }"#,
        ),
    ] {
        let text =
            format!("name: s\nchanges:\n  - name: c\n    hosts: all\n    apply:\n      - {step}\n");
        let e = errors(&text, &["pw"]);
        assert!(e.starts_with("cs.yaml:6:"), "{field}: {e}");
        assert!(
            e.contains(&format!("secret `pw` cannot be used in `{field}`")),
            "{field}: {e}"
        );
    }
    let e = errors(
        "name: s\nchanges:\n  - name: c\n    hosts: all\n    apply:\n      - run: \"echo {{ pw | safe }}\"\n",
        &["pw"],
    );
    assert!(e.starts_with("cs.yaml:6:"), "{e}");
    assert!(
        e.contains("would be pasted into the shell command as text"),
        "{e}"
    );
}

#[test]
fn names_are_checked_and_given_one_way() {
    let text = "name: s\nchanges:\n  - name: c\n    hosts: all\n    apply: [ { run: \"echo {{ pw }}\" } ]\n";
    let cs = validate(
        &Sources::single("cs.yaml", text),
        &vars(&[("pw", "x")]),
        &names(&["pw"]),
    );
    assert!(
        cs.unwrap_err()
            .to_string()
            .contains("--secret pw: given both as --var and as --secret")
    );
    let e = errors(text, &["pw", "bad-name"]);
    assert!(e.contains("--secret bad-name: bad variable name"), "{e}");
    let e = errors(
        "name: s\nvars: { pw: x }\nsecrets: [pw, tok, tok]\nchanges:\n  - name: c\n    hosts: all\n    apply: [ { run: \"true\" } ]\n",
        &["pw", "tok"],
    );
    assert!(e.contains("also a variable in `vars`"), "{e}");
    assert!(e.contains("declared twice"), "{e}");
}
