//! Room offsets: where an event sits in its room's log.
//!
//! An offset is the Redis stream id `<ms>-<seq>` the room log gave the
//! event; the in-memory engine hands out ids of the same shape. Offsets of
//! one room are strictly increasing, so "everything after offset X" is
//! well defined and comparing two offsets is cheap (two integers, no string
//! work on the per-frame path).

use std::fmt;
use std::str::FromStr;

/// A position in a room's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset {
    /// Milliseconds part of the stream id.
    pub ms: u64,
    /// Sequence within the millisecond.
    pub seq: u64,
}

impl Offset {
    /// The offset before every event (`0-0`).
    pub const ZERO: Offset = Offset { ms: 0, seq: 0 };

    /// The next offset after `self` at time `now_ms`: the stream-id rule
    /// (time first, then a sequence within the same millisecond).
    pub fn next(self, now_ms: u64) -> Offset {
        if now_ms > self.ms {
            Offset { ms: now_ms, seq: 0 }
        } else {
            Offset {
                ms: self.ms,
                seq: self.seq + 1,
            }
        }
    }
}

/// Not a `<ms>-<seq>` stream id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a room offset")]
pub struct BadOffset;

impl FromStr for Offset {
    type Err = BadOffset;

    fn from_str(s: &str) -> Result<Self, BadOffset> {
        let (ms, seq) = s.split_once('-').ok_or(BadOffset)?;
        let num = |p: &str| {
            if p.is_empty() || p.len() > 20 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(BadOffset);
            }
            p.parse::<u64>().map_err(|_| BadOffset)
        };
        Ok(Offset {
            ms: num(ms)?,
            seq: num(seq)?,
        })
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prints_and_orders() {
        let a: Offset = "1700000000000-3".parse().unwrap();
        assert_eq!(a.to_string(), "1700000000000-3");
        assert!(a < "1700000000000-4".parse().unwrap());
        assert!(a < "1700000000001-0".parse().unwrap());
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-b",
            "1-2-3",
            "+1-2",
            "99999999999999999999999-0",
        ] {
            assert!(bad.parse::<Offset>().is_err(), "{bad}");
        }
        assert_eq!(a.next(5), Offset { ms: a.ms, seq: 4 });
        assert_eq!(
            a.next(a.ms + 1),
            Offset {
                ms: a.ms + 1,
                seq: 0
            }
        );
    }
}
