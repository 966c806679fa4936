//! Fleet simulator benchmark: one real `modi serve` and N simulated agents
//! in this one process (see `modi_tests::sim`), each enrolled for real and
//! on its own mutual-TLS connection. Prints a table and JSON: the
//! connection storm, the controller's memory and CPU idle with N
//! connected, submit → every result journaled for a `parallel` and a
//! `rolling` no-op, the latency of `modi hosts` / `status` / `runs`, and a
//! controller restart (kill -9) to every agent back.
//!
//! `cargo run --release -p modi-tests --bin fleet-sim -- --agents 10000`

use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use modi_tests::sim::{self, Options, SimFleet};
use modi_tests::{bin_dir, rss_kib};

#[derive(Parser)]
#[command(about = "Simulate N agents against a real controller and print what it costs")]
struct Args {
    /// Number of simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// The controller's store: sled, or a one-member etcd started here.
    #[arg(long, value_enum, default_value = "sled")]
    store: sim::SimStore,
    /// Controllers: more than one makes a set on etcd (`--store etcd`),
    /// the agents spread over them and relayed to the active one by the
    /// others. No restart is measured then.
    #[arg(long, default_value_t = 1)]
    controllers: usize,
    /// How long each simulated step runs (ms).
    #[arg(long, default_value_t = 0)]
    step_latency_ms: u64,
    /// Probability in [0, 1] that a simulated step fails (exit 1).
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Heartbeat interval of each agent (s); the agent's default is 10.
    #[arg(long, default_value_t = modi_agent::config::DEFAULT_HEARTBEAT_SECS)]
    heartbeat_secs: u64,
    /// Enrolments in flight at once.
    #[arg(long, default_value_t = 64)]
    enrol_concurrency: usize,
    /// Timed parallel runs (after one warm-up).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds the fleet sits idle for the idle CPU figure.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// Skip the kill -9 restart.
    #[arg(long)]
    no_restart: bool,
    /// Also kill -9 the controller in the middle of a rolling run (10%
    /// batches, 2 s pauses) and time it to its end once every agent is
    /// back (the steps of hosts not back yet wait for them).
    #[arg(long)]
    restart_mid_run: bool,
    /// Also time parallel runs to these many hosts out of the N (e.g.
    /// `1,10,100,1000`), by host name lists.
    #[arg(long, value_delimiter = ',')]
    subsets: Vec<usize>,
    /// `MODI_LOG` for the controller.
    #[arg(long, default_value = "info")]
    controller_log: String,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<std::path::PathBuf>,
    /// Profile the controller with `perf record` (Debian's linux-perf)
    /// from the first parallel run to the last CLI timing, into this file.
    #[arg(long)]
    perf_record: Option<std::path::PathBuf>,
}

/// `perf record` attached to `pid` until stopped (SIGINT) or dropped.
struct Perf(std::process::Child);

impl Perf {
    fn attach(pid: u32, out: &std::path::Path) -> anyhow::Result<Perf> {
        let child = Command::new("perf")
            .args(["record", "-F", "499", "-g", "-p", &pid.to_string(), "-o"])
            .arg(out)
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start perf (apt-get install linux-perf): {e}"))?;
        // Let it attach before the work starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Perf(child))
    }

    /// Stops it; it writes its file and exits.
    fn stop(self) {}
}

