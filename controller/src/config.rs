//! Typed configuration of the controller (`controller.toml`) and of the
//! CLI (`cli.toml`): defaults as named constants, then the file, then
//! flags. Errors name the file, the key and the value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Port the controller listens on by default.
pub const DEFAULT_PORT: u16 = 7443;
/// The controller's config file in its data dir.
pub const CONTROLLER_FILE: &str = "controller.toml";
/// The CLI config file `modi init` writes next to it.
pub const CLI_FILE: &str = "cli.toml";
/// Default lifetime of a join token.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// How long an agent may stay away while steps are in flight on it before
/// those steps are declared `lost`.
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(300);
/// The longest a join token may live (`--ttl`).
pub const DEFAULT_MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86400);
/// How long a backout waits for its host's agent to come back before it
/// is `backout_failed` and a human is alerted.
pub const DEFAULT_BACKOUT_WAIT: Duration = Duration::from_secs(3600);
/// How long an admin call may take before it is answered "deadline
/// exceeded" (streams count until their first answer).
pub const ADMIN_DEADLINE: Duration = Duration::from_secs(30);
/// How long `modi serve` waits for in-flight work when asked to stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Files in the controller's data dir.
pub mod files {
    /// CA certificate.
    pub const CA_CERT: &str = "ca.pem";
    /// CA key (0600).
    pub const CA_KEY: &str = "ca.key";
    /// Controller certificate.
    pub const SERVER_CERT: &str = "controller.pem";
    /// Controller key (0600).
    pub const SERVER_KEY: &str = "controller.key";
    /// Admin client certificate.
    pub const ADMIN_CERT: &str = "admin.pem";
    /// Admin client key (0600).
    pub const ADMIN_KEY: &str = "admin.key";
    /// The sled store.
    pub const DB: &str = "db";
}

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML, unknown key, wrong type (the message has line and column).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A key's value cannot work.
    #[error("{path}: key `{key}` = {value:?}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
        /// What was expected.
        why: String,
    },
}

fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn duration(path: &Path, key: &'static str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value).map_err(|e| ConfigError::Invalid {
        path: path.to_path_buf(),
        key,
        value: value.to_string(),
        why: format!("expected a duration like 30s, 5m or 1h ({e})"),
    })
}

/// `controller.toml` as written.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerFile {
    /// The data dir (default: the config file's folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on, e.g. `0.0.0.0:7443`.
    pub listen: String,
    /// The URL agents dial, put into join commands.
    pub advertise: String,
    /// Join token lifetime when `--ttl` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ttl: Option<String>,
    /// How long an agent may be away with steps in flight before they are
    /// `lost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_lost_after: Option<String>,
    /// How long a backout waits for its host to come back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backout_wait: Option<String>,
    /// The longest a join token may live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_token_ttl: Option<String>,
    /// Lifetime of agent certificates (renewed at two thirds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_cert_lifetime: Option<String>,
    /// Lifetime of operator certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_cert_lifetime: Option<String>,
    /// Address of the Prometheus metrics listener (plain HTTP, `/metrics`);
    /// off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Address of the web view (HTTPS with the controller's certificate);
    /// off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_listen: Option<String>,
    /// The web view's URL as browsers reach it, for `modi ui` (default:
    /// `https://` + the first `--address` the certificate names + the
    /// web_listen port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub web_url: Option<String>,
    /// The `modi-agent` binary `modi serve` hands out to new hosts at
    /// `/install/...` (default: found beside `modi`; it must be the
    /// controller's own version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_binary: Option<PathBuf>,
    /// Alerts ("a human must look").
    #[serde(default, skip_serializing_if = "AlertsFile::is_empty")]
    pub alerts: AlertsFile,
    /// Where the controller keeps its state (default: sled in the data
    /// dir).
    #[serde(default, skip_serializing_if = "StoreFile::is_default")]
    pub store: StoreFile,
    /// Inventory variables: the lowest layer of the template namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vars: BTreeMap<String, toml::Value>,
}

/// `[alerts]`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsFile {
    /// HTTP(S) URL that receives a JSON POST per alert.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// A command run through `/bin/sh -c` per alert, the JSON on stdin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

impl AlertsFile {
    fn is_empty(&self) -> bool {
        self.webhook.is_none() && self.command.is_none()
    }
}

