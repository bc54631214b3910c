//! Counting calls in flight, so shutdown can wait until the last one has finished.

use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::Notify;

/// Calls being served right now.
#[derive(Default)]
pub struct InFlight {
    count: AtomicU32,
    idle: Notify,
}

/// Counts one call for as long as it lives.
pub struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    /// Counts a call until the guard is dropped.
    pub fn enter(&self) -> InFlightGuard<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self)
    }

    /// Calls in flight right now.
    pub fn count(&self) -> u32 {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves once no call is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            // Register before checking, so a guard dropped in between still wakes us.
            notified.as_mut().enable();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::FutureExt as _;

    use super::*;

    #[tokio::test]
    async fn waits_for_the_last_call() {
        let inflight = Arc::new(InFlight::default());
        inflight.wait_idle().await;

        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel::<()>();
        let call = {
            let inflight = Arc::clone(&inflight);
            tokio::spawn(async move {
                let _guard = inflight.enter();
                let _ = entered_tx.send(());
                let _ = release_rx.await;
            })
        };
        entered_rx.await.expect("entered");
        assert_eq!(inflight.count(), 1);
        assert!(
            inflight.wait_idle().now_or_never().is_none(),
            "must not be idle while a call runs"
        );

        release_tx.send(()).expect("release");
        inflight.wait_idle().await;
        call.await.expect("call");
        assert_eq!(inflight.count(), 0);
    }
}
