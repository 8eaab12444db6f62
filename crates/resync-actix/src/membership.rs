//! What every transport does the same for presence: check a subscriber's presence request
//! (the broker keeps presence, the info is within its limit, the identity may appear or
//! watch), name its member, and leave when a connection ends.

use std::sync::Arc;

use resync_broker::{Broker, Presence, PresenceEvent, PresenceLagged};
use resync_protocol::{Channel, ErrorCode, PresenceRequest, ServerFrame};

use crate::Shared;
use crate::auth::Identity;
use crate::error::ApiError;
use crate::permissions::{self, Action};

/// The error for a broker that keeps no presence.
pub(crate) fn no_presence() -> ApiError {
    ApiError::new(
        ErrorCode::BadRequest,
        "this server's broker keeps no presence",
    )
}

/// Checks a subscriber's presence request before anything is subscribed: `member` to appear
/// among `channel`'s members with `info`, `join_leave` to be told of joins and leaves.
/// `None` when neither is asked.
pub(crate) fn check<'a>(
    shared: &'a Shared,
    identity: &Identity,
    channel: &Channel,
    member: Option<&PresenceRequest>,
    join_leave: bool,
) -> Result<Option<&'a dyn Presence>, ApiError> {
    if member.is_none() && !join_leave {
        return Ok(None);
    }
    let presence = shared.broker.presence().ok_or_else(no_presence)?;
    if let Some(request) = member {
        let size = request.info.as_ref().map_or(0, |info| info.as_str().len());
        let limit = shared.config.max_presence_info_bytes;
        if size > limit {
            return Err(ApiError::new(
                ErrorCode::PresenceInfoTooLarge,
                format!("presence info is {size} bytes, the limit is {limit}"),
            ));
        }
        permissions::check(shared, identity, Action::Appear, channel)?;
    }
    if join_leave {
        permissions::check(shared, identity, Action::JoinLeave, channel)?;
    }
    Ok(Some(presence))
}

/// The most bytes of members in one `presence` frame: a longer list comes in pages (every
/// page but the last says `more`), so no frame, SSE event or long-poll reply grows with a
/// channel's members.
pub(crate) const PRESENCE_PAGE_BYTES: usize = 64 * 1024;

/// `members` of `channel` as `presence` frames answering `id` (0: not an answer), each at
/// most [`PRESENCE_PAGE_BYTES`] of members (and at least one member).
pub(crate) fn list_pages(
    id: resync_protocol::RequestId,
    channel: &Channel,
    members: Vec<resync_protocol::Member>,
) -> Vec<ServerFrame> {
    let mut pages = Vec::new();
    let mut page = Vec::new();
    let mut bytes = 0;
    for member in members {
        let size =
            member.id.len() + member.info.as_ref().map_or(0, |info| info.as_str().len()) + 24;
        if !page.is_empty() && bytes + size > PRESENCE_PAGE_BYTES {
            pages.push(std::mem::take(&mut page));
            bytes = 0;
        }
        bytes += size;
        page.push(member);
    }
    pages.push(page);
    let last = pages.len() - 1;
    pages
        .into_iter()
        .enumerate()
        .map(|(index, members)| ServerFrame::Presence {
            id,
            channel: channel.clone(),
            members,
            more: index < last,
        })
        .collect()
}

/// The frames that tell a watcher of `channel` about `event`: a `join` or `leave`, or, when
/// it missed events (a burst past its queue), the whole list (`presence` frames with `id` 0:
/// not an answer, in pages), so that its list is right again without asking. `Err` with why
/// when the list cannot be read either: the watcher must fetch it again.
pub(crate) async fn watcher_frames(
    shared: &Shared,
    channel: Channel,
    event: Result<PresenceEvent, PresenceLagged>,
) -> Result<Vec<ServerFrame>, (Channel, String)> {
    match event {
        Ok(PresenceEvent::Join(member)) => Ok(vec![ServerFrame::Join { channel, member }]),
        Ok(PresenceEvent::Leave(member)) => Ok(vec![ServerFrame::Leave { channel, member }]),
        Err(lagged) => {
            let members = match shared.broker.presence() {
                Some(presence) => presence.members(&channel).await,
                None => Ok(Vec::new()),
            };
            match members {
                Ok(members) => Ok(list_pages(0, &channel, members)),
                Err(error) => Err((channel, format!("{lagged} ({error})"))),
            }
        }
    }
}

/// A page of a keyed channel's state as `state` frames of at most
/// [`PRESENCE_PAGE_BYTES`] of entries each (and at least one entry): every frame but the last
/// of the last page says `more`.
pub(crate) fn state_frames(
    channel: &Channel,
    entries: Vec<resync_protocol::StateEntry>,
    position: &resync_protocol::Position,
    more: bool,
) -> Vec<ServerFrame> {
    let mut frames = Vec::new();
    let mut frame = Vec::new();
    let mut bytes = 0;
    for entry in entries {
        let size = entry.key.as_str().len()
            + entry.data.as_ref().map_or(4, |data| data.as_str().len())
            + 32;
        if !frame.is_empty() && bytes + size > PRESENCE_PAGE_BYTES {
            frames.push(std::mem::take(&mut frame));
            bytes = 0;
        }
        bytes += size;
        frame.push(entry);
    }
    frames.push(frame);
    let last = frames.len() - 1;
    frames
        .into_iter()
        .enumerate()
        .map(|(index, entries)| ServerFrame::State {
            channel: channel.clone(),
            entries,
            position: position.clone(),
            more: more || index < last,
        })
        .collect()
}

