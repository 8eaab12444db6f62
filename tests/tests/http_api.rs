//! The reference server's HTTP API: publishing with an API key, idempotency, history, channel
//! info, health, metrics, request ids, and clear JSON errors for every kind of bad input.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use resync_tests::{SseClient, TestServer};

async fn post(server: &TestServer, body: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let mut request = server
        .http
        .post(server.url("/api/publish"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn bad_input_gets_a_4xx_json_error_and_stores_nothing() {
    let server = TestServer::start(|settings| settings.max_body_bytes = 1024);
    let key = Some("test-api-key-0123456789");
    let huge = format!(r#"{{"channel":"c","data":"{}"}}"#, "x".repeat(2048));
    let cases = [
        (r#"{"channel":"c","data":1}"#, None, 401, "unauthorized"),
        (
            r#"{"channel":"c","data":1}"#,
            Some("wrong"),
            401,
            "unauthorized",
        ),
        ("{not json", key, 400, "bad_request"),
        (
            r#"{"channel":"c","data":1,"extra":true}"#,
            key,
            400,
            "bad_request",
        ),
        (r#"{"channel":"c"}"#, key, 400, "bad_request"),
        (
            r#"{"channel":"bad channel","data":1}"#,
            key,
            400,
            "invalid_channel",
        ),
        (
            // Printable ASCII, the space included (issue 29, defect 11); a tab is not.
            r#"{"channel":"c","data":1,"idempotency_key":"has\ttab"}"#,
            key,
            400,
            "bad_request",
        ),
        (huge.as_str(), key, 413, "payload_too_large"),
    ];
    for (body, key, status, code) in cases {
        let (got_status, got_body) = post(&server, body, key).await;
        assert_eq!(got_status, status, "{body:.60}");
        assert_eq!(got_body["code"], code, "{body:.60}");
        assert!(
            got_body["message"]
                .as_str()
                .is_some_and(|message| !message.is_empty())
        );
    }
    // Nothing was half-published: the channel is still empty.
    let info = server.channel_info("c").await;
    assert_eq!(info["position"]["seq"], 0);
}

#[tokio::test]
async fn idempotent_publish_history_and_channel_info() {
    let server = TestServer::start(|_| {});
    let mut client = SseClient::connect(&server, "?channel=orders", None).await;
    client.next_event().await.unwrap();
    let body = r#"{"channel":"orders","data":{"id":7},"idempotency_key":"order-7"}"#;
    let (_, first) = post(&server, body, Some("test-api-key-0123456789")).await;
    let (_, again) = post(&server, body, Some("test-api-key-0123456789")).await;
    assert_eq!(
        first["position"], again["position"],
        "a retried publish is stored once"
    );
    assert_eq!(client.next_seq("orders").await, 1);
    server
        .publish("orders", serde_json::json!({ "id": 8 }))
        .await;
    assert_eq!(
        client.next_seq("orders").await,
        2,
        "the retry was not delivered twice"
    );

    let epoch = first["position"]["epoch"].as_str().unwrap();
    let history: serde_json::Value = server
        .http
        .get(server.url(&format!("/api/history?channel=orders&since={epoch}:0")))
        .bearer_auth("test-api-key-0123456789")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(history["outcome"], "replayed");
    assert_eq!(history["events"].as_array().unwrap().len(), 2);
    assert_eq!(history["events"][1]["data"]["id"], 8);

    let stale: serde_json::Value = server
        .http
        .get(server.url("/api/history?channel=orders&since=oldepoch:3"))
        .bearer_auth("test-api-key-0123456789")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stale["outcome"], "reset");
    assert_eq!(stale["reason"], "epoch_changed");

    let bad = server
        .http
        .get(server.url("/api/history?channel=orders&since=nonsense"))
        .bearer_auth("test-api-key-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    assert_eq!(
        bad.json::<serde_json::Value>().await.unwrap()["code"],
        "bad_cursor"
    );

    let info = server.channel_info("orders").await;
    assert_eq!(info["position"]["seq"], 2);
    assert_eq!(info["subscribers"], 1);
}

#[tokio::test]
async fn health_readiness_metrics_and_request_ids() {
    let server = TestServer::start(|_| {});
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            server
                .http
                .get(server.url(path))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
            200
        );
    }
    server.publish("m", serde_json::json!(1)).await;
    assert_eq!(server.metric("resync_events_published_total").await, 1);
    let response = server
        .http
        .get(server.url("/healthz"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["x-request-id"],
        "abc-123",
        "a client's request id is kept"
    );
    let response = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["x-request-id"].len(),
        16,
        "one is made up otherwise"
    );
}

#[tokio::test]
async fn cookie_credentials_from_a_foreign_origin_are_refused() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(resync_tests::JWT_SECRET.into());
        settings.anonymous_subscribe = Some(vec![]);
        settings.allowed_origins = vec!["https://app.example.com".into()];
    });
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = resync_actix::jwt::sign(
        &resync_actix::jwt::Claims {
            exp,
            subscribe: vec!["*".into()],
            ..Default::default()
        },
        resync_tests::JWT_SECRET.as_bytes(),
    );
    let own_origin = server.server.base_url();
    let status_for = |origin: Option<&str>| {
        let mut request = server
            .http
            .get(server.url("/poll?channel=c"))
            .header("cookie", format!("resync_token={token}"));
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status_for(Some("https://evil.example")).await, 403);
    assert_eq!(status_for(Some("https://app.example.com")).await, 200);
    assert_eq!(status_for(None).await, 200);
    assert_eq!(status_for(Some(&own_origin)).await, 200);
    // Without any credentials, nothing is allowed here: a missing token is 401
    // (docs/protocol.md), as anonymous clients may do nothing on this server.
    assert_eq!(
        server
            .http
            .get(server.url("/poll?channel=c"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
}

#[tokio::test]
async fn sse_and_polls_carry_cors_headers_for_pages_on_other_origins() {
    let server = TestServer::start(|settings| {
        settings.allowed_origins = vec!["https://app.example.com".into()]
    });
    let cors = |origin: &'static str, path: &'static str| {
        let request = server.http.get(server.url(path)).header("origin", origin);
        async move {
            let response = request.send().await.unwrap();
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .map(|value| value.to_str().unwrap().to_owned())
            };
            (
                header("access-control-allow-origin"),
                header("access-control-allow-credentials"),
            )
        }
    };
    for path in ["/sse?channel=c", "/poll?channel=c"] {
        assert_eq!(
            cors("https://elsewhere.example", path).await,
            (Some("*".to_owned()), None),
            "{path}"
        );
        assert_eq!(
            cors("https://app.example.com", path).await,
            (
                Some("https://app.example.com".to_owned()),
                Some("true".to_owned())
            ),
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_on_its_own_listener_publishes_to_subscribers_of_the_public_one() {
    let server = TestServer::start(|settings| {
        settings.api_listen = Some("127.0.0.1:0".parse().unwrap());
    });
    let api = format!("http://{}", server.server.api_address.unwrap());
    assert_ne!(api, server.server.base_url(), "a listener of its own");
    let mut stream = SseClient::connect(&server, "?channel=internal", None).await;
    assert_eq!(stream.next_event().await.unwrap().event, "subscribed");
    let response = server
        .http
        .post(format!("{api}/api/publish"))
        .bearer_auth(&server.server.api_key)
        .json(&serde_json::json!({ "channel": "internal", "data": {"from": "backend"} }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        stream.next_seq("internal").await,
        1,
        "delivered on the public listener"
    );
    // The API key still guards it, and it serves no client transports.
    let unauthorized = server
        .http
        .post(format!("{api}/api/publish"))
        .json(&serde_json::json!({ "channel": "internal", "data": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status().as_u16(), 401);
    let sse = server
        .http
        .get(format!("{api}/sse?channel=internal"))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status().as_u16(), 404);
    let health = server
        .http
        .get(format!("{api}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
}
