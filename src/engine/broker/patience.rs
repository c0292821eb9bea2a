//! How long the link waits for Redis: what tells a connection busy bringing messages from one
//! that is down.
//!
//! A request's answer comes behind whatever its connection already carries towards us: a
//! subscriber's PING was answered after a 14 MiB backlog, more than 2 s later, and the link was
//! declared down and the backlog lost with it. So a request is given a first window, then more
//! for as long as the connection it waits on brings pushes. On a cluster each master has its own
//! connection, and another master's messages say nothing of this one: pushes are counted by
//! the master of their channel's hash slot, and a request to a master looks at that master's
//! count.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{PushInfo, RedisResult, Value};

/// A Redis that accepts the connection but never answers is a Redis that is down.
pub(super) const TIMEOUT: Duration = Duration::from_secs(2);
/// The bytes of publishes written to Redis in one pipeline (a larger publish goes alone), the
/// rest going in the next. A request's timeout runs from the pipeline's first byte written to
/// its last reply read, so a pipeline is given `TIMEOUT` plus `TIMEOUT` for each
/// `PIPELINE_BYTES` of it (`timeout_for`, then `patiently`): a link that carries 1 MiB per 2 s
/// stays up, and a stalled Redis is caught within 4 s of a pipeline of small publishes. One 2 s
/// timeout over a whole batch (up to 64 MiB) declared a slow link down, and its publishes lost,
/// although Redis had had some or all of them.
pub(super) const PIPELINE_BYTES: usize = 1 << 20;
/// The hash slots of a Redis Cluster.
pub(super) const SLOTS: usize = 16384;

/// The hash slot of `key`, as Redis Cluster computes it: CRC16/XMODEM of the key, or of its hash
/// tag (the bytes between its first `{` and the first `}` after it, if any). The crate's `Slot`
/// computes the same but does not give its number, which indexes `Arrivals`' table.
pub(super) fn slot_of(key: &[u8]) -> u16 {
    let tag = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tag.unwrap_or(key)) % SLOTS as u16
}

/// The pushes a connection has brought: one count for a single node's one socket; one per
/// master on a cluster, each master's connection bringing the messages of its own slots.
pub(super) struct Arrivals {
    /// On a cluster, the master of each slot (`NO_MASTER` until the link has read the cluster's
    /// slots), numbered as the link's map numbers them; empty on a single node.
    master_of: Box<[AtomicU32]>,
    /// Pushes brought: on a cluster, by master, the last count for the slots of no master known
    /// (one master at least per slot, so never more masters than slots); one count on a node.
    counts: Box<[AtomicU64]>,
}

const NO_MASTER: u32 = u32::MAX;

impl Arrivals {
    pub(super) fn new(cluster: bool) -> Arc<Self> {
        let atomics = |n, value| (0..n).map(|_| AtomicU32::new(value)).collect();
        let (master_of, counts) = if cluster {
            (atomics(SLOTS, NO_MASTER), SLOTS + 1)
        } else {
            (atomics(0, 0), 1)
        };
        let counts = (0..counts).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Self { master_of, counts })
    }

    /// `slot` is `master`'s (a cluster's, as the link's map numbers them), for the pushes to come.
    pub(super) fn set_master(&self, slot: u16, master: usize) {
        if let Some(of) = self.master_of.get(usize::from(slot)) {
            of.store(
                u32::try_from(master).unwrap_or(NO_MASTER),
                Ordering::Relaxed,
            );
        }
    }

    /// Count `push` (from the crate's connection tasks). A cluster's push without a channel (a
    /// `Disconnection`) is not counted: it ends the link.
    pub(super) fn note(&self, push: &PushInfo) {
        let index = match push.data.first() {
            _ if self.master_of.is_empty() => 0,
            Some(Value::BulkString(channel)) => {
                match self.master_of[usize::from(slot_of(channel))].load(Ordering::Relaxed) {
                    NO_MASTER => SLOTS,
                    master => master as usize,
                }
            }
            _ => return,
        };
        if let Some(count) = self.counts.get(index) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// What `master`'s connection has brought (every master's: `None`), as a number that
    /// changes when it brings more. A single node's one count stands for every master.
    pub(super) fn seen(&self, master: Option<usize>) -> u64 {
        let load = |count: &AtomicU64| count.load(Ordering::Relaxed);
        match master {
            Some(master) if !self.master_of.is_empty() => self.counts.get(master).map_or(0, load),
            _ => self.counts.iter().map(load).fold(0, u64::wrapping_add),
        }
    }
}

