//! `modi demo`: the embedded default. A throwaway CA and data dir, a
//! controller and five `modi-agent` processes (found beside `modi` or on
//! PATH; each joins with its own work dir and labels), `examples/demo.yaml`
//! applied with live progress, then everything stopped and cleaned up.
//! With `--stay` the fleet keeps running after the demo's run, for `modi`
//! commands from another shell (the export line it prints points them at
//! it), until SIGINT (Ctrl-C) or SIGTERM. Either signal, at any point,
//! stops the processes and removes the temp dir (unless `--keep`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use modi_proto::v1 as pb;
use tokio::process::{Child, Command};

use super::{CliError, Client, Outcome, Output, Vars, apply};
use crate::config::CliConfig;
use crate::init::{InitRequest, init};

/// The demo changeset, embedded so the demo runs from anywhere.
pub const DEMO_YAML: &str = include_str!("../../../examples/demo.yaml");

/// The demo's agents: name and labels.
pub const AGENTS: [(&str, &str); 5] = [
    ("demo-1", "web"),
    ("demo-2", "web"),
    ("demo-3", "web"),
    ("demo-4", "web"),
    ("demo-5", "db"),
];

/// The config file `modi-agent join` writes in its data dir.
const AGENT_CONFIG: &str = "agent.toml";

/// How long the demo waits for its fleet to come up.
const STARTUP: Duration = Duration::from_secs(30);

/// A child process that is stopped (TERM, then KILL) when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, program: &Path, args: &[&str], log: PathBuf) -> Result<Proc, CliError> {
        let file = std::fs::File::create(&log)
            .map_err(|e| CliError::Failed(format!("cannot create {}: {e}", log.display())))?;
        let err = file
            .try_clone()
            .map_err(|e| CliError::Failed(e.to_string()))?;
        let child = Command::new(program)
            .args(args)
            // Its own process group: a Ctrl-C at the terminal reaches the
            // demo only, which then stops its fleet in order.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .env("MODI_LOG", "info")
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| CliError::Failed(format!("cannot start {}: {e}", program.display())))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

fn free_port() -> Result<u16, CliError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| CliError::Failed(format!("no free port on 127.0.0.1: {e}")))
}

/// Runs the demo. Exit 0 when the demo ran to its end (its run includes a
/// deliberate failure and backout, so the run itself does not succeed).
/// With `stay`, the fleet stays up after that until SIGINT or SIGTERM.
pub async fn run(
    out: &Output,
    file: Option<PathBuf>,
    keep: bool,
    stay: bool,
) -> Result<Outcome, CliError> {
    // SIGINT and SIGTERM are ours from the start: whenever one comes, the
    // fleet is stopped and the temp dir removed, never left behind.
    let (tx, signalled) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        modi_common::shutdown_signal().await;
        let _ = tx.send(true);
    });
    let tmp = tempfile::Builder::new()
        .prefix("modi-demo-")
        .tempdir()
        .map_err(|e| CliError::Failed(format!("cannot make a temp dir: {e}")))?;
    let root = tmp.path().to_path_buf();
    let result = demo(out, &root, file, stay, keep, signalled).await;
    if keep {
        let kept = tmp.keep();
        out.note(format!("demo files kept in {}", kept.display()));
    } else {
        match tmp.close() {
            Ok(()) => out.note(format!("demo: removed {}", root.display())),
            Err(e) => out.note(format!("demo: cannot remove {}: {e}", root.display())),
        }
    }
    result
}

