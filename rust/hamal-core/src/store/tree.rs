//! A version's chunk list as a tree of content-addressed index pages.
//!
//! A page holds up to [`FANOUT`] 32-byte entries (trailing zero entries are left out). Leaf
//! entries name chunks; inner entries name pages one level down. The all-zero entry means "all
//! zeros" at every level, so a sparse disk has few pages. An incremental rewrites only the pages
//! on the path to a changed chunk: 1% of a 64 TiB disk changed touches about that many leaves,
//! an unchanged disk writes no page at all.

use crate::checksum::Digest;
use crate::Result;

pub const FANOUT: u64 = 1024;
pub const ZERO: Digest = [0; 32];

/// Loads and stores index pages (the chunk store, or a map in tests).
pub trait PageIo {
    /// The page's entries, padded with zero entries to `FANOUT`.
    fn load_page(&self, addr: &Digest) -> Result<Vec<Digest>>;
    /// Stores a page (trailing zeros trimmed) and returns its address, or `ZERO` when every
    /// entry is zero.
    fn store_page(&self, entries: &[Digest]) -> Result<Digest>;
}

/// Levels of a tree for `chunks` chunks (a leaf is level 1).
pub fn depth_for(chunks: u64) -> u32 {
    let (mut depth, mut span) = (1, FANOUT);
    while span < chunks {
        span = span.saturating_mul(FANOUT);
        depth += 1;
    }
    depth
}

/// Chunks under one entry of a page at `level`.
fn child_span(level: u32) -> u64 {
    FANOUT.pow(level - 1)
}

/// The tree `root` with `changes` (sorted by chunk index) applied; returns the new root.
pub fn update(
    io: &dyn PageIo,
    root: Digest,
    depth: u32,
    changes: &[(u64, Digest)],
) -> Result<Digest> {
    update_node(io, root, depth, 0, changes)
}

fn update_node(
    io: &dyn PageIo,
    node: Digest,
    level: u32,
    base: u64,
    changes: &[(u64, Digest)],
) -> Result<Digest> {
    if changes.is_empty() {
        return Ok(node);
    }
    let mut entries = if node == ZERO {
        vec![ZERO; FANOUT as usize]
    } else {
        io.load_page(&node)?
    };
    let span = child_span(level);
    let mut rest = changes;
    while let Some(&(first, _)) = rest.first() {
        let slot = (first - base) / span;
        let slot_end = base + (slot + 1) * span;
        let n = rest.partition_point(|(i, _)| *i < slot_end);
        let (group, tail) = rest.split_at(n);
        entries[slot as usize] = if level == 1 {
            group[group.len() - 1].1
        } else {
            update_node(
                io,
                entries[slot as usize],
                level - 1,
                base + slot * span,
                group,
            )?
        };
        rest = tail;
    }
    io.store_page(&entries)
}

/// The entry for chunk `index`.
pub fn lookup(io: &dyn PageIo, root: Digest, depth: u32, index: u64) -> Result<Digest> {
    let mut node = root;
    for level in (1..=depth).rev() {
        if node == ZERO {
            return Ok(ZERO);
        }
        let slot = (index / child_span(level)) % FANOUT;
        node = io.load_page(&node)?[slot as usize];
    }
    Ok(node)
}

/// Visits every page (`on_page`) and every non-zero chunk entry (`on_chunk(index, addr)`),
/// in disk order.
pub fn walk(
    io: &dyn PageIo,
    root: Digest,
    depth: u32,
    on_page: &mut dyn FnMut(&Digest),
    on_chunk: &mut dyn FnMut(u64, &Digest) -> Result<()>,
) -> Result<()> {
    walk_node(io, root, depth, 0, on_page, on_chunk)
}

