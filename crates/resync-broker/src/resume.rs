//! The resume algorithm: one gap-free, duplicate-free stream per channel, for every transport.
//!
//! Given a channel and an optional position, [`resume`] yields the events the client missed
//! and then the live ones, or a reset when that is impossible. It is written once here, on
//! top of the [`Broker`] trait, so the WebSocket, SSE and long-polling transports (and every
//! broker) share one implementation of the part that is easiest to get subtly wrong:
//!
//! 1. Subscribe to live events *first*, so nothing published from now on can be missed.
//! 2. Read history since the client's position; those events are delivered first.
//! 3. Deliver live events, dropping any whose seq was already delivered (an event published
//!    between steps 1 and 2 arrives both ways).
//! 4. If a live event skips ahead (seq > last + 1: a broker dropped a message, or history was
//!    read with a limit), fill the gap from history before delivering it. Never skip.
//! 5. If a live event carries another epoch, the channel's history restarted: report a reset
//!    and follow the new epoch.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_core::Stream;
use resync_log::ReadOutcome;
use resync_protocol::{Channel, Position, RecoveryOutcome, ResetReason};

use crate::broker::Broker;
use crate::error::Error;
use crate::event::EncodedEvent;
use crate::hub::{Live, LiveError, LiveSubscription};

/// How [`resume`] behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumeOptions {
    /// The most events replayed at once; a client further behind gets a reset with reason
    /// `too_far_behind` and refetches. Defaults to 10,000, the default history size, so any
    /// position still in default history can be replayed.
    pub max_replay: usize,
    /// The channel is keyed: a client the history no longer reaches (or one that asks with
    /// `state`) catches up from the channel's state instead of a `truncated` or
    /// `too_far_behind` reset ([`SubscriptionItem::State`]). Needs a broker with
    /// [`KeyedState`](crate::KeyedState). Default false.
    pub keyed: bool,
    /// On a keyed channel, start from the state whatever `since` says. Default false.
    pub state: bool,
}

impl Default for ResumeOptions {
    fn default() -> Self {
        Self {
            max_replay: 10_000,
            keyed: false,
            state: false,
        }
    }
}

/// Entries of a keyed channel's state read (and delivered) at once.
pub const STATE_PAGE: usize = 256;

/// An item of a resumed channel stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscriptionItem {
    /// The next event, in seq order.
    Event(EncodedEvent),
    /// A page of a keyed channel's state (after a [`RecoveryOutcome::State`] recovery): the
    /// pages come first, the last without `more`, then the events after `position`.
    State {
        /// Entries in key order.
        entries: Vec<resync_protocol::StateEntry>,
        /// Where the events after the state start.
        position: Position,
        /// More pages follow.
        more: bool,
    },
    /// The channel's history broke mid-stream (e.g. the broker lost its data): the client
    /// must refetch its state; events after `position` follow.
    Reset {
        /// Why.
        reason: ResetReason,
        /// Where the stream continues from.
        position: Position,
    },
}

/// Why a resumed stream ended.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// The subscriber did not keep up and was cut off. It has lost nothing: it resumes from
    /// its position (which the transport tells the client) on a new connection. Only from a
    /// live subscription that reports [`LiveError::Lagged`]; the [`Hub`](crate::Hub) catches
    /// an overflowing subscriber up from history instead.
    #[error("subscriber lagged behind at {position}")]
    Lagged {
        /// The position of the last event delivered.
        position: Position,
    },
    /// The broker ended the subscription (shutdown).
    #[error("subscription closed by the broker")]
    Closed,
    /// The broker failed while filling a gap.
    #[error(transparent)]
    Broker(#[from] Error),
}

/// A resumed channel stream: missed events, then live ones, with no gap and no duplicate.
///
/// Also a [`Stream`] of items that ends after the first error. It holds no future of its own
/// while it waits for live events, so an idle subscription costs only its fields; a history
/// read in flight (a gap repair) is kept inside it, so dropping a `next()` future loses
/// nothing.
pub struct Subscription {
    broker: Arc<dyn Broker>,
    channel: Channel,
    live: LiveSubscription,
    pending: VecDeque<EncodedEvent>,
    /// A reset to report before anything in `pending`.
    pending_reset: Option<(ResetReason, Position)>,
    position: Position,
    options: ResumeOptions,
    /// The broker call in flight, if a live event or a resync needs one.
    repair: Option<Repair>,
    /// History to read, page by page, before live events: up to this position.
    replay_to: Option<Position>,
    /// A keyed channel's state being delivered, page by page, before anything else.
    state: Option<StateRead>,
    /// An error was reported: the stream is over.
    ended: bool,
}

