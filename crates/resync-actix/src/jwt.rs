//! JSON Web Tokens: verifying (and, for tests and tooling, signing) the tokens resync accepts.
//!
//! Signatures are the `jsonwebtoken` crate's (on `ring`, which the TLS stack already
//! builds); what resync adds is the choice of key and the claims it reads. A token is checked
//! against a [`VerifyingKey`]: an HS256 secret, or a public key (RS256, ES256, EdDSA) from a
//! PEM file or a JWKS. The header's `alg` must be the key's algorithm exactly, which closes
//! the "alg: none" and algorithm-confusion holes (an RS256 public key is never used as an
//! HMAC secret). `exp` is required; `exp`, `nbf`, `iss` and `aud` are checked here with
//! [`LEEWAY_SECONDS`] of clock skew, against a time the caller may give.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde::{Deserialize, Serialize};

/// The claims resync reads from a token.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The subject (user id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, in seconds since the Unix epoch. Required.
    pub exp: u64,
    /// Not valid before, in seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// The issuer; checked when the server is configured with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The audiences (one string or an array); checked when the server is configured with
    /// its own.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "one_or_many"
    )]
    pub aud: Vec<String>,
    /// Channel patterns the bearer may subscribe to (`news`, `chat:*`, `*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscribe: Vec<String>,
    /// Channel patterns the bearer may publish to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    /// Channel patterns whose members the bearer may see (list, count, joins and leaves).
    /// Absent: those it may subscribe to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<Vec<String>>,
    /// Channel patterns whose members the bearer may appear among. Absent: those it may
    /// subscribe to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appear: Option<Vec<String>>,
}

/// RFC 7519 lets `aud` be one string or an array of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(one) => vec![one],
        OneOrMany::Many(many) => many,
    })
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The token is not three base64url parts of JSON.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header names an algorithm this server has no key for.
    #[error("unsupported token algorithm {0}")]
    UnsupportedAlgorithm(String),
    /// The header names a key (`kid`) this server does not know, even after asking its JWKS.
    #[error("unknown signing key {0:?}")]
    UnknownKey(Option<String>),
    /// The keys cannot be had now (the JWKS cannot be fetched and the cached copy is too old):
    /// tokens are refused, not let through.
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
    /// The signature does not match.
    #[error("bad token signature")]
    BadSignature,
    /// The token's `exp` has passed.
    #[error("token expired")]
    Expired,
    /// The token's `nbf` is in the future.
    #[error("token not valid yet")]
    NotYetValid,
    /// The token's `iss` is not the configured issuer.
    #[error("token issuer is not accepted")]
    WrongIssuer,
    /// None of the token's `aud` is a configured audience.
    #[error("token audience is not accepted")]
    WrongAudience,
}

/// A key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable key: {0}")]
pub struct KeyError(pub String);

/// Seconds of clock difference tolerated between the token issuer and this server.
pub const LEEWAY_SECONDS: u64 = 30;

/// What a token's header says about its signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHeader {
    /// The `alg`, as written.
    pub alg: String,
    /// The `kid`, when there is one.
    pub kid: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    /// Extensions the token says its reader must understand (RFC 7515 4.1.11).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    crit: Option<serde_json::Value>,
}

/// Reads a token's header without checking anything else: which key to verify it with.
pub fn header(token: &str) -> Result<TokenHeader, JwtError> {
    use base64::Engine;
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::Malformed("header is not base64url"))?;
    let raw: RawHeader =
        serde_json::from_slice(&json).map_err(|_| JwtError::Malformed("header is not json"))?;
    if raw.crit.is_some() {
        // RFC 7515 4.1.11: a token naming extensions its reader must understand is refused
        // by a reader that understands none of them.
        return Err(JwtError::Malformed(
            "header names critical extensions (crit) this server does not understand",
        ));
    }
    Ok(TokenHeader {
        alg: raw.alg,
        kid: raw.kid,
    })
}

/// A key tokens are verified with, and the one algorithm it accepts.
#[derive(Clone)]
pub struct VerifyingKey {
    algorithm: Algorithm,
    key: DecodingKey,
    kid: Option<String>,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("VerifyingKey")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// An HS256 secret.
    pub fn hs256(secret: &[u8]) -> Self {
        Self {
            algorithm: Algorithm::HS256,
            key: DecodingKey::from_secret(secret),
            kid: None,
        }
    }

