//! The session: what a connection is, whatever carries it.
//!
//! A session owns a connection's channels (its [`ChannelSet`]), its presence memberships and
//! join/leave watches, its user's commands, its token's expiry (and a refresh in place), its
//! place under the connection limits, the shutdown notice and its client's departure. It
//! decides what each of these means for the client once, as a [`SessionEvent`]; SSE, WebSocket
//! and long polling (`transport/`) only encode those events onto their
//! wire and read their client's requests (issue 29: the three had each decided for themselves,
//! and drifted).
//!
//! Invariants, each held by a test that runs it on every transport
//! (`tests/tests/one_session.rs`, one row per behaviour):
//! - A user command means the same everywhere: an unsubscribe ends the channel, gives its
//!   place back to the budgets and leaves its presence; a disconnect ends the session and says
//!   whether to come back; a user told not to come back who comes back within
//!   [`users::RECENT`](crate::users) is told again at the opening.
//! - A session ends at its token's `exp` (and a refresh moves the end), at a random moment
//!   within the shutdown spread once the server drains (events flow until then), when its
//!   reader lags past its queue, or when its broker fails; never silently.
//! - A broker outage leaves a session in place: its channels resume where they stood once the
//!   broker is back, with no reset; a client that opens meanwhile is told to come back.
//! - A watcher that missed joins and leaves (its watch fell behind) is sent the whole member
//!   list, never left with a partial one.
//! - Whatever a session holds (channels, budgets, memberships, watches) is given back when it
//!   ends, however it ends: [`Session::finish`] leaves at once, and a dropped session leaves on
//!   a task of its own.
//!
//! [`Session::wake`] is cancel-safe, so a transport that also reads its client (WebSocket)
//! races it with the next client frame; [`Session::understand`] then runs to completion.

use std::pin::Pin;
use std::sync::Arc;

use resync_broker::{
    Broker, Presence, PresenceEvent, PresenceLagged, PresenceWatch, Publish, SubscriptionError,
    SubscriptionItem,
};
use resync_protocol::bodies::UserCommand;
use resync_protocol::{
    Channel, IdempotencyKey, Member, Payload, Position, PresenceRequest, RecoveryOutcome,
    ServerFrame,
};
use tokio::sync::watch;
use tokio_stream::StreamExt;

use crate::Shared;
use crate::admission::{AdmissionGuard, TokenBucket};
use crate::auth::Identity;
use crate::channel_set::ChannelSet;
use crate::error::ApiError;
use crate::membership;
use crate::metrics::Transport;
use crate::permissions::{self, Action};
use crate::probe::Departure;
use crate::proxy::{Narrowing, ProxyRequest};
use crate::request::refusal;
use crate::users::UserInbox;

/// What the session has to tell its client, for the transport to encode.
pub(crate) enum SessionEvent {
    /// An event or a reset of a followed channel (the hot path: encoded by the transport as
    /// it comes, then [`Session::next_ready`] for the rest of a burst).
    Item(Channel, SubscriptionItem),
    /// Presence frames for a watcher: a join, a leave, or the whole list after a lag.
    Presence(Vec<ServerFrame>),
    /// The watcher missed joins and leaves and the list could not be read either: it must
    /// ask for the list again.
    PresenceLagged { channel: Channel, message: String },
    /// The application ended the user's subscription of `channel` (a user command); the
    /// session has let go of it already.
    Unsubscribed(Channel),
    /// A heartbeat is due.
    Tick,
    /// The session is over; say why, and whether to come back.
    End(SessionEnd),
}

