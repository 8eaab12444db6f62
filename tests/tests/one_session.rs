//! Issue 29, "one session under every transport": every session behaviour a client can see is
//! one row of a table, run on SSE, WebSocket and long polling with the same assertions. An
//! adapter per transport turns its wire into what a client written from `docs/protocol.md`
//! learns ([`Seen`]); the rows never look at a wire.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use futures_util::{SinkExt, StreamExt};
use resync_protocol::sse::SseParser;
use resync_protocol::{ClientFrame, CloseCode, Cursor, PresenceRequest, ServerFrame};
use resync_tests::{JWT_SECRET, TestServer, WAIT};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Wire {
    Sse,
    WebSocket,
    LongPoll,
}

const WIRES: [Wire; 3] = [Wire::Sse, Wire::WebSocket, Wire::LongPoll];

/// What a client learns from the server, whatever the wire.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Event {
        channel: String,
        seq: u64,
    },
    Reset {
        channel: String,
    },
    Unsubscribed {
        channel: String,
    },
    Disconnect {
        reconnect: bool,
    },
    Join {
        channel: String,
        member: String,
    },
    Leave {
        channel: String,
        member: String,
    },
    /// The whole member list of a channel (sorted ids), as a watcher gets it after missing
    /// joins and leaves.
    Members {
        channel: String,
        members: Vec<String>,
    },
    /// The server ended the connection; `come_back` is whether its wire says to reconnect.
    Ended {
        come_back: bool,
    },
    /// The server refused to serve the request (opening, subscribe or poll), with this code.
    Refused(String),
}

/// What a client asks for when it opens.
#[derive(Clone)]
struct Open {
    channels: Vec<String>,
    token: String,
    /// Whether the client appears among the channels' members.
    member: bool,
    /// Whether it watches joins and leaves.
    join_leave: bool,
    /// Where it comes back from: a cursor (`Last-Event-ID` on SSE, `cursor=` on long
    /// polling, each channel's `since` on WebSocket).
    resume: Option<String>,
}

impl Open {
    fn new(user: &str, channels: &[&str]) -> Self {
        Self {
            channels: channels
                .iter()
                .map(|channel| (*channel).to_owned())
                .collect(),
            token: resync_tests::user_token(user, &["*"]),
            member: false,
            join_leave: false,
            resume: None,
        }
    }
}

/// A client over one wire: a task reads the wire and tells what it learns, in order.
struct Follower {
    wire: Wire,
    seen: mpsc::Receiver<Seen>,
    task: tokio::task::JoinHandle<()>,
    /// Where the client stands, as a cursor, after what it has been told.
    position: Position,
    /// Whether the client reads its wire (or polls); a paused one leaves it to the kernel.
    reading: tokio::sync::watch::Sender<bool>,
}

