//! The fleet simulator: N agent sessions in one process, against a real
//! `modi serve`.
//!
//! Every simulated agent is enrolled for real (its own ECDSA P-256 key, a
//! CSR, the `Enroll` RPC with a join token) and holds its own mutual-TLS
//! connection with its own certificate. It speaks the agent protocol as
//! `modi-agent` does (`agent/src/session.rs`): `Hello` first (with the
//! dispatches it is running), then the results the controller has not
//! acked, then heartbeats; a `RunStep` for an id it has a result for is
//! answered with that result again, one it is running is ignored, a new
//! one is recorded before it runs; a result is kept until acked; a lost
//! session is retried with the agent's own jittered exponential backoff.
//!
//! Two things differ, on purpose: the journal is in memory (the simulator
//! is never crashed, so the result journal's crash semantics are not
//! exercised here; the e2e suites test the real one), and a step is not a
//! process: a stand-in waits `step_latency` and fails with probability
//! `fail_rate`, so what is measured is the controller, not process
//! spawning. The simulator also counts what the real agent cannot: every
//! time a dispatch id is run (a second run of one id is a broken
//! exactly-once rule).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modi_agent::config::{BACKOFF_MAX, BACKOFF_MIN, CONNECT_TIMEOUT};
use modi_controller::cli::Client;
use modi_proto::identity::{self, Role};
use modi_proto::tls::{self, ClientIdentity, Trust};
use modi_proto::v1 as pb;
use pb::agent_message::Msg as Up;
use pb::agent_service_client::AgentServiceClient;
use pb::controller_message::Msg as Down;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How many step events wait for the session (as in the agent).
const INTERNAL_QUEUE: usize = 1024;
/// How many messages wait to go up the stream (as in the agent).
const OUTBOUND_QUEUE: usize = 1024;

/// How the simulated agents behave.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long a step "runs".
    pub step_latency: Duration,
    /// Probability in [0, 1] that a step exits 1 instead of 0.
    pub fail_rate: f64,
    /// How often each agent sends a heartbeat.
    pub heartbeat: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            step_latency: Duration::ZERO,
            fail_rate: 0.0,
            heartbeat: Duration::from_secs(modi_agent::config::DEFAULT_HEARTBEAT_SECS),
        }
    }
}

/// What the simulated fleet did, counted as it happened.
#[derive(Debug, Default)]
pub struct Stats {
    /// Agents with a session established now.
    pub connected: AtomicU64,
    /// Sessions established, in all.
    pub sessions: AtomicU64,
    /// Session attempts that failed (connection refused, handshake
    /// timed out, ...), retried with backoff.
    pub failed_attempts: AtomicU64,
    /// Agents the controller refused for good (they stop).
    pub refused: AtomicU64,
    /// Steps run.
    pub executed: AtomicU64,
    /// Steps run although their dispatch id had run before: must stay 0.
    pub duplicates: AtomicU64,
    /// Results sent up (first reports and re-reports).
    pub results_sent: AtomicU64,
    /// `RunStep`s answered with a result recorded before.
    pub rereported: AtomicU64,
    /// Acks received.
    pub acks: AtomicU64,
    /// The last error a session attempt met.
    pub last_error: Mutex<Option<String>>,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

impl Stats {
    /// The counters as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "connected": get(&self.connected),
            "sessions": get(&self.sessions),
            "failed_attempts": get(&self.failed_attempts),
            "refused": get(&self.refused),
            "executed": get(&self.executed),
            "duplicates": get(&self.duplicates),
            "results_sent": get(&self.results_sent),
            "rereported": get(&self.rereported),
            "acks": get(&self.acks),
        })
    }
}

/// One enrolled agent: its name and the key and certificate it got.
#[derive(Clone)]
pub struct Credentials {
    /// Its name (the one in its certificate).
    pub name: String,
    /// Its certificate and key.
    pub identity: ClientIdentity,
}

