//! The typed RouterOS command model: every command the driver sends to the RDS, as data.
//!
//! Nothing here is text: [`crate::routeros::render`] is the only code that turns a
//! [`Command`] into CLI text (and refuses values it cannot render safely), and the emulator
//! parses that text back into a [`Command`] to execute it. Field values are kept as the
//! caller gave them; validation happens in the renderer, before any I/O.

/// The NQN prefix RouterOS uses for subsystems exported by the RDS.
pub const MIKROTIK_NQN_PREFIX: &str = "nqn.2000-02.com.mikrotik:";

/// NVMe/TCP export settings of a `/disk add`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    /// `nvme-tcp-server-port`.
    pub port: u16,
    /// `nvme-tcp-server-nqn`.
    pub nqn: String,
    /// `nvme-tcp-server-allow-host-name`: the only host NQN allowed to connect.
    pub allow_host: Option<String>,
}

/// `/disk add type=file ...`: a file-backed disk, new or a `copy-from` copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskAdd {
    /// `slot`: the disk's name (volume or snapshot id).
    pub slot: String,
    /// `file-path`: backing file, relative to the RDS root (no leading `/`).
    pub file_path: String,
    /// `file-size` in bytes; required unless `copy_from` is set.
    pub size_bytes: Option<u64>,
    /// `copy-from=[find slot=...]`: copy the content of this disk.
    pub copy_from: Option<String>,
    /// NVMe/TCP export; `None` leaves the disk unexported (snapshots).
    pub export: Option<ExportSpec>,
    /// `comment`: a note RouterOS keeps with the entry (what the driver records about the
    /// volume or snapshot: see `crate::types::note`).
    pub comment: Option<String>,
}

/// Which disks a `print` selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskFilter {
    /// Every disk.
    All,
    /// `where slot="..."`.
    Slot(String),
    /// `where slot="a" or slot="b" ...`: several disks in one round trip.
    Slots(Vec<String>),
    /// `where slot~"^..."`: slots starting with this prefix (a regex anchor; callers
    /// re-check the prefix exactly, since `.` matches any character).
    SlotPrefix(String),
    /// `where mount-point="..."`: the pool disk (capacity).
    MountPoint(String),
}

/// Output format of a `print`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PrintStyle {
    /// `print detail`: one record over several wrapped lines.
    Detail,
    /// `print terse`: one record per line.
    Terse,
}

/// Every RouterOS command the driver sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `/disk add type=file ...`.
    DiskAdd(DiskAdd),
    /// `/disk set [find slot=...] file-size=...`.
    DiskSetSize {
        /// The disk.
        slot: String,
        /// New exact size in bytes.
        size_bytes: u64,
    },
    /// `/disk set [find slot=...] nvme-tcp-server-allow-host-name=...`.
    DiskSetAllowHost {
        /// The disk.
        slot: String,
        /// The host NQN allowed to connect.
        host_nqn: String,
    },
    /// `/disk set [find slot=...] comment=...`: the note kept with the entry.
    DiskSetComment {
        /// The disk.
        slot: String,
        /// The new comment.
        comment: String,
    },
    /// `/disk unset [find slot=...] nvme-tcp-server-allow-host-name`.
    DiskUnsetAllowHost {
        /// The disk.
        slot: String,
    },
    /// `/disk print detail|terse [where ...]`.
    DiskPrint {
        /// Selection.
        filter: DiskFilter,
        /// Output format.
        style: PrintStyle,
    },
    /// `/disk remove [find slot=...]`.
    DiskRemove {
        /// The disk.
        slot: String,
    },
    /// `/file print detail [where name=...|name~...]`.
    FilePrint {
        /// `where name="..."` (exact) when `exact`, else `where name~"^..."` (prefix).
        name: String,
        /// Exact name or prefix.
        exact: bool,
    },
    /// `/file remove [find name=...]`.
    FileRemove {
        /// File name (no leading `/`).
        name: String,
    },
    /// `/disk monitor-traffic [find slot=...] once`.
    MonitorTraffic {
        /// The disk.
        slot: String,
    },
}

/// The kind of a command, for fault hooks and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CommandKind {
    /// [`Command::DiskAdd`].
    DiskAdd,
    /// [`Command::DiskSetSize`], [`Command::DiskSetAllowHost`], [`Command::DiskUnsetAllowHost`],
    /// [`Command::DiskSetComment`].
    DiskSet,
    /// [`Command::DiskPrint`].
    DiskPrint,
    /// [`Command::DiskRemove`].
    DiskRemove,
    /// [`Command::FilePrint`].
    FilePrint,
    /// [`Command::FileRemove`].
    FileRemove,
    /// [`Command::MonitorTraffic`].
    MonitorTraffic,
}

impl CommandKind {
    /// The `verb` label of `rds_csi_routeros_commands_total`.
    pub fn verb(self) -> &'static str {
        match self {
            CommandKind::DiskAdd => "disk_add",
            CommandKind::DiskSet => "disk_set",
            CommandKind::DiskPrint => "disk_print",
            CommandKind::DiskRemove => "disk_remove",
            CommandKind::FilePrint => "file_print",
            CommandKind::FileRemove => "file_remove",
            CommandKind::MonitorTraffic => "disk_monitor_traffic",
        }
    }
}

impl Command {
    /// The command's kind.
    pub fn kind(&self) -> CommandKind {
        match self {
            Command::DiskAdd(_) => CommandKind::DiskAdd,
            Command::DiskSetSize { .. }
            | Command::DiskSetAllowHost { .. }
            | Command::DiskSetComment { .. }
            | Command::DiskUnsetAllowHost { .. } => CommandKind::DiskSet,
            Command::DiskPrint { .. } => CommandKind::DiskPrint,
            Command::DiskRemove { .. } => CommandKind::DiskRemove,
            Command::FilePrint { .. } => CommandKind::FilePrint,
            Command::FileRemove { .. } => CommandKind::FileRemove,
            Command::MonitorTraffic { .. } => CommandKind::MonitorTraffic,
        }
    }

    /// Whether the command only reads state (safe to repeat after an ambiguous failure).
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            Command::DiskPrint { .. } | Command::FilePrint { .. } | Command::MonitorTraffic { .. }
        )
    }
}
