//! Service-level tests: a real controller in this process (real TLS on a
//! loopback port, a real sled store), real agents in this process, and
//! real gRPC clients, with no binary started.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use modi_controller::cli::Client;
use modi_controller::config::{ADMIN_DEADLINE, CliConfig, ControllerConfig, SHUTDOWN_GRACE};
use modi_controller::init::{InitRequest, init};
use modi_controller::server::Server;
use modi_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

const NOOP: &str = "name: noop\nchanges:\n  - name: n\n    hosts: role=svc\n    rollout: { mode: parallel }\n    apply:\n      - run: \"true\"\n";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

fn apply_request() -> pb::ApplyRequest {
    pb::ApplyRequest {
        sources: Some(pb::Sources {
            root: "noop.yaml".into(),
            files: [("noop.yaml".to_string(), NOOP.to_string())].into(),
        }),
        vars: Default::default(),
        secrets: Default::default(),
    }
}

async fn token(client: &Client) -> pb::CreateTokenResponse {
    client
        .admin()
        .create_token(pb::CreateTokenRequest::default())
        .await
        .unwrap()
        .into_inner()
}

async fn hosts(client: &Client) -> Vec<pb::Host> {
    client
        .admin()
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts
}

fn join_request(
    t: pb::CreateTokenResponse,
    name: String,
    labels: &[(&str, &str)],
    data_dir: std::path::PathBuf,
) -> modi_agent::enroll::JoinRequest {
    modi_agent::enroll::JoinRequest {
        controller: t.controller_url,
        also: Vec::new(),
        token: t.token,
        ca_sha256: t.ca_sha256,
        name: Some(name),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        data_dir,
        work_dir: None,
    }
}

/// 200 concurrent writes of every kind — join tokens, enrolments, applies
/// and the results of those applies from five agents — each answered
/// within its deadline, every one of them durable; then the controller
/// stops on its shutdown signal within its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_writes_of_every_kind_answer_within_their_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let report = init(&InitRequest {
        data_dir: dir.path().join("controller"),
        addresses: vec!["127.0.0.1".into()],
        listen: format!("127.0.0.1:{port}"),
        admin_name: "admin".into(),
        user_cli_config: None,
    })
    .unwrap();
    let config = ControllerConfig::load(&report.controller_config).unwrap();
    let shutdown = CancellationToken::new();
    let server = Server::bind(config, shutdown.clone()).await.unwrap();
    let serving = tokio::spawn(server.run());
    let cli = CliConfig::load(&report.cli_config).unwrap();
    let client = Client::from_config(&cli).unwrap();

    // Five agents in this process, enrolled and connected, to run steps.
    let agents_shutdown = CancellationToken::new();
    for i in 0..5 {
        let t = token(&client).await;
        let req = join_request(
            t,
            format!("svc-{i}"),
            &[("role", "svc")],
            dir.path().join(format!("agent-{i}")),
        );
        let config = modi_agent::enroll::join(req).await.unwrap();
        tokio::spawn(modi_agent::session::run(
            config,
            agents_shutdown.child_token(),
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hosts = hosts(&client).await;
        if hosts.iter().filter(|h| h.connected).count() == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "agents connect: {hosts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Tokens for the enrolments below, made beforehand.
    let mut join_tokens = Vec::new();
    for _ in 0..40 {
        join_tokens.push(token(&client).await);
    }

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200usize {
        let client = client.clone();
        let root = dir.path().to_path_buf();
        let join = (i % 5 == 1).then(|| join_tokens.pop().unwrap());
        calls.spawn(async move {
            let started = Instant::now();
            let what: Result<String, String> = match join {
                Some(t) => {
                    let req =
                        join_request(t, format!("joined-{i}"), &[], root.join(format!("j{i}")));
                    modi_agent::enroll::join(req)
                        .await
                        .map(|_| "enrol".to_string())
                        .map_err(|e| e.to_string())
                }
                None if i % 5 == 2 => client
                    .admin()
                    .apply(apply_request())
                    .await
                    .map(|r| format!("run {}", r.into_inner().run_id))
                    .map_err(|e| e.to_string()),
                None => client
                    .admin()
                    .create_token(pb::CreateTokenRequest::default())
                    .await
                    .map(|_| "token".to_string())
                    .map_err(|e| e.to_string()),
            };
            (what, started.elapsed())
        });
    }
    let mut runs = Vec::new();
    let mut slowest = Duration::ZERO;
    while let Some(done) = calls.join_next().await {
        let (what, took) = done.unwrap();
        let what = what.unwrap_or_else(|e| panic!("a call failed: {e}"));
        slowest = slowest.max(took);
        if let Some(run) = what.strip_prefix("run ") {
            runs.push(run.to_string());
        }
    }
    assert!(slowest < ADMIN_DEADLINE, "slowest call took {slowest:?}");
    assert_eq!(runs.len(), 40);

    // Every run's five results are journaled (the runs queue for the
    // hosts, one run at a time per host).
    let deadline = Instant::now() + Duration::from_secs(60);
    for run in &runs {
        loop {
            let r = client
                .admin()
                .get_run(pb::GetRunRequest {
                    run_id: run.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            let state = r.summary.unwrap_or_default().state();
            if state == pb::RunState::Success {
                break;
            }
            assert!(
                !matches!(
                    state,
                    pb::RunState::PartialFailure | pb::RunState::TotalFailure
                ),
                "run {run}: {state:?}"
            );
            assert!(Instant::now() < deadline, "run {run} ends: {state:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(
        hosts(&client).await.len(),
        5 + 40,
        "every enrolment is recorded"
    );

    // The run reads as typed messages, with nothing of the controller's
    // own types: what any gRPC client sees.
    let r = client
        .admin()
        .get_run(pb::GetRunRequest {
            run_id: runs[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let status = r.status.expect("a typed status");
    assert_eq!(status.state(), pb::RunState::Success);
    let change = &status.changes[0];
    assert_eq!(change.hosts.len(), 5);
    for h in &change.hosts {
        assert_eq!(h.state(), pb::HostState::Success, "{}", h.name);
        let step = &h.steps[0];
        assert_eq!(step.passed, Some(true));
        assert_eq!(step.id.as_ref().unwrap().phase(), pb::Phase::Apply);
    }

    // The standard gRPC health service answers on the same port.
    let health = tonic_health::pb::health_client::HealthClient::new(client.channel())
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // The daemon stops on its shutdown signal within the grace.
    agents_shutdown.cancel();
    shutdown.cancel();
    tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(5), serving)
        .await
        .expect("serve stops within its grace")
        .unwrap()
        .unwrap();
}
