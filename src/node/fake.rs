//! An in-memory node kernel: one fake implementing both node ports ([`Initiator`] and
//! [`Mounter`]) over shared state, for unit tests of the node core and for the simulation.
//!
//! It models what the node core relies on: remote disks (NQN → size, filesystem), NVMe
//! controllers with their namespace devices, a mount table with filesystem mounts, bind
//! mounts and raw block binds (as `/proc/self/mountinfo` shows them), and the directories
//! and files created as targets. And what an outage does to them, as the Linux NVMe/TCP host
//! does it:
//!
//! - While the target is unreachable every controller is *connecting*: its device stays,
//!   I/O to it is queued (a mount, `umount`, `blkid` or fsck on it does not return: they
//!   answer [`MountError::Timeout`], as the real mounter does when its bound expires).
//!   Reconnect attempts run every `reconnect_delay` seconds (kernel default 10); after
//!   `ctrl_loss_tmo` seconds of failed attempts (kernel default 600, `-1` forever) the
//!   controller is deleted and its device disappears under its mounts.
//! - A controller's instance number (`nvme<N>`, device `/dev/nvme<N>n1`, `259:<N>`) is the
//!   lowest free one, and a deleted controller's number stays taken while a mount still
//!   holds its device: a volume reconnected after a loss comes back under a new name, and
//!   the old name is handed to the next connection once the dead mount is gone.
//!
//! Time enters explicitly ([`FakeKernel::advance`]), so the kernel is as deterministic as
//! its caller. Other faults: a lost controller ([`FakeKernel::lose_connection`]), a target
//! that refuses this host (an allow list naming another), connects held at a gate, damaged
//! filesystems, and connections left behind by an earlier life of the node. Every connect,
//! mount and bind made through the ports, and every controller lost under a mount, is
//! recorded for the simulation's checkers ([`FakeKernel::take_events`]).
//!
//! Deterministic: ordered maps only. The state lock is a sync mutex never held across
//! `.await`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::ports::initiator::{Connection, Initiator, InitiatorError, NvmeTarget};
use crate::ports::mounter::{FsCheck, MountEntry, MountError, Mounter, TargetKind, UsageStats};

/// The kernel's `ctrl-loss-tmo` when `nvme connect` does not set one (seconds).
pub const KERNEL_CTRL_LOSS_TMO: i32 = 600;
/// The kernel's `reconnect-delay` when `nvme connect` does not set one (seconds).
pub const KERNEL_RECONNECT_DELAY: u32 = 10;

/// Damage to a disk's filesystem, as a check before mounting finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsDamage {
    /// Clean.
    #[default]
    None,
    /// Errors a preen run repairs on its own (e.g. an unreplayed journal).
    Repairable,
    /// Errors only a person may repair.
    NeedsPerson,
}

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
    /// Damage to its filesystem.
    pub damage: FsDamage,
}

/// What happened in the kernel, for the simulation's checkers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    /// A connect through the port made a new controller for `nqn`.
    Connected {
        /// Subsystem.
        nqn: String,
        /// Its device.
        device: PathBuf,
    },
    /// A filesystem mount or a bind through the port: `target` now shows the disk of `nqn`.
    Mounted {
        /// Subsystem whose device the mount shows.
        nqn: String,
        /// Mount point.
        target: PathBuf,
    },
    /// A controller was deleted (ctrl-loss-tmo expired, lost, or disconnected) while a
    /// mount still used its device: I/O errors reach that filesystem.
    LostUnderMount {
        /// Subsystem.
        nqn: String,
        /// The controller's `ctrl_loss_tmo` (`-1`: forever).
        ctrl_loss_tmo: i32,
        /// Why: `ctrl-loss-tmo expired`, `lost`, `disconnected`, `disconnected while reconnecting`.
        why: &'static str,
    },
}

/// Link state of a controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Live,
    /// Reconnecting since `since`; the next attempt at `next`, `attempts` failed so far.
    Connecting {
        since: Duration,
        next: Duration,
        attempts: u32,
    },
}

#[derive(Debug, Clone)]
struct Device {
    nqn: String,
    instance: u32,
    /// Size the host sees (updated by rescan).
    size: u64,
    ctrl_loss_tmo: i32,
    reconnect_delay: u32,
    link: Link,
}

impl Device {
    fn number(&self) -> String {
        format!("259:{}", self.instance)
    }
}

fn device_path(instance: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nvme{instance}n1"))
}