/// Where a subscription starts: after `since` (from now without it), or, on a keyed channel
/// with `state`, from the channel's state.
#[derive(Clone, Debug, Default)]
pub(crate) struct Start {
    pub(crate) since: Option<Position>,
    pub(crate) state: bool,
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SessionEnd {
    /// The server is draining (or its broker closed the subscriptions): come back soon and
    /// resume.
    Shutdown,
    /// The client read slower than its events came, past its queue: come back and resume.
    SlowConsumer,
    /// A subscription failed at the broker: come back with backoff and resume.
    BrokerFailed,
    /// The application disconnected the user.
    Disconnected { reason: String, reconnect: bool },
    /// The token expired: come back with a new one.
    Expired,
    /// The client went away: there is nobody to tell.
    Departed,
}

/// What woke a session: [`Session::wake`]'s answer, for [`Session::understand`].
pub(crate) enum Wake {
    Item(Option<(Channel, Result<SubscriptionItem, SubscriptionError>)>),
    Presence(Channel, Result<PresenceEvent, PresenceLagged>),
    Command(UserCommand),
    Clock,
    Leave,
    Expired,
    Departed,
}

/// The commands a user was sent in the last minute and a half that still apply to a new
/// connection of theirs: a disconnect that said not to come back, and unsubscribes.
#[derive(Default)]
pub(crate) struct Remembered {
    pub(crate) stay_away: Option<String>,
    pub(crate) unsubscribed: Vec<Channel>,
}

impl Remembered {
    /// What `identity`'s user was told recently (nothing for an anonymous client).
    pub(crate) fn of(shared: &Shared, identity: &Identity) -> Self {
        let mut remembered = Remembered::default();
        let Some(user) = identity.subject.as_deref() else {
            return remembered;
        };
        shared.users.start(&shared.broker);
        for command in shared.users.recent(user) {
            match command {
                UserCommand::Disconnect {
                    reason,
                    reconnect: false,
                    ..
                } => remembered.stay_away = Some(reason),
                // "Drop the connection now" applies to the connection of that moment only.
                UserCommand::Disconnect { .. } => {}
                UserCommand::Unsubscribe { channel, .. } => {
                    if !remembered.unsubscribed.contains(&channel) {
                        remembered.unsubscribed.push(channel);
                    }
                }
            }
        }
        remembered
    }
}

/// Applies what `admitted`'s user was told recently to a request that names its channels
/// (SSE, long polling): the channels it was unsubscribed from are dropped (and given back
/// to the budgets). Returns what was remembered: the caller tells the client, and ends at
/// once on `stay_away`.
pub(crate) fn apply_remembered(
    shared: &Shared,
    admitted: &mut crate::request::Admitted,
) -> Remembered {
    let mut remembered = Remembered::of(shared, &admitted.identity);
    let channels = &mut admitted.query.channels;
    remembered.unsubscribed.retain(|channel| {
        let held = channels.contains(channel);
        if held {
            channels.retain(|kept| kept != channel);
            admitted.guard.unsubscribe(1);
        }
        held
    });
    remembered
}

/// Checks a request's presence options for each of its channels, before anything is
/// opened (a refusal then leaves nothing behind).
pub(crate) fn check_presence(
    shared: &Shared,
    identity: &Identity,
    channels: &[Channel],
    request: Option<&PresenceRequest>,
    join_leave: bool,
) -> Result<(), ApiError> {
    for channel in channels {
        membership::check(shared, identity, channel, request, join_leave)?;
    }
    Ok(())
}

/// One connection, whatever carries it.
pub(crate) struct Session {
    shared: Arc<Shared>,
    /// Who the session acts as: all of it on a WebSocket, only the subject on a stream or a
    /// poll (see [`new`](Self::new)), nothing for an anonymous one of those.
    who: Option<Box<Who>>,
    /// The connection's place under the limits, with the channels and presence it holds.
    admitted: AdmissionGuard,
    channels: ChannelSet,
    /// Memberships and join/leave watches; allocated on first use, so a session without
    /// presence pays one pointer for it.
    presence: Option<Box<SessionPresence>>,
    /// The user commands for this session's user; `None` when anonymous.
    user_commands: Option<Box<UserInbox>>,
    /// Its token's expiry and the shutdown's moment; boxed, and only once one can happen:
    /// most idle sessions hold none.
    timers: Option<Box<Timers>>,
    /// Completes when the client goes away, for transports that cannot see it otherwise.
    departure: Option<Pin<Box<dyn Future<Output = ()>>>>,
    /// The transport's heartbeat clock, which the shutdown wakes too.
    clock: watch::Receiver<u64>,
    client_id: ClientId,
    /// What carries the session, for its counters (its end is counted in its `Drop`).
    transport: Transport,
}

/// Who a session acts as, and (WebSocket) what a refresh in place must keep: the subject of
/// the token it opened with, before the application mapped it, and what the application's
/// proxy decided.
struct Who {
    identity: Identity,
    kept: Option<(Option<String>, Narrowing)>,
}

/// The timers that end a session: its token's expiry and the shutdown's moment (see
/// [`Session::timers`]).
#[derive(Default)]
struct Timers {
    /// The token's expiry.
    expiry: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Once the server drains: this session's moment to end, within the shutdown spread.
    leaving: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Timers {
    /// Which timer fired, if one did.
    fn poll(&mut self, context: &mut std::task::Context<'_>) -> std::task::Poll<Wake> {
        use std::task::Poll;
        if let Some(leaving) = self.leaving.as_mut()
            && leaving.as_mut().poll(context).is_ready()
        {
            return Poll::Ready(Wake::Leave);
        }
        if let Some(expiry) = self.expiry.as_mut()
            && expiry.as_mut().poll(context).is_ready()
        {
            return Poll::Ready(Wake::Expired);
        }
        Poll::Pending
    }
}

/// A session's part in presence.
#[derive(Default)]
struct SessionPresence {
    /// Channels where the session makes its identity a member, and what each membership
    /// holds of the presence budget.
    memberships: Vec<(Channel, usize)>,
    /// Join/leave events of channels followed with `join_leave`.
    watches: tokio_stream::StreamMap<Channel, PresenceWatch>,
}

impl SessionPresence {
    /// Forgets the membership of `channel`; what it held of the budget, if it was one.
    fn forget_membership(&mut self, channel: &Channel) -> Option<usize> {
        let index = self
            .memberships
            .iter()
            .position(|(member_of, _)| member_of == channel)?;
        Some(self.memberships.swap_remove(index).1)
    }
}

/// The id a session's connection goes by: in logs, as the presence connection, and as an
/// anonymous member's id. A number until it is shown, so an idle session holds no string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClientId(u64);

impl std::fmt::Display for ClientId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{:016x}", self.0)
    }
}

