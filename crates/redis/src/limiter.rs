//! The per-user rate limiter: a local `governor` filter first, then the
//! user's shared budget, GCRA in Lua with Redis time. While Redis is
//! unreachable the local filter alone decides (the per-node fallback), and
//! each such decision is counted.
//!
//! **Leases.** A call to Redis takes up to `lease` tokens of the shared
//! budget at once, each charged as if its event had arrived then, and the
//! node spends them locally for at most `lease_for`; tokens left unspent
//! are dropped (never given back). So a user active on one node costs one
//! Redis call per `lease` events instead of one per event.
//!
//! What this costs in precision, per user (rate r, burst b, n nodes the
//! user sends through):
//! - *Over-admission*: every admitted event was charged to the shared
//!   budget, at most `lease_for` before it was admitted. In any window of
//!   length w the user gets at most b + r·w events (the shared budget) plus
//!   what the nodes held at the window's start: at most n·(lease − 1)
//!   extra events, and never more than r·`lease_for`. On one node the local
//!   filter (b + r·w) bounds it exactly as before.
//! - *Under-admission*: up to `lease − 1` tokens per node may expire
//!   unspent, so a user switching nodes, or spread over several, may be
//!   refused up to n·(lease − 1) events early for `lease_for`.
//!
//! A refusal is remembered too: Redis says how long until the budget
//! holds a token again, and nothing but time can refill it, so the node
//! refuses that user locally until then — exactly what Redis would answer,
//! and a flood costs no round trips.
//!
//! `lease = 1` restores one exact call per accepted event.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use flowgate_engine::{EngineError, UserLimiter};
use tracing::debug;

use crate::keys::limit_key;
use crate::RedisEngine;

/// Tokens this node took from a user's shared budget and may still spend,
/// or the time before which the budget is known to be empty.
#[derive(Debug)]
struct Lease {
    tokens: u32,
    until: Instant,
    empty_until: Option<Instant>,
}

/// What the node knows of a user's budget without asking Redis.
#[derive(Debug, PartialEq)]
enum Local {
    /// A leased token was spent.
    Admit,
    /// The shared budget is empty for a while yet.
    Refuse,
    /// Redis must be asked.
    Ask,
}

/// The node's leases, by user. One entry per user who sent an event in
/// the last `lease_for`; expired ones are dropped by the maintenance loop.
#[derive(Debug, Default)]
pub(crate) struct Leases(DashMap<String, Lease>);

impl Leases {
    /// Spends one leased token of `user`, if any is left and still valid.
    fn spend(&self, user: &str, now: Instant) -> Local {
        let Some(mut l) = self.0.get_mut(user) else {
            return Local::Ask;
        };
        if l.tokens > 0 && now < l.until {
            l.tokens -= 1;
            return Local::Admit;
        }
        if l.empty_until.is_some_and(|t| now < t) {
            return Local::Refuse;
        }
        Local::Ask
    }

    /// Remembers that `user`'s shared budget is empty until `until`.
    fn empty(&self, user: &str, until: Instant) {
        let mut l = self.0.entry(user.to_owned()).or_insert(Lease {
            tokens: 0,
            until,
            empty_until: None,
        });
        l.tokens = 0;
        l.until = l.until.max(until);
        l.empty_until = Some(until);
    }

    /// Keeps `tokens` more for `user` until `until` (adds to a lease a
    /// concurrent call took meanwhile rather than dropping it).
    fn keep(&self, user: &str, tokens: u32, until: Instant, now: Instant) {
        if tokens == 0 {
            return;
        }
        let mut l = self.0.entry(user.to_owned()).or_insert(Lease {
            tokens: 0,
            until,
            empty_until: None,
        });
        l.empty_until = None;
        if l.until <= now {
            l.tokens = 0;
        }
        l.tokens += tokens;
        l.until = l.until.max(until);
    }

