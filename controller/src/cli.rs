//! The operator CLI, in layers (ripgrep's lowargs → hiargs): clap structs
//! that mirror what was typed, one module per subcommand that validates
//! them and does the work, and one [`Output`] through which everything is
//! printed, so `--output json` is one switch. One function maps errors to
//! exit codes: 0 success, 1 the change failed, 2 usage or input error, 3
//! the controller could not be reached, 4 refused: this operator may not
//! do that.

mod access;
mod apply;
mod client;
mod demo;
pub(crate) mod hosts;
mod init;
mod output;
mod progress;
mod runs;
mod secrets;
mod serve;
pub(crate) mod validate;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use client::Client;
pub use output::Output;

/// `modi`: the controller and its operator CLI.
#[derive(Debug, Parser)]
#[command(
    name = "modi",
    version,
    about = "modi: safe, reversible changes across a fleet"
)]
pub struct Cli {
    /// The CLI config (default: $MODI_CLI_CONFIG, else
    /// $XDG_CONFIG_HOME/modi/cli.toml, written by `modi init`).
    #[arg(long = "cli-config", global = true, env = "MODI_CLI_CONFIG")]
    pub cli_config: Option<PathBuf>,
    /// How to print data.
    #[arg(long, global = true, value_enum, default_value_t = Format::Text)]
    pub output: Format,
    /// Log lines (of `modi serve` above all) as text or JSON objects.
    #[arg(long = "log-format", global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`: how the daemons write their log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// For people.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `--output`: how the CLI prints data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Tables and sentences.
    Text,
    /// JSON documents (one per line for streams).
    Json,
}