/// A refresh put in force: when the session now ends, and the channels the new token no
/// longer allows (ended already).
pub(crate) struct Refreshed {
    pub(crate) expires_at: Option<std::time::SystemTime>,
    pub(crate) revoked: Vec<Channel>,
}

impl Session {
    /// A session for `identity`, admitted under the limits, following `channels`; its clock
    /// is `transport`'s heartbeat. `departure` tells when the client leaves, for transports
    /// that learn it from the socket rather than from their client's frames.
    pub(crate) fn new(
        shared: Arc<Shared>,
        identity: Identity,
        admitted: AdmissionGuard,
        transport: Transport,
        channels: ChannelSet,
        departure: Departure,
    ) -> Self {
        let clock = match transport {
            Transport::WebSocket => shared.clock(&shared.ws_ping),
            Transport::Sse | Transport::Poll => shared.clock(&shared.sse_heartbeat),
        };
        // A user's sessions hear the user commands sent from any instance.
        let user_commands = identity
            .subject
            .as_deref()
            .map(|user| Box::new(shared.users.register(&shared.broker, user)));
        let departure: Option<Pin<Box<dyn Future<Output = ()>>>> = if departure.is_known() {
            Some(Box::pin(async move { departure.wait().await }))
        } else {
            None
        };

        // The token's end is kept as a timer; a client that can ask for nothing more once
        // it is open (a stream, a poll) keeps of its identity only what names it, its
        // subject (for its presence), and an anonymous one nothing: an idle stream holds no
        // copy of the rules.
        let expiry: Option<Pin<Box<tokio::time::Sleep>>> = identity
            .remaining()
            .map(|remaining| Box::pin(tokio::time::sleep(remaining)));
        let timers = expiry.map(|expiry| {
            Box::new(Timers {
                expiry: Some(expiry),
                leaving: None,
            })
        });
        let who = match transport {
            Transport::WebSocket => Some(Box::new(Who {
                identity,
                kept: None,
            })),
            Transport::Sse | Transport::Poll => identity.subject.map(|subject| {
                Box::new(Who {
                    identity: Identity {
                        subject: Some(subject),
                        ..Identity::default()
                    },
                    kept: None,
                })
            }),
        };
        shared.metrics.connection_opened(transport);
        Self {
            transport,
            timers,
            departure,
            shared,
            who,
            admitted,
            channels,
            presence: None,
            user_commands,
            clock,
            client_id: ClientId(fastrand::u64(..)),
        }
    }

    pub(crate) fn identity(&self) -> &Identity {
        static ANONYMOUS: Identity = Identity {
            subject: None,
            expires_at: None,
            subscribe: Vec::new(),
            publish: Vec::new(),
            presence: None,
            appear: None,
            info: None,
        };
        self.who.as_deref().map_or(&ANONYMOUS, |who| &who.identity)
    }

    /// The id this session's connection goes by (in logs, and as an anonymous member's id).
    pub(crate) fn client_id(&self) -> ClientId {
        self.client_id
    }

    pub(crate) fn channels(&self) -> &ChannelSet {
        &self.channels
    }

    /// The rest of a burst, without waiting: the hot path's coalescing.
    pub(crate) fn next_ready(
        &mut self,
    ) -> Option<(Channel, Result<SubscriptionItem, SubscriptionError>)> {
        self.channels.next_ready()
    }

    /// Takes what every channel has ready now, replays included (see
    /// [`ChannelSet::take_ready`]).
    pub(crate) async fn take_ready(
        &mut self,
        add: impl FnMut(&Channel, SubscriptionItem) -> bool,
    ) -> Result<(), SubscriptionError> {
        self.channels.take_ready(add).await
    }

    fn follow_expiry(&mut self) {
        let expiry = self
            .identity()
            .remaining()
            .map(|remaining| Box::pin(tokio::time::sleep(remaining)));
        self.timers.get_or_insert_with(Box::default).expiry = expiry;
    }