/// `[store]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// `sled` (the default: embedded, one controller) or `etcd` (a set of
    /// controllers sharing one fleet).
    #[serde(default)]
    pub backend: StoreBackend,
    /// etcd's client URLs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    /// The key prefix in etcd (default `modi/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The CA of etcd's server certificate (PEM), for https endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// A client certificate for etcd (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// How long a dead controller's runs stay its own (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ttl: Option<String>,
}

/// Which store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// sled in the data dir.
    #[default]
    Sled,
    /// etcd.
    Etcd,
}

impl StoreFile {
    fn is_default(&self) -> bool {
        *self == StoreFile::default()
    }
}

/// The controller's checked configuration.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Where its CA, certs and store live.
    pub data_dir: PathBuf,
    /// Listen address.
    pub listen: String,
    /// URL agents dial.
    pub advertise: String,
    /// Default join token lifetime.
    pub token_ttl: Duration,
    /// See [`DEFAULT_LOST_AFTER`].
    pub agent_lost_after: Duration,
    /// See [`DEFAULT_BACKOUT_WAIT`].
    pub backout_wait: Duration,
    /// See [`DEFAULT_MAX_TOKEN_TTL`].
    pub max_token_ttl: Duration,
    /// See [`crate::pki::AGENT_CERT_LIFETIME`].
    pub agent_cert_lifetime: Duration,
    /// See [`crate::pki::OPERATOR_CERT_LIFETIME`].
    pub operator_cert_lifetime: Duration,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<String>,
    /// Where the web view is served, if anywhere.
    pub web_listen: Option<String>,
    /// The web view's URL for `modi ui`, if set.
    pub web_url: Option<String>,
    /// The agent binary to serve (see [`ControllerFile::agent_binary`]);
    /// relative to the config file's folder.
    pub agent_binary: Option<PathBuf>,
    /// Alert webhook.
    pub webhook: Option<String>,
    /// Alert command.
    pub alert_command: Option<String>,
    /// Inventory vars, as JSON.
    pub vars: serde_json::Map<String, serde_json::Value>,
    /// The etcd store, when `[store] backend = "etcd"` (else sled in the
    /// data dir).
    pub etcd: Option<crate::store::EtcdConfig>,
}

