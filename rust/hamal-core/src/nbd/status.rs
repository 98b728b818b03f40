//! Block status (`NBD_CMD_BLOCK_STATUS`): the extents of one metadata context, checked as every
//! other reply is (one chunk for the context asked, every extent non-empty, lengths bounded
//! before they are read), and bounded in round trips.

use super::client::{protocol, with_message, Connection, NbdFail, StatusExtent};
use super::proto::*;
use std::io;

/// Block-status descriptors taken in one chunk (8 MiB of them).
const MAX_DESCRIPTORS: u32 = 1 << 20;
/// Block-status replies covering less than [`SLIVER`] that one query accepts: a server that
/// answers byte by byte would cost a round trip per byte.
const MAX_SLIVERS: u32 = 100_000;
const SLIVER: u64 = 64 << 10;

impl Connection {
    /// Calls `each` with the extents of `context` over `[offset, offset+len)` in order (neighbours
    /// with equal flags merged), asking as often as needed.
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u64,
        mut each: impl FnMut(StatusExtent),
    ) -> Result<(), NbdFail> {
        self.usable()?;
        self.in_export(offset, len)?;
        let id = self
            .info
            .contexts
            .iter()
            .find(|(_, n)| n == context)
            .map(|(id, _)| *id)
            .ok_or_else(|| protocol(format!("metadata context '{context}' was not negotiated")))?;
        let end = offset + len;
        let mut held: Option<StatusExtent> = None;
        let (mut pos, mut slivers) = (offset, 0);
        while pos < end {
            let ask = (end - pos).min(u64::from(u32::MAX - u32::MAX % self.info.min_block));
            self.arm();
            let got = match self.status_reply(id, pos, ask as u32) {
                Err((e, answered)) => return self.keep_in_step(Err(e), answered),
                Ok(got) => got,
            };
            let covered: u64 = got.iter().map(|e| e.len).sum::<u64>().min(end - pos);
            if covered < SLIVER.min(end - pos) {
                slivers += 1;
                if slivers > MAX_SLIVERS {
                    return Err(protocol(format!(
                        "block status answered in slivers ({slivers} replies under {SLIVER} bytes)"
                    )));
                }
            }
            for mut e in got {
                if e.offset >= end {
                    break;
                }
                e.len = e.len.min(end - e.offset);
                match &mut held {
                    Some(h) if h.flags == e.flags => h.len += e.len,
                    _ => {
                        if let Some(h) = held.replace(e) {
                            each(h);
                        }
                    }
                }
            }
            pos += covered;
        }
        if let Some(h) = held {
            each(h);
        }
        Ok(())
    }

    /// One block-status query at `pos` for `ask` bytes: the extents of context `id`, starting at
    /// `pos`, at least one. On error, whether the server answered it in step (an error chunk).
    fn status_reply(
        &mut self,
        id: u32,
        pos: u64,
        ask: u32,
    ) -> Result<Vec<StatusExtent>, (NbdFail, bool)> {
        let lost = |e: NbdFail| (e, false);
        let cookie = self
            .send_request(CMD_BLOCK_STATUS, pos, ask, None)
            .map_err(|e| lost(e.into()))?;
        let mut got: Option<Vec<StatusExtent>> = None;
        let mut error = None;
        loop {
            let (flags, kind, c, length) = self.structured_header().map_err(lost)?;
            if c != cookie {
                return Err(lost(protocol(format!(
                    "reply for cookie {c}, which names no request in flight"
                ))));
            }
            match kind {
                REPLY_TYPE_BLOCK_STATUS
                    if (12..=4 + 8 * MAX_DESCRIPTORS).contains(&length) && (length - 4) % 8 == 0 =>
                {
                    let ctx = self.u32().map_err(|e| lost(e.into()))?;
                    let descriptors = self.bytes((length - 4) as usize).map_err(|e| lost(e.into()))?;
                    if !self.info.contexts.iter().any(|(i, _)| *i == ctx) {
                        return Err(lost(protocol(format!("block status for context {ctx}, which was not agreed"))));
                    }
                    if ctx == id && got.is_some() {
                        return Err(lost(protocol(format!("two block-status chunks for one context at offset {pos}"))));
                    } else if ctx == id {
                        got = Some(extents(pos, &descriptors).map_err(lost)?);
                    }
                }
                REPLY_TYPE_NONE if length == 0 && flags & REPLY_FLAG_DONE != 0 => {}
                REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                    let (err, msg) = self.error_chunk(length).map_err(lost)?;
                    error = Some(NbdFail {
                        offset: Some(pos),
                        error: with_message(err, &msg),
                    });
                }
                _ => {
                    return Err(lost(protocol(format!(
                        "a chunk of type {kind} and {length} bytes in a block-status reply at offset {pos}"
                    ))))
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        if let Some(e) = error {
            return Err((e, true));
        }
        got.ok_or_else(|| {
            lost(protocol(format!(
                "block status at offset {pos} without the context asked for"
            )))
        })
    }

    /// Reads a structured reply header (a simple reply here can only be an error).
    fn structured_header(&mut self) -> Result<(u16, u16, u64, u32), NbdFail> {
        let magic = self.u32()?;
        if magic == SIMPLE_REPLY_MAGIC {
            let (err, _cookie) = (self.u32()?, self.u64()?);
            let err = if err == 0 { libc::EIO as u32 } else { err };
            return Err(NbdFail {
                offset: None,
                error: io::Error::from_raw_os_error(err as i32),
            });
        }
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(protocol(format!("bad reply magic {magic:#x}")));
        }
        Ok((self.u16()?, self.u16()?, self.u64()?, self.u32()?))
    }
}

/// The extents of block-status descriptors, from `pos` on; every length must be non-zero.
fn extents(pos: u64, descriptors: &[u8]) -> Result<Vec<StatusExtent>, NbdFail> {
    let mut at = pos;
    let mut out = Vec::with_capacity(descriptors.len() / 8);
    for d in descriptors.chunks_exact(8) {
        let len = u64::from(u32::from_be_bytes(d[..4].try_into().unwrap()));
        let flags = u32::from_be_bytes(d[4..].try_into().unwrap());
        if len == 0 {
            return Err(protocol(format!(
                "a block-status extent of 0 bytes at offset {at}"
            )));
        }
        out.push(StatusExtent {
            offset: at,
            len,
            flags,
        });
        at = at.saturating_add(len);
    }
    Ok(out)
}
