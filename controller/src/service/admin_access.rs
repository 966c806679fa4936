//! The admin methods about who may do what: join tokens, host labels,
//! operators and the audit journal. The handlers in [`super::admin`]
//! delegate here; authorisation happened before (see [`super::authz`]).

use std::collections::BTreeMap;
use std::time::Duration;

use modi_proto::identity::Role;
use modi_proto::v1 as pb;
use tonic::{Response, Status};

use super::admin_convert as convert;
use super::authz::{AuditTarget, Caller};
use crate::server::Shared;
use crate::store::{OperatorRecord, OperatorRole, TokenRecord, access};

/// A response that names what it was about, for the audit journal.
pub fn audited<T>(message: T, target: String) -> Response<T> {
    let mut response = Response::new(message);
    response.extensions_mut().insert(AuditTarget(target));
    response
}

/// `modi token create`.
pub async fn create_token(
    shared: &Shared,
    by: &Caller,
    req: pb::CreateTokenRequest,
) -> Result<Response<pb::CreateTokenResponse>, Status> {
    let max = shared.config.max_token_ttl;
    let ttl = match req.ttl_seconds {
        0 => shared.config.token_ttl,
        s => Duration::from_secs(s),
    };
    if ttl > max {
        return Err(Status::invalid_argument(format!(
            "--ttl {}: longer than this controller allows ({}; max_token_ttl in controller.toml)",
            humantime::format_duration(ttl),
            humantime::format_duration(max)
        )));
    }
    let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
    crate::limits::check_labels(&labels).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let uses = req.uses.max(1);
    let token = format!("mt_{}", hex::encode(rand::random::<[u8; 24]>()));
    let hash = super::agent::token_hash(&token);
    let now = crate::clock::now();
    let expires_at = now + ttl.as_millis() as u64;
    shared
        .store
        .put_token(
            &hash,
            TokenRecord {
                created_at: now,
                expires_at,
                created_by: by.name.clone(),
                used_by: Vec::new(),
                uses,
                labels,
                revoked: false,
                joined: Vec::new(),
                used: 0,
            },
        )
        .await
        .map_err(convert::store_error)?;
    let id = access::token_id(&hash).to_string();
    let ca = shared.ca.fingerprint();
    let url = shared.config.advertise.clone();
    tracing::info!(by = %by.name, ttl = ?ttl, uses, %id, "join token created");
    let install_command = crate::install::command(shared, &token)
        .unwrap_or_else(|why| format!("# no install line: {why}"));
    Ok(audited(
        pb::CreateTokenResponse {
            join_command: format!(
                "modi-agent join --controller {url} --token {token} --ca-sha256 {ca}"
            ),
            token,
            expires_at_ms: expires_at,
            ca_sha256: ca,
            controller_url: url,
            id: id.clone(),
            uses,
            install_command,
        },
        format!("token {id}"),
    ))
}

/// `modi token list`.
pub fn list_tokens(shared: &Shared) -> Result<Response<pb::ListTokensResponse>, Status> {
    let tokens = shared
        .store
        .tokens()
        .map_err(convert::store_error)?
        .into_iter()
        .map(|(hash, t)| pb::TokenInfo {
            id: access::token_id(&hash).to_string(),
            created_at_ms: t.created_at,
            expires_at_ms: t.expires_at,
            created_by: t.created_by,
            uses: t.uses,
            used_by: t.used_by,
            labels: t.labels.into_iter().collect(),
            revoked: t.revoked,
        })
        .collect();
    Ok(Response::new(pb::ListTokensResponse { tokens }))
}

/// `modi token revoke ID`.
pub async fn revoke_token(
    shared: &Shared,
    req: pb::RevokeTokenRequest,
) -> Result<Response<pb::RevokeTokenResponse>, Status> {
    if !shared
        .store
        .revoke_token(&req.id)
        .await
        .map_err(convert::store_error)?
    {
        return Err(Status::not_found(format!(
            "no token with id {:?} (modi token list shows them)",
            req.id
        )));
    }
    Ok(audited(
        pb::RevokeTokenResponse {},
        format!("token {}", req.id),
    ))
}

