//! A listening server: binding (TCP addresses, a Unix socket, or a socket handed in), the
//! accept loops, and stop.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::net::{TcpListener, UnixListener};

use super::bridge::events::LogKind;
use super::broker;
use super::config::ServerConfig;
use super::http::serve;
use super::net::{Remote, Stream};
use super::pubsub::remote::Remote as RemoteTopics;
use super::runtime::runtime;
use super::ws::conn::{Conn, SendStatus};
use super::ws::encode::OutFrame;
use super::ws::relay;
use super::ws::shared::Shared;
use super::ws::Event;

const BACKLOG: i32 = 4096;

/// Where a server listens.
#[derive(Clone, Debug)]
pub enum Listen {
    /// Every one of these addresses, on one port. With port 0 the first picks a free port and
    /// the others take the same one. `::` alone accepts IPv4 too where the OS allows it.
    Tcp(Vec<IpAddr>, u16),
    /// A Unix socket created at `path`: a stale one there (nobody accepts on it) is replaced,
    /// and the file is removed at stop. `mode` sets its permissions before it accepts anyone;
    /// `None` leaves them to the umask.
    Unix { path: PathBuf, mode: Option<u32> },
    /// A socket someone else bound (systemd, a process manager), TCP or Unix. It is
    /// duplicated: the caller's descriptor stays the caller's to close. It is made
    /// non-blocking (a flag its duplicate shares) and listened on if it is not yet. Its file,
    /// for a Unix socket, is not removed at stop: this server did not create it.
    Fd(RawFd),
}

/// An address the server listens on. An abstract Unix address (Linux) is shown as `@name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

pub struct Server {
    shared: Arc<Shared>,
    addresses: Vec<Address>,
}

enum Listener {
    Tcp(TcpListener),
    Unix {
        listener: UnixListener,
        /// The file this server created: held only to be removed when the listener goes.
        _file: Option<SocketFile>,
    },
}

