//! An agent killed mid-step: the step's process group outlives it, and the
//! next agent must kill it before reporting the step lost, so the backout
//! never runs while the step it undoes is still running.

use modi_tests::{Agent, Controller, eventually, host_states};

const ORPHAN: &str = r#"
name: orphan
changes:
  - name: slow
    hosts: all
    apply:
      - run: touch started; sleep 3; echo applied > state
    backout:
      - run: echo backed-out > state
"#;

#[test]
fn a_step_orphaned_by_an_agent_crash_is_killed_before_its_backout() {
    let ctl = Controller::start();
    let mut agent = Agent::join(&ctl, "orphaned", &[]);
    let file = ctl.changeset("orphan.yaml", ORPHAN);
    let run = ctl.detach(&file, &[]);
    let work = agent.work();
    eventually!(20, work.join("started").exists(), "the apply step starts");
    // The agent records the step's process group right after it spawns it;
    // the crash comes once that record is on disk (a crash inside that
    // moment leaves a group the restarted agent cannot know of: its `lost`
    // result says so).
    let journal = agent.dir.join("journal");
    eventually!(
        10,
        std::fs::read_dir(&journal).is_ok_and(|d| d
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".pgid"))),
        "the step's process group is recorded"
    );
    // The step's `sleep 3` is running in its own process group; SIGKILL
    // leaves it behind, no longer anyone's child.
    agent.crash();
    agent.start();
    let status = ctl.wait_final(&run);
    assert_eq!(
        host_states(&status, "slow")["orphaned"],
        "backout_ok",
        "{status}"
    );
    // Past the time the orphan would have written `applied`, had it lived.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(
        std::fs::read_to_string(work.join("state")).unwrap(),
        "backed-out\n",
        "the orphaned step finished after its backout"
    );
    assert!(
        agent
            .log()
            .contains("killed a step's process group left running"),
        "the restarted agent did not kill the orphan:\n{}",
        agent.log()
    );
}
