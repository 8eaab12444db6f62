//! Keeps a local copy of the todo-app example's list in sync, exactly. See `README.md` beside
//! this file for the commands.
//!
//! The follower loads a snapshot (`GET /todos`, which returns the list with the channel
//! position it reflects), then applies the `todos` channel's events after exactly that
//! position. If the server cannot replay what it missed (say the todo app restarted), the
//! client reports a reset and the follower loads a fresh snapshot: the local map is never
//! silently wrong. An empty list is a snapshot like any other: the follower then waits for the
//! first change.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use resync_client::{Client, SnapshotUpdate};
use resync_protocol::{Channel, Position};
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
struct Todo {
    id: u64,
    title: String,
}

#[derive(Deserialize)]
struct Snapshot {
    todos: Vec<Todo>,
    position: Position,
}

#[derive(Deserialize)]
struct Change {
    op: String,
    todo: Todo,
}

async fn fetch_snapshot(
    http: reqwest::Client,
    app: String,
) -> Result<(BTreeMap<u64, String>, Position), String> {
    let snapshot: Snapshot = http
        .get(format!("{app}/todos"))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|error| format!("fetching {app}/todos: {error}"))?
        .json()
        .await
        .map_err(|error| format!("reading {app}/todos: {error}"))?;
    let map = snapshot
        .todos
        .into_iter()
        .map(|todo| (todo.id, todo.title))
        .collect();
    Ok((map, snapshot.position))
}

/// `--app URL` or `TODO_APP_URL`; http://127.0.0.1:8090 by default.
fn app_url() -> Result<String, String> {
    let mut arguments = std::env::args().skip(1);
    let mut app = std::env::var("TODO_APP_URL").ok();
    while let Some(argument) = arguments.next() {
        match argument.as_str() {
            "--app" => app = arguments.next(),
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: example-todo-follower [--app http://127.0.0.1:8090]"
                ));
            }
        }
    }
    Ok(app
        .unwrap_or_else(|| "http://127.0.0.1:8090".to_owned())
        .trim_end_matches('/')
        .to_owned())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let app = app_url()?;
    let client = Client::builder(&format!("{app}/live")).build()?;
    let http = reqwest::Client::new();
    let mut updates = client.subscribe_with_snapshot(Channel::new("todos")?, move || {
        fetch_snapshot(http.clone(), app.clone())
    });
    let mut todos = BTreeMap::new();
    while let Some(update) = updates.next().await {
        match update? {
            SnapshotUpdate::Snapshot {
                state,
                position,
                after_reset,
            } => {
                todos = state;
                println!(
                    "snapshot at {position} ({} todos, after reset: {after_reset:?}); waiting for changes",
                    todos.len()
                );
            }
            SnapshotUpdate::Event(event) => {
                let change: Change = event.data.parse()?;
                if change.op == "add" {
                    todos.insert(change.todo.id, change.todo.title);
                }
                println!(
                    "seq {}: {} todos: {:?}",
                    event.position.seq,
                    todos.len(),
                    todos.values().collect::<Vec<_>>()
                );
            }
            SnapshotUpdate::FetchFailed { error, retry_in } => {
                eprintln!("snapshot failed ({error}); retrying in {retry_in:?}");
            }
        }
    }
    Ok(())
}
