//! The rendered run specification: what the changeset language produces
//! for one `modi apply` and what the rollout engine consumes.
//!
//! A [`RunSpec`] is fully rendered: every template is expanded, every
//! `foreach` unrolled, every `include` flattened, every command rendered for
//! every host it selects. It is journaled as the first event of a run, so
//! replaying a run never needs the changeset file again. Conditions (CEL) are
//! kept as source text and compiled where they are evaluated.
//!
//! This module is pure data: no I/O, no clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where something came from in a changeset file, for error messages and
/// for `modi plan`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Location {
    /// The file, as the operator named it (or as an `include` resolved it).
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub column: u32,
    /// The field path inside the file, e.g. `changes[1].verify[0].expect`.
    pub path: String,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, " ({})", self.path)?;
        }
        Ok(())
    }
}

/// One whole run: the changes of a changeset (flattened), in file order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The changeset's `name`.
    pub name: String,
    /// The changeset's `description`.
    #[serde(default)]
    pub description: String,
    /// The top-level file.
    pub source: String,
    /// Changeset-level failure policy of the top-level changeset.
    pub on_failure: ChangesetFailure,
    /// Every change, flattened. `requires` refer to indices in this list and
    /// always point backwards or forwards within it; the list is acyclic.
    pub changes: Vec<ChangeSpec>,
    /// Nested changesets (`include`), flattened into `changes`. A change's
    /// `group` points here; groups nest through `parent`.
    #[serde(default)]
    pub groups: Vec<GroupSpec>,
}

/// An included (nested) changeset, flattened into the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupSpec {
    /// The name of the including change (e.g. `schema`).
    pub name: String,
    /// The file the nested changeset came from.
    pub file: String,
    /// The enclosing group, if the including change was itself nested.
    pub parent: Option<usize>,
    /// The nested changeset's own changeset-level `on_failure`.
    pub on_failure: ChangesetFailure,
}

/// Changeset-level `on_failure`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangesetFailure {
    /// Stop starting new changes; leave finished changes as they are.
    #[default]
    Halt,
    /// A failed change also backs out every change already done, children
    /// before parents.
    BackoutAll,
}

/// One change of the run, with its per-host rendered steps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeSpec {
    /// Unique name in the run. Unrolled `foreach` items are named
    /// `name[i]`; changes of an included changeset `include/name`.
    pub name: String,
    /// The included changeset this change belongs to, if any.
    #[serde(default)]
    pub group: Option<usize>,
    /// Indices of the changes that must succeed before this one starts.
    #[serde(default)]
    pub requires: Vec<usize>,
    /// How hosts are scheduled.
    #[serde(default)]
    pub rollout: Rollout,
    /// What a failed host does to the rest of the change.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Retries of a host's whole sequence.
    #[serde(default)]
    pub retry: Retry,
    /// Approval gates.
    #[serde(default)]
    pub approve: Approve,
    /// The hosts the selector matched at submit time, in rollout order, each
    /// with its rendered steps.
    pub hosts: Vec<HostPlan>,
    /// Where the change is defined.
    #[serde(default)]
    pub location: Location,
}

impl RunSpec {
    /// Every secret some step of the run uses (backouts included).
    pub fn secrets(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for host in self.changes.iter().flat_map(|c| &c.hosts) {
            let phases = [&host.skip_if, &host.check, &host.apply, &host.verify];
            let backouts = host
                .backout
                .iter()
                .flat_map(|b| [&b.check, &b.steps, &b.verify]);
            for steps in phases.into_iter().chain(backouts) {
                for step in steps {
                    out.extend(step.secrets.iter().cloned());
                }
            }
        }
        out
    }
}

impl ChangeSpec {
    /// The change's hosts split into batches, in rollout order, as host
    /// indices. serial: one host per batch; parallel: one batch of all;
    /// rolling: `batches` in turn, the last size repeating (a size of 0 or
    /// an empty list means everything left in one batch).
    pub fn batches(&self) -> Vec<Vec<usize>> {
        let total = self.hosts.len();
        let mut out = Vec::new();
        let mut next = 0;
        let mut sizes = self.rollout.batches.iter();
        let mut last = None;
        while next < total {
            let size = match self.rollout.mode {
                RolloutMode::Serial => 1,
                RolloutMode::Parallel => total,
                RolloutMode::Rolling => {
                    let amount = sizes.next().copied().or(last);
                    last = amount;
                    amount.map_or(total, |a| a.of(total))
                }
            };
            let size = if size == 0 { total } else { size };
            let end = (next + size).min(total);
            out.push((next..end).collect());
            next = end;
        }
        out
    }
}

