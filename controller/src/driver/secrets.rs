//! A run's secrets in its driver: the hold after a controller restart
//! (`paused`, reason `secrets`) and its release by `modi resume --secret`.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::Driver;
use crate::alert::AlertEvent;
use crate::fleet::full_id;
use crate::rollout::{Action, AlertKind, Progress, RunState};
use crate::run_ports::WatchItem;
use crate::secret::{self, Secrets};
use crate::store::StoreError;

impl Driver {
    /// What `status` says while the run waits for its secrets.
    pub(super) fn secrets_hold(&self) -> String {
        format!(
            "secrets: the run needs {} again (the controller restarted since they were given); give them with `modi resume {} --secret NAME=...`",
            secret::list(&self.missing),
            self.run
        )
    }

    /// Holds the run for its missing secrets: it shows `paused` (also in
    /// `modi runs`), and a human is alerted once.
    pub(super) async fn hold_for_secrets(&mut self) -> Result<(), StoreError> {
        let why = self.secrets_hold();
        tracing::warn!(run = self.run, missing = %secret::list(&self.missing), "run paused: it needs its secrets again");
        self.ctx.alerts.fire(AlertEvent {
            run: self.run,
            changeset: self.spec.name.clone(),
            kind: AlertKind::SecretsNeeded,
            change: None,
            host: None,
            message: format!("run {} is paused: {why}", self.run),
            at: self.ctx.clock.now(),
        });
        self.meta.state = RunState::Paused;
        self.persist(Vec::new(), Some(self.meta.clone())).await?;
        let _ = self.watch.send(WatchItem::Progress {
            progress: Progress::Run {
                state: RunState::Paused,
            },
        });
        Ok(())
    }

    /// Checks secrets given with `modi resume` against what the run needs
    /// and keeps them: every missing one, and none the run does not use.
    pub(super) fn take_secrets(&mut self, given: Secrets) -> Result<(), String> {
        let run = self.run;
        let used = self.spec.secrets();
        if self.missing.is_empty() {
            return Err(format!(
                "run {run} is not waiting for secrets: it has every one it uses"
            ));
        }
        let unknown: BTreeSet<String> = given
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "run {run} does not use {}: it uses {}",
                secret::list(&unknown),
                secret::list(&used)
            ));
        }
        let still: BTreeSet<String> = self
            .missing
            .iter()
            .filter(|m| !given.contains_key(*m))
            .cloned()
            .collect();
        if !still.is_empty() {
            return Err(format!(
                "run {run} also needs {}: give every secret it waits for in one `modi resume {run} --secret ...`",
                secret::list(&still)
            ));
        }
        self.secrets.extend(given);
        self.missing.clear();
        Ok(())
    }

    /// The secrets are back: the steps held in flight go out, the parked
    /// dispatches are returned to be carried out, and the run shows its
    /// own state again.
    pub(super) async fn release_secrets_hold(&mut self) -> Result<Vec<Action>, StoreError> {
        tracing::info!(run = self.run, "secrets given again; run goes on");
        let key = self.key();
        for (id, names) in std::mem::take(&mut self.unsent) {
            if let Ok(values) = secret::subset(&self.secrets, &names) {
                self.ctx.fleet.supply(&full_id(key, &id), Arc::new(values));
            }
        }
        let state = self.engine.state();
        self.meta.state = state;
        self.persist(Vec::new(), Some(self.meta.clone())).await?;
        let _ = self.watch.send(WatchItem::Progress {
            progress: Progress::Run { state },
        });
        Ok(std::mem::take(&mut self.parked))
    }
}