/// A client's place, kept by its task as it learns.
type Position = std::sync::Arc<std::sync::Mutex<Option<String>>>;

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Follower {
    /// Opens, and returns once the server serves every channel (or refused).
    async fn open(server: &TestServer, wire: Wire, open: &Open) -> Self {
        let (sender, seen) = mpsc::channel(1024);
        let (ready, is_ready) = tokio::sync::oneshot::channel();
        let position = Position::default();
        let (reading, may_read) = tokio::sync::watch::channel(true);
        let told = Told {
            seen: sender,
            position: position.clone(),
            may_read,
        };
        let task = match wire {
            Wire::Sse => tokio::spawn(sse(server.url(""), open.clone(), told, ready)),
            Wire::WebSocket => tokio::spawn(websocket(
                server.ws_url(&format!("?token={}", open.token)),
                open.clone(),
                told,
                ready,
            )),
            Wire::LongPoll => tokio::spawn(long_poll(server.url(""), open.clone(), told, ready)),
        };
        tokio::time::timeout(WAIT, is_ready)
            .await
            .unwrap_or_else(|_| panic!("{wire:?}: opened in time"))
            .ok();
        Self {
            wire,
            seen,
            task,
            position,
            reading,
        }
    }

    /// Stops reading the wire (or polling) until [`resume`](Self::resume).
    fn pause(&self) {
        self.reading.send_replace(false);
    }

    fn resume(&self) {
        self.reading.send_replace(true);
    }

    /// Where the client stands now, as a cursor.
    fn position(&self) -> Option<String> {
        self.position
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The next thing learnt (heartbeats, openings and lists are not told).
    async fn next(&mut self) -> Seen {
        tokio::time::timeout(WAIT * 3, self.seen.recv())
            .await
            .unwrap_or_else(|_| panic!("{:?}: nothing seen in time", self.wire))
            .unwrap_or_else(|| panic!("{:?}: the client stopped without saying why", self.wire))
    }

    /// Skips events until something else is learnt.
    async fn next_notice(&mut self) -> Seen {
        loop {
            match self.next().await {
                Seen::Event { .. } => {}
                other => return other,
            }
        }
    }
}

/// Where a wire's task tells what it learns.
struct Told {
    seen: mpsc::Sender<Seen>,
    position: Position,
    may_read: tokio::sync::watch::Receiver<bool>,
}

impl Told {
    async fn send(&self, seen: Seen) {
        let _ = self.seen.send(seen).await;
    }

    /// Returns once the client reads again (at once unless paused).
    async fn may_read(&mut self) {
        let _ = self.may_read.wait_for(|reading| *reading).await;
    }

    fn stand_at(&self, cursor: String) {
        *self
            .position
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(cursor);
    }
}

async fn sse(base: String, open: Open, mut seen: Told, ready: tokio::sync::oneshot::Sender<()>) {
    let mut query = format!(
        "/sse?channels={}&token={}",
        open.channels.join(","),
        open.token
    );
    if open.member {
        query.push_str("&presence=");
    }
    if open.join_leave {
        query.push_str("&join_leave=1");
    }
    let mut request = reqwest::Client::new().get(format!("{base}{query}"));
    if let Some(cursor) = &open.resume {
        request = request.header("Last-Event-ID", cursor);
    }
    let response = request.send().await.unwrap();
    if response.status() != 200 {
        let code = error_code(response).await;
        let _ = seen.send(Seen::Refused(code)).await;
        let _ = ready.send(());
        return;
    }
    let mut body = response.bytes_stream();
    let mut parser = SseParser::new();
    let mut ready = Some(ready);
    let mut retry_ms = None;
    loop {
        seen.may_read().await;
        let Some(Ok(chunk)) = body.next().await else {
            break;
        };
        let messages = parser.feed(&chunk).unwrap();
        seen.stand_at(parser.last_event_id().to_owned());
        for message in messages {
            retry_ms = message.retry_ms.or(retry_ms);
            let data: serde_json::Value =
                serde_json::from_str(&message.data).unwrap_or(serde_json::Value::Null);
            let told = match message.event.as_str() {
                "subscribed" => {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                    None
                }
                "message" if !message.data.is_empty() => Some(event_of(&data)),
                "reset" => Some(Seen::Reset {
                    channel: text(&data["channel"]),
                }),
                "unsubscribed" => Some(Seen::Unsubscribed {
                    channel: text(&data["channel"]),
                }),
                "disconnect" => Some(Seen::Disconnect {
                    reconnect: data["reconnect"].as_bool().unwrap(),
                }),
                "join" | "leave" => presence_of(&data),
                "presence" => Some(members_of(&data)),
                _ => None,
            };
            if let Some(told) = told {
                let _ = seen.send(told).await;
            }
        }
    }
    // An `EventSource` reconnects after any end; the hour-long `retry:` is the wire's "stay
    // away" (docs/protocol.md, section 9).
    let come_back = retry_ms.is_none_or(|retry_ms| retry_ms < 3_600_000);
    let _ = seen.send(Seen::Ended { come_back }).await;
}

async fn websocket(
    url: String,
    open: Open,
    mut seen: Told,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let (mut socket, _) = match tokio_tungstenite::connect_async(&url).await {
        Ok(connected) => connected,
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_deref()
                .and_then(|body| serde_json::from_slice::<serde_json::Value>(body).ok())
                .map(|body| text(&body["code"]));
            let code = body.unwrap_or_else(|| match response.status().as_u16() {
                401 => "unauthorized".to_owned(),
                403 => "forbidden".to_owned(),
                429 => "rate_limited".to_owned(),
                status => format!("status {status}"),
            });
            let _ = seen.send(Seen::Refused(code)).await;
            let _ = ready.send(());
            return;
        }
        Err(error) => panic!("websocket connect failed: {error}"),
    };
    let mut cursor = open
        .resume
        .as_deref()
        .map_or_else(Cursor::new, |cursor| Cursor::parse(cursor).unwrap());
    for (index, channel) in open.channels.iter().enumerate() {
        let channel: resync_protocol::Channel = channel.parse().unwrap();
        let frame = ClientFrame::Subscribe {
            id: index as u64 + 1,
            since: cursor.get(&channel).cloned(),
            channel,
            presence: open.member.then_some(PresenceRequest { info: None }),
            join_leave: open.join_leave,
            state: false,
        };
        socket.send(Message::text(frame.encode())).await.unwrap();
    }
    let mut ready = Some(ready);
    let mut subscribed = 0;
    loop {
        seen.may_read().await;
        let Some(message) = socket.next().await else {
            break;
        };
        let frame = match message {
            Ok(Message::Text(text)) => ServerFrame::decode(text.as_bytes()).unwrap(),
            Ok(Message::Close(close)) => {
                let code = close.map(|close| CloseCode(u16::from(close.code)));
                // The close codes of docs/protocol.md, section 4.
                if code == Some(CloseCode::DISCONNECTED) {
                    let _ = seen.send(Seen::Disconnect { reconnect: false }).await;
                }
                if code == Some(CloseCode::DISCONNECTED_RECONNECT) {
                    let _ = seen.send(Seen::Disconnect { reconnect: true }).await;
                }
                let come_back = code != Some(CloseCode::DISCONNECTED);
                let _ = seen.send(Seen::Ended { come_back }).await;
                return;
            }
            Ok(_) => continue,
            Err(_) => break,
        };
        let told = match frame {
            ServerFrame::Ping => {
                let _ = socket.send(Message::text(ClientFrame::Pong.encode())).await;
                None
            }
            ServerFrame::Subscribed { .. } => {
                subscribed += 1;
                if subscribed == open.channels.len()
                    && let Some(ready) = ready.take()
                {
                    let _ = ready.send(());
                }
                None
            }
            ServerFrame::Event(event) => {
                cursor.set(event.channel.clone(), event.position.clone());
                seen.stand_at(cursor.to_string());
                Some(Seen::Event {
                    channel: event.channel.to_string(),
                    seq: event.position.seq.get(),
                })
            }
            ServerFrame::Reset { channel, .. } => Some(Seen::Reset {
                channel: channel.to_string(),
            }),
            ServerFrame::Unsubscribed { channel, .. } => Some(Seen::Unsubscribed {
                channel: channel.to_string(),
            }),
            ServerFrame::Join { channel, member } => Some(Seen::Join {
                channel: channel.to_string(),
                member: member.id,
            }),
            ServerFrame::Leave { channel, member } => Some(Seen::Leave {
                channel: channel.to_string(),
                member: member.id,
            }),
            ServerFrame::Presence {
                channel, members, ..
            } => {
                let mut members: Vec<String> =
                    members.into_iter().map(|member| member.id).collect();
                members.sort();
                Some(Seen::Members {
                    channel: channel.to_string(),
                    members,
                })
            }
            ServerFrame::Error { code, .. } => {
                // A refused subscribe is an answer too.
                if let Some(ready) = ready.take() {
                    let _ = ready.send(());
                }
                let code = serde_json::to_value(code).unwrap();
                Some(Seen::Refused(text(&code)))
            }
            _ => None,
        };
        if let Some(told) = told {
            let _ = seen.send(told).await;
        }
    }
    let _ = seen.send(Seen::Ended { come_back: true }).await;
}