/// `request`'s answer, given `first` to come, and then `TIMEOUT` more at a time for as long as
/// its connection brings pushes (`seen` changes): an answer queued behind the messages of a
/// busy link is late, not lost. A connection that answered nothing and brought nothing is down.
pub(super) async fn patiently<T>(
    seen: impl Fn() -> u64,
    first: Duration,
    request: impl Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    tokio::pin!(request);
    let mut wait = first;
    loop {
        let before = seen();
        match tokio::time::timeout(wait, &mut request).await {
            Ok(answer) => return answer,
            Err(_) if seen() != before => wait = TIMEOUT,
            Err(_) => return Err(io::Error::from(io::ErrorKind::TimedOut).into()),
        }
    }
}

/// How long Redis is given to take and answer a pipeline of `size` bytes: `TIMEOUT`, plus
/// `TIMEOUT` for each `PIPELINE_BYTES` of it.
pub(super) fn timeout_for(size: usize) -> Duration {
    TIMEOUT + TIMEOUT.mul_f64(size as f64 / PIPELINE_BYTES as f64)
}

#[cfg(test)]
mod tests {
    use redis::cluster_routing::Slot;
    use redis::PushKind;

    use super::*;

    #[test]
    fn the_slot_is_the_crate_s_and_redis_s() {
        // The Redis Cluster specification's example, and hash tags as it defines them.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        // An empty tag is no tag: the whole key.
        let crc = |key: &[u8]| crc16::State::<crc16::XMODEM>::calculate(key) % SLOTS as u16;
        assert_eq!(slot_of(b"foo{}{bar}"), crc(b"foo{}{bar}"));
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        for key in [
            "",
            "{",
            "}",
            "{}",
            "a{b",
            "x{y}z{w}",
            "c:topic",
            "brioche:rooms/7",
        ]
        .into_iter()
        .map(String::from)
        .chain((0..2000).map(|i| format!("topic-{i}")))
        {
            assert_eq!(
                Slot::new(slot_of(key.as_bytes())),
                Some(Slot::for_key(&key)),
                "{key:?}"
            );
        }
    }

    #[test]
    fn a_cluster_s_pushes_count_for_the_master_of_their_channel_s_slot_only() {
        let push = |channel: &str| PushInfo {
            kind: PushKind::SMessage,
            data: vec![
                Value::BulkString(channel.into()),
                Value::BulkString(b"m".to_vec()),
            ],
        };
        let arrivals = Arrivals::new(true);
        let (foo, bar) = (slot_of(b"foo"), slot_of(b"bar"));
        arrivals.set_master(foo, 1);
        arrivals.set_master(bar, 0);
        let (on_1, on_0, all) = (
            arrivals.seen(Some(1)),
            arrivals.seen(Some(0)),
            arrivals.seen(None),
        );
        arrivals.note(&push("foo"));
        arrivals.note(&PushInfo {
            kind: PushKind::Disconnection,
            data: Vec::new(),
        });
        assert_eq!(arrivals.seen(Some(1)), on_1 + 1);
        assert_eq!(arrivals.seen(Some(0)), on_0);
        assert_eq!(arrivals.seen(None), all + 1);
        // A slot of no master known counts for none of them, but for the link.
        let unknown = (0..)
            .map(|i| format!("t{i}"))
            .find(|t| ![foo, bar].contains(&slot_of(t.as_bytes())))
            .unwrap();
        arrivals.note(&push(&unknown));
        assert_eq!(
            (arrivals.seen(Some(0)), arrivals.seen(Some(1))),
            (on_0, on_1 + 1)
        );
        assert_eq!(arrivals.seen(None), all + 2);
        // A single node's one count is every master's.
        let node = Arrivals::new(false);
        let before = node.seen(Some(3));
        node.note(&push("foo"));
        assert_eq!(node.seen(Some(3)), before + 1);
    }

    #[test]
    fn a_late_answer_waits_while_pushes_arrive_and_not_after() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let arrivals = Arrivals::new(false);
            let ping = PushInfo {
                kind: PushKind::Message,
                data: Vec::new(),
            };
            // Pushes every second for 10 s, the answer at 11 s: it comes.
            let pushes = async {
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    arrivals.note(&ping);
                }
            };
            let answer = async {
                tokio::time::sleep(Duration::from_secs(11)).await;
                Ok(7)
            };
            let seen = || arrivals.seen(Some(0));
            let (_, answer) = tokio::join!(pushes, patiently(seen, TIMEOUT, answer));
            assert_eq!(answer.unwrap(), 7);
            // Nothing arrives: down after the first window, for all the answer would come later.
            let start = tokio::time::Instant::now();
            let late = async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok(7)
            };
            let answer = patiently(seen, TIMEOUT, late).await;
            assert_eq!(answer.unwrap_err().kind(), redis::ErrorKind::Io);
            assert_eq!(start.elapsed(), TIMEOUT);
        });
    }
}
