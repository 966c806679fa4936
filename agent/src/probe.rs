//! Is this agent's certificate revoked? A bare TLS handshake that answers
//! it, for when a session could not be established.
//!
//! The controller refuses a revoked certificate at the handshake with the
//! `certificate_revoked` alert, but through the gRPC stack (hyper, h2) the
//! alert arrives as text, or not at all (a write can hit the closed
//! connection first). So the agent asks once more itself, with rustls
//! directly: handshake, then read; the alert comes back as a typed
//! `rustls::Error`, classified by type, never by message.

use std::sync::Arc;
use std::time::Duration;

use modi_proto::tls::{self, ClientIdentity, ControllerVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt;

/// How long the probe may take in all.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// True only if the controller at `url` says, with the
/// `certificate_revoked` alert, that `identity` is revoked. Any other
/// outcome (unreachable, timeout, another error) is `false`: retry.
pub async fn certificate_revoked(url: &str, ca_pem: &str, identity: &ClientIdentity) -> bool {
    tokio::time::timeout(PROBE_TIMEOUT, probe(url, ca_pem, identity))
        .await
        .unwrap_or(false)
}

async fn probe(url: &str, ca_pem: &str, identity: &ClientIdentity) -> bool {
    let Some(authority) = url
        .strip_prefix("https://")
        .map(|rest| rest.split('/').next().unwrap_or(rest))
    else {
        return false;
    };
    let host = match authority.rsplit_once(':') {
        Some((h, _)) => h,
        None => authority,
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:443")
    };
    let Ok(config) = client_config(ca_pem, identity) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(host) else {
        return false;
    };
    let Ok(tcp) = tokio::net::TcpStream::connect(&addr).await else {
        return false;
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut stream = match connector.connect(name, tcp).await {
        Ok(s) => s,
        Err(e) => return is_revoked(&e),
    };
    // TLS 1.3: the server judges our certificate after we finished; its
    // verdict is the next thing to read.
    let mut byte = [0u8; 1];
    match stream.read(&mut byte).await {
        Err(e) => is_revoked(&e),
        Ok(_) => false,
    }
}

fn is_revoked(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRevoked
        ))
    )
}

fn client_config(
    ca_pem: &str,
    identity: &ClientIdentity,
) -> Result<rustls::ClientConfig, Box<dyn std::error::Error>> {
    let ca = tls::certs_from_pem("CA certificate", ca_pem)?.remove(0);
    let chain = tls::certs_from_pem("agent certificate", &identity.cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())?;
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(ControllerVerifier::new(ca)?)
        .with_client_auth_cert(chain, key)?;
    Ok(config)
}
