//! Per-key connection slots on this node: authenticated sockets per user
//! (one user, or one stolen token, cannot take the node's slots) and
//! connections per address that have not authenticated yet (one address
//! cannot hold the node with idle handshakes).
//!
//! A slot is a guard: it is given back when its holder drops it, however
//! the connection ends.

use std::borrow::Borrow;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Arc;

use dashmap::DashMap;

/// Slots in use, by key.
#[derive(Debug)]
pub struct Slots<K: Eq + Hash>(DashMap<K, usize>);

impl<K: Eq + Hash> Default for Slots<K> {
    fn default() -> Self {
        Slots(DashMap::new())
    }
}

/// Sockets per user.
pub type UserSlots = Slots<Arc<str>>;
/// One user's socket.
pub type UserSlot = Slot<Arc<str>>;
/// Unauthenticated connections per address.
pub type PeerSlots = Slots<IpAddr>;

/// One held slot; dropping it frees it.
#[derive(Debug)]
pub struct Slot<K: Eq + Hash + Clone> {
    slots: Arc<Slots<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> Slots<K> {
    /// A slot for `key`, unless `max` are held already.
    pub fn take(self: &Arc<Self>, key: &K, max: usize) -> Option<Slot<K>> {
        let mut n = self.0.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            slots: self.clone(),
            key: key.clone(),
        })
    }

    /// Slots held for `key` now.
    pub fn held<Q: Eq + Hash + ?Sized>(&self, key: &Q) -> usize
    where
        K: Borrow<Q>,
    {
        self.0.get(key).map_or(0, |n| *n)
    }
}

impl<K: Eq + Hash + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        // Emptied entries go, so the map holds only keys in use.
        self.slots.0.remove_if_mut(&self.key, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_given_back() {
        let slots = Arc::new(UserSlots::default());
        let u: Arc<str> = "u".into();
        let a = slots.take(&u, 2).unwrap();
        let _b = slots.take(&u, 2).unwrap();
        assert!(slots.take(&u, 2).is_none());
        drop(a);
        assert_eq!(slots.held("u"), 1);
        assert!(slots.take(&u, 2).is_some());
        assert_eq!(slots.held("u"), 1, "the temporary slot was dropped");
        assert!(slots.0.len() == 1);
    }
}
