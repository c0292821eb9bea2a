//! What a server's tasks and connections share: its settings, its event queue, its topics, its
//! incoming budget and its open WebSockets. Every `Conn` holds it, which is why it lives with them.

use std::borrow::Cow;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::batch;
use super::budget::IncomingBudget;
use super::conn::{Conn, SendStatus};
use super::deflate::{self, DeflateParams};
use super::encode::OutFrame;
use super::outbound::INLINE_PAYLOAD;
use super::protocol::RSV1;
use super::publish_run::{Found, PendingRun, PublishRun};
use super::relay::Relay;
use super::report::LogLimiter;
use crate::engine::bridge::events::{Event, EventQueue, LogKind, LogRecord};
use crate::engine::config::ServerConfig;
use crate::engine::net::Peer;
use crate::engine::pubsub::remote::{Lost, Remote};
use crate::engine::pubsub::topics::{TopicRegistry, Unsubscribed};
use crate::engine::stats::{Counter, Stats};
use crate::engine::tls::Certs;

/// State shared by the server's tasks and its connections.
pub struct Shared {
    pub(crate) config: ServerConfig,
    pub events: EventQueue<Arc<Conn>>,
    pub(crate) topics: TopicRegistry<Arc<Conn>>,
    /// Publishes of a batch to one topic not yet queued to its subscribers (`publish_run.rs`).
    publish_run: PendingRun,
    /// Topics shared with other processes through Redis (`pubsub_redis`): publishes are also
    /// handed to it, and topics gaining their first or losing their last local subscriber
    /// reported to it. `None` costs a publish one check.
    pub(crate) remote: Option<Remote>,
    pub(crate) budget: IncomingBudget,
    pub(crate) stats: Stats,
    log_limiter: LogLimiter,
    pub(crate) conns: Mutex<FxHashMap<u64, Arc<Conn>>>,
    /// WebSockets open or being upgraded, counted only when `max_connections` is set.
    websocket_slots: AtomicUsize,
    /// HTTP requests read and not yet answered (`pending_requests`, `http/serve.rs`).
    pub(crate) pending_requests: AtomicUsize,
    next_id: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    /// Every task of this server: the accept loop, HTTP connections, WebSocket connections.
    pub(crate) tracker: TaskTracker,
    /// Every task of `tracker` has ended, after a stop: the links to other processes (Redis,
    /// sibling workers) send what the connections published while they closed, then end.
    pub(crate) links_end: CancellationToken,
    /// The tasks of those links (`broker::run`, the relay's), which outlive `tracker`'s, so that
    /// a client's publish during a graceful stop (an `on_close` saying it left) still reaches
    /// the other processes.
    pub(crate) link_tracker: TaskTracker,
    /// `stop(close_active_connections=True)` was called: sockets opening late close at once.
    pub(crate) closing_all: AtomicBool,
    /// The same, for HTTP connections: none waits on its client any longer (`http/serve.rs`).
    pub(crate) force_stop: CancellationToken,
    pub(crate) stopping: AtomicBool,
    /// Whether pings and pongs from clients go to the loop: only while it has a handler for
    /// them, so that without one they cost a relaxed load and nothing else.
    pub(crate) ping_events: AtomicBool,
    pub(crate) pong_events: AtomicBool,
    /// Sibling processes that share this server's topics (`server.workers(n)`).
    pub relay: Option<Relay>,
    /// The certificate new TLS connections get; `None`: plain TCP.
    pub tls: Option<Certs>,
}

