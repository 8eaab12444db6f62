//! Signing keys from a JWKS URL (an identity provider's `/.well-known/jwks.json`), cached.
//!
//! The keys are fetched when first needed and again when the copy is older than its cache
//! time, or when a token names a `kid` the copy lacks (a key rotation), at most once per
//! `min_refetch` so that tokens with made-up `kid`s cannot make the server hammer the
//! provider. It fails closed: when the copy is too old and cannot be fetched again, tokens
//! are refused. Connections already open are not touched; they end at their own `exp`.

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
    cached: tokio::sync::Mutex<Cached>,
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
            cached: tokio::sync::Mutex::new(Cached::default()),
        })
    }

    /// The keys that may verify a token with `header`: from the cached copy while it is
    /// fresh, else from a new fetch; `UnknownKey` when none fits, `KeysUnavailable` when
    /// the copy is stale and cannot be fetched.
    pub async fn keys_for(&self, header: &TokenHeader) -> Result<Vec<VerifyingKey>, JwtError> {
        // One fetch at a time: verifications that arrive during it wait for its keys.
        let mut cached = self.cached.lock().await;
        let fresh = cached
            .fetched
            .is_some_and(|fetched| fetched.elapsed() < self.config.cache);
        if !fresh {
            // A stale copy is fetched again whenever it is needed, unless a fetch was just
            // tried (and failed): then the stale copy is refused without another request.
            let just_tried = cached.tried.is_some_and(|tried| {
                tried.elapsed() < self.config.min_refetch.min(self.config.cache)
            });
            if just_tried || self.fetch_into(&mut cached).await.is_err() {
                return Err(JwtError::KeysUnavailable(format!(
                    "the JWKS at {} cannot be fetched and the copy held is too old",
                    self.config.url
                )));
            }
        }
        let fitting = |cached: &Cached| -> Vec<VerifyingKey> {
            cached
                .keys
                .iter()
                .filter(|key| key.fits(header))
                .cloned()
                .collect()
        };
        let keys = fitting(&cached);
        if !keys.is_empty() {
            return Ok(keys);
        }
        // A `kid` the copy lacks: the provider may have rotated its keys since.
        let may_refetch = cached
            .tried
            .is_none_or(|tried| tried.elapsed() >= self.config.min_refetch);
        if may_refetch && self.fetch_into(&mut cached).await.is_ok() {
            let keys = fitting(&cached);
            if !keys.is_empty() {
                return Ok(keys);
            }
        }
        Err(JwtError::UnknownKey(header.kid.clone()))
    }

    async fn fetch_into(&self, cached: &mut Cached) -> Result<(), JwksError> {
        cached.tried = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
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
