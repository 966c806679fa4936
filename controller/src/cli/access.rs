//! Who may do what: `modi token list|revoke`, `modi hosts label`,
//! `modi operator add|list|revoke|renew`, `modi audit`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use modi_proto::v1 as pb;
use serde::Serialize;

use super::output::{table, when};
use super::{CliError, Client, Outcome, Output};
use crate::config::CliConfig;

/// `modi token list`.
pub async fn list_tokens(out: &Output, client: &Client) -> Result<Outcome, CliError> {
    let tokens = client
        .admin()
        .list_tokens(pb::ListTokensRequest {})
        .await
        .map_err(|s| client.error(s))?
        .into_inner()
        .tokens;
    #[derive(Serialize)]
    struct Token<'a> {
        id: &'a str,
        created_at_ms: u64,
        expires_at_ms: u64,
        created_by: &'a str,
        uses: u32,
        used_by: &'a [String],
        labels: BTreeMap<&'a str, &'a str>,
        revoked: bool,
    }
    let json: Vec<Token> = tokens
        .iter()
        .map(|t| Token {
            id: &t.id,
            created_at_ms: t.created_at_ms,
            expires_at_ms: t.expires_at_ms,
            created_by: &t.created_by,
            uses: t.uses,
            used_by: &t.used_by,
            labels: t
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            revoked: t.revoked,
        })
        .collect();
    let now = crate::clock::now();
    out.data(&json, || {
        if tokens.is_empty() {
            return "no join tokens".into();
        }
        let rows: Vec<Vec<String>> = tokens
            .iter()
            .map(|t| {
                let state = if t.revoked {
                    "revoked"
                } else if t.used_by.len() >= t.uses.max(1) as usize {
                    "used"
                } else if t.expires_at_ms <= now {
                    "expired"
                } else {
                    "open"
                };
                vec![
                    t.id.clone(),
                    state.into(),
                    format!("{}/{}", t.used_by.len(), t.uses.max(1)),
                    when(t.expires_at_ms),
                    t.created_by.clone(),
                    labels_text(&t.labels),
                ]
            })
            .collect();
        table(
            &["ID", "STATE", "USED", "EXPIRES (UTC)", "BY", "LABELS"],
            &rows,
        )
    });
    Ok(Outcome::Ok)
}

fn labels_text<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    labels
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `modi token revoke ID`.
pub async fn revoke_token(out: &Output, client: &Client, id: String) -> Result<Outcome, CliError> {
    client
        .admin()
        .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
        .await
        .map_err(|s| client.error(s))?;
    out.data(&serde_json::json!({ "revoked": id }), || {
        format!("token {id} revoked: no host can join with it")
    });
    Ok(Outcome::Ok)
}

/// `modi hosts label HOST k=v k2-`.
pub async fn label_host(
    out: &Output,
    client: &Client,
    host: String,
    changes: Vec<String>,
) -> Result<Outcome, CliError> {
    if changes.is_empty() {
        return Err(CliError::Input(
            "modi hosts label HOST KEY=VALUE... KEY-...: nothing to change".into(),
        ));
    }
    let mut set = BTreeMap::new();
    let mut remove = Vec::new();
    for change in &changes {
        if let Some(key) = change.strip_suffix('-')
            && !change.contains('=')
        {
            remove.push(key.to_string());
        } else {
            set.extend(super::parse_pairs("label", std::slice::from_ref(change))?);
        }
    }
    let host = client
        .admin()
        .label_host(pb::LabelHostRequest {
            name: host,
            set: set.into_iter().collect(),
            remove,
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner()
        .host
        .unwrap_or_default();
    let labels: BTreeMap<&String, &String> = host.labels.iter().collect();
    out.data(
        &serde_json::json!({ "name": host.name, "labels": labels }),
        || {
            format!(
                "{}: {}",
                host.name,
                labels_text(labels.iter().map(|(k, v)| (*k, *v)))
            )
        },
    );
    Ok(Outcome::Ok)
}

/// A new key and its CSR; the key stays here.
fn key_and_csr(name: &str) -> Result<(String, String), CliError> {
    let key = rcgen::KeyPair::generate().map_err(|e| CliError::Failed(e.to_string()))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name.to_string());
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| CliError::Failed(format!("cannot make a CSR: {e}")))?;
    Ok((key.serialize_pem(), csr))
}

