//! Ports: one trait per external effect, in the storage domain's vocabulary.
//!
//! Production adapters live beside the code that needs them (`crate::backend`, and the
//! RouterOS/kube/nvme adapters); the simulation plugs its own. Each port has its own typed
//! error; [`crate::error::Error`] maps them to gRPC codes in one table.

pub mod cluster;
pub mod initiator;
pub mod lease;
pub mod mounter;
pub mod rds;
pub mod store;
pub mod time;
pub mod watch;

pub use cluster::Cluster;
pub use initiator::Initiator;
pub use lease::Leadership;
pub use mounter::Mounter;
pub use rds::Rds;
pub use store::AttachmentStore;
pub use time::{Clock, Entropy};
pub use watch::ClusterWatch;
