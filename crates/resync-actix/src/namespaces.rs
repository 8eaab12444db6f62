//! Per-namespace rules: what the channels of one namespace (the part of a channel's name
//! before its first `:`) allow, where it differs from the server-wide rules. They come first
//! in every permission (`permissions.rs`): a namespace that says no is no whatever the
//! identity and the authorizer say; one that lets anonymous clients in lets them in; anything
//! it does not mention is the authorizer's to decide.

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
    /// The namespace's channels are keyed (`true`): every publish names the key it sets, and
    /// the broker keeps the latest event of each key, from which a client the history no
    /// longer reaches catches up. Publishes elsewhere name no key.
    pub keyed: bool,
}
