//! Topics shared between sibling processes (`server.workers(n)`): every publish is also written
//! to each sibling over a Unix stream socket, and what a sibling writes is published here to the
//! local subscribers only. No Python and no broker on the path.
//!
//! Each worker listens on its own socket path; each connects to every sibling's path and reads
//! what that sibling publishes. A worker thus receives its siblings' publishes as soon as its own
//! connections are up, which is what a (re)started worker waits for before it reports ready.
//! Delivery is at most once, as with Redis pub/sub: a sibling that is down (or not yet linked),
//! or so far behind that `OUTLET_LIMIT` bytes wait for it, misses the publishes meanwhile, and
//! each miss is counted. A (re)started worker accepts clients only once its links are up (or
//! after `ACCEPT_WITHOUT_LINKS_AFTER`), so that its first clients' publishes reach every sibling.
//!
//! Wire format of one publish: topic length (u32 LE), payload length (u32 LE), opcode (u8),
//! topic, payload.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use super::encode::OutFrame;
use super::protocol::RSV1;
use super::shared::Shared;
use crate::engine::bridge::events::LogKind;
use crate::engine::config::RelayPaths;

/// Bytes that may wait for one sibling before its publishes are dropped: a sibling this far
/// behind (or stuck) must not make this process hold an unbounded backlog.
const OUTLET_LIMIT: usize = 64 * 1024 * 1024;
const HEADER: usize = 9;
/// The one byte a worker writes to a sibling's relay socket, as its link ends at its stop.
const BYE: u8 = 0xB7;
/// A write buffer larger than this (a burst's, a stall's) is given back once written; one of
/// this size or less is reused, as a steady stream of publishes needs.
const KEPT_CAPACITY: usize = 1024 * 1024;
/// Reconnecting to a sibling that went away (restarted): fast at first, then every 200 ms.
const FIRST_RETRY: Duration = Duration::from_millis(5);
const MAX_RETRY: Duration = Duration::from_millis(200);
/// How long a (re)started worker waits for its links before it accepts clients without them: the
/// siblings retry every `MAX_RETRY` at most, so live siblings link well within it, and one that
/// is stuck (stopped, wedged) does not keep this worker from serving for longer. Clients the
/// kernel hands this worker meanwhile wait in its listen backlog.
pub(crate) const ACCEPT_WITHOUT_LINKS_AFTER: Duration = Duration::from_secs(1);
/// How long a stopped server's sibling may take to read the last publishes of its connections.
const LAST_PUBLISHES: Duration = Duration::from_secs(2);

/// One sibling reading our publishes: what waits for it, and the wake-up of its writer task.
struct Outlet {
    pending: Mutex<Pending>,
    ready: Notify,
    /// The sibling's pid, for log lines (0 if the kernel would not say).
    pid: i32,
}

#[derive(Default)]
struct Pending {
    bytes: BytesMut,
    /// What the writer took and is still writing: on the same limit, or a stuck sibling would
    /// hold the limit twice (the waiting bytes and the chunk being written).
    in_flight: usize,
    /// Publishes were dropped since the sibling last read what the writer took: the drops of
    /// one stall are logged once, as a connection's backpressure drops are.
    dropping: bool,
}

#[derive(Default)]
pub struct Relay {
    /// How many siblings there are, linked or not.
    siblings: usize,
    outlets: Mutex<Vec<Arc<Outlet>>>,
    /// Siblings we receive from (our connections to them are up).
    receiving: AtomicUsize,
    /// Siblings that said they stopped (`BYE`) as their link ended, not yet linked again: they
    /// had no client left, so they miss nothing (the whole run stopping, or one worker stopped
    /// alone, whose replacement accepts clients only once linked).
    departed: AtomicUsize,
    /// A link came up (an outlet or a connection of ours): `linked` looks again.
    links_changed: Notify,
    /// Publishes a sibling missed, once per sibling that missed each (`relay_publishes_lost`):
    /// not written to it because they would have passed `OUTLET_LIMIT`, or made while it had no
    /// link to us (died, restarting, not yet connected; not `departed`).
    dropped: AtomicU64,
}

