//! The web view over real HTTPS (curl): sign-in with a one-time link,
//! the session cookie's attributes, CSRF and role checks, the audit, sign
//! out. The browser tests are in `browser.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use modi_tests::{Agent, Controller, free_port};

use crate::trust::{add_operator, modi_as};

/// A controller with its web view on a free loopback port.
pub(crate) fn web_controller() -> (Controller, u16) {
    let port = free_port();
    let ctl = Controller::start_with(&format!("web_listen = \"127.0.0.1:{port}\"\n"));
    (ctl, port)
}

/// `modi ui` as the operator of `config`: the one-time link.
pub(crate) fn login_url(ctl: &Controller, config: Option<&Path>) -> String {
    let out = match config {
        Some(c) => modi_as(ctl, c, &["--output", "json", "ui"]),
        None => ctl.modi(&["--output", "json", "ui"]),
    };
    out.json()["url"].as_str().expect("a url").to_string()
}

/// A curl with its own cookie jar, trusting the controller's CA.
struct Browser {
    jar: PathBuf,
    ca: PathBuf,
}

struct Page {
    status: u16,
    headers: String,
    body: String,
}

impl Browser {
    fn new(ctl: &Controller, name: &str) -> Browser {
        Browser {
            jar: ctl.root.join(format!("{name}.cookies")),
            ca: ctl.data.join("ca.pem"),
        }
    }

    fn request(&self, url: &str, extra: &[&str]) -> Page {
        let headers = self.jar.with_extension("headers");
        let out = Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(&self.ca)
            .arg("-b")
            .arg(&self.jar)
            .arg("-c")
            .arg(&self.jar)
            .arg("-D")
            .arg(&headers)
            .args(["-o", "-", "-w", "\n%{http_code}"])
            .args(extra)
            .arg(url)
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "curl {url}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("a status line");
        Page {
            status: code.trim().parse().expect("a status"),
            headers: std::fs::read_to_string(&headers).unwrap_or_default(),
            body: body.to_string(),
        }
    }

    fn get(&self, url: &str) -> Page {
        self.request(url, &[])
    }