/// Enrols `names` through the real `Enroll` RPC with `token` (good for as
/// many uses), at most `concurrency` at a time; each gets its own P-256
/// key. Checks the answer as `modi-agent join` does (the CA against the
/// pin, the certificate's role and name). Returns the CA (PEM) and the
/// credentials, in the order of `names`.
pub async fn enrol(
    url: &str,
    ca_sha256: &str,
    token: &str,
    names: &[String],
    labels: &BTreeMap<String, String>,
    concurrency: usize,
) -> anyhow::Result<(String, Vec<Credentials>)> {
    let pin = tls::normalize_fingerprint(ca_sha256);
    // A few connections, as many hosts joining at once would open many.
    let channels: Vec<Channel> = (0..concurrency.clamp(1, 16))
        .map(|_| tls::channel(url, Trust::Pin(&pin), None, CONNECT_TIMEOUT))
        .collect::<Result<_, _>>()?;
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, name) in names.iter().enumerate() {
        let permit = gate.clone().acquire_owned().await?;
        let channel = channels[i % channels.len()].clone();
        let (name, token, labels) = (name.clone(), token.to_string(), labels.clone());
        tasks.spawn(async move {
            let _permit = permit;
            let out = enrol_one(channel, &name, &token, &labels).await;
            (i, out)
        });
    }
    let mut out: Vec<Option<(String, Credentials)>> = vec![None; names.len()];
    while let Some(done) = tasks.join_next().await {
        let (i, got) = done?;
        out[i] = Some(got?);
    }
    let mut ca = None;
    let mut creds = Vec::with_capacity(names.len());
    for (ca_pem, c) in out.into_iter().flatten() {
        let der = tls::certs_from_pem("CA certificate", &ca_pem)?.remove(0);
        anyhow::ensure!(
            identity::sha256_hex(&der) == pin,
            "the CA certificate sent does not match the pin"
        );
        ca.get_or_insert(ca_pem);
        creds.push(c);
    }
    let ca = ca.ok_or_else(|| anyhow::anyhow!("no agent to enrol"))?;
    Ok((ca, creds))
}

async fn enrol_one(
    channel: Channel,
    name: &str,
    token: &str,
    labels: &BTreeMap<String, String>,
) -> anyhow::Result<(String, Credentials)> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let csr = params.serialize_request(&key)?.pem()?;
    let request = pb::EnrollRequest {
        token: token.to_string(),
        csr_pem: csr,
        name: name.to_string(),
        labels: labels.clone().into_iter().collect(),
    };
    // A few tries: a join storm may outrun the controller's handshakes.
    let mut tries = 0;
    let answer = loop {
        tries += 1;
        match AgentServiceClient::new(channel.clone())
            .enroll(request.clone())
            .await
        {
            Ok(r) => break r.into_inner(),
            Err(s)
                if tries < 5
                    && matches!(
                        s.code(),
                        tonic::Code::Unavailable
                            | tonic::Code::Unknown
                            | tonic::Code::DeadlineExceeded
                    ) =>
            {
                tokio::time::sleep(Duration::from_millis(200 * tries)).await;
            }
            Err(s) => anyhow::bail!("enrolling {name}: {}", s.message()),
        }
    };
    let cert = tls::certs_from_pem("agent certificate", &answer.cert_pem)?;
    let id = identity::expect_role(&cert[0], Role::Agent)?;
    anyhow::ensure!(
        id.name == name,
        "certificate issued for {:?}, asked for {name:?}",
        id.name
    );
    Ok((
        answer.ca_pem,
        Credentials {
            name: name.to_string(),
            identity: ClientIdentity {
                cert_pem: answer.cert_pem,
                key_pem: key.serialize_pem(),
            },
        },
    ))
}

/// A dispatch id in the agent's (in-memory) journal.
enum Entry {
    /// Running; cancelling the token stops it.
    Running(CancellationToken),
    /// Finished, result not acked yet.
    Done(pb::StepResult),
}

