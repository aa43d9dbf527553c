//! ControllerPublishVolume / ControllerUnpublishVolume: pure request validation. The core
//! lives in [`crate::attachment::AttachmentManager::publish`] / `unpublish`; the tonic
//! adapter in [`crate::csi::controller`] only chains the two.

use crate::attachment::types::{PublishArgs, UnpublishArgs};
use crate::error::{Error, Result};
use crate::proto::csi::{
    ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest,
    volume_capability::AccessType,
};
use crate::types::{NodeId, VolumeId};

use crate::types::context::{
    FS_TYPE as VOLUME_CONTEXT_FS_TYPE, MIGRATION_TIMEOUT as VOLUME_CONTEXT_MIGRATION_TIMEOUT,
    NVME_ADDRESS as VOLUME_CONTEXT_NVME_ADDRESS,
};

fn volume_id(value: &str) -> Result<VolumeId> {
    if value.is_empty() {
        return Err(Error::InvalidArgument("volume_id is required".into()));
    }
    VolumeId::new(value).map_err(|e| Error::InvalidArgument(format!("volume_id: {e}")))
}

fn node_id(value: &str) -> Result<NodeId> {
    NodeId::new(value).map_err(|e| Error::InvalidArgument(format!("node_id: {e}")))
}

/// Validates a ControllerPublishVolume request: every required field present and well
/// formed, else INVALID_ARGUMENT naming the field.
pub fn validate_publish(req: &ControllerPublishVolumeRequest) -> Result<PublishArgs> {
    let volume_id = volume_id(&req.volume_id)?;
    if req.node_id.is_empty() {
        return Err(Error::InvalidArgument("node_id is required".into()));
    }
    let node_id = node_id(&req.node_id)?;
    let cap = req
        .volume_capability
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("volume_capability is required".into()))?;
    let (access_mode, block) = crate::controller::caps::access(cap)?;
    let fs_type = match &cap.access_type {
        Some(AccessType::Mount(m)) if !m.fs_type.is_empty() => Some(m.fs_type.clone()),
        _ => req
            .volume_context
            .get(VOLUME_CONTEXT_FS_TYPE)
            .filter(|s| !s.is_empty())
            .cloned(),
    };
    let nvme_address = req
        .volume_context
        .get(VOLUME_CONTEXT_NVME_ADDRESS)
        .filter(|s| !s.is_empty())
        .cloned();
    // Read leniently, as the earlier driver did: the value comes from a PV that may predate
    // this driver, and a publish must not fail over it (CreateVolume refuses bad values).
    let raw_timeout = req
        .volume_context
        .get(VOLUME_CONTEXT_MIGRATION_TIMEOUT)
        .map(String::as_str);
    let migration_timeout = match crate::attachment::migration::timeout_from(raw_timeout) {
        Ok(t) => t,
        Err((t, why)) => {
            tracing::warn!(volume_id = %volume_id,
                "volume_context {VOLUME_CONTEXT_MIGRATION_TIMEOUT}: {why}");
            t
        }
    };
    Ok(PublishArgs {
        volume_id,
        node_id,
        access_mode,
        readonly: req.readonly,
        block,
        fs_type,
        nvme_address,
        migration_timeout,
    })
}

