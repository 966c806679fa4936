//! The fleet on tokio's paused clock, with a real store on a temp dir and
//! no network: sessions are the handles `connect` returns.

use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;

use super::*;
use crate::rollout::Phase;
use crate::spec::StepAction;

/// A fleet on a fresh store, on a clock driven by tokio's.
struct Rig {
    fleet: Fleet,
    store: Store,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new(lost_after: Duration) -> Rig {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db")).expect("open the store");
        Rig::on(store, dir, lost_after)
    }

    fn on(store: Store, dir: tempfile::TempDir, lost_after: Duration) -> Rig {
        let shutdown = CancellationToken::new();
        let fleet = Fleet::new(
            store.clone(),
            lost_after,
            Clock::tokio(),
            TaskTracker::new(),
            shutdown.clone(),
        );
        Rig {
            fleet,
            store,
            shutdown,
            _dir: dir,
        }
    }

    /// A run's ports, registered; its inbox.
    fn run(&self, run: u64) -> mpsc::Receiver<DriverMsg> {
        let (inbox, rx) = mpsc::channel(16);
        let (watch, _) = broadcast::channel(16);
        self.fleet.register_run(
            run,
            RunPorts {
                inbox,
                watch,
                ready: Default::default(),
            },
        );
        rx
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs `f`, which waits for the store's writer thread, with tokio's
/// paused clock held still. A paused runtime with nothing to do jumps to
/// its next timer; while the writer thread works, that would be the
/// store's write deadline. A running blocking task stops the jump.
async fn clock_held<F: std::future::Future>(f: F) -> F::Output {
    let (release, held) = std::sync::mpsc::channel::<()>();
    let holder = tokio::task::spawn_blocking(move || {
        let _ = held.recv();
    });
    let out = f.await;
    drop(release);
    holder.await.expect("the holder ends");
    out
}

/// Lets every task that is ready run.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

fn step() -> Arc<Step> {
    Arc::new(Step {
        action: StepAction::Run {
            command: "true".into(),
        },
        timeout: None,
        env: BTreeMap::new(),
        cwd: None,
        user: None,
        stdin: None,
        expect: None,
        location: Default::default(),
        secrets: Default::default(),
    })
}

fn apply(host: usize) -> DispatchId {
    DispatchId {
        change: 0,
        host,
        phase: Phase::Apply,
        step: 0,
        attempt: 0,
    }
}

const RUN: RunRef = RunRef {
    id: 7,
    stamp: 1_764_000_000_000,
};

#[test]
fn full_ids_round_trip() {
    for phase in Phase::ALL {
        let id = DispatchId {
            change: 3,
            host: 17,
            phase,
            step: 2,
            attempt: 1,
        };
        assert_eq!(DispatchId::parse(&id.to_string()), Some(id));
        let full = full_id(
            RunRef {
                id: 42,
                stamp: 1_764_000_000_000,
            },
            &id,
        );
        assert_eq!(full, format!("r42-1764000000000.{id}"));
        assert_eq!(parse_full_id(&full), Some((42, id)));
    }
    assert_eq!(DispatchId::parse("c0.h0.apply.0"), None);
    assert_eq!(DispatchId::parse("c0.h0.nope.0.a0"), None);
    assert_eq!(parse_full_id("r7.c0.h0.apply.0.a0"), None);
}

/// After a restart, a host that was connected to the previous controller
/// (however long ago it was last heard from) is waited for during the
/// startup grace, and not after; one that had left is not waited for.
#[tokio::test(start_paused = true)]
async fn restart_grace_waits_for_hosts_that_were_connected() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("db")).expect("open the store");
    let hours_ago = Clock::tokio().now() - 3 * 3600 * 1000;
    for (name, connected) in [("web1", true), ("web2", false)] {
        clock_held(store.update_host(name, move |_| HostRecord {
            name: name.into(),
            enrolled_at: hours_ago,
            last_seen: hours_ago,
            connected,
            ..HostRecord::default()
        }))
        .await
        .expect("write the host");
    }
    let rig = Rig::on(store, dir, Duration::from_secs(60));
    let start = Instant::now();

    assert!(rig.fleet.expected_back("web1"));
    assert!(!rig.fleet.expected_back("web2"), "it had left");
    assert!(!rig.fleet.expected_back("db1"), "never seen");