/// Rollout policy of one change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// serial, parallel or rolling.
    pub mode: RolloutMode,
    /// parallel: at most this many hosts at once (`None` = no cap).
    /// rolling: also caps hosts at once inside a batch.
    #[serde(default)]
    pub max_parallel: Option<u32>,
    /// rolling: batch sizes; the last repeats. Empty = one batch of all.
    #[serde(default)]
    pub batches: Vec<Amount>,
    /// `on_failure: continue`: failed hosts tolerated before the change
    /// behaves as `halt`. `None` = no limit.
    #[serde(default)]
    pub max_failures: Option<Amount>,
    /// Wait between batches (rolling) or hosts (serial).
    #[serde(default, with = "duration_ms_opt")]
    pub pause: Option<Duration>,
}

/// serial | parallel | rolling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutMode {
    /// One host at a time.
    #[default]
    Serial,
    /// All hosts at once, capped by `max_parallel`.
    Parallel,
    /// Batches, one after another.
    Rolling,
}

/// A count of hosts, or a percentage of the change's hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Amount {
    /// An absolute number of hosts.
    Count(u32),
    /// A percentage (0..=100) of the change's host count, rounded up, at
    /// least 1 when the percentage is not 0.
    Percent(u32),
}

impl Amount {
    /// The number of hosts this amount means out of `total`.
    pub fn of(self, total: usize) -> usize {
        match self {
            Amount::Count(n) => n as usize,
            Amount::Percent(0) => 0,
            Amount::Percent(p) => (total * p as usize).div_ceil(100).max(1),
        }
    }
}

/// Per-change `on_failure`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Back out the failed host, start no new hosts, let in-flight finish.
    #[default]
    Halt,
    /// Back out the failed host, carry on; past `max_failures` act as halt.
    Continue,
    /// Stop and back out every host where the change was applied.
    BackoutAll,
}

/// `retry: { max_retries, delay }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retry {
    /// Tries after the first; -1 = forever.
    pub max_retries: i64,
    /// Wait before each retry.
    #[serde(with = "duration_ms")]
    pub delay: Duration,
}

/// `approve`: when the run waits for `modi approve`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approve {
    /// none | once | each_batch | each_host.
    pub at: ApproveAt,
    /// A gate that waits longer than this is a deny.
    #[serde(default, with = "duration_ms_opt")]
    pub timeout: Option<Duration>,
}

/// Where approval gates sit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApproveAt {
    /// No gates.
    #[default]
    None,
    /// Once, before the change's first host.
    Once,
    /// Before every batch.
    EachBatch,
    /// Before every host.
    EachHost,
}

/// What a host knew of itself at submit time: templates and conditions see
/// this as `host`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The agent's name (from its certificate).
    pub name: String,
    /// Operator-given labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Facts the agent reported (hostname, os, arch, ...).
    #[serde(default)]
    pub facts: BTreeMap<String, String>,
}

/// One host's rendered sequence for one change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostPlan {
    /// The host, as the inventory knew it at submit time.
    pub host: HostInfo,
    /// The merged variable namespace for this host and change (what CEL
    /// conditions see as `vars`).
    #[serde(default)]
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// All pass => the host is `skipped`.
    #[serde(default)]
    pub skip_if: Vec<Step>,
    /// Pre-implementation checks: a failure means nothing was applied.
    #[serde(default)]
    pub check: Vec<Step>,
    /// The change itself.
    #[serde(default)]
    pub apply: Vec<Step>,
    /// Post-implementation checks.
    #[serde(default)]
    pub verify: Vec<Step>,
    /// Backout procedures; the first whose `when` matches runs.
    #[serde(default)]
    pub backout: Vec<BackoutSpec>,
}

/// One backout procedure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackoutSpec {
    /// CEL over `failure`; `None` always matches.
    #[serde(default)]
    pub when: Option<Condition>,
    /// Pre-backout checks.
    #[serde(default)]
    pub check: Vec<Step>,
    /// The backout itself.
    #[serde(default)]
    pub steps: Vec<Step>,
    /// Post-backout checks.
    #[serde(default)]
    pub verify: Vec<Step>,
    /// Where it is defined.
    #[serde(default)]
    pub location: Location,
}

/// A CEL condition, kept as source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    /// The CEL expression.
    pub expr: String,
    /// Where it is written.
    #[serde(default)]
    pub location: Location,
}

/// One rendered step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// What to do.
    pub action: StepAction,
    /// Kill the step's process group after this long.
    #[serde(default, with = "duration_ms_opt")]
    pub timeout: Option<Duration>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (relative paths resolve against the agent's work
    /// dir).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Run as this user.
    #[serde(default)]
    pub user: Option<String>,
    /// Bytes fed to the process's standard input.
    #[serde(default)]
    pub stdin: Option<String>,
    /// CEL over the result; `None` = passes on exit code 0.
    #[serde(default)]
    pub expect: Option<Condition>,
    /// Where the step is written.
    #[serde(default)]
    pub location: Location,
    /// The secrets the step uses, by name. The step itself holds only
    /// `<secret NAME>` placeholders and `"$MODI_SECRET_NAME"` references;
    /// the values travel with the dispatch, from the controller's memory.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub secrets: BTreeSet<String>,
}

