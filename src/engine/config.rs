//! Settings fixed when a server starts.

use std::time::Duration;

use super::tls::TlsFiles;

/// The longest timeout a server takes (about 136 years). Every deadline the core computes is an
/// `Instant` plus a timeout (`idle_timeout`'s ping at 3/4 of it): bounded here, none of them can
/// overflow, which would panic the connection's task.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(u32::MAX as u64);

/// Per-connection WebSocket limits (Bun's names and defaults).
#[derive(Clone, Debug)]
pub struct WsLimits {
    /// Largest incoming message; a larger one closes the connection with 1009.
    pub max_payload_length: usize,
    /// Bytes that may be queued before sends are dropped; 0 means no limit.
    pub backpressure_limit: usize,
    /// Whether a send that finds the limit exceeded also closes the connection.
    pub close_on_backpressure_limit: bool,
    /// Silence from the client after which the connection is closed; zero turns it off.
    pub idle_timeout: Duration,
    /// Whether `publish` from a socket also reaches that socket.
    pub publish_to_self: bool,
    /// Whether a silent client is pinged before the idle timeout closes it.
    pub send_pings: bool,
    /// How long a message (or control frame) may take from its first byte to its last before
    /// the connection is closed with 1008; zero turns it off. Without it a client that drips
    /// a large message holds its buffer for as long as it keeps dripping.
    pub message_timeout: Duration,
    /// permessage-deflate (RFC 7692) as the server accepts it; `None`: never negotiated.
    pub deflate: Option<DeflateConfig>,
}

/// What the server accepts of a client's permessage-deflate offers (`http/handshake.rs`
/// negotiates it, `ws/deflate.rs` runs it). Window bits are base-2 logarithms of the LZ77 window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Reset the compressor after every message, even when the client does not ask: no window
    /// kept per connection between sends, and a publish is compressed once for all.
    pub server_no_context_takeover: bool,
    /// Ask the client to reset its compressor after every message: the server keeps no
    /// inflate window between the client's messages.
    pub client_no_context_takeover: bool,
    /// Largest window the server compresses with, 9-15 (zlib has no raw deflate with 8).
    pub server_max_window_bits: u8,
    /// Largest window the client may compress with, 9-15 (clients refuse to be told 8, which
    /// zlib cannot compress with). Below 15, offers that do not let the server limit it are
    /// declined.
    pub client_max_window_bits: u8,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        Self {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        }
    }
}

impl Default for WsLimits {
    fn default() -> Self {
        Self {
            max_payload_length: 16 * 1024 * 1024,
            backpressure_limit: 16 * 1024 * 1024,
            close_on_backpressure_limit: false,
            idle_timeout: Duration::from_secs(120),
            publish_to_self: false,
            send_pings: true,
            message_timeout: Duration::from_secs(120),
            deflate: None,
        }
    }
}

/// Everything a [`crate::engine::Server`] needs to start.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub max_request_body_size: usize,
    /// Without a WebSocket config, upgrade requests are passed to the handler as plain HTTP.
    pub websockets_enabled: bool,
    pub ws: WsLimits,
    /// How long a client may take to send its request headers (slowloris guard).
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers); larger gets 431.
    pub max_header_size: usize,
    /// Open WebSockets beyond which handshakes get 503 before reaching the handler; 0: no limit.
    pub max_connections: usize,
    /// How long a server-initiated close waits for the client's close frame.
    pub close_timeout: Duration,
    /// Bytes all clients together may make the server hold in incomplete messages and in
    /// messages waiting for Python (`ws/budget.rs`); 0: no limit.
    pub max_incoming_bytes: usize,
    /// Bind with `SO_REUSEPORT`, so that sibling processes (`server.workers(n)`) accept on the
    /// same port and the kernel spreads connections over them.
    pub reuse_port: bool,
    /// Topics shared with sibling processes: where this one listens, and where they do.
    pub relay: Option<RelayPaths>,
    /// Share topics with other processes through Redis (`broker/`); `None`: this process only.
    pub redis: Option<RedisConfig>,
    /// Serve HTTPS and `wss://` with this certificate and key (read when the server starts).
    pub tls: Option<TlsFiles>,
}

/// Unix socket paths of the topic relay between sibling processes (`ws/relay.rs`).
#[derive(Clone, Debug)]
pub struct RelayPaths {
    pub listen: std::path::PathBuf,
    pub peers: Vec<std::path::PathBuf>,
}

/// Where and how topics are shared with other processes: `server.pubsub_redis(url)`.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://` or `rediss://` (TLS), as the `redis` crate parses it.
    pub url: String,
    /// `SSUBSCRIBE`/`SPUBLISH` (Redis 7 sharded pub/sub) instead of `SUBSCRIBE`/`PUBLISH`.
    pub sharded: bool,
    /// Put before each topic to make its channel name, so that other users of the same Redis
    /// are not mixed in.
    pub namespace: String,
}

impl RedisConfig {
    /// Refuse a URL the client could never connect with, before the server starts rather than
    /// in a log line later.
    pub fn check(&self) -> Result<(), String> {
        use redis::IntoConnectionInfo;
        if !(self.url.starts_with("redis://") || self.url.starts_with("rediss://")) {
            return Err("the Redis URL must start with redis:// or rediss://".into());
        }
        let info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(|err| format!("invalid Redis URL: {err}"))?;
        if let redis::ConnectionAddr::TcpTls { insecure: true, .. } = info.addr() {
            // The client is built without certificate checks that can be turned off: such a
            // link would fail at every connection, in a log line.
            return Err(
                "a rediss:// URL's #insecure is not supported: the server's certificate \
                        is always verified (a private CA can go in SSL_CERT_FILE)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The URL may hold a password: never print it.
impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("sharded", &self.sharded)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            max_request_body_size: 1024 * 1024,
            websockets_enabled: true,
            ws: WsLimits::default(),
            header_read_timeout: Duration::from_secs(10),
            max_header_size: 64 * 1024,
            max_connections: 0,
            close_timeout: Duration::from_secs(5),
            max_incoming_bytes: 1 << 30,
            reuse_port: false,
            relay: None,
            redis: None,
            tls: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RedisConfig;

    fn redis(url: &str) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            sharded: false,
            namespace: "brioche:".into(),
        }
    }

    #[test]
    fn redis_urls_are_checked_and_never_printed() {
        assert!(redis("redis://127.0.0.1:6379/0").check().is_ok());
        assert!(redis("redis://:secret@10.0.0.1").check().is_ok());
        // TLS is built in (rustls with ring).
        assert!(redis("rediss://cache.example:6380").check().is_ok());
        assert!(redis("http://127.0.0.1").check().is_err());
        assert!(redis("redis://127.0.0.1:notaport").check().is_err());
        let printed = format!("{:?}", redis("redis://:secret@10.0.0.1"));
        assert!(!printed.contains("secret"), "{printed}");
    }
}
