//! Prometheus metrics, served as text on a plain-HTTP listener of its own
//! (`metrics_listen` in `controller.toml`, off by default): agents
//! connected, runs by state, steps dispatched and finished by outcome, step
//! duration and journal flush latency, the store's size on disk.
//!
//! Counters and histograms are updated where things happen (the drivers,
//! the store's writer); gauges are read from the fleet and the store when
//! scraped.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::fleet::Fleet;
use crate::rollout::{StepResult, Termination};
use crate::store::Store;

/// A run state, as a label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

/// How a step ended, as a label (`exit_0`, `exit_nonzero`, `timeout`,
/// `cancelled`, `lost`, `unreachable`, `failed_to_start`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

/// The controller's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    agents: Gauge,
    runs: Family<StateLabel, Gauge>,
    dispatched: Counter,
    finished: Family<OutcomeLabel, Counter>,
    step_seconds: Histogram,
    flush_seconds: Histogram,
    store_bytes: Gauge,
    store_writes: Counter,
    store_flushes: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn outcome(r: &StepResult) -> &'static str {
    match (r.termination, r.exit_code) {
        (Some(Termination::Exited) | None, Some(0)) => "exit_0",
        (Some(Termination::Exited) | None, _) => "exit_nonzero",
        (Some(Termination::TimedOut), _) => "timeout",
        (Some(Termination::Cancelled), _) => "cancelled",
        (Some(Termination::Lost), _) => "lost",
        (Some(Termination::Unreachable), _) => "unreachable",
        (Some(Termination::FailedToStart), _) => "failed_to_start",
    }
}

impl Metrics {
    /// Every metric, registered.
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Arc::default(),
            agents: Gauge::default(),
            runs: Family::default(),
            dispatched: Counter::default(),
            finished: Family::default(),
            step_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            flush_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            store_bytes: Gauge::default(),
            store_writes: Counter::default(),
            store_flushes: Counter::default(),
        };
        {
            let mut r = m.registry.lock().expect("metrics registry");
            r.register(
                "modi_agents_connected",
                "Agents connected now",
                m.agents.clone(),
            );
            r.register("modi_runs", "Runs by state", m.runs.clone());
            r.register(
                "modi_steps_dispatched",
                "Steps sent to agents",
                m.dispatched.clone(),
            );
            r.register(
                "modi_steps_finished",
                "Step results journaled, by outcome",
                m.finished.clone(),
            );
            r.register(
                "modi_step_duration_seconds",
                "Wall time of steps on their agents",
                m.step_seconds.clone(),
            );
            r.register(
                "modi_journal_flush_seconds",
                "Time the store's writer took per flush (group commit)",
                m.flush_seconds.clone(),
            );
            r.register(
                "modi_store_bytes",
                "The store's size on disk",
                m.store_bytes.clone(),
            );
            r.register(
                "modi_store_writes",
                "Write jobs the store's one writer applied (a host update, a journal batch, ...)",
                m.store_writes.clone(),
            );
            r.register(
                "modi_store_flushes",
                "Flushes the store's writer made (one per group of writes)",
                m.store_flushes.clone(),
            );
        }
        m
    }

    /// A step was sent.
    pub fn dispatched(&self) {
        self.dispatched.inc();
    }

    /// A step's result was journaled.
    pub fn finished(&self, result: &StepResult) {
        self.finished
            .get_or_create(&OutcomeLabel {
                outcome: outcome(result).into(),
            })
            .inc();
        if result.termination == Some(Termination::Exited) {
            self.step_seconds
                .observe(result.duration_ms as f64 / 1000.0);
        }
    }

    /// The store flushed, taking `took`.
    pub fn flushed(&self, took: Duration) {
        self.flush_seconds.observe(took.as_secs_f64());
    }

    /// The metrics as Prometheus text, gauges read now.
    pub fn render(&self, fleet: &Fleet, store: &Store) -> String {
        self.agents.set(fleet.connected_count() as i64);
        if let Ok(runs) = store.runs() {
            self.runs.clear();
            for r in runs {
                self.runs
                    .get_or_create(&StateLabel {
                        state: r.state.as_str().into(),
                    })
                    .inc();
            }
        }
        self.store_bytes.set(store.size_on_disk() as i64);
        let mut text = String::new();
        let registry = self.registry.lock().expect("metrics registry");
        // Under the registry's lock: two scrapes never add the same writes.
        let stats = store.writer_stats();
        let catch_up = |c: &Counter, now: u64| c.inc_by(now.saturating_sub(c.get()));
        catch_up(&self.store_writes, stats.jobs);
        catch_up(&self.store_flushes, stats.flushes);
        if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    fleet: Fleet,
    store: Store,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use axum::http::header;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let text = metrics.render(&fleet, &store);
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    text,
                )
            }
        }),
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the metrics listener stopped");
    }
}
