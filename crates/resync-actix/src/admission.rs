//! Who may open a connection, and how much one client address may hold: a global connection
//! cap, per-address caps on concurrent connections, connection rate and subscriptions, and
//! the per-connection rates of WebSocket frames and publishes.
//!
//! Refusals are O(1) and happen before authentication, so a flood costs the server little.
//! Addresses are the TCP peer's, or (only when the peer is a configured trusted proxy) the
//! last untrusted hop of `X-Forwarded-For`. IPv6 addresses count by /64, the block one host
//! usually has.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix_web::HttpRequest;

use crate::config::TransportConfig;

/// A token bucket: `rate` tokens a second, at most `burst` saved.
#[derive(Clone, Debug)]
pub(crate) struct TokenBucket {
    tokens: f64,
    updated: Instant,
    rate: f64,
    burst: f64,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            updated: now,
            rate,
            burst: f64::from(burst),
        }
    }

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a token could be taken now (without taking it).
    pub(crate) fn has_token(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        (self.tokens + elapsed * self.rate).min(self.burst) >= 1.0
    }

    fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }
}

/// Why a connection or a subscription was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The server holds as many connections as it may: try again later (503).
    ServerFull,
    /// This address holds too many connections, opens them too fast, or follows too many
    /// channels (429, `rate_limited`).
    TooMuchFromAddress(&'static str),
    /// This user (token subject) holds too many connections or follows too many channels,
    /// from whatever addresses (429, `rate_limited`): a leaked token's reach.
    TooMuchForUser(&'static str),
}

struct UserState {
    connections: usize,
    subscriptions: usize,
    /// Channels the user's publishes made, from whatever addresses.
    channel_rate: TokenBucket,
}

impl UserState {
    fn new(now: Instant) -> Self {
        Self {
            connections: 0,
            subscriptions: 0,
            channel_rate: TokenBucket::new(CHANNELS_MADE_PER_SECOND, CHANNELS_MADE_BURST, now),
        }
    }
}

struct AddressState {
    /// Streams (SSE, WebSocket, long polls) counted here: those that did not come through
    /// the edge, whose sockets are counted instead.
    connections: usize,
    /// Sockets accepted by the edge and still open.
    sockets: usize,
    subscriptions: usize,
    /// Bytes of presence its connections hold.
    presence_bytes: usize,
    /// New streams.
    rate: TokenBucket,
    /// New sockets (through the edge).
    socket_rate: TokenBucket,
    /// Token refreshes of the address's connections: each a signature check.
    refresh_rate: TokenBucket,
    /// Channels its clients' publishes made (each lasting state in the broker).
    channel_rate: TokenBucket,
}

impl AddressState {
    fn idle(&self, now: Instant) -> bool {
        self.connections == 0
            && self.sockets == 0
            && self.presence_bytes == 0
            && self.rate.is_full(now)
            && self.socket_rate.is_full(now)
            && self.refresh_rate.is_full(now)
            && self.channel_rate.is_full(now)
    }
}

/// An address's socket cap (and socket rate) for its stream cap (and rate): 10% more, and at
/// least 16 more, so that a client over its stream cap still gets a polite refusal.
pub(crate) fn socket_margin(stream_limit: usize) -> usize {
    stream_limit.saturating_add((stream_limit / 10).max(16))
}

/// Token refreshes a second one address's connections may ask for, sustained, and in a
/// burst: each is a signature check (an RSA-4096 one costs ~0.1 ms of CPU).
const ADDRESS_REFRESHES_PER_SECOND: f64 = 5.0;
const ADDRESS_REFRESH_BURST: u32 = 20;

/// Channels the client publishes of one address (or one user) may make a second, sustained,
/// and in a burst: each is lasting state in the broker (its history, for a day by default),
/// and a flood of them would fill the table the application's own publishes need.
const CHANNELS_MADE_PER_SECOND: f64 = 1.0;
const CHANNELS_MADE_BURST: u32 = 100;

/// Addresses tracked at most; past it, addresses with no connection are forgotten, and if
/// none is, new addresses are refused as if the server were full.
const MAX_TRACKED_ADDRESSES: usize = 100_000;

/// How long a full address table is not swept again after a sweep that freed nothing.
const SWEEP_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// The admission state shared by every connection.
pub(crate) struct Admission {
    limits: Limits,
    state: Mutex<AdmissionState>,
}

#[derive(Clone, Debug)]
struct Limits {
    max_sockets: usize,
    max_connections: usize,
    max_connections_per_address: usize,
    connections_per_second: f64,
    connection_burst: u32,
    max_subscriptions_per_address: usize,
    max_connections_per_user: usize,
    max_subscriptions_per_user: usize,
    max_presence_bytes: usize,
    max_presence_bytes_per_address: usize,
    trusted_proxies: Vec<IpAddr>,
}

struct AdmissionState {
    /// Streams open (SSE, WebSocket, long polls).
    connections: usize,
    /// Sockets the edge accepted and holds.
    sockets: usize,
    /// Bytes of presence (memberships and join/leave watches) held for clients.
    presence_bytes: usize,
    addresses: HashMap<IpAddr, AddressState>,
    /// Users with at least one connection, so at most `max_connections` of them.
    users: HashMap<Arc<str>, UserState>,
    /// After a sweep of the address table that freed nothing, no other sweep before this:
    /// a flood of new addresses at a full table costs a lookup each, not a scan each.
    next_sweep: Option<Instant>,
}

impl Admission {
    pub(crate) fn new(config: &TransportConfig) -> Self {
        Self {
            limits: Limits {
                max_sockets: config.max_sockets,
                max_connections: config.max_connections,
                max_connections_per_address: config.max_connections_per_ip,
                connections_per_second: config.connections_per_ip_per_second,
                connection_burst: config.connection_burst_per_ip,
                max_subscriptions_per_address: config.max_subscriptions_per_ip,
                max_connections_per_user: config.max_connections_per_user,
                max_subscriptions_per_user: config.max_subscriptions_per_user,
                max_presence_bytes: config.max_presence_bytes,
                max_presence_bytes_per_address: config.max_presence_bytes_per_ip,
                trusted_proxies: config.trusted_proxies.clone(),
            },
            state: Mutex::new(AdmissionState {
                connections: 0,
                sockets: 0,
                presence_bytes: 0,
                addresses: HashMap::new(),
                users: HashMap::new(),
                next_sweep: None,
            }),
        }
    }

    /// The address a request counts against.
    pub(crate) fn address_of(&self, request: &HttpRequest) -> IpAddr {
        let peer = request
            .peer_addr()
            .map_or(IpAddr::from([0, 0, 0, 0]), |peer| peer.ip());
        if !self.limits.trusted_proxies.contains(&peer) {
            return bucket_of(peer);
        }
        // Behind our own proxies: the rightmost hop they did not add themselves.
        let forwarded = request
            .headers()
            .get_all("x-forwarded-for")
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
            .collect::<Vec<_>>();
        let client = forwarded
            .iter()
            .rev()
            .find(|hop| !self.limits.trusted_proxies.contains(hop))
            .copied()
            .unwrap_or(peer);
        bucket_of(client)
    }

    /// Lets a stream (SSE, WebSocket, long poll) from `address` in, or says why not: the
    /// global stream cap, then the address's stream cap and rate.
    pub(crate) fn enter(
        self: &Arc<Self>,
        address: IpAddr,
        now: Instant,
    ) -> Result<AdmissionGuard, Refusal> {
        let mut state = self.lock();
        if state.connections >= self.limits.max_connections {
            return Err(Refusal::ServerFull);
        }
        let limits = &self.limits;
        let tracked = Self::track(&mut state, limits, address, now)?;
        if tracked.connections >= limits.max_connections_per_address {
            return Err(Refusal::TooMuchFromAddress(
                "too many connections from this address",
            ));
        }
        if !tracked.rate.take(now) {
            return Err(Refusal::TooMuchFromAddress(
                "connections opened too fast from this address",
            ));
        }
        tracked.connections += 1;
        state.connections += 1;
        Ok(AdmissionGuard {
            admission: self.clone(),
            address,
            presence_bytes: 0,
            user: None,
            subscriptions: 0,
        })
    }

    /// Lets a socket just accepted from `address` in, or says why not: the global socket cap,
    /// then the address's socket cap and socket rate. Both are a margin above the address's
    /// stream cap and rate ([`socket_margin`]), so that a client past its streams is still
    /// read and told why (a `429`, a retry stream), while a flood of sockets is closed at
    /// `accept`. A trusted proxy's sockets count globally only: its clients are counted by
    /// their forwarded address, per request.
    pub(crate) fn enter_socket(
        self: &Arc<Self>,
        address: IpAddr,
        now: Instant,
    ) -> Result<SocketGuard, Refusal> {
        let mut state = self.lock();
        if state.sockets >= self.limits.max_sockets {
            return Err(Refusal::ServerFull);
        }
        let per_address = !self.limits.trusted_proxies.contains(&address);
        if per_address {
            let limits = &self.limits;
            let tracked = Self::track(&mut state, limits, address, now)?;
            if tracked.sockets >= socket_margin(limits.max_connections_per_address) {
                return Err(Refusal::TooMuchFromAddress(
                    "too many connections from this address",
                ));
            }
            if !tracked.socket_rate.take(now) {
                return Err(Refusal::TooMuchFromAddress(
                    "connections opened too fast from this address",
                ));
            }
            tracked.sockets += 1;
        }
        state.sockets += 1;
        Ok(SocketGuard {
            admission: self.clone(),
            address,
            per_address,
        })
    }

    /// Whether `address` (and `user`) may still make channels with client publishes now.
    pub(crate) fn may_make_channel(
        &self,
        address: IpAddr,
        user: Option<&str>,
        now: Instant,
    ) -> bool {
        let state = self.lock();
        let address_may = state
            .addresses
            .get(&address)
            .is_some_and(|tracked| tracked.channel_rate.has_token(now));
        let user_may = user
            .and_then(|user| state.users.get(user))
            .is_none_or(|user| user.channel_rate.has_token(now));
        address_may && user_may
    }

    /// Counts a channel a client publish of `address` (and `user`) made.
    pub(crate) fn made_channel(&self, address: IpAddr, user: Option<&str>, now: Instant) {
        let mut state = self.lock();
        if let Some(tracked) = state.addresses.get_mut(&address) {
            tracked.channel_rate.take(now);
        }
        if let Some(user) = user.and_then(|user| state.users.get_mut(user)) {
            user.channel_rate.take(now);
        }
    }

    /// Takes one of `address`'s token refreshes, if it has one left.
    pub(crate) fn take_refresh(&self, address: IpAddr, now: Instant) -> bool {
        let mut state = self.lock();
        match state.addresses.get_mut(&address) {
            Some(tracked) => tracked.refresh_rate.take(now),
            // An address without a connection has nothing to refresh.
            None => false,
        }
    }

    /// The address's entry, made if needed; a full table is swept at most once a second.
    fn track<'a>(
        state: &'a mut AdmissionState,
        limits: &Limits,
        address: IpAddr,
        now: Instant,
    ) -> Result<&'a mut AddressState, Refusal> {
        if !state.addresses.contains_key(&address) && state.addresses.len() >= MAX_TRACKED_ADDRESSES
        {
            if state.next_sweep.is_some_and(|next| now < next) {
                return Err(Refusal::ServerFull);
            }
            state.addresses.retain(|_, tracked| !tracked.idle(now));
            if state.addresses.len() >= MAX_TRACKED_ADDRESSES {
                state.next_sweep = Some(now + SWEEP_PAUSE);
                return Err(Refusal::ServerFull);
            }
        }
        Ok(state
            .addresses
            .entry(address)
            .or_insert_with(|| AddressState {
                connections: 0,
                sockets: 0,
                subscriptions: 0,
                presence_bytes: 0,
                rate: TokenBucket::new(limits.connections_per_second, limits.connection_burst, now),
                socket_rate: TokenBucket::new(
                    socket_margin(limits.connections_per_second as usize) as f64,
                    u32::try_from(socket_margin(limits.connection_burst as usize))
                        .unwrap_or(u32::MAX),
                    now,
                ),
                refresh_rate: TokenBucket::new(
                    ADDRESS_REFRESHES_PER_SECOND,
                    ADDRESS_REFRESH_BURST,
                    now,
                ),
                channel_rate: TokenBucket::new(CHANNELS_MADE_PER_SECOND, CHANNELS_MADE_BURST, now),
            }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AdmissionState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// IPv6 addresses count by their /64; IPv4 addresses one by one.
pub(crate) fn bucket_of(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::from(segments)
            }
        },
    }
}