    tokio::time::sleep_until(start + STARTUP_GRACE - Duration::from_millis(1)).await;
    assert!(rig.fleet.expected_back("web1"), "still within the grace");
    tokio::time::sleep_until(start + STARTUP_GRACE).await;
    assert!(!rig.fleet.expected_back("web1"), "the grace is over");
    assert!(!rig.fleet.is_connected("web1"));
}

/// A host that connected to this controller is not waited for once it
/// leaves, even during the grace.
#[tokio::test(start_paused = true)]
async fn restart_grace_ends_for_a_host_once_it_connects() {
    let rig = Rig::new(Duration::from_secs(60));
    clock_held(rig.store.update_host("web1", |_| HostRecord {
        name: "web1".into(),
        connected: true,
        ..HostRecord::default()
    }))
    .await
    .expect("write the host");
    assert!(rig.fleet.expected_back("web1"));
    let session = clock_held(rig.fleet.connect("web1", &Hello::default()))
        .await
        .expect("connect");
    clock_held(rig.fleet.disconnect("web1", session.id)).await;
    assert!(!rig.fleet.expected_back("web1"));
    let host = rig.store.host("web1").expect("read").expect("the host");
    assert!(!host.connected);
}

/// A step in flight on an agent that goes away is reported `lost` to its
/// run after `lost_after`, not before; the agent, back still running it,
/// is told to cancel it, and its result then goes to the run as late.
#[tokio::test(start_paused = true)]
async fn a_step_on_an_agent_away_past_lost_after_is_lost_and_its_result_late() {
    let lost_after = Duration::from_secs(60);
    let rig = Rig::new(lost_after);
    let mut inbox = rig.run(RUN.id);
    let id = apply(0);
    let full = full_id(RUN, &id);

    let mut session = clock_held(rig.fleet.connect("web1", &Hello::default()))
        .await
        .expect("connect");
    rig.fleet
        .send_step(RUN, id, "web1", step(), Some(Default::default()));
    match session.outbound.try_recv() {
        Ok(ToAgent::Run { run, id: sent, .. }) => assert_eq!((run, sent), (RUN, id)),
        other => panic!("expected the step, got {other:?}"),
    }

    let away = Instant::now();
    clock_held(rig.fleet.disconnect("web1", session.id)).await;
    assert!(session.token.is_cancelled());
    assert_eq!(Instant::now(), away, "the clock held still");

    tokio::time::sleep_until(away + lost_after - Duration::from_millis(1)).await;
    settle().await;
    assert!(inbox.try_recv().is_err(), "lost before lost_after");

    tokio::time::sleep_until(away + lost_after).await;
    settle().await;
    match inbox.try_recv() {
        Ok(DriverMsg::Result {
            id: lost,
            result,
            agent: None,
        }) => {
            assert_eq!(lost, id);
            assert_eq!(result.termination, Some(Termination::Lost));
        }
        other => panic!("expected the step lost, got {other:?}"),
    }

    // Back, still running it: it is no longer in flight, so it is
    // cancelled and not sent again.
    let hello = Hello {
        running: vec![full.clone()],
        ..Hello::default()
    };
    let mut session = clock_held(rig.fleet.connect("web1", &hello))
        .await
        .expect("reconnect");
    assert_eq!(
        session.outbound.try_recv(),
        Ok(ToAgent::Cancel(full.clone()))
    );
    assert!(session.outbound.try_recv().is_err());

    let result = StepResult {
        termination: Some(Termination::Cancelled),
        ..StepResult::default()
    };
    rig.fleet
        .result(
            "web1",
            AgentResult {
                full_id: full.clone(),
                result: result.clone(),
            },
        )
        .await;
    match inbox.try_recv() {
        Ok(DriverMsg::Late {
            id: late,
            result: got,
            agent,
        }) => assert_eq!((late, got, agent.as_str()), (id, result, "web1")),
        other => panic!("expected a late result, got {other:?}"),
    }
    // Nothing is acked before the run has journaled it.
    assert!(session.outbound.try_recv().is_err());
}