    /// Waits for whatever happens next. Cancel-safe: every branch keeps its state in the
    /// session. Biased, items first: while events are ready, the clock branches are never
    /// polled, so a burst does not register and unregister every session with the shared
    /// clocks on each wake-up.
    pub(crate) async fn wake(&mut self) -> Wake {
        tokio::select! {
            biased;
            Some(item) = async { Some(self.channels.next().await) }, if !self.channels.is_empty() => {
                Wake::Item(item)
            }
            Some((channel, event)) = async {
                self.presence.as_mut()?.watches.next().await
            }, if self.presence.as_ref().is_some_and(|presence| !presence.watches.is_empty()) => {
                Wake::Presence(channel, event)
            }
            Some(command) = async {
                self.user_commands.as_mut()?.commands.recv().await
            }, if self.user_commands.is_some() => Wake::Command(command),
            _ = self.clock.changed() => Wake::Clock,
            // The timers polled in place: an idle session's future holds no state for them.
            wake = std::future::poll_fn(|context| match self.timers.as_mut() {
                Some(timers) => timers.poll(context),
                None => std::task::Poll::Pending,
            }), if self.timers.is_some() => wake,
            Some(()) = async { self.departure.as_mut()?.await; Some(()) }, if self.departure.is_some() => {
                Wake::Departed
            }
        }
    }

    /// What `wake` means for the client; `None` when nothing is to be told.
    pub(crate) async fn understand(&mut self, wake: Wake) -> Option<SessionEvent> {
        match wake {
            Wake::Item(Some((channel, Ok(item)))) => Some(SessionEvent::Item(channel, item)),
            Wake::Item(Some((channel, Err(error)))) => {
                Some(SessionEvent::End(self.item_failed(&channel, error)))
            }
            // Every subscription ended at the broker: as at its shutdown.
            Wake::Item(None) => Some(SessionEvent::End(SessionEnd::Shutdown)),
            Wake::Presence(channel, event) => Some(
                match membership::watcher_frames(&self.shared, channel, event).await {
                    Ok(frames) => SessionEvent::Presence(frames),
                    Err((channel, message)) => SessionEvent::PresenceLagged { channel, message },
                },
            ),
            Wake::Command(UserCommand::Disconnect {
                reason, reconnect, ..
            }) => Some(SessionEvent::End(SessionEnd::Disconnected {
                reason,
                reconnect,
            })),
            Wake::Command(UserCommand::Unsubscribe { channel, .. }) => self
                .unsubscribe(&channel)
                .await
                .then_some(SessionEvent::Unsubscribed(channel)),
            Wake::Clock
                if *self.shared.shutdown.borrow()
                    && self
                        .timers
                        .as_ref()
                        .is_none_or(|timers| timers.leaving.is_none()) =>
            {
                // Each session ends at a moment of its own within the spread, so the clients'
                // reconnects are spread too; events flow until then.
                let spread = self.shared.config.shutdown_spread;
                self.timers.get_or_insert_with(Box::default).leaving = Some(Box::pin(
                    tokio::time::sleep(spread.mul_f64(fastrand::f64())),
                ));
                None
            }
            Wake::Clock => Some(SessionEvent::Tick),
            Wake::Leave => Some(SessionEvent::End(SessionEnd::Shutdown)),
            Wake::Expired => Some(SessionEvent::End(SessionEnd::Expired)),
            Wake::Departed => Some(SessionEvent::End(SessionEnd::Departed)),
        }
    }

    /// What `wake` means when no waiting is needed to say it: an item (the hot path) or a
    /// heartbeat (the idle path); any other wake comes back, for [`understand`](Self::understand).
    pub(crate) fn understand_at_once(&mut self, wake: Wake) -> Result<SessionEvent, Wake> {
        match wake {
            Wake::Item(Some((channel, Ok(item)))) => Ok(SessionEvent::Item(channel, item)),
            Wake::Clock if !self.is_draining() => Ok(SessionEvent::Tick),
            other => Err(other),
        }
    }

    /// The next thing to tell the client (for a transport that does not read its client).
    pub(crate) async fn next(&mut self) -> SessionEvent {
        loop {
            let wake = self.wake().await;
            match self.understand_at_once(wake) {
                Ok(event) => return event,
                // Boxed: an idle stream's future is sized by what it waits in, not by the
                // rarely taken paths.
                Err(wake) => {
                    if let Some(event) = Box::pin(self.understand(wake)).await {
                        return event;
                    }
                }
            }
        }
    }

    /// What a failed subscription means: counted, and an end.
    pub(crate) fn item_failed(&self, channel: &Channel, error: SubscriptionError) -> SessionEnd {
        match error {
            SubscriptionError::Lagged { .. } => {
                self.shared.metrics.slow_consumer_closed(self.transport);
                SessionEnd::SlowConsumer
            }
            SubscriptionError::Closed => SessionEnd::Shutdown,
            SubscriptionError::Broker(error) => {
                tracing::warn!(target: "resync::session", client_id = %self.client_id, %channel, %error, "broker failed mid-stream");
                SessionEnd::BrokerFailed
            }
        }
    }

