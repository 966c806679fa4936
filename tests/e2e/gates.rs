//! Safe gates for people: a decision on a paused run is refused, a gate
//! that times out is journaled as a deny, `deny --no-backout` leaves
//! hosts as they are, status says which gate waits and what to type, and
//! Ctrl-C on an attached apply detaches with the line to stop the run.

use std::time::Duration;

use modi_tests::{Agent, Controller, eventually, host_states};

const GATED: &str = r#"
name: gated
changes:
  - name: first
    hosts: all
    apply:
      - run: touch first
    backout:
      steps:
        - run: rm first
  - name: second
    requires: [first]
    hosts: all
    approve: once
    apply:
      - run: touch second
"#;

#[test]
fn a_decision_on_a_paused_run_is_refused_and_the_gate_still_waits() {
    let ctl = Controller::start();
    let agent = Agent::join(&ctl, "g1", &[]);
    let file = ctl.changeset("gated.yaml", GATED);
    let run = ctl.detach(&file, &[]);
    let waiting = ctl.wait_state(&run, "awaiting_approval");
    let text = ctl.modi(&["status", &run]).stdout;
    assert!(
        text.contains("waiting since") && text.contains(&format!("modi approve {run}")),
        "status says which gate waits and what to type: {text}"
    );
    assert!(waiting["changes"][1]["gate"]["since"].as_u64() > Some(0));

    ctl.modi(&["pause", &run]).ok();
    let refused = ctl.modi(&["deny", &run]);
    assert_eq!(refused.code, 2, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains(&format!("run {run} is paused; resume it first")),
        "{refused:?}"
    );
    // The deny was not recorded: resuming brings the same gate back.
    ctl.modi(&["resume", &run]).ok();
    ctl.wait_state(&run, "awaiting_approval");
    ctl.modi(&["approve", &run]).ok();
    let status = ctl.wait_final(&run);
    assert_eq!(status["state"], "success", "{status}");
    assert!(agent.work().join("second").exists());
    assert_eq!(
        modi_tests::decision_actions(&status),
        ["pause", "resume", "approve"],
        "{status}"
    );
}

/// Two hosts one at a time, a gate before each batch: the first host is
/// applied when the second gate opens.
const ROLLING: &str = r#"
name: rolling
changes:
  - name: roll
    hosts: all
    rollout: { mode: rolling, batches: [1, 1] }
    approve: each_batch
    apply:
      - run: touch applied
    backout:
      steps:
        - run: rm applied
"#;

/// Approves the first gate and waits for the second.
fn at_second_gate(ctl: &Controller, run: &str) {
    ctl.wait_state(run, "awaiting_approval");
    ctl.modi(&["approve", run]).ok();
    ctl.wait_status_of(run, |s| {
        s["state"] == "awaiting_approval" && host_states(s, "roll").values().any(|v| v == "success")
    });
}

