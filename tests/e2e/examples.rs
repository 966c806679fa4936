//! What a newcomer runs first: `modi demo` to its end, `modi demo --stay`
//! with the real CLI pointed at its fleet and the lab examples applied to
//! it, then Ctrl-C cleaning everything up; every example and lab example
//! validates, every real one names its lab version; every ` ```yaml `
//! block of the Markdown docs validates as written (or is marked
//! ` ```yaml fragment `).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use modi_tests::{Out, Proc, Value, bin, eventually, host_states, run};

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// The `.yaml` files directly in `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

/// `--secret NAME=lab` for every name of a top-level `secrets: [...]`.
fn secret_args(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("secrets:"))
        .flat_map(|list| {
            let list = list.split('#').next().unwrap_or_default().trim();
            list.strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .unwrap_or_else(|| panic!("secrets: [A, B] on one line, not {list:?}"))
                .split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect::<Vec<_>>()
        })
        .flat_map(|n| ["--secret".to_string(), format!("{n}=lab")])
        .collect()
}

/// `modi validate FILE` (with its declared secrets given).
fn validate(file: &Path) -> Out {
    let text = std::fs::read_to_string(file).expect("read changeset");
    run(Command::new(bin("modi"))
        .arg("validate")
        .arg(file)
        .args(secret_args(&text)))
}

#[test]
fn every_example_and_lab_example_validates() {
    let examples = yaml_files(&repo().join("examples"));
    let lab = yaml_files(&repo().join("examples/lab"));
    assert!(
        examples.len() >= 9 && lab.len() >= 8,
        "{examples:?} {lab:?}"
    );
    for file in examples.iter().chain(&lab) {
        let out = validate(file);
        assert_eq!(
            out.code,
            0,
            "{} does not validate: {out:#?}",
            file.display()
        );
    }
}

#[test]
fn every_example_that_changes_the_real_system_says_so_and_has_a_lab_version() {
    for file in yaml_files(&repo().join("examples")) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if name == "demo.yaml" {
            continue; // runs on the demo fleet as it is
        }
        let lab = repo().join("examples/lab").join(&name);
        assert!(lab.is_file(), "{name} has no lab version {}", lab.display());
        let head: String = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.trim_start_matches('#').trim())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            head.starts_with("Changes the real system:")
                && head.contains(&format!("the lab version is examples/lab/{name}")),
            "the comment at the top of examples/{name} must say that it changes the real \
             system and name its lab version: {head}"
        );
    }
}

/// A fenced block of a Markdown file: where it starts, its info string,
/// its text (without the fence's own indentation).
struct Block {
    line: usize,
    info: String,
    indent: usize,
    text: String,
}

/// Every fenced block of `markdown` (``` fences, indented by up to three
/// spaces, as in a list).
fn fenced_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let fence = trimmed.starts_with("```") && indent <= 3;
        match open.take() {
            Some(block) if fence && trimmed.trim_end() == "```" => blocks.push(block),
            Some(mut block) => {
                let cut = indent.min(block.indent);
                block.text.push_str(&line[cut..]);
                block.text.push('\n');
                open = Some(block);
            }
            None if fence => {
                open = Some(Block {
                    line: i + 1,
                    info: trimmed.trim_start_matches('`').trim().to_string(),
                    indent,
                    text: String::new(),
                })
            }
            None => {}
        }
    }
    assert!(open.is_none(), "an unclosed fence");
    blocks
}