    /// Whether the server is draining (each session then ends at its moment within the
    /// spread).
    pub(crate) fn is_draining(&self) -> bool {
        *self.shared.shutdown.borrow()
    }

    /// What every connection shares.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The transports' settings.
    pub(crate) fn config(&self) -> &crate::TransportConfig {
        &self.shared.config
    }

    /// Counts a reset sent to the client.
    pub(crate) fn reset(&self, reason: resync_protocol::ResetReason) {
        self.shared.metrics.reset(reason);
    }

    /// Counts `count` events delivered.
    pub(crate) fn delivered(&self, count: u64) {
        self.shared.metrics.delivered(self.transport, count);
    }

    /// Follows one more channel (a WebSocket `subscribe`): the checks, the application's
    /// word when it is asked, its place in the budgets, the resume from `since`, then its
    /// presence. `Err(Refused)` changes nothing; `Err(Broker)` when the broker cannot serve
    /// it now.
    pub(crate) async fn subscribe(
        &mut self,
        channel: &Channel,
        start: Start,
        presence: Option<PresenceRequest>,
        join_leave: bool,
        address: std::net::IpAddr,
    ) -> Result<RecoveryOutcome, SubscribeFailure> {
        use resync_protocol::ErrorCode;
        if self.channels.contains(channel) {
            return Err(ApiError::new(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {channel}"),
            )
            .into());
        }
        let most = self.shared.config.max_channels_per_connection;
        if self.channels.len() >= most {
            return Err(ApiError::new(
                ErrorCode::TooManyChannels,
                format!("at most {most} channels per connection"),
            )
            .into());
        }
        permissions::check(&self.shared, self.identity(), Action::Subscribe, channel)?;
        membership::check(
            &self.shared,
            self.identity(),
            channel,
            presence.as_ref(),
            join_leave,
        )?;
        if let Some(proxy) = self
            .shared
            .proxy
            .as_ref()
            .filter(|proxy| proxy.asks_for(channel))
        {
            let asked = crate::proxy::ProxyRequest::Subscribe {
                user: self.identity().subject.clone(),
                channel: channel.clone(),
            };
            proxy.ask(&asked, address).await?;
        }
        self.admitted.subscribe(1).map_err(refusal)?;
        let recovery = match self.channels.add(&self.shared, channel, start).await {
            Ok(recovery) => recovery,
            Err(error) => {
                self.admitted.unsubscribe(1);
                return Err(SubscribeFailure::Broker(error));
            }
        };
        if let Err(error) = self.start_presence(channel, presence, join_leave).await {
            self.channels.remove(channel);
            self.admitted.unsubscribe(1);
            return Err(SubscribeFailure::Broker(error));
        }
        Ok(recovery)
    }

    /// Stops following `channel`, gives its place back to the budgets and leaves its
    /// presence; `false` if the session did not follow it.
    pub(crate) async fn unsubscribe(&mut self, channel: &Channel) -> bool {
        if !self.channels.remove(channel) {
            return false;
        }
        self.admitted.unsubscribe(1);
        self.stop_presence(channel).await;
        true
    }

    /// Starts `channel`'s presence: the join/leave watch first (so the watcher sees its own
    /// join), then the membership, each held against the presence budgets first.
    pub(crate) async fn start_presence(
        &mut self,
        channel: &Channel,
        request: Option<PresenceRequest>,
        join_leave: bool,
    ) -> Result<(), ApiError> {
        let Some(presence) = self.shared.broker.presence() else {
            return Ok(());
        };
        if request.is_none() && !join_leave {
            return Ok(());
        }
        let member = request.as_ref().map(|request| Member {
            id: self.member_id(),
            info: request
                .info
                .clone()
                .or_else(|| self.identity().info.clone()),
        });
        let member_cost = member
            .as_ref()
            .map_or(0, |member| membership::membership_cost(channel, member));
        let watch_cost = if join_leave {
            membership::watch_cost(channel)
        } else {
            0
        };
        self.admitted
            .hold_presence(member_cost + watch_cost)
            .map_err(refusal)?;
        let made = async {
            let watch = if join_leave {
                Some(presence.watch(channel).await?)
            } else {
                None
            };
            if let Some(member) = &member {
                presence
                    .join(channel, member, &self.client_id.to_string())
                    .await?;
            }
            Ok::<_, ApiError>(watch)
        }
        .await;
        let watch = match made {
            Ok(watch) => watch,
            Err(error) => {
                self.admitted.release_presence(member_cost + watch_cost);
                return Err(error);
            }
        };
        let state = self.presence.get_or_insert_with(Box::default);
        if let Some(watch) = watch {
            state.watches.insert(channel.clone(), watch);
        }
        if member.is_some() {
            state.memberships.push((channel.clone(), member_cost));
        }
        Ok(())
    }

