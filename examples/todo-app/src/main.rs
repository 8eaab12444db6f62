//! An ordinary actix-web app (a todo list) that mounts resync and publishes after each change.
//!
//! ```sh
//! cargo run -p example-todo-app
//! curl -N 'http://127.0.0.1:8090/live/sse?channel=todos'       # follow changes
//! curl -X POST -H 'content-type: application/json' \
//!      -d '{"title":"buy milk"}' http://127.0.0.1:8090/todos  # change data
//! curl http://127.0.0.1:8090/todos                             # snapshot + position
//! ```
//!
//! The snapshot endpoint returns the list together with the channel position it reflects, so
//! a client can load the snapshot and then follow the channel from exactly that position: the
//! `subscribe_with_snapshot` pattern of the resync clients.

use actix_web::{App, HttpResponse, HttpServer, web};
use resync_actix::{Publisher, Resync};
use resync_broker::MemoryBroker;
use resync_protocol::{Channel, Position};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

#[derive(Clone, Serialize)]
struct Todo {
    id: u64,
    title: String,
}

#[derive(Deserialize)]
struct NewTodo {
    title: String,
}

struct Store {
    todos: Vec<Todo>,
    /// The position of the last change published, so snapshots say where they stand.
    position: Option<Position>,
}

struct AppState {
    /// An async mutex, so the publish can be awaited while the change is still exclusive.
    store: Mutex<Store>,
    publisher: Publisher,
    channel: Channel,
}

async fn add_todo(
    state: web::Data<AppState>,
    body: web::Json<NewTodo>,
) -> actix_web::Result<HttpResponse> {
    // Change the data, then publish the change while still holding the lock, so the order of
    // changes in the store and on the channel is the same.
    let mut store = state.store.lock().await;
    let todo = Todo {
        id: store.todos.len() as u64 + 1,
        title: body.into_inner().title,
    };
    store.todos.push(todo.clone());
    let change = serde_json::json!({ "op": "add", "todo": todo });
    let position = state.publisher.publish(&state.channel, &change).await?;
    store.position = Some(position.clone());
    Ok(HttpResponse::Created().json(serde_json::json!({ "todo": todo, "position": position })))
}

async fn list_todos(state: web::Data<AppState>) -> actix_web::Result<HttpResponse> {
    let store = state.store.lock().await;
    Ok(HttpResponse::Ok()
        .json(serde_json::json!({ "todos": store.todos, "position": store.position })))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let resync = Resync::builder(MemoryBroker::default()).build();
    let channel = Channel::new("todos").map_err(std::io::Error::other)?;
    let state = web::Data::new(AppState {
        store: Mutex::new(Store {
            todos: Vec::new(),
            position: None,
        }),
        publisher: resync.publisher(),
        channel,
    });
    println!("todo app on http://127.0.0.1:8090 (live updates under /live)");
    HttpServer::new(move || {
        let resync = resync.clone();
        App::new()
            .app_data(state.clone())
            .route("/todos", web::get().to(list_todos))
            .route("/todos", web::post().to(add_todo))
            .service(web::scope("/live").configure(move |config| resync.configure(config)))
    })
    .on_connect(resync_actix::track_disconnects)
    .bind(("127.0.0.1", 8090))?
    .run()
    .await
}
