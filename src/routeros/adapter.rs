//! The `Rds` port over RouterOS: typed commands → renderer → transport → parser.
//!
//! Observe, then act: every mutation acts on a disk observed first — by the adapter, or by
//! the caller just before (the port's methods that take a [`DiskEntry`] or [`Disk`]), never
//! read twice in a row — and an answer that may or may not have been applied (timeout, lost
//! connection, busy) is resolved by observing again: "already done" is success. Only reads
//! and writes made idempotent this way are retried, with the seeded [`Backoff`] (jitter
//! from the injected [`Entropy`]). Deleting a volume removes the disk entry AND its backing
//! file (RouterOS keeps the file when the entry goes), both idempotently.
//!
//! Round trips: each RouterOS command is one SSH round trip, so no command is sent whose
//! answer is already known — a write that RouterOS acknowledged did what it said (nothing
//! is read back after it), and the exact size of a file (the second command of
//! [`Rds::get_disk`]) is read only where an answer needs it. Each method says which
//! commands it sends and why.

use std::sync::Arc;

use async_trait::async_trait;

use crate::metrics::{RdsMetrics, RouterOsMetrics, command_outcome};
use crate::ports::Entropy;
use crate::ports::rds::{Disk, DiskEntry, DiskSpec, DiskTraffic, NvmeExport, PoolCapacity, Rds, RdsError};
use crate::retry::Backoff;
use crate::routeros::command::{
    Command, DiskAdd, DiskFilter, ExportSpec, PrintStyle,
};
use crate::routeros::parse::{
    DiskInfo, FileInfo, Record, RosError, check_reply, parse_monitor, parse_print, parse_rate,
};
use crate::routeros::render::{RenderError, Renderer};
use crate::routeros::transport::Transport;
use crate::types::defaults::DEFAULT_NVME_PORT;

/// Where volumes live on the RDS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RdsLayout {
    /// Directory of the backing files, relative to the RDS root, e.g. `storage-pool/rds-csi`.
    pub volume_base_path: String,
    /// Mount point of the pool that directory is on (capacity), e.g. `storage-pool`.
    pub pool_mount_point: String,
}

impl RdsLayout {
    /// The command renderer for this layout; refuses a base path the renderer cannot
    /// express or one that is not on the pool.
    pub fn renderer(&self) -> Result<Renderer, RdsError> {
        let renderer = Renderer::new(&self.volume_base_path)?;
        let mp = self.pool_mount_point.trim_end_matches('/');
        if !renderer.base_path().starts_with(&format!("{mp}/")) {
            return Err(RdsError::Rejected(format!(
                "volume base path {:?} is not under the pool mount point {mp:?}",
                self.volume_base_path
            )));
        }
        Ok(renderer)
    }
}

/// The `Rds` adapter over a RouterOS [`Transport`].
pub struct RouterOsRds<T: Transport> {
    transport: T,
    renderer: Renderer,
    pool_mount_point: String,
    retry: Backoff,
    entropy: Arc<dyn Entropy>,
    metrics: RouterOsMetrics,
    rds_metrics: RdsMetrics,
}

impl<T: Transport> std::fmt::Debug for RouterOsRds<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterOsRds")
            .field("base_path", &self.renderer.base_path())
            .field("pool_mount_point", &self.pool_mount_point)
            .finish_non_exhaustive()
    }
}

impl From<RosError> for RdsError {
    fn from(e: RosError) -> Self {
        match e {
            RosError::NotFound(m) => RdsError::NotFound(m),
            RosError::AlreadyExists(m) => RdsError::AlreadyExists(m),
            RosError::Invalid(m) => RdsError::Rejected(m),
            RosError::NoSpace(m) => RdsError::NoSpace(m),
            RosError::Unavailable(m) => RdsError::Unavailable(m),
            RosError::Protocol(m) => RdsError::Protocol(m),
        }
    }
}

impl From<RenderError> for RdsError {
    fn from(e: RenderError) -> Self {
        RdsError::Rejected(e.to_string())
    }
}

/// The `outcome` label of a command's result.
fn outcome<T>(result: &Result<T, RdsError>) -> &'static str {
    match result {
        Ok(_) => command_outcome::OK,
        Err(RdsError::NotFound(_)) => command_outcome::NOT_FOUND,
        Err(RdsError::AlreadyExists(_)) => command_outcome::ALREADY_EXISTS,
        Err(RdsError::Rejected(_)) => command_outcome::REJECTED,
        Err(RdsError::NoSpace(_)) => command_outcome::NO_SPACE,
        Err(RdsError::Unavailable(_)) => command_outcome::UNAVAILABLE,
        Err(RdsError::Timeout(_)) => command_outcome::TIMEOUT,
        Err(RdsError::HostKey(_)) => command_outcome::HOST_KEY,
        Err(RdsError::Protocol(_)) => command_outcome::PROTOCOL,
    }
}

/// Whether an error leaves it unknown if a write was applied (and a retry may succeed).
fn ambiguous(e: &RdsError) -> bool {
    matches!(e, RdsError::Unavailable(_) | RdsError::Timeout(_))
}

