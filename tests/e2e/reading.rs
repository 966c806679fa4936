//! Reading what happened at fleet size: counts first, then only the
//! hosts that need a look; hosts by state with totals; the run id first
//! in JSON; both versions.

use modi_tests::{Agent, Controller};

#[test]
fn status_at_thirty_hosts_prints_counts_and_only_the_failures() {
    let ctl = Controller::start();
    let names: Vec<String> = (0..30).map(|i| format!("f{i:02}")).collect();
    let agents: Vec<Agent> = std::thread::scope(|s| {
        let joins: Vec<_> = names
            .iter()
            .map(|n| s.spawn(|| Agent::join(&ctl, n, &[])))
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    let file = ctl.changeset(
        "fleet.yaml",
        r#"
name: fleet
changes:
  - name: upgrade
    hosts: all
    rollout: { mode: parallel, max_failures: 5 }
    on_failure: continue
    apply:
      - run: test {{ host.name }} != f07 && test {{ host.name }} != f19
"#,
    );
    let run = ctl.detach(&file, &[]);
    ctl.wait_final(&run);
    let text = ctl.modi(&["status", &run]).stdout;
    assert!(text.contains("30 hosts: 2 failed, 28 success"), "{text}");
    let listed: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with('f') && l.contains("failed"))
        .collect();
    assert_eq!(listed.len(), 2, "only the failures: {text}");
    assert!(!text.contains("f00 "), "a success is not listed: {text}");
    let all = ctl.modi(&["status", &run, "--all"]).stdout;
    assert!(all.contains("f00 "), "{all}");
    let one = ctl.json(&["status", &run, "--host", "f07"]);
    assert_eq!(one["changes"][0]["hosts"].as_array().unwrap().len(), 1);
    let failed = ctl.json(&["status", &run, "--state", "failed"]);
    let mut hosts: Vec<&str> = failed["changes"][0]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    hosts.sort();
    assert_eq!(hosts, ["f07", "f19"]);
    drop(agents);
}

#[test]
fn hosts_are_counted_by_state_and_a_removed_host_is_forgotten() {
    let ctl = Controller::start();
    let _up = Agent::join(&ctl, "up", &[]);
    let _never = Agent::enrol(&ctl, "never", &[]);
    let mut gone = Agent::join(&ctl, "gone", &[]);
    gone.stop();
    modi_tests::eventually!(10, !ctl.connected("gone"), "gone is away");
    let text = ctl.modi(&["hosts"]).stdout;
    assert!(
        text.contains("3 hosts: 1 connected, 1 away, 1 never"),
        "{text}"
    );
    let never = ctl.json(&["hosts", "--state", "never"]);
    assert_eq!(never.as_array().unwrap().len(), 1);
    assert_eq!(never[0]["name"], "never");
    ctl.modi(&["agents", "remove", "never"]).ok();
    let names: Vec<String> = ctl
        .hosts()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!names.contains(&"never".to_string()), "{names:?}");

    // The run id comes first in JSON; both versions are told.
    let file = ctl.changeset(
        "one.yaml",
        "name: one\nchanges:\n  - name: c\n    hosts: up\n    apply:\n      - run: \"true\"\n",
    );
    let out = ctl.modi(&["--output", "json", "apply", file.to_str().unwrap()]);
    let first: modi_tests::Value =
        serde_json::from_str(out.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["type"], "started", "{out:?}");
    assert!(first["run"].as_str().is_some());
    let v = ctl.json(&["version"]);
    assert_eq!(v["cli"], v["controller"], "{v}");
}

