//! Asymmetric tokens and JWKS (issue 16): RS256, ES256 and EdDSA tokens from PEM keys next to
//! HS256, `iss`/`aud` checks, and a JWKS served in the test: a rotated key is picked up, an
//! unknown `kid` is refused without hammering the JWKS, and with the JWKS down new
//! connections fail closed while open ones keep going until their expiry.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use resync_actix::jwt::Claims;
use resync_tests::{JWT_SECRET, TestServer, WsClient, WsRead};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn keys(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/keys")
        .join(name)
}

fn claims(subject: &str, lifetime: Duration) -> Claims {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    Claims {
        sub: Some(subject.to_owned()),
        exp: (now + lifetime).as_secs(),
        subscribe: vec!["*".to_owned()],
        ..Claims::default()
    }
}

fn sign(algorithm: Algorithm, private: &str, kid: Option<&str>, claims: &Claims) -> String {
    let pem = std::fs::read(keys(private)).unwrap();
    let key = match algorithm {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_ed_pem(&pem),
    }
    .unwrap();
    let header = Header {
        kid: kid.map(str::to_owned),
        ..Header::new(algorithm)
    };
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

async fn upgrade_status(server: &TestServer, token: &str) -> u16 {
    match WsClient::connect(&server.ws_url(&format!("?token={token}"))).await {
        Ok(_) => 101,
        Err(status) => status,
    }
}

#[tokio::test]
async fn rs256_es256_and_eddsa_tokens_from_pem_keys_work_beside_hs256() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        settings.jwt_public_keys = vec![keys("rsa.pub"), keys("ec.pub"), keys("ed.pub")];
        settings.jwt_issuer = Some("https://id.example.com".into());
        settings.jwt_audience = vec!["resync".into()];
    });
    let good = Claims {
        iss: Some("https://id.example.com".into()),
        aud: vec!["resync".into()],
        ..claims("ann", Duration::from_secs(600))
    };
    for (algorithm, key) in [
        (Algorithm::RS256, "rsa.key"),
        (Algorithm::ES256, "ec.key"),
        (Algorithm::EdDSA, "ed.key"),
    ] {
        let token = sign(algorithm, key, None, &good);
        assert_eq!(upgrade_status(&server, &token).await, 101, "{algorithm:?}");
        let status = server
            .http
            .get(server.url("/sse?channel=news"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{algorithm:?} over SSE");
    }
    let hs256 = resync_actix::jwt::sign(&good, JWT_SECRET.as_bytes());
    assert_eq!(
        upgrade_status(&server, &hs256).await,
        101,
        "HS256 keeps working"
    );
    // Wrong issuer, wrong audience, a key the server does not have: 401.
    let wrong_issuer = Claims {
        iss: Some("https://evil.example.com".into()),
        ..good.clone()
    };
    let wrong_audience = Claims {
        aud: vec!["billing".into()],
        ..good.clone()
    };
    for (token, why) in [
        (
            sign(Algorithm::RS256, "rsa.key", None, &wrong_issuer),
            "issuer",
        ),
        (
            sign(Algorithm::RS256, "rsa.key", None, &wrong_audience),
            "audience",
        ),
        (
            sign(Algorithm::RS256, "rsa2.key", None, &good),
            "unknown key",
        ),
    ] {
        assert_eq!(upgrade_status(&server, &token).await, 401, "{why}");
    }
}

/// A JWKS endpoint served in the test: its document can be changed, its requests are
/// counted, and it can be taken down.
struct JwksServer {
    url: String,
    document: Arc<Mutex<String>>,
    requests: Arc<AtomicUsize>,
    /// While true, requests are answered only once it turns false (a provider that hangs).
    held: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(jwks: &[&str]) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let document = Arc::new(Mutex::new(String::new()));
        let requests = Arc::new(AtomicUsize::new(0));
        let held = tokio::sync::watch::channel(false).0;
        let task = tokio::spawn({
            let document = document.clone();
            let requests = requests.clone();
            let held = held.clone();
            async move {
                loop {
                    let Ok((mut socket, _)) = listener.accept().await else {
                        return;
                    };
                    requests.fetch_add(1, Ordering::SeqCst);
                    let document = document.clone();
                    let mut released = held.subscribe();
                    tokio::spawn(async move {
                        let mut request = [0u8; 4096];
                        let _ = socket.read(&mut request).await;
                        let _ = released.wait_for(|held| !*held).await;
                        let body = document.lock().unwrap().clone();
                        let response = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = socket.write_all(response.as_bytes()).await;
                        let _ = socket.shutdown().await;
                    });
                }
            }
        });
        let server = Self {
            url,
            document,
            requests,
            held,
            task,
        };
        server.serve(jwks);
        server
    }

    /// Serves the JWKs named (fixture files) from now on.
    fn serve(&self, jwks: &[&str]) {
        let keys: Vec<String> = jwks
            .iter()
            .map(|name| std::fs::read_to_string(keys(name)).unwrap())
            .collect();
        *self.document.lock().unwrap() = format!(r#"{{"keys":[{}]}}"#, keys.join(","));
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Makes every request wait (`true`) or answers them (`false`).
    fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }

    /// Takes the endpoint down: the port refuses connections from now on.
    fn stop(&self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn a_jwks_key_rotation_is_picked_up_and_unknown_kids_are_refused_without_hammering() {
    let jwks = JwksServer::start(&["rsa.jwk.json"]).await;
    let server = TestServer::start(|settings| {
        settings.jwks_url = Some(jwks.url.clone());
        settings.jwks_min_refetch_ms = 500;
    });
    let long = Duration::from_secs(600);
    let first = sign(
        Algorithm::RS256,
        "rsa.key",
        Some("rsa-1"),
        &claims("ann", long),
    );
    assert_eq!(upgrade_status(&server, &first).await, 101);
    assert_eq!(jwks.requests(), 1, "fetched once, when first needed");
    assert_eq!(upgrade_status(&server, &first).await, 101);
    assert_eq!(jwks.requests(), 1, "then cached");

    // A made-up kid, many times: refused, and the JWKS is asked at most once per 500 ms.
    let made_up = sign(
        Algorithm::RS256,
        "rsa2.key",
        Some("nope"),
        &claims("eve", long),
    );
    for _ in 0..20 {
        assert_eq!(upgrade_status(&server, &made_up).await, 401);
    }
    assert!(
        jwks.requests() <= 3,
        "{} JWKS requests for 20 unknown-kid tokens",
        jwks.requests()
    );

    // The provider rotates in a new key: a token with its kid is accepted once it is fetched.
    jwks.serve(&["rsa.jwk.json", "rsa2.jwk.json"]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rotated = sign(
        Algorithm::RS256,
        "rsa2.key",
        Some("rsa-2"),
        &claims("bob", long),
    );
    assert_eq!(
        upgrade_status(&server, &rotated).await,
        101,
        "the new kid is picked up"
    );
    // A key the JWKS names, used with another kid's key material, still fails its signature.
    let forged = sign(
        Algorithm::RS256,
        "rsa2.key",
        Some("rsa-1"),
        &claims("mallory", long),
    );
    assert_eq!(upgrade_status(&server, &forged).await, 401);
}

#[tokio::test]
async fn with_the_jwks_down_new_connections_fail_closed_and_open_ones_last_until_their_expiry() {
    let jwks = JwksServer::start(&["ec.jwk.json"]).await;
    let server = TestServer::start(|settings| {
        settings.jwks_url = Some(jwks.url.clone());
        settings.jwks_cache_secs = 1;
        settings.jwks_min_refetch_ms = 200;
    });
    // An open connection whose token expires in a few seconds.
    let short = sign(
        Algorithm::ES256,
        "ec.key",
        Some("ec-1"),
        &claims("ann", Duration::from_secs(4)),
    );
    let mut open = WsClient::connect_ready(&server.ws_url(&format!("?token={short}"))).await;
    open.subscribe("news", None).await;
    jwks.stop();
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    // The cached copy is too old and cannot be fetched again: new connections get 401.
    let fresh = sign(
        Algorithm::ES256,
        "ec.key",
        Some("ec-1"),
        &claims("bob", Duration::from_secs(600)),
    );
    assert_eq!(upgrade_status(&server, &fresh).await, 401, "fails closed");
    // The open connection keeps going…
    server.publish("news", serde_json::json!({"n": 1})).await;
    open.next_event("news").await;
    // …until its token expires: closed 4300 (refresh the token).
    loop {
        match open.read().await {
            WsRead::Closed(code) => {
                assert_eq!(code.map(|code| code.0), Some(4300));
                break;
            }
            WsRead::Frame(_) => {}
        }
    }
}

#[tokio::test]
async fn item_13_a_hanging_identity_provider_does_not_hold_up_tokens_whose_key_is_known() {
    let jwks = JwksServer::start(&["rsa.jwk.json"]).await;
    let server = TestServer::start(|settings| {
        settings.jwks_url = Some(jwks.url.clone());
        settings.jwks_min_refetch_ms = 0;
    });
    let long = Duration::from_secs(600);
    let known = sign(
        Algorithm::RS256,
        "rsa.key",
        Some("rsa-1"),
        &claims("ann", long),
    );
    assert_eq!(upgrade_status(&server, &known).await, 101);
    // The provider hangs; a token with a made-up kid starts a refetch that hangs with it.
    jwks.hold(true);
    let made_up = sign(
        Algorithm::RS256,
        "rsa2.key",
        Some("made-up"),
        &claims("eve", long),
    );
    let stuck_server = server.ws_url(&format!("?token={made_up}"));
    let stuck = tokio::spawn(async move { WsClient::connect(&stuck_server).await.err() });
    while jwks.requests() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A token whose key the fresh copy holds is verified at once, whatever fetch hangs (the
    // fetch's own deadline is 5 s: this waits well under it).
    let answered = tokio::time::timeout(Duration::from_secs(2), upgrade_status(&server, &known))
        .await
        .ok();
    jwks.hold(false);
    assert_eq!(
        answered,
        Some(101),
        "a known key waited for the hanging fetch"
    );
    assert_eq!(stuck.await.unwrap(), Some(401));
}
