//! modi's controller: the daemon (`modi serve`) that schedules changes
//! across a fleet of agents, and the operator CLI (every other `modi`
//! subcommand).
//!
//! Where to start reading:
//! - [`changeset`]: the changeset language, pure: parse → validate →
//!   render, producing a [`spec::RunSpec`].
//! - [`rollout`]: the rollout engine, a pure state machine: events in,
//!   actions out. Everything with I/O wraps these two thinly.
//! - [`driver`]: the one task per run that journals events, feeds the
//!   engine and carries out its actions.
//! - [`fleet`]: connected agents, steps in flight, result routing.
//! - [`run_ports`]: a run's inbox and watch channel, through which the
//!   fleet and the services reach its driver.
//! - [`service`]: the gRPC services (agent-facing and admin-facing) and
//!   their conversions.
//! - [`server`]: `modi serve`'s life: bind, resume runs, serve, drain.
//! - [`store`]: the sled store and each run's append-only journal.
//! - [`pki`]: the CA and the server side of the trust scheme.
//! - [`secret`]: secrets' values, held in memory for their run only.
//! - [`cli`]: the operator CLI, one module per subcommand.
//! - [`clock`]: the injected [`clock::Clock`] that everything deciding by
//!   time reads.
//! - [`install`]: the one-line agent install `modi serve` hands out (an
//!   install script and the agent binary, beside the gRPC services).
//! - [`typed`]: the admin API's run messages (spec, status, progress) to
//!   and from ours, for the admin service and the CLI.
//! - [`web`]: the web view (`web_listen`), an in-process client of the
//!   admin service's handlers with the same rules and audit.
//! - [`config`], [`init`], [`alert`]: the rest.
//!
//! Imports point down: `server` → `service` → `driver` → `fleet` →
//! `run_ports` → `rollout`. A lower layer tells a higher one something by
//! sending on a channel it was given; `pb::` types stop at `service`,
//! `typed`, `web` and the CLI.

pub mod alert;
pub mod changeset;
pub mod cli;
pub mod clock;
pub mod config;
pub mod driver;
pub mod fleet;
pub mod init;
pub mod install;
pub mod limits;
pub mod metrics;
pub mod pki;
pub mod rollout;
pub mod run_ports;
pub mod secret;
pub mod server;
pub mod service;
pub mod set;
pub mod spec;
pub mod store;
#[doc(hidden)]
pub mod testetcd;
#[cfg(test)]
mod testfs;
pub mod typed;
pub mod web;
