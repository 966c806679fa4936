//! Who is calling: the identity in the peer's verified TLS certificate.

use modi_proto::identity::{self, Identity, IdentityError, Role};
use tonic::{Request, Status};

/// The caller's identity, which must carry `role`. No certificate is
/// `unauthenticated`; a certificate for another role is `permission_denied`.
pub fn require<T>(req: &Request<T>, role: Role) -> Result<Identity, Status> {
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated(format!(
            "this call needs a client certificate with the {role} role"
        ))
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
    identity::expect_role(leaf, role).map_err(|e| match e {
        IdentityError::WrongRole { .. } => Status::permission_denied(e.to_string()),
        other => Status::unauthenticated(other.to_string()),
    })
}