#[test]
fn a_gate_that_times_out_is_journaled_as_a_deny_and_deny_no_backout_leaves_hosts() {
    let mut ctl = Controller::start();
    let agents: Vec<Agent> = ["r1", "r2"]
        .iter()
        .map(|n| Agent::join(&ctl, n, &[]))
        .collect();
    let applied = || {
        agents
            .iter()
            .filter(|a| a.work().join("applied").exists())
            .count()
    };

    // deny --no-backout: the applied host stays as it is.
    let file = ctl.changeset("rolling.yaml", ROLLING);
    let run = ctl.detach(&file, &[]);
    at_second_gate(&ctl, &run);
    ctl.modi(&["deny", &run, "--no-backout"]).ok();
    let status = ctl.wait_final(&run);
    assert_eq!(status["state"], "bailed_out", "{status}");
    assert_eq!(applied(), 1, "left as it is: {status}");
    let last = status["decisions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["action"], "deny --no-backout", "{status}");
    for a in &agents {
        let _ = std::fs::remove_file(a.work().join("applied"));
    }

    // A gate that times out is a deny (with backout), journaled.
    let file = ctl.changeset(
        "timeout.yaml",
        &ROLLING.replace(
            "approve: each_batch",
            "approve: { at: each_batch, timeout: 3s }",
        ),
    );
    let run = ctl.detach(&file, &[]);
    at_second_gate(&ctl, &run);
    let status = ctl.wait_final(&run);
    assert_eq!(status["state"], "bailed_out", "{status}");
    assert_eq!(applied(), 0, "denied by the timeout: backed out: {status}");
    let last = status["decisions"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["by"], "timeout", "{status}");
    assert!(
        last["action"]
            .as_str()
            .unwrap()
            .contains("timed out after 3s, counted as deny"),
        "{last}"
    );
    // Journaled: still there after a restart, and in the text status.
    ctl.stop();
    ctl.serve();
    let again = ctl.status(&run);
    assert_eq!(again["decisions"], status["decisions"]);
    let text = ctl.modi(&["status", &run]).stdout;
    assert!(text.contains("by timeout"), "{text}");
    let help = ctl.modi(&["deny", "--help"]).stdout;
    assert!(help.contains("backed out"), "{help}");
}

#[test]
fn ctrl_c_on_an_attached_apply_detaches_and_says_how_to_stop_the_run() {
    use tokio::io::AsyncReadExt;
    let ctl = Controller::start();
    let agent = Agent::join(&ctl, "g3", &[]);
    let file = ctl.changeset(
        "slow.yaml",
        "name: slow\nchanges:\n  - name: c\n    hosts: all\n    apply:\n      - run: touch started; sleep 3; touch done\n",
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
        let pid = child.id().unwrap();
        let (mut reader, _writer) = pty.into_split();
        let mut screen = String::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut sent = false;
        loop {
            if !sent && agent.work().join("started").exists() {
                // What the terminal does on Ctrl-C.
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGINT,
                )
                .unwrap();
                sent = true;
            }
            let n = tokio::select! {
                n = reader.read(&mut buf) => n.unwrap_or(0),
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                _ = tokio::time::sleep_until(deadline) => panic!("no end: {screen}"),
            };
            if n == 0 {
                break;
            }
            screen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let status = child.wait().await.unwrap();
        (status.code(), screen)
    });
    assert_eq!(code, Some(0), "{screen}");
    let run = "1";
    assert!(
        screen.contains(&format!(
            "detached; run {run} continues (modi abort {run} stops it)"
        )),
        "{screen}"
    );
    let status = ctl.wait_final(run);
    assert_eq!(status["state"], "success", "the run went on: {status}");
    eventually!(5, agent.work().join("done").exists(), "the step finished");
}

#[test]
fn a_host_a_template_cannot_be_rendered_for_fails_alone_and_says_why() {
    let ctl = Controller::start();
    let zoned = Agent::join(&ctl, "zoned", &[("zone", "a")]);
    let bare = Agent::join(&ctl, "bare", &[]);
    let _ghost = Agent::enrol(&ctl, "ghost", &[("zone", "b")]);
    let file = ctl.changeset(
        "zones.yaml",
        r#"
name: zones
changes:
  - name: place
    hosts: all
    rollout: { mode: parallel }
    on_failure: continue
    apply:
      - run: echo {{ host.labels.zone }} > zone
"#,
    );
    let plan = ctl.modi(&["plan", file.to_str().unwrap()]);
    assert_eq!(plan.code, 0, "plan does not fail for the fleet: {plan:?}");
    assert!(
        plan.stdout.contains("cannot be rendered for this host") && plan.stdout.contains("bare"),
        "plan lists the host: {}",
        plan.stdout
    );
    let run = ctl.detach(&file, &[]);
    let status = ctl.wait_final(&run);
    let states = host_states(&status, "place");
    assert_eq!(states["zoned"], "success", "{status}");
    assert_eq!(states["bare"], "failed", "{status}");
    // The ghost never connected: unreachable, alone.
    assert_eq!(states["ghost"], "failed", "{status}");
    assert_eq!(
        std::fs::read_to_string(zoned.work().join("zone")).unwrap(),
        "a\n"
    );
    assert!(
        !bare.work().join("zone").exists(),
        "nothing was sent to bare"
    );
    let bare_status = status["changes"][0]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == "bare")
        .unwrap()
        .clone();
    let why = bare_status["failure"].to_string();
    assert!(why.contains("zone") && why.contains("bare"), "{why}");
}