/// Why a sibling misses a publish, for the log line.
const BEHIND: &str = "64 MiB already wait for it; more are not logged until it reads again";
const TOO_LARGE: &str = "a publish over 64 MiB";

impl Relay {
    pub(crate) fn new(siblings: usize) -> Self {
        Self {
            siblings,
            ..Self::default()
        }
    }

    /// Queue a publish for every sibling; the writer tasks send it. Called on the publishing
    /// thread (the loop's, in a handler), so it only copies and signals.
    /// `compress` (the publisher asked for permessage-deflate) travels as RSV1 in the opcode byte.
    /// A sibling that misses it is counted, and logged through `shared` when its drops start.
    pub(crate) fn forward(&self, shared: &Shared, topic: &str, frame: &OutFrame, compress: bool) {
        let outlets = self.outlets.lock();
        // A sibling with no link to us misses it as surely as one too far behind, and is
        // counted so: a worker's crash, or the moment a restarted one took to link, left no
        // trace but in the supervisor's log. (A sibling that restarted may briefly have two
        // outlets, the old one's end not yet seen: it is not counted as missing then.)
        let linked_or_departed = outlets.len() + self.departed.load(Ordering::Acquire);
        let missing = self.siblings.saturating_sub(linked_or_departed);
        if missing > 0 {
            self.dropped.fetch_add(missing as u64, Ordering::Relaxed);
        }
        if outlets.is_empty() {
            return;
        }
        let payload = frame.payload();
        let size = HEADER + topic.len() + payload.len();
        for outlet in outlets.iter() {
            let mut pending = outlet.pending.lock();
            if pending.bytes.len() + pending.in_flight + size > OUTLET_LIMIT {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                // A publish too large for any backlog is no stall: each is worth a line (the
                // limiter still caps them at ten a second).
                let too_large = size > OUTLET_LIMIT;
                if too_large {
                    shared.log(LogKind::RelayDrop, outlet.pid, 0, TOO_LARGE);
                } else if !pending.dropping {
                    pending.dropping = true;
                    shared.log(LogKind::RelayDrop, outlet.pid, 0, BEHIND);
                }
                continue;
            }
            let bytes = &mut pending.bytes;
            bytes.reserve(size);
            bytes.put_u32_le(topic.len() as u32);
            bytes.put_u32_le(payload.len() as u32);
            bytes.put_u8(frame.opcode() | if compress { RSV1 } else { 0 });
            bytes.put_slice(topic.as_bytes());
            bytes.put_slice(payload);
            drop(pending);
            outlet.ready.notify_one();
        }
    }

    /// Siblings whose publishes reach us.
    pub fn receiving(&self) -> usize {
        self.receiving.load(Ordering::Acquire)
    }