/// Every Markdown file of the repository (not under target/ or .git/).
fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() {
            if !name.starts_with('.') && !name.starts_with("target") {
                markdown_files(&path, out);
            }
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

#[test]
fn every_yaml_block_in_the_docs_validates_unless_marked_a_fragment() {
    let root = repo();
    let mut files = Vec::new();
    markdown_files(&root, &mut files);
    files.sort();
    assert!(files.contains(&root.join("docs/changeset-format.md")));
    assert!(files.contains(&root.join("README.md")));
    // Blocks are checked beside copies of the examples, so `include:`
    // finds them.
    let tmp = tempfile::tempdir().expect("temp dir");
    for example in yaml_files(&root.join("examples")) {
        std::fs::copy(&example, tmp.path().join(example.file_name().unwrap())).unwrap();
    }
    let (mut checked, mut fragments) = (0, 0);
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(&root).unwrap().display().to_string();
        for block in fenced_blocks(&text) {
            let mut words = block.info.split_whitespace();
            if !matches!(words.next(), Some("yaml" | "yml")) {
                continue;
            }
            let at = format!("{shown}:{}", block.line);
            match words.collect::<Vec<_>>().as_slice() {
                [] => {}
                ["fragment"] => {
                    fragments += 1;
                    continue;
                }
                other => panic!(
                    "{at}: unknown marker {other:?} on a yaml fence (whole changesets are \
                     ```yaml, pieces ```yaml fragment)"
                ),
            }
            let path = tmp.path().join(format!("block-{checked}.yaml"));
            std::fs::write(&path, &block.text).unwrap();
            let out = validate(&path);
            assert_eq!(
                out.code, 0,
                "{at}: this ```yaml block does not validate (mark it ```yaml fragment if it is \
                 a piece on purpose):\n{}\n{out:#?}",
                block.text
            );
            checked += 1;
        }
    }
    // The reference's whole changesets (web-upgrade, motd, db-user,
    // restart-proxy) at least, and its pieces.
    assert!(checked >= 4, "only {checked} blocks validated");
    assert!(fragments >= 8, "only {fragments} fragments");
}

#[test]
fn the_yaml_block_check_fails_on_a_bad_block() {
    // The checker itself: a block with a typo is found, with its line.
    let markdown =
        "text\n\n```yaml\nname: x\nchanges:\n  - name: a\n    hosts: all\n    aply: []\n```\n";
    let blocks = fenced_blocks(markdown);
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].line, 3);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.yaml");
    std::fs::write(&path, &blocks[0].text).unwrap();
    let out = validate(&path);
    assert_eq!(out.code, 2, "{out:#?}");
    assert!(out.stderr.contains("aply"), "{out:#?}");
}

/// `modi demo ...` started for real; SIGTERM (and a wait) if the test
/// ends early, so no fleet is left behind.
struct Demo {
    proc: Proc,
    _logs: tempfile::TempDir,
}

impl Demo {
    fn start(args: &[&str]) -> Demo {
        let logs = tempfile::Builder::new()
            .prefix("modi-e2e-demo-")
            .tempdir()
            .expect("temp dir");
        let mut cmd = Command::new(bin("modi"));
        cmd.args(args).current_dir(repo());
        let proc = Proc::spawn(cmd, logs.path().join("demo.log"));
        Demo { proc, _logs: logs }
    }

    fn output(&self) -> String {
        self.proc.log_text()
    }

    /// Waits (bounded) for it to exit; its exit code.
    fn wait(&mut self, secs: u64) -> i32 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            if let Some(code) = self.proc.exited() {
                return code;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "modi demo did not exit within {secs}s:\n{}",
                self.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- modi demo output ---\n{}", self.output());
        }
        self.proc.stop();
    }
}

/// The demo's run as `--output json` reports it at its end.
fn end_status(output: &str) -> Value {
    output
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["type"] == "end")
        .map(|v| v["status"].clone())
        .unwrap_or_else(|| panic!("no end event:\n{output}"))
}

/// What examples/demo.yaml is documented to show, in its run's status.
fn assert_demo_outcome(status: &Value) {
    let states = |change: &str| host_states(status, change);
    let all = |state: &str| -> BTreeMap<String, String> {
        (1..=5)
            .map(|i| (format!("demo-{i}"), state.to_string()))
            .collect()
    };
    assert_eq!(states("prepare"), all("success"), "{status}");
    // rotate-logs carries on around demo-5, whose check fails.
    let mut rotate = all("success");
    rotate.insert("demo-5".into(), "failed".into());
    assert_eq!(states("rotate-logs"), rotate, "{status}");
    // deploy-web: demo-3 fails its verify, every web host that got 2.0 is
    // backed out, demo-4 never starts.
    let deploy = states("deploy-web");
    assert_eq!(
        deploy.keys().collect::<Vec<_>>(),
        ["demo-1", "demo-2", "demo-3", "demo-4"],
        "{status}"
    );
    for h in ["demo-1", "demo-2", "demo-3"] {
        assert_eq!(deploy[h], "backout_ok", "{h}: {status}");
    }
    assert_eq!(deploy["demo-4"], "cancelled", "{status}");
    let change = |name: &str| -> Value {
        status["changes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no change {name}: {status}"))
    };
    let host = |change_name: &str, name: &str| -> Value {
        change(change_name)["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no host {name} in {change_name}: {status}"))
    };
    assert_eq!(host("deploy-web", "demo-3")["failure"]["phase"], "verify");
    assert_eq!(host("rotate-logs", "demo-5")["failure"]["phase"], "check");
    assert_eq!(change("rotate-logs")["state"], "partial_failure");
    assert_eq!(change("deploy-web")["state"], "backout_ok");
    assert_eq!(status["state"], "partial_failure", "{status}");
}

