//! The changeset language against real agents: hostile values stay data,
//! `file` steps back themselves out byte for byte, `interact` answers a
//! real program, `foreach` runs in order.

use std::os::unix::fs::PermissionsExt;

use modi_tests::{Agent, Controller, host_states};

/// Values that would run `touch MARKER` if they reached a shell unquoted.
fn hostile(marker: &str) -> Vec<String> {
    vec![
        format!("'; touch {marker} #"),
        format!("$(touch {marker})"),
        format!("`touch {marker}`"),
        format!("x\ntouch {marker}"),
        format!("\"; touch {marker}; echo \""),
    ]
}

#[test]
fn variables_and_labels_are_data_never_code() {
    let ctl = Controller::start();
    let marker = ctl.root.join("pwned");
    let marker = marker.to_str().unwrap();
    let label = format!("$(touch {marker})");
    let agent = Agent::join(&ctl, "target", &[("evil", &label)]);
    let file = ctl.changeset(
        "inject.yaml",
        r#"
name: injection
vars:
  from_changeset: "{{ from_cli }}"
changes:
  - name: echo
    hosts: all
    apply:
      - run: printf '%s\n' {{ from_cli }} > cli.txt
      - run: printf '%s\n' {{ from_changeset }} > var.txt
      - run: printf '%s\n' {{ host.labels.evil }} > label.txt
"#,
    );
    for value in hostile(marker) {
        let (code, status) = ctl.apply(&file, &["--var", &format!("from_cli={value}")]);
        assert_eq!(code, 0, "{value:?}: {status}");
        assert!(
            !std::path::Path::new(marker).exists(),
            "{value:?} ran as code"
        );
        for f in ["cli.txt", "var.txt"] {
            let printed = std::fs::read_to_string(agent.work().join(f)).unwrap();
            assert_eq!(printed, format!("{value}\n"), "{f} for {value:?}");
        }
        let printed = std::fs::read_to_string(agent.work().join("label.txt")).unwrap();
        assert_eq!(printed, format!("{label}\n"));
    }
}