#[derive(Debug, Default)]
struct State {
    disks: BTreeMap<String, FakeDisk>,
    unreachable: bool,
    /// Subsystems whose target refuses this host (an allow list that names another).
    refused: BTreeSet<String>,
    devices: BTreeMap<PathBuf, Device>,
    mounts: Vec<MountEntry>,
    paths: BTreeMap<PathBuf, TargetKind>,
    events: Vec<KernelEvent>,
}

impl State {
    /// The lowest instance number no controller has and no mount still holds.
    fn free_instance(&self) -> u32 {
        let taken: BTreeSet<u32> = self
            .devices
            .values()
            .map(|d| d.instance)
            .chain(self.mounts.iter().filter_map(|m| {
                m.dev.strip_prefix("259:").and_then(|n| n.parse().ok())
            }))
            .collect();
        (0..).find(|n| !taken.contains(n)).unwrap_or(u32::MAX)
    }

    fn reachable(&self, nqn: &str) -> bool {
        !self.unreachable && !self.refused.contains(nqn) && self.disks.contains_key(nqn)
    }

    /// Deletes the controllers `which` selects; `why` for the record.
    fn delete(&mut self, which: impl Fn(&Device) -> bool, why: &'static str) {
        let gone: Vec<(PathBuf, Device)> = self
            .devices
            .iter()
            .filter(|(_, d)| which(d))
            .map(|(p, d)| (p.clone(), d.clone()))
            .collect();
        for (path, d) in gone {
            self.devices.remove(&path);
            let number = d.number();
            if self.mounts.iter().any(|m| m.dev == number) {
                self.events.push(KernelEvent::LostUnderMount {
                    nqn: d.nqn,
                    ctrl_loss_tmo: d.ctrl_loss_tmo,
                    why,
                });
            }
        }
    }

    /// The device behind a mount's `dev`, if it still exists.
    fn device_by_number(&self, dev: &str) -> Option<&Device> {
        self.devices.values().find(|d| d.number() == dev)
    }

    /// The device a mount shows: a raw block bind (devtmpfs, whose own number says nothing)
    /// by the device node its root names — whichever controller has that name now — any
    /// other mount by its device number.
    fn device_of_mount(&self, m: &MountEntry) -> Option<&Device> {
        if m.fs_type == "devtmpfs" {
            return self.devices.get(&PathBuf::from(format!("/dev{}", m.root)));
        }
        self.device_by_number(&m.dev)
    }

