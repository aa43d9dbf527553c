//! The RDS emulator: a model of RouterOS `/disk` and `/file` on one storage pool, driven
//! by the same CLI text the production SSH transport sends, answering with
//! RouterOS-faithful output (see [`output`]).
//!
//! Reachable in-process ([`crate::routeros::transport::inproc`]: the plugin's embedded
//! default), over a plain TCP line protocol ([`crate::routeros::transport::tcp`]: the
//! simulation, over turmoil TCP) and behind a russh SSH server ([`ssh_server`]:
//! integration tests of the SSH transport). Fault hooks per command kind ([`faults`]).
//!
//! Semantics kept from RouterOS: removing a disk entry does not remove its backing file;
//! `set`/`remove` on an empty `[find ...]` do nothing and print nothing; without a custom
//! NQN the export's NQN is the slot; `file-size` only grows; a pool has a fixed size and
//! `free` is what the files leave (counted by their logical sizes, so the pool is never
//! overcommitted).
//!
//! Invariants: every mutation is applied to a copy of the state, persisted (when backed by
//! a directory), then committed, so a failure leaves the previous state intact. The state
//! mutex is never held across `.await` (delays happen before it is taken).

pub mod backing;
pub mod cli;
pub mod faults;
pub mod output;
pub mod ssh_server;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::fsutil::atomic_write;
use crate::ports::Clock;
use crate::routeros::command::{Command, DiskAdd, DiskFilter, PrintStyle};
use backing::{Backing, FileBacking, MemBacking};
use faults::{Fault, Faults};
use output::{Item, Val};

/// The `Flags:` legend printed before `/disk print detail` records.
pub const DISK_LEGEND: &str =
    "Flags: X - DISABLED; B - BLOCKED; M - MOUNTED; F - FORMATTING; R - RAID-MEMBER";
/// The `Flags:` legend of `/file print detail`.
pub const FILE_LEGEND: &str = "Flags: R - READONLY";

/// The storage pool the emulated RDS carves disks from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Slot of the pool disk (e.g. `raid1`).
    pub slot: String,
    /// Its mount point; file paths of disks must lie under it (e.g. `storage-pool`).
    pub mount_point: String,
    /// Pool size in bytes.
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Export {
    port: u16,
    nqn: String,
    allow_host: Option<String>,
}

/// A disk's NVMe/TCP export as seen from outside (for checks and simulations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportView {
    /// Subsystem NQN.
    pub nqn: String,
    /// The one host NQN allowed to connect (`None`: any host).
    pub allow_host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DiskEntry {
    slot: String,
    file_path: String,
    file_size: u64,
    export: Option<Export>,
    #[serde(default)]
    comment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileEntry {
    size: u64,
    created_unix: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    disks: Vec<DiskEntry>,
    files: BTreeMap<String, FileEntry>,
}

/// What the emulator answers to one command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The text RouterOS prints.
    pub output: String,
    /// Whether the command succeeded (the SSH server's exit status).
    pub ok: bool,
}

impl Reply {
    fn ok(output: String) -> Self {
        Self { output, ok: true }
    }
    fn err(line: impl Into<String>) -> Self {
        Self {
            output: format!("{}\n", line.into()),
            ok: false,
        }
    }
}

/// The fate of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The reply reaches the client.
    Reply(Reply),
    /// The command was applied but its reply is lost (a fault).
    Dropped,
}

/// Why the emulator could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("RDS emulator state in {path}: {reason}")]
pub struct OpenError {
    /// The directory or file at fault.
    pub path: String,
    /// What went wrong.
    pub reason: String,
}

