//! Per-namespace rules: what the channels of one namespace (the part of a channel's name
//! before its first `:`) allow, where it differs from the server-wide rules. They sit in
//! front of the application's [`Authorizer`]: a namespace that says no is no whatever the
//! authorizer says; one that lets anonymous clients in lets them in; anything it does not
//! mention is the authorizer's to decide.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use resync_protocol::Channel;

use crate::auth::{AuthError, Authorizer, Credentials, Identity};

/// What a namespace allows; `None` in a field: as everywhere else.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespacePolicy {
    /// Anonymous clients may subscribe (`true`), or may not (`false`).
    pub anonymous_subscribe: Option<bool>,
    /// Anonymous clients may publish over WebSocket (`true`), or may not (`false`).
    pub anonymous_publish: Option<bool>,
    /// No client may publish here when `false` (the HTTP API still may).
    pub client_publish: Option<bool>,
    /// Presence (appearing among the members, the list and the count) is off when `false`.
    pub presence: Option<bool>,
    /// Join and leave events are off when `false`.
    pub join_leave: Option<bool>,
}

/// The namespaces' rules in front of an authorizer.
pub(crate) struct NamespaceRules {
    pub(crate) inner: Arc<dyn Authorizer>,
    pub(crate) namespaces: HashMap<String, NamespacePolicy>,
}

impl NamespaceRules {
    fn policy(&self, channel: &Channel) -> Option<&NamespacePolicy> {
        self.namespaces.get(channel.namespace())
    }
}

#[async_trait]
impl Authorizer for NamespaceRules {
    async fn authenticate(&self, credentials: &Credentials) -> Result<Identity, AuthError> {
        self.inner.authenticate(credentials).await
    }

    fn can_subscribe(&self, identity: &Identity, channel: &Channel) -> bool {
        match self
            .policy(channel)
            .and_then(|policy| policy.anonymous_subscribe)
        {
            Some(allowed) if identity.subject.is_none() => allowed,
            _ => self.inner.can_subscribe(identity, channel),
        }
    }

    fn can_publish(&self, identity: &Identity, channel: &Channel) -> bool {
        let policy = self.policy(channel);
        if policy.and_then(|policy| policy.client_publish) == Some(false) {
            return false;
        }
        match policy.and_then(|policy| policy.anonymous_publish) {
            Some(allowed) if identity.subject.is_none() => allowed,
            _ => self.inner.can_publish(identity, channel),
        }
    }

    fn can_see_presence(&self, identity: &Identity, channel: &Channel) -> bool {
        self.policy(channel).and_then(|policy| policy.presence) != Some(false)
            && self.inner.can_see_presence(identity, channel)
    }

    fn can_join_presence(&self, identity: &Identity, channel: &Channel) -> bool {
        self.policy(channel).and_then(|policy| policy.presence) != Some(false)
            && self.inner.can_join_presence(identity, channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AllowAllSubscribers, ChannelPattern};

    fn rules(namespace: &str, policy: NamespacePolicy) -> NamespaceRules {
        NamespaceRules {
            inner: Arc::new(AllowAllSubscribers),
            namespaces: HashMap::from([(namespace.to_owned(), policy)]),
        }
    }

    fn channel(name: &str) -> Channel {
        Channel::new(name).unwrap_or_else(|error| panic!("{error}"))
    }

    #[test]
    fn a_namespace_overrides_only_what_it_names() {
        let anonymous = Identity {
            subscribe: vec![ChannelPattern::new("*")],
            ..Identity::default()
        };
        let user = Identity {
            subject: Some("ann".to_owned()),
            publish: vec![ChannelPattern::new("*")],
            ..anonymous.clone()
        };
        let closed = rules(
            "private",
            NamespacePolicy {
                anonymous_subscribe: Some(false),
                client_publish: Some(false),
                presence: Some(false),
                ..NamespacePolicy::default()
            },
        );
        assert!(!closed.can_subscribe(&anonymous, &channel("private:1")));
        assert!(
            closed.can_subscribe(&user, &channel("private:1")),
            "users: the authorizer's say"
        );
        assert!(
            closed.can_subscribe(&anonymous, &channel("public:1")),
            "other namespaces untouched"
        );
        assert!(!closed.can_publish(&user, &channel("private:1")));
        assert!(closed.can_publish(&user, &channel("public:1")));
        assert!(!closed.can_see_presence(&user, &channel("private:1")));
        assert!(!closed.can_join_presence(&user, &channel("private:1")));
        let open = rules(
            "lobby",
            NamespacePolicy {
                anonymous_publish: Some(true),
                ..NamespacePolicy::default()
            },
        );
        assert!(open.can_publish(&anonymous, &channel("lobby:1")));
        assert!(
            !open.can_publish(&anonymous, &channel("other:1")),
            "AllowAllSubscribers lets nobody publish"
        );
    }
}
