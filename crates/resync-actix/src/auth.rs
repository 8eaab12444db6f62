//! Who may subscribe and publish: the [`Authorizer`] trait and a JWT implementation.
//!
//! Every transport authenticates a request once, when it arrives (for WebSocket, during the
//! HTTP upgrade, so a bad token gets 401 before any handshake), and asks the authorizer about
//! each channel as the client subscribes or publishes.
//!
//! Tokens are read from, in order: the `Authorization: Bearer` header, a cookie (name
//! configurable, default `resync_token`), and the `token` query parameter. The query parameter
//! exists because browsers cannot set headers on `EventSource` or `WebSocket`; URLs end up in
//! proxy logs and browser history, so it is meant for short-lived tokens only, and resync
//! redacts it from every log line it writes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use resync_protocol::Channel;

use crate::jwt::{self, JwtError};

/// A channel pattern: an exact name, `prefix*` (every channel starting with `prefix`, such as
/// `chat:*`), or `*` (every channel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelPattern(String);

impl ChannelPattern {
    /// A pattern from its text.
    pub fn new(pattern: impl Into<String>) -> Self {
        Self(pattern.into())
    }

    /// Whether `channel` matches.
    pub fn matches(&self, channel: &Channel) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => channel.as_str().starts_with(prefix),
            None => channel.as_str() == self.0,
        }
    }
}

fn any_matches(patterns: &[ChannelPattern], channel: &Channel) -> bool {
    patterns.iter().any(|pattern| pattern.matches(channel))
}

/// Where a request's token came from. Cookie credentials are sent by browsers automatically,
/// even by other sites' pages, so they require an `Origin` check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer …`.
    Header,
    /// A cookie.
    Cookie,
    /// The `token` query parameter.
    Query,
    /// A WebSocket `refresh` frame, replacing the connection's token.
    Refresh,
}

/// The credentials of a request.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// The token and where it came from; `None` for an anonymous request.
    pub token: Option<(String, TokenSource)>,
}

/// Who a request acts as, and until when.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The subject (user id); `None` when anonymous.
    pub subject: Option<String>,
    /// When the credentials expire; a connection is closed then (WebSocket close code 4300).
    pub expires_at: Option<SystemTime>,
    /// Channels this identity may subscribe to.
    pub subscribe: Vec<ChannelPattern>,
    /// Channels this identity may publish to.
    pub publish: Vec<ChannelPattern>,
    /// Channels whose members this identity may see; `None`: those it may subscribe to.
    pub presence: Option<Vec<ChannelPattern>>,
    /// Channels whose members this identity may appear among; `None`: those it may
    /// subscribe to.
    pub appear: Option<Vec<ChannelPattern>>,
    /// The info this identity appears among members with when its subscribe gives none (an
    /// application's proxy attaches it on connect).
    pub info: Option<resync_protocol::Payload>,
}

