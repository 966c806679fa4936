//! The one-line agent install, end to end: `modi token create --install`
//! prints a `curl ... | sh` line; it runs here, for real, against a real
//! `modi serve`, into a throwaway root (`MODI_INSTALL_ROOT`) with a
//! stand-in for `systemctl` that starts the unit's `ExecStart` itself. Also
//! the agent's side of it: `join` that checks before it spends a token, a
//! join retried after a local failure, an agent that never joined, one
//! that was revoked, and `modi demo` with modi-agent as separate processes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use modi_tests::{Agent, Controller, Out, bin, bin_dir, eventually, run};

/// Stands in for `systemctl`: records every call, and for start/restart
/// runs the installed unit's `ExecStart` in the background, keeping its
/// PID, as systemd would. `daemon-reload` fails while the file
/// `fail-daemon-reload` exists (a host whose systemd is in trouble).
const SYSTEMCTL: &str = r#"#!/bin/sh
state=${FAKE_SYSTEMD:?}
echo "$*" >>"$state/calls"
verb=""
for a in "$@"; do
    case $a in -*) ;; *) [ -z "$verb" ] && verb=$a ;; esac
done
unit="$MODI_INSTALL_ROOT/etc/systemd/system/modi-agent.service"
alive() { [ -f "$state/pid" ] && kill -0 "$(cat "$state/pid")" 2>/dev/null; }
start() {
    cmd=$(sed -n 's/^ExecStart=//p' "$unit")
    nohup $cmd >>"$state/agent.log" 2>&1 </dev/null &
    echo $! >"$state/pid"
}
case $verb in
    daemon-reload) [ ! -e "$state/fail-daemon-reload" ] ;;
    enable) exit 0 ;;
    is-active) alive ;;
    start) alive || start ;;
    restart) if alive; then kill "$(cat "$state/pid")"; sleep 1; fi; start ;;
    *) echo "stand-in systemctl: $verb is not handled" >&2; exit 1 ;;
esac
"#;

/// Stands in for `systemd-run --on-active=Ns CMD...`: runs CMD after N
/// seconds, detached from the caller (as a transient systemd timer is).
const SYSTEMD_RUN: &str = r#"#!/bin/sh
delay=0
while [ $# -gt 0 ]; do
    case $1 in
        --on-active=*) delay=${1#--on-active=}; delay=${delay%s}; shift ;;
        -*) shift ;;
        *) break ;;
    esac
done
echo "systemd-run after $delay: $*" >>"${FAKE_SYSTEMD:?}/calls"
nohup setsid sh -c 'sleep "$0"; exec "$@"' "$delay" "$@" >/dev/null 2>&1 </dev/null &
"#;

