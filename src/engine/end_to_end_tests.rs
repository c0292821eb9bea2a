//! The engine over real sockets with no Python: a thread plays the asyncio loop (drains events
//! and answers them) while a tokio-tungstenite client or a raw TCP client talks to the server.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use super::bridge::events::Reply;
use super::bridge::wake::poll_readable;
use super::{Conn, Event, SendStatus, Server, ServerConfig, WsLimits};

/// Drain events until `f` returns `Some`, answering every request with an upgrade.
fn run_app<T>(server: &Server, deadline: Duration, mut f: impl FnMut(Event) -> Option<T>) -> T {
    let shared = server.shared();
    let end = Instant::now() + deadline;
    let mut batch = Vec::new();
    loop {
        assert!(Instant::now() < end, "timed out waiting for events");
        if !poll_readable(shared.events.fd(), 200) {
            continue;
        }
        shared.events.drain_into(&mut batch);
        for event in batch.drain(..) {
            let event = match event {
                Event::Request(req) => {
                    let _ = req.reply.send(Reply::Upgrade(Vec::new()));
                    continue;
                }
                other => other,
            };
            if let Some(out) = f(event) {
                return out;
            }
        }
    }
}

fn start(ws: WsLimits) -> Server {
    Server::start(ServerConfig {
        ws,
        ..ServerConfig::default()
    })
    .unwrap()
}

#[test]
fn echo_roundtrip_and_client_close_code() {
    let server = start(WsLimits::default());
    let url = format!("ws://{}/ws", server.local_addr().unwrap());
    let client = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            ws.send(Message::text("héllo")).await.unwrap();
            let reply = ws.next().await.unwrap().unwrap();
            assert_eq!(reply, Message::text("héllo"));
            ws.close(Some(CloseFrame {
                code: CloseCode::Library(4000),
                reason: "done".into(),
            }))
            .await
            .unwrap();
            while ws.next().await.is_some() {}
        });
    });
    let mut conn: Option<Arc<Conn>> = None;
    let mut order = Vec::new();
    let (code, reason) = run_app(&server, Duration::from_secs(10), |event| match event {
        Event::Open(c) => {
            order.push("open");
            conn = Some(c);
            None
        }
        Event::Text(_, text) => {
            order.push("text");
            let c = conn.as_ref().unwrap();
            c.message_taken(text.len());
            assert_eq!(c.send_text(&text), SendStatus::Sent("héllo".len()));
            None
        }
        Event::Close(_, code, reason) => {
            order.push("close");
            Some((code, reason))
        }
        _ => None,
    });
    client.join().unwrap();
    assert_eq!((code, reason.as_str()), (4000, "done"));
    assert_eq!(order, ["open", "text", "close"]);
}