impl Identity {
    /// How long until the credentials expire, if they do.
    pub fn remaining(&self) -> Option<Duration> {
        self.expires_at.map(|expires_at| {
            expires_at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No usable credentials (missing, invalid or expired): 401, WebSocket close 4300.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// Valid credentials that do not allow this: 403.
    #[error("forbidden: {0}")]
    Forbidden(String),
}

/// Decides who a request is and what it may do.
#[async_trait]
pub trait Authorizer: Send + Sync + 'static {
    /// Turns credentials into an identity, or refuses them. Requests without a token arrive
    /// with `credentials.token == None`; return an anonymous identity to let them in.
    async fn authenticate(&self, credentials: &Credentials) -> Result<Identity, AuthError>;

    /// Whether `identity` may subscribe to `channel`.
    fn can_subscribe(&self, identity: &Identity, channel: &Channel) -> bool {
        any_matches(&identity.subscribe, channel)
    }

    /// Whether `identity` may publish on `channel`.
    fn can_publish(&self, identity: &Identity, channel: &Channel) -> bool {
        any_matches(&identity.publish, channel)
    }

    /// Whether `identity` may see who is in `channel` (the member list, the count, join and
    /// leave events): its `presence` patterns, or by default whoever may subscribe.
    fn can_see_presence(&self, identity: &Identity, channel: &Channel) -> bool {
        match &identity.presence {
            Some(patterns) => any_matches(patterns, channel),
            None => self.can_subscribe(identity, channel),
        }
    }

    /// Whether `identity` may appear among `channel`'s members: its `appear` patterns, or
    /// by default whoever may subscribe.
    fn can_join_presence(&self, identity: &Identity, channel: &Channel) -> bool {
        match &identity.appear {
            Some(patterns) => any_matches(patterns, channel),
            None => self.can_subscribe(identity, channel),
        }
    }
}

/// Lets everyone subscribe to every channel and nobody publish from a client: the
/// development default. Publishing goes through the server's API (with its API key) or the
/// app's own handlers.
#[derive(Clone, Debug, Default)]
pub struct AllowAllSubscribers;

#[async_trait]
impl Authorizer for AllowAllSubscribers {
    async fn authenticate(&self, _credentials: &Credentials) -> Result<Identity, AuthError> {
        Ok(Identity {
            subscribe: vec![ChannelPattern::new("*")],
            ..Identity::default()
        })
    }
}

/// Verifies JWTs (see [`jwt::Claims`]) signed with an HS256 secret, with public keys (RS256,
/// ES256, EdDSA) or with the keys of a JWKS URL: the token's `subscribe` and `publish` claims
/// list channel patterns, `exp` ends the connection, and `iss` and `aud` are checked when
/// [`expect`](Self::expect) says so. Requests without a token get the anonymous patterns
/// (none by default); when there are none, they get 401.
#[derive(Clone)]
pub struct JwtAuthorizer {
    /// The HS256 secret, as a key.
    secret: Option<jwt::VerifyingKey>,
    /// Public keys from PEM files.
    public_keys: Vec<jwt::VerifyingKey>,
    #[cfg(feature = "jwks")]
    jwks: Option<std::sync::Arc<crate::jwks::Jwks>>,
    expected: jwt::Expectations,
    anonymous_subscribe: Vec<ChannelPattern>,
    anonymous_publish: Vec<ChannelPattern>,
    max_token_lifetime: Option<Duration>,
}

/// The shortest HS256 secret accepted, in bytes: RFC 7518 section 3.2 asks for a key at least
/// as long as the hash (256 bits); a shorter one can be guessed offline from one token.
pub const MIN_SECRET_BYTES: usize = 32;

/// The fewest different bytes an HS256 secret must hold: 32 spaces or 32 times `a` are as
/// long as a good key and as easy to guess as one character (`openssl rand -hex 32` has 16).
pub const MIN_SECRET_DISTINCT_BYTES: usize = 8;

/// A JWT secret too short or too uniform to be safe (see [`MIN_SECRET_BYTES`] and
/// [`MIN_SECRET_DISTINCT_BYTES`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the JWT secret has {length} bytes, {distinct} of them different; at least \
     {MIN_SECRET_BYTES} bytes with {MIN_SECRET_DISTINCT_BYTES} different ones are required \
     (for example the output of `openssl rand -hex 32`)"
)]
pub struct WeakSecret {
    /// The length of the refused secret.
    pub length: usize,
    /// How many different bytes it holds.
    pub distinct: usize,
}

/// How many different bytes `bytes` holds.
pub fn distinct_bytes(bytes: &[u8]) -> usize {
    let mut seen = [false; 256];
    for &byte in bytes {
        seen[usize::from(byte)] = true;
    }
    seen.iter().filter(|seen| **seen).count()
}

impl std::fmt::Debug for JwtAuthorizer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("JwtAuthorizer")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("public_keys", &self.public_keys)
            .field("expected", &self.expected)
            .field("anonymous_subscribe", &self.anonymous_subscribe)
            .field("anonymous_publish", &self.anonymous_publish)
            .field("max_token_lifetime", &self.max_token_lifetime)
            .finish()
    }
}

