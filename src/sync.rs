//! Crate-private synchronisation shim: std types normally, loom's under `cfg(loom)`, so the
//! lock-table core ([`crate::attachment::lock`]) can be model-checked by `tests/loom_*.rs`.
//!
//! Only code that loom checks imports from here; everything else uses `std::sync` directly.

#[cfg(loom)]
pub(crate) use loom::sync::{Arc, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{Arc, Mutex, MutexGuard};

/// Locks `m`, recovering from poisoning: the protected state is kept consistent by every
/// critical section (no panics inside), so a poisoned lock only means a panicking thread
/// elsewhere, not a broken invariant.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
