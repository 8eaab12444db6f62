//! The edge: every accepted socket, before, between and under its requests.
//!
//! actix-http's HTTP/1 dispatcher gives only a connection's *first* request a header deadline
//! (a keep-alive connection that drips its next request a byte at a time holds its socket
//! for ever), keeps reading pipelined requests while their responses wait for a client that
//! never reads, and tells a streaming response that its client left only when a write to it
//! fails. actix-web has no hook between `accept` and the dispatcher, so the reference server
//! builds its listeners itself (`resync-server`'s `listener.rs`) and puts the edge there:
//!
//! - [`Edge::accept`] counts every accepted socket against the global socket cap and its
//!   address's socket cap and rate, before TLS and before its first byte, and wraps it in an
//!   [`EdgeStream`]. Those are a margin above the address's stream cap and rate, which still
//!   apply per request, so that a client over its streams is told why while a flood of
//!   sockets is closed at `accept`.
//! - A connection with no request in flight must complete a request head within the header
//!   deadline ([`TransportConfig::request_header_timeout`](crate::TransportConfig)), counted
//!   from `accept` (a TLS handshake is within it) and from the end of its last response: a
//!   dripped header and an idle keep-alive connection both close at it.
//! - One request at a time: [`RequestGate`], above TLS, gathers a request head whole, hands
//!   it to the dispatcher with exactly the body its `Content-Length` declares, then nothing
//!   until the response has ended. actix-http would otherwise decode every pipelined request in its read buffer at
//!   once (a 32 KiB read of small requests is ~700 requests of ~6 KB each, per connection);
//!   what a client pipelines waits in the gate (at most [`GATE_HOLD`] bytes), and the gate
//!   stops reading past that.
//! - Output is bounded per connection: while more than [`CONNECTION_OUTPUT_BOUND`] bytes of
//!   responses wait for the socket, response bodies wait, so a client that never reads costs
//!   that bound, not a response of any size copied into actix-http's write buffer.
//! - Output is counted process-wide ([`TransportConfig::queued_bytes_budget`](crate::TransportConfig)):
//!   past the budget, a connection holding more than [`CONNECTION_OUTPUT_FLOOR`] waits until
//!   its socket takes it, so a thousand non-readers cannot each pin a large buffer.
//! - A client that closes its side is seen by the read the dispatcher already does, and
//!   its departure ends the SSE stream or long poll at once: no second
//!   descriptor per connection.
//!
//! Every connection and request of a listener runs on one worker thread, so the state they
//! share (`EdgeConnection`) is an `Rc` of cells, not atomics and locks.

use std::cell::Cell;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Extensions, ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::Shared;
use crate::admission::{Refusal, SocketGuard};

/// Bytes of responses that may wait for a connection's socket before its bodies wait. Above the ~30 KiB a streaming transport hands over per
/// write (`write_size.rs`) plus actix-http's own 32 KiB write buffer, so a client that reads
/// never meets it.
pub const CONNECTION_OUTPUT_BOUND: usize = 96 * 1024;

/// Over the process-wide budget, a connection may still hold this much unsent output: every
/// connection can always make progress, and none can pin more while the budget is spent.
pub const CONNECTION_OUTPUT_FLOOR: usize = 16 * 1024;

/// Bytes a [`RequestGate`] holds of what a client sent past the request being served (the
/// next pipelined requests); it stops reading the socket past it.
pub const GATE_HOLD: usize = 8 * 1024;

/// The largest piece of a response body handed to actix-http at once: a large body (a long
/// poll of 1 MiB, a static file) is written a piece at a time as the socket takes it, never
/// copied whole into the connection's write buffer.
const BODY_PIECE: usize = 32 * 1024;

/// The edge of one [`Resync`](crate::Resync): what its listeners do with every socket.
/// Cloning is cheap.
#[derive(Clone)]
pub struct Edge {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Edge").finish_non_exhaustive()
    }
}

