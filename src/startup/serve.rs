//! The HTTP/1.1 server loop: accept, optionally terminate TLS, serve each connection with hyper,
//! and drain on shutdown.
//!
//! `axum::serve` can neither terminate TLS nor bound the request head, so the loop is written out
//! here with hyper directly: `max_buf_size` caps the request line and headers (hyper answers 431
//! above it, before anything is routed), `header_read_timeout` drops clients that trickle their
//! headers or sit idle, `max_connections` bounds the connections open at once (the rest wait in
//! the kernel's listen backlog), and TLS handshakes run in the connection's task under a timeout, so a
//! slow client never holds up the accept loop.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::{Routes, TokenHandler};

/// Longest a client may take to complete a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a connection may wait for a whole request head. hyper starts this clock as soon as a
/// connection is idle, so it is also the keep-alive idle timeout: long enough that callers' pools
/// (often 90 s idle) rarely race a close, short enough that stalled clients let go.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause after an accept error (out of file descriptors, say) before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How connections are served.
pub struct ConnectionSettings {
    /// Largest request head in bytes (at least 8192, hyper's minimum).
    pub max_header_bytes: usize,
    /// Terminate TLS with this, when set.
    pub tls: Option<TlsAcceptor>,
    /// Most connections open at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

/// Accepts and serves connections until `shutdown` completes, then stops accepting and returns
/// the handle that drains the open connections.
pub async fn accept_until<H: TokenHandler>(
    listener: TcpListener,
    app: Routes<H>,
    settings: ConnectionSettings,
    shutdown: impl Future<Output = ()>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(settings.max_header_bytes);
    let http = Arc::new(http);
    let open = Arc::new(Semaphore::new(settings.max_connections));
    tokio::pin!(shutdown);
    loop {
        // Accept only with a free slot: over `max_connections`, clients wait in the backlog.
        let slot = tokio::select! {
            slot = Arc::clone(&open).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = serve_connection(
            stream,
            settings.tls.clone(),
            Arc::clone(&http),
            app.clone(),
            graceful.watcher(),
        );
        tokio::spawn(async move {
            connection.await;
            drop(slot);
        });
    }
    graceful
}

async fn serve_connection<H: TokenHandler>(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    http: Arc<hyper::server::conn::http1::Builder>,
    app: Routes<H>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    // Token answers are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let service = TowerToHyperService::new(app);
    let result = match tls {
        None => {
            watcher
                .watch(http.serve_connection(TokioIo::new(stream), service))
                .await
        }
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    watcher
                        .watch(http.serve_connection(TokioIo::new(stream), service))
                        .await
                }
                Ok(Err(error)) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    return;
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}
