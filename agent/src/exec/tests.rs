use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    exec: Executor,
    work: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let exec = Executor::new(work.clone(), dir.path().join("backups")).unwrap();
    Fixture {
        _dir: dir,
        exec,
        work,
    }
}

fn run(cmd: &str) -> pb::Step {
    pb::Step {
        action: Some(pb::step::Action::Run(cmd.into())),
        ..Default::default()
    }
}

async fn execute(f: &Fixture, id: &str, step: pb::Step) -> pb::StepResult {
    let (tx, _rx) = mpsc::channel(1024);
    f.exec
        .execute(id, step, &Secrets::default(), tx, CancellationToken::new())
        .await
}

fn exited(r: &pb::StepResult) -> Option<i32> {
    assert_eq!(r.termination, pb::Termination::Exited as i32, "{r:?}");
    r.exit_code
}

#[tokio::test]
async fn runs_a_shell_command_in_the_work_dir_with_env() {
    let f = fixture();
    let mut step = run("echo \"$GREETING\" from $(pwd); echo oops >&2; exit 3");
    step.env.insert("GREETING".into(), "hello".into());
    let r = execute(&f, "t1", step).await;
    assert_eq!(exited(&r), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        format!("hello from {}\n", f.work.display())
    );
    assert_eq!(r.stderr, b"oops\n");
    assert_eq!(r.dispatch_id, "t1");
}

#[tokio::test]
async fn argv_runs_without_a_shell_and_feeds_stdin() {
    let f = fixture();
    let step = pb::Step {
        action: Some(pb::step::Action::Argv(pb::Argv {
            args: vec!["cat".into()],
        })),
        stdin: Some(b"$(not expanded)".to_vec()),
        ..Default::default()
    };
    let r = execute(&f, "t2", step).await;
    assert_eq!(exited(&r), Some(0));
    assert_eq!(r.stdout, b"$(not expanded)");
}

#[tokio::test]
async fn a_program_that_cannot_start_says_why() {
    let f = fixture();
    let step = pb::Step {
        action: Some(pb::step::Action::Argv(pb::Argv {
            args: vec!["/nonexistent/prog".into()],
        })),
        ..Default::default()
    };
    let r = execute(&f, "t3", step).await;
    assert_eq!(r.termination, pb::Termination::FailedToStart as i32);
    assert!(String::from_utf8_lossy(&r.stderr).contains("cannot start"));

    let mut step = run("true");
    step.cwd = "no/such/dir".into();
    let r = execute(&f, "t3b", step).await;
    assert_eq!(r.termination, pb::Termination::FailedToStart as i32);
    assert!(String::from_utf8_lossy(&r.stderr).contains("not a directory"));
}

fn alive(pid: i32) -> bool {
    // Signal 0 checks existence; a zombie would still count, so also look
    // at /proc state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.contains(") Z "),
        Err(_) => false,
    }
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let f = fixture();
    let pidfile = f.work.join("bg.pid");
    let mut step = run(&format!(
        "sleep 60 & echo $! > {}; echo started; wait",
        pidfile.display()
    ));
    step.timeout_ms = 300;
    let started = std::time::Instant::now();
    let r = execute(&f, "t4", step).await;
    assert_eq!(r.termination, pb::Termination::TimedOut as i32);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(r.stdout, b"started\n");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SIGKILL is sent to the group at the timeout; on a loaded machine
    // the child may take a moment to be gone (bounded: a survivor of
    // `sleep 60` is still there after it).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(pid), "background child {pid} survived the timeout");
}

#[tokio::test]
async fn a_cancel_kills_the_step() {
    let f = fixture();
    let (tx, _rx) = mpsc::channel(16);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.cancel();
    });
    let r = f
        .exec
        .execute("t5", run("sleep 60"), &Secrets::default(), tx, cancel)
        .await;
    assert_eq!(r.termination, pb::Termination::Cancelled as i32);
}