/// The agents' work dirs after the demo: every web host back on 1.0,
/// nothing of 2.0 left; rotated logs on demo-1..4, not on demo-5.
fn assert_demo_files(dir: &Path) {
    let work = |h: &str| dir.join("agents").join(h).join("work");
    for h in ["demo-1", "demo-2", "demo-3", "demo-4"] {
        let version = std::fs::read_to_string(work(h).join("app/version"));
        assert_eq!(version.ok().as_deref(), Some("1.0\n"), "{h}");
        assert!(!work(h).join("app/releases/2.0").exists(), "{h}");
        assert!(work(h).join("app/logs/app.log.1").is_file(), "{h}");
    }
    assert!(!work("demo-5").join("app/logs/app.log.1").exists());
}

#[test]
fn demo_runs_to_its_end_and_shows_the_backout() {
    let mut demo = Demo::start(&["--output", "json", "demo", "--keep"]);
    let code = demo.wait(240);
    let output = demo.output();
    assert_eq!(code, 0, "{output}");
    assert_demo_outcome(&end_status(&output));
    let kept = output
        .lines()
        .find_map(|l| l.strip_prefix("demo files kept in "))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("where are the files kept?\n{output}"));
    let _cleanup = Cleanup(kept.clone());
    assert_demo_files(&kept);
    assert!(
        output.contains("demo: stopped the controller and agents"),
        "{output}"
    );
}

/// Removes a folder on drop.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `modi ARGS` with the CLI config given only by `MODI_CLI_CONFIG`.
fn modi_env(config: &Path, args: &[&str]) -> Out {
    run(Command::new(bin("modi"))
        .env("MODI_CLI_CONFIG", config)
        .args(args)
        .current_dir(repo()))
}

/// Applies a lab example with the real CLI; its final status.
fn apply_lab(config: &Path, name: &str, extra: &[&str]) -> Value {
    let file = repo().join("examples/lab").join(name);
    let mut args = vec!["--output", "json", "apply", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = modi_env(config, &args);
    assert_eq!(out.code, 0, "{name}: {out:#?}");
    end_status(&out.stdout)
}

/// Is process `pid` one of the demo's: running (not a zombie), with
/// `dir` in its command line or its working directory (a step's)?
fn of_demo(pid: u32, dir: &Path) -> bool {
    let dir = dir.to_string_lossy();
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    });
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
    !zombie
        && (String::from_utf8_lossy(&cmdline).contains(&*dir)
            || cwd.to_string_lossy().contains(&*dir))
}

/// Is process `pid` gone (or now something else than the demo's)?
fn gone(pid: u32, dir: &Path) -> bool {
    !of_demo(pid, dir)
}