    /// Drops the expired leases.
    pub(crate) fn prune(&self, now: Instant) {
        self.0.retain(|_, l| l.until > now);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

#[async_trait]
impl UserLimiter for RedisEngine {
    async fn check(&self, user_id: &str) -> Result<bool, EngineError> {
        // Local first filter: the shared budget can never be larger than
        // this node's view of it, so a local refusal needs no round trip.
        if self.0.local.check_key(&user_id.to_owned()).is_err() {
            return Ok(false);
        }
        let now = Instant::now();
        match self.0.leases.spend(user_id, now) {
            Local::Admit => return Ok(true),
            Local::Refuse => return Ok(false),
            Local::Ask => {}
        }
        if !self.is_up() {
            self.0.metrics.limiter_fallback.inc();
            return Ok(true);
        }
        let s = &self.0.settings;
        let interval_us = 1_000_000 / i64::from(s.rate_per_sec.max(1));
        self.0.metrics.limiter_calls.inc();
        let r: Result<i64, _> = self
            .0
            .scripts
            .gcra
            .evalsha_with_reload(
                &self.0.client,
                vec![limit_key(user_id)],
                vec![interval_us, i64::from(s.burst), i64::from(s.lease.max(1))],
            )
            .await;
        match r {
            Ok(granted) if granted >= 1 => {
                let rest = u32::try_from(granted - 1).unwrap_or(0);
                self.0
                    .leases
                    .keep(user_id, rest, now + lease_for(s.lease_for), now);
                Ok(true)
            }
            Ok(wait_us) => {
                let wait = Duration::from_micros(wait_us.unsigned_abs().max(1));
                self.0.leases.empty(user_id, now + wait);
                Ok(false)
            }
            Err(e) => {
                self.0.metrics.limiter_fallback.inc();
                debug!(error = %e, "limiter falls back to the per-node budget");
                Ok(true)
            }
        }
    }
}

/// A zero lease time would make every lease useless; a tiny one is kept.
fn lease_for(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_spent_token_by_token_until_it_expires() {
        let l = Leases::default();
        let t0 = Instant::now();
        let until = t0 + Duration::from_secs(2);
        assert_eq!(l.spend("u", t0), Local::Ask, "no lease yet");
        l.keep("u", 2, until, t0);
        assert_eq!(l.spend("u", t0), Local::Admit);
        assert_eq!(l.spend("u", t0), Local::Admit);
        assert_eq!(l.spend("u", t0), Local::Ask, "two tokens, spent");
        l.keep("u", 3, until, t0);
        assert_eq!(l.spend("u", until), Local::Ask, "expired at its deadline");
        assert_eq!(l.spend("v", t0), Local::Ask, "leases are per user");
    }

    #[test]
    fn tokens_of_an_expired_lease_are_not_carried_over() {
        let l = Leases::default();
        let t0 = Instant::now();
        l.keep("u", 4, t0 + Duration::from_secs(1), t0);
        let t1 = t0 + Duration::from_secs(2);
        l.keep("u", 1, t1 + Duration::from_secs(1), t1);
        assert_eq!(l.spend("u", t1), Local::Admit);
        assert_eq!(
            l.spend("u", t1),
            Local::Ask,
            "the 4 old tokens were dropped"
        );
    }

    #[test]
    fn prune_drops_only_expired_leases() {
        let l = Leases::default();
        let t0 = Instant::now();
        l.keep("old", 1, t0 + Duration::from_millis(10), t0);
        l.keep("new", 1, t0 + Duration::from_secs(10), t0);
        l.prune(t0 + Duration::from_secs(1));
        assert_eq!(l.len(), 1);
        assert_eq!(l.spend("new", t0 + Duration::from_secs(1)), Local::Admit);
    }

    #[test]
    fn an_empty_budget_is_refused_locally_until_it_refills() {
        let l = Leases::default();
        let t0 = Instant::now();
        let refill = t0 + Duration::from_millis(50);
        l.empty("u", refill);
        assert_eq!(l.spend("u", t0), Local::Refuse);
        assert_eq!(l.spend("u", refill), Local::Ask, "asks again once refilled");
        l.keep("u", 1, t0 + Duration::from_secs(1), refill);
        assert_eq!(l.spend("u", refill), Local::Admit);
        l.prune(refill + Duration::from_secs(2));
        assert_eq!(l.len(), 0, "an empty-budget entry expires too");
    }
}