    /// A public key in PEM (`-----BEGIN PUBLIC KEY-----`, or an RSA key's PKCS#1 form): an
    /// RSA key verifies RS256, a P-256 key ES256, an Ed25519 key EdDSA.
    pub fn from_pem(pem: &[u8], kid: Option<String>) -> Result<Self, KeyError> {
        let (algorithm, key) = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            (Algorithm::RS256, key)
        } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
            (Algorithm::ES256, key)
        } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
            (Algorithm::EdDSA, key)
        } else {
            return Err(KeyError(
                "not a PEM RSA, P-256 or Ed25519 public key".to_owned(),
            ));
        };
        Ok(Self {
            algorithm,
            key,
            kid,
        })
    }

    /// The keys of a JWKS document (RFC 7517) that resync can use: RSA (RS256), P-256
    /// (ES256) and Ed25519 (EdDSA) keys meant for signatures; others are skipped.
    pub fn from_jwks(json: &[u8]) -> Result<Vec<Self>, KeyError> {
        use jsonwebtoken::jwk::{
            AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse,
        };
        let set: JwkSet = serde_json::from_slice(json)
            .map_err(|error| KeyError(format!("not a JWKS: {error}")))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            if matches!(&jwk.common.public_key_use, Some(usage) if *usage != PublicKeyUse::Signature)
            {
                continue;
            }
            let inferred = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
                AlgorithmParameters::EllipticCurve(params)
                    if params.curve == EllipticCurve::P256 =>
                {
                    Some(Algorithm::ES256)
                }
                AlgorithmParameters::OctetKeyPair(params)
                    if params.curve == EllipticCurve::Ed25519 =>
                {
                    Some(Algorithm::EdDSA)
                }
                _ => None,
            };
            let algorithm = match jwk.common.key_algorithm {
                None => inferred,
                Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
                Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
                Some(KeyAlgorithm::EdDSA) => Some(Algorithm::EdDSA),
                Some(_) => None,
            };
            // A key whose stated algorithm does not fit its type is skipped, not trusted.
            let (Some(algorithm), true) = (algorithm, algorithm == inferred) else {
                continue;
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            keys.push(Self {
                algorithm,
                key,
                kid: jwk.common.key_id.clone(),
            });
        }
        Ok(keys)
    }

    /// The key's id, if it has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// Whether this key verifies tokens whose header says `header`: the same algorithm, and
    /// the same `kid` when both name one.
    pub fn fits(&self, header: &TokenHeader) -> bool {
        algorithm_name(self.algorithm) == header.alg
            && match (&self.kid, &header.kid) {
                (Some(mine), Some(theirs)) => mine == theirs,
                _ => true,
            }
    }
}

fn algorithm_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        _ => "",
    }
}

/// What a token's claims must also say, beyond a good signature and a live `exp`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expectations {
    /// The `iss` required, if any.
    pub issuer: Option<String>,
    /// Audiences accepted (the token's `aud` must name one), if any.
    pub audience: Vec<String>,
}

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Signs `claims` with `secret` as an HS256 token.
pub fn sign(claims: &Claims, secret: &[u8]) -> String {
    let header = jsonwebtoken::Header {
        typ: Some("JWT".to_owned()),
        ..jsonwebtoken::Header::new(Algorithm::HS256)
    };
    // HMAC takes any key and these claims always serialize: this cannot fail.
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).unwrap_or_default()
}

/// Verifies an HS256 `token` with `secret` and checks `exp` and `nbf` against now.
pub fn verify(token: &str, secret: &[u8]) -> Result<Claims, JwtError> {
    verify_at(token, secret, now_seconds())
}

/// Like [`verify`], at a given time (seconds since the Unix epoch).
pub fn verify_at(token: &str, secret: &[u8], now: u64) -> Result<Claims, JwtError> {
    verify_with(
        token,
        &VerifyingKey::hs256(secret),
        &Expectations::default(),
        now,
    )
}