    /// Starts the presence of every channel a stream opened with (see
    /// [`start_presence`](Self::start_presence)).
    pub(crate) async fn start_presence_of_all(
        &mut self,
        channels: &[Channel],
        request: Option<&PresenceRequest>,
        join_leave: bool,
    ) -> Result<(), ApiError> {
        for channel in channels {
            self.start_presence(channel, request.cloned(), join_leave)
                .await?;
        }
        Ok(())
    }

    /// Leaves `channel`'s members (if the session is one) and stops its join/leave events.
    async fn stop_presence(&mut self, channel: &Channel) {
        if let Some(presence) = self.presence.as_mut()
            && presence.watches.remove(channel).is_some()
        {
            self.admitted
                .release_presence(membership::watch_cost(channel));
        }
        self.stop_membership(channel).await;
    }

    /// Leaves `channel`'s members, if the session is one, and gives back what it held.
    async fn stop_membership(&mut self, channel: &Channel) {
        let Some(held) = self
            .presence
            .as_mut()
            .and_then(|presence| presence.forget_membership(channel))
        else {
            return;
        };
        self.admitted.release_presence(held);
        leave(
            &self.shared.broker,
            channel,
            &self.member_id(),
            self.client_id,
        )
        .await;
    }

    /// This session's member id: its token's subject, or its client id when anonymous.
    pub(crate) fn member_id(&self) -> String {
        membership::member_id(self.identity(), &self.client_id.to_string())
    }

    /// Keeps what a refresh in place must keep (see [`refresh`](Self::refresh)).
    pub(crate) fn keep_for_refresh(&mut self, token_subject: Option<String>, narrowing: Narrowing) {
        if let Some(who) = self.who.as_mut() {
            who.kept = Some((token_subject, narrowing));
        }
    }

    /// Puts a new token in force: the same subject, what the application decided at the
    /// opening (asked again when it wants to be), a new end, and the channels and presence it
    /// no longer allows ended. A refused token changes nothing: the session goes on until
    /// its current token expires.
    pub(crate) async fn refresh(
        &mut self,
        token: String,
        address: std::net::IpAddr,
    ) -> Result<Refreshed, ApiError> {
        use crate::auth::{Credentials, TokenSource};
        let kept = self.who.as_ref().and_then(|who| who.kept.as_ref());
        let (token_subject, narrowing) = match kept {
            Some((subject, narrowing)) => (subject.clone(), narrowing.clone()),
            None => (self.identity().subject.clone(), Narrowing::default()),
        };
        let credentials = Credentials {
            token: Some((token, TokenSource::Refresh)),
        };
        let mut identity = match self.shared.authorizer.authenticate(&credentials).await {
            Ok(identity) => identity,
            Err(error) => {
                self.shared.metrics.auth_failed();
                return Err(ApiError::from(error));
            }
        };
        // Compared before the application's mapping: the token's own subject.
        if identity.subject != token_subject {
            return Err(ApiError::new(
                resync_protocol::ErrorCode::Forbidden,
                "a refreshed token must be for the connection's own subject",
            ));
        }
        // What the application decided on connect stays decided.
        let mut narrowing = narrowing;
        narrowing.apply(&mut identity);
        if let Some(proxy) = self
            .shared
            .proxy
            .as_ref()
            .filter(|proxy| proxy.asks_on_refresh())
            && let Some((token, _)) = credentials.token
        {
            let asked = ProxyRequest::Refresh {
                user: identity.subject.clone(),
                token,
            };
            if let Some(answer) = proxy.ask(&asked, address).await? {
                narrowing.update(&answer);
                narrowing.apply(&mut identity);
            }
        }
        Ok(self
            .put_in_force(identity, Some((token_subject, narrowing)))
            .await)
    }

    /// Puts `identity` in force: a new end, and what it no longer allows ended.
    async fn put_in_force(
        &mut self,
        identity: Identity,
        kept: Option<(Option<String>, Narrowing)>,
    ) -> Refreshed {
        self.who = Some(Box::new(Who { identity, kept }));
        self.follow_expiry();
        let shared = self.shared.clone();
        let allows = |identity: &Identity, action: Action, channel: &Channel| {
            permissions::allows(&shared, identity, action, channel)
        };
        let revoked: Vec<Channel> = self
            .channels
            .channels()
            .filter(|channel| !allows(self.identity(), Action::Subscribe, channel))
            .cloned()
            .collect();
        for channel in &revoked {
            self.unsubscribe(channel).await;
        }
        // Presence the new token no longer allows: no more join/leave events, no membership.
        let unseen: Vec<Channel> = self
            .presence
            .iter()
            .flat_map(|presence| presence.watches.keys())
            .filter(|channel| !allows(self.identity(), Action::SeePresence, channel))
            .cloned()
            .collect();
        if let Some(presence) = self.presence.as_mut() {
            for channel in &unseen {
                presence.watches.remove(channel);
                self.admitted
                    .release_presence(membership::watch_cost(channel));
            }
        }
        let unseated: Vec<Channel> = self
            .presence
            .iter()
            .flat_map(|presence| presence.memberships.iter())
            .map(|(channel, _)| channel)
            .filter(|channel| !allows(self.identity(), Action::Appear, channel))
            .cloned()
            .collect();
        for channel in &unseated {
            self.stop_membership(channel).await;
        }
        Refreshed {
            expires_at: self.identity().expires_at,
            revoked,
        }
    }

