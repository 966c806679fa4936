//! `--secret NAME=VALUE`, `--secret NAME=@FILE`, `--secret NAME=env:VAR`
//! (on `validate`, `plan`, `apply` and `resume`): read on the operator's
//! machine, sent to the controller only by `apply` and `resume` (`plan`
//! and `validate` need the names alone).
//!
//! `NAME=VALUE` puts the value in this command's own argv, which other
//! users of the operator's machine can read: `@FILE` and `env:VAR` do not.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Args;
use modi_proto::v1 as pb;

use super::runs::{Control, control};
use super::{CliError, Client, Outcome, Output};

/// `--secret`, repeatable.
#[derive(Debug, Args, Clone, Default)]
pub struct SecretArgs {
    /// A secret: NAME=VALUE, NAME=@FILE (the file's bytes, exactly) or
    /// NAME=env:VAR (repeatable). Shown as `<secret NAME>`, never stored.
    #[arg(long = "secret", value_name = "NAME=VALUE|NAME=@FILE|NAME=env:VAR")]
    pub secrets: Vec<String>,
}

impl SecretArgs {
    /// The secrets given, by name, their values read (files, environment).
    pub fn read(&self) -> Result<BTreeMap<String, String>, CliError> {
        read_with(
            &self.secrets,
            &|var: &str| std::env::var_os(var),
            &|path: &Path| std::fs::read(path),
        )
    }
}

/// [`SecretArgs::read`] with the environment and the file system given.
fn read_with(
    args: &[String],
    env: &dyn Fn(&str) -> Option<OsString>,
    read: &dyn Fn(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<BTreeMap<String, String>, CliError> {
    let mut out = BTreeMap::new();
    for arg in args {
        let Some((name, source)) = arg.split_once('=') else {
            // Never echo the argument: it may be a value typed without a name.
            return Err(CliError::Input(
                "--secret: expected NAME=VALUE, NAME=@FILE or NAME=env:VAR".into(),
            ));
        };
        let bad = |why: String| CliError::Input(format!("--secret {name}: {why}"));
        if name.is_empty() {
            return Err(CliError::Input(
                "--secret: the name before `=` is empty".into(),
            ));
        }
        let value = if let Some(file) = source.strip_prefix('@') {
            let path = PathBuf::from(file);
            let bytes =
                read(&path).map_err(|e| bad(format!("cannot read {}: {e}", path.display())))?;
            String::from_utf8(bytes)
                .map_err(|_| bad(format!("{} is not UTF-8 text", path.display())))?
        } else if let Some(var) = source.strip_prefix("env:") {
            env(var)
                .ok_or_else(|| bad(format!("the environment variable {var} is not set")))?
                .into_string()
                .map_err(|_| bad(format!("the environment variable {var} is not UTF-8")))?
        } else {
            source.to_string()
        };
        if value.is_empty() {
            return Err(bad("the value is empty".into()));
        }
        if value.contains('\0') {
            return Err(bad("the value holds a NUL byte".into()));
        }
        if out.insert(name.to_string(), value).is_some() {
            return Err(bad("given twice".into()));
        }
    }
    Ok(out)
}

/// `modi resume RUN [--secret ...]`: with secrets, gives a run held for
/// them (after a controller restart) what it needs.
pub async fn resume(
    out: &Output,
    config: Option<PathBuf>,
    run: &str,
    args: &SecretArgs,
) -> Result<Outcome, CliError> {
    if args.secrets.is_empty() {
        return control(out, config, run, Control::Resume).await;
    }
    let secrets = args.read()?;
    let client = Client::connect(config).await?;
    let state = client
        .admin()
        .control(pb::ControlRequest {
            run_id: run.to_string(),
            action: pb::ControlAction::Resume as i32,
            no_backout: false,
            secrets: secrets.into_iter().collect(),
        })
        .await
        .map_err(|s| client.error(s))?
        .into_inner()
        .state;
    let state = crate::typed::run_state_from(state, "state")?.as_str();
    out.data(&serde_json::json!({ "run": run, "state": state }), || {
        format!("run {run}: {state}")
    });
    Ok(Outcome::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(args: &[&str]) -> Result<BTreeMap<String, String>, String> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let env = |var: &str| (var == "PW").then(|| OsString::from("from env"));
        let file = |path: &Path| {
            if path == Path::new("/run/pw") {
                Ok(b"from file\n".to_vec())
            } else {
                Err(std::io::Error::from(std::io::ErrorKind::NotFound))
            }
        };
        read_with(&args, &env, &file).map_err(|e| e.to_string())
    }

    #[test]
    fn values_come_from_the_argument_a_file_or_the_environment() {
        let got = read(&["a=x=y", "b=@/run/pw", "c=env:PW"]).unwrap();
        assert_eq!(got["a"], "x=y");
        assert_eq!(got["b"], "from file\n", "a file's bytes, exactly");
        assert_eq!(got["c"], "from env");
    }

    #[test]
    fn mistakes_name_the_secret_and_never_echo_a_value() {
        let err = read(&["hunter2"]).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(read(&["=x"]).unwrap_err().contains("name"));
        assert!(
            read(&["b=@/nope"])
                .unwrap_err()
                .starts_with("--secret b: cannot read /nope")
        );
        assert!(
            read(&["c=env:NOPE"])
                .unwrap_err()
                .contains("NOPE is not set")
        );
        assert!(
            read(&["d="])
                .unwrap_err()
                .contains("--secret d: the value is empty")
        );
        assert!(read(&["e=1", "e=2"]).unwrap_err().contains("given twice"));
    }
}