/// The kinds of step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepAction {
    /// `/bin/sh -c COMMAND` (already rendered and quoted).
    Run {
        /// The shell command line.
        command: String,
    },
    /// A program and its arguments, no shell.
    Argv {
        /// argv[0] is the program.
        argv: Vec<String>,
    },
    /// Write a file atomically, remembering what was there.
    File(FileSpec),
    /// Drive an interactive program on a PTY.
    Interact {
        /// The shell command line to start.
        command: String,
        /// expect/send pairs, in order.
        script: Vec<Exchange>,
    },
    /// Put back what the `file` step with dispatch id `of` replaced.
    /// Generated by the engine for automatic backout; never written by hand.
    Restore {
        /// The dispatch id of the file step being undone.
        of: String,
        /// The path, for display.
        path: String,
    },
    /// The changeset could not be rendered for this host (its labels or
    /// facts lack what a template reads, e.g. a host that never
    /// connected): the host's only step, in `check`, which the controller
    /// fails at once without sending anything, so the host fails alone and
    /// nothing is applied. Generated by the renderer; never written by hand.
    Unrenderable {
        /// Why, for people (`host.labels.zone is not set on db-1`).
        reason: String,
    },
}

/// A `file` step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileSpec {
    /// Absolute path, or relative to the agent's work dir.
    pub path: String,
    /// The new content.
    pub content: String,
    /// Octal mode, e.g. 0o644.
    #[serde(default)]
    pub mode: Option<u32>,
    /// `user` or `user:group`.
    #[serde(default)]
    pub owner: Option<String>,
    /// A command that checks the new content in its temp file first
    /// (`{{ file.tmp }}` already rendered to the placeholder
    /// [`FILE_TMP_PLACEHOLDER`] that the agent substitutes).
    #[serde(default)]
    pub validate: Option<String>,
}

/// The text the agent replaces with the (shell-quoted) temp file path in a
/// `file` step's `validate` command.
pub const FILE_TMP_PLACEHOLDER: &str = "@@MODI_FILE_TMP@@";

/// One expect/send pair of an `interact` step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    /// Regular expression to wait for in the output.
    pub expect: String,
    /// Text to send once it matched (sent as written: add `\n` yourself).
    pub send: String,
    /// How long to wait for `expect`.
    #[serde(default, with = "duration_ms_opt")]
    pub timeout: Option<Duration>,
}

/// Serialize a `Duration` as integer milliseconds.
pub mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Serialize.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Serialize an `Option<Duration>` as integer milliseconds or null.
pub mod duration_ms_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Serialize.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_rounds_up_and_is_at_least_one() {
        assert_eq!(Amount::Percent(25).of(10), 3);
        assert_eq!(Amount::Percent(25).of(1), 1);
        assert_eq!(Amount::Percent(100).of(7), 7);
        assert_eq!(Amount::Percent(0).of(7), 0);
        assert_eq!(Amount::Count(3).of(100), 3);
    }

    fn change(mode: RolloutMode, batches: Vec<Amount>, hosts: usize) -> ChangeSpec {
        ChangeSpec {
            name: "c".into(),
            group: None,
            requires: vec![],
            rollout: Rollout {
                mode,
                batches,
                ..Rollout::default()
            },
            on_failure: OnFailure::Halt,
            retry: Retry::default(),
            approve: Approve::default(),
            hosts: (0..hosts)
                .map(|i| HostPlan {
                    host: HostInfo {
                        name: format!("h{i}"),
                        ..HostInfo::default()
                    },
                    vars: Default::default(),
                    skip_if: vec![],
                    check: vec![],
                    apply: vec![],
                    verify: vec![],
                    backout: vec![],
                })
                .collect(),
            location: Location::default(),
        }
    }

    #[test]
    fn batches_follow_the_mode() {
        assert_eq!(
            change(RolloutMode::Serial, vec![], 3).batches(),
            vec![vec![0], vec![1], vec![2]]
        );
        assert_eq!(
            change(RolloutMode::Parallel, vec![], 3).batches(),
            vec![vec![0, 1, 2]]
        );
        let rolling = change(
            RolloutMode::Rolling,
            vec![Amount::Count(1), Amount::Percent(25)],
            10,
        );
        assert_eq!(
            rolling.batches(),
            vec![vec![0], vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]]
        );
        assert_eq!(
            change(RolloutMode::Rolling, vec![], 4).batches(),
            vec![vec![0, 1, 2, 3]]
        );
        assert!(
            change(RolloutMode::Parallel, vec![], 0)
                .batches()
                .is_empty()
        );
    }

    #[test]
    fn durations_round_trip_as_milliseconds() {
        let r = Retry {
            max_retries: 3,
            delay: Duration::from_secs(5),
        };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, r#"{"max_retries":3,"delay":5000}"#);
        assert_eq!(serde_json::from_str::<Retry>(&json).unwrap(), r);
    }
}