/// The emulated RDS.
pub struct Emulator {
    pool: PoolConfig,
    state: Mutex<State>,
    backing: Arc<dyn Backing>,
    state_file: Option<PathBuf>,
    clock: Arc<dyn Clock>,
    faults: Faults,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("pool", &self.pool)
            .field("state_file", &self.state_file)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// An emulator whose files are sizes in memory (simulation, tests).
    pub fn in_memory(pool: PoolConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            pool,
            state: Mutex::new(State::default()),
            backing: Arc::new(MemBacking::default()),
            state_file: None,
            clock,
            faults: Faults::default(),
        }
    }

    /// An emulator on sparse files under `dir`, its tables persisted in
    /// `dir/emulator.json` (reloaded when present).
    pub fn open_dir(
        dir: &Path,
        pool: PoolConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, OpenError> {
        let err = |p: &Path, e: &dyn std::fmt::Display| OpenError {
            path: p.display().to_string(),
            reason: e.to_string(),
        };
        let backing = FileBacking::new(dir).map_err(|e| err(dir, &e))?;
        let state_file = dir.join("emulator.json");
        let state = match std::fs::read(&state_file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(&state_file, &e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(err(&state_file, &e)),
        };
        Ok(Self {
            pool,
            state: Mutex::new(state),
            backing: Arc::new(backing),
            state_file: Some(state_file),
            clock,
            faults: Faults::default(),
        })
    }

    /// The fault hooks.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The pool.
    pub fn pool(&self) -> &PoolConfig {
        &self.pool
    }

    /// Where a disk's backing file lives on the host (file-backed emulators only).
    pub fn host_path_of(&self, slot: &str) -> Option<PathBuf> {
        let state = self.lock();
        let d = state.disks.iter().find(|d| d.slot == slot)?;
        self.backing.host_path(&d.file_path)
    }

    /// Names of all files, sorted (for leak checks).
    pub fn file_names(&self) -> Vec<String> {
        self.lock().files.keys().cloned().collect()
    }

    /// Slots of all file-backed disks, sorted (for leak checks).
    pub fn disk_slots(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().disks.iter().map(|d| d.slot.clone()).collect();
        v.sort();
        v
    }

    /// Every exported disk's export, by slot (for checks and the simulated data path).
    pub fn exports(&self) -> BTreeMap<String, ExportView> {
        self.lock()
            .disks
            .iter()
            .filter_map(|d| {
                let e = d.export.as_ref()?;
                let view = ExportView {
                    nqn: e.nqn.clone(),
                    allow_host: e.allow_host.clone(),
                };
                Some((d.slot.clone(), view))
            })
            .collect()
    }

    /// Size in bytes of the disk in `slot`, if there is one (for checks).
    pub fn disk_size(&self, slot: &str) -> Option<u64> {
        self.lock()
            .disks
            .iter()
            .find(|d| d.slot == slot)
            .map(|d| d.file_size)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Executes one command line, with the queued fault for its kind (if any).
    pub async fn execute(&self, line: &str) -> Outcome {
        let cmd = match cli::read_command(line) {
            Ok(c) => c,
            Err(e) => return Outcome::Reply(Reply::err(e.0)),
        };
        let fault = self.faults.take(cmd.kind());
        match &fault {
            Some(Fault::Fail(msg)) => return Outcome::Reply(Reply::err(msg.clone())),
            Some(Fault::Delay(d)) => tokio::time::sleep(*d).await,
            Some(Fault::DropReply) | None => {}
        }
        // File-backed commands do blocking file I/O (a copy may take long): on a
        // multi-threaded runtime, let the other tasks move off this worker meanwhile.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let reply = if multi_thread && self.state_file.is_some() {
            tokio::task::block_in_place(|| self.apply(&cmd))
        } else {
            self.apply(&cmd)
        };
        if fault == Some(Fault::DropReply) {
            Outcome::Dropped
        } else {
            Outcome::Reply(reply)
        }
    }

    /// Applies a typed command (no faults).
    pub fn apply(&self, cmd: &Command) -> Reply {
        match cmd {
            Command::DiskPrint { filter, style } => self.print_disks(filter, *style),
            Command::FilePrint { name, exact } => self.print_files(name, *exact),
            Command::MonitorTraffic { slot } => {
                if !self.lock().disks.iter().any(|d| &d.slot == slot) {
                    return Reply::err("no such item");
                }
                Reply::ok(output::monitor(&[
                    ("slot", slot.clone()),
                    ("read-ops-per-second", "0".into()),
                    ("write-ops-per-second", "0".into()),
                    ("read-rate", "0bps".into()),
                    ("write-rate", "0bps".into()),
                ]))
            }
            _ => self.mutate(cmd),
        }
    }

    fn mutate(&self, cmd: &Command) -> Reply {
        let mut guard = self.lock();
        let mut next = guard.clone();
        let result = match cmd {
            Command::DiskAdd(add) => self.add(&mut next, add),
            Command::DiskSetSize { slot, size_bytes } => {
                self.set_size(&mut next, slot, *size_bytes)
            }
            Command::DiskSetAllowHost { slot, host_nqn } => {
                set_allow(&mut next, slot, Some(host_nqn.clone()))
            }
            Command::DiskUnsetAllowHost { slot } => set_allow(&mut next, slot, None),
            Command::DiskRemove { slot } => {
                next.disks.retain(|d| &d.slot != slot);
                Ok(())
            }
            Command::FileRemove { name } => self.remove_file(&mut next, name),
            Command::DiskPrint { .. }
            | Command::FilePrint { .. }
            | Command::MonitorTraffic { .. } => Ok(()),
        };
        if let Err(line) = result {
            return Reply::err(line);
        }
        if next == *guard {
            return Reply::ok(String::new());
        }
        if let Some(path) = &self.state_file {
            let data = match serde_json::to_vec_pretty(&next) {
                Ok(d) => d,
                Err(e) => return Reply::err(format!("failure: storage busy: {e}")),
            };
            if let Err(e) = atomic_write(path, &data) {
                return Reply::err(format!("failure: storage busy: {e}"));
            }
        }
        *guard = next;
        Reply::ok(String::new())
    }

    fn used(state: &State) -> u64 {
        state
            .files
            .values()
            .map(|f| f.size)
            .fold(0u64, u64::saturating_add)
    }

    fn check_path(&self, path: &str) -> Result<(), String> {
        let under = path
            .strip_prefix(&self.pool.mount_point)
            .and_then(|r| r.strip_prefix('/'));
        match under {
            Some(rest)
                if !rest.is_empty()
                    && rest
                        .split('/')
                        .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
                    && !path.contains(['\\', '\0']) =>
            {
                Ok(())
            }
            _ => Err(format!(
                "failure: file-path {path:?} is not on a mounted disk ({})",
                self.pool.mount_point
            )),
        }
    }

    fn add(&self, st: &mut State, add: &DiskAdd) -> Result<(), String> {
        if add.slot.is_empty() {
            return Err("failure: slot is required".into());
        }
        if st.disks.iter().any(|d| d.slot == add.slot) {
            return Err(format!(
                "failure: disk with slot {:?} already exists",
                add.slot
            ));
        }
        self.check_path(&add.file_path)?;
        if st.files.contains_key(&add.file_path) {
            return Err(format!("failure: file {:?} already exists", add.file_path));
        }
        let source = match &add.copy_from {
            Some(src) => Some(
                st.disks
                    .iter()
                    .find(|d| &d.slot == src)
                    .cloned()
                    .ok_or_else(|| "no such item".to_string())?,
            ),
            None => None,
        };
        let size = match (add.size_bytes, &source) {
            (Some(n), Some(s)) if n < s.file_size => {
                return Err(format!(
                    "failure: file-size can not be smaller than the source disk ({} bytes)",
                    s.file_size
                ));
            }
            (Some(n), _) => n,
            (None, Some(s)) => s.file_size,
            (None, None) => return Err("failure: file-size is required".into()),
        };
        let free = self.pool.size_bytes.saturating_sub(Self::used(st));
        if size > free {
            return Err(format!(
                "failure: not enough space on disk ({size} bytes requested, {free} free)"
            ));
        }
        let io = match &source {
            Some(s) => self.backing.copy(&s.file_path, &add.file_path, size),
            None => self.backing.create(&add.file_path, size),
        };
        io.map_err(|e| format!("failure: storage busy: {e}"))?;
        st.files.insert(
            add.file_path.clone(),
            FileEntry {
                size,
                created_unix: unix_now(self.clock.as_ref()),
            },
        );
        st.disks.push(DiskEntry {
            slot: add.slot.clone(),
            file_path: add.file_path.clone(),
            file_size: size,
            export: add.export.as_ref().map(|e| Export {
                port: e.port,
                nqn: e.nqn.clone(),
                allow_host: e.allow_host.clone(),
            }),
            comment: add.comment.clone(),
        });
        Ok(())
    }

    fn set_size(&self, st: &mut State, slot: &str, size: u64) -> Result<(), String> {
        let used = Self::used(st);
        let Some(d) = st.disks.iter_mut().find(|d| d.slot == slot) else {
            return Ok(()); // `set` on an empty [find] does nothing
        };
        if size < d.file_size {
            return Err("failure: file-size can not be decreased".into());
        }
        let grow = size - d.file_size;
        let free = self.pool.size_bytes.saturating_sub(used);
        if grow > free {
            return Err(format!(
                "failure: not enough space on disk ({grow} more bytes requested, {free} free)"
            ));
        }
        if grow == 0 {
            return Ok(());
        }
        self.backing
            .resize(&d.file_path, size)
            .map_err(|e| format!("failure: storage busy: {e}"))?;
        d.file_size = size;
        if let Some(f) = st.files.get_mut(&d.file_path) {
            f.size = size;
        }
        Ok(())
    }

    fn remove_file(&self, st: &mut State, name: &str) -> Result<(), String> {
        if !st.files.contains_key(name) {
            return Ok(()); // `remove` on an empty [find] does nothing
        }
        if st.disks.iter().any(|d| d.file_path == name) {
            return Err(format!("failure: file {name:?} is in use by a disk"));
        }
        self.backing
            .remove(name)
            .map_err(|e| format!("failure: storage busy: {e}"))?;
        st.files.remove(name);
        Ok(())
    }

    fn print_disks(&self, filter: &DiskFilter, style: PrintStyle) -> Reply {
        let st = self.lock();
        let mut items = Vec::new();
        let pool_selected = match filter {
            DiskFilter::All => true,
            DiskFilter::Slot(s) => *s == self.pool.slot,
            DiskFilter::SlotPrefix(p) => self.pool.slot.starts_with(p.as_str()),
            DiskFilter::MountPoint(m) => *m == self.pool.mount_point,
        };
        if pool_selected {
            let used = Self::used(&st);
            let free = self.pool.size_bytes.saturating_sub(used);
            let pct = u128::from(used) * 100 / u128::from(self.pool.size_bytes.max(1));
            items.push(Item {
                index: 0,
                flags: "M".into(),
                comment: None,
                props: vec![
                    ("slot", Val::Str(self.pool.slot.clone())),
                    ("type", Val::Bare("raid".into())),
                    ("model", Val::Str("ROSE Data Server RAID".into())),
                    ("fs", Val::Bare("btrfs".into())),
                    ("mount-point", Val::Str(self.pool.mount_point.clone())),
                    ("size", Val::Bytes(self.pool.size_bytes)),
                    ("free", Val::Bytes(free)),
                    ("use", Val::Bare(format!("{pct}%"))),
                ],
            });
        }
        for (i, d) in st.disks.iter().enumerate() {
            let selected = match filter {
                DiskFilter::All => true,
                DiskFilter::Slot(s) => d.slot == *s,
                DiskFilter::SlotPrefix(p) => d.slot.starts_with(p.as_str()),
                DiskFilter::MountPoint(_) => false,
            };
            if !selected {
                continue;
            }
            let mut props = vec![
                ("slot", Val::Str(d.slot.clone())),
                ("type", Val::Bare("file".into())),
                ("file-path", Val::Str(format!("/{}", d.file_path))),
                ("file-size", Val::Size(d.file_size)),
                (
                    "nvme-tcp-export",
                    Val::Bare(if d.export.is_some() { "yes" } else { "no" }.into()),
                ),
            ];
            if let Some(e) = &d.export {
                props.push(("nvme-tcp-server-port", Val::Bare(e.port.to_string())));
                props.push(("nvme-tcp-server-nqn", Val::Str(e.nqn.clone())));
                if let Some(h) = &e.allow_host {
                    props.push(("nvme-tcp-server-allow-host-name", Val::Str(h.clone())));
                }
            }
            items.push(Item {
                index: i + 1,
                flags: String::new(),
                comment: d.comment.clone(),
                props,
            });
        }
        Reply::ok(match style {
            PrintStyle::Detail => output::detail(DISK_LEGEND, &items),
            PrintStyle::Terse => output::terse(&items),
        })
    }

    fn print_files(&self, name: &str, exact: bool) -> Reply {
        let st = self.lock();
        let items: Vec<Item> = st
            .files
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| {
                if exact {
                    *n == name
                } else {
                    n.starts_with(name)
                }
            })
            .map(|(i, (n, f))| Item {
                comment: None,
                index: i,
                flags: String::new(),
                // As devices print it: the two-word type unquoted, the size with a unit
                // (exact here: a unit only when one decimal is exact).
                props: vec![
                    ("name", Val::Str(n.clone())),
                    ("type", Val::Bare(".img file".into())),
                    ("size", Val::Size(f.size)),
                    ("creation-time", Val::Time(f.created_unix)),
                    ("last-modified", Val::Time(f.created_unix)),
                ],
            })
            .collect();
        Reply::ok(output::detail(FILE_LEGEND, &items))
    }
}

fn set_allow(st: &mut State, slot: &str, host: Option<String>) -> Result<(), String> {
    let Some(d) = st.disks.iter_mut().find(|d| d.slot == slot) else {
        return Ok(());
    };
    match &mut d.export {
        Some(e) => {
            e.allow_host = host;
            Ok(())
        }
        None if host.is_none() => Ok(()),
        None => Err("failure: nvme-tcp-export is not enabled on this disk".into()),
    }
}

fn unix_now(clock: &dyn Clock) -> i64 {
    clock
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