    /// Siblings our publishes reach.
    pub fn sending(&self) -> usize {
        self.outlets.lock().len()
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Bind our socket (replacing the file a previous run of this worker left) and start the tasks:
/// the accept loop for siblings, and one reader per sibling. Call inside the runtime.
pub(crate) fn start(shared: &Arc<Shared>, config: &RelayPaths) -> io::Result<()> {
    match std::fs::remove_file(&config.listen) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    let listener = StdUnixListener::bind(&config.listen)?;
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    shared.link_tracker.spawn(accept_siblings(
        listener,
        config.listen.clone(),
        shared.clone(),
    ));
    for peer in &config.peers {
        shared
            .link_tracker
            .spawn(receive_from(peer.clone(), shared.clone()));
    }
    Ok(())
}

fn relay_of(shared: &Shared) -> &Relay {
    shared
        .relay
        .as_ref()
        .expect("relay tasks run only with a relay")
}

/// Return once every sibling is linked both ways, the server stops, or `wait` has passed.
pub(crate) async fn linked(shared: &Shared, wait: Duration) {
    let relay = relay_of(shared);
    let all_linked = async {
        loop {
            // Registered before the look, so that a link coming up in between still wakes it.
            let changed = relay.links_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if relay.receiving() >= relay.siblings && relay.sending() >= relay.siblings {
                return;
            }
            changed.await;
        }
    };
    tokio::select! {
        _ = shared.shutdown.cancelled() => {}
        _ = tokio::time::timeout(wait, all_linked) => {}
    }
}

async fn accept_siblings(listener: UnixListener, path: PathBuf, shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.links_end.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let pid = stream.peer_cred().ok().and_then(|cred| cred.pid()).unwrap_or(0);
                    let outlet = Arc::new(Outlet { pending: Mutex::default(), ready: Notify::new(), pid });
                    let relay = relay_of(&shared);
                    {
                        let mut outlets = relay.outlets.lock();
                        // A sibling that departed and came back, most likely.
                        let _ = relay.departed.fetch_update(
                            Ordering::AcqRel,
                            Ordering::Acquire,
                            |n| n.checked_sub(1),
                        );
                        outlets.push(outlet.clone());
                    }
                    relay.links_changed.notify_waiters();
                    shared.link_tracker.spawn(feed(stream, outlet, shared.clone()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
    let _ = std::fs::remove_file(path);
}

/// Write our publishes to one sibling until it goes away or we stop. Once the server's
/// connections have all ended (`links_end`), what they published is written, then the task
/// ends; a sibling that does not take it within `LAST_PUBLISHES` (stopped, wedged) does not
/// hold the stop longer.
async fn feed(stream: UnixStream, outlet: Arc<Outlet>, shared: Arc<Shared>) {
    let (mut reader, mut writer) = stream.into_split();
    let mut probe = [0u8; 1];
    let mut chunk = BytesMut::new();
    let given_up = async {
        shared.links_end.cancelled().await;
        tokio::time::sleep(LAST_PUBLISHES).await;
    };
    tokio::pin!(given_up);
    let mut ending = false;
    // The sibling said it stopped (`BYE`) before its link closed.
    let mut departed = false;
    loop {
        if !ending {
            tokio::select! {
                _ = shared.links_end.cancelled() => ending = true,
                // A sibling never writes but `BYE`: readable means it closed (died or stopped).
                read = reader.read(&mut probe) => {
                    departed = is_bye(read, probe);
                    break;
                }
                _ = outlet.ready.notified() => {}
            }
        }
        {
            let mut pending = outlet.pending.lock();
            std::mem::swap(&mut chunk, &mut pending.bytes);
            pending.in_flight = chunk.len();
        }
        if chunk.is_empty() {
            if ending {
                break;
            }
            continue;
        }
        // Raced against the sibling's end, as the wait above: a sibling that is stopped
        // (SIGSTOP, a debugger) would otherwise hold this write, and once this server has
        // stopped, the stop that waits for this task, for as long as it stays so.
        let written = tokio::select! {
            _ = &mut given_up => break,
            read = reader.read(&mut probe) => {
                departed = is_bye(read, probe);
                break;
            }
            written = writer.write_all(&chunk) => written,
        };
        if written.is_err() {
            break;
        }
        chunk.clear();
        if chunk.capacity() > KEPT_CAPACITY {
            // A stall's backlog (up to `OUTLET_LIMIT`) is not kept once written: this buffer
            // and the one swapped for it at the next write kept their peak, resident, for as
            // long as the sibling lived.
            chunk = BytesMut::new();
        }
        // It read what it was sent, but for what its socket holds: the next drop starts a new
        // stall. Not when the backlog is taken: a writer that takes it after the drops began
        // (it was not scheduled sooner) has not got it to a sibling that may still be stopped.
        let mut pending = outlet.pending.lock();
        pending.in_flight = 0;
        pending.dropping = false;
    }
    // A write that failed as the sibling closed may end the loop before the readiness of the
    // byte it wrote first was seen: looked for once more, without waiting.
    let departed = departed || said_bye(&reader);
    let relay = relay_of(&shared);
    let mut outlets = relay.outlets.lock();
    outlets.retain(|o| !Arc::ptr_eq(o, &outlet));
    if departed {
        relay.departed.fetch_add(1, Ordering::AcqRel);
    } else {
        // What was queued for it and never reached it (a chunk not written whole counts whole):
        // missed, as what is published once its link is gone is. Nothing is queued for it from
        // here on: publishes queue under the lock held here, to the outlets left.
        let unsent = publishes_in(&chunk) + publishes_in(&outlet.pending.lock().bytes);
        relay.dropped.fetch_add(unsent, Ordering::Relaxed);
    }
}

/// How many publishes `bytes`, in the wire format, holds.
fn publishes_in(bytes: &[u8]) -> u64 {
    let (mut at, mut count) = (0, 0);
    while bytes.len() >= at + HEADER {
        let len = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        at += HEADER + len(at) + len(at + 4);
        count += 1;
    }
    count
}

/// Whether the sibling's one read byte was `BYE`.
fn is_bye(read: io::Result<usize>, byte: [u8; 1]) -> bool {
    matches!(read, Ok(1)) && byte[0] == BYE
}

/// Whether `BYE` waits to be read on `reader`: a read that does not wait, whatever tokio last
/// saw of the socket's readiness.
fn said_bye(reader: &OwnedReadHalf) -> bool {
    let mut byte = 0u8;
    // SAFETY: a read of at most one byte into a local; `MSG_DONTWAIT` never blocks.
    let read = unsafe {
        libc::recv(
            reader.as_ref().as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_DONTWAIT,
        )
    };
    read == 1 && byte == BYE
}

/// Receive one sibling's publishes, reconnecting whenever it goes away, until we stop.
async fn receive_from(path: PathBuf, shared: Arc<Shared>) {
    let mut retry = FIRST_RETRY;
    loop {
        let connected = tokio::select! {
            _ = shared.links_end.cancelled() => return,
            connected = UnixStream::connect(&path) => connected,
        };
        match connected {
            Ok(mut stream) => {
                retry = FIRST_RETRY;
                let relay = relay_of(&shared);
                relay.receiving.fetch_add(1, Ordering::AcqRel);
                relay.links_changed.notify_waiters();
                let stopped = tokio::select! {
                    _ = shared.links_end.cancelled() => true,
                    _ = read_publishes(&mut stream, &shared) => false,
                };
                relay.receiving.fetch_sub(1, Ordering::AcqRel);
                if stopped {
                    // Said before the link closes: this worker has no client left, so the
                    // sibling's publishes from now on miss no one here (`Relay::departed`).
                    // Never written otherwise, so one byte cannot be mistaken; and a socket
                    // this side never wrote to has room for it.
                    let _ = stream.try_write(&[BYE]);
                    return;
                }
            }
            Err(_) => {
                tokio::select! {
                    _ = shared.links_end.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

async fn read_publishes(stream: &mut UnixStream, shared: &Shared) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        // Looked at before the publishes are taken: taking them moves the buffer's start on,
        // and its capacity shrinks with what is left after it.
        let grown = buf.capacity() > KEPT_CAPACITY;
        while let Some((topic, frame, compress)) = next_publish(&mut buf) {
            let len = frame.payload().len();
            shared.publish_local(&topic, frame, len, None, compress);
        }
        if grown && buf.is_empty() {
            // Grown for one large publish: not kept for the link's life (the next `reserve`
            // would take the whole allocation back).
            buf = BytesMut::with_capacity(64 * 1024);
        }
    }
}

/// The next whole publish in `buf`, taken out of it.
fn next_publish(buf: &mut BytesMut) -> Option<(String, OutFrame, bool)> {
    if buf.len() < HEADER {
        return None;
    }
    let topic_len = u32::from_le_bytes(buf[0..4].try_into().unwrap()) as usize;
    let payload_len = u32::from_le_bytes(buf[4..8].try_into().unwrap()) as usize;
    let total = HEADER + topic_len + payload_len;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return None;
    }
    let opcode = buf[8];
    buf.advance(HEADER);
    let topic = String::from_utf8_lossy(&buf[..topic_len]).into_owned();
    buf.advance(topic_len);
    // A copy of its own: a payload cut out of `buf` would keep the whole read buffer alive for
    // as long as any subscriber's queue holds it, and a client that reads nothing, subscribed
    // to a topic that one publish in sixty goes to, held 64 KiB per 1 KiB its limit counted.
    let payload = Bytes::copy_from_slice(&buf[..payload_len]);
    buf.advance(payload_len);
    Some((
        topic,
        OutFrame::new(opcode & !RSV1, payload),
        opcode & RSV1 != 0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::bridge::events::Event;
    use crate::engine::config::{RelayPaths, ServerConfig};
    use crate::engine::ws::protocol::{OP_BINARY, OP_TEXT};

    fn relay_with_one_sibling() -> (Relay, Arc<Outlet>) {
        let relay = Relay::new(1);
        let outlet = outlet_of(&relay);
        (relay, outlet)
    }

    /// A sibling linked to `relay`.
    fn outlet_of(relay: &Relay) -> Arc<Outlet> {
        let outlet = Arc::new(Outlet {
            pending: Mutex::default(),
            ready: Notify::new(),
            pid: 42,
        });
        relay.outlets.lock().push(outlet.clone());
        outlet
    }

    fn shared() -> Shared {
        Shared::new(ServerConfig::default(), None).unwrap()
    }

    /// The relay lines `shared` has queued for the loop.
    fn logged(shared: &Shared) -> Vec<(String, &'static str)> {
        let mut events = Vec::new();
        shared.events.drain_into(&mut events);
        let mut lines = Vec::new();
        for event in events {
            if let Event::Log(record) = event {
                assert_eq!(record.kind, LogKind::RelayDrop);
                let std::borrow::Cow::Borrowed(reason) = record.reason else {
                    panic!("a relay line's reason is static");
                };
                lines.push((record.peer, reason));
            }
        }
        lines
    }

    #[test]
    fn publishes_round_trip_through_the_wire_format_split_anywhere() {
        let (relay, outlet) = relay_with_one_sibling();
        let shared = shared();
        relay.forward(
            &shared,
            "chat",
            &OutFrame::new(OP_TEXT, "héllo".into()),
            false,
        );
        relay.forward(
            &shared,
            "t",
            &OutFrame::new(OP_BINARY, vec![0u8; 70_000].into()),
            true,
        );
        let wire = outlet.pending.lock().bytes.split().freeze();
        for cut in [0, 1, 9, 13, 20, wire.len() - 1] {
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(p) = next_publish(&mut buf) {
                got.push(p);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(p) = next_publish(&mut buf) {
                got.push(p);
            }
            assert!(buf.is_empty());
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[0].0, "chat");
            assert_eq!(got[0].1.opcode(), OP_TEXT);
            assert_eq!(got[0].1.payload(), "héllo".as_bytes());
            assert!(!got[0].2, "not to be compressed");
            assert_eq!(got[1].0, "t");
            assert_eq!(got[1].1.opcode(), OP_BINARY);
            assert_eq!(got[1].1.payload().len(), 70_000);
            assert!(got[1].2, "to be compressed");
        }
        assert_eq!(relay.dropped(), 0);
    }

    #[test]
    fn a_publish_is_counted_missed_by_each_sibling_with_no_link() {
        let relay = Relay::new(3);
        let linked = outlet_of(&relay);
        let shared = shared();
        let frame = OutFrame::new(OP_TEXT, "hi".into());
        relay.forward(&shared, "t", &frame, false);
        assert_eq!(relay.dropped(), 2, "two of the three siblings have no link");
        assert!(
            !linked.pending.lock().bytes.is_empty(),
            "the linked one gets it"
        );
        relay.outlets.lock().clear();
        relay.forward(&shared, "t", &frame, false);
        assert_eq!(relay.dropped(), 5, "none linked: all three miss it");
        // A sibling that restarted and linked again before its old link's end was seen.
        outlet_of(&relay);
        outlet_of(&relay);
        outlet_of(&relay);
        outlet_of(&relay);
        relay.forward(&shared, "t", &frame, false);
        assert_eq!(relay.dropped(), 5);
        assert!(
            logged(&shared).is_empty(),
            "counted, not logged: the supervisor says why"
        );
    }

    #[test]
    fn a_sibling_that_said_it_stopped_misses_nothing_and_one_that_vanished_is_counted() {
        let config = ServerConfig {
            relay: Some(RelayPaths {
                listen: "/nonexistent/a".into(),
                peers: vec!["/nonexistent/b".into()],
            }),
            ..ServerConfig::default()
        };
        let shared = Arc::new(Shared::new(config, None).unwrap());
        let relay = relay_of(&shared);
        let frame = OutFrame::new(OP_TEXT, "left".into());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for says_bye in [true, false] {
            let outlet = outlet_of(relay);
            runtime.block_on(async {
                let (ours, mut theirs) = UnixStream::pair().unwrap();
                let feeding = tokio::spawn(feed(ours, outlet, shared.clone()));
                if says_bye {
                    theirs.write_all(&[BYE]).await.unwrap();
                }
                drop(theirs);
                tokio::time::timeout(Duration::from_secs(10), feeding)
                    .await
                    .expect("the link's end ends its writer")
                    .unwrap();
            });
            assert!(relay.outlets.lock().is_empty());
            let before = relay.dropped();
            relay.forward(&shared, "t", &frame, false);
            assert_eq!(
                relay.dropped() - before,
                u64::from(!says_bye),
                "BYE said: {says_bye}"
            );
            relay.departed.store(0, Ordering::Release);
        }
        // A sibling gone without BYE while publishes wait for it: they are counted as missed.
        for says_bye in [false, true] {
            let outlet = outlet_of(relay);
            // Queued with no writer running: they wait for it.
            for _ in 0..3 {
                relay.forward(&shared, "t", &frame, false);
            }
            let before = relay.dropped();
            runtime.block_on(async {
                let (ours, mut theirs) = UnixStream::pair().unwrap();
                if says_bye {
                    theirs.write_all(&[BYE]).await.unwrap();
                }
                drop(theirs);
                tokio::time::timeout(Duration::from_secs(10), feed(ours, outlet, shared.clone()))
                    .await
                    .expect("the link's end ends its writer");
            });
            let expected = if says_bye { 0 } else { 3 };
            assert_eq!(relay.dropped() - before, expected, "BYE said: {says_bye}");
            relay.departed.store(0, Ordering::Release);
        }
        // BYE, then the close, while the writer has publishes to write: the write fails as the
        // sibling closed, a branch chosen at random may see that before the byte, and the byte
        // still counts.
        for _ in 0..50 {
            let outlet = outlet_of(relay);
            relay.forward(&shared, "t", &frame, false);
            runtime.block_on(async {
                let (ours, mut theirs) = UnixStream::pair().unwrap();
                theirs.write_all(&[BYE]).await.unwrap();
                drop(theirs);
                tokio::time::timeout(Duration::from_secs(10), feed(ours, outlet, shared.clone()))
                    .await
                    .expect("the link's end ends its writer");
            });
            assert_eq!(relay.departed.swap(0, Ordering::AcqRel), 1);
        }
    }

    #[test]
    fn a_relayed_payload_is_a_copy_that_keeps_no_part_of_the_read_buffer() {
        let (relay, outlet) = relay_with_one_sibling();
        let shared = shared();
        for _ in 0..50 {
            relay.forward(
                &shared,
                "t",
                &OutFrame::new(OP_BINARY, vec![7u8; 1100].into()),
                false,
            );
        }
        let wire = outlet.pending.lock().bytes.split().freeze();
        let mut buf = BytesMut::with_capacity(64 * 1024);
        buf.extend_from_slice(&wire);
        let read_buffer = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.capacity();
        let mut payloads = 0;
        while let Some((_, frame, _)) = next_publish(&mut buf) {
            assert_eq!(frame.payload(), &[7u8; 1100][..]);
            let at = frame.payload().as_ptr() as usize;
            assert!(
                !read_buffer.contains(&at),
                "a slice of the read buffer would keep it all"
            );
            payloads += 1;
        }
        assert_eq!(payloads, 50);
    }

    #[test]
    fn accepting_waits_for_every_link_both_ways_or_the_stop() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let config = ServerConfig {
                relay: Some(RelayPaths {
                    listen: "/nonexistent/a".into(),
                    peers: vec!["/nonexistent/b".into(), "/nonexistent/c".into()],
                }),
                ..ServerConfig::default()
            };
            let shared = Arc::new(Shared::new(config, None).unwrap());
            let relay = relay_of(&shared);
            let waiting = tokio::spawn({
                let shared = shared.clone();
                async move { linked(&shared, Duration::from_secs(600)).await }
            });
            let link = |outlet: bool| {
                if outlet {
                    outlet_of(relay);
                } else {
                    relay.receiving.fetch_add(1, Ordering::AcqRel);
                }
                relay.links_changed.notify_waiters();
            };
            // Each link but the last: still waiting.
            for outlet in [true, false, true] {
                link(outlet);
                tokio::task::yield_now().await;
                assert!(!waiting.is_finished());
            }
            link(false);
            tokio::time::timeout(Duration::from_secs(10), waiting)
                .await
                .expect("linked both ways: accepting starts")
                .unwrap();
            // A sibling that never links: the stop ends the wait.
            relay.receiving.fetch_sub(1, Ordering::AcqRel);
            let waiting = tokio::spawn({
                let shared = shared.clone();
                async move { linked(&shared, Duration::from_secs(600)).await }
            });
            tokio::task::yield_now().await;
            assert!(!waiting.is_finished());
            shared.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(10), waiting)
                .await
                .expect("the stop ends the wait")
                .unwrap();
        });
    }

    #[test]
    fn the_chunk_being_written_counts_against_the_limit() {
        let (relay, outlet) = relay_with_one_sibling();
        let shared = shared();
        let big = OutFrame::new(OP_BINARY, vec![0u8; OUTLET_LIMIT / 2].into());
        relay.forward(&shared, "t", &big, false);
        // The writer took it and is still writing it (to a sibling that is stopped).
        let taken = outlet.pending.lock().bytes.split();
        outlet.pending.lock().in_flight = taken.len();
        relay.forward(&shared, "t", &big, false);
        assert_eq!(
            relay.dropped(),
            1,
            "64 MiB in all, the chunk being written included"
        );
    }

    #[test]
    fn a_sibling_too_far_behind_misses_publishes_counted_and_logged_once_per_stall() {
        let (relay, outlet) = relay_with_one_sibling();
        let shared = shared();
        let big = OutFrame::new(OP_BINARY, vec![0u8; OUTLET_LIMIT / 2].into());
        for _ in 0..4 {
            relay.forward(&shared, "t", &big, false);
        }
        assert_eq!(relay.dropped(), 3);
        assert!(outlet.pending.lock().bytes.len() <= OUTLET_LIMIT);
        assert_eq!(logged(&shared), [("42".to_owned(), BEHIND)]);
        // Its sibling read what the writer took: the next stall is news again.
        let taken = outlet.pending.lock().bytes.split();
        outlet.pending.lock().dropping = false;
        drop(taken);
        relay.forward(&shared, "t", &big, false);
        relay.forward(&shared, "t", &big, false);
        assert_eq!(relay.dropped(), 4);
        assert_eq!(logged(&shared), [("42".to_owned(), BEHIND)]);
    }

    /// Yield to the writer task until `done`, a bounded number of times.
    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..100_000 {
            if done() {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("{what} did not happen");
    }

    #[test]
    fn a_backlog_taken_while_its_sibling_is_stopped_is_the_same_stall() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (relay, outlet) = relay_with_one_sibling();
            let shared = Arc::new(shared());
            let (ours, mut sibling) = UnixStream::pair().unwrap();
            let half = OutFrame::new(OP_BINARY, vec![0u8; OUTLET_LIMIT / 2].into());
            let size = HEADER + 1 + OUTLET_LIMIT / 2;
            // The drops begin before the writer has run (it was not scheduled yet).
            relay.forward(&shared, "t", &half, false);
            relay.forward(&shared, "t", &half, false);
            assert_eq!(logged(&shared), [("42".to_owned(), BEHIND)]);
            let writer = tokio::spawn(feed(ours, outlet.clone(), shared.clone()));
            // It takes the backlog, and blocks on the stopped sibling's full socket.
            until("the writer taking the backlog", || {
                outlet.pending.lock().bytes.is_empty()
            })
            .await;
            // The chunk being written counts: neither fits beside it.
            relay.forward(&shared, "t", &half, false);
            relay.forward(&shared, "t", &half, false);
            assert_eq!(relay.dropped(), 3);
            assert_eq!(logged(&shared), [], "the same stall: one line");
            // The sibling reads the first backlog: the next drop is news.
            let mut first = vec![0u8; size];
            sibling.read_exact(&mut first).await.unwrap();
            until("the writer to see it written", || {
                !outlet.pending.lock().dropping
            })
            .await;
            // Two fill what waits for it whether or not the writer took the next one yet.
            relay.forward(&shared, "t", &half, false);
            relay.forward(&shared, "t", &half, false);
            assert_eq!(logged(&shared), [("42".to_owned(), BEHIND)]);
            writer.abort();
        });
    }

    #[test]
    fn a_stall_s_backlog_is_not_kept_once_written() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (relay, outlet) = relay_with_one_sibling();
            let shared = Arc::new(shared());
            let (ours, mut sibling) = UnixStream::pair().unwrap();
            let writer = tokio::spawn(feed(ours, outlet.clone(), shared.clone()));
            let half = OutFrame::new(OP_BINARY, vec![0u8; OUTLET_LIMIT / 2].into());
            let small = OutFrame::new(OP_BINARY, vec![1u8; 100].into());
            let mut read = vec![0u8; HEADER + 1 + OUTLET_LIMIT / 2];
            relay.forward(&shared, "t", &half, false);
            sibling.read_exact(&mut read).await.unwrap();
            // The writer swaps two buffers: the one that held the backlog came back as the
            // one publishes are added to, then as the one written, each time as large.
            for _ in 0..2 {
                relay.forward(&shared, "t", &small, false);
                sibling
                    .read_exact(&mut read[..HEADER + 1 + 100])
                    .await
                    .unwrap();
                let kept = outlet.pending.lock().bytes.capacity();
                assert!(kept <= KEPT_CAPACITY, "{kept} bytes kept");
            }
            writer.abort();
        });
    }

    #[test]
    fn a_publish_over_the_limit_is_dropped_and_logged_each_time() {
        let (relay, outlet) = relay_with_one_sibling();
        let shared = shared();
        let huge = OutFrame::new(OP_BINARY, vec![0u8; OUTLET_LIMIT].into());
        relay.forward(&shared, "t", &huge, false);
        relay.forward(&shared, "t", &huge, false);
        assert_eq!(relay.dropped(), 2);
        assert!(outlet.pending.lock().bytes.is_empty());
        let line = ("42".to_owned(), TOO_LARGE);
        assert_eq!(logged(&shared), [line.clone(), line]);
    }
}
