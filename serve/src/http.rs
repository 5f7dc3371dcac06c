//! HTTP/1.1 serving that a client cannot exhaust: connections capped per address and in
//! total (over the cap: a one-line 429 or 503 and close), a deadline for the request
//! headers (slowloris), a deadline for the whole request body (a body dripped a byte at a
//! time), accept errors survived ([`crate::tcp`]), and graceful shutdown: in-flight
//! requests finish, for at most the drain timeout.
//!
//! Handlers get the peer address as `ConnectInfo<ClientAddr>`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::conn_limit::{ClientAddr, ConnLimit, Refused};
use crate::tcp::Acceptor;

/// Limits of one HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Open connections from one address.
    pub max_conns_per_ip: usize,
    /// Open connections in all.
    pub max_conns: usize,
    /// Time a client has to send a request's headers (also how long an idle keep-alive
    /// connection is kept).
    pub header_timeout: Duration,
    /// Time a client has to send a request's whole body, from the end of its headers.
    pub body_timeout: Duration,
    /// At shutdown, how long in-flight requests may take to finish.
    pub drain_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_conns_per_ip: 256,
            max_conns: 8192,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

const TOO_MANY_FROM_ADDRESS: &[u8] = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: 40\r\nConnection: close\r\n\r\ntoo many connections from this address\r\n";
const FULL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\nContent-Length: 34\r\nConnection: close\r\n\r\nserver full: too many connections\r\n";

/// Serves `router` on `listener` until `shutdown` resolves; `name` labels the logs.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    name: &'static str,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut acceptor = Acceptor::new(listener, name);
    let conns = ConnLimit::with_total(limits.max_conns_per_ip, limits.max_conns);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = &mut shutdown => break,
        };
        let slot = match conns.try_take(addr.ip()) {
            Ok(slot) => slot,
            Err(why) => {
                tracing::debug!(listener = name, %addr, ?why, "connection refused");
                refuse(
                    stream,
                    if why == Refused::Total {
                        FULL
                    } else {
                        TOO_MANY_FROM_ADDRESS
                    },
                );
                continue;
            }
        };
        let body_timeout = limits.body_timeout;
        let service =
            tower::ServiceExt::map_request(router.clone(), move |req: hyper::Request<Incoming>| {
                let mut req = req.map(|b| Body::new(DeadlineBody::new(b, body_timeout)));
                req.extensions_mut().insert(ConnectInfo(ClientAddr(addr)));
                req
            });
        let conn =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(listener = name, %addr, error = %e, "connection ended");
            }
            drop(slot);
        });
    }
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = name,
            "requests still running after the drain timeout"
        );
    }
}

/// Answers `text` and closes, reading (and dropping) what the client already sent for a
/// moment first: closing with unread data would reset the connection before the client
/// reads the answer.
fn refuse(mut stream: tokio::net::TcpStream, text: &'static [u8]) {
    tokio::spawn(async move {
        let _ = stream.write_all(text).await;
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 16 * 1024];
        let drain = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    });
}

/// A request body that fails once its deadline has passed: the handler reading it gets an
/// error (axum answers 400/408-style) and the connection is freed.
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

/// The body was not sent in time.
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body not received in time")
    }
}

impl std::error::Error for BodyTimeout {}

impl http_body::Body for DeadlineBody {
    type Data = hyper::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};

    async fn start(limits: HttpLimits) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let router = Router::new().route("/", get(|| async { "ok" })).route(
            "/echo",
            post(|body: axum::body::Bytes| async move { body.len().to_string() }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, router, limits, "test", async {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    async fn read_all(s: &mut tokio::net::TcpStream) -> String {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn a_client_that_never_sends_its_headers_is_disconnected() {
        let limits = HttpLimits {
            header_timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let (addr, _stop) = start(limits).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        // The server closes the connection (EOF) instead of waiting for ever.
        let got = tokio::time::timeout(Duration::from_secs(5), read_all(&mut s))
            .await
            .expect("the server did not close a connection stuck in its headers");
        assert!(!got.contains("200 OK"), "{got}");
    }

    #[tokio::test]
    async fn a_body_dripped_past_its_deadline_is_refused() {
        let limits = HttpLimits {
            body_timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let (addr, _stop) = start(limits).await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), read_all(&mut s))
            .await
            .expect("the server kept waiting for the body");
        assert!(got.starts_with("HTTP/1.1 4"), "{got}");
    }

    #[tokio::test]
    async fn connections_over_the_per_address_cap_get_429() {
        let limits = HttpLimits {
            max_conns_per_ip: 2,
            ..Default::default()
        };
        let (addr, _stop) = start(limits).await;
        let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let got = read_all(&mut c).await;
        assert!(got.starts_with("HTTP/1.1 429"), "{got}");
        // A well-behaved request on a fresh connection still works once one closes.
        drop(_a);
        let mut ok = None;
        for _ in 0..100 {
            let mut d = tokio::net::TcpStream::connect(addr).await.unwrap();
            d.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let got = read_all(&mut d).await;
            if got.contains("200 OK") {
                ok = Some(got);
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(ok.is_some(), "no slot came back after a connection closed");
    }
}
