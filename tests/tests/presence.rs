//! Presence over WebSocket on the memory broker: members, the list and the count, join and
//! leave events, leaves that come without a close, several tabs of one user, the size limit
//! on presence info, and who may see a channel's members.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use resync_actix::jwt;
use resync_protocol::{ClientFrame, ErrorCode, Member, Payload, PresenceRequest, ServerFrame};
use resync_tests::proxy::ChaosProxy;
use resync_tests::{JWT_SECRET, TestServer, WsClient};

fn info(name: &str) -> Option<PresenceRequest> {
    Some(PresenceRequest {
        info: Some(Payload::from_value(&serde_json::json!({ "name": name })).unwrap()),
    })
}

/// Subscribes as a member (with `join_leave`), returning once `subscribed` came.
async fn join(client: &mut WsClient, channel: &str, presence: Option<PresenceRequest>) {
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Subscribe {
            id,
            channel: channel.parse().unwrap(),
            since: None,
            presence,
            join_leave: true,
            state: false,
        })
        .await;
    match client.frame().await {
        ServerFrame::Subscribed { id: reply, .. } if reply == id => {}
        other => panic!("expected subscribed, got {other:?}"),
    }
}

/// The next join or leave (skipping events), as ("join"|"leave", member id).
async fn next_presence(client: &mut WsClient) -> (&'static str, Member) {
    loop {
        match client.frame().await {
            ServerFrame::Join { member, .. } => return ("join", member),
            ServerFrame::Leave { member, .. } => return ("leave", member),
            ServerFrame::Event(_) => {}
            other => panic!("expected join or leave, got {other:?}"),
        }
    }
}

async fn members(client: &mut WsClient, channel: &str) -> Vec<String> {
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Presence {
            id,
            channel: channel.parse().unwrap(),
        })
        .await;
    loop {
        match client.frame().await {
            ServerFrame::Presence {
                id: reply, members, ..
            } if reply == id => {
                let mut ids: Vec<String> = members.into_iter().map(|member| member.id).collect();
                ids.sort();
                return ids;
            }
            ServerFrame::Join { .. } | ServerFrame::Leave { .. } | ServerFrame::Presence { .. } => {
            }
            other => panic!("expected the member list, got {other:?}"),
        }
    }
}

fn token(subject: &str, subscribe: &[&str]) -> String {
    resync_tests::user_token(subject, subscribe)
}

fn jwt_server(configure: impl FnOnce(&mut resync_server::Settings)) -> TestServer {
    TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        configure(settings);
    })
}

#[tokio::test]
async fn two_members_see_each_other_and_a_close_is_a_leave() {
    let server = jwt_server(|_| {});
    let url = |subject| server.ws_url(&format!("?token={}", token(subject, &["chat:*"])));
    let mut ann = WsClient::connect_ready(&url("ann")).await;
    join(&mut ann, "chat:1", info("Ann")).await;
    assert_eq!(
        next_presence(&mut ann).await.1.id,
        "ann",
        "a member sees its own join"
    );
    let mut bob = WsClient::connect_ready(&url("bob")).await;
    join(&mut bob, "chat:1", info("Bob")).await;
    let (kind, member) = next_presence(&mut ann).await;
    assert_eq!((kind, member.id.as_str()), ("join", "bob"));
    assert_eq!(
        member.info.unwrap().as_str(),
        r#"{"name":"Bob"}"#,
        "the info it joined with"
    );
    assert_eq!(
        members(&mut bob, "chat:1").await,
        ["ann", "bob"],
        "bob sees ann"
    );
    assert_eq!(members(&mut ann, "chat:1").await, ["ann", "bob"]);
    // A close is a leave.
    bob.stream.close(None).await.unwrap();
    let (kind, member) = next_presence(&mut ann).await;
    assert_eq!((kind, member.id.as_str()), ("leave", "bob"));
    assert_eq!(members(&mut ann, "chat:1").await, ["ann"]);
}

