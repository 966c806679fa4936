//! The end-to-end harness: builders that start the real `modi` and
//! `modi-agent` binaries on loopback, each in a fresh temp dir with a free
//! port, each child killed on drop, and `eventually!` instead of fixed
//! sleeps.
//!
//! Cargo only tells a crate's tests where that same crate's binaries are,
//! so the harness finds `modi` and `modi-agent` in the target directory
//! this test binary runs from; the README's test command builds them first.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use serde_json::Value;

pub mod sim;

/// Waits until `$cond` holds (checking every 50 ms), or panics after
/// `$secs` seconds with the message.
#[macro_export]
macro_rules! eventually {
    ($secs:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64($secs as f64);
        loop {
            if $cond {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!("not within {}s: {}", $secs, format!($($msg)+));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }};
}

/// Builds the binaries a benchmark starts (`modi`, `modi-agent`), in the
/// benchmark's own profile.
pub fn build_benchmark_binaries() {
    let release = bin_dir().ends_with("release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // `cargo run` gives us its package's CARGO_PKG_*, CARGO_MANIFEST_* and
    // such; build scripts (ring's) rerun when those differ, and would
    // rebuild half the tree on every alternation with `cargo run`.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                k.as_ref(),
                "OUT_DIR" | "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&key);
        }
    }
    cmd.args([
        "build",
        "--locked",
        "-p",
        "modi-controller",
        "-p",
        "modi-agent",
        // The same packages as `cargo run -p modi-tests` builds with, so
        // both resolve the same features and neither rebuilds the other.
        "-p",
        "modi-tests",
    ]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("cargo build");
    assert!(status.success(), "building modi and modi-agent failed");
}

/// The folder holding `modi` and `modi-agent` for this build profile.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of one of our binaries; panics with the fix if it is missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --workspace --bins), as the README's test command does",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A finished command.
#[derive(Debug)]
pub struct Out {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Out {
    /// Asserts exit 0 and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        &self.stdout
    }

    /// Parses stdout as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// Runs a command to its end.
pub fn run(cmd: &mut Command) -> Out {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A child process killed (and reaped) on drop, its output in a log file.
pub struct Proc {
    child: Option<Child>,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with output to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        if !cmd.get_envs().any(|(k, _)| k == "MODI_LOG") {
            cmd.env("MODI_LOG", "info,modi_controller=debug,modi_agent=debug");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc {
            child: Some(child),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Is it still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGTERM and wait (SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL at once (a crash).
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its exit code once it has exited (-1 for a signal), `None` while
    /// it runs.
    pub fn exited(&mut self) -> Option<i32> {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(status))) => Some(status.code().unwrap_or(-1)),
            _ => None,
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A real controller: `modi init` + `modi serve` in a temp dir.
pub struct Controller {
    /// The test's temp dir (everything lives under it).
    pub root: PathBuf,
    /// The controller's data dir.
    pub data: PathBuf,
    /// The CLI config `modi init` wrote.
    pub cli_config: PathBuf,
    /// The port.
    pub port: u16,
    /// `MODI_LOG` for `modi serve` (default: info, debug for modi).
    pub log_filter: Option<String>,
    proc: Option<Proc>,
    _tmp: Option<tempfile::TempDir>,
}

/// A join token as `modi token create --output json` prints it.
#[derive(Clone, Debug)]
pub struct Token {
    /// The token.
    pub token: String,
    /// The CA pin.
    pub ca_sha256: String,
    /// The controller URL.
    pub controller: String,
}

impl Controller {
    /// Initialises and starts a controller in a fresh temp dir.
    pub fn start() -> Controller {
        Self::start_with("")
    }

    /// Like [`Controller::start`], with extra TOML appended to
    /// `controller.toml` (top-level keys first, then tables).
    pub fn start_with(extra_toml: &str) -> Controller {
        let mut c = Controller::init(extra_toml);
        c.serve();
        c
    }

    /// Initialises (does not start) a controller in a fresh temp dir, with
    /// extra TOML as [`Controller::start_with`] takes it.
    pub fn init(extra_toml: &str) -> Controller {
        let tmp = tempfile::Builder::new()
            .prefix("modi-e2e-")
            .tempdir()
            .expect("temp dir");
        let mut c = Controller::init_in(tmp.path(), extra_toml);
        c._tmp = Some(tmp);
        c
    }

    /// Initialises (does not start) a controller under `root`.
    pub fn init_in(root: &Path, extra_toml: &str) -> Controller {
        let port = free_port();
        let data = root.join("controller");
        let cli_config = root.join("cli.toml");
        run(Command::new(bin("modi"))
            .args(["init", "--data"])
            .arg(&data)
            .args(["--address", "127.0.0.1", "--address", "localhost"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--cli-config")
            .arg(&cli_config))
        .ok();
        if !extra_toml.is_empty() {
            let path = data.join("controller.toml");
            let text = std::fs::read_to_string(&path).expect("controller.toml");
            // Top-level keys must come before the first table.
            let (head, tables) = match text.find("\n[") {
                Some(i) => text.split_at(i + 1),
                None => (text.as_str(), ""),
            };
            std::fs::write(&path, format!("{head}{extra_toml}\n{tables}")).expect("write config");
        }
        Controller {
            root: root.to_path_buf(),
            data,
            cli_config,
            port,
            log_filter: None,
            proc: None,
            _tmp: None,
        }
    }

    /// Starts `modi serve` and waits until the admin API answers.
    pub fn serve(&mut self) {
        self.serve_within(Duration::from_secs(20));
    }

    /// Starts `modi serve` and waits until the admin API answers, for at
    /// most `within`.
    pub fn serve_within(&mut self, within: Duration) {
        self.spawn_until(within, |c| c.modi(&["hosts"]).code == 0);
    }

    /// Starts `modi serve` and waits only until its port accepts
    /// connections (a standby of a set refuses the admin API).
    pub fn serve_standby(&mut self) {
        let port = self.port;
        self.spawn_until(Duration::from_secs(20), move |_| {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Starts `modi serve`; waits until `up` holds, for at most `within`.
    fn spawn_until(&mut self, within: Duration, up: impl Fn(&Controller) -> bool) {
        let mut cmd = Command::new(bin("modi"));
        cmd.arg("serve")
            .arg("--config")
            .arg(self.data.join("controller.toml"));
        if let Some(filter) = &self.log_filter {
            cmd.env("MODI_LOG", filter);
        }
        self.proc = Some(Proc::spawn(cmd, self.root.join("controller.log")));
        let deadline = Instant::now() + within;
        while !up(self) {
            let p = self.proc.as_mut().expect("started");
            if !p.alive() || Instant::now() > deadline {
                panic!("controller did not come up:\n{}", p.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether run `run` is past running (not pending, running or paused;
    /// a run waiting at a gate counts as over, as the fault loops want).
    pub fn run_over(&self, run: &str) -> bool {
        let state = self.status(run)["state"].as_str().unwrap_or("").to_string();
        !matches!(state.as_str(), "pending" | "running" | "paused")
    }

    /// Whether this controller answers the admin API (in a set, a
    /// standby answers too: it relays to the active one).
    pub fn answers(&self) -> bool {
        self.modi(&["hosts"]).code == 0
    }

    /// Whether its gRPC health service says SERVING (in a set: it is the
    /// active one, and its store can write).
    pub fn serving(&self) -> bool {
        use tonic_health::pb::health_check_response::ServingStatus;
        let Ok(cli) = modi_controller::config::CliConfig::load(&self.cli_config) else {
            return false;
        };
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return false;
        };
        rt.block_on(async {
            // The channel's connection task needs the runtime.
            let Ok(client) = modi_controller::cli::Client::from_config(&cli) else {
                return false;
            };
            let asked = tokio::time::timeout(
                Duration::from_secs(3),
                tonic_health::pb::health_client::HealthClient::new(client.channel()).check(
                    tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    },
                ),
            )
            .await;
            matches!(asked, Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32)
        })
    }

    /// Its exit code once `modi serve` has exited.
    pub fn exited(&mut self) -> Option<i32> {
        self.proc.as_mut().and_then(Proc::exited)
    }

    /// Stops `modi serve` (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// The process id of `modi serve`, while started.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Kills `modi serve` (SIGKILL).
    pub fn crash(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.crash();
        }
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("controller.log")).unwrap_or_default()
    }

    /// Runs `modi --cli-config ... ARGS`.
    pub fn modi(&self, args: &[&str]) -> Out {
        run(Command::new(bin("modi"))
            .arg("--cli-config")
            .arg(&self.cli_config)
            .args(args)
            .current_dir(&self.root))
    }

    /// Runs `modi --output json ARGS` and parses the output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.modi(&all);
        out.json()
    }

    /// A fresh join token.
    pub fn token(&self, ttl: &str) -> Token {
        let t = self.json(&["token", "create", "--ttl", ttl]);
        Token {
            token: t["token"].as_str().expect("token").into(),
            ca_sha256: t["ca_sha256"].as_str().expect("pin").into(),
            controller: t["controller"].as_str().expect("url").into(),
        }
    }

    /// The hosts `modi hosts --output json` lists.
    pub fn hosts(&self) -> Vec<Value> {
        self.json(&["hosts"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Is agent `name` connected?
    pub fn connected(&self, name: &str) -> bool {
        self.hosts()
            .iter()
            .any(|h| h["name"] == name && h["connected"] == true)
    }

    /// Writes a changeset file under the test's root and returns its path.
    pub fn changeset(&self, name: &str, yaml: &str) -> PathBuf {
        let path = self.root.join(name);
        std::fs::write(&path, yaml).expect("write changeset");
        path
    }

    /// `modi apply FILE --output json`: the run's final status document
    /// and the exit code.
    pub fn apply(&self, file: &Path, extra: &[&str]) -> (i32, Value) {
        let mut args = vec![
            "--output",
            "json",
            "apply",
            file.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        let out = self.modi(&args);
        let end = out
            .stdout
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["type"] == "end")
            .unwrap_or_else(|| panic!("no end event: {out:#?}\ncontroller log:\n{}", self.log()));
        (out.code, end["status"].clone())
    }

    /// `modi status RUN --output json`.
    pub fn status(&self, run: &str) -> Value {
        self.json(&["status", run])
    }

    /// `modi apply FILE --detach`: the run id.
    pub fn detach(&self, file: &Path, extra: &[&str]) -> String {
        let mut args = vec![
            "--output",
            "json",
            "apply",
            file.to_str().expect("utf-8 path"),
            "--detach",
        ];
        args.extend_from_slice(extra);
        let out = self.modi(&args);
        out.json()["run"].as_str().expect("run id").to_string()
    }

    /// Waits until run `run` is in `state`; its status.
    pub fn wait_state(&self, run: &str, state: &str) -> Value {
        self.wait_status(run, |s| s["state"] == state, state)
    }

    /// Waits until run `run` has ended; its status.
    pub fn wait_final(&self, run: &str) -> Value {
        self.wait_status(
            run,
            |s| {
                !matches!(
                    s["state"].as_str(),
                    Some("pending" | "running" | "awaiting_approval" | "paused")
                )
            },
            "its end",
        )
    }

    /// Waits until run `run`'s status satisfies `done`; that status.
    pub fn wait_status_of(&self, run: &str, done: impl Fn(&Value) -> bool) -> Value {
        self.wait_status(run, done, "the awaited state")
    }

    fn wait_status(&self, run: &str, done: impl Fn(&Value) -> bool, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.status(run);
            if done(&status) {
                return status;
            }
            if Instant::now() > deadline {
                panic!("run {run} did not reach {what} within 60s; last status {status}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- controller log ---\n{}", self.log());
        }
    }
}

/// A real agent: `modi-agent join` + `modi-agent run`.
pub struct Agent {
    /// Its name.
    pub name: String,
    /// Its data dir.
    pub dir: PathBuf,
    proc: Option<Proc>,
}

impl Agent {
    /// Joins `ctl` as `name` with `labels` and starts; waits until connected.
    pub fn join(ctl: &Controller, name: &str, labels: &[(&str, &str)]) -> Agent {
        let mut a = Agent::enrol(ctl, name, labels);
        a.start();
        eventually!(
            20,
            ctl.connected(name),
            "agent {name} connects:\n{}",
            a.log()
        );
        a
    }

    /// Joins without starting.
    pub fn enrol(ctl: &Controller, name: &str, labels: &[(&str, &str)]) -> Agent {
        let token = ctl.token("10m");
        let dir = ctl.root.join("agents").join(name);
        let out = Agent::join_cmd(&token, name, &dir, labels);
        out.ok();
        Agent {
            name: name.into(),
            dir,
            proc: None,
        }
    }

    /// Runs `modi-agent join` with `token`.
    pub fn join_cmd(token: &Token, name: &str, dir: &Path, labels: &[(&str, &str)]) -> Out {
        let mut cmd = Command::new(bin("modi-agent"));
        cmd.args([
            "join",
            "--controller",
            &token.controller,
            "--token",
            &token.token,
        ])
        .args(["--ca-sha256", &token.ca_sha256, "--name", name, "--data"])
        .arg(dir);
        for (k, v) in labels {
            cmd.arg("--label").arg(format!("{k}={v}"));
        }
        run(&mut cmd)
    }

    /// An agent already joined in `dir`, not started.
    pub fn at(name: &str, dir: PathBuf) -> Agent {
        Agent {
            name: name.into(),
            dir,
            proc: None,
        }
    }

    /// Its exit code once `modi-agent run` has exited.
    pub fn exited(&mut self) -> Option<i32> {
        self.proc.as_mut().and_then(Proc::exited)
    }

    /// Starts `modi-agent run`.
    pub fn start(&mut self) {
        let mut cmd = Command::new(bin("modi-agent"));
        cmd.arg("run")
            .arg("--config")
            .arg(self.dir.join("agent.toml"));
        self.proc = Some(Proc::spawn(cmd, self.dir.join("agent.log")));
    }

    /// Stops it (SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }

    /// Kills it (SIGKILL).
    pub fn crash(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.crash();
        }
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Where its steps run.
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

/// Lines in every agent's `markers` file (what the fault tests' steps
/// write).
pub fn marker_lines(agents: &[Agent]) -> usize {
    agents
        .iter()
        .map(|a| std::fs::read_to_string(a.work().join("markers")).map_or(0, |m| m.lines().count()))
        .sum()
}

/// Of the markers `TAG-STEP` every run tag and step should have left once
/// on every agent: how many are there twice or more, and how many are
/// missing.
pub fn marker_faults(agents: &[Agent], tags: &[String], steps: &[&str]) -> (usize, usize) {
    let (mut twice, mut lost) = (0, 0);
    for agent in agents {
        let markers = std::fs::read_to_string(agent.work().join("markers")).unwrap_or_default();
        for tag in tags {
            for step in steps {
                let line = format!("{tag}-{step}");
                match markers.lines().filter(|l| *l == line).count() {
                    0 => lost += 1,
                    1 => {}
                    _ => twice += 1,
                }
            }
        }
    }
    (twice, lost)
}

/// The actions of a run's decisions (`approve`, `pause`, ...), in order.
pub fn decision_actions(status: &Value) -> Vec<String> {
    status["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| d["action"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A small deterministic generator for fault loops, seeded from the clock
/// (the seed is printed, so a failing loop can be read again): `next(n)`
/// is below `n`.
pub fn seeded() -> impl FnMut(u64) -> u64 {
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    move |below: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % below
    }
}

/// Host states of one change in a status document: name → state.
pub fn host_states(status: &Value, change: &str) -> BTreeMap<String, String> {
    status["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == change)
        .flat_map(|c| c["hosts"].as_array().cloned().unwrap_or_default())
        .map(|h| {
            (
                h["name"].as_str().unwrap_or_default().to_string(),
                h["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Resident memory of a process in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

impl Agent {
    /// Sets `key = value` (a TOML value, e.g. `"\"https://...\""` or `1`)
    /// in its `agent.toml`, replacing any such line.
    pub fn configure(&self, key: &str, value: &str) {
        let path = self.dir.join("agent.toml");
        let text = std::fs::read_to_string(&path).expect("agent.toml");
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| l.split('=').next().map(str::trim) != Some(key))
            .map(str::to_string)
            .collect();
        // Top-level keys go before the first table.
        let at = lines
            .iter()
            .position(|l| l.starts_with('['))
            .unwrap_or(lines.len());
        lines.insert(at, format!("{key} = {value}"));
        std::fs::write(&path, lines.join("\n") + "\n").expect("write agent.toml");
    }
}

/// A TCP proxy on loopback between agents and a controller that can stop
/// forwarding (a network partition: connections stay open, nothing
/// moves) and heal (stalled connections are reset, as the far side has
/// long given up on them; new ones flow again).
pub struct FaultProxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections accepted before this generation are reset.
    epoch: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FaultProxy {
    /// Forwards 127.0.0.1:`port` (a fresh one) to 127.0.0.1:`to`.
    pub fn start(to: u16) -> FaultProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let blocked = Arc::new(AtomicBool::new(false));
        let epoch = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, e, s) = (blocked.clone(), epoch.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (client, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                if b.load(Ordering::Relaxed) {
                    // Partitioned: the SYN got through to us, nothing else.
                    drop(client);
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let born = e.load(Ordering::Relaxed);
                for (from, into) in [
                    (
                        client.try_clone().expect("clone"),
                        server.try_clone().expect("clone"),
                    ),
                    (server, client),
                ] {
                    let (b, e, s) = (b.clone(), e.clone(), s.clone());
                    std::thread::spawn(move || pipe(from, into, &b, &e, born, &s));
                }
            }
        });
        FaultProxy {
            port,
            blocked,
            epoch,
            stop,
        }
    }

    /// Its URL, for agents.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// Stops forwarding anything.
    pub fn partition(&self) {
        self.blocked
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resets the stalled connections and forwards again.
    pub fn heal(&self) {
        self.epoch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.blocked
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.epoch
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Copies `from` to `into` while not partitioned; holds still while it is;
/// ends (closing both) when the proxy heals past this connection's epoch.
fn pipe(
    mut from: std::net::TcpStream,
    mut into: std::net::TcpStream,
    blocked: &std::sync::atomic::AtomicBool,
    epoch: &std::sync::atomic::AtomicU64,
    born: u64,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if epoch.load(Ordering::Relaxed) != born || stop.load(Ordering::Relaxed) {
            break;
        }
        if blocked.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = into.shutdown(std::net::Shutdown::Both);
}

/// A tmpfs mounted on a fresh folder (needs root); unmounted on drop.
pub struct Tmpfs {
    /// Where it is mounted.
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on `path` (created).
    pub fn mount(path: &Path, mib: u32) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mount point");
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(path))
        .ok();
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    /// Writes a file until the filesystem is full; returns its path.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path.join("filler");
        let mut f = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A controller set: several `modi serve` on one etcd (started here, on
/// loopback), the first one's CA and certificates copied to the others
/// as docs/operations.md says, and a CLI config that knows them all.
pub struct ControllerSet {
    /// The etcd members.
    pub etcd: modi_controller::testetcd::Etcd,
    /// The controllers; each one's own `cli_config` names only it.
    pub members: Vec<Controller>,
    /// The CLI config that knows every controller.
    pub cli_config: PathBuf,
    /// The test's temp dir.
    pub root: PathBuf,
    _tmp: tempfile::TempDir,
}

impl ControllerSet {
    /// `controllers` controllers on an etcd of `members` members, with
    /// extra top-level TOML for each `controller.toml`. The first starts
    /// first and is the active one; the others wait on standby.
    pub fn start(controllers: usize, members: usize, extra_toml: &str) -> ControllerSet {
        ControllerSet::start_with(controllers, members, |_| extra_toml.to_string())
    }

    /// Like [`ControllerSet::start`], with each controller's extra TOML
    /// from `extra(i)`.
    pub fn start_with(
        controllers: usize,
        members: usize,
        extra: impl Fn(usize) -> String,
    ) -> ControllerSet {
        let etcd = modi_controller::testetcd::Etcd::start(members);
        let tmp = tempfile::Builder::new()
            .prefix("modi-set-")
            .tempdir()
            .expect("temp dir");
        let endpoints = etcd
            .endpoints()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let store = |i: usize| {
            format!(
                "{}\n[store]\nbackend = \"etcd\"\nendpoints = [{endpoints}]\nprefix = \"fleet/\"\n",
                extra(i)
            )
        };
        let mut all: Vec<Controller> = (0..controllers)
            .map(|i| Controller::init_in(&tmp.path().join(format!("c{i}")), &store(i)))
            .collect();
        // One CA and one server certificate (for 127.0.0.1 and
        // localhost) for the whole set.
        for other in &all[1..] {
            for file in [
                "ca.pem",
                "ca.key",
                "controller.pem",
                "controller.key",
                "admin.pem",
                "admin.key",
            ] {
                std::fs::copy(all[0].data.join(file), other.data.join(file)).expect("copy PKI");
            }
        }
        let urls: Vec<String> = all
            .iter()
            .map(|c| format!("https://127.0.0.1:{}", c.port))
            .collect();
        let cli_config = tmp.path().join("set-cli.toml");
        let first = std::fs::read_to_string(&all[0].cli_config).expect("cli.toml");
        std::fs::write(
            &cli_config,
            format!(
                "{first}\ncontrollers = [{}]\n",
                urls[1..]
                    .iter()
                    .map(|u| format!("{u:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .expect("set cli.toml");
        all[0].serve();
        for c in &mut all[1..] {
            c.serve_standby();
        }
        ControllerSet {
            etcd,
            members: all,
            cli_config,
            root: tmp.path().to_path_buf(),
            _tmp: tmp,
        }
    }

    /// Every controller's URL.
    pub fn urls(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|c| format!("https://127.0.0.1:{}", c.port))
            .collect()
    }

    /// The set as one controller: the CLI knows every member and talks to
    /// the active one (for `detach`, `wait_final`, `status`, ...).
    pub fn cli(&self) -> Controller {
        Controller {
            root: self.root.clone(),
            data: self.members[0].data.clone(),
            cli_config: self.cli_config.clone(),
            port: self.members[0].port,
            log_filter: None,
            proc: None,
            _tmp: None,
        }
    }

    /// Which member is active now (its health says SERVING), if one.
    pub fn active(&self) -> Option<usize> {
        (0..self.members.len())
            .find(|&i| self.members[i].proc.is_some() && self.members[i].serving())
    }

    /// Enrols agent `name` with every controller's URL and starts it;
    /// waits until it is connected.
    pub fn agent(&self, name: &str, labels: &[(&str, &str)]) -> Agent {
        self.agent_at(0, name, labels)
    }

    /// Like [`ControllerSet::agent`], the URL of controller `first` first
    /// (the one the agent dials first): agents spread over the set.
    pub fn agent_at(&self, first: usize, name: &str, labels: &[(&str, &str)]) -> Agent {
        let cli = self.cli();
        let token = cli.token("10m");
        let dir = self.root.join("agents").join(name);
        let mut cmd = Command::new(bin("modi-agent"));
        cmd.arg("join");
        let mut urls = self.urls();
        let n = urls.len();
        urls.rotate_left(first % n);
        for url in urls {
            cmd.arg("--controller").arg(url);
        }
        cmd.args(["--token", &token.token, "--ca-sha256", &token.ca_sha256])
            .args(["--name", name, "--data"])
            .arg(&dir);
        for (k, v) in labels {
            cmd.arg("--label").arg(format!("{k}={v}"));
        }
        run(&mut cmd).ok();
        let mut agent = Agent::at(name, dir);
        agent.start();
        eventually!(
            20,
            cli.connected(name),
            "agent {name} connects:\n{}",
            agent.log()
        );
        agent
    }
}