/// Verifies `token` with `key` at `now` (seconds since the Unix epoch): the header's `alg`
/// must be the key's, the signature must match, `exp` (required) and `nbf` must hold within
/// [`LEEWAY_SECONDS`], and the claims must meet `expected`.
pub fn verify_with(
    token: &str,
    key: &VerifyingKey,
    expected: &Expectations,
    now: u64,
) -> Result<Claims, JwtError> {
    let header = header(token)?;
    if header.alg != algorithm_name(key.algorithm) {
        return Err(JwtError::UnsupportedAlgorithm(header.alg));
    }
    // The signature and the claims' shape here; times and names below, where `now` is ours.
    let mut validation = Validation::new(key.algorithm);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
        .map_err(|error| {
            use jsonwebtoken::errors::ErrorKind;
            match error.kind() {
                ErrorKind::InvalidSignature => JwtError::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    JwtError::UnsupportedAlgorithm(algorithm_name(key.algorithm).to_owned())
                }
                ErrorKind::Json(_) => JwtError::Malformed("claims are not valid json with exp"),
                ErrorKind::Utf8(_) => JwtError::Malformed("claims are not utf-8"),
                ErrorKind::Base64(_) => JwtError::Malformed("a part is not base64url"),
                _ => JwtError::BadSignature,
            }
        })?
        .claims;
    if claims.exp.saturating_add(LEEWAY_SECONDS) <= now {
        return Err(JwtError::Expired);
    }
    if let Some(not_before) = claims.nbf
        && not_before > now.saturating_add(LEEWAY_SECONDS)
    {
        return Err(JwtError::NotYetValid);
    }
    if let Some(issuer) = &expected.issuer
        && claims.iss.as_ref() != Some(issuer)
    {
        return Err(JwtError::WrongIssuer);
    }
    if !expected.audience.is_empty()
        && !claims
            .aud
            .iter()
            .any(|audience| expected.audience.contains(audience))
    {
        return Err(JwtError::WrongAudience);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: Some("alice".to_owned()),
            exp,
            subscribe: vec!["chat:*".to_owned()],
            ..Claims::default()
        }
    }

    #[test]
    fn signed_tokens_verify() {
        let token = sign(&claims(2_000), b"secret");
        assert_eq!(verify_at(&token, b"secret", 1_000).unwrap(), claims(2_000));
    }

    #[test]
    fn rfc7515_hs256_example_signature_checks() {
        // RFC 7515 appendix A.1 (its claims have no resync-specific fields, and exp 1300819380).
        let token = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        let key = URL_SAFE_NO_PAD
            .decode("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow")
            .unwrap();
        let verified = verify_at(token, &key, 1_300_000_000).unwrap();
        assert_eq!(verified.exp, 1_300_819_380);
        assert_eq!(
            verify_at(token, b"wrong key", 1_300_000_000),
            Err(JwtError::BadSignature)
        );
    }

    #[test]
    fn bad_tokens_are_refused_with_the_right_reason() {
        let token = sign(&claims(2_000), b"secret");
        assert_eq!(
            verify_at(&token, b"other", 1_000),
            Err(JwtError::BadSignature)
        );
        assert_eq!(
            verify_at(&token, b"secret", 2_000 + LEEWAY_SECONDS),
            Err(JwtError::Expired)
        );
        assert!(matches!(
            verify_at("a.b", b"secret", 0),
            Err(JwtError::Malformed(_))
        ));
        assert!(matches!(
            verify_at("", b"secret", 0),
            Err(JwtError::Malformed(_))
        ));
        // alg "none" with an empty signature.
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let body = token.split('.').nth(1).unwrap();
        assert_eq!(
            verify_at(&format!("{none_header}.{body}."), b"secret", 1_000),
            Err(JwtError::UnsupportedAlgorithm("none".to_owned()))
        );
        // Tampered claims.
        let forged_claims = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(9_999)).unwrap());
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = &forged_claims;
        assert_eq!(
            verify_at(&parts.join("."), b"secret", 1_000),
            Err(JwtError::BadSignature)
        );
    }

    const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/keys/");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{KEYS}{name}")).unwrap()
    }

    fn signed(algorithm: Algorithm, private: &str, kid: Option<&str>, claims: &Claims) -> String {
        let pem = fixture(private);
        let key = match algorithm {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .unwrap();
        let header = jsonwebtoken::Header {
            kid: kid.map(str::to_owned),
            ..jsonwebtoken::Header::new(algorithm)
        };
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    #[test]
    fn rs256_es256_and_eddsa_tokens_verify_with_pem_and_jwks_keys() {
        let jwks = format!(
            r#"{{"keys":[{},{},{}]}}"#,
            String::from_utf8(fixture("rsa.jwk.json")).unwrap(),
            String::from_utf8(fixture("ec.jwk.json")).unwrap(),
            String::from_utf8(fixture("ed.jwk.json")).unwrap()
        );
        let from_jwks = VerifyingKey::from_jwks(jwks.as_bytes()).unwrap();
        assert_eq!(from_jwks.len(), 3);
        for (algorithm, name, kid) in [
            (Algorithm::RS256, "rsa", "rsa-1"),
            (Algorithm::ES256, "ec", "ec-1"),
            (Algorithm::EdDSA, "ed", "ed-1"),
        ] {
            let token = signed(algorithm, &format!("{name}.key"), Some(kid), &claims(2_000));
            let pem = VerifyingKey::from_pem(&fixture(&format!("{name}.pub")), None).unwrap();
            let expected = Expectations::default();
            assert_eq!(
                verify_with(&token, &pem, &expected, 1_000).unwrap(),
                claims(2_000)
            );
            let header = header(&token).unwrap();
            let key = from_jwks.iter().find(|key| key.fits(&header)).unwrap();
            assert_eq!(key.kid(), Some(kid));
            assert_eq!(
                verify_with(&token, key, &expected, 1_000).unwrap(),
                claims(2_000)
            );
            // Another key of the same kind does not verify it.
            let other = VerifyingKey::from_pem(&fixture("rsa2.pub"), None).unwrap();
            if algorithm == Algorithm::RS256 {
                assert_eq!(
                    verify_with(&token, &other, &expected, 1_000),
                    Err(JwtError::BadSignature)
                );
            } else {
                assert!(matches!(
                    verify_with(&token, &other, &expected, 1_000),
                    Err(JwtError::UnsupportedAlgorithm(_))
                ));
            }
        }
    }

    #[test]
    fn a_public_key_is_never_used_as_an_hmac_secret() {
        // The classic confusion: an HS256 token "signed" with the RSA public key's PEM.
        let public = fixture("rsa.pub");
        let forged = sign(&claims(2_000), &public);
        let key = VerifyingKey::from_pem(&public, None).unwrap();
        assert_eq!(
            verify_with(&forged, &key, &Expectations::default(), 1_000),
            Err(JwtError::UnsupportedAlgorithm("HS256".to_owned()))
        );
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let token = sign(
            &Claims {
                iss: Some("https://id.example.com".to_owned()),
                aud: vec!["chat".to_owned(), "api".to_owned()],
                ..claims(2_000)
            },
            b"secret",
        );
        let key = VerifyingKey::hs256(b"secret");
        let expect = |issuer: Option<&str>, audience: &[&str]| Expectations {
            issuer: issuer.map(str::to_owned),
            audience: audience.iter().map(|name| (*name).to_owned()).collect(),
        };
        assert!(
            verify_with(
                &token,
                &key,
                &expect(Some("https://id.example.com"), &["api"]),
                1_000
            )
            .is_ok()
        );
        assert_eq!(
            verify_with(
                &token,
                &key,
                &expect(Some("https://evil.example.com"), &[]),
                1_000
            ),
            Err(JwtError::WrongIssuer)
        );
        assert_eq!(
            verify_with(&token, &key, &expect(None, &["billing"]), 1_000),
            Err(JwtError::WrongAudience)
        );
        // `aud` as one string reads as a list of one.
        let one = sign(
            &Claims {
                aud: vec!["api".to_owned()],
                ..claims(2_000)
            },
            b"secret",
        );
        let text = String::from_utf8(
            URL_SAFE_NO_PAD
                .decode(one.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert!(text.contains(r#""aud":["api"]"#), "{text}");
        let raw = r#"{"exp":2000,"aud":"api"}"#;
        let claims: Claims = serde_json::from_str(raw).unwrap();
        assert_eq!(claims.aud, ["api"]);
    }
}
