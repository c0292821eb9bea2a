//! Client-to-server frames: parsing, unmasking, validation and message assembly (RFC 6455 5-7).
//!
//! Not tungstenite's codec, for memory: its `FrameCodec` owns a zero-filled read buffer per
//! connection (4 KiB at the smallest useful size), resident for the connection's whole life even
//! while it idles, which alone was over half of brioche's memory per idle socket when brioche
//! used it. Here the socket is read into one buffer per worker thread (`task.rs`) and parsed in
//! place, and a connection keeps only what it has not handed on yet:
//!
//! - between messages, nothing on the heap: at most the start of a header (14 bytes) that has
//!   not all arrived, kept inline;
//! - a message in one frame that arrived whole: nothing kept; it is unmasked from the read
//!   buffer into a buffer of its size, handed on as it is;
//! - a message still arriving (or sent in fragments): its buffer, reserved from its frames'
//!   headers up to 4 MiB (or three times what has come) ahead of what has come
//!   (`reserve_ahead`: a header's length is not trusted with memory), and at most 1 MiB more
//!   than they declared when the fragments are many and small (`reserve_fragment`); each piece
//!   is unmasked into it as it arrives, and the whole is handed on as it is (`Bytes::from`),
//!   with no copy. While a large part of a frame is still to come, the socket is read straight
//!   into that buffer (`direct_room`) and unmasked there. A binary
//!   message in one frame is the exception, and so is a large text one (`MASKED_TEXT_MIN`): it
//!   stays masked and is handed on with its key (`MaskedBytes`), to be unmasked by the copy
//!   that hands it to Python (`engine/mask.rs`), which checks the text's UTF-8 too;
//! - while the loop is behind (the connection's in-flight caps are reached and `deliver` asks to
//!   stop): the rest of that read, unparsed, copied aside until the loop catches up.
//!
//! The rules are the RFC's, checked by Autobahn's cases 1-10 in CI.
//!
//! Limits are enforced from frame headers, before any payload is buffered: a frame or a
//! fragmented message that would exceed `max_payload_length` is refused as soon as its header
//! arrives, so a client can never make the server hold more than the limit. Text is validated
//! as it arrives: invalid UTF-8 fails at the byte that makes it invalid, inside a frame too
//! (but for a frame of `MASKED_TEXT_MIN` or more, checked on the loop thread once it has come).

use std::mem::MaybeUninit;

use bytes::Bytes;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::engine::mask::{copy_unmasked, unmask_in_place, MaskedBytes};

use super::deflate::{DeflateParams, InflateError, Inflater};
use super::protocol::{
    is_control, is_valid_close_code, Violation, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING,
    OP_PONG, OP_TEXT,
};

/// A complete message (or control frame) from the client.
#[derive(Debug)]
pub(crate) enum Incoming {
    Text(Utf8Bytes),
    /// A text message in one frame of `MASKED_TEXT_MIN` bytes or more, still masked and its
    /// UTF-8 not checked: the copy that makes Python's `str` unmasks and checks it in one pass,
    /// and that check failing refuses the stream with 1007 from there.
    MaskedText(MaskedBytes),
    Binary(MaskedBytes),
    Ping(Bytes),
    Pong(Bytes),
    /// The client's close frame: its code and reason, or `None` if it carried no code.
    Close(Option<(u16, String)>),
}

/// The same message, whatever its form: a text still masked (`MaskedText`) equals the `Text`
/// it unmasks to, as `MaskedBytes` are equal whatever their masks. (For tests.)
impl PartialEq for Incoming {
    fn eq(&self, other: &Self) -> bool {
        use Incoming::*;
        match (self, other) {
            (Text(a), Text(b)) => a == b,
            (MaskedText(a), MaskedText(b)) | (Binary(a), Binary(b)) => a == b,
            (Text(text), MaskedText(masked)) | (MaskedText(masked), Text(text)) => {
                masked.clone().into_bytes() == text.as_bytes()
            }
            (Ping(a), Ping(b)) | (Pong(a), Pong(b)) => a == b,
            (Close(a), Close(b)) => a == b,
            _ => false,
        }
    }
}

