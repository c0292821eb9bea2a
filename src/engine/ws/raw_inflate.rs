//! A raw-deflate decompressor through zlib-rs's zlib API (`libz-rs-sys`) rather than flate2's
//! `Decompress`: the same zlib-rs underneath, plus what flate2 does not expose, zlib's
//! `data_type`, which says whether the stream stopped at a block boundary. A message whose
//! deflate data is cut inside a dynamic block's header inflates to nothing and no error, the
//! tail appended to it read as more of that header; only the stream's state tells such a
//! message from a whole one (a model of that cut, in a message of several blocks, delivered
//! 178,923 of its 200,000 bytes as if whole).

use libz_rs_sys::{
    inflate, inflateEnd, inflateInit2_, inflateReset, z_stream, zlibVersion, Z_BLOCK, Z_BUF_ERROR,
    Z_OK, Z_STREAM_END,
};

/// What one call took the stream to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// Progress, or none possible (no input, or no room for output).
    Ok,
    /// A final block ended the stream.
    StreamEnd,
}

/// The input is not a deflate stream (zlib's `Z_DATA_ERROR`, or a state it cannot go on from).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Corrupt;

pub(crate) struct RawInflate {
    /// Boxed: zlib's state points back at its `z_stream`, which therefore never moves.
    strm: Box<z_stream>,
}

// SAFETY: the `z_stream`'s pointers are set and cleared within each call, and its state (on
// zlib-rs's heap, through the Rust allocator) is owned by this value alone, with nothing tied to
// the thread that made it: moving the value to another thread moves all of it.
unsafe impl Send for RawInflate {}

impl RawInflate {
    /// A decompressor of raw deflate (no zlib header) with a window of `2^window_bits` bytes.
    pub(crate) fn new(window_bits: u8) -> Self {
        let mut strm = Box::<z_stream>::default();
        // SAFETY: `strm` is a valid, default `z_stream` (zlib-rs's Rust allocator set), the
        // version is the library's own, and the size is the struct this crate was built with.
        let rc = unsafe {
            inflateInit2_(
                &mut *strm,
                -i32::from(window_bits),
                zlibVersion(),
                std::mem::size_of::<z_stream>() as i32,
            )
        };
        // Only running out of memory fails here: as any other allocation does.
        assert_eq!(rc, Z_OK, "inflateInit2 failed ({rc})");
        Self { strm }
    }

    /// Forget the stream: the next message starts a new one, with an empty window.
    pub(crate) fn reset(&mut self) {
        // SAFETY: initialised in `new`, never ended before `drop`.
        unsafe { inflateReset(&mut *self.strm) };
    }

    /// Input bytes consumed since the stream was made.
    // zlib's `uLong`: 64 bits on the 64-bit Unix targets, 32 on others.
    #[allow(clippy::unnecessary_cast)]
    pub(crate) fn total_in(&self) -> u64 {
        self.strm.total_in as u64
    }

