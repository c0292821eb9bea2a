//! What RFC 6455 fixes for both directions: opcodes (section 5.2) and close codes (7.4).

pub(crate) const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;
/// The first reserved bit: a compressed message (permessage-deflate, RFC 7692 6). Server frames
/// carry it in the byte their opcode is in, so it rides along with the opcode where one is taken.
pub(crate) const RSV1: u8 = 0x40;

pub(crate) fn is_control(opcode: u8) -> bool {
    opcode & 0x8 != 0
}

/// Close codes a peer may put on the wire (RFC 6455 7.4.1, the IANA registry up to 1014, and
/// the ranges for libraries and applications). 1005, 1006 and 1015 are reserved for reporting.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Why the client's stream was refused; each maps to the close code RFC 6455 asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Violation {
    Protocol,
    InvalidUtf8,
    TooBig,
    /// A compressed message that is not a valid deflate stream.
    BadDeflate,
}

impl Violation {
    pub(crate) fn close_code(self) -> u16 {
        match self {
            Violation::Protocol => 1002,
            Violation::InvalidUtf8 | Violation::BadDeflate => 1007,
            Violation::TooBig => 1009,
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            Violation::Protocol => "protocol error",
            Violation::InvalidUtf8 => "invalid UTF-8",
            Violation::TooBig => "message too big",
            Violation::BadDeflate => "invalid compressed data",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
