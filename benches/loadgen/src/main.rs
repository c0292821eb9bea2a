//! brioche's benchmark client.
//!
//! One thread (a current-thread tokio runtime; the runner pins it to one CPU) speaks raw
//! WebSocket frames to a server on 127.0.0.1: handshakes are written by hand, client frames are
//! pre-masked, server frames are parsed in place. Every scenario is bounded in connections,
//! messages and seconds, and a watchdog thread ends the process after `--max-seconds`.
//!
//! Output: JSON lines on stdout. `{"event":"ready",...}` / `{"event":"mark",...}` mean "measure
//! the server now, then write a line to my stdin"; the last line is `{"event":"result",...}`.
//!
//! Scenarios (32-byte text messages unless `--size`):
//!   echo-throughput  --conns 100 --inflight 16 --warmup S --duration S [--binary 1]
//!   echo-latency     --conns 100 --warmup S --duration S            (one message in flight)
//!   fanout           --conns 1000 --window 32 --warmup S --duration S   (/sub and /pub)
//!                    [--sub-ports P1,P2]  (subscribers spread over these servers; S6)
//!                    [--slow K]  (K of them stop reading once subscribed; S10)
//!   topics           --topics 10000 --per-topic 10 --conns 2000 --churners 100 --window 64
//!                    (/t/a,b,... subscribers, "#t7 ..." on /pub, "+x"/"-x" churners; S8)
//!   idle             --conns 10000 --concurrency 64 --hold S        (prints ready, waits)
//!   churn            --cycles 50000 --mark 5000 --concurrency 32 --hold S [--echo 0]
//!                    (connect, one echo unless --echo 0, close; after --mark cycles the
//!                    connect-to-101 time of every handshake is recorded: handshake_p50_us...)
//!
//! `--ca FILE` (PEM) speaks TLS (wss://) instead, trusting only that CA, with the server name
//! 127.0.0.1; `--tls-version 1.2|1.3` pins the version (default: the highest both offer).
//!
//! `--deflate 1` (echo-throughput, echo-latency, fanout): every connection offers
//! permessage-deflate as Chromium does (`permessage-deflate; client_max_window_bits`) and fails
//! if the server does not accept it; messages are JSON-like text (compressible) instead of a
//! repeated byte, sent compressed (each on its own: no context, which is always allowed), and
//! the server's compressed frames are inflated before they are checked.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::rc::Rc;
use std::time::{Duration, Instant};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use std::sync::{Arc, OnceLock};

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;
use tokio::sync::{Notify, Semaphore};
use tokio::task::{JoinHandle, LocalSet};
use tokio::time::timeout;

const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const RSV1: u8 = 0x40;

/// `--deflate 1`: offer, send and inflate permessage-deflate.
static DEFLATE: OnceLock<bool> = OnceLock::new();

fn deflate_on() -> bool {
    *DEFLATE.get().unwrap_or(&false)
}

// ----------------------------------------------------------------------------------------------
// Arguments and output

struct Args(HashMap<String, String>);

impl Args {
    fn parse() -> (String, Args) {
        let mut it = std::env::args().skip(1);
        let scenario = it.next().unwrap_or_else(|| usage("missing scenario"));
        let mut map = HashMap::new();
        while let Some(k) = it.next() {
            let Some(key) = k.strip_prefix("--") else {
                usage(&format!("unexpected argument {k}"))
            };
            let v = it.next().unwrap_or_else(|| usage(&format!("--{key} needs a value")));
            map.insert(key.to_owned(), v);
        }
        (scenario, Args(map))
    }

    fn num(&self, key: &str, default: f64) -> f64 {
        self.0
            .get(key)
            .map(|v| v.parse().unwrap_or_else(|_| usage(&format!("--{key}: not a number"))))
            .unwrap_or(default)
    }

    fn int(&self, key: &str, default: usize) -> usize {
        self.num(key, default as f64) as usize
    }

    /// A comma-separated list of ports, or `default` alone.
    fn ports(&self, key: &str, default: u16) -> Vec<u16> {
        match self.0.get(key) {
            None => vec![default],
            Some(v) => v
                .split(',')
                .map(|p| p.parse().unwrap_or_else(|_| usage(&format!("--{key}: not a port list"))))
                .collect(),
        }
    }

    fn secs(&self, key: &str, default: f64) -> Duration {
        Duration::from_secs_f64(self.num(key, default))
    }
}

fn usage(why: &str) -> ! {
    eprintln!("loadgen: {why}");
    eprintln!(
        "usage: loadgen echo-throughput|echo-latency|fanout|idle|churn --port P [--conns N] \
         [--inflight K] [--window W] [--size B] [--warmup S] [--duration S] [--cycles N] \
         [--mark N] [--concurrency C] [--hold S] [--max-seconds S] [--path /ws] [--binary 0|1]"
    );
    std::process::exit(2)
}

/// A flat JSON object built by hand (the values are numbers and plain strings).
#[derive(Default)]
struct Json(String);

impl Json {
    fn num(mut self, k: &str, v: impl Into<f64>) -> Self {
        let v: f64 = v.into();
        let sep = if self.0.is_empty() { "" } else { "," };
        if v.is_finite() {
            if v.fract() == 0.0 && v.abs() < 1e15 {
                let _ = write!(self.0, "{sep}\"{k}\":{}", v as i64);
            } else {
                let _ = write!(self.0, "{sep}\"{k}\":{v:.3}");
            }
        } else {
            let _ = write!(self.0, "{sep}\"{k}\":null");
        }
        self
    }

    fn str(mut self, k: &str, v: &str) -> Self {
        let sep = if self.0.is_empty() { "" } else { "," };
        let escaped: String = v
            .chars()
            .flat_map(|c| match c {
                '"' => vec!['\\', '"'],
                '\\' => vec!['\\', '\\'],
                c if (c as u32) < 0x20 => vec![' '],
                c => vec![c],
            })
            .collect();
        let _ = write!(self.0, "{sep}\"{k}\":\"{escaped}\"");
        self
    }

    fn emit(self) {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{{{}}}", self.0);
        let _ = out.flush();
    }
}

fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

/// CPU seconds this process has used (user + system, all threads).
fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills a valid, zeroed struct.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    }
}

/// Block until the runner writes a line (or closes stdin), at most `hold`.
async fn wait_for_runner(hold: Duration) {
    let mut line = String::new();
    let mut stdin = BufReader::new(tokio::io::stdin());
    let _ = timeout(hold, stdin.read_line(&mut line)).await;
}

