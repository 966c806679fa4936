//! `AdminService`: what the `modi` CLI calls. Every call comes from a
//! named operator whose role allowed it (decided before any handler runs,
//! in [`super::authz`]); the operator's name is recorded with what it did.

use std::pin::Pin;
use std::sync::Arc;

use modi_proto::v1 as pb;
use tokio::sync::oneshot;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::admin_access as access;
use super::admin_convert as convert;
use super::authz;
use crate::driver;
use crate::rollout::{Event, RunStatus};
use crate::run_ports::{DriverMsg, WatchItem};
use crate::server::Shared;
use crate::typed;

/// The admin service.
pub struct AdminApi {
    shared: Arc<Shared>,
}

impl AdminApi {
    /// Serves from the controller's shared state.
    pub fn new(shared: Arc<Shared>) -> AdminApi {
        AdminApi { shared }
    }

    async fn status(&self, run: u64) -> Result<(crate::store::RunMeta, RunStatus), Status> {
        let meta = self
            .shared
            .store
            .run(run)
            .map_err(convert::store_error)?
            .ok_or_else(|| Status::not_found(format!("no run {run}")))?;
        if let Some(ports) = self.shared.fleet.run_ports(run) {
            let (tx, rx) = oneshot::channel();
            if ports
                .inbox
                .send(DriverMsg::Status { reply: tx })
                .await
                .is_ok()
                && let Ok(status) = rx.await
            {
                return Ok((meta, status));
            }
        }
        let replayed = driver::replay(&self.shared.store, self.shared.judge.clone(), run)
            .map_err(convert::store_error)?
            .ok_or_else(|| Status::not_found(format!("no journal for run {run}")))?;
        let mut status = replayed.engine.status();
        status.late = replayed.late;
        Ok((meta, status))
    }
}

impl AdminApi {
    /// `agents revoke` (`forget` false) and `agents remove` (true): every
    /// certificate of the host is refused from now on, its live session
    /// dropped, and with `forget` its record removed.
    async fn drop_agent(
        &self,
        request: Request<pb::RevokeAgentRequest>,
        forget: bool,
    ) -> Result<Response<pb::RevokeAgentResponse>, Status> {
        let admin = authz::caller(&request)?;
        let name = request.into_inner().name;
        let host = self
            .shared
            .store
            .revoke(&name, &admin.name, crate::clock::now(), forget)
            .await
            .map_err(convert::store_error)?
            .ok_or_else(|| Status::not_found(format!("no agent named {name:?}")))?;
        self.shared
            .revoked
            .write()
            .expect("revoked lock")
            .extend(host.serials.iter().cloned());
        self.shared.fleet.kick(&name).await;
        let what = if forget { "removed" } else { "revoked" };
        tracing::warn!(agent = %name, by = %admin.name, "agent {what}");
        Ok(access::audited(
            pb::RevokeAgentResponse {},
            format!("host {name}"),
        ))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let by = authz::caller(&request)?;
        access::create_token(&self.shared, &by, request.into_inner()).await
    }

    async fn list_hosts(
        &self,
        request: Request<pb::ListHostsRequest>,
    ) -> Result<Response<pb::ListHostsResponse>, Status> {
        authz::caller(&request)?;
        let req = request.into_inner();
        let selector = if req.selector.trim().is_empty() {
            None
        } else {
            Some(
                crate::changeset::Selector::parse(&req.selector)
                    .map_err(|e| Status::invalid_argument(format!("selector: {e}")))?,
            )
        };
        let presence = self.shared.fleet.presence();
        let hosts = self
            .shared
            .store
            .hosts()
            .map_err(convert::store_error)?
            .into_iter()
            .filter(|h| {
                selector
                    .as_ref()
                    .is_none_or(|s| s.matches(&convert::host_info(h)))
            })
            .map(|h| convert::host(&h, presence.get(&h.name)))
            .collect();
        Ok(Response::new(pb::ListHostsResponse { hosts }))
    }

    async fn revoke_agent(
        &self,
        request: Request<pb::RevokeAgentRequest>,
    ) -> Result<Response<pb::RevokeAgentResponse>, Status> {
        self.drop_agent(request, false).await
    }

    async fn remove_agent(
        &self,
        request: Request<pb::RevokeAgentRequest>,
    ) -> Result<Response<pb::RevokeAgentResponse>, Status> {
        self.drop_agent(request, true).await
    }

