//! End-to-end tests: the real `modi` and `modi-agent` binaries on
//! loopback. One test binary; the suites are listed here.

mod agent_orphans;
mod browser;
mod dist;
mod durability;
mod examples;
mod faults;
mod foundation;
mod gates;
mod install;
mod language;
mod reading;
mod refusals;
mod rollout;
mod scale;
mod secrets;
mod set;
mod trust;
mod web;
