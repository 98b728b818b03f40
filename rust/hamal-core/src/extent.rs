//! Extent maps: sorted, non-overlapping, merged byte ranges of a disk.
//!
//! Every change-tracking source (SEEK_DATA, CBT, `rbd diff`, NBD block status) hands the engine an
//! [`ExtentMap`]; the engine cuts it along the chunk grid with [`ExtentMap::chunks`].

use std::fmt;

/// One byte range `[offset, offset + len)`; `len` is never zero inside a map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn new(offset: u64, len: u64) -> Self {
        Extent { offset, len }
    }

    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}, +{})", self.offset, self.len)
    }
}

/// A set of bytes, kept as sorted, merged extents (adjacent ranges are joined).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExtentMap {
    extents: Vec<Extent>,
}

impl ExtentMap {
    pub fn new() -> Self {
        Self::default()
    }

    /// The single extent `[0, size)`, or an empty map for size 0.
    pub fn whole(size: u64) -> Self {
        Self::from_extents([Extent::new(0, size)])
    }

    /// Builds a map from ranges in any order; overlaps and adjacency are merged, empty ones dropped.
    pub fn from_extents(ranges: impl IntoIterator<Item = Extent>) -> Self {
        let mut v: Vec<Extent> = ranges.into_iter().filter(|e| e.len > 0).collect();
        v.sort_by_key(|e| e.offset);
        let mut out: Vec<Extent> = Vec::with_capacity(v.len());
        for e in v {
            match out.last_mut() {
                Some(last) if e.offset <= last.end() => {
                    let end = last.end().max(e.end());
                    last.len = end - last.offset;
                }
                _ => out.push(e),
            }
        }
        ExtentMap { extents: out }
    }

    /// Appends a range that starts at or after the current end (the cheap path for sources
    /// that report extents in order); falls back to a full merge otherwise.
    pub fn push(&mut self, e: Extent) {
        if e.len == 0 {
            return;
        }
        match self.extents.last_mut() {
            Some(last) if e.offset == last.end() => last.len += e.len,
            Some(last) if e.offset < last.end() => {
                let mut v = std::mem::take(&mut self.extents);
                v.push(e);
                *self = Self::from_extents(v);
            }
            _ => self.extents.push(e),
        }
    }

    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Total number of bytes covered.
    pub fn total_len(&self) -> u64 {
        self.extents.iter().map(|e| e.len).sum()
    }

    pub fn union(&self, other: &ExtentMap) -> ExtentMap {
        Self::from_extents(self.extents.iter().chain(other.extents.iter()).copied())
    }

    pub fn intersect(&self, other: &ExtentMap) -> ExtentMap {
        let (a, b) = (&self.extents, &other.extents);
        let (mut i, mut j) = (0, 0);
        let mut out = ExtentMap::new();
        while i < a.len() && j < b.len() {
            let start = a[i].offset.max(b[j].offset);
            let end = a[i].end().min(b[j].end());
            if start < end {
                out.extents.push(Extent::new(start, end - start));
            }
            if a[i].end() < b[j].end() {
                i += 1;
            } else {
                j += 1;
            }
        }
        out
    }

    pub fn subtract(&self, other: &ExtentMap) -> ExtentMap {
        let mut out = ExtentMap::new();
        let b = &other.extents;
        let mut j = 0;
        for e in &self.extents {
            let mut cur = e.offset;
            let end = e.end();
            while j < b.len() && b[j].end() <= cur {
                j += 1;
            }
            let mut k = j;
            while k < b.len() && b[k].offset < end {
                if b[k].offset > cur {
                    out.extents.push(Extent::new(cur, b[k].offset - cur));
                }
                cur = cur.max(b[k].end());
                k += 1;
            }
            if cur < end {
                out.extents.push(Extent::new(cur, end - cur));
            }
        }
        out
    }

    /// Widens every extent outwards to multiples of `grid`, clipped to `limit` (the disk size).
    pub fn align_to_grid(&self, grid: u64, limit: u64) -> ExtentMap {
        assert!(grid > 0, "grid must be positive");
        Self::from_extents(self.extents.iter().map(|e| {
            let start = e.offset / grid * grid;
            let end = e.end().div_ceil(grid).saturating_mul(grid).min(limit);
            Extent::new(start, end.saturating_sub(start))
        }))
    }

    /// Iterates the map cut along a grid of `chunk_size`: one [`ChunkWork`] per touched chunk,
    /// holding the pieces of the map that fall inside that chunk.
    pub fn chunks(&self, chunk_size: u64) -> ChunkIter<'_> {
        assert!(chunk_size > 0, "chunk size must be positive");
        ChunkIter {
            extents: &self.extents,
            chunk_size,
            pos: 0,
            cursor: self.extents.first().map_or(0, |e| e.offset),
        }
    }

    /// Number of chunks [`Self::chunks`] yields, without allocating.
    pub fn chunk_count(&self, chunk_size: u64) -> u64 {
        let mut count = 0;
        let mut last: Option<u64> = None;
        for e in &self.extents {
            let first = e.offset / chunk_size;
            let lastc = (e.end() - 1) / chunk_size;
            let start = match last {
                Some(l) if l == first => first + 1,
                _ => first,
            };
            if lastc >= start {
                count += lastc - start + 1;
            }
            last = Some(lastc);
        }
        count
    }
}