#[tokio::test]
async fn two_tabs_of_one_user_are_one_member_who_leaves_with_the_last() {
    let server = jwt_server(|_| {});
    let url = |subject| server.ws_url(&format!("?token={}", token(subject, &["chat:*"])));
    let mut watcher = WsClient::connect_ready(&url("watcher")).await;
    join(&mut watcher, "chat:tabs", None).await;
    let mut first_tab = WsClient::connect_ready(&url("cat")).await;
    join(&mut first_tab, "chat:tabs", info("Cat")).await;
    let mut second_tab = WsClient::connect_ready(&url("cat")).await;
    join(&mut second_tab, "chat:tabs", info("Cat")).await;
    assert_eq!(next_presence(&mut watcher).await.0, "join");
    let id = watcher.next_request_id();
    watcher
        .send(&ClientFrame::PresenceCount {
            id,
            channel: "chat:tabs".parse().unwrap(),
        })
        .await;
    match watcher.frame().await {
        ServerFrame::PresenceCount { count, .. } => assert_eq!(count, 1, "two tabs, one member"),
        other => panic!("expected the count, got {other:?}"),
    }
    drop(first_tab);
    // The second tab still holds the member: the next presence event is the last tab's leave.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(members(&mut watcher, "chat:tabs").await, ["cat"]);
    drop(second_tab);
    let (kind, member) = next_presence(&mut watcher).await;
    assert_eq!((kind, member.id.as_str()), ("leave", "cat"));
}

#[tokio::test]
async fn a_member_whose_connection_dies_without_a_close_leaves_within_the_heartbeat_bound() {
    // Cut at a proxy that stops passing bytes (no FIN, no RST): only the heartbeat can tell.
    // The bound is two ping intervals (docs/presence.md): 2 s here.
    let server = jwt_server(|settings| settings.ping_interval_secs = 1);
    let proxy = ChaosProxy::start(server.server.addresses[0]).await;
    let token_of = |subject| token(subject, &["chat:*"]);
    let mut watcher =
        WsClient::connect_ready(&server.ws_url(&format!("?token={}", token_of("w")))).await;
    join(&mut watcher, "chat:cut", None).await;
    let through_proxy = format!(
        "{}/ws?token={}",
        proxy.base_url().replacen("http", "ws", 1),
        token_of("dana")
    );
    let mut dana = WsClient::connect_ready(&through_proxy).await;
    join(&mut dana, "chat:cut", info("Dana")).await;
    assert_eq!(next_presence(&mut watcher).await.1.id, "dana");
    // Dana answers pings: past the bound, it is still a member, so the leave below is the
    // cut's doing.
    let answering = tokio::spawn(async move {
        loop {
            if let resync_tests::WsRead::Closed(_) = dana.read().await {
                break;
            }
        }
    });
    for _ in 0..6 {
        // The watcher reads (and answers pings) every half second too.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            members(&mut watcher, "chat:cut").await,
            ["dana"],
            "a member that answers pings stays"
        );
    }
    proxy.set_blackhole(true);
    let cut_at = Instant::now();
    let (kind, member) = next_presence(&mut watcher).await;
    let took = cut_at.elapsed();
    assert_eq!((kind, member.id.as_str()), ("leave", "dana"));
    assert!(
        took <= Duration::from_millis(3_500),
        "left {took:?} after the cut; the bound is two ping intervals (2 s) and a tick"
    );
    answering.abort();
}

#[tokio::test]
async fn presence_info_over_the_limit_is_refused_and_nothing_is_joined() {
    let server = jwt_server(|settings| settings.max_presence_info_bytes = 64);
    let mut client =
        WsClient::connect_ready(&server.ws_url(&format!("?token={}", token("eve", &["*"])))).await;
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Subscribe {
            id,
            channel: "chat:big".parse().unwrap(),
            since: None,
            presence: info(&"x".repeat(100)),
            join_leave: false,
            state: false,
        })
        .await;
    match client.frame().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::PresenceInfoTooLarge),
        other => panic!("expected presence_info_too_large, got {other:?}"),
    }
    assert!(
        members(&mut client, "chat:big").await.is_empty(),
        "nothing joined"
    );
}