thread_local! {
    /// A compressed message that arrived in one read is unmasked here, then inflated into a
    /// buffer of its own: the compressed bytes need no allocation per message.
    static INFLATE_INPUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most `INFLATE_INPUT` keeps between messages.
const INFLATE_INPUT_KEEP: usize = 256 * 1024;

/// A text frame (a whole message, not compressed) at least this long is kept masked and
/// unchecked (`Incoming::MaskedText`): the worker's unmasking and check were passes of their
/// own over it, and the loop's copy into a `str` now does both (benches/PROFILE.md measured the
/// 1 MiB echo 1.18x faster, 64 KiB 1.12x). Below it, text is checked as it arrives, so invalid
/// UTF-8 fails at the read that brings it (Autobahn 6.4 sends its invalid text in small frames,
/// in pieces, and wants that); a large frame with invalid UTF-8 is refused once it has all
/// come, having held no more than a valid one of its size.
pub(crate) const MASKED_TEXT_MIN: usize = 64 * 1024;

/// A compressed message this small is inflated whatever the server-wide budget says: deflate
/// inflates at most about 1032:1, so it cannot come to more than `budget::PAUSE_FLOOR` (64 KiB),
/// below which a connection is read anyway. Small messages (a chat, a heartbeat) keep flowing
/// on a compressed connection while large ones wait, as on a plain one.
const ALWAYS_INFLATED: usize = super::budget::PAUSE_FLOOR / 1032;

/// The longest frame header: 2 bytes, a 64-bit length and the mask key.
const MAX_HEAD: usize = 14;

/// How much a fragmented message's buffer may grow by at once beyond what was declared, when
/// its fragments are small (`reserve_fragment`).
const GROWTH_STEP: usize = 1 << 20;

/// The most a message's buffer reserves ahead of the bytes that have come, or three times as
/// much as have come if that is more (`room_ahead`). A frame's declared length is only a
/// promise: reserved whole from the header, 500 clients each declaring 16 MiB and sending one
/// byte took 8 GB of the server's address space (commit charge, which a strict overcommit
/// policy refuses other allocations for) while the budget counted 500 bytes.
///
/// 4 MiB is glibc's mmap threshold here (`py/malloc.rs`): a message of up to 4 MiB is still
/// reserved once, from its header, and read straight into place, as before; a larger one
/// starts as a mapping of its own, which the kernel moves rather than copies as it grows, so
/// none is ever copied. Starting from 1 MiB, every message over it had its first MiB copied
/// as it grew, and that block stayed resident in an arena (eight 16 MiB frames at once peaked
/// 7 MiB higher).
const RESERVE_AHEAD: usize = 4 << 20;

/// How far ahead of `received` bytes a message's buffer may reserve (`RESERVE_AHEAD`).
fn room_ahead(received: usize) -> usize {
    RESERVE_AHEAD.max(received.saturating_mul(3))
}

/// A frame header, checked.
struct Header {
    fin: bool,
    opcode: u8,
    /// RSV1 on a message's first frame: the message is compressed (permessage-deflate).
    compressed: bool,
    len: usize,
    key: [u8; 4],
    /// The header's own length.
    size: usize,
}

/// A data message being received, from its first frame's header to its last frame's end.
struct Message {
    text: bool,
    /// Its payload is deflated: checked and handed on once inflated, at its end.
    compressed: bool,
    /// The payload so far, unmasked unless `mask` says otherwise. Reserved from the headers,
    /// and handed on as it is.
    payload: Vec<u8>,
    /// How much of a text payload is known to be valid UTF-8: checked as bytes arrive, so
    /// invalid text fails at the byte that breaks it, not at the end of its frame or message.
    checked: usize,
    /// A binary message in one frame (not compressed) is kept as it came, masked with this
    /// key, and handed on masked (`MaskedBytes`): the copy into Python's `bytes` unmasks it
    /// in the same pass, where unmasking here would be a pass of its own over a payload that,
    /// when large, has left the cache by then. So is a large text one (`MASKED_TEXT_MIN`),
    /// unchecked.
    mask: Option<[u8; 4]>,
}

/// A frame whose header has arrived and whose payload has not, or not all of it.
struct Receiving {
    opcode: u8,
    fin: bool,
    /// The mask key as it stands for the next byte (rotated by the bytes that came before).
    key: [u8; 4],
    remaining: usize,
    /// A control frame's payload (at most 125 bytes); a data frame's goes to its message.
    control: Vec<u8>,
}

/// What a connection keeps between reads while a frame or message is incomplete. Boxed: an
/// idle connection should not carry its space.
#[derive(Default)]
struct Partial {
    message: Option<Message>,
    frame: Option<Receiving>,
    /// Bytes `deliver` left unparsed when it asked to stop.
    rest: Vec<u8>,
}

pub(crate) struct MessageReader {
    max_payload: u64,
    /// A frame or message that has not fully arrived. `None` between messages.
    partial: Option<Box<Partial>>,
    /// The start of a frame header that has not fully arrived.
    head: [u8; MAX_HEAD],
    head_len: u8,
    /// A close frame or a violation ended the stream: later bytes are ignored.
    done: bool,
    /// `deliver` asked to stop: what was left unparsed is parsed by the next `feed`.
    stalled: bool,
    /// permessage-deflate was negotiated: its decompressor. Boxed, as most connections have none.
    inflating: Option<Box<Inflating>>,
}

/// A connection's inflating side, with what the server-wide budget lets it inflate.
struct Inflating {
    inflater: Inflater,
    /// What this feed may still inflate: the room left in the server's budget when it began,
    /// less what it inflated since (`None`: none). A compressed message of 16 KiB can inflate
    /// to `max_payload`: inflated regardless, a thousand clients each holding one would hold
    /// gigabytes under a budget of megabytes, while holding too little to be paused by it.
    room: Option<usize>,
    /// `partial.message` is a compressed message that has all arrived, waiting for room in the
    /// budget to be inflated.
    awaiting: bool,
}

impl MessageReader {
    pub(crate) fn new(max_payload: usize) -> Self {
        Self {
            max_payload: max_payload as u64,
            partial: None,
            head: [0; MAX_HEAD],
            head_len: 0,
            done: false,
            stalled: false,
            inflating: None,
        }
    }

    /// How much the next `feed` may inflate (`None`: nothing, the budget is spent). A message
    /// is inflated while any of it is left, so one feed overruns it by at most one message.
    /// `room` is asked only of a connection that negotiated permessage-deflate.
    pub(crate) fn set_inflate_room(&mut self, room: impl FnOnce() -> Option<usize>) {
        if let Some(inflating) = &mut self.inflating {
            inflating.room = room();
        }
    }

    /// A compressed message waits for room in the budget before it is inflated.
    pub(crate) fn awaiting_inflation(&self) -> bool {
        self.inflating.as_ref().is_some_and(|i| i.awaiting)
    }

    /// Whether a compressed message of `len` bytes that has all arrived must wait to be
    /// inflated.
    fn must_wait_to_inflate(&self, len: usize) -> bool {
        len > ALWAYS_INFLATED && self.no_room_to_inflate()
    }

    fn no_room_to_inflate(&self) -> bool {
        self.inflating.as_ref().is_some_and(|i| i.room.is_none())
    }

    /// Accept compressed messages (RSV1) as negotiated.
    pub(crate) fn inflate_with(&mut self, params: &DeflateParams) {
        self.inflating = Some(Box::new(Inflating {
            inflater: Inflater::new(params),
            room: Some(usize::MAX),
            awaiting: false,
        }));
    }

    /// The last `feed` stopped early; feed again (even nothing) to go on.
    pub(crate) fn stalled(&self) -> bool {
        self.stalled
    }

    /// Bytes held for an incomplete frame or message: what the server-wide budget counts.
    pub(crate) fn buffered(&self) -> usize {
        usize::from(self.head_len)
            + self.partial.as_ref().map_or(0, |p| {
                p.message.as_ref().map_or(0, |m| m.payload.len())
                    + p.frame.as_ref().map_or(0, |f| f.control.len())
                    + p.rest.len()
            })
    }

    /// Heap bytes held for an incomplete frame or message (the buffers' capacities).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| {
            p.message.as_ref().map_or(0, |m| m.payload.capacity())
                + p.frame.as_ref().map_or(0, |f| f.control.capacity())
                + p.rest.capacity()
        })
    }

    /// Where the bytes of the message being received are.
    #[cfg(test)]
    fn message_buffer(&self) -> *const u8 {
        self.message()
            .map_or(std::ptr::null(), |m| m.payload.as_ptr())
    }

    /// Whether a frame or message has started to arrive and has not all arrived.
    pub(crate) fn receiving(&self) -> bool {
        self.head_len > 0
            || self
                .partial
                .as_ref()
                .is_some_and(|p| p.message.is_some() || p.frame.is_some())
    }

    /// Give up on the stream (its message took too long): drop what is held, ignore the rest.
    pub(crate) fn abandon(&mut self) {
        self.done = true;
        self.stalled = false;
        if let Some(inflating) = &mut self.inflating {
            inflating.awaiting = false;
        }
        self.partial = None;
        self.head_len = 0;
    }

    fn message(&self) -> Option<&Message> {
        self.partial.as_ref().and_then(|p| p.message.as_ref())
    }

    /// Parse `data`, the next bytes from the client, handing each complete message to `deliver`
    /// in order. On a violation the messages before it have been delivered and nothing after.
    /// When `deliver` returns false, parsing stops after that message and the rest is kept.
    pub(crate) fn feed(
        &mut self,
        data: &[u8],
        deliver: &mut impl FnMut(Incoming) -> bool,
    ) -> Result<(), Violation> {
        self.stalled = false;
        if self.done {
            return Ok(());
        }
        let rest = match &mut self.partial {
            Some(partial) => std::mem::take(&mut partial.rest),
            None => Vec::new(),
        };
        let result = if rest.is_empty() {
            let used = self.parse(data, deliver);
            if let Ok(used) = used {
                if used < data.len() && !self.done {
                    let partial = self.partial.get_or_insert_with(Box::default);
                    partial.rest.extend_from_slice(&data[used..]);
                }
            }
            used
        } else {
            let mut rest = rest;
            rest.extend_from_slice(data);
            let used = self.parse(&rest, deliver);
            if let Ok(used) = used {
                if used < rest.len() && !self.done {
                    rest.drain(..used);
                    self.partial.get_or_insert_with(Box::default).rest = rest;
                }
            }
            used
        };
        self.settle(result.map(|_| ()))
    }

    /// The room the next bytes of a large data frame may be read straight into: the spare room
    /// of its message's buffer, up to the frame's end or `max`. Only while at least `min` of the
    /// frame is still to come and nothing else is pending (no unparsed rest, not stalled): the
    /// socket's next bytes are then all this frame's, and reading them here saves copying them
    /// out of the worker's read buffer, the one copy whose destination is out of the cache.
    pub(crate) fn direct_room(&mut self, min: usize, max: usize) -> Option<&mut [MaybeUninit<u8>]> {
        if self.done || self.stalled {
            return None;
        }
        let partial = self.partial.as_mut()?;
        let frame = partial.frame.as_ref()?;
        if frame.remaining < min || !partial.rest.is_empty() || is_control(frame.opcode) {
            return None;
        }
        let message = partial.message.as_mut()?;
        // Refused room is refused again, as a violation, by the copy that reads on (`receive`).
        reserve_ahead(&mut message.payload, frame.remaining, min).ok()?;
        let spare = message.payload.spare_capacity_mut();
        let room = frame.remaining.min(max).min(spare.len());
        Some(&mut spare[..room])
    }

    /// `n` bytes (more than 0) were read into the room `direct_room` gave: unmask them where they
    /// are (unless the message is kept masked) and go on as `feed` would, delivering the message
    /// if they end it.
    pub(crate) fn direct_received(
        &mut self,
        n: usize,
        deliver: &mut impl FnMut(Incoming) -> bool,
    ) -> Result<(), Violation> {
        let partial = self.partial.as_mut().expect("direct_room gave room");
        let frame = partial.frame.as_ref().expect("direct_room gave room");
        let message = partial.message.as_mut().expect("direct_room gave room");
        assert!(n <= frame.remaining && n <= message.payload.spare_capacity_mut().len());
        let start = message.payload.len();
        // SAFETY: the caller's read initialised the first `n` bytes of the spare room (checked
        // above to be within the capacity).
        unsafe { message.payload.set_len(start + n) };
        if message.mask.is_none() {
            unmask_in_place(&mut message.payload[start..], frame.key);
        }
        let result = message.check_utf8().and_then(|()| self.advance(n, deliver));
        self.settle(result)
    }

    /// After parsing: a violation or a close ends the stream; a connection between messages
    /// keeps nothing on the heap.
    fn settle(&mut self, result: Result<(), Violation>) -> Result<(), Violation> {
        if result.is_err() || self.done {
            self.done = true;
            self.partial = None;
            self.head_len = 0;
        } else if self
            .partial
            .as_ref()
            .is_some_and(|p| p.message.is_none() && p.frame.is_none() && p.rest.is_empty())
        {
            self.partial = None;
        }
        result
    }

    /// Parse `data` up to its end, or up to where a message stopped it; how many bytes it took.
    fn parse(
        &mut self,
        data: &[u8],
        deliver: &mut impl FnMut(Incoming) -> bool,
    ) -> Result<usize, Violation> {
        let mut pos = 0;
        if self.awaiting_inflation() {
            if self.no_room_to_inflate() {
                self.stalled = true;
                return Ok(0);
            }
            self.inflating.as_mut().expect("awaiting").awaiting = false;
            let partial = self.partial.as_mut().expect("the message waits in it");
            let message = partial.message.take().expect("the message waits in it");
            let message = self.inflate(message.text, &message.payload)?;
            self.stalled |= !deliver(message);
        } else if self.partial.as_ref().is_some_and(|p| p.frame.is_some()) {
            pos = self.receive(data, deliver)?;
        }
        while !self.done && !self.stalled {
            if pos == data.len() {
                break;
            }
            let (header, used) = if self.head_len == 0 {
                match self.header(&data[pos..])? {
                    Some(header) => {
                        let size = header.size;
                        (header, size)
                    }
                    None => {
                        self.keep_head(&data[pos..]);
                        return Ok(data.len());
                    }
                }
            } else {
                let held = usize::from(self.head_len);
                let take = (MAX_HEAD - held).min(data.len() - pos);
                let mut head = self.head;
                head[held..held + take].copy_from_slice(&data[pos..pos + take]);
                match self.header(&head[..held + take])? {
                    Some(header) => {
                        self.head_len = 0;
                        let size = header.size - held;
                        (header, size)
                    }
                    None => {
                        // Short of a whole header: `take` was all of `data` that was left.
                        self.keep_head(&head[..held + take]);
                        return Ok(data.len());
                    }
                }
            };
            pos += used;
            // A control frame, or a message in one frame (`header` refused a text or binary
            // frame inside a fragmented message), that is all there.
            let whole = header.len <= data.len() - pos
                && (is_control(header.opcode) || header.fin && header.opcode != OP_CONTINUATION);
            if whole {
                let payload = &data[pos..pos + header.len];
                pos += header.len;
                self.whole_frame(&header, payload, deliver)?;
            } else {
                // Received into its message's buffer (or a control frame's) from here on; what
                // is not there yet, by the next reads.
                self.start(&header)?;
                pos += self.receive(&data[pos..], deliver)?;
            }
        }
        Ok(pos)
    }

    fn keep_head(&mut self, start: &[u8]) {
        self.head[..start.len()].copy_from_slice(start);
        self.head_len = start.len() as u8;
    }

    /// The header at the start of `buf`, or `None` if it has not all arrived. Everything the
    /// bytes that did arrive can tell is checked before waiting for more: the length against
    /// the limit too, before the mask key.
    #[inline(always)]
    fn header(&self, buf: &[u8]) -> Result<Option<Header>, Violation> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (fin, opcode, masked, len7) = (
            buf[0] & 0x80 != 0,
            buf[0] & 0x0F,
            buf[1] & 0x80 != 0,
            buf[1] & 0x7F,
        );
        let mut compressed = false;
        if buf[0] & 0x70 != 0 || !masked {
            // RFC 6455 5.1 requires clients to mask. The only extension is permessage-deflate:
            // RSV1 on the first frame of a data message, once negotiated (RFC 7692 6.1).
            compressed = masked
                && buf[0] & 0x70 == 0x40
                && self.inflating.is_some()
                && matches!(opcode, OP_TEXT | OP_BINARY);
            if !compressed {
                return Err(Violation::Protocol);
            }
        }
        let control = match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY => false,
            OP_CLOSE | OP_PING | OP_PONG => true,
            _ => return Err(Violation::Protocol),
        };
        if control && (!fin || len7 > 125) {
            return Err(Violation::Protocol);
        }
        let message = self.message();
        match (opcode, message) {
            (OP_CONTINUATION, None) | (OP_TEXT | OP_BINARY, Some(_)) => {
                return Err(Violation::Protocol)
            }
            _ => {}
        }
        let (len, size) = match len7 {
            126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 8),
            127 if buf.len() >= 10 => {
                let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(Violation::Protocol);
                }
                (len, 14)
            }
            126 | 127 => return Ok(None),
            n => (u64::from(n), 6),
        };
        let so_far = message.map_or(0, |m| m.payload.len() as u64);
        if !control && so_far.saturating_add(len) > self.max_payload {
            return Err(Violation::TooBig);
        }
        if buf.len() < size {
            return Ok(None);
        }
        Ok(Some(Header {
            fin,
            opcode,
            compressed,
            // At most `max_payload` (a usize) for data frames, 125 for control frames.
            len: len as usize,
            key: buf[size - 4..size].try_into().expect("4 bytes"),
            size,
        }))
    }

    /// A control frame, or a message in one frame, that is all in the read buffer.
    fn whole_frame(
        &mut self,
        header: &Header,
        payload: &[u8],
        deliver: &mut impl FnMut(Incoming) -> bool,
    ) -> Result<(), Violation> {
        if header.compressed && self.must_wait_to_inflate(payload.len()) {
            let mut kept = Vec::with_capacity(payload.len());
            copy_unmasked(&mut kept, payload, header.key);
            self.wait_to_inflate(Message {
                text: header.opcode == OP_TEXT,
                compressed: true,
                payload: kept,
                checked: 0,
                mask: None,
            });
            return Ok(());
        }
        if header.compressed {
            let message = INFLATE_INPUT.with(|input| {
                let mut input = input.borrow_mut();
                input.clear();
                copy_unmasked(&mut input, payload, header.key);
                let message = self.inflate(header.opcode == OP_TEXT, &input);
                if input.capacity() > INFLATE_INPUT_KEEP {
                    // A large one-off: the thread does not keep its size.
                    *input = Vec::new();
                }
                message
            })?;
            self.stalled |= !deliver(message);
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(payload.len());
        copy_unmasked(&mut bytes, payload, header.key);
        let message = match header.opcode {
            OP_TEXT => Incoming::Text(utf8(bytes)?),
            OP_BINARY => Incoming::Binary(Bytes::from(bytes).into()),
            opcode => return self.control(opcode, bytes, deliver),
        };
        self.stalled |= !deliver(message);
        Ok(())
    }

    /// A frame whose payload is still to come: make room for it (all of it, up to
    /// `RESERVE_AHEAD`). The room is reserved before the bytes arrive: if the allocator refuses
    /// it (a strict overcommit policy, say), the message is refused as too big rather than the
    /// process aborted.
    fn start(&mut self, header: &Header) -> Result<(), Violation> {
        let limit = self.max_payload as usize;
        let partial = self.partial.get_or_insert_with(Box::default);
        let mut control = Vec::new();
        if is_control(header.opcode) {
            control = Vec::with_capacity(header.len);
        } else if let Some(message) = &mut partial.message {
            let ahead = header.len.min(room_ahead(message.payload.len()));
            reserve_fragment(&mut message.payload, ahead, limit)?;
        } else {
            let mut payload = Vec::new();
            payload
                .try_reserve_exact(header.len.min(RESERVE_AHEAD))
                .map_err(|_| Violation::TooBig)?;
            let whole = header.fin && !header.compressed;
            let keep_masked = whole
                && (header.opcode == OP_BINARY
                    || (header.opcode == OP_TEXT && header.len >= MASKED_TEXT_MIN));
            partial.message = Some(Message {
                text: header.opcode == OP_TEXT,
                compressed: header.compressed,
                payload,
                checked: 0,
                mask: keep_masked.then_some(header.key),
            });
        }
        partial.frame = Some(Receiving {
            opcode: header.opcode,
            fin: header.fin,
            key: header.key,
            remaining: header.len,
            control,
        });
        Ok(())
    }

    /// The next bytes of the frame being received, from the start of `data`; how many it took.
    fn receive(
        &mut self,
        data: &[u8],
        deliver: &mut impl FnMut(Incoming) -> bool,
    ) -> Result<usize, Violation> {
        let partial = self.partial.as_mut().expect("a frame is being received");
        let frame = partial.frame.as_mut().expect("a frame is being received");
        let n = frame.remaining.min(data.len());
        if is_control(frame.opcode) {
            copy_unmasked(&mut frame.control, &data[..n], frame.key);
        } else {
            let message = partial
                .message
                .as_mut()
                .expect("started with its first frame");
            reserve_ahead(&mut message.payload, frame.remaining, n)?;
            if message.mask.is_some() {
                message.payload.extend_from_slice(&data[..n]);
            } else {
                copy_unmasked(&mut message.payload, &data[..n], frame.key);
                message.check_utf8()?;
            }
        }
        self.advance(n, deliver)?;
        Ok(n)
    }

    /// `n` more bytes of the frame being received are in place: move its key and count on, and
    /// finish the frame (and its message, if it was the last) once all have come.
    fn advance(
        &mut self,
        n: usize,
        deliver: &mut impl FnMut(Incoming) -> bool,
    ) -> Result<(), Violation> {
        let partial = self.partial.as_mut().expect("a frame is being received");
        let frame = partial.frame.as_mut().expect("a frame is being received");
        frame.key.rotate_left(n % 4);
        frame.remaining -= n;
        if frame.remaining > 0 {
            return Ok(());
        }
        let frame = partial.frame.take().expect("present");
        if is_control(frame.opcode) {
            self.control(frame.opcode, frame.control, deliver)?;
        } else if frame.fin {
            let message = partial.message.take().expect("present");
            let message = if !message.compressed {
                message.finish()?
            } else if self.must_wait_to_inflate(message.payload.len()) {
                self.wait_to_inflate(message);
                return Ok(());
            } else {
                self.inflate(message.text, &message.payload)?
            };
            self.stalled |= !deliver(message);
        }
        Ok(())
    }

    /// Keep a compressed message that has all arrived until the budget has room to inflate it;
    /// parsing stops here, and the connection's task pauses until then.
    fn wait_to_inflate(&mut self, message: Message) {
        self.partial.get_or_insert_with(Box::default).message = Some(message);
        self.inflating
            .as_mut()
            .expect("only negotiated RSV1 gets here")
            .awaiting = true;
        self.stalled = true;
    }

    /// A compressed message's payload, inflated and checked: the limit holds on what it inflates
    /// to, and text is valid UTF-8 once inflated.
    fn inflate(&mut self, text: bool, payload: &[u8]) -> Result<Incoming, Violation> {
        let inflating = self
            .inflating
            .as_mut()
            .expect("only negotiated RSV1 gets here");
        let bytes = inflating
            .inflater
            .inflate(payload, self.max_payload as usize)
            .map_err(|e| match e {
                InflateError::TooBig => Violation::TooBig,
                InflateError::Invalid => Violation::BadDeflate,
            })?;
        inflating.room = inflating
            .room
            .and_then(|room| room.checked_sub(bytes.len()));
        Ok(if text {
            Incoming::Text(utf8(bytes)?)
        } else {
            Incoming::Binary(Bytes::from(bytes).into())
        })
    }

    /// A complete control frame, `payload` unmasked.
    fn control(
        &mut self,
        opcode: u8,
        payload: Vec<u8>,
        deliver: &mut impl FnMut(Incoming) -> bool,
    ) -> Result<(), Violation> {
        let message = match opcode {
            OP_PING => Incoming::Ping(Bytes::from(payload)),
            OP_PONG => Incoming::Pong(Bytes::from(payload)),
            OP_CLOSE => {
                let close = match payload.len() {
                    0 => None,
                    1 => return Err(Violation::Protocol),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !is_valid_close_code(code) {
                            return Err(Violation::Protocol);
                        }
                        let reason = std::str::from_utf8(&payload[2..])
                            .map_err(|_| Violation::InvalidUtf8)?
                            .to_owned();
                        Some((code, reason))
                    }
                };
                self.done = true;
                Incoming::Close(close)
            }
            _ => unreachable!("opcodes are checked by header"),
        };
        self.stalled |= !deliver(message);
        Ok(())
    }
}

