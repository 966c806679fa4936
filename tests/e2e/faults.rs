//! Faults at the edges of the fleet, injected for real: a partition made
//! by a TCP proxy that stops forwarding, a controller data dir on a tmpfs
//! that fills up, concurrent calls and runs, and kill -9 of the
//! controller in a loop.

use std::time::{Duration, Instant};

use modi_tests::{Agent, Controller, FaultProxy, Tmpfs, eventually, host_states};

/// An apply that takes a while and a backout that says so.
const SLOW_WITH_BACKOUT: &str = r#"
name: away
changes:
  - name: work
    hosts: all
    apply:
      - run: touch started; sleep 6; echo applied > state
    backout:
      steps:
        - run: echo backed-out > state
"#;

/// An agent behind a proxy, heartbeating every second.
fn agent_behind(ctl: &Controller, proxy: &FaultProxy, name: &str) -> Agent {
    let mut agent = Agent::enrol(ctl, name, &[]);
    agent.configure("controller", &format!("\"{}\"", proxy.url()));
    agent.configure("heartbeat_secs", "1");
    agent.start();
    eventually!(20, ctl.connected(name), "{name} connects through the proxy");
    agent
}

fn host_of<'a>(status: &'a modi_tests::Value, change: &str) -> &'a modi_tests::Value {
    status["changes"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == change))
        .map(|c| &c["hosts"][0])
        .expect("the change's host")
}

#[test]
fn a_partition_is_noticed_by_heartbeats_and_its_late_result_is_kept_and_the_backout_waits() {
    let ctl = Controller::start_with("agent_lost_after = \"3s\"\nbackout_wait = \"2m\"");
    let proxy = FaultProxy::start(ctl.port);
    let agent = agent_behind(&ctl, &proxy, "far");
    let file = ctl.changeset("away.yaml", SLOW_WITH_BACKOUT);
    let run = ctl.detach(&file, &[]);
    eventually!(20, agent.work().join("started").exists(), "the step starts");

    // The network goes away; TCP says nothing, heartbeats stop.
    proxy.partition();
    let cut = Instant::now();
    eventually!(
        10,
        !ctl.connected("far"),
        "the controller notices the silent agent"
    );
    let noticed = cut.elapsed();
    assert!(
        noticed < Duration::from_millis(2 * 1000 + 1500),
        "noticed after {noticed:?}: more than two heartbeats (and a poll)"
    );

    // Past agent_lost_after the step is lost; its backout waits for the
    // host instead of failing unreachable.
    let status = ctl.wait_status_of(&run, |s| {
        host_states(s, "work").get("far").map(String::as_str) == Some("backout_pending")
    });
    assert_eq!(
        host_of(&status, "work")["failure"]["reason"],
        "lost",
        "{status}"
    );
    // Meanwhile the step really finishes on the host.
    eventually!(
        20,
        std::fs::read_to_string(agent.work().join("state")).is_ok_and(|s| s == "applied\n"),
        "the cut-off step finishes on the agent"
    );

    // Healed: the agent comes back, its late result is journaled and
    // shown, and the pending backout runs.
    proxy.heal();
    let status = ctl.wait_final(&run);
    assert_eq!(
        host_states(&status, "work")["far"],
        "backout_ok",
        "{status}"
    );
    let late = status["late"].as_array().expect("late results shown");
    assert_eq!(late.len(), 1, "{status}");
    assert_eq!(late[0]["host"], "far");
    assert_eq!(late[0]["result"]["exit_code"], 0, "{status}");
    assert_eq!(
        std::fs::read_to_string(agent.work().join("state")).unwrap(),
        "backed-out\n",
        "the host ends as its backout left it"
    );
    let text = ctl.modi(&["status", &run]).stdout;
    assert!(text.contains("late results"), "{text}");
    let logs = ctl.modi(&["logs", &run]).stdout;
    assert!(logs.contains("late result"), "{logs}");
}

