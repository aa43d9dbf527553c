//! The store's errors on a write of a volume's holders, turned into answers a CO can act
//! on.
//!
//! What a missing object means: a store reports `NotFound` when the object the records
//! live on (the PersistentVolume) does not exist. For a write that adds a holder, the
//! attachment cannot be made durable, so the publish is refused with FAILED_PRECONDITION
//! (retrying will not help until a PV exists); a write that empties the holder set on a
//! missing PV succeeds in the store itself (nothing left that could resurrect it).

use crate::error::Error;
use crate::ports::store::StoreError;
use crate::types::VolumeId;

/// The answer for a failed write of `volume`'s holders.
pub(crate) fn store_error(volume: &VolumeId, e: StoreError) -> Error {
    match e {
        StoreError::NotFound(what) => Error::FailedPrecondition(format!(
            "cannot record the attachment of volume {volume} durably: {what}; \
             the volume needs a PersistentVolume of this driver before it can be published"
        )),
        StoreError::Conflict(what) => Error::Aborted(format!(
            "recording the attachment of volume {volume} conflicted with a concurrent \
             update ({what}); retry"
        )),
        other => Error::Store(other),
    }
}