fn raw_handshake(addr: std::net::SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// A client that stops reading drives sends from Sent to Backpressured to Dropped; once it
/// reads again every accepted byte arrives, `buffered_amount` returns to zero and exactly one
/// drain event fires before the client's close.
#[test]
fn paused_reader_backpressure_then_drain() {
    const LIMIT: usize = 1024 * 1024;
    let server = start(WsLimits {
        backpressure_limit: LIMIT,
        ..WsLimits::default()
    });
    let addr = server.local_addr().unwrap();
    // The handshake needs the app to answer the request, so it runs beside it.
    let handshake = thread::spawn(move || raw_handshake(addr));
    let conn = run_app(&server, Duration::from_secs(10), |event| match event {
        Event::Open(c) => Some(c),
        _ => None,
    });
    let client = handshake.join().unwrap();

    let payload = vec![7u8; 64 * 1024];
    let mut statuses = Vec::new();
    let mut accepted_bytes = 0usize;
    for _ in 0..2_000 {
        let status = conn.send_binary(&payload);
        if status != SendStatus::Dropped {
            accepted_bytes += payload.len() + 10; // 65,536 bytes need the 8-byte length form
        }
        statuses.push(status);
        if status == SendStatus::Dropped {
            break;
        }
        if status == SendStatus::Backpressured {
            // Keep queueing until the limit is crossed.
            continue;
        }
        // Let the writer reach the kernel limit before the next send.
        let until = Instant::now() + Duration::from_millis(20);
        while conn.out.buffered() > 0 && Instant::now() < until {
            thread::yield_now();
        }
    }
    assert_eq!(statuses.first(), Some(&SendStatus::Sent(payload.len())));
    assert!(
        statuses.contains(&SendStatus::Backpressured),
        "never backpressured: {statuses:?}"
    );
    assert_eq!(statuses.last(), Some(&SendStatus::Dropped));
    assert!(conn.out.buffered() > LIMIT);

    let reader = thread::spawn(move || {
        let mut client = client;
        let mut total = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        while total < accepted_bytes {
            let n = client.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "connection closed after {total} of {accepted_bytes} bytes"
            );
            assert!(buf[..n]
                .iter()
                .all(|b| matches!(*b, 7 | 0x82 | 127 | 0 | 1)));
            total += n;
        }
        // A masked close (1000) ends the connection: every drain due comes before its event.
        client
            .write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8])
            .unwrap();
        total
    });
    let mut drains = 0;
    let code = run_app(&server, Duration::from_secs(10), |event| match event {
        Event::Drain(_) => {
            drains += 1;
            None
        }
        Event::Close(_, code, _) => Some(code),
        _ => None,
    });
    assert_eq!((drains, code), (1, 1000));
    assert_eq!(reader.join().unwrap(), accepted_bytes);
    assert_eq!(conn.out.buffered(), 0);
    assert!(!conn.out.is_congested());
}

/// Two servers linked by the topic relay (as two workers are): a publish on one reaches the
/// other's subscriber, in order, and is not sent back to where it came from.
#[test]
fn relayed_publishes_reach_the_sibling_in_order() {
    let dir = std::env::temp_dir().join(format!("brioche-relay-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a_path, b_path) = (dir.join("a.sock"), dir.join("b.sock"));
    let sibling = |listen: &std::path::Path, peer: &std::path::Path| {
        Server::start(ServerConfig {
            relay: Some(super::RelayPaths {
                listen: listen.into(),
                peers: vec![peer.into()],
            }),
            ..ServerConfig::default()
        })
        .unwrap()
    };
    let a = sibling(&a_path, &b_path);
    let b = sibling(&b_path, &a_path);
    let linked = |s: &Server| {
        let relay = s.shared().relay.as_ref().unwrap();
        relay.receiving() == 1 && relay.sending() == 1
    };
    let end = Instant::now() + Duration::from_secs(10);
    while !(linked(&a) && linked(&b)) {
        assert!(
            Instant::now() < end,
            "the relay never linked the two servers"
        );
        thread::sleep(Duration::from_millis(5));
    }
    let addr = b.local_addr().unwrap();
    let client = thread::spawn(move || raw_handshake(addr));
    let conn = run_app(&b, Duration::from_secs(10), |event| match event {
        Event::Open(c) => Some(c),
        _ => None,
    });
    let mut client = client.join().unwrap();
    conn.subscribe("t");
    for i in 0..100u8 {
        let frame = super::OutFrame::new(super::OP_BINARY, vec![i].into());
        // Nobody subscribes on `a`: the status says so, though `b`'s subscriber gets it.
        assert_eq!(a.shared().publish("t", frame, 1, None), SendStatus::Dropped);
    }
    let mut got = [0u8; 300];
    client.read_exact(&mut got).unwrap();
    for (i, frame) in got.chunks(3).enumerate() {
        assert_eq!(frame, [0x82, 1, i as u8]);
    }
    // And nothing after them: a sibling that relayed what it was relayed would send each
    // publish back, the two would pass it to and fro, and the subscriber would get it again.
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let more = client.read(&mut [0; 1]);
    assert!(
        more.as_ref().is_err_and(|e| matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )),
        "a publish came back: {more:?}"
    );
    assert_eq!(a.shared().relay.as_ref().unwrap().dropped(), 0);
    a.stop(true);
    b.stop(true);
    let _ = std::fs::remove_dir_all(&dir);
}
