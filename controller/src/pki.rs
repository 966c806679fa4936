//! The controller's own certificate authority, and the server side of the
//! trust scheme.
//!
//! Every certificate the CA issues carries its role and name as a
//! `modi://ROLE/NAME` URI (see `modi_proto::identity`) and the matching
//! extended key usage (server auth for the controller, client auth for
//! agents and admins). The server's client-certificate verifier accepts a
//! connection without a certificate (only `Enroll` serves those), and
//! otherwise demands a chain to our CA, an agent or admin role, and a serial
//! that has not been revoked.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use modi_proto::identity::{self, Role};
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName as RootHint, RootCertStore, SignatureScheme,
};
use time::{Duration, OffsetDateTime};

/// Lifetime of the CA certificate.
pub const CA_LIFETIME: Duration = Duration::days(20 * 365);
/// Lifetime of the controller's own server certificate.
pub const LEAF_LIFETIME: Duration = Duration::days(5 * 365);
/// Default lifetime of an agent's certificate (it renews its own over its
/// session when two thirds of it have passed).
pub const AGENT_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30 * 86400);
/// Default lifetime of an operator's certificate (`modi operator renew`).
pub const OPERATOR_CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(90 * 86400);
/// Certificates start this long before they are issued (or a tenth of
/// their lifetime, if less), so a host whose clock runs a little behind
/// still accepts them.
pub const BACKDATE: Duration = Duration::hours(1);

/// What can go wrong with keys and certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen could not build or sign something.
    #[error("certificate error: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A PEM input is unusable.
    #[error("{what}: {detail}")]
    BadInput {
        /// Which input.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// A certificate issued by the CA.
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM, when the CA made the key (controller, admin).
    pub key_pem: Option<String>,
    /// Its serial number (what revocation records).
    pub serial: Vec<u8>,
    /// When it expires (ms since the epoch).
    pub expires_at: u64,
}

/// The controller's CA: its certificate and signing key.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn random_serial() -> Vec<u8> {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and of full length
    bytes.to_vec()
}

impl Ca {
    /// Makes a new CA. Returns it and its key, PEM.
    pub fn generate(common_name: &str) -> Result<(Ca, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "modi");
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        let ca = Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        };
        Ok((ca, key_pem))
    }

    /// Loads a CA from its certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadInput {
            what: "CA key",
            detail: e.to_string(),
        })?;
        let cert_der = modi_proto::tls::certs_from_pem("CA certificate", cert_pem)
            .map_err(|e| PkiError::BadInput {
                what: "CA certificate",
                detail: e.to_string(),
            })?
            .remove(0);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            cert_der,
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// SHA-256 of the CA certificate, lowercase hex: what agents pin.
    pub fn fingerprint(&self) -> String {
        identity::sha256_hex(&self.cert_der)
    }

    fn leaf_params(
        role: Role,
        name: &str,
        addresses: &[String],
        lifetime: std::time::Duration,
    ) -> Result<(CertificateParams, u64), PkiError> {
        identity::valid_name(name).map_err(|e| PkiError::BadInput {
            what: "name",
            detail: e.to_string(),
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "modi");
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role.as_str());
        let uri = identity::uri(role, name)
            .try_into()
            .map_err(|e: rcgen::Error| PkiError::BadInput {
                what: "identity URI",
                detail: e.to_string(),
            })?;
        params.subject_alt_names.push(SanType::URI(uri));
        for address in addresses {
            let san =
                match address.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(address.clone().try_into().map_err(
                        |e: rcgen::Error| PkiError::BadInput {
                            what: "address",
                            detail: format!("{address:?}: {e}"),
                        },
                    )?),
                };
            params.subject_alt_names.push(san);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![match role {
            Role::Controller => ExtendedKeyUsagePurpose::ServerAuth,
            Role::Agent | Role::Admin => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        let now = OffsetDateTime::now_utc();
        let lifetime = Duration::try_from(lifetime).unwrap_or(LEAF_LIFETIME);
        params.not_before = now - BACKDATE.min(lifetime / 10);
        params.not_after = now + lifetime;
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.use_authority_key_identifier_extension = true;
        let expires_at = (params.not_after.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        Ok((params, expires_at))
    }

    /// Issues a certificate and a fresh key for `role`/`name`, valid for
    /// `lifetime`; `addresses` (DNS names or IPs) become SANs (for the
    /// controller).
    pub fn issue(
        &self,
        role: Role,
        name: &str,
        addresses: &[String],
        lifetime: std::time::Duration,
    ) -> Result<Issued, PkiError> {
        let (params, expires_at) = Self::leaf_params(role, name, addresses, lifetime)?;
        self.sign_new(params, expires_at)
    }

    /// Signs `params` for a fresh key.
    fn sign_new(&self, params: CertificateParams, expires_at: u64) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| s.to_bytes())
            .unwrap_or_default();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Some(key.serialize_pem()),
            serial,
            expires_at,
        })
    }

    /// Issues a relay certificate and a fresh key, valid for `lifetime`:
    /// the controller role, named [`RELAY_NAME`], for client use only (a
    /// standby controller of a set carries its agents' sessions to the
    /// active one with it; see `service::relay`). The server certificate
    /// cannot be used as a client.
    pub fn issue_relay(&self, lifetime: std::time::Duration) -> Result<Issued, PkiError> {
        let (mut params, expires_at) =
            Self::leaf_params(Role::Controller, RELAY_NAME, &[], lifetime)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_new(params, expires_at)
    }

    /// Signs a CSR (an agent's, or an operator's) for `lifetime`. Only the
    /// CSR's public key is used: the name, role and every extension come
    /// from us.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        role: Role,
        name: &str,
        lifetime: std::time::Duration,
    ) -> Result<Issued, PkiError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::BadInput {
                what: "CSR",
                detail: e.to_string(),
            })?;
        let (params, expires_at) = Self::leaf_params(role, name, &[], lifetime)?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| s.to_bytes())
            .unwrap_or_default();
        let cert = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: None,
            serial,
            expires_at,
        })
    }
}