/// `--var k=v`, repeatable.
#[derive(Debug, Args, Clone, Default)]
pub struct Vars {
    /// A variable, key=value (highest precedence; repeatable).
    #[arg(long = "var", value_name = "KEY=VALUE")]
    pub vars: Vec<String>,
    /// `--secret NAME=...`, repeatable.
    #[command(flatten)]
    pub secrets: secrets::SecretArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a controller's data dir: CA, certificates, configs.
    Init {
        /// The data dir (default: /var/lib/modi as root, else ~/.local/share/modi).
        #[arg(long)]
        data: Option<PathBuf>,
        /// A DNS name or IP agents reach the controller at (repeatable; the
        /// first goes into join commands). Default: localhost and 127.0.0.1.
        #[arg(long = "address")]
        addresses: Vec<String>,
        /// Listen address.
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: String,
        /// Name on the admin certificate.
        #[arg(long, default_value = "admin")]
        admin: String,
    },
    /// Run the controller.
    Serve {
        /// The controller config (default: DATA/controller.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Move a controller's whole store out or in (sled to etcd, backups);
    /// run it with the controller stopped.
    Store {
        /// What to do.
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Join tokens.
    Token {
        /// What to do with tokens.
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// List enrolled hosts.
    /// List hosts (optionally those matching SELECTOR), or change their
    /// labels: `modi hosts label HOST k=v k2-`.
    Hosts {
        /// A selector (`role=web`, `web-01,web-02`, `all`).
        selector: Option<String>,
        /// Only hosts in this state: connected, away, never (enrolled,
        /// never connected), revoked.
        #[arg(long)]
        state: Option<String>,
        /// `label`: change a host's labels.
        #[command(subcommand)]
        command: Option<HostsCommand>,
    },
    /// Operators: named people with a role (viewer, operator, admin).
    Operator {
        /// What to do.
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// This CLI's version and the controller's.
    Version,
    /// A one-time link (2 minutes) that signs you in to the controller's
    /// web view (`web_listen` in controller.toml).
    Ui,
    /// A shell completion script on stdout (e.g. `modi completions bash >
    /// /etc/bash_completion.d/modi`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Man pages for modi and each subcommand, written to a folder.
    Man {
        /// Where to write them (modi.1, modi-apply.1, ...).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// The audit journal: who changed what, when, with what outcome.
    Audit {
        /// Only the newest N entries (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
    /// Check a changeset without touching anything.
    Validate {
        /// The changeset file.
        file: PathBuf,
        /// Variables.
        #[command(flatten)]
        vars: Vars,
    },
    /// Show what a changeset would do on today's fleet (noop).
    Plan {
        /// The changeset file.
        file: PathBuf,
        /// Variables.
        #[command(flatten)]
        vars: Vars,
        /// Every warning (a --var nothing reads, a selector that matches
        /// no host) is an error: exit 2. For CI.
        #[arg(long)]
        strict: bool,
        /// Also show, for each `file` step, a unified diff against the file
        /// now on the host (its agent reads it, read-only, at most 1 MiB).
        /// Needs the operator role.
        #[arg(long)]
        diff: bool,
    },
    /// Apply a changeset.
    Apply {
        /// The changeset file.
        file: PathBuf,
        /// Variables.
        #[command(flatten)]
        vars: Vars,
        /// Print the run id and return at once.
        #[arg(long)]
        detach: bool,
        /// Every warning is an error: exit 2 before anything starts.
        #[arg(long)]
        strict: bool,
    },
    /// List runs (the newest, oldest first).
    Runs {
        /// How many of the newest runs to list; 0 lists every run.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show a run's state, per change and host.
    Status {
        /// The run id.
        run: String,
        /// List every host (by default only those not in success or
        /// skipped; counts per change are always shown).
        #[arg(long)]
        all: bool,
        /// Only this host (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Only hosts in this state (repeatable): failed, backout_ok, ...
        #[arg(long = "state")]
        states: Vec<String>,
    },
    /// Follow a run's progress.
    Watch {
        /// The run id.
        run: String,
    },
    /// Show a run's step output.
    Logs {
        /// The run id.
        run: String,
        /// Only this host.
        #[arg(long)]
        host: Option<String>,
        /// Keep printing as the run goes on (a step already running shows
        /// what it printed so far first).
        #[arg(long)]
        follow: bool,
        /// Only this change.
        #[arg(long)]
        change: Option<String>,
        /// Only the last N lines of each step's output.
        #[arg(long)]
        tail: Option<usize>,
    },
    /// Let a run waiting at an approval gate go on.
    Approve {
        /// The run id.
        run: String,
    },
    /// Bail a run out at its approval gate: nothing new starts, and every
    /// host where the waiting change was applied is backed out (newest
    /// first). `--no-backout` leaves those hosts as they are.
    Deny {
        /// The run id.
        run: String,
        /// Leave hosts as they are instead of backing them out.
        #[arg(long = "no-backout")]
        no_backout: bool,
    },
    /// Bail a run out now: cancel what runs and back out.
    Abort {
        /// The run id.
        run: String,
        /// Leave hosts as they are.
        #[arg(long = "no-backout")]
        no_backout: bool,
    },
    /// Stop a run at the next step boundary.
    Pause {
        /// The run id.
        run: String,
    },
    /// Carry on a paused run (with `--secret`: one waiting for its secrets).
    Resume {
        /// The run id.
        run: String,
        /// The secrets a run lost in a controller restart.
        #[command(flatten)]
        secrets: secrets::SecretArgs,
    },
    /// Manage enrolled agents.
    Agents {
        /// What to do with agents.
        #[command(subcommand)]
        command: AgentsCommand,
    },
    /// A throwaway controller and five local agents running examples/demo.yaml.
    Demo {
        /// The changeset to run (default: examples/demo.yaml).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Keep the demo's data dir instead of deleting it.
        #[arg(long)]
        keep: bool,
        /// Leave the controller and agents running after the demo's run
        /// and print the `export MODI_CLI_CONFIG=...` line that points
        /// `modi` at them from another shell; Ctrl-C (or SIGTERM) stops
        /// them and cleans up.
        #[arg(long)]
        stay: bool,
    },
}

/// `modi store ...`.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Write every record of the store `controller.toml` names, as JSON
    /// lines.
    Export {
        /// The controller config naming the store (default:
        /// DATA/controller.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where to write (default: stdout).
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Read an export into the store `controller.toml` names, which must
    /// be empty.
    Import {
        /// The controller config naming the store.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The export.
        file: PathBuf,
    },
}

/// `modi token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a join token and the line to run on new hosts.
    Create {
        /// How long it works (e.g. 30m, 2h; at most the controller's
        /// max_token_ttl, 7 days by default).
        #[arg(long)]
        ttl: Option<String>,
        /// A label every host joining with it gets (wins over the join's).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// How many hosts may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Print the one line that installs, enrols and starts the agent
        /// on a new host (`curl ... | sh`) instead of the join command.
        #[arg(long)]
        install: bool,
    },
    /// Every token, with its id, state and uses.
    List,
    /// Stop a token from working.
    Revoke {
        /// Its id (from `modi token list`).
        id: String,
    },
}

/// `modi hosts ...`.
#[derive(Debug, Subcommand)]
pub enum HostsCommand {
    /// Set (KEY=VALUE) and remove (KEY-) a host's labels.
    Label {
        /// The host.
        host: String,
        /// KEY=VALUE to set, KEY- to remove.
        #[arg(required = true)]
        changes: Vec<String>,
    },
}

/// `modi operator ...`.
#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Add an operator and write its CLI bundle (config, key, certificate).
    Add {
        /// Its name.
        name: String,
        /// viewer (read), operator (also apply and decide), admin (also
        /// tokens, hosts, operators).
        #[arg(long)]
        role: String,
        /// Where to write the bundle (default ./modi-operator-NAME).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Every operator.
    List,
    /// Revoke an operator: refused from its next call on.
    Revoke {
        /// Its name.
        name: String,
    },
    /// A new certificate (and key) for an operator, as a new bundle.
    Renew {
        /// Its name.
        name: String,
        /// Where to write the bundle (default ./modi-operator-NAME).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `modi agents ...`.
#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// Refuse an agent from its next handshake on (and drop it now).
    Revoke {
        /// The agent's name.
        name: String,
    },
    /// Forget a host: revoke its certificates and remove it from the
    /// inventory (it can join again with a new token).
    Remove {
        /// The host.
        name: String,
    },
}

/// Everything that can go wrong, by exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad flags, a bad changeset, a run that does not exist: exit 2.
    #[error("{0}")]
    Input(String),
    /// The controller cannot be reached (or refused our certificate): exit 3.
    #[error("{0}")]
    Unreachable(String),
    /// The change (or the command) failed: exit 1.
    #[error("{0}")]
    Failed(String),
    /// This operator may not do that (exit 4).
    #[error("{0}")]
    Refused(String),
}

impl From<crate::typed::Malformed> for CliError {
    fn from(e: crate::typed::Malformed) -> CliError {
        CliError::Failed(e.to_string())
    }
}

impl CliError {
    /// DESIGN.md's exit status.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Failed(_) => 1,
            CliError::Input(_) => 2,
            CliError::Unreachable(_) => 3,
            CliError::Refused(_) => 4,
        }
    }
}

/// What a successful command reports: exit 0, or 1 for a run that ended
/// in anything but success.
pub enum Outcome {
    /// Exit 0.
    Ok,
    /// A run finished badly: exit 1 (already reported).
    RunFailed,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<Outcome, CliError> {
    let out = Output::new(cli.output);
    let config = cli.cli_config.clone();
    match cli.command {
        Command::Init {
            data,
            addresses,
            listen,
            admin,
        } => init::run(&out, data, addresses, listen, admin, config).map(|()| Outcome::Ok),
        Command::Serve { config: file } => serve::run(file).await.map(|()| Outcome::Ok),
        Command::Store { command } => serve::store(&out, command).await,
        Command::Token { command } => {
            let client = Client::connect(config).await?;
            match command {
                TokenCommand::Create {
                    ttl,
                    labels,
                    uses,
                    install,
                } => {
                    let labels = parse_pairs("--label", &labels)?;
                    hosts::token(&out, &client, ttl, labels, uses, install).await
                }
                TokenCommand::List => access::list_tokens(&out, &client).await,
                TokenCommand::Revoke { id } => access::revoke_token(&out, &client, id).await,
            }
        }
        Command::Hosts {
            command: Some(HostsCommand::Label { host, changes }),
            ..
        } => access::label_host(&out, &Client::connect(config).await?, host, changes).await,
        Command::Hosts {
            selector,
            state,
            command: None,
        } => hosts::list(&out, &Client::connect(config).await?, selector, state).await,
        Command::Operator { command } => {
            let client = Client::connect(config).await?;
            match command {
                OperatorCommand::Add {
                    name,
                    role,
                    out: dir,
                } => access::add_operator(&out, &client, name, role, dir).await,
                OperatorCommand::List => access::list_operators(&out, &client).await,
                OperatorCommand::Revoke { name } => {
                    access::revoke_operator(&out, &client, name).await
                }
                OperatorCommand::Renew { name, out: dir } => {
                    access::renew_operator(&out, &client, name, dir).await
                }
            }
        }
        Command::Version => access::version(&out, config).await,
        Command::Ui => access::web_login(&out, &Client::connect(config).await?).await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "modi", &mut std::io::stdout());
            Ok(Outcome::Ok)
        }
        Command::Man { out: dir } => man_pages(&out, &dir),
        Command::Audit { limit } => {
            access::audit(&out, &Client::connect(config).await?, limit).await
        }
        Command::Agents {
            command: AgentsCommand::Revoke { name },
        } => hosts::revoke(&out, &Client::connect(config).await?, name).await,
        Command::Agents {
            command: AgentsCommand::Remove { name },
        } => hosts::remove(&out, &Client::connect(config).await?, name).await,
        Command::Validate { file, vars } => validate::validate(&out, &file, &vars),
        Command::Plan {
            file,
            vars,
            strict,
            diff,
        } => {
            let client = Client::connect(config).await?;
            validate::plan(&out, &client, &file, &vars, strict, diff).await
        }
        Command::Apply {
            file,
            vars,
            detach,
            strict,
        } => {
            let client = Client::connect(config).await?;
            if strict {
                validate::strict_check(&client, &file, &vars).await?;
            }
            apply::apply(&out, &client, &file, &vars, detach).await
        }
        Command::Runs { limit } => runs::list(&out, &Client::connect(config).await?, limit).await,
        Command::Status {
            run,
            all,
            hosts,
            states,
        } => {
            let filter = runs::HostFilter { all, hosts, states };
            runs::status(&out, &Client::connect(config).await?, &run, &filter).await
        }
        Command::Watch { run } => apply::watch(&out, &Client::connect(config).await?, &run).await,
        Command::Logs {
            run,
            host,
            follow,
            change,
            tail,
        } => {
            let view = runs::LogsView {
                host,
                change,
                follow,
                tail,
            };
            runs::logs(&out, &Client::connect(config).await?, &run, view).await
        }
        Command::Approve { run } => runs::control(&out, config, &run, runs::Control::Approve).await,
        Command::Deny { run, no_backout } => {
            runs::control(&out, config, &run, runs::Control::Deny { no_backout }).await
        }
        Command::Abort { run, no_backout } => {
            runs::control(&out, config, &run, runs::Control::Abort { no_backout }).await
        }
        Command::Pause { run } => runs::control(&out, config, &run, runs::Control::Pause).await,
        Command::Resume { run, secrets } => secrets::resume(&out, config, &run, &secrets).await,
        Command::Demo { file, keep, stay } => demo::run(&out, file, keep, stay).await,
    }
}

/// Writes `modi.1` and one page per subcommand (`modi-apply.1`, ...).
fn man_pages(out: &Output, dir: &std::path::Path) -> Result<Outcome, CliError> {
    use clap::CommandFactory;
    let io = |e: std::io::Error| {
        CliError::Failed(format!("cannot write man pages in {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let cmd = Cli::command();
    let mut written = Vec::new();
    let mut write = |name: String, cmd: clap::Command| -> Result<(), CliError> {
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd)
            .title(name.clone())
            .render(&mut page)
            .map_err(io)?;
        std::fs::write(&path, page).map_err(io)?;
        written.push(path);
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|c| !c.is_hide_set()) {
        write(format!("modi-{}", sub.get_name()), sub.clone())?;
    }
    write("modi".into(), cmd)?;
    out.data(&serde_json::json!({ "written": written }), || {
        format!("wrote {} man pages in {}", written.len(), dir.display())
    });
    Ok(Outcome::Ok)
}

/// Parses `--var k=v` flags.
pub fn parse_vars(vars: &Vars) -> Result<std::collections::BTreeMap<String, String>, CliError> {
    parse_pairs("--var", &vars.vars)
}

/// Parses `KEY=VALUE` flags (`--var`, `--label`); errors name the flag.
pub fn parse_pairs(
    flag: &str,
    pairs: &[String],
) -> Result<std::collections::BTreeMap<String, String>, CliError> {
    pairs
        .iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| CliError::Input(format!("{flag} {kv:?}: expected KEY=VALUE")))?;
            if k.is_empty() {
                return Err(CliError::Input(format!("{flag} {kv:?}: empty key")));
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}