impl Drop for Perf {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let _ = self.0.wait();
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the CLI `times` times; the median wall time (ms) and the last
/// output's length.
fn time_cli(fleet: &SimFleet, args: &[&str], times: usize) -> (f64, usize) {
    let mut all = Vec::new();
    let mut len = 0;
    for _ in 0..times {
        let started = Instant::now();
        let out = fleet.ctl.modi(args);
        all.push(ms(started.elapsed()));
        assert_eq!(out.code, 0, "modi {args:?} failed: {}", out.stderr);
        len = out.stdout.len();
    }
    (median(all), len)
}

/// The web view's page of `run`, fetched `times` times over HTTPS by curl
/// signed in with a `modi ui` link: median ms and the page's size.
fn time_web_run_page(fleet: &SimFleet, run: &str, times: usize) -> anyhow::Result<(f64, usize)> {
    let url = fleet.ctl.json(&["ui"])["url"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("modi ui gave no url"))?
        .to_string();
    let jar = fleet.ctl.root.join("web.cookies");
    let ca = fleet.ctl.data.join("ca.pem");
    let curl = |url: &str| {
        Command::new("curl")
            .args(["-sS", "-o", "-", "--cacert"])
            .arg(&ca)
            .arg("-b")
            .arg(&jar)
            .arg("-c")
            .arg(&jar)
            .arg(url)
            .output()
    };
    curl(&url)?;
    let page = format!("https://127.0.0.1:{}/runs/{run}", fleet.web_port);
    let mut all = Vec::new();
    let mut len = 0;
    for _ in 0..times {
        let started = Instant::now();
        let out = curl(&page)?;
        all.push(ms(started.elapsed()));
        anyhow::ensure!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("class=\"grid\""),
            "the run page did not render: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        len = out.stdout.len();
    }
    Ok((median(all), len))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.agents > 0, "--agents must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.fail_rate),
        "--fail-rate must be within 0 and 1"
    );
    modi_tests::build_benchmark_binaries();
    let nofile = sim::raise_nofile(4 * args.agents as u64 + 4096);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let opts = Options {
        step_latency: Duration::from_millis(args.step_latency_ms),
        fail_rate: args.fail_rate,
        heartbeat: Duration::from_secs(args.heartbeat_secs.max(1)),
    };
    let n = args.agents;
    let tick = sim::ticks_per_second() as f64;
    eprintln!("fleet-sim: enrolling and connecting {n} agents...");
    let mut fleet = rt.block_on(SimFleet::start_set(
        args.store,
        args.controllers,
        n,
        opts,
        args.enrol_concurrency,
        &args.controller_log,
    ))?;
    let pid = fleet.pid().expect("controller running");
    eprintln!(
        "fleet-sim: {n} connected in {:.2} s (enrolment took {:.2} s)",
        fleet.storm_time.as_secs_f64(),
        fleet.enrol_time.as_secs_f64()
    );

