//! Attachment vocabulary: the record (re-exported from the store port), the validated
//! arguments of publish/unpublish, and the manager's configuration.

pub use crate::ports::store::AttachmentRecord;
use crate::types::{AccessMode, NodeId, VolumeId};

/// Holders of one volume, sorted by node, at most one record per node. A small sorted
/// vector: almost every volume has one holder, and a map per volume would cost a B-tree
/// node (over a KiB) each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holders(Vec<AttachmentRecord>);

impl Holders {
    /// No holder.
    pub fn new() -> Self {
        Self::default()
    }
    fn find(&self, node: &NodeId) -> Result<usize, usize> {
        self.0.binary_search_by(|r| r.node_id.cmp(node))
    }
    /// Whether no node holds the volume.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Number of holders.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// `node`'s record.
    pub fn get(&self, node: &NodeId) -> Option<&AttachmentRecord> {
        self.find(node).ok().map(|i| &self.0[i])
    }
    /// Whether `node` holds the volume.
    pub fn contains(&self, node: &NodeId) -> bool {
        self.find(node).is_ok()
    }
    /// Adds or replaces the record of `record.node_id`.
    pub fn insert(&mut self, record: AttachmentRecord) {
        match self.find(&record.node_id) {
            Ok(i) => self.0[i] = record,
            Err(i) => self.0.insert(i, record),
        }
    }
    /// Removes `node`'s record.
    pub fn remove(&mut self, node: &NodeId) -> Option<AttachmentRecord> {
        self.find(node).ok().map(|i| self.0.remove(i))
    }
    /// The holder nodes, sorted.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeId> {
        self.0.iter().map(|r| &r.node_id)
    }
    /// The records, sorted by node.
    pub fn iter(&self) -> std::slice::Iter<'_, AttachmentRecord> {
        self.0.iter()
    }
    /// The records, sorted by node.
    pub fn as_slice(&self) -> &[AttachmentRecord] {
        &self.0
    }
    /// The records, sorted by node.
    pub fn into_vec(self) -> Vec<AttachmentRecord> {
        self.0
    }
    /// The generation of the write that made this holder set (0: none, or written before
    /// generations were recorded).
    pub fn generation(&self) -> u64 {
        self.0.first().map_or(0, |r| r.generation)
    }
    /// The same holders as the next write after `previous` makes them: every record
    /// carries `previous`'s generation + 1.
    pub fn stamped_after(mut self, previous: &Holders) -> Holders {
        let generation = previous.generation() + 1;
        for r in &mut self.0 {
            r.generation = generation;
        }
        self
    }
    /// Splits into (matching, the rest).
    pub fn partition(self, pred: impl Fn(&AttachmentRecord) -> bool) -> (Holders, Holders) {
        let (a, b) = self.0.into_iter().partition(|r| pred(r));
        (Holders(a), Holders(b))
    }
}

impl FromIterator<AttachmentRecord> for Holders {
    fn from_iter<I: IntoIterator<Item = AttachmentRecord>>(iter: I) -> Self {
        let mut h = Holders::new();
        for r in iter {
            h.insert(r);
        }
        h
    }
}

/// Validated ControllerPublishVolume arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishArgs {
    /// Volume to publish.
    pub volume_id: VolumeId,
    /// Node to publish to.
    pub node_id: NodeId,
    /// Access mode, reduced to what fencing needs.
    pub access_mode: AccessMode,
    /// Publish read-only.
    pub readonly: bool,
    /// Block volume (no filesystem).
    pub block: bool,
    /// Filesystem type for mount volumes (from the capability, else the volume context).
    pub fs_type: Option<String>,
    /// NVMe/TCP address the node should connect to (volume context `nvmeAddress`).
    pub nvme_address: Option<String>,
    /// How long a live migration this publish starts may run (volume context
    /// `migrationTimeoutSeconds`; multi-node block volumes only).
    pub migration_timeout: std::time::Duration,
}

/// Validated ControllerUnpublishVolume arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpublishArgs {
    /// Volume to unpublish.
    pub volume_id: VolumeId,
    /// Node to unpublish from; `None`: from every node (the CSI spec's unset `node_id`).
    pub node_id: Option<NodeId>,
}

/// How the manager behaves; fixed for the life of a plugin instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachmentConfig {
    /// Most volumes attached to one node (0: no limit).
    pub max_volumes_per_node: u64,
    /// Data-path fence ([`crate::attachment::fence`]): a published single-node volume's
    /// NVMe/TCP export admits only its holder's host NQN
    /// (`nvme-tcp-server-allow-host-name`), an unpublished one is parked (admits nobody).
    /// Off: exports are open to any host. On in every shipped default; `Default` here is
    /// off only for unit tests of the rest.
    pub data_path_fence: bool,
    /// How often memory is resynchronised from the store by a full list, picking up what
    /// another writer changed (a former leader finishing its calls during a failover);
    /// zero: never (the default: with Kubernetes the controller's PV watch follows every
    /// change, `crate::controller::watched`).
    pub resync_interval: std::time::Duration,
}