#[test]
fn a_file_step_is_backed_out_to_the_exact_previous_bytes_and_mode() {
    let ctl = Controller::start();
    let agent = Agent::join(&ctl, "files", &[]);
    let path = agent.work().join("app.conf");
    let before: Vec<u8> = b"# old config\n\x00\xffbinary tail\n".to_vec();
    std::fs::write(&path, &before).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let fresh = agent.work().join("fresh.conf");

    let file = ctl.changeset(
        "files.yaml",
        r#"
name: config-with-bad-verify
changes:
  - name: push
    hosts: all
    apply:
      - file: { path: app.conf, content: "listen 8080\n", mode: "0600" }
      - file: { path: fresh.conf, content: "new file\n" }
    verify:
      - run: grep -q 'listen 9090' app.conf
"#,
    );
    let (code, status) = ctl.apply(&file, &[]);
    assert_eq!(code, 1, "{status}");
    // Only file steps were applied: they are backed out with no backout
    // written.
    assert_eq!(
        host_states(&status, "push")["files"],
        "backout_ok",
        "{status}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640);
    assert!(
        !fresh.exists(),
        "a file the change created is removed again"
    );
}

#[test]
fn interact_answers_a_real_interactive_program() {
    let ctl = Controller::start();
    let agent = Agent::join(&ctl, "tty", &[]);
    // A program that insists on a terminal and asks two questions.
    std::fs::write(
        agent.work().join("setup.sh"),
        r#"#!/bin/sh
[ -t 0 ] || { echo "not a terminal" >&2; exit 9; }
printf 'Database user: '
read user
printf 'Really create %s? [y/N] ' "$user"
read answer
[ "$answer" = y ] || exit 1
echo "$user" > created-user
echo "created $user"
"#,
    )
    .unwrap();
    let file = ctl.changeset(
        "interact.yaml",
        r#"
name: interactive-setup
changes:
  - name: setup
    hosts: all
    apply:
      - run: sh setup.sh
        interact:
          - { expect: "Database user: ", send: "{{ user }}\n" }
          - { expect: "\\[y/N\\]", send: "y\n", timeout: 5s }
        timeout: 30s
        expect: exit_code == 0 && stdout.contains("created " + vars.user)
"#,
    );
    let (code, status) = ctl.apply(&file, &["--var", "user=app_rw"]);
    assert_eq!(code, 0, "{status}");
    assert_eq!(
        std::fs::read_to_string(agent.work().join("created-user")).unwrap(),
        "app_rw\n"
    );
    let runs = ctl.json(&["runs"]);
    let run = runs[0]["run"].as_str().unwrap();
    let logs = ctl.modi(&["logs", run]);
    assert!(
        logs.ok().contains("Really create app_rw? [y/N]"),
        "the transcript is kept: {logs:?}"
    );
}

#[test]
fn foreach_runs_the_body_once_per_item_in_order() {
    let ctl = Controller::start();
    let agents: Vec<Agent> = ["a", "b"]
        .iter()
        .map(|n| Agent::join(&ctl, n, &[]))
        .collect();
    let file = ctl.changeset(
        "foreach.yaml",
        r#"
name: services
templates:
  enable:
    vars: { service: ~, port: 80 }
    apply:
      - run: printf '%s:%s\n' {{ service }} {{ port }} >> order.txt
changes:
  - name: enable
    hosts: all
    rollout: { mode: parallel }
    use: enable
    foreach:
      - { service: web, port: 8080 }
      - { service: worker }
      - { service: cron, port: 0 }
  - name: after
    hosts: all
    requires: [enable]
    apply:
      - run: echo done >> order.txt
"#,
    );
    let (code, status) = ctl.apply(&file, &[]);
    assert_eq!(code, 0, "{status}");
    for a in &agents {
        let order = std::fs::read_to_string(a.work().join("order.txt")).unwrap();
        assert_eq!(
            order, "web:8080\nworker:80\ncron:0\ndone\n",
            "on {}",
            a.name
        );
    }
}

#[test]
fn validate_and_plan_catch_mistakes_before_any_host_is_touched() {
    let ctl = Controller::start();
    let agent = Agent::join(&ctl, "untouched", &[("role", "web")]);
    let file = ctl.changeset(
        "bad.yaml",
        r#"
name: typo
changes:
  - name: upgrade
    hosts: role=web
    apply:
      - run: touch touched-{{ versoin }}
    verify:
      - run: "true"
        expect: exit_code = 0
"#,
    );
    let path = file.to_str().unwrap();
    for args in [
        vec!["validate", path],
        vec!["plan", path],
        vec!["apply", path],
    ] {
        let out = ctl.modi(&args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("bad.yaml:7:"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stderr.contains("changes[0].apply[0]"), "{}", out.stderr);
        assert!(out.stderr.contains("versoin"), "{}", out.stderr);
        assert!(
            out.stderr.contains("changes[0].verify[0].expect"),
            "{}",
            out.stderr
        );
    }
    assert_eq!(
        std::fs::read_dir(agent.work())
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    assert!(ctl.json(&["runs"]).as_array().unwrap().is_empty());

    // plan shows every rendered command per host, and touches nothing.
    let good = ctl.changeset(
        "good.yaml",
        "name: ok\nchanges:\n  - name: hi\n    hosts: role=web\n    apply:\n      - run: echo {{ host.name }} {{ greeting }}\n",
    );
    let plan = ctl.modi(&["plan", good.to_str().unwrap(), "--var", "greeting=it's me"]);
    assert!(
        plan.ok().contains(r#"echo untouched "it's me""#),
        "{plan:?}"
    );
    let json = ctl.json(&["plan", good.to_str().unwrap(), "--var", "greeting=x"]);
    assert_eq!(json["batches"][0][0][0], "untouched");
    assert!(ctl.json(&["runs"]).as_array().unwrap().is_empty());
}
