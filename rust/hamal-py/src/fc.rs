//! FusionCompute helper for the adapter: a `getcbt` bitmap page decoded into byte extents
//! (a 2 TiB volume's bitmap is millions of bits: decoded here, not bit by bit in Python).

use hamal_core::fc::bitmap;
use pyo3::prelude::*;

/// `(extents, ones)`: the runs of set bits among the first `bits` of `bitmap` as `(offset,
/// length)` byte pairs (bit `i` is block `start_block + i` of `block_size` bytes), clipped to
/// `disk_size`, and the number of set bits.
#[pyfunction]
pub fn fc_bitmap_extents(
    py: Python<'_>,
    bitmap: &[u8],
    bits: u64,
    block_size: u64,
    start_block: u64,
    disk_size: u64,
) -> (Vec<(u64, u64)>, u64) {
    let (extents, ones) =
        py.detach(|| bitmap::extents(bitmap, bits, block_size, start_block, disk_size));
    (
        extents.into_iter().map(|e| (e.offset, e.len)).collect(),
        ones,
    )
}
