//! The benchmark server on brioche's engine without Python: the same tokio core, with this
//! thread playing the asyncio loop's part (drain the event queue, answer each event). It is the
//! ceiling for what the Python bridge can reach.
//!
//! usage: rust_server PORT
//!   any path: echo every message;  /sub: subscribed to "bench";  /pub: messages go to "bench"

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use brioche::engine::{
    begin_send_batch, build_response, end_send_batch, Conn, Event, OutFrame, Reply, Server,
    ServerConfig, OP_BINARY, OP_TEXT,
};
use bytes::Bytes;

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Echo,
    Sub,
    Pub,
}

const TOPIC: &str = "bench";

fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn wait_readable(fd: i32) {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd; a timeout just loops.
    unsafe { libc::poll(&mut pfd, 1, 1000) };
}

/// Events the bench has nothing to do with, except a protocol failure, which is closed with the
/// code the engine chose (as the Python layer does once earlier handlers ran).
fn handle_other(event: Event, conns: &HashMap<u64, (Arc<Conn>, Role)>) {
    #[allow(unreachable_patterns)]
    match event {
        Event::Fail(id, code, reason) => {
            if let Some((conn, _)) = conns.get(&id) {
                conn.close(code, reason);
            }
        }
        // A client's close frame behind messages this loop had not handled yet: answered now,
        // after them, with its code (none for 1005, which no frame may carry).
        Event::PeerClose(id, code, reason) => {
            if let Some((conn, _)) = conns.get(&id) {
                conn.answer_close(code, &reason);
            }
        }
        // A large text message, still masked: unmasked, checked and echoed (the bench sends
        // valid text; invalid text is refused as the Python layer does, though the messages
        // behind it are not dropped here).
        Event::MaskedText(id, data) => {
            if let Some((conn, _)) = conns.get(&id) {
                conn.message_taken(data.len());
                match std::str::from_utf8(&data.into_bytes()) {
                    Ok(text) => {
                        conn.send_text(text);
                    }
                    Err(_) => conn.refuse_text(),
                }
            }
        }
        _ => {}
    }
}

fn main() {
    raise_nofile();
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: rust_server PORT");
            std::process::exit(2)
        });
    let server = Server::start(ServerConfig {
        host: "127.0.0.1".into(),
        port,
        ..ServerConfig::default()
    })
    .unwrap_or_else(|e| {
        eprintln!("rust_server: cannot listen on 127.0.0.1:{port}: {e}");
        std::process::exit(1)
    });
    println!("rust_server listening on {}", server.local_addr().unwrap());
    let _ = std::io::stdout().flush();

    let mut pending: HashMap<u64, Role> = HashMap::new();
    let mut conns: HashMap<u64, (Arc<Conn>, Role)> = HashMap::new();
    let mut batch = Vec::with_capacity(256);
    loop {
        wait_readable(server.events_fd());
        server.drain_events(&mut batch);
        // As the Python bridge does: the batch's messages are taken off the incoming budget,
        // or once `max_incoming_bytes` (1 GiB) had passed through, connections holding 64 KiB
        // or more would stop reading for good.
        server.events_taken(batch.iter().map(Event::message_len).sum());
        // As the Python bridge does: what this batch sends is written here, once per connection,
        // when the batch ends.
        begin_send_batch();
        for event in batch.drain(..) {
            match event {
                Event::Request(req) => {
                    if req.is_websocket {
                        let role = match req.path.as_str() {
                            "/sub" => Role::Sub,
                            "/pub" => Role::Pub,
                            _ => Role::Echo,
                        };
                        pending.insert(req.id, role);
                        let _ = req.reply.send(Reply::Upgrade(Vec::new()));
                    } else {
                        let response = build_response(200, &[], Bytes::from_static(b"rust_server\n"), "GET")
                            .expect("a valid response");
                        let _ = req.reply.send(Reply::Respond(response));
                    }
                }
                Event::Open(conn) => {
                    let role = pending.remove(&conn.id).unwrap_or(Role::Echo);
                    if role == Role::Sub {
                        conn.subscribe(TOPIC);
                    }
                    conns.insert(conn.id, (conn, role));
                }
                Event::Text(id, text) => {
                    if let Some((conn, role)) = conns.get(&id) {
                        conn.message_taken(text.len());
                        if *role == Role::Pub {
                            let frame = OutFrame::new(OP_TEXT, Bytes::copy_from_slice(text.as_bytes()));
                            server.publish(TOPIC, frame, text.len());
                        } else {
                            conn.send_text(&text);
                        }
                    }
                }
                Event::Binary(id, data) => {
                    if let Some((conn, role)) = conns.get(&id) {
                        conn.message_taken(data.len());
                        let data = data.into_bytes();
                        if *role == Role::Pub {
                            let frame = OutFrame::new(OP_BINARY, data.clone());
                            server.publish(TOPIC, frame, data.len());
                        } else {
                            conn.send_binary(&data);
                        }
                    }
                }
                Event::Close(id, _, _) => {
                    conns.remove(&id);
                }
                Event::UpgradeFailed(id) => {
                    pending.remove(&id);
                }
                Event::Stopped => return,
                // Drain, Fail (a protocol error: the engine closes it after the events before it
                // are handled, which is now) and any kind added later.
                #[allow(unreachable_patterns)]
                other => handle_other(other, &conns),
            }
        }
        end_send_batch();
        // As the Python bridge does (it keeps none over): a client's close behind this batch's
        // events may now be answered at once.
        server.events_handled();
    }
}
