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
/// Pages a commit reads, or holds before it writes them, at once (64 pages of up to 32 KiB).
const PAGES_AT_ONCE: usize = 64;

/// Loads and stores index pages (the chunk store, or a map in tests).
pub trait PageIo {
    /// The page's entries, padded with zero entries to `FANOUT`.
    fn load_page(&self, addr: &Digest) -> Result<Vec<Digest>>;
    /// Several pages' entries in the order of `addrs`, fetched at once where the store can.
    fn load_pages(&self, addrs: &[Digest]) -> Result<Vec<Vec<Digest>>> {
        addrs.iter().map(|a| self.load_page(a)).collect()
    }
    /// The address of a page's bytes (`page_bytes`, not empty).
    fn page_address(&self, bytes: &[u8]) -> Digest;
    /// Stores pages' bytes under their `page_address`, at once where the store can.
    fn store_pages(&self, pages: Vec<(Digest, Vec<u8>)>) -> Result<()>;
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
/// A page's changed children are read `PAGES_AT_ONCE` at a time and the new pages written as
/// many at a time: one at a time, an incremental on a large disk waited a round trip per page.
pub fn update(
    io: &dyn PageIo,
    root: Digest,
    depth: u32,
    changes: &[(u64, Digest)],
) -> Result<Digest> {
    if changes.is_empty() {
        return Ok(root);
    }
    let page = match root {
        ZERO => None,
        r => Some(io.load_page(&r)?),
    };
    let mut written = Vec::new();
    let root = update_node(io, page, depth, 0, changes, &mut written)?;
    io.store_pages(written)?;
    Ok(root)
}

/// Applies `changes` (not empty) to a node whose page is `page` (`None`: all zeros).
fn update_node(
    io: &dyn PageIo,
    page: Option<Vec<Digest>>,
    level: u32,
    base: u64,
    changes: &[(u64, Digest)],
    written: &mut Vec<(Digest, Vec<u8>)>,
) -> Result<Digest> {
    let mut entries = page.unwrap_or_else(|| vec![ZERO; FANOUT as usize]);
    let span = child_span(level);
    let groups: Vec<_> = by_slot(changes, base, span).collect();
    if level == 1 {
        for (slot, group) in groups {
            entries[slot] = group[group.len() - 1].1;
        }
    } else {
        for window in groups.chunks(PAGES_AT_ONCE) {
            let existing: Vec<Digest> = window
                .iter()
                .map(|&(slot, _)| entries[slot])
                .filter(|child| *child != ZERO)
                .collect();
            let mut pages = io.load_pages(&existing)?.into_iter();
            for &(slot, group) in window {
                let child =
                    (entries[slot] != ZERO).then(|| pages.next().expect("one page per child"));
                let child_base = base + slot as u64 * span;
                entries[slot] = update_node(io, child, level - 1, child_base, group, written)?;
            }
        }
    }
    let bytes = page_bytes(&entries);
    if bytes.is_empty() {
        return Ok(ZERO);
    }
    let addr = io.page_address(&bytes);
    written.push((addr, bytes));
    // Bounded memory for a commit that rewrites thousands of pages (a large full sync).
    if written.len() >= PAGES_AT_ONCE {
        io.store_pages(std::mem::take(written))?;
    }
    Ok(addr)
}

/// `changes` (sorted) split by the entry they fall under in a page whose first chunk is
/// `base` and whose entries cover `span` chunks each.
fn by_slot(
    changes: &[(u64, Digest)],
    base: u64,
    span: u64,
) -> impl Iterator<Item = (usize, &[(u64, Digest)])> {
    let mut rest = changes;
    std::iter::from_fn(move || {
        let &(first, _) = rest.first()?;
        let slot = (first - base) / span;
        let n = rest.partition_point(|(i, _)| *i < base + (slot + 1) * span);
        let (group, tail) = rest.split_at(n);
        rest = tail;
        Some((slot as usize, group))
    })
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
        /// Pages asked for by each `load_pages`.
        loaded: RefCell<Vec<usize>>,
        /// Pages written by each `store_pages`.
        batches: RefCell<Vec<usize>>,
    }

    impl PageIo for MemPages {
        fn load_page(&self, addr: &Digest) -> Result<Vec<Digest>> {
            Ok(page_entries(&self.pages.borrow()[addr]).unwrap())
        }
        fn load_pages(&self, addrs: &[Digest]) -> Result<Vec<Vec<Digest>>> {
            self.loaded.borrow_mut().push(addrs.len());
            addrs.iter().map(|a| self.load_page(a)).collect()
        }
        fn page_address(&self, bytes: &[u8]) -> Digest {
            *blake3::hash(bytes).as_bytes()
        }
        fn store_pages(&self, pages: Vec<(Digest, Vec<u8>)>) -> Result<()> {
            *self.stored.borrow_mut() += pages.len();
            self.batches.borrow_mut().push(pages.len());
            for (a, bytes) in pages {
                assert_eq!(a, self.page_address(&bytes));
                self.pages.borrow_mut().insert(a, bytes);
            }
            Ok(())
        }
    }

    fn addr(i: u64) -> Digest {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    #[test]
    fn a_large_commit_writes_its_pages_in_bounded_batches() {
        let io = MemPages::default();
        let depth = 2;
        let changes: Vec<_> = (0..200).map(|l| (l * FANOUT + 1, addr(l))).collect();
        let root = update(&io, ZERO, depth, &changes).unwrap();
        assert_eq!(*io.stored.borrow(), 201, "200 leaves and the root");
        let batches = io.batches.borrow().clone();
        assert!(batches.iter().all(|&n| n <= 64), "{batches:?}");
        assert_eq!(batches.iter().sum::<usize>(), 201);
        for (i, a) in &changes {
            assert_eq!(lookup(&io, root, depth, *i).unwrap(), *a);
        }
        // The 200 leaves changed again: read 64 at a time, not one by one.
        io.loaded.borrow_mut().clear();
        let again: Vec<_> = (0..200).map(|l| (l * FANOUT + 2, addr(l + 500))).collect();
        let root2 = update(&io, root, depth, &again).unwrap();
        assert_eq!(*io.loaded.borrow(), vec![64, 64, 64, 8]);
        for (i, a) in changes.iter().chain(&again) {
            assert_eq!(lookup(&io, root2, depth, *i).unwrap(), *a);
        }
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
        io.loaded.borrow_mut().clear();
        let second = vec![(5, ZERO), (6, addr(66)), (2 * FANOUT * FANOUT + 4, addr(7))];
        model.remove(&5);
        model.insert(6, addr(66));
        model.insert(2 * FANOUT * FANOUT + 4, addr(7));
        let root2 = update(&io, root, depth, &second).unwrap();
        assert_eq!(
            *io.stored.borrow(),
            2 * depth as usize - 1,
            "the root and the pages on the two changed paths rewritten"
        );
        assert_eq!(
            *io.loaded.borrow(),
            vec![2, 1, 1],
            "a page's changed children fetched at once"
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
