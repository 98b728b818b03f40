//! How a chunk or an index page becomes a stored object, and back.
//!
//! Object layout: `b"HMC1"`, one flag byte (bit 0: zstd, bit 1: AES-256-GCM, bit 2: sized),
//! when sized the object's whole length (`u64` LE, so a truncated object is caught from its
//! first bytes and its size alone; objects written before bit 2 existed have no length), then, when
//! encrypted, a random 12-byte nonce followed by the ciphertext with its 16-byte tag; otherwise
//! the (maybe compressed) bytes. The object's name is the hash of its plaintext: BLAKE3, or
//! keyed BLAKE3 when the store is encrypted (so equal plaintext is not revealed). Decoding always
//! re-hashes the plaintext and compares it with the name.

use crate::checksum::{ChecksumKind, ChunkHasher, Digest};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::cell::RefCell;
use std::path::Path;

const MAGIC: &[u8; 4] = b"HMC1";
const ZSTD: u8 = 1;
const AES: u8 = 2;
const SIZED: u8 = 4;
const NONCE: usize = 12;
/// Bytes of an object's head that [`declared_len`] needs.
pub const HEAD: usize = 13;
/// [`worth_compressing`] looks at this many samples of `SAMPLE` bytes.
const SAMPLES: usize = 32;
const SAMPLE: usize = 4096;

/// The length an object's head declares (`None`: an object written without one).
pub fn declared_len(head: &[u8]) -> Option<u64> {
    if head.len() < HEAD || &head[..4] != MAGIC || head[4] & SIZED == 0 {
        return None;
    }
    Some(u64::from_le_bytes(head[5..13].try_into().unwrap()))
}

/// Keys derived from the operator's key file.
#[derive(Clone)]
pub struct Keys {
    /// AES-256-GCM (ring's, 6x the aes-gcm crate's speed here: 80 MiB in 10 ms against 58 ms).
    cipher: LessSafeKey,
    address: [u8; 32],
    /// Authenticates version records (keyed BLAKE3): a record cannot be forged or altered
    /// without the key.
    pub records: [u8; 32],
    /// Published in the store's config so a wrong key is reported before any chunk is read.
    pub check: String,
}

impl Keys {
    /// Reads a key file: 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).
    pub fn load(path: &Path) -> Result<Keys, String> {
        let raw = std::fs::read(path)
            .map_err(|e| format!("encryption key file {}: {e}", path.display()))?;
        let text = String::from_utf8_lossy(&raw);
        let master: [u8; 32] = if raw.len() == 32 {
            raw.as_slice().try_into().unwrap()
        } else if let Some(bytes) = hex_decode(text.trim()).filter(|b| b.len() == 32) {
            bytes.try_into().unwrap()
        } else {
            return Err(format!(
                "encryption key file {}: expected 32 bytes or 64 hex digits, found {} bytes",
                path.display(),
                raw.len()
            ));
        };
        Ok(Keys::from_master(&master))
    }

    pub fn from_master(master: &[u8; 32]) -> Keys {
        let enc = blake3::derive_key("hamal chunk store 2026 encryption", master);
        let check = blake3::derive_key("hamal chunk store 2026 key check", master);
        Keys {
            cipher: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &enc).expect("32-byte key")),
            address: blake3::derive_key("hamal chunk store 2026 address", master),
            records: blake3::derive_key("hamal chunk store 2026 version records", master),
            check: hex(&check[..16]),
        }
    }
}

/// Encodes and decodes stored objects for one store.
#[derive(Clone)]
pub struct Codec {
    /// zstd level; 0 stores plain bytes.
    pub level: i32,
    pub keys: Option<Keys>,
}

impl Codec {
    /// The object name of `plain`.
    pub fn address(&self, plain: &[u8]) -> Digest {
        self.hasher().digest(plain)
    }

    pub fn hasher(&self) -> ChunkHasher {
        match &self.keys {
            Some(k) => ChunkHasher::KeyedBlake3(k.address),
            None => ChunkHasher::Plain(ChecksumKind::Blake3),
        }
    }

    /// The most bytes the object for `plain_len` bytes takes.
    pub fn max_len(&self, plain_len: usize) -> usize {
        match self.keys {
            Some(_) => HEAD + NONCE + plain_len + 16,
            None => HEAD + plain_len,
        }
    }

