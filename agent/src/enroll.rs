//! `modi-agent join`: trade a one-time token for a certificate.
//!
//! The agent makes its own key (it never leaves the host), sends a CSR with
//! the token over TLS to a controller whose CA matches the pinned SHA-256
//! fingerprint, checks what comes back, and stores key (0600), certificate,
//! CA and config in its data dir.
//!
//! The key is written before the token is sent, so a data dir that cannot
//! be written never costs a token; and a join that fails after the
//! controller answered is finished by running it again: same token, name
//! and key make it a retry, not a new enrolment.

use std::collections::BTreeMap;
use std::path::PathBuf;

use modi_proto::identity::{self, Role};
use modi_proto::tls::{self, Trust};
use modi_proto::v1 as pb;
use pb::agent_service_client::AgentServiceClient;

use crate::config::{self, AgentConfig};
use crate::fsutil;

/// What `modi-agent join` was given.
#[derive(Clone, Debug)]
pub struct JoinRequest {
    /// `https://host:port`.
    pub controller: String,
    /// The other controllers of its set: tried in turn when one is on
    /// standby or unreachable, and kept in `agent.toml`.
    pub also: Vec<String>,
    /// The one-time join token.
    pub token: String,
    /// SHA-256 of the controller's CA certificate (hex).
    pub ca_sha256: String,
    /// The name to ask for; the hostname when `None`.
    pub name: Option<String>,
    /// Labels to report.
    pub labels: BTreeMap<String, String>,
    /// Where to keep state.
    pub data_dir: PathBuf,
    /// Where steps run (default `<data dir>/work`).
    pub work_dir: Option<PathBuf>,
}

/// Why joining failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// Bad input on the command line.
    #[error("{0}")]
    Usage(String),
    /// The data dir already holds an enrolled agent.
    #[error("{0} already holds an enrolled agent; remove it or pick another --data dir")]
    AlreadyJoined(PathBuf),
    /// The controller could not be reached (includes a CA that does not
    /// match the pin).
    #[error("cannot reach the controller at {url}: {detail}")]
    Unreachable {
        /// The URL.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The controller said no (bad, used or expired token).
    #[error("the controller refused to enrol this agent: {0}")]
    Refused(String),
    /// The controller's answer does not hold up.
    #[error("the controller's answer is not acceptable: {0}")]
    BadAnswer(String),
    /// Files could not be written (before the token was used).
    #[error("cannot write {path}: {source} (the join token was not used)")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Files could not be written after the controller enrolled us.
    #[error(
        "enrolled, but cannot write {path}: {source}; fix that and run the same join command again: the controller takes it as a retry of this join"
    )]
    AfterEnrol {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The default agent name: the hostname, cut down to the name alphabet.
pub fn default_name() -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cleaned: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if cleaned.is_empty() {
        "agent".into()
    } else {
        cleaned
    }
}

