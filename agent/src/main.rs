//! `modi-agent`: parses flags, sets up logging, calls the library, maps
//! the outcome to an exit status (0 ok, 1 failure, 2 usage or config
//! error, 3 controller unreachable, 77 refused by the controller for good,
//! 78 not enrolled; the systemd unit restarts on neither of the last two).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use modi_agent::{AgentConfig, JoinError, JoinRequest, config};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "modi-agent",
    version,
    about = "modi's agent: runs changes on this host"
)]
struct Cli {
    /// Log lines as text or as JSON objects (one per line).
    #[arg(long = "log-format", global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Enrol with a controller using a one-time token.
    Join {
        /// The controller, e.g. https://modi.example.com:7443; repeat it
        /// for every controller of a set (tried in turn).
        #[arg(long, required = true)]
        controller: Vec<String>,
        /// The join token from `modi token create`.
        #[arg(long)]
        token: String,
        /// SHA-256 fingerprint of the controller's CA.
        #[arg(long = "ca-sha256")]
        ca_sha256: String,
        /// This agent's name (default: the hostname).
        #[arg(long)]
        name: Option<String>,
        /// A label, key=value (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Where to keep the agent's key, certificate and journal.
        #[arg(long, default_value = config::DEFAULT_DATA_DIR)]
        data: PathBuf,
        /// Where steps run (default: DATA/work).
        #[arg(long = "work-dir")]
        work_dir: Option<PathBuf>,
    },
    /// Run the agent.
    Run {
        /// The agent's config file.
        #[arg(long, default_value_t = format!("{}/{}", config::DEFAULT_DATA_DIR, config::CONFIG_FILE))]
        config: String,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected key=value"))?;
    if k.is_empty() {
        return Err(format!("{s:?}: empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MODI_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("modi-agent: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Join {
                controller,
                token,
                ca_sha256,
                name,
                labels,
                data,
                work_dir,
            } => {
                let mut controllers = controller.into_iter();
                let req = JoinRequest {
                    controller: controllers.next().expect("clap requires one"),
                    also: controllers.collect(),
                    token,
                    ca_sha256,
                    name,
                    labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                    data_dir: data,
                    work_dir,
                };
                match modi_agent::join(req).await {
                    Ok(config) => {
                        println!(
                            "joined as {:?}; start it with: modi-agent run --config {}",
                            config.name,
                            config.data_dir.join(config::CONFIG_FILE).display()
                        );
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("modi-agent: {e}");
                        ExitCode::from(match e {
                            JoinError::Usage(_) | JoinError::AlreadyJoined(_) => 2,
                            JoinError::Unreachable { .. } => 3,
                            _ => 1,
                        })
                    }
                }
            }
            Command::Run { config } => {
                let config = match AgentConfig::load(config.as_ref()) {
                    Ok(c) => c,
                    Err(config::ConfigError::Read { path, source })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        let e = modi_agent::RunError::NotEnrolled { missing: path };
                        eprintln!("modi-agent: {e}");
                        return ExitCode::from(config::EXIT_NOT_ENROLLED);
                    }
                    Err(e) => {
                        eprintln!("modi-agent: {e}");
                        return ExitCode::from(2);
                    }
                };
                let shutdown = CancellationToken::new();
                let signal = shutdown.clone();
                tokio::spawn(async move {
                    modi_agent::shutdown_signal().await;
                    tracing::info!("shutting down");
                    signal.cancel();
                });
                match modi_agent::run(config, shutdown).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("modi-agent: {e}");
                        ExitCode::from(match e {
                            modi_agent::RunError::NotEnrolled { .. } => config::EXIT_NOT_ENROLLED,
                            modi_agent::RunError::Refused(_) => config::EXIT_REFUSED,
                            _ => 2,
                        })
                    }
                }
            }
        }
    })
}
