//! How many authenticated sockets each user holds on this node, so that one
//! user (or one stolen token) cannot take the node's connection slots.
//!
//! A slot is a guard: it is given back when the socket that holds it ends,
//! however it ends.

use std::sync::Arc;

use dashmap::DashMap;

/// Sockets per user on this node.
#[derive(Debug, Default)]
pub struct UserSlots(DashMap<Arc<str>, usize>);

/// One user's socket on this node; dropping it frees the slot.
#[derive(Debug)]
pub struct UserSlot {
    slots: Arc<UserSlots>,
    user: Arc<str>,
}

impl UserSlots {
    /// A slot for `user`, unless the user already holds `max`.
    pub fn take(self: &Arc<Self>, user: &Arc<str>, max: usize) -> Option<UserSlot> {
        let mut n = self.0.entry(user.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            slots: self.clone(),
            user: user.clone(),
        })
    }

    /// Slots `user` holds now.
    pub fn held(&self, user: &str) -> usize {
        self.0.get(user).map_or(0, |n| *n)
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        // Emptied entries go, so the map holds only users with sockets.
        self.slots.0.remove_if_mut(&self.user, |_, n| {
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
