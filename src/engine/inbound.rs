//! Client-to-server frames: parsing, unmasking, validation and message assembly (RFC 6455 5-7).
//!
//! Not tungstenite's codec, for memory: its `FrameCodec` owns a zero-filled read buffer per
//! connection (4 KiB at the smallest useful size), resident for the connection's whole life even
//! while it idles, which alone was over half of brioche's memory per idle socket (benches S4).
//! Here the socket is read into one buffer per worker thread (`connection.rs`) and parsed in
//! place; a connection keeps bytes of its own only while a frame is incomplete, so an idle
//! connection holds none. The rules are the RFC's, checked by Autobahn's cases 1-10 in CI.
//!
//! Limits are enforced from frame headers, before any payload is buffered: a frame or a
//! fragmented message that would exceed `max_payload_length` is refused as soon as its header
//! arrives, so a client can never make the server hold more than the limit.

use bytes::Bytes;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A complete message (or control frame) from the client.
#[derive(Debug, PartialEq)]
pub enum Incoming {
    Text(Utf8Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The client's close frame: its code and reason, or `None` if it carried no code.
    Close(Option<(u16, String)>),
}

/// Why the client's stream was refused; each maps to the close code RFC 6455 asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    Protocol,
    InvalidUtf8,
    TooBig,
}

impl Violation {
    pub fn close_code(self) -> u16 {
        match self {
            Violation::Protocol => 1002,
            Violation::InvalidUtf8 => 1007,
            Violation::TooBig => 1009,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Violation::Protocol => "protocol error",
            Violation::InvalidUtf8 => "invalid UTF-8",
            Violation::TooBig => "message too big",
        }
    }
}

/// Close codes a peer may put on the wire (RFC 6455 7.4.1, the IANA registry up to 1014, and
/// the ranges for libraries and applications). 1005, 1006 and 1015 are reserved for reporting.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A fragmented message being assembled.
struct Fragmented {
    text: bool,
    payload: Vec<u8>,
    /// How much of a text payload is known to be valid UTF-8: each fragment is checked as it
    /// arrives, so invalid text fails at the fragment that breaks it, not at the end.
    checked: usize,
}

pub struct MessageReader {
    max_payload: u64,
    /// The start of a frame that has not fully arrived. Unallocated between frames.
    pending: Vec<u8>,
    /// Boxed: rare, and an idle connection should not carry its space.
    fragmented: Option<Box<Fragmented>>,
    /// A close frame or a violation ended the stream: later bytes are ignored.
    done: bool,
    /// `deliver` asked to stop: `pending` may hold complete frames, parsed by the next `feed`.
    stalled: bool,
}

impl MessageReader {
    pub fn new(max_payload: usize) -> Self {
        Self {
            max_payload: max_payload as u64,
            pending: Vec::new(),
            fragmented: None,
            done: false,
            stalled: false,
        }
    }

    /// The last `feed` stopped early; feed again (even nothing) to go on.
    pub fn stalled(&self) -> bool {
        self.stalled
    }

