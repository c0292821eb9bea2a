//! The client's masking (RFC 6455 5.3), undone as the bytes are copied where they go.
//!
//! Every byte a client sends is XORed with its frame's 4-byte key. Undoing that is a pass over
//! the payload, and a large payload is not in the cache: a pass of its own costs about what a
//! copy does. So it rides on a copy the bytes make anyway: out of the worker's read buffer
//! (`ws/decode.rs`), or, for a binary message in one frame that did not arrive in one read
//! (received into its own buffer, a large one straight from the socket), into the Python
//! `bytes` the handler gets (`MaskedBytes`, unmasked on the loop thread by the copy that makes
//! that object); likewise a large text message in one frame, into its `str`.

use std::mem::MaybeUninit;

use bytes::Bytes;

/// A binary (or large text) message's payload, possibly still masked: `bytes` XORed with
/// `key`, the key as it stands at the first byte. A key of zeros is a payload already unmasked
/// (XOR with zeros leaves every byte as it is): every binary message but one in one frame that
/// arrived over several reads.
#[derive(Clone, Debug, Default)]
pub struct MaskedBytes {
    bytes: Bytes,
    key: [u8; 4],
}

const NO_KEY: [u8; 4] = [0; 4];

impl MaskedBytes {
    pub(crate) fn masked(bytes: Bytes, key: [u8; 4]) -> Self {
        Self { bytes, key }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Where the bytes are (whether or not they are still masked).
    #[cfg(test)]
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.bytes.as_ptr()
    }

    /// The bytes as they are, unmasked, when they are (nothing left to undo).
    pub fn as_unmasked(&self) -> Option<&[u8]> {
        (self.key == NO_KEY).then_some(&self.bytes[..])
    }

    /// Write the payload, unmasked, into `out`, which is exactly its length: one pass.
    pub fn copy_to(&self, out: &mut [MaybeUninit<u8>]) {
        assert_eq!(out.len(), self.bytes.len());
        // SAFETY: `out` is valid for `len` bytes of writes, and apart from `self.bytes`
        // (a shared borrow cannot alias a unique one).
        unsafe { unmask_copy(&self.bytes, out.as_mut_ptr().cast(), self.key) }
    }

    /// As `copy_to`, and whether every byte written is ASCII, found in the same pass: a large
    /// text's copy into a `str` checks it this way (`Incoming::MaskedText`).
    pub fn copy_to_ascii(&self, out: &mut [MaybeUninit<u8>]) -> bool {
        assert_eq!(out.len(), self.bytes.len());
        // SAFETY: as in `copy_to`.
        unsafe { unmask_copy_ascii(&self.bytes, out.as_mut_ptr().cast(), self.key) }
    }

    /// The payload unmasked: as it is if it is, in place if nothing else shares its buffer, or
    /// else a copy.
    pub fn into_bytes(self) -> Bytes {
        if self.key == NO_KEY {
            return self.bytes;
        }
        match self.bytes.try_into_mut() {
            Ok(mut unique) => {
                unmask_in_place(&mut unique, self.key);
                unique.freeze()
            }
            Err(shared) => {
                let mut out = Vec::with_capacity(shared.len());
                copy_unmasked(&mut out, &shared, self.key);
                Bytes::from(out)
            }
        }
    }
}

impl From<Bytes> for MaskedBytes {
    /// Bytes that are not masked.
    fn from(bytes: Bytes) -> Self {
        Self { bytes, key: NO_KEY }
    }
}

/// Equal payloads, whatever their masks. (For tests: comparing differently masked payloads
/// unmasks copies of both.)
impl PartialEq for MaskedBytes {
    fn eq(&self, other: &Self) -> bool {
        if self.key == other.key {
            return self.bytes == other.bytes;
        }
        self.len() == other.len() && self.clone().into_bytes() == other.clone().into_bytes()
    }
}

/// Append `payload` to `out` unmasked with `key`, the key as it stands at the payload's first
/// byte. Within the reserved capacity: no reallocation.
pub(crate) fn copy_unmasked(out: &mut Vec<u8>, payload: &[u8], key: [u8; 4]) {
    out.reserve(payload.len());
    let start = out.len();
    // SAFETY: `reserve` made room for `payload.len()` more bytes after `start`, and
    // `unmask_copy` writes every one of them before the length covers them.
    unsafe {
        unmask_copy(payload, out.as_mut_ptr().add(start), key);
        out.set_len(start + payload.len());
    }
}

/// Unmask `buf` where it is, `key` as it stands at its first byte.
pub(crate) fn unmask_in_place(buf: &mut [u8], key: [u8; 4]) {
    let wide = wide(key);
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        let unmasked = u64::from_ne_bytes((&*word).try_into().expect("8 bytes")) ^ wide;
        word.copy_from_slice(&unmasked.to_ne_bytes());
    }
    for (i, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i & 3];
    }
}

fn wide(key: [u8; 4]) -> u64 {
    u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ])
}

/// Write `src` unmasked with `key` to `dst`: each word read once, unmasked and written once.
/// With a key of zeros, a plain copy (`memcpy`, which the loop below would not beat).
///
/// # Safety
/// `dst` is valid for `src.len()` bytes of writes and does not overlap `src`.
unsafe fn unmask_copy(src: &[u8], dst: *mut u8, key: [u8; 4]) {
    if key == NO_KEY {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
        return;
    }
    unmask_words(src, dst, key, |_| {});
}

