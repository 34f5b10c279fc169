//! Bearer tokens: random, shown once, stored only as SHA-256 hashes.

use rand::RngCore;
use sha2::{Digest, Sha256};

pub fn new_token() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("coop_{}", hex::encode(bytes))
}

/// A one-time enrollment token for an agent machine.
pub fn new_join_token() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("coopjoin_{}", hex::encode(bytes))
}

/// Refuses a token chosen by a person (`--operator-token`) that cannot hold
/// 128 bits of randomness: its length times the bits per character of the
/// smallest alphabet it fits (hex 4, lowercase or uppercase alphanumerics
/// about 5.2, mixed-case 5.95, printable 6.5), and at least 10 distinct
/// characters so that `aaaa...` does not pass.
pub fn check_strength(token: &str) -> Result<(), String> {
    let t = token.trim();
    if t.chars().any(|c| !c.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".into());
    }
    let body = t.strip_prefix("coop_").unwrap_or(t);
    let hex = body.chars().all(|c| c.is_ascii_hexdigit());
    let lower = body.chars().any(|c| c.is_ascii_lowercase());
    let upper = body.chars().any(|c| c.is_ascii_uppercase());
    let other = body.chars().any(|c| !c.is_ascii_alphanumeric());
    let bits_per_char = if hex {
        4.0
    } else if other {
        6.5
    } else if lower && upper {
        5.95
    } else {
        5.17
    };
    let distinct = body
        .chars()
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let bits = body.len() as f64 * bits_per_char;
    if bits < 128.0 || distinct < 10 {
        return Err(format!(
            "too weak: it holds at most {bits:.0} bits of randomness and needs 128 (try: coop_$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \\n'))"
        ));
    }
    Ok(())
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_hashes_stable() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_ne!(hash_token(&a), hash_token(&b));
        assert!(!hash_token(&a).contains(&a[5..]));
    }

    #[test]
    fn weak_tokens_are_refused_and_generated_ones_pass() {
        assert!(check_strength(&new_token()).is_ok());
        for weak in [
            "a",
            "secret",
            "0123456789abcdef0123456789abcde",
            &"a".repeat(64),
            "password-password-password",
            "has space in it 0123456789abcdef0123456789abcdef",
        ] {
            assert!(check_strength(weak).is_err(), "{weak:?} passed");
        }
        assert!(check_strength("0123456789abcdef0123456789abcdef").is_ok());
    }
}
