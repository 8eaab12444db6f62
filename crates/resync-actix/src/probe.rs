//! Noticing at once that an SSE or long-poll client went away.
//!
//! actix-web learns that a client closed a streaming response only when a write to it fails
//! (actix-web issue #1313), so an idle SSE stream would keep its subscriptions until the next
//! heartbeat, twice over. [`track_disconnects`] fixes that: passed to
//! `HttpServer::on_connect`, it keeps a second handle on each TCP connection, which the
//! transports watch for the end-of-stream the client sends when it leaves. Without it,
//! everything works, but a departed SSE client is noticed only by a failed heartbeat write.
//!
//! The duplicate costs a file descriptor; a WebSocket upgrade closes it at once (the socket
//! itself tells a WebSocket that its client left), so only SSE and long-poll connections pay.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpRequest;
use actix_web::dev::Extensions;

/// A second handle on a client's TCP connection, used only to peek for its end.
#[derive(Clone, Debug)]
pub(crate) struct ConnectionProbe(Arc<tokio::net::TcpStream>);

/// Where a connection keeps its probe: taken out (and its descriptor closed) by a request
/// that does not need it, such as a WebSocket upgrade, which sees its client leave by itself.
#[derive(Debug)]
struct ProbeSlot(std::cell::RefCell<Option<ConnectionProbe>>);

/// Pass to `HttpServer::on_connect` so that SSE and long-poll requests end (and free their
/// subscriptions) the moment their client disconnects.
///
/// ```no_run
/// # use actix_web::{App, HttpServer};
/// # async fn run() -> std::io::Result<()> {
/// HttpServer::new(|| App::new())
///     .on_connect(resync_actix::track_disconnects)
///     .bind(("127.0.0.1", 8080))?
///     .run()
///     .await
/// # }
/// ```
pub fn track_disconnects(connection: &dyn Any, extensions: &mut Extensions) {
    #[cfg(unix)]
    {
        use std::os::fd::AsFd;
        let Some(stream) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() else {
            return;
        };
        let Ok(duplicate) = stream.as_fd().try_clone_to_owned() else {
            return;
        };
        let standard = std::net::TcpStream::from(duplicate);
        if standard.set_nonblocking(true).is_err() {
            return;
        }
        if let Ok(probe) = tokio::net::TcpStream::from_std(standard) {
            extensions.insert(ProbeSlot(std::cell::RefCell::new(Some(ConnectionProbe(
                Arc::new(probe),
            )))));
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (connection, extensions);
    }
}

/// What [`on_connect`] does with each accepted connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnectOptions {
    /// Keep a second handle so SSE and long polls notice at once that their client left (see
    /// [`track_disconnects`]). Defaults to true.
    pub track_disconnects: bool,
    /// The kernel's deadline for unacknowledged data (`TCP_USER_TIMEOUT`, Linux): a client
    /// that stops reading, even one whose window stays shut, loses its connection at the TCP
    /// level once this passes, whatever the transport. Defaults to 10 s.
    pub write_deadline: Option<Duration>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            track_disconnects: true,
            write_deadline: Some(Duration::from_secs(10)),
        }
    }
}

/// A hook for `HttpServer::on_connect` that applies `options` to every connection: the
/// disconnect probe and the write deadline. [`track_disconnects`] is this with the default
/// options but no write deadline.
pub fn on_connect(options: ConnectOptions) -> impl Fn(&dyn Any, &mut Extensions) + Send + Sync {
    move |connection, extensions| {
        if let Some(deadline) = options.write_deadline
            && let Some(stream) = connection.downcast_ref::<actix_web::rt::net::TcpStream>()
        {
            set_write_deadline(stream, deadline);
        }
        if options.track_disconnects {
            track_disconnects(connection, extensions);
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn set_write_deadline(stream: &actix_web::rt::net::TcpStream, deadline: Duration) {
    if let Err(error) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(deadline)) {
        tracing::debug!(target: "resync::connection", %error, "no TCP user timeout on this socket");
    }
}

/// Fixes the kernel send buffer of `stream` at `bytes` (0: the kernel's autotuning), so what
/// a client does not read stays in the process, counted against the queued-bytes budget.
pub(crate) fn set_send_buffer(stream: &actix_web::rt::net::TcpStream, bytes: usize) {
    if bytes == 0 {
        return;
    }
    if let Err(error) = socket2::SockRef::from(stream).set_send_buffer_size(bytes) {
        tracing::debug!(target: "resync::connection", %error, "the socket's send buffer is the kernel's");
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn set_write_deadline(_stream: &actix_web::rt::net::TcpStream, _deadline: Duration) {}

impl ConnectionProbe {
    pub(crate) fn of(request: &HttpRequest) -> Option<ConnectionProbe> {
        request
            .conn_data::<ProbeSlot>()
            .and_then(|slot| slot.0.borrow().clone())
    }

    /// Closes the request's probe, if it has one: a WebSocket costs one descriptor, not two.
    pub(crate) fn release(request: &HttpRequest) {
        if let Some(slot) = request.conn_data::<ProbeSlot>() {
            slot.0.borrow_mut().take();
        }
    }

    /// Completes when the client has closed its side of the connection (or it broke).
    pub(crate) async fn closed(&self) {
        let mut byte = [0u8; 1];
        loop {
            if self.0.readable().await.is_err() {
                return;
            }
            match self.0.peek(&mut byte).await {
                Ok(0) => return,
                // A pipelined request is waiting; it is not ours to read. Look again later.
                Ok(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

/// How a request learns that its client left: from the edge's own read of the socket, from
/// a probe (an app on actix-web's `HttpServer` with [`track_disconnects`]), or not at all.
pub(crate) enum Departure {
    Edge(std::rc::Rc<crate::edge::EdgeConnection>),
    Probe(ConnectionProbe),
    Unknown,
}

impl Departure {
    /// How `request`'s departure is seen.
    pub(crate) fn of(request: &HttpRequest) -> Departure {
        if let Some(connection) = crate::edge::EdgeConnection::of(request) {
            return Departure::Edge(connection);
        }
        match ConnectionProbe::of(request) {
            Some(probe) => Departure::Probe(probe),
            None => Departure::Unknown,
        }
    }

    /// Whether it can be seen at all.
    pub(crate) fn is_known(&self) -> bool {
        !matches!(self, Departure::Unknown)
    }

    /// Completes when the client has left, or never when that cannot be told.
    pub(crate) async fn wait(&self) {
        match self {
            Departure::Edge(connection) => connection.departed().await,
            Departure::Probe(probe) => probe.closed().await,
            Departure::Unknown => std::future::pending().await,
        }
    }
}