impl Message {
    fn check_utf8(&mut self) -> Result<(), Violation> {
        if !self.text || self.compressed || self.mask.is_some() {
            return Ok(());
        }
        // simdutf8's `compat` says where invalid bytes start, as std's does (see `utf8`).
        match simdutf8::compat::from_utf8(&self.payload[self.checked..]) {
            Ok(_) => self.checked = self.payload.len(),
            // Only a sequence cut at the end of what arrived may still be completed.
            Err(e) if e.error_len().is_none() => self.checked += e.valid_up_to(),
            Err(_) => return Err(Violation::InvalidUtf8),
        }
        Ok(())
    }

    /// The whole message, in the buffer it was received into.
    fn finish(self) -> Result<Incoming, Violation> {
        if !self.text {
            let key = self.mask.unwrap_or_default();
            return Ok(Incoming::Binary(MaskedBytes::masked(
                Bytes::from(self.payload),
                key,
            )));
        }
        if let Some(key) = self.mask {
            return Ok(Incoming::MaskedText(MaskedBytes::masked(
                Bytes::from(self.payload),
                key,
            )));
        }
        // Checked as it arrived: only a sequence cut at the very end can be left.
        if self.checked != self.payload.len() {
            return Err(Violation::InvalidUtf8);
        }
        // SAFETY: `check_utf8` found all of it valid UTF-8.
        Ok(Incoming::Text(unsafe {
            Utf8Bytes::from_bytes_unchecked(Bytes::from(self.payload))
        }))
    }
}

