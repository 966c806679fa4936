//! Backing a change's hosts out: one failed host at once (`halt`,
//! `continue`), or every host where the change was applied, one at a time,
//! newest completion first (`backout_all`, abort/deny, a changeset-level
//! `backout_all` through [`ChangeRun::reopen`]); and stopping backouts on
//! `abort --no-backout`.

use std::sync::Arc;

use crate::spec::ChangeSpec;

use crate::rollout::host::BackoutStart;
use crate::rollout::{Action, AlertKind, DispatchId, Failure, HostState};

use super::{ChangeRun, Ctx};

impl ChangeRun {
    /// The run bails out (abort, deny, approval timeout) while this change
    /// runs: cancel forward steps in flight (backout steps too without
    /// `backout`), start nothing new, and with `backout` back out every host
    /// where it was applied. A second bail without backout after one with
    /// it stops the backouts too.
    pub fn bail(&mut self, spec: &ChangeSpec, ctx: &mut Ctx, backout: bool, why: &str) {
        match self.bail {
            Some(false) => return,
            Some(true) if backout => return,
            Some(true) => {
                self.bail = Some(false);
                self.stop_backouts(spec, ctx);
                return;
            }
            None => {}
        }
        self.bail = Some(backout);
        self.halt();
        if backout {
            self.mass.get_or_insert_with(|| why.to_string());
        } else {
            self.stop_backouts(spec, ctx);
        }
        for h in 0..self.hosts.len() {
            let host = &mut self.hosts[h];
            if let Some(id) = host.in_flight
                && !id.phase.is_backout()
                && !host.cancel_sent
            {
                host.cancel_sent = true;
                cancel(ctx, spec, id);
            }
            match host.state {
                HostState::RetryPending => {
                    host.retry_at = None;
                    host.queued = backout && host.applied && !host.backed_out;
                    self.set_state(ctx, h, HostState::Cancelled);
                }
                HostState::Running if host.in_flight.is_none() => {
                    let failure = host.synthetic_failure(format!("stopped: {why}"));
                    host.stop();
                    self.attempt_failed(spec, ctx, h, failure);
                }
                HostState::Success | HostState::Skipped => {
                    host.queued = backout && host.applied && !host.backed_out;
                }
                _ => {}
            }
        }
    }

    /// Stops every backout of this change: queued hosts are left as they
    /// are, backout steps in flight are cancelled, a backout waiting for
    /// its next step ends `backout_failed`.
    pub fn stop_backouts(&mut self, spec: &ChangeSpec, ctx: &mut Ctx) {
        for h in 0..self.hosts.len() {
            let host = &mut self.hosts[h];
            host.queued = false;
            match host.in_flight {
                Some(id) if id.phase.is_backout() && !host.cancel_sent => {
                    host.cancel_sent = true;
                    cancel(ctx, spec, id);
                }
                None if host.state == HostState::BackingOut => {
                    host.stop();
                    self.backout_interrupted(spec, ctx, h);
                }
                _ => {}
            }
        }
        if self.reopened {
            self.bail = Some(false);
        }
    }

    /// A changeset-level backout of this concluded change: back out, one
    /// at a time, every host where it was applied and that is not already
    /// backed out. Returns false (and stays concluded) if there is none.
    pub fn reopen(&mut self, why: &str) -> bool {
        let mut any = false;
        for host in &mut self.hosts {
            if host.applied
                && !host.backed_out
                && matches!(host.state, HostState::Success | HostState::Skipped)
            {
                host.queued = true;
                any = true;
            }
        }
        if any {
            self.reopened = true;
            self.mass = Some(why.to_string());
        }
        any
    }

    /// `on_failure: backout_all` fired: stop, end pending retries, and
    /// queue every host where the change was applied.
    pub(super) fn enter_mass(&mut self, spec: &ChangeSpec, ctx: &mut Ctx, why: String) {
        self.mass = Some(why);
        self.halt();
        for h in 0..self.hosts.len() {
            let host = &mut self.hosts[h];
            match host.state {
                HostState::RetryPending => {
                    host.retry_at = None;
                    self.final_failure(spec, ctx, h);
                }
                HostState::Success | HostState::Skipped => {
                    host.queued = host.applied && !host.backed_out;
                }
                _ => {}
            }
        }
    }

    /// Starts the mass backout of the next queued host (newest completion
    /// first) once no host of the change is running or backing out.
    pub(super) fn drive_mass(&mut self, spec: &ChangeSpec, ctx: &mut Ctx) -> bool {
        let Some(why) = self.mass.clone() else {
            return false;
        };
        let busy = self.hosts.iter().any(|h| {
            matches!(
                h.state,
                HostState::Running | HostState::RetryPending | HostState::BackingOut
            )
        });
        if busy || self.bail == Some(false) {
            return false;
        }
        let next = (0..self.hosts.len())
            .filter(|&h| self.hosts[h].queued)
            .max_by_key(|&h| (self.hosts[h].completed, h));
        let Some(h) = next else {
            return false;
        };
        let host = &mut self.hosts[h];
        host.queued = false;
        let failure = match &host.failure {
            Some(failure) => failure.clone(),
            None => {
                let failure = host.synthetic_failure(why);
                host.failure = Some(failure.clone());
                failure
            }
        };
        let left = host.state;
        self.back_out(spec, ctx, h, &failure, left);
        true
    }

    /// Backs host `h` out for `failure`, or leaves it in `left`.
    pub(super) fn back_out(
        &mut self,
        spec: &ChangeSpec,
        ctx: &mut Ctx,
        h: usize,
        failure: &Failure,
        left: HostState,
    ) {
        let judge = Arc::clone(&ctx.judge);
        let started = self.hosts[h].begin_backout(&spec.hosts[h], &*judge, failure);
        self.ready.insert(h);
        match started {
            BackoutStart::Started => self.set_state(ctx, h, HostState::BackingOut),
            BackoutStart::Done => self.set_state(ctx, h, HostState::BackoutOk),
            BackoutStart::NotApplied => self.set_state(ctx, h, left),
            BackoutStart::NoProcedure => {
                self.set_state(ctx, h, left);
                let message = format!(
                    "host {} of change {} was left as it is: no backout procedure matches ({})",
                    spec.hosts[h].host.name, spec.name, failure.message
                );
                ctx.alert(AlertKind::FailedNoBackout, spec, h, message);
            }
        }
    }

    pub(super) fn backout_ended(
        &mut self,
        spec: &ChangeSpec,
        ctx: &mut Ctx,
        h: usize,
        result: Result<(), Failure>,
    ) {
        match result {
            Ok(()) => self.set_state(ctx, h, HostState::BackoutOk),
            Err(failure) => {
                self.set_state(ctx, h, HostState::BackoutFailed);
                let message = format!(
                    "backout of host {} in change {} failed: {}",
                    spec.hosts[h].host.name, spec.name, failure.message
                );
                ctx.alert(AlertKind::BackoutFailed, spec, h, message);
            }
        }
    }

    pub(super) fn backout_interrupted(&mut self, spec: &ChangeSpec, ctx: &mut Ctx, h: usize) {
        let failure = self.hosts[h].synthetic_failure("interrupted by abort --no-backout".into());
        self.backout_ended(spec, ctx, h, Err(failure));
    }
}

fn cancel(ctx: &mut Ctx, spec: &ChangeSpec, id: DispatchId) {
    ctx.out.push(Action::Cancel {
        id,
        host: spec.hosts[id.host].host.name.clone(),
    });
}