/// Events read from history at once. A replay of thousands of events is read a page at a
/// time, as the client takes them, so a resuming client costs at most a page of events in
/// memory (on Redis, a page fetched and decoded), not its whole replay.
pub const REPLAY_PAGE: usize = 256;

/// How many events lie between `from` and `latest` of one epoch.
fn missed(from: &Position, latest: &Position) -> u64 {
    latest.seq.get().saturating_sub(from.seq.get())
}

/// Where paging must go on after a page that ended at `last_read`, if anywhere.
fn more_to_read(last_read: Option<&EncodedEvent>, latest: &Position) -> Option<Position> {
    let last = last_read?.position();
    (last.epoch == latest.epoch && last.seq < latest.seq).then(|| latest.clone())
}

/// The read of the next page of a keyed channel's state.
type PageRead = Pin<Box<dyn Future<Output = Result<crate::StatePage, Error>> + Send>>;

/// A keyed channel's state on its way to the client: the page to deliver, or the read of the
/// next one.
struct StateRead {
    /// Where the events after the state start.
    position: Position,
    /// The last key delivered, while more pages follow.
    after: Option<resync_protocol::Key>,
    /// Where the events after the state start, when before its position (the client's own).
    replay_from: Option<Position>,
    page: Option<crate::StatePage>,
    call: Option<PageRead>,
}

/// A broker call that must finish before the next live event can be judged, and the live
/// event that waits for it (none for a resync).
struct Repair {
    event: Option<EncodedEvent>,
    call: Pin<Box<dyn Future<Output = Result<Answer, Error>> + Send>>,
}

/// What a repair asked the broker.
enum Answer {
    /// The channel's current position: an event carried another epoch, and this tells
    /// whether history restarted or the event is stale.
    Current(Position),
    /// History after the current position: to fill a gap before the event, or to pick up
    /// what the broker may have missed live.
    History(ReadOutcome<EncodedEvent>),
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Subscription")
            .field("channel", &self.channel)
            .field("position", &self.position)
            .field("pending", &self.pending.len())
            .finish()
    }
}

/// Follows `channel` from `since` (or from now, when `since` is `None`).
///
/// Returns how the subscription starts and the stream. For
/// [`RecoveryOutcome::Replayed { count }`](RecoveryOutcome::Replayed), the stream's first
/// `count` items are the replayed events.
pub async fn resume(
    broker: Arc<dyn Broker>,
    channel: Channel,
    since: Option<Position>,
    options: ResumeOptions,
) -> Result<(RecoveryOutcome, Subscription), Error> {
    let live = broker.subscribe(&channel).await?;
    let mut pending = VecDeque::new();
    let mut replay_to = None;
    let keyed = if options.keyed {
        broker.keyed_state()
    } else {
        None
    };
    if let Some(keyed) = keyed
        && options.state
    {
        let (outcome, mut state) = state_from(keyed, &channel).await?;
        // A client with a position the history still reaches (another subscription of the
        // channel on its connection) gets the events after it, not only after the state's:
        // the state's reader drops those it has, the others miss nothing.
        if let Some(since) = &since
            && since.epoch == state.position.epoch
            && since.seq < state.position.seq
            && reaches(&*broker, &channel, since, &options).await?
        {
            state.replay_from = Some(since.clone());
        }
        return Ok((
            outcome,
            Subscription::new(broker, channel, live, state, options, since),
        ));
    }
    let (outcome, position) = match since {
        // A keyed channel the client cannot catch up on from history: the latest event of
        // each key instead of a reset (an epoch that moved stays a reset: the client's
        // state is of another history).
        Some(since)
            if keyed.is_some() && !reaches(&*broker, &channel, &since, &options).await? =>
        {
            let Some(keyed) = keyed else {
                return Err(Error::Unsupported("keyed channels"));
            };
            let (outcome, state) = state_from(keyed, &channel).await?;
            return Ok((
                outcome,
                Subscription::new(broker, channel, live, state, options, Some(since)),
            ));
        }
        None => {
            let position = broker.position(&channel).await?;
            (
                RecoveryOutcome::Fresh {
                    position: position.clone(),
                },
                position,
            )
        }
        Some(since) => {
            // The first page; how far behind the client is comes from `latest`, not from
            // reading everything it missed.
            match broker.read_since(&channel, &since, REPLAY_PAGE).await? {
                ReadOutcome::Replayed { latest, .. }
                    if missed(&since, &latest) > options.max_replay as u64 =>
                {
                    (
                        RecoveryOutcome::Reset {
                            reason: ResetReason::TooFarBehind,
                            position: latest.clone(),
                        },
                        latest,
                    )
                }
                ReadOutcome::Replayed { events, latest } => {
                    replay_to = more_to_read(events.last(), &latest);
                    pending.extend(events);
                    (
                        RecoveryOutcome::Replayed {
                            count: missed(&since, &latest),
                        },
                        since,
                    )
                }
                ReadOutcome::UpToDate { .. } => (RecoveryOutcome::UpToDate, since),
                ReadOutcome::Reset { reason, latest } => (
                    RecoveryOutcome::Reset {
                        reason,
                        position: latest.clone(),
                    },
                    latest,
                ),
            }
        }
    };
    let subscription = Subscription {
        broker,
        channel,
        live,
        pending,
        pending_reset: None,
        position,
        options,
        repair: None,
        replay_to,
        state: None,
        ended: false,
    };
    Ok((outcome, subscription))
}

