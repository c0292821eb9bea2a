//! Deciding whether a request is a WebSocket handshake (RFC 6455 section 4.2.1), and which of
//! its permessage-deflate offers to accept (RFC 7692 section 7.1).

use hyper::header::{
    HeaderMap, HeaderValue, CONNECTION, CONTENT_LENGTH, SEC_WEBSOCKET_EXTENSIONS,
    SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, TRANSFER_ENCODING, UPGRADE,
};
use hyper::{Method, Request, StatusCode, Version};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::engine::config::DeflateConfig;
use crate::engine::ws::deflate::DeflateParams;

pub(crate) enum Handshake {
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

fn given_twice(headers: &HeaderMap, name: hyper::header::HeaderName) -> bool {
    headers.get_all(name).iter().nth(1).is_some()
}

/// Whether `req` asks to become a WebSocket (`Upgrade: websocket`), valid or not. One that is
/// answered with anything but a 101 ends its connection: a proxy that takes the request for
/// the start of a tunnel, whatever the answer, would otherwise pass the client's next bytes
/// to this server as requests of its own ("WebSocket smuggling"). websockets closes too.
pub(crate) fn asks_for_websocket<B>(req: &Request<B>) -> bool {
    has_token(req.headers(), UPGRADE, "websocket")
}

/// Whether a request that `asks_for_websocket` is a valid handshake.
pub(crate) fn classify<B>(req: &Request<B>) -> Handshake {
    let headers = req.headers();
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
    // A GET's body means nothing (RFC 9110 9.3.1), and where a handshake's body ends is where
    // its frames begin: with both lengths given (RFC 9112 6.1), a proxy reading one and this
    // server the other would cut the stream in different places. websockets refuses it too.
    let empty = |value: &HeaderValue| value.as_bytes() == b"0";
    if headers.contains_key(TRANSFER_ENCODING) || !headers.get_all(CONTENT_LENGTH).iter().all(empty)
    {
        return Handshake::Invalid(StatusCode::BAD_REQUEST, "a WebSocket handshake has no body");
    }
    // RFC 6455 11.3.1 and 11.3.5: each at most once in a request. A server that took the first
    // of two keys could answer a key other than the one a client behind a proxy checks.
    if given_twice(headers, SEC_WEBSOCKET_KEY) {
        return Handshake::Invalid(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Key given more than once",
        );
    }
    if given_twice(headers, SEC_WEBSOCKET_VERSION) {
        return Handshake::Invalid(
            StatusCode::BAD_REQUEST,
            "Sec-WebSocket-Version given more than once",
        );
    }
    match headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) {
        Some(b"13") => {}
        Some(_) => {
            return Handshake::Invalid(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported Sec-WebSocket-Version",
            )
        }
        None => {
            return Handshake::Invalid(
                StatusCode::UPGRADE_REQUIRED,
                "missing Sec-WebSocket-Version",
            )
        }
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

/// The first of the client's permessage-deflate offers, in its order, that the server can
/// honour, and the `Sec-WebSocket-Extensions` value that accepts it. Offers it cannot honour are
/// declined (RFC 7692 5: the handshake goes on without compression), never failed:
///
/// - a parameter it does not know, given twice, or with a value where none belongs (or none
///   where one must be): declined, as section 7.1 requires;
/// - `server_max_window_bits=N`: answered with min(N, configured); N = 8 is declined, as zlib
///   cannot compress raw deflate with a 256-byte window;
/// - `server_no_context_takeover`: honoured, and also sent when configured;
/// - `client_max_window_bits[=N]`: answered with min(N, configured) when below 15 (a client's 8
///   is inflated with 9: zlib compresses with 9 when told 8); an offer without it is declined
///   when the configured window is below 15, since the server may then not limit the client's;
/// - `client_no_context_takeover` is sent when configured (the offer's is only a hint).
pub(crate) fn negotiate_deflate(
    headers: &HeaderMap,
    config: &DeflateConfig,
) -> Option<(DeflateParams, HeaderValue)> {
    for value in headers.get_all(SEC_WEBSOCKET_EXTENSIONS) {
        let Ok(value) = value.to_str() else { continue };
        for offer in split_outside_quotes(value, ',') {
            let mut parts = split_outside_quotes(offer, ';').into_iter();
            let name = parts.next().unwrap_or("").trim();
            if !name.eq_ignore_ascii_case("permessage-deflate") {
                continue;
            }
            if let Some(accepted) = accept_offer(parts, config) {
                return Some(accepted);
            }
        }
    }
    None
}

/// `value` cut at each `sep` that is not inside a quoted string.
fn split_outside_quotes(value: &str, sep: char) -> Vec<&str> {
    let mut pieces = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (at, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                pieces.push(&value[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    pieces.push(&value[start..]);
    pieces
}

/// Window bits as RFC 7692 7.1.2 writes them: 8 to 15, digits only (a quoted string allowed).
fn window_bits(value: &str) -> Option<u8> {
    let value = value.trim();
    let value = match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"')?,
        None => value,
    };
    match value.as_bytes() {
        [digit @ b'8'..=b'9'] => Some(digit - b'0'),
        [b'1', digit @ b'0'..=b'5'] => Some(10 + digit - b'0'),
        _ => None,
    }
}

fn accept_offer<'a>(
    params: impl Iterator<Item = &'a str>,
    config: &DeflateConfig,
) -> Option<(DeflateParams, HeaderValue)> {
    let mut server_no_context_takeover = false;
    let mut client_no_context_takeover = false;
    let mut server_bits: Option<u8> = None;
    // Offered at all (`Some`), and with a value.
    let mut client_bits: Option<Option<u8>> = None;
    for param in params {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value)),
            None => (param.trim(), None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("server_no_context_takeover", None) if !server_no_context_takeover => {
                server_no_context_takeover = true
            }
            ("client_no_context_takeover", None) if !client_no_context_takeover => {
                client_no_context_takeover = true
            }
            ("server_max_window_bits", Some(value)) if server_bits.is_none() => {
                server_bits = Some(window_bits(value)?)
            }
            ("client_max_window_bits", value) if client_bits.is_none() => {
                client_bits = Some(match value {
                    Some(value) => Some(window_bits(value)?),
                    None => None,
                })
            }
            _ => return None,
        }
    }
    let server_max_window_bits = match server_bits {
        Some(8) => return None,
        Some(bits) => bits.min(config.server_max_window_bits),
        None => config.server_max_window_bits,
    };
    let client_max_window_bits = match client_bits {
        None if config.client_max_window_bits < 15 => return None,
        None => 15,
        Some(None) => config.client_max_window_bits,
        Some(Some(bits)) => bits.min(config.client_max_window_bits),
    };
    let params = DeflateParams {
        server_no_context_takeover: server_no_context_takeover || config.server_no_context_takeover,
        client_no_context_takeover: config.client_no_context_takeover,
        server_max_window_bits,
        client_max_window_bits,
    };
    let mut response = String::from("permessage-deflate");
    if params.server_no_context_takeover {
        response.push_str("; server_no_context_takeover");
    }
    if params.client_no_context_takeover {
        response.push_str("; client_no_context_takeover");
    }
    if server_bits.is_some() || server_max_window_bits < 15 {
        response.push_str(&format!(
            "; server_max_window_bits={server_max_window_bits}"
        ));
    }
    // Only to a client that offered the parameter (7.1.2.2), and only when it says something.
    if client_bits.is_some() && client_max_window_bits < 15 {
        response.push_str(&format!(
            "; client_max_window_bits={client_max_window_bits}"
        ));
    }
    let header = HeaderValue::from_str(&response).expect("ASCII");
    Some((params, header))
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

    fn negotiate(offers: &[&str], config: DeflateConfig) -> Option<(DeflateParams, String)> {
        let mut headers = HeaderMap::new();
        for offer in offers {
            headers.append(
                SEC_WEBSOCKET_EXTENSIONS,
                HeaderValue::from_str(offer).unwrap(),
            );
        }
        negotiate_deflate(&headers, &config)
            .map(|(params, header)| (params, header.to_str().unwrap().to_owned()))
    }

    fn answer(offers: &[&str]) -> Option<String> {
        negotiate(offers, DeflateConfig::default()).map(|(_, header)| header)
    }

    #[test]
    fn deflate_offers_are_answered_as_rfc_7692_asks() {
        let pmd = "permessage-deflate";
        assert_eq!(answer(&[pmd]).as_deref(), Some(pmd));
        // What Chromium offers.
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"]).as_deref(),
            Some(pmd)
        );
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=10; client_max_window_bits=9"])
                .as_deref(),
            Some("permessage-deflate; server_max_window_bits=10; client_max_window_bits=9")
        );
        assert_eq!(
            answer(&[
                "Permessage-Deflate; Server_No_Context_Takeover; server_max_window_bits=\"12\""
            ])
            .as_deref(),
            Some("permessage-deflate; server_no_context_takeover; server_max_window_bits=12")
        );
        // The first acceptable offer, in the client's order, across headers and lists.
        assert_eq!(
            answer(&[
                "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=8",
                "permessage-deflate; foo, permessage-deflate; server_max_window_bits=9",
                "permessage-deflate",
            ])
            .as_deref(),
            Some("permessage-deflate; server_max_window_bits=9")
        );
    }

    #[test]
    fn deflate_offers_it_cannot_honour_are_declined() {
        for offer in [
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; mystery",
            "x-webkit-deflate-frame",
            "permessage-deflate-x",
        ] {
            assert_eq!(answer(&[offer]), None, "{offer}");
        }
    }

    #[test]
    fn the_configuration_limits_what_is_accepted() {
        let config = DeflateConfig {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 12,
            client_max_window_bits: 9,
        };
        let (params, header) =
            negotiate(&["permessage-deflate; client_max_window_bits"], config).unwrap();
        assert_eq!(
            header,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=12; client_max_window_bits=9"
        );
        assert_eq!(
            params,
            DeflateParams {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: 12,
                client_max_window_bits: 9,
            }
        );
        // The client's window cannot be limited without its client_max_window_bits.
        assert_eq!(negotiate(&["permessage-deflate"], config), None);
        let (params, _) = negotiate(
            &["permessage-deflate; server_max_window_bits=10; client_max_window_bits=15"],
            config,
        )
        .unwrap();
        assert_eq!(
            (params.server_max_window_bits, params.client_max_window_bits),
            (10, 9)
        );
        // A client's own 8 is answered as it is.
        let (params, header) = negotiate(
            &["permessage-deflate; client_max_window_bits=8"],
            DeflateConfig::default(),
        )
        .unwrap();
        assert_eq!(header, "permessage-deflate; client_max_window_bits=8");
        assert_eq!(params.client_max_window_bits, 8);
    }

    #[test]
    fn valid_handshake() {
        assert!(matches!(classify(&request(&GOOD)), Handshake::Valid(_)));
    }

    #[test]
    fn plain_request_is_not_a_handshake() {
        assert!(!asks_for_websocket(&request(&[])));
        assert!(asks_for_websocket(&request(&GOOD)));
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