impl JwtAuthorizer {
    /// An authorizer verifying tokens signed with `secret`; anonymous requests may do nothing.
    /// Refuses a secret shorter than [`MIN_SECRET_BYTES`]: with an empty or short one, anyone
    /// could sign tokens.
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<Self, WeakSecret> {
        let secret = secret.into();
        let distinct = distinct_bytes(&secret);
        let whitespace = secret.iter().all(u8::is_ascii_whitespace);
        if secret.len() < MIN_SECRET_BYTES || distinct < MIN_SECRET_DISTINCT_BYTES || whitespace {
            return Err(WeakSecret {
                length: secret.len(),
                distinct,
            });
        }
        let mut authorizer = Self::without_keys();
        authorizer.secret = Some(jwt::VerifyingKey::hs256(&secret));
        Ok(authorizer)
    }

    /// An authorizer verifying tokens signed with the private halves of `keys` (see
    /// [`jwt::VerifyingKey::from_pem`]); no HS256 secret.
    pub fn with_public_keys(keys: impl IntoIterator<Item = jwt::VerifyingKey>) -> Self {
        let mut authorizer = Self::without_keys();
        authorizer.public_keys = keys.into_iter().collect();
        authorizer
    }

    /// An authorizer verifying tokens with the keys of a JWKS; no HS256 secret.
    #[cfg(feature = "jwks")]
    pub fn with_jwks(jwks: crate::jwks::Jwks) -> Self {
        Self::without_keys().jwks(jwks)
    }

    /// Also accepts tokens signed with `key`.
    pub fn public_key(mut self, key: jwt::VerifyingKey) -> Self {
        self.public_keys.push(key);
        self
    }

    /// Also accepts tokens signed with the keys of `jwks` (after the PEM keys).
    #[cfg(feature = "jwks")]
    pub fn jwks(mut self, jwks: crate::jwks::Jwks) -> Self {
        self.jwks = Some(std::sync::Arc::new(jwks));
        self
    }

    /// Requires the tokens' `iss` and `aud` to say what `expected` says.
    pub fn expect(mut self, expected: jwt::Expectations) -> Self {
        self.expected = expected;
        self
    }

    fn without_keys() -> Self {
        Self {
            secret: None,
            public_keys: Vec::new(),
            #[cfg(feature = "jwks")]
            jwks: None,
            expected: jwt::Expectations::default(),
            anonymous_subscribe: Vec::new(),
            anonymous_publish: Vec::new(),
            max_token_lifetime: None,
        }
    }

    /// Verifies `token` with the first key that fits its header.
    async fn verify(&self, token: &str) -> Result<jwt::Claims, JwtError> {
        let header = jwt::header(token)?;
        #[cfg_attr(
            not(feature = "jwks"),
            allow(unused_mut, reason = "grown from the JWKS")
        )]
        let mut keys: Vec<jwt::VerifyingKey> = self
            .secret
            .iter()
            .chain(&self.public_keys)
            .filter(|key| key.fits(&header))
            .cloned()
            .collect();
        #[cfg(feature = "jwks")]
        if keys.is_empty()
            && header.alg != "HS256"
            && let Some(jwks) = &self.jwks
        {
            keys = jwks.keys_for(&header).await?;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let mut refusal = JwtError::UnsupportedAlgorithm(header.alg.clone());
        for key in &keys {
            match jwt::verify_with(token, key, &self.expected, now) {
                Ok(claims) => return Ok(claims),
                Err(error) => refusal = error,
            }
        }
        Err(refusal)
    }

    /// Refuses tokens whose `exp` lies further than `lifetime` in the future, so that a leaked
    /// long-lived token is worth less. Defaults to no limit.
    pub fn max_token_lifetime(mut self, lifetime: Option<Duration>) -> Self {
        self.max_token_lifetime = lifetime;
        self
    }

    /// Lets requests without a token subscribe to channels matching `patterns` (for example
    /// `public:*` for a whole namespace). Defaults to none.
    pub fn anonymous_subscribe(
        mut self,
        patterns: impl IntoIterator<Item = ChannelPattern>,
    ) -> Self {
        self.anonymous_subscribe = patterns.into_iter().collect();
        self
    }

    /// Lets requests without a token publish on channels matching `patterns`. Defaults to none.
    pub fn anonymous_publish(mut self, patterns: impl IntoIterator<Item = ChannelPattern>) -> Self {
        self.anonymous_publish = patterns.into_iter().collect();
        self
    }
}