/// An agent back within `lost_after` loses nothing: it is sent its step
/// again, and its result goes to the run as a normal result.
#[tokio::test(start_paused = true)]
async fn an_agent_back_within_lost_after_loses_nothing() {
    let lost_after = Duration::from_secs(60);
    let rig = Rig::new(lost_after);
    let mut inbox = rig.run(RUN.id);
    let id = apply(0);
    let full = full_id(RUN, &id);
    let session = clock_held(rig.fleet.connect("web1", &Hello::default()))
        .await
        .expect("connect");
    rig.fleet
        .send_step(RUN, id, "web1", step(), Some(Default::default()));
    clock_held(rig.fleet.disconnect("web1", session.id)).await;
    tokio::time::sleep(lost_after / 2).await;
    let mut session = clock_held(rig.fleet.connect("web1", &Hello::default()))
        .await
        .expect("reconnect");
    assert!(
        matches!(session.outbound.try_recv(), Ok(ToAgent::Run { id: again, .. }) if again == id)
    );

    tokio::time::sleep(lost_after * 2).await;
    settle().await;
    assert!(inbox.try_recv().is_err(), "nothing lost");

    rig.fleet
        .result(
            "web1",
            AgentResult {
                full_id: full.clone(),
                result: StepResult::default(),
            },
        )
        .await;
    assert!(matches!(
        inbox.try_recv(),
        Ok(DriverMsg::Result { id: done, agent: Some(a), .. }) if done == id && a == "web1"
    ));
    // Durable: acked.
    rig.fleet.complete(Some("web1"), &full);
    assert_eq!(session.outbound.try_recv(), Ok(ToAgent::Ack(full)));
}

/// One host, one run at a time: a second run waits until the first
/// releases the host or ends.
#[tokio::test(start_paused = true)]
async fn a_host_is_held_by_one_run_at_a_time() {
    let rig = Rig::new(Duration::from_secs(60));
    let _one = rig.run(1);
    let _two = rig.run(2);

    assert!(rig.fleet.hold("web1", 1));
    assert!(rig.fleet.hold("web1", 1), "it may hold it again");
    assert!(!rig.fleet.hold("web1", 2));
    assert!(rig.fleet.hold("web2", 2), "another host is free");

    rig.fleet.release("web1", 2);
    assert!(!rig.fleet.hold("web1", 2), "only its holder releases it");
    rig.fleet.release("web1", 1);
    assert!(rig.fleet.hold("web1", 2));
    assert!(!rig.fleet.hold("web1", 1));

    // A run that ends lets go of every host it held.
    assert!(rig.fleet.hold("web3", 2));
    rig.fleet.unregister_run(2);
    assert!(rig.fleet.run_ports(2).is_none());
    assert!(rig.fleet.hold("web1", 1));
    assert!(rig.fleet.hold("web2", 1));
    assert!(rig.fleet.hold("web3", 1));
}

/// A step whose secrets its run lost in a restart is in flight but goes
/// nowhere, not even to an agent that reconnects running it (which is not
/// told to cancel it), until its run is given them; then it goes out with
/// their values.
#[tokio::test(start_paused = true)]
async fn a_step_waiting_for_its_secrets_is_sent_only_once_they_are_given() {
    let rig = Rig::new(Duration::from_secs(60));
    let _inbox = rig.run(RUN.id);
    let id = apply(0);
    let full = full_id(RUN, &id);
    let mut session = clock_held(rig.fleet.connect("web1", &Hello::default()))
        .await
        .expect("connect");
    rig.fleet.send_step(RUN, id, "web1", step(), None);
    assert!(
        session.outbound.try_recv().is_err(),
        "sent without its secrets"
    );

    let hello = Hello {
        running: vec![full.clone()],
        ..Hello::default()
    };
    let mut session = clock_held(rig.fleet.connect("web1", &hello))
        .await
        .expect("reconnect");
    assert!(
        session.outbound.try_recv().is_err(),
        "neither resent without its secrets nor cancelled"
    );

    let secrets = crate::secret::from_request([("pw".into(), "hunter2".into())].into()).unwrap();
    rig.fleet.supply(&full, Arc::new(secrets));
    match session.outbound.try_recv() {
        Ok(ToAgent::Run {
            id: sent, secrets, ..
        }) => {
            assert_eq!(sent, id);
            assert_eq!(secrets["pw"].expose(), "hunter2");
        }
        other => panic!("expected the step with its secrets, got {other:?}"),
    }
}
