//! Accepting TCP connections without ever giving up: an error (out of file descriptors, a
//! connection reset before it was accepted) is logged and retried after a back-off, so a
//! burst of idle connections degrades the listener for a moment instead of ending it.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A listener whose [`Acceptor::accept`] only returns connections.
pub struct Acceptor {
    listener: TcpListener,
    name: &'static str,
    backoff: Duration,
}

impl Acceptor {
    /// `name` says which listener it is in the logs.
    pub fn new(listener: TcpListener, name: &'static str) -> Self {
        Self {
            listener,
            name,
            backoff: FIRST_BACKOFF,
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection; errors are logged and retried with a doubling back-off (up to
    /// 1 s), never returned.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    self.backoff = FIRST_BACKOFF;
                    let _ = accepted.0.set_nodelay(true);
                    return accepted;
                }
                Err(e) => {
                    tracing::warn!(listener = self.name, error = %e, retry_in = ?self.backoff,
                        "accept failed (out of file descriptors?); retrying");
                    tokio::time::sleep(self.backoff).await;
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