#[async_trait]
impl Authorizer for JwtAuthorizer {
    async fn authenticate(&self, credentials: &Credentials) -> Result<Identity, AuthError> {
        let Some((token, _)) = &credentials.token else {
            if self.anonymous_subscribe.is_empty() && self.anonymous_publish.is_empty() {
                return Err(AuthError::Unauthorized(
                    "a token is required: anonymous clients may do nothing here".to_owned(),
                ));
            }
            return Ok(Identity {
                subscribe: self.anonymous_subscribe.clone(),
                publish: self.anonymous_publish.clone(),
                ..Identity::default()
            });
        };
        let claims = self.verify(token).await.map_err(|error| match error {
            JwtError::Expired => AuthError::Unauthorized("token expired".to_owned()),
            other => AuthError::Unauthorized(other.to_string()),
        })?;
        // Checked: `exp` is the signer's number, and SystemTime + Duration panics on overflow.
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.exp))
            .ok_or_else(|| AuthError::Unauthorized("token expiry is out of range".to_owned()))?;
        // The signature check allows `exp` some leeway, but a connection ends at `exp`
        // (docs/decisions.md): one opened past it would end as it starts, and its client would
        // come back at once, a reconnect loop (and short polling on long polling) until the
        // leeway ran out.
        let remaining = expires_at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        if remaining.is_zero() {
            return Err(AuthError::Unauthorized("token expired".to_owned()));
        }
        if let Some(lifetime) = self.max_token_lifetime
            && remaining > lifetime
        {
            return Err(AuthError::Unauthorized(format!(
                "token lives longer than the {} s this server accepts",
                lifetime.as_secs()
            )));
        }
        Ok(Identity {
            subject: claims.sub,
            expires_at: Some(expires_at),
            subscribe: claims
                .subscribe
                .into_iter()
                .map(ChannelPattern::new)
                .collect(),
            publish: claims
                .publish
                .into_iter()
                .map(ChannelPattern::new)
                .collect(),
            presence: claims
                .presence
                .map(|patterns| patterns.into_iter().map(ChannelPattern::new).collect()),
            appear: claims
                .appear
                .map(|patterns| patterns.into_iter().map(ChannelPattern::new).collect()),
            info: None,
        })
    }
}