/// An admitted connection: counts against its address until dropped, with the channels it
/// follows.
pub(crate) struct AdmissionGuard {
    admission: Arc<Admission>,
    address: IpAddr,
    /// Bytes of presence this connection holds, given back when it ends.
    presence_bytes: usize,
    /// The token subject this connection also counts against, once authenticated.
    user: Option<Arc<str>>,
    subscriptions: usize,
}

impl AdmissionGuard {
    /// Counts this connection against its user (the token's subject; anonymous connections
    /// count against their address only), within the user's connection budget.
    pub(crate) fn identify(&mut self, subject: Option<&str>) -> Result<(), Refusal> {
        let Some(subject) = subject else {
            return Ok(());
        };
        let mut state = self.admission.lock();
        let limits = &self.admission.limits;
        let user = state
            .users
            .entry(Arc::from(subject))
            .or_insert_with(|| UserState::new(Instant::now()));
        if user.connections >= limits.max_connections_per_user {
            let idle = user.connections == 0;
            if idle {
                state.users.remove(subject);
            }
            return Err(Refusal::TooMuchForUser(
                "this user holds too many connections",
            ));
        }
        user.connections += 1;
        drop(state);
        self.user = Some(Arc::from(subject));
        Ok(())
    }

    /// Counts `count` more channels followed, within the address's and the user's budgets.
    pub(crate) fn subscribe(&mut self, count: usize) -> Result<(), Refusal> {
        let mut state = self.admission.lock();
        let limits = &self.admission.limits;
        if let Some(user) = self.user.as_ref().and_then(|user| state.users.get(user))
            && user.subscriptions.saturating_add(count) > limits.max_subscriptions_per_user
        {
            return Err(Refusal::TooMuchForUser(
                "this user follows too many channels",
            ));
        }
        let Some(tracked) = state.addresses.get_mut(&self.address) else {
            return Ok(());
        };
        if tracked.subscriptions.saturating_add(count) > limits.max_subscriptions_per_address {
            return Err(Refusal::TooMuchFromAddress(
                "this address follows too many channels",
            ));
        }
        tracked.subscriptions += count;
        if let Some(user) = self
            .user
            .as_ref()
            .and_then(|user| state.users.get_mut(user))
        {
            user.subscriptions += count;
        }
        self.subscriptions += count;
        Ok(())
    }