/// Goes on delivering a keyed channel's state that an earlier connection was given part of
/// (long polling: each reply is bounded): the pages after `after`, standing for `position`,
/// then the events after `position`. Until the last page is delivered the subscription
/// stands at `before`, where the client stood when the state began.
pub async fn resume_state(
    broker: Arc<dyn Broker>,
    channel: Channel,
    before: Option<Position>,
    position: Position,
    after: resync_protocol::Key,
    options: ResumeOptions,
) -> Result<Subscription, Error> {
    let live = broker.subscribe(&channel).await?;
    let keyed = broker
        .keyed_state()
        .ok_or(Error::Unsupported("keyed channels"))?;
    let page = keyed.state_page(&channel, Some(&after), STATE_PAGE).await?;
    let state = StateRead {
        position,
        after: Some(after),
        replay_from: None,
        page: Some(page),
        call: None,
    };
    Ok(Subscription::new(
        broker, channel, live, state, options, before,
    ))
}

/// Whether the history still reaches `since` within the replay limit, or the epoch moved
/// (then a reset is the answer, not the state).
async fn reaches(
    broker: &dyn Broker,
    channel: &Channel,
    since: &Position,
    options: &ResumeOptions,
) -> Result<bool, Error> {
    Ok(match broker.read_since(channel, since, 1).await? {
        ReadOutcome::Replayed { latest, .. } => missed(since, &latest) <= options.max_replay as u64,
        ReadOutcome::Reset {
            reason: ResetReason::Truncated | ResetReason::TooFarBehind,
            ..
        } => false,
        _ => true,
    })
}

/// Reads the first page of a keyed channel's state: the recovery it makes, and the read to
/// deliver.
async fn state_from(
    keyed: &dyn crate::KeyedState,
    channel: &Channel,
) -> Result<(RecoveryOutcome, StateRead), Error> {
    let page = keyed.state_page(channel, None, STATE_PAGE).await?;
    let position = page.position.clone();
    Ok((
        RecoveryOutcome::State {
            position: position.clone(),
        },
        StateRead {
            position,
            after: None,
            replay_from: None,
            page: Some(page),
            call: None,
        },
    ))
}

impl Subscription {
    /// A subscription that delivers `state` first, then the events after its position. Until
    /// the last page is delivered it stands where the client stood (`before`; the start of
    /// the state's epoch without one), so a client cut off halfway asks for the state again.
    fn new(
        broker: Arc<dyn Broker>,
        channel: Channel,
        live: LiveSubscription,
        state: StateRead,
        options: ResumeOptions,
        before: Option<Position>,
    ) -> Self {
        let position = before.unwrap_or_else(|| Position::start_of(state.position.epoch.clone()));
        Subscription {
            broker,
            channel,
            live,
            pending: VecDeque::new(),
            pending_reset: None,
            position,
            options,
            repair: None,
            replay_to: None,
            state: Some(state),
            ended: false,
        }
    }

