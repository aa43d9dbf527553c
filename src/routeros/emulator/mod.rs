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
//! an export with `nvme-tcp-server-allow-host-name` admits only that host NQN at connect
//! ([`Admission`]; the embedded default's loop initiator asks it, see [`admission_in`]);
//! `set`/`remove` on an empty `[find ...]` do nothing and print nothing; without a custom
//! NQN the export's NQN is the slot; `file-size` only grows; a pool has a fixed size and
//! `free` is what the files leave (counted by their logical sizes, so the pool is never
//! overcommitted).
//!
//! Persistence (when backed by a directory): the tables are a journaled state
//! ([`crate::fsutil::journal`]: `emulator.json` + `emulator.journal`); a command's reply is
//! sent only after its change is in the journal, so an answered command survives a
//! `kill -9` of the plugin (no fsync per change: see the journal's header).
//!
//! Invariants:
//! - a mutation is planned against the state (validated, its changes computed), its file
//!   I/O runs, then its changes are journaled and applied — in that order, so a failure at
//!   any step leaves the previous state intact, and after a crash the tables never name a
//!   file that was not made (a crash after the I/O leaves at worst an orphan file the
//!   tables do not know, which the next add of that path replaces);
//! - file I/O (creating, copying, growing, removing a disk file) runs outside the state
//!   mutex: independent disks never wait on each other's I/O. While it runs, the slot,
//!   the file and the space it needs are claimed; a command touching a claimed slot or
//!   file is answered "busy" (callers observe and retry), and free space counts the
//!   claimed bytes as used;
//! - the state mutex is never held across `.await` (delays happen before it is taken).

pub mod backing;
pub mod cli;
pub mod faults;
pub mod output;
pub mod ssh_server;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::fsutil::journal::{Journal, Journaled};
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

/// What the emulated NVMe/TCP target answers a host that connects to a disk's export: the
/// allow-list check a target makes at connect (an existing connection is not re-checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The export admits the host: its allow list is empty or names the host.
    Admitted,
    /// No disk in that slot.
    NoDisk,
    /// The disk is not exported over NVMe/TCP.
    NotExported,
    /// The export admits only this other host NQN (the data-path fence, or parked).
    Refused {
        /// The one host NQN the export admits.
        allowed: String,
    },
}

impl State {
    fn admission(&self, slot: &str, host_nqn: &str) -> Admission {
        let Some(d) = self.disks.iter().find(|d| d.slot == slot) else {
            return Admission::NoDisk;
        };
        match &d.export {
            None => Admission::NotExported,
            Some(Export {
                allow_host: Some(allowed),
                ..
            }) if allowed != host_nqn => Admission::Refused {
                allowed: allowed.clone(),
            },
            Some(_) => Admission::Admitted,
        }
    }
}

