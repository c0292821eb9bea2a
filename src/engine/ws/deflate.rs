//! permessage-deflate (RFC 7692): one connection's compressor and decompressor, as negotiated
//! by `http/handshake.rs`.
//!
//! Each message is one raw deflate stream segment ended by a sync flush, whose trailing
//! `00 00 ff ff` is stripped on the wire and appended again before inflating (section 7.2). With
//! context takeover the LZ77 window carries over from one message to the next, so the
//! compressor must see messages in the order they go on the wire: `Conn` holds it under a lock
//! taken around compressing and queueing together.
//!
//! Without context takeover nothing carries over between messages, so a connection holds no zlib
//! state of its own for that direction: each thread keeps one compressor (and decompressor) per
//! window size, which forgets each message after it (a full flush; a reset for the
//! decompressor), used by all such connections (uWS's shared compressor). With context takeover the connection's own state is created on first use and
//! kept: about 256 KiB for a compressor at 15 window bits (`2^(bits+2) + 2^(memLevel+9)`), about
//! 2^bits plus a few KiB for a decompressor. A connection that never sends (or receives) a
//! compressed message holds neither.
//!
//! Compressing goes through flate2; inflating through `raw_inflate.rs` (the same zlib-rs, by
//! its zlib API), which says whether a message's stream ended between blocks.

use std::cell::RefCell;

use flate2::{Compress, Compression, FlushCompress};

#[cfg(test)]
use super::raw_inflate::sync_flushed;
use super::raw_inflate::{RawInflate, Status};

/// What one connection negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DeflateParams {
    /// The server resets its compressor after every message.
    pub(crate) server_no_context_takeover: bool,
    /// The client resets its compressor after every message: so does the server's decompressor.
    pub(crate) client_no_context_takeover: bool,
    /// The window the server compresses with, 9-15.
    pub(crate) server_max_window_bits: u8,
    /// The window the client was allowed, 8-15.
    pub(crate) client_max_window_bits: u8,
}

impl DeflateParams {
    /// Whether the server keeps nothing between messages: a message compressed for one such
    /// connection fits every other with the same server window.
    pub(crate) fn stateless(&self) -> bool {
        self.server_no_context_takeover
    }
}

/// The end of a sync flush: an empty stored block's length and its complement.
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// The tail, then a whole empty stored block: after a message that ends where a sync flush
/// ends, both inflate to nothing. After one cut short, the second is read as data or as codes
/// of the block left open, and comes out as output (or an error): a fixed-Huffman block cut
/// short takes the tail's zeros for its end-of-block code and more, and would otherwise wait,
/// inside a stored block's header, to fail the next message in this one's stead.
const TAIL_CHECKED: [u8; 9] = [0, 0, 0xff, 0xff, 0, 0, 0, 0xff, 0xff];

/// zlib's fastest level, as libwebsockets and uWS's dedicated compressors use: compression runs
/// per message on the sending path. On a 1 KiB JSON message (`deflate_speed` below) level 6
/// took about 4 times as long (14 µs against 3 µs without context takeover) for output 17%
/// smaller (166 bytes against 199).
const LEVEL: u32 = 1;

pub(crate) struct Deflater {
    window_bits: u8,
    reset_each_message: bool,
    stream: Option<Compress>,
}

impl Deflater {
    pub(crate) fn new(window_bits: u8, reset_each_message: bool) -> Self {
        Self {
            window_bits,
            reset_each_message,
            stream: None,
        }
    }

    /// One message's compressed payload, into `out` (cleared first).
    pub(crate) fn compress(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        out.clear();
        if payload.is_empty() {
            // zlib emits nothing for a second sync flush in a row; an empty stored block (the
            // client appends the rest of it) is what an empty message compresses to.
            out.push(0);
            return;
        }
        let bits = self.window_bits.clamp(9, 15);
        let stream = self.stream.get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::new(LEVEL), false, bits)
        });
        out.reserve(payload.len() / 2 + 64);
        // Without context takeover the next message must not refer to this one. A full flush
        // forgets the history (it clears the match finder's hash) for less than a reset, which
        // re-initialises the whole state (at level 6, 14 µs a 1 KiB message instead of 17).
        let flush = if self.reset_each_message {
            FlushCompress::Full
        } else {
            FlushCompress::Sync
        };
        let start = stream.total_in();
        loop {
            let consumed = (stream.total_in() - start) as usize;
            stream
                .compress_vec(&payload[consumed..], out, flush)
                .expect("deflating memory into memory does not fail");
            // The flush is complete once all input is taken and it did not fill the output.
            if (stream.total_in() - start) as usize == payload.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        debug_assert!(out.ends_with(&TAIL));
        out.truncate(out.len().saturating_sub(TAIL.len()));
    }
}

