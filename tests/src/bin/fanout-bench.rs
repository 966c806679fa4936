//! Fan-out benchmark: starts a real controller and N real agents on
//! loopback, applies a parallel change whose one step is `true` a few
//! times, and prints JSON with the wall time from submit to every result
//! journaled, and each agent's idle resident memory.
//!
//! `cargo run --release -p modi-tests --bin fanout-bench -- --agents 50`

use std::time::Instant;

use clap::Parser;
use modi_controller::cli::Client;
use modi_controller::config::CliConfig;
use modi_tests::{Agent, Controller, bin_dir, rss_kib};

#[derive(Parser)]
struct Args {
    /// Number of agents.
    #[arg(long, default_value_t = 10)]
    agents: usize,
    /// Runs to time.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

const CHANGESET: &str = r#"
name: fanout
changes:
  - name: noop
    hosts: all
    rollout: { mode: parallel }
    apply:
      - run: "true"
"#;

fn main() {
    let args = Args::parse();
    modi_tests::build_benchmark_binaries();
    let ctl = Controller::start();
    let names: Vec<String> = (0..args.agents).map(|i| format!("bench-{i:03}")).collect();
    let mut agents: Vec<Agent> = names.iter().map(|n| Agent::enrol(&ctl, n, &[])).collect();
    for a in &mut agents {
        a.start();
    }
    modi_tests::eventually!(
        60,
        ctl.hosts()
            .iter()
            .filter(|h| h["connected"] == true)
            .count()
            == args.agents,
        "all {} agents connect",
        args.agents
    );
    let cli = CliConfig::load(&ctl.cli_config).expect("cli config");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut times = Vec::new();
    rt.block_on(async {
        let client = Client::from_config(&cli).expect("client");
        // One untimed run warms connections and caches. Each run is
        // followed from Apply to its end (every result journaled: the
        // driver journals a result before the engine ends a run).
        let warm = modi_tests::sim::apply(&client, &ctl.root, CHANGESET)
            .await
            .expect("warm-up run");
        assert_eq!(warm.state, "success", "warm-up run");
        for _ in 0..args.rounds {
            let run = modi_tests::sim::apply(&client, &ctl.root, CHANGESET)
                .await
                .expect("a run");
            assert_eq!(run.state, "success");
            times.push(run.elapsed.as_secs_f64() * 1000.0);
        }
    });
    // The floor: spawning as many processes (`true`, reaped), the least
    // any agent-per-host fan-out costs on one machine, measured in the
    // same run and the same way (median of the rounds).
    let mut spawn_times = Vec::new();
    rt.block_on(async {
        for _ in 0..=args.rounds {
            let started = Instant::now();
            let mut children = Vec::with_capacity(args.agents);
            for _ in 0..args.agents {
                children.push(
                    tokio::process::Command::new("true")
                        .spawn()
                        .expect("spawn true"),
                );
            }
            for mut c in children {
                let status = c.wait().await.expect("wait for true");
                assert!(status.success());
            }
            spawn_times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    });
    // The first round warms up, as for the runs.
    spawn_times.remove(0);
    spawn_times.sort_by(f64::total_cmp);
    // Idle: nothing in flight, heartbeats only.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let rss: Vec<u64> = agents
        .iter()
        .filter_map(|a| a.pid().and_then(rss_kib))
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mean_rss = rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64;
    let spawn_median = spawn_times[spawn_times.len() / 2];
    let report = serde_json::json!({
        "agents": args.agents,
        "rounds": args.rounds,
        "profile": if bin_dir().ends_with("release") { "release" } else { "debug" },
        "submit_to_all_journaled_ms": {
            "min": times.first(),
            "median": median,
            "max": times.last(),
            "all": times,
        },
        "spawn_true_ms": {
            "median": spawn_median,
            "all": spawn_times,
        },
        "ratio_to_spawn_floor": median / spawn_median,
        "agent_idle_rss_kib": {
            "max": rss.iter().max(),
            "mean": mean_rss,
            "min": rss.iter().min(),
        },
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
}