/// One simulated agent.
struct SimAgent {
    name: String,
    opts: Arc<Options>,
    stats: Arc<Stats>,
    journal: Arc<Mutex<HashMap<String, Entry>>>,
    /// Every dispatch id ever run here (the exactly-once audit).
    ran: Mutex<HashSet<String>>,
    /// A session is established now.
    up: AtomicBool,
}

/// How a session attempt ended badly.
enum Failed {
    Retry(String),
    Refused(String),
}

impl SimAgent {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.journal.lock().expect("sim journal lock")
    }

    /// The agent's connection loop (`modi_agent::session::run`).
    async fn run(
        self: Arc<Self>,
        url: Arc<str>,
        ca: Arc<str>,
        identity: ClientIdentity,
        shutdown: CancellationToken,
    ) {
        let channel = match tls::channel(&url, Trust::Ca(&ca), Some(&identity), CONNECT_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                *self.stats.last_error.lock().expect("lock") = Some(e.to_string());
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        drop(identity);
        let mut client = AgentServiceClient::new(channel);
        let (internal_tx, mut internal_rx) = mpsc::channel(INTERNAL_QUEUE);
        let mut backoff = BACKOFF_MIN;
        while !shutdown.is_cancelled() {
            let attempt = tokio::select! {
                a = self.session(&mut client, &internal_tx, &mut internal_rx, &shutdown) => a,
                _ = shutdown.cancelled() => break,
            };
            match attempt {
                Ok(()) => backoff = BACKOFF_MIN,
                Err(Failed::Retry(e)) => {
                    self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
                    *self.stats.last_error.lock().expect("lock") = Some(e);
                }
                Err(Failed::Refused(e)) => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    *self.stats.last_error.lock().expect("lock") = Some(e);
                    break;
                }
            }
            // Full jitter on the upper half, as the agent does.
            let delay = rand::rng().random_range(backoff / 2..=backoff);
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = shutdown.cancelled() => break,
                    // Results are journaled; they go with the next session.
                    Some(_) = internal_rx.recv() => {}
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One session: `Ok` when it was established and later ended.
    async fn session(
        &self,
        client: &mut AgentServiceClient<Channel>,
        internal_tx: &mpsc::Sender<pb::StepResult>,
        internal_rx: &mut mpsc::Receiver<pb::StepResult>,
        shutdown: &CancellationToken,
    ) -> Result<(), Failed> {
        let (out_tx, out_rx) = mpsc::channel::<pb::AgentMessage>(OUTBOUND_QUEUE);
        let (running, mut pending): (Vec<String>, Vec<pb::StepResult>) = {
            let journal = self.lock();
            let mut running = Vec::new();
            let mut pending = Vec::new();
            for (id, e) in journal.iter() {
                match e {
                    Entry::Running(_) => running.push(id.clone()),
                    Entry::Done(r) => pending.push(r.clone()),
                }
            }
            (running, pending)
        };
        pending.sort_by(|a, b| a.dispatch_id.cmp(&b.dispatch_id));
        let facts = [
            ("hostname", self.name.as_str()),
            ("os", "simulated"),
            ("arch", std::env::consts::ARCH),
            ("kernel", "sim"),
            ("cpus", "1"),
            ("memory_bytes", "1073741824"),
            ("agent_version", modi_agent::facts::VERSION),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let hello = pb::Hello {
            agent_version: modi_agent::facts::VERSION.into(),
            labels: Default::default(),
            facts,
            running,
            heartbeat_interval_ms: self.opts.heartbeat.as_millis() as u64,
        };
        let _ = out_tx.try_send(pb::AgentMessage {
            msg: Some(Up::Hello(hello)),
        });
        let mut inbound = client
            .connect(ReceiverStream::new(out_rx))
            .await
            .map_err(|s| {
                if s.code() == tonic::Code::PermissionDenied {
                    Failed::Refused(format!("{}: {}", self.name, s.message()))
                } else {
                    Failed::Retry(format!("{}: {}", self.name, s.message()))
                }
            })?
            .into_inner();
        let _up = Connected::new(self);
        for result in pending {
            self.stats.results_sent.fetch_add(1, Ordering::Relaxed);
            if out_tx
                .send(pb::AgentMessage {
                    msg: Some(Up::Result(result)),
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        let up = |msg: Up| pb::AgentMessage { msg: Some(msg) };
        let mut results: std::collections::VecDeque<pb::StepResult> = Default::default();
        let mut heartbeat = tokio::time::interval(self.opts.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => results.extend(self.handle(msg, internal_tx)),
                    Ok(None) | Err(_) => return Ok(()),
                },
                Some(result) = internal_rx.recv() => results.push_back(result),
                permit = out_tx.reserve(), if !results.is_empty() => match permit {
                    Ok(permit) => {
                        let result = results.pop_front().expect("a result is waiting");
                        self.stats.results_sent.fetch_add(1, Ordering::Relaxed);
                        permit.send(up(Up::Result(result)));
                    }
                    Err(_) => return Ok(()),
                },
                _ = heartbeat.tick() => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    let _ = out_tx.try_send(up(Up::Heartbeat(pb::Heartbeat { sent_at_ms: now })));
                }
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Acts on one message from the controller; a result to report now.
    fn handle(
        &self,
        msg: pb::ControllerMessage,
        internal: &mpsc::Sender<pb::StepResult>,
    ) -> Option<pb::StepResult> {
        match msg.msg? {
            Down::Run(step) => self.start(step, internal),
            Down::Cancel(c) => {
                if let Some(Entry::Running(token)) = self.lock().get(&c.dispatch_id) {
                    token.cancel();
                }
                None
            }
            Down::Ack(ack) => {
                self.stats.acks.fetch_add(1, Ordering::Relaxed);
                let mut journal = self.lock();
                if matches!(journal.get(&ack.dispatch_id), Some(Entry::Done(_))) {
                    journal.remove(&ack.dispatch_id);
                }
                None
            }
            // Certificates outlive any simulation.
            Down::Renewed(_) => None,
            // A simulated agent has no files (`plan --diff` is not part of
            // the simulation): the controller's read times out, as for an
            // agent too old to answer.
            Down::ReadFile(_) => None,
        }
    }

    /// Starts a step unless its id is known (`Agent::start`).
    fn start(
        &self,
        step: pb::RunStep,
        internal: &mpsc::Sender<pb::StepResult>,
    ) -> Option<pb::StepResult> {
        let id = step.dispatch_id;
        if !modi_agent::journal::valid_id(&id) {
            return None;
        }
        let token = {
            let mut journal = self.lock();
            match journal.get(&id) {
                Some(Entry::Done(r)) => {
                    self.stats.rereported.fetch_add(1, Ordering::Relaxed);
                    return Some(r.clone());
                }
                Some(Entry::Running(_)) => return None,
                None => {}
            }
            let token = CancellationToken::new();
            journal.insert(id.clone(), Entry::Running(token.clone()));
            token
        };
        if !self.ran.lock().expect("ran lock").insert(id.clone()) {
            self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.executed.fetch_add(1, Ordering::Relaxed);
        let (latency, fail_rate) = (self.opts.step_latency, self.opts.fail_rate);
        let internal = internal.clone();
        let journal = self.journal.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let cancelled = tokio::select! {
                _ = tokio::time::sleep(latency) => false,
                _ = token.cancelled() => true,
            };
            let failed = !cancelled && fail_rate > 0.0 && rand::rng().random_bool(fail_rate);
            let result = pb::StepResult {
                dispatch_id: id.clone(),
                termination: if cancelled {
                    pb::Termination::Cancelled
                } else {
                    pb::Termination::Exited
                } as i32,
                exit_code: if cancelled {
                    None
                } else {
                    Some(i32::from(failed))
                },
                stderr: if failed {
                    b"simulated failure\n".to_vec()
                } else {
                    Vec::new()
                },
                duration_ms: started.elapsed().as_millis() as u64,
                ..Default::default()
            };
            // Recorded before it is reported, kept until acked.
            journal
                .lock()
                .expect("sim journal lock")
                .insert(id, Entry::Done(result.clone()));
            let _ = internal.send(result).await;
        });
        None
    }
}

/// Marks an agent connected while alive.
struct Connected<'a>(&'a SimAgent);

impl<'a> Connected<'a> {
    fn new(agent: &'a SimAgent) -> Self {
        agent.up.store(true, Ordering::Relaxed);
        agent.stats.connected.fetch_add(1, Ordering::Relaxed);
        agent.stats.sessions.fetch_add(1, Ordering::Relaxed);
        Connected(agent)
    }
}

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.up.store(false, Ordering::Relaxed);
        self.0.stats.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The simulated fleet, running on the caller's tokio runtime.
pub struct Sim {
    agents: Vec<Arc<SimAgent>>,
    /// What it did so far.
    pub stats: Arc<Stats>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl Sim {
    /// Starts one session loop per agent, all at once (a cold start:
    /// every agent dials now). Agent `i` dials `urls[i % urls.len()]` (a
    /// controller set's members spread them). Must be called within a
    /// tokio runtime.
    pub fn start(urls: &[String], ca_pem: &str, creds: Vec<Credentials>, opts: Options) -> Sim {
        let stats = Arc::new(Stats::default());
        let opts = Arc::new(opts);
        let shutdown = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let urls: Vec<Arc<str>> = urls.iter().map(|u| u.as_str().into()).collect();
        let ca: Arc<str> = ca_pem.into();
        let mut agents = Vec::with_capacity(creds.len());
        for (i, c) in creds.into_iter().enumerate() {
            let url = urls[i % urls.len()].clone();
            let agent = Arc::new(SimAgent {
                name: c.name,
                opts: opts.clone(),
                stats: stats.clone(),
                journal: Arc::default(),
                ran: Mutex::default(),
                up: AtomicBool::new(false),
            });
            tasks.spawn(
                agent
                    .clone()
                    .run(url, ca.clone(), c.identity, shutdown.clone()),
            );
            agents.push(agent);
        }
        Sim {
            agents,
            stats,
            shutdown,
            tasks,
        }
    }

    /// How many agents it simulates.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Whether it simulates none.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// Agents with a session now.
    pub fn connected(&self) -> usize {
        self.agents
            .iter()
            .filter(|a| a.up.load(Ordering::Relaxed))
            .count()
    }

    /// Names of agents without a session now (at most `max`).
    pub fn disconnected(&self, max: usize) -> Vec<String> {
        self.agents
            .iter()
            .filter(|a| !a.up.load(Ordering::Relaxed))
            .take(max)
            .map(|a| a.name.clone())
            .collect()
    }

    /// Results recorded and not acked yet, over all agents.
    pub fn unacked(&self) -> usize {
        self.agents
            .iter()
            .map(|a| {
                a.lock()
                    .values()
                    .filter(|e| matches!(e, Entry::Done(_)))
                    .count()
            })
            .sum()
    }

    /// Steps running now, over all agents.
    pub fn running(&self) -> usize {
        self.agents
            .iter()
            .map(|a| {
                a.lock()
                    .values()
                    .filter(|e| matches!(e, Entry::Running(_)))
                    .count()
            })
            .sum()
    }

    /// The last error a session attempt met, if any.
    pub fn last_error(&self) -> Option<String> {
        self.stats.last_error.lock().expect("lock").clone()
    }

    /// Waits (checking every 20 ms, at most `within`) until every agent
    /// has a session; how long that took, or `None`.
    pub async fn wait_all_connected(&self, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < within {
            if self.connected() == self.len() {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Ends every session and waits for the agents' tasks.
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tasks.wait()).await;
    }
}

/// A run as the simulator saw it.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// Its id.
    pub run: String,
    /// From the `Apply` call to its end (every result journaled).
    pub elapsed: Duration,
    /// Its final state.
    pub state: String,
}

/// Applies the changeset `yaml` (written to `dir`) through the admin API
/// and follows the run to its end, as `modi apply` does.
pub async fn apply(client: &Client, dir: &Path, yaml: &str) -> anyhow::Result<RunOutcome> {
    let file = dir.join("sim-changeset.yaml");
    std::fs::write(&file, yaml)?;
    let sources = modi_controller::changeset::collect_sources(&file.to_string_lossy(), &mut |p| {
        std::fs::read_to_string(p)
    })
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let request = pb::ApplyRequest {
        sources: Some(pb::Sources {
            root: sources.root,
            files: sources.files,
        }),
        vars: Default::default(),
        secrets: Default::default(),
    };
    let started = Instant::now();
    let run = client.admin().apply(request).await?.into_inner().run_id;
    let mut stream = client
        .admin()
        .watch(pb::WatchRequest {
            run_id: run.clone(),
        })
        .await?
        .into_inner();
    // The typed stream, read as any gRPC client would: the first status,
    // then `run` progress events until one is final.
    let final_state = |value: i32| {
        let state = modi_controller::typed::run_state_from(value, "state").ok()?;
        state.is_final().then(|| state.as_str().to_string())
    };
    let mut state = None;
    while let Some(event) = stream.message().await? {
        let value = match event.event {
            Some(pb::watch_event::Event::Status(status)) => status.state,
            Some(pb::watch_event::Event::Progress(pb::Progress {
                event: Some(pb::progress::Event::Run(s)),
            })) => s,
            _ => continue,
        };
        if let Some(s) = final_state(value) {
            state = Some(s);
            break;
        }
    }
    let elapsed = started.elapsed();
    let state = match state {
        Some(s) => s,
        // The stream ended without the end (a lagging watcher): ask.
        None => {
            let got = client
                .admin()
                .get_run(pb::GetRunRequest {
                    run_id: run.clone(),
                })
                .await?
                .into_inner();
            let value = got.status.map_or(0, |s| s.state);
            modi_controller::typed::run_state_from(value, "state")?
                .as_str()
                .to_string()
        }
    };
    Ok(RunOutcome {
        run,
        elapsed,
        state,
    })
}

/// A `parallel` change of one no-op step on `hosts` (a selector).
pub fn parallel_noop(hosts: &str) -> String {
    format!(
        r#"
name: sim-parallel
changes:
  - name: noop
    hosts: {hosts}
    rollout: {{ mode: parallel }}
    apply:
      - run: "true"
"#
    )
}

/// A `rolling` change of one no-op step on `hosts`, 10% of them at a time.
pub fn rolling_noop(hosts: &str) -> String {
    format!(
        r#"
name: sim-rolling
changes:
  - name: noop
    hosts: {hosts}
    rollout: {{ mode: rolling, batches: ["10%"] }}
    apply:
      - run: "true"
"#
    )
}

/// CPU time a process has used, in clock ticks (utime + stime of
/// `/proc/PID/stat`); see [`ticks_per_second`].
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields count from after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of stat; utime is 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |t| t as u64)
}

/// Reads the controller's `/metrics` (plain HTTP on 127.0.0.1:`port`):
/// every sample without labels, and labelled ones as `name{labels}`.
pub fn scrape(port: u16) -> anyhow::Result<BTreeMap<String, f64>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        if let Some((name, value)) = line.rsplit_once(' ')
            && let Ok(v) = value.parse::<f64>()
        {
            out.insert(name.to_string(), v);
        }
    }
    Ok(out)
}