/// Make room in a fragmented message's buffer for a fragment of `additional` bytes: exactly
/// what its header declares, unless the fragment is small next to the message (under an eighth
/// of its buffer). Growing by exactly that at each of many small fragments would move the whole
/// buffer, and copy it, at every one of them (a 4 MiB message in 64-byte fragments, Autobahn
/// 9.3.1, made 65,536 reallocations). So the buffer then grows by its own size up to 1 MiB, and
/// by 1 MiB (a sixteenth of it past 16 MiB) after that, never past the limit: each
/// reallocation is paid for by a fragment of at least an eighth of it or grows it by at least a
/// sixteenth, so copies stay linear, and a message holds at most 1 MiB it did not declare (a
/// sixteenth of it past 16 MiB).
fn reserve_fragment(buf: &mut Vec<u8>, additional: usize, limit: usize) -> Result<(), Violation> {
    let needed = buf.len() + additional;
    let capacity = buf.capacity();
    if needed <= capacity {
        return Ok(());
    }
    let target = if additional >= capacity / 8 {
        needed
    } else {
        let step = capacity.min(GROWTH_STEP.max(capacity / 16));
        needed.max((capacity + step).min(limit))
    };
    buf.try_reserve_exact(target - buf.len())
        .map_err(|_| Violation::TooBig)
}