/// Validates a ControllerUnpublishVolume request. `node_id` is optional: the spec says
/// "If the value is unset, the SP MUST unpublish the volume from all nodes it is published
/// to."
pub fn validate_unpublish(req: &ControllerUnpublishVolumeRequest) -> Result<UnpublishArgs> {
    let volume_id = volume_id(&req.volume_id)?;
    let node_id = if req.node_id.is_empty() {
        None
    } else {
        Some(node_id(&req.node_id)?)
    };
    Ok(UnpublishArgs { volume_id, node_id })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi::VolumeCapability;
    use crate::proto::csi::volume_capability::{self, BlockVolume, MountVolume, access_mode::Mode};
    use crate::types::AccessMode;

    pub(crate) fn cap(mode: Mode, block: bool) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
            access_type: Some(if block {
                AccessType::Block(BlockVolume {})
            } else {
                AccessType::Mount(MountVolume {
                    fs_type: "xfs".into(),
                    ..Default::default()
                })
            }),
        }
    }

    fn req() -> ControllerPublishVolumeRequest {
        ControllerPublishVolumeRequest {
            volume_id: "pvc-1".into(),
            node_id: "node-a".into(),
            volume_capability: Some(cap(Mode::SingleNodeWriter, false)),
            volume_context: [("nvmeAddress".to_string(), "10.0.0.5".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_complete_request_validates_with_fs_type_and_address() {
        let args = validate_publish(&req()).unwrap();
        assert_eq!(args.volume_id.as_str(), "pvc-1");
        assert_eq!(args.node_id.as_str(), "node-a");
        assert_eq!(args.access_mode, AccessMode::SingleNode);
        assert_eq!(args.fs_type.as_deref(), Some("xfs"));
        assert_eq!(args.nvme_address.as_deref(), Some("10.0.0.5"));
        assert!(!args.block);
    }

    #[test]
    fn the_migration_timeout_comes_from_the_volume_context_clamped_as_before() {
        use std::time::Duration;
        let mut r = req();
        assert_eq!(
            validate_publish(&r).unwrap().migration_timeout,
            Duration::from_secs(300),
            "default"
        );
        for (v, want) in [("120", 120), ("5", 30), ("99999", 3600), ("soon", 300)] {
            r.volume_context
                .insert("migrationTimeoutSeconds".into(), v.into());
            assert_eq!(
                validate_publish(&r).unwrap().migration_timeout,
                Duration::from_secs(want),
                "{v}"
            );
        }
    }

    #[test]
    fn missing_or_bad_fields_are_invalid_arguments_naming_the_field() {
        let cases: Vec<(ControllerPublishVolumeRequest, &str)> = vec![
            (
                ControllerPublishVolumeRequest {
                    volume_id: String::new(),
                    ..req()
                },
                "volume_id",
            ),
            (
                ControllerPublishVolumeRequest {
                    node_id: String::new(),
                    ..req()
                },
                "node_id",
            ),
            (
                ControllerPublishVolumeRequest {
                    node_id: "a b".into(),
                    ..req()
                },
                "node_id",
            ),
            (
                ControllerPublishVolumeRequest {
                    volume_capability: None,
                    ..req()
                },
                "volume_capability",
            ),
            (
                ControllerPublishVolumeRequest {
                    volume_capability: Some(VolumeCapability {
                        access_mode: None,
                        ..cap(Mode::SingleNodeWriter, true)
                    }),
                    ..req()
                },
                "access_mode",
            ),
            (
                ControllerPublishVolumeRequest {
                    volume_capability: Some(VolumeCapability {
                        access_type: None,
                        ..cap(Mode::SingleNodeWriter, true)
                    }),
                    ..req()
                },
                "access_type",
            ),
            (
                ControllerPublishVolumeRequest {
                    volume_capability: Some(cap(Mode::MultiNodeMultiWriter, false)),
                    ..req()
                },
                "MULTI_NODE_MULTI_WRITER",
            ),
            (
                ControllerPublishVolumeRequest {
                    volume_capability: Some(cap(Mode::Unknown, true)),
                    ..req()
                },
                "mode",
            ),
        ];
        for (r, field) in cases {
            let err = validate_publish(&r).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument(ref m) if m.contains(field)),
                "{field}: {err:?}"
            );
        }
    }

    #[test]
    fn unpublish_node_is_optional_but_must_be_valid_when_set() {
        let mut r = ControllerUnpublishVolumeRequest {
            volume_id: "pvc-1".into(),
            ..Default::default()
        };
        assert_eq!(validate_unpublish(&r).unwrap().node_id, None);
        r.node_id = "node-a".into();
        assert_eq!(
            validate_unpublish(&r).unwrap().node_id.unwrap().as_str(),
            "node-a"
        );
        r.node_id = "bad node".into();
        assert!(matches!(
            validate_unpublish(&r),
            Err(Error::InvalidArgument(_))
        ));
        r.volume_id.clear();
        assert!(matches!(
            validate_unpublish(&r),
            Err(Error::InvalidArgument(_))
        ));
    }
}