/// Raises this process's open-file limit to at least `want` (to the hard
/// limit, and the hard limit too when allowed); children inherit it.
/// Returns the soft limit now.
pub fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    if soft >= want {
        return soft;
    }
    if hard < want && setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return want;
    }
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).map_or(0, |(s, _)| s)
}

/// Where the simulated fleet's controller keeps its store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SimStore {
    /// sled in its data dir (the default).
    Sled,
    /// A one-member etcd started on loopback for it.
    Etcd,
}

/// A real controller (`modi serve`, a child process) with a simulated
/// fleet enrolled and connected to it.
pub struct SimFleet {
    /// The controller.
    pub ctl: crate::Controller,
    /// Its etcd, when the store is etcd (and it is not a set).
    pub etcd: Option<modi_controller::testetcd::Etcd>,
    /// The controller set, when there are several controllers (`ctl` is
    /// then its active one, `members[0]`, taken out of it).
    pub set: Option<crate::ControllerSet>,
    /// The simulated agents.
    pub sim: Sim,
    /// An admin client.
    pub client: Client,
    /// Where the controller serves `/metrics`.
    pub metrics_port: u16,
    /// Where the controller serves its web view.
    pub web_port: u16,
    /// How long enrolling every agent took.
    pub enrol_time: Duration,
    /// From the agents' cold start to every agent with a session.
    pub storm_time: Duration,
}

