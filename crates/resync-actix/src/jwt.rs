//! HS256 JSON Web Tokens: just enough of RFC 7519 to verify (and, for tests and tooling, sign)
//! the tokens resync accepts.
//!
//! Only `HS256` is accepted; the header's `alg` must say exactly that, which closes the
//! "alg: none" and algorithm-confusion holes. The signature is compared in constant time.
//! Written against `hmac`/`sha2` rather than a general JWT crate because HS256 is all resync
//! needs, and general crates pull in RSA and elliptic-curve stacks that double the build.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

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

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The token is not three base64url parts of JSON.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header names an algorithm other than HS256.
    #[error("unsupported token algorithm; only HS256 is accepted")]
    UnsupportedAlgorithm,
    /// The signature does not match.
    #[error("bad token signature")]
    BadSignature,
    /// The token's `exp` has passed.
    #[error("token expired")]
    Expired,
    /// The token's `nbf` is in the future.
    #[error("token not valid yet")]
    NotYetValid,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// Seconds of clock difference tolerated between the token issuer and this server.
pub const LEEWAY_SECONDS: u64 = 30;

fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Signs `claims` with `secret` as an HS256 token.
pub fn sign(claims: &Claims, secret: &[u8]) -> String {
    let header = Header {
        alg: "HS256".to_owned(),
        typ: Some("JWT".to_owned()),
    };
    // Serializing these plain structs cannot fail.
    let header = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap_or_default());
    let claims = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let signing_input = format!("{header}.{claims}");
    let signature = URL_SAFE_NO_PAD.encode(
        mac(secret, signing_input.as_bytes())
            .finalize()
            .into_bytes(),
    );
    format!("{signing_input}.{signature}")
}

fn mac(secret: &[u8], input: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("hmac takes any key length"));
    mac.update(input);
    mac
}

/// Verifies an HS256 `token` with `secret` and checks `exp` and `nbf` against now.
pub fn verify(token: &str, secret: &[u8]) -> Result<Claims, JwtError> {
    verify_at(token, secret, now_seconds())
}

/// Like [`verify`], at a given time (seconds since the Unix epoch).
pub fn verify_at(token: &str, secret: &[u8], now: u64) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    let header_json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::Malformed("header is not base64url"))?;
    let parsed_header: Header = serde_json::from_slice(&header_json)
        .map_err(|_| JwtError::Malformed("header is not json"))?;
    if parsed_header.alg != "HS256" {
        return Err(JwtError::UnsupportedAlgorithm);
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| JwtError::Malformed("signature is not base64url"))?;
    let signing_input_length = header.len() + 1 + claims.len();
    mac(secret, &token.as_bytes()[..signing_input_length])
        .verify_slice(&signature)
        .map_err(|_| JwtError::BadSignature)?;
    let claims_json = URL_SAFE_NO_PAD
        .decode(claims)
        .map_err(|_| JwtError::Malformed("claims are not base64url"))?;
    let claims: Claims = serde_json::from_slice(&claims_json)
        .map_err(|_| JwtError::Malformed("claims are not valid json with exp"))?;
    if claims.exp.saturating_add(LEEWAY_SECONDS) <= now {
        return Err(JwtError::Expired);
    }
    if let Some(not_before) = claims.nbf
        && not_before > now.saturating_add(LEEWAY_SECONDS)
    {
        return Err(JwtError::NotYetValid);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
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
            Err(JwtError::UnsupportedAlgorithm)
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
}