/// Whether the export of `slot` admits `host_nqn`, read fresh from the tables an emulator
/// keeps in `dir` (`dir/emulator.json` and its journal, only read): how the embedded
/// default's loop initiator, possibly in another process, asks the embedded RDS at connect.
/// No tables yet: no disk.
pub fn admission_in(dir: &Path, slot: &str, host_nqn: &str) -> Result<Admission, OpenError> {
    let state = Journal::<State>::read(dir, "emulator").map_err(|e| OpenError {
        path: dir.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(state.admission(slot, host_nqn))
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

/// One change of the tables, as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Change {
    /// A disk entry added (after the others) or replaced (in place).
    Disk(DiskEntry),
    /// The disk entry of a slot removed.
    DiskGone(String),
    /// A file added or changed.
    File(String, FileEntry),
    /// A file removed.
    FileGone(String),
}

impl Journaled for State {
    type Change = Change;

    fn apply(&mut self, change: Change) {
        match change {
            Change::Disk(entry) => match self.disks.iter_mut().find(|d| d.slot == entry.slot) {
                Some(d) => *d = entry,
                None => self.disks.push(entry),
            },
            Change::DiskGone(slot) => self.disks.retain(|d| d.slot != slot),
            Change::File(name, entry) => {
                self.files.insert(name, entry);
            }
            Change::FileGone(name) => {
                self.files.remove(&name);
            }
        }
    }

    fn entry_count(&self) -> usize {
        self.disks.len() + self.files.len()
    }
}

/// What a mutation claims while its file I/O runs outside the state mutex.
#[derive(Debug, Clone, Default)]
struct Claim {
    slot: Option<String>,
    file: String,
    bytes: u64,
}

/// Everything claimed now.
#[derive(Debug, Default)]
struct Claims {
    slots: BTreeSet<String>,
    files: BTreeSet<String>,
    bytes: u64,
}

impl Claims {
    fn take(&mut self, c: &Claim) {
        if let Some(s) = &c.slot {
            self.slots.insert(s.clone());
        }
        self.files.insert(c.file.clone());
        self.bytes = self.bytes.saturating_add(c.bytes);
    }

    fn release(&mut self, c: &Claim) {
        if let Some(s) = &c.slot {
            self.slots.remove(s);
        }
        self.files.remove(&c.file);
        self.bytes = self.bytes.saturating_sub(c.bytes);
    }

    /// A busy reply when `slot` or `file` is claimed by a command still running.
    fn check(&self, slot: Option<&str>, file: Option<&str>) -> Result<(), String> {
        if slot.is_some_and(|s| self.slots.contains(s)) || file.is_some_and(|f| self.files.contains(f)) {
            return Err("failure: device busy, try again later".into());
        }
        Ok(())
    }
}

/// File I/O of a mutation, run outside the state mutex.
#[derive(Debug, Clone)]
enum Io {
    Create { path: String, size: u64 },
    Copy { src: String, dst: String, size: u64 },
    Resize { path: String, size: u64 },
    Remove { path: String },
}

/// A validated mutation: its I/O, what it claims meanwhile, then its changes.
#[derive(Debug, Default)]
struct Plan {
    io: Option<Io>,
    claim: Option<Claim>,
    changes: Vec<Change>,
}

impl Plan {
    fn changes(changes: Vec<Change>) -> Self {
        Self {
            changes,
            ..Self::default()
        }
    }
}

/// What the state mutex guards.
#[derive(Debug)]
struct Inner {
    state: State,
    claims: Claims,
    journal: Option<Journal<State>>,
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
    inner: Mutex<Inner>,
    backing: Arc<dyn Backing>,
    state_dir: Option<PathBuf>,
    clock: Arc<dyn Clock>,
    faults: Faults,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("pool", &self.pool)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// An emulator whose files are sizes in memory (simulation, tests).
    pub fn in_memory(pool: PoolConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            pool,
            inner: Mutex::new(Inner {
                state: State::default(),
                claims: Claims::default(),
                journal: None,
            }),
            backing: Arc::new(MemBacking::default()),
            state_dir: None,
            clock,
            faults: Faults::default(),
        }
    }

    /// An emulator on sparse files under `dir`, its tables journaled in
    /// `dir/emulator.json` + `dir/emulator.journal` (reloaded when present).
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
        let (journal, state) = Journal::open(dir, "emulator").map_err(|e| err(dir, &e))?;
        Ok(Self {
            pool,
            inner: Mutex::new(Inner {
                state,
                claims: Claims::default(),
                journal: Some(journal),
            }),
            backing: Arc::new(backing),
            state_dir: Some(dir.to_path_buf()),
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
        let inner = self.lock();
        let d = inner.state.disks.iter().find(|d| d.slot == slot)?;
        self.backing.host_path(&d.file_path)
    }

    /// Names of all files, sorted (for leak checks).
    pub fn file_names(&self) -> Vec<String> {
        self.lock().state.files.keys().cloned().collect()
    }

    /// Slots of all file-backed disks, sorted (for leak checks).
    pub fn disk_slots(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().state.disks.iter().map(|d| d.slot.clone()).collect();
        v.sort();
        v
    }

    /// Every exported disk's export, by slot (for checks and the simulated data path).
    pub fn exports(&self) -> BTreeMap<String, ExportView> {
        self.lock()
            .state
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

    /// Whether the export of `slot` admits `host_nqn` now (what a connecting host meets).
    pub fn admission(&self, slot: &str, host_nqn: &str) -> Admission {
        self.lock().state.admission(slot, host_nqn)
    }

    /// Size in bytes of the disk in `slot`, if there is one (for checks).
    pub fn disk_size(&self, slot: &str) -> Option<u64> {
        self.lock()
            .state
            .disks
            .iter()
            .find(|d| d.slot == slot)
            .map(|d| d.file_size)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
        let reply = self.apply(&cmd);
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
                if !self.lock().state.disks.iter().any(|d| &d.slot == slot) {
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

    /// Plan (under the mutex), I/O (outside it, the objects claimed), then journal and
    /// apply (under it again). See the module header.
    fn mutate(&self, cmd: &Command) -> Reply {
        let plan = {
            let mut inner = self.lock();
            let plan = match self.plan(&inner.state, &inner.claims, cmd) {
                Ok(plan) => plan,
                Err(line) => return Reply::err(line),
            };
            if plan.io.is_none() {
                return self.commit(&mut inner, plan.changes);
            }
            if let Some(c) = &plan.claim {
                inner.claims.take(c);
            }
            plan
        };
        let io = plan.io.as_ref().map(|io| self.run_io(io)).transpose();
        let mut inner = self.lock();
        if let Some(c) = &plan.claim {
            inner.claims.release(c);
        }
        if let Err(e) = io {
            return Reply::err(format!("failure: storage busy: {e}"));
        }
        self.commit(&mut inner, plan.changes)
    }

    /// Journals `changes` (when backed by a directory), then applies them.
    fn commit(&self, inner: &mut Inner, changes: Vec<Change>) -> Reply {
        if changes.is_empty() {
            return Reply::ok(String::new());
        }
        let Inner { state, journal, .. } = inner;
        if let Some(journal) = journal.as_mut()
            && let Err(e) = journal.append(&changes)
        {
            return Reply::err(format!("failure: storage busy: {e}"));
        }
        for c in changes {
            state.apply(c);
        }
        if let Some(journal) = journal.as_mut() {
            journal.compact_if_due(state);
        }
        Reply::ok(String::new())
    }

    /// Runs a mutation's file I/O. On a multi-threaded runtime with files on disk (a copy
    /// may take long), the other tasks move off this worker meanwhile.
    fn run_io(&self, io: &Io) -> std::io::Result<()> {
        let run = || match io {
            Io::Create { path, size } => self.backing.create(path, *size),
            Io::Copy { src, dst, size } => self.backing.copy(src, dst, *size),
            Io::Resize { path, size } => self.backing.resize(path, *size),
            Io::Remove { path } => self.backing.remove(path),
        };
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread && self.state_dir.is_some() {
            tokio::task::block_in_place(run)
        } else {
            run()
        }
    }

    /// Validates `cmd` against the state and says what it will do.
    fn plan(&self, st: &State, claims: &Claims, cmd: &Command) -> Result<Plan, String> {
        match cmd {
            Command::DiskAdd(add) => self.plan_add(st, claims, add),
            Command::DiskSetSize { slot, size_bytes } => {
                self.plan_size(st, claims, slot, *size_bytes)
            }
            Command::DiskSetAllowHost { slot, host_nqn } => {
                plan_allow(st, claims, slot, Some(host_nqn.clone()))
            }
            Command::DiskUnsetAllowHost { slot } => plan_allow(st, claims, slot, None),
            Command::DiskSetComment { slot, comment } => {
                let Some(d) = st.disks.iter().find(|d| &d.slot == slot) else {
                    return Ok(Plan::default()); // `set` on an empty [find] does nothing
                };
                claims.check(Some(slot), None)?;
                let comment = Some(comment.clone()).filter(|c| !c.is_empty());
                if d.comment == comment {
                    return Ok(Plan::default());
                }
                Ok(Plan::changes(vec![Change::Disk(DiskEntry {
                    comment,
                    ..d.clone()
                })]))
            }
            Command::DiskRemove { slot } => {
                claims.check(Some(slot), None)?;
                Ok(Plan::changes(
                    st.disks
                        .iter()
                        .any(|d| &d.slot == slot)
                        .then(|| Change::DiskGone(slot.clone()))
                        .into_iter()
                        .collect(),
                ))
            }
            Command::FileRemove { name } => plan_file_remove(st, claims, name),
            Command::DiskPrint { .. }
            | Command::FilePrint { .. }
            | Command::MonitorTraffic { .. } => Ok(Plan::default()),
        }
    }

    fn used(state: &State) -> u64 {
        state
            .files
            .values()
            .map(|f| f.size)
            .fold(0u64, u64::saturating_add)
    }

    fn free(&self, state: &State, claims: &Claims) -> u64 {
        self.pool
            .size_bytes
            .saturating_sub(Self::used(state))
            .saturating_sub(claims.bytes)
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

    fn plan_add(&self, st: &State, claims: &Claims, add: &DiskAdd) -> Result<Plan, String> {
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
        claims.check(Some(&add.slot), Some(&add.file_path))?;
        let source = match &add.copy_from {
            Some(src) => Some(
                st.disks
                    .iter()
                    .find(|d| &d.slot == src)
                    .ok_or_else(|| "no such item".to_string())?,
            ),
            None => None,
        };
        let size = match (add.size_bytes, source) {
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
        let free = self.free(st, claims);
        if size > free {
            return Err(format!(
                "failure: not enough space on disk ({size} bytes requested, {free} free)"
            ));
        }
        let io = match source {
            Some(s) => Io::Copy {
                src: s.file_path.clone(),
                dst: add.file_path.clone(),
                size,
            },
            None => Io::Create {
                path: add.file_path.clone(),
                size,
            },
        };
        let file = FileEntry {
            size,
            created_unix: unix_now(self.clock.as_ref()),
        };
        let disk = DiskEntry {
            slot: add.slot.clone(),
            file_path: add.file_path.clone(),
            file_size: size,
            export: add.export.as_ref().map(|e| Export {
                port: e.port,
                nqn: e.nqn.clone(),
                allow_host: e.allow_host.clone(),
            }),
            comment: add.comment.clone(),
        };
        Ok(Plan {
            io: Some(io),
            claim: Some(Claim {
                slot: Some(add.slot.clone()),
                file: add.file_path.clone(),
                bytes: size,
            }),
            changes: vec![Change::File(add.file_path.clone(), file), Change::Disk(disk)],
        })
    }

    fn plan_size(&self, st: &State, claims: &Claims, slot: &str, size: u64) -> Result<Plan, String> {
        let Some(d) = st.disks.iter().find(|d| d.slot == slot) else {
            return Ok(Plan::default()); // `set` on an empty [find] does nothing
        };
        claims.check(Some(slot), Some(&d.file_path))?;
        if size < d.file_size {
            return Err("failure: file-size can not be decreased".into());
        }
        let grow = size - d.file_size;
        let free = self.free(st, claims);
        if grow > free {
            return Err(format!(
                "failure: not enough space on disk ({grow} more bytes requested, {free} free)"
            ));
        }
        if grow == 0 {
            return Ok(Plan::default());
        }
        let mut changes = vec![Change::Disk(DiskEntry {
            file_size: size,
            ..d.clone()
        })];
        if let Some(f) = st.files.get(&d.file_path) {
            changes.push(Change::File(
                d.file_path.clone(),
                FileEntry { size, ..f.clone() },
            ));
        }
        Ok(Plan {
            io: Some(Io::Resize {
                path: d.file_path.clone(),
                size,
            }),
            claim: Some(Claim {
                slot: Some(slot.to_string()),
                file: d.file_path.clone(),
                bytes: grow,
            }),
            changes,
        })
    }

    fn print_disks(&self, filter: &DiskFilter, style: PrintStyle) -> Reply {
        let inner = self.lock();
        let st = &inner.state;
        let mut items = Vec::new();
        let pool_selected = match filter {
            DiskFilter::All => true,
            DiskFilter::Slot(s) => *s == self.pool.slot,
            DiskFilter::Slots(slots) => slots.contains(&self.pool.slot),
            DiskFilter::SlotPrefix(p) => self.pool.slot.starts_with(p.as_str()),
            DiskFilter::MountPoint(m) => *m == self.pool.mount_point,
        };
        if pool_selected {
            let used = Self::used(st);
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
                DiskFilter::Slots(slots) => slots.contains(&d.slot),
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
        let inner = self.lock();
        let st = &inner.state;
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

fn plan_allow(
    st: &State,
    claims: &Claims,
    slot: &str,
    host: Option<String>,
) -> Result<Plan, String> {
    let Some(d) = st.disks.iter().find(|d| d.slot == slot) else {
        return Ok(Plan::default());
    };
    claims.check(Some(slot), None)?;
    match &d.export {
        Some(e) if e.allow_host == host => Ok(Plan::default()),
        Some(e) => Ok(Plan::changes(vec![Change::Disk(DiskEntry {
            export: Some(Export {
                allow_host: host,
                ..e.clone()
            }),
            ..d.clone()
        })])),
        None if host.is_none() => Ok(Plan::default()),
        None => Err("failure: nvme-tcp-export is not enabled on this disk".into()),
    }
}

fn plan_file_remove(st: &State, claims: &Claims, name: &str) -> Result<Plan, String> {
    if !st.files.contains_key(name) {
        return Ok(Plan::default()); // `remove` on an empty [find] does nothing
    }
    if st.disks.iter().any(|d| d.file_path == name) {
        return Err(format!("failure: file {name:?} is in use by a disk"));
    }
    claims.check(None, Some(name))?;
    Ok(Plan {
        io: Some(Io::Remove {
            path: name.to_string(),
        }),
        claim: Some(Claim {
            slot: None,
            file: name.to_string(),
            bytes: 0,
        }),
        changes: vec![Change::FileGone(name.to_string())],
    })
}

fn unix_now(clock: &dyn Clock) -> i64 {
    clock
        .now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::time::SystemClock;
    use crate::routeros::command::ExportSpec;

    fn pool() -> PoolConfig {
        PoolConfig {
            slot: "pool".into(),
            mount_point: "pool".into(),
            size_bytes: 1 << 50,
        }
    }

    fn add(slot: &str) -> Command {
        Command::DiskAdd(DiskAdd {
            slot: slot.into(),
            file_path: format!("pool/v/{slot}.img"),
            size_bytes: Some(1 << 30),
            copy_from: None,
            export: Some(ExportSpec {
                port: 4420,
                nqn: format!("nqn.2000-02.com.mikrotik:{slot}"),
                allow_host: None,
            }),
            comment: None,
        })
    }

    #[test]
    fn tables_and_files_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let emu = Emulator::open_dir(dir.path(), pool(), Arc::new(SystemClock)).unwrap();
        for slot in ["a", "b", "c"] {
            assert!(emu.apply(&add(slot)).ok);
        }
        assert!(emu.apply(&Command::DiskRemove { slot: "b".into() }).ok);
        assert!(
            emu.apply(&Command::FileRemove {
                name: "pool/v/b.img".into()
            })
            .ok
        );
        assert!(
            emu.apply(&Command::DiskSetSize {
                slot: "c".into(),
                size_bytes: 2 << 30
            })
            .ok
        );
        drop(emu);
        let emu = Emulator::open_dir(dir.path(), pool(), Arc::new(SystemClock)).unwrap();
        assert_eq!(emu.disk_slots(), ["a", "c"]);
        assert_eq!(emu.file_names(), ["pool/v/a.img", "pool/v/c.img"]);
        assert_eq!(emu.disk_size("c"), Some(2 << 30));
        let host = emu.host_path_of("c").unwrap();
        assert_eq!(std::fs::metadata(host).unwrap().len(), 2 << 30);
        assert!(!dir.path().join("pool/v/b.img").exists());
    }

    #[test]
    fn a_claimed_slot_is_busy_and_claimed_space_is_not_free() {
        let emu = Emulator::in_memory(
            PoolConfig {
                size_bytes: 3 << 30,
                ..pool()
            },
            Arc::new(SystemClock),
        );
        let claim = Claim {
            slot: Some("a".into()),
            file: "pool/v/a.img".into(),
            bytes: 2 << 30,
        };
        emu.lock().claims.take(&claim);
        let busy = emu.apply(&add("a"));
        assert!(!busy.ok && busy.output.contains("busy"), "{busy:?}");
        let full = emu.apply(&add("b")); // 1 GiB wanted, 1 GiB free: fits
        assert!(full.ok, "{full:?}");
        let over = emu.apply(&add("c"));
        assert!(!over.ok && over.output.contains("not enough space"), "{over:?}");
        emu.lock().claims.release(&claim);
        assert!(emu.apply(&add("a")).ok);
    }

    /// Child half of the kill -9 test: adds disks `k0`, `k1`, ... forever on the emulator
    /// in `RDS_CSI_EMU_KILL9_DIR`, printing each index once its reply came back.
    #[test]
    fn kill_nine_child_emulator() {
        use std::io::Write;
        let Some(dir) = std::env::var_os("RDS_CSI_EMU_KILL9_DIR") else {
            return; // only runs as the child of the test below
        };
        let emu = Emulator::open_dir(Path::new(&dir), pool(), Arc::new(SystemClock)).unwrap();
        let mut out = std::io::stdout().lock();
        for i in 0u64.. {
            let reply = emu.apply(&add(&format!("k{i}")));
            assert!(reply.ok, "{reply:?}");
            writeln!(out, "ACK {i}").unwrap();
            out.flush().unwrap();
        }
    }

    #[test]
    fn every_answered_add_survives_kill_nine_mid_way() {
        // Past the first compactions of the tables' journal too.
        for kill_after in [1u64, 7, 300, 1200] {
            let dir = tempfile::tempdir().unwrap();
            // SIGKILL once `kill_after` changes were acknowledged.
            let acked = crate::fsutil::kill9::kill_after_acks(
                "routeros::emulator::tests::kill_nine_child_emulator",
                "RDS_CSI_EMU_KILL9_DIR",
                dir.path(),
                kill_after,
            );
            assert_eq!(acked, kill_after, "child stopped early");
            let emu = Emulator::open_dir(dir.path(), pool(), Arc::new(SystemClock))
                .expect("the emulator must reopen after kill -9");
            let slots = emu.disk_slots();
            let n = slots.len() as u64;
            assert!(n >= acked, "{n} disks after {acked} answered adds");
            let mut want: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
            want.sort();
            assert_eq!(slots, want, "a prefix of the adds, nothing torn");
            for slot in &slots {
                let host = emu.host_path_of(slot).unwrap();
                assert_eq!(std::fs::metadata(&host).unwrap().len(), 1 << 30, "{slot}");
            }
            // The next add works, whatever the kill left behind (an orphan file too).
            assert!(emu.apply(&add(&format!("k{n}"))).ok);
        }
    }
}