impl Shared {
    pub(crate) fn new(config: ServerConfig, remote: Option<Remote>) -> io::Result<Self> {
        Ok(Self {
            remote,
            budget: IncomingBudget::new(config.max_incoming_bytes),
            relay: config
                .relay
                .as_ref()
                .map(|paths| Relay::new(paths.peers.len())),
            tls: config.tls.clone().map(Certs::new).transpose()?,
            config,
            events: EventQueue::new()?,
            topics: TopicRegistry::default(),
            publish_run: PendingRun::default(),
            stats: Stats::default(),
            log_limiter: LogLimiter::default(),
            conns: Mutex::new(FxHashMap::default()),
            websocket_slots: AtomicUsize::new(0),
            pending_requests: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            links_end: CancellationToken::new(),
            link_tracker: TaskTracker::new(),
            closing_all: AtomicBool::new(false),
            force_stop: CancellationToken::new(),
            stopping: AtomicBool::new(false),
            ping_events: AtomicBool::new(false),
            pong_events: AtomicBool::new(false),
        })
    }

    /// Hand clients' pings and pongs to the loop from now on (or stop). Frames already parsed
    /// are not affected: a removed handler may still see a few, which the loop ignores.
    pub fn set_control_events(&self, pings: bool, pongs: bool) {
        self.ping_events.store(pings, Ordering::Relaxed);
        self.pong_events.store(pongs, Ordering::Relaxed);
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A connection whose 101 is yet to be written: not counted, nor closed by `stop`, until
    /// `register` (a client that leaves before the 101 never shows in `pending_websockets`).
    pub(crate) fn connection(
        self: &Arc<Self>,
        id: u64,
        remote: Peer,
        deflate: Option<DeflateParams>,
    ) -> Arc<Conn> {
        Arc::new(Conn::new(id, remote, self.clone(), deflate))
    }

    pub(crate) fn register(&self, conn: &Arc<Conn>) {
        self.conns.lock().insert(conn.id, conn.clone());
    }

    /// No longer an open WebSocket (`pending_websockets`). Its `max_connections` slot is not
    /// given back here but when its task ends (`task.rs`, `Task`'s drop), after its close has
    /// been flushed: a client that sends its close frame and reads nothing keeps what it made
    /// the server queue for up to the flush's 5 s, and reconnecting meanwhile got it a slot of
    /// its own each time (40 such cycles held a gigabyte under a limit of 5).
    pub(crate) fn unregister(&self, id: u64) {
        self.conns.lock().remove(&id);
    }

    /// Take one of `max_connections` for a handshake; false when all are in use.
    pub(crate) fn reserve_slot(&self) -> bool {
        let max = self.config.max_connections;
        if max == 0 {
            return true;
        }
        self.websocket_slots
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < max).then_some(used + 1)
            })
            .is_ok()
    }

    pub(crate) fn release_slot(&self) {
        if self.config.max_connections > 0 {
            // Never below 0: a release too many would otherwise wrap the count and refuse
            // every handshake for good.
            let released =
                self.websocket_slots
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                        used.checked_sub(1)
                    });
            debug_assert!(released.is_ok(), "a max_connections slot released twice");
        }
    }

    pub fn open_websockets(&self) -> usize {
        self.conns.lock().len()
    }

    /// HTTP requests whose head has been read and whose answer (a 101 too) is not yet handed
    /// over to be written: Bun's `pendingRequests`.
    pub fn pending_requests(&self) -> usize {
        self.pending_requests.load(Ordering::SeqCst)
    }

    /// Local subscribers only: those of other processes sharing the topic through Redis are
    /// not known here.
    pub fn subscriber_count(&self, topic: &str) -> usize {
        self.topics.subscriber_count(topic)
    }

    /// What `max_incoming_bytes` caps: bytes in incomplete messages and in messages not yet
    /// handed to Python.
    pub fn incoming_bytes(&self) -> usize {
        self.budget.held()
    }

    /// Messages of `bytes` in all left the event queue for the application (or were dropped
    /// with their socket): off the incoming budget. Whoever drains the queue calls it, once per
    /// batch rather than per message: the budget is one counter every worker thread shares.
    pub fn incoming_taken(&self, bytes: usize) {
        self.budget.release(bytes);
    }

    /// `srv.stats()`: every counter by name, and the connections closed by close code.
    #[allow(clippy::type_complexity)]
    pub fn stats(&self) -> (Vec<(&'static str, u64)>, Vec<(u16, u64)>) {
        // A handler that publishes, then reads the counters, sees its publishes counted.
        self.settle_publishes();
        let counters = Counter::ALL
            .iter()
            .map(|&counter| (counter.name(), self.stats.get(counter)))
            .collect();
        (counters, self.stats.closes_by_code())
    }

    /// Hand a line to Python's `logging`, unless this kind is over its rate limit.
    pub(crate) fn log(
        &self,
        kind: LogKind,
        peer: impl ToString,
        code: u16,
        reason: impl Into<Cow<'static, str>>,
    ) {
        if let Some(admitted) = self.log_limiter.admit(kind) {
            self.events.push(Event::Log(Box::new(LogRecord {
                kind,
                peer: peer.to_string(),
                code,
                reason: reason.into(),
                left_out: admitted.left_out,
                fills_second: admitted.fills_second,
            })));
        }
    }

    /// Lines of the log kind numbered `kind` left out since the last one logged.
    pub(crate) fn take_left_out(&self, kind: usize) -> u32 {
        self.log_limiter.take_left_out(kind)
    }

    /// Count the outcome of sending one message of `payload_len` bytes.
    pub(crate) fn count_send(&self, status: SendStatus, payload_len: usize) {
        let bytes = payload_len as u64;
        match status {
            SendStatus::Dropped => self.stats.add(Counter::SendsDropped, 1),
            SendStatus::Backpressured => self.stats.add_all([
                (Counter::SendsBackpressured, 1),
                (Counter::MessagesOut, 1),
                (Counter::BytesOut, bytes),
            ]),
            SendStatus::Sent(_) => self
                .stats
                .add_all([(Counter::MessagesOut, 1), (Counter::BytesOut, bytes)]),
        }
    }

    /// `conn` subscribed to `topic`; `first`: no one here was. Redis hears of the topic's
    /// first subscriber only.
    pub(crate) fn subscribed(&self, topic: &Arc<str>, first: bool) {
        if first {
            if let Some(remote) = &self.remote {
                remote.topic_changed(topic.clone());
            }
        }
    }

    /// Queue the run of publishes not yet queued, if any: before anything that must come after
    /// them (`publish_run.rs`).
    pub(crate) fn settle_publishes(&self) {
        self.publish_run.settle(&self.stats);
    }

    pub(crate) fn unsubscribed(&self, topic: &str, outcome: Unsubscribed) {
        if outcome == Unsubscribed::Last {
            if let Some(remote) = &self.remote {
                remote.topic_changed(topic.into());
            }
        }
    }

    /// Whether this server shares topics through Redis and is connected now (0/1 in `stats()`).
    pub fn redis_connected(&self) -> bool {
        self.remote.as_ref().is_some_and(Remote::is_connected)
    }

    /// Queue one shared frame to every subscriber of `topic` except `exclude`, and hand it to
    /// the other processes: through Redis if it is configured, else to the sibling workers, if
    /// any. The status tells about this process's subscribers only.
    pub fn publish(
        &self,
        topic: &str,
        frame: OutFrame,
        payload_len: usize,
        exclude: Option<u64>,
    ) -> SendStatus {
        self.publish_with(topic, frame, payload_len, exclude, false)
    }

    /// `publish`; with `compress`, compressed for the subscribers that negotiated
    /// permessage-deflate. Those without context takeover on the server's side share one
    /// compressed frame per window size; the others' own compressors each compress it (their
    /// windows differ); subscribers without deflate get the frame as it is. `compress` travels
    /// to the other processes as RSV1 in the opcode byte.
    pub fn publish_with(
        &self,
        topic: &str,
        frame: OutFrame,
        payload_len: usize,
        exclude: Option<u64>,
        compress: bool,
    ) -> SendStatus {
        self.stats.add(Counter::Publishes, 1);
        if let Some(remote) = &self.remote {
            // Counted as published by the broker once Redis has taken it. Redis reaches the
            // sibling workers too: relaying as well would give them every message twice.
            let opcode = frame.opcode() | if compress { RSV1 } else { 0 };
            if let Err(lost) = remote.publish(topic, opcode, frame.payload_bytes()) {
                self.stats.add(Counter::RedisPublishesLost, 1);
                match lost {
                    Lost::Full { first: true } => {
                        let why = "64 MiB or 65,536 publishes already wait for Redis";
                        self.log(LogKind::RedisBacklog, "", 0, why);
                    }
                    Lost::TooBig => self.log(LogKind::RedisTooBig, "", 0, ""),
                    _ => {}
                }
            }
        } else if let Some(relay) = &self.relay {
            relay.forward(self, topic, &frame, compress);
        }
        self.publish_local(topic, frame, payload_len, exclude, compress)
    }

    /// Queue one shared frame to every subscriber of `topic` here except `exclude`: a publish
    /// of this process, or one from another process (relayed by a sibling, or through Redis).
    pub(crate) fn publish_local(
        &self,
        topic: &str,
        frame: OutFrame,
        payload_len: usize,
        exclude: Option<u64>,
        compress: bool,
    ) -> SendStatus {
        let mut status: Option<SendStatus> = None;
        // The frame compressed once per server window size, for stateless subscribers.
        let mut compressed: [Option<OutFrame>; 7] = Default::default();
        let Some(subscribers) = self.topics.get(topic) else {
            return SendStatus::Dropped;
        };
        // Within a dispatch batch a small frame is encoded once into the topic's arena, and
        // each subscriber queues a range of it (`pubsub/arena.rs`).
        let shared = if frame.payload().len() <= INLINE_PAYLOAD {
            batch::append_to_batch(topic, &frame)
        } else {
            None
        };
        // Within a batch, a publish to every subscriber, uncompressed, of a frame in the arena
        // can join the run of publishes to its topic (`publish_run.rs`); any other publish
        // comes after the run there is.
        let run_member = match &shared {
            Some(range) if exclude.is_none() && !compress => {
                let deferred =
                    self.publish_run
                        .defer(&self.stats, &subscribers, range, payload_len);
                if let Some(status) = deferred {
                    return status;
                }
                true
            }
            _ => {
                self.settle_publishes();
                false
            }
        };
        // This server, as its connections hold it, if this publish begins a run.
        let mut owner: Option<Arc<Shared>> = None;
        let mut found = Found::default();
        // Counted here once per publish, not once per recipient: fan-out is the hot path.
        let (mut queued, mut backpressured, mut dropped) = (0u64, 0u64, 0u64);
        let fan_out = batch::FanOut::begin();
        subscribers.for_each(|id, conn| {
            // A subscriber ended abruptly (its peer gone, or kicked over its backpressure limit
            // by a publish before this one) leaves its topics only when its task ends: it is
            // no recipient, and not a dropped delivery that would make the publish
            // `Dropped` for those that got it.
            if Some(id) != exclude && !conn.is_terminated() {
                // `compress` first: a plain publish does not even look at the connection's field.
                let deflate = if compress {
                    conn.deflate.as_deref()
                } else {
                    None
                };
                let sent = match (deflate, &shared) {
                    (Some(deflate), _) => {
                        let params = &deflate.params;
                        if params.stateless() {
                            let bits = params.server_max_window_bits.clamp(9, 15);
                            let once = compressed[usize::from(bits - 9)]
                                .get_or_insert_with(|| compress_once(&frame, bits));
                            conn.send_frame(once, payload_len)
                        } else {
                            conn.send_compressed(frame.opcode(), frame.payload())
                        }
                    }
                    (_, Some(range)) => conn.send_shared(range, payload_len),
                    (_, None) => conn.send_frame(&frame, payload_len),
                };
                match sent {
                    SendStatus::Sent(_) => queued += 1,
                    SendStatus::Backpressured => backpressured += 1,
                    SendStatus::Dropped => dropped += 1,
                }
                status = Some(status.map_or(sent, |acc| acc.merge(sent)));
                if run_member {
                    found.add(conn);
                    owner.get_or_insert_with(|| conn.shared.clone());
                }
            }
        });
        drop(fan_out);
        if let Some(owner) = owner {
            // The publishes to this topic that follow, in this batch, only join this one.
            let limit = self.config.ws.backpressure_limit;
            self.publish_run
                .start(PublishRun::new(subscribers, found, limit));
            batch::run_started(owner);
        }
        let delivered = queued + backpressured;
        batch::count_deliveries(delivered as usize);
        self.stats.add_all([
            (Counter::Deliveries, delivered),
            (Counter::MessagesOut, delivered),
            (Counter::BytesOut, delivered * payload_len as u64),
            (Counter::SendsBackpressured, backpressured),
            (Counter::SendsDropped, dropped),
        ]);
        status.unwrap_or(SendStatus::Dropped)
    }
}

