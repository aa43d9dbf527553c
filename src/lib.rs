//! rds-csi: a Kubernetes CSI driver for the MikroTik ROSE Data Server (RDS).
//!
//! Volumes are file-backed disks on the RDS, exported over NVMe/TCP. The controller creates
//! them through RouterOS and fences them so a single-node volume is never attached to two
//! nodes; nodes connect with the kernel NVMe/TCP initiator, format and mount.
//!
//! The crate is laid out in layers (`docs/ARCHITECTURE.md`, enforced by `tests/layers.rs`):
//! the vocabulary ([`types`], [`proto`]); one trait per external effect ([`ports`]); the
//! domain error ([`error`]); adapters ([`routeros`], [`kube`], [`backend`], and the node's
//! own in [`node`]); the cores ([`attachment`], [`controller`], [`node`]); the thin tonic
//! services ([`csi`]); serving ([`server`]); typed [`settings`]; the composition root
//! ([`compose`]) that builds a plugin instance from them; the command line ([`cli`]).
//! Nothing here is global: the simulation runs many plugins in one process.

/// Applies `#[cfg(not(loom))]` to every item: see the loom note below.
macro_rules! not_under_loom {
    ($($item:item)*) => { $( #[cfg(not(loom))] $item )* };
}

// Under `--cfg loom` (tests/loom_*.rs) only the lock-table core is built: that flag also
// compiles tokio's `net` out, so nothing that reaches hyper/tonic/kube can build there. The
// loom build selects no other dependency (see Cargo.toml). New modules go inside this block.
not_under_loom! {
    pub mod attachment;
    pub mod backend;
    pub mod cli;
    pub mod client;
    pub mod compose;
    pub mod controller;
    pub mod csi;
    pub mod error;
    pub mod fsutil;
    pub mod kube;
    pub mod kube_rbac;
    pub mod metrics;
    pub mod node;
    pub mod ports;
    pub mod proto;
    pub mod retry;
    pub mod routeros;
    pub mod server;
    pub mod settings;
    pub mod telemetry;
    pub mod types;

    pub use error::{Error, Result};
}

/// The lock-table core alone, for loom.
#[cfg(loom)]
pub mod attachment {
    pub mod lock;
}

pub(crate) mod sync;
