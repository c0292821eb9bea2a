//! A connection's socket, TCP, TLS over TCP, or Unix domain, and who is on its other end.
//!
//! An enum, not a trait object: every read and write is one well-predicted branch, so the TCP
//! path pays no dynamic dispatch. A plain socket's reads and writes are `recv` and `send` on its
//! descriptor, with tokio's readiness kept right around them (`read_drained`, `write_direct`).
//!
//! TLS is a socket and its rustls session under a mutex, read and written with the same
//! non-blocking calls as a plain socket: `try_write_vectored` encrypts what rustls accepts (at
//! most its 64 KiB buffer) and writes the records out, `read_plain` reads records and decrypts
//! into the caller's buffer. So the outbound queue encrypts under its own lock, from whichever
//! thread flushes, and the connection task decrypts into its worker's read buffer, as they read
//! and write a plain socket. The handshake itself is tokio-rustls's (`http/serve.rs`).

use std::cell::RefCell;
use std::fmt;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Mutex, MutexGuard};
use rustls::ServerConnection;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// Boxed: the session is large (about 1 KiB), and the plain variants must not carry it.
    Tls(Box<TlsSocket>),
}

impl Stream {
    #[inline]
    pub(crate) fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_read_ready(cx),
            Stream::Unix(s) => s.poll_read_ready(cx),
            Stream::Tls(s) => s.tcp.poll_read_ready(cx),
        }
    }

    /// Read what arrived into `buf`, without blocking: `WouldBlock` when nothing has, `Ok(0)`
    /// at the end of the stream. Over TLS, the plaintext of the records that arrived.
    #[inline]
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => read_drained(s, |fd| recv(fd, buf)),
            Stream::Unix(s) => read_drained(s, |fd| recv(fd, buf)),
            Stream::Tls(s) => s.read_plain(buf),
        }
    }

    /// `read` into memory not written yet (a message buffer's spare room), on a plain socket.
    /// `None` over TLS: rustls hands out plaintext by copying it out of its own buffer, into
    /// initialised memory only, so there is no copy to save there.
    #[inline]
    pub(crate) fn read_uninit(&self, buf: &mut [MaybeUninit<u8>]) -> Option<io::Result<usize>> {
        let (ptr, len) = (buf.as_mut_ptr().cast::<u8>(), buf.len());
        // SAFETY (both): `buf` is valid for writes of `len` bytes, and recv writes only bytes.
        match self {
            Stream::Tcp(s) => Some(read_drained(s, |fd| unsafe { recv_raw(fd, ptr, len) })),
            Stream::Unix(s) => Some(read_drained(s, |fd| unsafe { recv_raw(fd, ptr, len) })),
            Stream::Tls(_) => None,
        }
    }

    #[inline]
    pub(crate) fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => s.poll_write_ready(cx),
            Stream::Unix(s) => s.poll_write_ready(cx),
            Stream::Tls(s) => s.tcp.poll_write_ready(cx),
        }
    }

    #[inline]
    pub(crate) fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => write_direct(s, &[IoSlice::new(buf)], || s.try_write(buf)),
            Stream::Unix(s) => write_direct(s, &[IoSlice::new(buf)], || s.try_write(buf)),
            Stream::Tls(s) => s.try_write_vectored(&[IoSlice::new(buf)]),
        }
    }

    #[inline]
    pub(crate) fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => write_direct(s, bufs, || s.try_write_vectored(bufs)),
            Stream::Unix(s) => write_direct(s, bufs, || s.try_write_vectored(bufs)),
            Stream::Tls(s) => s.try_write_vectored(bufs),
        }
    }

    /// Whether bytes accepted by a write are still waiting to reach the kernel (TLS records
    /// rustls holds because the socket was full): then the caller must wait for writability
    /// before it counts the queue as written. Never for a plain socket.
    #[inline]
    pub(crate) fn write_pending(&self) -> io::Result<bool> {
        match self {
            Stream::Tls(s) => s.write_pending(),
            _ => Ok(false),
        }
    }

    /// Whether a TLS session holds plaintext that was decrypted but not yet read.
    #[inline]
    pub(crate) fn has_buffered_input(&self) -> bool {
        match self {
            Stream::Tls(s) => s.has_buffered_input(),
            _ => false,
        }
    }

    /// The client ended its stream: over TLS that is its `close_notify` (an end without one is
    /// an error, not a read of 0), which RFC 8446 6.1 asks to answer with ours before closing;
    /// a client unwrapping its TLS layer otherwise sees an unexpected EOF.
    pub(crate) fn answer_end_of_stream(&self) {
        if let Stream::Tls(s) = self {
            s.session.lock().send_close_notify();
            let _ = s.write_pending();
        }
    }

    /// Whether the peer has ended its side of the stream (its FIN, or a reset), seen without
    /// reading, past whatever it sent before that the server has not read: for a connection that
    /// is not being read, which would otherwise never notice its client gone.
    pub(crate) fn peer_gone(&self) -> bool {
        let mut polled = libc::pollfd {
            fd: self.as_raw_fd(),
            events: PEER_ENDED,
            revents: 0,
        };
        // SAFETY: one valid `pollfd`, for a descriptor open while `self` is borrowed; no wait.
        let ready = unsafe { libc::poll(&mut polled, 1, 0) };
        ready == 1 && polled.revents & (PEER_ENDED | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// Close the write side once everything is written: TLS says `close_notify` first.
    pub(crate) fn shutdown_write(&self) {
        if let Stream::Tls(s) = self {
            s.session.lock().send_close_notify();
            let _ = s.write_pending();
        }
        // SAFETY: the descriptor is open while `self` is borrowed. A failure only means the
        // peer is already gone.
        unsafe { libc::shutdown(self.as_raw_fd(), libc::SHUT_WR) };
    }
}

/// `poll`'s event for a peer that shut its sending side down (Linux); elsewhere only its full
/// close (`POLLHUP`) and errors, which `poll` reports unasked, are seen.
#[cfg(target_os = "linux")]
const PEER_ENDED: libc::c_short = libc::POLLRDHUP;
#[cfg(not(target_os = "linux"))]
const PEER_ENDED: libc::c_short = 0;

impl AsRawFd for Stream {
    #[inline]
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.tcp.as_raw_fd(),
        }
    }
}

