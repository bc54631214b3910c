//! The plain HTTP routes served on the gRPC port, and the one place they are listed.
//!
//! - `GET /healthz`: 200 while the process serves (liveness).
//! - `GET /readyz`: 200 when the store answers and can take writes (its disk is above the
//!   HEIST_STORE_MIN_FREE_BYTES reserve) and at least one worker is READY, 503 with the reason
//!   otherwise (readiness: a coordinator without workers cannot place a session).
//!
//! - `GET /.well-known/jwks.json`: the token signing keys as a JWK Set (public).
//! - `GET /metrics`: the Prometheus metrics ([`crate::metrics`]). It checks its own token
//!   (scope `cluster:read`) unless HEIST_METRICS_PUBLIC opens it, so it is on the allow-list.
//!
//! The probes are on the auth allow-list ([`heist_proto::scopes::PUBLIC`]), so probes need no token.
//! Every other path still goes through the bearer-token layer; `/metrics`, `/mcp`,
//! `/oauth/token` and `/.well-known/…` are added to [`routes`] (and, when public, to the
//! allow-list).

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use heist_proto::{metadata, scopes, v1::WorkerState};

use crate::app::App;

/// The HTTP routes, merged with the gRPC services into one router.
pub fn routes(app: Arc<App>) -> Router {
    let mcp = crate::mcp::routes(app.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/.well-known/jwks.json", get(jwks))
        .with_state(app)
        .merge(mcp)
}

/// `/metrics`: 401 without a valid token, 403 without `cluster:read`, unless the operator
/// made it public.
async fn metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if !app.config.metrics_public {
        let verifier = app.keys.client_verifier();
        let claims = metadata::bearer(&headers)
            .and_then(|t| verifier.verify(t).ok())
            .filter(|claims| app.auth.states().check(claims).is_ok());
        // Refusals are counted by the RPC layer (reason `401` / `403`).
        let Some(claims) = claims else {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a bearer token with cluster:read is needed (or set HEIST_METRICS_PUBLIC)\n",
            )
                .into_response();
        };
        if !scopes::grants(&claims.scope, scopes::CLUSTER_READ) {
            return (StatusCode::FORBIDDEN, "the token lacks cluster:read\n").into_response();
        }
    }
    let sessions = app.sessions.count_by_state();
    let mut workers = std::collections::BTreeMap::new();
    for worker in app.registry.list() {
        *workers.entry(worker.state).or_insert(0) += 1;
    }
    app.metrics.store(&app.store.reserve);
    let body = app.metrics.render(&sessions, &workers);
    (
        [(header::CONTENT_TYPE, heist_proto::metrics::CONTENT_TYPE)],
        body,
    )
        .into_response()
}

/// `/.well-known/jwks.json`: the public keys that verify the coordinator's tokens, the current
/// one and the retired ones still accepted (public, like any JWKS).
async fn jwks(State(app): State<Arc<App>>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/jwk-set+json"),
            (header::CACHE_CONTROL, "max-age=60"),
        ],
        app.keys.jwks().to_string(),
    )
        .into_response()
}

async fn healthz() -> (StatusCode, &'static str) {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(app): State<Arc<App>>) -> (StatusCode, String) {
    match readiness(&app) {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// Why the coordinator cannot serve sessions yet, if it cannot.
fn readiness(app: &App) -> Result<(), String> {
    if app.shutdown.is_cancelled() {
        return Err("shutting down".to_owned());
    }
    app.store
        .meta
        .contains_key(b"readyz")
        .map_err(|err| format!("the store does not answer ({err})"))?;
    if let Err(refusal) = app.store.reserve.check() {
        return Err(refusal.to_string());
    }
    let ready = app
        .registry
        .list()
        .iter()
        .any(|w| w.state == WorkerState::Ready as i32);
    if !ready {
        return Err("no worker is READY: start a worker that joins this coordinator".to_owned());
    }
    Ok(())
}