async fn demo(
    out: &Output,
    root: &Path,
    file: Option<PathBuf>,
    stay: bool,
    keep: bool,
    mut signalled: tokio::sync::watch::Receiver<bool>,
) -> Result<Outcome, CliError> {
    let say = |s: &str| out.note(format!("demo: {s}"));
    let port = free_port()?;
    let data = root.join("controller");
    let report = init(&InitRequest {
        data_dir: data.clone(),
        addresses: vec!["127.0.0.1".into(), "localhost".into()],
        listen: format!("127.0.0.1:{port}"),
        admin_name: "demo-admin".into(),
        user_cli_config: None,
    })
    .map_err(|e| CliError::Failed(e.to_string()))?;
    say(&format!(
        "made a throwaway CA (SHA-256 {}…) and controller in {}",
        &report.ca_sha256[..16],
        root.display()
    ));

    if stay {
        // The fleet that stays up has the web view on too: `modi ui`.
        let web = free_port()?;
        add_top_level_key(
            &report.controller_config,
            &format!("web_listen = \"127.0.0.1:{web}\""),
        )?;
    }

    let me = std::env::current_exe().map_err(|e| CliError::Failed(e.to_string()))?;
    let mut procs = Vec::new();
    let config = report.controller_config.to_string_lossy().into_owned();
    procs.push(Proc::spawn(
        "controller",
        &me,
        &["serve", "--config", &config],
        root.join("controller.log"),
    )?);
    let cli = CliConfig::load(&report.cli_config).map_err(|e| CliError::Failed(e.to_string()))?;
    let client = Client::from_config(&cli)?;

    let work = async {
        wait_for(&client, &mut procs, 0).await?;
        say(&format!("controller listening on 127.0.0.1:{port}"));
        let agent_bin = crate::install::locate_agent(None)
            .map_err(|e| CliError::Failed(format!("{e}; the demo starts modi-agent processes")))?;
        // One token for the whole demo fleet, as for a real one.
        let token = client
            .admin()
            .create_token(pb::CreateTokenRequest {
                ttl_seconds: 300,
                uses: AGENTS.len() as u32,
                ..Default::default()
            })
            .await
            .map_err(|s| client.error(s))?
            .into_inner();
        for (name, role) in AGENTS {
            let dir = root.join("agents").join(name);
            let dir_arg = dir.to_string_lossy().into_owned();
            let (role, env) = (format!("role={role}"), "env=demo".to_string());
            let joined = Command::new(&agent_bin)
                .args(["join", "--controller", &token.controller_url])
                .args(["--token", &token.token, "--ca-sha256", &token.ca_sha256])
                .args(["--name", name, "--label", &role, "--label", &env])
                .args(["--data", &dir_arg])
                .stdin(Stdio::null())
                // A signal mid-join drops this future: the join goes too.
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|e| {
                    CliError::Failed(format!("cannot start {}: {e}", agent_bin.display()))
                })?;
            if !joined.status.success() {
                return Err(CliError::Failed(format!(
                    "{name} could not join ({}): {}",
                    joined.status,
                    String::from_utf8_lossy(&joined.stderr).trim()
                )));
            }
            let agent_config = dir.join(AGENT_CONFIG).to_string_lossy().into_owned();
            procs.push(Proc::spawn(
                name,
                &agent_bin,
                &["run", "--config", &agent_config],
                root.join(format!("{name}.log")),
            )?);
        }
        wait_for(&client, &mut procs, AGENTS.len()).await?;
        say(&format!(
            "{} modi-agent processes enrolled with one {}-use token and connected over mutual TLS",
            AGENTS.len(),
            AGENTS.len()
        ));

        let changeset = match &file {
            Some(f) => f.clone(),
            None => {
                let path = root.join("demo.yaml");
                std::fs::write(&path, DEMO_YAML).map_err(|e| CliError::Failed(e.to_string()))?;
                path
            }
        };
        say(&format!(
            "applying {}",
            file.as_deref()
                .unwrap_or(Path::new("examples/demo.yaml"))
                .display()
        ));
        apply::apply(out, &client, &changeset, &Vars::default(), false).await
    };
    let mut outcome = tokio::select! {
        outcome = work => outcome,
        _ = signalled.wait_for(|s| *s) => Ok(Outcome::Ok),
    };
    // A Ctrl-C during the run also detaches `apply`, which then returns
    // as if all was well: the signal decides.
    let interrupted = *signalled.borrow();
    if interrupted {
        say("interrupted: stopping the controller and agents");
        outcome = Err(CliError::Failed(
            "interrupted before the demo finished".into(),
        ));
    }

    if stay && !interrupted && outcome.is_ok() {
        stay_up(out, root, &report.cli_config, &procs, keep);
        // Until a signal; a process that exits meanwhile (an agent
        // stopped on purpose, to see the host go away) is only reported.
        let mut reported = vec![false; procs.len()];
        loop {
            tokio::select! {
                _ = signalled.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            for (p, reported) in procs.iter_mut().zip(reported.iter_mut()) {
                if let (false, Ok(Some(status))) = (*reported, p.child.try_wait()) {
                    *reported = true;
                    out.note(format!(
                        "demo: {} exited ({status}); its log is {}",
                        p.name,
                        p.log.display()
                    ));
                }
            }
        }
        out.note("demo: stopping");
    }

    if outcome.is_err() && !interrupted {
        for p in &procs {
            out.note(format!(
                "--- last lines of {} ({}):\n{}",
                p.name,
                p.log.display(),
                p.tail()
            ));
        }
    }
    for p in procs.into_iter().rev() {
        p.stop().await;
    }
    say("stopped the controller and agents");
    // The demo's run fails on purpose (and backs out): that is the demo
    // working. Anything else is an error.
    outcome.map(|_| Outcome::Ok)
}