/// The part of an extent map that falls in one chunk of the grid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkWork {
    /// Chunk number: `offset / chunk_size`.
    pub index: u64,
    /// Pieces inside `[index * chunk_size, (index + 1) * chunk_size)`, sorted.
    pub ranges: Vec<Extent>,
}

impl ChunkWork {
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn first_offset(&self) -> u64 {
        self.ranges.first().map_or(0, |r| r.offset)
    }
}

/// Iterator returned by [`ExtentMap::chunks`]; it walks the extents once and allocates only
/// the per-chunk range list.
pub struct ChunkIter<'a> {
    extents: &'a [Extent],
    chunk_size: u64,
    pos: usize,
    cursor: u64,
}

impl Iterator for ChunkIter<'_> {
    type Item = ChunkWork;

    fn next(&mut self) -> Option<ChunkWork> {
        let first = self.extents.get(self.pos)?;
        let start = self.cursor.max(first.offset);
        let index = start / self.chunk_size;
        let chunk_end = (index + 1).saturating_mul(self.chunk_size);
        let mut ranges = Vec::with_capacity(1);
        while let Some(e) = self.extents.get(self.pos) {
            let s = self.cursor.max(e.offset);
            if s >= chunk_end {
                break;
            }
            let end = e.end().min(chunk_end);
            ranges.push(Extent::new(s, end - s));
            if e.end() <= chunk_end {
                self.pos += 1;
                self.cursor = self.extents.get(self.pos).map_or(u64::MAX, |n| n.offset);
            } else {
                self.cursor = chunk_end;
                break;
            }
        }
        Some(ChunkWork { index, ranges })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(pairs: &[(u64, u64)]) -> ExtentMap {
        ExtentMap::from_extents(pairs.iter().map(|&(o, l)| Extent::new(o, l)))
    }

    /// Reference model: the set of bytes as a bitmap over a small universe.
    fn bits(m: &ExtentMap, universe: u64) -> Vec<bool> {
        let mut v = vec![false; universe as usize];
        for e in m.extents() {
            for b in e.offset..e.end() {
                v[b as usize] = true;
            }
        }
        v
    }

    fn arb_map() -> impl Strategy<Value = ExtentMap> {
        prop::collection::vec((0u64..200, 0u64..40), 0..12)
            .prop_map(|v| ExtentMap::from_extents(v.into_iter().map(|(o, l)| Extent::new(o, l))))
    }

    #[test]
    fn merges_overlap_and_adjacency() {
        assert_eq!(
            map(&[(10, 5), (0, 10), (12, 10), (30, 0)]).extents(),
            &[Extent::new(0, 22)]
        );
    }

    #[test]
    fn chunk_split_keeps_fragments_of_one_chunk_together() {
        let m = map(&[(0, 4), (8, 4), (14, 6)]);
        let chunks: Vec<_> = m.chunks(16).collect();
        assert_eq!(chunks.len(), 2);
        assert_eq!(
            chunks[0].ranges,
            vec![Extent::new(0, 4), Extent::new(8, 4), Extent::new(14, 2)]
        );
        assert_eq!(
            chunks[1],
            ChunkWork {
                index: 1,
                ranges: vec![Extent::new(16, 4)]
            }
        );
    }

    proptest! {
        #[test]
        fn set_operations_match_bitmap_model(a in arb_map(), b in arb_map()) {
            let u = 256;
            let (ba, bb) = (bits(&a, u), bits(&b, u));
            let un: Vec<bool> = ba.iter().zip(&bb).map(|(x, y)| *x || *y).collect();
            let it: Vec<bool> = ba.iter().zip(&bb).map(|(x, y)| *x && *y).collect();
            let sb: Vec<bool> = ba.iter().zip(&bb).map(|(x, y)| *x && !*y).collect();
            prop_assert_eq!(bits(&a.union(&b), u), un);
            prop_assert_eq!(bits(&a.intersect(&b), u), it);
            prop_assert_eq!(bits(&a.subtract(&b), u), sb);
            for m in [a.union(&b), a.intersect(&b), a.subtract(&b)] {
                for w in m.extents().windows(2) {
                    prop_assert!(w[0].end() < w[1].offset, "not sorted and merged: {:?}", m);
                }
                prop_assert!(m.extents().iter().all(|e| e.len > 0));
            }
        }

        #[test]
        fn chunks_cover_exactly_the_map(a in arb_map(), chunk in 1u64..50) {
            let chunks: Vec<_> = a.chunks(chunk).collect();
            prop_assert_eq!(chunks.len() as u64, a.chunk_count(chunk));
            let rebuilt = ExtentMap::from_extents(chunks.iter().flat_map(|c| c.ranges.clone()));
            prop_assert_eq!(&rebuilt, &a);
            for w in chunks.windows(2) {
                prop_assert!(w[0].index < w[1].index);
            }
            for c in &chunks {
                for r in &c.ranges {
                    prop_assert_eq!(r.offset / chunk, c.index);
                    prop_assert_eq!((r.end() - 1) / chunk, c.index);
                }
            }
        }

        #[test]
        fn grid_alignment_covers_and_is_aligned(a in arb_map(), grid in 1u64..50) {
            let limit = 250;
            let al = a.align_to_grid(grid, limit);
            let clipped = a.intersect(&ExtentMap::whole(limit));
            prop_assert_eq!(clipped.subtract(&al), ExtentMap::new());
            for e in al.extents() {
                prop_assert_eq!(e.offset % grid, 0);
                prop_assert!(e.end() % grid == 0 || e.end() == limit);
            }
        }
    }
}
