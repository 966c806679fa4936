//! The one-line agent install: `modi serve` hands new hosts an install
//! script and the `modi-agent` binary of its own version, on its own TLS
//! port, next to the gRPC services.
//!
//! - `GET /install/{token}`: the script (`install/install.sh`), rendered for
//!   that token with the controller's URL, its CA's fingerprint (for the
//!   join), the pin of its TLS key (for every download) and the agent
//!   binary's SHA-256 (checked before anything runs).
//! - `GET /install/modi-agent`: the binary; `/install/modi-agent.sha256`
//!   its checksum.
//!
//! One port, not a second listener: the operator opens one port, the
//! certificate and the pin are the same, and there is nothing more to
//! configure. gRPC requests are HTTP/2 with a `/modi.v1.*` path; these
//! paths are plain GETs (HTTP/1.1 or 2) routed beside them. The line to
//! run is `curl --pinnedpubkey sha256//KEY -k URL | sh`: `-k` only skips
//! curl's CA check (the host does not have our CA yet); the pin still
//! refuses any server whose key is not the controller's.
//!
//! The binary served is found as [`locate_agent`] says, and must answer
//! `--version` with the controller's own version: a controller never hands
//! out an agent of another release.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::Path as UrlPath;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use sha2::Digest;

use crate::config::files;
use crate::server::Shared;

/// The install script, before rendering.
const SCRIPT: &str = include_str!("install/install.sh");
/// The agent's systemd unit, which the script writes with its own paths.
const UNIT: &str = include_str!("../../deploy/systemd/modi-agent.service");
/// The controller's (and so the agent's) version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The agent binary's file name.
pub const AGENT_BINARY: &str = "modi-agent";
/// How long `modi-agent --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Why there is no agent binary to run or serve.
#[derive(Debug, thiserror::Error)]
pub enum AgentBinaryError {
    /// Not found where it was looked for.
    #[error("cannot find {AGENT_BINARY}: looked at {}; install the modi-agent package, put modi-agent beside modi, or set agent_binary in controller.toml", looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NotFound {
        /// Every place looked at.
        looked: Vec<PathBuf>,
    },
    /// It is there but cannot be read or run.
    #[error("{path}: {detail}")]
    Unusable {
        /// The binary.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// It is another release.
    #[error(
        "{path} is {found:?}, but this controller is modi {VERSION}: it serves only its own version"
    )]
    WrongVersion {
        /// The binary.
        path: PathBuf,
        /// What `--version` said.
        found: String,
    },
}

/// Where `modi-agent` is: `configured` (controller.toml's `agent_binary`)
/// if given; else beside the running `modi`; else `../lib/modi/` from it
/// (where the modi package keeps the agent it serves); else on PATH.
pub fn locate_agent(configured: Option<&Path>) -> Result<PathBuf, AgentBinaryError> {
    if let Some(path) = configured {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(AgentBinaryError::NotFound {
                looked: vec![path.to_path_buf()],
            })
        };
    }
    let mut looked = Vec::new();
    if let Ok(me) = std::env::current_exe() {
        looked.push(me.with_file_name(AGENT_BINARY));
        if let Some(prefix) = me.parent().and_then(Path::parent) {
            looked.push(prefix.join("lib/modi").join(AGENT_BINARY));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        looked.extend(std::env::split_paths(&path).map(|dir| dir.join(AGENT_BINARY)));
    }
    looked
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or(AgentBinaryError::NotFound { looked })
}

/// The pin of the controller's TLS key, as curl's `--pinnedpubkey` takes
/// it: `sha256//` and the base64 SHA-256 of its SubjectPublicKeyInfo.
pub fn key_pin(cert_pem: &str) -> Result<String, crate::pki::PkiError> {
    let der = modi_proto::tls::certs_from_pem("controller certificate", cert_pem).map_err(|e| {
        crate::pki::PkiError::BadInput {
            what: "controller certificate",
            detail: e.to_string(),
        }
    })?;
    let hash = crate::pki::spki_sha256(&der[0])?;
    Ok(format!(
        "sha256//{}",
        base64::engine::general_purpose::STANDARD.encode(hash)
    ))
}

