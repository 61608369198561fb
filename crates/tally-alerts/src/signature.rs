//! How deliveries are signed, the way Stripe signs its webhooks:
//! `Tally-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.
//! [`verify`] is what a receiver does (docs/alerts.md shows it in Python too).

use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The header every delivery carries.
pub const HEADER: &str = "tally-signature";

/// The header value for `body` sent at `timestamp`.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac(secret, timestamp, body))
    )
}

/// `header` with one more `v1` signature, by `secret` (during a secret's rotation the
/// previous secret signs too, so receivers that still hold it keep verifying, as Stripe does).
pub fn add_v1(header: &str, secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!("{header},v1={}", hex::encode(mac(secret, timestamp, body)))
}

fn mac(secret: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// Why a signature is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Tally-Signature header is not t=<unix>,v1=<hex>")]
    Malformed,
    #[error("the signature's timestamp is {0} s away from now (more than the tolerance): a replay, or a clock off")]
    Stale(i64),
    #[error("no v1 signature matches the body with this secret")]
    Mismatch,
}

/// Checks a delivery: the header's timestamp within `tolerance_seconds` of `now`, and one of
/// its `v1` signatures the HMAC of `"<t>.<body>"`, compared in constant time.
pub fn verify(
    header: &str,
    secret: &str,
    body: &[u8],
    now: i64,
    tolerance_seconds: i64,
) -> Result<(), SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<i64>().ok(),
            Some(("v1", v)) => {
                signatures.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?)
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    // abs_diff: a `t` of i64::MIN or MAX must not overflow (a panic in the receiver).
    if now.abs_diff(timestamp) > tolerance_seconds.unsigned_abs() {
        return Err(SignatureError::Stale(now.saturating_sub(timestamp)));
    }
    for signature in signatures {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        if mac.verify_slice(&signature).is_ok() {
            return Ok(());
        }
    }
    Err(SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_once_and_only_for_its_body_secret_and_time() {
        let body = br#"{"id":"evt_1"}"#;
        let header = sign("whsec_test", 1_800_000_000, body);
        assert!(header.starts_with("t=1800000000,v1="));
        assert_eq!(
            verify(&header, "whsec_test", body, 1_800_000_100, 300),
            Ok(())
        );
        assert_eq!(
            verify(&header, "whsec_other", body, 1_800_000_100, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&header, "whsec_test", b"{}", 1_800_000_100, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&header, "whsec_test", body, 1_800_001_000, 300),
            Err(SignatureError::Stale(1000))
        );
        assert_eq!(
            verify("v1=00", "s", body, 0, 300),
            Err(SignatureError::Malformed)
        );
        // Extreme timestamps are stale, never an overflow.
        for t in [i64::MIN, i64::MAX] {
            let header = format!("t={t},v1=00");
            assert!(matches!(
                verify(&header, "s", body, 1_800_000_000, 300),
                Err(SignatureError::Stale(_))
            ));
            assert!(verify(&header, "s", body, i64::MIN, 300).is_err());
        }
        // During a rotation both secrets sign; either verifies.
        let both = add_v1(
            &sign("whsec_new", 1_800_000_000, body),
            "whsec_old",
            1_800_000_000,
            body,
        );
        assert_eq!(verify(&both, "whsec_new", body, 1_800_000_000, 300), Ok(()));
        assert_eq!(verify(&both, "whsec_old", body, 1_800_000_000, 300), Ok(()));
        assert_eq!(
            verify(&both, "whsec_gone", body, 1_800_000_000, 300),
            Err(SignatureError::Mismatch)
        );
        // The known answer docs/alerts.md checks in Python.
        assert_eq!(
            sign("whsec_test", 1_700_000_000, br#"{"id":"evt_1"}"#),
            "t=1700000000,v1=c89214b5b5da833daed6f0b8c5bb6bd58cea9022bd80ccc78230f3942d632925"
        );
    }
}
