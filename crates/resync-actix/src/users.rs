//! The connections of each user (token subject) in this process, so that a user command
//! (disconnect, unsubscribe from a channel) sent through the broker from any instance reaches
//! every one of them.
//!
//! One task per process reads the broker's user commands and hands each to the user's
//! connections through small bounded queues; a connection that is not reading (a full queue)
//! misses the command, which the task logs. Anonymous connections are not registered: a
//! command names a user.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use resync_broker::Broker;
use resync_protocol::bodies::UserCommand;
use tokio::sync::mpsc;

/// Commands a connection may have waiting.
const CONNECTION_QUEUE: usize = 4;

/// Each user's connections: an id (to remove it) and its queue of commands.
type Table = HashMap<Arc<str>, Vec<(u64, mpsc::Sender<UserCommand>)>>;

/// This process's connections, by user.
pub(crate) struct UserConnections {
    users: Mutex<Table>,
    next_id: std::sync::atomic::AtomicU64,
    started: std::sync::Once,
}

impl Default for UserConnections {
    fn default() -> Self {
        Self {
            users: Mutex::default(),
            next_id: std::sync::atomic::AtomicU64::new(0),
            started: std::sync::Once::new(),
        }
    }
}

/// A connection's place in [`UserConnections`]: its commands, and its removal when dropped.
pub(crate) struct UserInbox {
    registry: Weak<UserConnections>,
    user: Arc<str>,
    id: u64,
    pub(crate) commands: mpsc::Receiver<UserCommand>,
}

impl Drop for UserInbox {
    fn drop(&mut self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        let mut users = registry.lock();
        if let Some(connections) = users.get_mut(&self.user) {
            connections.retain(|(id, _)| *id != self.id);
            if connections.is_empty() {
                users.remove(&self.user);
            }
        }
    }
}

impl UserConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a connection of `user`; the first registration starts the task that reads
    /// the broker's user commands (on the runtime of the worker that serves it).
    pub(crate) fn register(self: &Arc<Self>, broker: &Arc<dyn Broker>, user: &str) -> UserInbox {
        self.started.call_once(|| {
            if let Some(commands) = broker.user_commands() {
                actix_web::rt::spawn(dispatch(Arc::downgrade(self), commands));
            }
        });
        let (sender, commands) = mpsc::channel(CONNECTION_QUEUE);
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let user: Arc<str> = Arc::from(user);
        self.lock()
            .entry(user.clone())
            .or_default()
            .push((id, sender));
        UserInbox {
            registry: Arc::downgrade(self),
            user,
            id,
            commands,
        }
    }
}

/// Hands each user command to the user's connections in this process.
async fn dispatch(
    registry: Weak<UserConnections>,
    mut commands: tokio::sync::broadcast::Receiver<UserCommand>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let command = match commands.recv().await {
            Ok(command) => command,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(target: "resync::users", missed, "user commands were missed");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let Some(registry) = registry.upgrade() else {
            return;
        };
        let connections: Vec<mpsc::Sender<UserCommand>> = registry
            .lock()
            .get(command.user())
            .map(|connections| {
                connections
                    .iter()
                    .map(|(_, sender)| sender.clone())
                    .collect()
            })
            .unwrap_or_default();
        for connection in connections {
            if connection.try_send(command.clone()).is_err() {
                tracing::warn!(target: "resync::users", user = command.user(), "a connection missed a user command (its queue is full)");
            }
        }
    }
}