/// Why [`Edge::accept`] closed a socket at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SocketRefused {
    /// The process holds as many sockets as it may.
    #[error("the server holds its most sockets")]
    ServerFull,
    /// The socket's address holds its most sockets, or opens them too fast.
    #[error("{0}")]
    Address(&'static str),
}

impl Edge {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Admits a socket just accepted from `peer`, or refuses it (the caller drops it, which
    /// closes it): the global socket cap, then its address's cap and rate. `secure` says
    /// whether it will carry TLS. Sets the kernel's write deadline on it (twice the write
    /// timeout), so a client that stops reading loses its connection on every transport.
    pub fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        secure: bool,
    ) -> Result<EdgeStream, SocketRefused> {
        let now = Instant::now();
        let address = crate::admission::bucket_of(peer.ip());
        let guard = match self.shared.admission.enter_socket(address, now) {
            Ok(guard) => guard,
            Err(refusal) => {
                self.shared.metrics.socket_refused(&refusal);
                return Err(match refusal {
                    Refusal::ServerFull => SocketRefused::ServerFull,
                    Refusal::TooMuchFromAddress(why) | Refusal::TooMuchForUser(why) => {
                        SocketRefused::Address(why)
                    }
                });
            }
        };
        crate::probe::set_write_deadline(&stream, self.shared.config.write_timeout * 2);
        crate::probe::set_send_buffer(&stream, self.shared.config.socket_send_buffer);
        let _ = stream.set_nodelay(true);
        let connection = Rc::new(EdgeConnection {
            shared: self.shared.clone(),
            address,
            secure,
            header_timeout: self.shared.config.request_header_timeout,
            in_flight: Cell::new(0),
            served: Cell::new(0),
            admit: Cell::new(Admit::Head),
            idle_since: Cell::new(now),
            produced: Cell::new(0),
            written: Cell::new(0),
            body_waker: Cell::new(None),
            read_waker: Cell::new(None),
            closed: Cell::new(false),
            departure: tokio::sync::Notify::new(),
            _socket: guard,
        });
        self.shared.metrics.socket_opened();
        Ok(EdgeStream {
            io: stream,
            connection,
            deadline: None,
            shutdown: None,
        })
    }
}

/// What a connection's requests find in its `conn_data`.
#[derive(Clone)]
struct ConnectionHandle(Rc<EdgeConnection>);

/// One accepted socket's state, shared by its [`EdgeStream`], its requests and their bodies.
pub(crate) struct EdgeConnection {
    shared: Arc<Shared>,
    /// The address it counts against (IPv6 by /64).
    address: IpAddr,
    /// Whether it carries TLS.
    secure: bool,
    header_timeout: Duration,
    /// Requests handed to the application whose responses have not ended.
    in_flight: Cell<u32>,
    /// Requests it has carried: a connection that has not carried one yet is not idle, but
    /// on its way to its first request (which a draining server answers itself).
    served: Cell<u64>,
    /// What the [`RequestGate`] may hand the dispatcher now.
    admit: Cell<Admit>,
    /// Since when no request is in flight (from accept, then from each response's end).
    idle_since: Cell<Instant>,
    /// Body bytes handed to actix-http since its write buffer was last empty, and bytes
    /// written to the socket since then: the difference is what waits for the client.
    produced: Cell<usize>,
    written: Cell<usize>,
    /// A response body waiting for the socket to take what waits.
    body_waker: Cell<Option<Waker>>,
    /// The dispatcher's read, waiting in the gate for the request in flight to end.
    read_waker: Cell<Option<Waker>>,
    /// The client closed its side (or the socket failed).
    closed: Cell<bool>,
    departure: tokio::sync::Notify,
    _socket: SocketGuard,
}

impl EdgeConnection {
    /// The connection a request arrived on, when it came through an [`Edge`].
    pub(crate) fn of(request: &actix_web::HttpRequest) -> Option<Rc<EdgeConnection>> {
        request
            .conn_data::<ConnectionHandle>()
            .map(|handle| handle.0.clone())
    }

    /// Whether the connection carries TLS.
    pub(crate) fn secure(&self) -> bool {
        self.secure
    }