    /// The next page of the state being delivered, or `None` once it is all delivered
    /// (then the events after its position are read). Pending while a page is read.
    fn poll_state(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<SubscriptionItem, Error>>> {
        let Some(state) = &mut self.state else {
            return Poll::Ready(None);
        };
        if let Some(call) = &mut state.call {
            let page = ready!(call.as_mut().poll(context));
            state.call = None;
            match page {
                Ok(page) => state.page = Some(page),
                Err(error) => return Poll::Ready(Some(Err(error))),
            }
        }
        let Some(page) = state.page.take() else {
            return Poll::Ready(None);
        };
        let at = state.position.clone();
        let more = page.next.is_some();
        if let Some(after) = page.next {
            state.after = Some(after.clone());
            let (broker, channel) = (self.broker.clone(), self.channel.clone());
            state.call = Some(Box::pin(async move {
                let keyed = broker
                    .keyed_state()
                    .ok_or(Error::Unsupported("keyed channels"))?;
                keyed.state_page(&channel, Some(&after), STATE_PAGE).await
            }));
        } else {
            // Delivered whole: the client stands at the state's position, and the events
            // after it are read before any live one.
            self.position = state.replay_from.take().unwrap_or_else(|| at.clone());
            self.state = None;
            self.read_history(None);
        }
        Poll::Ready(Some(Ok(SubscriptionItem::State {
            entries: page.entries,
            position: at,
            more,
        })))
    }
}

impl Subscription {
    /// The channel followed.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The position of the last item delivered: the client's cursor for this channel.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// Whether a keyed channel's state is being delivered: until its last page the client
    /// has no position to resume from (a cursor leaves the channel out, and the client asks
    /// for the state again).
    pub fn delivering_state(&self) -> bool {
        self.state.is_some()
    }

    /// While a keyed channel's state is part delivered: the position it stands for and the
    /// last key delivered, for [`resume_state`] on the client's next connection.
    pub fn state_progress(&self) -> Option<(&Position, &resync_protocol::Key)> {
        let state = self.state.as_ref()?;
        Some((&state.position, state.after.as_ref()?))
    }

    /// The next item, waiting for one if none is ready; `Err` ends the stream (and after it,
    /// every call reports [`SubscriptionError::Closed`]).
    pub async fn next(&mut self) -> Result<SubscriptionItem, SubscriptionError> {
        std::future::poll_fn(|context| self.poll_item(context, true))
            .await
            .unwrap_or(Err(SubscriptionError::Closed))
    }

    /// The next item if one is ready now, without waiting for the network. A gap repair may
    /// still await the broker.
    pub async fn try_next(&mut self) -> Option<Result<SubscriptionItem, SubscriptionError>> {
        std::future::poll_fn(|context| self.poll_item(context, false)).await
    }

    /// The stream's state machine. With `wait_live` false, an empty live queue ends the poll
    /// with `None` instead of waiting.
    fn poll_item(
        &mut self,
        context: &mut Context<'_>,
        wait_live: bool,
    ) -> Poll<Option<Result<SubscriptionItem, SubscriptionError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.state.is_some() {
            match ready!(self.poll_state(context)) {
                Some(Ok(item)) => return Poll::Ready(Some(Ok(item))),
                Some(Err(error)) => return self.end(SubscriptionError::Broker(error)),
                None => {}
            }
        }
        loop {
            if let Some(item) = self.take_pending() {
                return Poll::Ready(Some(Ok(item)));
            }
            if let Some(repair) = &mut self.repair {
                let answer = ready!(repair.call.as_mut().poll(context));
                let event = self.repair.take().and_then(|repair| repair.event);
                match answer {
                    Ok(Answer::Current(current)) => self.apply_epoch(event, current),
                    Ok(Answer::History(outcome)) => self.apply_history(event, outcome),
                    Err(error) => return self.end(SubscriptionError::Broker(error)),
                }
                continue;
            }
            if let Some(target) = self.replay_to.take()
                && target.epoch == self.position.epoch
                && target.seq > self.position.seq
            {
                // The next page of a replay, before any live event.
                self.read_history(None);
                self.replay_to = Some(target);
                continue;
            }
            let live = if wait_live {
                ready!(self.live.poll_recv(context))
            } else {
                match self.live.try_recv() {
                    Some(live) => live,
                    None => return Poll::Ready(None),
                }
            };
            match live {
                Ok(Live::Event(event)) => {
                    if let Some(event) = self.accept_live(event) {
                        return Poll::Ready(Some(Ok(SubscriptionItem::Event(event))));
                    }
                }
                Ok(Live::Resync) => self.read_history(None),
                Err(LiveError::Lagged) => {
                    let position = self.position.clone();
                    return self.end(SubscriptionError::Lagged { position });
                }
                Err(LiveError::Closed) => return self.end(SubscriptionError::Closed),
            }
        }
    }

    fn end(
        &mut self,
        error: SubscriptionError,
    ) -> Poll<Option<Result<SubscriptionItem, SubscriptionError>>> {
        self.ended = true;
        self.repair = None;
        Poll::Ready(Some(Err(error)))
    }

