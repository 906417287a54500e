//! Waiting for readiness by polling, shared by the donor's, the borrower's and the CLI's tests.

use std::future::Future;
use std::time::Duration;

/// Polls `ready` every 10 ms until it holds; panics naming `what` once `timeout` has passed
/// (each try is bounded by what is left of it). For readiness, never a fixed sleep.
pub async fn wait_until_async<F: Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(true) = tokio::time::timeout_at(deadline, ready()).await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready after {timeout:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