/// Make room for at least `at_least` more bytes of a frame with `remaining` still to come, if
/// there is not that much already: all that remains if it is within `room_ahead`, otherwise
/// that much. The buffer then grows at most fourfold at a time, and never holds more than four
/// times what has come plus `RESERVE_AHEAD`.
fn reserve_ahead(buf: &mut Vec<u8>, remaining: usize, at_least: usize) -> Result<(), Violation> {
    if buf.capacity() - buf.len() >= at_least {
        return Ok(());
    }
    let ahead = remaining.min(room_ahead(buf.len())).max(at_least);
    buf.try_reserve_exact(ahead).map_err(|_| Violation::TooBig)
}

fn utf8(bytes: Vec<u8>) -> Result<Utf8Bytes, Violation> {
    // simdutf8 (SIMD chosen at run time) checks 1 MiB of ASCII at 54 GB/s against std's 20,
    // and mixed text at 8.6 against 0.9; under 64 bytes std's is as fast or faster (32 ASCII
    // bytes: 7.4 ns against 8.9), and most messages are that small.
    let valid = if bytes.len() < 64 {
        std::str::from_utf8(&bytes).is_ok()
    } else {
        simdutf8::basic::from_utf8(&bytes).is_ok()
    };
    if !valid {
        return Err(Violation::InvalidUtf8);
    }
    // SAFETY: validated just above.
    Ok(unsafe { Utf8Bytes::from_bytes_unchecked(Bytes::from(bytes)) })
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

    fn text_of(s: &str) -> Incoming {
        Incoming::Text(s.to_owned().into())
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
                vec![Incoming::Binary(Bytes::from(payload).into())],
                "len {len}"
            );
            assert_eq!(reader.buffered(), 0);
        }
    }

    fn deflate_params() -> DeflateParams {
        DeflateParams {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        }
    }

    #[test]
    fn rsv1_is_a_compressed_message_only_once_negotiated() {
        use crate::engine::ws::deflate::Deflater;
        let text = "{\"user\":\"alice\",\"text\":\"h\u{e9}llo\"}".repeat(300);
        let mut deflater = Deflater::new(15, false);
        let (mut first, mut second) = (Vec::new(), Vec::new());
        deflater.compress(text.as_bytes(), &mut first);
        deflater.compress(text.as_bytes(), &mut second);
        // Whole, then fragmented (RSV1 on the first frame only), a ping in between; in pieces.
        let stream = [
            frame(0xC1, &first),
            frame(0x41, &second[..3]),
            frame(0x89, b"p"),
            frame(0x80, &second[3..]),
            frame(0x82, b"plain"),
        ]
        .concat();
        for step in [1, 7, 4096] {
            let mut reader = MessageReader::new(1 << 20);
            reader.inflate_with(&deflate_params());
            let (got, result) = feed_in_pieces(&mut reader, &stream, step, |_, _| {});
            assert_eq!(result, Ok(()));
            assert_eq!(
                got,
                vec![
                    text_of(&text),
                    Incoming::Ping(Bytes::from_static(b"p")),
                    text_of(&text),
                    Incoming::Binary(Bytes::from_static(b"plain").into()),
                ],
                "step {step}"
            );
        }
        // Not negotiated, on a continuation, on a control frame, RSV2 or RSV3: refused.
        let mut reader = MessageReader::new(1 << 20);
        assert_eq!(
            read_all(&mut reader, &frame(0xC1, &first)).1,
            Err(Violation::Protocol)
        );
        for bad in [
            [frame(0x41, &first), frame(0xC0, b"")].concat(),
            frame(0xC9, b""),
            frame(0xA1, &first),
            frame(0x91, &first),
        ] {
            let mut reader = MessageReader::new(1 << 20);
            reader.inflate_with(&deflate_params());
            assert_eq!(read_all(&mut reader, &bad).1, Err(Violation::Protocol));
        }
        // The limit holds on the inflated size.
        let mut reader = MessageReader::new(text.len() - 1);
        reader.inflate_with(&deflate_params());
        assert_eq!(
            read_all(&mut reader, &frame(0xC1, &first)).1,
            Err(Violation::TooBig)
        );
    }

    #[test]
    fn a_compressed_message_waits_for_room_to_inflate() {
        use crate::engine::ws::deflate::Deflater;
        let long = "x".repeat(100_000);
        let mut deflater = Deflater::new(15, true);
        let mut deflated = Vec::new();
        deflater.compress(long.as_bytes(), &mut deflated);
        // Whole in one read, then fragmented across reads, then after a message that used up
        // the room of the read it came in.
        let whole = frame(0xC1, &deflated);
        let fragmented = [frame(0x41, &deflated[..10]), frame(0x80, &deflated[10..])].concat();
        for (stream, split) in [(&whole, whole.len()), (&fragmented, 12)] {
            let mut reader = MessageReader::new(1 << 20);
            reader.inflate_with(&deflate_params());
            reader.set_inflate_room(|| None);
            let (got, result) = read_all(&mut reader, &stream[..split]);
            assert_eq!((got, result), (vec![], Ok(())));
            let (got, result) = read_all(&mut reader, &stream[split..]);
            assert_eq!((got, result), (vec![], Ok(())));
            assert!(reader.awaiting_inflation() && reader.stalled());
            assert!(
                reader.buffered() < 1_000,
                "it holds the compressed bytes only"
            );
            // Fed again while the budget is still spent: still waiting, nothing lost.
            let (got, _) = read_all(&mut reader, &[]);
            assert!(got.is_empty() && reader.awaiting_inflation());
            reader.set_inflate_room(|| Some(0));
            let (got, result) = read_all(&mut reader, &[]);
            assert_eq!((got, result), (vec![text_of(&long)], Ok(())));
            assert!(!reader.awaiting_inflation() && !reader.stalled());
        }
        // A small one is inflated all the same: it cannot inflate past the budget's floor.
        let mut small = Vec::new();
        deflater.compress(b"hi", &mut small);
        let mut reader = MessageReader::new(1 << 20);
        reader.inflate_with(&deflate_params());
        reader.set_inflate_room(|| None);
        let (got, result) = read_all(&mut reader, &frame(0xC1, &small));
        assert_eq!((got, result), (vec![text("hi")], Ok(())));
        let mut reader = MessageReader::new(1 << 20);
        reader.inflate_with(&deflate_params());
        reader.set_inflate_room(|| Some(long.len() - 1));
        let two = [whole.clone(), whole.clone(), frame(0x81, b"after")].concat();
        let (got, result) = read_all(&mut reader, &two);
        assert_eq!((got, result), (vec![text_of(&long)], Ok(())));
        assert!(reader.awaiting_inflation());
        reader.set_inflate_room(|| Some(usize::MAX));
        let (got, result) = read_all(&mut reader, &[]);
        assert_eq!((got, result), (vec![text_of(&long), text("after")], Ok(())));
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
                    Incoming::Binary(Bytes::from(vec![9; 200]).into()),
                ],
                "step {step}"
            );
            assert_eq!(reader.buffered(), 0, "nothing held between frames");
            assert!(reader.partial.is_none(), "and nothing allocated");
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

    /// Read `data` as the connection task does: into a read buffer of `step` bytes, or straight
    /// into the message's buffer whenever `direct_room(min, max)` offers room.
    fn read_like_a_socket(
        reader: &mut MessageReader,
        data: &[u8],
        step: usize,
        (min, max): (usize, usize),
    ) -> (Vec<Incoming>, Result<(), Violation>, usize) {
        let mut got = Vec::new();
        let (mut pos, mut direct) = (0, 0);
        while pos < data.len() {
            let mut deliver = |m| {
                got.push(m);
                true
            };
            let result = if let Some(room) = reader.direct_room(min, max) {
                let n = room.len().min(data.len() - pos);
                for (slot, byte) in room.iter_mut().zip(&data[pos..pos + n]) {
                    slot.write(*byte);
                }
                pos += n;
                direct += n;
                reader.direct_received(n, &mut deliver)
            } else {
                let n = step.min(data.len() - pos);
                pos += n;
                reader.feed(&data[pos - n..pos], &mut deliver)
            };
            if result.is_err() {
                return (got, result, direct);
            }
        }
        (got, Ok(()), direct)
    }

    #[test]
    fn large_frames_read_straight_into_their_message_come_out_the_same() {
        let big: Vec<u8> = (0..200_003u32).map(|i| (i * 7 % 251) as u8).collect();
        let text: String = "héllo wörld ✓ ".repeat(9_000);
        let mut stream = frame(0x82, &big);
        stream.extend(frame(0x81, text.as_bytes()));
        // A fragmented message, large pieces, a ping between them.
        stream.extend(frame(0x02, &big[..100_001]));
        stream.extend(frame(0x89, b"ping"));
        stream.extend(frame(0x80, &big[100_001..]));
        stream.extend(frame(0x81, b"after"));
        let (expected, result) = read_all(&mut MessageReader::new(1 << 20), &stream);
        assert_eq!(result, Ok(()));
        assert_eq!(expected.len(), 5);
        for (step, min, max) in [
            (65_536, 32_768, 1 << 20),
            (4_096, 1, 7),
            (1_000, 10, 65_536),
        ] {
            let mut reader = MessageReader::new(1 << 20);
            let (got, result, direct) = read_like_a_socket(&mut reader, &stream, step, (min, max));
            assert_eq!(result, Ok(()), "step {step}, room {min}-{max}");
            assert_eq!(got, expected, "step {step}, room {min}-{max}");
            assert!(
                direct > 250_000,
                "step {step}: only {direct} bytes read straight in"
            );
            assert!(!reader.receiving() && reader.held() == 0);
        }
    }

    #[test]
    fn a_frame_s_declared_length_is_reserved_only_as_its_bytes_come() {
        // One byte of a frame that declares 16 MiB, then of a fragment that does.
        let mut reader = MessageReader::new(16 << 20);
        let mut declared = frame(0x82, &[9]);
        declared.splice(1..2, [0xFF]);
        declared.splice(2..2, ((16u64 << 20) - 1).to_be_bytes());
        reader.feed(&declared, &mut |_| true).unwrap();
        assert_eq!(reader.held(), 4 << 20);
        let mut reader = MessageReader::new(32 << 20);
        let mut fragment = frame(0x00, &[9]);
        fragment.splice(1..2, [0xFF]);
        fragment.splice(2..2, ((16u64 << 20) - 1).to_be_bytes());
        let mut stream = frame(0x02, &[1; 3 << 20]);
        stream.extend_from_slice(&fragment);
        reader.feed(&stream, &mut |_| true).unwrap();
        assert_eq!(reader.held(), (3 << 20) + (9 << 20));

        // A 17 MiB frame that all comes: whole and intact, in a buffer never more than four
        // times what has come plus 4 MiB, reserved three times (4, 16, then all 17 MiB and a
        // bit), both
        // ways of reading.
        let big: Vec<u8> = (0..(17 << 20) + 12_345u32)
            .map(|i| (i * 13 % 251) as u8)
            .collect();
        let stream = frame(0x82, &big);
        for (min, max) in [(32_768, 1 << 20), (usize::MAX, 0)] {
            let mut reader = MessageReader::new(32 << 20);
            let (mut pos, mut growths, mut last) = (0, 0, 0);
            let mut got = Vec::new();
            while pos < stream.len() {
                let mut deliver = |m| {
                    got.push(m);
                    true
                };
                if let Some(room) = reader.direct_room(min, max) {
                    let n = room.len().min(stream.len() - pos);
                    for (slot, byte) in room.iter_mut().zip(&stream[pos..pos + n]) {
                        slot.write(*byte);
                    }
                    pos += n;
                    reader.direct_received(n, &mut deliver).unwrap();
                } else {
                    let n = 65_536.min(stream.len() - pos);
                    pos += n;
                    reader.feed(&stream[pos - n..pos], &mut deliver).unwrap();
                }
                let held = reader.held();
                assert!(held <= 4 * pos + RESERVE_AHEAD, "{held} held after {pos}");
                if held != last && held != 0 {
                    (growths, last) = (growths + 1, held);
                }
            }
            assert_eq!(growths, 3, "reservations, from {min}");
            assert_eq!(got, vec![Incoming::Binary(Bytes::from(big.clone()).into())]);
        }
    }

    #[test]
    fn invalid_utf8_read_straight_in_fails_where_it_is() {
        // Under `MASKED_TEXT_MIN`: a larger frame is checked on the loop thread.
        let mut text = "a".repeat(60_000).into_bytes();
        text[40_000] = 0xFF;
        let mut stream = frame(0x82, b"first");
        stream.extend(frame(0x81, &text));
        let mut reader = MessageReader::new(1 << 20);
        let (got, result, direct) = read_like_a_socket(&mut reader, &stream, 8_192, (1, 16_384));
        assert_eq!(
            got,
            vec![Incoming::Binary(Bytes::from_static(b"first").into())]
        );
        assert_eq!(result, Err(Violation::InvalidUtf8));
        // It failed in the read that brought byte 40,000 (reads of 16 KiB), not at the frame's end.
        assert!(direct < 40_000 + 16_384, "{direct}");
        assert!(reader.direct_room(1, 1).is_none() && !reader.receiving());
    }

    /// Feed `data` in pieces of `step` bytes, calling `check(reader, bytes fed so far)` after
    /// each; the messages delivered and the first error.
    fn feed_in_pieces(
        reader: &mut MessageReader,
        data: &[u8],
        step: usize,
        mut check: impl FnMut(&MessageReader, usize),
    ) -> (Vec<Incoming>, Result<(), Violation>) {
        let mut got = Vec::new();
        let mut fed = 0;
        for piece in data.chunks(step) {
            let result = reader.feed(piece, &mut |m| {
                got.push(m);
                true
            });
            fed += piece.len();
            if result.is_err() {
                return (got, result);
            }
            check(reader, fed);
        }
        (got, Ok(()))
    }

    fn pointer(message: &Incoming) -> *const u8 {
        match message {
            Incoming::Text(text) => text.as_str().as_ptr(),
            Incoming::Binary(data) | Incoming::MaskedText(data) => data.as_ptr(),
            Incoming::Ping(data) => data.as_ptr(),
            _ => std::ptr::null(),
        }
    }

    #[test]
    fn a_frame_arriving_in_pieces_is_received_into_one_buffer_of_its_size() {
        // Multibyte characters, so that pieces cut sequences too.
        let text = "ab\u{e9}\u{20ac}\u{1f950}".repeat(9_000);
        let binary: Vec<u8> = (0..70_001u32).map(|i| (i * 31) as u8).collect();
        for (first, payload) in [(0x81u8, text.as_bytes()), (0x82, &binary[..])] {
            let data = frame(first, payload);
            let head = data.len() - payload.len();
            for step in [1, 3, 1000, 4093, 65_536] {
                let mut reader = MessageReader::new(1 << 20);
                let mut buffer = std::ptr::null();
                let (got, result) = feed_in_pieces(&mut reader, &data, step, |reader, fed| {
                    if fed < head {
                        // (disabled)
                    } else if fed < data.len() {
                        // Reserved once, from the header: capacity == length, no doubling.
                        assert_eq!(reader.held(), payload.len(), "step {step}, fed {fed}");
                        buffer = reader.message_buffer();
                    }
                });
                assert_eq!(result, Ok(()));
                let expected = if first == 0x81 {
                    Incoming::Text(text.clone().into())
                } else {
                    Incoming::Binary(Bytes::from(binary.clone()).into())
                };
                assert_eq!(got, vec![expected], "step {step}");
                // Handed on as it was received: no copy at the end.
                assert_eq!(pointer(&got[0]), buffer, "step {step}");
                assert_eq!(reader.held(), 0);
            }
        }
    }

    #[test]
    fn a_binary_message_in_one_frame_stays_masked_until_it_is_copied_out() {
        let binary: Vec<u8> = (0..70_001u32).map(|i| (i * 31) as u8).collect();
        let mut fragmented = frame(0x02, &binary[..30_001]);
        fragmented.extend(frame(0x80, &binary[30_001..]));
        let mut direct = MessageReader::new(1 << 20);
        let (from_direct, result, _) =
            read_like_a_socket(&mut direct, &frame(0x82, &binary), 4_096, (1, 16_384));
        assert_eq!(result, Ok(()));
        for (what, data, step, masked) in [
            ("one frame, in pieces", frame(0x82, &binary), 4_093, true),
            (
                "one frame, in one read",
                frame(0x82, &binary),
                1 << 20,
                false,
            ),
            ("fragmented", fragmented, 4_093, false),
        ] {
            let mut reader = MessageReader::new(1 << 20);
            let (got, result) = feed_in_pieces(&mut reader, &data, step, |_, _| {});
            assert_eq!(result, Ok(()));
            let [Incoming::Binary(payload)] = &got[..] else {
                panic!("{what}: {got:?}")
            };
            assert_eq!(payload.as_unmasked().is_none(), masked, "{what}");
            assert_eq!(payload.clone().into_bytes(), binary, "{what}");
        }
        let [Incoming::Binary(payload)] = &from_direct[..] else {
            panic!("read straight in: {from_direct:?}")
        };
        assert!(payload.as_unmasked().is_none(), "read straight in");
        assert_eq!(payload.clone().into_bytes(), binary, "read straight in");
    }

    #[test]
    fn fragments_reserve_no_more_than_their_headers_declare() {
        let text = "\u{e9}t\u{e9}\u{1f950}".repeat(30_000);
        let bytes = text.as_bytes();
        // Cuts inside characters; a ping between two fragments.
        let (a, b) = (100_001, 200_003);
        let frames = [
            (frame(0x01, &bytes[..a]), a),
            (frame(0x89, b"mid"), 0),
            (frame(0x00, &bytes[a..b]), b - a),
            (frame(0x80, &bytes[b..]), bytes.len() - b),
        ];
        // Where each data frame's header has fully arrived, and the length it declares.
        let mut stream = Vec::new();
        let mut declared_at = Vec::new();
        for (data, len) in &frames {
            let payload = if *len == 0 { 3 } else { *len };
            declared_at.push((stream.len() + data.len() - payload, *len));
            stream.extend_from_slice(data);
        }
        for step in [1, 997, 65_536] {
            let mut reader = MessageReader::new(1 << 20);
            let mut buffer = std::ptr::null();
            let (got, result) = feed_in_pieces(&mut reader, &stream, step, |reader, fed| {
                let declared: usize = declared_at
                    .iter()
                    .filter(|(at, _)| *at <= fed)
                    .map(|(_, len)| len)
                    .sum();
                // The ping's 3 bytes, while it is incomplete.
                assert!(
                    reader.held() <= declared + 3,
                    "step {step}, fed {fed}: {} held, {declared} declared",
                    reader.held()
                );
                if fed < stream.len() {
                    buffer = reader.message_buffer();
                }
            });
            assert_eq!(result, Ok(()));
            assert_eq!(
                got,
                vec![
                    Incoming::Ping(Bytes::from_static(b"mid")),
                    Incoming::Text(text.clone().into())
                ],
                "step {step}"
            );
            assert_eq!(pointer(&got[1]), buffer, "step {step}: no copy at the end");
            assert_eq!(reader.held(), 0);
        }
    }

    #[test]
    fn many_small_fragments_grow_the_buffer_a_few_times_by_at_most_1_mib() {
        // 4 MiB in 64-byte fragments (Autobahn 9.3.1). Growing by exactly each fragment would
        // move the buffer, and copy all of it, up to 65,536 times.
        let fragment = [7u8; 64];
        let count = (4 << 20) / fragment.len();
        let mut reader = MessageReader::new(16 << 20);
        let (mut growths, mut last) = (0, 0);
        let mut got = Vec::new();
        for i in 0..count {
            let first = match i {
                0 => 0x02,
                i if i == count - 1 => 0x80,
                _ => 0x00,
            };
            reader
                .feed(&frame(first, &fragment), &mut |m| {
                    got.push(m);
                    true
                })
                .unwrap();
            if i < count - 1 {
                let (declared, held) = ((i + 1) * fragment.len(), reader.held());
                assert!(held >= declared && held <= declared + declared.min(1 << 20));
                if held != last {
                    (growths, last) = (growths + 1, held);
                }
            }
        }
        assert!(growths <= 24, "{growths} growths");
        assert_eq!(
            got,
            vec![Incoming::Binary(Bytes::from(vec![7; 4 << 20]).into())]
        );
    }

    #[test]
    fn a_large_text_frame_is_handed_on_masked_and_unchecked() {
        // From `MASKED_TEXT_MIN` on, a text message in one frame is kept as it came and handed on
        // masked, invalid UTF-8 and all: the loop's copy into a `str` checks it. One byte under,
        // or in fragments, it is checked here and fails at the bad byte.
        let len = MASKED_TEXT_MIN;
        let mut payload = "a".repeat(len).into_bytes();
        payload[len / 2] = 0xFF;
        let mut fragmented = frame(0x01, &payload[..len / 4]);
        fragmented.extend(frame(0x80, &payload[len / 4..]));
        let under = frame(0x81, &payload[..len - 1]);
        for step in [4096, 65_536] {
            let mut reader = MessageReader::new(1 << 20);
            let (got, result) =
                feed_in_pieces(&mut reader, &frame(0x81, &payload), step, |_, _| {});
            assert_eq!(result, Ok(()), "step {step}");
            let [Incoming::MaskedText(masked)] = &got[..] else {
                panic!("step {step}: {got:?}");
            };
            assert!(masked.as_unmasked().is_none(), "still masked");
            assert_eq!(masked.clone().into_bytes(), payload);
            for data in [&fragmented, &under] {
                let mut reader = MessageReader::new(1 << 20);
                let (got, result) = feed_in_pieces(&mut reader, data, step, |_, _| {});
                assert_eq!((got, result), (vec![], Err(Violation::InvalidUtf8)));
            }
        }
    }

    #[test]
    fn invalid_utf8_inside_one_frame_fails_as_it_arrives() {
        // Under `MASKED_TEXT_MIN`: a larger frame is checked on the loop thread.
        let mut payload = "\u{e9}".repeat(30_000).into_bytes();
        payload[40_000] = 0xFF;
        let data = frame(0x81, &payload);
        let bad = data.len() - payload.len() + 40_000;
        // Everything up to the bad byte, in pieces, then the piece with it: it fails there,
        // 20,000 bytes before the frame ends.
        let mut reader = MessageReader::new(1 << 20);
        let (_, result) = feed_in_pieces(&mut reader, &data[..bad], 4096, |_, _| {});
        assert_eq!(result, Ok(()));
        let piece = &data[bad..bad + 100];
        assert_eq!(read_all(&mut reader, piece).1, Err(Violation::InvalidUtf8));
        assert_eq!(reader.held(), 0, "and the buffer is freed");

        // Autobahn 6.4.4: a piece ends with the valid start of a 4-byte sequence, and the next
        // piece is only the byte that makes it invalid.
        let valid = "\u{3ba}\u{1f79}\u{3c3}\u{3bc}\u{3b5}".as_bytes();
        let payload = [valid, &[0xF4, 0x90, 0x80, 0x80], b"edited"].concat();
        let data = frame(0x81, &payload);
        let cut = data.len() - payload.len() + valid.len() + 1;
        let mut reader = MessageReader::new(1000);
        assert_eq!(read_all(&mut reader, &data[..cut]).1, Ok(()));
        assert_eq!(
            read_all(&mut reader, &data[cut..cut + 1]).1,
            Err(Violation::InvalidUtf8)
        );
    }

    /// A small deterministic generator (xorshift), for the splits below.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    #[test]
    fn any_split_and_any_stall_give_the_same_messages() {
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let text = "\u{1f950}x".repeat(14_000);
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"done");
        let stream = [
            frame(0x81, b"hello"),
            frame(0x02, &big[..30_000]),
            frame(0x89, b"ping"),
            frame(0x00, &big[30_000..30_000]),
            frame(0x8A, b"pong"),
            frame(0x80, &big[30_000..]),
            frame(0x81, text.as_bytes()),
            frame(0x01, &text.as_bytes()[..3]),
            frame(0x80, &text.as_bytes()[3..10]),
            frame(0x82, b""),
            frame(0x88, &close),
            frame(0x81, b"ignored"),
        ]
        .concat();
        let expected = vec![
            text_of("hello"),
            Incoming::Ping(Bytes::from_static(b"ping")),
            Incoming::Pong(Bytes::from_static(b"pong")),
            Incoming::Binary(Bytes::from(big.clone()).into()),
            Incoming::Text(text.clone().into()),
            Incoming::Text(text[..10].to_owned().into()),
            Incoming::Binary(Bytes::new().into()),
            Incoming::Close(Some((1000, "done".into()))),
        ];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..200 {
            let mut reader = MessageReader::new(1 << 20);
            let mut got = Vec::new();
            let mut at = 0;
            for turn in 0.. {
                if at == stream.len() && !reader.stalled() {
                    break;
                }
                assert!(turn < 100_000, "round {round}: stalled for good");
                // Pieces from 1 byte to 70 KiB; sometimes nothing, as after a stall.
                let piece = match rng.below(4) {
                    0 => 0,
                    1 => 1 + rng.below(16),
                    _ => 1 + rng.below(70_000),
                }
                .min(stream.len() - at);
                let stall = rng.below(3) == 0;
                reader
                    .feed(&stream[at..at + piece], &mut |m| {
                        got.push(m);
                        !stall
                    })
                    .unwrap();
                at += piece;
            }
            assert_eq!(got, expected, "round {round}");
            assert_eq!(reader.held(), 0, "round {round}");
        }
    }

    /// `cargo test --release parse_speed -- --ignored --nocapture`: 32-byte text messages in
    /// 64 KiB reads (an echo flood's shape, frames cut at read boundaries), and a 16 MiB frame
    /// streamed through the same reads.
    #[test]
    #[ignore]
    fn parse_speed() {
        let small: Vec<u8> = (0..50_000)
            .flat_map(|i| frame(0x81, format!("{i:>32}").as_bytes()))
            .collect();
        let mut reader = MessageReader::new(16 << 20);
        let (mut count, rounds) = (0usize, 200);
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            for piece in small.chunks(64 * 1024) {
                reader
                    .feed(piece, &mut |m| {
                        count += std::hint::black_box(matches!(m, Incoming::Text(_))) as usize;
                        true
                    })
                    .unwrap();
            }
        }
        let elapsed = start.elapsed();
        assert_eq!(count, 50_000 * rounds);
        println!(
            "small: {:.1} ns/message",
            elapsed.as_nanos() as f64 / count as f64
        );
        let big = frame(0x82, &vec![5; 16 << 20]);
        let start = std::time::Instant::now();
        for _ in 0..8 {
            let mut reader = MessageReader::new(16 << 20);
            for piece in big.chunks(64 * 1024) {
                reader
                    .feed(piece, &mut |m| {
                        !matches!(std::hint::black_box(m), Incoming::Pong(_))
                    })
                    .unwrap();
            }
        }
        println!(
            "16 MiB frame in 64 KiB reads: {:.2} GB/s",
            8.0 * big.len() as f64 / start.elapsed().as_secs_f64() / 1e9
        );
        // A direct read's bytes, unmasked where they are (1 MiB, as S7's largest messages).
        let mut buf = vec![5u8; 1 << 20];
        let start = std::time::Instant::now();
        for _ in 0..2_000 {
            unmask_in_place(std::hint::black_box(&mut buf), KEY);
        }
        println!(
            "unmask in place, 1 MiB: {:.2} GB/s",
            2_000.0 * buf.len() as f64 / start.elapsed().as_secs_f64() / 1e9
        );
    }

    #[test]
    fn a_length_beyond_any_address_space_takes_only_the_room_ahead() {
        // Room is reserved as the bytes come (a refusal, at a growth, refuses the message as
        // too big rather than aborting the process): a header alone cannot ask for 1 PiB.
        let mut data = vec![0x82, 0x80 | 127];
        data.extend_from_slice(&(1u64 << 50).to_be_bytes());
        data.extend_from_slice(&KEY);
        let mut reader = MessageReader::new(usize::MAX >> 1);
        assert_eq!(read_all(&mut reader, &data).1, Ok(()));
        assert_eq!(reader.held(), RESERVE_AHEAD);
    }

    #[test]
    fn a_64_bit_length_with_the_top_bit_is_refused() {
        let mut data = vec![0x82, 0x80 | 127];
        data.extend_from_slice(&(1u64 << 63).to_be_bytes());
        let mut reader = MessageReader::new(16 << 20);
        assert_eq!(read_all(&mut reader, &data).1, Err(Violation::Protocol));
    }
}