    /// Bytes held for an incomplete frame or message.
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.pending.len() + self.fragmented.as_ref().map_or(0, |f| f.payload.len())
    }

    /// Parse `data`, the next bytes from the client, handing each complete message to `deliver`
    /// in order. On a violation the messages before it have been delivered and nothing after.
    /// When `deliver` returns false, parsing stops after that message and the rest is kept.
    pub fn feed(
        &mut self,
        data: &[u8],
        deliver: &mut impl FnMut(Incoming) -> bool,
    ) -> Result<(), Violation> {
        if self.done {
            return Ok(());
        }
        self.stalled = false;
        let result = if self.pending.is_empty() {
            let used = self.parse(data, deliver);
            if let Ok(used) = used {
                if used < data.len() && !self.done {
                    self.pending.extend_from_slice(&data[used..]);
                }
            }
            used
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(data);
            let used = self.parse(&pending, deliver);
            if let Ok(used) = used {
                if used < pending.len() && !self.done {
                    pending.drain(..used);
                    self.pending = pending;
                }
            }
            used
        };
        if result.is_err() {
            self.done = true;
            self.pending = Vec::new();
            self.fragmented = None;
        }
        result.map(|_| ())
    }

    /// Parse the complete frames at the start of `data`; how many bytes they took.
    fn parse(
        &mut self,
        data: &[u8],
        deliver: &mut impl FnMut(Incoming) -> bool,
    ) -> Result<usize, Violation> {
        let mut pos = 0;
        while !self.done && !self.stalled {
            let buf = &data[pos..];
            if buf.len() < 2 {
                break;
            }
            let (fin, opcode, masked, len7) = (
                buf[0] & 0x80 != 0,
                buf[0] & 0x0F,
                buf[1] & 0x80 != 0,
                buf[1] & 0x7F,
            );
            // Everything the first two bytes can tell is checked before waiting for more.
            if buf[0] & 0x70 != 0 || !masked {
                // No extension was negotiated, and RFC 6455 5.1 requires clients to mask.
                return Err(Violation::Protocol);
            }
            let control = match opcode {
                OP_CONTINUATION | OP_TEXT | OP_BINARY => false,
                OP_CLOSE | OP_PING | OP_PONG => true,
                _ => return Err(Violation::Protocol),
            };
            if control && (!fin || len7 > 125) {
                return Err(Violation::Protocol);
            }
            match (opcode, &self.fragmented) {
                (OP_CONTINUATION, None) => return Err(Violation::Protocol),
                (OP_TEXT | OP_BINARY, Some(_)) => return Err(Violation::Protocol),
                _ => {}
            }
            let (len, head) = match len7 {
                126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 8),
                127 if buf.len() >= 10 => {
                    let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
                    if len >> 63 != 0 {
                        return Err(Violation::Protocol);
                    }
                    (len, 14)
                }
                126 | 127 => break,
                n => (u64::from(n), 6),
            };
            let so_far = self
                .fragmented
                .as_ref()
                .map_or(0, |f| f.payload.len() as u64);
            if !control && so_far.saturating_add(len) > self.max_payload {
                return Err(Violation::TooBig);
            }
            let len = len as usize;
            if buf.len() < head + len {
                break;
            }
            let key: [u8; 4] = buf[head - 4..head].try_into().expect("4 bytes");
            let payload = &buf[head..head + len];
            pos += head + len;
            self.frame(fin, opcode, payload, key, deliver)?;
        }
        Ok(pos)
    }

    fn frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: &[u8],
        key: [u8; 4],
        deliver: &mut impl FnMut(Incoming) -> bool,
    ) -> Result<(), Violation> {
        match opcode {
            OP_TEXT | OP_BINARY if fin => {
                let mut bytes = Vec::with_capacity(payload.len());
                unmask_into(&mut bytes, payload, key);
                self.stalled |= !deliver(if opcode == OP_TEXT {
                    Incoming::Text(utf8(bytes)?)
                } else {
                    Incoming::Binary(Bytes::from(bytes))
                });
            }
            OP_TEXT | OP_BINARY => {
                let mut message = Box::new(Fragmented {
                    text: opcode == OP_TEXT,
                    payload: Vec::with_capacity(payload.len()),
                    checked: 0,
                });
                unmask_into(&mut message.payload, payload, key);
                message.check_utf8()?;
                self.fragmented = Some(message);
            }
            OP_CONTINUATION => {
                let message = self.fragmented.as_mut().expect("checked by parse");
                unmask_into(&mut message.payload, payload, key);
                message.check_utf8()?;
                if fin {
                    let message = self.fragmented.take().expect("present");
                    self.stalled |= !deliver(if message.text {
                        // Checked fragment by fragment: only a sequence cut at the end is left.
                        if message.checked != message.payload.len() {
                            return Err(Violation::InvalidUtf8);
                        }
                        // SAFETY: `check_utf8` found all of it valid UTF-8.
                        Incoming::Text(unsafe {
                            Utf8Bytes::from_bytes_unchecked(Bytes::from(message.payload))
                        })
                    } else {
                        Incoming::Binary(Bytes::from(message.payload))
                    });
                }
            }
            OP_PING => {
                let mut bytes = Vec::with_capacity(payload.len());
                unmask_into(&mut bytes, payload, key);
                self.stalled |= !deliver(Incoming::Ping(Bytes::from(bytes)));
            }
            OP_PONG => self.stalled |= !deliver(Incoming::Pong),
            OP_CLOSE => {
                let mut bytes = Vec::with_capacity(payload.len());
                unmask_into(&mut bytes, payload, key);
                let close = match bytes.len() {
                    0 => None,
                    1 => return Err(Violation::Protocol),
                    _ => {
                        let code = u16::from_be_bytes([bytes[0], bytes[1]]);
                        if !is_valid_close_code(code) {
                            return Err(Violation::Protocol);
                        }
                        let reason = std::str::from_utf8(&bytes[2..])
                            .map_err(|_| Violation::InvalidUtf8)?
                            .to_owned();
                        Some((code, reason))
                    }
                };
                self.done = true;
                self.stalled |= !deliver(Incoming::Close(close));
            }
            _ => unreachable!("opcodes are checked by parse"),
        }
        Ok(())
    }
}

