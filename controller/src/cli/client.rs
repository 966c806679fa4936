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

/// An admin API client and where it points.
#[derive(Clone)]
pub struct Client {
    admin: AdminServiceClient<Channel>,
    channel: Channel,
    url: String,
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
        Client::from_config(&config)
    }

    /// Connects (lazily) as `config` says.
    pub fn from_config(config: &CliConfig) -> Result<Client, CliError> {
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
        let channel = tls::channel(
            &config.controller,
            Trust::Ca(&ca),
            identity.as_ref(),
            CONNECT_TIMEOUT,
        )
        .map_err(|e| CliError::Input(e.to_string()))?;
        let admin = AdminServiceClient::new(channel.clone())
            .max_decoding_message_size(crate::server::MAX_MESSAGE)
            .max_encoding_message_size(crate::server::MAX_MESSAGE);
        Ok(Client {
            admin,
            channel,
            url: config.controller.clone(),
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