async fn long_poll(
    base: String,
    mut open: Open,
    mut seen: Told,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let http = reqwest::Client::new();
    let mut cursor: Option<String> = open.resume.clone();
    let mut presence_session: Option<String> = None;
    let mut ready = Some(ready);
    loop {
        seen.may_read().await;
        let mut query = vec![
            ("channels", open.channels.join(",")),
            ("token", open.token.clone()),
            ("timeout", "20".to_owned()),
        ];
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor.clone()));
        }
        if open.member {
            query.push(("presence", String::new()));
        }
        if open.join_leave {
            query.push(("join_leave", "1".to_owned()));
        }
        if let Some(session) = &presence_session {
            query.push(("presence_session", session.clone()));
        }
        let response = http
            .get(format!("{base}/poll"))
            .query(&query)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status == 503 {
            // "Poll again after that many seconds": the server is going away.
            let _ = seen.send(Seen::Ended { come_back: true }).await;
            return;
        }
        if status != 200 {
            let _ = seen.send(Seen::Refused(error_code(response).await)).await;
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            return;
        }
        let reply: serde_json::Value = response.json().await.unwrap();
        // Where the client stands once it has this reply, known before it is told of it.
        cursor = reply["cursor"].as_str().map(str::to_owned);
        if let Some(cursor) = &cursor {
            seen.stand_at(cursor.clone());
        }
        // The first reply is the opening: its lists are what a new watcher starts from.
        let opening = ready.is_some();
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        for reset in reply["resets"].as_array().into_iter().flatten() {
            let _ = seen
                .send(Seen::Reset {
                    channel: text(&reset["channel"]),
                })
                .await;
        }
        for event in reply["events"].as_array().into_iter().flatten() {
            let _ = seen.send(event_of(event)).await;
        }
        for frame in reply["presence"].as_array().into_iter().flatten() {
            let told = match frame["type"].as_str() {
                Some("presence") if opening => None,
                Some("presence") => Some(members_of(frame)),
                _ => presence_of(frame),
            };
            if let Some(told) = told {
                let _ = seen.send(told).await;
            }
        }
        for notice in reply["unsubscribed"].as_array().into_iter().flatten() {
            // A client following the document stops asking for the channel.
            let channel = text(&notice["channel"]);
            open.channels.retain(|held| *held != channel);
            let _ = seen.send(Seen::Unsubscribed { channel }).await;
        }
        if let Some(reconnect) = reply["disconnect"]["reconnect"].as_bool() {
            let _ = seen.send(Seen::Disconnect { reconnect }).await;
            let _ = seen
                .send(Seen::Ended {
                    come_back: reconnect,
                })
                .await;
            return;
        }

        presence_session = reply["presence_session"].as_str().map(str::to_owned);
    }
}

