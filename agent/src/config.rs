//! The agent's typed configuration: defaults as named constants, then the
//! TOML file `modi-agent join` wrote, then flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where `modi-agent join` puts its state when `--data` is not given.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/modi-agent";
/// The config file inside the data dir.
pub const CONFIG_FILE: &str = "agent.toml";
/// The pinned CA certificate inside the data dir.
pub const CA_FILE: &str = "ca.pem";
/// The agent's certificate inside the data dir.
pub const CERT_FILE: &str = "agent.pem";
/// The agent's private key inside the data dir (mode 0600).
pub const KEY_FILE: &str = "agent.key";
/// The lock file inside the data dir: one agent per data dir.
pub const LOCK_FILE: &str = "agent.lock";
/// Default seconds between heartbeats.
pub const DEFAULT_HEARTBEAT_SECS: u64 = 10;
/// First reconnect delay.
pub const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// Longest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The longest wait between rounds of a set's controllers: a standby takes
/// over within its lease's TTL (5 s), and the agents follow a moment after.
pub const SET_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Exit status of `modi-agent run` on a host that has not joined (no
/// config, key or certificate): sysexits' EX_CONFIG. The systemd unit does
/// not restart on it (`RestartPreventExitStatus=`), nor does the install
/// script's supervisor loop.
pub const EXIT_NOT_ENROLLED: u8 = 78;
/// Exit status of `modi-agent run` when the controller refuses this agent
/// for good (revoked, or no longer enrolled): sysexits' EX_NOPERM. Not
/// restarted either: retrying cannot help.
pub const EXIT_REFUSED: u8 = 77;
/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's configuration file (`agent.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// `https://host:port` of the controller.
    pub controller: String,
    /// The other controllers of its set, if it has several: the agent
    /// moves on to the next when the one it uses dies or is on standby.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controllers: Vec<String>,
    /// The name in the agent's certificate.
    pub name: String,
    /// Labels the agent reports (selectors match on them).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where steps run by default; relative step paths resolve here.
    /// Defaults to `<data dir>/work`.
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    /// Seconds between heartbeats.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_secs: u64,
    /// The data dir (the config file's folder); not written to the file.
    #[serde(skip)]
    pub data_dir: PathBuf,
}

fn default_heartbeat() -> u64 {
    DEFAULT_HEARTBEAT_SECS
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown/mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key holds a value that cannot work.
    #[error("{path}: key `{key}` = {value:?}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// Its value.
        value: String,
        /// What was expected.
        why: String,
    },
}

impl AgentConfig {
    /// Every controller the agent knows, `controller` first.
    pub fn urls(&self) -> Vec<String> {
        std::iter::once(self.controller.clone())
            .chain(self.controllers.iter().cloned())
            .collect()
    }

    /// Loads `path` and checks it.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: AgentConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.data_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        config.check(path)?;
        Ok(config)
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, value: &str, why: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            value: value.to_string(),
            why,
        };
        if !self.controller.starts_with("https://") {
            return Err(invalid(
                "controller",
                &self.controller,
                "expected an https:// URL".into(),
            ));
        }
        if let Some(bad) = self.controllers.iter().find(|c| !c.starts_with("https://")) {
            return Err(invalid("controllers", bad, "expected https:// URLs".into()));
        }
        modi_proto::identity::valid_name(&self.name)
            .map_err(|e| invalid("name", &self.name, e.to_string()))?;
        if self.heartbeat_secs == 0 {
            return Err(invalid("heartbeat_secs", "0", "must be at least 1".into()));
        }
        Ok(())
    }

    /// Writes the config file into its data dir.
    pub fn save(&self) -> std::io::Result<()> {
        let text = toml::to_string_pretty(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(&self.data_dir.join(CONFIG_FILE), text.as_bytes(), 0o600)
    }

    /// Where steps run by default.
    pub fn work_dir(&self) -> PathBuf {
        self.work_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("work"))
    }

    /// Heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.heartbeat_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CONFIG_FILE);
        std::fs::write(&path, "controller = \"http://x:1\"\nname = \"a\"\n").unwrap();
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("agent.toml") && err.contains("`controller`"),
            "{err}"
        );

        std::fs::write(
            &path,
            "controller = \"https://x:1\"\nname = \"a\"\ncolour = 1\n",
        )
        .unwrap();
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("colour") && err.contains("line 3"), "{err}");

        std::fs::write(&path, "controller = \"https://x:1\"\nname = \"a b\"\n").unwrap();
        let err = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("`name`"), "{err}");
    }

    #[test]
    fn round_trips_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let config = AgentConfig {
            controller: "https://127.0.0.1:7443".into(),
            controllers: vec!["https://127.0.0.2:7443".into()],
            name: "web-1".into(),
            labels: [("role".to_string(), "web".to_string())].into(),
            work_dir: None,
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
            data_dir: dir.path().to_path_buf(),
        };
        config.save().unwrap();
        let loaded = AgentConfig::load(&dir.path().join(CONFIG_FILE)).unwrap();
        assert_eq!(loaded, config);
        assert_eq!(loaded.work_dir(), dir.path().join("work"));
    }
}
