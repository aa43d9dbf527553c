//! Embedded adapters: what the plugin runs on with no RDS and no Kubernetes.

pub mod file_store;
pub mod local_cluster;
pub mod mem_store;
