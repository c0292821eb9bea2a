//! Header values as text: ISO-8859-1 both ways, one character per byte.
//!
//! HTTP gives header values no charset; bytes 0x80 and above are `obs-text` (RFC 9110 §5.5).
//! Bun's `Headers` (a Fetch `ByteString`) and `websockets` read them as ISO-8859-1, and so does
//! WSGI: every byte reaches Python as one character and `value.encode("latin-1")` gives the
//! bytes back, where reading them as UTF-8 replaced what was not UTF-8 with U+FFFD. A response's
//! values are written the same way, so a value read from a request can be sent back as it came.

use hyper::header::HeaderValue;

/// One character per byte, U+0000 to U+00FF.
pub(crate) fn decode(value: &HeaderValue) -> String {
    let bytes = value.as_bytes();
    if bytes.is_ascii() {
        // The common case: ASCII is already UTF-8, one copy and no per-character work.
        return String::from_utf8(bytes.to_vec()).expect("ASCII is UTF-8");
    }
    bytes.iter().copied().map(char::from).collect()
}

/// One byte per character; `None` for a character above U+00FF, or for an ASCII control
/// character other than tab (which would end or split the header line). U+0080 to U+009F are
/// sent as the bytes 0x80 to 0x9F, `obs-text` like the rest above 0x7F.
pub(crate) fn encode(value: &str) -> Option<HeaderValue> {
    if value.is_ascii() {
        return HeaderValue::from_str(value).ok();
    }
    let bytes = value
        .chars()
        .map(|c| u8::try_from(u32::from(c)).ok())
        .collect::<Option<Vec<u8>>>()?;
    HeaderValue::from_bytes(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_reads_as_its_own_character_and_writes_back() {
        let bytes: Vec<u8> = (0x20..=0xFF).filter(|&b| b != 0x7F).collect();
        let value = HeaderValue::from_bytes(&bytes).unwrap();
        let text = decode(&value);
        assert_eq!(text.chars().count(), bytes.len());
        assert_eq!(text.chars().last(), Some('\u{FF}'));
        assert_eq!(encode(&text).unwrap().as_bytes(), &bytes[..]);
    }

    #[test]
    fn utf8_bytes_read_as_one_character_each() {
        let value = HeaderValue::from_bytes("café".as_bytes()).unwrap();
        assert_eq!(decode(&value), "cafÃ©");
        assert_eq!(decode(&HeaderValue::from_static("plain")), "plain");
    }

    #[test]
    fn what_one_byte_cannot_carry_or_would_break_the_line_is_refused() {
        assert_eq!(encode("é").unwrap().as_bytes(), b"\xe9");
        assert!(encode("✓").is_none());
        assert!(encode("a\r\nb").is_none());
        assert!(encode("é\n").is_none());
        assert_eq!(encode("a\tb").unwrap().as_bytes(), b"a\tb");
    }
}
