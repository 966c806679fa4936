//! Rendering: namespaces, selection, expansion, every step kind.

use serde_json::json;

use super::{command, host, plan, plan_files, vars};
use crate::spec::{Amount, FILE_TMP_PLACEHOLDER, RolloutMode, StepAction};

fn web_fleet() -> Vec<crate::spec::HostInfo> {
    vec![
        host("web-2", &[("role", "web"), ("zone", "b")]),
        host("db-1", &[("role", "db")]),
        host("web-1", &[("role", "web"), ("zone", "a")]),
    ]
}

#[test]
fn namespace_precedence_is_inventory_host_changeset_change_with_item_cli() {
    let text = r#"
name: ns
vars: { a: changeset, b: changeset, c: changeset, d: changeset, e: changeset }
templates:
  t:
    vars: { c: ~, d: ~, e: ~ }
    apply:
      - run: echo {{ z }} {{ a }} {{ b }} {{ c }} {{ d }} {{ e }} {{ host.name }}
changes:
  - name: x
    hosts: web-1
    vars: { b: change, c: change, d: change, e: change }
    use: t
    with: { c: with, d: with, e: with }
    foreach:
      - { d: item, e: item }
"#;
    let spec = plan_files(
        &[("cs.yaml", text)],
        &web_fleet(),
        &json!({"z": "inventory", "a": "inventory"}),
        &vars(&[("e", "cli")]),
    )
    .unwrap();
    let h = &spec.changes[0].hosts[0];
    assert_eq!(
        command(&h.apply[0]),
        "echo inventory changeset change with item cli web-1"
    );
    assert_eq!(h.vars["item"], json!({"d": "item", "e": "item"}));
    assert!(!h.vars.contains_key("host"));
}

#[test]
fn variables_are_templates_evaluated_against_the_final_namespace() {
    let text = r#"
name: ns
vars:
  url: "https://{{ domain }}/v{{ version }}/{{ host.name }}"
  domain: example.org
  version: "1"
changes:
  - name: x
    hosts: all
    apply: [ { run: "curl {{ url }}" } ]
"#;
    let spec = plan(text, &[host("h1", &[])], &[("version", "2")]).unwrap();
    let h = &spec.changes[0].hosts[0];
    assert_eq!(command(&h.apply[0]), "curl https://example.org/v2/h1");
    assert_eq!(h.vars["url"], json!("https://example.org/v2/h1"));
}

#[test]
fn template_defaults_may_use_parameters() {
    let text = r#"
name: t
templates:
  restart:
    vars: { service: ~, unit: "{{ service }}.service" }
    apply: [ { run: "systemctl restart {{ unit }}" } ]
changes:
  - name: x
    hosts: all
    use: restart
    with: { service: nginx }
"#;
    let spec = plan(text, &[host("h1", &[])], &[]).unwrap();
    assert_eq!(
        command(&spec.changes[0].hosts[0].apply[0]),
        "systemctl restart nginx.service"
    );
}

