//! The rollout engine: a pure state machine that carries one run from its
//! first change to its end.
//!
//! It takes [`Event`]s (a step finished, an approval was given, a timer
//! fired, ...) with the current time and returns [`Action`]s (dispatch this
//! step, cancel that one, raise an alert, tell watchers what changed). It
//! never reads the clock, spawns, or touches sled or a socket: the driver in
//! `crate::driver` owns all of that, journals every event before feeding it
//! here, and replays the journal through a fresh engine after a crash.
//!
//! # Modules (start with `engine`)
//! - `model`: the contract shared with the driver: events, actions,
//!   progress, ids, states, the [`Judge`] trait, the status snapshot.
//! - `engine`: [`Engine`]: the run as a whole: the `requires` DAG,
//!   changeset/group `on_failure`, abort/deny/pause, the run's end.
//! - `change`: one change across its hosts: retries and the per-change
//!   `on_failure`; `change/schedule` (batches, `max_parallel`, `pause`,
//!   approval gates) and `change/backout` (one host, or every host one at
//!   a time; abort/deny; changeset-level backout of a concluded change).
//! - `host`: one host's sequence (skip_if → check → apply → verify) and
//!   its backout (backout check → restores → backout steps → backout
//!   verify).
//! - `verdict`: judging one step's result into pass or a [`Failure`].
//! - `tests` (test only): the simulated fleet and clock, unit and property
//!   tests.
//!
//! # Contract
//! - `Engine::new(spec, judge)` builds the engine; `handle(Event::Start, now)`
//!   starts the run.
//! - Every `Action::Dispatch` carries a [`DispatchId`] unique within the run;
//!   the engine never emits the same id twice (exactly-once). A
//!   `StepFinished` for an unknown or already finished id is ignored.
//! - `next_deadline()` is the earliest time at which `handle(Event::Timer,
//!   now)` must be called (retry delays, batch pauses, approval timeouts).
//! - Replaying the same events with the same timestamps yields the same
//!   actions: the engine is deterministic (no clock, no randomness, no hash
//!   iteration).
//! - An event that makes no sense in the current state (approve with no
//!   gate, resume when not paused, anything after the end) is ignored and
//!   returns no action.
//!
//! # Hosts
//! Per change, a host runs skip_if → check → apply → verify, one step at a
//! time. skip_if: all pass ⇒ `skipped` (an empty skip_if never skips); one
//! that exits non-zero or fails its `expect` ⇒ go on to check; one that
//! times out, is lost or unreachable fails the host. A failed attempt is
//! retried (`retry_pending`, then the whole sequence again with attempt+1)
//! unless it was `unreachable` (a dead host never stalls the run) or
//! `cancelled`, or the change is backing out everywhere or bailing out.
//! After the last attempt the failure is final: if nothing was applied
//! (no apply step was ever sent, in any attempt) the host is left `failed`
//! (`lost` if the failure was lost, `cancelled` if it was stopped by a
//! bailout) without alert; otherwise the first backout whose `when`
//! matches runs: backout check, restores of every `file` step sent (all
//! attempts, newest first), backout steps, backout verify ⇒ `backout_ok`,
//! or `backout_failed` + alert. No procedure matches: restores only if only
//! `file` steps were applied, else the host is left as it is + alert
//! `failed_no_backout`. A host that is backed out without a failure of its
//! own (a success under `backout_all`, an abort) sees a failure with reason
//! `cancelled` at the last forward step it ran.
//!
//! # Changes
//! Batches come from `ChangeSpec::batches()`; at most `max_parallel` hosts
//! of a batch are unfinished at once; the next batch starts when every host
//! of the previous one is final (backouts included), after `pause`. Gates
//! (`approve`) open before the first batch (once), each batch or each host;
//! `approve` answers the oldest open gate; `deny` or a timed-out gate bails
//! out. On a host's final failure:
//! - `halt`: it is backed out, no new host starts, running hosts finish
//!   (with their retries).
//! - `continue`: it is backed out; past `max_failures` (failed hosts >
//!   the amount of the change's hosts) behave as `halt`.
//! - `backout_all`: no new host, no more retries; once nothing of the
//!   change runs, every host where it was applied (succeeded, failed, or
//!   in flight at the time) is backed out one at a time, newest completion
//!   first.
//!
//! A change's final state: `bailed_out` if the run bailed out while it ran;
//! after a backout everywhere (its `backout_all`, or its changeset's):
//! `backout_failed` if a host's backout failed or an applied host could not
//! be backed out, else `backout_ok`; otherwise `success` if every host
//! succeeded or was skipped, `partial_failure` if some did, else
//! `total_failure`. A change that never starts (a prerequisite did not
//! succeed, its changeset halted, the run bailed out) ends `cancelled`
//! with all its hosts `cancelled`.
//!
//! # The run
//! A change starts when all its `requires` ended `success`; independent
//! changes run at once. A failed change (`partial_failure`,
//! `total_failure`, `backout_ok`, `backout_failed`) fails its group and
//! every enclosing changeset: each stops starting changes (`halt`), and one
//! with `backout_all` also, once none of its changes runs, backs out its
//! concluded changes (the failed one's remaining hosts included) newest
//! first, which is children before parents, one change at a time, inner
//! groups first. Abort/deny (and a gate timeout): cancel the forward steps
//! in flight, start nothing new, and unless `--no-backout` back out every
//! host where a running change was applied, as for `backout_all` (each
//! change one host at a time, changes side by side); backouts already
//! running go on, and a later abort `--no-backout` stops them too. Pause:
//! nothing is dispatched or started until resume (approvals are taken);
//! abort/deny ends a pause; gate timeouts still fire.
//!
//! The run's final state: `bailed_out` if aborted or denied; else
//! `success` if every change succeeded; else `backout_failed` if a change
//! ended so (a backout everywhere did not fully work: a human must look);
//! else `partial_failure` if a change ended `success` or `partial_failure`
//! (part of the changeset stays applied); else `backout_ok` if a change
//! ended so (what was applied was put back); else `total_failure`.

mod change;
mod engine;
mod host;
mod model;
mod verdict;

#[cfg(test)]
mod tests;

pub use engine::Engine;
pub use model::*;
