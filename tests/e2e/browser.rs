//! The web view in a real browser: headless Chromium driven over
//! WebDriver (chromedriver on loopback). Signs in with a `modi ui` link,
//! watches a rolling change with approval gates and a backout change
//! colour live, approves through the page, and checks what a viewer may
//! not do. Screenshots of the run page are kept in
//! `target/tmp/web-screenshots/`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use modi_tests::{Agent, Proc, free_port};
use serde_json::{Value, json};

use crate::trust::add_operator;
use crate::web::{login_url, web_controller};

/// chromedriver, installed from Debian (with Chromium) when missing: the
/// test suite needs nothing a fresh machine lacks.
fn chromedriver() -> PathBuf {
    let found = |name: &str| {
        std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join(name))
                    .find(|p| p.exists())
            })
            .unwrap_or_default()
    };
    if let (Some(driver), Some(_)) = (found("chromedriver"), found("chromium")) {
        return driver;
    }
    let status = Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver",
        ])
        .status()
        .expect("apt-get runs");
    assert!(
        status.success(),
        "installing chromium and chromium-driver failed"
    );
    found("chromedriver").expect("chromedriver after installing chromium-driver")
}

/// A chromedriver process and a browser session on it.
struct Browser {
    client: Client,
    _driver: Proc,
}

async fn browser(log: PathBuf) -> Browser {
    let port = free_port();
    let mut cmd = Command::new(chromedriver());
    cmd.arg(format!("--port={port}"));
    let driver = Proc::spawn(cmd, log);
    let caps = json!({
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000"]
        }
    });
    let caps = caps.as_object().unwrap().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let client = loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("no browser session: {e}"),
        }
    };
    Browser {
        client,
        _driver: driver,
    }
}

async fn js(b: &Browser, script: &str) -> Value {
    b.client.execute(script, vec![]).await.expect("script runs")
}