    /// Counts `bytes` more of presence held for this connection (a membership, a join/leave
    /// watch), within its address's and the process's presence budgets.
    pub(crate) fn hold_presence(&mut self, bytes: usize) -> Result<(), Refusal> {
        let mut state = self.admission.lock();
        let limits = &self.admission.limits;
        if state.presence_bytes.saturating_add(bytes) > limits.max_presence_bytes {
            return Err(Refusal::TooMuchFromAddress(
                "the server holds all the presence it may; try again later",
            ));
        }
        let Some(tracked) = state.addresses.get_mut(&self.address) else {
            return Ok(());
        };
        if tracked.presence_bytes.saturating_add(bytes) > limits.max_presence_bytes_per_address {
            return Err(Refusal::TooMuchFromAddress(
                "this address holds too much presence (members and join/leave watches)",
            ));
        }
        tracked.presence_bytes += bytes;
        state.presence_bytes += bytes;
        self.presence_bytes += bytes;
        Ok(())
    }

    /// Gives back `bytes` of presence this connection held.
    pub(crate) fn release_presence(&mut self, bytes: usize) {
        let bytes = bytes.min(self.presence_bytes);
        self.presence_bytes -= bytes;
        let mut state = self.admission.lock();
        state.presence_bytes = state.presence_bytes.saturating_sub(bytes);
        if let Some(tracked) = state.addresses.get_mut(&self.address) {
            tracked.presence_bytes = tracked.presence_bytes.saturating_sub(bytes);
        }
    }

