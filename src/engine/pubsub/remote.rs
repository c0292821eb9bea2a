//! The side of topics shared with other processes that publishes and subscribes touch: what
//! they hand to the broker task (`broker/`), and the framing of a message on Redis.
//!
//! Nothing here waits: `publish` runs on the loop thread and must never block it, so a message
//! the broker cannot take now (its queue is full, or Redis is down) is lost for the other
//! processes, and the caller counts it.

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::{mpsc, Notify};

/// Publishes waiting for the broker task. Past this the loop thread outruns Redis, and more
/// waiting would only make every later message later: they are dropped and counted instead.
pub(crate) const OUTGOING_CAPACITY: usize = 64 * 1024;
/// Bytes of publishes (`Outgoing::size`) the broker may hold, from `publish` until Redis has
/// answered their pipeline: the count alone let 1 MiB publishes to a stalled Redis hold 1.5 GiB.
/// The same figure as a sibling worker's backlog (`ws/relay.rs`).
pub(crate) const OUTGOING_BYTES: usize = 64 * 1024 * 1024;

/// The largest publish (`Outgoing::size`) sent to Redis. Redis disconnects a subscriber whose
/// output buffer passes `client-output-buffer-limit pubsub`, 32 MiB by default: one message over
/// it cut every process subscribed to its topic, each of which then missed everything published
/// while it reconnected, and only logged that Redis was down. Such a publish is lost here
/// instead, counted and logged. Redis counts the memory its allocator gave the reply, not the
/// reply's length, and jemalloc's size classes there are 4 MiB apart: Debian's Redis 7.0.15
/// (jemalloc 5.3, default limits) passed a 28 MiB message to a subscriber, RESP2 or RESP3, and
/// cut it for 28 MiB + 4 KiB (rounded to 32 MiB), so the 32 MiB - 4 KiB allowed before cut
/// every subscriber of a 28-32 MiB publish. 24 MiB leaves a whole size class spare, for the
/// channel's name and the framing and for an allocator that rounds coarser.
pub(crate) const MAX_MESSAGE: usize = 24 * 1024 * 1024;

/// A publish on its way to Redis. The payload is the frame's own, shared, not a copy.
pub(crate) struct Outgoing {
    pub(crate) topic: Box<str>,
    pub(crate) opcode: u8,
    pub(crate) payload: Bytes,
}

impl Outgoing {
    /// What it holds against `OUTGOING_BYTES`: its topic, payload and the header it gets on
    /// Redis, so that even an empty publish holds something until it is released.
    pub(crate) fn size(&self) -> usize {
        size(&self.topic, &self.payload)
    }
}

fn size(topic: &str, payload: &[u8]) -> usize {
    HEADER_LEN + topic.len() + payload.len()
}

/// Why `Remote::publish` did not queue a publish.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Lost {
    /// Not connected: the outage has its own log lines.
    Down,
    /// Over `OUTGOING_CAPACITY` or `OUTGOING_BYTES`; `first` for the first loss since the queue
    /// was last empty, the one worth a log line.
    Full { first: bool },
    /// Over `MAX_MESSAGE` on its own.
    TooBig,
}

/// What the broker task receives: publishes. The topics it must look at again are in
/// `Remote::take_changes`.
pub(crate) struct RemoteInbox {
    pub(crate) outgoing: mpsc::Receiver<Outgoing>,
}

/// The topics whose local subscribers went from none to some or back since the broker last
/// looked, each once however often it changed: a set, not a queue, so that churn on a topic
/// costs nothing more while the broker is busy. Recorded only while `tracking`: a link that is
/// down reads the whole registry when it subscribes again, so reports meanwhile would only
/// pile up (4 million subscribe/unsubscribe pairs with Redis down held 398 MiB in a channel).
#[derive(Default)]
struct Changes {
    tracking: bool,
    /// Keyed by topic names, which clients may choose (see `TopicRegistry::topics`).
    topics: HashSet<Arc<str>>,
}