impl Listener {
    /// What the log calls this listener: its address, or its socket file's path.
    fn address(&self) -> String {
        match self {
            Listener::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|_| "a TCP listener".to_owned(), |addr| addr.to_string()),
            Listener::Unix { listener, .. } => listener
                .local_addr()
                .ok()
                .and_then(|addr| addr.as_pathname().map(|path| path.display().to_string()))
                .unwrap_or_else(|| "a Unix socket".to_owned()),
        }
    }

    async fn accept(&self) -> io::Result<(Stream, Remote)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, remote) = listener.accept().await?;
                // An IPv4 client of a dual-stack `::` arrives as `::ffff:a.b.c.d`: it is shown,
                // and logged, as the IPv4 address it is.
                let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
                Ok((Stream::Tcp(stream), Remote::Tcp(remote)))
            }
            Listener::Unix { listener, .. } => {
                let (stream, _) = listener.accept().await?;
                Ok((Stream::Unix(stream), Remote::Unix))
            }
        }
    }
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
    /// Bind `config.host` and `config.port` and start accepting on the shared runtime.
    pub fn start(config: ServerConfig) -> io::Result<Server> {
        let addr = resolve(&config.host, config.port)?;
        Server::start_on(config, Listen::Tcp(vec![addr.ip()], addr.port()))
    }

    /// Bind `listen` and start accepting on the shared runtime. Returns once it is listening.
    pub fn start_on(config: ServerConfig, listen: Listen) -> io::Result<Server> {
        if let Some(redis) = &config.redis {
            redis
                .check()
                .map_err(|why| io::Error::new(io::ErrorKind::InvalidInput, why))?;
        }
        let _entered = runtime().enter();
        let reuse_port = config.reuse_port;
        let redis = config.redis.clone();
        let (remote, inbox) = match redis {
            Some(_) => {
                let (remote, inbox) = RemoteTopics::new();
                (Some(remote), Some(inbox))
            }
            None => (None, None),
        };
        let shared = Arc::new(Shared::new(config, remote)?);
        let mut listeners = Vec::new();
        let mut addresses = Vec::new();
        match listen {
            Listen::Tcp(ips, port) => {
                for listener in bind_tcp_all(&ips, port, reuse_port)? {
                    addresses.push(Address::Tcp(listener.local_addr()?));
                    listeners.push(Listener::Tcp(TcpListener::from_std(listener)?));
                }
            }
            Listen::Unix { path, mode } => {
                let (listener, file) = bind_unix(&path, mode)?;
                addresses.push(Address::Unix(path));
                listeners.push(Listener::Unix {
                    listener: UnixListener::from_std(listener)?,
                    _file: Some(file),
                });
            }
            Listen::Fd(fd) => {
                let (listener, address) = adopt(fd)?;
                addresses.push(address);
                listeners.push(listener);
            }
        }
        if shared.tls.is_some() && addresses.iter().any(|a| matches!(a, Address::Unix(_))) {
            return Err(invalid("TLS is served on TCP only, not on a Unix socket"));
        }
        if let Some(paths) = &shared.config.relay {
            relay::start(&shared, paths)?;
            // Listening already (clients wait in the backlog), accepting once linked: the first
            // clients of a restarted worker publish as they arrive, and before its siblings had
            // reconnected to it (up to 200 ms) what they published reached none of them.
            let linked = shared.clone();
            shared.tracker.spawn(async move {
                relay::linked(&linked, relay::ACCEPT_WITHOUT_LINKS_AFTER).await;
                if linked.shutdown.is_cancelled() {
                    return;
                }
                for listener in listeners {
                    linked.tracker.spawn(accept_loop(listener, linked.clone()));
                }
            });
        } else {
            for listener in listeners {
                shared.tracker.spawn(accept_loop(listener, shared.clone()));
            }
        }
        if let (Some(redis), Some(inbox)) = (redis, inbox) {
            shared
                .link_tracker
                .spawn(broker::run(shared.clone(), redis, inbox));
        }
        Ok(Server { shared, addresses })
    }

    /// The first TCP address listened on (`None` on a Unix socket).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addresses.iter().find_map(|address| match address {
            Address::Tcp(addr) => Some(*addr),
            Address::Unix(_) => None,
        })
    }

    /// Every address listened on.
    pub fn addresses(&self) -> &[Address] {
        &self.addresses
    }

    /// Read the certificate and key files again: connections from now on get them, open ones
    /// keep theirs. On an error (`TlsConfigError`) the certificate in use stays.
    pub fn reload_tls(&self) -> io::Result<()> {
        match &self.shared.tls {
            Some(certs) => certs.reload(),
            None => Err(invalid("this server does not serve TLS")),
        }
    }

    /// What the server's connections share: the loop thread's side of the bridge in `py/`
    /// (the crate's own layer) reaches its event queue and counters here.
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The descriptor that turns readable when events wait (`drain_events`), for a loop to
    /// watch: what `py/` and benches/rust_server stand in for an event loop with.
    pub fn events_fd(&self) -> RawFd {
        self.shared.events.fd()
    }

    /// Move every waiting event into `out`. Whoever drains gives their messages' bytes back to
    /// the incoming budget (`events_taken`) once they are handled.
    pub fn drain_events(&self, out: &mut Vec<Event>) {
        self.shared.events.drain_into(out);
    }

    /// Every event drained so far is handled, and what their handlers sent is written: a
    /// client's close behind them may be answered at once from now on, rather than through the
    /// loop (`Event::PeerClose`).
    pub fn events_handled(&self) {
        self.shared.events.all_drained_handled();
    }

    /// `bytes` of drained messages are handled: off the incoming budget (`max_incoming_bytes`).
    pub fn events_taken(&self, bytes: usize) {
        self.shared.incoming_taken(bytes);
    }

    /// Send `frame` to every subscriber of `topic`, as `srv.publish` does.
    pub fn publish(&self, topic: &str, frame: OutFrame, payload_len: usize) -> SendStatus {
        self.shared.publish(topic, frame, payload_len, None)
    }

    /// Stop accepting; with `close_active`, close open WebSockets with 1001. `Event::Stopped`
    /// follows once the listeners are closed (a Unix socket's file removed) and every
    /// connection has ended.
    pub fn stop(&self, close_active: bool) {
        let shared = &self.shared;
        shared.shutdown.cancel();
        if close_active {
            shared.closing_all.store(true, Ordering::Release);
            // Pairs with the fence in `ws::task::run`, between a connection's `Open` state and
            // its own read of `closing_all`.
            fence(Ordering::SeqCst);
            let conns: Vec<Arc<Conn>> = shared.conns.lock().values().cloned().collect();
            for conn in conns {
                conn.close(1001, "server shutting down");
            }
            shared.force_stop.cancel();
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

    /// End the links to other processes (Redis, sibling workers), once the server has stopped
    /// and the application has handled every event (`on_close` may publish): they send what is
    /// queued, end, and `Event::LinksEnded` follows. Until then they run on, or a stop lost what
    /// its closing clients published for the other processes. False when there are none (no
    /// event follows).
    pub fn end_links(&self) -> bool {
        let shared = &self.shared;
        if shared.link_tracker.is_empty() {
            return false;
        }
        if !shared.links_end.is_cancelled() {
            shared.links_end.cancel();
            shared.link_tracker.close();
            let shared = shared.clone();
            runtime().spawn(async move {
                shared.link_tracker.wait().await;
                shared.events.push(Event::LinksEnded);
            });
        }
        true
    }
}

impl Drop for Server {
    /// Nobody can handle its events any more: it stops rather than leak its sockets, and its
    /// links end, or they would run on for the process's life.
    fn drop(&mut self) {
        self.stop(true);
        self.end_links();
    }
}

/// One listener's loop. It owns the listener: when it ends, the listener closes (and a socket
/// file this server created is removed) before the tracker lets `Event::Stopped` out.
async fn accept_loop(listener: Listener, shared: Arc<Shared>) {
    // Failed accepts since the last one that worked: new clients wait in the listen backlog
    // meanwhile, which they cannot tell from a slow server, so the operator is told once when
    // it begins (a retry every 10 ms would flood the log) and once when it ends.
    let mut failed: u64 = 0;
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    if failed > 0 {
                        shared.log(LogKind::AcceptResumed, listener.address(), 0, format!(
                            "after {failed} failed accepts"
                        ));
                        failed = 0;
                    }
                    shared.tracker.spawn(serve::serve_connection(stream, remote, shared.clone()));
                }
                // Out of descriptors or memory: back off instead of spinning on the error.
                Err(err) => {
                    if failed == 0 {
                        shared.log(LogKind::AcceptFailed, listener.address(), 0, err.to_string());
                    }
                    failed += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

fn bind_tcp(
    addr: SocketAddr,
    dual_stack: bool,
    reuse_port: bool,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        // Sibling processes (`server.workers(n)`) accept on one port.
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // Explicit either way: the OS default (Linux's bindv6only) is the host's choice, not
        // the application's. An OS that refuses dual-stack (OpenBSD) keeps `::` IPv6-only.
        let _ = socket.set_only_v6(!dual_stack);
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Attempts at a common free port for several addresses (port 0): the port the first one got
/// may be taken on another.
const PORT_ATTEMPTS: usize = 8;

fn bind_tcp_all(
    ips: &[IpAddr],
    port: u16,
    reuse_port: bool,
) -> io::Result<Vec<std::net::TcpListener>> {
    if ips.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "no address to listen on",
        ));
    }
    // `::` takes IPv4 too unless an IPv4 address is also listed, which dual-stack would clash
    // with on the same port.
    let dual_stack = !ips.iter().any(IpAddr::is_ipv4);
    let attempts = if port == 0 && ips.len() > 1 {
        PORT_ATTEMPTS
    } else {
        1
    };
    let mut last = None;
    for _ in 0..attempts {
        let mut listeners = Vec::with_capacity(ips.len());
        let mut chosen = port;
        let result = ips.iter().try_for_each(|ip| {
            let addr = SocketAddr::new(*ip, chosen);
            let listener = bind_tcp(addr, dual_stack && ip.is_unspecified(), reuse_port)?;
            chosen = listener.local_addr()?.port();
            listeners.push(listener);
            Ok::<_, io::Error>(())
        });
        match result {
            Ok(()) => return Ok(listeners),
            Err(err) if err.kind() == io::ErrorKind::AddrInUse => last = Some(err),
            Err(err) => return Err(err),
        }
    }
    Err(last.expect("at least one attempt"))
}