    /// Completes when the client has closed its side of the connection (or it broke).
    pub(crate) async fn departed(&self) {
        loop {
            let notified = self.departure.notified();
            if self.closed.get() {
                return;
            }
            notified.await;
        }
    }

    fn unsent(&self) -> usize {
        self.produced.get().saturating_sub(self.written.get())
    }

    fn mark_closed(&self) {
        if !self.closed.replace(true) {
            self.departure.notify_waiters();
        }
    }

    /// Whether output must wait: this connection's unsent bytes pass its bound, or the
    /// process's budget is spent and it holds more than the floor.
    fn output_full(&self) -> bool {
        let unsent = self.unsent();
        unsent >= CONNECTION_OUTPUT_BOUND
            || (unsent >= CONNECTION_OUTPUT_FLOOR && self.shared.metrics.queued_bytes_over())
    }

    fn produce(&self, bytes: usize) {
        self.produced.set(self.produced.get() + bytes);
        self.shared.metrics.queued_bytes_add(bytes);
    }

    /// Counts bytes the socket took, and wakes what waited for room.
    fn wrote(&self, bytes: usize) {
        let taken = bytes.min(self.unsent());
        self.written.set(self.written.get() + bytes);
        self.shared.metrics.queued_bytes_sub(taken);
        if !self.output_full() {
            self.wake_waiters();
        }
    }

    /// actix-http's write buffer is empty: nothing of this connection waits.
    fn flushed(&self) {
        self.shared.metrics.queued_bytes_sub(self.unsent());
        self.produced.set(0);
        self.written.set(0);
        self.wake_waiters();
    }

    fn wake_waiters(&self) {
        if let Some(waker) = self.body_waker.take() {
            waker.wake();
        }
    }

    /// Lets the gate hand over `admit` from now on, and wakes a read waiting for it.
    fn set_admit(&self, admit: Admit) {
        self.admit.set(admit);
        if admit != Admit::Nothing
            && let Some(waker) = self.read_waker.take()
        {
            waker.wake();
        }
    }
}

impl Drop for EdgeConnection {
    fn drop(&mut self) {
        self.shared.metrics.queued_bytes_sub(self.unsent());
        self.shared.metrics.socket_closed();
    }
}

/// An accepted socket under the edge's rules (see the module docs); TLS, when served, runs
/// over it.
pub struct EdgeStream {
    io: TcpStream,
    connection: Rc<EdgeConnection>,
    /// The header deadline's timer, while no request is in flight.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The shutdown's notice, while no request is in flight: an idle keep-alive connection
    /// closes when the server starts draining.
    shutdown: Option<Pin<Box<tokio::sync::futures::OwnedNotified>>>,
}

impl std::fmt::Debug for EdgeStream {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EdgeStream")
            .field("address", &self.connection.address)
            .finish_non_exhaustive()
    }
}

impl EdgeStream {
    /// `Err` once a connection with no request in flight has passed its header deadline;
    /// otherwise arms the timer that wakes the reader at the deadline.
    fn check_deadline(&mut self, context: &mut Context<'_>) -> std::io::Result<()> {
        let connection = &self.connection;
        if connection.in_flight.get() > 0 {
            self.deadline = None;
            self.shutdown = None;
            return Ok(());
        }
        let deadline = connection.idle_since.get() + connection.header_timeout;
        let timed_out = || {
            connection.shared.metrics.header_timed_out();
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no complete request head within the header deadline",
            ))
        };
        if Instant::now() >= deadline {
            return timed_out();
        }
        let deadline = tokio::time::Instant::from_std(deadline);
        let timer = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(context).is_ready() {
            return timed_out();
        }
        Ok(())
    }
}

impl EdgeStream {
    /// Whether an idle connection should close because the server drains; otherwise arms
    /// the notice that wakes the reader when it starts.
    fn draining(&mut self, context: &mut Context<'_>) -> bool {
        let connection = &self.connection;
        if connection.in_flight.get() > 0 || connection.served.get() == 0 {
            return false;
        }
        let shared = &connection.shared;
        let notice = self
            .shutdown
            .get_or_insert_with(|| Box::pin(shared.shutdown_notice.clone().notified_owned()));
        // Armed before the flag is read, so a shutdown in between still wakes it.
        let woken = notice.as_mut().poll(context).is_ready();
        woken || *shared.shutdown.borrow()
    }
}