#[test]
fn logs_attached_mid_step_replay_what_it_printed_then_follow() {
    use std::io::BufRead;
    let ctl = Controller::start();
    let agent = Agent::join(&ctl, "late", &[]);
    let file = ctl.changeset(
        "talk.yaml",
        r#"
name: talk
changes:
  - name: prep
    hosts: all
    apply:
      - run: echo prep-1; echo prep-2; echo prep-3
  - name: talk
    requires: [prep]
    hosts: all
    apply:
      - run: echo early-line; touch spoke; sleep 3; echo later-line
"#,
    );
    let run = ctl.detach(&file, &[]);
    // Attach only after the step printed its first line.
    modi_tests::eventually!(20, agent.work().join("spoke").exists(), "the step spoke");
    let mut follow = std::process::Command::new(modi_tests::bin("modi"))
        .arg("--cli-config")
        .arg(&ctl.cli_config)
        .args(["logs", &run, "--follow", "--change", "talk"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Vec<String> = std::io::BufReader::new(follow.stdout.take().unwrap())
        .lines()
        .map(|l| l.unwrap())
        .collect();
    assert!(follow.wait().unwrap().success());
    let early = lines.iter().position(|l| l.ends_with("] early-line"));
    let later = lines.iter().position(|l| l.ends_with("] later-line"));
    assert!(
        early.is_some() && later.is_some() && early < later,
        "replayed, then followed: {lines:?}"
    );
    // The step's ending, seen live, carries the engine's verdict.
    assert!(
        lines.iter().any(|l| l.contains("-> passed (exit 0)")),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("prep-1")),
        "--change shows one change: {lines:?}"
    );
    let tail = ctl
        .modi(&["logs", &run, "--change", "prep", "--tail", "1"])
        .stdout;
    assert!(
        tail.contains("] prep-3\n") && !tail.contains("] prep-2\n"),
        "{tail}"
    );
}

#[test]
fn warnings_name_an_unread_var_and_an_empty_selector_and_strict_refuses() {
    let ctl = Controller::start();
    let agent = Agent::join(&ctl, "w1", &[("role", "web")]);
    let file = ctl.changeset(
        "warn.yaml",
        r#"
name: warn
changes:
  - name: web
    hosts: role=web
    apply:
      - run: echo {{ version }} > v
  - name: cache
    hosts: role=cache
    apply:
      - run: "true"
"#,
    );
    let f = file.to_str().unwrap();
    let plan = ctl.modi(&["plan", f, "--var", "version=2", "--var", "verison=3"]);
    assert_eq!(plan.code, 0, "{plan:?}");
    assert!(
        plan.stderr
            .contains("warning: --var verison: nothing in the changeset reads it"),
        "{plan:?}"
    );
    assert!(
        plan.stderr
            .contains("change `cache`: its hosts select no host"),
        "{plan:?}"
    );
    assert!(!plan.stderr.contains("--var version:"), "{plan:?}");
    let json = ctl.json(&["plan", f, "--var", "version=2"]);
    assert_eq!(json["warnings"].as_array().unwrap().len(), 1, "{json}");
    let strict = ctl.modi(&["plan", f, "--var", "version=2", "--strict"]);
    assert_eq!(strict.code, 2, "{strict:?}");
    let refused = ctl.modi(&["apply", f, "--var", "version=2", "--strict"]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(refused.stderr.contains("nothing applied"), "{refused:?}");
    assert!(!agent.work().join("v").exists(), "strict applied nothing");
    assert!(ctl.json(&["runs"]).as_array().unwrap().is_empty());
}

/// GET on a plain-HTTP listener; the body.
fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

#[test]
fn the_metrics_endpoint_counts_what_a_run_did() {
    let port = modi_tests::free_port();
    let ctl = Controller::start_with(&format!("metrics_listen = \"127.0.0.1:{port}\""));
    let _a = Agent::join(&ctl, "m1", &[]);
    let _b = Agent::join(&ctl, "m2", &[]);
    let file = ctl.changeset(
        "m.yaml",
        "name: m\nchanges:\n  - name: c\n    hosts: all\n    rollout: { mode: parallel }\n    on_failure: continue\n    apply:\n      - run: test {{ host.name }} = m1\n",
    );
    let run = ctl.detach(&file, &[]);
    ctl.wait_final(&run);
    let body = http_get(port, "/metrics");
    for line in [
        "modi_agents_connected 2",
        "modi_steps_dispatched_total 2",
        "modi_steps_finished_total{outcome=\"exit_0\"} 1",
        "modi_steps_finished_total{outcome=\"exit_nonzero\"} 1",
        "modi_runs{state=\"partial_failure\"} 1",
    ] {
        assert!(body.lines().any(|l| l == line), "{line} in:\n{body}");
    }
    let flushes = body
        .lines()
        .find_map(|l| l.strip_prefix("modi_journal_flush_seconds_count "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(flushes > 0, "{body}");
    assert!(body.contains("modi_step_duration_seconds_bucket"), "{body}");
    let bytes = body
        .lines()
        .find_map(|l| l.strip_prefix("modi_store_bytes "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(bytes > 0, "{body}");
}

#[test]
fn a_fleet_wide_backout_names_the_host_that_caused_it_and_its_stderr() {
    let ctl = Controller::start();
    let _agents: Vec<Agent> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| Agent::join(&ctl, n, &[]))
        .collect();
    let file = ctl.changeset(
        "all.yaml",
        r#"
name: all
changes:
  - name: upgrade
    hosts: all
    rollout: { mode: serial }
    on_failure: backout_all
    apply:
      - run: touch applied
    verify:
      - run: test {{ host.name }} != b2 || { echo "health check failed on port 8080" >&2; exit 3; }
    backout:
      steps:
        - run: rm applied
"#,
    );
    let run = ctl.detach(&file, &[]);
    ctl.wait_final(&run);
    let text = ctl.modi(&["status", &run]).stdout;
    let line = |name: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        line("b1").contains("backed out: b2 failed verify[0]"),
        "{text}"
    );
    assert!(
        line("b2").contains("verify[0]: exited 3")
            && line("b2").contains("stderr: health check failed on port 8080"),
        "{text}"
    );
    assert!(!text.contains("c0.h"), "no internal ids: {text}");
}

#[test]
fn completions_and_man_pages_come_from_the_cli_itself() {
    let ctl = Controller::start();
    let bash = ctl.modi(&["completions", "bash"]);
    assert!(
        bash.ok().contains("complete") && bash.stdout.contains("operator"),
        "{bash:?}"
    );
    let fish = ctl.modi(&["completions", "fish"]).stdout;
    assert!(fish.contains("complete -c modi"), "{fish}");
    let dir = ctl.root.join("man");
    ctl.modi(&["man", "--out", dir.to_str().unwrap()]).ok();
    let apply = std::fs::read_to_string(dir.join("modi-apply.1")).unwrap();
    assert!(apply.contains(".TH") && apply.contains("strict"), "{apply}");
    assert!(dir.join("modi.1").exists());
    assert!(
        !dir.join("modi-agent-run.1").exists(),
        "hidden commands have no page"
    );
}

#[test]
fn plan_groups_hosts_with_the_same_steps_and_says_policies_in_words() {
    let ctl = Controller::start();
    let _agents: Vec<Agent> = ["p1", "p2", "p3", "q1"]
        .iter()
        .map(|n| Agent::join(&ctl, n, &[]))
        .collect();
    let file = ctl.changeset(
        "grouped.yaml",
        r#"
name: grouped
changes:
  - name: roll
    hosts: all
    rollout: { mode: rolling, batches: [1, "50%"], pause: 30s }
    on_failure: continue
    retry: { max_retries: 2, delay: 5s }
    approve: { at: each_batch, timeout: 1h }
    apply:
      - run: echo {{ "same" if host.name != "q1" else "other" }}
"#,
    );
    let text = ctl.modi(&["plan", file.to_str().unwrap()]).stdout;
    for words in [
        "4 hosts, in rolling batches; a failure backs out that host and carries on",
        "tried again 2 times, 5s apart",
        "waits for approval before each batch (a deny after 1h)",
        ", then a pause of 30s",
        "  p1..p3\n",
    ] {
        assert!(text.contains(words), "{words:?} in:\n{text}");
    }
    assert_eq!(
        text.matches("apply[0]").count(),
        2,
        "one block per group:\n{text}"
    );
    assert!(
        !text.contains("Rolling") && !text.contains("Continue"),
        "{text}"
    );
}

#[test]
fn plan_diff_shows_each_file_step_against_the_file_on_its_host() {
    let ctl = Controller::start();
    let agents: Vec<Agent> = ["d1", "d2", "d3"]
        .iter()
        .map(|n| Agent::join(&ctl, n, &[]))
        .collect();
    let _never = Agent::enrol(&ctl, "ghost", &[]);
    let before = "port=80\nname=app\nworkers=4\n";
    for a in &agents[..2] {
        std::fs::write(a.work().join("app.conf"), before).unwrap();
    }
    let file = ctl.changeset(
        "conf.yaml",
        r#"
name: conf
changes:
  - name: app-config
    hosts: all
    apply:
      - file:
          path: app.conf
          content: "port=8080\nname=app\nworkers=4\n"
"#,
    );
    let path = file.to_str().unwrap();
    let text = ctl.modi(&["plan", path, "--diff"]).stdout;
    // d1 and d2 hold the same file: one diff for both.
    assert!(
        text.contains("app-config apply[0] app.conf on d1, d2\n"),
        "{text}"
    );
    assert!(text.contains("\n-port=80\n+port=8080\n"), "{text}");
    assert!(text.contains("--- /dev/null\n"), "{text}");
    assert!(
        text.contains("app-config apply[0] app.conf on d3: new file"),
        "{text}"
    );
    assert!(
        text.contains("on ghost: not compared: ghost is not connected"),
        "{text}"
    );
    let json = ctl.json(&["plan", path, "--diff"]);
    let diffs = json["diffs"].as_array().unwrap();
    assert_eq!(diffs.len(), 4, "{json}");
    let d1 = diffs.iter().find(|d| d["host"] == "d1").unwrap();
    assert!(
        d1["diff"]
            .as_str()
            .unwrap()
            .starts_with("--- d1:app.conf (now)"),
        "{d1}"
    );
    // Read-only: nothing changed on any host.
    for a in &agents[..2] {
        assert_eq!(
            std::fs::read_to_string(a.work().join("app.conf")).unwrap(),
            before
        );
    }
    assert!(!agents[2].work().join("app.conf").exists());
    // Without --diff nothing is read.
    assert!(ctl.json(&["plan", path]).get("diffs").is_none());

    // A viewer may plan, but not read files on hosts.
    let viewer = crate::trust::add_operator(&ctl, "vic", "viewer");
    crate::trust::modi_as(&ctl, &viewer, &["plan", path]).ok();
    let refused = crate::trust::modi_as(&ctl, &viewer, &["plan", path, "--diff"]);
    assert_eq!(refused.code, 4, "{refused:?}");
    assert!(refused.stderr.contains("operator role"), "{refused:?}");
}

#[test]
fn logs_say_whether_each_step_passed_and_what_a_failed_expect_saw() {
    let ctl = Controller::start();
    let _agent = Agent::join(&ctl, "v1", &[]);
    let file = ctl.changeset(
        "expect.yaml",
        r#"
name: expect
changes:
  - name: release
    hosts: all
    apply:
      - run: echo 1.0 > version
    verify:
      - run: cat version
        expect: stdout.trim() == "2.0"
"#,
    );
    let run = ctl.detach(&file, &[]);
    ctl.wait_final(&run);
    let logs = ctl.modi(&["logs", &run]).stdout;
    assert!(logs.contains("-> passed (exit 0)"), "{logs}");
    assert!(
        logs.contains(
            "-> failed: expect `stdout.trim() == \"2.0\"` was false; it saw exit 0, stdout \"1.0\""
        ),
        "{logs}"
    );
}
