//! A standby controller of a set relays its agents to the active one.
//!
//! Agents are spread over the set's controllers (each dials the first URL
//! it knows). One that reaches a standby is checked there as the active
//! controller would check it (its certificate, not revoked, enrolled),
//! then its session is carried, message for message, on a session the
//! standby opens to the active controller with a relay certificate: a
//! controller-role certificate the standby mints for itself in memory from
//! the set's CA (never written anywhere, renewed before it expires). The
//! active controller takes the agent's name and certificate serial from
//! the relay's metadata, checks them again, and serves the session as if
//! the agent had dialled it: steps reach agents wherever they connected,
//! results and acks come back the same way, and the relay keeps nothing.
//! When either side ends, the other is ended too: the agent reconnects,
//! and a relay whose active controller died finds the next one (or is it).
//! Enrolment on a standby is passed on the same way.

use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use modi_proto::identity::{self, Role};
use modi_proto::tls::{self, ClientIdentity, Trust};
use modi_proto::v1 as pb;
use pb::agent_service_client::AgentServiceClient;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http;
use tonic::metadata::MetadataValue;
use tonic::{Request, Status, Streaming};

use crate::pki::{RevokedSerials, serial_of};
use crate::server::Shared;

/// Metadata naming the agent a relay carries.
pub const AGENT_HEADER: &str = "modi-relayed-agent";
/// Metadata carrying that agent's certificate serial (hex).
pub const SERIAL_HEADER: &str = "modi-relayed-serial";
/// The header carrying a relayed operator's certificate (DER, base64).
pub const OPERATOR_HEADER: &str = "modi-relayed-operator";
/// How long a relay certificate lives.
const RELAY_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A relay certificate with less left than this is replaced.
const RELAY_RENEW: Duration = Duration::from_secs(3600);
/// How long the relay may take to reach the active controller.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// This controller's relay certificate, minted when first needed, and
/// its channel to the active controller.
#[derive(Default)]
pub struct RelayIdentity {
    current: Mutex<Option<(ClientIdentity, Instant)>>,
    /// The active controller's URL and a channel to it with the current
    /// relay certificate (admin calls share it).
    channel: Mutex<Option<(String, Instant, tonic::transport::Channel)>>,
}

impl RelayIdentity {
    /// The certificate and key to relay with (a new pair when the one held
    /// is close to its end), and when it ends.
    fn get(&self, shared: &Shared) -> Result<(ClientIdentity, Instant), Status> {
        let mut current = self.current.lock().expect("relay identity");
        if let Some((id, until)) = current.as_ref()
            && until.saturating_duration_since(Instant::now()) > RELAY_RENEW
        {
            return Ok((id.clone(), *until));
        }
        let issued = shared
            .ca
            .issue_relay(RELAY_LIFETIME)
            .map_err(|e| Status::internal(format!("cannot mint a relay certificate: {e}")))?;
        let id = ClientIdentity {
            cert_pem: issued.cert_pem,
            key_pem: issued.key_pem.unwrap_or_default(),
        };
        let until = Instant::now() + RELAY_LIFETIME;
        *current = Some((id.clone(), until));
        Ok((id, until))
    }
}

impl RelayIdentity {
    /// A channel to the active controller `leader`, presenting the relay
    /// certificate.
    fn channel(&self, shared: &Shared, leader: &str) -> Result<tonic::transport::Channel, Status> {
        let mut held = self.channel.lock().expect("relay channel");
        if let Some((url, until, channel)) = held.as_ref()
            && url == leader
            && until.saturating_duration_since(Instant::now()) > RELAY_RENEW
        {
            return Ok(channel.clone());
        }
        let (identity, until) = self.get(shared)?;
        let channel = tls::channel(
            leader,
            Trust::Ca(shared.ca.cert_pem()),
            Some(&identity),
            UPSTREAM_TIMEOUT,
        )
        .map_err(|e| Status::unavailable(format!("cannot relay to {leader}: {e}")))?;
        // Replaced when the certificate it presents is close to its end.
        *held = Some((leader.to_string(), until, channel.clone()));
        Ok(channel)
    }
}

/// Relays an admin call (any method, streams too) to the active
/// controller, the caller's certificate in [`OPERATOR_HEADER`]; the active
/// controller authorises and audits it as if it were called directly.
pub async fn admin_call<B>(
    shared: &Shared,
    req: http::Request<B>,
) -> Result<http::Response<tonic::body::Body>, Status>
where
    B: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use base64::Engine as _;
    use tonic::codegen::Service as _;
    let leader = shared.role.leader().ok_or_else(|| shared.role.refusal())?;
    let leaf = req
        .extensions()
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        .and_then(|i| i.peer_certs())
        .and_then(|c| c.first().cloned())
        .ok_or_else(|| {
            Status::unauthenticated(
                "this call needs a client certificate with the admin role (an operator's)",
            )
        })?;
    let mut channel = shared.relay.channel(shared, &leader)?;
    let (mut parts, body) = req.into_parts();
    let cert = base64::engine::general_purpose::STANDARD.encode(leaf.as_ref());
    parts.headers.insert(
        OPERATOR_HEADER,
        http::HeaderValue::from_str(&cert)
            .map_err(|e| Status::internal(format!("relay header: {e}")))?,
    );
    let unreachable = |e: tonic::transport::Error| {
        Status::unavailable(format!(
            "cannot relay to the active controller {leader}: {e}"
        ))
    };
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(unreachable)?;
    channel
        .call(http::Request::from_parts(
            parts,
            tonic::body::Body::new(body),
        ))
        .await
        .map_err(unreachable)
}