impl SimFleet {
    /// Starts a controller (its log filter `log`, e.g. `info`), enrols
    /// `agents` simulated agents named `sim-00000`... through the real RPC
    /// with one token good for all of them (`concurrency` at a time), and
    /// starts them all at once; returns once the controller counts every
    /// one connected. Must be called within a multi-threaded runtime.
    pub async fn start(
        agents: usize,
        opts: Options,
        concurrency: usize,
        log: &str,
    ) -> anyhow::Result<SimFleet> {
        SimFleet::start_on(SimStore::Sled, agents, opts, concurrency, log).await
    }

    /// [`SimFleet::start`] with the controller's store on `store`. Call it
    /// from a thread that outlives the fleet (an etcd started here dies
    /// with the thread that started it).
    pub async fn start_on(
        store: SimStore,
        agents: usize,
        opts: Options,
        concurrency: usize,
        log: &str,
    ) -> anyhow::Result<SimFleet> {
        SimFleet::start_set(store, 1, agents, opts, concurrency, log).await
    }

    /// [`SimFleet::start_on`] with `controllers` controllers: more than
    /// one makes a set on one etcd (`store` must be etcd), the first
    /// active, and the agents spread over all of them (the standbys relay
    /// theirs to the active one).
    pub async fn start_set(
        store: SimStore,
        controllers: usize,
        agents: usize,
        opts: Options,
        concurrency: usize,
        log: &str,
    ) -> anyhow::Result<SimFleet> {
        raise_nofile(4 * agents as u64 + 4096);
        let metrics_port = crate::free_port();
        let web_port = crate::free_port();
        let listeners = format!(
            "metrics_listen = \"127.0.0.1:{metrics_port}\"\nweb_listen = \"127.0.0.1:{web_port}\""
        );
        anyhow::ensure!(
            controllers <= 1 || store == SimStore::Etcd,
            "a controller set needs the etcd store"
        );
        let (mut ctl, etcd, mut set) = if controllers > 1 {
            let mut set = tokio::task::block_in_place(|| {
                crate::ControllerSet::start_with(controllers, 1, |i| {
                    if i == 0 {
                        listeners.clone()
                    } else {
                        String::new()
                    }
                })
            });
            let ctl = set.members.remove(0);
            (ctl, None, Some(set))
        } else {
            let etcd = match store {
                SimStore::Sled => None,
                SimStore::Etcd => Some(modi_controller::testetcd::Etcd::start(1)),
            };
            let store_toml = match &etcd {
                None => String::new(),
                Some(e) => format!(
                    "\n[store]\nbackend = \"etcd\"\nendpoints = [{:?}]",
                    e.endpoints()[0]
                ),
            };
            let mut ctl = crate::Controller::init(&format!("{listeners}{store_toml}"));
            ctl.log_filter = Some(log.to_string());
            tokio::task::block_in_place(|| ctl.serve());
            (ctl, etcd, None)
        };
        ctl.log_filter = Some(log.to_string());
        let uses = agents.max(1).to_string();
        let token = tokio::task::block_in_place(|| {
            ctl.json(&["token", "create", "--ttl", "2h", "--uses", &uses])
        });
        let field = |k: &str| {
            token[k]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow::anyhow!("no {k} in the token: {token}"))
        };
        let (secret, pin, url) = (field("token")?, field("ca_sha256")?, field("controller")?);
        // Every controller of a set, the active one first.
        let urls: Vec<String> = std::iter::once(url.clone())
            .chain(set.iter_mut().flat_map(|s| {
                s.members
                    .iter()
                    .map(|c| format!("https://127.0.0.1:{}", c.port))
                    .collect::<Vec<_>>()
            }))
            .collect();
        let names: Vec<String> = (0..agents).map(|i| format!("sim-{i:05}")).collect();
        let started = Instant::now();
        let (ca, creds) = enrol(&url, &pin, &secret, &names, &BTreeMap::new(), concurrency).await?;
        let enrol_time = started.elapsed();
        let cli = modi_controller::config::CliConfig::load(&ctl.cli_config)?;
        let client = Client::from_config(&cli).map_err(|e| anyhow::anyhow!("{e}"))?;