impl Fragmented {
    fn check_utf8(&mut self) -> Result<(), Violation> {
        if !self.text {
            return Ok(());
        }
        match std::str::from_utf8(&self.payload[self.checked..]) {
            Ok(_) => self.checked = self.payload.len(),
            // Only a sequence cut at the end of the fragment may still be completed by the next.
            Err(e) if e.error_len().is_none() => self.checked += e.valid_up_to(),
            Err(_) => return Err(Violation::InvalidUtf8),
        }
        Ok(())
    }
}

fn utf8(bytes: Vec<u8>) -> Result<Utf8Bytes, Violation> {
    if std::str::from_utf8(&bytes).is_err() {
        return Err(Violation::InvalidUtf8);
    }
    // SAFETY: validated just above.
    Ok(unsafe { Utf8Bytes::from_bytes_unchecked(Bytes::from(bytes)) })
}

/// Append `payload` unmasked with `key` (the payload starts at mask offset 0).
fn unmask_into(out: &mut Vec<u8>, payload: &[u8], key: [u8; 4]) {
    let start = out.len();
    out.extend_from_slice(payload);
    let data = &mut out[start..];
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes((&*chunk).try_into().expect("8 bytes")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&KEY);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
        out
    }

    fn read_all(reader: &mut MessageReader, data: &[u8]) -> (Vec<Incoming>, Result<(), Violation>) {
        let mut got = Vec::new();
        let result = reader.feed(data, &mut |m| {
            got.push(m);
            true
        });
        (got, result)
    }

    fn text(s: &'static str) -> Incoming {
        Incoming::Text(Utf8Bytes::from_static(s))
    }

    #[test]
    fn unmasks_every_length_form() {
        for len in [0usize, 1, 7, 8, 9, 125, 126, 300, 65_535, 65_536, 70_001] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut reader = MessageReader::new(1 << 20);
            let (got, result) = read_all(&mut reader, &frame(0x82, &payload));
            assert_eq!(result, Ok(()));
            assert_eq!(
                got,
                vec![Incoming::Binary(Bytes::from(payload))],
                "len {len}"
            );
            assert_eq!(reader.buffered(), 0);
        }
    }

    #[test]
    fn frames_split_anywhere_come_out_whole_and_in_order() {
        let stream = [
            frame(0x81, b"hello"),
            frame(0x01, "h\u{e9}".as_bytes()),
            frame(0x89, b"p"),
            frame(0x80, b"llo"),
            frame(0x82, &[9; 200]),
        ]
        .concat();
        for step in [1, 2, 3, 5, 13, stream.len()] {
            let mut reader = MessageReader::new(1000);
            let mut got = Vec::new();
            for chunk in stream.chunks(step) {
                reader
                    .feed(chunk, &mut |m| {
                        got.push(m);
                        true
                    })
                    .unwrap();
            }
            assert_eq!(
                got,
                vec![
                    text("hello"),
                    Incoming::Ping(Bytes::from_static(b"p")),
                    text("h\u{e9}llo"),
                    Incoming::Binary(Bytes::from(vec![9; 200])),
                ],
                "step {step}"
            );
            assert_eq!(reader.buffered(), 0, "nothing held between frames");
            assert_eq!(reader.pending.capacity(), 0, "and nothing allocated");
        }
    }

    #[test]
    fn protocol_violations() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked", vec![0x81, 0x01, b'a']),
            ("rsv1", frame(0xC1, b"a")),
            ("reserved opcode", frame(0x83, b"")),
            ("reserved control opcode", frame(0x8B, b"")),
            ("fragmented ping", frame(0x09, b"")),
            ("long ping", frame(0x89, &[0; 126])),
            ("continuation first", frame(0x80, b"a")),
            (
                "text inside a fragmented message",
                [frame(0x01, b"a"), frame(0x81, b"b")].concat(),
            ),
            ("one-byte close", frame(0x88, &[3])),
            ("close code 1005", frame(0x88, &1005u16.to_be_bytes())),
            ("close code 999", frame(0x88, &999u16.to_be_bytes())),
            ("close code 5000", frame(0x88, &5000u16.to_be_bytes())),
        ];
        for (name, data) in cases {
            let mut reader = MessageReader::new(1000);
            assert_eq!(
                read_all(&mut reader, &data).1,
                Err(Violation::Protocol),
                "{name}"
            );
        }
    }

    #[test]
    fn close_codes_follow_the_registry() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999,
        ] {
            assert!(is_valid_close_code(code), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert!(!is_valid_close_code(code), "{code}");
        }
    }

    #[test]
    fn close_ends_the_stream() {
        let mut payload = 1001u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let data = [
            frame(0x81, b"a"),
            frame(0x88, &payload),
            frame(0x81, b"late"),
        ]
        .concat();
        let mut reader = MessageReader::new(1000);
        let (got, result) = read_all(&mut reader, &data);
        assert_eq!(result, Ok(()));
        assert_eq!(
            got,
            vec![text("a"), Incoming::Close(Some((1001, "bye".into())))]
        );
        assert_eq!(read_all(&mut reader, &frame(0x81, b"x")).0, vec![]);
    }

    #[test]
    fn invalid_utf8_fails_at_the_fragment_that_breaks_it() {
        let mut reader = MessageReader::new(1000);
        // A sequence cut between fragments is fine ...
        let (got, result) = read_all(&mut reader, &frame(0x01, &[b'a', 0xC3]));
        assert_eq!((got, result), (vec![], Ok(())));
        assert_eq!(
            read_all(&mut reader, &frame(0x80, &[0xA9])).0,
            vec![text("a\u{e9}")]
        );
        // ... a byte that can never be valid fails before the message ends.
        let mut reader = MessageReader::new(1000);
        assert_eq!(
            read_all(&mut reader, &frame(0x01, &[b'a', 0xFF])).1,
            Err(Violation::InvalidUtf8)
        );
        // An unfinished sequence at the end of the message fails when it ends.
        let mut reader = MessageReader::new(1000);
        let data = [frame(0x01, b"a"), frame(0x80, &[0xC3])].concat();
        assert_eq!(read_all(&mut reader, &data).1, Err(Violation::InvalidUtf8));
        let mut reader = MessageReader::new(1000);
        assert_eq!(
            read_all(&mut reader, &frame(0x81, &[0xED, 0xA0, 0x80])).1,
            Err(Violation::InvalidUtf8),
            "surrogates are not UTF-8"
        );
        let mut reader = MessageReader::new(1000);
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.push(0xFF);
        assert_eq!(
            read_all(&mut reader, &frame(0x88, &close)).1,
            Err(Violation::InvalidUtf8)
        );
    }

    #[test]
    fn messages_before_a_violation_are_delivered() {
        let data = [frame(0x81, b"a"), frame(0x81, b"b"), vec![0x81, 0x01, b'c']].concat();
        let mut reader = MessageReader::new(1000);
        let (got, result) = read_all(&mut reader, &data);
        assert_eq!(got, vec![text("a"), text("b")]);
        assert_eq!(result, Err(Violation::Protocol));
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_from_its_header() {
        let mut reader = MessageReader::new(1000);
        let data = frame(0x82, &[0; 1001]);
        assert_eq!(read_all(&mut reader, &data[..4]).1, Err(Violation::TooBig));
        let mut reader = MessageReader::new(1000);
        assert_eq!(read_all(&mut reader, &frame(0x82, &[0; 1000])).1, Ok(()));
    }

    #[test]
    fn the_fragment_that_takes_a_message_over_the_limit_is_refused_from_its_header() {
        let mut reader = MessageReader::new(1000);
        let stream = [frame(0x02, &[0; 600]), frame(0x89, b"")].concat();
        assert_eq!(read_all(&mut reader, &stream).1, Ok(()));
        let next = frame(0x80, &[0; 401]);
        assert_eq!(read_all(&mut reader, &next[..8]).1, Err(Violation::TooBig));
        // Within the limit, even byte by byte, and the next message starts from zero.
        let mut reader = MessageReader::new(1000);
        let stream = [
            frame(0x02, &[0; 400]),
            frame(0x80, &[0; 600]),
            frame(0x82, &[0; 1000]),
        ]
        .concat();
        let mut count = 0;
        for byte in stream.chunks(1) {
            reader
                .feed(byte, &mut |_| {
                    count += 1;
                    true
                })
                .unwrap();
        }
        assert_eq!(count, 2);
    }

    #[test]
    fn a_stalled_reader_keeps_the_rest_until_fed_again() {
        let data = [frame(0x81, b"a"), frame(0x81, b"b"), frame(0x81, b"c")].concat();
        let mut reader = MessageReader::new(1000);
        let mut got = Vec::new();
        let mut take_one = |m| {
            got.push(m);
            false
        };
        reader.feed(&data, &mut take_one).unwrap();
        assert!(reader.stalled());
        reader.feed(&[], &mut take_one).unwrap();
        let (rest, result) = read_all(&mut reader, &[]);
        assert_eq!(result, Ok(()));
        assert_eq!(got, vec![text("a"), text("b")]);
        assert_eq!(rest, vec![text("c")]);
        assert!(!reader.stalled());
        assert_eq!(reader.buffered(), 0);
    }

    #[test]
    fn a_64_bit_length_with_the_top_bit_is_refused() {
        let mut data = vec![0x82, 0x80 | 127];
        data.extend_from_slice(&(1u64 << 63).to_be_bytes());
        let mut reader = MessageReader::new(16 << 20);
        assert_eq!(read_all(&mut reader, &data).1, Err(Violation::Protocol));
    }
}
