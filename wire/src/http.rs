//! The serve loop behind every rmem HTTP endpoint.
//!
//! `axum::serve` reads a request's headers for as long as the client likes and accepts every
//! connection, so a client that trickles its headers (or opens thousands of sockets and sends
//! nothing) holds memory and a task for ever. This loop bounds both: at most
//! [`Limits::connections`] connections at once (further ones wait in the kernel's backlog) and
//! [`Limits::header_read`] to send a request's headers, idle keep-alive time included.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What one endpoint allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub connections: usize,
    /// Time to send a request's headers, from the connection's start or the last response.
    pub header_read: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 1024,
            header_read: Duration::from_secs(10),
        }
    }
}

/// Serves `app` on `listener` until accepting fails for good.
pub async fn serve(listener: TcpListener, app: axum::Router) -> std::io::Result<()> {
    serve_with(listener, app, Limits::default()).await
}

/// [`serve`] with other limits.
pub async fn serve_with(
    listener: TcpListener,
    app: axum::Router,
    limits: Limits,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) if transient(&e) => {
                // Out of descriptors or a connection reset before accept: wait, go on.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let _ = stream.set_nodelay(true);
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            drop(slot);
        });
    }
}

/// Errors after which accepting can go on: a connection gone before it was taken, or a
/// shortage (descriptors, buffers) that closing connections will end.
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted, WouldBlock};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
