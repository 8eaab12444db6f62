//! Signing keys from a JWKS URL (an identity provider's `/.well-known/jwks.json`), cached.
//!
//! The keys are fetched when first needed and again when the copy is older than its cache
//! time, or when a token names a `kid` the copy lacks (a key rotation), at most once per
//! `min_refetch` so that tokens with made-up `kid`s cannot make the server hammer the
//! provider. It fails closed: when the copy is too old and cannot be fetched again, tokens
//! are refused. Connections already open are not touched; they end at their own `exp`.
//!
//! No lock is held across a fetch: a token whose key the fresh copy holds is verified at
//! once, whatever fetch is under way (issue 25, item 13: tokens with made-up `kid`s used to
//! make every login wait for a slow provider). A token with an unknown `kid` starts a
//! refetch or, while one is under way, is refused without waiting for it.

use std::time::{Duration, Instant};

use crate::jwt::{JwtError, TokenHeader, VerifyingKey};

/// The largest JWKS document read, in bytes: a real one is a few kilobytes.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// How a JWKS is fetched and cached.
#[derive(Clone, Debug)]
pub struct JwksConfig {
    /// The document's URL (`https://…/.well-known/jwks.json`).
    pub url: String,
    /// How long a fetched copy is used before it is fetched again. Defaults to 5 minutes.
    pub cache: Duration,
    /// The least time between two fetches caused by unknown `kid`s. Defaults to 10 seconds.
    pub min_refetch: Duration,
    /// How long one fetch may take. Defaults to 5 seconds.
    pub timeout: Duration,
}

impl JwksConfig {
    /// The defaults, for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            cache: Duration::from_secs(300),
            min_refetch: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
        }
    }
}

/// A cached JWKS.
#[derive(Debug)]
pub struct Jwks {
    config: JwksConfig,
    http: reqwest::Client,
    /// The copy held; its lock is never held across an await.
    cached: std::sync::Mutex<Cached>,
    /// Held by the one fetch under way.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Cached {
    keys: Vec<VerifyingKey>,
    /// When the keys were last fetched successfully.
    fetched: Option<Instant>,
    /// When a fetch was last tried, whatever came of it.
    tried: Option<Instant>,
}

/// The JWKS could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JWKS {url}: {why}")]
pub struct JwksError {
    url: String,
    why: String,
}

impl Jwks {
    /// A JWKS read from `config.url`; nothing is fetched until a token needs it.
    pub fn new(config: JwksConfig) -> Result<Self, JwksError> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|error| JwksError {
                url: config.url.clone(),
                why: error.to_string(),
            })?;
        Ok(Self {
            config,
            http,
            cached: std::sync::Mutex::new(Cached::default()),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    fn cached(&self) -> std::sync::MutexGuard<'_, Cached> {
        self.cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The keys of the copy held that fit `header`, and whether the copy is fresh.
    fn held_keys(&self, header: &TokenHeader) -> (Vec<VerifyingKey>, bool) {
        let cached = self.cached();
        let fresh = cached
            .fetched
            .is_some_and(|fetched| fetched.elapsed() < self.config.cache);
        let keys = cached
            .keys
            .iter()
            .filter(|key| key.fits(header))
            .cloned()
            .collect();
        (keys, fresh)
    }

    /// Whether a fetch was tried less than `within` ago.
    fn tried_within(&self, within: Duration) -> bool {
        self.cached()
            .tried
            .is_some_and(|tried| tried.elapsed() < within)
    }

    /// The keys that may verify a token with `header`: from the cached copy while it is
    /// fresh, else from a new fetch; `UnknownKey` when none fits, `KeysUnavailable` when
    /// the copy is stale and cannot be fetched.
    pub async fn keys_for(&self, header: &TokenHeader) -> Result<Vec<VerifyingKey>, JwtError> {
        let (keys, fresh) = self.held_keys(header);
        if fresh && !keys.is_empty() {
            return Ok(keys);
        }
        if fresh {
            // A `kid` the copy lacks: the provider may have rotated its keys since. One
            // refetch per `min_refetch` at most, and never a wait for someone else's.
            if self.tried_within(self.config.min_refetch) {
                return Err(JwtError::UnknownKey(header.kid.clone()));
            }
            let Ok(_fetching) = self.fetching.try_lock() else {
                return Err(JwtError::UnknownKey(header.kid.clone()));
            };
            if !self.tried_within(self.config.min_refetch) {
                let _ = self.fetch_into().await;
            }
            let (keys, _) = self.held_keys(header);
            if keys.is_empty() {
                return Err(JwtError::UnknownKey(header.kid.clone()));
            }
            return Ok(keys);
        }
        // A stale copy (or none yet): every token needs the fetch; they wait for one.
        let _fetching = self.fetching.lock().await;
        let (keys, fresh) = self.held_keys(header);
        if !fresh {
            // Fetched again whenever needed, unless a fetch was just tried (and failed):
            // then the stale copy is refused without another request.
            let just_tried = self.tried_within(self.config.min_refetch.min(self.config.cache));
            if just_tried || self.fetch_into().await.is_err() {
                return Err(JwtError::KeysUnavailable(format!(
                    "the JWKS at {} cannot be fetched and the copy held is too old",
                    self.config.url
                )));
            }
            let (keys, _) = self.held_keys(header);
            if keys.is_empty() {
                return Err(JwtError::UnknownKey(header.kid.clone()));
            }
            return Ok(keys);
        }
        if keys.is_empty() {
            return Err(JwtError::UnknownKey(header.kid.clone()));
        }
        Ok(keys)
    }

    /// Fetches the document and, when it is good, makes it the copy held. Called by the one
    /// holder of `fetching`; the copy's lock is taken only around the updates.
    async fn fetch_into(&self) -> Result<(), JwksError> {
        self.cached().tried = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                let mut cached = self.cached();
                cached.keys = keys;
                cached.fetched = Some(Instant::now());
                Ok(())
            }
            Err(error) => {
                tracing::warn!(target: "resync::auth", %error, "JWKS fetch failed");
                Err(error)
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<VerifyingKey>, JwksError> {
        let fail = |why: String| JwksError {
            url: self.config.url.clone(),
            why,
        };
        let mut response = self
            .http
            .get(&self.config.url)
            .send()
            .await
            .map_err(|error| fail(error.to_string()))?;
        if !response.status().is_success() {
            return Err(fail(format!("answered {}", response.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| fail(error.to_string()))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(fail(format!("larger than {MAX_JWKS_BYTES} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        let keys = VerifyingKey::from_jwks(&body).map_err(|error| fail(error.to_string()))?;
        if keys.is_empty() {
            return Err(fail(
                "no RS256, ES256 or EdDSA signing key in it".to_owned(),
            ));
        }
        Ok(keys)
    }
}
