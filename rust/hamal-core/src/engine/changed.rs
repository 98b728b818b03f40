//! The changed-extent list a platform adapter hands over: a JSON array of `[offset, length]`
//! byte pairs. Validation names the file and the entry at fault.

use crate::extent::{Extent, ExtentMap};
use crate::{Error, Result};

/// Parses the JSON text of a changed list; `origin` (a file name) is used in messages.
pub fn parse_changed_json(text: &str, origin: &str) -> Result<Vec<(i128, i128)>> {
    let bad = |msg: String| Error::Plan(format!("{origin}: {msg}"));
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let list = value
        .as_array()
        .ok_or_else(|| bad("expected a JSON list of [offset, length] pairs".into()))?;
    list.iter()
        .enumerate()
        .map(|(i, item)| {
            let pair = item.as_array().filter(|p| p.len() == 2);
            let num = |v: &serde_json::Value| {
                v.as_i64()
                    .map(i128::from)
                    .or_else(|| v.as_u64().map(i128::from))
            };
            match pair.map(|p| (num(&p[0]), num(&p[1]))) {
                Some((Some(o), Some(l))) => Ok((o, l)),
                _ => Err(bad(format!(
                    "entry {i} is {item}, expected [offset, length] with two integers"
                ))),
            }
        })
        .collect()
}

/// Checks a changed list against the disk: non-negative, non-empty, no overlaps, inside the disk.
pub fn validate_changed(pairs: &[(i128, i128)], disk_size: u64, origin: &str) -> Result<ExtentMap> {
    let bad = |msg: String| Error::Plan(format!("{origin}: {msg}"));
    let mut extents = Vec::with_capacity(pairs.len());
    for (i, &(offset, len)) in pairs.iter().enumerate() {
        if offset < 0 || len < 0 {
            return Err(bad(format!(
                "entry {i} [{offset}, {len}] has a negative offset or length"
            )));
        }
        if len == 0 {
            return Err(bad(format!("entry {i} [{offset}, 0] has zero length")));
        }
        if offset + len > disk_size as i128 {
            return Err(bad(format!(
                "entry {i} [{offset}, {len}] ends at {} past the end of the disk ({disk_size} bytes)",
                offset + len
            )));
        }
        extents.push((i, Extent::new(offset as u64, len as u64)));
    }
    extents.sort_by_key(|(_, e)| e.offset);
    for w in extents.windows(2) {
        let ((ia, a), (ib, b)) = (w[0], w[1]);
        if b.offset < a.end() {
            return Err(bad(format!("entries {ia} {a} and {ib} {b} overlap")));
        }
    }
    Ok(ExtentMap::from_extents(extents.into_iter().map(|(_, e)| e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, size: u64) -> Result<ExtentMap> {
        validate_changed(&parse_changed_json(text, "c.json")?, size, "c.json")
    }

    #[test]
    fn accepts_unsorted_adjacent_pairs() {
        let m = check("[[100, 50], [0, 100]]", 1000).unwrap();
        assert_eq!(m.extents(), &[Extent::new(0, 150)]);
    }

    #[test]
    fn rejects_each_kind_of_bad_input_with_its_entry() {
        for (text, want) in [
            ("{", "not valid JSON"),
            ("{\"a\": 1}", "expected a JSON list"),
            ("[[1, 2, 3]]", "entry 0"),
            ("[[0, 10], [-5, 1]]", "entry 1 [-5, 1] has a negative"),
            ("[[0, 10], [5, 10]]", "overlap"),
            ("[[990, 20]]", "past the end"),
            ("[[0, 0]]", "zero length"),
            ("[[\"0\", 1]]", "two integers"),
        ] {
            let e = check(text, 1000).unwrap_err().to_string();
            assert!(e.starts_with("c.json: ") && e.contains(want), "{text}: {e}");
        }
    }
}
