//! TLS end to end (issue 13, defect 3): the reference server terminates TLS itself with a
//! certificate made in the test, and the Rust client follows over `wss://` and `https://`
//! (SSE, long polling); a client that does not trust the certificate says why.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::time::Duration;

use futures_util::StreamExt;
use resync_client::{Client, ConnectionState, TransportChoice, TransportKind, Update};
use resync_tests::certificate::TestCertificate;
use resync_tests::{TestServer, fast_backoff};

fn tls_server(certificate: &TestCertificate) -> TestServer {
    let cert = certificate.cert_path.clone();
    let key = certificate.key_path.clone();
    TestServer::start(move |settings| {
        settings.tls_cert = Some(cert);
        settings.tls_key = Some(key);
    })
}

#[tokio::test]
async fn defect_3_13_the_rust_client_follows_over_wss_and_https() {
    let certificate = TestCertificate::new();
    let server = tls_server(&certificate);
    let base = server.server.base_url();
    assert!(base.starts_with("https://"), "{base}");
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(certificate.pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    for transport in [
        TransportKind::WebSocket,
        TransportKind::Sse,
        TransportKind::LongPolling,
    ] {
        let client = Client::builder(&base)
            .transport(TransportChoice::Only(transport))
            .backoff(fast_backoff())
            .poll_timeout(Duration::from_secs(2))
            .add_root_certificates_pem(certificate.pem.as_bytes())
            .build()
            .unwrap();
        let channel = format!("tls-{}", transport.as_str());
        let mut subscription = client.subscribe(channel.parse().unwrap());
        let mut state = client.state();
        // Polling the subscription registers it; connected means over TLS.
        let next = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(10), subscription.next()).await
        });
        tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|state| matches!(state, ConnectionState::Connected { .. })),
        )
        .await
        .expect("connected over TLS in time")
        .unwrap();
        // Published over https with the API key, until the subscriber has it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !next.is_finished() && tokio::time::Instant::now() < deadline {
            let reply = https
                .post(format!("{base}/api/publish"))
                .bearer_auth(&server.server.api_key)
                .json(&serde_json::json!({ "channel": channel, "data": { "over": "tls" } }))
                .send()
                .await
                .unwrap();
            assert!(reply.status().is_success());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        match next.await.unwrap() {
            Ok(Some(Ok(Update::Event(event)))) => {
                assert_eq!(event.channel.as_str(), channel);
                assert_eq!(event.data.as_str(), r#"{"over":"tls"}"#);
            }
            other => panic!("{transport:?}: expected an event, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn defect_3_13_a_client_that_does_not_trust_the_certificate_says_why() {
    let certificate = TestCertificate::new();
    let server = tls_server(&certificate);
    let client = Client::builder(&server.server.base_url())
        .backoff(fast_backoff())
        .build()
        .unwrap();
    let _subscription = client.subscribe("untrusted".parse().unwrap());
    let mut state = client.state();
    let reconnecting = tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|state| matches!(state, ConnectionState::Reconnecting { .. })),
    )
    .await
    .expect("a failed attempt is reported")
    .unwrap()
    .clone();
    let ConnectionState::Reconnecting { reason, .. } = reconnecting else {
        unreachable!()
    };
    assert!(
        reason.to_ascii_lowercase().contains("certificate"),
        "the reason names the certificate: {reason}"
    );
}
