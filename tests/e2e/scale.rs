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

    // The agents' side: each step ran once, every result was acked.
    assert!(
        rt.block_on(fleet.wait_all_acked(Duration::from_secs(20))),
        "{} results never acked",
        fleet.sim.unacked()
    );
    let stats = &fleet.sim.stats;
    assert_eq!(stats.executed.load(Ordering::Relaxed), N as u64);
    assert_eq!(stats.duplicates.load(Ordering::Relaxed), 0);
    assert!(stats.acks.load(Ordering::Relaxed) >= N as u64);
    rt.block_on(fleet.stop());
}
