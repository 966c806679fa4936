//! The changesets in `examples/`: each validates and renders against a
//! small synthetic fleet (every `yaml` block of the docs, and the lab
//! examples, are validated by the e2e suite `examples`, with the real
//! `modi validate`); the demo is also run, step by step, through
//! `/bin/sh` in one temporary work directory per host, to show it does what
//! its comments promise.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{command, host, plan_files, vars};
use crate::changeset::CelJudge;
use crate::rollout::{Failure, FailureReason, Judge, Phase, StepResult, Termination};
use crate::spec::{ChangeSpec, HostInfo, HostPlan, OnFailure, RunSpec, Step, StepAction};

const DEMO: &str = include_str!("../../../../examples/demo.yaml");
const WEB_UPGRADE: &str = include_str!("../../../../examples/web-upgrade.yaml");
const ADD_USER: &str = include_str!("../../../../examples/add-user.yaml");
const CONFIG_PUSH: &str = include_str!("../../../../examples/config-push.yaml");
const TEMPLATE_FOREACH: &str = include_str!("../../../../examples/template-foreach.yaml");
const NESTED: &str = include_str!("../../../../examples/nested.yaml");
const UPGRADE_AGENTS: &str = include_str!("../../../../examples/upgrade-agents.yaml");
const DB_MIGRATE: &str = include_str!("../../../../examples/db-migrate.yaml");
const SERVICE_PASSWORD: &str = include_str!("../../../../examples/service-password.yaml");

fn fleet() -> Vec<HostInfo> {
    let mut out: Vec<HostInfo> = (1..=8)
        .map(|i| host(&format!("web-{i}"), &[("role", "web")]))
        .collect();
    out.push(host("db-1", &[("role", "db")]));
    out
}

fn demo_fleet() -> Vec<HostInfo> {
    (1..=5)
        .map(|i| {
            host(
                &format!("demo-{i}"),
                &[("role", if i < 5 { "web" } else { "db" })],
            )
        })
        .collect()
}

fn example(name: &str, text: &str, cli: &[(&str, &str)]) -> RunSpec {
    let files = [(name, text), ("examples/db-migrate.yaml", DB_MIGRATE)];
    plan_files(&files, &fleet(), &serde_json::Value::Null, &vars(cli))
        .unwrap_or_else(|e| panic!("{name}:\n{e}"))
}

#[test]
fn web_upgrade_rolls_with_a_canary() {
    let spec = example(
        "examples/web-upgrade.yaml",
        WEB_UPGRADE,
        &[("version", "2.4.2")],
    );
    let c = &spec.changes[0];
    assert_eq!(c.hosts.len(), 8);
    assert_eq!(
        c.batches().iter().map(Vec::len).collect::<Vec<_>>(),
        [1, 2, 2, 2, 1]
    );
    let h = &c.hosts[0];
    assert_eq!(command(&h.skip_if[0]), "grep -qx 2.4.2 /etc/webapp/version");
    assert!(
        matches!(&h.apply[0].action, StepAction::File(f) if f.content == "2.4.2\n" && f.mode == Some(0o644))
    );
    assert_eq!(h.backout.len(), 2);
    assert!(h.backout[0].when.is_some() && h.backout[1].when.is_none());
}

#[test]
fn upgrade_agents_checks_the_download_and_restarts_after_reporting() {
    let spec = example(
        "examples/upgrade-agents.yaml",
        UPGRADE_AGENTS,
        &[("version", "9.9.9"), ("pin", "sha256//AAAA=")],
    );
    assert_eq!(spec.changes.len(), 2);
    let install = &spec.changes[0];
    assert_eq!(install.hosts.len(), 9);
    assert_eq!(
        install.batches().iter().map(Vec::len).collect::<Vec<_>>()[0],
        1,
        "a canary first"
    );
    let h = &install.hosts[0];
    let apply: Vec<&str> = h.apply.iter().map(command).collect();
    assert!(
        apply[1].contains("--pinnedpubkey 'sha256//AAAA=' -k"),
        "{apply:?}"
    );
    assert!(apply[2].contains("/install/modi-agent.sha256"), "{apply:?}");
    // The restart is scheduled, last, never run inside the step.
    assert!(
        apply
            .last()
            .unwrap()
            .starts_with("systemd-run --quiet --collect --on-active=3s"),
        "{apply:?}"
    );
    assert!(apply.iter().all(|c| !c.starts_with("systemctl restart")));
    let after = &spec.changes[1].hosts[0];
    assert_eq!(command(&after.apply[0]), "/proc/$PPID/exe --version");
}

