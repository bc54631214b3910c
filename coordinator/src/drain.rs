//! Counting the client calls being served, so shutdown drains them before it closes the
//! worker streams those calls need.
//!
//! Shutdown order: health NOT_SERVING, the server stops accepting (new connections, new
//! streams), the calls already running finish (bounded by HEIST_DRAIN_TIMEOUT_S), and only
//! then are the workers' control streams closed. Worker control streams and health watches
//! are not client calls and are not counted (they would never end by themselves).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use tokio::sync::Notify;
use tower::{Layer, Service};

/// Paths that are long-lived by nature and do not hold up a drain.
const UNCOUNTED: [&str; 2] = ["/heist.v1.WorkerControl/", "/grpc.health.v1.Health/Watch"];

/// The number of client calls in flight.
#[derive(Clone, Default)]
pub struct Calls(Arc<Inner>);

#[derive(Default)]
struct Inner {
    count: AtomicUsize,
    idle: Notify,
}

impl Calls {
    /// Counts one call until the guard is dropped.
    pub fn enter(&self) -> CallGuard {
        self.0.count.fetch_add(1, Ordering::SeqCst);
        CallGuard(Arc::clone(&self.0))
    }

    /// Calls in flight now.
    pub fn count(&self) -> usize {
        self.0.count.load(Ordering::SeqCst)
    }

    /// Resolves when no call is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.0.idle.notified();
            if self.count() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// One counted call.
pub struct CallGuard(Arc<Inner>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Layer counting every client call in [`Calls`] until its response (a unary call's whole
/// answer, a streaming call's headers) is produced.
#[derive(Clone)]
pub struct DrainLayer {
    calls: Calls,
}

impl DrainLayer {
    /// A layer counting into `calls`.
    pub fn new(calls: Calls) -> Self {
        Self { calls }
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Counted {
            inner,
            calls: self.calls.clone(),
        }
    }
}

/// The service [`DrainLayer`] wraps.
#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    calls: Calls,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for Counted<S>
where
    S: Service<http::Request<ReqBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        let guard = (!UNCOUNTED.iter().any(|p| path.starts_with(p))).then(|| self.calls.enter());
        let fut = self.inner.call(request);
        Box::pin(async move {
            let out = fut.await;
            drop(guard);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_the_last_call() {
        let calls = Calls::default();
        calls.wait_idle().await;
        let guard = calls.enter();
        let waiter = tokio::spawn({
            let calls = calls.clone();
            async move { calls.wait_idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(guard);
        waiter.await.expect("idle");
        assert_eq!(calls.count(), 0);
    }
}