    /// The object for `plain` as a new vector.
    pub fn encode(&self, plain: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; self.max_len(plain.len())];
        let n = self.encode_into(plain, &mut out);
        out.truncate(n);
        out
    }

    /// Builds the object for `plain` in `out` (at least [`Self::max_len`] bytes, any content)
    /// and returns its length: the body is compressed straight into place (kept only when
    /// smaller) and encrypted there, with no buffer of its own (fresh 4 MiB buffers per chunk
    /// cost their page faults; callers reuse `out`).
    pub fn encode_into(&self, plain: &[u8], out: &mut [u8]) -> usize {
        let nonce_len = if self.keys.is_some() { NONCE } else { 0 };
        let tag_len = if self.keys.is_some() { 16 } else { 0 };
        let start = HEAD + nonce_len;
        let mut flags = SIZED;
        let mut body_len = plain.len();
        if self.level > 0 && plain.len() > 1 && worth_compressing(plain) {
            // Room for one byte less than the plaintext: no room means no gain.
            let room = &mut out[start..start + plain.len() - 1];
            if let Ok(n) = zstd::bulk::compress_to_buffer(plain, room, self.level) {
                body_len = n;
                flags |= ZSTD;
            }
        }
        if flags & ZSTD == 0 {
            out[start..start + plain.len()].copy_from_slice(plain);
        }
        let len = start + body_len + tag_len;
        out[..4].copy_from_slice(MAGIC);
        out[5..HEAD].copy_from_slice(&(len as u64).to_le_bytes());
        if let Some(k) = &self.keys {
            flags |= AES;
            let mut nonce = [0u8; NONCE];
            getrandom::getrandom(&mut nonce).expect("the OS random source");
            out[HEAD..start].copy_from_slice(&nonce);
            let (body, tag) = out[start..len].split_at_mut(body_len);
            let nonce = Nonce::assume_unique_for_key(nonce); // random, never reused
            let sealed = k
                .cipher
                .seal_in_place_separate_tag(nonce, Aad::empty(), body)
                .expect("AES-GCM encrypts any length we store");
            tag.copy_from_slice(sealed.as_ref());
        }
        out[4] = flags;
        len
    }

    /// The plaintext of an object named `address`, or why it cannot be trusted. `max_len` bounds
    /// decompression (a chunk is never larger than the chunk size). Decrypts in `obj`, and a
    /// stored-raw body becomes the result in place: no 4 MiB buffer of its own per chunk.
    pub fn decode(
        &self,
        address: &Digest,
        mut obj: Vec<u8>,
        max_len: usize,
    ) -> Result<Vec<u8>, String> {
        let (start, end, zstd) = self.open(&mut obj)?;
        let plain = if zstd {
            zstd::bulk::decompress(&obj[start..end], max_len).map_err(|e| format!("zstd: {e}"))?
        } else {
            obj.copy_within(start..end, 0);
            obj.truncate(end - start);
            obj
        };
        self.check(address, &plain)?;
        Ok(plain)
    }

    /// Decodes an object named `address` straight into `out`, whose length is the plaintext's
    /// (a restore's chunk lands in the engine's buffer: no plaintext buffer, no copy of it).
    /// Decrypts in `obj`, which the caller may reuse afterwards.
    pub fn decode_into(
        &self,
        address: &Digest,
        obj: &mut [u8],
        out: &mut [u8],
    ) -> Result<(), String> {
        let (start, end, zstd) = self.open(obj)?;
        let body = &obj[start..end];
        let n = if zstd {
            // A body that inflates beyond `out` fails here: the bound of `decode`'s max_len.
            zstd::bulk::decompress_to_buffer(body, out).map_err(|e| format!("zstd: {e}"))?
        } else {
            let n = body.len().min(out.len());
            out[..n].copy_from_slice(&body[..n]);
            body.len()
        };
        if n != out.len() {
            return Err(format!("{n} bytes long, expected {}", out.len()));
        }
        self.check(address, out)
    }

    /// Checks the header of `obj` and decrypts its body in place: where the body lies and
    /// whether it is compressed.
    fn open(&self, obj: &mut [u8]) -> Result<(usize, usize, bool), String> {
        if obj.len() < 5 || &obj[..4] != MAGIC {
            return Err("not a hamal object (bad header)".into());
        }
        let flags = obj[4];
        let (mut start, mut end) = (5, obj.len());
        if flags & SIZED != 0 {
            let want = declared_len(obj).ok_or("truncated header")?;
            if want != obj.len() as u64 {
                return Err(format!("truncated: {} of {want} bytes", obj.len()));
            }
            start = HEAD;
        }
        if flags & AES != 0 {
            let k = self
                .keys
                .as_ref()
                .ok_or("object is encrypted but no key is set")?;
            if end - start < NONCE + 16 {
                return Err("encrypted object is truncated".into());
            }
            let nonce =
                Nonce::try_assume_unique_for_key(&obj[start..start + NONCE]).expect("12 bytes");
            start += NONCE;
            end = start
                + k.cipher
                    .open_in_place(nonce, Aad::empty(), &mut obj[start..end])
                    .map_err(|_| "authentication failed (wrong key or damaged object)")?
                    .len();
        } else if self.keys.is_some() {
            return Err("object is not encrypted in an encrypted store".into());
        }
        Ok((start, end, flags & ZSTD != 0))
    }

    fn check(&self, address: &Digest, plain: &[u8]) -> Result<(), String> {
        match &self.address(plain) == address {
            true => Ok(()),
            false => Err("content does not match its hash".into()),
        }
    }
}

