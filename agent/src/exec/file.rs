//! `file` steps (atomic write that remembers what was there) and the
//! automatic `restore` that puts it back.
//!
//! Before replacing a file the agent saves its bytes, mode and owner under
//! the dispatch id in the backups folder (`<id>.json` + `<id>.data`), or
//! notes that there was no file. `restore` of that id writes them back
//! atomically, or removes the file the step created.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use modi_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use super::{Ctx, Executor};
use crate::fsutil;

/// What a `file` step found at its path before writing.
#[derive(Debug, Serialize, Deserialize)]
struct Backup {
    path: PathBuf,
    existed: bool,
    mode: u32,
    uid: u32,
    gid: u32,
}

fn ok(stdout: String) -> pb::StepResult {
    pb::StepResult {
        termination: pb::Termination::Exited as i32,
        exit_code: Some(0),
        stdout: stdout.into_bytes(),
        ..Default::default()
    }
}

fn failed(exit_code: i32, stdout: Vec<u8>, stderr: String) -> pb::StepResult {
    pb::StepResult {
        termination: pb::Termination::Exited as i32,
        exit_code: Some(exit_code),
        stdout,
        stderr: stderr.into_bytes(),
        ..Default::default()
    }
}

/// Parses `user` or `user:group` into ids.
fn owner_ids(owner: &str) -> Result<(Option<u32>, Option<u32>), String> {
    if owner.is_empty() {
        return Ok((None, None));
    }
    let (user, group) = match owner.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (owner, None),
    };
    let uid = nix::unistd::User::from_name(user)
        .map_err(|e| format!("cannot look up user {user:?}: {e}"))?
        .ok_or_else(|| format!("no such user {user:?}"))?
        .uid
        .as_raw();
    let gid = match group {
        Some(g) => Some(
            nix::unistd::Group::from_name(g)
                .map_err(|e| format!("cannot look up group {g:?}: {e}"))?
                .ok_or_else(|| format!("no such group {g:?}"))?
                .gid
                .as_raw(),
        ),
        None => None,
    };
    Ok((Some(uid), gid))
}

/// Writes `bytes` to a temp file next to `path` with `mode` and owner, and
/// fsyncs it. Returns the temp path; the caller renames or removes it.
fn write_temp(
    path: &Path,
    tag: &str,
    bytes: &[u8],
    mode: u32,
    owner: (Option<u32>, Option<u32>),
) -> std::io::Result<PathBuf> {
    let tmp = fsutil::temp_path(path, tag);
    // Never through a planted link: the agent may be root and `path`'s
    // folder writable by others.
    let mut f = fsutil::create_temp(&tmp, 0o600)?;
    let written = (|| {
        f.write_all(bytes)?;
        // Only ask for an owner change that is one: an unprivileged agent
        // may keep its own files as they are.
        let meta = f.metadata()?;
        let uid = owner.0.filter(|u| *u != meta.uid());
        let gid = owner.1.filter(|g| *g != meta.gid());
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::fchown(&f, uid, gid)?;
        }
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

fn install(tmp: &Path, path: &Path) -> std::io::Result<()> {
    if let Err(e) = fs::rename(tmp, path) {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    fsutil::sync_parent(path)
}

/// Deletes old backups in `dir`: the data (what a `file` step replaced)
/// after `data_retention`, the small record saying what was there after
/// `record_retention`, and anything else there (the temp file of a crashed
/// write) after `data_retention`. Keeping the record longer makes a
/// restore of an expired backup fail loudly instead of passing as "nothing
/// was installed". Returns how many files went; a file that cannot be
/// removed is logged and skipped.
pub(super) fn prune_backups(
    dir: &Path,
    data_retention: Duration,
    record_retention: Duration,
) -> std::io::Result<usize> {
    let now = SystemTime::now();
    let older_than = |path: &Path, age: Duration| {
        fs::symlink_metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).is_ok_and(|a| a > age))
    };
    let mut removed = 0;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let retention = if name.ends_with(".json") {
            record_retention
        } else {
            data_retention
        };
        if !older_than(&path, retention) {
            continue;
        }
        match fs::remove_file(&path) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete an old backup")
            }
        }
    }
    Ok(removed)
}

impl Executor {
    fn backup_paths(&self, id: &str) -> (PathBuf, PathBuf) {
        (
            self.backups.join(format!("{id}.json")),
            self.backups.join(format!("{id}.data")),
        )
    }
}

/// What is at `path` now, for `modi plan --diff`: read-only, at most
/// `max_bytes`, a regular file only (the `file` step refuses anything
/// else too).
pub(super) fn read(path: &Path, max_bytes: u64) -> pb::FileContent {
    use std::io::Read;
    let mut out = pb::FileContent::default();
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => {
            out.exists = true;
            out.size = meta.len();
        }
        Ok(_) => {
            out.exists = true;
            out.error = format!("{} is not a regular file", path.display());
            return out;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return out,
        Err(e) => {
            out.error = format!("cannot inspect {}: {e}", path.display());
            return out;
        }
    }
    let read = fs::File::open(path).and_then(|f| {
        let mut buf = Vec::new();
        f.take(max_bytes).read_to_end(&mut buf)?;
        Ok(buf)
    });
    match read {
        Ok(buf) => out.content = buf,
        Err(e) => out.error = format!("cannot read {}: {e}", path.display()),
    }
    out
}

