//! Who may do what: the one decision every transport asks, for every action on a channel.
//!
//! Three sources of rules meet here, in this order, and nothing else decides:
//!
//! 1. the **namespace's policy** ([`NamespacePolicy`], from the server's configuration):
//!    presence or join/leave switched off, no client publishing, and what anonymous clients
//!    may do there, which overrides whatever the identity says;
//! 2. the **identity** a connection acts as: the token's claims, or what the application's
//!    proxy answered on connect and refresh in their place (its patterns replace the
//!    token's, see `proxy::Narrowing`);
//! 3. the application's [`Authorizer`](crate::Authorizer), which reads the identity.
//!
//! Seeing a channel's presence and appearing among its members follow subscribing, unless
//! the identity names its own presence or appear patterns: a client that may not subscribe
//! to a channel (by any rule, the namespace's included) may not see or join its members
//! either. Tested as a table of action × rule source × transport in
//! `tests/tests/permissions.rs`.

use resync_protocol::{Channel, ErrorCode};

use crate::Shared;
use crate::auth::Identity;
use crate::error::ApiError;
use crate::namespaces::NamespacePolicy;

/// What a client asks to do on a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Follow its events.
    Subscribe,
    /// Publish on it (WebSocket).
    Publish,
    /// See who is in it: the member list, the count, join and leave events.
    SeePresence,
    /// Appear among its members.
    Appear,
    /// Be told of its joins and leaves (on top of seeing its presence).
    JoinLeave,
}

/// Whether `identity` may do `action` on `channel`.
pub(crate) fn allows(
    shared: &Shared,
    identity: &Identity,
    action: Action,
    channel: &Channel,
) -> bool {
    let policy = shared.config.namespaces.get(channel.namespace());
    let anonymous = identity.subject.is_none();
    let authorizer = &shared.authorizer;
    let switched_off =
        |field: fn(&NamespacePolicy) -> Option<bool>| policy.and_then(field) == Some(false);
    match action {
        Action::Subscribe => match policy.and_then(|policy| policy.anonymous_subscribe) {
            Some(allowed) if anonymous => allowed,
            _ => authorizer.can_subscribe(identity, channel),
        },
        Action::Publish => {
            if switched_off(|policy| policy.client_publish) {
                return false;
            }
            match policy.and_then(|policy| policy.anonymous_publish) {
                Some(allowed) if anonymous => allowed,
                _ => authorizer.can_publish(identity, channel),
            }
        }
        Action::SeePresence => {
            !switched_off(|policy| policy.presence)
                && authorizer.can_see_presence(identity, channel)
                && (identity.presence.is_some()
                    || allows(shared, identity, Action::Subscribe, channel))
        }
        Action::Appear => {
            !switched_off(|policy| policy.presence)
                && authorizer.can_join_presence(identity, channel)
                && (identity.appear.is_some()
                    || allows(shared, identity, Action::Subscribe, channel))
        }
        Action::JoinLeave => {
            !switched_off(|policy| policy.join_leave)
                && allows(shared, identity, Action::SeePresence, channel)
        }
    }
}

/// [`allows`], as the error a client is given when it does not.
pub(crate) fn check(
    shared: &Shared,
    identity: &Identity,
    action: Action,
    channel: &Channel,
) -> Result<(), ApiError> {
    if allows(shared, identity, action, channel) {
        return Ok(());
    }
    let message = match action {
        Action::Subscribe => format!("not allowed to subscribe to {channel}"),
        Action::Publish => format!("not allowed to publish on {channel}"),
        Action::SeePresence => format!("not allowed to see who is in {channel}"),
        Action::Appear => format!("not allowed to appear among the members of {channel}"),
        Action::JoinLeave => format!("not allowed to follow the joins and leaves of {channel}"),
    };
    Err(ApiError::new(ErrorCode::Forbidden, message))
}