/// The one line to run on a new host for `token`, or why there is none.
pub fn command(shared: &Shared, token: &str) -> Result<String, String> {
    let cert = std::fs::read_to_string(shared.config.file(files::SERVER_CERT))
        .map_err(|e| format!("cannot read the controller certificate: {e}"))?;
    let pin = key_pin(&cert).map_err(|e| e.to_string())?;
    Ok(one_liner(&shared.config.advertise, &pin, token))
}

/// `curl ... | sh` for this controller URL, key pin and token.
pub fn one_liner(advertise: &str, pin: &str, token: &str) -> String {
    format!(
        "curl -fsS --pinnedpubkey '{pin}' -k {}/install/{token} | sh",
        advertise.trim_end_matches('/')
    )
}

/// The agent binary as last read: its bytes and checksum, and the file
/// state they were read at (a changed file is read again).
struct Loaded {
    path: PathBuf,
    stamp: (u64, Option<SystemTime>),
    bytes: bytes::Bytes,
    sha256: String,
}

/// What the install routes share.
struct Install {
    shared: Arc<Shared>,
    loaded: tokio::sync::Mutex<Option<Arc<Loaded>>>,
}

impl Install {
    /// The agent binary, read (and its version checked) when it changed.
    async fn agent(&self) -> Result<Arc<Loaded>, AgentBinaryError> {
        let path = locate_agent(self.shared.config.agent_binary.as_deref())?;
        let unusable = |detail: String| AgentBinaryError::Unusable {
            path: path.clone(),
            detail,
        };
        let meta = std::fs::metadata(&path).map_err(|e| unusable(e.to_string()))?;
        let stamp = (meta.len(), meta.modified().ok());
        let mut loaded = self.loaded.lock().await;
        if let Some(l) = loaded.as_ref()
            && l.path == path
            && l.stamp == stamp
        {
            return Ok(l.clone());
        }
        let output = tokio::time::timeout(
            VERSION_TIMEOUT,
            tokio::process::Command::new(&path)
                .arg("--version")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| unusable(format!("`--version` took longer than {VERSION_TIMEOUT:?}")))?
        .map_err(|e| unusable(format!("cannot run it: {e}")))?;
        let said = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if said != format!("{AGENT_BINARY} {VERSION}") {
            return Err(AgentBinaryError::WrongVersion { path, found: said });
        }
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| unusable(e.to_string()))?;
        let fresh = Arc::new(Loaded {
            sha256: hex::encode(sha2::Sha256::digest(&bytes)),
            bytes: bytes.into(),
            path,
            stamp,
        });
        tracing::info!(path = %fresh.path.display(), sha256 = %fresh.sha256, "serving this agent binary at /install");
        *loaded = Some(fresh.clone());
        Ok(fresh)
    }

    /// `GET /install/{token}`.
    async fn script(&self, token: &str) -> Response {
        match self.render(token).await {
            Ok(script) => text(StatusCode::OK, script),
            Err(why) => {
                tracing::warn!(error = %why, "install script refused");
                // A script that says why: `curl | sh` shows it.
                let quoted = shlex::try_quote(&why)
                    .map(|q| q.into_owned())
                    .unwrap_or_else(|_| "'the controller cannot serve the install script'".into());
                text(
                    StatusCode::OK,
                    format!("#!/bin/sh\necho modi install: error: {quoted} >&2\nexit 1\n"),
                )
            }
        }
    }

    async fn render(&self, token: &str) -> Result<String, String> {
        // Tokens are `mt_` and hex; nothing else reaches the script.
        if token.is_empty()
            || token.len() > 128
            || !token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err("this is not a join token".into());
        }
        let hash = crate::service::agent::token_hash(token);
        if self
            .shared
            .store
            .token(&hash)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            return Err("unknown join token (make one with: modi token create --install)".into());
        }
        let agent = self.agent().await.map_err(|e| e.to_string())?;
        let cert = std::fs::read_to_string(self.shared.config.file(files::SERVER_CERT))
            .map_err(|e| format!("cannot read the controller certificate: {e}"))?;
        let pin = key_pin(&cert).map_err(|e| e.to_string())?;
        Ok(render(&Rendering {
            controller: self.shared.config.advertise.trim_end_matches('/'),
            token,
            ca_sha256: &self.shared.ca.fingerprint(),
            pin: &pin,
            agent_sha256: &agent.sha256,
        }))
    }

    /// `GET /install/modi-agent` and `.../modi-agent.sha256`.
    async fn binary(&self, checksum: bool) -> Response {
        match self.agent().await {
            Ok(agent) if checksum => text(
                StatusCode::OK,
                format!("{}  {AGENT_BINARY}\n", agent.sha256),
            ),
            Ok(agent) => (
                [
                    (header::CONTENT_TYPE, "application/octet-stream".to_string()),
                    (header::CONTENT_LENGTH, agent.bytes.len().to_string()),
                ],
                agent.bytes.clone(),
            )
                .into_response(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot serve the agent binary");
                text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"))
            }
        }
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// What goes into a rendered script.
struct Rendering<'a> {
    controller: &'a str,
    token: &'a str,
    ca_sha256: &'a str,
    pin: &'a str,
    agent_sha256: &'a str,
}