    /// Counts `count` fewer channels followed.
    pub(crate) fn unsubscribe(&mut self, count: usize) {
        let count = count.min(self.subscriptions);
        self.subscriptions -= count;
        let mut state = self.admission.lock();
        if let Some(tracked) = state.addresses.get_mut(&self.address) {
            tracked.subscriptions = tracked.subscriptions.saturating_sub(count);
        }
        if let Some(user) = self
            .user
            .as_ref()
            .and_then(|user| state.users.get_mut(user))
        {
            user.subscriptions = user.subscriptions.saturating_sub(count);
        }
    }
}

impl Drop for AdmissionGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut state = self.admission.lock();
        state.connections = state.connections.saturating_sub(1);
        state.presence_bytes = state.presence_bytes.saturating_sub(self.presence_bytes);
        let forget = match state.addresses.get_mut(&self.address) {
            Some(tracked) => {
                tracked.connections = tracked.connections.saturating_sub(1);
                tracked.presence_bytes = tracked.presence_bytes.saturating_sub(self.presence_bytes);
                tracked.subscriptions = tracked.subscriptions.saturating_sub(self.subscriptions);
                tracked.idle(now)
            }
            None => false,
        };
        if forget {
            state.addresses.remove(&self.address);
        }
        if let Some(subject) = &self.user {
            let gone = state.users.get_mut(subject).is_some_and(|user| {
                user.connections = user.connections.saturating_sub(1);
                user.subscriptions = user.subscriptions.saturating_sub(self.subscriptions);
                user.connections == 0
            });
            if gone {
                state.users.remove(subject);
            }
        }
    }
}

