//! `modi token create`, `modi hosts`, `modi agents revoke`.

use modi_proto::v1 as pb;
use serde::Serialize;

use super::output::{table, when};
use super::{CliError, Client, Outcome, Output};

#[derive(Serialize)]
struct Token<'a> {
    id: &'a str,
    uses: u32,
    token: &'a str,
    expires_at_ms: u64,
    join_command: &'a str,
    install_command: &'a str,
    ca_sha256: &'a str,
    controller: &'a str,
}

/// Prints a new join token and the line to run on the new host: the join
/// command, or with `install` the one-line install (`curl ... | sh`).
pub async fn token(
    out: &Output,
    client: &Client,
    ttl: Option<String>,
    labels: std::collections::BTreeMap<String, String>,
    uses: u32,
    install: bool,
) -> Result<Outcome, CliError> {
    let ttl_seconds = match ttl {
        Some(t) => {
            let d = humantime::parse_duration(&t).map_err(|e| {
                CliError::Input(format!(
                    "--ttl {t:?}: expected a duration like 30m or 1h ({e})"
                ))
            })?;
            if d.as_secs() == 0 {
                return Err(CliError::Input(format!(
                    "--ttl {t:?}: a token must live at least a second"
                )));
            }
            d.as_secs()
        }
        None => 0,
    };
    if uses == 0 {
        return Err(CliError::Input(
            "--uses 0: a token must work at least once".into(),
        ));
    }
    let r = client
        .admin()
        .create_token(pb::CreateTokenRequest {
            ttl_seconds,
            labels: labels.into_iter().collect(),
            uses,
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    let t = Token {
        id: &r.id,
        uses: r.uses,
        token: &r.token,
        expires_at_ms: r.expires_at_ms,
        join_command: &r.join_command,
        install_command: &r.install_command,
        ca_sha256: &r.ca_sha256,
        controller: &r.controller_url,
    };
    out.data(&t, || {
        let uses = match r.uses {
            0 | 1 => "One-time join token".to_string(),
            n => format!("Join token for {n} hosts"),
        };
        if install {
            format!(
                "{uses} {} (expires {} UTC). On each new host, as root:\n\n  {}\n\n\
                 It downloads modi-agent from this controller (pinned to its key), verifies it, \
                 joins and starts it. Join options go after `sh -s --`, e.g. `| sh -s -- --name web-01`.\n",
                r.id,
                when(r.expires_at_ms),
                r.install_command
            )
        } else {
            format!(
                "{uses} {} (expires {} UTC). On the new host run:\n\n  {}\n",
                r.id,
                when(r.expires_at_ms),
                r.join_command
            )
        }
    });
    Ok(Outcome::Ok)
}

#[derive(Serialize)]
struct HostOut<'a> {
    name: &'a str,
    connected: bool,
    revoked: bool,
    state: &'static str,
    labels: &'a std::collections::BTreeMap<String, String>,
    facts: &'a std::collections::BTreeMap<String, String>,
    last_seen_ms: u64,
    connected_since_ms: u64,
    enrolled_at_ms: u64,
    certificates: u32,
    cert_expires_at_ms: u64,
}

/// A host's state for people: connected, away, never (enrolled but never
/// connected) or revoked.
pub(crate) fn host_state(h: &pb::Host) -> &'static str {
    if h.revoked {
        "revoked"
    } else if h.connected {
        "connected"
    } else if h.last_seen_ms == 0 {
        "never"
    } else {
        "away"
    }
}

/// Lists hosts, then how many are in each state.
pub async fn list(
    out: &Output,
    client: &Client,
    selector: Option<String>,
    state: Option<String>,
) -> Result<Outcome, CliError> {
    const STATES: [&str; 4] = ["connected", "away", "never", "revoked"];
    if let Some(s) = &state
        && !STATES.contains(&s.as_str())
    {
        return Err(CliError::Input(format!(
            "--state {s:?}: expected one of {}",
            STATES.join(", ")
        )));
    }
    let all = client
        .admin()
        .list_hosts(pb::ListHostsRequest {
            selector: selector.unwrap_or_default(),
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner()
        .hosts;
    let mut counts = std::collections::BTreeMap::new();
    for h in &all {
        *counts.entry(host_state(h)).or_insert(0usize) += 1;
    }
    let hosts: Vec<&pb::Host> = all
        .iter()
        .filter(|h| state.as_deref().is_none_or(|s| s == host_state(h)))
        .collect();
    let json: Vec<HostOut> = hosts
        .iter()
        .map(|h| HostOut {
            name: &h.name,
            connected: h.connected,
            revoked: h.revoked,
            state: host_state(h),
            labels: &h.labels,
            facts: &h.facts,
            last_seen_ms: h.last_seen_ms,
            connected_since_ms: h.connected_since_ms,
            enrolled_at_ms: h.enrolled_at_ms,
            certificates: h.certificates,
            cert_expires_at_ms: h.cert_expires_at_ms,
        })
        .collect();
    out.data(&json, || {
        let rows: Vec<Vec<String>> = hosts
            .iter()
            .map(|h| {
                let fact = |k: &str| h.facts.get(k).cloned().unwrap_or_else(|| "-".into());
                vec![
                    h.name.clone(),
                    host_state(h).into(),
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
        if all.is_empty() {
            return "no hosts (enrol one: modi token create)".into();
        }
        let summary: Vec<String> = STATES
            .iter()
            .filter_map(|s| counts.get(s).map(|n| format!("{n} {s}")))
            .collect();
        let summary = format!(
            "\n{}: {}\n",
            super::runs::plural(all.len(), "host"),
            summary.join(", ")
        );
        if rows.is_empty() {
            return format!("no hosts match{summary}");
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
        ) + &summary
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

/// Forgets a host.
pub async fn remove(out: &Output, client: &Client, name: String) -> Result<Outcome, CliError> {
    client
        .admin()
        .remove_agent(pb::RevokeAgentRequest { name: name.clone() })
        .await
        .map_err(|s| client.error(s))?;
    out.data(&serde_json::json!({ "removed": name }), || {
        format!("removed {name}: its certificates are revoked; it can join again with a new token")
    });
    Ok(Outcome::Ok)
}
