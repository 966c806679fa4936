//! Secrets: a step gets its value, and nothing else does: no command line
//! on the host, no file under either data dir, no log, plan, status, logs
//! or watch. A run that lost them in a controller restart waits for them.

use std::path::{Path, PathBuf};
use std::process::Command;

use modi_tests::{Agent, Controller, Out, Proc, bin, eventually, run};
use sha2::{Digest, Sha256};

/// A value no file or process could hold by chance, with what a shell
/// would trip over.
fn secret_value(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("s3cr3t-{tag}-{nanos} it's \"$(touch /tmp/modi-pwned)\" `id` *")
}

/// `sha256sum`'s line for `value` read from standard input.
fn sha_line(value: &str) -> String {
    format!("{}  -\n", hex::encode(Sha256::digest(value.as_bytes())))
}

/// Runs `modi ARGS` with `env` set.
fn modi_env(ctl: &Controller, args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(bin("modi"));
    cmd.arg("--cli-config")
        .arg(&ctl.cli_config)
        .args(args)
        .current_dir(&ctl.root);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run(&mut cmd)
}

/// Every file under `dir` that holds `needle`, read raw (sled's files
/// included).
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            found.extend(files_holding(&path, needle));
        } else if meta.is_file()
            && let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            found.push(path);
        }
    }
    found
}

/// How many files are under `dir`, so a search of an empty folder does
/// not pass for a clean one.
fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() { count_files(&p) } else { 1 }
        })
        .sum()
}

/// The command line of every process on the host, by pid.
fn command_lines() -> Vec<(u32, Vec<u8>)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            Some((pid, cmdline))
        })
        .collect()
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

const USES_A_SECRET: &str = r#"
name: secret-use
secrets: [pw]
changes:
  - name: use
    hosts: all
    apply:
      - run: |
          printf %s {{ pw }} | sha256sum > {{ out }}/run.sha
          printf %s "$PW" | sha256sum > {{ out }}/env.sha
          sha256sum > {{ out }}/stdin.sha
          echo "out: {{ pw }}"
          echo "err: {{ pw }}" >&2
          touch {{ out }}/started
          sleep 3
        env: { PW: "{{ pw }}" }
        stdin: "{{ pw }}"
    verify:
      - run: echo "verify saw {{ pw }}" >&2; exit 3
"#;

