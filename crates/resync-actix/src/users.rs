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

/// Each user's recent commands, with when they arrived.
type Recent = HashMap<Arc<str>, Vec<(std::time::Instant, UserCommand)>>;

/// This process's connections, by user.
pub(crate) struct UserConnections {
    users: Mutex<Table>,
    /// The commands of the last [`RECENT`], by user: a long-polling client is between two
    /// polls more often than in one, and its next poll must obey them too.
    recent: Mutex<Recent>,
    next_id: std::sync::atomic::AtomicU64,
    started: std::sync::Once,
}

/// How long a user command is remembered for the user's next long polls: the longest a
/// client waits between two polls (a poll's longest wait, and a margin).
const RECENT: std::time::Duration = std::time::Duration::from_secs(90);

/// Users whose recent commands are remembered at most.
const MAX_RECENT_USERS: usize = 10_000;

/// Recent commands remembered per user at most (the oldest are forgotten first): a flood of
/// commands for one user must not grow without bound.
const MAX_RECENT_PER_USER: usize = 64;

impl Default for UserConnections {
    fn default() -> Self {
        Self {
            users: Mutex::default(),
            recent: Mutex::default(),
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

    /// Starts, once, the task that reads the broker's user commands (on the runtime of the
    /// worker that serves the first caller).
    pub(crate) fn start(self: &Arc<Self>, broker: &Arc<dyn Broker>) {
        self.started.call_once(|| {
            if let Some(commands) = broker.user_commands().map(|bus| bus.receive()) {
                actix_web::rt::spawn(dispatch(Arc::downgrade(self), commands));
            }
        });
    }

    /// The commands for `user` of the last [`RECENT`], oldest first.
    pub(crate) fn recent(&self, user: &str) -> Vec<UserCommand> {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        recent
            .get(user)
            .into_iter()
            .flatten()
            .filter(|(at, _)| at.elapsed() < RECENT)
            .map(|(_, command)| command.clone())
            .collect()
    }

    fn remember(&self, command: &UserCommand) {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.len() >= MAX_RECENT_USERS {
            recent.retain(|_, commands| {
                commands.retain(|(at, _)| at.elapsed() < RECENT);
                !commands.is_empty()
            });
            if recent.len() >= MAX_RECENT_USERS {
                tracing::warn!(target: "resync::users", "too many users with recent commands; this one is not kept for long polls");
                return;
            }
        }
        let commands = recent.entry(Arc::from(command.user())).or_default();
        commands.retain(|(at, _)| at.elapsed() < RECENT);
        if commands.len() >= MAX_RECENT_PER_USER {
            commands.remove(0);
        }
        commands.push((std::time::Instant::now(), command.clone()));
    }

    /// Registers a connection of `user`, and starts the task that reads the broker's user
    /// commands if it has not started.
    pub(crate) fn register(self: &Arc<Self>, broker: &Arc<dyn Broker>, user: &str) -> UserInbox {
        self.start(broker);
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
async fn dispatch(registry: Weak<UserConnections>, mut commands: resync_broker::UserCommands) {
    loop {
        let command = match commands.recv().await {
            Some(Ok(command)) => command,
            Some(Err(lagged)) => {
                tracing::warn!(target: "resync::users", missed = lagged.missed, "user commands were missed");
                continue;
            }
            None => return,
        };
        let Some(registry) = registry.upgrade() else {
            return;
        };
        registry.remember(&command);
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
