//! Keeps a local copy of the todo-app example's list in sync, exactly.
//!
//! ```sh
//! cargo run -p example-todo-app          # in one terminal
//! cargo run -p example-todo-follower     # in another
//! curl -X POST -H 'content-type: application/json' -d '{"title":"buy milk"}' \
//!      http://127.0.0.1:8090/todos
//! ```
//!
//! The follower loads a snapshot (`GET /todos`, which returns the list with the channel
//! position it reflects), then applies the `todos` channel's events after exactly that
//! position. If the server cannot replay what it missed (say the todo app restarted), the
//! client reports a reset and the follower loads a fresh snapshot: the local map is never
//! silently wrong.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use resync_client::{Client, SnapshotUpdate};
use resync_protocol::{Channel, Position};
use serde::Deserialize;

const APP: &str = "http://127.0.0.1:8090";

#[derive(Clone, Debug, Deserialize)]
struct Todo {
    id: u64,
    title: String,
}

#[derive(Deserialize)]
struct Snapshot {
    todos: Vec<Todo>,
    position: Option<Position>,
}

#[derive(Deserialize)]
struct Change {
    op: String,
    todo: Todo,
}

async fn fetch_snapshot(
    http: reqwest::Client,
) -> Result<(BTreeMap<u64, String>, Position), String> {
    let snapshot: Snapshot = http
        .get(format!("{APP}/todos"))
        .send()
        .await
        .map_err(|error| error.to_string())?
        .json()
        .await
        .map_err(|error| error.to_string())?;
    // A list that has never changed has no position yet: start before the first event.
    let position = match snapshot.position {
        Some(position) => position,
        None => return Err("the todo list has no changes yet; add one and run again".to_owned()),
    };
    let map = snapshot
        .todos
        .into_iter()
        .map(|todo| (todo.id, todo.title))
        .collect();
    Ok((map, position))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::builder(&format!("{APP}/live")).build()?;
    let http = reqwest::Client::new();
    let mut updates = client
        .subscribe_with_snapshot(Channel::new("todos")?, move || fetch_snapshot(http.clone()));
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
                    "snapshot at {position} ({} todos, after reset: {after_reset:?})",
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
        }
    }
    Ok(())
}