// hyper reads the request through these (both streams are `Unpin`).
impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => s.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => s.poll_write_vectored(cx, &[IoSlice::new(buf)]),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => s.poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
            Stream::Tls(_) => true,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => s.poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => {
                if !s.close_notify_sent {
                    s.close_notify_sent = true;
                    s.session.lock().send_close_notify();
                }
                std::task::ready!(s.poll_flush(cx))?;
                Pin::new(&mut s.tcp).poll_shutdown(cx)
            }
        }
    }
}

/// A TLS connection after its handshake: the socket and the session that encrypts for it.
pub(crate) struct TlsSocket {
    tcp: TcpStream,
    /// Held for one read or one write: by the connection task while it decrypts, by whichever
    /// thread flushes the outbound queue (under the queue's lock) while it encrypts.
    session: Mutex<ServerConnection>,
    /// The last read filled its buffer: rustls may hold more plaintext, which no readiness of
    /// the socket will announce.
    more_plaintext: AtomicBool,
    close_notify_sent: bool,
}

/// Records read per `read_plain`, at most (rustls reads up to about 4 KiB of them at a time):
/// the call stays bounded however fast the client sends.
const TLS_READS_PER_CALL: usize = 64;

impl TlsSocket {
    /// `session` has finished its handshake on `tcp`.
    pub(crate) fn new(tcp: TcpStream, mut session: ServerConnection) -> Self {
        // Records that came in with the end of the handshake are decrypted now: later reads
        // start from the socket's readiness, which will not announce them again.
        let _ = session.process_new_packets();
        Self {
            tcp,
            session: Mutex::new(session),
            more_plaintext: AtomicBool::new(true),
            close_notify_sent: false,
        }
    }