#[test]
fn hosts_are_selected_in_name_order_or_as_listed_and_none_is_fine() {
    let text = r#"
name: sel
changes:
  - name: by-label
    hosts: role=web
    apply: [ { run: "true" } ]
  - name: by-name
    hosts: [web-2, db-1]
    apply: [ { run: "true" } ]
  - name: nobody
    hosts: role=cache
    apply: [ { run: "true" } ]
"#;
    let spec = plan(text, &web_fleet(), &[]).unwrap();
    let names = |i: usize| {
        spec.changes[i]
            .hosts
            .iter()
            .map(|h| h.host.name.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(0), ["web-1", "web-2"]);
    assert_eq!(names(1), ["web-2", "db-1"]);
    assert!(names(2).is_empty());
}

#[test]
fn an_undefined_label_fails_at_render_naming_line_and_host() {
    let text = "name: r\nchanges:\n  - name: x\n    hosts: all\n    apply:\n      - run: |\n          echo start\n          echo {{ host.labels.zone }}\n";
    // No host of the change has the label: the changeset is wrong.
    let db_only = vec![
        host("db-1", &[("role", "db")]),
        host("db-2", &[("role", "db")]),
    ];
    let err = plan(text, &db_only, &[]).unwrap_err().to_string();
    assert!(
        err.starts_with("cs.yaml:8:19: changes[0].apply[0].run: undefined variable: `host.labels.zone` is undefined"),
        "{err}"
    );
    assert!(err.contains("(change `x`, host `db-"), "{err}");
    assert_eq!(
        err.lines().count(),
        1,
        "reported once, not once per host: {err}"
    );
    // Some hosts have it: the others fail alone, saying why.
    let spec = plan(text, &web_fleet(), &[]).unwrap();
    let db = spec.changes[0]
        .hosts
        .iter()
        .find(|h| h.host.name == "db-1")
        .unwrap();
    assert!(db.apply.is_empty());
    match &db.check[0].action {
        crate::spec::StepAction::Unrenderable { reason } => {
            assert!(
                reason.contains("host.labels.zone") && reason.contains("on db-1"),
                "{reason}"
            );
            assert!(reason.contains("cs.yaml:8:19"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let web = spec.changes[0]
        .hosts
        .iter()
        .find(|h| h.host.name == "web-1")
        .unwrap();
    assert_eq!(web.apply.len(), 1);
}

#[test]
fn foreach_unrolls_in_order_and_dependents_wait_for_the_last_item() {
    let text = r#"
name: fe
changes:
  - name: first
    hosts: all
    apply: [ { run: "true" } ]
  - name: each
    requires: first
    hosts: all
    foreach: [a, b, c]
    apply: [ { run: "echo {{ item }}" } ]
  - name: after
    requires: each
    hosts: all
    apply: [ { run: "true" } ]
"#;
    let spec = plan(text, &[host("h", &[])], &[]).unwrap();
    let names: Vec<&str> = spec.changes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["first", "each[0]", "each[1]", "each[2]", "after"]);
    let req: Vec<Vec<usize>> = spec.changes.iter().map(|c| c.requires.clone()).collect();
    assert_eq!(req, [vec![], vec![0], vec![1], vec![2], vec![3]]);
    assert_eq!(command(&spec.changes[2].hosts[0].apply[0]), "echo b");
}

#[test]
fn includes_flatten_into_groups() {
    let root = r#"
name: root
vars: { version: "3", owner: root }
changes:
  - name: prep
    hosts: all
    apply: [ { run: "true" } ]
  - name: db
    requires: prep
    include: sub/db.yaml
    with: { owner: including-change }
  - name: done
    requires: db
    hosts: all
    apply: [ { run: "true" } ]
"#;
    let nested = r#"
name: db
on_failure: backout_all
vars: { owner: nested-default, version: nested-default }
changes:
  - name: backup
    hosts: role=db
    apply: [ { run: "echo {{ version }} {{ owner }}" } ]
  - name: migrate
    requires: backup
    hosts: role=db
    apply: [ { run: "true" } ]
  - name: analyze
    hosts: role=db
    apply: [ { run: "true" } ]
"#;
    let spec = plan_files(
        &[("top/root.yaml", root), ("top/sub/db.yaml", nested)],
        &web_fleet(),
        &serde_json::Value::Null,
        &vars(&[]),
    )
    .unwrap();
    let names: Vec<&str> = spec.changes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["prep", "db/backup", "db/migrate", "db/analyze", "done"]
    );
    let req: Vec<Vec<usize>> = spec.changes.iter().map(|c| c.requires.clone()).collect();
    assert_eq!(req, [vec![], vec![0], vec![1], vec![0], vec![1, 2, 3]]);
    assert_eq!(spec.groups.len(), 1);
    assert_eq!(spec.groups[0].name, "db");
    assert_eq!(spec.groups[0].file, "top/sub/db.yaml");
    assert_eq!(
        spec.groups[0].on_failure,
        crate::spec::ChangesetFailure::BackoutAll
    );
    assert_eq!(spec.changes[1].group, Some(0));
    // The nested file's own vars beat the parent's, the include's `with` beats both.
    assert_eq!(
        command(&spec.changes[1].hosts[0].apply[0]),
        "echo nested-default including-change"
    );
}

#[test]
fn every_step_kind_renders_with_the_right_escaping() {
    let text = r#"
name: kinds
vars: { who: "a b", path: "/etc/my app.conf" }
changes:
  - name: x
    hosts: all
    apply:
      - file:
          path: "{{ path }}"
          content: "owner={{ who }}\n"
          mode: 0640
          owner: root:adm
          validate: "check-conf --file {{ file.tmp }} --for {{ who }} {{ file.path }}"
      - argv: [useradd, -c, "{{ who }}", bob]
        env: { GREETING: "hello {{ who }}", N: 3 }
        cwd: "/srv/{{ host.name }}"
        user: root
        stdin: "{{ who }}\n"
        timeout: 30s
      - run: passwd {{ who }}
        interact:
          - { expect: "password:", send: "{{ who }}\n", timeout: 5s }
    backout:
      - run: userdel bob
"#;
    let spec = plan(text, &[host("h1", &[])], &[]).unwrap();
    let h = &spec.changes[0].hosts[0];
    let StepAction::File(f) = &h.apply[0].action else {
        panic!("file")
    };
    assert_eq!(f.path, "/etc/my app.conf");
    assert_eq!(f.content, "owner=a b\n");
    assert_eq!(f.mode, Some(0o640));
    assert_eq!(f.owner.as_deref(), Some("root:adm"));
    assert_eq!(
        f.validate.as_deref(),
        Some(
            format!("check-conf --file {FILE_TMP_PLACEHOLDER} --for 'a b' '/etc/my app.conf'")
                .as_str()
        )
    );
    let s = &h.apply[1];
    assert_eq!(
        s.action,
        StepAction::Argv {
            argv: vec!["useradd".into(), "-c".into(), "a b".into(), "bob".into()]
        }
    );
    assert_eq!(s.env["GREETING"], "hello a b");
    assert_eq!(s.env["N"], "3");
    assert_eq!(s.cwd.as_deref(), Some("/srv/h1"));
    assert_eq!(s.stdin.as_deref(), Some("a b\n"));
    assert_eq!(s.timeout, Some(std::time::Duration::from_secs(30)));
    let StepAction::Interact { command, script } = &h.apply[2].action else {
        panic!("interact")
    };
    assert_eq!(command, "passwd 'a b'");
    assert_eq!(script[0].send, "a b\n");
    assert_eq!(script[0].timeout, Some(std::time::Duration::from_secs(5)));
    assert_eq!(h.backout.len(), 1);
    assert!(h.backout[0].when.is_none());
    assert_eq!(super::command(&h.backout[0].steps[0]), "userdel bob");
    assert_eq!(h.apply[1].location.path, "changes[0].apply[1]");
    assert_eq!(h.apply[1].location.line, 14);
}

#[test]
fn policies_are_copied_into_the_spec() {
    let text = r#"
name: p
changes:
  - name: x
    hosts: all
    rollout: { mode: rolling, batches: [1, "25%"], pause: 1s }
    on_failure: continue
    retry: { max_retries: -1 }
    approve: { at: each_host, timeout: 1h }
    apply: [ { run: "true" } ]
"#;
    let fleet: Vec<_> = (0..9).map(|i| host(&format!("h{i}"), &[])).collect();
    let spec = plan(text, &fleet, &[]).unwrap();
    let c = &spec.changes[0];
    assert_eq!(c.rollout.mode, RolloutMode::Rolling);
    assert_eq!(c.rollout.batches, [Amount::Count(1), Amount::Percent(25)]);
    assert_eq!(
        c.batches(),
        [vec![0], vec![1, 2, 3], vec![4, 5, 6], vec![7, 8]]
    );
    assert_eq!(c.retry.max_retries, -1);
    assert_eq!(c.retry.delay, std::time::Duration::ZERO);
    assert_eq!(
        c.approve.timeout,
        Some(std::time::Duration::from_secs(3600))
    );
}

#[test]
fn cli_vars_may_not_hide_host() {
    let text = "name: c\nchanges:\n  - name: x\n    hosts: all\n    apply: [ { run: \"true\" } ]\n";
    let err = plan(text, &[host("h", &[])], &[("host", "x")])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "<command line>:1:1: --var host: `host` is reserved: templates see the host as `host`"
    );
}

#[test]
fn inventory_vars_can_be_made_known_to_validation() {
    let text = "name: c\nchanges:\n  - name: x\n    hosts: all\n    apply: [ { run: \"echo {{ dc }}\" } ]\n";
    let err = plan(text, &[host("h", &[])], &[]).unwrap_err().to_string();
    assert!(err.contains("undefined variable `dc`"), "{err}");
    let spec = plan_files(
        &[("cs.yaml", text)],
        &[host("h", &[])],
        &json!({"dc": "fra1"}),
        &vars(&[]),
    )
    .unwrap();
    assert_eq!(command(&spec.changes[0].hosts[0].apply[0]), "echo fra1");
}
