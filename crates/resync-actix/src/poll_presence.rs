//! Presence for long polling. A poll is a request, but a member must outlive the gaps between
//! a client's polls: a poll that asks for presence (`presence=` to appear, `join_leave=1` to
//! be told of joins and leaves) is given a *presence session*, which the server keeps between
//! polls and which the client names in its next poll (`presence_session=`).
//!
//! A session holds the memberships, the join/leave watches (their bounded queues keep what
//! happens between two polls), and its own place under the connection limits: it counts as
//! one connection of its address and user, so sessions are bounded as connections are. It
//! ends [`poll_presence_idle`](crate::TransportConfig::poll_presence_idle) after its last poll
//! ended, and its members leave then. A session the server does not know (expired, or made by
//! another instance behind a load balancer) is replaced by a new one whose first reply holds
//! the whole member list, as a resuming WebSocket client would ask for it.
//!
//! The session id is a 128-bit secret known only to its client: member ids never contain it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use actix_web::HttpRequest;
use resync_broker::PresenceWatch;
use resync_protocol::{Channel, ErrorCode, PresenceRequest, ServerFrame};
use tokio::sync::{OwnedMutexGuard, watch};

use crate::Shared;
use crate::admission::AdmissionGuard;
use crate::auth::Identity;
use crate::error::ApiError;
use crate::membership::{self, Memberships};
use crate::request::{QueryParams, refusal};

/// How long a poll waits for the earlier poll of its session to hand the session over.
const HANDOVER_WAIT: Duration = Duration::from_secs(2);

/// The presence sessions of long-polling clients.
#[derive(Default)]
pub(crate) struct PollSessions {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

impl PollSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One client's presence session; what its polls asked for is fixed at its start.
struct Session {
    id: String,
    subject: Option<String>,
    channels: Vec<Channel>,
    member: Option<PresenceRequest>,
    join_leave: bool,
    state: Arc<tokio::sync::Mutex<SessionState>>,
    /// Bumped by a newer poll of the same client that wants the session: the poll holding it
    /// answers and lets go.
    superseded: watch::Sender<u64>,
    /// When the last poll ended; `None` while a poll holds the session.
    idle_since: Mutex<Option<Instant>>,
}

impl Session {
    fn asks_as(&self, identity: &Identity, query: &QueryParams) -> bool {
        self.subject == identity.subject
            && self.channels == query.channels
            && self.member == query.presence
            && self.join_leave == query.join_leave
    }

    fn set_idle(&self, since: Option<Instant>) {
        *self
            .idle_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = since;
    }