/// Tells how to reach the fleet that stays up: the export line (on a line
/// of its own), the processes and the folder that SIGINT or SIGTERM ends.
fn stay_up(out: &Output, root: &Path, cli_config: &Path, procs: &[Proc], keep: bool) {
    let config = shell_word(&cli_config.to_string_lossy());
    let pids: Vec<(String, u32)> = procs
        .iter()
        .filter_map(|p| Some((p.name.clone(), p.child.id()?)))
        .collect();
    let json = serde_json::json!({
        "cli_config": cli_config,
        "export": format!("export MODI_CLI_CONFIG={config}"),
        "dir": root,
        "pids": pids.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
    });
    out.data(&json, || {
        let then = if keep { "keeps" } else { "removes" };
        format!(
            "\nThe demo fleet stays up. In another shell:\n\n\
             export MODI_CLI_CONFIG={config}\n\n\
             then e.g. `modi hosts`, `modi runs`, `modi logs 1`, `modi ui` (a link to\n\
             the web view), or a lab example:\n\
             `modi apply examples/lab/web-upgrade.yaml` (it waits for `modi approve RUN`\n\
             at each batch; try `modi pause RUN` too). Every example in examples/lab/\n\
             runs on this fleet.\n\n\
             processes: {}\n\
             files: {}\n\
             Ctrl-C here (or SIGTERM) stops them and {then} {}.\n",
            pids.iter()
                .map(|(n, p)| format!("{n}={p}"))
                .collect::<Vec<_>>()
                .join(" "),
            root.display(),
            root.display(),
        )
    });
}

/// Adds a top-level `key = value` line to a TOML file, before its first
/// table.
fn add_top_level_key(path: &Path, line: &str) -> Result<(), CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Failed(format!("cannot read {}: {e}", path.display())))?;
    let (head, tables) = match text.find("\n[") {
        Some(i) => text.split_at(i + 1),
        None => (text.as_str(), ""),
    };
    std::fs::write(path, format!("{head}{line}\n{tables}"))
        .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))
}

/// `text` as one word for a POSIX shell (quoted only when it must be).
fn shell_word(text: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:,=@%".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// Waits until the controller answers and `agents` agents are connected.
async fn wait_for(client: &Client, procs: &mut [Proc], agents: usize) -> Result<(), CliError> {
    let deadline = tokio::time::Instant::now() + STARTUP;
    loop {
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(CliError::Failed(format!(
                    "{} exited early ({status}):\n{}",
                    p.name,
                    p.tail()
                )));
            }
        }
        let hosts = client
            .admin()
            .list_hosts(pb::ListHostsRequest::default())
            .await;
        if let Ok(h) = hosts
            && h.into_inner().hosts.iter().filter(|h| h.connected).count() >= agents
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CliError::Failed(format!(
                "the demo fleet did not come up within {STARTUP:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
