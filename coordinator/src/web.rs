//! The plain HTTP routes served on the gRPC port, and the one place they are listed.
//!
//! - `GET /healthz`: 200 while the process serves (liveness).
//! - `GET /readyz`: 200 when the store answers and at least one worker is READY, 503 with the
//!   reason otherwise (readiness: a coordinator without workers cannot place a session).
//!
//! Both are on the auth allow-list ([`heist_proto::scopes::PUBLIC`]), so probes need no token.
//! Every other path still goes through the bearer-token layer; `/metrics`, `/mcp`,
//! `/oauth/token` and `/.well-known/…` are added to [`routes`] (and, when public, to the
//! allow-list).

use std::sync::Arc;

use axum::{Router, extract::State, http::StatusCode, routing::get};
use heist_proto::v1::WorkerState;

use crate::app::App;

/// The HTTP routes, merged with the gRPC services into one router.
pub fn routes(app: Arc<App>) -> Router {
    let mcp = crate::mcp::routes(app.clone());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(app)
        .merge(mcp)
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
