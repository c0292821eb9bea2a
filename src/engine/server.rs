//! A listening server: binding, the accept loop, and stop.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};

use super::config::ServerConfig;
use super::http::serve;
use super::runtime::runtime;
use super::ws::conn::Conn;
use super::ws::relay;
use super::ws::shared::Shared;
use super::ws::Event;

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
        if config.reuse_port {
            socket.set_reuseport(true)?;
        }
        socket.bind(addr)?;
        let listener = socket.listen(4096)?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config)?);
        if let Some(paths) = &shared.config.relay {
            relay::start(&shared, paths)?;
        }
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
