//! The agent's small local result journal: what makes steps exactly-once,
//! and what keeps a step from finishing behind modi's back.
//!
//! For each dispatch id the agent writes `<id>.run` (the step, durable)
//! *before* spawning anything, `<id>.pgid` (durable, atomic) as soon as
//! the step's process is spawned, and `<id>.result` (durable, atomic) when
//! it ends. All stay until the controller acks the result. So:
//! - a repeated `RunStep` for an id with a result re-reports that result;
//! - a repeated `RunStep` for an id that is running is ignored;
//! - after an agent restart, an id with `.run` but no `.result` was cut off
//!   mid-run: its outcome cannot be known, and it is reported `lost`, never
//!   run again.
//!
//! `<id>.pgid` names the process group the step runs in (every step
//! process leads a group of its own) with its leader's start time and the
//! boot id, which guard against a reused pid (see [`crate::pgroup`]). An
//! agent killed mid-step cannot take its step down with it, so on restart
//! [`Journal::open`] SIGKILLs every recorded group still alive and waits
//! until none of it is left, *then* records `lost`: a backout never runs
//! while the step it undoes is still running. The `lost` result says what
//! was found and done (killed, already ended, or could not be killed). A
//! `.pgid` is ignored once the id has a `.result`. The record is written
//! right after the spawn; an agent killed in that instant leaves a `.run`
//! without `.pgid`, so every step process also carries its dispatch id in
//! its environment (`MODI_DISPATCH_ID`, inherited by all it starts), and
//! the restarted agent finds and kills those processes' groups by it.
//!
//! Records are the protocol's own prost encodings (`.pgid` is a few text
//! lines). A `.result` that does not decode is moved aside to
//! `<id>.result.bad` and replaced by a `lost` result, so one damaged file
//! cannot block reporting for ever.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use modi_proto::v1 as pb;
use prost::Message;

