//! An application backend served in the test, for the proxy (`--proxy-url`): it records what
//! it is asked and answers as the test says, after the delay the test says.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How the backend answers one request.
pub type Answer = Box<dyn Fn(&serde_json::Value) -> (Duration, String) + Send + Sync>;

pub struct AppBackend {
    /// The URL to give the server as `proxy_url`.
    pub url: String,
    /// Every request, as JSON, in the order they came.
    pub asked: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl AppBackend {
    /// A backend answering each request with `answer(request)`: a delay and a JSON body.
    pub async fn start(
        answer: impl Fn(&serde_json::Value) -> (Duration, String) + Send + Sync + 'static,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/resync", listener.local_addr().unwrap());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        let answer: Arc<Answer> = Arc::new(Box::new(answer));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let log = log.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut socket).await else {
                        return;
                    };
                    log.lock().unwrap().push(request.clone());
                    let (delay, body) = answer(&request);
                    tokio::time::sleep(delay).await;
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Self { url, asked }
    }

    /// The requests of `kind` (`connect`, `subscribe`, `publish`, `refresh`) asked so far.
    pub fn asked(&self, kind: &str) -> Vec<serde_json::Value> {
        self.asked
            .lock()
            .unwrap()
            .iter()
            .filter(|request| request["kind"] == kind)
            .cloned()
            .collect()
    }
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<serde_json::Value> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
        let text = String::from_utf8_lossy(&buffer).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                return serde_json::from_slice(&buffer[end + 4..end + 4 + length]).ok();
            }
        }
    }
}
