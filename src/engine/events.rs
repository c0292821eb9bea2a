//! Rust-to-Python events: one queue per server, drained by the asyncio loop in batches.
//!
//! Tokio threads push and never wait for the GIL. The wake-up fd is written only when the queue
//! goes from empty to non-empty, so a burst of N events costs one syscall and one loop wake-up.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::conn::Conn;
use super::http::Reply;
use super::wake::Wakeup;

/// A request waiting for the Python handler's answer.
pub struct HttpRequest {
    /// The id the WebSocket gets if this request is upgraded.
    pub id: u64,
    pub method: String,
    pub path: String,
    pub query: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub remote: SocketAddr,
    /// A valid WebSocket handshake on a server that accepts WebSockets.
    pub is_websocket: bool,
    pub reply: oneshot::Sender<Reply>,
}

pub enum Event {
    Open(Arc<Conn>),
    Text(u64, Utf8Bytes),
    Binary(u64, Bytes),
    /// A congested connection has written everything it had queued.
    Drain(u64),
    /// The client broke the protocol: close with this code once earlier events are handled.
    Fail(u64, u16, &'static str),
    Close(u64, u16, String),
    Request(Box<HttpRequest>),
    /// A request was accepted for upgrade but the connection never opened.
    UpgradeFailed(u64),
    /// The server stopped: its listener is closed and every connection has ended.
    Stopped,
}

pub struct EventQueue {
    events: Mutex<Vec<Event>>,
    wakeup: Wakeup,
}

impl EventQueue {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            events: Mutex::new(Vec::with_capacity(256)),
            wakeup: Wakeup::new()?,
        })
    }

    pub fn push(&self, event: Event) {
        let was_empty = {
            let mut events = self.events.lock();
            let was_empty = events.is_empty();
            events.push(event);
            was_empty
        };
        if was_empty {
            self.wakeup.wake();
        }
    }

    /// Move every queued event into `out` (which should be empty).
    ///
    /// The wake-up is cleared *before* taking the batch: an event pushed after the take then
    /// finds an empty queue and wakes the loop again, so no event waits for a wake-up that
    /// already happened.
    pub fn drain_into(&self, out: &mut Vec<Event>) {
        self.wakeup.clear();
        std::mem::swap(&mut *self.events.lock(), out);
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.wakeup.fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_order_and_wake_once_per_batch() {
        let q = EventQueue::new().unwrap();
        for id in 0..3 {
            q.push(Event::Drain(id));
        }
        let mut out = Vec::new();
        q.drain_into(&mut out);
        let ids: Vec<u64> = out
            .iter()
            .map(|e| match e {
                Event::Drain(id) => *id,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(ids, vec![0, 1, 2]);
        let mut again = Vec::new();
        q.drain_into(&mut again);
        assert!(again.is_empty());
    }
}
