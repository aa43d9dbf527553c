//! An in-memory node kernel: one fake implementing both node ports ([`Initiator`] and
//! [`Mounter`]) over shared state, for unit tests of the node core and for the simulation.
//!
//! It models what the node core relies on: remote disks (NQN → size, filesystem), NVMe
//! connections with their namespace devices, a mount table with filesystem mounts, bind
//! mounts and raw block binds (as `/proc/self/mountinfo` shows them), and the directories
//! and files created as targets. Faults: a lost connection (the device disappears under its
//! mounts), an unreachable target, and a gate that holds `connect` until released.
//!
//! Deterministic: ordered maps only; device names are allocated in call order. The state
//! lock is a sync mutex never held across `.await`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::ports::initiator::{Connection, Initiator, InitiatorError, NvmeTarget};
use crate::ports::mounter::{MountEntry, MountError, Mounter, TargetKind, UsageStats};

/// A disk on the (simulated) storage server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDisk {
    /// Size the server exports.
    pub size: u64,
    /// Filesystem on it, if formatted.
    pub fs: Option<String>,
    /// Size the filesystem spans.
    pub fs_size: u64,
    /// How many times it was formatted.
    pub formats: u32,
}

#[derive(Debug, Clone)]
struct Device {
    nqn: String,
    number: String,
    /// Size the host sees (updated by rescan).
    size: u64,
}

#[derive(Debug, Default)]
struct State {
    disks: BTreeMap<String, FakeDisk>,
    unreachable: bool,
    /// Subsystems whose target refuses this host (an allow list that names another).
    refused: std::collections::BTreeSet<String>,
    devices: BTreeMap<PathBuf, Device>,
    next_ctrl: u32,
    mounts: Vec<MountEntry>,
    paths: BTreeMap<PathBuf, TargetKind>,
}

/// The fake kernel. Clone it to hand the same state to both ports.
#[derive(Clone)]
pub struct FakeKernel {
    state: Arc<Mutex<State>>,
    nqn_prefix: String,
    /// Changes when the machine is re-provisioned ([`Self::set_host_nqn`]).
    host_nqn: Arc<Mutex<String>>,
    /// `true` while connects are held.
    gate: Arc<tokio::sync::watch::Sender<bool>>,
}

impl FakeKernel {
    /// A kernel that only touches NQNs starting with `nqn_prefix`.
    pub fn new(nqn_prefix: &str, host_nqn: &str) -> Self {
        Self {
            state: Arc::default(),
            nqn_prefix: nqn_prefix.to_string(),
            host_nqn: Arc::new(Mutex::new(host_nqn.to_string())),
            gate: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or replaces) a disk exported under `nqn`.
    pub fn add_disk(&self, nqn: &str, size: u64) {
        self.st().disks.insert(
            nqn.to_string(),
            FakeDisk {
                size,
                fs: None,
                fs_size: 0,
                formats: 0,
            },
        );
    }

    /// Grows a disk on the server side (the host sees it after a rescan).
    pub fn resize_disk(&self, nqn: &str, size: u64) {
        if let Some(d) = self.st().disks.get_mut(nqn) {
            d.size = size;
        }
    }

    /// The disk exported under `nqn`.
    pub fn disk(&self, nqn: &str) -> Option<FakeDisk> {
        self.st().disks.get(nqn).cloned()
    }

    /// Makes every connect fail as unreachable (or heals it).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.st().unreachable = unreachable;
    }

    /// The target of `nqn` refuses (or, with `false`, accepts again) new connections from
    /// this host: its allow list names another host. Existing connections stay.
    pub fn refuse(&self, nqn: &str, refused: bool) {
        let mut st = self.st();
        if refused {
            st.refused.insert(nqn.to_string());
        } else {
            st.refused.remove(nqn);
        }
    }

    /// The connection of `nqn` is lost: its device disappears, mounts stay.
    pub fn lose_connection(&self, nqn: &str) {
        self.st().devices.retain(|_, d| d.nqn != nqn);
    }

    /// The machine is lost (and later replaced or reinstalled): its NVMe connections,
    /// devices, mounts and target directories are gone; the remote disks, and the
    /// filesystems on them, stay on the server.
    pub fn power_loss(&self) {
        let mut st = self.st();
        st.devices.clear();
        st.mounts.clear();
        st.paths.clear();
    }