    fn post(&self, url: &str, form: &[(&str, &str)], extra: &[&str]) -> Page {
        let mut args: Vec<String> = Vec::new();
        for (k, v) in form {
            args.push("--data-urlencode".into());
            args.push(format!("{k}={v}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.request(url, &args)
    }
}

/// The session's form token, from a page's sign-out form.
fn csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a form token") + 19;
    page[at..].split('"').next().unwrap().to_string()
}

#[test]
fn sign_in_once_forms_carry_their_token_roles_hold_and_sign_out_ends_it() {
    let (ctl, port) = web_controller();
    let base = format!("https://127.0.0.1:{port}");
    let _agent = Agent::join(&ctl, "w1", &[]);
    let file = ctl.changeset(
        "gated.yaml",
        "name: gated\nchanges:\n  - name: c\n    hosts: all\n    approve: once\n    apply:\n      - run: touch done\n",
    );
    let run = ctl.detach(&file, &[]);
    ctl.wait_state(&run, "awaiting_approval");

    // Not signed in: told how.
    let anon = Browser::new(&ctl, "anon");
    let page = anon.get(&format!("{base}/runs"));
    assert_eq!(page.status, 401, "{}", page.body);
    assert!(page.body.contains("modi ui"), "{}", page.body);

    // The link signs in once, with a strict cookie.
    let url = login_url(&ctl, None);
    assert!(
        url.starts_with(&format!("https://127.0.0.1:{port}/login?token=")),
        "{url}"
    );
    let admin = Browser::new(&ctl, "admin");
    let page = admin.get(&url);
    assert_eq!(page.status, 303, "{}", page.headers);
    let cookie = page
        .headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a cookie");
    for attr in ["HttpOnly", "Secure", "SameSite=Strict"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let again = Browser::new(&ctl, "thief").get(&url);
    assert_eq!(again.status, 401, "a used link is refused: {}", again.body);
    assert!(again.body.contains("works once"), "{}", again.body);

    let runs = admin.get(&format!("{base}/runs"));
    assert_eq!(runs.status, 200);
    assert!(runs.body.contains(&format!("run {run}")), "{}", runs.body);
    assert!(
        runs.headers
            .contains("content-security-policy: default-src 'self'"),
        "{}",
        runs.headers
    );
    let page = admin.get(&format!("{base}/runs/{run}"));
    assert!(
        page.body.contains("data-action=\"approve\""),
        "{}",
        page.body
    );
    let token = csrf(&page.body);

    // A POST without the session's form token, or from another site, does
    // nothing.
    let control = format!("{base}/runs/{run}/control");
    let forged = admin.post(&control, &[("action", "approve")], &[]);
    assert_eq!(forged.status, 403, "{}", forged.body);
    let cross = admin.post(
        &control,
        &[("action", "approve"), ("csrf", &token)],
        &["-H", "Sec-Fetch-Site: cross-site"],
    );
    assert_eq!(cross.status, 403, "{}", cross.body);
    assert_eq!(ctl.status(&run)["state"], "awaiting_approval");

    // A viewer sees the run but no buttons, and its POST is refused and
    // audited.
    let viewer_config = add_operator(&ctl, "vera", "viewer");
    let viewer = Browser::new(&ctl, "vera");
    viewer.get(&login_url(&ctl, Some(&viewer_config)));
    let page = viewer.get(&format!("{base}/runs/{run}"));
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Waiting for approval"), "{}", page.body);
    assert!(
        !page.body.contains("data-action=\"approve\""),
        "{}",
        page.body
    );
    let refused = viewer.post(
        &control,
        &[("action", "approve"), ("csrf", &csrf(&page.body))],
        &[],
    );
    assert_eq!(refused.status, 403, "{}", refused.body);
    assert!(
        refused.body.contains("needs the operator role"),
        "{}",
        refused.body
    );
    assert_eq!(ctl.status(&run)["state"], "awaiting_approval");

    // The operator's approve goes through, under its name, in the audit.
    let ok = admin.post(&control, &[("action", "approve"), ("csrf", &token)], &[]);
    assert_eq!(ok.status, 303, "{}", ok.body);
    let status = ctl.wait_final(&run);
    assert_eq!(status["state"], "success", "{status}");
    assert_eq!(status["decisions"][0]["by"], "admin", "{status}");
    let audit = ctl.modi(&["audit"]).stdout;
    assert!(
        audit
            .lines()
            .any(|l| l.contains("vera") && l.contains("Control") && l.contains("PermissionDenied")),
        "{audit}"
    );
    assert!(
        audit.lines().any(|l| l.contains("admin")
            && l.contains("Control")
            && l.contains("(web)")
            && l.contains("ok")),
        "{audit}"
    );

    // Hosts and plan read through the same calls.
    let hosts = admin.get(&format!("{base}/hosts?selector=all"));
    assert!(
        hosts.body.contains("w1") && hosts.body.contains("1 connected"),
        "{}",
        hosts.body
    );
    let planned = admin.post(
        &format!("{base}/plan"),
        &[
            ("csrf", &token),
            ("changeset", "name: p\nchanges:\n  - name: c\n    hosts: all\n    apply:\n      - run: echo hi\n"),
        ],
        &[],
    );
    assert!(planned.body.contains("echo hi"), "{}", planned.body);

    // Revoking the operator ends its session at once.
    ctl.modi(&["operator", "revoke", "vera"]).ok();
    assert_eq!(viewer.get(&format!("{base}/runs")).status, 401);

    // Signing out ends the session.
    let out = admin.post(&format!("{base}/logout"), &[("csrf", &token)], &[]);
    assert_eq!(out.status, 200, "{}", out.body);
    assert_eq!(admin.get(&format!("{base}/runs")).status, 401);
}

#[test]
fn modi_ui_says_how_to_turn_the_web_view_on() {
    let ctl = Controller::start();
    let out = ctl.modi(&["ui"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("web_listen"), "{out:?}");
}
