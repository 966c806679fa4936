//! Fleet policies with real agents: halt, continue, backout_all, retries,
//! approvals, abort, alerts.

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::mpsc;
use std::time::Duration;

use modi_tests::{Agent, Controller, Value, eventually, host_states};

fn fleet(ctl: &Controller, names: &[&str]) -> Vec<Agent> {
    names
        .iter()
        .map(|n| Agent::join(ctl, n, &[("role", "web")]))
        .collect()
}

/// A changeset where host `bad` fails its verify; apply marks `applied`,
/// backout appends the host to a shared `order` file.
fn policy_changeset(ctl: &Controller, policy: &str, bad: &str) -> std::path::PathBuf {
    let order = ctl.root.join("backout-order.txt");
    ctl.changeset(
        "policy.yaml",
        &format!(
            r#"
name: policy
vars:
  bad: {bad}
  order: "{order}"
changes:
  - name: upgrade
    hosts: role=web
    {policy}
    apply:
      - run: touch applied
    verify:
      - run: test {{{{ host.name }}}} != {{{{ bad }}}}
    backout:
      steps:
        - run: rm applied && echo {{{{ host.name }}}} >> {{{{ order }}}}
"#,
            order = order.display()
        ),
    )
}

#[test]
fn halt_backs_out_the_failed_host_and_starts_no_other() {
    let ctl = Controller::start();
    let agents = fleet(&ctl, &["w1", "w2", "w3", "w4"]);
    let file = policy_changeset(
        &ctl,
        "rollout: { mode: serial }\n    on_failure: halt",
        "w2",
    );
    let (code, status) = ctl.apply(&file, &[]);
    assert_eq!(code, 1);
    let states = host_states(&status, "upgrade");
    assert_eq!(states["w1"], "success");
    assert_eq!(states["w2"], "backout_ok");
    assert_eq!(states["w3"], "cancelled");
    assert_eq!(states["w4"], "cancelled");
    assert_eq!(status["changes"][0]["state"], "partial_failure");
    assert!(agents[0].work().join("applied").exists());
    for a in &agents[1..] {
        assert!(!a.work().join("applied").exists(), "{} touched", a.name);
    }
}

#[test]
fn continue_carries_on_until_max_failures_is_passed() {
    let ctl = Controller::start();
    let agents = fleet(&ctl, &["w1", "w2", "w3", "w4"]);
    let file = policy_changeset(
        &ctl,
        "rollout: { mode: serial, max_failures: 1 }\n    on_failure: continue",
        "w2",
    );
    let (code, status) = ctl.apply(&file, &[]);
    assert_eq!(code, 1);
    let states = host_states(&status, "upgrade");
    assert_eq!(
        states.values().map(String::as_str).collect::<Vec<_>>(),
        ["success", "backout_ok", "success", "success"]
    );
    assert!(agents[3].work().join("applied").exists());

    // Two bad hosts with one tolerated: the second failure halts.
    let file = ctl.changeset(
        "continue2.yaml",
        r#"
name: continue-limit
changes:
  - name: c
    hosts: role=web
    rollout: { mode: serial, max_failures: 1 }
    on_failure: continue
    apply:
      - run: test {{ host.name }} != w1 && test {{ host.name }} != w2
"#,
    );
    let (_, status) = ctl.apply(&file, &[]);
    let states = host_states(&status, "c");
    assert_eq!(
        states.values().map(String::as_str).collect::<Vec<_>>(),
        ["failed", "failed", "cancelled", "cancelled"],
        "{status}"
    );
}

