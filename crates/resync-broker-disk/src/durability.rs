//! When a publish is on the disk: the durability policies and the group commit of `always`.
//!
//! Every publish is written to the operating system's buffers before it is acknowledged, so
//! a killed process loses nothing; what the policy decides is when those buffers are synced
//! to the disk, which only a power cut or an operating-system crash can tell apart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use resync_broker::{EncodedEvent, Error};
use tokio::sync::{Notify, oneshot};

/// When publishes are synced to the disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// Acknowledged only once synced: concurrent publishes share one sync (group commit), so
    /// the cost is one `fdatasync` per batch, not per publish. Nothing acknowledged is lost,
    /// even by a power cut.
    Always,
    /// Synced every `interval` (like Redis's `appendfsync everysec`): a power cut may lose
    /// what was acknowledged in the last interval, and then every client behind the lost
    /// tail gets a reset, never a silent gap.
    Periodic(Duration),
    /// Never synced by resync (the operating system writes back when it likes).
    Never,
    /// [`Periodic`](Self::Periodic) every second.
    #[default]
    EverySecond,
}

impl Durability {
    /// Whether a publish may be acknowledged before it is on the disk.
    pub(crate) fn acknowledges_unsynced(self) -> bool {
        !matches!(self, Self::Always)
    }

    /// How often the store is synced in the background, if it is.
    pub(crate) fn interval(self) -> Option<Duration> {
        match self {
            Self::Periodic(interval) => Some(interval),
            Self::EverySecond => Some(Duration::from_secs(1)),
            Self::Always | Self::Never => None,
        }
    }
}

/// A committed publish waiting for the next sync before it is shown: to the channel's
/// history in memory, to its subscribers, to its publisher.
pub(crate) struct Waiting {
    pub(crate) event: EncodedEvent,
    pub(crate) size: usize,
    /// Shows the event once synced; called in commit order, which is seq order per channel.
    pub(crate) show: Box<dyn FnOnce(EncodedEvent, usize) + Send>,
    pub(crate) acknowledge: oneshot::Sender<Result<(), Error>>,
}

/// Group commit: publishes queue here after their write; one task syncs, then shows and
/// acknowledges everything that was queued before the sync began.
#[derive(Default)]
pub(crate) struct GroupCommit {
    queue: Mutex<Queue>,
    queued: Notify,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// Set by `stop`: the task drains what is queued and ends; later publishes sync
    /// themselves.
    stopped: bool,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GroupCommit")
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Queues a committed publish (called under its channel's lock, so a channel's publishes
    /// queue in seq order). The queue holds at most one entry per publish in flight. Once
    /// stopped, the publish is handed back: its caller syncs and shows it itself.
    pub(crate) fn queue(&self, waiting: Waiting) -> Option<Waiting> {
        let mut queue = lock(&self.queue);
        if queue.stopped {
            return Some(waiting);
        }
        queue.waiting.push(waiting);
        drop(queue);
        self.queued.notify_one();
        None
    }

    /// Makes the task drain what is queued and end.
    pub(crate) fn stop(&self) {
        lock(&self.queue).stopped = true;
        // A permit is stored if the task is not waiting now: it cannot miss it.
        self.queued.notify_one();
    }

    /// Syncs with `sync` and shows what was queued, batch after batch, until stopped.
    pub(crate) async fn run<S>(self: Arc<Self>, sync: S)
    where
        S: Fn() -> Result<(), Error> + Clone + Send + 'static,
    {
        loop {
            self.queued.notified().await;
            loop {
                let (batch, stopped) = {
                    let mut queue = lock(&self.queue);
                    (std::mem::take(&mut queue.waiting), queue.stopped)
                };
                if batch.is_empty() {
                    if stopped {
                        return;
                    }
                    break;
                }
                let sync = sync.clone();
                let synced = tokio::task::spawn_blocking(sync)
                    .await
                    .unwrap_or_else(|error| Err(Error::Unavailable(error.to_string())));
                for waiting in batch {
                    settle(waiting, &synced);
                }
            }
        }
    }
}

/// Shows and acknowledges a queued publish once its sync is done, or reports the sync's
/// failure to its publisher.
fn settle(waiting: Waiting, synced: &Result<(), Error>) {
    let answer = match synced {
        Ok(()) => {
            (waiting.show)(waiting.event, waiting.size);
            Ok(())
        }
        Err(error) => Err(Error::Unavailable(format!(
            "the store could not sync to the disk: {error}"
        ))),
    };
    // A publisher that went away needs no answer.
    let _ = waiting.acknowledge.send(answer);
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
