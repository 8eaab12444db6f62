//! The server's listeners, built from actix-server and actix-http rather than actix-web's
//! `HttpServer`, which has no place between `accept` and the HTTP dispatcher. Each accepted
//! socket goes through `resync_actix::edge` first (counted against the caps from `accept`,
//! its header deadline, its output bounds, its departure seen without a second descriptor),
//! then through TLS when the listener serves it, then to actix-http's HTTP/1 service running
//! the app.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_http::{HttpService, Request, Response};
use actix_service::{IntoServiceFactory, Service, ServiceFactory, ServiceFactoryExt, fn_service};
use actix_web::body::MessageBody;
use actix_web::dev::{AppConfig, Extensions};
use resync_actix::edge::{Edge, EdgeStream, RequestGate};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The longest a TLS handshake may take, within the header deadline that also covers it.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an idle keep-alive connection stays open when no byte comes (actix-http's own
/// timer; a byte that starts a request hands over to the edge's header deadline).
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// A listening socket with a deep accept queue: a real-time server sees bursts of connects
/// (after a deploy, a network blip), and the kernel caps the queue at `somaxconn` anyway.
pub(crate) fn tcp_listener(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&address.into())?;
    socket.listen(8192)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// What one listener serves.
pub(crate) struct Listener {
    pub(crate) name: &'static str,
    pub(crate) socket: std::net::TcpListener,
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
    pub(crate) header_timeout: Duration,
}

/// Adds `listener` to `builder`: every worker serves it with the app `make_app` builds.
pub(crate) fn listen<F, I, S, B>(
    builder: actix_server::ServerBuilder,
    listener: Listener,
    edge: Edge,
    make_app: F,
) -> std::io::Result<actix_server::ServerBuilder>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: std::fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as Service<Request>>::Future: 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    let local = listener.socket.local_addr()?;
    let Listener {
        name,
        socket,
        tls,
        header_timeout,
    } = listener;
    builder.listen(name, socket, move || {
        let edge = edge.clone();
        let tls = tls.clone();
        let app = make_app()
            .into_factory()
            .map_err(|error| error.into().error_response());
        let http = HttpService::build()
            .keep_alive(KEEP_ALIVE)
            .client_request_timeout(header_timeout)
            .client_disconnect_timeout(Duration::from_secs(1))
            .local_addr(local)
            .on_connect_ext(|io: &RequestGate<Io>, extensions: &mut Extensions| {
                io.on_connect(extensions);
            })
            .finish(actix_service::map_config(app, |()| AppConfig::default()));
        fn_service(move |stream: TcpStream| accept(edge.clone(), tls.clone(), stream))
            .and_then(http)
    })
}

/// Admits a socket at the edge, completes its TLS handshake (if any), and puts the request
/// gate over it.
async fn accept(
    edge: Edge,
    tls: Option<Arc<rustls::ServerConfig>>,
    stream: TcpStream,
) -> Result<
    (RequestGate<Io>, actix_http::Protocol, Option<SocketAddr>),
    actix_http::error::DispatchError,
> {
    let failed = |error: std::io::Error| actix_http::error::DispatchError::Io(error);
    let peer = stream.peer_addr().map_err(failed)?;
    let stream = edge
        .accept(stream, peer, tls.is_some())
        .map_err(|refused| failed(std::io::Error::other(refused)))?;
    let io = match tls {
        None => Io::Plain(stream),
        Some(config) => {
            let handshake = tokio_rustls::TlsAcceptor::from(config).accept(stream);
            let secured = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake)
                .await
                .map_err(|_| {
                    failed(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "TLS handshake timed out",
                    ))
                })?
                .map_err(failed)?;
            Io::Tls(Box::new(secured))
        }
    };
    let gate = RequestGate::new(io, |io: &Io| io.edge());
    Ok((gate, actix_http::Protocol::Http1, Some(peer)))
}

/// A connection's bytes: the edge's stream, with or without TLS over it.
enum Io {
    Plain(EdgeStream),
    Tls(Box<tokio_rustls::server::TlsStream<EdgeStream>>),
}

impl Io {
    fn edge(&self) -> &EdgeStream {
        match self {
            Io::Plain(stream) => stream,
            Io::Tls(stream) => stream.get_ref().0,
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(stream) => std::pin::Pin::new(stream).poll_read(context, buffer),
            Io::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_read(context, buffer),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        bytes: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(stream) => std::pin::Pin::new(stream).poll_write(context, bytes),
            Io::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_write(context, bytes),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(stream) => std::pin::Pin::new(stream).poll_write_vectored(context, buffers),
            Io::Tls(stream) => {
                std::pin::Pin::new(stream.as_mut()).poll_write_vectored(context, buffers)
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(stream) => stream.is_write_vectored(),
            Io::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(stream) => std::pin::Pin::new(stream).poll_flush(context),
            Io::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_flush(context),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(stream) => std::pin::Pin::new(stream).poll_shutdown(context),
            Io::Tls(stream) => std::pin::Pin::new(stream.as_mut()).poll_shutdown(context),
        }
    }
}
