//! `modi token create`, `modi hosts`, `modi agents revoke`.

use modi_proto::v1 as pb;
use serde::Serialize;

use super::output::{table, when};
use super::{CliError, Client, Outcome, Output};

#[derive(Serialize)]
struct Token<'a> {
    token: &'a str,
    expires_at_ms: u64,
    join_command: &'a str,
    ca_sha256: &'a str,
    controller: &'a str,
}

/// Prints a new join token and the line to run on the new host.
pub async fn token(
    out: &Output,
    client: &Client,
    ttl: Option<String>,
) -> Result<Outcome, CliError> {
    let ttl_seconds = match ttl {
        Some(t) => humantime::parse_duration(&t)
            .map_err(|e| {
                CliError::Input(format!(
                    "--ttl {t:?}: expected a duration like 30m or 1h ({e})"
                ))
            })?
            .as_secs()
            .max(1),
        None => 0,
    };
    let r = client
        .admin()
        .create_token(pb::CreateTokenRequest { ttl_seconds })
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    let t = Token {
        token: &r.token,
        expires_at_ms: r.expires_at_ms,
        join_command: &r.join_command,
        ca_sha256: &r.ca_sha256,
        controller: &r.controller_url,
    };
    out.data(&t, || {
        format!(
            "One-time join token (expires {} UTC). On the new host run:\n\n  {}\n",
            when(r.expires_at_ms),
            r.join_command
        )
    });
    Ok(Outcome::Ok)
}

#[derive(Serialize)]
struct HostOut<'a> {
    name: &'a str,
    connected: bool,
    revoked: bool,
    labels: &'a std::collections::BTreeMap<String, String>,
    facts: &'a std::collections::BTreeMap<String, String>,
    last_seen_ms: u64,
    connected_since_ms: u64,
    enrolled_at_ms: u64,
}

/// Lists hosts.
pub async fn list(
    out: &Output,
    client: &Client,
    selector: Option<String>,
) -> Result<Outcome, CliError> {
    let hosts = client
        .admin()
        .list_hosts(pb::ListHostsRequest {
            selector: selector.unwrap_or_default(),
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner()
        .hosts;
    let json: Vec<HostOut> = hosts
        .iter()
        .map(|h| HostOut {
            name: &h.name,
            connected: h.connected,
            revoked: h.revoked,
            labels: &h.labels,
            facts: &h.facts,
            last_seen_ms: h.last_seen_ms,
            connected_since_ms: h.connected_since_ms,
            enrolled_at_ms: h.enrolled_at_ms,
        })
        .collect();
    out.data(&json, || {
        let rows: Vec<Vec<String>> = hosts
            .iter()
            .map(|h| {
                let fact = |k: &str| h.facts.get(k).cloned().unwrap_or_else(|| "-".into());
                vec![
                    h.name.clone(),
                    if h.revoked {
                        "revoked".into()
                    } else if h.connected {
                        "connected".into()
                    } else {
                        "away".into()
                    },
                    h.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(","),
                    fact("os"),
                    fact("arch"),
                    fact("cpus"),
                    when(h.last_seen_ms),
                ]
            })
            .collect();
        if rows.is_empty() {
            return "no hosts (enrol one: modi token create)".into();
        }
        table(
            &[
                "NAME",
                "STATE",
                "LABELS",
                "OS",
                "ARCH",
                "CPUS",
                "LAST SEEN (UTC)",
            ],
            &rows,
        )
    });
    Ok(Outcome::Ok)
}

/// Revokes an agent.
pub async fn revoke(out: &Output, client: &Client, name: String) -> Result<Outcome, CliError> {
    client
        .admin()
        .revoke_agent(pb::RevokeAgentRequest { name: name.clone() })
        .await
        .map_err(|s| client.error(s))?;
    out.data(&serde_json::json!({ "revoked": name }), || {
        format!("revoked {name}: it is refused from its next handshake on")
    });
    Ok(Outcome::Ok)
}