    /// The broker's presence, if the session may see `channel`'s members.
    fn presence_of(&self, channel: &Channel) -> Result<&dyn Presence, ApiError> {
        permissions::check(&self.shared, self.identity(), Action::SeePresence, channel)?;
        self.shared
            .broker
            .presence()
            .ok_or_else(membership::no_presence)
    }

    /// `channel`'s members, if the session may see them.
    pub(crate) async fn members(&self, channel: &Channel) -> Result<Vec<Member>, ApiError> {
        Ok(self.presence_of(channel)?.members(channel).await?)
    }

    /// How many members `channel` has, if the session may see them.
    pub(crate) async fn member_count(&self, channel: &Channel) -> Result<u64, ApiError> {
        Ok(self.presence_of(channel)?.member_count(channel).await?)
    }

    /// Publishes from the client (a WebSocket `publish`): its permission, the application's
    /// word (which may rewrite what is stored), and the budget of channels one address or
    /// user may make.
    pub(crate) async fn publish(
        &self,
        channel: Channel,
        data: Payload,
        idempotency_key: Option<IdempotencyKey>,
        address: std::net::IpAddr,
    ) -> Result<Position, ApiError> {
        permissions::check(&self.shared, self.identity(), Action::Publish, &channel)?;
        let mut data = data;
        if let Some(proxy) = self
            .shared
            .proxy
            .as_ref()
            .filter(|proxy| proxy.asks_for(&channel))
        {
            let asked = ProxyRequest::Publish {
                user: self.identity().subject.clone(),
                channel: channel.clone(),
                data: data.clone(),
            };
            // The application may rewrite what is stored.
            if let Some(rewritten) = proxy
                .ask(&asked, address)
                .await?
                .and_then(|answer| answer.data)
            {
                data = rewritten;
            }
        }
        // A publish that makes a channel makes lasting state: an address (and a user) may
        // make only so many. The position is asked first only once its budget is spent.
        let admission = &self.shared.admission;
        let user = self.identity().subject.as_deref();
        let now = std::time::Instant::now();
        if !admission.may_make_channel(address, user, now)
            && self.shared.broker.position(&channel).await?.seq.get() == 0
        {
            return Err(ApiError::new(
                resync_protocol::ErrorCode::RateLimited,
                "this client makes new channels too fast; not stored",
            ));
        }
        let position = self
            .shared
            .publisher
            .send(
                Publish::new(channel, data)
                    .with_optional_idempotency_key(idempotency_key)
                    .from_client(),
            )
            .await?;
        if position.seq.get() == 1 {
            admission.made_channel(address, user, now);
        }
        Ok(position)
    }

    /// Ends the session now: its subscriptions go at once (so counts drop before a close
    /// handshake), and it leaves every channel it is a member of.
    pub(crate) async fn finish(&mut self) {
        self.channels.clear();
        let Some(presence) = self.presence.take() else {
            return;
        };
        let member_id = self.member_id();
        for (channel, _) in &presence.memberships {
            leave(&self.shared.broker, channel, &member_id, self.client_id).await;
        }
    }
}

impl Drop for Session {
    /// A session dropped without [`finish`](Session::finish) (an SSE body, a long poll whose
    /// client left) leaves its channels on a task of its own, since a drop cannot wait.
    fn drop(&mut self) {
        self.shared.metrics.connection_closed(self.transport);
        let Some(mut presence) = self.presence.take() else {
            return;
        };
        if presence.memberships.is_empty() {
            return;
        }
        let memberships = std::mem::take(&mut presence.memberships);
        // On the runtime the drop happens in; none is left when a process ends, and then
        // there is nobody to tell.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let broker = self.shared.broker.clone();
        let member_id = self.member_id();
        let client_id = self.client_id;
        runtime.spawn(async move {
            for (channel, _) in &memberships {
                leave(&broker, channel, &member_id, client_id).await;
            }
        });
    }
}

/// Removes the connection `client_id` of `member_id` from `channel`'s members.
async fn leave(broker: &Arc<dyn Broker>, channel: &Channel, member_id: &str, client_id: ClientId) {
    let Some(presence) = broker.presence() else {
        return;
    };
    let connection = client_id.to_string();
    if let Err(error) = presence.leave(channel, member_id, &connection).await {
        tracing::warn!(target: "resync::presence", %client_id, %channel, %error, "presence leave failed");
    }
}