#[test]
fn demo_stay_leaves_a_fleet_for_the_cli_and_ctrl_c_cleans_it_up() {
    let mut demo = Demo::start(&["demo", "--stay"]);
    eventually!(
        240,
        demo.output().contains("\nexport MODI_CLI_CONFIG=") || demo.proc.exited().is_some(),
        "the export line:\n{}",
        demo.output()
    );
    let output = demo.output();
    assert!(demo.proc.exited().is_none(), "exited early:\n{output}");
    let line = |prefix: &str| -> String {
        output
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line:\n{output}"))
            .trim()
            .to_string()
    };
    let config = PathBuf::from(line("export MODI_CLI_CONFIG=").trim_matches('\''));
    let dir = PathBuf::from(line("files: "));
    let pids: BTreeMap<String, u32> = line("processes: ")
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("name=pid");
            (k.to_string(), v.parse().expect("a pid"))
        })
        .collect();
    assert!(config.starts_with(&dir) && config.is_file(), "{output}");
    assert_eq!(
        pids.keys().collect::<Vec<_>>(),
        [
            "controller",
            "demo-1",
            "demo-2",
            "demo-3",
            "demo-4",
            "demo-5"
        ],
        "{output}"
    );
    for pid in pids.values() {
        assert!(!gone(*pid, &dir), "pid {pid} runs:\n{output}");
    }
    // The text the user saw: the demo's run, failed and backed out.
    for word in ["deploy-web", "demo-3", "backout_ok"] {
        assert!(output.contains(word), "{word}:\n{output}");
    }

    // The real CLI, pointed at the fleet by MODI_CLI_CONFIG alone.
    let hosts = modi_env(&config, &["--output", "json", "hosts"]);
    let hosts: Vec<Value> = hosts.json().as_array().cloned().unwrap();
    let roles: BTreeMap<String, String> = hosts
        .iter()
        .filter(|h| h["connected"] == true)
        .map(|h| {
            (
                h["name"].as_str().unwrap().to_string(),
                h["labels"]["role"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let expected: BTreeMap<String, String> = (1..=5)
        .map(|i| {
            let role = if i < 5 { "web" } else { "db" };
            (format!("demo-{i}"), role.to_string())
        })
        .collect();
    assert_eq!(roles, expected, "{hosts:?}");
    // The web view is on: `modi ui` gives a sign-in link that works.
    let ui = modi_env(&config, &["--output", "json", "ui"]);
    let url = ui.json()["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let signed_in = std::process::Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", &url])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&signed_in.stdout),
        "303",
        "{signed_in:?}"
    );
    // --cli-config wins over MODI_CLI_CONFIG.
    let missing = dir.join("no-such-cli.toml");
    let flag = modi_env(
        &config,
        &["--cli-config", missing.to_str().unwrap(), "hosts"],
    );
    assert_ne!(flag.code, 0, "{flag:#?}");
    assert!(flag.stderr.contains("no-such-cli.toml"), "{flag:#?}");
    let runs = modi_env(&config, &["--output", "json", "runs"]).json();
    let runs = runs.as_array().expect("a list of runs");
    assert_eq!(runs.len(), 1, "the demo's run: {runs:?}");
    assert_eq!(runs[0]["name"], "demo", "{runs:?}");
    let id = runs[0]["run"].as_str().expect("a run id").to_string();
    let status = modi_env(&config, &["--output", "json", "status", &id]).json();
    assert_demo_outcome(&status);
    assert_demo_files(&dir);

    // Lab examples run on this fleet and end in success.
    let work = |h: &str| dir.join("agents").join(h).join("work");
    let status = apply_lab(&config, "nested.yaml", &["--var", "version=3.1"]);
    assert_eq!(status["state"], "success", "{status}");
    let schema = std::fs::read_to_string(work("demo-5").join("lab/db/schema")).unwrap();
    assert_eq!(schema, "at 3.1 (app)\n");
    for h in ["demo-1", "demo-4"] {
        let app = std::fs::read_to_string(work(h).join("lab/release/app")).unwrap();
        assert_eq!(app, "3.1\n", "{h}");
    }
    let status = apply_lab(&config, "config-push.yaml", &["--var", "workers=8"]);
    assert_eq!(status["state"], "success", "{status}");
    let conf = std::fs::read_to_string(work("demo-2").join("lab/nginx/nginx.conf")).unwrap();
    assert!(conf.contains("worker_processes 8;\n"), "{conf}");
    // Its check in the temp file keeps a broken config out, and the
    // failed host is left with the config it had.
    let file = repo().join("examples/lab/config-push.yaml");
    let out = modi_env(
        &config,
        &[
            "--output",
            "json",
            "apply",
            file.to_str().unwrap(),
            "--var",
            "workers=0",
        ],
    );
    assert_eq!(out.code, 1, "{out:#?}");
    let failed = end_status(&out.stdout);
    assert_ne!(failed["state"], "success", "{failed}");
    let conf = std::fs::read_to_string(work("demo-1").join("lab/nginx/nginx.conf")).unwrap();
    assert!(conf.contains("worker_processes 8;\n"), "{conf}");

    // Every other lab example runs to success on this fleet, and a second
    // run of one skips every host.
    let mut applied = vec!["nested.yaml", "config-push.yaml", "web-upgrade.yaml"];
    for (name, extra) in [
        ("add-user.yaml", &["--var", "user=ops"][..]),
        ("db-migrate.yaml", &["--var", "target=4.0"]),
        ("template-foreach.yaml", &[]),
        ("upgrade-agents.yaml", &["--var", "version=0.3.0"]),
        (
            "service-password.yaml",
            &["--secret", "password=lab-secret"],
        ),
    ] {
        let status = apply_lab(&config, name, extra);
        assert_eq!(status["state"], "success", "{name}: {status}");
        applied.push(name);
    }
    let lab: Vec<String> = yaml_files(&repo().join("examples/lab"))
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for name in &lab {
        assert!(
            applied.contains(&name.as_str()),
            "{name} is run on the fleet too"
        );
    }
    let passwd = std::fs::read_to_string(work("demo-5").join("lab/passwd")).unwrap();
    assert_eq!(passwd, "ops:x:ops service account:/home/ops\n");
    let again = apply_lab(&config, "add-user.yaml", &["--var", "user=ops"]);
    assert!(
        host_states(&again, "add-user")
            .values()
            .all(|s| s == "skipped"),
        "{again}"
    );
    let agent = std::fs::read_to_string(work("demo-3").join("lab/bin/modi-agent")).unwrap();
    assert!(agent.contains("modi-agent 0.3.0"), "{agent}");
    let shadow = std::fs::read_to_string(work("demo-1").join("lab/shadow")).unwrap();
    assert!(
        shadow.starts_with("app:") && !shadow.contains("lab-secret"),
        "{shadow}"
    );

    // A gated rolling upgrade, decided from here as from another shell:
    // demo-2's install leaves it unhealthy; after its retries it is put
    // back on its previous release, and the others carry on.
    let file = repo().join("examples/lab/web-upgrade.yaml");
    let file = file.to_str().unwrap();
    let out = modi_env(
        &config,
        &[
            "--output",
            "json",
            "apply",
            file,
            "--detach",
            "--var",
            "broken=demo-2",
        ],
    );
    let run_id = out.json()["run"].as_str().expect("run id").to_string();
    // Each gate (by its id) is approved once, however often it is seen.
    let mut approved = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        let status = modi_env(&config, &["--output", "json", "status", &run_id]).json();
        match status["state"].as_str() {
            Some("awaiting_approval") => {
                let gate = status["changes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find_map(|c| c["gate"]["id"].as_u64())
                    .expect("an open gate");
                if approved.insert(gate) {
                    modi_env(&config, &["approve", &run_id]).ok();
                }
            }
            Some("pending" | "running" | "paused") => {}
            _ => break status,
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let approvals = approved.len();
    assert_eq!(
        approvals, 4,
        "one gate per batch (1, then 25% of 4): {status}"
    );
    assert_eq!(status["state"], "partial_failure", "{status}");
    let upgrade = host_states(&status, "upgrade");
    assert_eq!(upgrade["demo-2"], "backout_ok", "{status}");
    for h in ["demo-1", "demo-3", "demo-4"] {
        assert_eq!(upgrade[h], "success", "{h}: {status}");
        let current = std::fs::read_to_string(work(h).join("lab/webapp/current")).unwrap();
        assert_eq!(current, "2.4.1\n", "{h}");
    }
    let app = work("demo-2").join("lab/webapp");
    assert_eq!(
        std::fs::read_to_string(app.join("current")).unwrap(),
        "1.0\n"
    );
    assert_eq!(std::fs::read_to_string(app.join("health")).unwrap(), "ok\n");
    assert!(!app.join("version").exists(), "the file step is undone");

    // A step still running at Ctrl-C goes too.
    let long = dir.join("long.yaml");
    std::fs::write(
        &long,
        "name: long\nchanges:\n  - name: long\n    hosts: all\n    rollout: { mode: parallel }\n    apply:\n      - run: sleep 300; echo done\n",
    )
    .unwrap();
    modi_env(&config, &["apply", long.to_str().unwrap(), "--detach"]).ok();
    eventually!(
        60,
        processes_in(&dir).len() >= pids.len() + 5,
        "a step runs on every host: {:?}",
        processes_in(&dir)
    );

    // Ctrl-C: everything stops, the temp dir goes.
    let demo_pid = nix::unistd::Pid::from_raw(demo.proc.pid() as i32);
    nix::sys::signal::kill(demo_pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let code = demo.wait(60);
    assert_eq!(code, 0, "{}", demo.output());
    for (name, pid) in &pids {
        eventually!(20, gone(*pid, &dir), "{name} (pid {pid}) is gone");
    }
    eventually!(
        20,
        processes_in(&dir).is_empty(),
        "no step is left: {:?}",
        processes_in(&dir)
    );
    assert!(
        !dir.exists(),
        "{} removed:\n{}",
        dir.display(),
        demo.output()
    );
    assert!(
        demo.output()
            .contains(&format!("demo: removed {}", dir.display())),
        "{}",
        demo.output()
    );
}

/// The changeset of one case of the restore rule: a `file` step, then
/// maybe a `run` step (`fail_apply`: one that fails), a verify that
/// fails, and `backout` as given.
fn restore_case(with_run: bool, fail_apply: bool, backout: &str) -> String {
    let run = match (with_run, fail_apply) {
        (false, _) => "",
        (true, false) => "\n      - run: touch reloaded-by-apply",
        (true, true) => "\n      - run: touch reloaded-by-apply; exit 3",
    };
    format!(
        r#"
name: motd
changes:
  - name: motd
    hosts: all
    apply:
      - file: {{ path: motd, content: "maintenance tonight\n" }}{run}
    verify:
      - run: grep -q never motd
{backout}
"#
    )
}

#[test]
fn file_steps_are_restored_as_the_format_reference_says() {
    let sink = tempfile::NamedTempFile::new().unwrap();
    let ctl = modi_tests::Controller::start_with(&format!(
        "[alerts]\ncommand = \"cat >> {0}; echo >> {0}\"\n",
        sink.path().display()
    ));
    let agent = modi_tests::Agent::join(&ctl, "r1", &[]);
    let motd = agent.work().join("motd");
    let no_backout_alerts = || {
        std::fs::read_to_string(sink.path())
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"failed_no_backout\""))
            .count()
    };
    // (case, with a run step, the run step fails, backout, restored?,
    // host state)
    let cases = [
        (
            "only a file step, no backout",
            false,
            false,
            "",
            true,
            "backout_ok",
        ),
        (
            "a file and a run step, no backout",
            true,
            false,
            "",
            false,
            "failed",
        ),
        (
            "a file and a run step, a procedure",
            true,
            false,
            "    backout:\n      steps: [ { run: touch reloaded-by-backout } ]",
            true,
            "backout_ok",
        ),
        (
            "a procedure with only `when`, which matches",
            true,
            false,
            "    backout:\n      - when: failure.phase == \"verify\"",
            true,
            "backout_ok",
        ),
        (
            "a procedure with only `when`, which does not match",
            true,
            true,
            "    backout:\n      - when: failure.phase == \"verify\"",
            false,
            "failed",
        ),
    ];
    let mut alerts = 0;
    for (i, (case, with_run, fail_apply, backout, restored, state)) in cases.into_iter().enumerate()
    {
        std::fs::write(&motd, "welcome\n").unwrap();
        let file = ctl.changeset(
            &format!("case-{i}.yaml"),
            &restore_case(with_run, fail_apply, backout),
        );
        let (code, status) = ctl.apply(&file, &[]);
        assert_eq!(code, 1, "{case}: {status}");
        assert_eq!(
            host_states(&status, "motd")["r1"],
            state,
            "{case}: {status}"
        );
        let now = std::fs::read_to_string(&motd).unwrap();
        let expected = if restored {
            "welcome\n"
        } else {
            "maintenance tonight\n"
        };
        assert_eq!(now, expected, "{case}");
        if !restored {
            alerts += 1;
        }
        eventually!(
            10,
            no_backout_alerts() == alerts,
            "{case}: {alerts} failed_no_backout alerts:\n{}",
            std::fs::read_to_string(sink.path()).unwrap()
        );
    }
    assert!(agent.work().join("reloaded-by-backout").exists());
}

/// The demo's processes (see [`of_demo`]), read from /proc.
fn processes_in(dir: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| of_demo(*pid, dir))
        .collect()
}

#[test]
fn sigterm_while_the_demo_starts_stops_its_fleet_and_removes_its_dir() {
    let mut demo = Demo::start(&["demo"]);
    eventually!(
        120,
        demo.output().contains("demo: controller listening on") || demo.proc.exited().is_some(),
        "the controller is up:\n{}",
        demo.output()
    );
    let output = demo.output();
    let dir = output
        .lines()
        .find_map(|l| l.split_once(" and controller in ").map(|(_, d)| d.trim()))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no temp dir named:\n{output}"));
    assert!(dir.is_dir(), "{output}");
    assert!(!processes_in(&dir).is_empty(), "the controller runs");
    let pid = nix::unistd::Pid::from_raw(demo.proc.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let code = demo.wait(60);
    let output = demo.output();
    assert_eq!(code, 1, "interrupted before its end:\n{output}");
    assert!(
        output.contains("interrupted before the demo finished"),
        "{output}"
    );
    eventually!(
        20,
        processes_in(&dir).is_empty(),
        "no process of the demo is left: {:?}",
        processes_in(&dir)
    );
    assert!(!dir.exists(), "{} removed:\n{output}", dir.display());
}