/// Writes an operator's CLI bundle: `cli.toml`, the CA, the certificate
/// and the key (0600), in a private folder.
fn write_bundle(
    dir: &Path,
    cert: &pb::OperatorCert,
    key_pem: &str,
    set: &[String],
) -> Result<PathBuf, CliError> {
    let io = |path: &Path, e: std::io::Error| {
        CliError::Failed(format!("cannot write {}: {e}", path.display()))
    };
    modi_common::fsutil::private_dir(dir).map_err(|e| io(dir, e))?;
    let write = |file: &str, bytes: &[u8], mode: u32| {
        let path = dir.join(file);
        modi_common::fsutil::write_atomic(&path, bytes, mode).map_err(|e| io(&path, e))
    };
    let (cert_file, key_file) = (format!("{}.pem", cert.name), format!("{}.key", cert.name));
    write(&key_file, key_pem.as_bytes(), 0o600)?;
    write(&cert_file, cert.cert_pem.as_bytes(), 0o644)?;
    write("ca.pem", cert.ca_pem.as_bytes(), 0o644)?;
    let config = CliConfig {
        controller: cert.controller_url.clone(),
        // The other controllers of the set the issuing CLI knows.
        controllers: set
            .iter()
            .filter(|u| **u != cert.controller_url)
            .cloned()
            .collect(),
        ca: PathBuf::from("ca.pem"),
        cert: Some(PathBuf::from(cert_file)),
        key: Some(PathBuf::from(key_file)),
    };
    let text = toml::to_string(&config).map_err(|e| CliError::Failed(e.to_string()))?;
    write("cli.toml", text.as_bytes(), 0o600)?;
    Ok(dir.join("cli.toml"))
}

fn print_bundle(out: &Output, cert: &pb::OperatorCert, path: &Path, verb: &str) {
    out.data(
        &serde_json::json!({
            "name": cert.name,
            "role": cert.role,
            "cli_config": path,
            "expires_at_ms": cert.expires_at_ms,
        }),
        || {
            format!(
                "operator {} ({}) {verb}; certificate valid until {} UTC.\nGive them the folder {} and have them run:\n\n  modi --cli-config {} hosts\n",
                cert.name,
                cert.role,
                when(cert.expires_at_ms),
                path.parent().unwrap_or(path).display(),
                path.display()
            )
        },
    );
}

