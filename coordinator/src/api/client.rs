//! heist.v1.ClientService: creating, listing, rotating and revoking API clients (admin scope).
//! The work is [`crate::auth::Auth`]'s; each change is written to the audit log with who made it.
//! Also the rotation of the coordinator's token signing key ([`crate::signing_keys`]), which
//! connected workers learn on their control stream ([`crate::control::announce_keys`]).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use heist_proto::{
    ids::ClientId,
    v1::{
        ApiClient, CreateClientRequest, CreateClientResponse, ListClientsRequest,
        ListClientsResponse, RevokeClientRequest, RevokeClientResponse, RotateClientSecretRequest,
        RotateClientSecretResponse, RotateSigningKeyRequest, RotateSigningKeyResponse,
        client_service_server::ClientService,
    },
};
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use crate::{app::App, auth::ClientRecord, auth_layer::principal};

/// ClientService handlers.
pub struct ClientApi {
    app: Arc<App>,
}

impl ClientApi {
    /// Handlers over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }

    /// A record as administrators see it: no secret, no hash.
    fn view(&self, record: ClientRecord) -> ApiClient {
        let at = |s: u64| (s > 0).then(|| (SystemTime::UNIX_EPOCH + Duration::from_secs(s)).into());
        ApiClient {
            bootstrap: record.id == self.app.auth.admin_id(),
            created_at: at(record.created_at_unix_s),
            updated_at: at(record.updated_at_unix_s),
            revoked_at: at(record.revoked_at_unix_s),
            revoked: record.revoked,
            scopes: record.scopes,
            id: record.id,
        }
    }
}

#[tonic::async_trait]
impl ClientService for ClientApi {
    #[instrument(skip_all, fields(client_id = %request.get_ref().client_id))]
    async fn create_client(
        &self,
        request: Request<CreateClientRequest>,
    ) -> Result<Response<CreateClientResponse>, Status> {
        let by = principal(&request)?.id.clone();
        let req = request.into_inner();
        let id = ClientId::parse(req.client_id)?;
        let (record, client_secret) = self.app.auth.create_client(&id, &req.scopes).await?;
        let detail = format!("by={by} scopes={}", record.scopes.join(" "));
        self.app
            .audit
            .record("client.created", id.as_str(), &detail);
        Ok(Response::new(CreateClientResponse {
            client: Some(self.view(record)),
            client_secret,
        }))
    }

    #[instrument(skip_all)]
    async fn list_clients(
        &self,
        _request: Request<ListClientsRequest>,
    ) -> Result<Response<ListClientsResponse>, Status> {
        let records = self.app.auth.list_clients()?;
        Ok(Response::new(ListClientsResponse {
            clients: records.into_iter().map(|r| self.view(r)).collect(),
        }))
    }

    #[instrument(skip_all, fields(client_id = %request.get_ref().client_id))]
    async fn rotate_client_secret(
        &self,
        request: Request<RotateClientSecretRequest>,
    ) -> Result<Response<RotateClientSecretResponse>, Status> {
        let by = principal(&request)?.id.clone();
        let id = ClientId::parse(request.into_inner().client_id)?;
        let (record, client_secret) = self.app.auth.rotate_secret(&id).await?;
        let detail = format!(
            "by={by} scopes={} generation={}",
            record.scopes.join(" "),
            record.generation
        );
        self.app
            .audit
            .record("client.rotated", id.as_str(), &detail);
        Ok(Response::new(RotateClientSecretResponse {
            client: Some(self.view(record)),
            client_secret,
        }))
    }

    #[instrument(skip_all, fields(client_id = %request.get_ref().client_id))]
    async fn revoke_client(
        &self,
        request: Request<RevokeClientRequest>,
    ) -> Result<Response<RevokeClientResponse>, Status> {
        let by = principal(&request)?.id.clone();
        let id = ClientId::parse(request.into_inner().client_id)?;
        let (record, already_revoked) = self.app.auth.revoke_client(&id).await?;
        if !already_revoked {
            let detail = format!("by={by} scopes={}", record.scopes.join(" "));
            self.app
                .audit
                .record("client.revoked", id.as_str(), &detail);
        }
        Ok(Response::new(RevokeClientResponse {
            client: Some(self.view(record)),
            already_revoked,
        }))
    }

    #[instrument(skip_all)]
    async fn rotate_signing_key(
        &self,
        request: Request<RotateSigningKeyRequest>,
    ) -> Result<Response<RotateSigningKeyResponse>, Status> {
        let by = principal(&request)?.id.clone();
        let rotation = self.app.keys.rotate().await?;
        let workers = crate::control::announce_keys(&self.app);
        info!(kid = %rotation.key_id, retired = %rotation.retired_key_id, workers, "signing key rotated");
        let detail = format!(
            "by={by} retired={} accepted_until={} dropped={}",
            rotation.retired_key_id,
            rotation.retired_until,
            rotation.dropped.join(",")
        );
        self.app
            .audit
            .record("signing_key.rotated", &rotation.key_id, &detail);
        Ok(Response::new(RotateSigningKeyResponse {
            retired_accepted_until: Some(
                (SystemTime::UNIX_EPOCH + Duration::from_secs(rotation.retired_until)).into(),
            ),
            key_id: rotation.key_id,
            retired_key_id: rotation.retired_key_id,
            dropped_key_ids: rotation.dropped,
        }))
    }
}
