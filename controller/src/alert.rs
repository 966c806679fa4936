//! Alerts: "a human must look". Each alert is logged, POSTed as JSON to the
//! configured webhook (retried with backoff, logged when it keeps failing)
//! and/or fed as JSON on stdin to the configured command. Delivery runs in
//! the background: a slow or dead receiver never blocks a run.

use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::rollout::{AlertKind, Millis};

/// Tries per webhook delivery.
pub const WEBHOOK_TRIES: u32 = 5;
/// Wait before the first retry; doubles each time.
pub const WEBHOOK_BACKOFF: Duration = Duration::from_millis(500);
/// Timeout of one webhook request.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of the alert command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// One alert, as delivered.
#[derive(Clone, Debug, Serialize)]
pub struct AlertEvent {
    /// Run id.
    pub run: u64,
    /// The changeset's name.
    pub changeset: String,
    /// What happened.
    pub kind: AlertKind,
    /// The change, if about one.
    pub change: Option<String>,
    /// The host, if about one.
    pub host: Option<String>,
    /// A sentence for people.
    pub message: String,
    /// When (ms since the epoch).
    pub at: Millis,
}

/// Where alerts go: one delivery queue per destination, so each receives
/// the alerts in order, one at a time, and a slow one never holds up the
/// other (nor a run: firing only queues).
#[derive(Clone)]
pub struct Alerts {
    webhook: Option<mpsc::UnboundedSender<Vec<u8>>>,
    command: Option<mpsc::UnboundedSender<Vec<u8>>>,
}

impl Alerts {
    /// Alerts to a webhook and/or command (either may be absent). The
    /// delivery tasks run on `tasks` until `shutdown`.
    pub fn new(
        webhook: Option<String>,
        command: Option<String>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Alerts {
        let webhook = webhook.map(|url| {
            let (tx, rx) = mpsc::unbounded_channel();
            tasks.spawn(deliver(rx, shutdown.clone(), move |body| {
                post_with_retries(url.clone(), body)
            }));
            tx
        });
        let command = command.map(|command| {
            let (tx, rx) = mpsc::unbounded_channel();
            tasks.spawn(deliver(rx, shutdown.clone(), move |body| {
                run_command(command.clone(), body)
            }));
            tx
        });
        Alerts { webhook, command }
    }

    /// Queues `event` for every destination configured.
    pub fn fire(&self, event: AlertEvent) {
        tracing::warn!(
            run = event.run,
            kind = ?event.kind,
            change = event.change.as_deref().unwrap_or("-"),
            host = event.host.as_deref().unwrap_or("-"),
            "ALERT: {}",
            event.message
        );
        let body = serde_json::to_vec(&event).expect("alerts serialize");
        for queue in [&self.webhook, &self.command].into_iter().flatten() {
            let _ = queue.send(body.clone());
        }
    }
}

/// Delivers queued alerts one at a time until shutdown.
async fn deliver<F, Fut>(
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    shutdown: CancellationToken,
    send: F,
) where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        let body = tokio::select! {
            body = rx.recv() => match body {
                Some(body) => body,
                None => return,
            },
            _ = shutdown.cancelled() => return,
        };
        send(body).await;
    }
}

async fn post_with_retries(url: String, body: Vec<u8>) {
    let mut delay = WEBHOOK_BACKOFF;
    for attempt in 1..=WEBHOOK_TRIES {
        let (u, b) = (url.clone(), body.clone());
        let outcome = tokio::task::spawn_blocking(move || post(&u, &b))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match outcome {
            Ok(()) => return,
            Err(e) if attempt == WEBHOOK_TRIES => {
                tracing::error!(%url, error = %e, "alert webhook failed {WEBHOOK_TRIES} times; giving up");
            }
            Err(e) => {
                tracing::warn!(%url, error = %e, attempt, "alert webhook failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

fn post(url: &str, body: &[u8]) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(WEBHOOK_TIMEOUT))
        .build()
        .into();
    agent
        .post(url)
        .header("content-type", "application/json")
        .send(body)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn run_command(command: String, body: Vec<u8>) {
    let child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&command)
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(%command, error = %e, "alert command cannot start");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&body).await;
    }
    match tokio::time::timeout(COMMAND_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => tracing::error!(%command, %status, "alert command failed"),
        Ok(Err(e)) => tracing::error!(%command, error = %e, "alert command failed"),
        Err(_) => tracing::error!(%command, "alert command timed out"),
    }
}
