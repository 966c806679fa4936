//! The agent's small local result journal: what makes steps exactly-once.
//!
//! For each dispatch id the agent writes `<id>.run` (the step, durable)
//! *before* spawning anything, and `<id>.result` (durable, atomic) when it
//! ends. Both stay until the controller acks the result. So:
//! - a repeated `RunStep` for an id with a result re-reports that result;
//! - a repeated `RunStep` for an id that is running is ignored;
//! - after an agent restart, an id with `.run` but no `.result` was cut off
//!   mid-run: its outcome cannot be known, and it is reported `lost`, never
//!   run again.
//!
//! Records are the protocol's own prost encodings. A `.result` that does
//! not decode is moved aside to `<id>.result.bad` and replaced by a `lost`
//! result, so one damaged file cannot block reporting for ever.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use modi_proto::v1 as pb;
use prost::Message;

use crate::fsutil;

/// The local journal in one folder.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
}

/// What `begin` found for a dispatch id.
#[derive(Debug, PartialEq)]
pub enum Begin {
    /// Never seen: recorded now, go ahead and run it.
    New,
    /// Seen and finished: here is the result to report again.
    Done(pb::StepResult),
    /// Seen, no result yet: it is running.
    Running,
}

/// Is `id` a well-formed dispatch id? They become file names, so only
/// `[A-Za-z0-9._-]`, 1 to 200 characters, not starting with a dot.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Journal {
    /// Opens (creating) the journal in `dir`. Every step that was recorded
    /// but has no result was cut off by a restart: it gets a `lost` result
    /// now, which is returned with every other unacked result.
    pub fn open(dir: &Path) -> io::Result<(Journal, Vec<pb::StepResult>)> {
        fsutil::private_dir(dir)?;
        let journal = Journal {
            dir: dir.to_path_buf(),
        };
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".run") else {
                continue;
            };
            if !journal.result_path(id).exists() {
                journal.finish(&lost(
                    id,
                    "modi-agent restarted while this step ran; its outcome is unknown".into(),
                ))?;
            }
        }
        let pending = journal.pending()?;
        Ok((journal, pending))
    }

    fn run_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.run"))
    }

    fn result_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.result"))
    }

    /// Records `step` under its id before it runs, unless the id is known.
    pub fn begin(&self, step: &pb::RunStep) -> io::Result<Begin> {
        let id = &step.dispatch_id;
        if let Some(result) = self.result(id)? {
            return Ok(Begin::Done(result));
        }
        if self.run_path(id).exists() {
            return Ok(Begin::Running);
        }
        fsutil::write_atomic(&self.run_path(id), &step.encode_to_vec(), 0o600)?;
        Ok(Begin::New)
    }

    /// The result recorded for `id`, if any (`lost` if the record is
    /// damaged).
    pub fn result(&self, id: &str) -> io::Result<Option<pb::StepResult>> {
        let bytes = match fs::read(self.result_path(id)) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Some(
            pb::StepResult::decode(bytes.as_slice())
                .unwrap_or_else(|e| self.set_aside(id, &e.to_string())),
        ))
    }

    /// A result that does not decode cannot be reported, and left in place
    /// it would fail every `pending` for ever: it is moved aside to
    /// `<id>.result.bad` for a person to look at, and `lost` recorded in
    /// its place.
    fn set_aside(&self, id: &str, why: &str) -> pb::StepResult {
        let path = self.result_path(id);
        let bad = self.dir.join(format!("{id}.result.bad"));
        tracing::error!(id, path = %path.display(), error = why,
            "a recorded result is damaged; reporting the step lost");
        let result = match fs::rename(&path, &bad) {
            Ok(()) => lost(
                id,
                format!(
                    "modi-agent: the recorded result of this step is damaged ({why}; kept as {}); its outcome is unknown",
                    bad.display()
                ),
            ),
            Err(e) => {
                tracing::error!(id, path = %path.display(), error = %e, "cannot move a damaged result aside");
                lost(
                    id,
                    format!(
                        "modi-agent: the recorded result of this step is damaged ({why}); its outcome is unknown"
                    ),
                )
            }
        };
        // Were this to fail, the next read reports `lost` again.
        if let Err(e) = self.finish(&result) {
            tracing::error!(id, error = %e, "cannot record a lost result");
        }
        result
    }

    /// Records a step's result durably.
    pub fn finish(&self, result: &pb::StepResult) -> io::Result<()> {
        fsutil::write_atomic(
            &self.result_path(&result.dispatch_id),
            &result.encode_to_vec(),
            0o600,
        )
    }

    /// The controller has the result durably: forget the id.
    pub fn ack(&self, id: &str) -> io::Result<()> {
        let mut removed = false;
        for path in [self.result_path(id), self.run_path(id)] {
            match fs::remove_file(&path) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if removed {
            fsutil::sync_parent(&self.result_path(id))?;
        }
        Ok(())
    }

    /// Every result not yet acked, oldest id first.
    pub fn pending(&self) -> io::Result<Vec<pb::StepResult>> {
        let mut ids: Vec<String> = fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".result").map(str::to_string)
            })
            .collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            if let Some(r) = self.result(&id)? {
                out.push(r);
            }
        }
        Ok(out)
    }
}