/// Why a `subscribe` failed: refused (its checks, the application's answer: an `error` reply),
/// or the broker could not serve it (a broker that is down ends a WebSocket with 4101).
pub(crate) enum SubscribeFailure {
    Refused(ApiError),
    Broker(ApiError),
}

impl From<ApiError> for SubscribeFailure {
    fn from(error: ApiError) -> Self {
        SubscribeFailure::Refused(error)
    }
}

/// Token refreshes a second one connection may ask for, sustained, and in a burst: a token
/// is refreshed every few minutes; each refresh is a signature check.
const REFRESHES_PER_SECOND: f64 = 1.0;
const REFRESH_BURST: u32 = 3;

/// The rates at which a client that sends requests (a WebSocket) may send them, and what
/// going past them means. The transport that reads requests holds it (a stream pays
/// nothing for it); the decisions are made here.
pub(crate) struct RequestRates {
    /// Messages the client may send (pings included).
    messages: TokenBucket,
    /// Publishes the client may send.
    publishes: TokenBucket,
    /// Refusals the client may still earn: as many a second as it may send messages, and a
    /// burst. Past it, the connection closes: a flood that keeps just under a run of
    /// refusals is still a flood (issue 25, L4).
    refusals: TokenBucket,
    /// Token refreshes the connection may ask for, each a signature check, bad ones
    /// included (issue 25, item 12).
    refreshes: TokenBucket,
    /// Messages in a row refused for the rate (the first of a run is answered).
    over_rate: u32,
}

/// What to do with a client's message, for its rate.
#[derive(Debug)]
pub(crate) enum MessageVerdict {
    /// Within the rate: handle it.
    Take,
    /// Over the rate: drop it, telling the client with this error (the first of a run) or
    /// silently.
    Drop(Option<ApiError>),
    /// A flood: end the connection (try again later).
    Close,
}

impl RequestRates {
    pub(crate) fn new(config: &crate::TransportConfig, now: std::time::Instant) -> Self {
        Self {
            messages: TokenBucket::new(config.ws_messages_per_second, config.ws_message_burst, now),
            publishes: TokenBucket::new(
                config.ws_publishes_per_second,
                config.ws_publish_burst,
                now,
            ),
            refusals: TokenBucket::new(config.ws_messages_per_second, config.ws_message_burst, now),
            refreshes: TokenBucket::new(REFRESHES_PER_SECOND, REFRESH_BURST, now),
            over_rate: 0,
        }
    }

    /// A message arrived (its connection's end excepted, which is never rate limited).
    pub(crate) fn message(
        &mut self,
        config: &crate::TransportConfig,
        now: std::time::Instant,
    ) -> MessageVerdict {
        if self.messages.take(now) {
            self.over_rate = 0;
            return MessageVerdict::Take;
        }
        self.over_rate += 1;
        if !self.refusals.take(now) {
            return MessageVerdict::Close;
        }
        MessageVerdict::Drop((self.over_rate == 1).then(|| {
            ApiError::new(
                resync_protocol::ErrorCode::RateLimited,
                format!(
                    "more than {} messages a second; messages are dropped",
                    config.ws_messages_per_second
                ),
            )
        }))
    }

    /// A publish asked for: within the rate, or refused (nothing stored).
    pub(crate) fn publish(
        &mut self,
        config: &crate::TransportConfig,
        now: std::time::Instant,
    ) -> Result<(), ApiError> {
        if self.publishes.take(now) {
            return Ok(());
        }
        Err(ApiError::new(
            resync_protocol::ErrorCode::RateLimited,
            format!(
                "more than {} publishes a second; not stored",
                config.ws_publishes_per_second
            ),
        ))
    }

    /// A token refresh asked for: rationed per connection and per address before it is
    /// checked, whatever it turns out to be, since each is a signature check.
    pub(crate) fn refresh(
        &mut self,
        shared: &Shared,
        address: std::net::IpAddr,
        now: std::time::Instant,
    ) -> Result<(), ApiError> {
        if self.refreshes.take(now) && shared.admission.take_refresh(address, now) {
            return Ok(());
        }
        Err(ApiError::new(
            resync_protocol::ErrorCode::RateLimited,
            "token refreshes asked too often; the current token stays in force",
        ))
    }
}

#[cfg(test)]
mod tests {
    /// Every idle connection holds a session: what it adds stays small (issue 29's floor:
    /// idle bytes per connection no higher than before the session; `cargo xtask bench`
    /// measures them from outside).
    #[test]
    fn an_idle_session_stays_small() {
        let size = std::mem::size_of::<super::Session>();
        assert!(size <= 176, "a session is {size} bytes");
    }
}