fn text(value: &serde_json::Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

fn event_of(frame: &serde_json::Value) -> Seen {
    Seen::Event {
        channel: text(&frame["channel"]),
        seq: frame["seq"].as_u64().unwrap(),
    }
}

fn presence_of(frame: &serde_json::Value) -> Option<Seen> {
    let channel = text(&frame["channel"]);
    let member = text(&frame["member"]["id"]);
    match frame["type"].as_str() {
        Some("join") => Some(Seen::Join { channel, member }),
        Some("leave") => Some(Seen::Leave { channel, member }),
        _ => None,
    }
}

fn members_of(frame: &serde_json::Value) -> Seen {
    let mut members: Vec<String> = frame["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|member| text(&member["id"]))
        .collect();
    members.sort();
    Seen::Members {
        channel: text(&frame["channel"]),
        members,
    }
}

async fn error_code(response: reqwest::Response) -> String {
    let status = response.status().as_u16();
    match response.json::<serde_json::Value>().await {
        Ok(body) => text(&body["code"]),
        Err(_) => format!("status {status} without an error body"),
    }
}

fn server() -> TestServer {
    TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
    })
}

/// One user per wire and row, so commands reach only the client under test.
fn user(row: &str, wire: Wire) -> String {
    format!("{row}-{wire:?}").to_lowercase()
}

