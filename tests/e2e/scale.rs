//! The fleet simulator (`modi_tests::sim`) against a real controller, at
//! sizes this suite can afford: what must hold at any size (every agent
//! connected, every step journaled exactly once, the run a success), and
//! that the controller's work per event does not grow with the fleet.
//! Figures at 10,000 agents come from the `fleet-sim` benchmark, never
//! from a timed test.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use modi_tests::sim::{self, Options, SimFleet};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn two_hundred_simulated_agents_run_a_parallel_change_exactly_once() {
    const N: usize = 200;
    let rt = runtime();
    let opts = Options {
        step_latency: Duration::from_millis(5),
        ..Options::default()
    };
    let mut fleet = rt
        .block_on(SimFleet::start(N, opts, 32, "info"))
        .expect("the fleet starts");
    assert_eq!(fleet.sim.connected(), N);
    assert_eq!(fleet.controller_connected().unwrap(), N as u64);
    let hosts = fleet.ctl.hosts();
    assert_eq!(hosts.len(), N);
    assert!(hosts.iter().all(|h| h["connected"] == true));

    let out = rt
        .block_on(fleet.apply(&sim::parallel_noop("all")))
        .expect("the run");
    assert_eq!(out.state, "success");

    // The journal, as `modi status` reads it: every host succeeded.
    let status = fleet.ctl.status(&out.run);
    assert_eq!(status["state"], "success", "{status}");
    let states = modi_tests::host_states(&status, "noop");
    assert_eq!(states.len(), N);
    assert!(
        states.values().all(|s| s == "success"),
        "not all success: {states:?}"
    );
    // ... and as `modi logs` reads it: one result per host, no more.
    let logs = fleet
        .ctl
        .modi(&["--output", "json", "logs", &out.run])
        .ok()
        .to_string();
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for line in logs.lines() {
        let entry: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
        let host = entry["host"].as_str().expect("host").to_string();
        *per_host.entry(host).or_default() += 1;
    }
    assert_eq!(per_host.len(), N, "{logs}");
    assert!(
        per_host.values().all(|&c| c == 1),
        "a host with other than one result: {per_host:?}"
    );

    // Listings are paged: the newest runs only.
    let second = rt
        .block_on(fleet.apply(&sim::parallel_noop("[sim-00000]")))
        .expect("a second run");
    assert_eq!(second.state, "success");
    let newest = fleet.ctl.json(&["runs", "--limit", "1"]);
    let newest = newest.as_array().expect("a list");
    assert_eq!(newest.len(), 1, "{newest:?}");
    assert_eq!(newest[0]["run"], second.run.as_str());
    let every = fleet.ctl.json(&["runs", "--limit", "0"]);
    assert_eq!(every.as_array().map(Vec::len), Some(2), "{every}");

    // The agents' side: each step ran once, every result was acked.
    assert!(
        rt.block_on(fleet.wait_all_acked(Duration::from_secs(20))),
        "{} results never acked",
        fleet.sim.unacked()
    );
    let stats = &fleet.sim.stats;
    assert_eq!(stats.executed.load(Ordering::Relaxed), N as u64 + 1);
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 0);
    assert!(stats.acks.load(Ordering::Relaxed) >= N as u64);
    rt.block_on(fleet.stop());
}

/// The controller's work for one small run, counted (never timed).
#[derive(Debug)]
struct Cost {
    /// Store write jobs.
    writes: f64,
    /// Store flushes.
    flushes: f64,
    /// The controller's CPU time, in clock ticks.
    cpu_ticks: u64,
}

