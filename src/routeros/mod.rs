//! The RouterOS layer: how the driver talks to the ROSE Data Server.
//!
//! - [`command`]: the typed command model (`/disk add`, `/disk print`, ...);
//! - [`render`]: the only code that builds command text (injection-proof by construction);
//! - [`parse`]: reader of `print` output and RouterOS error replies;
//! - [`transport`]: moves text (in-process, TCP line protocol, SSH);
//! - [`emulator`]: a model of RouterOS `/disk` and `/file` (embedded default, simulation,
//!   integration tests);
//! - [`adapter`]: the `Rds` port over all of that.

pub mod adapter;
pub mod command;
pub mod emulator;
pub mod parse;
pub mod render;
pub mod transport;

pub use adapter::{RdsLayout, RouterOsRds};

/// The `Rds` adapter over an in-process emulator with files in memory.
pub type InMemoryRds = RouterOsRds<transport::inproc::InProcess>;

/// An in-memory RDS for unit tests of code above the `Rds` port: the real adapter,
/// renderer and parser over an emulator whose pool of `pool_bytes` is mounted at `pool`
/// with disks under `pool/volumes`. Its emulator (fault hooks, leak checks) is reachable
/// through `transport().emulator()`.
pub fn in_memory_rds(pool_bytes: u64) -> std::sync::Arc<InMemoryRds> {
    use crate::ports::time::{SeededEntropy, SystemClock};
    let emulator = emulator::Emulator::in_memory(
        emulator::PoolConfig {
            slot: "pool".into(),
            mount_point: "pool".into(),
            size_bytes: pool_bytes,
        },
        std::sync::Arc::new(SystemClock),
    );
    let layout = RdsLayout {
        volume_base_path: "pool/volumes".into(),
        pool_mount_point: "pool".into(),
    };
    let adapter = RouterOsRds::new(
        transport::inproc::InProcess::new(std::sync::Arc::new(emulator)),
        &layout,
        crate::retry::Backoff::API,
        std::sync::Arc::new(SeededEntropy::from_seed(0)),
    );
    match adapter {
        Ok(a) => std::sync::Arc::new(a),
        // The layout above is a constant the renderer accepts (tested).
        Err(e) => unreachable!("constant layout rejected: {e}"),
    }
}