/// Whether compressing `plain` can pay. Random or already compressed data costs zstd as much
/// time as any other and gains nothing: 28% of the CPU samples of a first backup of such data
/// (`perf record`). 32 samples of 4 KiB spread evenly across the chunk are compressed one by one
/// (zstd level 1): when together they shrink by less than 2%, the chunk is stored as it is. A
/// compressible stretch as long as a sample and the gap to the next (132 KiB in a 4 MiB chunk)
/// holds one of them, which alone shrinks the samples by 3% if it packs to nothing. Inputs
/// under 512 KiB are always tried. (One call over all samples at once misses a compressible
/// sample at the end: zstd's fast levels skip ahead ever faster through data without matches.)
fn worth_compressing(plain: &[u8]) -> bool {
    if plain.len() < 4 * SAMPLES * SAMPLE {
        return true;
    }
    thread_local! {
        /// A compressor and room for one sample, kept: each check is 32 small calls.
        static PROBE: RefCell<Option<(zstd::bulk::Compressor<'static>, Vec<u8>)>> =
            const { RefCell::new(None) };
    }
    PROBE.with_borrow_mut(|probe| {
        if probe.is_none() {
            let room = vec![0; zstd::zstd_safe::compress_bound(SAMPLE)];
            *probe = zstd::bulk::Compressor::new(1).ok().map(|z| (z, room));
        }
        let Some((zstd, room)) = probe.as_mut() else {
            return true;
        };
        let step = (plain.len() - SAMPLE) / (SAMPLES - 1);
        let packed: usize = (0..SAMPLES)
            .map(|i| {
                let sample = &plain[i * step..i * step + SAMPLE];
                zstd.compress_to_buffer(sample, room).unwrap_or(SAMPLE)
            })
            .sum();
        packed * 100 < SAMPLES * SAMPLE * 98
    })
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

pub fn parse_digest(s: &str) -> Option<Digest> {
    hex_decode(s)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes_gcm::aead::{Aead, KeyInit};
    use aes_gcm::Nonce as AesNonce;

    #[test]
    fn round_trips_and_detects_damage() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
        for keys in [None, Some(Keys::from_master(&[9; 32]))] {
            let c = Codec { level: 3, keys };
            let a = c.address(&data);
            let obj = c.encode(&data);
            assert!(
                obj.len() < data.len() / 10,
                "compressible data is compressed"
            );
            assert_eq!(c.decode(&a, obj.clone(), data.len()).unwrap(), data);
            let mut bad = obj.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert!(c.decode(&a, bad.clone(), data.len()).is_err());
            assert_eq!(declared_len(&obj), Some(obj.len() as u64));
            let cut = &obj[..obj.len() - 3];
            let e = c.decode(&a, cut.to_vec(), data.len()).unwrap_err();
            assert!(e.starts_with("truncated"), "{e}");
        }
        let plain = Codec {
            level: 0,
            keys: None,
        };
        let enc = Codec {
            level: 0,
            keys: Some(Keys::from_master(&[1; 32])),
        };
        assert_ne!(
            plain.address(&data),
            enc.address(&data),
            "keyed names hide content"
        );
        let other = Codec {
            level: 0,
            keys: Some(Keys::from_master(&[2; 32])),
        };
        let obj = enc.encode(&data);
        let e = other
            .decode(&enc.address(&data), obj, data.len())
            .unwrap_err();
        assert!(e.contains("wrong key"), "{e}");
    }

    /// `decode_into` gives what `decode` gives, compressed or raw, and refuses a plaintext of
    /// another length than its buffer's, damage and the wrong key.
    #[test]
    fn decode_into_fills_the_buffer_or_refuses() {
        let packed: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
        let mut noise = vec![0u8; 50_000];
        getrandom::getrandom(&mut noise).unwrap();
        for keys in [None, Some(Keys::from_master(&[9; 32]))] {
            let c = Codec { level: 3, keys };
            for data in [&packed, &noise] {
                let (a, obj) = (c.address(data), c.encode(data));
                let mut out = vec![7u8; data.len()];
                c.decode_into(&a, &mut obj.clone(), &mut out).unwrap();
                assert_eq!(&out, data);
                for len in [data.len() - 1, data.len() + 1] {
                    let e = c
                        .decode_into(&a, &mut obj.clone(), &mut vec![0; len])
                        .unwrap_err();
                    assert!(e.contains("expected") || e.starts_with("zstd"), "{e}");
                }
                let mut bad = obj.clone();
                bad[HEAD + 20] ^= 1;
                assert!(c.decode_into(&a, &mut bad, &mut out).is_err());
            }
        }
        let enc = Codec {
            level: 3,
            keys: Some(Keys::from_master(&[1; 32])),
        };
        let other = Codec {
            level: 3,
            keys: Some(Keys::from_master(&[2; 32])),
        };
        let e = other
            .decode_into(
                &enc.address(&packed),
                &mut enc.encode(&packed),
                &mut vec![0; packed.len()],
            )
            .unwrap_err();
        assert!(e.contains("wrong key"), "{e}");
    }

    /// A chunk of random data is stored raw without compressing all of it; any stretch of
    /// compressible data as long as a sample and the gap to the next, wherever it lies, gets
    /// the chunk compressed; small chunks are always tried.
    #[test]
    fn only_chunks_whose_samples_shrink_are_compressed() {
        const MIB: usize = 1 << 20;
        let mut noise = vec![0u8; 4 * MIB];
        getrandom::getrandom(&mut noise).unwrap();
        assert!(!worth_compressing(&noise));
        assert!(!worth_compressing(&noise[..MIB / 2 + 7]));
        assert!(worth_compressing(&noise[..MIB / 2 - 1]), "small: tried");
        let gap = (4 * MIB - SAMPLE) / (SAMPLES - 1) - SAMPLE;
        for at in [0, 1, 4 * MIB / 3, 4 * MIB - gap - SAMPLE] {
            let mut data = noise.clone();
            data[at..at + gap + SAMPLE].fill(0);
            assert!(worth_compressing(&data), "zeros at {at}");
            let mut text = noise.clone();
            for (i, b) in text[at..at + gap + SAMPLE].iter_mut().enumerate() {
                *b = b"the quick brown fox jumps over the lazy dog "[i % 44];
            }
            assert!(worth_compressing(&text), "text at {at}");
            let c = Codec {
                level: 3,
                keys: None,
            };
            let obj = c.encode(&data);
            assert_ne!(obj[4] & ZSTD, 0);
            assert!(obj.len() < data.len() - gap);
            assert_eq!(c.decode(&c.address(&data), obj, data.len()).unwrap(), data);
        }
        let c = Codec {
            level: 3,
            keys: Some(Keys::from_master(&[3; 32])),
        };
        let obj = c.encode(&noise);
        assert_eq!(obj[4] & ZSTD, 0, "stored raw");
        assert_eq!(
            c.decode(&c.address(&noise), obj, noise.len()).unwrap(),
            noise
        );
    }

    fn other_aes_gcm(master: &[u8; 32]) -> aes_gcm::Aes256Gcm {
        let enc = blake3::derive_key("hamal chunk store 2026 encryption", master);
        aes_gcm::Aes256Gcm::new_from_slice(&enc).unwrap()
    }

    /// Incompressible, tiny and empty chunks are stored raw; every object keeps the layout
    /// objects had before `encode` worked in place (nonce, then ciphertext with its tag).
    #[test]
    fn raw_bodies_and_the_layout() {
        let mut noise = vec![0u8; 70_000];
        getrandom::getrandom(&mut noise).unwrap();
        for keys in [None, Some(Keys::from_master(&[5; 32]))] {
            let sealed = keys.is_some();
            let c = Codec { level: 3, keys };
            for data in [&noise[..], &noise[..1], &[][..]] {
                let obj = c.encode(data);
                let extra = if sealed { NONCE + 16 } else { 0 };
                assert_eq!(obj.len(), HEAD + data.len() + extra, "stored raw");
                assert_eq!(obj[4] & ZSTD, 0);
                assert_eq!(
                    c.decode(&c.address(data), obj.clone(), data.len()).unwrap(),
                    data
                );
                if sealed {
                    // Another AES-GCM implementation (the one stores were written with
                    // before) opens what this one sealed, and the reverse.
                    let (nonce, rest) = obj[HEAD..].split_at(NONCE);
                    let other = other_aes_gcm(&[5; 32]);
                    let opened = other.decrypt(AesNonce::from_slice(nonce), rest).unwrap();
                    assert_eq!(opened, data);
                    let mut old = obj[..HEAD + NONCE].to_vec();
                    old.extend(other.encrypt(AesNonce::from_slice(nonce), data).unwrap());
                    assert_eq!(c.decode(&c.address(data), old, data.len()).unwrap(), data);
                } else {
                    assert_eq!(&obj[HEAD..], data);
                }
            }
        }
    }
}