/// The script for one token. Values go in shell-quoted; the unit goes into
/// an unquoted here-document, so the script's `$BIN` and `$DATA` (the paths
/// it installs to) replace the packaged paths.
fn render(r: &Rendering) -> String {
    let q = |v: &str| {
        shlex::try_quote(v)
            .map(|q| q.into_owned())
            .unwrap_or_else(|_| "''".into())
    };
    let unit = UNIT
        .replace("/usr/bin/modi-agent", "$BIN")
        .replace("/var/lib/modi-agent", "$DATA");
    SCRIPT
        .replace("@CONTROLLER_Q@", &q(r.controller))
        .replace("@TOKEN_Q@", &q(r.token))
        .replace("@CA_SHA256_Q@", &q(r.ca_sha256))
        .replace("@PIN_Q@", &q(r.pin))
        .replace("@AGENT_SHA256_Q@", &q(r.agent_sha256))
        .replace("@VERSION_Q@", &q(VERSION))
        .replace("@CONTROLLER@", r.controller)
        .replace("@PIN@", r.pin)
        .replace("@VERSION@", VERSION)
        .replace("@UNIT@", unit.trim_end())
}

/// Adds the install paths to the gRPC routes: the hook `server` calls.
pub fn routes(grpc: tonic::service::Routes, shared: Arc<Shared>) -> tonic::service::Routes {
    let install = Arc::new(Install {
        shared,
        loaded: tokio::sync::Mutex::new(None),
    });
    let (a, b, c) = (install.clone(), install.clone(), install);
    grpc.into_axum_router()
        .route(
            "/install/modi-agent",
            get(move || async move { a.binary(false).await }),
        )
        .route(
            "/install/modi-agent.sha256",
            get(move || async move { b.binary(true).await }),
        )
        .route(
            "/install/{token}",
            get(move |UrlPath(token): UrlPath<String>| async move { c.script(&token).await }),
        )
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_has_nothing_the_shell_would_expand() {
        // It goes into an unquoted here-document.
        assert!(!UNIT.contains(['$', '`', '\\']), "{UNIT}");
        assert!(UNIT.contains("ExecStart=/usr/bin/modi-agent run --config /var/lib/modi-agent/"));
        assert!(UNIT.contains("RestartPreventExitStatus=77 78"));
    }

    #[test]
    fn the_script_is_rendered_with_quoted_values_and_no_placeholder_left() {
        let script = render(&Rendering {
            controller: "https://ctl.example:7443",
            token: "mt_abc",
            ca_sha256: "00ff",
            pin: "sha256//AAA=",
            agent_sha256: "beef",
        });
        let placeholder = regex::Regex::new("@[A-Z0-9_]+@").unwrap();
        assert!(
            !placeholder.is_match(&script),
            "a placeholder is left:\n{script}"
        );
        assert!(script.contains("TOKEN=mt_abc\n"), "{script}");
        assert!(script.contains("PIN='sha256//AAA='\n"), "{script}");
        assert!(script.contains("ExecStart=$BIN run --config $DATA/agent.toml"));
        assert_eq!(
            one_liner("https://ctl.example:7443/", "sha256//AAA=", "mt_abc"),
            "curl -fsS --pinnedpubkey 'sha256//AAA=' -k https://ctl.example:7443/install/mt_abc | sh"
        );
    }
}