/// `unmask_copy`, and whether all of `src`, unmasked, is ASCII (no byte with its high bit set):
/// every word written is ORed in as it goes, in registers, not in a pass of its own.
///
/// # Safety
/// As `unmask_copy`.
unsafe fn unmask_copy_ascii(src: &[u8], dst: *mut u8, key: [u8; 4]) -> bool {
    let mut seen = 0u64;
    unmask_words(src, dst, key, |word| seen |= word);
    seen & 0x8080_8080_8080_8080 == 0
}

/// The loop of both: `src` unmasked into `dst`, each word (the last bytes one at a time) handed
/// to `written` as it is written.
///
/// # Safety
/// As `unmask_copy`.
#[inline(always)]
unsafe fn unmask_words(src: &[u8], dst: *mut u8, key: [u8; 4], mut written: impl FnMut(u64)) {
    let len = src.len();
    let src = src.as_ptr();
    let wide = wide(key);
    let mut i = 0;
    // 32 bytes a step, four independent words: the compiler turns them into vector loads,
    // XORs and stores (a word a step ran at half of `memcpy`'s speed).
    while i + 32 <= len {
        let [a, b, c, d] = src.add(i).cast::<[u64; 4]>().read_unaligned();
        let block = [a ^ wide, b ^ wide, c ^ wide, d ^ wide];
        written(block[0] | block[1] | block[2] | block[3]);
        dst.add(i).cast::<[u64; 4]>().write_unaligned(block);
        i += 32;
    }
    while i + 8 <= len {
        let word = src.add(i).cast::<u64>().read_unaligned() ^ wide;
        written(word);
        dst.add(i).cast::<u64>().write_unaligned(word);
        i += 8;
    }
    while i < len {
        let byte = *src.add(i) ^ key[i & 3];
        written(u64::from(byte));
        *dst.add(i) = byte;
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn masked(plain: &[u8]) -> MaskedBytes {
        let bytes: Vec<u8> = plain
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ KEY[i % 4])
            .collect();
        MaskedBytes::masked(Bytes::from(bytes), KEY)
    }

    #[test]
    fn every_way_out_gives_the_payload_unmasked() {
        for len in [0, 1, 7, 8, 9, 63, 64, 65, 1000] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let payload = masked(&plain);
            assert!(payload.as_unmasked().is_none());
            let mut out = vec![MaybeUninit::uninit(); len];
            payload.copy_to(&mut out);
            // SAFETY: `copy_to` wrote all of it.
            let copied: Vec<u8> = out.iter().map(|b| unsafe { b.assume_init() }).collect();
            assert_eq!(copied, plain, "copy_to, {len} bytes");
            let shared = payload.clone();
            assert_eq!(shared.into_bytes(), plain, "a shared buffer, {len} bytes");
            assert_eq!(payload.into_bytes(), plain, "a unique buffer, {len} bytes");
            let unmasked = MaskedBytes::from(Bytes::from(plain.clone()));
            assert_eq!(unmasked.as_unmasked(), Some(&plain[..]));
            assert_eq!(unmasked, masked(&plain), "equal whatever the masks");
        }
        let mut other = plain_of(9);
        other[8] ^= 1;
        assert_ne!(masked(&plain_of(9)), masked(&other));
    }

    #[test]
    fn copy_to_ascii_unmasks_and_finds_any_byte_past_ascii() {
        for len in [0, 1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 1000] {
            let ascii: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8 & 0x7f).collect();
            let mut out = vec![MaybeUninit::uninit(); len];
            assert!(masked(&ascii).copy_to_ascii(&mut out), "{len} ASCII bytes");
            // SAFETY: `copy_to_ascii` wrote all of it.
            let copied: Vec<u8> = out.iter().map(|b| unsafe { b.assume_init() }).collect();
            assert_eq!(copied, ascii, "{len} bytes");
            // One byte past ASCII anywhere: in a 32-byte block, a word or the tail.
            for at in 0..len {
                let mut text = ascii.clone();
                text[at] |= 0x80;
                assert!(
                    !masked(&text).copy_to_ascii(&mut out),
                    "{len} bytes, at {at}"
                );
                let copied: Vec<u8> = out.iter().map(|b| unsafe { b.assume_init() }).collect();
                assert_eq!(copied, text, "{len} bytes, at {at}");
            }
        }
    }

    /// `cargo test --release -- --ignored copy_speed --nocapture`: unmasking while copying 1 MiB
    /// (S7's largest messages) against a plain copy of the same bytes.
    #[test]
    #[ignore]
    fn copy_speed() {
        let payload = masked(&plain_of(1 << 20));
        let plain = MaskedBytes::from(Bytes::from(plain_of(1 << 20)));
        let mut out = vec![MaybeUninit::uninit(); 1 << 20];
        for (what, payload) in [("unmasking", &payload), ("plain copy", &plain)] {
            let rounds = 4_000;
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                std::hint::black_box(payload).copy_to(std::hint::black_box(&mut out));
            }
            let rate = f64::from(rounds) * f64::from(1 << 20) / start.elapsed().as_secs_f64() / 1e9;
            println!("copy_to, 1 MiB, {what}: {rate:.1} GB/s");
        }
        let rounds = 4_000;
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(std::hint::black_box(&payload).copy_to_ascii(&mut out));
        }
        let rate = f64::from(rounds) * f64::from(1 << 20) / start.elapsed().as_secs_f64() / 1e9;
        println!("copy_to_ascii, 1 MiB, unmasking: {rate:.1} GB/s");
    }

    fn plain_of(len: usize) -> Vec<u8> {
        (0..len).map(|i| i as u8).collect()
    }
}