    fn idle_since(&self) -> Option<Instant> {
        *self
            .idle_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a session holds between polls.
pub(crate) struct SessionState {
    pub(crate) watches: tokio_stream::StreamMap<Channel, PresenceWatch>,
    #[allow(dead_code, reason = "held for its Drop, which leaves the channels")]
    memberships: Memberships,
    /// Its place under the connection limits, and the presence it holds.
    admitted: AdmissionGuard,
    /// Frames owed to the client: the lists a new session starts with, or what a superseded
    /// poll could not deliver.
    pub(crate) owed: Vec<String>,
}

/// A poll's hold on its session: released (the session's idle time starts) when dropped.
pub(crate) struct Lease {
    session: Arc<Session>,
    pub(crate) state: OwnedMutexGuard<SessionState>,
    /// Subscribed when the lease was taken: only newer polls than this one supersede it.
    superseded: watch::Receiver<u64>,
}

impl Lease {
    /// The id the client names in its next poll.
    pub(crate) fn id(&self) -> &str {
        &self.session.id
    }

    /// Resolves when a newer poll of the same client wants the session.
    pub(crate) fn superseded(&self) -> impl Future<Output = ()> + 'static {
        let mut superseded = self.superseded.clone();
        async move {
            if superseded.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.session.set_idle(Some(Instant::now()));
    }
}

/// The session of a poll that asks for presence, `None` for one that does not: the client's
/// own when it names one the server holds for the same identity and request, else a new one.
pub(crate) async fn open(
    shared: &Arc<Shared>,
    request: &HttpRequest,
    identity: &Identity,
    query: &QueryParams,
) -> Result<Option<Lease>, ApiError> {
    if query.presence.is_none() && !query.join_leave {
        return Ok(None);
    }
    for channel in &query.channels {
        membership::check(
            shared,
            identity,
            channel,
            query.presence.as_ref(),
            query.join_leave,
        )?;
    }
    if let Some(id) = &query.presence_session {
        let known = shared.poll_sessions.lock().get(id).cloned();
        match known {
            Some(session) if session.asks_as(identity, query) => {
                session
                    .superseded
                    .send_modify(|count| *count = count.wrapping_add(1));
                let state = tokio::time::timeout(HANDOVER_WAIT, session.state.clone().lock_owned())
                    .await
                    .map_err(|_| {
                        ApiError::new(
                            ErrorCode::Unavailable,
                            "another poll of this presence session is still in flight",
                        )
                    })?;
                session.set_idle(None);
                let superseded = session.superseded.subscribe();
                return Ok(Some(Lease {
                    session,
                    state,
                    superseded,
                }));
            }
            // The same client asks for something else now: its old session ends here.
            Some(session) if session.subject == identity.subject => {
                shared.poll_sessions.lock().remove(&session.id);
            }
            _ => {}
        }
    }
    start(shared, request, identity, query).await.map(Some)
}

/// Starts a session: its place under the limits, its watches, then its memberships; its
/// first reply carries the watched channels' lists.
async fn start(
    shared: &Arc<Shared>,
    request: &HttpRequest,
    identity: &Identity,
    query: &QueryParams,
) -> Result<Lease, ApiError> {
    let presence = shared
        .broker
        .presence()
        .ok_or_else(membership::no_presence)?;
    let mut admitted = shared
        .admission
        .enter(shared.admission.address_of(request), Instant::now())
        .map_err(refusal)?;
    admitted
        .identify(identity.subject.as_deref())
        .map_err(refusal)?;
    admitted.subscribe(query.channels.len()).map_err(refusal)?;

    // The member id of an anonymous client names its connection, which others see: it is
    // not the session id, which only the client may know.
    let connection = format!("{:016x}", fastrand::u64(..));
    let mut state = SessionState {
        watches: tokio_stream::StreamMap::new(),
        memberships: Memberships::new(
            shared.broker.clone(),
            membership::member_id(identity, &connection),
            connection,
        ),
        admitted,
        owed: Vec::new(),
    };
    membership::watch_and_join(
        presence,
        identity,
        &query.channels,
        query.presence.as_ref(),
        query.join_leave,
        &mut state.memberships,
        &mut state.watches,
        &mut state.admitted,
    )
    .await?;
    if query.join_leave {
        for channel in &query.channels {
            let members = presence.members(channel).await?;
            state.owed.extend(
                membership::list_pages(0, channel, members)
                    .iter()
                    .map(ServerFrame::encode),
            );
        }
    }

    let session = Arc::new(Session {
        id: session_id()?,
        subject: identity.subject.clone(),
        channels: query.channels.clone(),
        member: query.presence.clone(),
        join_leave: query.join_leave,
        state: Arc::new(tokio::sync::Mutex::new(state)),
        superseded: watch::channel(0).0,
        idle_since: Mutex::new(None),
    });
    let state = session
        .state
        .clone()
        .try_lock_owned()
        .map_err(|_| ApiError::new(ErrorCode::Internal, "a new session is locked"))?;
    shared
        .poll_sessions
        .lock()
        .insert(session.id.clone(), session.clone());
    expire_when_idle(shared, Arc::downgrade(&session));
    let superseded = session.superseded.subscribe();
    Ok(Lease {
        session,
        state,
        superseded,
    })
}

/// Ends the session once it has been idle for `poll_presence_idle`: it leaves the table, and
/// dropping it leaves its channels.
fn expire_when_idle(shared: &Arc<Shared>, session: Weak<Session>) {
    let shared = shared.clone();
    let idle = shared.config.poll_presence_idle;
    actix_web::rt::spawn(async move {
        let mut wake = Instant::now() + idle;
        loop {
            tokio::time::sleep_until(wake.into()).await;
            let Some(held) = session.upgrade() else {
                return;
            };
            match held.idle_since() {
                Some(since) if since.elapsed() >= idle => {
                    let mut sessions = shared.poll_sessions.lock();
                    if sessions
                        .get(&held.id)
                        .is_some_and(|known| Arc::ptr_eq(known, &held))
                    {
                        sessions.remove(&held.id);
                    }
                    return;
                }
                Some(since) => wake = since + idle,
                None => wake = Instant::now() + idle,
            }
        }
    });
}

/// A new session id: 128 random bits from the operating system, in hex.
fn session_id() -> Result<String, ApiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|error| ApiError::new(ErrorCode::Internal, format!("no randomness: {error}")))?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}