    /// Whether plaintext may wait in the session: read before waiting for the socket.
    #[inline]
    pub(crate) fn has_buffered_input(&self) -> bool {
        self.more_plaintext.load(Ordering::Relaxed)
    }

    /// Decrypt what has arrived into `buf`, without blocking. `Ok(0)` is the end of the
    /// stream (a `close_notify`, or the peer closed); `WouldBlock` when nothing has arrived; a
    /// TLS error (a bad record, a failed MAC) is `InvalidData`, after the alert is sent.
    pub(crate) fn read_plain(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut session = self.session.lock();
        let mut filled = 0;
        let mut result = Ok(());
        // Whether every round was used without a stop: records may still wait in the socket.
        let spent = 'rounds: {
            for round in 0..=TLS_READS_PER_CALL {
                if round > 0 {
                    // A send flushing under its queue's lock (the loop thread's, holding the
                    // GIL) waits for this lock: it gets it between rounds, not after up to 64.
                    // Nothing to do when nobody waits.
                    MutexGuard::bump(&mut session);
                }
                match session.reader().read(&mut buf[filled..]) {
                    Ok(n) => {
                        filled += n;
                        // 0 with room left: the peer's close_notify, nothing comes after it.
                        if n == 0 || filled == buf.len() {
                            break 'rounds false;
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The peer closed without close_notify: the end, as for a plain socket.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break 'rounds false,
                    Err(e) => {
                        result = Err(e);
                        break 'rounds false;
                    }
                }
                if round == TLS_READS_PER_CALL {
                    // The look above took what the last round's records brought, which the
                    // socket will not announce again; what still waits there keeps it readable.
                    break 'rounds true;
                }
                match self.read_records(&mut session) {
                    Ok(0) => {
                        // rustls now knows of the end: the next `reader().read` reports it.
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        result = Err(e);
                        break 'rounds false;
                    }
                }
                if let Err(err) = session.process_new_packets() {
                    // The alert rustls queued for it, best effort: the connection is over.
                    let _ = self.write_records(&mut session);
                    result = Err(io::Error::new(io::ErrorKind::InvalidData, err));
                    break 'rounds false;
                }
                if session.wants_write() {
                    // A reply the peer's records asked for (a key update): out with the next
                    // write if the socket is full now.
                    let _ = self.write_records(&mut session);
                }
            }
            true
        };
        self.more_plaintext
            .store(filled == buf.len() && filled > 0, Ordering::Relaxed);
        match result {
            // Records without plaintext (padding, key updates) used every round: not the end
            // of the stream, which only a close_notify or the peer's close is.
            Ok(()) if filled == 0 && spent => Err(io::ErrorKind::WouldBlock.into()),
            Ok(()) => Ok(filled),
            Err(_) if filled > 0 => Ok(filled),
            Err(e) => Err(e),
        }
    }

    /// One `recv` of records into the session.
    fn read_records(&self, session: &mut ServerConnection) -> io::Result<usize> {
        read_drained(&self.tcp, |fd| {
            let mut reader = FdReader { fd, short: false };
            let n = session.read_tls(&mut reader)?;
            Ok((n, reader.short))
        })
    }

    /// Write the records rustls holds; `WouldBlock` if the socket took not all of them.
    fn write_records(&self, session: &mut ServerConnection) -> io::Result<()> {
        while session.wants_write() {
            let mut writer = TcpWriter(&self.tcp);
            match session.write_tls(&mut writer) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Encrypt what rustls's buffer takes of `bufs` and write out the records. `Ok(n)`: `n`
    /// bytes of `bufs` are the session's now (sent, or waiting in it for writability);
    /// `WouldBlock` when it took none because the socket is full.
    pub(crate) fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut session = self.session.lock();
        match self.write_records(&mut session) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let n = session.writer().write_vectored(bufs)?;
        match self.write_records(&mut session) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Write the records waiting in the session; true if some still wait (the socket is full).
    pub(crate) fn write_pending(&self) -> io::Result<bool> {
        let mut session = self.session.lock();
        match self.write_records(&mut session) {
            Ok(()) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(true),
            Err(e) => Err(e),
        }
    }

    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.read_plain(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.tcp.poll_read_ready(cx))?;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_write_vectored(
        &self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::task::ready!(self.tcp.poll_write_ready(cx))?;
                }
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.write_pending()? {
                return Poll::Ready(Ok(()));
            }
            std::task::ready!(self.tcp.poll_write_ready(cx))?;
        }
    }
}

/// How long, and for how many bytes, a connection the server ends reads and throws away what
/// the client still sends. Closing a socket with unread bytes in the kernel answers with a
/// reset, and a reset can make the client's TCP stack drop the answer it has not read yet
/// (a close frame, a 431): the server shuts its side and lingers instead, as nginx does.
pub(crate) const LINGER: Duration = Duration::from_secs(1);
pub(crate) const LINGER_BYTES: usize = 1024 * 1024;

/// The thread's read buffer (`with_read_buf`).
pub(crate) const READ_BUFFER: usize = 64 * 1024;

thread_local! {
    /// One read buffer per worker thread instead of one per connection: an idle connection
    /// holds no read buffer at all (uWS does the same with its loop's receive buffer). The
    /// connection tasks parse in it; lingering connections read into it and throw it away.
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BUFFER].into_boxed_slice());
}

