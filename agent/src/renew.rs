//! Certificate renewal over the session: when two thirds of the agent's
//! certificate's life have passed, it makes a new key, sends a CSR up its
//! session, and installs the certificate that comes back, then reconnects
//! with it. The key never leaves the host.
//!
//! The pair is installed so that a crash never leaves a key and a
//! certificate that do not match: the new certificate goes to
//! `agent.pem.new`, then the new key to `agent.key.new` (0600), then the
//! key is renamed into place, then the certificate. [`recover`] finishes
//! an install a crash interrupted: a `.new` key means both are complete;
//! a `.new` certificate alone is installed only if it matches the key in
//! place.

use std::path::Path;
use std::sync::Mutex;

use modi_proto::identity::{self, Role};
use modi_proto::tls;

use crate::config;
use crate::fsutil;

/// The renewal state of one agent.
#[derive(Debug, Default)]
pub struct Renewal {
    /// The key of the CSR sent and not yet answered.
    pending: Mutex<Option<String>>,
}

/// When the certificate in `data_dir` is due for renewal (ms since the
/// epoch); `None` if it cannot be read.
pub fn due(data_dir: &Path) -> Option<u64> {
    let pem = std::fs::read_to_string(data_dir.join(config::CERT_FILE)).ok()?;
    let der = tls::certs_from_pem("agent certificate", &pem)
        .ok()?
        .into_iter()
        .next()?;
    let (from, until) = identity::validity(&der).ok()?;
    Some(identity::renew_at(from, until))
}

impl Renewal {
    /// A CSR for `name` with a new key, unless one is already waiting for
    /// its answer.
    pub fn request(&self, name: &str) -> Option<String> {
        let mut pending = self.pending.lock().expect("renewal lock");
        if pending.is_some() {
            return None;
        }
        let key = rcgen::KeyPair::generate().ok()?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name.to_string());
        let csr = params.serialize_request(&key).and_then(|c| c.pem()).ok()?;
        *pending = Some(key.serialize_pem());
        Some(csr)
    }

    /// Installs the certificate the controller sent for our CSR, after
    /// checking it is ours (role agent, our name). Returns whether it was
    /// installed.
    pub fn install(&self, data_dir: &Path, name: &str, cert_pem: &str) -> Result<(), String> {
        let Some(key) = self.pending.lock().expect("renewal lock").take() else {
            return Err("a certificate came without a renewal request; ignored".into());
        };
        let der = tls::certs_from_pem("renewed certificate", cert_pem)
            .map_err(|e| e.to_string())?
            .remove(0);
        let id = identity::expect_role(&der, Role::Agent).map_err(|e| e.to_string())?;
        if id.name != name {
            return Err(format!(
                "renewed certificate is for {:?}, not {name:?}; ignored",
                id.name
            ));
        }
        let (cert_new, key_new) = new_paths(data_dir);
        let io = |what: &str, e: std::io::Error| format!("cannot install the renewed {what}: {e}");
        fsutil::write_atomic(&cert_new, cert_pem.as_bytes(), 0o644)
            .map_err(|e| io("certificate", e))?;
        fsutil::write_atomic(&key_new, key.as_bytes(), 0o600).map_err(|e| io("key", e))?;
        recover(data_dir).map_err(|e| io("pair", e))
    }
}

fn new_paths(data_dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    (
        data_dir.join(format!("{}.new", config::CERT_FILE)),
        data_dir.join(format!("{}.new", config::KEY_FILE)),
    )
}

/// Does the certificate in `cert_pem` carry the public key of `key_pem`?
fn matches(cert_pem: &str, key_pem: &str) -> bool {
    let Ok(key) = rcgen::KeyPair::from_pem(key_pem) else {
        return false;
    };
    let Some(der) = tls::certs_from_pem("certificate", cert_pem)
        .ok()
        .and_then(|c| c.into_iter().next())
    else {
        return false;
    };
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(&der).is_ok_and(|(_, cert)| {
        cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw()
    })
}

/// Finishes a renewal a crash interrupted (see the module docs); does
/// nothing when none was under way.
pub fn recover(data_dir: &Path) -> std::io::Result<()> {
    let (cert_new, key_new) = new_paths(data_dir);
    let key = data_dir.join(config::KEY_FILE);
    let cert = data_dir.join(config::CERT_FILE);
    if key_new.exists() {
        std::fs::rename(&key_new, &key)?;
        fsutil::sync_parent(&key)?;
    }
    if cert_new.exists() {
        let new = std::fs::read_to_string(&cert_new)?;
        let key_pem = std::fs::read_to_string(&key)?;
        if matches(&new, &key_pem) {
            std::fs::rename(&cert_new, &cert)?;
        } else {
            // Written before its key: that renewal never happened.
            std::fs::remove_file(&cert_new)?;
        }
        fsutil::sync_parent(&cert)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["x".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn an_interrupted_install_ends_with_a_matching_pair() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let (old_cert, old_key) = pair();
        let (new_cert, new_key) = pair();
        let (cert_new, key_new) = new_paths(d);
        let put = |p: &Path, s: &str| std::fs::write(p, s).unwrap();
        let cert = d.join(config::CERT_FILE);
        let key = d.join(config::KEY_FILE);

        // Crashed after writing the new certificate only: dropped.
        put(&cert, &old_cert);
        put(&key, &old_key);
        put(&cert_new, &new_cert);
        recover(d).unwrap();
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), old_cert);
        assert!(!cert_new.exists());

        // Crashed with both written: both installed.
        put(&cert_new, &new_cert);
        put(&key_new, &new_key);
        recover(d).unwrap();
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), new_cert);
        assert_eq!(std::fs::read_to_string(&key).unwrap(), new_key);

        // Crashed after the key was renamed: the certificate follows.
        let (newer_cert, newer_key) = pair();
        put(&key, &newer_key);
        put(&cert_new, &newer_cert);
        recover(d).unwrap();
        assert_eq!(std::fs::read_to_string(&cert).unwrap(), newer_cert);
        assert!(matches(&newer_cert, &newer_key) && !matches(&newer_cert, &new_key));
    }
}
