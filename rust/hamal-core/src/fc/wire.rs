//! The CNA backup data channel's framing, as this project assumes it (UNVERIFIED: public notes
//! say only "a proprietary framing with a header, a version, a sequence number and a CRC32";
//! every constant and field order below is ours, and the fake CNA of the tests follows it).
//!
//! Every frame is a 32-byte big-endian header, then `length` payload bytes:
//!
//! | bytes | field   | meaning                                                     |
//! |-------|---------|-------------------------------------------------------------|
//! | 0-3   | magic   | `FCBD`                                                      |
//! | 4-5   | version | 1                                                           |
//! | 6-7   | kind    | 1 hello, 2 welcome, 3 read, 4 data, 5 error                 |
//! | 8-11  | seq     | request number, echoed by its reply                         |
//! | 12-15 | status  | 0, or the error code of an `error` frame                    |
//! | 16-23 | offset  | byte offset of a read (and of its data)                     |
//! | 24-27 | length  | payload bytes (a read: bytes asked for, no payload)         |
//! | 28-31 | crc32   | CRC-32 (IEEE) of the payload, 0 without one                 |
//!
//! A connection starts with `hello` (payload: resource id, a newline, the token) answered by
//! `welcome`; then `read`s, pipelined, each answered in order by `data` or `error` (payload: a
//! message).

pub const HEADER_LEN: usize = 32;
pub const MAGIC: u32 = u32::from_be_bytes(*b"FCBD");
pub const VERSION: u16 = 1;

/// Error codes the channel answers with when a host has no socket to spare (seen in notes:
/// 10300412 / 10300413); such a refusal is waited out, not a failure.
pub const BUSY_CODES: [u32; 2] = [10300412, 10300413];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Read = 3,
    Data = 4,
    Error = 5,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub seq: u32,
    pub status: u32,
    pub offset: u64,
    pub length: u32,
    pub crc32: u32,
}

impl Header {
    pub fn new(kind: Kind, seq: u32, offset: u64, length: u32) -> Header {
        Header {
            kind,
            seq,
            status: 0,
            offset,
            length,
            crc32: 0,
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&VERSION.to_be_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_be_bytes());
        b[8..12].copy_from_slice(&self.seq.to_be_bytes());
        b[12..16].copy_from_slice(&self.status.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b[28..32].copy_from_slice(&self.crc32.to_be_bytes());
        b
    }

    /// Parses a header; the error says what is wrong with it.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if u32_at(0) != MAGIC {
            return Err(format!("bad frame magic {:#010x}", u32_at(0)));
        }
        if u16_at(4) != VERSION {
            return Err(format!(
                "channel version {} (this proxy speaks {VERSION})",
                u16_at(4)
            ));
        }
        let kind = match u16_at(6) {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Read,
            4 => Kind::Data,
            5 => Kind::Error,
            k => return Err(format!("unknown frame kind {k}")),
        };
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&b[16..24]);
        Ok(Header {
            kind,
            seq: u32_at(8),
            status: u32_at(12),
            offset: u64::from_be_bytes(offset),
            length: u32_at(24),
            crc32: u32_at(28),
        })
    }
}

/// The payload of `hello`.
pub fn hello_payload(resource: &str, token: &str) -> Vec<u8> {
    format!("{resource}\n{token}").into_bytes()
}

pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_bad_ones_are_named() {
        let h = Header {
            kind: Kind::Data,
            seq: 7,
            status: 0,
            offset: 1 << 40,
            length: 4096,
            crc32: crc32(b"abc"),
        };
        assert_eq!(Header::decode(&h.encode()), Ok(h));
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926); // the CRC-32/IEEE check value
        let mut b = h.encode();
        b[0] = b'X';
        assert!(Header::decode(&b).unwrap_err().contains("magic"));
        let mut b = h.encode();
        b[5] = 9;
        assert!(Header::decode(&b).unwrap_err().contains("version 9"));
        let mut b = h.encode();
        b[7] = 42;
        assert!(Header::decode(&b).unwrap_err().contains("kind 42"));
    }
}
