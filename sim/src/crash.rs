//! Crash points at the `AttachmentStore` port boundary: when armed, the next write either
//! crashes before reaching the API (between the manager's decision and the API write) or
//! right after the API acknowledged it (between the API write and the RPC reply). The
//! wrapper then never returns; the driver loop sees the crash fired and bounces the
//! controller. Armed by [`crate::faults`], plugged in by [`crate::world`].

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rds_csi::ports::AttachmentStore;
use rds_csi::ports::store::{AttachmentRecord, StoreError};
use rds_csi::types::VolumeId;

/// Where a crash point stops the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The manager decided, the API write was not sent.
    BeforeWrite,
    /// The API acknowledged the write, the reply was not sent.
    AfterWrite,
}

/// An armed crash point and whether it fired.
#[derive(Debug, Default)]
pub struct CrashPoint {
    armed: Mutex<Option<Point>>,
    fired: Mutex<Option<(Point, &'static str)>>,
}

impl CrashPoint {
    /// Arms `p` for the next attachment write.
    pub fn arm(&self, p: Point) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    }
    /// Disarms.
    pub fn disarm(&self) {
        *self.armed.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
    fn take_armed(&self) -> Option<Point> {
        self.armed.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
    fn fire(&self, p: Point, host: &'static str) {
        *self.fired.lock().unwrap_or_else(|e| e.into_inner()) = Some((p, host));
    }
    /// The point that fired since the last call, and on which host, if any.
    pub fn take_fired(&self) -> Option<(Point, &'static str)> {
        self.fired.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// The store wrapper that reaches the crash points.
struct CrashingStore {
    inner: Arc<dyn AttachmentStore>,
    crash: Arc<CrashPoint>,
    host: &'static str,
}

impl CrashingStore {
    async fn around<F>(&self, write: F) -> Result<(), StoreError>
    where
        F: std::future::Future<Output = Result<(), StoreError>>,
    {
        match self.crash.take_armed() {
            None => write.await,
            Some(Point::BeforeWrite) => {
                self.crash.fire(Point::BeforeWrite, self.host);
                std::future::pending().await
            }
            Some(Point::AfterWrite) => {
                write.await?;
                self.crash.fire(Point::AfterWrite, self.host);
                std::future::pending().await
            }
        }
    }
}

#[async_trait]
impl AttachmentStore for CrashingStore {
    async fn write_volume(
        &self,
        volume: &VolumeId,
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.around(self.inner.write_volume(volume, holders)).await
    }
    async fn write_volume_if(
        &self,
        volume: &VolumeId,
        previous: &[AttachmentRecord],
        holders: &[AttachmentRecord],
    ) -> Result<(), StoreError> {
        self.around(self.inner.write_volume_if(volume, previous, holders))
            .await
    }
    async fn read_volume(&self, volume: &VolumeId) -> Result<Vec<AttachmentRecord>, StoreError> {
        self.inner.read_volume(volume).await
    }
    async fn load_all(&self) -> Result<Vec<AttachmentRecord>, StoreError> {
        self.inner.load_all().await
    }
}

/// Wraps the store of controller replica `host` with the scenario's crash point.
pub fn wrap_store(
    inner: Arc<dyn AttachmentStore>,
    crash: &Arc<CrashPoint>,
    host: &'static str,
) -> Arc<dyn AttachmentStore> {
    Arc::new(CrashingStore {
        inner,
        crash: Arc::clone(crash),
        host,
    })
}