/// A client of `user` on `wire`, following `feed`, disconnected by the application: it is
/// told, and told whether to come back, and its connection ends.
async fn disconnected(server: &TestServer, wire: Wire, user: &str, reconnect: bool) {
    let mut client = Follower::open(server, wire, &Open::new(user, &["feed"])).await;
    server.wait_for_subscribers("feed", 1).await;
    let body = serde_json::json!({"reason": "moved on", "reconnect": reconnect});
    server.user_command(user, "disconnect", body).await;
    assert_eq!(
        client.next_notice().await,
        Seen::Disconnect { reconnect },
        "{wire:?}"
    );
    assert_eq!(
        client.next_notice().await,
        Seen::Ended {
            come_back: reconnect
        },
        "{wire:?}"
    );
}

#[tokio::test]
async fn a_user_disconnect_that_lets_the_client_come_back() {
    let server = server();
    for wire in WIRES {
        let user = user("again", wire);
        disconnected(&server, wire, &user, true).await;
        server.wait_for_subscribers("feed", 0).await;
        // Coming back is served as usual.
        let mut again = Follower::open(&server, wire, &Open::new(&user, &["feed"])).await;
        server.wait_for_subscribers("feed", 1).await;
        server.publish("feed", serde_json::json!(1)).await;
        assert!(
            matches!(again.next().await, Seen::Event { .. }),
            "{wire:?}: served after coming back"
        );
        drop(again);
        server.wait_for_subscribers("feed", 0).await;
    }
}

#[tokio::test]
async fn a_user_told_to_stay_away_is_told_again_when_it_comes_back_at_once() {
    let server = server();
    for wire in WIRES {
        let user = user("away", wire);
        disconnected(&server, wire, &user, false).await;
        // A client that comes back anyway (a bare `EventSource`, a race with the command) is
        // told the same, on every wire, while the server remembers the command.
        let mut again = Follower::open(&server, wire, &Open::new(&user, &["feed"])).await;
        assert_eq!(
            again.next_notice().await,
            Seen::Disconnect { reconnect: false },
            "{wire:?}: a user told to stay away came back and was served"
        );
        assert_eq!(
            again.next_notice().await,
            Seen::Ended { come_back: false },
            "{wire:?}"
        );
        server.wait_for_subscribers("feed", 0).await;
    }
}

#[tokio::test]
async fn a_user_unsubscribe_ends_that_channel_and_the_others_go_on() {
    let server = server();
    for wire in WIRES {
        let user = user("unsub", wire);
        let (gone, kept) = (format!("gone-{wire:?}"), format!("kept-{wire:?}"));
        let mut client = Follower::open(&server, wire, &Open::new(&user, &[&gone, &kept])).await;
        server.wait_for_subscribers(&gone, 1).await;
        server
            .user_command(&user, "unsubscribe", serde_json::json!({"channel": gone}))
            .await;
        assert_eq!(
            client.next_notice().await,
            Seen::Unsubscribed {
                channel: gone.clone()
            },
            "{wire:?}"
        );
        server.wait_for_subscribers(&gone, 0).await;
        server.wait_for_subscribers(&kept, 1).await;
        // Published in this order: the first event seen is the kept channel's.
        server.publish(&gone, serde_json::json!("gone")).await;
        server.publish(&kept, serde_json::json!("kept")).await;
        assert_eq!(
            client.next().await,
            Seen::Event {
                channel: kept.clone(),
                seq: 1
            },
            "{wire:?}"
        );
    }
}

#[tokio::test]
async fn an_expired_token_ends_the_connection_and_the_same_token_is_refused() {
    let server = server();
    for wire in WIRES {
        let mut open = Open::new(&user("expiry", wire), &["feed"]);
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3;
        open.token = resync_actix::jwt::sign(
            &resync_actix::jwt::Claims {
                sub: Some(user("expiry", wire)),
                exp,
                subscribe: vec!["*".to_owned()],
                ..Default::default()
            },
            JWT_SECRET.as_bytes(),
        );
        let mut client = Follower::open(&server, wire, &open).await;
        let ended = client.next_notice().await;
        assert!(
            matches!(&ended, Seen::Ended { come_back: true })
                || ended == Seen::Refused("unauthorized".to_owned()),
            "{wire:?}: {ended:?}"
        );
        server.wait_for_subscribers("feed", 0).await;
        let mut again = Follower::open(&server, wire, &open).await;
        assert_eq!(
            again.next_notice().await,
            Seen::Refused("unauthorized".to_owned()),
            "{wire:?}"
        );
    }
}