/// The frame that tells a watcher on a frame-based wire (WebSocket, long polling) that it
/// missed joins and leaves and the list could not be read either: fetch it again.
pub(crate) fn lagged_frame(channel: &Channel, why: &str) -> ServerFrame {
    ServerFrame::Error {
        id: None,
        code: ErrorCode::Unavailable,
        message: format!("{channel}: {why}"),
    }
}

/// Bytes a membership costs the presence budgets (`docs/security.md`): its info, member id and
/// channel as the broker keeps them, and the entry around them.
pub(crate) fn membership_cost(channel: &Channel, member: &resync_protocol::Member) -> usize {
    const ENTRY: usize = 256;
    ENTRY
        + channel.as_str().len()
        + member.id.len()
        + member.info.as_ref().map_or(0, |info| info.as_str().len())
}

/// Bytes a join/leave watch costs the presence budgets: its queue and registration.
pub(crate) fn watch_cost(channel: &Channel) -> usize {
    const WATCH: usize = 512;
    WATCH + channel.as_str().len()
}

/// Watches the joins and leaves of each channel (with `join_leave`), then joins it as
/// `memberships`' member (with a presence request): what an SSE stream and a long-poll
/// session do at their start. The watch comes first, so a change in between is not missed
/// (a join of a member already listed changes nothing for the client). Each is held against
/// the connection's presence budgets (`admitted`), given back when the connection ends.
#[allow(
    clippy::too_many_arguments,
    reason = "the one start of presence for SSE and long polls, called twice"
)]
pub(crate) async fn watch_and_join(
    presence: &dyn Presence,
    identity: &Identity,
    channels: &[Channel],
    member: Option<&PresenceRequest>,
    join_leave: bool,
    memberships: &mut Memberships,
    watches: &mut tokio_stream::StreamMap<Channel, resync_broker::PresenceWatch>,
    admitted: &mut crate::admission::AdmissionGuard,
) -> Result<(), ApiError> {
    for channel in channels {
        if join_leave {
            admitted
                .hold_presence(watch_cost(channel))
                .map_err(crate::request::refusal)?;
            watches.insert(channel.clone(), presence.watch(channel).await?);
        }
        if let Some(request) = member {
            let joining = resync_protocol::Member {
                id: memberships.member_id().to_owned(),
                info: request.info.clone().or_else(|| identity.info.clone()),
            };
            admitted
                .hold_presence(membership_cost(channel, &joining))
                .map_err(crate::request::refusal)?;
            presence
                .join(channel, &joining, memberships.connection())
                .await?;
            memberships.joined(channel.clone());
        }
    }
    Ok(())
}

/// A connection's member id: its token's subject, or `anon:<connection>` when anonymous.
pub(crate) fn member_id(identity: &Identity, connection: &str) -> String {
    match &identity.subject {
        Some(subject) => subject.clone(),
        None => format!("anon:{connection}"),
    }
}

/// The channels a connection is a member of; when dropped (the stream ended, however), it
/// leaves them, on a task of its own since a drop cannot wait.
pub(crate) struct Memberships {
    broker: Arc<dyn Broker>,
    member_id: String,
    connection: String,
    channels: Vec<Channel>,
}

impl Memberships {
    pub(crate) fn new(broker: Arc<dyn Broker>, member_id: String, connection: String) -> Self {
        Self {
            broker,
            member_id,
            connection,
            channels: Vec::new(),
        }
    }

    pub(crate) fn member_id(&self) -> &str {
        &self.member_id
    }

    pub(crate) fn connection(&self) -> &str {
        &self.connection
    }

    /// Records that the connection joined `channel`.
    pub(crate) fn joined(&mut self, channel: Channel) {
        self.channels.push(channel);
    }
}

impl Drop for Memberships {
    fn drop(&mut self) {
        if self.channels.is_empty() {
            return;
        }
        let broker = self.broker.clone();
        let member_id = std::mem::take(&mut self.member_id);
        let connection = std::mem::take(&mut self.connection);
        let channels = std::mem::take(&mut self.channels);
        // On the runtime the drop happens in (a worker's, or a test's when a server is torn
        // down); none is left when a process ends, and then there is nobody to tell.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let Some(presence) = broker.presence() else {
                return;
            };
            for channel in channels {
                if let Err(error) = presence.leave(&channel, &member_id, &connection).await {
                    tracing::warn!(target: "resync::presence", %channel, %error, "presence leave failed");
                }
            }
        });
    }
}