// ----------------------------------------------------------------------------------------------
// Frames

/// Append one masked client frame.
fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i & 3]));
}

fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + 14);
    encode_message(&mut v, opcode, payload);
    v
}

/// Append one data message: compressed (RSV1, no context) with `--deflate 1`.
fn encode_message(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    if !deflate_on() {
        return encode(out, opcode, payload);
    }
    thread_local! {
        static COMPRESSOR: RefCell<Compress> =
            RefCell::new(Compress::new_with_window_bits(Compression::new(6), false, 15));
    }
    let mut compressed = Vec::with_capacity(payload.len() + 64);
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        c.reset();
        c.compress_vec(payload, &mut compressed, FlushCompress::Sync).unwrap();
    });
    assert!(compressed.ends_with(&[0, 0, 0xff, 0xff]), "sync flush fits in the buffer");
    compressed.truncate(compressed.len() - 4);
    encode(out, opcode | RSV1, &compressed);
}

/// Text of `size` bytes: JSON-like with `--deflate 1` (what compression is for), else `fill`.
fn payload_text(size: usize, fill: u8) -> Vec<u8> {
    if !deflate_on() {
        return payload(size, fill);
    }
    let mut p = Vec::with_capacity(size + 128);
    let mut i = 0u64;
    while p.len() < size {
        let _ = write!(
            StringSink(&mut p),
            r#"{{"id":{i},"type":"message","room":"lobby","user":"user{}","text":"hello from the benchmark","ts":17000{:05}}},"#,
            i % 7,
            i * 37 % 100_000
        );
        i += 1;
    }
    p.truncate(size);
    p
}

struct StringSink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for StringSink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn close_frame() -> Vec<u8> {
    frame(OP_CLOSE, &1000u16.to_be_bytes())
}

/// A complete server frame at the start of `buf`: (opcode with RSV1, payload range, frame
/// length).
fn parse(buf: &[u8]) -> Option<(u8, usize, usize, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & (0x0f | RSV1);
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            (u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if masked {
        at += 4; // servers never mask; tolerate it anyway (payload left masked)
    }
    if buf.len() < at + len {
        return None;
    }
    Some((opcode, at, at + len, at + len))
}

/// TLS for every connection when `--ca` is given.
static TLS: OnceLock<Option<TlsConnector>> = OnceLock::new();

fn tls_connector(a: &Args) -> Option<TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let ca = a.0.get("ca")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap_or_else(|e| usage(&format!("--ca: {e}"))) {
        roots
            .add(cert.unwrap_or_else(|e| usage(&format!("--ca: {e}"))))
            .unwrap_or_else(|e| usage(&format!("--ca: {e}")));
    }
    let versions: &[&rustls::SupportedProtocolVersion] =
        match a.0.get("tls-version").map(String::as_str) {
            None => rustls::ALL_VERSIONS,
            Some("1.2") => &[&rustls::version::TLS12],
            Some("1.3") => &[&rustls::version::TLS13],
            Some(other) => usage(&format!("--tls-version: 1.2 or 1.3, not {other}")),
        };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .expect("ring supports TLS 1.2 and 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Some(TlsConnector::from(Arc::new(config)))
}

/// A client socket: plain TCP (`Left`), or TLS over it (`Right`).
type Stream = Either<TcpStream, Box<TlsStream<TcpStream>>>;

async fn connect(port: u16) -> io::Result<Stream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    match TLS.get().and_then(Option::as_ref) {
        None => Ok(Either::Left(tcp)),
        Some(connector) => {
            let name = rustls::pki_types::ServerName::IpAddress(
                std::net::IpAddr::from([127, 0, 0, 1]).into(),
            );
            Ok(Either::Right(Box::new(connector.connect(name, tcp).await?)))
        }
    }
}

/// A client connection after the handshake, with its read buffer.
struct Ws {
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Control replies (pongs) waiting to be written by the scenario's next write.
    replies: Vec<u8>,
    closed: bool,
    /// permessage-deflate was negotiated: the decompressor (context kept, which also reads a
    /// server that resets its own), and where a message is inflated to.
    inflater: Option<Box<(Decompress, Vec<u8>)>>,
}

impl Ws {
    async fn connect(port: u16, path: &str, buf_size: usize) -> io::Result<Ws> {
        timeout(HANDSHAKE_TIMEOUT, Self::handshake(port, path, buf_size))
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "handshake timeout")))
    }

    async fn handshake(port: u16, path: &str, buf_size: usize) -> io::Result<Ws> {
        let t_connect = Instant::now();
        let mut stream = connect(port).await?;
        let offer = if deflate_on() {
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        } else {
            ""
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{offer}\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; buf_size.max(1024)];
        let mut end = 0;
        loop {
            if end == buf.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "response too long"));
            }
            let n = stream.read(&mut buf[end..]).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed in handshake"));
            }
            end += n;
            if let Some(pos) = buf[..end].windows(4).position(|w| w == b"\r\n\r\n") {
                if !buf.starts_with(b"HTTP/1.1 101") {
                    let head = String::from_utf8_lossy(&buf[..pos.min(80)]).into_owned();
                    return Err(io::Error::new(io::ErrorKind::InvalidData, head));
                }
                let head = String::from_utf8_lossy(&buf[..pos]).to_ascii_lowercase();
                let inflater = if deflate_on() {
                    let Some(line) = head
                        .lines()
                        .find(|l| l.starts_with("sec-websocket-extensions:"))
                        .filter(|l| l.contains("permessage-deflate"))
                    else {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "permessage-deflate not negotiated",
                        ));
                    };
                    NEGOTIATED.with(|n| {
                        n.borrow_mut().get_or_insert_with(|| line[25..].trim().to_owned());
                    });
                    Some(Box::new((Decompress::new_with_window_bits(false, 15), Vec::new())))
                } else {
                    None
                };
                record_handshake(t_connect.elapsed());
                return Ok(Ws {
                    stream,
                    buf,
                    start: pos + 4,
                    end,
                    replies: Vec::new(),
                    closed: false,
                    inflater,
                });
            }
        }
    }

    /// Read once from the socket and hand every complete data frame to `f` (opcode, payload).
    /// Pings are answered through `replies`; a close frame or EOF sets `closed`.
    async fn read_frames(&mut self, mut f: impl FnMut(u8, &[u8])) -> io::Result<usize> {
        let mut count = self.parse_buffered(&mut f);
        if count > 0 || self.closed {
            return Ok(count);
        }
        if self.start > 0 && (self.start == self.end || self.end == self.buf.len()) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let new_len = self.buf.len() * 2;
            self.buf.resize(new_len, 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            self.closed = true;
            return Ok(0);
        }
        self.end += n;
        count += self.parse_buffered(&mut f);
        Ok(count)
    }

    fn parse_buffered(&mut self, f: &mut impl FnMut(u8, &[u8])) -> usize {
        let mut count = 0;
        while let Some((op, from, to, len)) = parse(&self.buf[self.start..self.end]) {
            let base = self.start;
            let compressed = op & RSV1 != 0;
            match op & 0x0f {
                OP_TEXT | OP_BINARY if compressed => {
                    let op = op & 0x0f;
                    match &mut self.inflater {
                        Some(state) => {
                            let (inflater, out) = &mut **state;
                            inflate(inflater, &self.buf[base + from..base + to], out);
                            f(op, out);
                        }
                        // Not negotiated: a frame the checks count as bad.
                        None => f(0, &[]),
                    }
                    count += 1;
                }
                OP_TEXT | OP_BINARY => {
                    f(op, &self.buf[base + from..base + to]);
                    count += 1;
                }
                OP_PING => {
                    let payload = self.buf[base + from..base + to].to_vec();
                    encode(&mut self.replies, OP_PONG, &payload);
                }
                OP_CLOSE => self.closed = true,
                _ => {}
            }
            self.start += len;
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        count
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        if !self.replies.is_empty() {
            let replies = std::mem::take(&mut self.replies);
            self.stream.write_all(&replies).await?;
        }
        self.stream.write_all(bytes).await?;
        // tokio-rustls encrypts on write and sends on flush (a no-op for a plain socket).
        self.stream.flush().await
    }

    /// Closing handshake from the client side, bounded in time.
    async fn close(mut self, wait: Duration) {
        let _ = self.stream.write_all(&close_frame()).await;
        let _ = self.stream.flush().await;
        let _ = timeout(wait, async {
            while !self.closed {
                if self.read_frames(|_, _| {}).await.is_err() {
                    break;
                }
            }
        })
        .await;
    }
}