/// Serial numbers refused at the handshake. Shared between the store (which
/// makes it durable) and the TLS verifier (which reads it on every
/// handshake).
pub type RevokedSerials = Arc<RwLock<HashSet<Vec<u8>>>>;

/// The serial number of a DER certificate.
pub fn serial_of(der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(cert.tbs_certificate.raw_serial().to_vec())
}

/// SHA-256 of a DER certificate's public key (its SubjectPublicKeyInfo):
/// what curl's `--pinnedpubkey sha256//...` pins, and how a retried
/// enrolment is told from a new one.
pub fn spki_sha256(der: &[u8]) -> Result<[u8; 32], PkiError> {
    use sha2::Digest;
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| {
        PkiError::BadInput {
            what: "certificate",
            detail: e.to_string(),
        }
    })?;
    Ok(sha2::Sha256::digest(cert.tbs_certificate.subject_pki.raw).into())
}

/// [`spki_sha256`] of the first certificate in `pem`, as hex.
pub fn key_sha256(pem: &str) -> Result<String, PkiError> {
    let der =
        modi_proto::tls::certs_from_pem("certificate", pem).map_err(|e| PkiError::BadInput {
            what: "certificate",
            detail: e.to_string(),
        })?;
    Ok(hex::encode(spki_sha256(&der[0])?))
}

/// The name of a relay certificate (see [`Ca::issue_relay`]).
pub const RELAY_NAME: &str = "relay";

/// Client certificates: optional (for `Enroll`), but if presented they
/// must chain to our CA, carry the agent or admin role (or be a set's
/// relay certificate), and for an agent not be revoked (a revoked operator is refused by every admin call, with
/// a message that says why).
#[derive(Debug)]
pub struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: RevokedSerials,
}

