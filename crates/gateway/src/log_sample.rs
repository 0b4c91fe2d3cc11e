//! Sampling of log lines that clients can trigger at will (malformed
//! frames, refused connects): at most a few per second per kind, so that a
//! flood of bad input cannot flood the logs. What is not logged is still
//! counted in the metrics of its kind.

use std::num::NonZeroU32;
use std::sync::LazyLock;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Lines per second per kind, with a burst of as many.
const PER_SEC: u32 = 5;

static LIMITER: LazyLock<DefaultKeyedRateLimiter<&'static str>> = LazyLock::new(|| {
    RateLimiter::keyed(Quota::per_second(
        NonZeroU32::new(PER_SEC).unwrap_or(NonZeroU32::MIN),
    ))
});

/// Whether a line of `kind` may be logged now.
pub fn allow(kind: &'static str) -> bool {
    LIMITER.check_key(&kind).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_sampled_per_kind() {
        let logged = (0..100).filter(|_| allow("test-flood")).count();
        assert!(logged <= PER_SEC as usize + 1, "{logged}");
        assert!(allow("test-other"));
    }
}
