//! Pagination tokens of ListVolumes / ListSnapshots.
//!
//! A token names the last entry of the previous page (`after:<id>`), so a page is
//! "entries sorted after that id": entries deleted or added between pages neither shift
//! nor repeat the rest. Anything else is refused with ABORTED, as the spec asks:
//! "Caller SHOULD start the ListVolumes operation again with an empty starting_token" when
//! "starting_token is not valid".

use crate::error::{Error, Result};

const PREFIX: &str = "after:";

/// The id a token continues after; `None` for the first page.
pub fn decode(token: &str) -> Result<Option<&str>> {
    if token.is_empty() {
        return Ok(None);
    }
    match token.strip_prefix(PREFIX) {
        Some(id) if crate::types::VolumeId::new(id).is_ok() => Ok(Some(id)),
        _ => Err(Error::Aborted(format!(
            "starting_token {token:?} is not a token this plugin issued; list again from the start"
        ))),
    }
}

/// The token continuing after `id`.
pub fn encode(id: &str) -> String {
    format!("{PREFIX}{id}")
}

/// One page of `items` (sorted by id) after `token`, at most `max_entries` (0: all).
pub fn page<T>(
    items: Vec<T>,
    id: impl Fn(&T) -> &str,
    token: &str,
    max_entries: i32,
) -> Result<(Vec<T>, String)> {
    if max_entries < 0 {
        return Err(Error::InvalidArgument(format!(
            "max_entries ({max_entries}) must not be negative"
        )));
    }
    let after = decode(token)?;
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|t| after.is_none_or(|a| id(t) > a))
        .collect();
    let max = if max_entries == 0 {
        usize::MAX
    } else {
        max_entries as usize
    };
    if rest.len() <= max {
        return Ok((rest, String::new()));
    }
    rest.truncate(max);
    let next = rest.last().map(|t| encode(id(t))).unwrap_or_default();
    Ok((rest, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_continue_after_the_last_id_even_when_it_was_deleted() {
        let ids = vec!["a", "b", "c", "d", "e"];
        let (p1, t1) = page(ids.clone(), |s| s, "", 2).unwrap();
        assert_eq!((p1, t1.as_str()), (vec!["a", "b"], "after:b"));
        // "b" deleted, "bb" added between pages.
        let ids2 = vec!["a", "bb", "c", "d", "e"];
        let (p2, t2) = page(ids2.clone(), |s| s, &t1, 2).unwrap();
        assert_eq!(p2, vec!["bb", "c"]);
        let (p3, t3) = page(ids2, |s| s, &t2, 2).unwrap();
        assert_eq!((p3, t3.as_str()), (vec!["d", "e"], ""));
    }

    #[test]
    fn foreign_tokens_are_aborted() {
        for bad in ["invalid-token", "after:", "after:../x", "7"] {
            assert!(
                matches!(page(vec!["a"], |s| s, bad, 0), Err(Error::Aborted(_))),
                "{bad}"
            );
        }
    }
}
