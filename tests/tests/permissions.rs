//! Issue 25, items 7 and 8 and L2: every permission question (subscribe, publish, see
//! presence, appear) is answered by one decision that applies every rule source (token
//! claims, namespace rules, the application's proxy), on every transport, and a refresh keeps
//! what the application narrowed. One table: action × rule source × transport.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use resync_protocol::{ClientFrame, Payload, PresenceRequest, ServerFrame};
use resync_tests::backend::AppBackend;
use resync_tests::{JWT_SECRET, TestServer, WsClient};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Subscribe,
    Publish,
    SeePresence,
    Appear,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    WebSocket,
    Sse,
    Poll,
}

fn token(subject: &str, subscribe: &[&str], publish: &[&str]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    resync_actix::jwt::sign(
        &resync_actix::jwt::Claims {
            sub: Some(subject.into()),
            exp,
            subscribe: subscribe
                .iter()
                .map(|pattern| (*pattern).to_owned())
                .collect(),
            publish: publish
                .iter()
                .map(|pattern| (*pattern).to_owned())
                .collect(),
            ..Default::default()
        },
        JWT_SECRET.as_bytes(),
    )
}

/// Whether a client with `token` (or anonymous) may do `action` on `channel` over
/// `transport`, as the server answers it.
async fn allowed(
    server: &TestServer,
    token: Option<&str>,
    action: Action,
    transport: Transport,
    channel: &str,
) -> bool {
    let token_query = token
        .map(|token| format!("&token={token}"))
        .unwrap_or_default();
    match transport {
        Transport::Sse | Transport::Poll => {
            let path = if transport == Transport::Sse {
                "sse"
            } else {
                "poll"
            };
            let extra = match action {
                Action::Subscribe => "",
                Action::SeePresence => "&join_leave=1",
                Action::Appear => "&presence=",
                Action::Publish => unreachable!("no publishing over {transport:?}"),
            };
            let response = server
                .http
                .get(server.url(&format!("/{path}?channel={channel}{extra}{token_query}")))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            assert!(
                status == 200 || status == 403,
                "{transport:?} {action:?} {channel}: {status}"
            );
            status == 200
        }
        Transport::WebSocket => {
            let query = token
                .map(|token| format!("?token={token}"))
                .unwrap_or_default();
            let mut client = WsClient::connect_ready(&server.ws_url(&query)).await;
            let id = client.next_request_id();
            let channel = channel.parse().unwrap();
            let frame = match action {
                Action::Subscribe | Action::Appear => ClientFrame::Subscribe {
                    id,
                    channel,
                    since: None,
                    presence: (action == Action::Appear).then_some(PresenceRequest { info: None }),
                    join_leave: false,
                    state: false,
                },
                Action::SeePresence => ClientFrame::Presence { id, channel },
                Action::Publish => ClientFrame::Publish {
                    id,
                    channel,
                    data: Payload::from_json("{}").unwrap(),
                    idempotency_key: None,
                },
            };
            client.send(&frame).await;
            match client.frame().await {
                ServerFrame::Subscribed { .. }
                | ServerFrame::Presence { .. }
                | ServerFrame::Published { .. } => true,
                ServerFrame::Error {
                    code: resync_protocol::ErrorCode::Forbidden,
                    ..
                } => false,
                other => panic!("WebSocket {action:?}: {other:?}"),
            }
        }
    }
}

/// One rule source: a server, the client's token, and what it may and may not do.
struct Case {
    source: &'static str,
    server: TestServer,
    token: Option<String>,
    allowed_channel: &'static str,
    denied_channel: &'static str,
    actions: Vec<Action>,
}

