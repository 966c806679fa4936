//! `AgentService`: enrolment and the agents' sessions.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use modi_proto::identity::{self, Role};
use modi_proto::v1 as pb;
use pb::agent_message::Msg as Up;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{agent_convert as convert, auth};
use crate::fleet::Hello;
use crate::fleet::ToAgent;
use crate::server::Shared;
use crate::store::TokenRefused;

/// How long a new session may take to say Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Agent sessions set up at once: from the stream's start to its Hello
/// read and the connection recorded (a store write). After a controller
/// restart every agent connects within seconds; the others wait their
/// turn (at most [`HELLO_TIMEOUT`], then they are told to come back
/// later and back off), so the writer's queue and the blocking pool stay
/// bounded however large the fleet.
pub const MAX_HELLOS: usize = 256;
/// The heartbeat interval of an agent that does not say its own.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
/// Shortest heartbeat interval the controller believes (a silence timeout
/// shorter than two of these would drop healthy sessions).
pub const MIN_HEARTBEAT: Duration = Duration::from_millis(200);
/// Longest heartbeat interval the controller believes.
pub const MAX_HEARTBEAT: Duration = Duration::from_secs(300);

/// How long a session may stay silent before it is ended: two heartbeat
/// intervals (as the agent announced them, bounded).
pub fn silence_limit(hello: &Hello) -> Duration {
    let interval = hello
        .heartbeat
        .map_or(DEFAULT_HEARTBEAT, |i| i.clamp(MIN_HEARTBEAT, MAX_HEARTBEAT));
    interval * 2
}

/// The agent-facing service.
pub struct AgentApi {
    shared: Arc<Shared>,
}

impl AgentApi {
    /// Serves from the controller's shared state.
    pub fn new(shared: Arc<Shared>) -> AgentApi {
        AgentApi { shared }
    }
}

/// SHA-256 of a join token: all the store keeps of it.
pub fn token_hash(token: &str) -> String {
    identity::sha256_hex(token.as_bytes())
}

fn internal(e: crate::store::StoreError) -> Status {
    super::admin_convert::store_error(e)
}

/// Refuses an agent that is revoked or not enrolled.
fn enrolled(shared: &Shared, name: &str) -> Result<(), Status> {
    match shared.store.host(name).map_err(internal)? {
        Some(h) if !h.revoked => Ok(()),
        Some(_) => Err(Status::permission_denied(format!(
            "agent {name:?} was revoked"
        ))),
        None => Err(Status::permission_denied(format!(
            "agent {name:?} is not enrolled"
        ))),
    }
}

