//! Per-chunk checksums and zero detection.

use sha2::Digest as _;

/// A 32-byte chunk digest.
pub type Digest = [u8; 32];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChecksumKind {
    #[default]
    Blake3,
    Sha256,
}

impl ChecksumKind {
    pub fn parse(s: &str) -> Option<ChecksumKind> {
        match s.to_ascii_lowercase().as_str() {
            "blake3" => Some(ChecksumKind::Blake3),
            "sha256" | "sha-256" => Some(ChecksumKind::Sha256),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ChecksumKind::Blake3 => "blake3",
            ChecksumKind::Sha256 => "sha256",
        }
    }

    /// Digest of the pieces of one chunk, taken as one byte string.
    pub fn digest<'a>(self, parts: impl IntoIterator<Item = &'a [u8]>) -> Digest {
        match self {
            ChecksumKind::Blake3 => {
                let mut h = blake3::Hasher::new();
                parts.into_iter().for_each(|p| {
                    h.update(p);
                });
                *h.finalize().as_bytes()
            }
            ChecksumKind::Sha256 => {
                let mut h = sha2::Sha256::new();
                parts.into_iter().for_each(|p| h.update(p));
                h.finalize().into()
            }
        }
    }
}

/// How the engine names a chunk: a plain checksum, or the keyed BLAKE3 of an encrypted chunk
/// store (so stored names do not reveal equal plaintext).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkHasher {
    Plain(ChecksumKind),
    KeyedBlake3([u8; 32]),
}

impl ChunkHasher {
    pub fn name(self) -> &'static str {
        match self {
            ChunkHasher::Plain(k) => k.name(),
            ChunkHasher::KeyedBlake3(_) => "blake3-keyed",
        }
    }

    pub fn digest(self, data: &[u8]) -> Digest {
        match self {
            ChunkHasher::Plain(k) => k.digest([data]),
            ChunkHasher::KeyedBlake3(key) => *blake3::keyed_hash(&key, data).as_bytes(),
        }
    }
}

/// Order-independent digest of a whole sync: the XOR of `blake3(chunk index || chunk digest)`
/// over all chunks, so parallel writers and resumed runs give the same value as `verify`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContentDigest(pub Digest);

impl ContentDigest {
    pub fn add(&mut self, chunk_index: u64, chunk: &Digest) {
        let mut h = blake3::Hasher::new();
        h.update(&chunk_index.to_le_bytes());
        h.update(chunk);
        for (a, b) in self.0.iter_mut().zip(h.finalize().as_bytes()) {
            *a ^= b;
        }
    }

    pub fn merge(&mut self, other: &ContentDigest) {
        for (a, b) in self.0.iter_mut().zip(other.0.iter()) {
            *a ^= b;
        }
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// True when every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned middle.
        unsafe { buf.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v[1..]));
        v[4098] = 1;
        assert!(!is_zero(&v[3..]));
        assert!(is_zero(&v[..4098]));
    }

    #[test]
    fn digest_of_parts_equals_digest_of_whole() {
        for k in [ChecksumKind::Blake3, ChecksumKind::Sha256] {
            assert_eq!(k.digest([&b"ab"[..], b"cd"]), k.digest([&b"abcd"[..]]));
            assert_ne!(k.digest([&b"abcd"[..]]), k.digest([&b"abce"[..]]));
        }
    }

    #[test]
    fn content_digest_is_order_independent() {
        let (d1, d2) = ([1u8; 32], [2u8; 32]);
        let mut a = ContentDigest::default();
        a.add(0, &d1);
        a.add(1, &d2);
        let mut b = ContentDigest::default();
        b.add(1, &d2);
        b.add(0, &d1);
        assert_eq!(a, b);
        let mut c = ContentDigest::default();
        c.add(0, &d2);
        c.add(1, &d1);
        assert_ne!(a, c);
    }
}