#[tokio::test]
async fn a_channel_the_token_does_not_allow_is_refused_as_forbidden() {
    let server = server();
    for wire in WIRES {
        let mut open = Open::new(&user("forbidden", wire), &["secret"]);
        open.token = resync_tests::user_token(&user("forbidden", wire), &["news"]);
        let mut client = Follower::open(&server, wire, &open).await;
        assert_eq!(
            client.next_notice().await,
            Seen::Refused("forbidden".to_owned()),
            "{wire:?}"
        );
    }
}

#[tokio::test]
async fn joins_and_leaves_reach_a_watcher() {
    let server = server();
    for wire in WIRES {
        let room = format!("room-{wire:?}");
        let mut watching = Open::new(&user("watcher", wire), &[&room]);
        watching.join_leave = true;
        let mut watcher = Follower::open(&server, wire, &watching).await;
        server.wait_for_subscribers(&room, 1).await;
        // The member comes over WebSocket: what is under test is the watcher's wire.
        let mut member = Open::new("mia", &[&room]);
        member.member = true;
        let joining = Follower::open(&server, Wire::WebSocket, &member).await;
        assert_eq!(
            watcher.next_notice().await,
            Seen::Join {
                channel: room.clone(),
                member: "mia".to_owned()
            },
            "{wire:?}"
        );
        drop(joining);
        assert_eq!(
            watcher.next_notice().await,
            Seen::Leave {
                channel: room.clone(),
                member: "mia".to_owned()
            },
            "{wire:?}"
        );
    }
}

#[tokio::test]
async fn a_shutdown_tells_every_client_to_come_back() {
    for wire in WIRES {
        let server = server();
        let mut client = Follower::open(&server, wire, &Open::new("deployed", &["feed"])).await;
        server.wait_for_subscribers("feed", 1).await;
        server.server.resync.shutdown();
        assert_eq!(
            client.next_notice().await,
            Seen::Ended { come_back: true },
            "{wire:?}"
        );
    }
}

#[tokio::test]
async fn a_connection_past_its_channel_limit_is_refused_with_the_same_code() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        settings.max_channels_per_connection = 2;
    });
    for wire in WIRES {
        let open = Open::new(&user("limit", wire), &["one", "two", "three"]);
        let mut client = Follower::open(&server, wire, &open).await;
        assert_eq!(
            client.next_notice().await,
            Seen::Refused("too_many_channels".to_owned()),
            "{wire:?}"
        );
    }
}

#[tokio::test]
async fn a_client_that_comes_back_with_a_new_token_keeps_its_place() {
    let server = server();
    for wire in WIRES {
        let user = user("renewed", wire);
        let channel = format!("renewed-{wire:?}");
        let mut client = Follower::open(&server, wire, &Open::new(&user, &[&channel])).await;
        server.wait_for_subscribers(&channel, 1).await;
        server.publish(&channel, serde_json::json!(1)).await;
        assert_eq!(
            client.next().await,
            Seen::Event {
                channel: channel.clone(),
                seq: 1
            },
            "{wire:?}"
        );
        let position = client.position();
        assert!(
            position.is_some(),
            "{wire:?}: the client knows where it stands"
        );
        drop(client);
        server.wait_for_subscribers(&channel, 0).await;
        // Missed while away, then live: each once, in order, under the new token.
        server.publish(&channel, serde_json::json!(2)).await;
        let mut renewed = Open::new(&user, &[&channel]);
        renewed.token = resync_tests::user_token(&user, &["renewed-*"]);
        renewed.resume = position;
        let mut client = Follower::open(&server, wire, &renewed).await;
        server.wait_for_subscribers(&channel, 1).await;
        server.publish(&channel, serde_json::json!(3)).await;
        for seq in [2, 3] {
            assert_eq!(
                client.next().await,
                Seen::Event {
                    channel: channel.clone(),
                    seq
                },
                "{wire:?}"
            );
        }
    }
}