/// Enrols with the controller and writes the agent's state.
pub async fn join(req: JoinRequest) -> Result<AgentConfig, JoinError> {
    let name = req.name.clone().unwrap_or_else(default_name);
    identity::valid_name(&name).map_err(|e| JoinError::Usage(format!("--name: {e}")))?;
    let pin = tls::normalize_fingerprint(&req.ca_sha256);
    if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(JoinError::Usage(format!(
            "--ca-sha256 {:?}: expected 64 hex digits (the fingerprint `modi token create` prints)",
            req.ca_sha256
        )));
    }
    let config_path = req.data_dir.join(config::CONFIG_FILE);
    if config_path.exists() {
        return Err(JoinError::AlreadyJoined(req.data_dir.clone()));
    }
    let io = |path: PathBuf| move |source| JoinError::Io { path, source };
    // The key first: this proves the data dir can be written before the
    // token is spent. A key left by a join that failed after the
    // controller answered is used again, which makes this join a retry the
    // controller recognises (same token, name and key), not a new use.
    fsutil::private_dir(&req.data_dir).map_err(io(req.data_dir.clone()))?;
    let key_path = req.data_dir.join(config::KEY_FILE);
    let key = match std::fs::read_to_string(&key_path) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem).map_err(|e| {
            JoinError::Usage(format!(
                "{} holds no usable key ({e}); remove it and join again",
                key_path.display()
            ))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key =
                rcgen::KeyPair::generate().map_err(|e| JoinError::BadAnswer(e.to_string()))?;
            fsutil::write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
                .map_err(io(key_path.clone()))?;
            key
        }
        Err(e) => return Err(io(key_path.clone())(e)),
    };
    for probe in [config::CERT_FILE, config::CA_FILE, config::CONFIG_FILE] {
        let path = req.data_dir.join(probe);
        if path.is_dir() {
            return Err(io(path)(std::io::Error::other("a directory is in the way")));
        }
    }

    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name.clone());
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| JoinError::BadAnswer(format!("cannot make a CSR: {e}")))?;

    // Each controller in turn: one on standby (or down) sends us on.
    let mut answered = None;
    for url in std::iter::once(&req.controller).chain(&req.also) {
        let channel = tls::channel(url, Trust::Pin(&pin), None, config::CONNECT_TIMEOUT)
            .map_err(|e| JoinError::Usage(e.to_string()))?;
        let asked = AgentServiceClient::new(channel)
            .enroll(pb::EnrollRequest {
                token: req.token.clone(),
                csr_pem: csr.clone(),
                name: name.clone(),
                labels: req.labels.clone().into_iter().collect(),
            })
            .await;
        match asked {
            Ok(r) => {
                answered = Some(Ok(r.into_inner()));
                break;
            }
            Err(status) => {
                let failed = match status.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::DeadlineExceeded => JoinError::Unreachable {
                        url: url.clone(),
                        detail: crate::error_chain(&status),
                    },
                    _ => JoinError::Refused(status.message().to_string()),
                };
                let refused = matches!(failed, JoinError::Refused(_));
                answered = Some(Err(failed));
                if refused {
                    break;
                }
            }
        }
    }
    let response = answered.expect("at least one controller was asked")?;

    // Trust nothing in the answer that does not match what we pinned.
    let ca = tls::certs_from_pem("CA certificate", &response.ca_pem)
        .map_err(|e| JoinError::BadAnswer(e.to_string()))?;
    if identity::sha256_hex(&ca[0]) != pin {
        return Err(JoinError::BadAnswer(
            "the CA certificate sent does not match --ca-sha256".into(),
        ));
    }
    let cert = tls::certs_from_pem("agent certificate", &response.cert_pem)
        .map_err(|e| JoinError::BadAnswer(e.to_string()))?;
    let id = identity::expect_role(&cert[0], Role::Agent)
        .map_err(|e| JoinError::BadAnswer(e.to_string()))?;
    if id.name != name {
        return Err(JoinError::BadAnswer(format!(
            "certificate issued for {:?}, asked for {name:?}",
            id.name
        )));
    }

    // Enrolled from here on: a failure to write is finished by running
    // the same join again (the controller takes it as a retry).
    let write = |file: &str, bytes: &[u8], mode: u32| {
        let path = req.data_dir.join(file);
        fsutil::write_atomic(&path, bytes, mode)
            .map_err(|source| JoinError::AfterEnrol { path, source })
    };
    write(config::CERT_FILE, response.cert_pem.as_bytes(), 0o644)?;
    write(config::CA_FILE, response.ca_pem.as_bytes(), 0o644)?;
    let config = AgentConfig {
        controller: req.controller.clone(),
        controllers: req.also.clone(),
        name,
        labels: req.labels.clone(),
        work_dir: req.work_dir.clone(),
        heartbeat_secs: config::DEFAULT_HEARTBEAT_SECS,
        data_dir: req.data_dir.clone(),
    };
    config.save().map_err(|source| JoinError::AfterEnrol {
        path: config_path,
        source,
    })?;
    Ok(config)
}