#[test]
fn a_backout_whose_host_never_returns_fails_after_backout_wait() {
    let ctl = Controller::start_with("agent_lost_after = \"2s\"\nbackout_wait = \"3s\"");
    let proxy = FaultProxy::start(ctl.port);
    let agent = agent_behind(&ctl, &proxy, "gone");
    let file = ctl.changeset("away.yaml", SLOW_WITH_BACKOUT);
    let run = ctl.detach(&file, &[]);
    eventually!(20, agent.work().join("started").exists(), "the step starts");
    proxy.partition();
    ctl.wait_status_of(&run, |s| {
        host_states(s, "work").get("gone").map(String::as_str) == Some("backout_pending")
    });
    let status = ctl.wait_final(&run);
    assert_eq!(
        host_states(&status, "work")["gone"],
        "backout_failed",
        "{status}"
    );
    let steps = host_of(&status, "work")["steps"].to_string();
    assert!(
        steps.contains("\"backout\"") && steps.contains("unreachable"),
        "{steps}"
    );
    let logs = ctl.modi(&["logs", &run]).stdout;
    assert!(
        logs.contains("did not come back within backout_wait"),
        "{logs}"
    );
}

/// The data dir on a small tmpfs, filled mid-run: calls fail with the
/// cause, the run waits paused (reason store) and an alert fires; once
/// space is freed the run goes on by itself; after a restart every listed
/// run is still there.
#[test]
fn a_full_disk_pauses_the_run_with_an_alert_and_it_resumes_by_itself() {
    let tmp = tempfile::Builder::new()
        .prefix("modi-e2e-")
        .tempdir()
        .unwrap();
    let disk = Tmpfs::mount(&tmp.path().join("controller"), 24);
    let alerts = tmp.path().join("alerts.jsonl");
    let mut ctl = Controller::init_in(
        tmp.path(),
        &format!(
            "[alerts]\ncommand = \"cat >> {0}; echo >> {0}\"\n",
            alerts.display()
        ),
    );
    ctl.serve();
    let agent = Agent::join(&ctl, "disk", &[]);
    let steps: String = (0..12)
        .map(|i| format!("      - run: echo {i} >> steps; sleep 0.4\n"))
        .collect();
    let file = ctl.changeset(
        "many.yaml",
        &format!("name: many\nchanges:\n  - name: work\n    hosts: all\n    apply:\n{steps}"),
    );
    let listed_before: Vec<String> = {
        let first = ctl.detach(&file, &[]);
        ctl.wait_final(&first);
        vec![first]
    };
    let run = ctl.detach(&file, &[]);
    let steps_file = agent.work().join("steps");
    eventually!(
        20,
        std::fs::read_to_string(&steps_file).is_ok_and(|s| s.lines().count() >= 2 + 12),
        "the second run is under way"
    );
    let filler = disk.fill();

    // The run stops with a reason; nothing hangs.
    let status = ctl.wait_state(&run, "paused");
    let held = status["held"].as_str().unwrap_or_default().to_string();
    assert!(held.contains("No space left on device"), "{status}");
    let started = Instant::now();
    let refused = ctl.modi(&["token", "create"]);
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused.stderr.contains("No space left on device"),
        "{refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a write fails at once"
    );
    eventually!(
        10,
        std::fs::read_to_string(&alerts).is_ok_and(|a| a.contains("store_unwritable")),
        "an alert names the store"
    );
    let runs = ctl.json(&["runs"]);
    assert_eq!(runs.as_array().map(Vec::len), Some(2), "{runs}");

    // Space comes back: the run goes on by itself.
    std::fs::remove_file(&filler).unwrap();
    let status = ctl.wait_final(&run);
    assert_eq!(status["state"], "success", "{status}");
    assert_eq!(
        std::fs::read_to_string(&steps_file)
            .unwrap()
            .lines()
            .count(),
        24,
        "every step of both runs ran exactly once"
    );
    ctl.modi(&["token", "create"]).ok();

    // Nothing listed disappears across a restart.
    ctl.stop();
    ctl.serve();
    let ids: Vec<String> = ctl
        .json(&["runs"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run"].as_str().unwrap_or_default().to_string())
        .collect();
    for id in listed_before.iter().chain([&run]) {
        assert!(ids.contains(id), "run {id} is still listed: {ids:?}");
    }
    drop(agent);
    ctl.stop();
    drop(disk);
}

/// One host runs one change at a time: two runs of a change on the same
/// hosts never overlap on a host; the later one shows `queued`.
#[test]
fn two_runs_on_the_same_hosts_never_overlap_on_a_host() {
    let ctl = Controller::start();
    let agents: Vec<Agent> = ["q1", "q2"]
        .iter()
        .map(|n| Agent::join(&ctl, n, &[]))
        .collect();
    let file = ctl.changeset(
        "overlap.yaml",
        r#"
name: overlap
changes:
  - name: work
    hosts: all
    rollout: { mode: parallel }
    apply:
      - run: echo start-{{ tag }} >> seq; sleep 1
      - run: echo end-{{ tag }} >> seq
"#,
    );
    let a = ctl.detach(&file, &["--var", "tag=a"]);
    let b = ctl.detach(&file, &["--var", "tag=b"]);
    let status = ctl.wait_status_of(&b, |s| {
        host_states(s, "work").values().any(|v| v == "queued") || s["state"] != "running"
    });
    assert!(
        host_states(&status, "work").values().any(|v| v == "queued"),
        "the second run waits as queued: {status}"
    );
    assert_eq!(ctl.wait_final(&a)["state"], "success");
    assert_eq!(ctl.wait_final(&b)["state"], "success");
    for agent in &agents {
        let seq = std::fs::read_to_string(agent.work().join("seq")).unwrap();
        let lines: Vec<&str> = seq.lines().collect();
        assert_eq!(lines.len(), 4, "{}: {seq}", agent.name);
        for pair in lines.chunks(2) {
            let tag = pair[0].strip_prefix("start-").expect("a start");
            assert_eq!(
                pair[1],
                format!("end-{tag}"),
                "{}: interleaved: {seq}",
                agent.name
            );
        }
    }
}

/// Concurrent writes of every kind (tokens, enrolments, applies, results)
/// never wedge the controller: every call answers within its deadline,
/// and `modi serve` still stops on SIGTERM.
#[test]
fn concurrent_writes_of_every_kind_never_wedge_the_controller() {
    let mut ctl = Controller::start();
    let agents: Vec<Agent> = (0..4)
        .map(|i| Agent::join(&ctl, &format!("c{i}"), &[("role", "c")]))
        .collect();
    let file = ctl.changeset(
        "noop.yaml",
        "name: noop\nchanges:\n  - name: n\n    hosts: role=c\n    rollout: { mode: parallel }\n    apply:\n      - run: \"true\"\n",
    );
    let tokens: Vec<_> = (0..20).map(|_| ctl.token("10m")).collect();
    let slowest = std::sync::Mutex::new(Duration::ZERO);
    let failures = std::sync::Mutex::new(Vec::new());
    let runs = std::sync::Mutex::new(Vec::new());
    let timed = |what: String, f: &dyn Fn() -> modi_tests::Out| {
        let started = Instant::now();
        let out = f();
        let took = started.elapsed();
        let mut slow = slowest.lock().unwrap();
        *slow = (*slow).max(took);
        if out.code != 0 {
            failures.lock().unwrap().push(format!("{what}: {out:?}"));
        }
        out
    };
    {
        let (ctl, timed, file, runs) = (&ctl, &timed, &file, &runs);
        std::thread::scope(|s| {
            for i in 0..60 {
                s.spawn(move || timed(format!("token {i}"), &|| ctl.modi(&["token", "create"])));
            }
            for (i, token) in tokens.iter().enumerate() {
                let dir = ctl.root.join("joins").join(format!("j{i}"));
                s.spawn(move || {
                    timed(format!("join {i}"), &|| {
                        Agent::join_cmd(token, &format!("j{i}"), &dir, &[])
                    })
                });
            }
            for i in 0..20 {
                s.spawn(move || {
                    let out = timed(format!("apply {i}"), &|| {
                        ctl.modi(&[
                            "--output",
                            "json",
                            "apply",
                            file.to_str().unwrap(),
                            "--detach",
                        ])
                    });
                    if out.code == 0 {
                        let run = out.json()["run"].as_str().unwrap().to_string();
                        runs.lock().unwrap().push(run);
                    }
                });
            }
        });
    }
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
    let slowest = slowest.into_inner().unwrap();
    assert!(
        slowest < Duration::from_secs(30),
        "slowest call {slowest:?}"
    );
    // Every run's results (4 agents each, finishing together) journal.
    for run in runs.into_inner().unwrap() {
        assert_eq!(ctl.wait_final(&run)["state"], "success");
    }
    assert_eq!(ctl.hosts().len(), 4 + 20);
    // Writes still work, and SIGTERM still stops the daemon.
    ctl.modi(&["token", "create"]).ok();
    drop(agents);
    let started = Instant::now();
    ctl.stop();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "modi serve stopped on SIGTERM within its grace"
    );
}
