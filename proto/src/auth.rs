//! The credentials of the protocol: what a caller presents in its request headers, checked by
//! the server before it reads a byte of the body.
//!
//! - `Coordinator.Session`: `authorization: Bearer <run token>` (the token a worker is started
//!   with).
//! - `Coordinator`'s other calls: `elbo-session: <session id>` and `authorization: Bearer <hex>`,
//!   the session's credential from its `Welcome`, an HMAC-SHA256 of the session id under the
//!   coordinator's secret ([`Secret::session_credential`]): a session cannot speak for another.
//! - `Peer.Ring`: `elbo-generation: <generation>` and `authorization: Bearer <hex>`, the link's
//!   tag, an HMAC-SHA256 of (generation, sending rank, receiving rank) under the generation's
//!   ring key ([`Key::link_tag`]). The coordinator derives each generation's ring key from its
//!   secret ([`Secret::ring_key`]) and hands it to that generation's members only, in `Start`:
//!   the run token does not give it, and neither does an earlier generation's key.
//!
//! The coordinator's secret is random per coordinator process and never leaves it. Tags and
//! credentials are compared in constant time. Without TLS they cross the network in clear, like
//! everything else; they stop strangers who can reach a port, not an eavesdropper on the path.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header that carries a bearer credential.
pub const AUTHORIZATION: &str = "authorization";
/// The header that names the session of a coordinator call.
pub const SESSION: &str = "elbo-session";
/// The header that names the ring generation of a `Peer.Ring` stream.
pub const GENERATION: &str = "elbo-generation";

/// Bytes of a key, a credential or a tag.
pub const KEY_BYTES: usize = 32;

/// A 32-byte key, credential or tag. Its `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_BYTES]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

fn hmac(key: &[u8], label: &[u8], fields: &[u64]) -> Key {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(label);
    for field in fields {
        mac.update(&field.to_le_bytes());
    }
    Key(mac.finalize().into_bytes().into())
}

impl Key {
    /// A key from its bytes, if there are exactly [`KEY_BYTES`] of them.
    pub fn from_slice(bytes: &[u8]) -> Option<Key> {
        bytes.try_into().ok().map(Key)
    }

    /// A key from its lowercase or uppercase hex form.
    pub fn from_hex(hex: &str) -> Option<Key> {
        if hex.len() != 2 * KEY_BYTES || !hex.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; KEY_BYTES];
        for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks(2)) {
            let pair = std::str::from_utf8(pair).ok()?;
            *byte = u8::from_str_radix(pair, 16).ok()?;
        }
        Some(Key(bytes))
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Equal keys, compared in time independent of where they differ.
    pub fn matches(&self, other: &Key) -> bool {
        same_secret(&self.0, &other.0)
    }

    /// The tag that authenticates the ring stream from `from_rank` to `to_rank` in
    /// `generation`, under this generation's ring key.
    pub fn link_tag(&self, generation: u64, from_rank: u32, to_rank: u32) -> Key {
        hmac(
            &self.0,
            b"elbo ring link",
            &[generation, u64::from(from_rank), u64::from(to_rank)],
        )
    }
}

/// The coordinator's secret: every credential and ring key of its run derives from it.
#[derive(Clone)]
pub struct Secret(Key);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A fresh secret from the operating system's random source.
    pub fn random() -> Result<Secret, String> {
        let mut bytes = [0u8; KEY_BYTES];
        getrandom::fill(&mut bytes)
            .map_err(|e| format!("cannot draw a random secret from the operating system: {e}"))?;
        Ok(Secret(Key(bytes)))
    }

    /// A secret with the given bytes (tests).
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Secret {
        Secret(Key(bytes))
    }

    /// The credential of session `session`.
    pub fn session_credential(&self, session: u64) -> Key {
        hmac(&self.0 .0, b"elbo session", &[session])
    }

    /// The ring key of generation `generation`.
    pub fn ring_key(&self, generation: u64) -> Key {
        hmac(&self.0 .0, b"elbo ring", &[generation])
    }
}

/// Equal byte strings, compared in time independent of where they differ (the length is not
/// secret).
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The `authorization` header's value for `credential`.
pub fn bearer(credential: &str) -> String {
    format!("Bearer {credential}")
}

/// The credential in an `authorization` header's value, if it is a bearer credential.
pub fn parse_bearer(value: &[u8]) -> Option<&str> {
    std::str::from_utf8(value).ok()?.strip_prefix("Bearer ")
}

/// The bearer credential of a call's `authorization` header, if it has one.
pub fn bearer_of(headers: &http::HeaderMap) -> Option<&str> {
    parse_bearer(headers.get(AUTHORIZATION)?.as_bytes())
}

/// The number in a call's header `name` (a session id, a generation), if it holds one.
pub fn number_of(headers: &http::HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_sha256_matches_rfc_4231_case_2() {
        // RFC 4231, test case 2: key "Jefe", data "what do ya want for nothing?".
        let tag = hmac(b"Jefe", b"what do ya want for nothing?", &[]);
        assert_eq!(
            tag.to_hex(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn hex_round_trips_and_rejects_what_is_not_a_key() {
        let key = Secret::from_bytes([7; KEY_BYTES]).ring_key(3);
        assert_eq!(Key::from_hex(&key.to_hex()), Some(key.clone()));
        assert_eq!(
            Key::from_hex(&key.to_hex().to_uppercase()),
            Some(key.clone())
        );
        for bad in ["", "00", &"g".repeat(64), &"0".repeat(63), &"é".repeat(32)] {
            assert_eq!(Key::from_hex(bad), None, "{bad:?}");
        }
        assert_eq!(Key::from_slice(&[0; 31]), None);
        assert_eq!(format!("{key:?}"), "Key(..)");
    }

    #[test]
    fn every_credential_is_bound_to_what_it_names() {
        let secret = Secret::from_bytes([1; KEY_BYTES]);
        let other = Secret::from_bytes([2; KEY_BYTES]);
        assert!(secret
            .session_credential(1)
            .matches(&secret.session_credential(1)));
        assert!(!secret
            .session_credential(1)
            .matches(&secret.session_credential(2)));
        assert!(!secret
            .session_credential(1)
            .matches(&other.session_credential(1)));
        assert!(!secret.ring_key(1).matches(&secret.ring_key(2)));
        assert!(!secret.ring_key(1).matches(&secret.session_credential(1)));
        let key = secret.ring_key(5);
        let tag = key.link_tag(5, 0, 1);
        assert!(tag.matches(&key.link_tag(5, 0, 1)));
        for other_link in [
            key.link_tag(4, 0, 1),
            key.link_tag(5, 1, 0),
            key.link_tag(5, 0, 2),
            secret.ring_key(4).link_tag(5, 0, 1),
        ] {
            assert!(!tag.matches(&other_link));
        }
    }

    #[test]
    fn bearer_values_parse() {
        assert_eq!(parse_bearer(bearer("abc").as_bytes()), Some("abc"));
        assert_eq!(parse_bearer(b"Basic abc"), None);
        assert_eq!(parse_bearer(b"Bearer "), Some(""));
        assert_eq!(parse_bearer(&[0xff, 0xfe]), None);
        assert!(same_secret(b"", b""));
        assert!(!same_secret(b"a", b"ab"));
    }
}