#[test]
fn add_user_has_its_backout() {
    let spec = example("examples/add-user.yaml", ADD_USER, &[("user", "ops_bot")]);
    let h = &spec.changes[0].hosts[0];
    assert_eq!(spec.changes[0].hosts.len(), 9);
    let StepAction::Argv { argv } = &h.apply[0].action else {
        panic!("argv")
    };
    assert_eq!(argv.last().map(String::as_str), Some("ops_bot"));
    assert_eq!(argv[5], "ops_bot service account");
    assert_eq!(
        command(&h.apply[1]),
        "install -d -m 0700 -o ops_bot -g ops_bot /home/ops_bot/.ssh"
    );
    assert!(
        matches!(&h.apply[2].action, StepAction::File(f) if f.owner.as_deref() == Some("ops_bot"))
    );
    assert!(
        matches!(&h.backout[0].steps[0].action, StepAction::Argv { argv } if argv[0] == "userdel")
    );
}

#[test]
fn service_password_needs_its_secret_and_never_holds_it() {
    let sources =
        crate::changeset::Sources::single("examples/service-password.yaml", SERVICE_PASSWORD);
    let none = Default::default();
    let missing = crate::changeset::validate(&sources, &vars(&[]), &none).unwrap_err();
    assert!(
        missing
            .to_string()
            .contains("secret `password` is not given"),
        "{missing}"
    );
    let given = ["password".to_string()].into();
    let cs = crate::changeset::validate(&sources, &vars(&[]), &given).unwrap();
    let spec = crate::changeset::render(&cs, &fleet(), &Default::default(), &vars(&[])).unwrap();
    let h = &spec.changes[0].hosts[0];
    assert_eq!(
        command(&h.apply[0]),
        r#"printf '%s:%s\n' app "$MODI_SECRET_password" | chpasswd"#
    );
    let StepAction::File(f) = &h.apply[1].action else {
        panic!("a file step")
    };
    assert_eq!(f.content, "user=app\npassword=<secret password>\n");
    assert_eq!(spec.secrets(), given);
}

#[test]
fn config_push_validates_in_the_temp_file() {
    let spec = example("examples/config-push.yaml", CONFIG_PUSH, &[]);
    assert_eq!(spec.changes[0].hosts.len(), 9);
    let h = spec.changes[0]
        .hosts
        .iter()
        .find(|h| h.host.name == "web-1")
        .expect("web-1");
    let StepAction::File(f) = &h.apply[0].action else {
        panic!("file")
    };
    assert_eq!(
        f.validate.as_deref(),
        Some(format!("nginx -t -q -c {}", crate::spec::FILE_TMP_PLACEHOLDER).as_str())
    );
    assert!(
        f.content.contains("server 10.0.0.12:8080;\n"),
        "{}",
        f.content
    );
    assert!(
        f.content.starts_with("# managed by modi (web-1)"),
        "{}",
        f.content
    );
}

#[test]
fn template_foreach_runs_the_body_once_per_item_in_order() {
    let spec = example("examples/template-foreach.yaml", TEMPLATE_FOREACH, &[]);
    let names: Vec<&str> = spec.changes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["restart[0]", "restart[1]", "restart[2]", "restart-db-proxy"]
    );
    let apply = |i: usize| command(&spec.changes[i].hosts[0].apply[0]).to_string();
    assert_eq!(apply(0), "systemctl restart webapp.service");
    assert_eq!(apply(2), "systemctl restart scheduler.service");
    assert_eq!(apply(3), "systemctl restart pgbouncer.service");
    assert_eq!(spec.changes[3].requires, [2]);
}

