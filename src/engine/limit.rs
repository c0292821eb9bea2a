//! Enforcing `max_payload_length` on fragmented messages from frame headers alone.
//!
//! tungstenite checks each frame header against the frame limit, but the running total of a
//! fragmented message only after a fragment's payload is buffered, so a client could make the
//! server hold nearly twice the limit. This scanner follows the frame headers in the raw byte
//! stream (skipping payloads in O(1)) and refuses the fragment that would take the message over
//! the limit as soon as its header arrives.

pub struct MessageSizeGuard {
    limit: u64,
    header: [u8; 14],
    have: usize,
    need: usize,
    payload_left: u64,
    message_len: u64,
}

impl MessageSizeGuard {
    pub fn new(limit: usize) -> Self {
        Self {
            limit: limit as u64,
            header: [0; 14],
            have: 0,
            need: 2,
            payload_left: 0,
            message_len: 0,
        }
    }

    /// Follow `data`, the next bytes read from the client; false once a message is too big.
    pub fn scan(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(data.len() as u64);
                self.payload_left -= skip;
                data = &data[skip as usize..];
                continue;
            }
            let take = (self.need - self.have).min(data.len());
            self.header[self.have..self.have + take].copy_from_slice(&data[..take]);
            self.have += take;
            data = &data[take..];
            if self.have < self.need {
                return true;
            }
            if self.need == 2 {
                let masked = self.header[1] & 0x80 != 0;
                let extended = match self.header[1] & 0x7F {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                };
                self.need = 2 + extended + if masked { 4 } else { 0 };
                if self.need > 2 {
                    continue;
                }
            }
            let len = match self.header[1] & 0x7F {
                126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
                127 => u64::from_be_bytes(self.header[2..10].try_into().expect("8 bytes")),
                n => u64::from(n),
            };
            let opcode = self.header[0] & 0x0F;
            if opcode < 0x8 {
                // A text or binary frame starts a message; a continuation adds to it.
                if opcode != 0x0 {
                    self.message_len = 0;
                }
                self.message_len = self.message_len.saturating_add(len);
                if self.message_len > self.limit {
                    return false;
                }
            }
            self.payload_left = len;
            self.have = 0;
            self.need = 2;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, len: usize) -> Vec<u8> {
        let mut frame = vec![(if fin { 0x80 } else { 0 }) | opcode];
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        frame.extend_from_slice(&[1, 2, 3, 4]);
        frame.extend(std::iter::repeat_n(b'x', len));
        frame
    }

    #[test]
    fn fragments_within_the_limit_pass_even_byte_by_byte() {
        let mut guard = MessageSizeGuard::new(1000);
        let stream = [
            masked(0x1, false, 400),
            masked(0x9, true, 10),
            masked(0x0, true, 600),
        ]
        .concat();
        for byte in stream.chunks(1) {
            assert!(guard.scan(byte));
        }
        // The next message starts from zero.
        assert!(guard.scan(&masked(0x2, true, 1000)));
    }

    #[test]
    fn the_fragment_that_crosses_the_limit_is_refused_from_its_header() {
        let mut guard = MessageSizeGuard::new(1000);
        assert!(guard.scan(&masked(0x2, false, 600)));
        let next = masked(0x0, true, 401);
        assert!(!guard.scan(&next[..8]), "refused before any payload byte");
    }

    #[test]
    fn a_64_bit_length_is_refused() {
        let mut guard = MessageSizeGuard::new(16 << 20);
        let mut frame = vec![0x82, 0x80 | 127];
        frame.extend_from_slice(&(1u64 << 63).to_be_bytes());
        frame.extend_from_slice(&[0, 0, 0, 0]);
        assert!(!guard.scan(&frame));
    }
}