    async fn plan(
        &self,
        request: Request<pb::PlanRequest>,
    ) -> Result<Response<pb::PlanResponse>, Status> {
        let caller = authz::caller(&request)?;
        let req = request.into_inner();
        // Reading files on hosts is more than a viewer may do.
        if req.diff && caller.role < crate::store::OperatorRole::Operator {
            return Err(Status::permission_denied(format!(
                "plan --diff reads files on hosts: operator {} is a {}, it needs the operator role",
                caller.name, caller.role
            )));
        }
        let diff = req.diff;
        let (spec, warnings) = convert::render_and_warn(&self.shared, req)?;
        Ok(Response::new(pb::PlanResponse {
            warnings,
            diffs: if diff {
                super::plan_diff::diffs(&self.shared.fleet, &spec).await
            } else {
                Vec::new()
            },
            spec: Some(typed::run_spec(&spec)),
        }))
    }

    async fn apply(
        &self,
        request: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let admin = authz::caller(&request)?;
        let req = request.into_inner();
        // A plan with the secrets' values.
        let req = pb::PlanRequest {
            sources: req.sources,
            vars: req.vars,
            secrets: req.secrets,
            diff: false,
        };
        let secrets = convert::secrets(req.secrets.clone())?;
        let (spec, warnings) = convert::render_and_warn(&self.shared, req)?;
        let run = driver::start(&self.shared.drivers, spec, secrets, &admin.name)
            .await
            .map_err(convert::store_error)?;
        tracing::info!(run, by = %admin.name, "run submitted");
        Ok(access::audited(
            pb::ApplyResponse {
                run_id: run.to_string(),
                warnings,
            },
            format!("run {run}"),
        ))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        authz::caller(&request)?;
        let limit = request.into_inner().limit as usize;
        // While the store cannot write, runs being driven wait as paused.
        let held = self.shared.store.health().is_some();
        let runs = match limit {
            0 => self.shared.store.runs(),
            n => self.shared.store.newest_runs(n),
        };
        let runs = runs
            .map_err(convert::store_error)?
            .into_iter()
            .map(|mut m| {
                if held && m.finished_at.is_none() {
                    m.state = crate::rollout::RunState::Paused;
                }
                convert::run_summary(&m)
            })
            .collect();
        Ok(Response::new(pb::ListRunsResponse { runs }))
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::GetRunResponse>, Status> {
        authz::caller(&request)?;
        let run = convert::run_id(&request.into_inner().run_id)?;
        let (meta, status) = self.status(run).await?;
        Ok(Response::new(pb::GetRunResponse {
            summary: Some(convert::run_summary(&meta)),
            status: Some(typed::run_status(&status)),
        }))
    }

    type WatchStream = BoxStream<pb::WatchEvent>;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        authz::caller(&request)?;
        let run = convert::run_id(&request.into_inner().run_id)?;
        // Subscribe before the snapshot, so nothing falls between them.
        let mut live = self
            .shared
            .fleet
            .run_ports(run)
            .map(|p| p.watch.subscribe());
        let (_, status) = self.status(run).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tx.send(Ok(pb::WatchEvent {
            event: Some(pb::watch_event::Event::Status(typed::run_status(&status))),
        }))
        .await
        .ok();
        let shutdown = self.shared.shutdown.clone();
        if !status.state.is_final()
            && let Some(mut live) = live.take()
        {
            tokio::spawn(async move {
                loop {
                    let item = tokio::select! {
                        item = live.recv() => item,
                        _ = shutdown.cancelled() => break,
                        _ = tx.closed() => break,
                    };
                    let item = match item {
                        Ok(item) => item,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(run, skipped = n, "a watcher fell behind");
                            continue;
                        }
                        Err(_) => break,
                    };
                    let end = matches!(&item, WatchItem::Progress {
                        progress: crate::rollout::Progress::Run { state }
                    } if state.is_final());
                    let event = pb::WatchEvent {
                        event: Some(pb::watch_event::Event::Progress(typed::progress(&item))),
                    };
                    if tx.send(Ok(event)).await.is_err() || end {
                        break;
                    }
                }
            });
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type LogsStream = BoxStream<pb::LogEntry>;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        authz::caller(&request)?;
        let req = request.into_inner();
        let run = convert::run_id(&req.run_id)?;
        let live = req
            .follow
            .then(|| {
                self.shared
                    .fleet
                    .run_ports(run)
                    .map(|p| p.watch.subscribe())
            })
            .flatten();
        let (entries, spec) = convert::logs(&self.shared, run, &req.host)?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let shutdown = self.shared.shutdown.clone();
        let mut follow = convert::LiveLog::new(spec, req.host);
        let clock = self.shared.drivers.clock;
        tokio::spawn(async move {
            for e in entries {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            let Some(mut live) = live else { return };
            loop {
                let item = tokio::select! {
                    item = live.recv() => item,
                    _ = shutdown.cancelled() => break,
                    _ = tx.closed() => break,
                };
                match item {
                    Ok(item) => {
                        if let Some(entry) = follow.entry(item, clock.now())
                            && tx.send(Ok(entry)).await.is_err()
                        {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn control(
        &self,
        request: Request<pb::ControlRequest>,
    ) -> Result<Response<pb::ControlResponse>, Status> {
        let admin = authz::caller(&request)?;
        let mut req = request.into_inner();
        let run = convert::run_id(&req.run_id)?;
        let by = admin.name.clone();
        let event = match pb::ControlAction::try_from(req.action) {
            Ok(pb::ControlAction::Approve) => Event::Approve { by },
            Ok(pb::ControlAction::Deny) => Event::Deny {
                by,
                backout: !req.no_backout,
            },
            Ok(pb::ControlAction::Abort) => Event::Abort {
                by,
                backout: !req.no_backout,
            },
            Ok(pb::ControlAction::Pause) => Event::Pause { by },
            Ok(pb::ControlAction::Resume) => Event::Resume { by },
            _ => return Err(Status::invalid_argument("unknown control action")),
        };
        let Some(ports) = self.shared.fleet.run_ports(run) else {
            let meta = self.shared.store.run(run).map_err(convert::store_error)?;
            return Err(match meta {
                Some(m) => Status::failed_precondition(format!(
                    "run {run} has ended ({})",
                    m.state.as_str()
                )),
                None => Status::not_found(format!("no run {run}")),
            });
        };
        let (tx, rx) = oneshot::channel();
        ports
            .inbox
            .send(convert::control_msg(
                event,
                std::mem::take(&mut req.secrets),
                tx,
            )?)
            .await
            .map_err(|_| Status::unavailable(format!("run {run} is shutting down")))?;
        let state = rx
            .await
            .map_err(|_| Status::unavailable(format!("run {run} is shutting down")))?
            .map_err(Status::failed_precondition)?;
        tracing::info!(run, by = %admin.name, action = ?req.action, "control");
        Ok(access::audited(
            pb::ControlResponse {
                state: typed::run_state(state),
            },
            format!("run {run}"),
        ))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        authz::caller(&request)?;
        access::list_tokens(&self.shared)
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        authz::caller(&request)?;
        access::revoke_token(&self.shared, request.into_inner()).await
    }

    async fn label_host(
        &self,
        request: Request<pb::LabelHostRequest>,
    ) -> Result<Response<pb::LabelHostResponse>, Status> {
        authz::caller(&request)?;
        access::label_host(&self.shared, request.into_inner()).await
    }

    async fn add_operator(
        &self,
        request: Request<pb::OperatorCsr>,
    ) -> Result<Response<pb::OperatorCert>, Status> {
        let by = authz::caller(&request)?;
        access::add_operator(&self.shared, &by, request.into_inner()).await
    }

    async fn renew_operator(
        &self,
        request: Request<pb::OperatorCsr>,
    ) -> Result<Response<pb::OperatorCert>, Status> {
        authz::caller(&request)?;
        access::renew_operator(&self.shared, request.into_inner()).await
    }

    async fn list_operators(
        &self,
        request: Request<pb::ListOperatorsRequest>,
    ) -> Result<Response<pb::ListOperatorsResponse>, Status> {
        authz::caller(&request)?;
        access::list_operators(&self.shared)
    }

    async fn revoke_operator(
        &self,
        request: Request<pb::RevokeOperatorRequest>,
    ) -> Result<Response<pb::RevokeOperatorResponse>, Status> {
        let by = authz::caller(&request)?;
        access::revoke_operator(&self.shared, &by, request.into_inner()).await
    }

    async fn web_login(
        &self,
        request: Request<pb::WebLoginRequest>,
    ) -> Result<Response<pb::WebLoginResponse>, Status> {
        let caller = authz::caller(&request)?;
        let Some(base) = crate::web::base_url(&self.shared.config) else {
            return Err(Status::failed_precondition(
                "the web view is off: set web_listen (e.g. \"127.0.0.1:8443\") in controller.toml and restart modi serve",
            ));
        };
        let token = self.shared.web.login_token(&caller.name);
        Ok(access::audited(
            pb::WebLoginResponse {
                url: format!("{base}/login?token={token}"),
                expires_at_ms: self.shared.drivers.clock.now() + crate::web::session::LOGIN_TTL_MS,
            },
            format!("web login for {}", caller.name),
        ))
    }

    async fn version(
        &self,
        request: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::VersionResponse>, Status> {
        authz::caller(&request)?;
        Ok(Response::new(pb::VersionResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        authz::caller(&request)?;
        access::list_audit(&self.shared, request.into_inner())
    }
}