    /// Fails with a timeout when I/O to `device` would be queued (controller reconnecting).
    fn io(&self, device: &Path, what: &str) -> Result<&Device, MountError> {
        let d = self.devices.get(device).ok_or_else(|| nf(device))?;
        if d.link != Link::Live {
            return Err(MountError::Timeout(format!(
                "{what} {}: I/O is queued while its NVMe controller reconnects",
                device.display()
            )));
        }
        Ok(d)
    }
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
                damage: FsDamage::None,
            },
        );
    }

    /// Grows a disk on the server side (the host sees it after a rescan).
    pub fn resize_disk(&self, nqn: &str, size: u64) {
        if let Some(d) = self.st().disks.get_mut(nqn) {
            d.size = size;
        }
    }

    /// Damages the filesystem on the disk of `nqn`.
    pub fn damage_filesystem(&self, nqn: &str, damage: FsDamage) {
        if let Some(d) = self.st().disks.get_mut(nqn) {
            d.damage = damage;
        }
    }

    /// The disk exported under `nqn`.
    pub fn disk(&self, nqn: &str) -> Option<FakeDisk> {
        self.st().disks.get(nqn).cloned()
    }

    /// Makes every new connect fail as unreachable (or heals it); existing controllers are
    /// not affected (see [`Self::outage_begins`] for an outage that reaches them).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.st().unreachable = unreachable;
    }

    /// The target goes away at `now`: new connects fail, every controller starts
    /// reconnecting (its I/O queued) until the target is back or its ctrl-loss-tmo ends.
    pub fn outage_begins(&self, now: Duration) {
        let mut st = self.st();
        st.unreachable = true;
        for d in st.devices.values_mut() {
            if d.link == Link::Live {
                d.link = Link::Connecting {
                    since: now,
                    next: now + Duration::from_secs(u64::from(d.reconnect_delay.max(1))),
                    attempts: 0,
                };
            }
        }
    }

    /// The target is back (reconnects succeed from the next attempt on).
    pub fn outage_ends(&self) {
        self.st().unreachable = false;
    }

    /// Time passes to `now`: reconnect attempts that are due run; a controller whose
    /// attempts outlast its ctrl-loss-tmo is deleted.
    pub fn advance(&self, now: Duration) {
        let mut st = self.st();
        let mut expired = BTreeSet::new();
        let paths: Vec<PathBuf> = st.devices.keys().cloned().collect();
        for p in paths {
            let reachable = st.reachable(&st.devices[&p].nqn);
            let d = st.devices.get_mut(&p).expect("listed above");
            let delay = Duration::from_secs(u64::from(d.reconnect_delay.max(1)));
            let max_attempts = (d.ctrl_loss_tmo >= 0).then(|| {
                u32::try_from(d.ctrl_loss_tmo).unwrap_or(0).div_ceil(d.reconnect_delay.max(1))
            });
            while let Link::Connecting {
                since,
                next,
                attempts,
            } = d.link
            {
                if next > now {
                    break;
                }
                if reachable {
                    d.link = Link::Live;
                    break;
                }
                let attempts = attempts + 1;
                if max_attempts.is_some_and(|max| attempts >= max) {
                    expired.insert(p.clone());
                    break;
                }
                d.link = Link::Connecting {
                    since,
                    next: next + delay,
                    attempts,
                };
            }
        }
        st.delete(
            |d| {
                expired.contains(&device_path(d.instance))
            },
            "ctrl-loss-tmo expired",
        );
    }

    /// When the next reconnect attempt is due (what [`Self::advance`] acts on next), if a
    /// controller is reconnecting.
    pub fn next_attempt(&self) -> Option<Duration> {
        self.st()
            .devices
            .values()
            .filter_map(|d| match d.link {
                Link::Connecting { next, .. } => Some(next),
                Link::Live => None,
            })
            .min()
    }

    /// The NQNs with a controller (live or reconnecting), sorted.
    pub fn connected_nqns(&self) -> Vec<String> {
        let mut v: Vec<String> = self.st().devices.values().map(|d| d.nqn.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// Whether the controller of `nqn` is live (connected, I/O flowing).
    pub fn is_live(&self, nqn: &str) -> bool {
        self.st()
            .devices
            .values()
            .any(|d| d.nqn == nqn && d.link == Link::Live)
    }

    /// `(ctrl_loss_tmo, reconnect_delay)` the controller of `nqn` was connected with.
    pub fn reconnect_settings(&self, nqn: &str) -> Option<(i32, u32)> {
        self.st()
            .devices
            .values()
            .find(|d| d.nqn == nqn)
            .map(|d| (d.ctrl_loss_tmo, d.reconnect_delay))
    }

    /// The target of `nqn` refuses (or, with `false`, accepts again) new connections from
    /// this host: its allow list names another host. Existing connections stay (and a
    /// reconnecting one keeps trying).
    pub fn refuse(&self, nqn: &str, refused: bool) {
        let mut st = self.st();
        if refused {
            st.refused.insert(nqn.to_string());
        } else {
            st.refused.remove(nqn);
        }
    }

    /// The controller of `nqn` is lost (deleted): its device disappears, mounts stay.
    pub fn lose_connection(&self, nqn: &str) {
        self.st().delete(|d| d.nqn == nqn, "lost");
    }

    /// A connection to `nqn` left behind by an earlier life of this node (not made through
    /// the port, so not an event; the disk must be known). Its device path.
    pub fn leave_connection(&self, nqn: &str) -> Option<PathBuf> {
        let mut st = self.st();
        if let Some(p) = device_of_nqn(&st, nqn) {
            return Some(p);
        }
        let size = st.disks.get(nqn)?.size;
        Some(new_device(&mut st, nqn, size, KERNEL_CTRL_LOSS_TMO, KERNEL_RECONNECT_DELAY))
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

    /// The subsystem whose device a mount or raw block bind shows (`None`: its device is
    /// gone, or not ours).
    pub fn nqn_of_mount(&self, m: &MountEntry) -> Option<String> {
        self.st().device_of_mount(m).map(|d| d.nqn.clone())
    }

    /// The events since the last call, oldest first.
    pub fn take_events(&self) -> Vec<KernelEvent> {
        std::mem::take(&mut self.st().events)
    }

    /// Whether events wait for [`Self::take_events`].
    pub fn has_events(&self) -> bool {
        !self.st().events.is_empty()
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

/// A new controller for `nqn` under the lowest free instance number.
fn new_device(st: &mut State, nqn: &str, size: u64, ctrl_loss_tmo: i32, reconnect_delay: u32) -> PathBuf {
    let instance = st.free_instance();
    let path = device_path(instance);
    st.devices.insert(
        path.clone(),
        Device {
            nqn: nqn.to_string(),
            instance,
            size,
            ctrl_loss_tmo,
            reconnect_delay,
            link: Link::Live,
        },
    );
    path
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
        let path = new_device(
            &mut st,
            &target.nqn,
            size,
            target.ctrl_loss_tmo.unwrap_or(KERNEL_CTRL_LOSS_TMO),
            target.reconnect_delay.unwrap_or(KERNEL_RECONNECT_DELAY),
        );
        st.events.push(KernelEvent::Connected {
            nqn: target.nqn.clone(),
            device: path.clone(),
        });
        Ok(path)
    }

    async fn disconnect(&self, nqn: &str) -> Result<(), InitiatorError> {
        self.check_ours(nqn)?;
        let mut st = self.st();
        // A controller that was reconnecting fails its queued I/O as it goes.
        let live = st.devices.values().any(|d| d.nqn == nqn && d.link == Link::Live);
        let why = if live {
            "disconnected"
        } else {
            "disconnected while reconnecting"
        };
        st.delete(|d| d.nqn == nqn, why);
        Ok(())
    }
    async fn find_device(&self, nqn: &str) -> Result<Option<PathBuf>, InitiatorError> {
        if self.check_ours(nqn).is_err() {
            return Ok(None);
        }
        Ok(device_of_nqn(&self.st(), nqn))
    }

    async fn nqn_of_device(&self, device: &Path) -> Result<Option<String>, InitiatorError> {
        Ok(self
            .st()
            .devices
            .get(device)
            .map(|d| d.nqn.clone())
            .filter(|n| self.check_ours(n).is_ok()))
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
                live: d.link == Link::Live,
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

    async fn apply_reconnect(&self, target: &NvmeTarget) -> Result<bool, InitiatorError> {
        self.check_ours(&target.nqn)?;
        let mut st = self.st();
        let mut changed = false;
        // Like the kernel's sysfs stores: a reconnecting controller keeps its attempts so
        // far and is judged against the new settings from its next attempt on.
        for d in st.devices.values_mut().filter(|d| d.nqn == target.nqn) {
            if let Some(v) = target.reconnect_delay.filter(|v| *v != d.reconnect_delay) {
                d.reconnect_delay = v;
                changed = true;
            }
            if let Some(v) = target.ctrl_loss_tmo.filter(|v| *v != d.ctrl_loss_tmo) {
                d.ctrl_loss_tmo = v;
                changed = true;
            }
        }
        Ok(changed)
    }
}

fn nf(p: &Path) -> MountError {
    MountError::NotFound(p.display().to_string())
}

#[async_trait]
impl Mounter for FakeKernel {
    async fn filesystem_of(&self, device: &Path) -> Result<Option<String>, MountError> {
        let st = self.st();
        let d = st.io(device, "blkid")?;
        Ok(st.disks.get(&d.nqn).and_then(|k| k.fs.clone()))
    }

    async fn check_filesystem(&self, device: &Path, fs_type: &str) -> Result<FsCheck, MountError> {
        let mut st = self.st();
        let nqn = st.io(device, "fsck")?.nqn.clone();
        let disk = st.disks.get_mut(&nqn).ok_or_else(|| nf(device))?;
        if fs_type != "ext4" {
            return Ok(FsCheck::Clean);
        }
        match disk.damage {
            FsDamage::None => Ok(FsCheck::Clean),
            FsDamage::Repairable => {
                disk.damage = FsDamage::None;
                Ok(FsCheck::Repaired("journal replayed".into()))
            }
            FsDamage::NeedsPerson => Err(MountError::Corrupt(format!(
                "{}: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY",
                device.display()
            ))),
        }
    }

    async fn format(&self, device: &Path, fs_type: &str) -> Result<(), MountError> {
        let mut st = self.st();
        let d = st.io(device, "mkfs")?.clone();
        let disk = st.disks.get_mut(&d.nqn).ok_or_else(|| nf(device))?;
        disk.fs = Some(fs_type.to_string());
        disk.fs_size = d.size;
        disk.formats += 1;
        disk.damage = FsDamage::None;
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
        let d = st.io(source, "mount")?.clone();
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
            dev: d.number(),
            root: "/".into(),
            source: source.display().to_string(),
            target: target.to_path_buf(),
            fs_type: fs_type.to_string(),
            options: opts,
        });
        st.events.push(KernelEvent::Mounted {
            nqn: d.nqn,
            target: target.to_path_buf(),
        });
        Ok(())
    }

    async fn bind(&self, source: &Path, target: &Path, readonly: bool) -> Result<(), MountError> {
        let mut st = self.st();
        if !st.paths.contains_key(target) {
            return Err(nf(target));
        }
        let rw = if readonly { "ro" } else { "rw" }.to_string();
        let (entry, nqn) = if let Some(m) = st.mounts.iter().rev().find(|m| m.target == source) {
            let nqn = st.device_by_number(&m.dev).map(|d| d.nqn.clone());
            let entry = MountEntry {
                target: target.to_path_buf(),
                options: vec![rw],
                ..m.clone()
            };
            (entry, nqn)
        } else if let Some(d) = st.devices.get(source) {
            let name = source.file_name().map(|n| n.to_string_lossy().into_owned());
            let entry = MountEntry {
                dev: "0:5".into(),
                root: format!("/{}", name.unwrap_or_default()),
                source: "udev".into(),
                target: target.to_path_buf(),
                fs_type: "devtmpfs".into(),
                options: vec![rw],
            };
            (entry, Some(d.nqn.clone()))
        } else {
            return Err(nf(source));
        };
        st.mounts.push(entry);
        if let Some(nqn) = nqn {
            st.events.push(KernelEvent::Mounted {
                nqn,
                target: target.to_path_buf(),
            });
        }
        Ok(())
    }

    async fn unmount(&self, target: &Path) -> Result<(), MountError> {
        let mut st = self.st();
        if let Some(i) = st.mounts.iter().rposition(|m| m.target == target) {
            if let Some(d) = st.device_by_number(&st.mounts[i].dev)
                && d.link != Link::Live
            {
                // umount flushes: it waits for the queued I/O like any other.
                return Err(MountError::Timeout(format!(
                    "umount {}: I/O is queued while its NVMe controller reconnects",
                    target.display()
                )));
            }
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
        let d = st.io(device, "resize")?.clone();
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
        let Some(d) = st.device_by_number(&m.dev) else {
            // statvfs of a filesystem whose device is gone.
            return Err(MountError::Io(format!(
                "statvfs {}: Input/output error",
                path.display()
            )));
        };
        let total = st.disks.get(&d.nqn).map(|k| k.fs_size).unwrap_or(0);
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
        st.mounts
            .iter()
            .rev()
            .find(|m| m.target == device && m.fs_type == "devtmpfs")
            .and_then(|m| st.device_of_mount(m))
            .map(|d| d.size)
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
            .map(Device::number)
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

    fn target(nqn: &str) -> NvmeTarget {
        NvmeTarget {
            address: "10.0.0.1".into(),
            port: 4420,
            nqn: nqn.into(),
            ctrl_loss_tmo: None,
            reconnect_delay: None,
            keep_alive_tmo: None,
        }
    }

    #[tokio::test]
    async fn power_loss_forgets_connections_and_mounts_but_not_the_remote_disk() {
        let k = FakeKernel::new("nqn.test:", "nqn.host");
        k.add_disk("nqn.test:pvc-1", 1 << 30);
        let dev = k.connect(&target("nqn.test:pvc-1")).await.unwrap();
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
    async fn a_raw_block_bind_shows_the_device_its_root_names() {
        // Found by the simulation: its liveness checker resolved a VM disk's block bind by
        // the bind's own device number (devtmpfs), and called a live bind unusable.
        let k = FakeKernel::new("nqn.test:", "nqn.host");
        k.add_disk("nqn.test:pvc-1", 1 << 30);
        k.add_disk("nqn.test:pvc-2", 1 << 30);
        let dev = k.connect(&target("nqn.test:pvc-1")).await.unwrap();
        let pod = Path::new("/pods/p1/dev");
        k.prepare_target(pod, TargetKind::File).await.unwrap();
        k.bind(&dev, pod, false).await.unwrap();
        let bind = k.mount_table().pop().unwrap();
        assert_eq!(bind.fs_type, "devtmpfs");
        assert_eq!(k.nqn_of_mount(&bind).as_deref(), Some("nqn.test:pvc-1"));
        assert_eq!(k.device_size(pod).await.unwrap(), 1 << 30);

        // The controller is lost: the bind shows nothing; once its name goes to another
        // volume's controller, the bind shows that volume's disk.
        k.lose_connection("nqn.test:pvc-1");
        assert_eq!(k.nqn_of_mount(&bind), None);
        assert_eq!(k.connect(&target("nqn.test:pvc-2")).await.unwrap(), dev);
        assert_eq!(k.nqn_of_mount(&bind).as_deref(), Some("nqn.test:pvc-2"));
    }

    #[tokio::test]
    async fn a_refusing_target_keeps_existing_connections_and_refuses_new_ones() {
        let k = FakeKernel::new("nqn.test:", "nqn.host");
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