#[tokio::test]
async fn a_client_without_permission_cannot_list_members() {
    let server = jwt_server(|_| {});
    let mut member =
        WsClient::connect_ready(&server.ws_url(&format!("?token={}", token("fay", &["team:*"]))))
            .await;
    join(&mut member, "team:secret", info("Fay")).await;
    let mut outsider =
        WsClient::connect_ready(&server.ws_url(&format!("?token={}", token("gus", &["chat:*"]))))
            .await;
    let id = outsider.next_request_id();
    outsider
        .send(&ClientFrame::Presence {
            id,
            channel: "team:secret".parse().unwrap(),
        })
        .await;
    match outsider.frame().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("expected forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn the_http_api_lists_and_counts_members() {
    let server = jwt_server(|_| {});
    let mut ann =
        WsClient::connect_ready(&server.ws_url(&format!("?token={}", token("ann", &["*"])))).await;
    join(&mut ann, "room:api", info("Ann")).await;
    let get = |query: &'static str| {
        let request = server
            .http
            .get(server.url(&format!("/api/channels/room:api/presence{query}")))
            .bearer_auth("test-api-key-0123456789");
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), 200);
            response
                .json::<resync_protocol::bodies::ChannelPresence>()
                .await
                .unwrap()
        }
    };
    let listed = get("").await;
    assert_eq!(listed.count, 1);
    assert_eq!(listed.members.unwrap()[0].id, "ann");
    let counted = get("?only=count").await;
    assert_eq!((counted.count, counted.members), (1, None));
    let refused = server
        .http
        .get(server.url("/api/channels/room:api/presence"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401, "the API needs its key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_redis_agree_and_a_killed_instance_s_members_expire() {
    three_instances_agree_and_a_killed_instance_s_members_expire(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_on_a_redis_cluster_agree_and_a_killed_instance_s_members_expire() {
    three_instances_agree_and_a_killed_instance_s_members_expire(true).await;
}

async fn three_instances_agree_and_a_killed_instance_s_members_expire(cluster: bool) {
    use resync_tests::redis_topology::Redis;
    use resync_tests::server_process::ServerProcess;

    let redis = Redis::start(cluster);
    let mut instances = ServerProcess::start_many(
        3,
        &redis.server_arguments(),
        &["--jwt-secret", JWT_SECRET, "--presence-ttl-secs", "2"],
    );
    let url = |instance: &ServerProcess, subject: &str| {
        format!(
            "{}/ws?token={}",
            instance.base_url.replacen("http", "ws", 1),
            token(subject, &["room:*"])
        )
    };
    let mut clients = Vec::new();
    for (index, instance) in instances.iter().enumerate() {
        let mut client = WsClient::connect_ready(&url(instance, &format!("user{index}"))).await;
        join(&mut client, "room:cluster", info(&format!("User {index}"))).await;
        clients.push(client);
    }
    // Each watcher sees the joins made after it watched (its own and the later ones), from
    // whichever instance they came.
    for (index, client) in clients.iter_mut().enumerate() {
        let mut joined = Vec::new();
        while joined.len() < 3 - index {
            let (kind, member) = next_presence(client).await;
            assert_eq!(kind, "join");
            if !joined.contains(&member.id) {
                joined.push(member.id);
            }
        }
    }
    for client in &mut clients {
        assert_eq!(
            members(client, "room:cluster").await,
            ["user0", "user1", "user2"],
            "every instance lists every member"
        );
    }
    // Kill the third instance (SIGKILL: no leave is ever sent); its member expires.
    instances[2].kill();
    let killed_at = Instant::now();
    let (kind, member) = next_presence(&mut clients[0]).await;
    let took = killed_at.elapsed();
    assert_eq!((kind, member.id.as_str()), ("leave", "user2"));
    assert!(
        took <= Duration::from_millis(4_500),
        "left {took:?} after the kill; the bound is the ttl and a third (2.7 s) and a sweep"
    );
    for client in &mut clients[..2] {
        assert_eq!(members(client, "room:cluster").await, ["user0", "user1"]);
    }
}

#[tokio::test]
async fn an_sse_viewer_is_a_member_and_is_told_of_joins_and_leaves() {
    let server = jwt_server(|_| {});
    let mut watcher =
        WsClient::connect_ready(&server.ws_url(&format!("?token={}", token("wes", &["doc:*"]))))
            .await;
    join(&mut watcher, "doc:1", None).await;
    let viewer_info = urlencoding_json(r#"{"name":"Vi"}"#);
    let mut viewer = resync_tests::SseClient::connect(
        &server,
        &format!(
            "?channel=doc:1&presence={viewer_info}&join_leave=1&token={}",
            token("vi", &["doc:*"])
        ),
        None,
    )
    .await;
    let (kind, member) = next_presence(&mut watcher).await;
    assert_eq!(
        (kind, member.id.as_str()),
        ("join", "vi"),
        "an SSE viewer counts as a member"
    );
    // A WebSocket member joins: the viewer gets a `join` event.
    let mut editor =
        WsClient::connect_ready(&server.ws_url(&format!("?token={}", token("ed", &["doc:*"]))))
            .await;
    join(&mut editor, "doc:1", info("Ed")).await;
    let mut saw = Vec::new();
    while saw.len() < 2 {
        let message = viewer.next().await.expect("the stream stays open");
        if message.event == "join" {
            saw.push(message.data);
        }
    }
    assert!(
        saw[0].contains(r#""id":"vi""#),
        "its own join first: {saw:?}"
    );
    assert!(saw[1].contains(r#""id":"ed""#), "{saw:?}");
    // The viewer goes away: its leave reaches the others.
    drop(viewer);
    loop {
        let (kind, member) = next_presence(&mut watcher).await;
        if kind == "leave" {
            assert_eq!(member.id, "vi");
            break;
        }
    }
}

fn urlencoding_json(json: &str) -> String {
    json.bytes()
        .map(|byte| match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (byte as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn token_claims_say_who_may_see_and_who_may_appear() {
    let server = jwt_server(|_| {});
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    // May subscribe to the lobby, but neither see nor appear among its members.
    let quiet = jwt::sign(
        &jwt::Claims {
            sub: Some("quiet".into()),
            exp,
            subscribe: vec!["lobby".into()],
            presence: Some(Vec::new()),
            appear: Some(Vec::new()),
            ..Default::default()
        },
        JWT_SECRET.as_bytes(),
    );
    let mut client = WsClient::connect_ready(&server.ws_url(&format!("?token={quiet}"))).await;
    client.subscribe("lobby", None).await;
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Presence {
            id,
            channel: "lobby".parse().unwrap(),
        })
        .await;
    match client.frame().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Forbidden, "may not see"),
        other => panic!("expected forbidden, got {other:?}"),
    }
    let mut other = WsClient::connect_ready(&server.ws_url(&format!("?token={quiet}"))).await;
    let id = other.next_request_id();
    other
        .send(&ClientFrame::Subscribe {
            id,
            channel: "lobby".parse().unwrap(),
            since: None,
            presence: info("Quiet"),
            join_leave: false,
            state: false,
        })
        .await;
    match other.frame().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Forbidden, "may not appear"),
        other => panic!("expected forbidden, got {other:?}"),
    }
}

#[tokio::test]
async fn rust_clients_see_each_other_in_the_member_list() {
    use futures_util::StreamExt;
    use resync_client::{Client, TransportChoice, Update};

    let server = jwt_server(|_| {});
    let client_of = |subject: &'static str| {
        Client::builder(&server.server.base_url())
            .transport(TransportChoice::Only(
                resync_client::TransportKind::WebSocket,
            ))
            .token(token(subject, &["team:*"]))
            .build()
            .unwrap()
    };
    let channel: resync_protocol::Channel = "team:rust".parse().unwrap();
    let ann = client_of("ann");
    let mut ann_sub = ann
        .subscribe(channel.clone())
        .with_presence(Some(Payload::from_value(&"Ann").unwrap()))
        .with_members();
    let bob = client_of("bob");
    // Ann sees herself, then Bob arrive (and the list never shows anyone else).
    let mut bob_sub = None;
    let mut seen = Vec::new();
    while seen.last().is_none_or(|ids: &Vec<String>| ids.len() < 2) {
        let update = tokio::time::timeout(Duration::from_secs(10), ann_sub.next())
            .await
            .expect("member lists in time")
            .unwrap()
            .unwrap();
        if let Update::Members(members) = update {
            let mut ids: Vec<String> = members.into_iter().map(|member| member.id).collect();
            ids.sort();
            if ids == ["ann"] && bob_sub.is_none() {
                bob_sub = Some(bob.subscribe(channel.clone()).with_presence(None));
                // Polled, so it registers and joins.
                let subscription = bob_sub.as_mut().unwrap();
                let _ = tokio::time::timeout(Duration::from_millis(50), subscription.next()).await;
            }
            seen.push(ids);
        }
    }
    assert_eq!(seen.last().unwrap(), &["ann", "bob"]);
    // Bob's subscription ends: Ann's list loses him.
    drop(bob_sub);
    loop {
        let update = tokio::time::timeout(Duration::from_secs(10), ann_sub.next())
            .await
            .expect("the leave in time")
            .unwrap()
            .unwrap();
        if let Update::Members(members) = update
            && members.len() == 1
        {
            assert_eq!(members[0].id, "ann");
            break;
        }
    }
}

/// One long poll, sent as a client written from docs/protocol.md would send it.
async fn raw_poll(server: &TestServer, query: &str) -> (u16, serde_json::Value) {
    let response = tokio::time::timeout(
        Duration::from_secs(40),
        server.http.get(server.url(&format!("/poll{query}"))).send(),
    )
    .await
    .expect("the poll answers")
    .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// The presence frames of a poll reply, as (type, member ids, sorted).
fn poll_presence(reply: &serde_json::Value) -> Vec<(String, Vec<String>)> {
    reply["presence"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|frame| {
            let ids = match frame["members"].as_array() {
                Some(members) => {
                    let mut ids: Vec<String> = members
                        .iter()
                        .map(|member| member["id"].as_str().unwrap().to_owned())
                        .collect();
                    ids.sort();
                    ids
                }
                None => vec![frame["member"]["id"].as_str().unwrap().to_owned()],
            };
            (frame["type"].as_str().unwrap().to_owned(), ids)
        })
        .collect()
}

#[tokio::test]
async fn a_long_polling_member_appears_hears_joins_and_leaves_when_its_polls_stop() {
    let server = jwt_server(|settings| settings.poll_presence_idle_secs = 2);
    let asks = format!(
        "?channel=chat:lp&token={}&presence={}&join_leave=1",
        token("pat", &["chat:*"]),
        urlencoding_json(r#"{"name":"Pat"}"#)
    );
    // The first poll answers at once: the cursor, a session, and the list it starts from.
    let (status, first) = raw_poll(&server, &asks).await;
    assert_eq!(status, 200, "{first}");
    let session = first["presence_session"].as_str().unwrap().to_owned();
    assert_eq!(session.len(), 32, "128 bits in hex: {session}");
    assert_eq!(
        poll_presence(&first),
        [("presence".to_owned(), vec!["pat".to_owned()])]
    );
    // A WebSocket member sees the poller among the members.
    let mut ann =
        WsClient::connect_ready(&server.ws_url(&format!("?token={}", token("ann", &["chat:*"]))))
            .await;
    join(&mut ann, "chat:lp", info("Ann")).await;
    assert_eq!(members(&mut ann, "chat:lp").await, ["ann", "pat"]);
    // The next poll of the session hears ann's join, with the channel's events.
    server
        .publish("chat:lp", serde_json::json!({"text": "hi"}))
        .await;
    let next = format!(
        "{asks}&presence_session={session}&cursor={}",
        urlencoding_json(first["cursor"].as_str().unwrap())
    );
    let (status, second) = raw_poll(&server, &next).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(
        second["presence_session"],
        session.as_str(),
        "the same session"
    );
    let mut heard = poll_presence(&second);
    let mut events = second["events"].as_array().unwrap().len();
    let mut cursor = second["cursor"].as_str().unwrap().to_owned();
    while !heard.contains(&("join".to_owned(), vec!["ann".to_owned()])) || events == 0 {
        let (_, more) = raw_poll(
            &server,
            &format!(
                "{asks}&presence_session={session}&cursor={}",
                urlencoding_json(&cursor)
            ),
        )
        .await;
        heard.extend(poll_presence(&more));
        events += more["events"].as_array().unwrap().len();
        cursor = more["cursor"].as_str().unwrap().to_owned();
    }
    assert!(
        !heard.iter().any(|(kind, _)| kind == "presence"),
        "a known session is not sent the whole list again: {heard:?}"
    );
    // The poller stops polling: it leaves once its session has been idle 2 s, not before.
    let stopped = Instant::now();
    loop {
        let (kind, member) = next_presence(&mut ann).await;
        if kind == "leave" {
            assert_eq!(member.id, "pat");
            break;
        }
        assert_eq!(
            (kind, member.id.as_str()),
            ("join", "ann"),
            "only its own join"
        );
    }
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_millis(1_500) && took <= Duration::from_millis(4_500),
        "left {took:?} after its last poll; the bound is the idle time (2 s) and a sweep"
    );
}

#[tokio::test]
async fn a_presence_session_belongs_to_its_client_and_a_newer_poll_takes_it_over() {
    let server = jwt_server(|_| {});
    let asks = |subject: &str| {
        format!(
            "?channel=room:lp&token={}&join_leave=1&presence=",
            token(subject, &["room:*"])
        )
    };
    let (_, first) = raw_poll(&server, &asks("pat")).await;
    let session = first["presence_session"].as_str().unwrap().to_owned();
    let cursor = urlencoding_json(first["cursor"].as_str().unwrap());
    // Another identity naming pat's session gets a session of its own.
    let (status, eve) = raw_poll(
        &server,
        &format!("{}&presence_session={session}&cursor={cursor}", asks("eve")),
    )
    .await;
    assert_eq!(status, 200, "{eve}");
    assert_ne!(eve["presence_session"], session.as_str());
    assert_eq!(
        poll_presence(&eve).first(),
        Some(&(
            "presence".to_owned(),
            vec!["eve".to_owned(), "pat".to_owned()]
        )),
        "a new session starts from the list"
    );
    // Pat's poll waits; a newer poll of the same session makes it answer at once.
    let waiting = format!("{}&presence_session={session}&cursor={cursor}", asks("pat"));
    let started = Instant::now();
    let earlier = tokio::spawn({
        let server_url = server.url(&format!("/poll{waiting}&timeout=30"));
        let http = server.http.clone();
        async move { http.get(server_url).send().await.unwrap().status().as_u16() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let newer = tokio::spawn({
        let server_url = server.url(&format!("/poll{waiting}&timeout=2"));
        let http = server.http.clone();
        async move {
            let response = http.get(server_url).send().await.unwrap();
            (
                response.status().as_u16(),
                response.json::<serde_json::Value>().await.unwrap(),
            )
        }
    });
    assert_eq!(earlier.await.unwrap(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the earlier poll answered when the newer one came, not at its timeout"
    );
    let (status, newer) = newer.await.unwrap();
    assert_eq!(status, 200, "{newer}");
    assert_eq!(
        newer["presence_session"],
        session.as_str(),
        "the newer poll holds it"
    );
    // A client that may not see the members cannot ask for join/leave.
    let (status, refused) = raw_poll(
        &server,
        &format!(
            "?channel=room:lp&token={}&join_leave=1",
            jwt::sign(
                &jwt::Claims {
                    sub: Some("mo".into()),
                    exp: SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .unwrap()
                        .as_secs()
                        + 600,
                    subscribe: vec!["room:*".into()],
                    presence: Some(vec![]),
                    ..jwt::Claims::default()
                },
                JWT_SECRET.as_bytes()
            )
        ),
    )
    .await;
    assert_eq!(status, 403, "{refused}");
}

#[tokio::test]
async fn a_poller_that_misses_a_burst_of_joins_is_sent_the_whole_list() {
    let server = jwt_server(|settings| {
        settings.connection_burst_per_ip = 1_000;
        settings.connections_per_ip_per_second = 1_000.0;
    });
    let asks = format!(
        "?channel=burst:1&token={}&join_leave=1&presence=",
        token("pat", &["burst:*"])
    );
    let (_, first) = raw_poll(&server, &asks).await;
    let session = first["presence_session"].as_str().unwrap().to_owned();
    // More members join than the session's queue holds (256) while it is not polling.
    let joining = resync_broker::presence::PRESENCE_EVENT_QUEUE + 44;
    let mut members = Vec::new();
    for index in 0..joining {
        let subject = format!("u{index:03}");
        let mut client = WsClient::connect_ready(
            &server.ws_url(&format!("?token={}", token(&subject, &["burst:*"]))),
        )
        .await;
        let id = client.next_request_id();
        client
            .send(&ClientFrame::Subscribe {
                id,
                channel: "burst:1".parse().unwrap(),
                since: None,
                presence: info(&subject),
                join_leave: false,
                state: false,
            })
            .await;
        assert!(matches!(
            client.frame().await,
            ServerFrame::Subscribed { .. }
        ));
        members.push(client);
    }
    let (status, reply) = raw_poll(
        &server,
        &format!(
            "{asks}&presence_session={session}&cursor={}",
            urlencoding_json(first["cursor"].as_str().unwrap())
        ),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    // Applied in order, the frames give the whole list; one of them is the list itself,
    // which proves the queue overflowed.
    let mut seen = std::collections::BTreeSet::new();
    let mut lists = 0;
    for (kind, ids) in poll_presence(&reply) {
        match kind.as_str() {
            "presence" => {
                lists += 1;
                seen = ids.into_iter().collect();
            }
            "join" => {
                seen.extend(ids);
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        lists >= 1,
        "the burst overflowed the queue: a list was sent"
    );
    let mut expected: std::collections::BTreeSet<String> =
        (0..joining).map(|index| format!("u{index:03}")).collect();
    expected.insert("pat".to_owned());
    assert_eq!(seen, expected);
}
