//! Attachment tracking: which volume is attached to which node (the heart of the
//! controller). See [`manager`] for the invariants and the lock order, [`lock`] for the
//! per-volume lock table, [`rebuild`] for start-up, [`fence`] for the data-path fence's
//! rules, [`migration`] for KubeVirt live migration of multi-node block volumes.

pub mod fence;
pub mod lock;
pub mod manager;
pub mod migration;
pub(crate) mod persist;
pub mod rebuild;
pub mod types;

pub use manager::{AttachmentManager, MIGRATION_CHECK_EVERY};
pub use types::{AttachmentConfig, AttachmentRecord, PublishArgs, UnpublishArgs};

#[cfg(test)]
mod migration_tests;
#[cfg(test)]
mod tests;