/// The publishing and subscribing side of a server's Redis link.
pub(crate) struct Remote {
    /// This process's id in every message it publishes: the copy Redis sends back to it is
    /// dropped, since its local subscribers already had the message.
    pub(crate) origin: u64,
    outgoing: mpsc::Sender<Outgoing>,
    /// `tracking` shares the lock with the set: a report either finds it on and is recorded, or
    /// comes before `track_changes`, hence before the registry is read for the subscriptions.
    changes: Mutex<Changes>,
    changed: Notify,
    /// Connected and subscribed: while false, publishes are lost at once instead of queueing
    /// behind an outage.
    connected: AtomicBool,
    /// The sizes of the publishes handed over and not yet released by the broker.
    queued: ByteBound,
}

/// The bytes a queue holds against its bound, and whether something was lost to it since it
/// was last empty: the first loss of a stall is news (logged), the next only once the queue
/// has emptied. The queue to Redis and the one from it (`broker/`) are each bounded by one.
#[derive(Default)]
pub(crate) struct ByteBound {
    bytes: AtomicUsize,
    overflowing: AtomicBool,
}

impl ByteBound {
    /// Charge `size` if the bytes held stay within `limit`. Added before the check, so that
    /// several threads cannot all pass it: at worst one is refused that would have fitted once
    /// another was refused.
    pub(crate) fn charge(&self, size: usize, limit: usize) -> bool {
        if self.bytes.fetch_add(size, Ordering::AcqRel) + size <= limit {
            return true;
        }
        self.release(size);
        false
    }

    /// Something was lost to the queue (it did not fit, or was refused once charged): whether
    /// this loss starts a stall.
    pub(crate) fn lost(&self) -> bool {
        !self.overflowing.swap(true, Ordering::AcqRel)
    }

    /// `size` bytes left the queue. Once nothing is held, a loss is news again.
    pub(crate) fn release(&self, size: usize) {
        if size > 0 && self.bytes.fetch_sub(size, Ordering::AcqRel) == size {
            self.overflowing.store(false, Ordering::Release);
        }
    }

    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub(crate) fn overflowing(&self) -> bool {
        self.overflowing.load(Ordering::Acquire)
    }
}

impl Remote {
    pub(crate) fn new() -> (Self, RemoteInbox) {
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_CAPACITY);
        let remote = Remote {
            origin: new_origin(),
            outgoing,
            changes: Mutex::default(),
            changed: Notify::new(),
            connected: AtomicBool::new(false),
            queued: ByteBound::default(),
        };
        let inbox = RemoteInbox {
            outgoing: outgoing_rx,
        };
        (remote, inbox)
    }

    /// Hand a publish to the broker, or say why it is lost. The broker `release`s its size once
    /// done with it.
    pub(crate) fn publish(&self, topic: &str, opcode: u8, payload: Bytes) -> Result<(), Lost> {
        if !self.is_connected() {
            return Err(Lost::Down);
        }
        let size = size(topic, &payload);
        if size > MAX_MESSAGE {
            return Err(Lost::TooBig);
        }
        if self.queued.charge(size, OUTGOING_BYTES) {
            let out = Outgoing {
                topic: topic.into(),
                opcode,
                payload,
            };
            match self.outgoing.try_send(out) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // The server stopped as this publish found the link up (`publish_last`).
                    self.queued.release(size);
                    return Err(Lost::Down);
                }
                Err(mpsc::error::TrySendError::Full(_)) => self.queued.release(size),
            }
        }
        Err(Lost::Full {
            first: self.queued.lost(),
        })
    }

    /// The broker is done with publishes of `size` bytes in all (written, failed or dropped).
    /// Once nothing is held, a loss is news again.
    pub(crate) fn release(&self, size: usize) {
        self.queued.release(size);
    }

    /// Bytes handed over and not released.
    #[cfg(test)]
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued.held()
    }

    /// `topic` gained its first local subscriber or lost its last (the registry says so
    /// already). Never waits, and never lost while the broker tracks changes: one lost would
    /// leave the process deaf to a topic (or subscribed in vain).
    pub(crate) fn topic_changed(&self, topic: Arc<str>) {
        let mut changes = self.changes.lock();
        if changes.tracking && changes.topics.insert(topic) {
            drop(changes);
            self.changed.notify_one();
        }
    }

    /// Record changes from now on: call before reading the registry for a new connection's
    /// subscriptions, so that every change is either in what it reads or recorded.
    pub(crate) fn track_changes(&self) {
        self.changes.lock().tracking = true;
    }

    /// The link is down: forget the changes, and record none until `track_changes`.
    pub(crate) fn stop_tracking(&self) {
        let mut changes = self.changes.lock();
        changes.tracking = false;
        changes.topics = HashSet::default();
    }

    /// Resolves once a change may be waiting in `take_changes`.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Up to `limit` changed topics, taken out of the set; if more are left, `changed` resolves
    /// again at once for them.
    pub(crate) fn take_changes(&self, limit: usize) -> Vec<Arc<str>> {
        let mut changes = self.changes.lock();
        let taken: Vec<Arc<str>> = changes.topics.iter().take(limit).cloned().collect();
        for topic in &taken {
            changes.topics.remove(topic);
        }
        let more = !changes.topics.is_empty();
        drop(changes);
        if more {
            self.changed.notify_one();
        }
        taken
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub(crate) fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }
}

