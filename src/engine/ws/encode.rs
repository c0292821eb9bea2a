//! Server-to-client frames, encoded once.
//!
//! Server frames are never masked, so the bytes of a frame are the same for every recipient: a
//! published message is encoded once. A large frame's payload `Bytes` is shared (a refcount, not
//! a copy) by every subscriber's queue and written from there; small frames are copied into the
//! queue's byte buffer, or, for publishes within a batch, into the topic's arena
//! (`pubsub/arena.rs`).

use bytes::Bytes;

use super::protocol::OP_CLOSE;

/// The header of a final, unmasked frame: its bytes and how many of them are used. `opcode` may
/// carry `protocol::RSV1`, for a compressed message.
pub(crate) fn encode_head(opcode: u8, len: usize) -> ([u8; 10], usize) {
    let mut head = [0u8; 10];
    head[0] = 0x80 | opcode;
    let head_len = if len < 126 {
        head[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        head[1] = 126;
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (head, head_len)
}

#[derive(Clone, Debug)]
pub struct OutFrame {
    head: [u8; 10],
    head_len: u8,
    payload: Bytes,
}

impl OutFrame {
    /// A final (unfragmented) frame with `opcode` carrying `payload`.
    pub fn new(opcode: u8, payload: Bytes) -> Self {
        let (head, head_len) = encode_head(opcode, payload.len());
        Self {
            head,
            head_len: head_len as u8,
            payload,
        }
    }

    /// The answer to a client's close frame: its code and reason, or no code if it carried
    /// none (1005, which no frame may carry).
    pub(crate) fn close_answer(code: u16, reason: &str) -> Self {
        if code == 1005 {
            Self::new(OP_CLOSE, Bytes::new())
        } else {
            Self::close(code, reason)
        }
    }

    pub(crate) fn close(code: u16, reason: &str) -> Self {
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
        Self::new(OP_CLOSE, Bytes::from(payload))
    }

    pub(crate) fn head(&self) -> &[u8] {
        &self.head[..self.head_len as usize]
    }

    pub(crate) fn opcode(&self) -> u8 {
        self.head[0] & 0x0f
    }

    pub(crate) fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The payload, shared: what a publish hands on to Redis without copying it.
    pub(crate) fn payload_bytes(&self) -> Bytes {
        self.payload.clone()
    }

    /// What this frame adds to `buffered_amount`.
    pub(crate) fn wire_len(&self) -> usize {
        self.head_len as usize + self.payload.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ws::protocol::{OP_BINARY, OP_TEXT};

    fn wire(f: &OutFrame) -> Vec<u8> {
        [f.head(), f.payload()].concat()
    }

    #[test]
    fn encodes_the_three_length_forms() {
        assert_eq!(
            wire(&OutFrame::new(OP_TEXT, Bytes::from_static(b"hi"))),
            b"\x81\x02hi"
        );
        let medium = OutFrame::new(OP_BINARY, Bytes::from(vec![7u8; 300]));
        assert_eq!(medium.head(), &[0x82, 126, 0x01, 0x2C]);
        assert_eq!(medium.wire_len(), 304);
        let large = OutFrame::new(OP_BINARY, Bytes::from(vec![0u8; 70_000]));
        assert_eq!(large.head(), &[0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }

    #[test]
    fn close_frame_carries_code_and_reason() {
        assert_eq!(wire(&OutFrame::close(4001, "bye")), b"\x88\x05\x0f\xa1bye");
    }

    #[test]
    fn clones_share_the_payload() {
        let f = OutFrame::new(OP_TEXT, Bytes::from(vec![b'x'; 1000]));
        let g = f.clone();
        assert_eq!(f.payload().as_ptr(), g.payload().as_ptr());
    }
}