#[test]
fn nested_includes_db_migrate() {
    let spec = example("examples/nested.yaml", NESTED, &[("version", "9.9")]);
    let names: Vec<&str> = spec.changes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["app", "schema/backup", "schema/migrate", "announce"]
    );
    assert_eq!(spec.changes[1].requires, [0]);
    assert_eq!(spec.changes[3].requires, [1, 2]);
    let StepAction::Argv { argv } = &spec.changes[2].hosts[0].apply[0].action else {
        panic!("argv")
    };
    assert_eq!(argv[2], "9.9");
    // db-migrate also stands alone.
    let alone = plan_files(
        &[("db-migrate.yaml", DB_MIGRATE)],
        &fleet(),
        &serde_json::Value::Null,
        &vars(&[]),
    );
    assert!(alone.is_ok(), "{}", alone.unwrap_err());
}

#[test]
fn demo_renders_for_the_five_demo_agents() {
    let spec = plan_files(
        &[("examples/demo.yaml", DEMO)],
        &demo_fleet(),
        &serde_json::Value::Null,
        &vars(&[]),
    )
    .unwrap();
    let hosts = |i: usize| {
        spec.changes[i]
            .hosts
            .iter()
            .map(|h| h.host.name.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(hosts(0).len(), 5);
    assert_eq!(hosts(2), ["demo-1", "demo-2", "demo-3", "demo-4"]);
    assert_eq!(spec.changes[2].batches(), [vec![0], vec![1, 2], vec![3]]);
    assert!(command(&spec.changes[2].hosts[0].apply[1]).starts_with("sleep 1\n"));
}

// ---- a tiny, sequential stand-in for agents and engine ----

/// What a file step replaced: (path, previous bytes if any), newest last.
type Restore = Vec<(PathBuf, Option<Vec<u8>>)>;

/// What happened to one host.
#[derive(Debug, PartialEq)]
enum Outcome {
    Skipped,
    Success,
    Failed(Phase),
    BackedOut(Phase),
    NotStarted,
}

fn exec(step: &Step, dir: &Path, restore: &mut Restore) -> StepResult {
    let (program, args): (String, Vec<String>) = match &step.action {
        StepAction::Run { command } => ("/bin/sh".into(), vec!["-c".into(), command.clone()]),
        StepAction::Argv { argv } => (argv[0].clone(), argv[1..].to_vec()),
        StepAction::File(f) => {
            let path = dir.join(&f.path);
            restore.push((path.clone(), std::fs::read(&path).ok()));
            std::fs::write(&path, &f.content).expect("write");
            return StepResult {
                termination: Some(Termination::Exited),
                exit_code: Some(0),
                ..StepResult::default()
            };
        }
        other => panic!("the demo does not use {other:?}"),
    };
    let out = Command::new(program)
        .args(args)
        .current_dir(step.cwd.as_ref().map_or(dir.to_path_buf(), |c| dir.join(c)))
        .envs(&step.env)
        .stdin(Stdio::null())
        .output()
        .expect("spawn");
    StepResult {
        termination: Some(Termination::Exited),
        exit_code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
        ..StepResult::default()
    }
}

fn phase(
    steps: &[Step],
    p: Phase,
    plan: &HostPlan,
    dir: &Path,
    restore: &mut Restore,
) -> Result<(), Failure> {
    for (i, s) in steps.iter().enumerate() {
        let r = exec(s, dir, restore);
        if !CelJudge::new().passed(s, plan, &r).unwrap_or(false) {
            return Err(Failure {
                phase: p,
                step: i,
                reason: FailureReason::ConditionFailed,
                exit_code: r.exit_code,
                stdout: r.stdout,
                stderr: r.stderr,
                message: String::new(),
            });
        }
    }
    Ok(())
}

fn back_out(plan: &HostPlan, dir: &Path, failure: &Failure, restore: &mut Restore) {
    let judge = CelJudge::new();
    let chosen = plan.backout.iter().find(|b| {
        b.when
            .as_ref()
            .is_none_or(|w| judge.matches(w, plan, failure).unwrap())
    });
    let mut none = Vec::new();
    if let Some(b) = chosen {
        phase(&b.check, Phase::BackoutCheck, plan, dir, &mut none).expect("backout check");
    }
    for (path, old) in restore.drain(..).rev() {
        match old {
            Some(bytes) => std::fs::write(&path, bytes).expect("restore"),
            None => std::fs::remove_file(&path).expect("restore"),
        }
    }
    if let Some(b) = chosen {
        phase(&b.steps, Phase::Backout, plan, dir, &mut none).expect("backout steps");
        phase(&b.verify, Phase::BackoutVerify, plan, dir, &mut none).expect("backout verify");
    }
}

fn run_change(c: &ChangeSpec, dirs: &BTreeMap<String, PathBuf>) -> Vec<Outcome> {
    let mut outcomes: Vec<Outcome> = c.hosts.iter().map(|_| Outcome::NotStarted).collect();
    let mut done: Vec<(usize, Restore)> = Vec::new();
    let mut failures = 0;
    'batches: for batch in c.batches() {
        let mut stop = false;
        for i in batch {
            let plan = &c.hosts[i];
            let dir = &dirs[&plan.host.name];
            let mut restore = Vec::new();
            let mut none = Vec::new();
            if !plan.skip_if.is_empty()
                && phase(&plan.skip_if, Phase::SkipIf, plan, dir, &mut none).is_ok()
            {
                outcomes[i] = Outcome::Skipped;
                continue;
            }
            if let Err(f) = phase(&plan.check, Phase::Check, plan, dir, &mut none) {
                outcomes[i] = Outcome::Failed(f.phase);
            } else {
                let result = phase(&plan.apply, Phase::Apply, plan, dir, &mut restore)
                    .and_then(|()| phase(&plan.verify, Phase::Verify, plan, dir, &mut none));
                match result {
                    Ok(()) => {
                        outcomes[i] = Outcome::Success;
                        done.push((i, restore));
                        continue;
                    }
                    Err(f) => {
                        back_out(plan, dir, &f, &mut restore);
                        outcomes[i] = Outcome::BackedOut(f.phase);
                    }
                }
            }
            failures += 1;
            let tolerated = c
                .rollout
                .max_failures
                .map_or(usize::MAX, |m| m.of(c.hosts.len()));
            stop |= c.on_failure != OnFailure::Continue || failures > tolerated;
        }
        if stop {
            if c.on_failure == OnFailure::BackoutAll {
                for (i, mut restore) in done.drain(..).rev() {
                    let f = Failure {
                        phase: Phase::Apply,
                        step: 0,
                        reason: FailureReason::Cancelled,
                        exit_code: None,
                        stdout: String::new(),
                        stderr: String::new(),
                        message: "backout_all".into(),
                    };
                    back_out(&c.hosts[i], &dirs[&c.hosts[i].host.name], &f, &mut restore);
                    outcomes[i] = Outcome::BackedOut(Phase::Apply);
                }
            }
            break 'batches;
        }
    }
    outcomes
}

#[test]
fn demo_does_what_it_says_when_run() {
    let root = tempfile::tempdir().expect("temp dir");
    let dirs: BTreeMap<String, PathBuf> = demo_fleet()
        .into_iter()
        .map(|h| {
            let d = root.path().join(&h.name);
            std::fs::create_dir(&d).expect("mkdir");
            (h.name, d)
        })
        .collect();
    let spec = plan_files(
        &[("examples/demo.yaml", DEMO)],
        &demo_fleet(),
        &serde_json::Value::Null,
        &vars(&[("work_seconds", "0")]),
    )
    .unwrap();
    let names: Vec<&str> = spec.changes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["prepare", "rotate-logs", "deploy-web"]);

    let prepare = run_change(&spec.changes[0], &dirs);
    assert!(
        prepare.iter().all(|o| *o == Outcome::Success),
        "{prepare:?}"
    );

    use Outcome::*;
    let rotate = run_change(&spec.changes[1], &dirs);
    assert_eq!(
        rotate,
        [Success, Success, Success, Success, Failed(Phase::Check)]
    );
    assert!(!dirs["demo-5"].join("app/logs/app.log.1").exists());

    let deploy = run_change(&spec.changes[2], &dirs);
    assert_eq!(
        deploy,
        [
            BackedOut(Phase::Apply),
            BackedOut(Phase::Apply),
            BackedOut(Phase::Verify),
            NotStarted
        ]
    );
    for h in ["demo-1", "demo-2", "demo-3", "demo-4"] {
        assert_eq!(
            std::fs::read_to_string(dirs[h].join("app/version")).unwrap(),
            "1.0\n",
            "{h}"
        );
        assert_eq!(
            std::fs::read_dir(dirs[h].join("app/releases"))
                .unwrap()
                .count(),
            0,
            "{h}"
        );
    }
}