/// What a write should have achieved, checked by observing.
#[derive(Clone, Copy)]
enum Expect<'a> {
    Created(&'a DiskSpec),
    /// A copy `(slot, comment)` made without a size (a snapshot): its entry exists,
    /// unexported, with the comment.
    Copied(&'a str, &'a str),
    Size(&'a str, u64),
    AllowHost(&'a str, Option<&'a str>),
    Comment(&'a str, &'a str),
    DiskGone(&'a str),
    FileGone(&'a str),
}

impl<T: Transport> RouterOsRds<T> {
    /// An adapter over `transport`; refuses a layout the renderer cannot express or a base
    /// path that is not on the pool.
    pub fn new(
        transport: T,
        layout: &RdsLayout,
        retry: Backoff,
        entropy: Arc<dyn Entropy>,
    ) -> Result<Self, RdsError> {
        let renderer = layout.renderer()?;
        Ok(Self {
            transport,
            renderer,
            pool_mount_point: layout.pool_mount_point.trim_end_matches('/').to_string(),
            retry,
            entropy,
            metrics: RouterOsMetrics::default(),
            rds_metrics: RdsMetrics::default(),
        })
    }

    /// Records its commands into `routeros` and what the RDS reports (pool, disks) into
    /// `rds` (the plugin's registry) instead of unregistered series.
    pub fn with_metrics(mut self, routeros: RouterOsMetrics, rds: RdsMetrics) -> Self {
        self.metrics = routeros;
        self.rds_metrics = rds;
        self
    }

    /// Sends `line` (rendered from `cmd`) and reads the reply with `read`, counting the
    /// command by verb and outcome and timing it.
    async fn exchange<R>(
        &self,
        cmd: &Command,
        line: &crate::routeros::render::CommandLine,
        read: impl FnOnce(&str) -> Result<R, RdsError>,
    ) -> Result<R, RdsError> {
        let started = tokio::time::Instant::now();
        let result = match self.transport.run(line).await {
            Ok(out) => read(&out),
            Err(e) => Err(e),
        };
        self.metrics.command(
            cmd.kind().verb(),
            outcome(&result),
            started.elapsed().as_secs_f64(),
        );
        result
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The backing file path of a slot on the RDS.
    pub fn file_path_for(&self, slot: &str) -> String {
        self.renderer.file_path_for(slot)
    }

    async fn pause(&self, attempt: u32) {
        tokio::time::sleep(self.retry.delay(attempt, self.entropy.as_ref())).await;
    }

    /// Runs a read, retrying transient failures.
    async fn read(&self, cmd: &Command) -> Result<Vec<Record>, RdsError> {
        let line = self.renderer.render(cmd)?;
        let mut attempt = 0;
        loop {
            let result = self
                .exchange(cmd, &line, |out| parse_print(out).map_err(RdsError::from))
                .await;
            match result {
                Err(e) if ambiguous(&e) && attempt + 1 < self.retry.max_attempts.max(1) => {
                    tracing::debug!(command = %line, error = %e, attempt, "RouterOS read failed; retrying");
                    self.pause(attempt).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Runs a write once.
    async fn write_once(&self, cmd: &Command) -> Result<(), RdsError> {
        let line = self.renderer.render(cmd)?;
        tracing::debug!(command = %line, "RouterOS write");
        self.exchange(cmd, &line, |out| check_reply(out).map_err(RdsError::from))
            .await
    }

    /// Runs a write; an ambiguous failure is resolved by observing `expect`, and the write
    /// is repeated only when the observation shows it was not applied.
    async fn write(&self, cmd: &Command, expect: Expect<'_>) -> Result<(), RdsError> {
        let mut attempt = 0;
        loop {
            let err = match self.write_once(cmd).await {
                Ok(()) => return Ok(()),
                Err(e) if ambiguous(&e) => e,
                // A repeated add that finds its own earlier attempt applied.
                Err(RdsError::AlreadyExists(m)) if attempt > 0 => {
                    if self.applied(&expect).await? {
                        return Ok(());
                    }
                    return Err(RdsError::AlreadyExists(m));
                }
                Err(e) => return Err(e),
            };
            tracing::debug!(error = %err, attempt, "RouterOS write outcome unknown; observing");
            if attempt + 1 >= self.retry.max_attempts.max(1) {
                return match self.applied(&expect).await {
                    Ok(true) => Ok(()),
                    _ => Err(err),
                };
            }
            self.pause(attempt).await;
            attempt += 1;
            match self.applied(&expect).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) if ambiguous(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }

    async fn applied(&self, expect: &Expect<'_>) -> Result<bool, RdsError> {
        Ok(match expect {
            Expect::Created(spec) => match self.get_disk(&spec.slot).await? {
                Some(d) => matches_spec(&d, spec, &self.renderer.file_path_for(&spec.slot)),
                None => false,
            },
            Expect::Size(slot, size) => self
                .get_disk(slot)
                .await?
                .is_some_and(|d| d.size_bytes == *size),
            Expect::Copied(slot, comment) => self.observe_disk(slot).await?.is_some_and(|d| {
                d.file_path.as_deref() == Some(self.renderer.file_path_for(slot).as_str())
                    && !d.nvme_export
                    && d.comment.as_deref() == Some(*comment)
            }),
            Expect::AllowHost(slot, host) => self
                .observe_disk(slot)
                .await?
                .is_some_and(|d| d.allow_host.as_deref() == *host),
            Expect::Comment(slot, comment) => self
                .observe_disk(slot)
                .await?
                .is_some_and(|d| d.comment.as_deref().unwrap_or("") == *comment),
            Expect::DiskGone(slot) => self.observe_disk(slot).await?.is_none(),
            Expect::FileGone(name) => self.observe_file(name).await?.is_none(),
        })
    }

    /// The file-backed disk in `slot`, as RouterOS prints it.
    async fn observe_disk(&self, slot: &str) -> Result<Option<DiskInfo>, RdsError> {
        let records = self
            .read(&Command::DiskPrint {
                filter: DiskFilter::Slot(slot.to_string()),
                style: PrintStyle::Detail,
            })
            .await?;
        for r in &records {
            let d = DiskInfo::from_record(r)?;
            if d.slot == slot {
                return Ok(Some(d));
            }
        }
        Ok(None)
    }

    async fn observe_file(&self, name: &str) -> Result<Option<FileInfo>, RdsError> {
        let records = self
            .read(&Command::FilePrint {
                name: name.to_string(),
                exact: true,
            })
            .await?;
        for r in &records {
            let f = FileInfo::from_record(r)?;
            if f.name == name {
                return Ok(Some(f));
            }
        }
        Ok(None)
    }

    /// Runs `add` (an observed write); when RouterOS answers "already exists" for a slot
    /// that is free, the file at the path is an orphan of a delete interrupted between
    /// entry and file removal: it is removed (finishing that delete) and the add repeated.
    async fn add_finishing_interrupted_delete(
        &self,
        add: &Command,
        slot: &str,
        expect: Expect<'_>,
    ) -> Result<(), RdsError> {
        let taken = match self.write(add, expect).await {
            Ok(()) => return Ok(()),
            Err(RdsError::AlreadyExists(m)) => m,
            Err(e) => return Err(e),
        };
        if self.observe_disk(slot).await?.is_some() {
            return Err(RdsError::AlreadyExists(taken));
        }
        let file_path = self.renderer.file_path_for(slot);
        tracing::info!(slot, file = %file_path, "removing orphaned backing file before create");
        let rm = Command::FileRemove {
            name: file_path.clone(),
        };
        self.write(&rm, Expect::FileGone(&file_path)).await?;
        self.write(add, expect).await
    }

    /// A disk entry in port terms.
    fn to_entry(d: DiskInfo) -> Result<DiskEntry, RdsError> {
        if d.kind.as_deref() != Some("file") {
            return Err(RdsError::Rejected(format!(
                "disk slot={} is not a file-backed disk (type={})",
                d.slot,
                d.kind.as_deref().unwrap_or("unknown")
            )));
        }
        let file_path = d
            .file_path
            .ok_or_else(|| RdsError::Protocol(format!("disk slot={} has no file-path", d.slot)))?;
        let export = d.nvme_export.then(|| NvmeExport {
            port: d.nvme_port.unwrap_or(DEFAULT_NVME_PORT),
            nqn: d.nvme_nqn.unwrap_or_else(|| d.slot.clone()),
        });
        Ok(DiskEntry {
            slot: d.slot,
            file_path,
            export,
            allowed_host_nqn: d.allow_host,
            comment: d.comment,
            printed_size_bytes: d.file_size,
        })
    }

    /// A disk in port terms. Its size is the backing file's exact byte count when the
    /// file is known (`/disk` may print `file-size` rounded to a unit).
    fn to_disk(d: DiskInfo, file: Option<&FileInfo>) -> Result<Disk, RdsError> {
        Self::with_file(Self::to_entry(d)?, file)
    }

    /// `entry` with the size and creation time of its `file` (else the printed size).
    fn with_file(entry: DiskEntry, file: Option<&FileInfo>) -> Result<Disk, RdsError> {
        let size_bytes = file
            .and_then(|f| f.size)
            .or(entry.printed_size_bytes)
            .ok_or_else(|| {
                RdsError::Protocol(format!("disk slot={} has no file-size", entry.slot))
            })?;
        Ok(Self::disk_of(entry, size_bytes, file.and_then(|f| f.created_unix)))
    }

    /// `entry` with its size and creation time.
    fn disk_of(entry: DiskEntry, size_bytes: u64, created_unix: Option<i64>) -> Disk {
        Disk {
            slot: entry.slot,
            file_path: entry.file_path,
            size_bytes,
            export: entry.export,
            allowed_host_nqn: entry.allowed_host_nqn,
            created_unix,
            comment: entry.comment,
        }
    }

    /// Refuses to touch a disk whose file is not under our base path.
    fn check_owned(&self, d: &DiskInfo) -> Result<(), RdsError> {
        self.check_owned_path(&d.slot, d.file_path.as_deref())
    }

    fn check_owned_path(&self, slot: &str, file_path: Option<&str>) -> Result<(), RdsError> {
        let base = format!("{}/", self.renderer.base_path());
        match file_path {
            Some(p) if p.starts_with(&base) => Ok(()),
            other => Err(RdsError::Rejected(format!(
                "disk slot={slot} has file-path {:?}, outside the volume base path {:?}; \
                 refusing to change it",
                other.unwrap_or(""),
                self.renderer.base_path()
            ))),
        }
    }
}

fn matches_spec(d: &Disk, spec: &DiskSpec, file_path: &str) -> bool {
    d.file_path == file_path
        && d.size_bytes == spec.size_bytes
        && d.export == spec.export
        && (spec.export.is_none() || d.allowed_host_nqn == spec.allowed_host_nqn)
        && (spec.comment.is_none() || d.comment == spec.comment)
}

#[async_trait]
impl<T: Transport> Rds for RouterOsRds<T> {
    /// [`Rds::capacity`] (1 command): the RDS answers and the pool is mounted.
    async fn ping(&self) -> Result<(), RdsError> {
        self.capacity().await.map(|_| ())
    }

    /// `/disk add` (1 command; the caller observed the slot free just before). The reply
    /// says it all: nothing is read back. Only when RouterOS answers "already exists"
    /// does it observe (is the slot taken, or is a file left at the path by a delete
    /// interrupted between entry and file?), and finishes that delete before adding again.
    async fn create_disk(&self, spec: &DiskSpec) -> Result<Disk, RdsError> {
        let file_path = self.renderer.file_path_for(&spec.slot);
        let cmd = Command::DiskAdd(DiskAdd {
            slot: spec.slot.clone(),
            file_path: file_path.clone(),
            size_bytes: Some(spec.size_bytes),
            copy_from: spec.copy_from.clone(),
            comment: spec.comment.clone(),
            export: spec.export.as_ref().map(|e| ExportSpec {
                port: e.port,
                nqn: e.nqn.clone(),
                allow_host: spec.allowed_host_nqn.clone(),
            }),
        });
        // Render before any I/O: a hostile spec never reaches the transport.
        self.renderer.render(&cmd)?;
        self.add_finishing_interrupted_delete(&cmd, &spec.slot, Expect::Created(spec))
            .await?;
        Ok(Disk {
            slot: spec.slot.clone(),
            file_path,
            size_bytes: spec.size_bytes,
            export: spec.export.clone(),
            allowed_host_nqn: None,
            created_unix: None,
            comment: spec.comment.clone(),
        })
    }

    /// `/disk add type=file copy-from=[find slot=<source>] ...` without a size (the copy
    /// has its source's), then `/file print` of the new file: the one read whose answer is
    /// not known, the copy's exact size and the time it was taken (2 commands).
    async fn create_snapshot(
        &self,
        source: &str,
        slot: &str,
        comment: &str,
    ) -> Result<Disk, RdsError> {
        let file_path = self.renderer.file_path_for(slot);
        let cmd = Command::DiskAdd(DiskAdd {
            slot: slot.to_string(),
            file_path: file_path.clone(),
            size_bytes: None,
            copy_from: Some(source.to_string()),
            comment: Some(comment.to_string()),
            export: None,
        });
        self.renderer.render(&cmd)?;
        // A missing source is RouterOS' "no such item": NotFound.
        self.add_finishing_interrupted_delete(&cmd, slot, Expect::Copied(slot, comment))
            .await?;
        let file = self.observe_file(&file_path).await?.ok_or_else(|| {
            RdsError::Protocol(format!("file {file_path} is missing right after its copy"))
        })?;
        let size = file
            .size
            .ok_or_else(|| RdsError::Protocol(format!("file {file_path} has no size")))?;
        Ok(Disk {
            slot: slot.to_string(),
            file_path,
            size_bytes: size,
            export: None,
            allowed_host_nqn: None,
            created_unix: file.created_unix,
            comment: Some(comment.to_string()),
        })
    }

    /// [`Rds::find_disk`] then, when there is a disk, [`Rds::sized`] (2 commands; 1 when
    /// absent).
    async fn get_disk(&self, slot: &str) -> Result<Option<Disk>, RdsError> {
        match self.find_disk(slot).await? {
            Some(d) => self.sized(&d).await.map(Some),
            None => Ok(None),
        }
    }

    /// `/file print detail where name=...` of the disk's file (1 command): the exact size
    /// (`/disk` may print it rounded to a tenth of a unit) and the creation time.
    async fn sized(&self, disk: &DiskEntry) -> Result<Disk, RdsError> {
        let readable = self
            .renderer
            .render(&Command::FilePrint {
                name: disk.file_path.clone(),
                exact: true,
            })
            .is_ok();
        let file = match readable {
            true => self.observe_file(&disk.file_path).await?,
            false => None,
        };
        Self::with_file(disk.clone(), file.as_ref())
    }

    /// `/disk print detail where slot="a" or slot="b" ...` (1 command for all).
    async fn find_disks(&self, slots: &[&str]) -> Result<Vec<DiskEntry>, RdsError> {
        let records = self
            .read(&Command::DiskPrint {
                filter: DiskFilter::Slots(slots.iter().map(|s| s.to_string()).collect()),
                style: PrintStyle::Detail,
            })
            .await?;
        let mut out = Vec::new();
        for r in &records {
            let d = DiskInfo::from_record(r)?;
            if slots.contains(&d.slot.as_str()) {
                out.push(Self::to_entry(d)?);
            }
        }
        Ok(out)
    }

    /// `/disk print detail [where slot~...]` and one `/file print detail where name~...`
    /// of the whole base directory for the exact sizes (2 commands, however many disks).
    async fn list_disks(&self, slot_prefix: &str) -> Result<Vec<Disk>, RdsError> {
        let filter = if slot_prefix.is_empty() {
            DiskFilter::All
        } else {
            DiskFilter::SlotPrefix(slot_prefix.to_string())
        };
        let records = self
            .read(&Command::DiskPrint {
                filter,
                style: PrintStyle::Detail,
            })
            .await?;
        let files = self
            .read(&Command::FilePrint {
                name: self.renderer.base_path().to_string(),
                exact: false,
            })
            .await?;
        let mut by_name = std::collections::BTreeMap::new();
        for r in &files {
            let f = FileInfo::from_record(r)?;
            by_name.insert(f.name.clone(), f);
        }
        let mut out = Vec::new();
        for r in &records {
            let d = DiskInfo::from_record(r)?;
            // `slot~"^p"` is a regex: re-check the prefix exactly; skip pools, drives and
            // disks whose files are not under our base path (not ours to manage).
            if !d.slot.starts_with(slot_prefix)
                || d.kind.as_deref() != Some("file")
                || self.check_owned(&d).is_err()
            {
                continue;
            }
            let f = d.file_path.as_ref().and_then(|p| by_name.get(p));
            out.push(Self::to_disk(d, f)?);
        }
        out.sort_by(|a, b| a.slot.cmp(&b.slot));
        if slot_prefix.is_empty() {
            let volumes = out.iter().filter(|d| d.export.is_some()).count() as u64;
            self.rds_metrics
                .disks(volumes, out.len() as u64 - volumes);
        }
        Ok(out)
    }

    /// [`Rds::get_disk`] (2 commands: the exact size decides) then [`Rds::grow_disk`].
    async fn resize_disk(&self, slot: &str, size_bytes: u64) -> Result<Disk, RdsError> {
        self.renderer.render(&Command::DiskSetSize {
            slot: slot.to_string(),
            size_bytes,
        })?;
        let disk = self
            .get_disk(slot)
            .await?
            .ok_or_else(|| RdsError::NotFound(format!("disk slot={slot}")))?;
        self.grow_disk(&disk, size_bytes).await
    }

    /// `/disk set [find slot=...] file-size=<exact>` (1 command) on the disk the caller
    /// just read with its exact size; none when it already has that size. Acknowledged
    /// means grown: nothing is read back.
    async fn grow_disk(&self, disk: &Disk, size_bytes: u64) -> Result<Disk, RdsError> {
        let slot = disk.slot.as_str();
        let cmd = Command::DiskSetSize {
            slot: slot.to_string(),
            size_bytes,
        };
        self.renderer.render(&cmd)?;
        self.check_owned_path(slot, Some(&disk.file_path))?;
        let cur = disk.size_bytes;
        if cur > size_bytes {
            return Err(RdsError::Rejected(format!(
                "disk slot={slot} is {cur} bytes; shrinking to {size_bytes} is not supported"
            )));
        }
        if cur < size_bytes {
            self.write(&cmd, Expect::Size(slot, size_bytes)).await?;
        }
        Ok(Disk {
            size_bytes,
            ..disk.clone()
        })
    }

    /// `/disk print` (1), then [`Rds::remove_disk`] (2), or only the leftover file (1)
    /// when the entry is gone already.
    async fn delete_disk(&self, slot: &str) -> Result<(), RdsError> {
        self.renderer.render(&Command::DiskRemove {
            slot: slot.to_string(),
        })?;
        match self.find_disk(slot).await? {
            Some(d) => self.remove_disk(&d).await,
            None => self.remove_leftover_file(slot).await,
        }
    }

    /// `/disk print detail where slot=...` (1 command).
    async fn find_disk(&self, slot: &str) -> Result<Option<DiskEntry>, RdsError> {
        match self.observe_disk(slot).await? {
            Some(d) => Self::to_entry(d).map(Some),
            None => Ok(None),
        }
    }

    /// `/disk remove [find slot=...]` then `/file remove [find name=...]` (2 commands):
    /// RouterOS keeps the file when the entry goes, and the entry goes first so that no
    /// disk ever points at a missing file.
    async fn remove_disk(&self, disk: &DiskEntry) -> Result<(), RdsError> {
        let slot = disk.slot.as_str();
        let remove = Command::DiskRemove {
            slot: slot.to_string(),
        };
        self.renderer.render(&remove)?;
        self.check_owned_path(slot, Some(&disk.file_path))?;
        self.write(&remove, Expect::DiskGone(slot)).await?;
        let rm = Command::FileRemove {
            name: disk.file_path.clone(),
        };
        self.write(&rm, Expect::FileGone(&disk.file_path)).await
    }

    /// `/file remove [find name="<base>/<slot>.img"]` (1 command; nothing to remove is
    /// success, so no read first).
    async fn remove_leftover_file(&self, slot: &str) -> Result<(), RdsError> {
        let file_path = self.renderer.file_path_for(slot);
        let rm = Command::FileRemove {
            name: file_path.clone(),
        };
        self.write(&rm, Expect::FileGone(&file_path)).await
    }

    /// `/disk set [find slot=...] comment=...` (1 command) on the entry the caller just
    /// observed; none when the comment is already that.
    async fn set_comment(&self, disk: &DiskEntry, comment: &str) -> Result<(), RdsError> {
        let slot = disk.slot.as_str();
        let cmd = Command::DiskSetComment {
            slot: slot.to_string(),
            comment: comment.to_string(),
        };
        self.renderer.render(&cmd)?;
        self.check_owned_path(slot, Some(&disk.file_path))?;
        if disk.comment.as_deref() == Some(comment) {
            return Ok(());
        }
        self.write(&cmd, Expect::Comment(slot, comment)).await
    }

    /// `/disk print detail where mount-point=...`: the pool's `size` and `free` (1 command).
    async fn capacity(&self) -> Result<PoolCapacity, RdsError> {
        let records = self
            .read(&Command::DiskPrint {
                filter: DiskFilter::MountPoint(self.pool_mount_point.clone()),
                style: PrintStyle::Detail,
            })
            .await?;
        for r in &records {
            let d = DiskInfo::from_record(r)?;
            if d.mount_point.as_deref() == Some(self.pool_mount_point.as_str()) {
                let (Some(size), Some(free)) = (d.size, d.free) else {
                    return Err(RdsError::Protocol(format!(
                        "pool {} has no size/free",
                        self.pool_mount_point
                    )));
                };
                self.rds_metrics.pool(size, free);
                return Ok(PoolCapacity {
                    size_bytes: size,
                    free_bytes: free,
                });
            }
        }
        Err(RdsError::NotFound(format!(
            "no disk is mounted at {:?} (the pool mount point)",
            self.pool_mount_point
        )))
    }

    async fn disk_traffic(&self, slot: &str) -> Result<DiskTraffic, RdsError> {
        let cmd = Command::MonitorTraffic {
            slot: slot.to_string(),
        };
        let line = self.renderer.render(&cmd)?;
        let fields = self
            .exchange(&cmd, &line, |out| parse_monitor(out).map_err(RdsError::from))
            .await?;
        let number = |key: &str, parse: fn(&str) -> Option<f64>| {
            fields.get(key).and_then(|v| parse(v)).ok_or_else(|| {
                RdsError::Protocol(format!(
                    "monitor-traffic of disk slot={slot}: no readable {key} in {fields:?}"
                ))
            })
        };
        let ops = |v: &str| v.trim().replace(',', "").parse::<f64>().ok();
        Ok(DiskTraffic {
            read_ops_per_second: number("read-ops-per-second", ops)?,
            write_ops_per_second: number("write-ops-per-second", ops)?,
            read_bytes_per_second: number("read-rate", parse_rate)?,
            write_bytes_per_second: number("write-rate", parse_rate)?,
        })
    }

    /// [`Rds::find_disk`] (is it there?), then [`Rds::fence_disk`] (2 commands; 1 when
    /// nothing changes).
    async fn set_allowed_host(&self, slot: &str, host_nqn: Option<&str>) -> Result<(), RdsError> {
        self.renderer.render(&allow_command(slot, host_nqn))?;
        let disk = self
            .find_disk(slot)
            .await?
            .ok_or_else(|| RdsError::NotFound(format!("disk slot={slot}")))?;
        self.fence_disk(&disk, host_nqn).await
    }

    /// `/disk set|unset [find slot=...] nvme-tcp-server-allow-host-name` (1 command) on the
    /// entry the caller just observed: is it ours and exported, and not already so.
    async fn fence_disk(&self, disk: &DiskEntry, host_nqn: Option<&str>) -> Result<(), RdsError> {
        let slot = disk.slot.as_str();
        let cmd = allow_command(slot, host_nqn);
        self.renderer.render(&cmd)?;
        self.check_owned_path(slot, Some(&disk.file_path))?;
        if disk.export.is_none() {
            return Err(RdsError::Rejected(format!(
                "disk slot={slot} is not exported over NVMe/TCP"
            )));
        }
        if disk.allowed_host_nqn.as_deref() == host_nqn {
            return Ok(());
        }
        self.write(&cmd, Expect::AllowHost(slot, host_nqn)).await
    }
}

/// `/disk set ... nvme-tcp-server-allow-host-name=<host>`, or `unset` for `None`.
fn allow_command(slot: &str, host_nqn: Option<&str>) -> Command {
    match host_nqn {
        Some(h) => Command::DiskSetAllowHost {
            slot: slot.to_string(),
            host_nqn: h.to_string(),
        },
        None => Command::DiskUnsetAllowHost {
            slot: slot.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::ports::time::{SeededEntropy, SystemClock};
    use crate::routeros::command::CommandKind;
    use crate::routeros::emulator::faults::Fault;
    use crate::routeros::emulator::{Emulator, PoolConfig};
    use crate::routeros::render::CommandLine;
    use crate::routeros::transport::inproc::InProcess;

    const GIB: u64 = 1 << 30;

    /// Records every line that reaches the transport, then forwards to the emulator.
    struct Recording {
        inner: InProcess,
        lines: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Transport for Recording {
        async fn run(&self, cmd: &CommandLine) -> Result<String, RdsError> {
            self.lines.lock().unwrap().push(cmd.as_str().to_string());
            self.inner.run(cmd).await
        }
    }

    fn emulator(pool: u64) -> Arc<Emulator> {
        Arc::new(Emulator::in_memory(
            PoolConfig {
                slot: "raid1".into(),
                mount_point: "raid1".into(),
                size_bytes: pool,
            },
            Arc::new(SystemClock),
        ))
    }

    fn adapter(emu: &Arc<Emulator>) -> RouterOsRds<Recording> {
        RouterOsRds::new(
            Recording {
                inner: InProcess::new(Arc::clone(emu)),
                lines: Mutex::new(Vec::new()),
            },
            &RdsLayout {
                volume_base_path: "raid1/rds-csi".into(),
                pool_mount_point: "raid1".into(),
            },
            Backoff {
                base: Duration::from_millis(1),
                max: Duration::from_millis(4),
                max_attempts: 4,
            },
            Arc::new(SeededEntropy::from_seed(1)),
        )
        .unwrap()
    }

    fn spec(slot: &str, size: u64) -> DiskSpec {
        DiskSpec {
            slot: slot.into(),
            size_bytes: size,
            export: Some(NvmeExport {
                port: 4420,
                nqn: format!("nqn.2000-02.com.mikrotik:{slot}"),
            }),
            copy_from: None,
            comment: None,
            allowed_host_nqn: None,
        }
    }

    #[tokio::test]
    async fn volume_lifecycle_with_exact_sizes() {
        let emu = emulator(100 * GIB);
        let rds = adapter(&emu);
        let d = rds
            .create_disk(&spec("pvc-a", GIB + GIB / 2))
            .await
            .unwrap();
        assert_eq!(d.size_bytes, GIB + GIB / 2);
        assert_eq!(d.file_path, "raid1/rds-csi/pvc-a.img");
        let read = rds.get_disk("pvc-a").await.unwrap().unwrap();
        assert!(read.created_unix.is_some());
        assert_eq!(read, Disk { created_unix: read.created_unix, ..d });
        assert!(matches!(
            rds.create_disk(&spec("pvc-a", GIB)).await,
            Err(RdsError::AlreadyExists(_))
        ));
        let cap = rds.capacity().await.unwrap();
        assert_eq!(cap.size_bytes, 100 * GIB);
        assert_eq!(cap.free_bytes, 100 * GIB - (GIB + GIB / 2));
        let d = rds.resize_disk("pvc-a", 3 * GIB + 7).await.unwrap();
        assert_eq!(d.size_bytes, 3 * GIB + 7);
        assert!(matches!(
            rds.resize_disk("pvc-a", GIB).await,
            Err(RdsError::Rejected(_))
        ));
        assert!(matches!(
            rds.resize_disk("pvc-missing", GIB).await,
            Err(RdsError::NotFound(_))
        ));
        rds.set_allowed_host("pvc-a", Some("nqn.2014-08.org.nvmexpress:uuid:1"))
            .await
            .unwrap();
        let d = rds.get_disk("pvc-a").await.unwrap().unwrap();
        assert_eq!(
            d.allowed_host_nqn.as_deref(),
            Some("nqn.2014-08.org.nvmexpress:uuid:1")
        );
        rds.set_allowed_host("pvc-a", None).await.unwrap();
        assert_eq!(
            rds.get_disk("pvc-a")
                .await
                .unwrap()
                .unwrap()
                .allowed_host_nqn,
            None
        );

        let snap = rds
            .create_snapshot("pvc-a", "snap-a", "rds-csi-snapshot-of:pvc-a")
            .await
            .unwrap();
        assert_eq!(
            (snap.size_bytes, snap.export.is_none()),
            (3 * GIB + 7, true)
        );
        // The comment survives the RouterOS round trip (rendered, stored, printed, parsed).
        let listed = rds.list_snapshots("snap-").await.unwrap();
        assert_eq!(
            listed[0].comment.as_deref(),
            Some("rds-csi-snapshot-of:pvc-a")
        );
        let clone = rds
            .create_disk(&DiskSpec { copy_from: Some("snap-a".to_string()), ..spec("pvc-b", 4 * GIB) })
            .await
            .unwrap();
        assert_eq!(clone.size_bytes, 4 * GIB);
        assert_eq!(
            rds.list_disks("pvc-")
                .await
                .unwrap()
                .iter()
                .map(|d| d.slot.as_str())
                .collect::<Vec<_>>(),
            ["pvc-a", "pvc-b"]
        );
        assert_eq!(rds.list_snapshots("snap-").await.unwrap().len(), 1);
        for slot in ["pvc-a", "pvc-b", "snap-a", "pvc-a"] {
            rds.delete_disk(slot).await.unwrap();
        }
        assert!(emu.disk_slots().is_empty());
        assert!(emu.file_names().is_empty(), "{:?}", emu.file_names());
        assert_eq!(rds.capacity().await.unwrap().free_bytes, 100 * GIB);
    }

    /// The commands each operation sends on its success path: the fewest that observe what
    /// is unknown and make the change (the README's table is built from the plugin's).
    #[tokio::test]
    async fn each_operation_sends_only_the_commands_it_needs() {
        let emu = emulator(100 * GIB);
        let rds = adapter(&emu);
        let sent = |rds: &RouterOsRds<Recording>| -> Vec<String> {
            let mut lines = rds.transport().lines.lock().unwrap();
            lines
                .drain(..)
                .map(|l| l.split(' ').take(2).collect::<Vec<_>>().join(" "))
                .collect()
        };
        let d = rds.create_disk(&spec("pvc-a", GIB)).await.unwrap();
        assert_eq!(sent(&rds), ["/disk add"]);
        let entry = rds.find_disk("pvc-a").await.unwrap().unwrap();
        assert_eq!(sent(&rds), ["/disk print"]);
        assert_eq!(entry, DiskEntry::from(d.clone()));
        let full = rds.get_disk("pvc-a").await.unwrap().unwrap();
        assert_eq!(sent(&rds), ["/disk print", "/file print"]);
        assert_eq!(rds.sized(&entry).await.unwrap(), full);
        assert_eq!(sent(&rds), ["/file print"]);
        let both = rds.find_disks(&["pvc-none", "pvc-a"]).await.unwrap();
        assert_eq!((both, sent(&rds)), (vec![entry.clone()], vec!["/disk print".to_string()]));
        assert!(rds.get_disk("pvc-none").await.unwrap().is_none());
        assert_eq!(sent(&rds), ["/disk print"]);
        let grown = rds.grow_disk(&full, 2 * GIB).await.unwrap();
        assert_eq!((grown.size_bytes, sent(&rds)), (2 * GIB, vec!["/disk set".to_string()]));
        rds.grow_disk(&grown, 2 * GIB).await.unwrap();
        assert!(sent(&rds).is_empty(), "already that size: nothing to send");
        rds.set_comment(&entry, "note").await.unwrap();
        assert_eq!(sent(&rds), ["/disk set"]);
        let snap = rds
            .create_snapshot("pvc-a", "snap-a", "rds-csi-snapshot-of:pvc-a")
            .await
            .unwrap();
        assert_eq!(sent(&rds), ["/disk add", "/file print"]);
        assert_eq!((snap.size_bytes, snap.created_unix.is_some()), (2 * GIB, true));
        assert_eq!(rds.get_disk("snap-a").await.unwrap().unwrap(), snap);
        sent(&rds);
        rds.remove_disk(&entry).await.unwrap();
        assert_eq!(sent(&rds), ["/disk remove", "/file remove"]);
        rds.remove_leftover_file("pvc-a").await.unwrap();
        assert_eq!(sent(&rds), ["/file remove"]);
        rds.capacity().await.unwrap();
        assert_eq!(sent(&rds), ["/disk print"]);
        rds.list_disks("").await.unwrap();
        assert_eq!(sent(&rds), ["/disk print", "/file print"]);
    }

    #[tokio::test]
    async fn pool_space_and_missing_sources_are_typed() {
        let emu = emulator(GIB);
        let rds = adapter(&emu);
        assert!(matches!(
            rds.create_disk(&spec("pvc-big", 2 * GIB)).await,
            Err(RdsError::NoSpace(_))
        ));
        assert!(matches!(
            rds.create_snapshot("pvc-none", "snap-x", "c").await,
            Err(RdsError::NotFound(_))
        ));
        assert!(matches!(
            rds.create_disk(&DiskSpec { copy_from: Some("pvc-none".to_string()), ..spec("pvc-c", GIB) }).await,
            Err(RdsError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn lost_replies_and_busy_failures_are_resolved_by_observing() {
        let emu = emulator(100 * GIB);
        let rds = adapter(&emu);
        // Applied, reply lost: the adapter sees the disk exists as asked and succeeds.
        emu.faults().push(CommandKind::DiskAdd, Fault::DropReply);
        rds.create_disk(&spec("pvc-a", GIB)).await.unwrap();
        // Not applied, busy: retried.
        emu.faults().push(
            CommandKind::DiskSet,
            Fault::Fail("failure: device busy".into()),
        );
        assert_eq!(
            rds.resize_disk("pvc-a", 2 * GIB).await.unwrap().size_bytes,
            2 * GIB
        );
        // A read whose reply is lost is simply retried.
        emu.faults().push(CommandKind::DiskPrint, Fault::DropReply);
        assert!(rds.get_disk("pvc-a").await.unwrap().is_some());
        // Delete: entry removal reply lost, then the file removal reply lost.
        emu.faults().push(CommandKind::DiskRemove, Fault::DropReply);
        emu.faults().push(CommandKind::FileRemove, Fault::DropReply);
        rds.delete_disk("pvc-a").await.unwrap();
        assert!(emu.disk_slots().is_empty() && emu.file_names().is_empty());
        // Persistent failure: the error surfaces, typed, after the bounded retries.
        for _ in 0..10 {
            emu.faults().push(
                CommandKind::DiskPrint,
                Fault::Fail("failure: device busy".into()),
            );
        }
        assert!(matches!(
            rds.get_disk("pvc-a").await,
            Err(RdsError::Unavailable(_))
        ));
        emu.faults().clear();
        // A non-retryable failure is not retried.
        emu.faults().push(
            CommandKind::DiskAdd,
            Fault::Fail("failure: invalid file-path".into()),
        );
        assert!(matches!(
            rds.create_disk(&spec("pvc-b", GIB)).await,
            Err(RdsError::Rejected(_))
        ));
    }

    #[tokio::test]
    async fn interrupted_delete_is_finished_by_the_next_create_or_delete() {
        let emu = emulator(100 * GIB);
        let rds = adapter(&emu);
        rds.create_disk(&spec("pvc-a", GIB)).await.unwrap();
        // The entry goes but the file stays (as after a crash between the two removes).
        let line = rds
            .renderer
            .render(&Command::DiskRemove {
                slot: "pvc-a".into(),
            })
            .unwrap();
        rds.transport().run(&line).await.unwrap();
        assert_eq!(emu.file_names(), ["raid1/rds-csi/pvc-a.img"]);
        let d = rds.create_disk(&spec("pvc-a", 2 * GIB)).await.unwrap();
        assert_eq!(d.size_bytes, 2 * GIB);
        rds.transport().run(&line).await.unwrap();
        rds.delete_disk("pvc-a").await.unwrap();
        assert!(emu.file_names().is_empty());
    }

    #[tokio::test]
    async fn hostile_names_never_reach_the_transport() {
        let emu = emulator(100 * GIB);
        let rds = adapter(&emu);
        for h in crate::routeros::render::tests::HOSTILE {
            let h = *h;
            assert!(
                matches!(
                    rds.create_disk(&spec(h, GIB)).await,
                    Err(RdsError::Rejected(_))
                ),
                "{h:?}"
            );
            let mut s = spec("pvc-ok", GIB);
            s.export = Some(NvmeExport {
                port: 4420,
                nqn: h.to_string(),
            });
            assert!(
                matches!(rds.create_disk(&s).await, Err(RdsError::Rejected(_))),
                "{h:?}"
            );
            assert!(
                matches!(
                    rds.create_disk(&DiskSpec { copy_from: Some(h.to_string()), ..spec("pvc-ok", GIB) }).await,
                    Err(RdsError::Rejected(_))
                ),
                "{h:?}"
            );
            assert!(
                matches!(rds.get_disk(h).await, Err(RdsError::Rejected(_))),
                "{h:?}"
            );
            assert!(
                matches!(rds.resize_disk(h, GIB).await, Err(RdsError::Rejected(_))),
                "{h:?}"
            );
            assert!(
                matches!(rds.delete_disk(h).await, Err(RdsError::Rejected(_))),
                "{h:?}"
            );
            assert!(
                matches!(
                    rds.set_allowed_host(h, None).await,
                    Err(RdsError::Rejected(_))
                ),
                "{h:?}"
            );
            if !h.is_empty() {
                assert!(
                    matches!(rds.list_disks(h).await, Err(RdsError::Rejected(_))),
                    "{h:?}"
                );
            }
        }
        assert_eq!(*rds.transport().lines.lock().unwrap(), Vec::<String>::new());
        assert!(emu.disk_slots().is_empty());
    }

    /// Prints `file-size` rounded to one decimal GiB, as RouterOS may for odd sizes.
    struct RoundingSizes(InProcess);

    #[async_trait]
    impl Transport for RoundingSizes {
        async fn run(&self, cmd: &CommandLine) -> Result<String, RdsError> {
            let out = self.0.run(cmd).await?;
            let Some(at) = out.find("file-size=") else {
                return Ok(out);
            };
            let start = at + "file-size=".len();
            let rest = &out[start..];
            let mut end = 0;
            let b = rest.as_bytes();
            while end < b.len()
                && (b[end].is_ascii_digit()
                    || (b[end] == b' ' && b.get(end + 1).is_some_and(u8::is_ascii_digit)))
            {
                end += 1;
            }
            let Some(n) = crate::routeros::parse::parse_size(&rest[..end]) else {
                return Ok(out);
            };
            let tenths = (n as f64 / GIB as f64 * 10.0).round() / 10.0;
            Ok(format!("{}{tenths:.1}GiB{}", &out[..start], &rest[end..]))
        }
    }

    #[tokio::test]
    async fn sizes_stay_exact_when_disk_print_rounds_them() {
        let emu = emulator(100 * GIB);
        let rds = RouterOsRds::new(
            RoundingSizes(InProcess::new(Arc::clone(&emu))),
            &RdsLayout {
                volume_base_path: "raid1/rds-csi".into(),
                pool_mount_point: "raid1".into(),
            },
            Backoff::API,
            Arc::new(SeededEntropy::from_seed(1)),
        )
        .unwrap();
        let d = rds.create_disk(&spec("pvc-odd", GIB + 4097)).await.unwrap();
        assert_eq!(d.size_bytes, GIB + 4097);
        assert_eq!(
            rds.resize_disk("pvc-odd", GIB + 8193).await.unwrap().size_bytes,
            GIB + 8193
        );
        assert_eq!(rds.list_disks("pvc-").await.unwrap()[0].size_bytes, GIB + 8193);
    }

    #[tokio::test]
    async fn disks_outside_the_base_path_are_not_touched() {
        let emu = emulator(100 * GIB);
        let rds = adapter(&emu);
        // Someone else's disk on the same RDS, added by hand.
        let foreign = crate::routeros::emulator::cli::read_command(
            "/disk add type=file file-path=\"raid1/other/pvc-x.img\" file-size=1G slot=\"pvc-x\"",
        )
        .unwrap();
        assert!(emu.apply(&foreign).ok);
        assert!(matches!(
            rds.delete_disk("pvc-x").await,
            Err(RdsError::Rejected(_))
        ));
        assert_eq!(rds.list_disks("pvc-").await.unwrap(), vec![]);
        assert!(matches!(
            rds.resize_disk("pvc-x", 2 * GIB).await,
            Err(RdsError::Rejected(_))
        ));
        assert_eq!(emu.disk_slots(), ["pvc-x"]);
    }
}

#[cfg(test)]
mod metrics_tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::ports::time::SeededEntropy;
    use crate::routeros::render::CommandLine;

    /// Answers `monitor-traffic` with the corpus fixture of a real RDS, anything else with
    /// nothing (no disk), or fails every command when `down`.
    struct Scripted {
        down: bool,
    }

    #[async_trait]
    impl Transport for Scripted {
        async fn run(&self, cmd: &CommandLine) -> Result<String, RdsError> {
            if self.down {
                return Err(RdsError::Unavailable("connection refused".into()));
            }
            if cmd.as_str().contains("monitor-traffic") {
                return Ok(include_str!("../../tests/fixtures/routeros/monitor_traffic_once.txt").into());
            }
            Ok(String::new())
        }
    }

    fn adapter(down: bool, metrics: &Metrics) -> RouterOsRds<Scripted> {
        RouterOsRds::new(
            Scripted { down },
            &RdsLayout {
                volume_base_path: "raid1/rds-csi".into(),
                pool_mount_point: "raid1".into(),
            },
            Backoff {
                base: std::time::Duration::from_millis(1),
                max: std::time::Duration::from_millis(1),
                max_attempts: 2,
            },
            Arc::new(SeededEntropy::from_seed(1)),
        )
        .unwrap()
        .with_metrics(metrics.routeros(), metrics.rds())
    }

    #[tokio::test]
    async fn monitor_traffic_is_read_in_bytes_and_every_command_is_counted() {
        let metrics = Metrics::default();
        let rds = adapter(false, &metrics);
        let t = rds.disk_traffic("pvc-a").await.unwrap();
        assert_eq!(
            t,
            DiskTraffic {
                read_ops_per_second: 12.0,
                write_ops_per_second: 3.0,
                read_bytes_per_second: 150_000.0,
                write_bytes_per_second: 12_000.0,
            },
            "1.2Mbps and 96.0kbps are bits per second"
        );
        assert_eq!(rds.get_disk("pvc-a").await.unwrap(), None);
        let text = metrics.render();
        for want in [
            r#"rds_csi_routeros_commands_total{verb="disk_monitor_traffic",outcome="ok"} 1"#,
            r#"rds_csi_routeros_commands_total{verb="disk_print",outcome="ok"} 1"#,
            r#"rds_csi_routeros_command_duration_seconds_count{verb="disk_monitor_traffic"} 1"#,
            "rds_csi_routeros_up 1",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
        // A dead RDS: each attempt counted as unavailable, the connection state drops.
        let metrics = Metrics::default();
        let rds = adapter(true, &metrics);
        assert!(rds.get_disk("pvc-a").await.is_err());
        let text = metrics.render();
        for want in [
            r#"rds_csi_routeros_commands_total{verb="disk_print",outcome="unavailable"} 2"#,
            "rds_csi_routeros_up 0",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
    }

    #[tokio::test]
    async fn capacity_and_full_listings_set_the_pool_and_disk_gauges() {
        let metrics = Metrics::default();
        let emu = Arc::new(crate::routeros::emulator::Emulator::in_memory(
            crate::routeros::emulator::PoolConfig {
                slot: "raid1".into(),
                mount_point: "raid1".into(),
                size_bytes: 10 << 30,
            },
            Arc::new(crate::ports::time::SystemClock),
        ));
        let rds = RouterOsRds::new(
            crate::routeros::transport::inproc::InProcess::new(emu),
            &RdsLayout {
                volume_base_path: "raid1/rds-csi".into(),
                pool_mount_point: "raid1".into(),
            },
            Backoff::API,
            Arc::new(SeededEntropy::from_seed(1)),
        )
        .unwrap()
        .with_metrics(metrics.routeros(), metrics.rds());
        let spec = |slot: &str, export: bool| DiskSpec {
            slot: slot.into(),
            size_bytes: 1 << 30,
            export: export.then(|| NvmeExport {
                port: 4420,
                nqn: format!("nqn.2000-02.com.mikrotik:{slot}"),
            }),
            copy_from: None,
            comment: None,
            allowed_host_nqn: None,
        };
        rds.create_disk(&spec("pvc-1", true)).await.unwrap();
        rds.create_disk(&spec("pvc-2", true)).await.unwrap();
        rds.create_disk(&spec("snap-1", false)).await.unwrap();
        let cap = rds.capacity().await.unwrap();
        rds.list_disks("").await.unwrap();
        let text = metrics.render();
        for want in [
            format!("rds_csi_rds_pool_size_bytes {}", cap.size_bytes),
            format!("rds_csi_rds_pool_free_bytes {}", cap.free_bytes),
            r#"rds_csi_rds_disks{kind="volume"} 2"#.into(),
            r#"rds_csi_rds_disks{kind="snapshot"} 1"#.into(),
        ] {
            assert!(text.contains(&want), "{want} missing in:\n{text}");
        }
        assert!(cap.free_bytes < cap.size_bytes);
    }
}

#[cfg(test)]
mod rate_tests {
    use crate::routeros::parse::parse_rate;

    #[test]
    fn rates_are_bits_per_second_with_decimal_prefixes() {
        assert_eq!(parse_rate("0bps"), Some(0.0));
        assert_eq!(parse_rate("96.0kbps"), Some(12_000.0));
        assert_eq!(parse_rate("1.2Mbps"), Some(150_000.0));
        assert_eq!(parse_rate("8Gbps"), Some(1e9));
        for bad in ["", "12", "kbps", "-1bps", "1.2MB", "NaNbps"] {
            assert_eq!(parse_rate(bad), None, "{bad:?}");
        }
    }
}
