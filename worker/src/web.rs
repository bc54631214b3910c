//! The plain HTTP routes served on the worker's gRPC port, and the one place they are listed.
//!
//! - `GET /healthz`: 200 while the process serves (liveness).
//! - `GET /readyz`: 200 while the worker is registered with its coordinator and not draining,
//!   503 with the reason otherwise (the same rule as its grpc.health.v1 status).
//!
//! `/metrics` goes here next.

use std::sync::Arc;

use axum::{Router, extract::State as Shared, http::StatusCode, routing::get};

use crate::state::State;

/// The HTTP routes, merged with the gRPC services into one router.
pub(crate) fn routes(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
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
