//! The pipe protocol between the engine and its VDDK worker process.
//!
//! Requests: `[op u8][len u32 LE][payload]`. The first is `OPEN` with an [`OpenRequest`] as
//! JSON; then `ALLOCATED` (no payload), `READ` (triples of `u64 LE`: disk offset, length, and
//! where in the engine's buffer arena the bytes go, or `TO_WINDOW`) and `QUIT`. Replies:
//! `[status u8][len u64 LE][payload]`: `OK` with JSON, `ERR` with a message, or `DATA` with no
//! payload once a `READ` is in place: in the arena, and the `TO_WINDOW` ones packed in request
//! order at the start of the window (see `crate::io::shm`).

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::os::fd::RawFd;

/// The worker's descriptors of the shared read window and of the engine's buffer arena.
pub const WINDOW_FD: RawFd = 3;
pub const ARENA_FD: RawFd = 4;
/// A READ destination: the next free bytes of the window.
pub const TO_WINDOW: u64 = u64::MAX;

pub const OP_OPEN: u8 = b'O';
pub const OP_ALLOCATED: u8 = b'A';
pub const OP_READ: u8 = b'R';
pub const OP_QUIT: u8 = b'Q';

pub const ST_OK: u8 = 0;
pub const ST_ERR: u8 = 1;
pub const ST_DATA: u8 = 2;

/// Everything the worker needs to open one disk. Holds the password or cookie, so it has no
/// `Debug` and is only ever written to the worker's pipe.
#[derive(Serialize, Deserialize)]
pub struct OpenRequest {
    pub libdir: String,
    pub config: Option<String>,
    pub server: String,
    pub port: Option<u16>,
    pub nfc_host_port: Option<u32>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub cookie: Option<String>,
    pub thumbprint: String,
    pub vm: String,
    pub snapshot: String,
    pub disk: String,
    pub transports: String,
    /// Sectors per VDDK read call (`[vmware] max_read_blocks`).
    pub max_read_blocks: u64,
    /// The engine's chunk buffers are shared, at `ARENA_FD`.
    pub arena: bool,
    /// Instead of opening the disk: `ACCESS_PREPARE` or `ACCESS_END` for its VM.
    #[serde(default)]
    pub access: Option<String>,
}

/// `PrepareForAccess` / `EndAccess`, and the identity hamal gives vCenter for them.
pub const ACCESS_PREPARE: &str = "prepare";
pub const ACCESS_END: &str = "end";
pub const ACCESS_IDENTITY: &str = "hamal";

/// Bytes of the shared read window; one READ asks for at most this much.
pub const WINDOW_BYTES: usize = 8 << 20;

/// What the worker reports once the disk is open.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Opened {
    pub capacity_sectors: u64,
    pub transport: String,
    pub library: String,
    pub major: u32,
    pub optional_symbols: Vec<String>,
    /// Logical and physical sector sizes (VDDK 7 and later report them).
    pub sector_sizes: Option<(u32, u32)>,
}

/// Reply to `ALLOCATED`: byte ranges, or `None` when the library cannot tell (no
/// `QueryAllocatedBlocks`, or it failed: `reason` says which).
#[derive(Serialize, Deserialize, Debug)]
pub struct Allocated {
    pub ranges: Option<Vec<(u64, u64)>>,
    pub reason: Option<String>,
}

/// Largest payload read from the pipe (a READ's list of pieces, an extent list, a message):
/// a length beyond it (millions of extents fit) is the other side's mistake.
pub const MAX_PAYLOAD: u64 = 512 << 20;

/// The `len` bytes of a payload, refused past [`MAX_PAYLOAD`].
pub fn read_payload(r: &mut impl Read, len: u64) -> io::Result<Vec<u8>> {
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a payload of {len} bytes, more than the {MAX_PAYLOAD} allowed"),
        ));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    Ok(payload)
}

pub fn write_request(w: &mut impl Write, op: u8, payload: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = op;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

/// The next request, or `None` when the other side closed the pipe.
pub fn read_request(r: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(head[1..].try_into().unwrap());
    Ok(Some((head[0], read_payload(r, len.into())?)))
}

pub fn write_reply(w: &mut impl Write, status: u8, payload: &[u8]) -> io::Result<()> {
    write_reply_head(w, status, payload.len() as u64)?;
    w.write_all(payload)?;
    w.flush()
}

/// `DATA`: the `len` bytes of a READ are in place.
pub fn write_data(w: &mut impl Write, len: u64) -> io::Result<()> {
    write_reply_head(w, ST_DATA, len)?;
    w.flush()
}

fn write_reply_head(w: &mut impl Write, status: u8, len: u64) -> io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = status;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)
}

pub fn read_reply_header(r: &mut impl Read) -> io::Result<(u8, u64)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head)?;
    Ok((head[0], u64::from_le_bytes(head[1..].try_into().unwrap())))
}

/// `(disk offset, length, destination)` triples of a READ.
pub fn encode_reads(reads: impl Iterator<Item = (u64, u64, u64)>) -> Vec<u8> {
    reads
        .flat_map(|(o, l, d)| [o, l, d])
        .flat_map(u64::to_le_bytes)
        .collect()
}

pub fn decode_reads(payload: &[u8]) -> Vec<(u64, u64, u64)> {
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
    payload
        .chunks_exact(24)
        .map(|c| (word(&c[..8]), word(&c[8..16]), word(&c[16..])))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        let reads = [(512, 4096, TO_WINDOW), (1 << 40, 512, 8192)];
        write_request(&mut buf, OP_READ, &encode_reads(reads.into_iter())).unwrap();
        let (op, payload) = read_request(&mut buf.as_slice()).unwrap().unwrap();
        assert_eq!(op, OP_READ);
        assert_eq!(decode_reads(&payload), reads.to_vec());
        assert!(read_request(&mut [].as_slice()).unwrap().is_none());
        let mut out = Vec::new();
        write_reply(&mut out, ST_ERR, b"boom").unwrap();
        let mut r = out.as_slice();
        assert_eq!(read_reply_header(&mut r).unwrap(), (ST_ERR, 4));
        assert_eq!(r, b"boom");
    }

    proptest::proptest! {
        /// Whatever bytes come down the pipe, decoding never panics nor allocates past the
        /// bound, and what it accepts is a prefix of the input read as frames.
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut r = bytes.as_slice();
            while let Ok(Some((_, payload))) = read_request(&mut r) {
                proptest::prop_assert!(payload.len() as u64 <= MAX_PAYLOAD);
                let _ = decode_reads(&payload);
            }
            let mut r = bytes.as_slice();
            if let Ok((_, len)) = read_reply_header(&mut r) {
                let _ = read_payload(&mut r, len);
            }
        }
    }

    #[test]
    fn a_huge_length_is_refused_unallocated() {
        let mut frame = vec![OP_READ];
        frame.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = read_request(&mut frame.as_slice()).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }
}
