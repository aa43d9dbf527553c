//! What the driver supports of a CSI `VolumeCapability`: the access mode reduced to what
//! fencing needs, and the access type. Shared by CreateVolume's and ControllerPublish's
//! validation, so the two cannot disagree.

use crate::error::{Error, Result};
use crate::proto::csi::{
    VolumeCapability,
    volume_capability::{AccessType, access_mode::Mode},
};
use crate::types::AccessMode;

/// The access mode of a capability, reduced to what fencing needs, and whether it is a
/// block volume.
pub fn access(cap: &VolumeCapability) -> Result<(AccessMode, bool)> {
    let block = match &cap.access_type {
        Some(AccessType::Block(_)) => true,
        Some(AccessType::Mount(_)) => false,
        None => {
            return Err(Error::InvalidArgument(
                "volume_capability.access_type is required (block or mount)".into(),
            ));
        }
    };
    let raw = cap
        .access_mode
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("volume_capability.access_mode is required".into()))?
        .mode;
    let mode = Mode::try_from(raw).map_err(|_| {
        Error::InvalidArgument(format!(
            "volume_capability.access_mode.mode {raw} is unknown"
        ))
    })?;
    let reduced = match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => AccessMode::SingleNode,
        Mode::MultiNodeReaderOnly => AccessMode::MultiNodeReadOnly,
        Mode::MultiNodeMultiWriter if block => AccessMode::MultiNodeMultiWriter,
        Mode::MultiNodeMultiWriter => {
            return Err(Error::InvalidArgument(
                "volume_capability: MULTI_NODE_MULTI_WRITER is supported for block volumes \
                 only (a filesystem mounted read-write on two nodes is corrupted)"
                    .into(),
            ));
        }
        Mode::MultiNodeSingleWriter => {
            return Err(Error::InvalidArgument(
                "volume_capability: MULTI_NODE_SINGLE_WRITER is not supported; use a \
                 single-node mode or MULTI_NODE_READER_ONLY"
                    .into(),
            ));
        }
        Mode::Unknown => {
            return Err(Error::InvalidArgument(
                "volume_capability.access_mode.mode must be set".into(),
            ));
        }
    };
    Ok((reduced, block))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi::volume_capability::{self, BlockVolume, MountVolume};

    fn cap(mode: Mode, block: bool) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
            access_type: Some(if block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume::default())
            }),
        }
    }

    #[test]
    fn access_modes_reduce_to_fencing_classes() {
        assert_eq!(
            access(&cap(Mode::SingleNodeMultiWriter, false)).unwrap(),
            (AccessMode::SingleNode, false)
        );
        assert_eq!(
            access(&cap(Mode::MultiNodeReaderOnly, false)).unwrap(),
            (AccessMode::MultiNodeReadOnly, false)
        );
        assert_eq!(
            access(&cap(Mode::MultiNodeMultiWriter, true)).unwrap(),
            (AccessMode::MultiNodeMultiWriter, true)
        );
    }

    #[test]
    fn multi_node_writers_are_refused_for_filesystems() {
        let err = access(&cap(Mode::MultiNodeMultiWriter, false)).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(ref m) if m.contains("block volumes only")));
    }
}