/// A throwaway host: a root to install into, and (with systemd) the
/// stand-in `systemctl` on PATH. Every process it started is killed on
/// drop, by PID.
struct Host {
    root: PathBuf,
    fake: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Host {
    fn new(systemd: bool) -> Host {
        let tmp = tempfile::Builder::new()
            .prefix("modi-install-")
            .tempdir()
            .unwrap();
        let root = tmp.path().join("root");
        let fake = tmp.path().join("systemd");
        std::fs::create_dir_all(fake.join("bin")).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        if systemd {
            std::fs::create_dir_all(root.join("run/systemd/system")).unwrap();
            let systemctl = fake.join("bin/systemctl");
            std::fs::write(&systemctl, SYSTEMCTL).unwrap();
            std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
            let systemd_run = fake.join("bin/systemd-run");
            std::fs::write(&systemd_run, SYSTEMD_RUN).unwrap();
            std::fs::set_permissions(&systemd_run, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Host {
            root,
            fake,
            _tmp: tmp,
        }
    }

    fn data(&self) -> PathBuf {
        self.root.join("var/lib/modi-agent")
    }

    fn binary(&self) -> PathBuf {
        self.root.join("usr/local/bin/modi-agent")
    }

    fn unit(&self) -> PathBuf {
        self.root.join("etc/systemd/system/modi-agent.service")
    }

    /// Runs the install line as printed, with join options after `sh -s --`.
    fn install(&self, line: &str, name: &str) -> Out {
        let line = line
            .strip_suffix("| sh")
            .unwrap_or_else(|| panic!("not a `... | sh` line: {line}"));
        let path = format!(
            "{}:{}",
            self.fake.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        run(Command::new("sh")
            .arg("-c")
            .arg(format!("{line}| sh -s -- --name {name}"))
            .env("MODI_INSTALL_ROOT", &self.root)
            .env("FAKE_SYSTEMD", &self.fake)
            .env("PATH", path))
    }

    /// The calls the stand-in systemctl got.
    fn calls(&self) -> String {
        std::fs::read_to_string(self.fake.join("calls")).unwrap_or_default()
    }

    /// The PID of the agent the stand-in systemd started.
    fn agent_pid(&self) -> Option<i32> {
        read_pid(&self.fake.join("pid"))
    }

    /// The PID of the no-systemd supervisor loop.
    fn supervisor_pid(&self) -> Option<i32> {
        read_pid(&self.data().join("supervise.pid"))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill, killpg};
        use nix::unistd::Pid;
        if let Some(pid) = self.agent_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // The supervisor leads its own process group (setsid), with the
        // agent in it.
        if let Some(pid) = self.supervisor_pid() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `modi token create --install [--uses N]`: the line, and the token.
fn install_line(ctl: &Controller, uses: &str) -> (String, String) {
    let t = ctl.json(&["token", "create", "--install", "--uses", uses]);
    let line = t["install_command"].as_str().expect("install_command");
    let token = t["token"].as_str().expect("token");
    assert!(
        line.starts_with("curl -fsS --pinnedpubkey 'sha256//") && line.contains(" -k https://"),
        "{line}"
    );
    assert!(line.ends_with(&format!("/install/{token} | sh")), "{line}");
    (line.to_string(), token.to_string())
}

#[test]
fn the_one_line_install_enrols_and_starts_the_agent_and_a_second_run_changes_nothing() {
    let ctl = Controller::start();
    let host = Host::new(true);
    let (line, _) = install_line(&ctl, "1");
    // The text form says what to do with it.
    let text = ctl.modi(&["token", "create", "--install"]);
    assert!(text.ok().contains("| sh"), "{}", text.stdout);

    let first = host.install(&line, "inst-1");
    assert_eq!(first.code, 0, "{first:#?}");
    for said in [
        "prerequisites hold",
        "SHA-256",
        "verified",
        "enrolled with",
        "wrote the systemd unit",
        "started modi-agent with systemd",
        "done: modi-agent",
    ] {
        assert!(
            first.stdout.contains(said),
            "{said:?} missing:\n{}",
            first.stdout
        );
    }
    // The binary is the controller's agent, byte for byte.
    assert_eq!(
        std::fs::read(host.binary()).unwrap(),
        std::fs::read(bin("modi-agent")).unwrap()
    );
    assert_eq!(mode(&host.binary()), 0o755);
    assert_eq!(mode(&host.data()), 0o700);
    assert_eq!(mode(&host.data().join("agent.key")), 0o600);
    let unit = std::fs::read_to_string(host.unit()).unwrap();
    assert!(
        unit.contains(&format!(
            "ExecStart={} run --config {}/agent.toml",
            host.binary().display(),
            host.data().display()
        )),
        "{unit}"
    );
    assert!(unit.contains("RestartPreventExitStatus=77 78"), "{unit}");
    // Enrolled, running, connected.
    eventually!(
        20,
        ctl.connected("inst-1"),
        "the installed agent connects:\n{}",
        std::fs::read_to_string(host.fake.join("agent.log")).unwrap_or_default()
    );
    let pid = host.agent_pid().expect("the stand-in started the agent");
    assert!(alive(pid));

    // Again: nothing changes, nothing restarts, no token is spent.
    let files = [
        host.binary(),
        host.unit(),
        host.data().join("agent.toml"),
        host.data().join("agent.pem"),
    ];
    let before: Vec<SystemTime> = files.iter().map(|f| mtime(f)).collect();
    let calls_before = host.calls();
    let second = host.install(&line, "inst-1");
    assert_eq!(second.code, 0, "{second:#?}");
    assert!(second.stdout.contains("nothing to do"), "{}", second.stdout);
    assert_eq!(files.iter().map(|f| mtime(f)).collect::<Vec<_>>(), before);
    assert_eq!(host.agent_pid(), Some(pid), "the agent was not restarted");
    assert!(alive(pid));
    let new_calls = &host.calls()[calls_before.len()..];
    assert!(
        !new_calls.contains("start") && !new_calls.contains("daemon-reload"),
        "{new_calls}"
    );
    assert!(ctl.connected("inst-1"));
    assert_eq!(ctl.hosts().len(), 1, "no ghost host");
}

#[test]
fn the_upgrade_example_rolls_the_controllers_agent_out_and_restarts_it() {
    let ctl = Controller::start();
    let host = Host::new(true);
    let (line, _) = install_line(&ctl, "1");
    host.install(&line, "old-1").ok();
    eventually!(20, ctl.connected("old-1"), "installed");
    let old_pid = host.agent_pid().unwrap();
    // The host has an older agent on disk (the running one is replaced
    // by whatever is there at the restart).
    let older = host.root.join("older");
    std::fs::write(&older, "#!/bin/sh\necho modi-agent 0.0.1\n").unwrap();
    std::fs::set_permissions(&older, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&older, host.binary()).unwrap();

    let version = run(Command::new(bin("modi")).arg("--version"));
    let version = version.ok().trim().trim_start_matches("modi ").to_string();
    let pin = line.split('\'').nth(1).unwrap().to_string();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/upgrade-agents.yaml");
    let vars = [
        format!("version={version}"),
        format!("controller=https://127.0.0.1:{}", ctl.port),
        format!("pin={pin}"),
        format!("bin={}", host.binary().display()),
        "restart_after=1s".to_string(),
    ];
    let mut args = Vec::new();
    for v in &vars {
        args.extend(["--var", v.as_str()]);
    }
    let (code, status) = ctl.apply(&example, &args);
    assert_eq!(code, 0, "{status:#}\n{}", host.calls());
    // The new binary is the controller's, the agent was restarted on it.
    assert_eq!(
        std::fs::read(host.binary()).unwrap(),
        std::fs::read(bin("modi-agent")).unwrap()
    );
    // The restart comes a moment after the step that scheduled it.
    eventually!(
        20,
        host.agent_pid().is_some_and(|p| p != old_pid),
        "restarted:\n{}",
        host.calls()
    );
    let new_pid = host.agent_pid().unwrap();
    assert!(
        host.calls().contains("restart modi-agent"),
        "{}",
        host.calls()
    );
    eventually!(20, ctl.connected("old-1"), "back on the new agent");
    // Run again: every host has it already, nothing is restarted.
    let (code, _) = ctl.apply(&example, &args);
    assert_eq!(code, 0);
    assert_eq!(host.agent_pid(), Some(new_pid));
}

#[test]
fn an_install_that_fails_after_the_join_is_finished_by_running_it_again() {
    let ctl = Controller::start();
    let host = Host::new(true);
    let (line, _) = install_line(&ctl, "1");
    // systemd is in trouble: the run gets past the join, then fails.
    std::fs::write(host.fake.join("fail-daemon-reload"), "").unwrap();
    let failed = host.install(&line, "half-1");
    assert_ne!(failed.code, 0, "{failed:#?}");
    assert!(failed.stdout.contains("enrolled with"), "{failed:#?}");
    assert!(
        failed.stderr.contains("run this line again"),
        "{}",
        failed.stderr
    );
    assert!(!ctl.connected("half-1"));
    // Worse: what the join wrote after the controller answered is lost too
    // (only the key survives), so the re-run must join again with the
    // spent one-time token, as a retry.
    for f in ["agent.toml", "agent.pem", "ca.pem"] {
        std::fs::remove_file(host.data().join(f)).unwrap();
    }
    std::fs::remove_file(host.fake.join("fail-daemon-reload")).unwrap();
    let again = host.install(&line, "half-1");
    assert_eq!(again.code, 0, "{again:#?}");
    assert!(again.stdout.contains("enrolled with"), "{}", again.stdout);
    assert!(
        again.stdout.contains("started modi-agent"),
        "{}",
        again.stdout
    );
    eventually!(20, ctl.connected("half-1"), "the finished install connects");
    assert_eq!(ctl.hosts().len(), 1, "one host, no ghost");
    // The token's one use is spent: another host cannot use it.
    let other = Host::new(true);
    let refused = other.install(&line, "half-2");
    assert_ne!(refused.code, 0, "{refused:#?}");
    assert!(refused.stderr.contains("already used"), "{refused:#?}");
}

#[test]
fn without_systemd_the_agent_runs_under_a_supervisor_loop_and_says_so() {
    let ctl = Controller::start();
    let host = Host::new(false);
    let (line, _) = install_line(&ctl, "1");
    let out = host.install(&line, "plain-1");
    assert_eq!(out.code, 0, "{out:#?}");
    assert!(
        out.stdout.contains("no systemd on this host"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("supervisor loop"), "{}", out.stdout);
    assert!(!host.unit().exists(), "no unit without systemd");
    eventually!(
        20,
        ctl.connected("plain-1"),
        "the supervised agent connects"
    );
    let supervisor = host.supervisor_pid().expect("supervisor PID file");
    // The loop restarts an agent that dies.
    let agent_pid = || {
        let out = run(Command::new("pgrep").args(["-P", &supervisor.to_string()]));
        out.stdout
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
    };
    let first = agent_pid().expect("the agent runs under the loop");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually!(
        20,
        agent_pid().is_some_and(|p| p != first) && ctl.connected("plain-1"),
        "the loop starts the agent again"
    );
    // A second run leaves the loop alone.
    let again = host.install(&line, "plain-1");
    assert_eq!(again.code, 0, "{again:#?}");
    assert!(again.stdout.contains("nothing to do"), "{}", again.stdout);
    assert_eq!(host.supervisor_pid(), Some(supervisor));
}

#[test]
fn a_failed_prerequisite_changes_nothing_and_spends_no_token() {
    let ctl = Controller::start();
    let host = Host::new(true);
    let (line, _) = install_line(&ctl, "1");
    // Where the data dir must go, a file is in the way.
    std::fs::create_dir_all(host.root.join("var/lib")).unwrap();
    std::fs::write(host.root.join("var/lib/modi-agent"), "not a dir").unwrap();
    let out = host.install(&line, "pre-1");
    assert_ne!(out.code, 0, "{out:#?}");
    assert!(out.stderr.contains("cannot create"), "{}", out.stderr);
    assert!(!host.binary().exists(), "nothing downloaded");
    assert!(ctl.hosts().is_empty());
    // Fixed, the same line works: the token was not used.
    std::fs::remove_file(host.root.join("var/lib/modi-agent")).unwrap();
    let out = host.install(&line, "pre-1");
    assert_eq!(out.code, 0, "{out:#?}");
    eventually!(20, ctl.connected("pre-1"), "connects");
}

#[test]
fn one_multi_use_token_enrols_a_fleet_and_no_more() {
    let ctl = Controller::start();
    let (line, _) = install_line(&ctl, "2");
    let hosts = [Host::new(true), Host::new(true), Host::new(true)];
    for (i, host) in hosts[..2].iter().enumerate() {
        let out = host.install(&line, &format!("fleet-{i}"));
        assert_eq!(out.code, 0, "{out:#?}");
    }
    eventually!(
        20,
        ctl.connected("fleet-0") && ctl.connected("fleet-1"),
        "both connect"
    );
    let third = hosts[2].install(&line, "fleet-2");
    assert_ne!(third.code, 0, "{third:#?}");
    assert!(third.stderr.contains("already used"), "{third:#?}");
}

#[test]
fn the_controller_serves_its_own_agent_and_a_script_only_for_its_tokens() {
    let ctl = Controller::start();
    let (line, _) = install_line(&ctl, "1");
    let pin = line.split('\'').nth(1).unwrap();
    let base = format!("https://127.0.0.1:{}", ctl.port);
    let curl = |path: &str, pin: &str| {
        run(Command::new("curl")
            .args(["-fsS", "--pinnedpubkey", pin, "-k"])
            .arg(format!("{base}{path}")))
    };
    let sum = curl("/install/modi-agent.sha256", pin);
    let expected = run(Command::new("sha256sum").arg(bin("modi-agent")));
    let expected = expected.ok().split_whitespace().next().unwrap().to_string();
    assert_eq!(sum.ok().split_whitespace().next(), Some(expected.as_str()));
    // An unknown token gets a script that says so and fails.
    let script = curl("/install/mt_0000", pin);
    let out = run(Command::new("sh").arg("-c").arg(script.ok()));
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("unknown join token"), "{out:#?}");
    // The pin refuses a server with another key.
    let wrong = "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let refused = curl("/install/modi-agent.sha256", wrong);
    assert_ne!(refused.code, 0, "{refused:#?}");
}

#[test]
fn join_checks_its_data_dir_before_it_spends_the_token_and_a_retry_finishes() {
    let ctl = Controller::start();
    let token = ctl.token("10m");
    // A data dir that cannot be made: the token is not used.
    let blocker = ctl.root.join("blocker");
    std::fs::write(&blocker, "a file").unwrap();
    let out = Agent::join_cmd(&token, "careful", &blocker.join("data"), &[]);
    assert_ne!(out.code, 0, "{out:#?}");
    assert!(
        out.stderr.contains("the join token was not used"),
        "{out:#?}"
    );
    assert!(ctl.hosts().is_empty());

    let dir = ctl.root.join("careful");
    Agent::join_cmd(&token, "careful", &dir, &[]).ok();
    // What the join wrote after the controller answered is lost (only the
    // key is there): the same join again is a retry and succeeds.
    for f in ["agent.toml", "agent.pem"] {
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    let again = Agent::join_cmd(&token, "careful", &dir, &[]);
    assert_eq!(again.code, 0, "{again:#?}");
    // Another key cannot ride on it.
    let other = Agent::join_cmd(&token, "careful", &ctl.root.join("thief"), &[]);
    assert_ne!(other.code, 0, "{other:#?}");
    let mut agent = Agent::at("careful", dir);
    agent.start();
    eventually!(20, ctl.connected("careful"), "the retried join works");
}

#[test]
fn an_agent_that_never_joined_says_so_and_is_not_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(bin("modi-agent"))
        .args(["run", "--config"])
        .arg(dir.path().join("agent.toml")));
    assert_eq!(out.code, 78, "{out:#?}");
    assert!(
        out.stderr
            .contains("not enrolled: run `modi-agent join ...` first"),
        "{}",
        out.stderr
    );
}

#[test]
fn a_revoked_agent_stops_and_says_why() {
    let ctl = Controller::start();
    let mut agent = Agent::join(&ctl, "gone", &[]);
    ctl.modi(&["agents", "revoke", "gone"]).ok();
    eventually!(20, agent.exited().is_some(), "the revoked agent stops");
    assert_eq!(agent.exited(), Some(77), "{}", agent.log());
    assert!(
        agent.log().contains("\"gone\" was revoked"),
        "{}",
        agent.log()
    );
    // Started again (by hand), it stops again at the handshake.
    agent.start();
    eventually!(20, agent.exited().is_some(), "refused at the handshake");
    assert_eq!(agent.exited(), Some(77), "{}", agent.log());
    assert!(
        agent.log().contains("certificate_revoked"),
        "{}",
        agent.log()
    );
}

#[test]
fn modi_demo_runs_with_modi_agent_as_separate_processes() {
    let out = run(Command::new(bin("modi")).arg("demo"));
    assert_eq!(out.code, 0, "{out:#?}");
    assert!(
        out.stderr.contains("5 modi-agent processes enrolled")
            || out.stdout.contains("5 modi-agent processes enrolled"),
        "{out:#?}"
    );
    // Without modi-agent beside modi or on PATH, it says what is missing.
    let alone = tempfile::tempdir().unwrap();
    let modi = alone.path().join("modi");
    std::fs::copy(bin("modi"), &modi).unwrap();
    let out = run(Command::new(&modi).arg("demo").env("PATH", "/usr/bin:/bin"));
    assert_ne!(out.code, 0, "{out:#?}");
    assert!(out.stderr.contains("cannot find modi-agent"), "{out:#?}");
    assert!(
        !bin_dir().join("modi-agent").starts_with(alone.path()),
        "the test's own modi-agent is elsewhere"
    );
}