impl AsyncRead for EdgeStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Err(error) = this.check_deadline(context) {
            this.connection.mark_closed();
            return Poll::Ready(Err(error));
        }
        if this.draining(context) {
            // An idle keep-alive connection of a draining server: ended as if the client had
            // (the dispatcher closes it), so the drain waits for no idle client.
            return Poll::Ready(Ok(()));
        }
        let connection = &this.connection;
        let before = buffer.filled().len();
        match Pin::new(&mut this.io).poll_read(context, buffer) {
            Poll::Ready(Ok(())) => {
                if buffer.filled().len() == before && buffer.remaining() > 0 {
                    connection.mark_closed();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => {
                connection.mark_closed();
                Poll::Ready(Err(error))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for EdgeStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write(context, bytes) {
            Poll::Ready(Ok(written)) => {
                this.connection.wrote(written);
                Poll::Ready(Ok(written))
            }
            Poll::Ready(Err(error)) => {
                this.connection.mark_closed();
                Poll::Ready(Err(error))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_write_vectored(context, buffers) {
            Poll::Ready(Ok(written)) => {
                this.connection.wrote(written);
                Poll::Ready(Ok(written))
            }
            Poll::Ready(Err(error)) => {
                this.connection.mark_closed();
                Poll::Ready(Err(error))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        // actix-http (and rustls above it) flush only once their buffers are written: none
        // of this connection's output waits now.
        self.connection.flushed();
        Pin::new(&mut self.io).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(context)
    }
}

/// A request in flight on an edge connection: the header deadline is off and the gate hands
/// over only its body until it ends.
struct RequestInFlight(Rc<EdgeConnection>);

impl RequestInFlight {
    fn start(connection: Rc<EdgeConnection>) -> Self {
        connection.in_flight.set(connection.in_flight.get() + 1);
        connection.served.set(connection.served.get() + 1);
        Self(connection)
    }
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        let connection = &self.0;
        let left = connection.in_flight.get().saturating_sub(1);
        connection.in_flight.set(left);
        if left == 0 {
            connection.idle_since.set(Instant::now());
            // The next request, which may be waiting in the gate already; a body the response
            // did not wait for is still handed over first (as actix-http expects it).
            if connection.admit.get() == Admit::Nothing {
                connection.set_admit(Admit::Head);
            }
        }
    }
}

/// What a [`RequestGate`] may hand the HTTP dispatcher next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admit {
    /// A request head: gathered whole in the gate (up to actix-http's own limit), read for
    /// where its body ends, then handed over.
    Head,
    /// This many bytes of a head the gate has read, then what its headers say follows.
    HeadOut { bytes: usize, then: Follows },
    /// This many more bytes of the request's body (its `Content-Length`).
    Body(u64),
    /// Everything: a WebSocket's frames, for as long as it lives.
    Stream,
    /// Nothing: the request in flight has had its head and body.
    Nothing,
}

/// What a request head says follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Follows {
    Body(u64),
    Stream,
    Nothing,
}

/// The largest head the gate gathers: actix-http refuses a larger one (431) anyway.
const HEAD_MAX: usize = 128 * 1024;

/// Where the head at the start of `bytes` ends (just past its empty line), scanning from
/// `from`: `\r\n\r\n` and `\n\n` both end a head, as httparse reads them.
fn head_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut line_ends = 0;
    // Back up over the line ends the last scan may have stopped in.
    let start = from.saturating_sub(3);
    for (index, &byte) in bytes.iter().enumerate().skip(start) {
        if byte == b'\n' {
            line_ends += 1;
            if line_ends == 2 {
                return Some(index + 1);
            }
        } else if byte != b'\r' {
            line_ends = 0;
        }
    }
    None
}

/// What follows a request `head`: its `Content-Length` of body, a WebSocket's stream, or
/// nothing (a head actix-http will refuse, or a chunked body the middleware refuses, included).
fn follows(head: &[u8]) -> Follows {
    let mut headers = [httparse::EMPTY_HEADER; 96];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return Follows::Nothing;
    }
    let mut length = None;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("upgrade") {
            return Follows::Stream;
        }
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Follows::Nothing;
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(header.value)
                .ok()
                .and_then(|value| value.trim().parse::<u64>().ok());
        }
    }
    match length {
        Some(length) if length > 0 => Follows::Body(length),
        _ => Follows::Nothing,
    }
}

