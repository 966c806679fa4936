//! Who is calling: the identity in the peer's verified TLS certificate.

use modi_proto::identity::{self, Identity, IdentityError, Role};
use tonic::{Request, Status};

use crate::pki::{RevokedSerials, serial_of};

/// The caller's identity, which must carry `role` and must not have been
/// revoked (checked here too, not only at the handshake: a connection
/// opened before the revocation is refused from its next call). No
/// certificate is `unauthenticated`; a certificate for another role, or a
/// revoked one, is `permission_denied`.
pub fn require<T>(
    req: &Request<T>,
    role: Role,
    revoked: &RevokedSerials,
) -> Result<Identity, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated(format!(
            "this call needs a client certificate with the {role} role"
        ))
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    let id = identity::expect_role(leaf, role).map_err(|e| match e {
        IdentityError::WrongRole { .. } => Status::permission_denied(e.to_string()),
        other => Status::unauthenticated(other.to_string()),
    })?;
    let serial = serial_of(leaf).unwrap_or_default();
    if revoked.read().expect("revoked lock").contains(&serial) {
        tracing::warn!(%id, "refused a revoked certificate");
        return Err(Status::permission_denied(format!("{id} was revoked")));
    }
    Ok(id)
}