impl ClientVerifier {
    /// Trusts `ca` alone, refusing `revoked` serials.
    pub fn new(
        ca: CertificateDer<'static>,
        revoked: RevokedSerials,
    ) -> Result<Arc<Self>, PkiError> {
        let mut roots = RootCertStore::empty();
        roots.add(ca)?;
        let inner = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            modi_proto::tls::provider(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::BadInput {
            what: "client verifier",
            detail: e.to_string(),
        })?;
        Ok(Arc::new(ClientVerifier { inner, revoked }))
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[RootHint] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = identity::from_der(end_entity)
            .map_err(|e| rustls::Error::General(format!("client certificate refused: {e}")))?;
        if id.role == Role::Controller && id.name != RELAY_NAME {
            return Err(rustls::Error::General(
                "client certificate refused: the controller role cannot connect as a client".into(),
            ));
        }
        let serial = serial_of(end_entity).unwrap_or_default();
        // A revoked operator is let through the handshake only to be told,
        // call by call, that it was revoked (the admin API's authorisation
        // refuses it before anything runs); an agent is refused here, with
        // the certificate_revoked alert, which tells it why (so it stops
        // retrying instead of knocking for ever).
        if id.role == Role::Agent && self.revoked.read().expect("revoked lock").contains(&serial) {
            tracing::warn!("client certificate refused: {id} was revoked");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The controller's TLS 1.3 server configuration: it presents its
/// certificate *and* the CA (so a joining agent can match its pin), and
/// speaks HTTP/2 (gRPC) and HTTP/1.1 (the install paths).
pub fn server_config(
    ca: &Ca,
    cert_pem: &str,
    key_pem: &str,
    revoked: RevokedSerials,
) -> Result<rustls::ServerConfig, PkiError> {
    let (chain, key) = server_chain(ca, cert_pem, key_pem)?;
    let mut config = rustls::ServerConfig::builder_with_provider(modi_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(ClientVerifier::new(ca.cert_der().clone(), revoked)?)
        .with_single_cert(chain, key)?;
    // gRPC speaks HTTP/2; the install script and the agent binary are
    // fetched by curl, which may speak HTTP/1.1 only.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No resumption: a resumed session skips the client certificate check,
    // and with it the revocation check. Every connection shows its
    // certificate again.
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(config)
}

/// The web view's TLS: the controller's certificate, no client
/// certificate (browsers sign in with a session cookie instead).
pub fn web_server_config(
    ca: &Ca,
    cert_pem: &str,
    key_pem: &str,
) -> Result<rustls::ServerConfig, PkiError> {
    let (chain, key) = server_chain(ca, cert_pem, key_pem)?;
    let mut config = rustls::ServerConfig::builder_with_provider(modi_proto::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The controller's certificate with the CA behind it, and its key.
fn server_chain(
    ca: &Ca,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
    let mut chain =
        modi_proto::tls::certs_from_pem("controller certificate", cert_pem).map_err(|e| {
            PkiError::BadInput {
                what: "controller certificate",
                detail: e.to_string(),
            }
        })?;
    chain.truncate(1);
    chain.push(ca.cert_der().clone());
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| PkiError::BadInput {
            what: "controller key",
            detail: e.to_string(),
        })?;
    Ok((chain, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certs_carry_role_and_name_and_chain_to_the_ca() {
        let (ca, key) = Ca::generate("modi test CA").unwrap();
        let ca = Ca::load(ca.cert_pem(), &key).unwrap();
        let issued = ca
            .issue(
                Role::Controller,
                "ctl",
                &["localhost".into(), "127.0.0.1".into()],
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        let der = modi_proto::tls::certs_from_pem("x", &issued.cert_pem)
            .unwrap()
            .remove(0);
        let id = identity::from_der(&der).unwrap();
        assert_eq!((id.role, id.name.as_str()), (Role::Controller, "ctl"));
        assert_eq!(serial_of(&der).unwrap(), issued.serial);

        // A CSR's own subject and extensions are ignored.
        let agent_key = KeyPair::generate().unwrap();
        let mut req = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        req.distinguished_name.push(DnType::CommonName, "admin");
        let csr = req.serialize_request(&agent_key).unwrap().pem().unwrap();
        let issued = ca
            .sign_csr(&csr, Role::Agent, "web-1", AGENT_CERT_LIFETIME)
            .unwrap();
        let now_ms = crate::clock::now();
        let days = (issued.expires_at - now_ms) / 86_400_000;
        assert!(
            (29..=30).contains(&days),
            "an agent certificate lives 30 days: {days}"
        );
        let der = modi_proto::tls::certs_from_pem("x", &issued.cert_pem)
            .unwrap()
            .remove(0);
        let id = identity::from_der(&der).unwrap();
        assert_eq!((id.role, id.name.as_str()), (Role::Agent, "web-1"));
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans = parsed.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names.len(), 1, "only our identity URI");
    }

    #[test]
    fn bad_names_are_refused() {
        let (ca, _) = Ca::generate("modi test CA").unwrap();
        assert!(
            ca.issue(Role::Agent, "../x", &[], AGENT_CERT_LIFETIME)
                .is_err()
        );
    }
}
