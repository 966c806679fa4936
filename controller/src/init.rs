//! `modi init`: a controller's data dir, from nothing: the CA, the
//! controller's server certificate (SANs from `--address`), an admin
//! client certificate, `controller.toml` and `cli.toml`.

use std::path::{Path, PathBuf};

use modi_common::fsutil;
use modi_proto::identity::Role;

use crate::config::{self, CliConfig, ControllerFile, files};
use crate::pki::{self, Ca, PkiError};

/// What `modi init` was asked for.
#[derive(Clone, Debug)]
pub struct InitRequest {
    /// The data dir to create.
    pub data_dir: PathBuf,
    /// DNS names and IPs the controller is reached at; the first goes into
    /// join commands.
    pub addresses: Vec<String>,
    /// Listen address.
    pub listen: String,
    /// The admin certificate's name.
    pub admin_name: String,
    /// Also write the CLI config here (the default location) unless `None`.
    pub user_cli_config: Option<PathBuf>,
}

/// What `modi init` made.
#[derive(Clone, Debug)]
pub struct InitReport {
    /// The data dir.
    pub data_dir: PathBuf,
    /// The controller config file.
    pub controller_config: PathBuf,
    /// The CLI config in the data dir.
    pub cli_config: PathBuf,
    /// The user-level CLI config, if it was written.
    pub user_cli_config: Option<PathBuf>,
    /// SHA-256 of the CA certificate.
    pub ca_sha256: String,
    /// The URL agents dial.
    pub advertise: String,
}

/// Why `modi init` failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Would overwrite an existing controller.
    #[error("{0} already holds a controller (ca.key exists); refusing to overwrite it")]
    Exists(PathBuf),
    /// Bad input.
    #[error("{0}")]
    Usage(String),
    /// Certificates.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// Files.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<PathBuf, InitError> {
    let path = dir.join(name);
    fsutil::write_atomic(&path, bytes, mode).map_err(|source| InitError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Creates the data dir. Refuses to touch an existing controller.
pub fn init(req: &InitRequest) -> Result<InitReport, InitError> {
    let dir = &req.data_dir;
    if dir.join(files::CA_KEY).exists() {
        return Err(InitError::Exists(dir.clone()));
    }
    if req.addresses.is_empty() {
        return Err(InitError::Usage("--address: give at least one".into()));
    }
    let listen: std::net::SocketAddr = req
        .listen
        .parse()
        .map_err(|_| InitError::Usage(format!("--listen {:?}: expected IP:PORT", req.listen)))?;
    fsutil::private_dir(dir).map_err(|source| InitError::Io {
        path: dir.clone(),
        source,
    })?;
    let (ca, ca_key) = Ca::generate("modi CA")?;
    let server = ca.issue(
        Role::Controller,
        "controller",
        &req.addresses,
        pki::LEAF_LIFETIME.unsigned_abs(),
    )?;
    let admin = ca.issue(
        Role::Admin,
        &req.admin_name,
        &[],
        pki::OPERATOR_CERT_LIFETIME,
    )?;
    write(dir, files::CA_KEY, ca_key.as_bytes(), 0o600)?;
    write(dir, files::CA_CERT, ca.cert_pem().as_bytes(), 0o644)?;
    for (issued, cert, key) in [
        (&server, files::SERVER_CERT, files::SERVER_KEY),
        (&admin, files::ADMIN_CERT, files::ADMIN_KEY),
    ] {
        write(dir, cert, issued.cert_pem.as_bytes(), 0o644)?;
        let key_pem = issued.key_pem.as_deref().unwrap_or_default();
        write(dir, key, key_pem.as_bytes(), 0o600)?;
    }

    let host = &req.addresses[0];
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let advertise = format!("https://{host}:{}", listen.port());
    let controller = ControllerFile {
        data_dir: None,
        listen: req.listen.clone(),
        advertise: advertise.clone(),
        ..ControllerFile::default()
    };
    let controller_config = write(
        dir,
        config::CONTROLLER_FILE,
        toml::to_string_pretty(&controller)
            .expect("config serializes")
            .as_bytes(),
        0o644,
    )?;
    // Relative paths resolve against the config file's folder, so the copy
    // in the data dir survives the dir being moved; the user-level copy
    // points at the data dir absolutely.
    let cli = |base: &Path| CliConfig {
        controller: advertise.clone(),
        controllers: Vec::new(),
        ca: base.join(files::CA_CERT),
        cert: Some(base.join(files::ADMIN_CERT)),
        key: Some(base.join(files::ADMIN_KEY)),
    };
    let cli_text = |c: CliConfig| toml::to_string_pretty(&c).expect("config serializes");
    let cli_config = write(
        dir,
        config::CLI_FILE,
        cli_text(cli(Path::new(""))).as_bytes(),
        0o600,
    )?;
    let user_cli_config = match &req.user_cli_config {
        Some(path) => {
            let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
            let io = |source| InitError::Io {
                path: path.clone(),
                source,
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            fsutil::write_atomic(path, cli_text(cli(&abs)).as_bytes(), 0o600).map_err(io)?;
            Some(path.clone())
        }
        None => None,
    };
    Ok(InitReport {
        data_dir: dir.clone(),
        controller_config,
        cli_config,
        user_cli_config,
        ca_sha256: ca.fingerprint(),
        advertise,
    })
}