impl Follows {
    fn admit(self) -> Admit {
        match self {
            Follows::Body(length) => Admit::Body(length),
            Follows::Stream => Admit::Stream,
            Follows::Nothing => Admit::Nothing,
        }
    }
}

/// Hands actix-http's dispatcher one request at a time (see the module docs): under it, the
/// connection's bytes (TLS already removed); over it, the dispatcher. A head is gathered whole
/// and read for where its body ends; then the head and exactly that body are handed over, and
/// nothing more until the response has ended (the [`track`] middleware on the app says when).
pub struct RequestGate<IO> {
    io: IO,
    connection: Rc<EdgeConnection>,
    /// What the client sent that is not handed over yet: a head being gathered, and whatever
    /// it pipelined after it.
    held: bytes::BytesMut,
    /// How far `held` was scanned for the end of a head.
    scanned: usize,
}

impl<IO> std::fmt::Debug for RequestGate<IO> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RequestGate")
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

impl<IO> RequestGate<IO> {
    /// A gate over `io`, the bytes of a connection the edge accepted (its [`EdgeStream`], or
    /// TLS over it), which `stream_of` finds in it.
    pub fn new(io: IO, stream_of: impl FnOnce(&IO) -> &EdgeStream) -> Self {
        let connection = stream_of(&io).connection.clone();
        Self {
            io,
            connection,
            held: bytes::BytesMut::new(),
            scanned: 0,
        }
    }

    /// The bytes under the gate.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Puts the connection's edge state where its requests find it: pass to actix-http's
    /// `HttpServiceBuilder::on_connect_ext`.
    pub fn on_connect(&self, extensions: &mut Extensions) {
        extensions.insert(ConnectionHandle(self.connection.clone()));
    }
}