#[test]
fn a_secret_reaches_its_step_and_nowhere_else() {
    let mut ctl = Controller::start();
    let mut agent = Agent::join(&ctl, "vault", &[]);
    let value = secret_value("use");
    let out = ctl.root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let pw_file = ctl.root.join("pw.secret");
    std::fs::write(&pw_file, &value).unwrap();
    let file = ctl.changeset("secret.yaml", USES_A_SECRET);
    let file = file.to_str().unwrap();
    let out_var = format!("out={}", out.display());
    let from_file = format!("pw=@{}", pw_file.display());

    // Declared and not given: validate and plan say which, and where.
    let v = ctl.modi(&["validate", file, "--var", &out_var]);
    assert_eq!(v.code, 2, "{v:#?}");
    assert!(
        v.stderr
            .contains("secret.yaml:3:11: secrets[0]: secret `pw` is not given"),
        "{v:#?}"
    );
    for cmd in ["plan", "apply"] {
        let p = ctl.modi(&[cmd, file, "--var", &out_var]);
        assert_eq!(p.code, 2, "{cmd}: {p:#?}");
        assert!(
            p.stderr
                .contains("secret.yaml:3:11: secrets[0]: secret `pw` is not given"),
            "{cmd}: {p:#?}"
        );
    }
    assert_eq!(ctl.json(&["runs"]).as_array().map(Vec::len), Some(0));
    // Given (here from the environment): the plan shows where it goes.
    let v = modi_env(
        &ctl,
        &[
            "validate",
            file,
            "--var",
            &out_var,
            "--secret",
            "pw=env:E2E_PW",
        ],
        &[("E2E_PW", &value)],
    );
    assert_eq!(v.code, 0, "{v:#?}");
    let p = ctl.modi(&["plan", file, "--var", &out_var, "--secret", &from_file]);
    let plan = p.ok();
    assert!(plan.contains("PW=<secret pw>"), "{plan}");
    assert!(plan.contains(r#""$MODI_SECRET_pw""#), "{plan}");
    assert!(!plan.contains(&value), "{plan}");
    let p = ctl.modi(&[
        "--output", "json", "plan", file, "--var", &out_var, "--secret", &from_file,
    ]);
    assert!(p.ok().contains("<secret pw>") && !p.stdout.contains(&value));

    let run_id = ctl.detach(
        Path::new(file),
        &["--var", &out_var, "--secret", &from_file],
    );
    let mut watch_cmd = Command::new(bin("modi"));
    watch_cmd
        .arg("--cli-config")
        .arg(&ctl.cli_config)
        .args(["--output", "json", "watch", &run_id]);
    let watch_log = ctl.root.join("watch.log");
    let mut watch = Proc::spawn(watch_cmd, watch_log.clone());

    // While the step runs: no command line on the host holds the value,
    // though the step's shell is there to be seen.
    eventually!(20, out.join("started").exists(), "the step runs");
    let lines = command_lines();
    let leaks: Vec<u32> = lines
        .iter()
        .filter(|(_, c)| holds(c, value.as_bytes()))
        .map(|(pid, _)| *pid)
        .collect();
    assert!(
        leaks.is_empty(),
        "processes {leaks:?} have the secret in their argv"
    );
    let shell = lines
        .iter()
        .find(|(_, c)| holds(c, b"MODI_SECRET_pw") && holds(c, b"sleep 3"))
        .map(|(pid, _)| *pid)
        .expect("the step's shell is visible in /proc");
    // It has the value in its environment (only its owner can read that).
    let environ = std::fs::read(format!("/proc/{shell}/environ")).unwrap_or_default();
    assert!(
        holds(&environ, format!("MODI_SECRET_pw={value}").as_bytes()),
        "the step's shell got the value through its environment"
    );

    let status = ctl.wait_final(&run_id);
    assert_eq!(status["state"], "total_failure", "{status}");
    // The step really had the value: in its command, its env and its stdin.
    for sha in ["run.sha", "env.sha", "stdin.sha"] {
        assert_eq!(
            std::fs::read_to_string(out.join(sha)).unwrap(),
            sha_line(&value),
            "{sha}"
        );
    }

    // status, logs and watch show the placeholder.
    let status_text = ctl.modi(&["--output", "json", "status", &run_id]);
    assert!(
        status_text.stdout.contains("verify saw <secret pw>"),
        "{status_text:#?}"
    );
    assert!(!status_text.stdout.contains(&value));
    let logs = ctl.modi(&["logs", &run_id]);
    assert!(logs.stdout.contains("out: <secret pw>"), "{logs:#?}");
    assert!(logs.stdout.contains("err: <secret pw>"), "{logs:#?}");
    assert!(!logs.stdout.contains(&value), "{logs:#?}");
    eventually!(20, !watch.alive(), "watch ends with the run");
    let watched = std::fs::read_to_string(&watch_log).unwrap();
    assert!(watched.contains("out: <secret pw>"), "{watched}");
    assert!(!watched.contains(&value), "{watched}");

    // Nothing on disk: every file of both daemons (sled's included, after
    // a clean stop flushed them) and their logs.
    agent.stop();
    ctl.stop();
    for dir in [&ctl.data, &agent.dir] {
        assert!(count_files(dir) > 3, "{} has files", dir.display());
        let found = files_holding(dir, value.as_bytes());
        assert!(found.is_empty(), "the secret is on disk in {found:?}");
    }
    let found = files_holding(&ctl.root, value.as_bytes());
    assert_eq!(
        found,
        vec![pw_file],
        "only the operator's own file holds it"
    );
}

const TWO_CHANGES: &str = r#"
name: secret-restart
secrets: [pw]
changes:
  - name: first
    hosts: all
    apply:
      - run: touch {{ out }}/first-started; sleep 2; printf %s {{ pw }} | sha256sum > {{ out }}/first.sha
  - name: second
    requires: first
    hosts: all
    apply:
      - run: printf %s {{ pw }} | sha256sum > {{ out }}/second.sha
"#;

#[test]
fn a_run_that_lost_its_secrets_in_a_restart_waits_paused_until_resume_gives_them() {
    let alerts_dir = tempfile::tempdir().unwrap();
    let alerts = alerts_dir.path().join("alerts");
    let mut ctl = Controller::start_with(&format!(
        "[alerts]\ncommand = \"cat >> {0}; echo >> {0}\"\n",
        alerts.display()
    ));
    let agent = Agent::join(&ctl, "keeper", &[]);
    let value = secret_value("restart");
    let out = ctl.root.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let file = ctl.changeset("restart.yaml", TWO_CHANGES);
    let out_var = format!("out={}", out.display());
    let given = format!("pw={value}");
    let run_id = ctl.detach(&file, &["--var", &out_var, "--secret", &given]);
    eventually!(
        20,
        out.join("first-started").exists(),
        "the first step runs"
    );

    // The controller dies mid-step; the step ends while it is away.
    ctl.crash();
    eventually!(
        10,
        out.join("first.sha").exists(),
        "the step ends on the agent"
    );
    ctl.serve();

    // The first step's result comes back, and the run waits for pw.
    let status = ctl.wait_status_of(&run_id, |s| {
        s["state"] == "paused" && s["changes"][0]["hosts"][0]["state"] == "success"
    });
    let held = status["held"].as_str().unwrap_or_default();
    assert!(held.starts_with("secrets:"), "{status}");
    assert!(
        held.contains("`pw`") && held.contains(&format!("modi resume {run_id} --secret")),
        "{held}"
    );
    let runs = ctl.json(&["runs"]);
    let listed = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["run"] == run_id.as_str())
        .cloned()
        .unwrap_or_default();
    assert_eq!(listed["state"], "paused", "{runs}");
    eventually!(
        10,
        std::fs::read_to_string(&alerts).is_ok_and(|a| a.contains("secrets_needed")),
        "an alert says the run needs its secrets"
    );
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(
        !out.join("second.sha").exists(),
        "nothing new runs while it waits"
    );

    // A resume without the secrets, or with the wrong ones, is refused.
    let r = ctl.modi(&["resume", &run_id]);
    assert_ne!(r.code, 0, "{r:#?}");
    assert!(r.stderr.contains("waits for its secrets `pw`"), "{r:#?}");
    let r = ctl.modi(&["resume", &run_id, "--secret", "token=x"]);
    assert_ne!(r.code, 0, "{r:#?}");
    assert!(r.stderr.contains("does not use `token`"), "{r:#?}");

    let r = modi_env(
        &ctl,
        &["resume", &run_id, "--secret", "pw=env:E2E_PW"],
        &[("E2E_PW", &value)],
    );
    assert_eq!(r.code, 0, "{r:#?}");
    let status = ctl.wait_final(&run_id);
    assert_eq!(status["state"], "success", "{status}");
    assert!(status.get("held").is_none_or(|h| h.is_null()), "{status}");
    for sha in ["first.sha", "second.sha"] {
        assert_eq!(
            std::fs::read_to_string(out.join(sha)).unwrap(),
            sha_line(&value),
            "{sha}"
        );
    }
    ctl.stop();
    for dir in [&ctl.data, &agent.dir, alerts_dir.path()] {
        let found = files_holding(dir, value.as_bytes());
        assert!(found.is_empty(), "the secret is on disk in {found:?}");
    }
}
