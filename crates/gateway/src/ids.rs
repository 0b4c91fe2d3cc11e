//! Random identifiers for Engine.IO sessions, sockets and nodes.

use base64::Engine as _;
use rand::RngCore;

/// `len` URL-safe characters from a cryptographic RNG (an Engine.IO sid is
/// 20 characters: 15 random bytes).
pub fn random_id(len: usize) -> String {
    let mut bytes = vec![0u8; len.div_ceil(4) * 3];
    rand::rng().fill_bytes(&mut bytes);
    let mut s = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    s.truncate(len);
    s
}

/// The current time as JavaScript's `Date.prototype.toISOString` writes it
/// (`2024-05-01T12:00:00.000Z`), which front ends parse.
pub fn iso_now() -> String {
    iso(time::OffsetDateTime::now_utc())
}

/// A time in the same format as [`iso_now`].
pub fn iso(t: time::OffsetDateTime) -> String {
    const FMT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.to_offset(time::UtcOffset::UTC)
        .format(FMT)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_have_the_asked_length_and_differ() {
        let a = super::random_id(20);
        assert_eq!(a.len(), 20);
        assert_ne!(a, super::random_id(20));
    }

    #[test]
    fn iso_matches_javascript() {
        let t = time::macros::datetime!(2024-05-01 12:00:00.123 UTC);
        assert_eq!(super::iso(t), "2024-05-01T12:00:00.123Z");
    }
}
