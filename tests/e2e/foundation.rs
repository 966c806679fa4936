//! A controller and real agents: enrolment, a first change, results that
//! survive a controller restart.

use modi_tests::{Agent, Controller, eventually, host_states};

const WRITE_FILE: &str = r#"
name: first-change
description: write a file on every host
changes:
  - name: write
    hosts: all
    rollout: { mode: parallel }
    apply:
      - run: printf 'written by modi on %s\n' {{ host.name }} > proof.txt
    verify:
      - run: cat proof.txt
        expect: stdout.contains(host.name)
"#;

#[test]
fn three_agents_apply_a_change_and_results_survive_a_restart() {
    let mut ctl = Controller::start();
    let agents: Vec<Agent> = ["web-1", "web-2", "db-1"]
        .iter()
        .map(|n| {
            Agent::join(
                &ctl,
                n,
                &[("role", if n.starts_with("web") { "web" } else { "db" })],
            )
        })
        .collect();

    // Facts and labels arrive with the agents.
    let hosts = ctl.hosts();
    assert_eq!(hosts.len(), 3);
    let web1 = hosts.iter().find(|h| h["name"] == "web-1").unwrap();
    assert_eq!(web1["labels"]["role"], "web");
    for fact in [
        "hostname",
        "os",
        "arch",
        "kernel",
        "cpus",
        "memory_bytes",
        "agent_version",
    ] {
        assert!(
            web1["facts"][fact].is_string(),
            "missing fact {fact}: {web1}"
        );
    }
    let only_web = ctl.json(&["hosts", "role=web"]);
    assert_eq!(only_web.as_array().unwrap().len(), 2);

    let file = ctl.changeset("write.yaml", WRITE_FILE);
    let (code, status) = ctl.apply(&file, &[]);
    assert_eq!(code, 0, "{status}");
    assert_eq!(status["state"], "success");
    for a in &agents {
        let proof = std::fs::read_to_string(a.work().join("proof.txt")).unwrap();
        assert_eq!(proof, format!("written by modi on {}\n", a.name));
    }
    let states = host_states(&status, "write");
    assert_eq!(states.len(), 3);
    assert!(states.values().all(|s| s == "success"), "{states:?}");

    let runs = ctl.json(&["runs"]);
    let run = runs[0]["run"].as_str().unwrap().to_string();
    let logs = ctl.modi(&["logs", &run, "--host", "web-2"]);
    assert!(logs.ok().contains("written by modi on web-2"), "{logs:?}");

    // A restarted controller still knows every result, from its journal.
    ctl.stop();
    ctl.serve();
    let after = ctl.status(&run);
    assert_eq!(after["state"], "success");
    assert_eq!(host_states(&after, "write"), states);
    let logs = ctl.modi(&["logs", &run, "--host", "web-2"]);
    assert!(logs.ok().contains("written by modi on web-2"));
    // And the agents come back on their own.
    for a in &agents {
        eventually!(20, ctl.connected(&a.name), "{} reconnects", a.name);
    }
}

#[test]
fn a_failing_verify_fails_the_run_with_exit_1() {
    let ctl = Controller::start();
    let _a = Agent::join(&ctl, "solo", &[]);
    let file = ctl.changeset(
        "fail.yaml",
        r#"
name: will-fail
changes:
  - name: check-version
    hosts: all
    apply:
      - run: echo 1.0
    verify:
      - run: echo 1.0
        expect: stdout.trim() == "2.0"
"#,
    );
    let (code, status) = ctl.apply(&file, &[]);
    assert_eq!(code, 1);
    assert_ne!(status["state"], "success");
    let host = &status["changes"][0]["hosts"][0];
    assert_eq!(host["failure"]["reason"], "condition_failed", "{host}");
    assert_eq!(host["failure"]["phase"], "verify");
}

#[test]
fn output_streams_to_logs_follow_while_the_step_runs() {
    use std::io::BufRead;
    let ctl = Controller::start();
    let _a = Agent::join(&ctl, "talker", &[]);
    let file = ctl.changeset(
        "talk.yaml",
        r#"
name: talk
changes:
  - name: talk
    hosts: all
    apply:
      - run: echo first-line; sleep 3; echo second-line
"#,
    );
    let run = ctl.detach(&file, &[]);
    let mut follow = std::process::Command::new(modi_tests::bin("modi"))
        .arg("--cli-config")
        .arg(&ctl.cli_config)
        .args(["logs", &run, "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(follow.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("first-line") {
            break;
        }
    }
    // The first line arrived while the step was still sleeping.
    assert_eq!(ctl.status(&run)["state"], "running", "{seen:?}");
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(rest.iter().any(|l| l.contains("second-line")), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("exit 0")), "{rest:?}");
    assert!(
        follow.wait().unwrap().success(),
        "--follow ends with the run"
    );
}
