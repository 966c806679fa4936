//! `modi plan --diff`: each `file` step of a plan compared with the file
//! now on its host. The agents read the files (read-only, size-capped; see
//! `fleet::peek`); the diffs are made here, so every client gets the same
//! text.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use modi_proto::v1 as pb;
use similar::TextDiff;
use tokio::task::JoinSet;

use crate::fleet::Fleet;
use crate::fleet::peek::FileRead;
use crate::limits::{MAX_DIFF_FILE, MAX_DIFFS};
use crate::spec::{RunSpec, StepAction};

/// How long one host has to answer.
const READ_WAIT: Duration = Duration::from_secs(5);

/// Hosts asked at once.
const READS_AT_ONCE: usize = 64;

/// One `file` step of the plan on one host.
struct Wanted {
    change: String,
    host: String,
    step: String,
    path: String,
    content: String,
}

/// The diffs of every `file` step of `apply` in `spec`, in plan order.
pub async fn diffs(fleet: &Fleet, spec: &RunSpec) -> Vec<pb::FileDiff> {
    let mut wanted = Vec::new();
    for change in &spec.changes {
        for host in &change.hosts {
            for (i, step) in host.apply.iter().enumerate() {
                if let StepAction::File(f) = &step.action {
                    wanted.push(Wanted {
                        change: change.name.clone(),
                        host: host.host.name.clone(),
                        step: format!("apply[{i}]"),
                        path: f.path.clone(),
                        content: f.content.clone(),
                    });
                }
            }
        }
    }
    let skipped = wanted.len().saturating_sub(MAX_DIFFS);
    // Each (host, path) is read once, however many steps write it.
    let mut reads: HashMap<(String, String), Result<FileRead, String>> = HashMap::new();
    let keys: Vec<(String, String)> = {
        let mut seen = std::collections::BTreeSet::new();
        wanted
            .iter()
            .take(MAX_DIFFS)
            .map(|w| (w.host.clone(), w.path.clone()))
            .filter(|k| seen.insert(k.clone()))
            .collect()
    };
    let permits = Arc::new(tokio::sync::Semaphore::new(READS_AT_ONCE));
    let mut tasks = JoinSet::new();
    for (host, path) in keys {
        let fleet = fleet.clone();
        let permits = permits.clone();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let read = fleet
                .read_file(&host, &path, MAX_DIFF_FILE, READ_WAIT)
                .await;
            ((host, path), read)
        });
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok((key, read)) = done {
            reads.insert(key, read);
        }
    }
    let out: Vec<pb::FileDiff> = wanted
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            let (diff, note) = if i >= MAX_DIFFS {
                (
                    String::new(),
                    format!(
                        "not compared: at most {MAX_DIFFS} file steps are compared in one plan"
                    ),
                )
            } else {
                match reads.get(&(w.host.clone(), w.path.clone())) {
                    Some(Ok(read)) => compare(&w, read),
                    Some(Err(why)) => (String::new(), format!("not compared: {why}")),
                    None => (String::new(), "not compared: the read failed".to_string()),
                }
            };
            pb::FileDiff {
                change: w.change,
                host: w.host,
                step: w.step,
                path: w.path,
                diff,
                note,
            }
        })
        .collect();
    if skipped > 0 {
        tracing::info!(skipped, "plan --diff: file steps past the cap not compared");
    }
    out
}

/// The unified diff from what is there to what the step writes, and a note.
fn compare(w: &Wanted, read: &FileRead) -> (String, String) {
    if !read.error.is_empty() {
        return (String::new(), format!("not compared: {}", read.error));
    }
    if read.exists && read.size > MAX_DIFF_FILE {
        return (
            String::new(),
            format!(
                "not compared: the file on {} is {} bytes, more than the {} compared",
                w.host, read.size, MAX_DIFF_FILE
            ),
        );
    }
    let Ok(now) = std::str::from_utf8(&read.content) else {
        return (
            String::new(),
            "not compared: the file there now is not text".to_string(),
        );
    };
    if read.exists && now == w.content {
        return (String::new(), "unchanged".to_string());
    }
    let (from, note) = if read.exists {
        (format!("{}:{} (now)", w.host, w.path), String::new())
    } else {
        ("/dev/null".to_string(), "new file".to_string())
    };
    let to = format!("{}:{} ({} of {})", w.host, w.path, w.step, w.change);
    let diff = TextDiff::from_lines(now, w.content.as_str())
        .unified_diff()
        .context_radius(3)
        .header(&from, &to)
        .to_string();
    (diff, note)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(content: &str) -> Wanted {
        Wanted {
            change: "conf".into(),
            host: "web-1".into(),
            step: "apply[0]".into(),
            path: "/etc/app.conf".into(),
            content: content.into(),
        }
    }

    fn there(content: &str) -> FileRead {
        FileRead {
            exists: true,
            content: content.as_bytes().to_vec(),
            size: content.len() as u64,
            error: String::new(),
        }
    }

    #[test]
    fn a_changed_line_is_a_unified_diff() {
        let (diff, note) = compare(&wanted("a\nB\nc\n"), &there("a\nb\nc\n"));
        assert_eq!(note, "");
        assert!(
            diff.starts_with(
                "--- web-1:/etc/app.conf (now)\n+++ web-1:/etc/app.conf (apply[0] of conf)\n"
            ),
            "{diff}"
        );
        assert!(diff.contains("\n-b\n+B\n"), "{diff}");
    }

    #[test]
    fn the_same_content_is_unchanged_and_a_missing_file_is_new() {
        assert_eq!(
            compare(&wanted("x\n"), &there("x\n")),
            (String::new(), "unchanged".into())
        );
        let (diff, note) = compare(&wanted("x\n"), &FileRead::default());
        assert_eq!(note, "new file");
        assert!(
            diff.contains("--- /dev/null") && diff.contains("+x"),
            "{diff}"
        );
    }

    #[test]
    fn a_large_or_binary_or_unreadable_file_is_not_compared() {
        let mut big = there("x");
        big.size = MAX_DIFF_FILE + 1;
        assert!(compare(&wanted("x"), &big).1.contains("more than"));
        let mut binary = there("");
        binary.content = vec![0xff, 0xfe];
        assert!(compare(&wanted("x"), &binary).1.contains("not text"));
        let mut denied = there("");
        denied.error = "cannot read /etc/app.conf: Permission denied".into();
        assert!(
            compare(&wanted("x"), &denied)
                .1
                .contains("Permission denied")
        );
    }
}