/// Random enough that two processes (on any machines) never share one: a hash of the pid, the
/// time and the std library's per-process random keys.
fn new_origin() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(now);
    hasher.finish()
}

/// A message on Redis: a version byte, the opcode, the origin, the origin's sequence number
/// (little-endian), then the payload. 18 bytes of header, and no encoding of the payload.
pub(crate) const HEADER_LEN: usize = 18;
const VERSION: u8 = 1;

pub(crate) fn encode(origin: u64, seq: u64, opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_u8(VERSION);
    out.put_u8(opcode);
    out.put_u64_le(origin);
    out.put_u64_le(seq);
    out.put_slice(payload);
    out.freeze()
}

/// A message from Redis, or `None` for anything else on the channel (another version,
/// another program): it is ignored rather than sent to clients.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Incoming {
    pub(crate) origin: u64,
    pub(crate) seq: u64,
    pub(crate) opcode: u8,
    pub(crate) payload: Bytes,
}

/// The origin of a message from Redis, read without taking it apart.
pub(crate) fn origin(message: &[u8]) -> Option<u64> {
    if message.len() < HEADER_LEN || message[0] != VERSION {
        return None;
    }
    Some(u64::from_le_bytes(message[2..10].try_into().ok()?))
}

pub(crate) fn decode(mut message: Bytes) -> Option<Incoming> {
    let origin = origin(&message)?;
    let opcode = message[1];
    // Text or binary only: a control opcode from Redis must not reach a client's stream. RSV1
    // (0x40) may ride along: the publisher asked for permessage-deflate.
    if !matches!(opcode & !0x40, 1 | 2) {
        return None;
    }
    let seq = u64::from_le_bytes(message[10..18].try_into().ok()?);
    let payload = message.split_off(HEADER_LEN);
    Some(Incoming {
        origin,
        seq,
        opcode,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips_and_garbage_is_refused() {
        let wire = encode(7, 42, 2, b"\x00\xffpayload");
        assert_eq!(wire.len(), HEADER_LEN + 9);
        let back = decode(wire).unwrap();
        assert_eq!(
            back,
            Incoming {
                origin: 7,
                seq: 42,
                opcode: 2,
                payload: Bytes::from_static(b"\x00\xffpayload"),
            }
        );
        assert_eq!(decode(encode(1, 1, 1, b"")).unwrap().payload.len(), 0);
        assert!(decode(Bytes::from_static(b"hello from redis-cli")).is_none());
        assert!(decode(Bytes::from_static(b"\x01short")).is_none());
        assert!(decode(encode(1, 1, 8, b"\x03\xe8")).is_none());
        // A publish with compress=True: RSV1 rides with text or binary, never with control.
        assert_eq!(decode(encode(1, 1, 0x41, b"x")).unwrap().opcode, 0x41);
        assert!(decode(encode(1, 1, 0x48, b"")).is_none());
        assert!(decode(encode(1, 1, 0x21, b"")).is_none());
    }

    #[test]
    fn publishes_are_lost_at_once_while_disconnected_and_once_the_queue_is_full() {
        let (remote, mut inbox) = Remote::new();
        let x = || Bytes::from_static(b"x");
        assert_eq!(remote.publish("t", 1, x()), Err(Lost::Down));
        remote.set_connected(true);
        for _ in 0..OUTGOING_CAPACITY {
            assert_eq!(remote.publish("t", 1, x()), Ok(()));
        }
        assert_eq!(remote.publish("t", 1, x()), Err(Lost::Full { first: true }));
        assert_eq!(
            remote.publish("t", 1, x()),
            Err(Lost::Full { first: false })
        );
        let taken = inbox.outgoing.try_recv().unwrap();
        assert_eq!(taken.topic.as_ref(), "t");
        remote.release(taken.size());
        assert_eq!(remote.publish("t", 1, x()), Ok(()));
        assert_eq!(remote.queued_bytes(), OUTGOING_CAPACITY * (HEADER_LEN + 2));
    }

    #[test]
    fn a_publish_redis_would_cut_its_subscribers_for_is_lost_here() {
        let (remote, mut inbox) = Remote::new();
        remote.set_connected(true);
        let largest = MAX_MESSAGE - HEADER_LEN - 1;
        let fits = Bytes::from(vec![0u8; largest]);
        assert_eq!(remote.publish("t", 2, fits), Ok(()));
        let over = Bytes::from(vec![0u8; largest + 1]);
        assert_eq!(remote.publish("t", 2, over), Err(Lost::TooBig));
        assert_eq!(inbox.outgoing.try_recv().unwrap().payload.len(), largest);
        assert!(inbox.outgoing.try_recv().is_err());
    }

    #[test]
    fn the_queue_holds_at_most_outgoing_bytes_until_the_broker_releases_them() {
        let (remote, mut inbox) = Remote::new();
        remote.set_connected(true);
        let mib = Bytes::from(vec![0u8; 1 << 20]);
        let each = HEADER_LEN + 4 + mib.len();
        let fit = OUTGOING_BYTES / each;
        for _ in 0..fit {
            assert_eq!(remote.publish("news", 2, mib.clone()), Ok(()));
        }
        assert_eq!(
            remote.publish("news", 2, mib.clone()),
            Err(Lost::Full { first: true })
        );
        assert_eq!(
            remote.publish("news", 2, mib.clone()),
            Err(Lost::Full { first: false })
        );
        assert_eq!(remote.queued_bytes(), fit * each);
        // Taken off the channel is not enough: a batch being written is still held.
        let mut batch = Vec::new();
        while let Ok(out) = inbox.outgoing.try_recv() {
            batch.push(out);
        }
        assert_eq!(batch.len(), fit);
        assert!(remote.publish("news", 2, mib.clone()).is_err());
        remote.release(batch.iter().map(Outgoing::size).sum());
        assert_eq!(remote.queued_bytes(), 0);
        assert_eq!(remote.publish("news", 2, mib.clone()), Ok(()));
        // A publish larger than the whole bound is over `MAX_MESSAGE` first, and holds nothing.
        let huge = Bytes::from(vec![0u8; OUTGOING_BYTES]);
        remote.release(inbox.outgoing.try_recv().unwrap().size());
        assert_eq!(remote.publish("t", 2, huge), Err(Lost::TooBig));
        assert_eq!(remote.queued_bytes(), 0);
    }

    #[test]
    fn changes_are_recorded_once_each_and_only_while_tracked() {
        let (remote, _inbox) = Remote::new();
        let room: Arc<str> = Arc::from("room");
        // Down: nothing is kept, however many reports.
        for _ in 0..1000 {
            remote.topic_changed(room.clone());
        }
        remote.track_changes();
        assert!(remote.take_changes(10).is_empty());
        for i in 0..1000 {
            remote.topic_changed(room.clone());
            remote.topic_changed(Arc::from(format!("t{}", i % 3)));
        }
        assert_eq!(remote.changes.lock().topics.len(), 4);
        let mut taken = remote.take_changes(3);
        assert_eq!(taken.len(), 3);
        // One left: the broker is woken again for it.
        futures_util::FutureExt::now_or_never(remote.changed()).expect("woken for the rest");
        taken.extend(remote.take_changes(3));
        taken.sort();
        let names: Vec<&str> = taken.iter().map(|t| &**t).collect();
        assert_eq!(names, ["room", "t0", "t1", "t2"]);
        remote.topic_changed(room.clone());
        remote.stop_tracking();
        assert!(remote.take_changes(10).is_empty());
        remote.topic_changed(room);
        assert!(remote.changes.lock().topics.is_empty());
    }

    #[test]
    fn origins_differ() {
        assert_ne!(new_origin(), new_origin());
    }
}