/// `modi hosts label HOST k=v k2-`.
pub async fn label_host(
    shared: &Shared,
    req: pb::LabelHostRequest,
) -> Result<Response<pb::LabelHostResponse>, Status> {
    let set: BTreeMap<String, String> = req.set.into_iter().collect();
    crate::limits::check_labels(&set).map_err(|e| Status::invalid_argument(e.to_string()))?;
    // The labels the host will have are what is bounded.
    let mut after = shared
        .store
        .host(&req.name)
        .map_err(convert::store_error)?
        .ok_or_else(|| Status::not_found(format!("no host named {:?}", req.name)))?
        .labels;
    for key in &req.remove {
        after.remove(key);
    }
    after.extend(set.clone());
    crate::limits::check_labels(&after).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let host = shared
        .store
        .label_host(&req.name, set, req.remove)
        .await
        .map_err(convert::store_error)?
        .ok_or_else(|| Status::not_found(format!("no host named {:?}", req.name)))?;
    let presence = shared.fleet.presence();
    let target = format!(
        "host {} labels {}",
        host.name,
        host.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(audited(
        pb::LabelHostResponse {
            host: Some(convert::host(&host, presence.get(&host.name))),
        },
        target,
    ))
}

fn operator_cert(
    shared: &Shared,
    op: &OperatorRecord,
    issued: &crate::pki::Issued,
) -> pb::OperatorCert {
    pb::OperatorCert {
        name: op.name.clone(),
        role: op.role.to_string(),
        cert_pem: issued.cert_pem.clone(),
        ca_pem: shared.ca.cert_pem().to_string(),
        controller_url: shared.config.advertise.clone(),
        expires_at_ms: issued.expires_at,
    }
}

fn sign_operator(shared: &Shared, req: &pb::OperatorCsr) -> Result<crate::pki::Issued, Status> {
    shared
        .ca
        .sign_csr(
            &req.csr_pem,
            Role::Admin,
            &req.name,
            shared.config.operator_cert_lifetime,
        )
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// `modi operator add NAME --role R`.
pub async fn add_operator(
    shared: &Shared,
    by: &Caller,
    req: pb::OperatorCsr,
) -> Result<Response<pb::OperatorCert>, Status> {
    let role: OperatorRole = req.role.parse().map_err(Status::invalid_argument)?;
    let issued = sign_operator(shared, &req)?;
    let op = OperatorRecord {
        name: req.name.clone(),
        role,
        created_at: crate::clock::now(),
        created_by: by.name.clone(),
        serials: vec![issued.serial.clone()],
        cert_expires_at: issued.expires_at,
        revoked: false,
    };
    shared
        .store
        .add_operator(op.clone())
        .await
        .map_err(convert::store_error)?
        .map_err(|e| Status::already_exists(e.to_string()))?;
    tracing::info!(operator = %op.name, role = %role, by = %by.name, "operator added");
    Ok(audited(
        operator_cert(shared, &op, &issued),
        format!("operator {} ({role})", op.name),
    ))
}

/// `modi operator renew NAME`.
pub async fn renew_operator(
    shared: &Shared,
    req: pb::OperatorCsr,
) -> Result<Response<pb::OperatorCert>, Status> {
    let issued = sign_operator(shared, &req)?;
    let op = shared
        .store
        .renew_operator(&req.name, issued.serial.clone(), issued.expires_at)
        .await
        .map_err(convert::store_error)?
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    Ok(audited(
        operator_cert(shared, &op, &issued),
        format!("operator {}", op.name),
    ))
}

/// `modi operator list`.
pub fn list_operators(shared: &Shared) -> Result<Response<pb::ListOperatorsResponse>, Status> {
    let operators = shared
        .store
        .operators()
        .map_err(convert::store_error)?
        .into_iter()
        .map(|op| pb::Operator {
            name: op.name,
            role: op.role.to_string(),
            created_at_ms: op.created_at,
            created_by: op.created_by,
            revoked: op.revoked,
            cert_expires_at_ms: op.cert_expires_at,
        })
        .collect();
    Ok(Response::new(pb::ListOperatorsResponse { operators }))
}

/// `modi operator revoke NAME`: refused from its next call on.
pub async fn revoke_operator(
    shared: &Shared,
    by: &Caller,
    req: pb::RevokeOperatorRequest,
) -> Result<Response<pb::RevokeOperatorResponse>, Status> {
    if req.name == by.name {
        return Err(Status::failed_precondition(
            "an operator cannot revoke itself (another admin must)",
        ));
    }
    let op = shared
        .store
        .revoke_operator(&req.name, &by.name, crate::clock::now())
        .await
        .map_err(convert::store_error)?
        .ok_or_else(|| Status::not_found(format!("no operator named {:?}", req.name)))?;
    shared
        .revoked
        .write()
        .expect("revoked lock")
        .extend(op.serials.iter().cloned());
    tracing::warn!(operator = %op.name, by = %by.name, "operator revoked");
    Ok(audited(
        pb::RevokeOperatorResponse {},
        format!("operator {}", op.name),
    ))
}

/// `modi audit`.
pub fn list_audit(
    shared: &Shared,
    req: pb::ListAuditRequest,
) -> Result<Response<pb::ListAuditResponse>, Status> {
    let entries = shared
        .store
        .audit_entries(req.limit as usize)
        .map_err(convert::store_error)?
        .into_iter()
        .map(|e| pb::AuditEntry {
            at_ms: e.at,
            operator: e.operator,
            role: e.role,
            method: e.method,
            target: e.target,
            outcome: e.outcome,
        })
        .collect();
    Ok(Response::new(pb::ListAuditResponse { entries }))
}