/// `modi operator add NAME --role R [--out DIR]`.
pub async fn add_operator(
    out: &Output,
    client: &Client,
    name: String,
    role: String,
    dir: Option<PathBuf>,
) -> Result<Outcome, CliError> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(format!("modi-operator-{name}")));
    let (key_pem, csr_pem) = key_and_csr(&name)?;
    let cert = client
        .admin()
        .add_operator(pb::OperatorCsr {
            name,
            role,
            csr_pem,
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    let path = write_bundle(&dir, &cert, &key_pem, &client.set())?;
    print_bundle(out, &cert, &path, "added");
    Ok(Outcome::Ok)
}

/// `modi operator renew NAME [--out DIR]`.
pub async fn renew_operator(
    out: &Output,
    client: &Client,
    name: String,
    dir: Option<PathBuf>,
) -> Result<Outcome, CliError> {
    let dir = dir.unwrap_or_else(|| PathBuf::from(format!("modi-operator-{name}")));
    let (key_pem, csr_pem) = key_and_csr(&name)?;
    let cert = client
        .admin()
        .renew_operator(pb::OperatorCsr {
            name,
            role: String::new(),
            csr_pem,
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    let path = write_bundle(&dir, &cert, &key_pem, &client.set())?;
    print_bundle(out, &cert, &path, "renewed");
    Ok(Outcome::Ok)
}

/// `modi operator list`.
pub async fn list_operators(out: &Output, client: &Client) -> Result<Outcome, CliError> {
    let ops = client
        .admin()
        .list_operators(pb::ListOperatorsRequest {})
        .await
        .map_err(|s| client.error(s))?
        .into_inner()
        .operators;
    #[derive(Serialize)]
    struct Op<'a> {
        name: &'a str,
        role: &'a str,
        revoked: bool,
        created_by: &'a str,
        created_at_ms: u64,
        cert_expires_at_ms: u64,
    }
    let json: Vec<Op> = ops
        .iter()
        .map(|o| Op {
            name: &o.name,
            role: &o.role,
            revoked: o.revoked,
            created_by: &o.created_by,
            created_at_ms: o.created_at_ms,
            cert_expires_at_ms: o.cert_expires_at_ms,
        })
        .collect();
    out.data(&json, || {
        let rows: Vec<Vec<String>> = ops
            .iter()
            .map(|o| {
                vec![
                    o.name.clone(),
                    o.role.clone(),
                    if o.revoked { "revoked" } else { "active" }.into(),
                    if o.cert_expires_at_ms == 0 {
                        "-".into()
                    } else {
                        when(o.cert_expires_at_ms)
                    },
                    o.created_by.clone(),
                ]
            })
            .collect();
        table(
            &["NAME", "ROLE", "STATE", "CERT EXPIRES (UTC)", "ADDED BY"],
            &rows,
        )
    });
    Ok(Outcome::Ok)
}

/// `modi operator revoke NAME`.
pub async fn revoke_operator(
    out: &Output,
    client: &Client,
    name: String,
) -> Result<Outcome, CliError> {
    client
        .admin()
        .revoke_operator(pb::RevokeOperatorRequest { name: name.clone() })
        .await
        .map_err(|s| client.error(s))?;
    out.data(&serde_json::json!({ "revoked": name }), || {
        format!("operator {name} revoked: refused from its next call on")
    });
    Ok(Outcome::Ok)
}

/// `modi audit [--limit N]`.
pub async fn audit(out: &Output, client: &Client, limit: u32) -> Result<Outcome, CliError> {
    let entries = client
        .admin()
        .list_audit(pb::ListAuditRequest { limit })
        .await
        .map_err(|s| client.error(s))?
        .into_inner()
        .entries;
    #[derive(Serialize)]
    struct Entry<'a> {
        at_ms: u64,
        operator: &'a str,
        role: &'a str,
        method: &'a str,
        target: &'a str,
        outcome: &'a str,
    }
    let json: Vec<Entry> = entries
        .iter()
        .map(|e| Entry {
            at_ms: e.at_ms,
            operator: &e.operator,
            role: &e.role,
            method: &e.method,
            target: &e.target,
            outcome: &e.outcome,
        })
        .collect();
    out.data(&json, || {
        if entries.is_empty() {
            return "the audit journal is empty".into();
        }
        let rows: Vec<Vec<String>> = entries
            .iter()
            .map(|e| {
                vec![
                    when(e.at_ms),
                    format!("{} ({})", e.operator, e.role),
                    e.method.clone(),
                    e.target.clone(),
                    e.outcome.clone(),
                ]
            })
            .collect();
        table(&["WHEN (UTC)", "WHO", "WHAT", "ON", "OUTCOME"], &rows)
    });
    Ok(Outcome::Ok)
}

/// `modi version`: the CLI's version, and the controller's if it answers.
pub async fn version(out: &Output, config: Option<PathBuf>) -> Result<Outcome, CliError> {
    let cli = env!("CARGO_PKG_VERSION");
    let controller = match Client::connect(config).await {
        Ok(client) => client
            .admin()
            .version(pb::VersionRequest {})
            .await
            .map(|r| r.into_inner().version)
            .map_err(|s| client.error(s).to_string()),
        Err(e) => Err(e.to_string()),
    };
    out.data(
        &serde_json::json!({
            "cli": cli,
            "controller": controller.as_ref().ok(),
            "controller_error": controller.as_ref().err(),
        }),
        || match &controller {
            Ok(v) => format!("modi {cli}\ncontroller {v}"),
            Err(e) => format!("modi {cli}\ncontroller: unknown ({e})"),
        },
    );
    Ok(Outcome::Ok)
}

/// `modi ui`: a one-time sign-in link for the web view.
pub async fn web_login(out: &Output, client: &Client) -> Result<Outcome, CliError> {
    let r = client
        .admin()
        .web_login(pb::WebLoginRequest {})
        .await
        .map_err(|s| client.error(s))?
        .into_inner();
    out.data(
        &serde_json::json!({ "url": r.url, "expires_at_ms": r.expires_at_ms }),
        || {
            format!(
                "Open this link within 2 minutes to sign in to the web view (it works once):\n\n  {}\n\nThe browser must trust the controller's CA (ca.pem in its data folder) or be told to accept its certificate.\n",
                r.url
            )
        },
    );
    Ok(Outcome::Ok)
}