fn walk_node(
    io: &dyn PageIo,
    node: Digest,
    level: u32,
    base: u64,
    on_page: &mut dyn FnMut(&Digest),
    on_chunk: &mut dyn FnMut(u64, &Digest) -> Result<()>,
) -> Result<()> {
    if node == ZERO {
        return Ok(());
    }
    on_page(&node);
    let entries = io.load_page(&node)?;
    let span = child_span(level);
    for (slot, e) in entries.iter().enumerate().filter(|(_, e)| **e != ZERO) {
        let index = base + slot as u64 * span;
        if level == 1 {
            on_chunk(index, e)?;
        } else {
            walk_node(io, *e, level - 1, index, on_page, on_chunk)?;
        }
    }
    Ok(())
}

/// Page bytes: the entries up to the last non-zero one.
pub fn page_bytes(entries: &[Digest]) -> Vec<u8> {
    let used = entries
        .iter()
        .rposition(|e| *e != ZERO)
        .map_or(0, |i| i + 1);
    entries[..used].concat()
}

/// Entries of page bytes, padded to `FANOUT`; `None` when the length is not whole entries.
pub fn page_entries(bytes: &[u8]) -> Option<Vec<Digest>> {
    if bytes.len() % 32 != 0 || bytes.len() > (FANOUT * 32) as usize {
        return None;
    }
    let mut v: Vec<Digest> = bytes
        .chunks_exact(32)
        .map(|c| c.try_into().unwrap())
        .collect();
    v.resize(FANOUT as usize, ZERO);
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::{BTreeMap, HashMap};

    #[derive(Default)]
    struct MemPages {
        pages: RefCell<HashMap<Digest, Vec<u8>>>,
        stored: RefCell<usize>,
    }

    impl PageIo for MemPages {
        fn load_page(&self, addr: &Digest) -> Result<Vec<Digest>> {
            Ok(page_entries(&self.pages.borrow()[addr]).unwrap())
        }
        fn store_page(&self, entries: &[Digest]) -> Result<Digest> {
            let bytes = page_bytes(entries);
            if bytes.is_empty() {
                return Ok(ZERO);
            }
            let a = *blake3::hash(&bytes).as_bytes();
            *self.stored.borrow_mut() += 1;
            self.pages.borrow_mut().insert(a, bytes);
            Ok(a)
        }
    }

    fn addr(i: u64) -> Digest {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    #[test]
    fn updates_touch_only_the_changed_path_and_read_back() {
        let io = MemPages::default();
        let chunks = 3 * FANOUT * FANOUT + 17; // three levels
        let depth = depth_for(chunks);
        assert_eq!(depth, 3);
        let mut model = BTreeMap::new();
        let first: Vec<_> = [0, 5, FANOUT, 2 * FANOUT * FANOUT + 3, chunks - 1]
            .iter()
            .map(|&i| (i, addr(i)))
            .collect();
        model.extend(first.iter().cloned());
        let root = update(&io, ZERO, depth, &first).unwrap();
        *io.stored.borrow_mut() = 0;
        let second = vec![(5, ZERO), (6, addr(66))];
        model.remove(&5);
        model.insert(6, addr(66));
        let root2 = update(&io, root, depth, &second).unwrap();
        assert_eq!(
            *io.stored.borrow(),
            depth as usize,
            "one page per level rewritten"
        );
        assert_eq!(
            update(&io, root2, depth, &[]).unwrap(),
            root2,
            "no change, same root"
        );
        let mut seen = BTreeMap::new();
        walk(&io, root2, depth, &mut |_| {}, &mut |i, a| {
            seen.insert(i, *a);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, model);
        for i in [0, 5, 6, FANOUT, FANOUT + 1, chunks - 1] {
            assert_eq!(
                lookup(&io, root2, depth, i).unwrap(),
                model.get(&i).copied().unwrap_or(ZERO),
                "chunk {i}"
            );
        }
        // Clearing every chunk gives the empty tree.
        let clear: Vec<_> = model.keys().map(|&i| (i, ZERO)).collect();
        assert_eq!(update(&io, root2, depth, &clear).unwrap(), ZERO);
    }
}