    fn take_pending(&mut self) -> Option<SubscriptionItem> {
        if let Some((reason, position)) = self.pending_reset.take() {
            self.position = position.clone();
            return Some(SubscriptionItem::Reset { reason, position });
        }
        while let Some(event) = self.pending.pop_front() {
            let position = event.position();
            if position.epoch == self.position.epoch && position.seq > self.position.seq {
                // Same epoch: only the seq moves (no reference-count traffic per event).
                self.position.seq = position.seq;
                return Some(SubscriptionItem::Event(event));
            }
        }
        None
    }

    /// Files a live event: the very next one comes back to be delivered at once, a duplicate
    /// is dropped, and a gap or a new epoch starts a repair. Called only when nothing is
    /// pending (the stream delivers pending items before it reads live ones), so the next
    /// event needs no queue.
    fn accept_live(&mut self, event: EncodedEvent) -> Option<EncodedEvent> {
        let position = event.position();
        if position.epoch != self.position.epoch {
            // Either the channel restarted in a new epoch, or this is a stale event from before
            // a reset we already followed. The broker's current position tells which.
            let (broker, channel) = (self.broker.clone(), self.channel.clone());
            self.repair = Some(Repair {
                event: Some(event),
                call: Box::pin(async move { broker.position(&channel).await.map(Answer::Current) }),
            });
            return None;
        }
        if position.seq <= self.position.seq {
            return None;
        }
        if Some(position.seq) == self.position.seq.next() {
            // Same epoch: only the seq moves (no reference-count traffic per event).
            self.position.seq = position.seq;
            return Some(event);
        }
        self.read_history(Some(event));
        None
    }

    fn apply_epoch(&mut self, event: Option<EncodedEvent>, current: Position) {
        let Some(event) = event else { return };
        let epoch = event.position().epoch.clone();
        if current.epoch != epoch {
            return;
        }
        self.pending_reset = Some((ResetReason::EpochChanged, Position::start_of(epoch.clone())));
        self.position = Position::start_of(epoch);
        self.read_history(Some(event));
    }

    /// Starts reading history after the current position: to fill the gap before `event`, or
    /// (without one) to pick up whatever the broker may have missed live.
    fn read_history(&mut self, event: Option<EncodedEvent>) {
        let limit = REPLAY_PAGE;
        let (broker, channel, from) = (
            self.broker.clone(),
            self.channel.clone(),
            self.position.clone(),
        );
        let call = Box::pin(async move {
            broker
                .read_since(&channel, &from, limit)
                .await
                .map(Answer::History)
        });
        self.repair = Some(Repair { event, call });
    }

    /// Queues what history returned (and then `event`, unless history already held it), or
    /// a reset when history cannot fill the gap.
    fn apply_history(&mut self, event: Option<EncodedEvent>, outcome: ReadOutcome<EncodedEvent>) {
        match outcome {
            ReadOutcome::Replayed { latest, .. }
                if missed(&self.position, &latest) > self.options.max_replay as u64 =>
            {
                self.queue_reset(ResetReason::TooFarBehind, latest);
            }
            ReadOutcome::Replayed { events, latest } => {
                let last_filled = events.last().map(|last| last.position().seq);
                // A page short of `latest`: the rest is read when this page is taken (the
                // live event, if any, is then in history too).
                let more = more_to_read(events.last(), &latest);
                self.pending.extend(events);
                if let Some(event) = event {
                    // The event itself follows if history did not already include it.
                    if more.is_none()
                        && last_filled.and_then(|seq| seq.next()) == Some(event.position().seq)
                    {
                        self.pending.push_back(event);
                    }
                }
                if more.is_some() {
                    self.replay_to = more;
                }
            }
            ReadOutcome::UpToDate { latest } => {
                if event.is_some() {
                    // History says nothing came after our position, yet a later event
                    // arrived: the broker is inconsistent. Tell the client rather than guess.
                    self.queue_reset(ResetReason::Truncated, latest);
                }
            }
            ReadOutcome::Reset { reason, latest } => self.queue_reset(reason, latest),
        }
    }

    fn queue_reset(&mut self, reason: ResetReason, latest: Position) {
        self.pending.clear();
        self.replay_to = None;
        // A reset already queued (epoch change) is replaced: the client refetches once.
        self.pending_reset = Some((reason, latest));
    }
}

impl Stream for Subscription {
    type Item = Result<SubscriptionItem, SubscriptionError>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_item(context, true)
    }
}