impl ControllerConfig {
    /// Loads and checks `path`.
    pub fn load(path: &Path) -> Result<ControllerConfig, ConfigError> {
        let file: ControllerFile = load_toml(path)?;
        let invalid = |key, value: &str, why: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            value: value.to_string(),
            why: why.to_string(),
        };
        if file.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "listen",
                &file.listen,
                "expected IP:PORT, e.g. 0.0.0.0:7443",
            ));
        }
        if !file.advertise.starts_with("https://") {
            return Err(invalid(
                "advertise",
                &file.advertise,
                "expected an https:// URL",
            ));
        }
        let token_ttl = match &file.token_ttl {
            Some(v) => duration(path, "token_ttl", v)?,
            None => DEFAULT_TOKEN_TTL,
        };
        let agent_lost_after = match &file.agent_lost_after {
            Some(v) => duration(path, "agent_lost_after", v)?,
            None => DEFAULT_LOST_AFTER,
        };
        let backout_wait = match &file.backout_wait {
            Some(v) => duration(path, "backout_wait", v)?,
            None => DEFAULT_BACKOUT_WAIT,
        };
        let max_token_ttl = match &file.max_token_ttl {
            Some(v) => duration(path, "max_token_ttl", v)?,
            None => DEFAULT_MAX_TOKEN_TTL,
        };
        let agent_cert_lifetime = match &file.agent_cert_lifetime {
            Some(v) => duration(path, "agent_cert_lifetime", v)?,
            None => crate::pki::AGENT_CERT_LIFETIME,
        };
        let operator_cert_lifetime = match &file.operator_cert_lifetime {
            Some(v) => duration(path, "operator_cert_lifetime", v)?,
            None => crate::pki::OPERATOR_CERT_LIFETIME,
        };
        for (key, value, d) in [
            ("token_ttl", &file.token_ttl, token_ttl),
            ("max_token_ttl", &file.max_token_ttl, max_token_ttl),
            (
                "agent_cert_lifetime",
                &file.agent_cert_lifetime,
                agent_cert_lifetime,
            ),
            (
                "operator_cert_lifetime",
                &file.operator_cert_lifetime,
                operator_cert_lifetime,
            ),
        ] {
            if d.is_zero() {
                return Err(invalid(
                    key,
                    value.as_deref().unwrap_or("0"),
                    "must be longer than 0",
                ));
            }
        }
        if token_ttl > max_token_ttl {
            return Err(invalid(
                "token_ttl",
                file.token_ttl.as_deref().unwrap_or_default(),
                "is longer than max_token_ttl",
            ));
        }
        if let Some(m) = &file.metrics_listen
            && m.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "metrics_listen",
                m,
                "expected IP:PORT, e.g. 127.0.0.1:9464",
            ));
        }
        if let Some(m) = &file.web_listen
            && m.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "web_listen",
                m,
                "expected IP:PORT, e.g. 127.0.0.1:8443",
            ));
        }
        if let Some(u) = &file.web_url
            && !u.starts_with("https://")
        {
            return Err(invalid("web_url", u, "expected an https:// URL"));
        }
        if let Some(w) = &file.alerts.webhook
            && !(w.starts_with("http://") || w.starts_with("https://"))
        {
            return Err(invalid(
                "alerts.webhook",
                w,
                "expected an http:// or https:// URL",
            ));
        }
        let etcd = match file.store.backend {
            StoreBackend::Sled => {
                if !file.store.endpoints.is_empty() {
                    return Err(invalid(
                        "store.endpoints",
                        &file.store.endpoints.join(", "),
                        "is for backend = \"etcd\"",
                    ));
                }
                None
            }
            StoreBackend::Etcd => {
                if file.store.endpoints.is_empty() {
                    return Err(invalid(
                        "store.endpoints",
                        "[]",
                        "name at least one etcd client URL, e.g. [\"http://127.0.0.1:2379\"]",
                    ));
                }
                for e in &file.store.endpoints {
                    if !(e.starts_with("http://") || e.starts_with("https://")) {
                        return Err(invalid(
                            "store.endpoints",
                            e,
                            "expected an http:// or https:// URL",
                        ));
                    }
                    if e.starts_with("https://") && file.store.ca.is_none() {
                        return Err(invalid("store.endpoints", e, "is https: give `ca` too"));
                    }
                }
                if file.store.cert.is_some() != file.store.key.is_some() {
                    return Err(invalid("store.cert", "", "cert and key go together"));
                }
                let lease_ttl = match &file.store.lease_ttl {
                    Some(v) => duration(path, "store.lease_ttl", v)?,
                    None => crate::store::etcd::DEFAULT_LEASE_TTL,
                };
                if lease_ttl < Duration::from_secs(2) {
                    return Err(invalid(
                        "store.lease_ttl",
                        file.store.lease_ttl.as_deref().unwrap_or_default(),
                        "must be at least 2s",
                    ));
                }
                let relative = |p: &PathBuf| match path.parent() {
                    Some(dir) if p.is_relative() => dir.join(p),
                    _ => p.clone(),
                };
                Some(crate::store::EtcdConfig {
                    endpoints: file.store.endpoints.clone(),
                    prefix: file
                        .store
                        .prefix
                        .clone()
                        .unwrap_or_else(|| crate::store::etcd::DEFAULT_PREFIX.into()),
                    ca: file.store.ca.as_ref().map(relative),
                    cert: file.store.cert.as_ref().map(relative),
                    key: file.store.key.as_ref().map(relative),
                    lease_ttl,
                })
            }
        };
        let vars = serde_json::to_value(&file.vars)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        Ok(ControllerConfig {
            data_dir: file.data_dir.clone().unwrap_or_else(|| {
                path.parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| PathBuf::from("."))
            }),
            listen: file.listen,
            advertise: file.advertise,
            token_ttl,
            agent_lost_after,
            backout_wait,
            max_token_ttl,
            agent_cert_lifetime,
            operator_cert_lifetime,
            metrics_listen: file.metrics_listen,
            web_listen: file.web_listen,
            web_url: file.web_url,
            agent_binary: file.agent_binary.map(|p| match path.parent() {
                Some(dir) if p.is_relative() => dir.join(p),
                _ => p,
            }),
            webhook: file.alerts.webhook,
            alert_command: file.alerts.command,
            vars,
            etcd,
        })
    }

    /// A file in the data dir.
    pub fn file(&self, name: &str) -> PathBuf {
        self.data_dir.join(name)
    }
}

/// `cli.toml`: how the CLI reaches the admin API.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    /// `https://host:port`.
    pub controller: String,
    /// The other controllers of its set: the CLI talks to whichever is
    /// active, and a `watch` or `logs --follow` moves to the next when
    /// its controller dies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
    /// The CA certificate to trust.
    pub ca: PathBuf,
    /// Admin client certificate (absent = connect without one, which the
    /// admin API refuses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