    /// The machine is re-provisioned under the same name: from now on it has `host_nqn`.
    pub fn set_host_nqn(&self, host_nqn: &str) {
        *self.host_nqn.lock().unwrap_or_else(|p| p.into_inner()) = host_nqn.to_string();
    }

    /// Holds every `connect` until [`Self::release_connects`].
    pub fn hold_connects(&self) {
        self.gate.send_replace(true);
    }

    /// Releases held connects.
    pub fn release_connects(&self) {
        self.gate.send_replace(false);
    }

    /// The mount table.
    pub fn mount_table(&self) -> Vec<MountEntry> {
        self.st().mounts.clone()
    }

    fn check_ours(&self, nqn: &str) -> Result<(), InitiatorError> {
        if nqn.starts_with(&self.nqn_prefix) && nqn.len() > self.nqn_prefix.len() {
            Ok(())
        } else {
            Err(InitiatorError::NotForThisDriver(nqn.to_string()))
        }
    }
}

fn device_of_nqn(st: &State, nqn: &str) -> Option<PathBuf> {
    st.devices
        .iter()
        .find(|(_, d)| d.nqn == nqn)
        .map(|(p, _)| p.clone())
}

#[async_trait]
impl Initiator for FakeKernel {
    async fn host_nqn(&self) -> Result<String, InitiatorError> {
        Ok(self.host_nqn.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    async fn connect(&self, target: &NvmeTarget) -> Result<PathBuf, InitiatorError> {
        self.check_ours(&target.nqn)?;
        let mut gate = self.gate.subscribe();
        gate.wait_for(|held| !*held)
            .await
            .map_err(|e| InitiatorError::Command(e.to_string()))?;
        let mut st = self.st();
        if let Some(p) = device_of_nqn(&st, &target.nqn) {
            return Ok(p);
        }
        if st.unreachable {
            return Err(InitiatorError::Unavailable(format!(
                "{}:{} unreachable",
                target.address, target.port
            )));
        }
        if st.refused.contains(&target.nqn) {
            return Err(InitiatorError::Unavailable(format!(
                "{}:{} refused {}: this host is not allowed",
                target.address, target.port, target.nqn
            )));
        }
        let Some(size) = st.disks.get(&target.nqn).map(|d| d.size) else {
            return Err(InitiatorError::Unavailable(format!(
                "no subsystem {} on the target",
                target.nqn
            )));
        };
        let n = st.next_ctrl;
        st.next_ctrl += 1;
        let path = PathBuf::from(format!("/dev/nvme{n}n1"));
        st.devices.insert(
            path.clone(),
            Device {
                nqn: target.nqn.clone(),
                number: format!("259:{n}"),
                size,
            },
        );
        Ok(path)
    }

    async fn disconnect(&self, nqn: &str) -> Result<(), InitiatorError> {
        self.check_ours(nqn)?;
        self.st().devices.retain(|_, d| d.nqn != nqn);
        Ok(())
    }

    async fn find_device(&self, nqn: &str) -> Result<Option<PathBuf>, InitiatorError> {
        if self.check_ours(nqn).is_err() {
            return Ok(None);
        }
        Ok(device_of_nqn(&self.st(), nqn))
    }

    async fn connections(&self) -> Result<Vec<Connection>, InitiatorError> {
        let mut out: Vec<Connection> = self
            .st()
            .devices
            .iter()
            .filter(|(_, d)| self.check_ours(&d.nqn).is_ok())
            .map(|(p, d)| Connection {
                nqn: d.nqn.clone(),
                device: p.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.nqn.cmp(&b.nqn));
        Ok(out)
    }

    async fn rescan(&self, nqn: &str) -> Result<(), InitiatorError> {
        self.check_ours(nqn)?;
        let mut st = self.st();
        let size = st.disks.get(nqn).map(|d| d.size);
        let mut found = false;
        for d in st.devices.values_mut().filter(|d| d.nqn == nqn) {
            found = true;
            if let Some(s) = size {
                d.size = s;
            }
        }
        if found {
            Ok(())
        } else {
            Err(InitiatorError::Unavailable(format!("{nqn} not connected")))
        }
    }
}

fn nf(p: &Path) -> MountError {
    MountError::NotFound(p.display().to_string())
}

#[async_trait]
impl Mounter for FakeKernel {
    async fn filesystem_of(&self, device: &Path) -> Result<Option<String>, MountError> {
        let st = self.st();
        let d = st.devices.get(device).ok_or_else(|| nf(device))?;
        Ok(st.disks.get(&d.nqn).and_then(|k| k.fs.clone()))
    }

    async fn format(&self, device: &Path, fs_type: &str) -> Result<(), MountError> {
        let mut st = self.st();
        let d = st.devices.get(device).cloned().ok_or_else(|| nf(device))?;
        let disk = st.disks.get_mut(&d.nqn).ok_or_else(|| nf(device))?;
        disk.fs = Some(fs_type.to_string());
        disk.fs_size = d.size;
        disk.formats += 1;
        Ok(())
    }

    async fn mount(
        &self,
        source: &Path,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<(), MountError> {
        let mut st = self.st();
        if st.paths.get(target) != Some(&TargetKind::Directory) {
            return Err(nf(target));
        }
        let d = st.devices.get(source).cloned().ok_or_else(|| nf(source))?;
        let fs = st.disks.get(&d.nqn).and_then(|k| k.fs.clone());
        if fs.as_deref() != Some(fs_type) {
            return Err(MountError::Command(format!(
                "wrong fs type, bad superblock on {}",
                source.display()
            )));
        }
        let mut opts = vec![if options.iter().any(|o| o == "ro") { "ro" } else { "rw" }.to_string()];
        opts.extend(options.iter().filter(|o| *o != "ro").cloned());
        st.mounts.push(MountEntry {
            dev: d.number.clone(),
            root: "/".into(),
            source: source.display().to_string(),
            target: target.to_path_buf(),
            fs_type: fs_type.to_string(),
            options: opts,
        });
        Ok(())
    }

    async fn bind(&self, source: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
        let mut st = self.st();
        if !st.paths.contains_key(target) {
            return Err(nf(target));
        }
        let rw = if readonly { "ro" } else { "rw" }.to_string();
        let entry = if let Some(m) = st.mounts.iter().rev().find(|m| m.target == source) {
            MountEntry {
                target: target.to_path_buf(),
                options: vec![rw],
                ..m.clone()
            }
        } else if st.devices.contains_key(source) {
            let name = source.file_name().map(|n| n.to_string_lossy().into_owned());
            MountEntry {
                dev: "0:5".into(),
                root: format!("/{}", name.unwrap_or_default()),
                source: "udev".into(),
                target: target.to_path_buf(),
                fs_type: "devtmpfs".into(),
                options: vec![rw],
            }
        } else {
            return Err(nf(source));
        };
        st.mounts.push(entry);
        Ok(())
    }

    async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let mut st = self.st();
        if let Some(i) = st.mounts.iter().rposition(|m| m.target == target) {
            st.mounts.remove(i);
        }
        Ok(())
    }

    async fn mounts(&self) -> Result<Vec<MountEntry>, MountError> {
        Ok(self.st().mounts.clone())
    }

    async fn resize_fs(
        &self,
        device: &Path,
        _mount_path: &Path,
        _fs_type: &str,
    ) -> Result<(), MountError> {
        let mut st = self.st();
        let d = st.devices.get(device).cloned().ok_or_else(|| nf(device))?;
        if let Some(disk) = st.disks.get_mut(&d.nqn) {
            disk.fs_size = d.size;
        }
        Ok(())
    }

    async fn stats(&self, path: &Path) -> Result<UsageStats, MountError> {
        let st = self.st();
        let m = st
            .mounts
            .iter()
            .rev()
            .find(|m| m.target == path)
            .ok_or_else(|| nf(path))?;
        let total = st
            .devices
            .values()
            .find(|d| d.number == m.dev)
            .and_then(|d| st.disks.get(&d.nqn))
            .map(|k| k.fs_size)
            .unwrap_or(0);
        Ok(UsageStats {
            total_bytes: total,
            available_bytes: total / 2,
            used_bytes: total - total / 2,
            total_inodes: 1024,
            free_inodes: 1000,
            used_inodes: 24,
        })
    }

    async fn device_size(&self, device: &Path) -> Result<u64, MountError> {
        let st = self.st();
        if let Some(d) = st.devices.get(device) {
            return Ok(d.size);
        }
        // A block bind target reads as its device.
        let name = st
            .mounts
            .iter()
            .rev()
            .find(|m| m.target == device && m.fs_type == "devtmpfs")
            .map(|m| PathBuf::from(format!("/dev{}", m.root)));
        name.and_then(|n| st.devices.get(&n).map(|d| d.size))
            .ok_or_else(|| nf(device))
    }

    async fn device_binds(&self, device: &Path) -> Result<Vec<PathBuf>, MountError> {
        let st = self.st();
        if !st.devices.contains_key(device) {
            return Ok(Vec::new());
        }
        let root = format!(
            "/{}",
            device.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
        );
        let mut v: Vec<PathBuf> = st
            .mounts
            .iter()
            .filter(|m| m.fs_type == "devtmpfs" && m.root == root)
            .map(|m| m.target.clone())
            .collect();
        v.sort();
        v.dedup();
        Ok(v)
    }

    async fn device_number(&self, device: &Path) -> Result<String, MountError> {
        self.st()
            .devices
            .get(device)
            .map(|d| d.number.clone())
            .ok_or_else(|| nf(device))
    }

    async fn prepare_target(&self, path: &Path, kind: TargetKind) -> Result<(), MountError> {
        let mut st = self.st();
        match st.paths.get(path) {
            Some(k) if *k == kind => Ok(()),
            // An empty directory is replaced by the file a raw block publish needs.
            Some(TargetKind::Directory)
                if kind == TargetKind::File
                    && !st.paths.keys().any(|p| p != path && p.starts_with(path))
                    && !st.mounts.iter().any(|m| m.target == path) =>
            {
                st.paths.insert(path.to_path_buf(), kind);
                Ok(())
            }
            Some(_) => Err(MountError::Io(format!("{} exists as another kind", path.display()))),
            None => {
                st.paths.insert(path.to_path_buf(), kind);
                Ok(())
            }
        }
    }

    async fn remove_target(&self, path: &Path) -> Result<(), MountError> {
        let mut st = self.st();
        if st.mounts.iter().any(|m| m.target == path) {
            return Err(MountError::Busy(format!("{} is a mount point", path.display())));
        }
        st.paths.remove(path);
        Ok(())
    }

    async fn path_exists(&self, path: &Path) -> Result<bool, MountError> {
        Ok(self.st().paths.contains_key(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn power_loss_forgets_connections_and_mounts_but_not_the_remote_disk() {
        let k = FakeKernel::new("nqn.test:", "nqn.host");
        k.add_disk("nqn.test:pvc-1", 1 << 30);
        let dev = k
            .connect(&NvmeTarget {
                address: "10.0.0.1".into(),
                port: 4420,
                nqn: "nqn.test:pvc-1".into(),
                ctrl_loss_tmo: None,
                reconnect_delay: None,
                keep_alive_tmo: None,
            })
            .await
            .unwrap();
        k.format(&dev, "ext4").await.unwrap();
        k.prepare_target(Path::new("/stage"), TargetKind::Directory)
            .await
            .unwrap();
        k.mount(&dev, Path::new("/stage"), "ext4", &[]).await.unwrap();
        assert_eq!(k.connections().await.unwrap().len(), 1);
        assert_eq!(k.mounts().await.unwrap().len(), 1);

        k.power_loss();

        assert!(k.connections().await.unwrap().is_empty());
        assert!(k.mounts().await.unwrap().is_empty());
        assert!(!k.path_exists(Path::new("/stage")).await.unwrap());
        let disk = k.disk("nqn.test:pvc-1").unwrap();
        assert_eq!(disk.fs.as_deref(), Some("ext4"));
    }

    #[tokio::test]
    async fn a_refusing_target_keeps_existing_connections_and_refuses_new_ones() {
        let k = FakeKernel::new("nqn.test:", "nqn.host");
        let target = |nqn: &str| NvmeTarget {
            address: "10.0.0.1".into(),
            port: 4420,
            nqn: nqn.into(),
            ctrl_loss_tmo: None,
            reconnect_delay: None,
            keep_alive_tmo: None,
        };
        k.add_disk("nqn.test:pvc-1", 1 << 30);
        k.add_disk("nqn.test:pvc-2", 1 << 30);
        let dev = k.connect(&target("nqn.test:pvc-1")).await.unwrap();
        k.refuse("nqn.test:pvc-1", true);
        k.refuse("nqn.test:pvc-2", true);
        assert_eq!(k.connect(&target("nqn.test:pvc-1")).await.unwrap(), dev);
        let err = k.connect(&target("nqn.test:pvc-2")).await.unwrap_err();
        assert!(matches!(err, InitiatorError::Unavailable(ref m) if m.contains("not allowed")));
        k.refuse("nqn.test:pvc-2", false);
        assert!(k.connect(&target("nqn.test:pvc-2")).await.is_ok());
    }
}