thread_local! {
    /// The first `Sec-WebSocket-Extensions` a server answered (reported in the result).
    static NEGOTIATED: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn negotiated() -> String {
    NEGOTIATED.with(|n| n.borrow().clone().unwrap_or_default())
}

thread_local! {
    /// Connect-to-101 times (ns) of the handshakes completed while it is `Some` (S9's churn
    /// after its warm-up part).
    static HANDSHAKES: RefCell<Option<Vec<u32>>> = const { RefCell::new(None) };
}

fn record_handshake(took: Duration) {
    HANDSHAKES.with(|h| {
        if let Some(v) = h.borrow_mut().as_mut() {
            v.push(took.as_nanos().min(u32::MAX as u128) as u32);
        }
    });
}

/// One message's payload, inflated into `out` (the 4-byte tail appended, as RFC 7692 says).
fn inflate(inflater: &mut Decompress, input: &[u8], out: &mut Vec<u8>) {
    out.clear();
    for part in [input, &[0, 0, 0xff, 0xff][..]] {
        let mut pos = 0;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(4096));
            }
            let before = inflater.total_in();
            if inflater
                .decompress_vec(&part[pos..], out, FlushDecompress::Sync)
                .is_err()
            {
                out.clear();
                return;
            }
            pos += (inflater.total_in() - before) as usize;
            if pos == part.len() && out.len() < out.capacity() {
                break;
            }
        }
    }
}

/// Open `n` connections to `path`, at most `concurrency` handshakes at a time.
async fn connect_many(
    port: u16,
    path: &'static str,
    n: usize,
    concurrency: usize,
    buf_size: usize,
) -> (Vec<Ws>, usize, String) {
    connect_paths(port, vec![path.to_owned(); n], concurrency, buf_size).await
}

/// Open one connection to each of `paths`, at most `concurrency` handshakes at a time.
async fn connect_paths(
    port: u16,
    paths: Vec<String>,
    concurrency: usize,
    buf_size: usize,
) -> (Vec<Ws>, usize, String) {
    let sem = Rc::new(Semaphore::new(concurrency.max(1)));
    let mut handles = Vec::with_capacity(paths.len());
    for path in paths {
        let sem = sem.clone();
        handles.push(tokio::task::spawn_local(async move {
            let _permit = sem.acquire().await.unwrap();
            Ws::connect(port, &path, buf_size).await
        }));
    }
    gather(handles).await
}

/// Await `handles`: what succeeded, how many failed, and the first failure's message.
async fn gather<T>(handles: Vec<JoinHandle<io::Result<T>>>) -> (Vec<T>, usize, String) {
    let mut ok = Vec::with_capacity(handles.len());
    let mut errors = 0;
    let mut first_error = String::new();
    for h in handles {
        match h.await.unwrap() {
            Ok(value) => ok.push(value),
            Err(e) => {
                errors += 1;
                if first_error.is_empty() {
                    first_error = e.to_string();
                }
            }
        }
    }
    (ok, errors, first_error)
}

fn payload(size: usize, fill: u8) -> Vec<u8> {
    vec![fill; size]
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx] as f64 / 1000.0 // ns -> us
}

// ----------------------------------------------------------------------------------------------
// S1: echo throughput