impl CliConfig {
    /// Loads `path`; relative file names resolve against its folder.
    pub fn load(path: &Path) -> Result<CliConfig, ConfigError> {
        let mut c: CliConfig = load_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        c.ca = base.join(&c.ca);
        c.cert = c.cert.map(|p| base.join(p));
        c.key = c.key.map(|p| base.join(p));
        if !c.controller.starts_with("https://") {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "controller",
                value: c.controller,
                why: "expected an https:// URL".into(),
            });
        }
        Ok(c)
    }
}

/// The data dir `modi init` uses by default: `/var/lib/modi` for root,
/// else `$XDG_DATA_HOME/modi` or `~/.local/share/modi`.
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/modi");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("modi");
    }
    home().join(".local/share/modi")
}

/// Where the CLI looks for its config when `--cli-config` is not given:
/// `$XDG_CONFIG_HOME/modi/cli.toml` or `~/.config/modi/cli.toml`.
pub fn default_cli_config() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("modi").join(CLI_FILE);
    }
    home().join(".config/modi").join(CLI_FILE)
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_config_errors_name_file_key_and_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONTROLLER_FILE);
        let write = |s: &str| std::fs::write(&path, s).unwrap();
        write("listen = \"nope\"\nadvertise = \"https://x:1\"\n");
        let e = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("controller.toml") && e.contains("`listen`") && e.contains("\"nope\""),
            "{e}"
        );
        write(
            "listen = \"127.0.0.1:1\"\nadvertise = \"https://x:1\"\nagent_lost_after = \"soon\"\n",
        );
        let e = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("`agent_lost_after`"), "{e}");
        write("listen = \"127.0.0.1:1\"\nadvertise = \"https://x:1\"\nbogus = 1\n");
        let e = ControllerConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        write("listen = \"127.0.0.1:1\"\nadvertise = \"https://x:1\"\n[vars]\ndc = \"eu\"\n");
        let c = ControllerConfig::load(&path).unwrap();
        assert_eq!(c.data_dir, dir.path());
        assert_eq!(c.vars["dc"], "eu");
        assert_eq!(c.agent_lost_after, DEFAULT_LOST_AFTER);
    }

    #[test]
    fn store_section_chooses_the_backend_and_names_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONTROLLER_FILE);
        let load = |store: &str| {
            std::fs::write(
                &path,
                format!("listen = \"127.0.0.1:1\"\nadvertise = \"https://x:1\"\n[store]\n{store}"),
            )
            .unwrap();
            ControllerConfig::load(&path).map_err(|e| e.to_string())
        };
        assert_eq!(load("").unwrap().etcd, None, "sled by default");
        assert_eq!(load("backend = \"sled\"\n").unwrap().etcd, None);
        let e = load("backend = \"etcd\"\n").unwrap_err();
        assert!(e.contains("`store.endpoints`"), "{e}");
        let e = load("backend = \"etcd\"\nendpoints = [\"https://e:2379\"]\n").unwrap_err();
        assert!(e.contains("give `ca` too"), "{e}");
        let e = load("backend = \"etcd\"\nendpoints = [\"e:2379\"]\n").unwrap_err();
        assert!(e.contains("\"e:2379\"") && e.contains("http://"), "{e}");
        let e = load("backend = \"sled\"\nendpoints = [\"http://e:2379\"]\n").unwrap_err();
        assert!(e.contains("is for backend = \"etcd\""), "{e}");
        let e = load("backend = \"postgres\"\n").unwrap_err();
        assert!(e.contains("postgres"), "{e}");
        let e = load("backend = \"etcd\"\nendpoints = [\"http://e:2379\"]\nlease_ttl = \"1s\"\n")
            .unwrap_err();
        assert!(
            e.contains("`store.lease_ttl`") && e.contains("at least 2s"),
            "{e}"
        );
        let c = load(
            "backend = \"etcd\"\nendpoints = [\"https://e1:2379\", \"https://e2:2379\"]\n\
             prefix = \"eu/\"\nca = \"etcd-ca.pem\"\nlease_ttl = \"10s\"\n",
        )
        .unwrap();
        let etcd = c.etcd.unwrap();
        assert_eq!(etcd.endpoints.len(), 2);
        assert_eq!(etcd.prefix, "eu/");
        assert_eq!(
            etcd.ca,
            Some(dir.path().join("etcd-ca.pem")),
            "relative to the file"
        );
        assert_eq!(etcd.lease_ttl, Duration::from_secs(10));
    }
}