/// A socket the edge accepted: counts against the global socket cap and its address until
/// dropped.
pub(crate) struct SocketGuard {
    admission: Arc<Admission>,
    address: IpAddr,
    per_address: bool,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut state = self.admission.lock();
        state.sockets = state.sockets.saturating_sub(1);
        if !self.per_address {
            return;
        }
        let forget = state
            .addresses
            .get_mut(&self.address)
            .is_some_and(|tracked| {
                tracked.sockets = tracked.sockets.saturating_sub(1);
                tracked.idle(now)
            });
        if forget {
            state.addresses.remove(&self.address);
        }
    }
}

impl std::fmt::Debug for AdmissionGuard {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AdmissionGuard")
            .field("address", &self.address)
            .field("subscriptions", &self.subscriptions)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn admission(configure: impl FnOnce(&mut TransportConfig)) -> Arc<Admission> {
        let mut config = TransportConfig::default();
        configure(&mut config);
        Arc::new(Admission::new(&config))
    }

    #[test]
    fn the_global_cap_refuses_and_a_leaving_connection_frees_its_place() {
        let admission = admission(|config| {
            config.max_connections = 2;
            config.max_connections_per_ip = 10;
        });
        let now = Instant::now();
        let first = admission.enter("10.0.0.1".parse().unwrap(), now).unwrap();
        let _second = admission.enter("10.0.0.2".parse().unwrap(), now).unwrap();
        assert_eq!(
            admission.enter("10.0.0.3".parse().unwrap(), now).err(),
            Some(Refusal::ServerFull)
        );
        drop(first);
        assert!(admission.enter("10.0.0.3".parse().unwrap(), now).is_ok());
    }

    #[test]
    fn per_address_caps_on_connections_rate_and_subscriptions() {
        let admission = admission(|config| {
            config.max_connections_per_ip = 3;
            config.connections_per_ip_per_second = 1.0;
            config.connection_burst_per_ip = 5;
            config.max_subscriptions_per_ip = 10;
        });
        let now = Instant::now();
        let address: IpAddr = "10.0.0.9".parse().unwrap();
        let mut held: Vec<_> = (0..3)
            .map(|_| admission.enter(address, now).unwrap())
            .collect();
        assert!(matches!(
            admission.enter(address, now),
            Err(Refusal::TooMuchFromAddress(_))
        ));
        // Another address is not affected.
        assert!(admission.enter("10.0.0.10".parse().unwrap(), now).is_ok());
        // Subscriptions: 10 over all of the address's connections.
        held[0].subscribe(6).unwrap();
        assert!(held[1].subscribe(5).is_err());
        held[1].subscribe(4).unwrap();
        held[0].unsubscribe(6);
        held[2].subscribe(6).unwrap();
        // Rate: the burst of 5 is spent after 2 more connects (3 above), then 1 a second.
        held.clear();
        assert!(admission.enter(address, now).is_ok());
        assert!(admission.enter(address, now).is_ok());
        assert!(matches!(
            admission.enter(address, now),
            Err(Refusal::TooMuchFromAddress(_))
        ));
        assert!(
            admission
                .enter(address, now + Duration::from_secs(1))
                .is_ok()
        );
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        assert_eq!(
            bucket_of("2001:db8:1:2:aaaa::1".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            bucket_of("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }
}
