//! FusionCompute CBT bitmaps (`getcbt`) as byte extents. Bit `i` stands for block
//! `start_block + i` of `block_size` bytes (`sectorOfBlock` x 512). UNVERIFIED: the bit order;
//! this project reads bit `i` as bit `i % 8` of byte `i / 8` (least significant first), as the
//! fake VRM writes it.

use crate::extent::Extent;

/// The runs of set bits among the first `bits` of `bitmap`, as byte extents clipped to
/// `disk_size`, and the number of set bits (to check against the answer's `bit1Num`).
pub fn extents(
    bitmap: &[u8],
    bits: u64,
    block_size: u64,
    start_block: u64,
    disk_size: u64,
) -> (Vec<Extent>, u64) {
    let bits = bits.min(bitmap.len() as u64 * 8);
    let mut runs: Vec<(u64, u64)> = Vec::new(); // [first, end) bit numbers
    let mut ones = 0u64;
    let push = |first: u64, end: u64, runs: &mut Vec<(u64, u64)>| match runs.last_mut() {
        Some(last) if last.1 == first => last.1 = end,
        _ => runs.push((first, end)),
    };
    for (w, chunk) in bitmap.chunks(8).enumerate() {
        let base = w as u64 * 64;
        if base >= bits {
            break;
        }
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        let mut v = u64::from_le_bytes(word);
        if bits - base < 64 {
            v &= (1u64 << (bits - base)) - 1;
        }
        ones += u64::from(v.count_ones());
        if v == u64::MAX {
            push(base, base + 64, &mut runs);
            continue;
        }
        while v != 0 {
            let start = u64::from(v.trailing_zeros());
            let len = u64::from((!(v >> start)).trailing_zeros());
            push(base + start, base + start + len, &mut runs);
            v = if start + len >= 64 {
                0
            } else {
                v & !((1u64 << (start + len)) - 1)
            };
        }
    }
    let out = runs
        .into_iter()
        .filter_map(|(a, b)| {
            let off = (start_block + a).saturating_mul(block_size);
            let end = (start_block + b).saturating_mul(block_size).min(disk_size);
            (off < end).then(|| Extent::new(off, end - off))
        })
        .collect();
    (out, ones)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn runs_become_extents() {
        // Blocks 0, 2-3 and 8-70 set (bit 70 in the 9th byte); the disk ends in block 58.
        let mut bm = vec![0u8; 16];
        for b in [0usize, 2, 3].into_iter().chain(8..=70) {
            bm[b / 8] |= 1 << (b % 8);
        }
        let (e, ones) = extents(&bm, 128, 512, 0, 30_000);
        assert_eq!(ones, 66);
        assert_eq!(
            e,
            vec![
                Extent::new(0, 512),
                Extent::new(1024, 1024),
                Extent::new(4096, 30_000 - 4096)
            ]
        );
        // A page starting at block 100 shifts everything; bits past `bits` are ignored.
        let (e, ones) = extents(&[0xff], 4, 1 << 20, 100, u64::MAX);
        assert_eq!((e, ones), (vec![Extent::new(100 << 20, 4 << 20)], 4));
    }

    proptest! {
        #[test]
        fn matches_a_bit_by_bit_decode(bm in proptest::collection::vec(any::<u8>(), 0..40), cut in 0u64..400) {
            let bits = cut.min(bm.len() as u64 * 8);
            let (got, ones) = extents(&bm, cut, 4096, 3, u64::MAX);
            let set: Vec<u64> = (0..bits).filter(|i| bm[(*i / 8) as usize] >> (i % 8) & 1 == 1).collect();
            prop_assert_eq!(ones, set.len() as u64);
            let expanded: Vec<u64> = got.iter().flat_map(|e| (e.offset / 4096..e.end() / 4096).map(|b| b - 3)).collect();
            prop_assert_eq!(expanded, set);
            for w in got.windows(2) {
                prop_assert!(w[0].end() < w[1].offset, "runs are merged");
            }
        }
    }
}