impl<IO: AsyncRead + Unpin> RequestGate<IO> {
    /// Reads what the socket has into `held`, at most `limit` held in all: `Ready(false)` at
    /// the end of the stream, `Pending` when nothing more came.
    fn read_ahead(
        &mut self,
        context: &mut Context<'_>,
        limit: usize,
    ) -> Poll<std::io::Result<bool>> {
        let mut scratch = [0u8; 4096];
        let room = limit.saturating_sub(self.held.len()).min(scratch.len());
        let mut ahead = ReadBuf::new(&mut scratch[..room]);
        match Pin::new(&mut self.io).poll_read(context, &mut ahead) {
            Poll::Ready(Ok(())) if ahead.filled().is_empty() => Poll::Ready(Ok(false)),
            Poll::Ready(Ok(())) => {
                self.held.extend_from_slice(ahead.filled());
                Poll::Ready(Ok(true))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for RequestGate<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            let connection = this.connection.clone();
            match connection.admit.get() {
                Admit::Head => {
                    if let Some(end) = head_end(&this.held, this.scanned) {
                        let then = follows(&this.held[..end]);
                        this.scanned = 0;
                        connection.admit.set(Admit::HeadOut { bytes: end, then });
                        continue;
                    }
                    this.scanned = this.held.len();
                    if this.held.len() > HEAD_MAX {
                        // Too large for actix-http to take: handed over for it to refuse.
                        let bytes = this.held.len();
                        connection.admit.set(Admit::HeadOut {
                            bytes,
                            then: Follows::Nothing,
                        });
                        continue;
                    }
                    match this.read_ahead(context, HEAD_MAX + 1) {
                        Poll::Ready(Ok(true)) => {}
                        Poll::Ready(Ok(false)) => {
                            connection.mark_closed();
                            // The stream ended: what was gathered goes over for the
                            // dispatcher to answer or drop, then the end.
                            if this.held.is_empty() {
                                return Poll::Ready(Ok(()));
                            }
                            let bytes = this.held.len();
                            connection.admit.set(Admit::HeadOut {
                                bytes,
                                then: Follows::Nothing,
                            });
                        }
                        Poll::Ready(Err(error)) => {
                            connection.mark_closed();
                            return Poll::Ready(Err(error));
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Admit::HeadOut { bytes, then } => {
                    let handed = bytes.min(buffer.remaining()).min(this.held.len());
                    buffer.put_slice(&this.held[..handed]);
                    bytes::Buf::advance(&mut this.held, handed);
                    let left = bytes - handed;
                    connection.admit.set(if left == 0 {
                        then.admit()
                    } else {
                        Admit::HeadOut { bytes: left, then }
                    });
                    if !this.held.is_empty() && connection.admit.get() == Admit::Nothing {
                        connection.shared.metrics.request_held();
                    }
                    return Poll::Ready(Ok(()));
                }
                Admit::Body(left) => {
                    if !this.held.is_empty() {
                        let handed = usize::try_from(left)
                            .unwrap_or(usize::MAX)
                            .min(buffer.remaining())
                            .min(this.held.len());
                        buffer.put_slice(&this.held[..handed]);
                        bytes::Buf::advance(&mut this.held, handed);
                        this.body_handed(left, handed);
                        return Poll::Ready(Ok(()));
                    }
                    let before = buffer.filled().len();
                    return match Pin::new(&mut this.io).poll_read(context, buffer) {
                        Poll::Ready(Ok(())) => {
                            let fresh = buffer.filled().len() - before;
                            if fresh == 0 {
                                if buffer.remaining() > 0 {
                                    connection.mark_closed();
                                }
                                return Poll::Ready(Ok(()));
                            }
                            let handed = usize::try_from(left).unwrap_or(usize::MAX).min(fresh);
                            if handed < fresh {
                                // Past the body: the next request waits in the gate.
                                this.held
                                    .extend_from_slice(&buffer.filled()[before + handed..]);
                                buffer.set_filled(before + handed);
                            }
                            this.body_handed(left, handed);
                            Poll::Ready(Ok(()))
                        }
                        Poll::Ready(Err(error)) => {
                            connection.mark_closed();
                            Poll::Ready(Err(error))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
                Admit::Stream => {
                    if !this.held.is_empty() {
                        let handed = buffer.remaining().min(this.held.len());
                        buffer.put_slice(&this.held[..handed]);
                        bytes::Buf::advance(&mut this.held, handed);
                        return Poll::Ready(Ok(()));
                    }
                    let before = buffer.filled().len();
                    return match Pin::new(&mut this.io).poll_read(context, buffer) {
                        Poll::Ready(Ok(())) => {
                            if buffer.filled().len() == before && buffer.remaining() > 0 {
                                connection.mark_closed();
                            }
                            Poll::Ready(Ok(()))
                        }
                        Poll::Ready(Err(error)) => {
                            connection.mark_closed();
                            Poll::Ready(Err(error))
                        }
                        Poll::Pending => Poll::Pending,
                    };
                }
                Admit::Nothing => {
                    // Nothing may go to the dispatcher, but the socket is still read (up to
                    // the hold), so that a client that leaves is seen at once.
                    if this.held.len() >= GATE_HOLD {
                        connection.read_waker.set(Some(context.waker().clone()));
                        return Poll::Pending;
                    }
                    let was_empty = this.held.is_empty();
                    match this.read_ahead(context, GATE_HOLD) {
                        Poll::Ready(Ok(true)) => {
                            if was_empty {
                                connection.shared.metrics.request_held();
                            }
                        }
                        Poll::Ready(Ok(false)) => {
                            connection.mark_closed();
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Ready(Err(error)) => {
                            connection.mark_closed();
                            return Poll::Ready(Err(error));
                        }
                        Poll::Pending => {
                            connection.read_waker.set(Some(context.waker().clone()));
                            return Poll::Pending;
                        }
                    }
                }
            }
        }
    }
}

impl<IO> RequestGate<IO> {
    /// `handed` bytes of a body that had `left` went over: the rest of it, or, once it is
    /// all over, nothing until the response ends (or the next head, when it already has).
    fn body_handed(&mut self, left: u64, handed: usize) {
        let left = left.saturating_sub(handed as u64);
        let connection = &self.connection;
        connection.admit.set(if left > 0 {
            Admit::Body(left)
        } else if connection.in_flight.get() == 0 {
            Admit::Head
        } else {
            Admit::Nothing
        });
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for RequestGate<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(context, bytes)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(context)
    }
}

pin_project_lite::pin_project! {
    /// A response body under the edge's output bounds (see the module docs).
    pub struct EdgeBody<B> {
        #[pin]
        inner: B,
        // What is left of the last chunk the inner body gave.
        rest: Option<Bytes>,
        request: Option<RequestInFlight>,
        ended: bool,
    }
}

impl<B> std::fmt::Debug for EdgeBody<B> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("EdgeBody").finish_non_exhaustive()
    }
}

impl<B: MessageBody> MessageBody for EdgeBody<B> {
    type Error = B::Error;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        if let Some(request) = &this.request
            && request.0.output_full()
        {
            request.0.body_waker.set(Some(context.waker().clone()));
            return Poll::Pending;
        }
        let mut chunk = match this.rest.take() {
            Some(rest) => rest,
            None => match this.inner.poll_next(context) {
                Poll::Ready(Some(Ok(chunk))) => chunk,
                Poll::Ready(None) => {
                    *this.ended = true;
                    // The response has ended: the header deadline of the next request starts.
                    *this.request = None;
                    return Poll::Ready(None);
                }
                other => return other,
            },
        };
        if chunk.len() > BODY_PIECE {
            *this.rest = Some(chunk.split_off(BODY_PIECE));
        }
        if let Some(request) = &this.request {
            request.0.produce(chunk.len());
        }
        Poll::Ready(Some(Ok(chunk)))
    }
}

/// The edge's middleware: every request on an edge connection is counted in flight until its
/// response ends, and its body is held to the connection's output bounds. Requests that did
/// not come through an [`Edge`] pass unchanged. Wrap the whole app in it:
/// `App::new().wrap(actix_web::middleware::from_fn(resync_actix::edge::track))`.
pub async fn track<B: MessageBody + 'static>(
    request: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EdgeBody<B>>, actix_web::Error> {
    let connection = request.conn_data::<ConnectionHandle>().cloned();
    if connection.is_some()
        && request
            .headers()
            .contains_key(actix_web::http::header::TRANSFER_ENCODING)
    {
        // The gate hands a body over by its length; none of resync's requests streams one.
        let refusal = actix_web::HttpResponse::LengthRequired()
            .force_close()
            .body("a request body needs a Content-Length here");
        return Err(actix_web::error::InternalError::from_response(
            "chunked request body",
            refusal,
        )
        .into());
    }
    let in_flight =
        connection.map(|ConnectionHandle(connection)| RequestInFlight::start(connection));
    let mut response = next.call(request).await?;
    let draining = in_flight
        .as_ref()
        .is_some_and(|in_flight| *in_flight.0.shared.shutdown.borrow());
    if draining {
        // The server drains: this connection is not kept for another request.
        response
            .response_mut()
            .head_mut()
            .set_connection_type(actix_web::http::ConnectionType::Close);
    }
    Ok(response.map_body(|_, inner| EdgeBody {
        inner,
        rest: None,
        request: in_flight,
        ended: false,
    }))
}

impl std::fmt::Debug for EdgeConnection {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("EdgeConnection")
            .field("address", &self.address)
            .field("in_flight", &self.in_flight.get())
            .field("unsent", &self.unsent())
            .field("closed", &self.closed.get())
            .finish_non_exhaustive()
    }
}