/// `frame` compressed with no context, for every subscriber whose server window is `bits`.
fn compress_once(frame: &OutFrame, bits: u8) -> OutFrame {
    let mut payload = Vec::new();
    deflate::with_shared_deflater(bits, |deflater| {
        deflater.compress(frame.payload(), &mut payload)
    });
    OutFrame::new(frame.opcode() | RSV1, bytes::Bytes::from(payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ws::conn::ReadyState;
    use crate::engine::ws::protocol::OP_BINARY;
    use bytes::Bytes;

    #[test]
    fn a_publish_goes_to_redis_once_with_its_payload_shared_or_is_counted_lost() {
        let (remote, mut inbox) = Remote::new();
        let shared = Shared::new(ServerConfig::default(), Some(remote)).unwrap();
        let payload = Bytes::from_static(b"\x00\x01payload");
        let publish = || shared.publish("t", OutFrame::new(OP_BINARY, payload.clone()), 9, None);
        // Not connected yet: lost at once, never queued behind the outage.
        assert_eq!(publish(), SendStatus::Dropped);
        assert_eq!(shared.stats.get(Counter::RedisPublishesLost), 1);
        assert!(inbox.outgoing.try_recv().is_err());
        shared.remote.as_ref().unwrap().set_connected(true);
        publish();
        let out = inbox.outgoing.try_recv().unwrap();
        assert_eq!((&*out.topic, out.opcode), ("t", OP_BINARY));
        assert_eq!(
            out.payload.as_ptr(),
            payload.as_ptr(),
            "copied instead of shared"
        );
        assert_eq!(shared.stats.get(Counter::Publishes), 2);
        assert_eq!(shared.stats.get(Counter::RedisPublishesLost), 1);
    }

    #[test]
    fn redis_hears_of_a_topics_first_subscriber_and_its_last_only() {
        fn names(topics: Vec<Arc<str>>) -> Vec<String> {
            topics.iter().map(|t| t.to_string()).collect()
        }
        let (remote, _inbox) = Remote::new();
        let shared = Arc::new(Shared::new(ServerConfig::default(), Some(remote)).unwrap());
        let conns: Vec<_> = (1..=3)
            .map(|id| shared.connection(id, Peer::Ip([127, 0, 0, 1].into(), 40000), None))
            .collect();
        for conn in &conns {
            // Only an open socket subscribes, as the application sees one from `on_open`.
            conn.set_state(ReadyState::Open);
        }
        let remote = shared.remote.as_ref().unwrap();
        remote.track_changes();
        conns[0].subscribe("room");
        assert_eq!(names(remote.take_changes(10)), ["room"]);
        conns[1].subscribe("room");
        conns[2].subscribe("room");
        conns[0].unsubscribe("room");
        conns[1].unsubscribe("room");
        assert!(remote.take_changes(10).is_empty());
        conns[2].finish();
        assert_eq!(names(remote.take_changes(10)), ["room"]);
        // The registry holds each Conn, which holds Shared: unregistered, as their tasks would.
        for conn in &conns {
            shared.unregister(conn.id);
        }
    }
}
