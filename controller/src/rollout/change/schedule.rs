//! Scheduling a change's hosts: batches in turn, at most `max_parallel`
//! unfinished hosts of a batch at once, `pause` between batches, and the
//! approval gates (`once`, `each_batch`, `each_host`) in front of them.

use crate::spec::{ApproveAt, ChangeSpec};

use crate::rollout::{Millis, Progress};

use super::{ChangeRun, Ctx, millis};

/// What an approval gate stands before.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(in crate::rollout) enum GateFor {
    /// The change's first host (`approve: once`).
    Change,
    /// A batch (`approve: each_batch`).
    Batch(usize),
    /// A host (`approve: each_host`).
    Host(usize),
}

/// An open approval gate.
#[derive(Clone, Debug)]
pub(in crate::rollout) struct Gate {
    /// What it stands before.
    pub what: GateFor,
    /// Run-wide sequence number when it opened (approvals answer the
    /// oldest gate first).
    pub opened: u64,
    /// When it times out (a deny), if `approve.timeout` is set.
    pub deadline: Option<Millis>,
    /// When it opened.
    pub since: Millis,
    /// For people.
    pub label: String,
}

impl ChangeRun {
    /// Answers the open gate with an approval.
    pub fn approve(&mut self) {
        if let Some(gate) = self.gate.take() {
            self.approved.insert(gate.what);
        }
    }

    /// Opens gates, waits out pauses, starts batches and hosts.
    pub(super) fn schedule(&mut self, spec: &ChangeSpec, ctx: &mut Ctx) -> bool {
        let mut progressed = false;
        let cap = spec
            .rollout
            .max_parallel
            .map_or(usize::MAX, |m| (m as usize).max(1));
        while let Some(batch) = self.batches.get(self.batch).cloned() {
            if !self.batch_open {
                if let Some(until) = self.pause_until {
                    if ctx.now < until {
                        break;
                    }
                    self.pause_until = None;
                    progressed = true;
                }
                let gate = match spec.approve.at {
                    ApproveAt::Once if self.batch == 0 => Some(GateFor::Change),
                    ApproveAt::EachBatch => Some(GateFor::Batch(self.batch)),
                    _ => None,
                };
                if let Some(gate) = gate
                    && !self.approved.contains(&gate)
                {
                    return progressed | self.open_gate(spec, ctx, gate, &batch);
                }
                self.batch_open = true;
                self.next_in_batch = 0;
                ctx.progress(Progress::Batch {
                    change: self.index,
                    batch: self.batch,
                    hosts: batch.clone(),
                });
                progressed = true;
            }
            // Counted only while some of the batch has not started.
            if self.next_in_batch < batch.len() {
                let mut busy = batch[..self.next_in_batch]
                    .iter()
                    .filter(|&&h| !self.hosts[h].state.is_final())
                    .count();
                while self.next_in_batch < batch.len() && busy < cap {
                    let h = batch[self.next_in_batch];
                    let gate = GateFor::Host(h);
                    if spec.approve.at == ApproveAt::EachHost && !self.approved.contains(&gate) {
                        return progressed | self.open_gate(spec, ctx, gate, &batch);
                    }
                    self.next_in_batch += 1;
                    self.start_host(spec, ctx, h, 0);
                    busy += usize::from(!self.hosts[h].state.is_final());
                    progressed = true;
                }
            }
            // `batch_final` counts what a walk over the batch would.
            debug_assert_eq!(
                self.batch_final,
                batch
                    .iter()
                    .filter(|&&h| self.hosts[h].state.is_final())
                    .count()
            );
            let done = self.next_in_batch == batch.len() && self.batch_final == batch.len();
            if !done {
                break;
            }
            self.batch += 1;
            self.batch_open = false;
            self.batch_final = self.batches.get(self.batch).map_or(0, |b| {
                b.iter()
                    .filter(|&&h| self.hosts[h].state.is_final())
                    .count()
            });
            progressed = true;
            if let (Some(pause), true) = (spec.rollout.pause, self.batch < self.batches.len()) {
                self.pause_until = Some(ctx.now.saturating_add(millis(pause)));
            }
        }
        progressed
    }

    pub(super) fn open_gate(
        &mut self,
        spec: &ChangeSpec,
        ctx: &mut Ctx,
        what: GateFor,
        batch: &[usize],
    ) -> bool {
        if self.gate.is_some() {
            return false;
        }
        let names = |hosts: &[usize]| {
            hosts
                .iter()
                .map(|&h| spec.hosts[h].host.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let label = match what {
            GateFor::Change => format!("change {}: {} hosts", spec.name, spec.hosts.len()),
            GateFor::Batch(b) => format!(
                "batch {} of {} of change {}: {}",
                b + 1,
                self.batches.len(),
                spec.name,
                names(batch)
            ),
            GateFor::Host(h) => format!("host {} of change {}", names(&[h]), spec.name),
        };
        let opened = ctx.tick();
        self.gate = Some(Gate {
            what,
            opened,
            deadline: spec
                .approve
                .timeout
                .map(|t| ctx.now.saturating_add(millis(t))),
            since: ctx.now,
            label: label.clone(),
        });
        ctx.progress(Progress::AwaitingApproval {
            change: self.index,
            id: opened,
            gate: label,
        });
        true
    }
}