/// Waits until `server` answers `/readyz` with `status` (its broker up or down).
async fn ready_is(server: &TestServer, status: u16) {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        let answered = server
            .http
            .get(server.url("/readyz"))
            .send()
            .await
            .map(|response| response.status().as_u16())
            .ok();
        if answered == Some(status) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never answered {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_broker_outage_keeps_followers_in_place_and_refuses_new_subscribes_until_it_ends() {
    let mut redis = resync_tests::redis_server::RedisServer::start();
    let url = redis.url();
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        settings.broker = resync_server::BrokerKind::Redis;
        settings.redis_url = url;
    });
    ready_is(&server, 200).await;
    for wire in WIRES {
        let channel = format!("outage-{wire:?}");
        let mut client = Follower::open(
            &server,
            wire,
            &Open::new(&user("outage", wire), &[&channel]),
        )
        .await;
        server.wait_for_subscribers(&channel, 1).await;
        server.publish(&channel, serde_json::json!(1)).await;
        assert_eq!(
            client.next().await,
            Seen::Event {
                channel: channel.clone(),
                seq: 1
            },
            "{wire:?}"
        );
        redis.stop();
        ready_is(&server, 503).await;
        // A client that opens during the outage is told to come back later, on every wire
        // (docs/protocol.md, section 10: a retry stream, close 4101, 503).
        let mut late = Follower::open(
            &server,
            wire,
            &Open::new(&user("late", wire), &[&format!("late-{wire:?}")]),
        )
        .await;
        assert_eq!(
            late.next_notice().await,
            Seen::Ended { come_back: true },
            "{wire:?}"
        );
        redis.restart_keeping_data();
        ready_is(&server, 200).await;
        server.publish(&channel, serde_json::json!(2)).await;
        // The follower's next event is the next seq, with no reset: in place, or (a poll held
        // through the outage is answered 503) after coming back once from where it stood.
        let seen = match client.next().await {
            Seen::Ended { come_back: true } if wire == Wire::LongPoll => {
                let mut again = Open::new(&user("outage", wire), &[&channel]);
                again.resume = client.position();
                client = Follower::open(&server, wire, &again).await;
                client.next().await
            }
            seen => seen,
        };
        assert_eq!(
            seen,
            Seen::Event {
                channel: channel.clone(),
                seq: 2
            },
            "{wire:?}"
        );
    }
}

#[tokio::test]
async fn a_watcher_that_missed_joins_gets_the_whole_list() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        // The paused watcher is not cut while the test fills its wire.
        settings.write_timeout_secs = 120;
    });
    for wire in WIRES {
        let room = format!("crowd-{wire:?}");
        let mut watching = Open::new(&user("crowd", wire), &[&room]);
        watching.join_leave = true;
        let mut watcher = Follower::open(&server, wire, &watching).await;
        server.wait_for_subscribers(&room, 1).await;
        // The watcher stops reading, and enough events fill its wire (its socket buffers,
        // the server's write buffer) that its session waits to write: joins pile up behind.
        watcher.pause();
        let filler = "x".repeat(32 * 1024);
        for _ in 0..128 {
            server.publish(&room, serde_json::json!(filler)).await;
        }
        // More joins than a watch keeps (256, `PRESENCE_EVENT_QUEUE` in resync-broker).
        let count = 300;
        let mut crowd = Vec::new();
        let mut expected = Vec::new();
        for index in 0..count {
            let name = format!("m{index:03}");
            let mut member = Open::new(&name, &[&room]);
            member.member = true;
            crowd.push(Follower::open(&server, Wire::WebSocket, &member).await);
            expected.push(name);
        }
        expected.sort();
        watcher.resume();
        // Whatever joins it was told before it fell behind, it is then told the whole list.
        loop {
            match watcher.next_notice().await {
                Seen::Join { .. } => {}
                Seen::Members { members, .. } if members.is_empty() => {}
                Seen::Members { channel, members } => {
                    assert_eq!(channel, room, "{wire:?}");
                    assert_eq!(members, expected, "{wire:?}");
                    break;
                }
                other => panic!("{wire:?}: {other:?}"),
            }
        }
    }
}