#[tokio::test]
async fn output_past_the_cap_is_counted_not_kept_and_streamed() {
    let f = fixture();
    let (tx, mut rx) = mpsc::channel(100_000);
    let total = OUTPUT_CAP + 12_345;
    let r = f
        .exec
        .execute(
            "t6",
            run(&format!("head -c {total} /dev/zero")),
            &Secrets::default(),
            tx,
            CancellationToken::new(),
        )
        .await;
    assert_eq!(exited(&r), Some(0));
    assert_eq!(r.stdout.len(), OUTPUT_CAP);
    assert_eq!(r.stdout_dropped, 12_345);
    let mut streamed = 0;
    while let Ok(chunk) = rx.try_recv() {
        assert_eq!(chunk.dispatch_id, "t6");
        streamed += chunk.data.len();
    }
    assert_eq!(streamed, total);
}

fn file_step(path: &str, content: &[u8], mode: Option<u32>, validate: &str) -> pb::Step {
    pb::Step {
        action: Some(pb::step::Action::File(pb::FileWrite {
            path: path.into(),
            content: content.to_vec(),
            mode,
            owner: String::new(),
            validate: validate.into(),
        })),
        ..Default::default()
    }
}

fn restore_step(of: &str) -> pb::Step {
    pb::Step {
        action: Some(pb::step::Action::Restore(pb::Restore { of: of.into() })),
        ..Default::default()
    }
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn a_file_step_is_atomic_and_restores_exact_bytes_and_mode() {
    let f = fixture();
    let path = f.work.join("app.conf");
    std::fs::write(&path, b"old\x00bytes\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();

    let r = execute(&f, "f1", file_step("app.conf", b"new\n", Some(0o600), "")).await;
    assert_eq!(
        exited(&r),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"new\n");
    assert_eq!(mode_of(&path), 0o600);

    let r = execute(&f, "f1r", restore_step("f1")).await;
    assert_eq!(
        exited(&r),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"old\x00bytes\n");
    assert_eq!(mode_of(&path), 0o640);
}

#[tokio::test]
async fn restoring_a_created_file_removes_it() {
    let f = fixture();
    let path = f.work.join("fresh.txt");
    let r = execute(&f, "f2", file_step("fresh.txt", b"x", None, "")).await;
    assert_eq!(exited(&r), Some(0));
    assert_eq!(mode_of(&path), 0o644);
    let r = execute(&f, "f2r", restore_step("f2")).await;
    assert_eq!(exited(&r), Some(0));
    assert!(!path.exists());
}

#[tokio::test]
async fn a_failing_validate_installs_nothing() {
    let f = fixture();
    let path = f.work.join("nginx.conf");
    std::fs::write(&path, b"good").unwrap();
    let validate = format!("grep -q good {}", modi_proto::FILE_TMP_PLACEHOLDER);
    let r = execute(&f, "f3", file_step("nginx.conf", b"bad", None, &validate)).await;
    assert_ne!(exited(&r), Some(0));
    assert!(String::from_utf8_lossy(&r.stderr).contains("validate failed"));
    assert_eq!(std::fs::read(&path).unwrap(), b"good");
    let leftovers: Vec<_> = std::fs::read_dir(&f.work).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "temp file left behind");

    let r = execute(
        &f,
        "f4",
        file_step("nginx.conf", b"good too", None, &validate),
    )
    .await;
    assert_eq!(
        exited(&r),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"good too");
}

fn interact_step(command: &str, script: &[(&str, &str)]) -> pb::Step {
    pb::Step {
        action: Some(pb::step::Action::Interact(pb::Interact {
            command: command.into(),
            script: script
                .iter()
                .map(|(e, s)| pb::Exchange {
                    expect: e.to_string(),
                    send: s.to_string(),
                    timeout_ms: 5_000,
                })
                .collect(),
        })),
        timeout_ms: 10_000,
        ..Default::default()
    }
}

#[tokio::test]
async fn interact_answers_prompts_on_a_terminal() {
    let f = fixture();
    let prog = "test -t 0 || exit 9; printf 'Name? '; read n; printf 'Sure, %s? [y/n] ' \"$n\"; read a; [ \"$a\" = y ] && echo \"hello $n\"";
    let r = execute(
        &f,
        "i1",
        interact_step(prog, &[("Name\\? ", "ada\n"), ("\\[y/n\\]", "y\n")]),
    )
    .await;
    assert_eq!(
        exited(&r),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let transcript = String::from_utf8_lossy(&r.stdout);
    assert!(transcript.contains("hello ada"), "{transcript}");
}

#[tokio::test]
async fn interact_fails_when_the_prompt_never_comes() {
    let f = fixture();
    let mut step = interact_step("echo nothing to see; sleep 30", &[("password:", "x\n")]);
    if let Some(pb::step::Action::Interact(i)) = &mut step.action {
        i.script[0].timeout_ms = 300;
    }
    let r = execute(&f, "i2", step).await;
    assert_eq!(r.termination, pb::Termination::TimedOut as i32);
    assert!(String::from_utf8_lossy(&r.stderr).contains("waiting for /password:/"));

    let r = execute(&f, "i3", interact_step("echo bye", &[("password:", "x\n")])).await;
    assert_eq!(r.exit_code, None);
    assert!(String::from_utf8_lossy(&r.stderr).contains("ended before"));
}

#[tokio::test]
async fn a_background_child_holding_the_pipes_does_not_lose_the_output() {
    let f = fixture();
    let started = std::time::Instant::now();
    let r = execute(&f, "t7", run("sleep 5 & echo ok")).await;
    assert_eq!(exited(&r), Some(0));
    assert_eq!(r.stdout, b"ok\n");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_link_planted_at_the_temp_path_is_not_followed() {
    let f = fixture();
    let victim = f.work.join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = f.work.join("app.conf");
    std::fs::write(&path, b"old").unwrap();
    let plant = |tag: &str| {
        let tmp = crate::fsutil::temp_path(&path, tag);
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
    };

    plant("f5");
    let r = execute(&f, "f5", file_step("app.conf", b"new", Some(0o600), "")).await;
    assert_eq!(
        exited(&r),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"new");

    plant("restore-f5");
    let r = execute(&f, "f5r", restore_step("f5")).await;
    assert_eq!(
        exited(&r),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"old");

    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(mode_of(&victim), 0o644);
    let left: Vec<_> = std::fs::read_dir(&f.work)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "links or temp files left: {left:?}");
}

#[tokio::test]
async fn restoring_a_step_that_installed_nothing_succeeds() {
    let f = fixture();
    let path = f.work.join("nginx.conf");
    std::fs::write(&path, b"good").unwrap();
    let validate = format!("grep -q good {}", modi_proto::FILE_TMP_PLACEHOLDER);
    let r = execute(&f, "f6", file_step("nginx.conf", b"bad", None, &validate)).await;
    assert_ne!(exited(&r), Some(0));

    for of in ["f6", "never-sent"] {
        let r = execute(&f, &format!("{of}-r"), restore_step(of)).await;
        assert_eq!(
            exited(&r),
            Some(0),
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
        let said = String::from_utf8_lossy(&r.stdout);
        assert!(said.contains("nothing to restore"), "{said}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"good");
}

#[tokio::test]
async fn backups_past_their_retention_are_deleted_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let backups = dir.path().join("backups");
    std::fs::create_dir(&backups).unwrap();
    let now = std::time::SystemTime::now();
    let month = now - BACKUP_RETENTION - Duration::from_secs(3600);
    let years = now - BACKUP_RECORD_RETENTION - Duration::from_secs(3600);
    for (name, when) in [
        ("ancient.json", Some(years)),
        ("ancient.data", Some(years)),
        ("old.json", Some(month)),
        ("old.data", Some(month)),
        ("new.json", None),
        ("new.data", None),
        (".x.modi-tmp-1", Some(month)),
    ] {
        let path = backups.join(name);
        std::fs::write(&path, b"{}").unwrap();
        if let Some(when) = when {
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(when).unwrap();
        }
    }
    Executor::new(dir.path().join("work"), backups.clone()).unwrap();
    let mut left: Vec<_> = std::fs::read_dir(&backups)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    // The month-old record stays, so restoring it says "expired".
    assert_eq!(left, ["new.data", "new.json", "old.json"]);
}

#[tokio::test]
async fn interact_does_not_wait_for_a_background_process_holding_the_terminal() {
    let f = fixture();
    // Ignoring HUP, the sleep outlives the shell and keeps the PTY open.
    let prog = "trap '' HUP; sleep 30 & printf 'go? '; read a; echo \"went $a\"";
    let started = std::time::Instant::now();
    let r = execute(&f, "i4", interact_step(prog, &[("go\\? ", "yes\n")])).await;
    assert_eq!(
        exited(&r),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(String::from_utf8_lossy(&r.stdout).contains("went yes"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_interact_send_the_program_never_reads_gives_way_to_the_timeout() {
    let f = fixture();
    // Raw mode: a full terminal input buffer blocks the writer.
    let mut step = interact_step("stty raw -echo; echo ready; sleep 30", &[("ready", "")]);
    if let Some(pb::step::Action::Interact(i)) = &mut step.action {
        i.script[0].send = "x".repeat(1 << 20);
        i.script[0].timeout_ms = 500;
    }
    let started = std::time::Instant::now();
    let r = execute(&f, "i5", step).await;
    assert_eq!(r.termination, pb::Termination::TimedOut as i32, "{r:?}");
    assert!(String::from_utf8_lossy(&r.stderr).contains("sending"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn restoring_an_expired_backup_fails_loudly() {
    let f = fixture();
    let path = f.work.join("kept.conf");
    std::fs::write(&path, b"before").unwrap();
    let r = execute(&f, "e1", file_step("kept.conf", b"after", None, "")).await;
    assert_eq!(exited(&r), Some(0));
    // The data went with its retention; the record stayed.
    let data = f._dir.path().join("backups").join("e1.data");
    std::fs::remove_file(&data).unwrap();
    let r = execute(&f, "e1r", restore_step("e1")).await;
    assert_eq!(r.termination, pb::Termination::FailedToStart as i32);
    let said = String::from_utf8_lossy(&r.stderr);
    assert!(
        said.contains("backup data") && said.contains("by hand"),
        "{said}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"after", "left as it is");
}

/// An executor recording process groups in a journal of its own.
fn journaled() -> (Fixture, PathBuf) {
    let mut f = fixture();
    let dir = f._dir.path().join("journal");
    let (journal, _) = crate::journal::Journal::open(&dir).unwrap();
    f.exec = f
        .exec
        .clone()
        .record_groups_in(std::sync::Arc::new(journal));
    (f, dir)
}

fn recorded_pgid(journal: &Path, id: &str) -> i32 {
    let text = std::fs::read_to_string(journal.join(format!("{id}.pgid"))).unwrap();
    crate::pgroup::Group::decode(&text).unwrap().pgid
}

fn pid_in(out: &[u8]) -> i32 {
    let out = String::from_utf8_lossy(out);
    out.trim()
        .trim_start_matches("pid=")
        .parse()
        .unwrap_or_else(|_| panic!("no pid in {out:?}"))
}

#[tokio::test]
async fn every_step_process_has_its_group_recorded_in_the_journal() {
    let (f, journal) = journaled();

    let r = execute(&f, "g1", run("echo $$")).await;
    assert_eq!(exited(&r), Some(0));
    assert_eq!(recorded_pgid(&journal, "g1"), pid_in(&r.stdout));

    let argv = pb::Step {
        action: Some(pb::step::Action::Argv(pb::Argv {
            args: vec!["/bin/sh".into(), "-c".into(), "echo $$".into()],
        })),
        ..Default::default()
    };
    let r = execute(&f, "g2", argv).await;
    assert_eq!(exited(&r), Some(0));
    assert_eq!(recorded_pgid(&journal, "g2"), pid_in(&r.stdout));

    let validate = format!("echo $$ > {}", f.work.join("validate.pid").display());
    let r = execute(&f, "g3", file_step("conf", b"x", None, &validate)).await;
    assert_eq!(exited(&r), Some(0), "{r:?}");
    let pid = pid_in(&std::fs::read(f.work.join("validate.pid")).unwrap());
    assert_eq!(recorded_pgid(&journal, "g3"), pid);

    let r = execute(&f, "g4", interact_step("echo pid=$$", &[])).await;
    assert_eq!(exited(&r), Some(0), "{r:?}");
    assert_eq!(recorded_pgid(&journal, "g4"), pid_in(&r.stdout));
}

#[tokio::test]
async fn a_step_whose_group_cannot_be_recorded_is_killed_at_once() {
    let (f, journal) = journaled();
    // A journal that can no longer be written (as on a full disk).
    std::fs::remove_dir_all(&journal).unwrap();
    let marker = f.work.join("ran");
    let step = run(&format!("sleep 1; touch {}", marker.display()));
    let started = std::time::Instant::now();
    let r = execute(&f, "g5", step).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "it was not killed"
    );
    assert_eq!(r.termination, pb::Termination::Lost as i32, "{r:?}");
    let why = String::from_utf8_lossy(&r.stderr);
    assert!(
        why.contains("cannot record the step's process group"),
        "{why}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!marker.exists(), "the step went on");
}

fn with_secrets(pairs: &[(&str, &str)], step: pb::Step) -> (pb::RunStep, Secrets) {
    let mut run = pb::RunStep {
        dispatch_id: "s".into(),
        step: Some(step),
        secrets: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let secrets = Secrets::take(&mut run);
    (run, secrets)
}

#[tokio::test]
async fn a_step_gets_its_secrets_and_its_output_never_shows_them() {
    let f = fixture();
    let value = "p@ss w0rd'\"$(id)";
    // What the controller renders: the command reads the environment,
    // env and stdin hold placeholders.
    let mut step =
        run(r#"printf '%s|' "$MODI_SECRET_pw" "$PW"; cat; echo; echo "err $MODI_SECRET_pw" >&2"#);
    step.env.insert("PW".into(), "<secret pw>".into());
    step.stdin = Some(b"in:<secret pw>".to_vec());
    let (journaled, secrets) = with_secrets(&[("pw", value)], step);
    assert!(journaled.secrets.is_empty());
    let (tx, mut rx) = mpsc::channel(1024);
    let r = f
        .exec
        .execute(
            "s1",
            journaled.step.unwrap(),
            &secrets,
            tx,
            CancellationToken::new(),
        )
        .await;
    assert_eq!(exited(&r), Some(0), "{r:?}");
    // The step really got the value three ways (its output is masked, so
    // the test compares what it printed with the placeholder).
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "<secret pw>|<secret pw>|in:<secret pw>\n"
    );
    assert_eq!(String::from_utf8_lossy(&r.stderr), "err <secret pw>\n");
    let mut streamed = Vec::new();
    while let Ok(chunk) = rx.try_recv() {
        streamed.extend(chunk.data);
    }
    let streamed = String::from_utf8_lossy(&streamed);
    assert!(
        !streamed.contains(value) && streamed.contains("<secret pw>"),
        "{streamed}"
    );
}

#[tokio::test]
async fn a_secret_reaches_argv_and_file_content_unmasked_where_it_belongs() {
    let f = fixture();
    let out = f.work.join("argv.txt");
    std::fs::create_dir_all(&f.work).unwrap();
    let step = pb::Step {
        action: Some(pb::step::Action::Argv(pb::Argv {
            args: vec![
                "/bin/sh".into(),
                "-c".into(),
                r#"printf %s "$1" > "$2""#.into(),
                "sh".into(),
                "<secret tok>".into(),
                out.to_string_lossy().into_owned(),
            ],
        })),
        ..Default::default()
    };
    let (run, secrets) = with_secrets(&[("tok", "t0ken")], step);
    let (tx, _rx) = mpsc::channel(16);
    let r = f
        .exec
        .execute(
            "s2",
            run.step.unwrap(),
            &secrets,
            tx,
            CancellationToken::new(),
        )
        .await;
    assert_eq!(exited(&r), Some(0), "{r:?}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "t0ken");

    let conf = f.work.join("app.conf");
    let step = file_step(
        conf.to_str().unwrap(),
        b"password=<secret tok>\n",
        Some(0o600),
        "",
    );
    let (run, secrets) = with_secrets(&[("tok", "t0ken")], step);
    let (tx, _rx) = mpsc::channel(16);
    let r = f
        .exec
        .execute(
            "s3",
            run.step.unwrap(),
            &secrets,
            tx,
            CancellationToken::new(),
        )
        .await;
    assert_eq!(exited(&r), Some(0), "{r:?}");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "password=t0ken\n");
    assert!(!String::from_utf8_lossy(&r.stdout).contains("t0ken"));
}

#[tokio::test]
async fn interact_sends_a_secret_and_its_echo_is_masked() {
    let f = fixture();
    let step = pb::Step {
        action: Some(pb::step::Action::Interact(pb::Interact {
            command:
                r#"printf 'Password: '; read -r pw; [ "$pw" = "$MODI_SECRET_pw" ] && echo "ok $pw""#
                    .into(),
            script: vec![pb::Exchange {
                expect: "Password:".into(),
                send: "<secret pw>\n".into(),
                timeout_ms: 5000,
            }],
        })),
        ..Default::default()
    };
    let (run, secrets) = with_secrets(&[("pw", "hunter2")], step);
    let (tx, mut rx) = mpsc::channel(1024);
    let r = f
        .exec
        .execute(
            "s4",
            run.step.unwrap(),
            &secrets,
            tx,
            CancellationToken::new(),
        )
        .await;
    assert_eq!(exited(&r), Some(0), "{r:?}");
    let transcript = String::from_utf8_lossy(&r.stdout);
    assert!(transcript.contains("ok <secret pw>"), "{transcript}");
    assert!(!transcript.contains("hunter2"), "{transcript}");
    while let Ok(chunk) = rx.try_recv() {
        assert!(!String::from_utf8_lossy(&chunk.data).contains("hunter2"));
    }
}

#[tokio::test]
async fn a_file_is_read_for_a_diff_capped_and_only_if_regular() {
    let f = fixture();
    std::fs::write(f.work.join("app.conf"), "0123456789").unwrap();
    let r = f.exec.read_file("app.conf", 4).await;
    assert!(r.exists && r.error.is_empty(), "{r:?}");
    assert_eq!(r.content, b"0123");
    assert_eq!(r.size, 10);
    let missing = f.exec.read_file("nothing-here", 4).await;
    assert!(!missing.exists && missing.error.is_empty(), "{missing:?}");
    let dir = f.exec.read_file(f.work.to_str().unwrap(), 4).await;
    assert!(dir.error.contains("not a regular file"), "{dir:?}");
    std::os::unix::fs::symlink(f.work.join("app.conf"), f.work.join("link")).unwrap();
    let link = f.exec.read_file("link", 4).await;
    assert!(link.error.contains("not a regular file"), "{link:?}");
    // Reading changes nothing.
    assert_eq!(
        std::fs::read(f.work.join("app.conf")).unwrap(),
        b"0123456789"
    );
}
