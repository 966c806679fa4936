//! `modi init`.

use std::path::PathBuf;

use serde::Serialize;

use super::{CliError, Output};
use crate::config;
use crate::init::{InitError, InitRequest, init};

#[derive(Serialize)]
struct Report {
    data_dir: PathBuf,
    controller_config: PathBuf,
    cli_config: PathBuf,
    user_cli_config: Option<PathBuf>,
    ca_sha256: String,
    controller_url: String,
}

/// Creates the data dir and prints where everything is.
pub fn run(
    out: &Output,
    data: Option<PathBuf>,
    addresses: Vec<String>,
    listen: String,
    admin: String,
    cli_config: Option<PathBuf>,
) -> Result<(), CliError> {
    let data_dir = data.unwrap_or_else(config::default_data_dir);
    let addresses = if addresses.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into()]
    } else {
        addresses
    };
    // The CLI finds its config on its own: at --cli-config if given, else
    // at the default place unless another controller's config is there.
    let user_cli_config = match cli_config {
        Some(p) => Some(p),
        None => {
            let p = config::default_cli_config();
            (!p.exists()).then_some(p)
        }
    };
    let report = init(&InitRequest {
        data_dir,
        addresses,
        listen,
        admin_name: admin,
        user_cli_config,
    })
    .map_err(|e| match e {
        InitError::Exists(_) | InitError::Usage(_) => CliError::Input(e.to_string()),
        other => CliError::Failed(other.to_string()),
    })?;
    let r = Report {
        data_dir: report.data_dir,
        controller_config: report.controller_config,
        cli_config: report.cli_config,
        user_cli_config: report.user_cli_config,
        ca_sha256: report.ca_sha256,
        controller_url: report.advertise,
    };
    out.data(&r, || {
        let mut s = format!(
            "Initialised a controller in {}\n  config:      {}\n  CA SHA-256:  {}\n  agents dial: {}\n",
            r.data_dir.display(),
            r.controller_config.display(),
            r.ca_sha256,
            r.controller_url
        );
        match &r.user_cli_config {
            Some(p) => s.push_str(&format!("  CLI config:  {} (found by every modi command)\n", p.display())),
            None => s.push_str(&format!(
                "  CLI config:  {} (another one exists at {}; pass --cli-config)\n",
                r.cli_config.display(),
                config::default_cli_config().display()
            )),
        }
        s.push_str(&format!(
            "Next: modi serve --config {}\n      modi token create",
            r.controller_config.display()
        ));
        s
    });
    Ok(())
}
