//! The controller core: volume lifecycle, expansion, capacity, listing and snapshots over the
//! `Rds` port, with attachments delegated to the [`AttachmentManager`].
//!
//! A volume id is the RDS disk slot: the CSI volume name when that is a safe slot, else an
//! id derived from it ([`names`]); a snapshot id is likewise the slot of a non-exported
//! `copy-from` copy. What RouterOS does not keep — the layout, the name behind a derived
//! id, a snapshot's source, the connect tunables — is recorded in the disk's note
//! ([`crate::types::note`]). Every mutation observes the RDS first, so a call repeated
//! after a lost reply finds its own work done and answers the same.
//!
//! Snapshots and deletion: RouterOS `copy-from` copies the backing file, so a snapshot is an
//! independent file. A volume with snapshots can therefore be deleted, and its snapshots
//! keep working (restores from them still succeed).

pub mod capacity;
pub mod caps;
pub mod names;
pub mod paging;
pub mod params;
pub mod snapshots;
pub mod traffic;
pub mod volumes;

use std::sync::Arc;

use crate::attachment::AttachmentManager;
use crate::ports::Rds;
use crate::types::defaults::{DEFAULT_NQN_PREFIX, DEFAULT_NVME_PORT};


/// Controller settings from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Prefix of every NQN this driver creates (`<prefix><volume id>`); the node only ever
    /// touches these.
    pub nqn_prefix: String,
    /// Address nodes connect to, unless a StorageClass overrides it.
    pub nvme_address: String,
    /// NVMe/TCP port, unless a StorageClass overrides it.
    pub nvme_port: u16,
    /// What StorageClass parameters must agree with.
    pub expected: params::Expected,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            nqn_prefix: DEFAULT_NQN_PREFIX.into(),
            nvme_address: "127.0.0.1".into(),
            nvme_port: DEFAULT_NVME_PORT,
            expected: params::Expected::default(),
        }
    }
}

impl ControllerConfig {
    /// The NQN of a volume.
    pub fn nqn(&self, volume_id: &str) -> String {
        format!("{}{volume_id}", self.nqn_prefix)
    }
}

/// The controller core.
#[derive(Clone)]
pub struct Controller {
    cfg: ControllerConfig,
    rds: Arc<dyn Rds>,
    attachments: Arc<AttachmentManager>,
}

impl Controller {
    /// A controller over the ports.
    pub fn new(
        cfg: ControllerConfig,
        rds: Arc<dyn Rds>,
        attachments: Arc<AttachmentManager>,
    ) -> Self {
        Self {
            cfg,
            rds,
            attachments,
        }
    }

    /// The settings.
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    /// The attachment manager ControllerPublish/Unpublish go through.
    pub fn attachments(&self) -> &Arc<AttachmentManager> {
        &self.attachments
    }
}