async fn echo_throughput(a: &Args, port: u16) {
    let conns = a.int("conns", 100);
    let inflight = a.int("inflight", 16).max(1);
    let size = a.int("size", 32);
    let warmup = a.secs("warmup", 1.0);
    let duration = a.secs("duration", 10.0);
    let path: &'static str = Box::leak(a.0.get("path").cloned().unwrap_or("/ws".into()).into());
    let (socks, conn_errors, first_error) = connect_many(port, path, conns, 64, 64 * 1024).await;
    if socks.len() < conns {
        return fail("echo-throughput", &format!("{conn_errors} connections failed: {first_error}"));
    }
    // Binary or text frames of `size` bytes (ASCII: valid UTF-8 however they are cut).
    let opcode = if a.int("binary", 0) != 0 { OP_BINARY } else { OP_TEXT };
    let msg = frame(opcode, &payload_text(size, b'x'));
    let burst: Rc<Vec<u8>> = Rc::new(msg.repeat(inflight));
    let received = Rc::new(Cell::new(0u64));
    let bad = Rc::new(Cell::new(0u64));
    let errors = Rc::new(Cell::new(0u64));
    let stop = Rc::new(Cell::new(false));
    for mut ws in socks {
        let (burst, received, bad, errors, stop) =
            (burst.clone(), received.clone(), bad.clone(), errors.clone(), stop.clone());
        let flen = msg.len();
        tokio::task::spawn_local(async move {
            if ws.send(&burst).await.is_err() {
                errors.set(errors.get() + 1);
                return;
            }
            while !stop.get() {
                let mut ok = 0usize;
                let res = ws
                    .read_frames(|op, p| {
                        if op == opcode && p.len() == size {
                            ok += 1;
                        } else {
                            bad.set(bad.get() + 1);
                        }
                    })
                    .await;
                if res.is_err() || ws.closed {
                    errors.set(errors.get() + 1);
                    return;
                }
                received.set(received.get() + ok as u64);
                // Answer each echo with a new message: `inflight` stay in flight.
                let mut left = ok;
                while left > 0 && !stop.get() {
                    let k = left.min(inflight);
                    if ws.send(&burst[..k * flen]).await.is_err() {
                        errors.set(errors.get() + 1);
                        return;
                    }
                    left -= k;
                }
            }
        });
    }
    tokio::time::sleep(warmup).await;
    let (c0, t0, cpu0) = (received.get(), Instant::now(), cpu_secs());
    tokio::time::sleep(duration).await;
    let (c1, elapsed) = (received.get(), t0.elapsed().as_secs_f64());
    let client_cpu = (cpu_secs() - cpu0) / elapsed * 100.0;
    stop.set(true);
    Json::default()
        .str("event", "result")
        .str("scenario", "echo-throughput")
        .str("deflate", &negotiated())
        .num("conns", conns as f64)
        .num("inflight", inflight as f64)
        .num("size", size as f64)
        .str("opcode", if opcode == OP_BINARY { "binary" } else { "text" })
        .num("seconds", elapsed)
        .num("messages", (c1 - c0) as f64)
        .num("msgs_per_s", (c1 - c0) as f64 / elapsed)
        .num("mb_per_s", (c1 - c0) as f64 * size as f64 / elapsed / 1e6)
        .num("client_cpu_pct", client_cpu)
        .num("bad_frames", bad.get() as f64)
        .num("conn_errors", errors.get() as f64)
        .emit();
}

// ----------------------------------------------------------------------------------------------
// S2: echo latency

async fn echo_latency(a: &Args, port: u16) {
    let conns = a.int("conns", 100);
    let size = a.int("size", 32);
    let warmup = a.secs("warmup", 1.0);
    let duration = a.secs("duration", 10.0);
    let path: &'static str = Box::leak(a.0.get("path").cloned().unwrap_or("/ws".into()).into());
    let (socks, conn_errors, first_error) = connect_many(port, path, conns, 64, 16 * 1024).await;
    if socks.len() < conns {
        return fail("echo-latency", &format!("{conn_errors} connections failed: {first_error}"));
    }
    let msg = Rc::new(frame(OP_TEXT, &payload_text(size, b'y')));
    let samples: Rc<RefCell<Vec<u32>>> = Rc::new(RefCell::new(Vec::with_capacity(1 << 20)));
    let measuring = Rc::new(Cell::new(false));
    let stop = Rc::new(Cell::new(false));
    let errors = Rc::new(Cell::new(0u64));
    let bad = Rc::new(Cell::new(0u64));
    for mut ws in socks {
        let (msg, samples, measuring, stop, errors, bad) = (
            msg.clone(),
            samples.clone(),
            measuring.clone(),
            stop.clone(),
            errors.clone(),
            bad.clone(),
        );
        tokio::task::spawn_local(async move {
            while !stop.get() {
                let t0 = Instant::now();
                if ws.send(&msg).await.is_err() {
                    errors.set(errors.get() + 1);
                    return;
                }
                let mut got = 0;
                while got == 0 {
                    let res = ws
                        .read_frames(|op, p| {
                            if op != OP_TEXT || p.len() != size {
                                bad.set(bad.get() + 1);
                            }
                            got += 1;
                        })
                        .await;
                    if res.is_err() || ws.closed {
                        errors.set(errors.get() + 1);
                        return;
                    }
                }
                if got > 1 {
                    bad.set(bad.get() + got as u64 - 1);
                }
                let ns = t0.elapsed().as_nanos().min(u32::MAX as u128) as u32;
                if measuring.get() {
                    samples.borrow_mut().push(ns);
                }
            }
        });
    }
    tokio::time::sleep(warmup).await;
    measuring.set(true);
    let (t0, cpu0) = (Instant::now(), cpu_secs());
    tokio::time::sleep(duration).await;
    measuring.set(false);
    let elapsed = t0.elapsed().as_secs_f64();
    let client_cpu = (cpu_secs() - cpu0) / elapsed * 100.0;
    stop.set(true);
    let mut s = std::mem::take(&mut *samples.borrow_mut());
    s.sort_unstable();
    let mean = if s.is_empty() {
        f64::NAN
    } else {
        s.iter().map(|&x| x as f64).sum::<f64>() / s.len() as f64 / 1000.0
    };
    Json::default()
        .str("event", "result")
        .str("scenario", "echo-latency")
        .str("deflate", &negotiated())
        .num("conns", conns as f64)
        .num("size", size as f64)
        .num("seconds", elapsed)
        .num("messages", s.len() as f64)
        .num("msgs_per_s", s.len() as f64 / elapsed)
        .num("p50_us", percentile(&s, 0.50))
        .num("p90_us", percentile(&s, 0.90))
        .num("p99_us", percentile(&s, 0.99))
        .num("p999_us", percentile(&s, 0.999))
        .num("max_us", s.last().map_or(f64::NAN, |&x| x as f64 / 1000.0))
        .num("mean_us", mean)
        .num("client_cpu_pct", client_cpu)
        .num("bad_frames", bad.get() as f64)
        .num("conn_errors", errors.get() as f64)
        .emit();
}

// ----------------------------------------------------------------------------------------------
// S3: fan-out

struct Fanout {
    subscribers: usize,
    window: u64,
    /// Next sequence number the publisher will send.
    next_seq: Cell<u64>,
    /// Oldest sequence number not yet delivered to every subscriber.
    oldest: Cell<u64>,
    /// Deliveries per in-window message, indexed by seq % window.
    counts: RefCell<Vec<u32>>,
    advanced: Notify,
    deliveries: Cell<u64>,
    synced: Cell<usize>,
    lost: Cell<u64>,
    duplicated: Cell<u64>,
    out_of_window: Cell<u64>,
    sub_errors: Cell<u64>,
}