/// An agent asks for a new certificate over its session (two thirds of
/// the current one's life have passed): signed for the same name, recorded
/// (so revoking the host revokes it too), sent down the session.
async fn renew(shared: &Shared, name: &str, session: u64, req: pb::RenewRequest) {
    let issued = match shared.ca.sign_csr(
        &req.csr_pem,
        Role::Agent,
        name,
        shared.config.agent_cert_lifetime,
    ) {
        Ok(issued) => issued,
        Err(e) => {
            tracing::warn!(agent = name, error = %e, "renewal refused");
            return;
        }
    };
    let (serial, expires_at) = (issued.serial.clone(), issued.expires_at);
    let recorded = shared
        .store
        .update_host(name, move |host| {
            let mut host = host.unwrap_or_default();
            host.serials.push(serial);
            host.cert_expires_at = expires_at;
            host
        })
        .await;
    if let Err(e) = recorded {
        // Not recorded, not handed out: a certificate revocation could
        // not find is never in use.
        tracing::warn!(agent = name, error = %e, "renewal not recorded; the agent asks again");
        return;
    }
    tracing::info!(agent = name, "agent certificate renewed");
    shared
        .fleet
        .tell(name, session, ToAgent::Renewed(issued.cert_pem));
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        if !self.shared.role.is_active() {
            return super::relay::enroll(&self.shared, request).await;
        }
        let req = request.into_inner();
        let store = &self.shared.store;
        identity::valid_name(&req.name)
            .map_err(|e| Status::invalid_argument(format!("agent name: {e}")))?;
        // A bad CSR must not burn the token: sign first, hand out only
        // after the token is consumed.
        let labels: std::collections::BTreeMap<String, String> = req.labels.into_iter().collect();
        crate::limits::check_labels(&labels)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let issued = self
            .shared
            .ca
            .sign_csr(
                &req.csr_pem,
                Role::Agent,
                &req.name,
                self.shared.config.agent_cert_lifetime,
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key = crate::pki::key_sha256(&issued.cert_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let now = crate::clock::now();
        // The store's one writer decides races for a token or a name.
        let enrolled = store
            .enroll(
                &token_hash(&req.token),
                &req.name,
                &key,
                (issued.serial.clone(), issued.expires_at),
                labels,
                now,
            )
            .await
            .map_err(internal)?;
        if let Err(refused) = enrolled {
            tracing::warn!(name = %req.name, reason = %refused, "enrolment refused");
            return Err(match refused {
                TokenRefused::NameTaken(_) => Status::already_exists(refused.to_string()),
                _ => Status::permission_denied(refused.to_string()),
            });
        }
        tracing::info!(name = %req.name, "agent enrolled");
        Ok(Response::new(pb::EnrollResponse {
            cert_pem: issued.cert_pem,
            ca_pem: self.shared.ca.cert_pem().to_string(),
            name: req.name,
        }))
    }

    type ConnectStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        if !self.shared.role.is_active() {
            // A standby relays the agent to the active controller.
            let name = auth::require(&request, Role::Agent, &self.shared.revoked)?.name;
            enrolled(&self.shared, &name)?;
            let serial = super::relay::peer_serial(&request);
            return super::relay::connect(&self.shared, name, serial, request.into_inner()).await;
        }
        let name = super::relay::agent_of(&request, &self.shared.revoked)?;
        enrolled(&self.shared, &name)?;
        let Ok(Ok(turn)) =
            tokio::time::timeout(HELLO_TIMEOUT, self.shared.hellos.clone().acquire_owned()).await
        else {
            return Err(Status::unavailable(
                "the controller is busy setting up other agents' sessions; retry shortly",
            ));
        };
        let mut inbound = request.into_inner();
        let mut hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::AgentMessage {
                msg: Some(Up::Hello(hello)),
            }))) => hello,
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first message must be Hello")),
            Ok(Err(status)) => return Err(status),
            Err(_) => return Err(Status::deadline_exceeded("no Hello in time")),
        };
        let version = std::mem::take(&mut hello.agent_version);
        let hello = convert::hello(hello).map_err(|e| {
            tracing::warn!(agent = %name, error = %e, "Hello refused");
            Status::invalid_argument(format!("Hello refused: {e}"))
        })?;
        let fleet = self.shared.fleet.clone();
        let shared = self.shared.clone();
        let session = fleet.connect(&name, &hello).await.map_err(internal)?;
        let (id, token) = (session.id, session.token.clone());
        drop(turn);
        let silence = silence_limit(&hello);
        tracing::info!(agent = %name, session = id, %version, "agent connected");
        self.shared.tasks.spawn(async move {
            loop {
                // A replaced, dropped or kicked session is heard no more; a
                // silent one (two heartbeats missed) is ended: the network
                // may be gone without TCP noticing for a long while.
                let msg = tokio::select! {
                    msg = inbound.message() => msg,
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(silence) => {
                        tracing::warn!(agent = %name, session = id, silent_for = ?silence,
                            "agent missed two heartbeats; ending its session");
                        break;
                    }
                };
                match msg {
                    Ok(Some(pb::AgentMessage { msg: Some(msg) })) => match msg {
                        Up::Heartbeat(_) => fleet.heartbeat(&name, id),
                        Up::Output(chunk) => fleet.output(&name, convert::output_chunk(chunk)),
                        Up::Result(result) => {
                            fleet.heartbeat(&name, id);
                            fleet.result(&name, convert::agent_result(result)).await
                        }
                        Up::Hello(_) => tracing::debug!(agent = %name, "extra Hello ignored"),
                        Up::Renew(req) => renew(&shared, &name, id, req).await,
                        Up::FileContent(c) => {
                            let (request_id, read) = convert::file_content(c);
                            fleet.file_content(&name, request_id, read);
                        }
                    },
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(agent = %name, error = %status, "session stream error");
                        break;
                    }
                }
            }
            tracing::info!(agent = %name, session = id, "agent disconnected");
            fleet.disconnect(&name, id).await;
        });
        let outbound = session.outbound;
        // Converted to the wire as it is written.
        let stream = ReceiverStream::new(outbound).map(|msg| Ok(convert::to_agent(msg)));
        Ok(Response::new(Box::pin(stream)))
    }
}