pub(super) async fn write(
    exec: &Executor,
    id: &str,
    f: &pb::FileWrite,
    step: &pb::Step,
    ctx: &Ctx<'_>,
) -> Result<pb::StepResult, String> {
    let path = exec.resolve(&f.path);
    let owner = owner_ids(&f.owner)?;
    let previous = match fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_file() => Some(meta),
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a regular file",
                path.display()
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot inspect {}: {e}", path.display())),
    };
    let mode = f
        .mode
        .or(previous.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(0o644);
    let owner = (
        owner.0.or(previous.as_ref().map(|m| m.uid())),
        owner.1.or(previous.as_ref().map(|m| m.gid())),
    );
    let tmp = write_temp(&path, id, &f.content, mode, owner)
        .map_err(|e| format!("cannot write a temp file next to {}: {e}", path.display()))?;

    if !f.validate.is_empty() {
        let command = f.validate.replace(
            modi_proto::FILE_TMP_PLACEHOLDER,
            &super::sh_quote(&tmp.to_string_lossy()),
        );
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(&command);
        let validate_step = pb::Step {
            env: step.env.clone(),
            cwd: step.cwd.clone(),
            user: step.user.clone(),
            ..Default::default()
        };
        let result = exec.run_command(cmd, &validate_step, ctx).await;
        let passed = matches!(&result, Ok(r) if r.termination == pb::Termination::Exited as i32 && r.exit_code == Some(0));
        if !passed {
            let _ = fs::remove_file(&tmp);
            return Ok(match result {
                Ok(mut r) => {
                    let mut stderr = r.stderr;
                    stderr.extend_from_slice(
                        format!(
                            "\nmodi-agent: validate failed; {} left unchanged\n",
                            path.display()
                        )
                        .as_bytes(),
                    );
                    r.stderr = stderr;
                    if r.exit_code == Some(0) || r.exit_code.is_none() {
                        r.exit_code = r.exit_code.or(Some(1));
                    }
                    r
                }
                Err(e) => failed(
                    1,
                    Vec::new(),
                    format!("modi-agent: validate could not run: {e}\n"),
                ),
            });
        }
    }

    // Remember what was there, durably, before replacing it.
    let (meta_path, data_path) = exec.backup_paths(id);
    let backup = Backup {
        path: path.clone(),
        existed: previous.is_some(),
        mode: previous.as_ref().map_or(0, |m| m.mode() & 0o7777),
        uid: previous.as_ref().map_or(0, |m| m.uid()),
        gid: previous.as_ref().map_or(0, |m| m.gid()),
    };
    let saved = (|| -> std::io::Result<usize> {
        let mut size = 0;
        if previous.is_some() {
            let old = fs::read(&path)?;
            size = old.len();
            fsutil::write_atomic(&data_path, &old, 0o600)?;
        }
        let json = serde_json::to_vec(&backup).map_err(std::io::Error::other)?;
        fsutil::write_atomic(&meta_path, &json, 0o600)?;
        Ok(size)
    })();
    let old_size = match saved {
        Ok(n) => n,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(format!("cannot back up {}: {e}", path.display()));
        }
    };
    if let Err(e) = install(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(format!("cannot install {}: {e}", path.display()));
    }
    let was = if previous.is_some() {
        format!("replaced {old_size} bytes")
    } else {
        "created".to_string()
    };
    Ok(ok(format!(
        "wrote {} bytes to {} (mode {:04o}; {was})\n",
        f.content.len(),
        path.display(),
        mode
    )))
}

pub(super) async fn restore(exec: &Executor, of: &str) -> Result<pb::StepResult, String> {
    if !crate::journal::valid_id(of) {
        return Err(format!("restore of a malformed dispatch id {of:?}"));
    }
    let (meta_path, data_path) = exec.backup_paths(of);
    let meta = match fs::read(&meta_path) {
        Ok(meta) => meta,
        // The record is made durable before the install, so without one
        // the step installed nothing (it failed validate, or before its
        // backup): the host is as it was.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(ok(format!(
                "nothing was installed by {of} (no backup record {}); nothing to restore\n",
                meta_path.display()
            )));
        }
        Err(e) => return Err(format!("cannot read backup {}: {e}", meta_path.display())),
    };
    let backup: Backup = serde_json::from_slice(&meta)
        .map_err(|e| format!("backup {} is damaged: {e}", meta_path.display()))?;
    let path = &backup.path;
    if !backup.existed {
        return match fs::remove_file(path) {
            Ok(()) => {
                fsutil::sync_parent(path).map_err(|e| e.to_string())?;
                Ok(ok(format!(
                    "removed {} (it did not exist before)\n",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ok(format!(
                "{} is already absent, as before\n",
                path.display()
            ))),
            Err(e) => Ok(failed(
                1,
                Vec::new(),
                format!("cannot remove {}: {e}\n", path.display()),
            )),
        };
    }
    let old = fs::read(&data_path).map_err(|e| {
        format!(
            "cannot restore {}: its backup data {} is gone ({e}); backups are kept {} days, \
                 put the file back by hand",
            backup.path.display(),
            data_path.display(),
            super::BACKUP_RETENTION.as_secs() / 86_400
        )
    })?;
    let tmp = write_temp(
        path,
        &format!("restore-{of}"),
        &old,
        backup.mode,
        (Some(backup.uid), Some(backup.gid)),
    )
    .and_then(|tmp| install(&tmp, path).map(|()| tmp));
    match tmp {
        Ok(_) => Ok(ok(format!(
            "restored {} ({} bytes, mode {:04o})\n",
            path.display(),
            old.len(),
            backup.mode
        ))),
        Err(e) => Ok(failed(
            1,
            Vec::new(),
            format!("cannot restore {}: {e}\n", path.display()),
        )),
    }
}
