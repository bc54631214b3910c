//! heist.v1.AuthService: the client-credentials grant (no bearer token needed).

use std::sync::Arc;

use heist_proto::v1::{IssueTokenRequest, IssueTokenResponse, auth_service_server::AuthService};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::app::App;

/// AuthService handlers.
pub struct AuthApi {
    app: Arc<App>,
}

impl AuthApi {
    /// Handlers over `app`.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    #[instrument(skip_all, fields(client_id = %request.get_ref().client_id))]
    async fn issue_token(
        &self,
        request: Request<IssueTokenRequest>,
    ) -> Result<Response<IssueTokenResponse>, Status> {
        let peer = request.remote_addr().map(|a| a.ip());
        let req = request.into_inner();
        let result = self
            .app
            .auth
            .login(peer, &req.client_id, &req.client_secret, &req.scopes)
            .await;
        let (kind, detail) = match &result {
            Ok(r) => (
                "token.issued",
                format!("peer={peer:?} scopes={}", r.scopes.join(" ")),
            ),
            Err(err) => ("token.refused", format!("peer={peer:?} {err}")),
        };
        self.app.audit.record(kind, &req.client_id, &detail);
        result.map(Response::new).map_err(Status::from)
    }
}
