//! Identity in certificates: every certificate modi's CA issues carries
//! exactly one URI subject-alternative name `modi://ROLE/NAME`. The role says
//! what the holder may do (serve as controller, run steps as an agent, call
//! the admin API); the name is who it is. Both ends read it from the peer's
//! certificate after the TLS handshake has checked the chain.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// What a certificate's holder may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Serves the agent and admin APIs.
    Controller,
    /// Runs steps on its host; speaks only for its own name.
    Agent,
    /// Operates the controller through the admin API.
    Admin,
}

impl Role {
    /// The role's name in certificates and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Agent => "agent",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "controller" => Ok(Role::Controller),
            "agent" => Ok(Role::Agent),
            "admin" => Ok(Role::Admin),
            other => Err(IdentityError::UnknownRole(other.to_string())),
        }
    }
}

/// The role and name a certificate was issued for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What the holder may do.
    pub role: Role,
    /// Who it is (agent and admin names, or the controller's name).
    pub name: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.role, self.name)
    }
}

/// Why a certificate carries no usable identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// Not a parseable X.509 certificate.
    #[error("the certificate cannot be parsed: {0}")]
    Malformed(String),
    /// No `modi://ROLE/NAME` URI in its subject alternative names.
    #[error("the certificate carries no modi identity (no modi://ROLE/NAME name)")]
    Missing,
    /// More than one identity: refused rather than guessed.
    #[error("the certificate carries more than one modi identity")]
    Ambiguous,
    /// A role other than controller, agent, admin.
    #[error("unknown role {0:?} (expected controller, agent or admin)")]
    UnknownRole(String),
    /// A name outside [`valid_name`]'s alphabet.
    #[error("invalid name {0:?}: {1}")]
    BadName(String, &'static str),
    /// The role is not the one this connection needs.
    #[error("certificate is for {found}, but this needs the {expected} role")]
    WrongRole {
        /// The role needed.
        expected: Role,
        /// The role presented.
        found: Identity,
    },
}

const SCHEME: &str = "modi://";

/// The URI SAN that encodes `role` and `name`.
pub fn uri(role: Role, name: &str) -> String {
    format!("{SCHEME}{role}/{name}")
}

/// Checks a host or admin name: 1 to 63 characters, ASCII letters, digits,
/// `.`, `_` and `-`, starting with a letter or digit. Names end up in
/// certificates, dispatch ids, file names and selectors, so they stay
/// boring.
pub fn valid_name(name: &str) -> Result<(), IdentityError> {
    let bad = |why| Err(IdentityError::BadName(name.to_string(), why));
    if name.is_empty() || name.len() > 63 {
        return bad("must be 1 to 63 characters");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return bad("must start with a letter or digit");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// Reads the identity from a DER certificate. Does not check the chain:
/// call it only on a certificate the TLS handshake has already verified.
pub fn from_der(der: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let mut found = None;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Malformed(e.to_string()))?;
    for name in san.iter().flat_map(|san| san.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(rest) = uri.strip_prefix(SCHEME) else {
            continue;
        };
        if found.is_some() {
            return Err(IdentityError::Ambiguous);
        }
        let (role, name) = rest.split_once('/').ok_or(IdentityError::Missing)?;
        let role: Role = role.parse()?;
        valid_name(name)?;
        found = Some(Identity {
            role,
            name: name.to_string(),
        });
    }
    found.ok_or(IdentityError::Missing)
}

/// When a DER certificate starts and stops being valid, in milliseconds
/// since the UNIX epoch.
pub fn validity(der: &[u8]) -> Result<(u64, u64), IdentityError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
    let v = cert.validity();
    let ms = |t: i64| (t.max(0) as u64) * 1000;
    Ok((ms(v.not_before.timestamp()), ms(v.not_after.timestamp())))
}

/// When a certificate valid from `not_before` to `not_after` (ms) is due
/// for renewal: once two thirds of its life have passed.
pub fn renew_at(not_before: u64, not_after: u64) -> u64 {
    not_before + not_after.saturating_sub(not_before) / 3 * 2
}

/// Reads the identity and insists on `role`.
pub fn expect_role(der: &[u8], role: Role) -> Result<Identity, IdentityError> {
    let id = from_der(der)?;
    if id.role != role {
        return Err(IdentityError::WrongRole {
            expected: role,
            found: id,
        });
    }
    Ok(id)
}

/// The lowercase hex SHA-256 of a DER certificate: what `--ca-sha256` pins.
pub fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("web-01.example_a").is_ok());
        assert!(valid_name("").is_err());
        assert!(valid_name("-web").is_err());
        assert!(valid_name("web/01").is_err());
        assert!(valid_name("web 01").is_err());
        assert!(valid_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn roles_round_trip() {
        for r in [Role::Controller, Role::Agent, Role::Admin] {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().is_err());
        assert_eq!(uri(Role::Agent, "web-1"), "modi://agent/web-1");
    }
}
