//! Proof that a read was answered: the data and hole chunks of one request must cover it exactly
//! once, each inside it. Bytes no chunk covered would keep whatever the buffer held before.

use std::collections::BTreeMap;

/// The parts of `[0, len)` answered so far.
#[derive(Debug, Default)]
pub(super) struct Coverage {
    len: u64,
    /// start -> end of each answered part; no two overlap.
    parts: BTreeMap<u64, u64>,
    covered: u64,
}

impl Coverage {
    pub fn new(len: u64) -> Coverage {
        Coverage {
            len,
            ..Coverage::default()
        }
    }

    /// Records `[at, at+n)`; the reason it cannot be part of the answer, if any.
    pub fn add(&mut self, at: u64, n: u64) -> Result<(), String> {
        let end = at.checked_add(n).filter(|&e| e <= self.len && n > 0);
        let Some(end) = end else {
            return Err(format!(
                "a chunk of {n} bytes at +{at} is outside the request of {} bytes",
                self.len
            ));
        };
        let before = self.parts.range(..end).next_back();
        if let Some((&s, &e)) = before {
            if e > at {
                return Err(format!(
                    "chunks overlap: +{at}..+{end} and +{s}..+{e} of the request"
                ));
            }
        }
        self.parts.insert(at, end);
        self.covered += n;
        Ok(())
    }

    /// Whether every byte was answered (no overlap is ever recorded, so the sum says it).
    pub fn complete(&self) -> bool {
        self.covered == self.len
    }

    pub fn covered(&self) -> u64 {
        self.covered
    }
}

#[cfg(test)]
mod tests {
    use super::Coverage;
    use proptest::prelude::*;

    #[test]
    fn exact_cover_in_any_order_is_complete() {
        let mut c = Coverage::new(100);
        c.add(50, 50).unwrap();
        c.add(0, 10).unwrap();
        assert!(!c.complete());
        c.add(10, 40).unwrap();
        assert!(c.complete());
    }

    #[test]
    fn overlaps_empty_and_outside_parts_are_refused() {
        let mut c = Coverage::new(100);
        c.add(10, 20).unwrap();
        assert!(c.add(29, 5).unwrap_err().contains("overlap"));
        assert!(c.add(0, 11).unwrap_err().contains("overlap"));
        assert!(c.add(15, 1).unwrap_err().contains("overlap"));
        assert!(c.add(0, 200).unwrap_err().contains("outside"));
        assert!(c.add(99, 2).is_err());
        assert!(c.add(u64::MAX, 2).is_err());
        assert!(c.add(40, 0).is_err());
        assert_eq!(c.covered(), 20);
    }

    proptest! {
        /// Whatever parts are offered, what is accepted never overlaps and the count of covered
        /// bytes equals the bytes a bitmap of the accepted parts holds.
        #[test]
        fn accepted_parts_never_overlap(parts in prop::collection::vec((0u64..64, 0u64..20), 0..40)) {
            let mut c = Coverage::new(64);
            let mut bits = [false; 64];
            for (at, n) in parts {
                if c.add(at, n).is_ok() {
                    for b in &mut bits[at as usize..(at + n) as usize] {
                        prop_assert!(!*b);
                        *b = true;
                    }
                }
            }
            prop_assert_eq!(c.covered(), bits.iter().filter(|&&b| b).count() as u64);
            prop_assert_eq!(c.complete(), bits.iter().all(|&b| b));
        }
    }
}
