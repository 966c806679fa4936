//! The gRPC services: the thin layer between the wire and the rest.
//!
//! Each service authenticates the caller from its TLS certificate, converts
//! `pb::` types to ours in its one conversion module, and hands off. Nothing
//! past a handler sees a `pb::` type.
//!
//! - [`agent`]: `AgentService` (Enroll, Connect), with [`agent_convert`].
//! - [`admin`]: `AdminService` for the CLI, with [`admin_convert`].
//! - [`auth`]: who is calling, and with which certificate role.
//! - [`authz`]: which operator may call which admin method (one table,
//!   default deny), and the audit journal.
//! - [`admin_access`]: tokens, labels, operators, audit.

pub mod admin;
pub mod admin_access;
pub mod admin_convert;
pub mod agent;
pub mod agent_convert;
pub mod auth;
pub mod authz;
pub mod plan_diff;
pub mod relay;
