//! The client side of modi's trust scheme, shared by the agent and the CLI:
//! a TLS 1.3 channel to the controller that trusts only the pinned CA and
//! only a certificate carrying the controller role.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::identity::{self, Role};

/// What can go wrong setting up a channel.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// PEM that holds no certificate, or is malformed.
    #[error("{what}: no valid PEM certificate: {detail}")]
    BadPem {
        /// Which input.
        what: &'static str,
        /// The parser's complaint.
        detail: String,
    },
    /// The CA certificate cannot be a trust root.
    #[error("the CA certificate cannot be used as a trust root: {0}")]
    BadRoot(String),
    /// The controller URL is not usable.
    #[error("bad controller URL {url:?}: {detail}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        detail: String,
    },
}

/// The crypto provider every modi TLS config uses: ring.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM document.
pub fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what,
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadPem {
            what,
            detail: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// Checks the controller's certificate: it must chain to the pinned CA (the
/// usual WebPKI checks, including the server name) and carry the
/// controller role, so a stolen agent or admin certificate cannot pose as
/// the controller.
#[derive(Debug)]
pub struct ControllerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ControllerVerifier {
    /// Trusts `ca` alone.
    pub fn new(ca: CertificateDer<'static>) -> Result<Arc<Self>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots
            .add(ca)
            .map_err(|e| TlsError::BadRoot(e.to_string()))?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::BadRoot(e.to_string()))?;
        Ok(Arc::new(ControllerVerifier { inner }))
    }
}

impl ServerCertVerifier for ControllerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        identity::expect_role(end_entity, Role::Controller)
            .map_err(|e| rustls::Error::General(format!("controller certificate refused: {e}")))?;
        Ok(ServerCertVerified::assertion())
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

/// Trusts a controller whose presented chain contains a CA certificate with
/// this SHA-256 fingerprint: what `modi-agent join --ca-sha256` uses before
/// the agent holds the CA certificate itself. The leaf is then verified
/// against that CA exactly as [`ControllerVerifier`] does.
#[derive(Debug)]
pub struct PinnedVerifier {
    pin: String,
    schemes: Vec<SignatureScheme>,
}

impl PinnedVerifier {
    /// Pins `sha256_hex` (case-insensitive, `:` separators allowed).
    pub fn new(sha256_hex: &str) -> Arc<Self> {
        Arc::new(PinnedVerifier {
            pin: normalize_fingerprint(sha256_hex),
            schemes: provider()
                .signature_verification_algorithms
                .supported_schemes(),
        })
    }
}

/// Lowercase hex without separators.
pub fn normalize_fingerprint(hex: &str) -> String {
    hex.chars()
        .filter(|c| *c != ':')
        .flat_map(char::to_lowercase)
        .collect()
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| identity::sha256_hex(c) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "the controller's CA does not match the pinned fingerprint {} \
                     (check --ca-sha256)",
                    self.pin
                ))
            })?;
        let inner = ControllerVerifier::new(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// How a client decides to trust the controller.
pub enum Trust<'a> {
    /// The CA certificate (PEM) the client already holds.
    Ca(&'a str),
    /// Only a SHA-256 pin of the CA certificate (joining).
    Pin(&'a str),
}

/// A client certificate and its key, PEM.
#[derive(Clone)]
pub struct ClientIdentity {
    /// Certificate chain, PEM.
    pub cert_pem: String,
    /// Private key, PEM.
    pub key_pem: String,
}

/// A lazily-connecting channel to the controller at `url`
/// (`https://host:port`), trusting only what `trust` says and presenting
/// `client` if given.
pub fn channel(
    url: &str,
    trust: Trust<'_>,
    client: Option<&ClientIdentity>,
    connect_timeout: std::time::Duration,
) -> Result<Channel, TlsError> {
    let bad_url = |detail: String| TlsError::BadUrl {
        url: url.to_string(),
        detail,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        Trust::Ca(pem) => {
            ControllerVerifier::new(certs_from_pem("CA certificate", pem)?.remove(0))?
        }
        Trust::Pin(pin) => PinnedVerifier::new(pin),
    };
    let uri: tonic::codegen::http::Uri = url.parse().map_err(|e| bad_url(format!("{e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad_url("must start with https://".into()));
    }
    let host = uri
        .host()
        .ok_or_else(|| bad_url("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let mut tls = ClientTlsConfig::new().domain_name(host);
    if let Some(id) = client {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            &id.cert_pem,
            &id.key_pem,
        ));
    }
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| bad_url(e.to_string()))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .tls_config_with_verifier(tls, verifier)
        .map_err(|e| bad_url(e.to_string()))?;
    Ok(endpoint.connect_lazy())
}
