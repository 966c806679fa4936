//! What the controller believes after the handshake: labels it owns,
//! named operators with roles and an audit trail, tokens with uses and a
//! maximum lifetime, certificates that renew themselves, private files,
//! and host output that cannot drive the operator's terminal.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use modi_tests::{Agent, Controller, eventually, host_states};

fn names(hosts: &[modi_tests::Value]) -> Vec<String> {
    hosts
        .iter()
        .map(|h| h["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn selected(ctl: &Controller, selector: &str) -> Vec<String> {
    names(ctl.json(&["hosts", selector]).as_array().unwrap())
}

#[test]
fn labels_belong_to_the_controller_not_to_the_agent() {
    let ctl = Controller::start();
    let mut web = Agent::join(&ctl, "web-1", &[("role", "web")]);
    let db = Agent::join(&ctl, "db-1", &[("role", "db")]);
    // The web host's agent.toml claims the db tier after enrolment.
    web.stop();
    let toml = web.dir.join("agent.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(text.contains("role = \"web\""), "{text}");
    std::fs::write(&toml, text.replace("role = \"web\"", "role = \"db\"")).unwrap();
    web.start();
    eventually!(20, ctl.connected("web-1"), "web-1 is back");
    assert_eq!(selected(&ctl, "role=db"), ["db-1"]);
    assert!(
        ctl.log()
            .contains("agent reported labels other than its own"),
        "the claim is logged"
    );
    let file = ctl.changeset(
        "db.yaml",
        "name: db\nchanges:\n  - name: migrate\n    hosts: role=db\n    rollout: { mode: parallel }\n    apply:\n      - run: touch migrated\n",
    );
    let (code, status) = ctl.apply(&file, &[]);
    assert_eq!(code, 0, "{status}");
    assert_eq!(
        host_states(&status, "migrate").keys().collect::<Vec<_>>(),
        ["db-1"]
    );
    assert!(db.work().join("migrated").exists());
    assert!(
        !web.work().join("migrated").exists(),
        "the web host got nothing of the db tier"
    );

    // An operator moves it.
    ctl.modi(&["hosts", "label", "web-1", "role=db", "zone=a"])
        .ok();
    let mut both = selected(&ctl, "role=db");
    both.sort();
    assert_eq!(both, ["db-1", "web-1"]);
    ctl.modi(&["hosts", "label", "web-1", "zone-"]).ok();
    assert!(selected(&ctl, "zone=a").is_empty());

    // Labels named on the token win over the join's.
    let t = ctl.json(&["token", "create", "--label", "role=cache"]);
    let token = modi_tests::Token {
        token: t["token"].as_str().unwrap().into(),
        ca_sha256: t["ca_sha256"].as_str().unwrap().into(),
        controller: t["controller"].as_str().unwrap().into(),
    };
    let dir = ctl.root.join("agents").join("c-1");
    Agent::join_cmd(&token, "c-1", &dir, &[("role", "web")]).ok();
    assert_eq!(selected(&ctl, "role=cache"), ["c-1"]);
}

#[test]
fn tokens_have_uses_a_maximum_lifetime_a_list_and_can_be_revoked() {
    let ctl = Controller::start();
    let refused = ctl.modi(&["token", "create", "--ttl", "100000d"]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(refused.stderr.contains("max_token_ttl"), "{refused:?}");
    let zero = ctl.modi(&["token", "create", "--ttl", "0s"]);
    assert_eq!(zero.code, 2, "{zero:?}");

    let t = ctl.json(&["token", "create", "--uses", "2"]);
    let token = modi_tests::Token {
        token: t["token"].as_str().unwrap().into(),
        ca_sha256: t["ca_sha256"].as_str().unwrap().into(),
        controller: t["controller"].as_str().unwrap().into(),
    };
    let join = |name: &str| Agent::join_cmd(&token, name, &ctl.root.join("agents").join(name), &[]);
    join("a").ok();
    join("b").ok();
    let third = join("c");
    assert_ne!(third.code, 0, "a third host with a 2-use token: {third:?}");
    assert!(third.stderr.contains("already used"), "{third:?}");

    let id = t["id"].as_str().unwrap().to_string();
    let listed = ctl.json(&["token", "list"]);
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(entry["used_by"], serde_json::json!(["a", "b"]), "{entry}");

    let open = ctl.json(&["token", "create", "--uses", "5"]);
    let open_id = open["id"].as_str().unwrap();
    ctl.modi(&["token", "revoke", open_id]).ok();
    let token = modi_tests::Token {
        token: open["token"].as_str().unwrap().into(),
        ca_sha256: open["ca_sha256"].as_str().unwrap().into(),
        controller: open["controller"].as_str().unwrap().into(),
    };
    let late = Agent::join_cmd(&token, "d", &ctl.root.join("agents").join("d"), &[]);
    assert_ne!(late.code, 0, "{late:?}");
    assert!(late.stderr.contains("revoked"), "{late:?}");
}

/// `modi operator add` as the admin; the bundle's `cli.toml`.
pub(crate) fn add_operator(ctl: &Controller, name: &str, role: &str) -> PathBuf {
    let dir = ctl.root.join(format!("op-{name}"));
    let out = ctl.modi(&[
        "operator",
        "add",
        name,
        "--role",
        role,
        "--out",
        dir.to_str().unwrap(),
    ]);
    out.ok();
    let mode = std::fs::metadata(dir.join(format!("{name}.key")))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "an operator's key is private");
    dir.join("cli.toml")
}

pub(crate) fn modi_as(ctl: &Controller, config: &Path, args: &[&str]) -> modi_tests::Out {
    modi_tests::run(
        std::process::Command::new(modi_tests::bin("modi"))
            .arg("--cli-config")
            .arg(config)
            .args(args)
            .current_dir(&ctl.root),
    )
}

#[test]
fn operators_have_roles_their_decisions_carry_their_names_and_everything_is_audited() {
    let ctl = Controller::start();
    let _agent = Agent::join(&ctl, "w1", &[]);
    let viewer = add_operator(&ctl, "vera", "viewer");
    let operator = add_operator(&ctl, "otto", "operator");
    let file = ctl.changeset(
        "gated.yaml",
        "name: gated\nchanges:\n  - name: c\n    hosts: all\n    approve: once\n    apply:\n      - run: touch done\n",
    );

    // A viewer reads, but may not apply: exit 4.
    modi_as(&ctl, &viewer, &["hosts"]).ok();
    modi_as(&ctl, &viewer, &["runs"]).ok();
    let denied = modi_as(
        &ctl,
        &viewer,
        &["apply", file.to_str().unwrap(), "--detach"],
    );
    assert_eq!(denied.code, 4, "{denied:?}");
    assert!(
        denied.stderr.contains("needs the operator role"),
        "{denied:?}"
    );
    let denied = modi_as(&ctl, &viewer, &["token", "create"]);
    assert_eq!(denied.code, 4, "{denied:?}");

    // An operator applies and approves; the decision names it.
    let out = modi_as(
        &ctl,
        &operator,
        &[
            "--output",
            "json",
            "apply",
            file.to_str().unwrap(),
            "--detach",
        ],
    );
    let run = out.json()["run"].as_str().unwrap().to_string();
    ctl.wait_state(&run, "awaiting_approval");
    modi_as(&ctl, &operator, &["approve", &run]).ok();
    let status = ctl.wait_final(&run);
    assert_eq!(status["state"], "success", "{status}");
    assert_eq!(status["decisions"][0]["by"], "otto", "{status}");
    // But may not manage operators.
    let denied = modi_as(
        &ctl,
        &operator,
        &["operator", "add", "x", "--role", "admin"],
    );
    assert_eq!(denied.code, 4, "{denied:?}");

    // Revoked: refused at the next call.
    ctl.modi(&["operator", "revoke", "otto"]).ok();
    let gone = modi_as(&ctl, &operator, &["runs"]);
    assert_eq!(gone.code, 4, "{gone:?}");
    assert!(gone.stderr.contains("revoked"), "{gone:?}");
    let listed = ctl.json(&["operator", "list"]);
    let otto = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "otto")
        .unwrap()
        .clone();
    assert_eq!(otto["revoked"], true);

    // The audit journal: who did what, allowed or not.
    let audit = ctl.json(&["audit"]);
    let rows: Vec<(String, String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["operator"].as_str().unwrap().to_string(),
                e["method"].as_str().unwrap().to_string(),
                e["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let has = |who: &str, what: &str, ok: bool| {
        rows.iter()
            .any(|(o, m, r)| o == who && m == what && (r == "ok") == ok)
    };
    assert!(has("admin", "AddOperator", true), "{rows:?}");
    assert!(
        has("vera", "Apply", false),
        "a refusal is audited: {rows:?}"
    );
    assert!(has("otto", "Apply", true), "{rows:?}");
    assert!(has("otto", "Control", true), "{rows:?}");
    assert!(has("admin", "RevokeOperator", true), "{rows:?}");
    assert!(
        !rows.iter().any(|(_, m, _)| m == "ListRuns"),
        "reads are not audited: {rows:?}"
    );
    let text = ctl.modi(&["audit"]).stdout;
    assert!(
        text.contains("otto (operator)") && text.contains("run "),
        "{text}"
    );
}

#[test]
fn an_agent_renews_its_certificate_over_its_session() {
    let ctl = Controller::start_with("agent_cert_lifetime = \"9s\"");
    let _agent = Agent::join(&ctl, "short", &[]);
    let host = |ctl: &Controller| {
        ctl.hosts()
            .into_iter()
            .find(|h| h["name"] == "short")
            .unwrap()
    };
    assert_eq!(host(&ctl)["certificates"], 1);
    // Two thirds of 9 s: a new certificate at about 6 s, while connected.
    eventually!(
        20,
        host(&ctl)["certificates"].as_u64() >= Some(2),
        "a renewed certificate is recorded"
    );
    eventually!(10, ctl.connected("short"), "connected with it");
    // And it keeps working past the first certificate's end.
    std::thread::sleep(std::time::Duration::from_secs(4));
    let file = ctl.changeset(
        "after.yaml",
        "name: after\nchanges:\n  - name: c\n    hosts: all\n    apply:\n      - run: \"true\"\n",
    );
    let (code, status) = ctl.apply(&file, &[]);
    assert_eq!(code, 0, "{status}");
}

#[test]
fn data_dirs_are_private_even_when_they_existed_and_host_output_cannot_drive_a_terminal() {
    let root = tempfile::Builder::new()
        .prefix("modi-e2e-")
        .tempdir()
        .unwrap();
    let data = root.path().join("controller");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut ctl = Controller::init_in(root.path(), "");
    ctl.serve();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("ca.key")), 0o600);

    let agent_dir = root.path().join("agents").join("t1");
    std::fs::create_dir_all(&agent_dir).unwrap();
    std::fs::set_permissions(&agent_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut agent = Agent::enrol(&ctl, "t1", &[]);
    assert_eq!(mode(&agent_dir), 0o700);
    agent.start();
    eventually!(20, ctl.connected("t1"), "t1 connects");

    let file = ctl.changeset(
        "esc.yaml",
        "name: esc\nchanges:\n  - name: c\n    hosts: all\n    apply:\n      - run: printf 'before\\033[2Jafter\\n'\n",
    );
    let run = ctl.detach(&file, &[]);
    assert_eq!(ctl.wait_final(&run)["state"], "success");
    let text = ctl.modi(&["logs", &run]).stdout;
    assert!(text.contains("before\\x1b[2Jafter"), "{text:?}");
    assert!(
        !text.contains('\u{1b}'),
        "no raw escape reaches the terminal"
    );
    let json = ctl.modi(&["--output", "json", "logs", &run]).stdout;
    assert!(
        json.contains("\\u001b[2J"),
        "JSON keeps the raw text: {json}"
    );
}
