//! Deciding whether a request is a WebSocket handshake (RFC 6455 section 4.2.1).

use hyper::header::{
    HeaderMap, HeaderValue, CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::{Method, Request, StatusCode, Version};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

pub(crate) enum Handshake {
    /// No `Upgrade: websocket`: an ordinary HTTP request.
    NotWebSocket,
    /// Claims to be a WebSocket handshake but is malformed: answer with this status.
    Invalid(StatusCode, &'static str),
    /// A valid handshake with its `Sec-WebSocket-Key`.
    Valid(HeaderValue),
}

fn has_token(headers: &HeaderMap, name: hyper::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

pub(crate) fn classify<B>(req: &Request<B>) -> Handshake {
    let headers = req.headers();
    if !has_token(headers, UPGRADE, "websocket") {
        return Handshake::NotWebSocket;
    }
    if req.method() != Method::GET {
        return Handshake::Invalid(StatusCode::BAD_REQUEST, "WebSocket handshake must be a GET");
    }
    if req.version() != Version::HTTP_11 {
        return Handshake::Invalid(
            StatusCode::BAD_REQUEST,
            "WebSocket handshake needs HTTP/1.1",
        );
    }
    if !has_token(headers, CONNECTION, "upgrade") {
        return Handshake::Invalid(StatusCode::BAD_REQUEST, "missing Connection: Upgrade");
    }
    if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Handshake::Invalid(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported Sec-WebSocket-Version",
        );
    }
    match headers.get(SEC_WEBSOCKET_KEY) {
        Some(key) if is_valid_key(key.as_bytes()) => Handshake::Valid(key.clone()),
        _ => Handshake::Invalid(
            StatusCode::BAD_REQUEST,
            "missing or invalid Sec-WebSocket-Key",
        ),
    }
}

/// A 16-byte nonce in canonical base64: 22 characters of the alphabet, then `==`. The 22nd
/// character carries the nonce's last 2 bits, so its low 4 bits are zero: one of `AQgw`.
fn is_valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..21]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        && b"AQgw".contains(&key[21])
}

/// `Sec-WebSocket-Accept` for a client's key.
pub(crate) fn accept_key(key: &[u8]) -> String {
    derive_accept_key(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder()
            .method("GET")
            .uri("/ws")
            .version(Version::HTTP_11);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const GOOD: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "keep-alive, Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn keys_are_16_bytes_of_canonical_base64() {
        for key in [
            "dGhlIHNhbXBsZSBub25jZQ==",
            "AAAAAAAAAAAAAAAAAAAAAA==",
            "/+///////////////////w==",
        ] {
            assert!(is_valid_key(key.as_bytes()), "{key}");
        }
        for key in [
            "dGhlIHNhbXBsZSBub25jZQ",   // no padding
            "dGhlIHNhbXBsZSBub25jZR==", // non-zero trailing bits
            "dGhlIHNhbXBsZSBub25j*Q==", // not the alphabet
            "dGhlIHNhbXBsZSBub25jZQ=A", // bad padding
            "dGhlIHNhbXBsZSBub25jZXk=", // 17 bytes
            "",
        ] {
            assert!(!is_valid_key(key.as_bytes()), "{key}");
        }
    }

    #[test]
    fn valid_handshake() {
        assert!(matches!(classify(&request(&GOOD)), Handshake::Valid(_)));
    }

    #[test]
    fn plain_request_is_not_a_handshake() {
        assert!(matches!(classify(&request(&[])), Handshake::NotWebSocket));
    }

    #[test]
    fn bad_version_is_426_and_bad_key_is_400() {
        let mut h = GOOD;
        h[2] = ("sec-websocket-version", "8");
        assert!(matches!(
            classify(&request(&h)),
            Handshake::Invalid(StatusCode::UPGRADE_REQUIRED, _)
        ));
        let mut h = GOOD;
        h[3] = ("sec-websocket-key", "short");
        assert!(matches!(
            classify(&request(&h)),
            Handshake::Invalid(StatusCode::BAD_REQUEST, _)
        ));
    }
}