/// Why a compressed message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InflateError {
    /// It inflates past the limit: refused there, the rest never inflated.
    TooBig,
    /// Not a valid deflate stream.
    Invalid,
}

thread_local! {
    /// This thread's compressors and decompressors for messages without context takeover, by
    /// window bits (9-15), created on first use.
    static SHARED_DEFLATERS: RefCell<[Option<Deflater>; 7]> = const { RefCell::new([None, None, None, None, None, None, None]) };
    static SHARED_INFLATERS: RefCell<[Option<RawInflate>; 7]> = const { RefCell::new([None, None, None, None, None, None, None]) };
}

/// Run `f` with this thread's compressor for `bits`, which keeps nothing between messages.
pub(crate) fn with_shared_deflater<R>(bits: u8, f: impl FnOnce(&mut Deflater) -> R) -> R {
    let bits = bits.clamp(9, 15);
    SHARED_DEFLATERS.with(|all| {
        let mut all = all.borrow_mut();
        f(all[usize::from(bits - 9)].get_or_insert_with(|| Deflater::new(bits, true)))
    })
}

pub(crate) struct Inflater {
    window_bits: u8,
    reset_each_message: bool,
    stream: Option<RawInflate>,
}

impl Inflater {
    pub(crate) fn new(params: &DeflateParams) -> Self {
        Self {
            // zlib has no raw deflate with a 256-byte window: a client told 8 compresses with 9.
            window_bits: params.client_max_window_bits.clamp(9, 15),
            reset_each_message: params.client_no_context_takeover,
            stream: None,
        }
    }

    /// Inflate one message's payload; past `limit` bytes of output it stops and refuses it.
    pub(crate) fn inflate(&mut self, input: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
        let bits = self.window_bits;
        if self.reset_each_message {
            return SHARED_INFLATERS.with(|all| {
                let mut all = all.borrow_mut();
                let stream =
                    all[usize::from(bits - 9)].get_or_insert_with(|| RawInflate::new(bits));
                inflate_message(stream, input, limit, true)
            });
        }
        let stream = self.stream.get_or_insert_with(|| RawInflate::new(bits));
        inflate_message(stream, input, limit, false)
    }
}

fn inflate_message(
    stream: &mut RawInflate,
    input: &[u8],
    limit: usize,
    reset: bool,
) -> Result<Vec<u8>, InflateError> {
    if input.is_empty() {
        // Every compressor writes a block, an empty message's too (`00`). The tail alone
        // (`00 00 ff ff`) would open a stored block of 65,280 bytes and leave the stream inside
        // it, to fail the next, valid, message in this one's stead.
        return Err(InflateError::Invalid);
    }
    {
        // A first guess for text: a few times the input, never past the limit.
        let first = input
            .len()
            .saturating_mul(4)
            .clamp(256, 64 * 1024)
            .min(limit.saturating_add(1));
        let mut out = Vec::new();
        out.try_reserve_exact(first)
            .map_err(|_| InflateError::TooBig)?;
        let result = inflate_into(stream, input, &mut out, limit);
        if result.is_err() || reset {
            stream.reset();
        }
        result.map(|()| out)
    }
}

/// Whether `rest`, what follows a final block in a message, is empty stored blocks once the
/// stripped tail is put back: RFC 7692 7.2.3.3's sender that ends each message with a final
/// block leaves the header byte of the empty block whose `00 00 ff ff` it stripped (its
/// example: `f3 48 cd c9 c9 07 00 00`).
fn only_empty_stored_blocks(rest: &[u8]) -> bool {
    if rest.is_empty() {
        return true;
    }
    let mut blocks = rest.iter().chain(&TAIL).copied();
    loop {
        match blocks.next() {
            None => return true,
            // BFINAL and BTYPE 00, the rest of the byte padding; then LEN 0 and NLEN !0.
            Some(0x00 | 0x01) => {
                if !blocks.by_ref().take(4).eq(TAIL) {
                    return false;
                }
            }
            Some(_) => return false,
        }
    }
}