use crate::fsutil;
use crate::pgroup::{self, Fate, Group};

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
    /// but has no result was cut off by a restart: whatever is left of its
    /// process group is killed (waiting up to [`pgroup::KILL_WAIT`] for it
    /// to be gone), then it gets a `lost` result, which is returned with
    /// every other unacked result. This blocks while it waits.
    pub fn open(dir: &Path) -> io::Result<(Journal, Vec<pb::StepResult>)> {
        fsutil::private_dir(dir)?;
        let journal = Journal {
            dir: dir.to_path_buf(),
        };
        let mut cut_off = Vec::new();
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".run") else {
                continue;
            };
            if !journal.result_path(id).exists() {
                cut_off.push(id.to_string());
            }
        }
        cut_off.sort();
        let records: Vec<Result<Option<Group>, String>> =
            cut_off.iter().map(|id| journal.group(id)).collect();
        let groups: Vec<Group> = records
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned().flatten())
            .collect();
        let mut fates = pgroup::kill_all(&groups, pgroup::KILL_WAIT).into_iter();
        for (id, record) in cut_off.iter().zip(records) {
            let why = match record {
                // The agent died before it recorded the group (or before
                // it spawned anything): the processes it may have started
                // carry the dispatch id in their environment.
                Ok(None) => match pgroup::kill_marked(id, pgroup::KILL_WAIT) {
                    Ok(0) => "no process group was recorded for it and none of its processes \
                              was found running (it had not started)"
                        .to_string(),
                    Ok(n) => {
                        tracing::warn!(
                            id,
                            groups = n,
                            "killed a step's process group left running (found by its mark)"
                        );
                        format!(
                            "the agent died before recording its process group; {n} group(s) \
                             of it were still running and were killed (SIGKILL) before this was \
                             reported"
                        )
                    }
                    Err(left) => format!(
                        "the agent died before recording its process group; processes \
                         {left:?} of it were still alive after {:?}",
                        pgroup::KILL_WAIT
                    ),
                },
                Err(e) => {
                    tracing::error!(id, error = %e, "a step's process group record is damaged; nothing killed");
                    format!(
                        "its process group record is damaged ({e}), so nothing was killed: a \
                         process of it may still be running"
                    )
                }
                Ok(Some(group)) => {
                    let pgid = group.pgid;
                    match fates.next().expect("a fate per group") {
                        Fate::Ended(how) => {
                            format!("its process group {pgid} had already ended ({how})")
                        }
                        Fate::Killed => {
                            tracing::warn!(id, pgid, "killed a step's process group left running");
                            format!(
                                "its process group {pgid} was still running and was killed \
                                 (SIGKILL) before this was reported"
                            )
                        }
                        Fate::KillFailed(e) => {
                            tracing::error!(id, pgid, error = %e, "cannot kill a step's process group left running");
                            format!(
                                "its process group {pgid} is still running and could NOT be \
                                 killed ({e}): it may still change the host"
                            )
                        }
                        Fate::Survived(pids) => {
                            tracing::error!(
                                id,
                                pgid,
                                ?pids,
                                "a killed step's processes are still alive"
                            );
                            format!(
                                "its process group {pgid} was sent SIGKILL but processes \
                                 {pids:?} were still alive after {}s: they may still change \
                                 the host",
                                pgroup::KILL_WAIT.as_secs()
                            )
                        }
                    }
                }
            };
            journal.finish(&lost(
                id,
                format!("modi-agent restarted while this step ran; {why}; its outcome is unknown"),
            ))?;
        }
        let pending = journal.pending()?;
        Ok((journal, pending))
    }

    /// The process group recorded for `id`, if any.
    fn group(&self, id: &str) -> Result<Option<Group>, String> {
        let path = self.group_path(id);
        match fs::read_to_string(&path) {
            Ok(text) => Group::decode(&text)
                .map(Some)
                .ok_or_else(|| format!("{} does not parse", path.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Records durably that the step `id` runs in the process group led by
    /// `pid`, a process just spawned (with a group of its own) and not yet
    /// waited for. Called once the step's process exists, before it is
    /// waited on; an agent that restarts kills the group if it is still
    /// alive.
    pub fn record_group(&self, id: &str, pid: u32) -> io::Result<()> {
        let group = Group::led_by(pid)?;
        fsutil::write_atomic(&self.group_path(id), group.encode().as_bytes(), 0o600)
    }

    fn run_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.run"))
    }

    fn result_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.result"))
    }

    fn group_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.pgid"))
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
        for path in [self.result_path(id), self.group_path(id), self.run_path(id)] {
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
            ..Default::default()
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

    /// SIGKILLs a process group when dropped, so a failing test leaves
    /// no sleeper behind.
    struct KillOnDrop(i32);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Spawns `sh -c script` as the leader of a process group of its own,
    /// as the executor does.
    fn spawn_group(script: &str) -> (std::process::Child, KillOnDrop) {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .process_group(0)
            .spawn()
            .unwrap();
        let guard = KillOnDrop(child.id() as i32);
        (child, guard)
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !cond() {
            assert!(
                std::time::Instant::now() < deadline,
                "not within 10s: {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn stderr_of(r: &pb::StepResult) -> String {
        String::from_utf8_lossy(&r.stderr).into_owned()
    }

    #[test]
    fn a_step_left_running_by_a_dead_agent_is_killed_before_it_is_reported_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.begin(&step("r1.k")).unwrap(), Begin::New);
        // A step with a process in the background too: the whole group goes.
        let (mut child, _guard) = spawn_group("sleep 30 & sleep 30; wait");
        j.record_group("r1.k", child.id()).unwrap();
        let group = Group::led_by(child.id()).unwrap();
        wait_for("the background sleep starts", || group.members().len() >= 3);
        let members = group.members();
        // The agent dies without finishing the step.
        drop(j);

        let started = std::time::Instant::now();
        let (j, pending) = Journal::open(dir.path()).unwrap();
        // Before `open` returned, nothing of the group is alive (the leader
        // is a zombie until its parent, this test, reaps it).
        assert_eq!(group.members(), Vec::<i32>::new(), "was {members:?}");
        for pid in &members {
            let state = fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.to_string()));
            assert!(
                state.as_ref().is_none_or(|s| s.starts_with('Z')),
                "{pid} still alive: {state:?}"
            );
        }
        assert!(
            started.elapsed() < pgroup::KILL_WAIT,
            "waited the whole time"
        );
        use std::os::unix::process::ExitStatusExt;
        let status = child.try_wait().unwrap().expect("the leader is dead");
        assert_eq!(status.signal(), Some(9), "{status:?}");

        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].termination, pb::Termination::Lost as i32);
        let why = stderr_of(&pending[0]);
        assert!(
            why.contains(&format!(
                "its process group {} was still running and was killed",
                group.pgid
            )),
            "{why}"
        );
        // Reported once; a later restart finds the result and kills nothing.
        drop(j);
        let (j, again) = Journal::open(dir.path()).unwrap();
        assert_eq!(again, pending);
        j.ack("r1.k").unwrap();
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            0,
            "all forgotten"
        );
    }

    #[test]
    fn a_group_whose_leader_has_exited_is_still_found_and_killed() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.begin(&step("r1.l")).unwrap(), Begin::New);
        let (mut child, _guard) = spawn_group("sleep 30 >/dev/null 2>&1 &");
        j.record_group("r1.l", child.id()).unwrap();
        let group = Group::led_by(child.id()).unwrap();
        assert!(child.wait().unwrap().success());
        // The leader is gone; what it left in the background is not.
        assert!(!Path::new(&format!("/proc/{}", group.pgid)).exists());
        wait_for("the background sleep runs", || !group.members().is_empty());
        drop(j);

        let (_j, pending) = Journal::open(dir.path()).unwrap();
        assert_eq!(group.members(), Vec::<i32>::new());
        assert_eq!(pending[0].termination, pb::Termination::Lost as i32);
        assert!(stderr_of(&pending[0]).contains("was killed"), "{pending:?}");
    }

    #[test]
    fn a_recorded_pid_now_used_by_another_process_is_not_killed() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(j.begin(&step("r1.m")).unwrap(), Begin::New);
        // Some other process now has the pid the step's group had: same
        // pid, another start time.
        let (mut other, _guard) = spawn_group("exec sleep 30");
        let real = Group::led_by(other.id()).unwrap();
        let recorded = Group {
            start_time: real.start_time.saturating_sub(1),
            ..real.clone()
        };
        fsutil::write_atomic(
            &dir.path().join("r1.m.pgid"),
            recorded.encode().as_bytes(),
            0o600,
        )
        .unwrap();
        drop(j);

        let (_j, pending) = Journal::open(dir.path()).unwrap();
        assert!(
            other.try_wait().unwrap().is_none(),
            "the other process was killed"
        );
        assert_eq!(real.members(), vec![real.pgid], "and it is still running");
        assert_eq!(pending[0].termination, pb::Termination::Lost as i32);
        let why = stderr_of(&pending[0]);
        assert!(
            why.contains("had already ended (its pid now belongs to another process)"),
            "{why}"
        );
        other.kill().unwrap();
        other.wait().unwrap();
    }

    #[test]
    fn a_step_with_no_group_recorded_says_so() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(dir.path()).unwrap();
            j.begin(&step("r1.n")).unwrap();
            fs::write(dir.path().join("r1.o.run"), b"").unwrap();
            fs::write(dir.path().join("r1.o.pgid"), b"not a record").unwrap();
        }
        let (_j, pending) = Journal::open(dir.path()).unwrap();
        assert_eq!(pending.len(), 2);
        assert!(
            stderr_of(&pending[0]).contains("no process group was recorded"),
            "{pending:?}"
        );
        assert!(
            stderr_of(&pending[1]).contains("record is damaged"),
            "{pending:?}"
        );
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