    /// Inflate what of `input` fits in `out`'s spare capacity, up to the end of the block it is
    /// in (zlib's `Z_BLOCK`: all the output it can give, as a sync flush does, and a stop at the
    /// next block boundary, where `at_block_boundary` can see it; zlib-rs's sync flush moves on
    /// into reading the next block's header, which hides the boundary). `out` grows by what was
    /// written; the caller calls again for the rest of `input`.
    pub(crate) fn decompress_vec(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Status, Corrupt> {
        let spare = out.spare_capacity_mut();
        let room = spare.len().min(u32::MAX as usize);
        let strm = &mut *self.strm;
        strm.next_in = input.as_ptr();
        strm.avail_in = input.len().min(u32::MAX as usize) as u32;
        strm.next_out = spare.as_mut_ptr().cast();
        strm.avail_out = room as u32;
        // SAFETY: `next_in`/`avail_in` describe `input`, and `next_out`/`avail_out` the spare
        // capacity of `out`, both borrowed for this call; zlib writes only within the latter.
        let rc = unsafe { inflate(strm, Z_BLOCK) };
        let written = room - strm.avail_out as usize;
        // SAFETY: zlib initialised the first `written` bytes of the spare capacity.
        unsafe { out.set_len(out.len() + written) };
        strm.next_in = std::ptr::null();
        strm.avail_in = 0;
        strm.next_out = std::ptr::null_mut();
        strm.avail_out = 0;
        match rc {
            Z_OK | Z_BUF_ERROR => Ok(Status::Ok),
            Z_STREAM_END => Ok(Status::StreamEnd),
            _ => Err(Corrupt),
        }
    }

    /// Whether the stream stopped between blocks, waiting for the next one's header (zlib's
    /// `data_type & 128`, after a `Z_BLOCK` call): true after a message that ends where a sync
    /// flush ends, once its `00 00 ff ff` is read; false after one cut inside a block or a
    /// block's header.
    pub(crate) fn at_block_boundary(&self) -> bool {
        self.strm.data_type & 128 != 0
    }
}

impl Drop for RawInflate {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, ended once, here.
        unsafe { inflateEnd(&mut *self.strm) };
    }
}

/// `text` compressed at `level` and sync-flushed: what a client's deflater gives before the
/// client strips the tail (RFC 7692 7.2.1).
#[cfg(test)]
pub(crate) fn sync_flushed(text: &[u8], level: flate2::Compression) -> Vec<u8> {
    let mut compress = flate2::Compress::new_with_window_bits(level, false, 15);
    let mut whole = Vec::with_capacity(text.len() + 64);
    compress
        .compress_vec(text, &mut whole, flate2::FlushCompress::Sync)
        .unwrap();
    assert!(
        whole.ends_with(&[0, 0, 0xff, 0xff]),
        "the output did not fit"
    );
    whole
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All of `input`, a block at a time, or as much as `out`'s capacity takes.
    fn inflate_all(
        stream: &mut RawInflate,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Status, Corrupt> {
        let mut pos = 0;
        loop {
            let (before, written) = (stream.total_in(), out.len());
            let status = stream.decompress_vec(&input[pos..], out)?;
            let consumed = (stream.total_in() - before) as usize;
            pos += consumed;
            let stuck = consumed == 0 && out.len() == written;
            if pos == input.len() || status == Status::StreamEnd || stuck {
                return Ok(status);
            }
        }
    }

    #[test]
    fn a_stream_cut_inside_a_block_header_is_not_at_a_boundary() {
        // A dynamic block (long, varied text at the default level), sync-flushed: whole, it
        // stops between blocks; cut inside its header, with the tail appended, it does not,
        // and some cuts give neither output nor an error (what the boundary check is for).
        let text: Vec<u8> = (0..3000u32)
            .flat_map(|i| format!("{} ", i * 7919 % 1000).into_bytes())
            .collect();
        let whole = sync_flushed(&text, flate2::Compression::default());
        let mut out = Vec::with_capacity(text.len() + 1);
        let mut stream = RawInflate::new(15);
        assert_eq!(inflate_all(&mut stream, &whole, &mut out), Ok(Status::Ok));
        assert_eq!(out, text);
        assert!(stream.at_block_boundary());
        let mut silent = 0;
        for cut in 1..20 {
            let mut input = whole[..cut].to_vec();
            input.extend_from_slice(&[0, 0, 0xff, 0xff]);
            let mut out = Vec::with_capacity(text.len() + 1);
            if inflate_all(&mut stream, &input, &mut out).is_ok() {
                assert!(!stream.at_block_boundary(), "cut at {cut}");
                silent += usize::from(out.is_empty());
            }
            stream.reset();
        }
        assert!(silent > 0, "no cut inflated to nothing without an error");
        let mut out = Vec::with_capacity(text.len() + 1);
        assert_eq!(inflate_all(&mut stream, &whole, &mut out), Ok(Status::Ok));
        assert_eq!(out, text, "a reset stream starts anew");
    }
}