#[test]
fn backout_all_puts_every_applied_host_back_newest_first() {
    let ctl = Controller::start();
    let agents = fleet(&ctl, &["w1", "w2", "w3", "w4", "w5"]);
    let file = policy_changeset(
        &ctl,
        "rollout: { mode: rolling, batches: [1] }\n    on_failure: backout_all",
        "w4",
    );
    let (code, status) = ctl.apply(&file, &[]);
    assert_eq!(code, 1);
    let states = host_states(&status, "upgrade");
    assert_eq!(states["w5"], "cancelled", "{status}");
    for h in ["w1", "w2", "w3", "w4"] {
        assert_eq!(states[h], "backout_ok", "{h}: {status}");
    }
    assert_eq!(status["changes"][0]["state"], "backout_ok");
    let order = std::fs::read_to_string(ctl.root.join("backout-order.txt")).unwrap();
    let order: Vec<&str> = order.lines().collect();
    // The failed host first (it completes last), then newest completion first.
    assert_eq!(order, ["w4", "w3", "w2", "w1"]);
    for a in &agents {
        assert!(
            !a.work().join("applied").exists(),
            "{} still applied",
            a.name
        );
    }
}

#[test]
fn a_flaky_step_succeeds_on_its_second_attempt() {
    let ctl = Controller::start();
    let agent = Agent::join(&ctl, "flaky", &[]);
    let file = ctl.changeset(
        "flaky.yaml",
        r#"
name: flaky
changes:
  - name: fetch
    hosts: all
    retry: { max_retries: 2, delay: 300ms }
    apply:
      - run: echo try >> attempts; test -e ok || { touch ok; exit 1; }
"#,
    );
    let (code, status) = ctl.apply(&file, &[]);
    assert_eq!(code, 0, "{status}");
    let host = &status["changes"][0]["hosts"][0];
    assert_eq!(host["state"], "success");
    assert_eq!(host["attempt"], 1, "{host}");
    assert_eq!(
        std::fs::read_to_string(agent.work().join("attempts")).unwrap(),
        "try\ntry\n"
    );
    // The logs say which try each was, out of how many, and when.
    // The only run of a fresh controller.
    let run = "1";
    let logs = ctl.modi(&["logs", run]).stdout;
    let headers: Vec<&str> = logs.lines().filter(|l| l.contains("== ")).collect();
    assert_eq!(headers.len(), 2, "{logs}");
    assert!(headers[0].ends_with("(attempt 1/3)"), "{logs}");
    assert!(headers[1].ends_with("(attempt 2/3)"), "{logs}");
    for line in logs
        .lines()
        .filter(|l| l.contains("== ") || l.contains("-> "))
    {
        // `[flaky] HH:MM:SS == ...`
        let time = line.split(' ').nth(1).unwrap_or("");
        assert!(
            time.len() == 8 && time.as_bytes()[2] == b':' && time.as_bytes()[5] == b':',
            "a timestamp on {line:?}"
        );
    }
    let json = ctl.modi(&["--output", "json", "logs", run]).stdout;
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert!(first["started_at_ms"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(first["attempts"], 3, "{first}");
}

#[test]
fn approve_and_deny_through_the_cli() {
    let mut ctl = Controller::start();
    let agents = fleet(&ctl, &["w1", "w2"]);
    let file = ctl.changeset(
        "gated.yaml",
        r#"
name: gated
changes:
  - name: step
    hosts: role=web
    approve: each_host
    apply:
      - run: touch applied
    backout:
      - run: rm -f applied
"#,
    );
    let run = ctl.detach(&file, &[]);
    ctl.wait_state(&run, "awaiting_approval");
    assert!(
        !agents[0].work().join("applied").exists(),
        "nothing runs before approval"
    );
    let out = ctl.modi(&["approve", &run]);
    assert!(out.ok().contains(&format!("run {run}")), "{out:?}");
    eventually!(
        20,
        agents[0].work().join("applied").exists(),
        "w1 runs after approval"
    );
    ctl.wait_state(&run, "awaiting_approval");
    ctl.modi(&["deny", &run]).ok();
    let status = ctl.wait_final(&run);
    assert_eq!(status["state"], "bailed_out", "{status}");
    let states = host_states(&status, "step");
    // Deny bails out: the host where the change was applied is backed out.
    assert_eq!(states["w1"], "backout_ok", "{status}");
    assert_eq!(states["w2"], "cancelled");
    assert!(!agents[0].work().join("applied").exists());
    assert!(!agents[1].work().join("applied").exists());

    // Approving a run that is not at a gate is refused with a reason.
    let again = ctl.modi(&["approve", &run]);
    assert_eq!(again.code, 2, "{again:?}");
    assert!(again.stderr.contains("has ended"), "{again:?}");
    // Who decided is journaled with the name on the admin certificate, and
    // survives a restart (it is replayed from the journal).
    let decisions = |status: &Value| -> Vec<(String, String)> {
        status["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["by"].as_str().unwrap().into(),
                    d["action"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let want = [
        ("admin".to_string(), "approve".to_string()),
        ("admin".into(), "deny".into()),
    ];
    assert_eq!(decisions(&status), want);
    let text = ctl.modi(&["status", &run]);
    assert!(text.stdout.contains("deny by admin"), "{text:?}");
    ctl.stop();
    ctl.serve();
    assert_eq!(decisions(&ctl.status(&run)), want);
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.contains(") Z "),
        Err(_) => false,
    }
}

#[test]
fn abort_kills_the_running_step_and_backs_out() {
    let ctl = Controller::start();
    let agent = Agent::join(&ctl, "busy", &[]);
    let file = ctl.changeset(
        "slow.yaml",
        r#"
name: slow
changes:
  - name: long
    hosts: all
    apply:
      - run: touch applied
      - run: sleep 300 & echo $! > sleeper.pid; wait
    backout:
      - run: rm -f applied && touch backed-out
"#,
    );
    let run = ctl.detach(&file, &[]);
    let pidfile = agent.work().join("sleeper.pid");
    eventually!(
        20,
        pidfile.exists() && !std::fs::read_to_string(&pidfile).unwrap().trim().is_empty(),
        "the slow step starts"
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    ctl.modi(&["abort", &run]).ok();
    let status = ctl.wait_final(&run);
    assert_eq!(status["state"], "bailed_out", "{status}");
    eventually!(10, !alive(pid), "the step's process {pid} is gone");
    assert_eq!(
        host_states(&status, "long")["busy"],
        "backout_ok",
        "{status}"
    );
    assert!(agent.work().join("backed-out").exists());
    assert!(!agent.work().join("applied").exists());

    // --no-backout leaves the host as it is.
    std::fs::remove_file(&pidfile).unwrap();
    std::fs::remove_file(agent.work().join("backed-out")).unwrap();
    let run = ctl.detach(&file, &[]);
    eventually!(
        20,
        pidfile.exists() && !std::fs::read_to_string(&pidfile).unwrap().trim().is_empty(),
        "the slow step starts again"
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    ctl.modi(&["abort", &run, "--no-backout"]).ok();
    let status = ctl.wait_final(&run);
    assert_eq!(status["state"], "bailed_out");
    eventually!(10, !alive(pid), "the step's process {pid} is gone");
    assert!(agent.work().join("applied").exists(), "left as it is");
    assert!(!agent.work().join("backed-out").exists());
}

/// A one-thread HTTP server on loopback that sends each request body on.
fn webhook_receiver() -> (u16, mpsc::Receiver<Value>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(64) {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_ok()
                && let Ok(v) = serde_json::from_slice(&body)
            {
                let _ = tx.send(v);
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (port, rx)
}

#[test]
fn alerts_reach_a_webhook_on_loopback_and_a_command() {
    let (port, alerts) = webhook_receiver();
    let sink = ctl_sink();
    let ctl = Controller::start_with(&format!(
        "[alerts]\nwebhook = \"http://127.0.0.1:{port}/hook\"\ncommand = \"cat >> {0}; echo >> {0}\"\n",
        sink.path().display()
    ));
    let _agent = Agent::join(&ctl, "alerting", &[]);
    let file = ctl.changeset(
        "noback.yaml",
        r#"
name: no-backout
changes:
  - name: risky
    hosts: all
    apply:
      - run: echo applying; exit 4
"#,
    );
    let (code, _) = ctl.apply(&file, &[]);
    assert_eq!(code, 1);
    let mut kinds = Vec::new();
    while let Ok(alert) = alerts.recv_timeout(Duration::from_secs(10)) {
        kinds.push(alert["kind"].as_str().unwrap_or_default().to_string());
        if alert["kind"] == "failed_no_backout" {
            assert_eq!(alert["host"], "alerting");
            assert_eq!(alert["change"], "risky");
            assert_eq!(alert["changeset"], "no-backout");
        }
        if kinds.len() == 2 {
            break;
        }
    }
    assert_eq!(kinds, ["failed_no_backout", "run_finished"], "in order");
    // The command got the same alerts as JSON on its stdin.
    eventually!(
        10,
        std::fs::read_to_string(sink.path())
            .unwrap()
            .lines()
            .count()
            == 2,
        "two alerts via the command"
    );
    // In order, one at a time.
    let text = std::fs::read_to_string(sink.path()).unwrap();
    let kinds: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["kind"].clone())
        .collect();
    assert_eq!(kinds, ["failed_no_backout", "run_finished"]);
}

fn ctl_sink() -> tempfile::NamedTempFile {
    tempfile::NamedTempFile::new().unwrap()
}

#[test]
fn a_dead_webhook_is_retried_and_logged_and_never_blocks_a_run() {
    let dead = modi_tests::free_port();
    let ctl = Controller::start_with(&format!(
        "[alerts]\nwebhook = \"http://127.0.0.1:{dead}/hook\"\n"
    ));
    let _agent = Agent::join(&ctl, "alone", &[]);
    let file = ctl.changeset(
        "fails.yaml",
        "name: f\nchanges:\n  - name: c\n    hosts: all\n    apply:\n      - run: exit 1\n",
    );
    let started = std::time::Instant::now();
    let (code, status) = ctl.apply(&file, &[]);
    assert_eq!(code, 1, "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the run did not wait for the webhook"
    );
    eventually!(
        10,
        ctl.log().contains("alert webhook failed; retrying"),
        "retries are logged"
    );
}

/// `modi apply` attached to a terminal asks at each gate itself.
#[test]
fn apply_on_a_terminal_asks_at_each_gate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ctl = Controller::start();
    let agents = fleet(&ctl, &["t1", "t2"]);
    let file = ctl.changeset(
        "ask.yaml",
        r#"
name: ask
changes:
  - name: step
    hosts: role=web
    rollout: { mode: serial }
    approve: each_host
    apply:
      - run: touch applied
"#,
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (code, screen) = rt.block_on(async {
        let (pty, pts) = pty_process::open().unwrap();
        pty.resize(pty_process::Size::new(40, 120)).unwrap();
        let mut cmd = tokio::process::Command::new(modi_tests::bin("modi"));
        cmd.arg("--cli-config")
            .arg(&ctl.cli_config)
            .args(["apply", file.to_str().unwrap()])
            .current_dir(&ctl.root);
        let mut child = pty_process::Command::from(cmd).spawn(pts).unwrap();
        let (mut reader, mut writer) = pty.into_split();
        let mut screen = String::new();
        let mut answers = ["y\n", "n\n"].into_iter();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let n = tokio::select! {
                n = reader.read(&mut buf) => n.unwrap_or(0),
                _ = tokio::time::sleep_until(deadline) => panic!("no end: {screen}"),
            };
            if n == 0 {
                break;
            }
            screen.push_str(&String::from_utf8_lossy(&buf[..n]));
            let asked = screen.matches("continue? [y/N]").count();
            if asked > 2 - answers.len()
                && let Some(a) = answers.next()
            {
                writer.write_all(a.as_bytes()).await.unwrap();
            }
        }
        let status = child.wait().await.unwrap();
        (status.code(), screen)
    });
    assert_eq!(screen.matches("continue? [y/N]").count(), 2, "{screen}");
    assert_eq!(code, Some(1), "denied at the second gate: {screen}");
    assert!(agents[0].work().join("applied").exists());
    assert!(!agents[1].work().join("applied").exists());
    assert!(screen.contains("bailed_out"), "{screen}");
}