/// A socket file this server created: removed when dropped, if it is still that file (and not
/// one put there since by someone else).
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn is_still_there(&self) -> bool {
        fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| meta.dev() == self.dev && meta.ino() == self.ino)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.is_still_there() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn bind_unix(
    path: &Path,
    mode: Option<u32>,
) -> io::Result<(std::os::unix::net::UnixListener, SocketFile)> {
    let address = SockAddr::unix(path).map_err(|_| {
        invalid(
            "the path is too long for a unix socket (sun_path: 108 bytes on Linux, 104 on macOS)",
        )
    })?;
    remove_if_stale(path, &address)?;
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&address)?;
    let meta = fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    if let Some(mode) = mode {
        // Before listen: until then every connect is refused, so no client gets in through
        // the umask's permissions.
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    }
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok((socket.into(), file))
}

/// Remove the socket file at `path` if no server listens on it any more (one that stopped
/// without removing it, or crashed). A server that accepts, or whose backlog is full, keeps
/// it: `EADDRINUSE`. Anything that is not a socket is never removed: `EEXIST`.
fn remove_if_stale(path: &Path, address: &SockAddr) -> io::Result<()> {
    let before = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    if !before.file_type().is_socket() {
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    let probe = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    // Non-blocking: a live server with a full backlog must not hang the caller.
    probe.set_nonblocking(true)?;
    match probe.connect(address) {
        Err(err) if err.raw_os_error() == Some(libc::ECONNREFUSED) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) if err.kind() != io::ErrorKind::WouldBlock => return Err(err),
        _ => return Err(io::Error::from_raw_os_error(libc::EADDRINUSE)),
    }
    // Only the file probed: one put there meanwhile is not known to be stale.
    let stale = SocketFile {
        path: path.to_owned(),
        dev: before.dev(),
        ino: before.ino(),
    };
    drop(stale);
    Ok(())
}

