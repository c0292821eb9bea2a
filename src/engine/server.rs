//! A listening server: the accept loop, the registry of open WebSockets, publish and stop.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustc_hash::FxHashMap;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::bridge::events::EventQueue;
use super::config::ServerConfig;
use super::http::serve;
use super::pubsub::topics::TopicRegistry;
use super::runtime::runtime;
use super::ws::budget::IncomingBudget;
use super::ws::conn::{self, Conn, SendStatus};
use super::ws::encode::OutFrame;
use super::ws::outbound::INLINE_PAYLOAD;
use super::ws::Event;

/// State shared by the server's tasks and its connections.
pub struct Shared {
    pub config: ServerConfig,
    pub events: EventQueue<Arc<Conn>>,
    pub topics: TopicRegistry<Arc<Conn>>,
    pub(crate) budget: IncomingBudget,
    conns: Mutex<FxHashMap<u64, Arc<Conn>>>,
    /// WebSockets open or being upgraded, counted only when `max_connections` is set.
    websocket_slots: AtomicUsize,
    next_id: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    /// Every task of this server: the accept loop, HTTP connections, WebSocket connections.
    pub(crate) tracker: TaskTracker,
    /// `stop(close_active_connections=True)` was called: sockets opening late close at once.
    pub(crate) closing_all: AtomicBool,
    stopping: AtomicBool,
}

impl Shared {
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn register(self: &Arc<Self>, id: u64, remote: IpAddr) -> Arc<Conn> {
        let conn = Arc::new(Conn::new(id, remote, self.clone()));
        self.conns.lock().insert(id, conn.clone());
        conn
    }

    pub(crate) fn unregister(&self, id: u64) {
        if self.conns.lock().remove(&id).is_some() {
            self.release_slot();
        }
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
            self.websocket_slots.fetch_sub(1, Ordering::AcqRel);
        }
    }

    pub fn open_websockets(&self) -> usize {
        self.conns.lock().len()
    }

    /// Queue one shared frame to every subscriber of `topic` except `exclude`.
    pub fn publish(
        &self,
        topic: &str,
        frame: OutFrame,
        payload_len: usize,
        exclude: Option<u64>,
    ) -> SendStatus {
        let mut status: Option<SendStatus> = None;
        // Within a dispatch batch a small frame is encoded once into the topic's arena, and
        // each subscriber queues a range of it (`arena.rs`).
        let shared = if frame.payload().len() <= INLINE_PAYLOAD {
            conn::append_to_batch(topic, &frame)
        } else {
            None
        };
        self.topics.for_each(topic, |id, conn| {
            if Some(id) != exclude {
                let sent = match &shared {
                    Some(range) => conn.send_shared(range, payload_len),
                    None => conn.send_frame(&frame, payload_len),
                };
                status = Some(status.map_or(sent, |acc| acc.merge(sent)));
            }
        });
        status.unwrap_or(SendStatus::Dropped)
    }
}

pub struct Server {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
}

fn resolve(host: &str, port: u16) -> io::Result<SocketAddr> {
    (host, port).to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("{host} has no address"),
        )
    })
}

impl Server {
    /// Bind and start accepting on the shared runtime. Returns once the port is listening.
    pub fn start(config: ServerConfig) -> io::Result<Server> {
        let addr = resolve(&config.host, config.port)?;
        let _entered = runtime().enter();
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(4096)?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            budget: IncomingBudget::new(config.max_incoming_bytes),
            config,
            events: EventQueue::new()?,
            topics: TopicRegistry::default(),
            conns: Mutex::new(FxHashMap::default()),
            websocket_slots: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            closing_all: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
        });
        shared.tracker.spawn(accept_loop(listener, shared.clone()));
        Ok(Server { shared, local_addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stop accepting; with `close_active`, close open WebSockets with 1001. `Event::Stopped`
    /// follows once the listener is closed and every connection has ended.
    pub fn stop(&self, close_active: bool) {
        let shared = &self.shared;
        shared.shutdown.cancel();
        if close_active {
            shared.closing_all.store(true, Ordering::Release);
            let conns: Vec<Arc<Conn>> = shared.conns.lock().values().cloned().collect();
            for conn in conns {
                conn.close(1001, "server shutting down");
            }
        }
        if !shared.stopping.swap(true, Ordering::AcqRel) {
            let shared = shared.clone();
            runtime().spawn(async move {
                shared.tracker.close();
                shared.tracker.wait().await;
                shared.events.push(Event::Stopped);
            });
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    shared.tracker.spawn(serve::serve_connection(stream, remote, shared.clone()));
                }
                // Out of descriptors or memory: back off instead of spinning on the error.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
}