fn inflate_into(
    stream: &mut RawInflate,
    input: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(), InflateError> {
    // The tail completes the empty stored block a sync flush ends with, and so inflates to
    // nothing. What it adds to the output is a message cut short (`TAIL_CHECKED`): inside a
    // stored block, the tail was taken for its data, and the next message would have been too,
    // delivered as garbage.
    let mut before_tail = 0;
    for (index, part) in [input, &TAIL_CHECKED[..]].into_iter().enumerate() {
        if index == 1 {
            before_tail = out.len();
        }
        let mut pos = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() > limit {
                    return Err(InflateError::TooBig);
                }
                // Doubling, but never room for more than one byte past the limit: a bomb is
                // refused once it has produced that byte, whatever it would inflate to.
                let room = out
                    .capacity()
                    .max(4096)
                    .min(limit.saturating_add(1) - out.len());
                out.try_reserve_exact(room)
                    .map_err(|_| InflateError::TooBig)?;
            }
            let (in_before, out_before) = (stream.total_in(), out.len());
            let status = stream
                .decompress_vec(&part[pos..], out)
                .map_err(|_| InflateError::Invalid)?;
            let consumed = (stream.total_in() - in_before) as usize;
            pos += consumed;
            if status == Status::StreamEnd {
                // A final block ends the stream: what follows it (the tail we appended) is not
                // part of it, and the next message starts a new one, as its sender's does.
                stream.reset();
                if index == 0 && !only_empty_stored_blocks(&part[pos..]) {
                    // Bytes of the message after its stream's end: dropping them would deliver
                    // something other than what another reader of the same frames sees.
                    return Err(InflateError::Invalid);
                }
                if index == 1 && out.len() > before_tail {
                    return Err(InflateError::Invalid);
                }
                return if out.len() > limit {
                    Err(InflateError::TooBig)
                } else {
                    Ok(())
                };
            }
            if pos == part.len() && out.len() < out.capacity() {
                break;
            }
            if consumed == 0 && out.len() == out_before {
                return Err(InflateError::Invalid);
            }
        }
    }
    if out.len() > before_tail || !stream.at_block_boundary() {
        // Cut short inside a block's header (a dynamic block's tables): the tail was read as
        // more of the header and gave nothing, and the message's blocks before it would have
        // been delivered as the whole message.
        return Err(InflateError::Invalid);
    }
    if out.len() > limit {
        return Err(InflateError::TooBig);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client's message: `text` sync-flushed, its tail stripped.
    fn message_of(text: &[u8], level: Compression) -> Vec<u8> {
        let mut whole = sync_flushed(text, level);
        whole.truncate(whole.len() - TAIL.len());
        whole
    }

    /// `message` inflated as the first of a stream with context takeover.
    fn inflate_first(message: &[u8]) -> Result<Vec<u8>, InflateError> {
        inflate_message(&mut RawInflate::new(15), message, 1 << 20, false)
    }

    /// `message` cut after `cut` bytes is refused, not inflated as if whole.
    fn assert_cut_is_invalid(message: &[u8], cut: usize) {
        assert_eq!(
            inflate_first(&message[..cut]),
            Err(InflateError::Invalid),
            "cut at {cut} of {}",
            message.len()
        );
    }

    fn params(client_bits: u8, client_reset: bool) -> DeflateParams {
        DeflateParams {
            server_no_context_takeover: false,
            client_no_context_takeover: client_reset,
            server_max_window_bits: 15,
            client_max_window_bits: client_bits,
        }
    }

    #[test]
    fn messages_round_trip_with_and_without_context_takeover() {
        let messages: Vec<Vec<u8>> = vec![
            br#"{"type":"chat","user":"alice","text":"hello"}"#.to_vec(),
            br#"{"type":"chat","user":"alice","text":"hello"}"#.to_vec(),
            Vec::new(),
            (0..100_000u32).map(|i| (i % 7) as u8).collect(),
        ];
        for reset in [false, true] {
            let mut deflater = Deflater::new(15, reset);
            let mut inflater = Inflater::new(&params(15, reset));
            let mut out = Vec::new();
            let mut sizes = Vec::new();
            for message in &messages {
                deflater.compress(message, &mut out);
                assert!(!out.ends_with(&TAIL));
                sizes.push(out.len());
                assert_eq!(&inflater.inflate(&out, 1 << 20).unwrap(), message);
            }
            // With the window kept, a repeated message is a back-reference: a few bytes.
            assert_eq!(sizes[1] < sizes[0] / 3, !reset, "{sizes:?}");
        }
    }

    #[test]
    fn a_bomb_stops_one_byte_past_the_limit() {
        // What a hostile client sends: zeros at zlib's best level, about 1000 to 1.
        let bomb = message_of(&vec![0u8; 10 << 20], Compression::new(9));
        assert!(bomb.len() < 12 * 1024, "{}", bomb.len());
        let mut inflater = Inflater::new(&params(15, false));
        assert_eq!(inflater.inflate(&bomb, 1 << 20), Err(InflateError::TooBig));
        let mut inflater = Inflater::new(&params(15, false));
        assert_eq!(inflater.inflate(&bomb, 10 << 20).unwrap().len(), 10 << 20);
    }

    #[test]
    fn no_data_is_invalid_and_an_empty_message_is_a_block() {
        let mut inflater = Inflater::new(&params(15, false));
        assert_eq!(inflater.inflate(&[], 1000), Err(InflateError::Invalid));
        let mut inflater = Inflater::new(&params(15, false));
        assert_eq!(inflater.inflate(&[0x00], 1000), Ok(Vec::new()));
        assert_eq!(inflater.inflate(&[0x02, 0x00], 1000), Ok(Vec::new()));
    }

    #[test]
    fn garbage_is_invalid() {
        let mut inflater = Inflater::new(&params(15, false));
        assert_eq!(
            inflater.inflate(&[0xff, 0xff, 0xff, 0xff], 1000),
            Err(InflateError::Invalid)
        );
    }

    #[test]
    fn a_final_block_ends_the_stream_and_the_next_message_starts_anew() {
        // What a sender that finishes each message (BFINAL) instead of flushing sends.
        let mut inflater = Inflater::new(&params(15, false));
        for text in [&b"first"[..], b"second"] {
            let mut c = Compress::new_with_window_bits(Compression::new(6), false, 15);
            let mut out = Vec::with_capacity(100);
            c.compress_vec(text, &mut out, FlushCompress::Finish)
                .unwrap();
            assert_eq!(inflater.inflate(&out, 1000).unwrap(), text);
        }
    }

    #[test]
    fn rfc_7692s_final_block_with_its_empty_block_inflates() {
        // RFC 7692 7.2.3.3: "Hello" in a final block, then an empty stored block's header.
        let mut inflater = Inflater::new(&params(15, false));
        let payload = [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00];
        assert_eq!(inflater.inflate(&payload, 1024).unwrap(), b"Hello");
        assert_eq!(inflater.inflate(&payload, 1024).unwrap(), b"Hello");
        // An unstripped tail after it is one more empty block.
        let unstripped = [&payload[..], &[0x00, 0x00, 0xff, 0xff, 0x00]].concat();
        assert_eq!(inflater.inflate(&unstripped, 1024).unwrap(), b"Hello");
    }

    #[test]
    fn bytes_after_a_final_block_are_invalid() {
        let mut c = Compress::new_with_window_bits(Compression::new(6), false, 15);
        let mut whole = Vec::with_capacity(256);
        c.compress_vec(b"hello", &mut whole, FlushCompress::Finish)
            .unwrap();
        let mut inflater = Inflater::new(&params(15, false));
        assert_eq!(inflater.inflate(&whole, 1024).unwrap(), b"hello");
        for trailer in [&b"\xff\xff\xff\xffGARBAGE"[..], &whole[..]] {
            let mut payload = whole.clone();
            payload.extend_from_slice(trailer);
            assert!(matches!(
                inflater.inflate(&payload, 1024),
                Err(InflateError::Invalid)
            ));
            // The stream starts anew for the next message.
            assert_eq!(inflater.inflate(&whole, 1024).unwrap(), b"hello");
        }
    }

    #[test]
    fn a_client_told_8_bits_is_inflated_with_9() {
        let mut deflater = Deflater::new(9, false);
        let text: Vec<u8> = (0..5000u32)
            .map(|i| b"abcdefghij"[(i * i % 10) as usize])
            .collect();
        let mut out = Vec::new();
        deflater.compress(&text, &mut out);
        let mut inflater = Inflater::new(&params(8, false));
        assert_eq!(inflater.inflate(&out, 1 << 20).unwrap(), text);
    }

    #[test]
    fn a_message_cut_short_inside_a_stored_block_is_invalid() {
        // Stored blocks (level 0): a cut one took the tail, and the next message, for its data.
        let message = &message_of(&[b'A'; 1000], Compression::none());
        assert_eq!(inflate_first(message), Ok(vec![b'A'; 1000]));
        assert_cut_is_invalid(message, 505);
    }

    #[test]
    fn a_message_cut_short_is_invalid() {
        // Huffman-coded (fixed codes for a short one, dynamic for a long one), cut at every
        // byte: none may inflate as if whole. Cut inside the dynamic block's header, it inflated
        // to nothing, with no error, and the stream was left in the header, to fail the next
        // message in this one's stead (with context takeover) or to pass unseen (without).
        let short = b"hello world, hello world".to_vec();
        let long: Vec<u8> = (0..3000u32)
            .flat_map(|i| format!("{} ", i * 7919 % 1000).into_bytes())
            .collect();
        for text in [short, long] {
            let message = &message_of(&text, Compression::default());
            assert_eq!(inflate_first(message), Ok(text.clone()));
            for cut in 1..message.len() {
                assert_cut_is_invalid(message, cut);
            }
        }
    }

    #[test]
    fn a_message_of_several_blocks_cut_in_a_later_header_is_invalid() {
        // 200,000 bytes of varied text make several dynamic blocks: cut where a later block
        // starts (and a few bytes into its header), the blocks before it inflated whole, and
        // were delivered as the whole message.
        let text: Vec<u8> = (0..40_000u32)
            .flat_map(|i| format!("{:04} ", i.wrapping_mul(2_654_435_761) % 9973).into_bytes())
            .collect();
        let message = &message_of(&text, Compression::default());
        assert_eq!(inflate_first(message), Ok(text));
        // Where the blocks start: the input consumed when the output stops growing one block's
        // worth at a time is not known from outside, so every cut is tried near the front of
        // each 4 KiB of input, which falls in a later block's header for some.
        let mut cuts = 0;
        for start in (4096..message.len()).step_by(4096) {
            for cut in start..start + 64 {
                assert_cut_is_invalid(message, cut);
                cuts += 1;
            }
        }
        assert!(
            cuts > 1000,
            "{cuts} cuts of a message of {} bytes",
            message.len()
        );
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test --release deflate_speed -- --ignored --nocapture`: where a compressed 1 KiB
    /// JSON message's time goes (S1d's message).
    #[test]
    #[ignore]
    fn deflate_speed() {
        let mut json = String::new();
        let mut i = 0;
        while json.len() < 1024 {
            json.push_str(&format!(
                r#"{{"id":{i},"type":"message","room":"lobby","user":"user{}","text":"hello from the benchmark","ts":17000{:05}}},"#,
                i % 7,
                i * 37 % 100_000
            ));
            i += 1;
        }
        let json = &json.as_bytes()[..1024];
        let n = 20_000;
        let mut out = Vec::new();
        for (name, reset) in [("reset each message", true), ("context kept", false)] {
            let mut d = Deflater::new(15, reset);
            let t = std::time::Instant::now();
            for _ in 0..n {
                d.compress(std::hint::black_box(json), &mut out);
            }
            println!(
                "deflate, {name}: {:.2} us, {} bytes",
                t.elapsed().as_secs_f64() * 1e6 / n as f64,
                out.len()
            );
        }
        let mut d = Deflater::new(15, true);
        d.compress(json, &mut out);
        let params = DeflateParams {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        };
        let mut inflater = Inflater::new(&params);
        let t = std::time::Instant::now();
        for _ in 0..n {
            assert_eq!(inflater.inflate(&out, 1 << 20).unwrap().len(), 1024);
        }
        println!(
            "inflate: {:.2} us",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        );
    }
}