/// Take over a socket bound elsewhere (systemd's `LISTEN_FDS`, a process manager).
fn adopt(fd: RawFd) -> io::Result<(Listener, Address)> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // Duplicated with `fcntl` itself, not through `BorrowedFd::borrow_raw`, whose contract
    // (the descriptor is open) a caller's number may break: a closed one fails with EBADF here.
    // SAFETY: `fcntl` reads no memory; a descriptor it returns is new and ours alone.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is open and owned by nobody else.
    let owned = unsafe { OwnedFd::from_raw_fd(dup) };
    let socket = Socket::from(owned);
    let kind = socket.r#type().map_err(|err| match err.raw_os_error() {
        Some(libc::ENOTSOCK) => invalid("the file descriptor is not a socket"),
        _ => err,
    })?;
    if kind != Type::STREAM {
        return Err(invalid("the socket must be a stream socket (SOCK_STREAM)"));
    }
    let local = socket.local_addr()?;
    let address = if let Some(addr) = local.as_socket() {
        if addr.port() == 0 {
            return Err(invalid("the socket must be bound to an address"));
        }
        Address::Tcp(addr)
    } else if local.is_unix() {
        if let Some(path) = local.as_pathname() {
            Address::Unix(path.to_owned())
        } else if let Some(name) = local.as_abstract_namespace() {
            let mut shown = b"@".to_vec();
            shown.extend_from_slice(name);
            Address::Unix(PathBuf::from(OsStr::from_bytes(&shown)))
        } else {
            return Err(invalid("the socket must be bound to an address"));
        }
    } else {
        return Err(invalid(
            "the socket must be a TCP (IPv4, IPv6) or Unix socket",
        ));
    };
    if !is_listening(&socket)? {
        socket.listen(BACKLOG)?;
    }
    socket.set_nonblocking(true)?;
    let listener = match address {
        Address::Tcp(_) => Listener::Tcp(TcpListener::from_std(socket.into())?),
        Address::Unix(_) => Listener::Unix {
            listener: UnixListener::from_std(socket.into())?,
            _file: None,
        },
    };
    Ok((listener, address))
}

/// Whether `listen` was called on it: listening again would reset a backlog set by whoever
/// created it (systemd's `Backlog=`).
fn is_listening(socket: &Socket) -> io::Result<bool> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and describe an int.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value != 0)
}

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_addresses_listen_on_the_port_the_first_one_picked() {
        let v6: IpAddr = "::1".parse().unwrap();
        if std::net::TcpListener::bind((v6, 0)).is_err() {
            eprintln!("skipped: no IPv6 loopback here");
            return;
        }
        let ips = [IpAddr::from([127, 0, 0, 1]), v6];
        let listeners = bind_tcp_all(&ips, 0, false).unwrap();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        assert_eq!(addrs.len(), 2);
        assert_ne!(addrs[0].port(), 0);
        assert_eq!(addrs[0].port(), addrs[1].port());
        assert_eq!((addrs[0].ip(), addrs[1].ip()), (ips[0], ips[1]));
        for addr in addrs {
            std::net::TcpStream::connect(addr).unwrap();
        }
    }

    #[test]
    fn a_descriptor_handed_in_is_duplicated_and_listened_on() {
        let _entered = runtime().enter();
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        let (listener, address) = adopt(socket.as_raw_fd()).unwrap();
        assert!(matches!(listener, Listener::Tcp(_)));
        assert_eq!(
            Address::Tcp(socket.local_addr().unwrap().as_socket().unwrap()),
            address
        );
        assert!(
            is_listening(&socket).unwrap(),
            "listen applies to the shared socket"
        );
        // The caller's descriptor closes; the duplicate keeps the socket listening.
        drop(socket);
        let Address::Tcp(addr) = address else {
            unreachable!()
        };
        std::net::TcpStream::connect(addr).unwrap();
        drop(listener);
        assert!(std::net::TcpStream::connect(addr).is_err());
    }
}
