//! Reading a file on a host for `modi plan --diff`: the controller asks
//! the agent on its session (`ToAgent::ReadFile`), the agent reads it
//! read-only and size-capped and answers (`FileContent`), and the waiting
//! caller gets it. Nothing here changes a host.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::oneshot;

use super::{Fleet, ToAgent};

/// What an agent found at a path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileRead {
    /// False when nothing is there.
    pub exists: bool,
    /// At most the bytes asked for.
    pub content: Vec<u8>,
    /// The whole file's size.
    pub size: u64,
    /// Why it could not be read; empty when it was.
    pub error: String,
}

/// Reads waiting for an answer: request id → (agent, where to answer).
#[derive(Default)]
pub(super) struct Reads {
    next: u64,
    waiting: HashMap<u64, (String, oneshot::Sender<FileRead>)>,
}

impl Fleet {
    /// Asks `host`'s agent for the file at `path` (at most `max_bytes`),
    /// waiting up to `wait`. `Err` says why there is no answer.
    pub async fn read_file(
        &self,
        host: &str,
        path: &str,
        max_bytes: u64,
        wait: Duration,
    ) -> Result<FileRead, String> {
        let (tx, rx) = oneshot::channel();
        let request_id = {
            let mut state = self.lock();
            if !state.sessions.contains_key(host) {
                return Err(format!("{host} is not connected"));
            }
            state.reads.next += 1;
            let request_id = state.reads.next;
            state
                .reads
                .waiting
                .insert(request_id, (host.to_string(), tx));
            let sent = state.send(
                host,
                ToAgent::ReadFile {
                    request_id,
                    path: path.to_string(),
                    max_bytes,
                },
            );
            if !sent {
                state.reads.waiting.remove(&request_id);
                return Err(format!("{host} is not connected"));
            }
            request_id
        };
        let answer = tokio::time::timeout(wait, rx).await;
        self.lock().reads.waiting.remove(&request_id);
        match answer {
            Ok(Ok(read)) => Ok(read),
            Ok(Err(_)) => Err(format!("{host} went away before it answered")),
            Err(_) => Err(format!(
                "{host} did not answer within {}s (an agent older than this controller cannot read files)",
                wait.as_secs()
            )),
        }
    }

    /// An agent's answer to a read. Only the agent that was asked may
    /// answer it.
    pub fn file_content(&self, agent: &str, request_id: u64, read: FileRead) {
        let mut state = self.lock();
        let asked = state
            .reads
            .waiting
            .get(&request_id)
            .is_some_and(|(a, _)| a == agent);
        if !asked {
            tracing::warn!(agent, request_id, "an answer to a read nobody asked it for");
            return;
        }
        if let Some((_, reply)) = state.reads.waiting.remove(&request_id) {
            let _ = reply.send(read);
        }
    }
}
