//! `modi`: parses flags, sets up logging, runs the command, maps the
//! outcome to an exit status (0 success, 1 the change failed, 2 usage or
//! input error, 3 the controller could not be reached, 4 refused).

use std::process::ExitCode;

use clap::Parser;
use modi_controller::cli::{self, Cli, Command, Outcome};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemons log at info; the CLI only says what matters.
    let default = match cli.command {
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MODI_LOG")
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        cli::LogFormat::Json => logs.json().init(),
        cli::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("modi: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(cli::run(cli));
    // A question still waiting on the terminal (Ctrl-C during a gate
    // prompt) must not hold the exit.
    runtime.shutdown_background();
    match result {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::RunFailed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("modi: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
