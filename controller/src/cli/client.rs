//! The CLI's connection to the admin API.

use std::path::PathBuf;
use std::time::Duration;

use modi_proto::tls::{self, ClientIdentity, Trust};
use modi_proto::v1::admin_service_client::AdminServiceClient;
use tonic::transport::Channel;

use super::CliError;
use crate::config::{self, CliConfig};

/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a controller of a set may take to say whether it is active.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a `watch` or `logs --follow` looks for the next active
/// controller of a set (a standby takes over within its lease's TTL).
pub const FAILOVER_WITHIN: Duration = Duration::from_secs(30);

/// An admin API client and where it points.
#[derive(Clone)]
pub struct Client {
    admin: AdminServiceClient<Channel>,
    channel: Channel,
    url: String,
    /// What it was made from (every controller of a set).
    config: std::sync::Arc<CliConfig>,
}

impl Client {
    /// Connects (lazily) using the CLI config at `path`, or the default one.
    pub async fn connect(path: Option<PathBuf>) -> Result<Client, CliError> {
        let path = path.unwrap_or_else(config::default_cli_config);
        let config = CliConfig::load(&path).map_err(|e| {
            CliError::Input(match e {
                config::ConfigError::Read { .. } => format!(
                    "{e}\nno CLI config: run `modi init` on the controller, or pass --cli-config FILE"
                ),
                other => other.to_string(),
            })
        })?;
        if config.controllers.is_empty() {
            return Client::from_config(&config);
        }
        Client::pick(&config).await
    }

    /// Connects (lazily) to `config.controller`.
    pub fn from_config(config: &CliConfig) -> Result<Client, CliError> {
        Client::to(config, &config.controller)
    }

    /// Whether it knows several controllers (a set).
    pub fn in_set(&self) -> bool {
        !self.config.controllers.is_empty()
    }

    /// Every controller it knows.
    pub fn set(&self) -> Vec<String> {
        std::iter::once(self.config.controller.clone())
            .chain(self.config.controllers.iter().cloned())
            .collect()
    }

    /// Where it points.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The active controller of a set: the first whose health service
    /// says SERVING; else the first that answers at all (an active one
    /// whose store cannot write, or a standby whose refusal names the
    /// active one); else the first.
    async fn pick(config: &CliConfig) -> Result<Client, CliError> {
        use tonic_health::pb::health_check_response::ServingStatus;
        let mut answered = None;
        let mut first = None;
        for url in std::iter::once(&config.controller).chain(&config.controllers) {
            let client = Client::to(config, url)?;
            let asked = tokio::time::timeout(
                PROBE_TIMEOUT,
                tonic_health::pb::health_client::HealthClient::new(client.channel()).check(
                    tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    },
                ),
            )
            .await;
            match asked {
                Ok(Ok(r)) if r.get_ref().status == ServingStatus::Serving as i32 => {
                    return Ok(client);
                }
                Ok(Ok(_)) => {
                    answered.get_or_insert(client);
                }
                _ => {
                    first.get_or_insert(client);
                }
            }
        }
        Ok(answered
            .or(first)
            .expect("a set has at least one controller"))
    }

    /// After the controller it used went away: finds the active
    /// controller of its set and calls `open` on it, again and again while
    /// that cannot reach it (the set is still taking over), for at most
    /// [`FAILOVER_WITHIN`].
    pub async fn failover<T, F, Fut>(&self, mut open: F) -> Result<(Client, T), CliError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, CliError>>,
    {
        let deadline = tokio::time::Instant::now() + FAILOVER_WITHIN;
        loop {
            let client = Client::pick(&self.config).await?;
            match open(client.clone()).await {
                Ok(opened) => return Ok((client, opened)),
                Err(CliError::Unreachable(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Connects (lazily) to `url` with `config`'s credentials.
    fn to(config: &CliConfig, url: &str) -> Result<Client, CliError> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read_to_string(p).map_err(|e| {
                CliError::Input(format!("cannot read the {what} {}: {e}", p.display()))
            })
        };
        let ca = read(&config.ca, "CA certificate")?;
        let identity = match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => Some(ClientIdentity {
                cert_pem: read(cert, "admin certificate")?,
                key_pem: read(key, "admin key")?,
            }),
            _ => None,
        };
        let channel = tls::channel(url, Trust::Ca(&ca), identity.as_ref(), CONNECT_TIMEOUT)
            .map_err(|e| CliError::Input(e.to_string()))?;
        let admin = AdminServiceClient::new(channel.clone())
            .max_decoding_message_size(crate::server::MAX_MESSAGE)
            .max_encoding_message_size(crate::server::MAX_MESSAGE);
        Ok(Client {
            admin,
            channel,
            url: url.to_string(),
            config: std::sync::Arc::new(config.clone()),
        })
    }

    /// The connection, for other services on the controller's port (the
    /// gRPC health service).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The admin API.
    pub fn admin(&self) -> AdminServiceClient<Channel> {
        self.admin.clone()
    }

    /// A failed call as a CLI error with the right exit code.
    pub fn error(&self, status: tonic::Status) -> CliError {
        use tonic::Code;
        let url = &self.url;
        match status.code() {
            Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled => {
                CliError::Unreachable(format!(
                    "cannot reach the controller at {url}: {}",
                    modi_common::error_chain(&status)
                ))
            }
            Code::Unauthenticated => CliError::Unreachable(format!(
                "the controller at {url} refused this CLI: {}",
                status.message()
            )),
            Code::PermissionDenied => CliError::Refused(format!(
                "refused by the controller at {url}: {}",
                status.message()
            )),
            Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::OutOfRange => CliError::Input(status.message().to_string()),
            _ => CliError::Failed(format!("the controller failed: {}", status.message())),
        }
    }
}