/// Starts `agents` simulated agents (heartbeats every 60 s, so idle ones
/// cost next to nothing), runs the same small changeset on the first 20
/// of them, and counts what the run cost the controller.
fn small_run_cost(rt: &tokio::runtime::Runtime, agents: usize) -> Cost {
    let opts = Options {
        heartbeat: Duration::from_secs(60),
        ..Options::default()
    };
    let mut fleet = rt
        .block_on(SimFleet::start(agents, opts, 32, "info"))
        .expect("the fleet starts");
    let names: Vec<String> = (0..20).map(|i| format!("sim-{i:05}")).collect();
    let yaml = format!(
        r#"
name: small
changes:
  - name: two-steps
    hosts: [{}]
    rollout: {{ mode: rolling, batches: [5] }}
    apply:
      - run: "true"
      - run: "true"
"#,
        names.join(", ")
    );
    // Everything the connections wrote is written.
    std::thread::sleep(Duration::from_millis(500));
    let pid = fleet.pid().expect("running");
    let (w0, f0) = (
        fleet.metric("modi_store_writes_total").unwrap(),
        fleet.metric("modi_store_flushes_total").unwrap(),
    );
    let c0 = sim::cpu_ticks(pid).unwrap();
    let out = rt.block_on(fleet.apply(&yaml)).expect("the run");
    assert_eq!(out.state, "success");
    let c1 = sim::cpu_ticks(pid).unwrap();
    let (w1, f1) = (
        fleet.metric("modi_store_writes_total").unwrap(),
        fleet.metric("modi_store_flushes_total").unwrap(),
    );
    assert_eq!(
        fleet.sim.stats.executed.load(Ordering::Relaxed),
        40,
        "20 hosts, two steps each"
    );
    rt.block_on(fleet.stop());
    Cost {
        writes: w1 - w0,
        flushes: f1 - f0,
        cpu_ticks: c1 - c0,
    }
}

#[test]
fn a_run_costs_the_controller_the_same_with_100_or_2000_idle_agents() {
    let rt = runtime();
    let small = small_run_cost(&rt, 100);
    let large = small_run_cost(&rt, 2000);
    eprintln!("100 agents: {small:?}; 2000 agents: {large:?}");
    // 20 hosts, two steps: a few dozen writes whatever the fleet's size
    // (group commit may merge some; one more per idle agent would be
    // thousands).
    assert!(small.writes > 0.0 && small.flushes > 0.0, "{small:?}");
    assert!(
        large.writes <= small.writes * 1.5 + 20.0,
        "store writes grew with the fleet: {small:?} vs {large:?}"
    );
    // CPU is counted in ticks of 10 ms: a small constant factor, with a
    // floor for the tick's coarseness.
    assert!(
        large.cpu_ticks <= small.cpu_ticks * 3 + 30,
        "controller CPU for the same run grew with the fleet: {small:?} vs {large:?}"
    );
}

#[test]
fn a_controller_killed_mid_rollout_finishes_it_exactly_once_when_the_fleet_comes_back() {
    const N: usize = 200;
    let rt = runtime();
    // Steps long enough for the kill to land mid-batch.
    let opts = Options {
        step_latency: Duration::from_millis(300),
        ..Options::default()
    };
    let mut fleet = rt
        .block_on(SimFleet::start(N, opts, 32, "info"))
        .expect("the fleet starts");
    let file = fleet
        .ctl
        .changeset("rolling.yaml", &sim::rolling_noop("all"));
    let run = fleet.ctl.detach(&file, &[]);
    // Some batches done, one in flight.
    modi_tests::eventually!(
        30,
        fleet.sim.stats.executed.load(Ordering::Relaxed) >= 50,
        "the rollout gets going"
    );
    fleet.ctl.crash();
    fleet.ctl.serve_within(Duration::from_secs(60));
    // Every agent comes back; the steps of hosts not back yet waited for
    // them (the startup grace) instead of failing as unreachable.
    rt.block_on(fleet.wait_all_connected(Duration::from_secs(60)))
        .expect("the fleet reconnects");
    let status = fleet.ctl.wait_final(&run);
    assert_eq!(status["state"], "success", "{status}");
    let states = modi_tests::host_states(&status, "noop");
    assert_eq!(states.len(), N);
    assert!(states.values().all(|s| s == "success"), "{states:?}");
    assert!(
        rt.block_on(fleet.wait_all_acked(Duration::from_secs(20))),
        "{} results never acked",
        fleet.sim.unacked()
    );
    let stats = &fleet.sim.stats;
    assert_eq!(
        stats.duplicates.load(Ordering::Relaxed),
        0,
        "a step ran twice"
    );
    assert_eq!(stats.executed.load(Ordering::Relaxed), N as u64);
    rt.block_on(fleet.stop());
}