/// Waits until `script` returns true.
async fn until(b: &Browser, secs: u64, script: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if js(b, script).await == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            let source = b.client.source().await.unwrap_or_default();
            panic!("timed out waiting for {what}\n{source}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn screenshot(b: &Browser, name: &str) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = b.client.screenshot().await.expect("a screenshot");
    std::fs::write(dir.join(name), png).unwrap();
}

/// Clicks Approve and waits for the run page it leads back to (a new
/// page: the old one's mark is gone).
async fn approve(b: &Browser) {
    js(b, "window.modiOldPage = true; return true").await;
    // Found and clicked in one step: the live page may swap its panel (and
    // the button with it) between a find and a click.
    until(
        b,
        30,
        "const a = document.querySelector('button[data-action=approve]'); if (!a) return false; a.click(); return true",
        "an Approve button to click",
    )
    .await;
    until(
        b,
        30,
        "return window.modiOldPage === undefined && document.readyState === 'complete' && !!document.getElementById('panel')",
        "the run page after approving",
    )
    .await;
}

/// The host cells' states of change 0, by cell id.
const CELL_STATES: &str = "return Array.from(document.querySelectorAll('a.host')).map(a => a.id + '=' + a.dataset.state).join(' ')";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_change_is_watched_live_and_approved_in_the_browser() {
    let (ctl, _port) = web_controller();
    let _agents: Vec<Agent> = ["w1", "w2", "w3", "w4"]
        .iter()
        .map(|n| Agent::join(&ctl, n, &[("role", "web")]))
        .collect();
    let warmup = ctl.changeset(
        "warmup.yaml",
        "name: warmup\nchanges:\n  - name: hello\n    hosts: role=web\n    rollout: { mode: parallel }\n    apply:\n      - run: echo hi\n",
    );
    let (code, _) = ctl.apply(&warmup, &[]);
    assert_eq!(code, 0);
    let rollout = ctl.changeset(
        "rollout.yaml",
        r#"
name: rollout
changes:
  - name: web
    hosts: role=web
    rollout: { mode: rolling, batches: [2] }
    approve: each_batch
    on_failure: backout_all
    apply:
      - run: sleep 1; echo 2.0 > version
    verify:
      - run: test {{ host.name }} != w4
    backout:
      steps:
        - run: rm -f version
"#,
    );
    let run = ctl.detach(&rollout, &[]);
    ctl.wait_state(&run, "awaiting_approval");

    let b = browser(ctl.root.join("chromedriver.log")).await;
    // Sign in with the link; the runs page lists the finished run.
    let url = login_url(&ctl, None);
    b.client.goto(&url).await.unwrap();
    until(
        &b,
        30,
        "return location.pathname === '/runs'",
        "the runs page",
    )
    .await;
    until(
        &b,
        30,
        "return document.body.innerText.includes('warmup') && document.body.innerText.includes('✔ success')",
        "the finished run listed",
    )
    .await;

    // The run waits at its first gate; approving it lets batch 1 through,
    // and its hosts change colour without the page being reloaded.
    let base = url.split("/login").next().unwrap().to_string();
    b.client.goto(&format!("{base}/runs/{run}")).await.unwrap();
    b.client
        .wait()
        .for_element(Locator::Css("button[data-action=approve]"))
        .await
        .unwrap();
    screenshot(&b, "1-waiting-at-the-first-gate.png").await;
    approve(&b).await;
    js(&b, "window.modiMarker = 42; return true").await;
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let states = js(&b, CELL_STATES).await;
        let states = states.as_str().unwrap_or_default().to_string();
        seen.extend(states.split(' ').map(str::to_string));
        if states.contains("h-0-0=success") && states.contains("h-0-1=success") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "batch 1 never turned green: {states}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen.contains("h-0-0=running") || seen.contains("h-0-1=running"),
        "a host was seen running, then green, live: {seen:?}"
    );
    assert_eq!(
        js(&b, "return window.modiMarker").await,
        json!(42),
        "no reload"
    );
    // The next gate shows up in the panel by itself.
    b.client
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css("button[data-action=approve]"))
        .await
        .unwrap();
    assert_eq!(
        js(&b, "return window.modiMarker").await,
        json!(42),
        "no reload"
    );
    screenshot(&b, "2-first-batch-done-second-gate.png").await;

    // Batch 2: w4 fails its verify, and the whole change is backed out.
    approve(&b).await;
    until(
        &b,
        30,
        "const p = document.getElementById('panel'); return !!p && p.dataset.state === 'backout_ok'",
        "the run backed out",
    )
    .await;
    until(
        &b,
        30,
        "return !!document.querySelector('details.failures') && document.body.innerText.includes('w4: verify[0]')",
        "why w4 failed",
    )
    .await;
    let states = js(&b, CELL_STATES).await;
    assert!(
        states.as_str().unwrap().contains("h-0-3=backout_ok"),
        "{states}"
    );
    screenshot(&b, "3-backed-out.png").await;
    let status = ctl.wait_final(&run);
    assert_eq!(status["state"], "backout_ok", "{status}");
    assert_eq!(status["decisions"].as_array().unwrap().len(), 2, "{status}");
    assert!(
        status["decisions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["by"] == "admin")
    );
    let audit = ctl.modi(&["audit"]).stdout;
    let approvals = audit
        .lines()
        .filter(|l| l.contains("admin") && l.contains("Control") && l.contains("(web)"))
        .count();
    assert_eq!(approvals, 2, "{audit}");

    // Plan: an uploaded file fills the box; the plan shows its steps.
    b.client.goto(&format!("{base}/plan")).await.unwrap();
    b.client
        .find(Locator::Id("upload"))
        .await
        .unwrap()
        .send_keys(warmup.to_str().unwrap())
        .await
        .unwrap();
    until(
        &b,
        30,
        "return document.getElementById('changeset').value.includes('name: warmup')",
        "the file in the box",
    )
    .await;
    b.client
        .find(Locator::Css("form.plan button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(&b, 30, "const p = document.querySelector('pre.planout'); return !!p && p.innerText.includes('echo hi')", "the plan").await;

    // The used link is refused; signing out ends the session.
    b.client.goto(&url).await.unwrap();
    until(
        &b,
        30,
        "return document.body.innerText.includes('Cannot sign in')",
        "a used link refused",
    )
    .await;
    b.client.goto(&format!("{base}/runs")).await.unwrap();
    b.client
        .find(Locator::Css("form.signout button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until(
        &b,
        30,
        "return document.body.innerText.includes('Signed out')",
        "signed out",
    )
    .await;
    b.client.goto(&format!("{base}/runs")).await.unwrap();
    until(
        &b,
        30,
        "return document.body.innerText.includes('Not signed in')",
        "signed out for good",
    )
    .await;

    // A viewer sees the gate but no Approve button, and a POST forged from
    // its page is refused.
    let gated = ctl.detach(&rollout, &[]);
    ctl.wait_state(&gated, "awaiting_approval");
    let viewer = add_operator(&ctl, "vic", "viewer");
    b.client
        .goto(&login_url(&ctl, Some(&viewer)))
        .await
        .unwrap();
    b.client
        .goto(&format!("{base}/runs/{gated}"))
        .await
        .unwrap();
    until(
        &b,
        30,
        "return document.body.innerText.includes('Waiting for approval')",
        "the viewer's run page",
    )
    .await;
    assert!(
        b.client
            .find(Locator::Css("button[data-action=approve]"))
            .await
            .is_err()
    );
    js(
        &b,
        &format!(
            "const f = document.createElement('form'); f.method = 'post'; f.action = '/runs/{gated}/control';
             for (const [k, v] of [['action', 'approve'], ['csrf', document.querySelector('input[name=csrf]').value]]) {{
               const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; f.append(i); }}
             document.body.append(f); f.submit(); return true"
        ),
    )
    .await;
    until(
        &b,
        30,
        "return document.body.innerText.includes('needs the operator role')",
        "the refusal",
    )
    .await;
    assert_eq!(ctl.status(&gated)["state"], "awaiting_approval");
    ctl.modi(&["abort", &gated]).ok();
    b.client.close().await.unwrap();
}
