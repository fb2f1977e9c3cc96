//! Signed one-click acknowledge links: `/ack/{token}`.
//!
//! A token names the alert, the contact it was sent to, an expiry and a nonce (the outbox
//! row it went out in), and carries an HMAC-SHA256 over them. The nonce is recorded when the
//! link is used, so each link works once; a forged, altered or expired token is refused.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckLink {
    pub alert_id: i64,
    /// 0 when the link was not sent to a registered contact.
    pub contact_id: i64,
    /// Unix seconds.
    pub expires_at: i64,
    pub nonce: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("the link is malformed")]
    Malformed,
    #[error("the link's signature does not match")]
    BadSignature,
    #[error("the link has expired")]
    Expired,
}

fn mac(secret: &[u8], body: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = <HmacSha256 as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    m.update(body.as_bytes());
    m
}

impl AckLink {
    fn body(&self) -> String {
        format!(
            "{}.{}.{}.{}",
            self.alert_id, self.contact_id, self.expires_at, self.nonce
        )
    }

    pub fn sign(&self, secret: &[u8]) -> String {
        let body = self.body();
        let sig = mac(secret, &body).finalize().into_bytes();
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    pub fn nonce_key(&self) -> String {
        format!("{}:{}", self.alert_id, self.nonce)
    }

    pub fn verify(token: &str, secret: &[u8], now_unix: i64) -> Result<AckLink, LinkError> {
        if token.len() > 200 {
            return Err(LinkError::Malformed);
        }
        let (body, sig) = token.rsplit_once('.').ok_or(LinkError::Malformed)?;
        let parts: Vec<&str> = body.split('.').collect();
        let [a, c, e, n] = parts.as_slice() else {
            return Err(LinkError::Malformed);
        };
        let num = |s: &str| s.parse::<i64>().map_err(|_| LinkError::Malformed);
        let link = AckLink {
            alert_id: num(a)?,
            contact_id: num(c)?,
            expires_at: num(e)?,
            nonce: num(n)?,
        };
        // Re-encode so that "007" and "7" cannot both verify.
        if link.body() != body {
            return Err(LinkError::Malformed);
        }
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| LinkError::Malformed)?;
        mac(secret, body)
            .verify_slice(&sig)
            .map_err(|_| LinkError::BadSignature)?;
        if now_unix > link.expires_at {
            return Err(LinkError::Expired);
        }
        Ok(link)
    }
}

/// The key that signs links: the configured one, or one generated once and kept in the
/// database so that every instance and every restart agree.
pub async fn link_secret(
    pool: &deadpool_postgres::Pool,
    configured: &str,
) -> Result<Vec<u8>, crate::store::StoreError> {
    if !configured.is_empty() {
        return Ok(configured.as_bytes().to_vec());
    }
    let generated: String = (0..48)
        .map(|_| {
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                    [rand::random_range(0..62)],
            )
        })
        .collect();
    let client = pool.get().await?;
    client
        .execute(
            "INSERT INTO app_secrets (name, value) VALUES ('ack_link_key', $1) ON CONFLICT DO NOTHING",
            &[&generated],
        )
        .await?;
    let value: String = client
        .query_one(
            "SELECT value FROM app_secrets WHERE name = 'ack_link_key'",
            &[],
        )
        .await?
        .get(0);
    Ok(value.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn link() -> AckLink {
        AckLink {
            alert_id: 42,
            contact_id: 7,
            expires_at: 2_000_000_000,
            nonce: 99,
        }
    }

    #[test]
    fn round_trip() {
        let t = link().sign(KEY);
        assert_eq!(AckLink::verify(&t, KEY, 1_900_000_000), Ok(link()));
    }

    #[test]
    fn tampering_is_refused() {
        let t = link().sign(KEY);
        let other = t.replacen("42.", "43.", 1);
        assert_eq!(
            AckLink::verify(&other, KEY, 0),
            Err(LinkError::BadSignature)
        );
        assert_eq!(
            AckLink::verify(&t, b"another key", 0),
            Err(LinkError::BadSignature)
        );
        assert_eq!(AckLink::verify("1.2.3", KEY, 0), Err(LinkError::Malformed));
        assert_eq!(
            AckLink::verify(&t.replacen("42.", "042.", 1), KEY, 0),
            Err(LinkError::Malformed)
        );
        assert!(AckLink::verify(&format!("{t}x"), KEY, 0).is_err());
    }

    #[test]
    fn expiry() {
        let t = link().sign(KEY);
        assert_eq!(
            AckLink::verify(&t, KEY, 2_000_000_001),
            Err(LinkError::Expired)
        );
    }
}
