//! The plain HTTP routes served on the worker's gRPC port, and the one place they are listed.
//!
//! - `GET /healthz`: 200 while the process serves (liveness).
//! - `GET /readyz`: 200 while the worker is registered with its coordinator and not draining,
//!   503 with the reason otherwise (the same rule as its grpc.health.v1 status).
//!
//! - `GET /metrics`: the Prometheus metrics ([`crate::metrics`]). Unless HEIST_METRICS_PUBLIC
//!   opens it, it needs a client token with `cluster:read` signed by the coordinator that
//!   accepted this worker (the token that scrapes the coordinator scrapes its workers).

use std::sync::Arc;

use axum::{
    Router,
    extract::State as Shared,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::state::State;

/// The HTTP routes, merged with the gRPC services into one router.
pub(crate) fn routes(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn metrics(Shared(state): Shared<Arc<State>>, headers: HeaderMap) -> Response {
    if !state.metrics_public
        && let Err(err) = state
            .auth
            .check_client_scope(&headers, heist_proto::scopes::CLUSTER_READ)
    {
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            format!("{err} (or set HEIST_METRICS_PUBLIC)\n"),
        )
            .into_response();
    }
    (
        [(header::CONTENT_TYPE, heist_proto::metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> (StatusCode, &'static str) {
    (StatusCode::OK, "ok\n")
}

async fn readyz(Shared(state): Shared<Arc<State>>) -> (StatusCode, String) {
    match state.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