/// Removes the value of `token=` from a URL query, for logging. Names are compared decoded,
/// as the transports read them: `%74oken=` is a token too.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| {
            let name = pair.split_once('=').map_or(pair, |(name, _)| name);
            let decoded: String = form_urlencoded::parse(name.as_bytes())
                .map(|(key, _)| key.into_owned())
                .collect();
            if decoded == "token" {
                format!("{name}=<redacted>")
            } else {
                pair.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exactly_or_by_prefix() {
        let channel = Channel::new("chat:room-1").unwrap();
        assert!(ChannelPattern::new("chat:*").matches(&channel));
        assert!(ChannelPattern::new("*").matches(&channel));
        assert!(ChannelPattern::new("chat:room-1").matches(&channel));
        assert!(!ChannelPattern::new("chat:room").matches(&channel));
        assert!(!ChannelPattern::new("news:*").matches(&channel));
    }

    #[test]
    fn query_tokens_are_redacted() {
        assert_eq!(
            redact_query("channel=a&token=secret.jwt.value&x=1"),
            "channel=a&token=<redacted>&x=1"
        );
    }

    #[test]
    fn defect_9_11_percent_encoded_token_names_are_redacted_too() {
        for query in ["%74oken=secret", "tok%65n=secret", "%74%6F%6B%65%6E=secret"] {
            let redacted = redact_query(query);
            assert!(
                !redacted.contains("secret") && redacted.ends_with("=<redacted>"),
                "{query} -> {redacted}"
            );
        }
    }

    const SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

    fn bearer(token: String) -> Credentials {
        Credentials {
            token: Some((token, TokenSource::Header)),
        }
    }

    fn seconds_from_now(seconds: u64) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + seconds
    }

    #[test]
    fn empty_and_short_secrets_are_refused() {
        assert_eq!(JwtAuthorizer::new("").unwrap_err().length, 0);
        assert_eq!(JwtAuthorizer::new(vec![7u8; 31]).unwrap_err().length, 31);
        assert!(JwtAuthorizer::new(b"0123456789abcdef0123456789abcdef".to_vec()).is_ok());
        // Long enough, but one byte over and over: refused (issue 25, L5).
        for uniform in [vec![b' '; 32], vec![b'a'; 64], vec![7u8; 32]] {
            assert!(JwtAuthorizer::new(uniform).is_err());
        }
    }

    #[tokio::test]
    async fn a_token_expiring_past_the_clock_range_is_refused_without_panic() {
        let authorizer = JwtAuthorizer::new(SECRET).unwrap();
        for exp in [1u64 << 63, u64::MAX] {
            let token = jwt::sign(
                &jwt::Claims {
                    exp,
                    subscribe: vec!["*".into()],
                    ..Default::default()
                },
                SECRET,
            );
            let result = authorizer.authenticate(&bearer(token)).await;
            assert!(
                matches!(&result, Err(AuthError::Unauthorized(message)) if message.contains("out of range")),
                "exp {exp}: {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn tokens_living_longer_than_the_maximum_are_refused() {
        let authorizer = JwtAuthorizer::new(SECRET)
            .unwrap()
            .max_token_lifetime(Some(Duration::from_secs(3_600)));
        let claims = |exp| jwt::Claims {
            exp,
            subscribe: vec!["*".into()],
            ..Default::default()
        };
        let short = jwt::sign(&claims(seconds_from_now(600)), SECRET);
        assert!(authorizer.authenticate(&bearer(short)).await.is_ok());
        let long = jwt::sign(&claims(seconds_from_now(86_400)), SECRET);
        assert!(matches!(
            authorizer.authenticate(&bearer(long)).await,
            Err(AuthError::Unauthorized(_))
        ));
    }

    #[tokio::test]
    async fn without_anonymous_patterns_a_missing_token_is_unauthorized() {
        let authorizer = JwtAuthorizer::new(SECRET).unwrap();
        assert!(matches!(
            authorizer.authenticate(&Credentials::default()).await,
            Err(AuthError::Unauthorized(_))
        ));
    }

    #[tokio::test]
    async fn jwt_authorizer_reads_claims_and_anonymous_patterns() {
        let authorizer = JwtAuthorizer::new(SECRET)
            .unwrap()
            .anonymous_subscribe([ChannelPattern::new("public:*")]);
        let anonymous = authorizer
            .authenticate(&Credentials::default())
            .await
            .unwrap();
        assert!(authorizer.can_subscribe(&anonymous, &Channel::new("public:news").unwrap()));
        assert!(!authorizer.can_subscribe(&anonymous, &Channel::new("private").unwrap()));

        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        let token = jwt::sign(
            &jwt::Claims {
                sub: Some("bob".into()),
                exp,
                publish: vec!["chat:*".into()],
                ..Default::default()
            },
            SECRET,
        );
        let credentials = Credentials {
            token: Some((token, TokenSource::Header)),
        };
        let bob = authorizer.authenticate(&credentials).await.unwrap();
        assert_eq!(bob.subject.as_deref(), Some("bob"));
        assert!(authorizer.can_publish(&bob, &Channel::new("chat:1").unwrap()));
        assert!(!authorizer.can_subscribe(&bob, &Channel::new("chat:1").unwrap()));

        let bad = Credentials {
            token: Some(("nonsense".into(), TokenSource::Query)),
        };
        assert!(matches!(
            authorizer.authenticate(&bad).await,
            Err(AuthError::Unauthorized(_))
        ));
    }
}