/// The result of a step whose outcome cannot be known.
fn lost(id: &str, why: String) -> pb::StepResult {
    pb::StepResult {
        dispatch_id: id.to_string(),
        termination: pb::Termination::Lost as i32,
        stderr: why.into_bytes(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(id: &str) -> pb::RunStep {
        pb::RunStep {
            dispatch_id: id.into(),
            step: None,
        }
    }

    #[test]
    fn an_id_runs_once_and_its_result_is_re_reported_until_acked() {
        let dir = tempfile::tempdir().unwrap();
        let (j, pending) = Journal::open(dir.path()).unwrap();
        assert!(pending.is_empty());
        assert_eq!(j.begin(&step("r1.a")).unwrap(), Begin::New);
        assert_eq!(j.begin(&step("r1.a")).unwrap(), Begin::Running);
        let result = pb::StepResult {
            dispatch_id: "r1.a".into(),
            termination: pb::Termination::Exited as i32,
            exit_code: Some(0),
            stdout: b"hi".to_vec(),
            ..Default::default()
        };
        j.finish(&result).unwrap();
        assert_eq!(j.begin(&step("r1.a")).unwrap(), Begin::Done(result.clone()));
        assert_eq!(j.pending().unwrap(), vec![result]);
        j.ack("r1.a").unwrap();
        assert!(j.pending().unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_step_cut_off_by_a_restart_is_lost_not_rerun() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            assert_eq!(j.begin(&step("r1.b")).unwrap(), Begin::New);
        }
        let (j, pending) = Journal::open(dir.path()).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].termination, pb::Termination::Lost as i32);
        match j.begin(&step("r1.b")).unwrap() {
            Begin::Done(r) => assert_eq!(r.termination, pb::Termination::Lost as i32),
            other => panic!("expected the lost result, got {other:?}"),
        }
    }

    #[test]
    fn a_damaged_result_is_set_aside_and_reported_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.begin(&step("r1.c")).unwrap(), Begin::New);
        // Field 1 with wire type 7: not a protobuf.
        fs::write(dir.path().join("r1.c.result"), b"\x0f\x0f").unwrap();

        let pending = j.pending().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].dispatch_id, "r1.c");
        assert_eq!(pending[0].termination, pb::Termination::Lost as i32);
        assert_eq!(
            fs::read(dir.path().join("r1.c.result.bad")).unwrap(),
            b"\x0f\x0f"
        );
        // From now on it is an ordinary lost result.
        assert_eq!(j.pending().unwrap(), pending);
        assert_eq!(
            j.begin(&step("r1.c")).unwrap(),
            Begin::Done(pending[0].clone())
        );
        let (_, recovered) = Journal::open(dir.path()).unwrap();
        assert_eq!(recovered, pending);
        j.ack("r1.c").unwrap();
        assert!(j.pending().unwrap().is_empty());
    }

    #[test]
    fn ids_are_file_name_safe() {
        assert!(valid_id("r12.c0.h3.apply.1.a0"));
        assert!(!valid_id("../etc/passwd"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(".hidden"));
        assert!(!valid_id(""));
    }
}
