//! Journal write throughput with group commit: C concurrent writers (as
//! many results arriving at once) each journal R step results through the
//! store's one writer, on a real sled store on disk. Prints JSON: events
//! per second, flushes per second, events per flush, and the slowest
//! single write.
//!
//! `cargo run --release -p modi-tests --bin journal-bench -- --concurrent 1000`

use std::time::{Duration, Instant};

use clap::Parser;
use modi_controller::rollout::{DispatchId, Event, Phase, RunState, StepResult, Termination};
use modi_controller::store::{JournalEntry, Record, RunMeta, Store};

#[derive(Parser)]
struct Args {
    /// Concurrent writers (results arriving at once).
    #[arg(long, default_value_t = 1000)]
    concurrent: usize,
    /// Results each writer journals, one after the other.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Runs the results belong to (each writer is one host of one run).
    #[arg(long, default_value_t = 10)]
    runs: usize,
}

fn result_entry(host: usize, attempt: u32) -> JournalEntry {
    JournalEntry {
        at: 1,
        record: Record::Event {
            event: Event::StepFinished {
                id: DispatchId {
                    change: 0,
                    host,
                    phase: Phase::Apply,
                    step: 0,
                    attempt,
                },
                result: StepResult {
                    termination: Some(Termination::Exited),
                    exit_code: Some(0),
                    stdout: "ok\n".into(),
                    duration_ms: 3,
                    ..StepResult::default()
                },
            },
        },
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("db")).expect("store");
    let mut runs = Vec::new();
    for i in 0..args.runs {
        let meta = RunMeta {
            id: 0,
            name: format!("bench-{i}"),
            state: RunState::Running,
            created_at: 1,
            finished_at: None,
            submitted_by: "bench".into(),
            hosts: 0,
        };
        runs.push(store.create_run(meta, Vec::new()).await.expect("run").id);
    }
    let before = store.writer_stats();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..args.concurrent {
        let store = store.clone();
        let run = runs[w % runs.len()];
        let rounds = args.rounds;
        // Each writer owns its own range of sequence numbers in its run.
        let base = (w / runs.len()) as u64 * rounds as u64;
        tasks.spawn(async move {
            let mut slowest = Duration::ZERO;
            for r in 0..rounds {
                let t = Instant::now();
                store
                    .record(run, base + r as u64, vec![result_entry(w, r as u32)], None)
                    .await
                    .expect("journal write");
                slowest = slowest.max(t.elapsed());
            }
            slowest
        });
    }
    let mut slowest = Duration::ZERO;
    while let Some(s) = tasks.join_next().await {
        slowest = slowest.max(s.expect("writer"));
    }
    let took = started.elapsed().as_secs_f64();
    let after = store.writer_stats();
    let events = (after.jobs - before.jobs) as f64;
    let flushes = (after.flushes - before.flushes) as f64;
    let report = serde_json::json!({
        "concurrent_writers": args.concurrent,
        "events": events,
        "seconds": took,
        "events_per_second": (events / took).round(),
        "flushes": flushes,
        "flushes_per_second": (flushes / took).round(),
        "events_per_flush": (events / flushes * 10.0).round() / 10.0,
        "slowest_write_ms": slowest.as_secs_f64() * 1000.0,
    });
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
}
