//! A WebSocket client that writes frames byte by byte, for tests of what a hostile client can
//! send: headers that lie about their length, reserved bits, forbidden close codes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::WAIT;

pub struct RawWs {
    pub stream: TcpStream,
    /// Bytes read after the handshake, not yet parsed into frames.
    pending: Vec<u8>,
}

/// What the server did, as seen by [`RawWs::close_code`].
#[derive(Debug, PartialEq, Eq)]
pub enum RawEnd {
    /// A close frame with this code.
    Closed(u16),
    /// The TCP connection ended without a close frame.
    Dropped,
    /// Nothing happened within the wait.
    Silent,
}

impl RawWs {
    /// Opens `/ws` on `address` with the upgrade handshake and returns once the server
    /// answered 101; `Err(status)` otherwise.
    pub async fn connect(address: SocketAddr, query: &str) -> Result<Self, u16> {
        let stream = TcpStream::connect(address).await.expect("tcp connect");
        Self::handshake(stream, address, query).await
    }

    /// Like [`connect`](Self::connect), with a 4 KiB receive buffer: a client that does not
    /// read fills it at once.
    pub async fn connect_small_window(address: SocketAddr, query: &str) -> Result<Self, u16> {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("receive buffer");
        let stream = socket.connect(address).await.expect("tcp connect");
        Self::handshake(stream, address, query).await
    }

    async fn handshake(
        mut stream: TcpStream,
        address: SocketAddr,
        query: &str,
    ) -> Result<Self, u16> {
        let request = format!(
            "GET /ws{query} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write handshake");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let read = tokio::time::timeout(WAIT, stream.read(&mut byte))
                .await
                .expect("handshake answer in time")
                .expect("read handshake");
            assert!(read == 1, "connection closed during the handshake");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|status| status.parse().ok())
            .expect("status code");
        if status != 101 {
            return Err(status);
        }
        Ok(Self {
            stream,
            pending: Vec::new(),
        })
    }

    /// A masked client frame: `first` is the FIN/RSV/opcode byte, `length` the declared
    /// payload length (which may differ from `payload.len()`).
    pub fn frame(first: u8, length: u64, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![first];
        if length < 126 {
            frame.push(0x80 | length as u8);
        } else if length <= u64::from(u16::MAX) {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(length as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&length.to_be_bytes());
        }
        let mask = [1u8, 2, 3, 4];
        frame.extend_from_slice(&mask);
        frame.extend(
            payload
                .iter()
                .enumerate()
                .map(|(index, byte)| byte ^ mask[index % 4]),
        );
        frame
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Reads server frames until a close frame, the end of the connection, or `wait`.
    pub async fn close_code(&mut self, wait: Duration) -> RawEnd {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some((opcode, payload, used)) = parse_server_frame(&self.pending) {
                self.pending.drain(..used);
                if opcode == 0x8 {
                    let code = payload
                        .get(..2)
                        .map_or(1005, |code| u16::from_be_bytes([code[0], code[1]]));
                    return RawEnd::Closed(code);
                }
            }
            let mut buffer = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buffer)).await {
                Err(_) => return RawEnd::Silent,
                Ok(Ok(0) | Err(_)) => return RawEnd::Dropped,
                Ok(Ok(read)) => self.pending.extend_from_slice(&buffer[..read]),
            }
        }
    }
}

/// One unmasked server frame at the start of `bytes`: (opcode, payload, bytes used).
fn parse_server_frame(bytes: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    let opcode = bytes.first()? & 0x0F;
    let (length, start) = match bytes.get(1)? & 0x7F {
        126 => (
            usize::from(u16::from_be_bytes([*bytes.get(2)?, *bytes.get(3)?])),
            4,
        ),
        127 => {
            let mut long = [0u8; 8];
            long.copy_from_slice(bytes.get(2..10)?);
            (usize::try_from(u64::from_be_bytes(long)).ok()?, 10)
        }
        short => (usize::from(short), 2),
    };
    let payload = bytes.get(start..start + length)?.to_vec();
    Some((opcode, payload, start + length))
}
