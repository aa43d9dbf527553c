//! Capacity ranges: which exact size a CreateVolume / ControllerExpandVolume gets.
//!
//! Sizes are exact bytes end to end (the earlier driver rounded 1.5 GiB down to `1G`); the
//! only adjustment is rounding up to whole 4 KiB blocks, and only within the caller's limit.

use crate::error::{Error, Result};
use crate::proto::csi::CapacityRange;

/// 1 GiB.
pub const GIB: u64 = 1 << 30;
/// Smallest volume.
pub const MIN_VOLUME_BYTES: u64 = GIB;
/// Largest volume.
pub const MAX_VOLUME_BYTES: u64 = 16 << 40;
/// Size when the caller asks for none.
pub const DEFAULT_VOLUME_BYTES: u64 = GIB;
/// Sizes are whole blocks of this many bytes.
pub const BLOCK_BYTES: u64 = 4096;

/// The requested range, with 0 meaning "unspecified" as in the spec.
fn bounds(range: Option<&CapacityRange>) -> Result<(u64, u64)> {
    let (req, lim) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if req < 0 || lim < 0 {
        return Err(Error::InvalidArgument(format!(
            "capacity_range: required_bytes ({req}) and limit_bytes ({lim}) must not be negative"
        )));
    }
    let (req, lim) = (req as u64, lim as u64);
    if lim != 0 && req > lim {
        return Err(Error::InvalidArgument(format!(
            "capacity_range: required_bytes ({req}) exceeds limit_bytes ({lim})"
        )));
    }
    Ok((req, lim))
}

/// The size of a new volume for `range`, at least `floor` (e.g. the size of the snapshot it
/// is restored from). OUT_OF_RANGE when no size satisfies both.
pub fn resolve(range: Option<&CapacityRange>, floor: u64) -> Result<u64> {
    let (req, lim) = bounds(range)?;
    let lim_or_max = if lim == 0 {
        MAX_VOLUME_BYTES
    } else {
        lim.min(MAX_VOLUME_BYTES)
    };
    let want = if req == 0 { DEFAULT_VOLUME_BYTES } else { req };
    let want = want.max(MIN_VOLUME_BYTES).max(floor);
    // `floor` is a size the RDS reported: within a block of 2^64 it has no next block
    // (found by fuzzing: the rounding overflowed, to 0 in release builds).
    let size = want
        .checked_next_multiple_of(BLOCK_BYTES)
        .filter(|s| *s <= lim_or_max);
    let Some(size) = size else {
        return Err(Error::OutOfRange(format!(
            "capacity_range: no size satisfies required_bytes={req}, limit_bytes={lim} \
             (volumes are {MIN_VOLUME_BYTES} to {MAX_VOLUME_BYTES} bytes in whole \
             {BLOCK_BYTES}-byte blocks{})",
            if floor > 0 {
                format!(", and at least the source's {floor} bytes")
            } else {
                String::new()
            }
        )));
    };
    Ok(size)
}

/// Whether an existing volume of `size` satisfies `range` (idempotent CreateVolume).
pub fn satisfies(range: Option<&CapacityRange>, size: u64) -> Result<bool> {
    let (req, lim) = bounds(range)?;
    Ok(size >= req && (lim == 0 || size <= lim))
}

/// The new size of a volume of `current` bytes expanded to `range`: `None` when it is
/// already large enough. A range that would shrink it is OUT_OF_RANGE.
pub fn expand_to(range: Option<&CapacityRange>, current: u64) -> Result<Option<u64>> {
    let Some(r) = range else {
        return Err(Error::InvalidArgument("capacity_range is required".into()));
    };
    let (req, lim) = bounds(Some(r))?;
    if req == 0 && lim == 0 {
        return Err(Error::InvalidArgument(
            "capacity_range: required_bytes or limit_bytes must be set".into(),
        ));
    }
    if lim != 0 && lim < current {
        return Err(Error::OutOfRange(format!(
            "capacity_range: limit_bytes ({lim}) is below the volume's current size \
             ({current}); volumes cannot shrink"
        )));
    }
    if req <= current {
        return Ok(None);
    }
    resolve(Some(r), current).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(req: i64, lim: i64) -> Option<CapacityRange> {
        Some(CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        })
    }

    #[test]
    fn sizes_are_exact_not_rounded_to_gib() {
        let one_and_half = (GIB + GIB / 2) as i64;
        assert_eq!(
            resolve(r(one_and_half, 0).as_ref(), 0).unwrap(),
            GIB + GIB / 2
        );
        assert_eq!(resolve(None, 0).unwrap(), DEFAULT_VOLUME_BYTES);
        assert_eq!(resolve(r(1, 0).as_ref(), 0).unwrap(), MIN_VOLUME_BYTES);
        assert_eq!(
            resolve(r((GIB + 1) as i64, 0).as_ref(), 0).unwrap(),
            GIB + BLOCK_BYTES
        );
        assert_eq!(resolve(r(0, 0).as_ref(), 3 * GIB).unwrap(), 3 * GIB);
    }

    #[test]
    fn unsatisfiable_ranges_are_out_of_range() {
        for (req, lim, floor) in [
            (0, (GIB / 2) as i64, 0),
            ((MAX_VOLUME_BYTES + 1) as i64, 0, 0),
            ((GIB + 1) as i64, (GIB + 2) as i64, 0),
            (0, (2 * GIB) as i64, 3 * GIB),
        ] {
            assert!(
                matches!(
                    resolve(r(req, lim).as_ref(), floor),
                    Err(Error::OutOfRange(_))
                ),
                "{req} {lim} {floor}"
            );
        }
        assert!(matches!(
            resolve(r(5, 4).as_ref(), 0),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            resolve(r(-1, 0).as_ref(), 0),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_source_size_near_2_pow_64_is_out_of_range_not_wrapped() {
        // Found by fuzzing (`csi_request`): rounding such a floor up to a whole block
        // overflowed — a panic in debug builds, a size of 0 in release builds.
        for floor in [u64::MAX, u64::MAX - BLOCK_BYTES + 2, u64::MAX - 1] {
            for range in [None, r(0, 0), r(GIB as i64, 0)] {
                assert!(
                    matches!(resolve(range.as_ref(), floor), Err(Error::OutOfRange(_))),
                    "{floor} {range:?}"
                );
            }
        }
        let last_block = u64::MAX - (u64::MAX % BLOCK_BYTES);
        assert!(matches!(
            resolve(None, last_block),
            Err(Error::OutOfRange(_))
        ));
    }

    #[test]
    fn expansion_never_shrinks() {
        assert_eq!(
            expand_to(r((2 * GIB) as i64, 0).as_ref(), GIB).unwrap(),
            Some(2 * GIB)
        );
        assert_eq!(expand_to(r(GIB as i64, 0).as_ref(), 2 * GIB).unwrap(), None);
        assert!(matches!(
            expand_to(r(0, GIB as i64).as_ref(), 2 * GIB),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            expand_to(None, GIB),
            Err(Error::InvalidArgument(_))
        ));
    }
}