impl Fanout {
    fn delivered(&self, seq: u64) {
        let (oldest, next) = (self.oldest.get(), self.next_seq.get());
        if seq < oldest || seq >= next {
            self.out_of_window.set(self.out_of_window.get() + 1);
            return;
        }
        let w = self.window;
        let mut counts = self.counts.borrow_mut();
        counts[(seq % w) as usize] += 1;
        if seq == oldest {
            let mut o = oldest;
            while o < next && counts[(o % w) as usize] as usize >= self.subscribers {
                counts[(o % w) as usize] = 0;
                o += 1;
            }
            if o != oldest {
                self.oldest.set(o);
                self.advanced.notify_one();
            }
        }
    }
}

fn seq_payload(seq: u64, size: usize) -> Vec<u8> {
    let mut p = format!("m{seq:020}").into_bytes();
    if deflate_on() {
        p.extend_from_slice(&payload_text(size.max(21) - 21, b'.'));
    }
    p.resize(size.max(21), b'.');
    p
}

fn parse_seq(p: &[u8]) -> Option<u64> {
    if p.len() < 21 || p[0] != b'm' {
        return None;
    }
    std::str::from_utf8(&p[1..21]).ok()?.parse().ok()
}

async fn fanout(a: &Args, port: u16) {
    let subscribers = a.int("conns", 1000);
    let window = a.int("window", 32).max(1) as u64;
    let size = a.int("size", 32).max(21);
    let warmup = a.secs("warmup", 1.0);
    let duration = a.secs("duration", 10.0);
    // S10: the first `slow` subscribers stop reading once subscribed; the window, the
    // deliveries and the checks are the other (fast) subscribers'.
    let slow = a.int("slow", 0).min(subscribers.saturating_sub(1));
    let t_connect = Instant::now();
    // S6 spreads the subscribers over several servers sharing the topic (`--sub-ports`); the
    // publisher stays on `--port`.
    let sub_ports = a.ports("sub-ports", port);
    let (mut subs, mut conn_errors, mut first_error) = (Vec::new(), 0, String::new());
    for (k, &p) in sub_ports.iter().enumerate() {
        let n = subscribers / sub_ports.len() + usize::from(k < subscribers % sub_ports.len());
        let (some, errors, first) = connect_many(p, "/sub", n, 64, 16 * 1024).await;
        subs.extend(some);
        conn_errors += errors;
        if first_error.is_empty() {
            first_error = first;
        }
    }
    if subs.len() < subscribers {
        return fail("fanout", &format!("{conn_errors} subscribers failed: {first_error}"));
    }
    let publisher = match Ws::connect(port, "/pub", 4096).await {
        Ok(ws) => ws,
        Err(e) => return fail("fanout", &format!("publisher: {e}")),
    };
    let connect_s = t_connect.elapsed().as_secs_f64();
    let st = Rc::new(Fanout {
        subscribers: subscribers - slow,
        window,
        next_seq: Cell::new(0),
        oldest: Cell::new(0),
        counts: RefCell::new(vec![0; window as usize]),
        advanced: Notify::new(),
        deliveries: Cell::new(0),
        synced: Cell::new(0),
        lost: Cell::new(0),
        duplicated: Cell::new(0),
        out_of_window: Cell::new(0),
        sub_errors: Cell::new(0),
    });
    let expected: Rc<RefCell<Vec<u64>>> = Rc::new(RefCell::new(vec![0; subscribers]));
    let slow_readers = SlowReaders::default();
    let mut slow_tasks = Vec::new();
    for (i, mut ws) in subs.into_iter().enumerate() {
        if i < slow {
            slow_tasks.push(tokio::task::spawn_local(slow_reader(ws, st.clone(), slow_readers.clone())));
            continue;
        }
        let (st, expected) = (st.clone(), expected.clone());
        tokio::task::spawn_local(async move {
            let mut synced = false;
            loop {
                let res = ws
                    .read_frames(|_, p| {
                        if p.first() == Some(&b's') {
                            if !synced {
                                synced = true;
                                st.synced.set(st.synced.get() + 1);
                            }
                            return;
                        }
                        let Some(seq) = parse_seq(p) else {
                            st.sub_errors.set(st.sub_errors.get() + 1);
                            return;
                        };
                        let mut exp = expected.borrow_mut();
                        let want = exp[i];
                        if seq < want {
                            st.duplicated.set(st.duplicated.get() + 1);
                            return;
                        }
                        if seq > want {
                            st.lost.set(st.lost.get() + (seq - want));
                        }
                        exp[i] = seq + 1;
                        drop(exp);
                        st.deliveries.set(st.deliveries.get() + 1);
                        st.delivered(seq);
                    })
                    .await;
                if !ws.replies.is_empty() {
                    let _ = ws.send(&[]).await;
                }
                if res.is_err() || ws.closed {
                    return;
                }
            }
        });
    }
    let (pub_read, mut pub_write) = tokio::io::split(publisher.stream);
    // The publisher receives nothing but pings; drain its socket so it never stalls.
    tokio::task::spawn_local(async move {
        let mut r = pub_read;
        let mut buf = vec![0u8; 4096];
        while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
    });

    // Sync: until every subscriber has seen a sync message, all of them are subscribed.
    let sync = frame(OP_TEXT, &payload(size, b's'));
    let t_sync = Instant::now();
    while st.synced.get() < subscribers {
        if t_sync.elapsed() > Duration::from_secs(20) {
            return fail(
                "fanout",
                &format!("only {} of {subscribers} subscribers synced", st.synced.get()),
            );
        }
        if pub_write.write_all(&sync).await.is_err() || pub_write.flush().await.is_err() {
            return fail("fanout", "publisher connection lost during sync");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sync_s = t_sync.elapsed().as_secs_f64();

    let stop = Rc::new(Cell::new(false));
    let publishing = {
        let (st, stop) = (st.clone(), stop.clone());
        tokio::task::spawn_local(async move {
            let mut out = Vec::with_capacity(64 * 1024);
            while !stop.get() {
                let (oldest, next) = (st.oldest.get(), st.next_seq.get());
                let room = oldest + st.window - next;
                if room == 0 {
                    st.advanced.notified().await;
                    continue;
                }
                out.clear();
                for seq in next..next + room {
                    encode_message(&mut out, OP_TEXT, &seq_payload(seq, size));
                }
                st.next_seq.set(next + room);
                if pub_write.write_all(&out).await.is_err() || pub_write.flush().await.is_err() {
                    return pub_write;
                }
            }
            pub_write
        })
    };
    tokio::time::sleep(warmup).await;
    let (d0, p0, t0, cpu0) = (st.deliveries.get(), st.next_seq.get(), Instant::now(), cpu_secs());
    tokio::time::sleep(duration).await;
    let (d1, p1, elapsed) = (st.deliveries.get(), st.next_seq.get(), t0.elapsed().as_secs_f64());
    let client_cpu = (cpu_secs() - cpu0) / elapsed * 100.0;
    stop.set(true);
    st.advanced.notify_one();
    let _pub_write = publishing.await.ok();
    // Let everything sent be delivered, then count what each subscriber is missing.
    let t_drain = Instant::now();
    while st.oldest.get() < st.next_seq.get() && t_drain.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = st.next_seq.get();
    let missing: u64 = expected.borrow()[slow..].iter().map(|&e| total.saturating_sub(e)).sum();
    // Now the slow readers read what the server kept for them (or learn it closed them).
    slow_readers.drain.set(true);
    slow_readers.wake.notify_waiters();
    for t in slow_tasks {
        let _ = t.await;
    }
    Json::default()
        .str("event", "result")
        .str("scenario", "fanout")
        .str("deflate", &negotiated())
        .num("subscribers", subscribers as f64)
        .num("window", window as f64)
        .num("size", size as f64)
        .num("seconds", elapsed)
        .num("published", (p1 - p0) as f64)
        .num("publishes_per_s", (p1 - p0) as f64 / elapsed)
        .num("deliveries", (d1 - d0) as f64)
        .num("deliveries_per_s", (d1 - d0) as f64 / elapsed)
        .num("client_cpu_pct", client_cpu)
        .num("total_published", total as f64)
        .num("lost", (st.lost.get() + missing) as f64)
        .num("duplicated", st.duplicated.get() as f64)
        .num("out_of_window", st.out_of_window.get() as f64)
        .num("bad_frames", st.sub_errors.get() as f64)
        .num("connect_s", connect_s)
        .num("sync_s", sync_s)
        .num("slow", slow as f64)
        .num("slow_received", slow_readers.received.get() as f64)
        .num("slow_closed", slow_readers.closed.get() as f64)
        .emit();
}

/// S10's slow subscribers: what they got when they finally read, and how many the server closed.
#[derive(Clone, Default)]
struct SlowReaders {
    drain: Rc<Cell<bool>>,
    wake: Rc<Notify>,
    received: Rc<Cell<u64>>,
    closed: Rc<Cell<u64>>,
}

/// A subscriber that reads until it is subscribed (a sync message), then not at all until the
/// publishing is over: the server's queue for it grows to whatever limit the server sets. Then
/// it reads what is left, at most 5 s (1 s of silence ends it earlier), counting the messages.
async fn slow_reader(mut ws: Ws, st: Rc<Fanout>, sr: SlowReaders) {
    let mut synced = false;
    while !synced {
        let res = ws.read_frames(|_, p| synced |= p.first() == Some(&b's')).await;
        if res.is_err() || ws.closed {
            return;
        }
    }
    st.synced.set(st.synced.get() + 1);
    while !sr.drain.get() {
        sr.wake.notified().await;
    }
    let t0 = Instant::now();
    while !ws.closed && t0.elapsed() < Duration::from_secs(5) {
        let mut got = 0u64;
        match timeout(Duration::from_secs(1), ws.read_frames(|_, p| got += u64::from(parse_seq(p).is_some()))).await {
            Ok(Ok(_)) => sr.received.set(sr.received.get() + got),
            _ => break,
        }
    }
    if ws.closed {
        sr.closed.set(sr.closed.get() + 1);
    }
}

// ----------------------------------------------------------------------------------------------
// S8: many topics

/// Send `text` and wait for the server to answer it (the topics path answers every message),
/// within the handshake timeout.
async fn ask(ws: &mut Ws, text: &str) -> io::Result<()> {
    ws.send(&frame(OP_TEXT, text.as_bytes())).await?;
    timeout(HANDSHAKE_TIMEOUT, async {
        let mut got = 0;
        while got == 0 {
            got += ws.read_frames(|_, _| {}).await?;
            if ws.closed && got == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before the answer"));
            }
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no answer")))
}

/// `--topics` topics with `--per-topic` subscribers each, spread over `--conns` connections
/// (`/t/a,b,...`), one publisher sending to the topics in turn ("#t7 m..." on `/pub`) with at
/// most `--window` messages not yet delivered to all of a topic's subscribers, and `--churners`
/// more connections that subscribe to a topic of their own and unsubscribe again, one request
/// at a time, each answered by the server. Deliveries/s and (un)subscribes/s.
async fn topics(a: &Args, port: u16) {
    let topics = a.int("topics", 10_000).max(1);
    let per_topic = a.int("per-topic", 10).max(1);
    let conns = a.int("conns", 2_000).max(per_topic);
    let churners = a.int("churners", 100);
    let window = a.int("window", 64).max(1) as u64;
    let size = a.int("size", 32).max(21);
    let warmup = a.secs("warmup", 1.0);
    let duration = a.secs("duration", 10.0);
    // Subscription s is topic s / per_topic on connection s % conns: every topic on
    // `per_topic` different connections, every connection with the same number of topics.
    let mut paths: Vec<String> = vec!["/t/".to_owned(); conns];
    for s in 0..topics * per_topic {
        let path = &mut paths[s % conns];
        if path.len() > 3 {
            path.push(',');
        }
        let _ = write!(path, "t{}", s / per_topic);
    }
    let t_connect = Instant::now();
    let (mut subs, errors, first_error) = connect_paths(port, paths, 64, 16 * 1024).await;
    if subs.len() < conns {
        return fail("topics", &format!("{errors} subscribers failed: {first_error}"));
    }
    // An answer to a request means the subscriptions of the path are in place (the servers
    // handle a connection's open before its messages).
    for ws in subs.iter_mut() {
        if let Err(e) = ask(ws, "-sync").await {
            return fail("topics", &format!("subscriber not ready: {e}"));
        }
    }
    let churn_paths = (0..churners).map(|i| format!("/t/c{i}")).collect();
    let (churn_conns, errors, first_error) = connect_paths(port, churn_paths, 64, 4096).await;
    if churn_conns.len() < churners {
        return fail("topics", &format!("{errors} churners failed: {first_error}"));
    }
    let publisher = match Ws::connect(port, "/pub", 4096).await {
        Ok(ws) => ws,
        Err(e) => return fail("topics", &format!("publisher: {e}")),
    };
    let connect_s = t_connect.elapsed().as_secs_f64();
    let st = Rc::new(Fanout {
        subscribers: per_topic,
        window,
        next_seq: Cell::new(0),
        oldest: Cell::new(0),
        counts: RefCell::new(vec![0; window as usize]),
        advanced: Notify::new(),
        deliveries: Cell::new(0),
        synced: Cell::new(0),
        lost: Cell::new(0),
        duplicated: Cell::new(0),
        out_of_window: Cell::new(0),
        sub_errors: Cell::new(0),
    });
    for mut ws in subs {
        let st = st.clone();
        tokio::task::spawn_local(async move {
            loop {
                let res = ws
                    .read_frames(|_, p| {
                        let seq = p.iter().position(|&b| b == b' ').and_then(|at| parse_seq(&p[at + 1..]));
                        match seq {
                            Some(seq) => {
                                st.deliveries.set(st.deliveries.get() + 1);
                                st.delivered(seq);
                            }
                            None => st.sub_errors.set(st.sub_errors.get() + 1),
                        }
                    })
                    .await;
                if !ws.replies.is_empty() {
                    let _ = ws.send(&[]).await;
                }
                if res.is_err() || ws.closed {
                    return;
                }
            }
        });
    }
    let stop = Rc::new(Cell::new(false));
    let churn_ops = Rc::new(Cell::new(0u64));
    let churn_errors = Rc::new(Cell::new(0u64));
    for (i, mut ws) in churn_conns.into_iter().enumerate() {
        let (stop, ops, errors) = (stop.clone(), churn_ops.clone(), churn_errors.clone());
        tokio::task::spawn_local(async move {
            let (sub, unsub) = (format!("+k{i}"), format!("-k{i}"));
            while !stop.get() {
                for req in [&sub, &unsub] {
                    if ask(&mut ws, req).await.is_err() {
                        errors.set(errors.get() + 1);
                        return;
                    }
                    ops.set(ops.get() + 1);
                }
            }
        });
    }
    let (pub_read, mut pub_write) = tokio::io::split(publisher.stream);
    tokio::task::spawn_local(async move {
        let mut r = pub_read;
        let mut buf = vec![0u8; 4096];
        while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let publishing = {
        let (st, stop) = (st.clone(), stop.clone());
        tokio::task::spawn_local(async move {
            let mut out = Vec::with_capacity(64 * 1024);
            let mut msg = Vec::with_capacity(size + 16);
            while !stop.get() {
                let (oldest, next) = (st.oldest.get(), st.next_seq.get());
                let room = oldest + st.window - next;
                if room == 0 {
                    st.advanced.notified().await;
                    continue;
                }
                out.clear();
                for seq in next..next + room {
                    msg.clear();
                    let _ = write!(StringSink(&mut msg), "#t{} ", seq % topics as u64);
                    msg.extend_from_slice(&seq_payload(seq, size));
                    encode(&mut out, OP_TEXT, &msg);
                }
                st.next_seq.set(next + room);
                if pub_write.write_all(&out).await.is_err() || pub_write.flush().await.is_err() {
                    return;
                }
            }
        })
    };
    tokio::time::sleep(warmup).await;
    let (d0, p0, c0, t0, cpu0) =
        (st.deliveries.get(), st.next_seq.get(), churn_ops.get(), Instant::now(), cpu_secs());
    tokio::time::sleep(duration).await;
    let (d1, p1, c1) = (st.deliveries.get(), st.next_seq.get(), churn_ops.get());
    let elapsed = t0.elapsed().as_secs_f64();
    let client_cpu = (cpu_secs() - cpu0) / elapsed * 100.0;
    stop.set(true);
    st.advanced.notify_one();
    let _ = publishing.await;
    let t_drain = Instant::now();
    while st.oldest.get() < st.next_seq.get() && t_drain.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Json::default()
        .str("event", "result")
        .str("scenario", "topics")
        .num("topics", topics as f64)
        .num("per_topic", per_topic as f64)
        .num("conns", conns as f64)
        .num("churners", churners as f64)
        .num("window", window as f64)
        .num("seconds", elapsed)
        .num("publishes_per_s", (p1 - p0) as f64 / elapsed)
        .num("deliveries_per_s", (d1 - d0) as f64 / elapsed)
        .num("churn_ops_per_s", (c1 - c0) as f64 / elapsed)
        .num("churn_errors", churn_errors.get() as f64)
        .num("client_cpu_pct", client_cpu)
        .num("undelivered", (st.next_seq.get() - st.oldest.get()) as f64)
        .num("out_of_window", st.out_of_window.get() as f64)
        .num("bad_frames", st.sub_errors.get() as f64)
        .num("connect_s", connect_s)
        .emit();
}

// ----------------------------------------------------------------------------------------------
// S4: idle connections

async fn idle(a: &Args, port: u16, nofile: u64) {
    let conns = a.int("conns", 10_000);
    let concurrency = a.int("concurrency", 64);
    let hold = a.secs("hold", 60.0);
    let size = a.int("size", 32);
    let path: &'static str = Box::leak(a.0.get("path").cloned().unwrap_or("/ws".into()).into());
    let t0 = Instant::now();
    let sem = Rc::new(Semaphore::new(concurrency.max(1)));
    let msg = Rc::new(frame(OP_TEXT, &payload(size, b'i')));
    let mut handles = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (sem, msg) = (sem.clone(), msg.clone());
        handles.push(tokio::task::spawn_local(async move {
            let _permit = sem.acquire().await.unwrap();
            let mut ws = Ws::connect(port, path, 1024).await?;
            // One echo: the server has set the connection up completely, handlers included.
            ws.send(&msg).await?;
            let r = timeout(HANDSHAKE_TIMEOUT, async {
                let mut got = 0;
                while got == 0 && !ws.closed {
                    got += ws.read_frames(|_, _| {}).await?;
                }
                if got == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
                }
                Ok::<_, io::Error>(())
            })
            .await;
            match r {
                Ok(Ok(())) => Ok(ws.stream), // keep only the socket while idle
                Ok(Err(e)) => Err(e),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "echo timeout")),
            }
        }));
    }
    let (held, errors, first_error) = gather(handles).await;
    let connect_s = t0.elapsed().as_secs_f64();
    Json::default()
        .str("event", "ready")
        .num("connected", held.len() as f64)
        .num("errors", errors as f64)
        .num("connect_s", connect_s)
        .emit();
    wait_for_runner(hold).await;
    let n = held.len();
    drop(held);
    Json::default()
        .str("event", "result")
        .str("scenario", "idle")
        .num("conns", conns as f64)
        .num("connected", n as f64)
        .num("errors", errors as f64)
        .str("first_error", &first_error)
        .num("connect_s", connect_s)
        .num("conns_per_s", n as f64 / connect_s)
        .num("nofile_limit", nofile as f64)
        .emit();
}

// ----------------------------------------------------------------------------------------------
// S5: connection churn

/// One cycle: connect, one echo (unless `msg` is `None`: S9 times the handshake alone), closing
/// handshake.
async fn churn_cycle(port: u16, path: &str, msg: Option<&[u8]>) -> io::Result<()> {
    let mut ws = Ws::connect(port, path, 1024).await?;
    if let Some(msg) = msg {
        ws.send(msg).await?;
        timeout(HANDSHAKE_TIMEOUT, async {
            let mut got = 0;
            while got == 0 {
                got += ws.read_frames(|_, _| {}).await?;
                if ws.closed && got == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before echo"));
                }
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "echo timeout")))?;
    }
    ws.close(Duration::from_secs(2)).await;
    Ok(())
}

struct ChurnStats {
    ok: Cell<u64>,
    errors: Cell<u64>,
    first_error: RefCell<String>,
}

async fn churn_phase(port: u16, path: &'static str, cycles: u64, concurrency: usize, size: usize, echo: bool, st: Rc<ChurnStats>) -> f64 {
    let claimed = Rc::new(Cell::new(0u64));
    let msg = Rc::new(echo.then(|| frame(OP_TEXT, &payload(size, b'c'))));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (claimed, msg, st) = (claimed.clone(), msg.clone(), st.clone());
        workers.push(tokio::task::spawn_local(async move {
            while claimed.get() < cycles {
                claimed.set(claimed.get() + 1);
                match churn_cycle(port, path, msg.as_deref()).await {
                    Ok(()) => st.ok.set(st.ok.get() + 1),
                    Err(e) => {
                        st.errors.set(st.errors.get() + 1);
                        if st.first_error.borrow().is_empty() {
                            *st.first_error.borrow_mut() = e.to_string();
                        }
                        // A refusing server is not hammered in a tight loop.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    t0.elapsed().as_secs_f64()
}

async fn churn(a: &Args, port: u16) {
    let cycles = a.int("cycles", 50_000) as u64;
    let mark = (a.int("mark", 5_000) as u64).min(cycles);
    let concurrency = a.int("concurrency", 32);
    let size = a.int("size", 32);
    let hold = a.secs("hold", 60.0);
    let echo = a.int("echo", 1) != 0;
    let path: &'static str = Box::leak(a.0.get("path").cloned().unwrap_or("/ws".into()).into());
    let st = Rc::new(ChurnStats {
        ok: Cell::new(0),
        errors: Cell::new(0),
        first_error: RefCell::new(String::new()),
    });
    let t1 = churn_phase(port, path, mark, concurrency, size, echo, st.clone()).await;
    let ok1 = st.ok.get();
    Json::default()
        .str("event", "mark")
        .num("cycles", mark as f64)
        .num("ok", ok1 as f64)
        .num("errors", st.errors.get() as f64)
        .num("seconds", t1)
        .emit();
    wait_for_runner(hold).await;
    // The first `mark` cycles are the warm-up of the handshake times.
    HANDSHAKES.with(|h| *h.borrow_mut() = Some(Vec::with_capacity((cycles - mark) as usize)));
    let t2 = churn_phase(port, path, cycles - mark, concurrency, size, echo, st.clone()).await;
    let ok = st.ok.get();
    let mut hs = HANDSHAKES.with(|h| h.borrow_mut().take()).unwrap_or_default();
    hs.sort_unstable();
    Json::default()
        .str("event", "result")
        .str("scenario", "churn")
        .num("cycles", cycles as f64)
        .num("concurrency", concurrency as f64)
        .num("ok", ok as f64)
        .num("errors", st.errors.get() as f64)
        .str("first_error", &st.first_error.borrow())
        .num("seconds", t1 + t2)
        .num("conns_per_s", ok as f64 / (t1 + t2))
        .num("conns_per_s_first", ok1 as f64 / t1)
        .num("conns_per_s_rest", (ok - ok1) as f64 / t2)
        .num("echo", f64::from(u8::from(echo)))
        .num("handshakes_timed", hs.len() as f64)
        .num("handshake_p50_us", percentile(&hs, 0.50))
        .num("handshake_p90_us", percentile(&hs, 0.90))
        .num("handshake_p99_us", percentile(&hs, 0.99))
        .num("handshake_max_us", hs.last().map_or(f64::NAN, |&x| x as f64 / 1000.0))
        .emit();
}

fn fail(scenario: &str, why: &str) {
    Json::default()
        .str("event", "result")
        .str("scenario", scenario)
        .str("error", why)
        .emit();
}

fn main() {
    let (scenario, args) = Args::parse();
    let _ = DEFLATE.set(args.int("deflate", 0) != 0);
    let port = args.int("port", 0);
    if port == 0 || port > u16::MAX as usize {
        usage("--port is required");
    }
    let port = port as u16;
    let nofile = raise_nofile();
    assert!(TLS.set(tls_connector(&args)).is_ok(), "set once");
    let max_seconds = args.num("max-seconds", 300.0);
    {
        let scenario = scenario.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(max_seconds));
            Json::default()
                .str("event", "result")
                .str("scenario", &scenario)
                .str("error", &format!("watchdog: still running after {max_seconds} s"))
                .emit();
            std::process::exit(3);
        });
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = LocalSet::new();
    local.block_on(&rt, async {
        match scenario.as_str() {
            "echo-throughput" => echo_throughput(&args, port).await,
            "echo-latency" => echo_latency(&args, port).await,
            "fanout" => fanout(&args, port).await,
            "topics" => topics(&args, port).await,
            "idle" => idle(&args, port, nofile).await,
            "churn" => churn(&args, port).await,
            other => usage(&format!("unknown scenario {other}")),
        }
    });
    // Open connections are dropped by exiting; the servers see EOF.
    let _ = io::stdout().flush();
    std::process::exit(0);
}