        let started = Instant::now();
        let sim = Sim::start(&urls, &ca, creds, opts);
        let mut fleet = SimFleet {
            ctl,
            etcd,
            set,
            sim,
            client,
            metrics_port,
            web_port,
            enrol_time,
            storm_time: Duration::ZERO,
        };
        fleet.wait_all_connected(Duration::from_secs(300)).await?;
        fleet.storm_time = started.elapsed();
        Ok(fleet)
    }

    /// Agents connected, as the controller counts them.
    pub fn controller_connected(&self) -> anyhow::Result<u64> {
        let m = scrape(self.metrics_port)?;
        Ok(m.get("modi_agents_connected").copied().unwrap_or(0.0) as u64)
    }

    /// A counter or gauge of the controller's `/metrics` (0 if absent).
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        Ok(scrape(self.metrics_port)?.get(name).copied().unwrap_or(0.0))
    }

    /// Waits until every agent has a session and the controller counts
    /// them all, for at most `within`.
    pub async fn wait_all_connected(&self, within: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        let n = self.sim.len();
        loop {
            if self.sim.connected() == n && self.controller_connected().ok() == Some(n as u64) {
                return Ok(());
            }
            if started.elapsed() > within {
                anyhow::bail!(
                    "not all {n} agents connected within {within:?}: {} say they are, the controller counts {:?}; first missing: {:?}; last error: {:?}",
                    self.sim.connected(),
                    self.controller_connected().ok(),
                    self.sim.disconnected(5),
                    self.sim.last_error()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// etcd's count of transactions and of keys written so far (its own
    /// `/metrics`); `None` when the store is not etcd.
    pub fn etcd_writes(&self) -> Option<(f64, f64)> {
        let etcd = self
            .etcd
            .as_ref()
            .or_else(|| self.set.as_ref().map(|s| &s.etcd))?;
        let port: u16 = etcd.endpoints()[0].rsplit(':').next()?.parse().ok()?;
        let m = scrape(port).ok()?;
        let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
        Some((get("etcd_mvcc_txn_total"), get("etcd_mvcc_put_total")))
    }

    /// The controller's process id.
    pub fn pid(&self) -> Option<u32> {
        self.ctl.pid()
    }

    /// Applies `yaml` and follows the run to its end.
    pub async fn apply(&self, yaml: &str) -> anyhow::Result<RunOutcome> {
        apply(&self.client, &self.ctl.root, yaml).await
    }

    /// Waits until every result the agents hold is acked (at most
    /// `within`); false if some still are not.
    pub async fn wait_all_acked(&self, within: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < within {
            if self.sim.unacked() == 0 && self.sim.running() == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Stops the agents, then the controller.
    pub async fn stop(&mut self) {
        self.sim.stop().await;
        tokio::task::block_in_place(|| self.ctl.stop());
    }
}
