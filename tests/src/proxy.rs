//! A TCP proxy the test controls: it can cut every connection, stop forwarding while keeping
//! sockets open (a blackhole), and refuse WebSocket upgrades or SSE requests the way a
//! restrictive corporate proxy would. It counts what it did, so tests can prove the fault
//! happened.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

#[derive(Default)]
struct State {
    blackhole: AtomicBool,
    /// Connections numbered below this forward nothing (they were open when frozen).
    frozen_below: AtomicU64,
    refuse_websocket: AtomicBool,
    refuse_sse: AtomicBool,
    accepted: AtomicU64,
    cut: AtomicU64,
    refused: AtomicU64,
    connections: Mutex<Vec<AbortHandle>>,
    /// Where new connections go.
    upstreams: Mutex<Arc<Vec<SocketAddr>>>,
    /// Forwards bytes without reading an HTTP request head first (for Redis).
    raw: bool,
}

/// A running proxy in front of `upstream`. Dropping it stops it.
pub struct ChaosProxy {
    pub address: SocketAddr,
    state: Arc<State>,
    accept_task: AbortHandle,
}

impl ChaosProxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::balance(vec![upstream]).await
    }

    /// A round-robin load balancer over `upstreams` (no sticky sessions); an upstream that
    /// refuses connections is skipped.
    pub async fn balance(upstreams: Vec<SocketAddr>) -> Self {
        Self::listen(upstreams, false).await
    }

    /// A proxy of any TCP protocol to `upstream` (it reads no HTTP request head, so it
    /// cannot refuse upgrades or SSE), for a service address that can move
    /// ([`retarget`](Self::retarget)).
    pub async fn tcp(upstream: SocketAddr) -> Self {
        Self::listen(vec![upstream], true).await
    }

    async fn listen(upstreams: Vec<SocketAddr>, raw: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("proxy address");
        let state = Arc::new(State {
            upstreams: Mutex::new(Arc::new(upstreams)),
            raw,
            ..State::default()
        });
        let accept_state = state.clone();
        let accept_task = tokio::spawn(async move {
            let mut next = 0usize;
            while let Ok((client, _)) = listener.accept().await {
                let number = accept_state.accepted.fetch_add(1, Ordering::Relaxed);
                let connection_state = accept_state.clone();
                let upstreams = accept_state
                    .upstreams
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner())
                    .clone();
                let first = next;
                next = next.wrapping_add(1);
                let task = tokio::spawn(async move {
                    let _ = serve(client, &upstreams, first, number, connection_state).await;
                });
                let mut connections = accept_state
                    .connections
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner());
                connections.retain(|handle| !handle.is_finished());
                connections.push(task.abort_handle());
            }
        })
        .abort_handle();
        Self {
            address,
            state,
            accept_task,
        }
    }

    /// Sends new connections to `upstreams` from now on (an address that moved to another
    /// machine, as a managed service's does after a failover); open ones stay where they are.
    pub fn retarget(&self, upstreams: Vec<SocketAddr>) {
        *self
            .state
            .upstreams
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(upstreams);
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Drops every open connection at once; returns how many were cut.
    pub fn cut_all(&self) -> u64 {
        let connections = std::mem::take(
            &mut *self
                .state
                .connections
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
        );
        let mut cut = 0;
        for connection in connections {
            if !connection.is_finished() {
                connection.abort();
                cut += 1;
            }
        }
        self.state.cut.fetch_add(cut, Ordering::Relaxed);
        cut
    }

    /// Stops (true) or resumes (false) forwarding; sockets stay open either way. Resuming
    /// cuts the connections that were blackholed, so nothing stale arrives late.
    /// Every connection open now stops forwarding for good, its sockets left open (a
    /// half-open connection: a peer that vanished without a FIN); new ones pass.
    pub fn freeze_open_connections(&self) {
        let accepted = self.state.accepted.load(Ordering::Relaxed);
        self.state.frozen_below.store(accepted, Ordering::Relaxed);
    }

    pub fn set_blackhole(&self, on: bool) {
        self.state.blackhole.store(on, Ordering::Relaxed);
        if !on {
            self.cut_all();
        }
    }

    pub fn refuse_websocket(&self, on: bool) {
        self.state.refuse_websocket.store(on, Ordering::Relaxed);
    }

    pub fn refuse_sse(&self, on: bool) {
        self.state.refuse_sse.store(on, Ordering::Relaxed);
    }

    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    pub fn cut(&self) -> u64 {
        self.state.cut.load(Ordering::Relaxed)
    }

    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::Relaxed)
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.cut_all();
    }
}

async fn connect_any(upstreams: &[SocketAddr], first: usize) -> std::io::Result<TcpStream> {
    let mut last_error = std::io::Error::other("no upstream");
    for offset in 0..upstreams.len() {
        match TcpStream::connect(upstreams[(first + offset) % upstreams.len()]).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

async fn serve(
    mut client: TcpStream,
    upstreams: &[SocketAddr],
    first: usize,
    number: u64,
    state: Arc<State>,
) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    // Read the first request head to decide whether to refuse it.
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !state.raw
        && !head.windows(4).any(|window| window == b"\r\n\r\n")
        && head.len() < 64 * 1024
    {
        let read = client.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
        while state.blackhole.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let request_line = text.lines().next().unwrap_or_default().to_owned();
    let is_websocket = text.contains("upgrade: websocket");
    let is_sse = request_line.contains("/sse");
    if (is_websocket && state.refuse_websocket.load(Ordering::Relaxed))
        || (is_sse && state.refuse_sse.load(Ordering::Relaxed))
    {
        state.refused.fetch_add(1, Ordering::Relaxed);
        client
            .write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 16\r\nconnection: close\r\n\r\nblocked by proxy")
            .await?;
        return Ok(());
    }
    let mut server = connect_any(upstreams, first).await?;
    server.set_nodelay(true)?;
    server.write_all(&head).await?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream_state = state.clone();
    let to_server = async move {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let read = client_read.read(&mut buffer).await?;
            if read == 0 {
                return server_write.shutdown().await;
            }
            while upstream_state.blackhole.load(Ordering::Relaxed)
                || number < upstream_state.frozen_below.load(Ordering::Relaxed)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            server_write.write_all(&buffer[..read]).await?;
        }
    };
    let to_client = async move {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            let read = server_read.read(&mut buffer).await?;
            if read == 0 {
                return client_write.shutdown().await;
            }
            while state.blackhole.load(Ordering::Relaxed)
                || number < state.frozen_below.load(Ordering::Relaxed)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client_write.write_all(&buffer[..read]).await?;
        }
    };
    let _: (std::io::Result<()>, std::io::Result<()>) = tokio::join!(to_server, to_client);
    Ok(())
}
