//! Admission of a persisted event before its publish: whether its queue
//! shard can take it, read from Redis, or decided here while a recent read
//! leaves the shard far from its caps (so that a steady stream of
//! persisted events costs about one read per shard per half second, not
//! one per event).

use std::time::{Duration, Instant};

use flowgate_engine::PushRefused;

use crate::keys::queue_shard_of;
use crate::{err, RedisEngine};

/// A shard's fill as last read, plus what this node admitted since.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fill {
    at: Instant,
    len: u64,
    bytes: u64,
}

/// How long a shard's fill read is trusted: while what it showed plus
/// what this node admitted since stays under half of both caps, events
/// are admitted without asking. Other nodes' pushes meanwhile are not
/// seen; the other half of the cap, and `push`'s margin, absorb them.
const ROOMY_FOR: Duration = Duration::from_millis(500);

impl RedisEngine {
    /// See [`EventQueue::admit`].
    pub(super) async fn admit_event(&self, flow_id: &str, bytes: usize) -> Result<(), PushRefused> {
        self.ensure_up()?;
        self.register_shards().await.map_err(err)?;
        let n = self.queue_shards();
        let shard = queue_shard_of(flow_id, n);
        let stream = shard.stream();
        let (max_len, max_bytes) = self.shard_caps(n);
        let bytes = bytes as u64;
        {
            let mut roomy = self.0.queue.roomy.lock();
            if let Some(f) = roomy.get_mut(&stream) {
                if f.at.elapsed() < ROOMY_FOR
                    && f.len < max_len / 2
                    && f.bytes + bytes <= max_bytes / 2
                {
                    f.len += 1;
                    f.bytes += bytes;
                    return Ok(());
                }
            }
        }
        let (len, held): (u64, u64) = self
            .0
            .queue
            .fill
            .evalsha_with_reload(&self.0.client, vec![stream.clone(), shard.bytes()], ())
            .await
            .map_err(err)?;
        if len >= max_len || held + bytes > max_bytes {
            self.0.queue.roomy.lock().remove(&stream);
            return Err(PushRefused::Full);
        }
        // This event counts as admitted since the read.
        let fill = Fill {
            at: Instant::now(),
            len: len + 1,
            bytes: held + bytes,
        };
        self.0.queue.roomy.lock().insert(stream, fill);
        Ok(())
    }
}
