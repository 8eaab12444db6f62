//! An ordinary actix-web app (a todo list) that mounts resync and publishes after each change.
//! See `README.md` beside this file for the commands.
//!
//! The snapshot endpoint returns the list together with the channel position it reflects, so
//! a client can load the snapshot and then follow the channel from exactly that position: the
//! `subscribe_with_snapshot` pattern of the resync clients. On SIGTERM or Ctrl-C it stops
//! accepting at once and closes its live connections with resync's "reconnect and resume"
//! signal, which is what a deploy of your own app should do.

use std::net::SocketAddr;

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

struct AppState {
    /// An async mutex, so the publish can be awaited while the change is still exclusive, and
    /// a snapshot is never taken between a change and its publish.
    todos: Mutex<Vec<Todo>>,
    publisher: Publisher,
    channel: Channel,
}

async fn add_todo(
    state: web::Data<AppState>,
    body: web::Json<NewTodo>,
) -> actix_web::Result<HttpResponse> {
    // Change the data, then publish the change while still holding the lock, so the order of
    // changes in the store and on the channel is the same.
    let mut todos = state.todos.lock().await;
    let todo = Todo {
        id: todos.len() as u64 + 1,
        title: body.into_inner().title,
    };
    todos.push(todo.clone());
    let change = serde_json::json!({ "op": "add", "todo": todo });
    let position = state.publisher.publish(&state.channel, &change).await?;
    Ok(HttpResponse::Created().json(serde_json::json!({ "todo": todo, "position": position })))
}

async fn list_todos(state: web::Data<AppState>) -> actix_web::Result<HttpResponse> {
    let todos = state.todos.lock().await;
    // The channel's position under the same lock: an empty list has one too (seq 0), so a
    // follower can start before the first change.
    let position: Position = state
        .publisher
        .broker()
        .position(&state.channel)
        .await
        .map_err(actix_web::error::ErrorServiceUnavailable)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "todos": *todos, "position": position })))
}

/// `--listen ADDR` or `TODO_APP_LISTEN`; 127.0.0.1:8090 by default.
fn listen_address() -> std::io::Result<SocketAddr> {
    let mut arguments = std::env::args().skip(1);
    let mut listen = std::env::var("TODO_APP_LISTEN").ok();
    while let Some(argument) = arguments.next() {
        match argument.as_str() {
            "--listen" => listen = arguments.next(),
            other => {
                return Err(std::io::Error::other(format!(
                    "unknown argument {other}; usage: example-todo-app [--listen 127.0.0.1:8090]"
                )));
            }
        }
    }
    listen
        .as_deref()
        .unwrap_or("127.0.0.1:8090")
        .parse()
        .map_err(|error| std::io::Error::other(format!("--listen: {error}")))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let address = listen_address()?;
    let shutdown_signal = shutdown_signal()?;
    let resync = Resync::builder(MemoryBroker::default()).build();
    let channel = Channel::new("todos").map_err(std::io::Error::other)?;
    let state = web::Data::new(AppState {
        todos: Mutex::new(Vec::new()),
        publisher: resync.publisher(),
        channel,
    });
    let app_resync = resync.clone();
    let server = HttpServer::new(move || {
        let resync = app_resync.clone();
        App::new()
            .app_data(state.clone())
            .route("/todos", web::get().to(list_todos))
            .route("/todos", web::post().to(add_todo))
            .service(web::scope("/live").configure(move |config| resync.configure(config)))
    })
    // Departed SSE clients noticed at once, and the kernel's write deadline on every socket.
    .on_connect(resync_actix::on_connect(
        resync_actix::ConnectOptions::default(),
    ))
    // Our own signal handling below: actix's would wait 30 s for live connections that only
    // resync can tell to go.
    .disable_signals()
    .shutdown_timeout(10)
    .bind(address)?;
    for address in server.addrs() {
        println!("todo app on http://{address} (live updates under /live)");
    }
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(async move {
        shutdown_signal.await;
        // Stop accepting first (a returning client meets a refused connection and retries),
        // then tell every live connection to reconnect and resume, spread over 2 s.
        let stopped = handle.stop(true);
        resync.shutdown();
        stopped.await;
    });
    server.await
}

/// Completes at SIGTERM or Ctrl-C. Installed before the app says it listens: a signal that
/// came before the handler would end the process the default way, with no drain.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut terminate =
        actix_web::rt::signal::unix::signal(actix_web::rt::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = terminate.recv() => {}
            _ = actix_web::rt::signal::ctrl_c() => {}
        }
        #[cfg(not(unix))]
        let _ = actix_web::rt::signal::ctrl_c().await;
    })
}
