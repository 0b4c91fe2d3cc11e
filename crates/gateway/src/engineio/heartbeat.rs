//! The server-initiated Engine.IO v4 heartbeat: a ping every interval, and
//! the connection ends when the pong does not come within the timeout.

use std::time::{Duration, Instant};

/// Heartbeat state of one connection.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    /// When the next ping is due.
    next_ping: Instant,
    /// Set while a ping waits for its pong.
    pong_deadline: Option<Instant>,
}

/// What the timer asks of the connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Beat {
    /// Nothing yet.
    Idle,
    /// Send a ping now.
    Ping,
    /// The pong did not come.
    TimedOut,
}

impl Heartbeat {
    pub(crate) fn new(interval: Duration, timeout: Duration) -> Self {
        Heartbeat {
            interval,
            timeout,
            next_ping: Instant::now() + interval,
            pong_deadline: None,
        }
    }

    /// When the timer must fire next.
    pub(crate) fn deadline(&self) -> Instant {
        self.pong_deadline.unwrap_or(self.next_ping)
    }

    /// The client answered.
    pub(crate) fn on_pong(&mut self) {
        self.pong_deadline = None;
        self.next_ping = Instant::now() + self.interval;
    }

    pub(crate) fn on_timer(&mut self, now: Instant) -> Beat {
        match self.pong_deadline {
            Some(d) if d <= now => Beat::TimedOut,
            Some(_) => Beat::Idle,
            None if self.next_ping <= now => {
                self.pong_deadline = Some(now + self.timeout);
                Beat::Ping
            }
            None => Beat::Idle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_then_times_out_unless_answered() {
        let mut h = Heartbeat::new(Duration::from_millis(10), Duration::from_millis(20));
        let t0 = Instant::now();
        assert_eq!(h.on_timer(t0), Beat::Idle);
        let t1 = t0 + Duration::from_millis(11);
        assert_eq!(h.on_timer(t1), Beat::Ping);
        assert_eq!(h.deadline(), t1 + Duration::from_millis(20));
        assert_eq!(h.on_timer(t1 + Duration::from_millis(5)), Beat::Idle);
        assert_eq!(h.on_timer(t1 + Duration::from_millis(21)), Beat::TimedOut);
        h.on_pong();
        assert!(h.deadline() > Instant::now());
    }
}
