//! The `Initiator` port: the node's NVMe/TCP host side.
//!
//! Production: `nvme-cli` plus sysfs. Embedded default: loop devices over the emulator's
//! backing files. Simulation: a simulated kernel.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// Errors of the `Initiator` port.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitiatorError {
    /// Refused to touch an NQN that this driver did not create.
    #[error("refusing to touch NVMe subsystem not created by this driver: {0}")]
    NotForThisDriver(String),
    /// The device did not appear in time.
    #[error("NVMe operation timed out: {0}")]
    Timeout(String),
    /// The target is unreachable.
    #[error("NVMe target unavailable: {0}")]
    Unavailable(String),
    /// A command failed.
    #[error("NVMe command failed: {0}")]
    Command(String),
}

/// Where and how to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeTarget {
    /// Target address.
    pub address: String,
    /// Target port.
    pub port: u16,
    /// Subsystem NQN.
    pub nqn: String,
    /// Controller loss timeout in seconds (-1: forever).
    pub ctrl_loss_tmo: Option<i32>,
    /// Reconnect delay in seconds.
    pub reconnect_delay: Option<u32>,
    /// Keep-alive timeout in seconds.
    pub keep_alive_tmo: Option<u32>,
}

/// A connected subsystem and its block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// Subsystem NQN.
    pub nqn: String,
    /// Block device of its namespace.
    pub device: PathBuf,
    /// Whether a controller of the subsystem is live (sysfs `state` is `live`); `false`
    /// while every controller is reconnecting (`connecting`, `resetting`): its I/O is queued.
    pub live: bool,
}

/// The node's NVMe/TCP initiator.
#[async_trait]
pub trait Initiator: Send + Sync + 'static {
    /// This host's NQN (for the data-path fence).
    async fn host_nqn(&self) -> Result<String, InitiatorError>;
    /// Connects (already connected is success) and returns the block device.
    async fn connect(&self, target: &NvmeTarget) -> Result<PathBuf, InitiatorError>;
    /// Disconnects `nqn` (not connected is success). Only this driver's NQNs.
    async fn disconnect(&self, nqn: &str) -> Result<(), InitiatorError>;
    /// The block device of a connected subsystem, if connected.
    async fn find_device(&self, nqn: &str) -> Result<Option<PathBuf>, InitiatorError>;
    /// The NQN of this driver whose device `device` is, or was until it started going away
    /// (a loop device being detached still names its file); `None` for any other device.
    async fn nqn_of_device(&self, device: &Path) -> Result<Option<String>, InitiatorError>;
    /// Connections of this driver (NQN prefix), sorted by NQN.
    async fn connections(&self) -> Result<Vec<Connection>, InitiatorError>;
    /// Re-reads the size of the device after a resize on the target.
    async fn rescan(&self, nqn: &str) -> Result<(), InitiatorError>;
    /// Gives the connected controllers of `target.nqn` the reconnect settings `target` sets
    /// (`ctrl_loss_tmo`, `reconnect_delay`; `None` leaves one as it is), for a connection
    /// made without them (left from before a node restart, or made by hand). Returns whether
    /// a setting changed; not connected is `Ok(false)`.
    async fn apply_reconnect(&self, target: &NvmeTarget) -> Result<bool, InitiatorError>;
}
