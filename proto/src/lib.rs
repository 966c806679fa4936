//! modi's wire protocol: package `modi.v1`, generated with tonic-prost-build
//! and protox from `proto/modi/v1/*.proto`.
//!
//! - [`v1::agent_service_server`] / [`v1::agent_service_client`]: enrolment
//!   and the agent's long-lived `Connect` stream.
//! - [`v1::admin_service_server`] / [`v1::admin_service_client`]: the
//!   operator API the `modi` CLI calls.
//! - [`identity`]: how a certificate carries its role and name, which both
//!   ends check.
//! - [`tls`]: the client side of the trust scheme (pinned CA, controller
//!   role), shared by the agent and the CLI.
//!
//! Generated types stay at the edge: the controller and agent convert them
//! to their own types in one conversion module per service.

pub mod identity;

/// In a `file` step's `validate` command, the text the agent replaces with
/// the shell-quoted path of the temp file holding the new content.
pub const FILE_TMP_PLACEHOLDER: &str = "@@MODI_FILE_TMP@@";

/// What a secret's value is replaced by wherever it would be shown or
/// kept: `<secret NAME>`. Rendered steps hold it where the value goes (the
/// agent substitutes the value in memory), and the agent puts it in place
/// of every occurrence of the value in a step's output.
pub fn secret_placeholder(name: &str) -> String {
    format!("<secret {name}>")
}

/// The environment variable through which a step's process receives the
/// secret `name`: `MODI_SECRET_` + the name. In a `run` command the
/// controller renders `{{ name }}` as `"$MODI_SECRET_name"`.
pub fn secret_env(name: &str) -> String {
    format!("MODI_SECRET_{name}")
}

pub mod tls;

/// Generated code for package `modi.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("modi.v1");
}

/// Generated client code for the part of etcd's v3 API (package
/// `etcdserverpb`) that the controller's etcd store uses.
#[allow(missing_docs, clippy::all)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}