/// Run `f` with this thread's read buffer. Not reentrant: `f` must not call it again.
pub(crate) fn with_read_buf<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    READ_BUF.with(|buf| f(&mut buf.borrow_mut()))
}

/// Shut the write side of `stream`, then read and discard until the client closes its side,
/// for at most `LINGER` and `LINGER_BYTES`: the async form of the WebSocket task's lingering
/// phase, for connections that end outside it (an HTTP request the server refused).
pub(crate) async fn linger(stream: &Stream) {
    stream.shutdown_write();
    let mut discarded = 0;
    let _ = tokio::time::timeout(LINGER, async {
        while discarded < LINGER_BYTES {
            if std::future::poll_fn(|cx| stream.poll_read_ready(cx))
                .await
                .is_err()
            {
                return;
            }
            // The thread's buffer, not one per lingering connection: a crowd of refused clients
            // must not cost a buffer each.
            match with_read_buf(|buf| stream.read(buf)) {
                Ok(0) => return,
                Ok(n) => discarded += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
}

/// The sockets a `Stream` reads from, with tokio's readiness.
trait Readiness: AsRawFd {
    fn try_read_io<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

impl Readiness for TcpStream {
    #[inline]
    fn try_read_io<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        self.try_io(Interest::READABLE, f)
    }
}

impl Readiness for UnixStream {
    #[inline]
    fn try_read_io<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        self.try_io(Interest::READABLE, f)
    }
}

/// One read from `socket` (`read` gives the bytes it got and whether the read was short). A
/// short read means the socket is drained for now: tokio is told so (through `WouldBlock`
/// inside `try_io`), which saves the `recv` that would only return EAGAIN. tokio keeps
/// readiness that arrived in the meantime, so no wake-up is lost.
#[inline]
fn read_drained(
    socket: &impl Readiness,
    read: impl FnOnce(RawFd) -> io::Result<(usize, bool)>,
) -> io::Result<usize> {
    let mut got = None;
    let result = socket.try_read_io(|| {
        let (n, short) = read(socket.as_raw_fd())?;
        got = Some(n);
        if short && n > 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (result, got) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (result, _) => result,
    }
}

/// One `recv` into `buf`: the bytes it got, and whether it left `buf` room (a short read).
#[inline]
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    unsafe { recv_raw(fd, buf.as_mut_ptr(), buf.len()) }
}

/// `recv` into `len` bytes at `ptr`, which need not be initialised.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
#[inline]
unsafe fn recv_raw(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<(usize, bool)> {
    // SAFETY: as the caller promised; the descriptor is open while the socket that lent it is
    // borrowed.
    let n = unsafe { libc::recv(fd, ptr.cast(), len, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((n as usize, (n as usize) < len))
}

/// One write of `bufs` to `socket`, made directly; through tokio only if the kernel refuses it.
/// tokio's `try_write` loads the socket's readiness before it writes, and a batch's writes go
/// to connection after connection, each cold: that load missed the cache, and a write that
/// succeeds needs no readiness bookkeeping. On `EAGAIN` tokio's write is made: it clears the
/// readiness if the kernel refuses again, unless newer readiness arrived meanwhile (its tick
/// check), or returns `WouldBlock` at once if it had none; either way the connection task's
/// `poll_write_ready` waits for the next readiness, and no wake-up is lost. Other errors are
/// returned as the kernel gave them.
#[inline]
fn write_direct(
    socket: &impl AsRawFd,
    bufs: &[IoSlice<'_>],
    through_tokio: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    #[cfg(target_os = "linux")]
    {
        let fd = socket.as_raw_fd();
        loop {
            // SAFETY: the descriptor is open while the socket that lent it is borrowed; the
            // buffers are valid for reads of their lengths, `IoSlice` is ABI-compatible with
            // `iovec` on Unix, and every field of a zeroed `msghdr` is a valid integer or null
            // pointer. MSG_NOSIGNAL: a closed peer is an error, never a SIGPIPE.
            let n = unsafe {
                if let [buf] = bufs {
                    libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL)
                } else {
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_iov = bufs.as_ptr().cast_mut().cast();
                    msg.msg_iovlen = bufs.len() as _;
                    libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
                }
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return through_tokio(),
                _ => return Err(err),
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (socket, bufs);
        through_tokio()
    }
}

/// rustls reads records through this: one `recv`, noting a short one.
struct FdReader {
    fd: RawFd,
    short: bool,
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (n, short) = recv(self.fd, buf)?;
        self.short = short;
        Ok(n)
    }
}

/// rustls writes records through this: tokio's non-blocking writes, which clear the socket's
/// readiness on `WouldBlock` so that `poll_write_ready` waits for the next one.
struct TcpWriter<'a>(&'a TcpStream);

impl Write for TcpWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Who sent a request: a TCP address, or a client of a Unix socket, which has no address worth
/// showing (clients rarely bind theirs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remote {
    Tcp(SocketAddr),
    Unix,
}

impl Remote {
    /// What a WebSocket keeps of it.
    pub fn peer(&self) -> Peer {
        match self {
            Remote::Tcp(addr) => Peer::Ip(addr.ip(), addr.port()),
            Remote::Unix => Peer::Unix,
        }
    }
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Remote::Tcp(addr) => addr.fmt(f),
            Remote::Unix => f.write_str(UNIX_PEER),
        }
    }
}

/// A WebSocket's client: its IP and port, or a client of a Unix socket. Not a `SocketAddr`,
/// whose IPv6 flow and scope take 12 bytes more in every `Conn`; the port is what log lines
/// need to tell apart clients behind one address (a NAT, a proxy), as the HTTP lines' do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Ip(IpAddr, u16),
    Unix,
}

impl Peer {
    /// `remote_address` as Python sees it: the IP, or `""` over a Unix socket (what asyncio's
    /// `peername` gives for an unnamed client).
    pub fn address(&self) -> String {
        match self {
            Peer::Ip(ip, _) => ip.to_string(),
            Peer::Unix => String::new(),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // As `Remote`'s (`[::1]:41234` for IPv6), without a link-local address's scope.
            Peer::Ip(ip, port) => SocketAddr::new(*ip, *port).fmt(f),
            Peer::Unix => f.write_str(UNIX_PEER),
        }
    }
}

/// How log lines name a Unix socket's client.
const UNIX_PEER: &str = "a unix socket client";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_an_ip_and_a_port_with_no_room_for_more() {
        // The extra variant fits in the IP's tag.
        assert_eq!(std::mem::size_of::<Peer>(), 20);
        let v6 = Peer::Ip("::1".parse().unwrap(), 41234);
        assert_eq!(v6.to_string(), "[::1]:41234");
        assert_eq!(v6.address(), "::1");
        assert_eq!(Peer::Unix.to_string(), "a unix socket client");
    }
}
