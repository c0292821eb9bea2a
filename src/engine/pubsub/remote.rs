//! The side of topics shared with other processes that publishes and subscribes touch: what
//! they hand to the broker task (`broker/`), and the framing of a message on Redis.
//!
//! Nothing here waits: `publish` runs on the loop thread and must never block it, so a message
//! the broker cannot take now (its queue is full, or Redis is down) is lost for the other
//! processes, and the caller counts it.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;

/// Publishes waiting for the broker task. Past this the loop thread outruns Redis, and more
/// waiting would only make every later message later: they are dropped and counted instead.
pub(crate) const OUTGOING_CAPACITY: usize = 64 * 1024;

/// A publish on its way to Redis. The payload is the frame's own, shared, not a copy.
pub(crate) struct Outgoing {
    pub(crate) topic: Box<str>,
    pub(crate) opcode: u8,
    pub(crate) payload: Bytes,
}

/// What the broker task receives: publishes, and the topics whose local subscribers went from
/// none to some or back, which it checks against the registry before it (un)subscribes.
pub(crate) struct RemoteInbox {
    pub(crate) outgoing: mpsc::Receiver<Outgoing>,
    pub(crate) topics: mpsc::UnboundedReceiver<Arc<str>>,
}

/// The publishing and subscribing side of a server's Redis link.
pub(crate) struct Remote {
    /// This process's id in every message it publishes: the copy Redis sends back to it is
    /// dropped, since its local subscribers already had the message.
    pub(crate) origin: u64,
    outgoing: mpsc::Sender<Outgoing>,
    topics: mpsc::UnboundedSender<Arc<str>>,
    /// Connected and subscribed: while false, publishes are lost at once instead of queueing
    /// behind an outage.
    connected: AtomicBool,
}

impl Remote {
    pub(crate) fn new() -> (Self, RemoteInbox) {
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_CAPACITY);
        let (topics, topics_rx) = mpsc::unbounded_channel();
        let remote = Remote {
            origin: new_origin(),
            outgoing,
            topics,
            connected: AtomicBool::new(false),
        };
        let inbox = RemoteInbox {
            outgoing: outgoing_rx,
            topics: topics_rx,
        };
        (remote, inbox)
    }

    /// Hand a publish to the broker; false if it is lost (Redis down or the queue full).
    pub(crate) fn publish(&self, topic: &str, opcode: u8, payload: Bytes) -> bool {
        if !self.is_connected() {
            return false;
        }
        self.outgoing
            .try_send(Outgoing {
                topic: topic.into(),
                opcode,
                payload,
            })
            .is_ok()
    }

    /// `topic` gained its first local subscriber or lost its last. Unbounded: a subscribe never
    /// waits, and a transition lost would leave the process deaf to a topic (or subscribed in
    /// vain); there are at most two per subscribe.
    pub(crate) fn topic_changed(&self, topic: Arc<str>) {
        let _ = self.topics.send(topic);
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

pub(crate) fn decode(mut message: Bytes) -> Option<Incoming> {
    if message.len() < HEADER_LEN || message[0] != VERSION {
        return None;
    }
    let opcode = message[1];
    // Text or binary only: a control opcode from Redis must not reach a client's stream. RSV1
    // (0x40) may ride along: the publisher asked for permessage-deflate.
    if !matches!(opcode & !0x40, 1 | 2) {
        return None;
    }
    let origin = u64::from_le_bytes(message[2..10].try_into().ok()?);
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
        assert!(!remote.publish("t", 1, Bytes::from_static(b"x")));
        remote.set_connected(true);
        for _ in 0..OUTGOING_CAPACITY {
            assert!(remote.publish("t", 1, Bytes::from_static(b"x")));
        }
        assert!(!remote.publish("t", 1, Bytes::from_static(b"x")));
        assert_eq!(inbox.outgoing.try_recv().unwrap().topic.as_ref(), "t");
        assert!(remote.publish("t", 1, Bytes::from_static(b"x")));
    }

    #[test]
    fn origins_differ() {
        assert_ne!(new_origin(), new_origin());
    }
}
