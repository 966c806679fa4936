//! Everything the trust scheme must refuse, each with its error asserted.

use modi_proto::tls::{self, ClientIdentity, Trust};
use modi_proto::v1 as pb;
use modi_tests::{Agent, Controller, eventually};

/// A certificate for `modi://agent/NAME`, self-signed (`issuer: None`) or
/// signed by a CA of the test's own.
fn rogue_identity(name: &str, own_ca: bool) -> ClientIdentity {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        format!("modi://agent/{name}").try_into().unwrap(),
    ));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = if own_ca {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let issuer = rcgen::Issuer::new(ca, ca_key);
        params.signed_by(&key, &issuer).unwrap()
    } else {
        params.self_signed(&key).unwrap()
    };
    ClientIdentity {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Opens an agent session to `ctl` presenting `identity`; the error text.
fn session_error(ctl: &Controller, identity: &ClientIdentity) -> String {
    let ca = std::fs::read_to_string(ctl.data.join("ca.pem")).unwrap();
    let url = format!("https://127.0.0.1:{}", ctl.port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = tls::channel(
            &url,
            Trust::Ca(&ca),
            Some(identity),
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let hello = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello::default())),
        };
        match client.connect(tokio_stream_once(hello)).await {
            Ok(_) => panic!("a session with a rogue certificate was accepted"),
            Err(status) => format!("{status:?}"),
        }
    })
}

fn tokio_stream_once(
    msg: pb::AgentMessage,
) -> impl tonic::codegen::tokio_stream::Stream<Item = pb::AgentMessage> {
    tonic::codegen::tokio_stream::iter(vec![msg])
}

#[test]
fn agent_certificates_not_from_our_ca_are_refused_at_the_handshake() {
    let ctl = Controller::start();
    for (own_ca, why) in [(false, "self-signed"), (true, "from another CA")] {
        let before = ctl.log().matches("TLS handshake refused").count();
        let err = session_error(&ctl, &rogue_identity("web-1", own_ca));
        assert!(
            err.contains("transport") || err.contains("Unavailable") || err.contains("Unknown"),
            "{why}: {err}"
        );
        eventually!(
            5,
            ctl.log().matches("TLS handshake refused").count() > before,
            "the controller logs the refused {why} certificate"
        );
    }
    assert!(
        ctl.log().contains("UnknownIssuer") || ctl.log().contains("unknown issuer"),
        "{}",
        ctl.log()
    );
    assert!(ctl.hosts().is_empty(), "nothing was registered");
}

#[test]
fn join_tokens_work_once_and_expire_and_the_pin_must_match() {
    let ctl = Controller::start();
    let token = ctl.token("10m");
    let first = Agent::join_cmd(&token, "one", &ctl.root.join("a1"), &[]);
    first.ok();
    let again = Agent::join_cmd(&token, "two", &ctl.root.join("a2"), &[]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("already used"), "{again:?}");

    let short = ctl.token("1s");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let late = Agent::join_cmd(&short, "three", &ctl.root.join("a3"), &[]);
    assert_eq!(late.code, 1, "{late:?}");
    assert!(late.stderr.contains("expired"), "{late:?}");

    let mut wrong = ctl.token("10m");
    wrong.ca_sha256 = "00".repeat(32);
    let pinned = Agent::join_cmd(&wrong, "four", &ctl.root.join("a4"), &[]);
    assert_eq!(pinned.code, 3, "{pinned:?}");
    assert!(
        pinned
            .stderr
            .contains("does not match the pinned fingerprint"),
        "{pinned:?}"
    );
    // The token was not spent by the refused attempt: the right pin works.
    wrong.ca_sha256 = token.ca_sha256.clone();
    Agent::join_cmd(&wrong, "four", &ctl.root.join("a4"), &[]).ok();

    let names: Vec<String> = ctl
        .hosts()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["four", "one"]);
}

#[test]
fn the_admin_api_needs_an_admin_certificate() {
    let ctl = Controller::start();
    let agent = Agent::join(&ctl, "web-1", &[]);
    let write = |name: &str, extra: &str| {
        let path = ctl.root.join(name);
        std::fs::write(
            &path,
            format!(
                "controller = \"https://127.0.0.1:{}\"\nca = \"{}\"\n{extra}",
                ctl.port,
                ctl.data.join("ca.pem").display()
            ),
        )
        .unwrap();
        path
    };
    let modi = |config: &std::path::Path, args: &[&str]| {
        modi_tests::run(
            std::process::Command::new(modi_tests::bin("modi"))
                .arg("--cli-config")
                .arg(config)
                .args(args),
        )
    };

    let none = write("cli-nocert.toml", "");
    let out = modi(&none, &["hosts"]);
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr
            .contains("needs a client certificate with the admin role"),
        "{out:?}"
    );

    let as_agent = write(
        "cli-agent.toml",
        &format!(
            "cert = \"{}\"\nkey = \"{}\"\n",
            agent.dir.join("agent.pem").display(),
            agent.dir.join("agent.key").display()
        ),
    );
    let out = modi(&as_agent, &["token", "create"]);
    assert_eq!(out.code, 4, "refused: {out:?}");
    assert!(
        out.stderr.contains("certificate is for agent \"web-1\""),
        "{out:?}"
    );
    assert!(out.stderr.contains("admin role"), "{out:?}");

    // The real admin config still works.
    ctl.modi(&["hosts"]).ok();
}

#[test]
fn an_agent_key_is_private_and_its_files_are_complete() {
    use std::os::unix::fs::PermissionsExt;
    let ctl = Controller::start();
    let agent = Agent::enrol(&ctl, "keyed", &[]);
    let mode = std::fs::metadata(agent.dir.join("agent.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    for f in ["agent.pem", "ca.pem", "agent.toml"] {
        assert!(agent.dir.join(f).is_file(), "{f}");
    }
    let ca = std::fs::read(agent.dir.join("ca.pem")).unwrap();
    assert_eq!(ca, std::fs::read(ctl.data.join("ca.pem")).unwrap());
}

#[test]
fn a_revoked_agent_is_dropped_and_refused_from_then_on() {
    let ctl = Controller::start();
    let agent = Agent::join(&ctl, "stolen", &[]);
    ctl.modi(&["agents", "revoke", "stolen"]).ok();
    eventually!(10, !ctl.connected("stolen"), "the live session is dropped");
    let host = ctl
        .hosts()
        .into_iter()
        .find(|h| h["name"] == "stolen")
        .unwrap();
    assert_eq!(host["revoked"], true);
    // Its reconnects are refused.
    eventually!(
        20,
        agent.log().contains("stolen\" was revoked"),
        "it is refused:\n{}",
        agent.log()
    );
    assert!(!ctl.connected("stolen"));
    // Its certificate does not open a session by any other route either.
    let identity = ClientIdentity {
        cert_pem: std::fs::read_to_string(agent.dir.join("agent.pem")).unwrap(),
        key_pem: std::fs::read_to_string(agent.dir.join("agent.key")).unwrap(),
    };
    let err = session_error(&ctl, &identity);
    assert!(!err.is_empty());
    // The name can be enrolled again with a new token (a rebuilt host).
    let token = ctl.token("10m");
    Agent::join_cmd(&token, "stolen", &ctl.root.join("rebuilt"), &[]).ok();
}