/// The stream a session sends down.
pub type Downstream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

/// Passes an enrolment on to the active controller.
pub async fn enroll(
    shared: &Shared,
    request: Request<pb::EnrollRequest>,
) -> Result<tonic::Response<pb::EnrollResponse>, Status> {
    let leader = shared.role.leader().ok_or_else(|| shared.role.refusal())?;
    AgentServiceClient::new(shared.relay.channel(shared, &leader)?)
        .enroll(request.into_inner())
        .await
}

/// Carries an agent's session to the active controller. `name` and
/// `serial` are the agent's, checked by the caller.
pub async fn connect(
    shared: &Shared,
    name: String,
    serial: Vec<u8>,
    mut inbound: Streaming<pb::AgentMessage>,
) -> Result<tonic::Response<Downstream>, Status> {
    let leader = shared.role.leader().ok_or_else(|| shared.role.refusal())?;
    let mut client = AgentServiceClient::new(shared.relay.channel(shared, &leader)?)
        .max_decoding_message_size(crate::server::MAX_MESSAGE)
        .max_encoding_message_size(crate::limits::MAX_AGENT_MESSAGE);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut up = Request::new(ReceiverStream::new(rx));
    let header = |v: &str| {
        MetadataValue::try_from(v).map_err(|e| Status::internal(format!("relay metadata: {e}")))
    };
    up.metadata_mut().insert(AGENT_HEADER, header(&name)?);
    up.metadata_mut()
        .insert(SERIAL_HEADER, header(&hex::encode(&serial))?);
    // The agent's messages go up as they come; its end ends the upstream.
    let stop = shared.shutdown.clone();
    let agent = name.clone();
    shared.tasks.spawn(async move {
        loop {
            let msg = tokio::select! {
                msg = inbound.message() => msg,
                _ = stop.cancelled() => break,
            };
            match msg {
                Ok(Some(m)) => {
                    if tx.send(m).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(agent, error = %status, "relayed session ended");
                    break;
                }
            }
        }
    });
    let down = tokio::time::timeout(UPSTREAM_TIMEOUT, client.connect(up))
        .await
        .map_err(|_| Status::unavailable("the active controller did not answer the relay"))??
        .into_inner();
    tracing::info!(agent = %name, to = %shared.role.leader().unwrap_or_default(), "relaying agent");
    Ok(tonic::Response::new(Box::pin(down)))
}

/// The agent a call is for, on the active controller: the caller's own
/// name if it is an agent, or the relayed agent's if the caller is a
/// relay (a controller of the set). Either way the agent's certificate
/// must not be revoked.
pub fn agent_of<T>(req: &Request<T>, revoked: &RevokedSerials) -> Result<String, Status> {
    let leaf = req
        .peer_certs()
        .and_then(|c| c.first().cloned())
        .ok_or_else(|| {
            Status::unauthenticated("this call needs a client certificate with the agent role")
        })?;
    let caller = identity::from_der(&leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
    if caller.role != Role::Controller || caller.name != crate::pki::RELAY_NAME {
        return Ok(super::auth::require(req, Role::Agent, revoked)?.name);
    }
    let header = |key: &str| {
        req.metadata()
            .get(key)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| Status::invalid_argument(format!("a relay must send {key}")))
    };
    let name = header(AGENT_HEADER)?;
    identity::valid_name(&name)
        .map_err(|e| Status::invalid_argument(format!("{AGENT_HEADER}: {e}")))?;
    let serial = hex::decode(header(SERIAL_HEADER)?)
        .map_err(|e| Status::invalid_argument(format!("{SERIAL_HEADER}: {e}")))?;
    if revoked.read().expect("revoked lock").contains(&serial) {
        tracing::warn!(agent = %name, "refused a relayed revoked certificate");
        return Err(Status::permission_denied(format!(
            "agent {name:?} was revoked"
        )));
    }
    Ok(name)
}

/// The serial of the caller's certificate.
pub fn peer_serial<T>(req: &Request<T>) -> Vec<u8> {
    req.peer_certs()
        .and_then(|c| c.first().and_then(|leaf| serial_of(leaf)))
        .unwrap_or_default()
}

/// The certificate of the operator a relay calls for: `Some(DER)` when
/// `leaf` (the caller's own certificate) is a relay certificate, read from
/// [`OPERATOR_HEADER`]; `None` for an operator calling directly.
pub fn relayed_operator<B>(req: &http::Request<B>, leaf: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    use base64::Engine as _;
    let is_relay = identity::from_der(leaf)
        .is_ok_and(|id| id.role == Role::Controller && id.name == crate::pki::RELAY_NAME);
    if !is_relay {
        return Ok(None);
    }
    let header = req
        .headers()
        .get(OPERATOR_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Status::unauthenticated(format!("a relay must send {OPERATOR_HEADER}")))?;
    base64::engine::general_purpose::STANDARD
        .decode(header)
        .map(Some)
        .map_err(|e| Status::unauthenticated(format!("{OPERATOR_HEADER}: {e}")))
}