#[tokio::test]
async fn item_8_every_permission_is_one_decision_over_every_rule_source_and_transport() {
    // The application narrows every connection to `chat:*`, whatever its token says.
    let backend = AppBackend::start(|request| {
        let answer = match request["kind"].as_str() {
            Some("connect") => r#"{"subscribe":["chat:*"],"publish":["chat:*"]}"#,
            _ => "{}",
        };
        (Duration::ZERO, answer.to_owned())
    })
    .await;
    let cases = [
        Case {
            source: "token claims",
            server: TestServer::start(|settings| {
                settings.jwt_secret = Some(JWT_SECRET.into());
                settings.anonymous_subscribe = Some(Vec::new());
            }),
            token: Some(token("ann", &["open:*"], &["open:*"])),
            allowed_channel: "open:1",
            denied_channel: "closed:1",
            actions: vec![
                Action::Subscribe,
                Action::Publish,
                Action::SeePresence,
                Action::Appear,
            ],
        },
        Case {
            source: "namespace rules",
            server: TestServer::start(|settings| {
                for (name, open) in [("private", false), ("lobby", true)] {
                    settings.namespaces.insert(
                        name.to_owned(),
                        resync_server::NamespaceSettings {
                            anonymous_subscribe: Some(open),
                            anonymous_publish: Some(open),
                            ..Default::default()
                        },
                    );
                }
            }),
            token: None,
            allowed_channel: "lobby:1",
            denied_channel: "private:room",
            actions: vec![
                Action::Subscribe,
                Action::Publish,
                Action::SeePresence,
                Action::Appear,
            ],
        },
        Case {
            source: "proxy answers",
            server: {
                let url = backend.url.clone();
                TestServer::start(move |settings| {
                    settings.jwt_secret = Some(JWT_SECRET.into());
                    settings.proxy_url = Some(url);
                    settings.proxy_connect = true;
                })
            },
            token: Some(token("bob", &["*"], &["*"])),
            allowed_channel: "chat:1",
            denied_channel: "secret:1",
            actions: vec![
                Action::Subscribe,
                Action::Publish,
                Action::SeePresence,
                Action::Appear,
            ],
        },
    ];
    let mut wrong = Vec::new();
    for case in &cases {
        for &action in &case.actions {
            for transport in [Transport::WebSocket, Transport::Sse, Transport::Poll] {
                if action == Action::Publish && transport != Transport::WebSocket {
                    continue;
                }
                for (channel, expected) in
                    [(case.allowed_channel, true), (case.denied_channel, false)]
                {
                    let got = allowed(
                        &case.server,
                        case.token.as_deref(),
                        action,
                        transport,
                        channel,
                    )
                    .await;
                    if got != expected {
                        wrong.push(format!(
                            "{}: {action:?} {channel} over {transport:?}: {} (expected {})",
                            case.source,
                            if got { "allowed" } else { "refused" },
                            if expected { "allowed" } else { "refused" },
                        ));
                    }
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A WebSocket to `server` with `token`, refreshed once with `refresh_with`.
async fn refreshed_connection(server: &TestServer, token: &str, refresh_with: &str) -> WsClient {
    let mut client = WsClient::connect_ready(&server.ws_url(&format!("?token={token}"))).await;
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Refresh {
            id,
            token: refresh_with.to_owned(),
        })
        .await;
    match client.frame().await {
        ServerFrame::Refreshed { .. } => client,
        other => panic!("the refresh was refused: {other:?}"),
    }
}

#[tokio::test]
async fn item_7_a_refresh_keeps_what_the_proxy_narrowed() {
    for ask_on_refresh in [false, true] {
        let backend = AppBackend::start(|request| {
            let answer = match request["kind"].as_str() {
                Some("connect") => r#"{"subscribe":["chat:1"],"publish":[]}"#,
                _ => "{}",
            };
            (Duration::ZERO, answer.to_owned())
        })
        .await;
        let url = backend.url.clone();
        let server = TestServer::start(move |settings| {
            settings.jwt_secret = Some(JWT_SECRET.into());
            settings.proxy_url = Some(url);
            settings.proxy_connect = true;
            settings.proxy_refresh = ask_on_refresh;
        });
        let everything = token("carol", &["*"], &["*"]);
        let mut client = refreshed_connection(&server, &everything, &everything).await;
        for (frame, what) in [
            (
                ClientFrame::Subscribe {
                    id: 90,
                    channel: "secret:1".parse().unwrap(),
                    since: None,
                    presence: None,
                    join_leave: false,
                    state: false,
                },
                "subscribe",
            ),
            (
                ClientFrame::Publish {
                    id: 91,
                    channel: "secret:1".parse().unwrap(),
                    data: Payload::from_json("{}").unwrap(),
                    idempotency_key: None,
                },
                "publish",
            ),
        ] {
            client.send(&frame).await;
            match client.frame().await {
                ServerFrame::Error {
                    code: resync_protocol::ErrorCode::Forbidden,
                    ..
                } => {}
                other => panic!(
                    "ask on refresh {ask_on_refresh}: {what} secret:1 after a refresh: {other:?}"
                ),
            }
        }
        if ask_on_refresh {
            assert_eq!(backend.asked("refresh").len(), 1, "the refresh was asked");
        }
    }
}

#[tokio::test]
async fn l2_a_user_the_proxy_mapped_can_refresh_in_place() {
    let backend = AppBackend::start(|request| {
        let answer = match request["kind"].as_str() {
            Some("connect") => r#"{"user":"account-42"}"#,
            _ => "{}",
        };
        (Duration::ZERO, answer.to_owned())
    })
    .await;
    let url = backend.url.clone();
    let server = TestServer::start(move |settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        settings.proxy_url = Some(url);
        settings.proxy_connect = true;
    });
    let first = token("dave", &["*"], &[]);
    let second = token("dave", &["*"], &[]);
    let mut client = refreshed_connection(&server, &first, &second).await;
    // Still the mapped user, with its rules: a subscribe works.
    client
        .send(&ClientFrame::Subscribe {
            id: 7,
            channel: "news".parse().unwrap(),
            since: None,
            presence: None,
            join_leave: false,
            state: false,
        })
        .await;
    assert!(matches!(
        client.frame().await,
        ServerFrame::Subscribed { .. }
    ));
}

#[tokio::test]
async fn item_12_refreshes_have_their_own_small_rate_and_bad_ones_count() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        settings.anonymous_subscribe = Some(vec!["*".to_owned()]);
    });
    // An anonymous socket sending bad refreshes as fast as it may send messages: each one a
    // signature check, unless refreshes are rationed.
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    let bad = resync_actix::jwt::sign(
        &resync_actix::jwt::Claims {
            sub: Some("mallory".into()),
            exp: 1,
            ..Default::default()
        },
        b"not-the-server-secret-0123456789abcdef",
    );
    for id in 1..=30 {
        client
            .send(&ClientFrame::Refresh {
                id,
                token: bad.clone(),
            })
            .await;
    }
    let (mut checked, mut rationed) = (0, 0);
    for _ in 1..=30 {
        match client.frame().await {
            ServerFrame::Error {
                code:
                    resync_protocol::ErrorCode::Unauthorized | resync_protocol::ErrorCode::Forbidden,
                ..
            } => checked += 1,
            ServerFrame::Error {
                code: resync_protocol::ErrorCode::RateLimited,
                ..
            } => rationed += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        checked <= 3 && rationed >= 27,
        "{checked} refreshes were checked, {rationed} rationed"
    );
}

#[test]
fn l5_uniform_jwt_secrets_and_short_api_keys_stop_the_server_at_start() {
    let start = |configure: &dyn Fn(&mut resync_server::Settings)| {
        let mut settings = resync_server::Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            api_key: Some(resync_tests::TEST_API_KEY.to_owned()),
            // A check of the settings: no data directory in the working directory.
            broker: resync_server::BrokerKind::Memory,
            ..resync_server::Settings::default()
        };
        configure(&mut settings);
        resync_server::start(settings).map(|_| ())
    };
    for secret in [" ".repeat(32), "a".repeat(32), "ab".repeat(40)] {
        let error = start(&|settings| settings.jwt_secret = Some(secret.clone()))
            .expect_err("a uniform secret was accepted");
        assert!(format!("{error:#}").contains("different"), "{error:#}");
    }
    for key in ["k", "dev-key", "aaaaaaaaaaaaaaaaaaaa"] {
        let error = start(&|settings| settings.api_key = Some(key.to_owned()))
            .expect_err("a weak API key was accepted");
        assert!(format!("{error:#}").contains("API key"), "{error:#}");
    }
    // The demo's openness is the point: its short key is only a warning.
    start(&|settings| {
        settings.api_key = Some("dev-key".to_owned());
        settings.demo = true;
    })
    .expect("the demo starts with the README's key");
}

#[tokio::test]
async fn l6_a_token_with_a_crit_header_is_refused() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        settings.anonymous_subscribe = Some(Vec::new());
    });
    let claims = resync_actix::jwt::Claims {
        sub: Some("ann".into()),
        exp: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600,
        subscribe: vec!["*".into()],
        ..Default::default()
    };
    let plain = token("ann", &["*"], &[]);
    // Signed correctly, with a header naming an extension the reader must understand.
    use base64::Engine;
    let encode = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
    let message = format!(
        "{}.{}",
        encode(r#"{"alg":"HS256","typ":"JWT","crit":["exp"]}"#),
        encode(&serde_json::to_string(&claims).unwrap())
    );
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
        jsonwebtoken::Algorithm::HS256,
    )
    .unwrap();
    let critical = format!("{message}.{signature}");
    let status = |token: String| {
        let request = server
            .http
            .get(server.url(&format!("/poll?channel=a&token={token}")));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(plain).await, 200);
    assert_eq!(
        status(critical).await,
        401,
        "an extension the server does not understand"
    );
}
