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
//! INTERFACE CONTRACT (shared between the engine and its driver):
//! - `Engine::new(spec, judge)` builds the engine; `handle(Event::Start, now)`
//!   starts the run.
//! - Every `Action::Dispatch` carries a [`DispatchId`] unique within the run;
//!   the engine never emits the same id twice (exactly-once).
//! - `next_deadline()` is the earliest time at which `handle(Event::Timer,
//!   now)` must be called (retry delays, batch pauses, approval timeouts).
//! - Replaying the same events with the same timestamps yields the same
//!   actions: the engine is deterministic.

mod model;

pub use model::*;

// TO BE IMPLEMENTED by the engine work (see the contract above):
//
// pub struct Engine { .. }                       // Send
// impl Engine {
//     pub fn new(spec: std::sync::Arc<crate::spec::RunSpec>, judge: std::sync::Arc<dyn Judge>) -> Engine;
//     pub fn handle(&mut self, event: Event, now: Millis) -> Vec<Action>;
//     pub fn next_deadline(&self) -> Option<Millis>;
//     pub fn state(&self) -> RunState;
//     pub fn status(&self) -> RunStatus;
//     pub fn is_finished(&self) -> bool;      // final state and nothing in flight
// }