    // Idle: heartbeats only.
    std::thread::sleep(Duration::from_secs(2));
    let cpu0 = sim::cpu_ticks(pid).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(args.idle_secs));
    let cpu1 = sim::cpu_ticks(pid).unwrap_or(0);
    let idle_rss = rss_kib(pid).unwrap_or(0);
    let idle_cpu_pct = (cpu1 - cpu0) as f64 / tick / args.idle_secs as f64 * 100.0;
    let sim_rss = rss_kib(std::process::id()).unwrap_or(0);
    eprintln!(
        "fleet-sim: idle: controller {} MiB resident, {idle_cpu_pct:.1}% CPU",
        idle_rss / 1024
    );

    let perf = match &args.perf_record {
        Some(out) => Some(Perf::attach(pid, out)?),
        None => None,
    };
    // etcd's writes over the runs (when the store is etcd).
    let etcd_before = (fleet.etcd_writes(), Instant::now());
    // Parallel no-op to all.
    let all = sim::parallel_noop("all");
    let mut parallel = Vec::new();
    let mut last_parallel = None;
    for round in 0..=args.rounds {
        let out = rt.block_on(fleet.apply(&all))?;
        anyhow::ensure!(
            out.state == "success",
            "parallel run {} ended {}",
            out.run,
            out.state
        );
        eprintln!(
            "fleet-sim: parallel no-op to {n}: {:.1} ms{}",
            ms(out.elapsed),
            if round == 0 { " (warm-up)" } else { "" }
        );
        if round > 0 {
            parallel.push(ms(out.elapsed));
        }
        last_parallel = Some(out);
    }
    let last_parallel = last_parallel.expect("at least one run");
    let peak_rss_after_runs = rss_kib(pid).unwrap_or(0);

    // Parallel no-op to subsets, by name.
    let mut subsets = Vec::new();
    for &k in args.subsets.iter().filter(|&&k| k > 0 && k <= n) {
        let names: Vec<String> = (0..k).map(|i| format!("sim-{i:05}")).collect();
        let yaml = sim::parallel_noop(&format!("[{}]", names.join(", ")));
        let mut times = Vec::new();
        for _ in 0..args.rounds.max(1) {
            let out = rt.block_on(fleet.apply(&yaml))?;
            anyhow::ensure!(
                out.state == "success",
                "run {} ended {}",
                out.run,
                out.state
            );
            times.push(ms(out.elapsed));
        }
        eprintln!(
            "fleet-sim: parallel no-op to {k} of {n}: {:.1} ms",
            median(times.clone())
        );
        subsets.push(
            serde_json::json!({"hosts": k, "median_ms": median(times.clone()), "all_ms": times}),
        );
    }

    // Rolling, batches of 10%.
    let rolling = rt.block_on(fleet.apply(&sim::rolling_noop("all")))?;
    anyhow::ensure!(
        rolling.state == "success",
        "rolling run {} ended {}",
        rolling.run,
        rolling.state
    );
    eprintln!(
        "fleet-sim: rolling (10% batches) to {n}: {:.1} ms",
        ms(rolling.elapsed)
    );
    let etcd = match (etcd_before.0, fleet.etcd_writes()) {
        (Some((t0, p0)), Some((t1, p1))) => {
            let secs = etcd_before.1.elapsed().as_secs_f64();
            eprintln!(
                "fleet-sim: etcd over the runs: {:.0} transactions ({:.0}/s), {:.0} keys written ({:.0}/s)",
                t1 - t0,
                (t1 - t0) / secs,
                p1 - p0,
                (p1 - p0) / secs
            );
            let etcd_rss = fleet
                .etcd
                .as_ref()
                .or(fleet.set.as_ref().map(|s| &s.etcd))
                .and_then(|e| e.pid(0))
                .and_then(rss_kib);
            serde_json::json!({
                "txns": t1 - t0, "txns_per_s": (t1 - t0) / secs,
                "puts": p1 - p0, "puts_per_s": (p1 - p0) / secs,
                "seconds": secs,
                "etcd_rss_kib": etcd_rss,
            })
        }
        _ => serde_json::Value::Null,
    };

    // Reading at N, through the real CLI.
    let (hosts_ms, hosts_bytes) = time_cli(&fleet, &["--output", "json", "hosts"], 3);
    let (status_ms, _) = time_cli(&fleet, &["status", &last_parallel.run], 3);
    let (status_json_ms, status_bytes) = time_cli(
        &fleet,
        &["--output", "json", "status", &last_parallel.run, "--all"],
        3,
    );
    let (runs_ms, _) = time_cli(&fleet, &["runs"], 3);
    let (web_ms, web_bytes) = time_web_run_page(&fleet, &last_parallel.run, 3)?;
    eprintln!(
        "fleet-sim: web view: the page of a {n}-host run in {web_ms:.0} ms ({} KiB)",
        web_bytes / 1024
    );
    if let Some(perf) = perf {
        perf.stop();
    }
    eprintln!(
        "fleet-sim: modi hosts {hosts_ms:.0} ms, status {status_ms:.0} ms (--all json {status_json_ms:.0} ms), runs {runs_ms:.0} ms"
    );

    // Every result reported and acked, nothing run twice.
    let acked = rt.block_on(fleet.wait_all_acked(Duration::from_secs(30)));
    anyhow::ensure!(acked, "{} results still not acked", fleet.sim.unacked());
    let duplicates = fleet
        .sim
        .stats
        .duplicates
        .load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(duplicates == 0, "{duplicates} steps ran twice");

    // What the store's writer did for all of the above.
    let writer = serde_json::json!({
        "jobs": fleet.metric("modi_store_writes_total").ok(),
        "flushes": fleet.metric("modi_store_flushes_total").ok(),
    });
    // Restart: kill -9, start again, every agent back.
    let mut restart = serde_json::Value::Null;
    if !args.no_restart && args.controllers <= 1 {
        let killed = Instant::now();
        fleet.ctl.crash();
        fleet.ctl.serve_within(Duration::from_secs(120));
        let serving = killed.elapsed();
        rt.block_on(fleet.wait_all_connected(Duration::from_secs(300)))?;
        let back = killed.elapsed();
        let after = rt.block_on(fleet.apply(&all))?;
        anyhow::ensure!(
            after.state == "success",
            "run after restart ended {}",
            after.state
        );
        eprintln!(
            "fleet-sim: restart: admin API after {:.2} s, all {n} back after {:.2} s, then a parallel no-op in {:.1} ms",
            serving.as_secs_f64(),
            back.as_secs_f64(),
            ms(after.elapsed)
        );
        restart = serde_json::json!({
            "admin_api_answers_s": serving.as_secs_f64(),
            "all_reconnected_s": back.as_secs_f64(),
            "parallel_after_ms": ms(after.elapsed),
            "controller_rss_kib": fleet.pid().and_then(rss_kib),
        });
    }
    let mut mid_run = serde_json::Value::Null;
    if args.restart_mid_run {
        let yaml = r#"
name: sim-rolling-paused
changes:
  - name: noop
    hosts: all
    rollout: { mode: rolling, batches: ["10%"], pause: 2s }
    apply:
      - run: "true"
"#;
        let file = fleet.ctl.changeset("mid-run.yaml", yaml);
        let executed = || {
            fleet
                .sim
                .stats
                .executed
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let before = executed();
        let run = fleet.ctl.detach(&file, &[]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while executed() < before + (n as u64).div_ceil(10) * 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let killed = Instant::now();
        fleet.ctl.crash();
        fleet.ctl.serve_within(Duration::from_secs(120));
        rt.block_on(fleet.wait_all_connected(Duration::from_secs(300)))?;
        let back = killed.elapsed();
        let status = fleet.ctl.wait_final(&run);
        let done = killed.elapsed();
        let state = status["state"].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(
            state == "success",
            "run {run} ended {state} after the restart"
        );
        let acked = rt.block_on(fleet.wait_all_acked(Duration::from_secs(60)));
        anyhow::ensure!(acked, "{} results still not acked", fleet.sim.unacked());
        let duplicates = fleet
            .sim
            .stats
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed);
        anyhow::ensure!(duplicates == 0, "{duplicates} steps ran twice");
        eprintln!(
            "fleet-sim: kill -9 mid-rollout: all {n} back after {:.2} s, the run ended {state} {:.2} s after the kill; {} steps run for it, none twice",
            back.as_secs_f64(),
            done.as_secs_f64(),
            executed() - before
        );
        mid_run = serde_json::json!({
            "all_reconnected_s": back.as_secs_f64(),
            "run_final_after_kill_s": done.as_secs_f64(),
            "state": state,
            "steps": executed() - before,
        });
    }
    let stats = fleet.sim.stats.json();
    rt.block_on(fleet.stop());

    let report = serde_json::json!({
        "agents": n,
        "store": format!("{:?}", args.store).to_lowercase(),
        "controllers": args.controllers,
        "etcd_writes": etcd,
        "profile": if bin_dir().ends_with("release") { "release" } else { "debug" },
        "cores": std::thread::available_parallelism().map_or(0, |c| c.get()),
        "nofile": nofile,
        "step_latency_ms": args.step_latency_ms,
        "fail_rate": args.fail_rate,
        "heartbeat_secs": args.heartbeat_secs,
        "enrol_s": fleet.enrol_time.as_secs_f64(),
        "connection_storm_s": fleet.storm_time.as_secs_f64(),
        "controller_idle": {
            "rss_kib": idle_rss,
            "cpu_percent": idle_cpu_pct,
            "cpu_s_total": cpu1 as f64 / tick,
        },
        "controller_rss_after_runs_kib": peak_rss_after_runs,
        "simulator_rss_kib": sim_rss,
        "parallel_all_ms": { "median": median(parallel.clone()), "all": parallel },
        "parallel_subsets": subsets,
        "rolling_10pct_ms": ms(rolling.elapsed),
        "cli_ms": {
            "hosts_json": hosts_ms, "hosts_json_bytes": hosts_bytes,
            "status": status_ms,
            "status_all_json": status_json_ms, "status_all_json_bytes": status_bytes,
            "web_run_page": web_ms, "web_run_page_bytes": web_bytes,
            "runs": runs_ms,
        },
        "restart": restart,
        "restart_mid_rollout": mid_run,
        "store_writer": writer,
        "simulator": stats,
    });
    println!("| figure | value |");
    println!("|---|---:|");
    println!("| agents | {n} |");
    println!(
        "| enrolment, all | {:.2} s |",
        fleet.enrol_time.as_secs_f64()
    );
    println!(
        "| connection storm, cold → all connected | {:.2} s |",
        fleet.storm_time.as_secs_f64()
    );
    println!(
        "| controller RSS idle | {:.1} MiB |",
        idle_rss as f64 / 1024.0
    );
    println!("| controller CPU idle | {idle_cpu_pct:.1} % |");
    println!(
        "| parallel no-op → all journaled (median) | {:.1} ms |",
        median(
            report["parallel_all_ms"]["all"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
                .unwrap_or_default()
        )
    );
    for s in report["parallel_subsets"].as_array().into_iter().flatten() {
        println!(
            "| parallel no-op → {} hosts journaled (median) | {:.1} ms |",
            s["hosts"],
            s["median_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "| rolling 10% batches → all journaled | {:.1} ms |",
        ms(rolling.elapsed)
    );
    println!("| modi hosts (json) | {hosts_ms:.0} ms |");
    println!("| modi status (run of {n}) | {status_ms:.0} ms |");
    println!("| web view: the run page | {web_ms:.0} ms |");
    println!("| modi status --all (json) | {status_json_ms:.0} ms |");
    println!("| modi runs | {runs_ms:.0} ms |");
    if !restart.is_null() {
        println!(
            "| restart (kill -9) → all reconnected | {:.2} s |",
            restart["all_reconnected_s"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = args.json_out {
        std::fs::write(path, json + "\n")?;
    }
    Ok(())
}
