//! User commands (disconnect a user, end one of their subscriptions) carried between server
//! instances, in types this crate owns.
//!
//! A broker that carries user commands hands out a [`UserCommandBus`] from
//! [`Broker::user_commands`](crate::Broker::user_commands), a companion trait as
//! [`Presence`](crate::Presence) is: it sends a command to every instance, and gives each a
//! [`UserCommands`] receiver, fed by a [`UserCommandFanout`] the broker keeps (which is the
//! whole bus of a broker with one instance). A third party implementing the trait needs no
//! tokio channel type in its signature: what it returns is ours, and its inside may change.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use resync_protocol::bodies::UserCommand;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

/// Carries user commands between a broker's server instances: the companion of
/// [`Broker`](crate::Broker) that [`Broker::user_commands`](crate::Broker::user_commands)
/// hands out when the broker carries them.
#[async_trait::async_trait]
pub trait UserCommandBus: Send + Sync + 'static {
    /// Carries `command` to every server instance of the broker (this one included), each of
    /// which applies it to its own connections of the user.
    async fn send(&self, command: &UserCommand) -> crate::Result<()>;

    /// The commands sent from any instance, as they arrive: a receiver of its own,
    /// [`USER_COMMAND_QUEUE`] deep.
    fn receive(&self) -> UserCommands;
}

/// The bus of a broker whose instance is the only one: what is sent is handed out here.
#[async_trait::async_trait]
impl UserCommandBus for UserCommandFanout {
    async fn send(&self, command: &UserCommand) -> crate::Result<()> {
        // No receiver (no connection has asked yet) is not an error: nobody to tell.
        let _ = UserCommandFanout::send(self, command.clone());
        Ok(())
    }

    fn receive(&self) -> UserCommands {
        self.receiver()
    }
}

/// User commands a receiver may fall behind by before it misses some.
pub const USER_COMMAND_QUEUE: usize = 256;

/// What a [`UserCommands`] yields when it fell more than [`USER_COMMAND_QUEUE`] commands
/// behind: some commands were missed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{missed} user commands were missed")]
pub struct UserCommandsLagged {
    /// How many.
    pub missed: u64,
}

/// One process's fan-out of user commands, bounded at [`USER_COMMAND_QUEUE`]: what a broker
/// sends the commands it receives to and hands receivers out from.
#[derive(Clone, Debug)]
pub struct UserCommandFanout {
    sender: broadcast::Sender<UserCommand>,
}

impl Default for UserCommandFanout {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(USER_COMMAND_QUEUE).0,
        }
    }
}

impl UserCommandFanout {
    /// A receiver of the commands sent from now on.
    pub fn receiver(&self) -> UserCommands {
        UserCommands {
            commands: BroadcastStream::new(self.sender.subscribe()),
        }
    }

    /// Hands `command` to every receiver; `false` when there is none.
    pub fn send(&self, command: UserCommand) -> bool {
        self.sender.send(command).is_ok()
    }
}

/// The user commands sent through a broker, as they arrive.
pub struct UserCommands {
    commands: BroadcastStream<UserCommand>,
}

impl std::fmt::Debug for UserCommands {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("UserCommands")
            .finish_non_exhaustive()
    }
}

impl UserCommands {
    /// The next command; `None` once the broker is gone.
    pub async fn recv(&mut self) -> Option<Result<UserCommand, UserCommandsLagged>> {
        std::future::poll_fn(|context| Pin::new(&mut *self).poll_next(context)).await
    }
}

impl Stream for UserCommands {
    type Item = Result<UserCommand, UserCommandsLagged>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.get_mut().commands).poll_next(context) {
            Poll::Ready(Some(Ok(command))) => Poll::Ready(Some(Ok(command))),
            Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(missed)))) => {
                Poll::Ready(Some(Err(UserCommandsLagged { missed })))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_receiver_gets_each_command_in_order_and_a_slow_one_is_told_it_lagged() {
        let fanout = UserCommandFanout::default();
        let mut first = fanout.receiver();
        let mut slow = fanout.receiver();
        let command = |n: usize| UserCommand::Unsubscribe {
            user: "ann".to_owned(),
            channel: resync_protocol::Channel::new(format!("c{n}")).expect("a channel"),
        };
        for n in 0..USER_COMMAND_QUEUE + 3 {
            assert!(fanout.send(command(n)));
            assert_eq!(first.recv().await, Some(Ok(command(n))));
        }
        assert_eq!(
            slow.recv().await,
            Some(Err(UserCommandsLagged { missed: 3 }))
        );
        assert_eq!(slow.recv().await, Some(Ok(command(3))));
        drop(fanout);
        assert_eq!(first.recv().await, None);
    }
}
