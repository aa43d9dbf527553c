//! The renderer: the only code that turns a [`Command`] into RouterOS CLI text.
//!
//! Invariants:
//! - Every value is checked against a narrow alphabet before it is placed in the text;
//!   anything RouterOS could read as syntax (quotes, `;`, `[`, `]`, `$`, `\`, `?`, spaces,
//!   newlines, control characters), over-long values, `..` and paths outside the configured
//!   base path are refused with a [`RenderError`] — before any I/O, since a
//!   [`CommandLine`] can only be built here.
//! - String values are always double-quoted (and escaped by RouterOS rules, although the
//!   alphabet leaves nothing to escape); the `[find ...]` brackets come only from here.
//! - Sizes are exact: a unit suffix (`T`, `G`, `M`, binary as RouterOS reads them) only
//!   when it divides the size, plain bytes otherwise. 1.5 GiB is `1536M`, never `1G`.

use crate::routeros::command::{Command, DiskAdd, DiskFilter, PrintStyle};

/// Longest identifier value (slot, NQN) we render.
pub const MAX_IDENT_LEN: usize = 223;
/// Longest file path we render.
pub const MAX_PATH_LEN: usize = 512;
/// Longest disk comment we render: the driver's note (`crate::types::note`) with the
/// longest CSI name (128 bytes, 171 characters encoded) and the longest address.
pub const MAX_COMMENT_LEN: usize = 1024;

/// Why a command cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A value contains something RouterOS could read as syntax, or is empty/too long.
    #[error("{field} {value:?} cannot be sent to RouterOS: {reason}")]
    Unsafe {
        /// The command field at fault (e.g. `slot`).
        field: &'static str,
        /// The offending value (already checked to be printable via `{:?}`).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A size that RouterOS cannot take.
    #[error("{field}: {reason}")]
    BadSize {
        /// The command field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// A rendered command line. Only [`Renderer::render`] builds one, so the transports can
/// only ever send text that went through the checks above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    text: String,
    read: bool,
}

impl CommandLine {
    /// The CLI text (no trailing newline).
    pub fn as_str(&self) -> &str {
        &self.text
    }
    /// Whether the command only reads (safe to repeat).
    pub fn is_read(&self) -> bool {
        self.read
    }
}

impl std::fmt::Display for CommandLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// Renders commands for one RDS: file paths must lie under `base_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renderer {
    base_path: String,
}

impl Renderer {
    /// A renderer whose disks live under `base_path` (e.g. `/storage-pool/kubernetes`; a
    /// leading or trailing `/` is dropped: paths are kept as RouterOS `/file` names). The
    /// base path itself is checked like any path.
    pub fn new(base_path: &str) -> Result<Self, RenderError> {
        let trimmed = base_path.trim_end_matches('/');
        let trimmed = trimmed.strip_prefix('/').unwrap_or(trimmed);
        check_path_syntax("volume base path", trimmed)?;
        Ok(Self {
            base_path: trimmed.to_string(),
        })
    }

    /// The base path disks live under.
    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    /// The backing file path of a slot: `<base>/<slot>.img`.
    pub fn file_path_for(&self, slot: &str) -> String {
        format!("{}/{slot}.img", self.base_path)
    }

    /// Renders `cmd`, or says which value cannot be rendered safely.
    pub fn render(&self, cmd: &Command) -> Result<CommandLine, RenderError> {
        let text = match cmd {
            Command::DiskAdd(add) => self.render_add(add)?,
            Command::DiskSetSize { slot, size_bytes } => format!(
                "/disk set {} file-size={}",
                find_slot(slot)?,
                size("file-size", *size_bytes)?
            ),
            Command::DiskSetAllowHost { slot, host_nqn } => format!(
                "/disk set {} nvme-tcp-server-allow-host-name={}",
                find_slot(slot)?,
                quoted(ident("nvme-tcp-server-allow-host-name", host_nqn)?)
            ),
            Command::DiskSetComment { slot, comment: c } => format!(
                "/disk set {} comment={}",
                find_slot(slot)?,
                quoted(comment(c)?)
            ),
            Command::DiskUnsetAllowHost { slot } => format!(
                "/disk unset {} nvme-tcp-server-allow-host-name",
                find_slot(slot)?
            ),
            Command::DiskPrint { filter, style } => {
                let style = match style {
                    PrintStyle::Detail => "detail",
                    PrintStyle::Terse => "terse",
                };
                match filter {
                    DiskFilter::All => format!("/disk print {style}"),
                    DiskFilter::Slot(s) => {
                        format!(
                            "/disk print {style} where slot={}",
                            quoted(ident("slot", s)?)
                        )
                    }
                    DiskFilter::Slots(slots) => {
                        let mut terms = Vec::with_capacity(slots.len());
                        for s in slots {
                            terms.push(format!("slot={}", quoted(ident("slot", s)?)));
                        }
                        if terms.is_empty() {
                            return Err(unsafe_value("slot", "", "no slot to select".into()));
                        }
                        format!("/disk print {style} where {}", terms.join(" or "))
                    }
                    DiskFilter::SlotPrefix(p) => format!(
                        "/disk print {style} where slot~{}",
                        quoted(&format!("^{}", ident("slot prefix", p)?))
                    ),
                    DiskFilter::MountPoint(m) => format!(
                        "/disk print {style} where mount-point={}",
                        quoted(ident("mount-point", m)?)
                    ),
                }
            }
            Command::DiskRemove { slot } => format!("/disk remove {}", find_slot(slot)?),
            Command::FilePrint { name, exact } => {
                let name = self.path("name", name)?;
                if *exact {
                    format!("/file print detail where name={}", quoted(name))
                } else {
                    format!(
                        "/file print detail where name~{}",
                        quoted(&format!("^{name}"))
                    )
                }
            }
            Command::FileRemove { name } => format!(
                "/file remove [find name={}]",
                quoted(self.file_path("name", name)?)
            ),
            Command::MonitorTraffic { slot } => {
                format!("/disk monitor-traffic {} once", find_slot(slot)?)
            }
        };
        Ok(CommandLine {
            text,
            read: cmd.is_read(),
        })
    }

    fn render_add(&self, add: &DiskAdd) -> Result<String, RenderError> {
        let mut out = String::from("/disk add type=file");
        if let Some(src) = &add.copy_from {
            out.push_str(&format!(" copy-from={}", find_slot(src)?));
        }
        // `/disk add` takes an absolute path; `/file` names the same file without the `/`.
        out.push_str(&format!(
            " file-path={}",
            quoted(&format!(
                "/{}",
                self.file_path("file-path", &add.file_path)?
            ))
        ));
        match (add.size_bytes, &add.copy_from) {
            (Some(n), _) => out.push_str(&format!(" file-size={}", size("file-size", n)?)),
            (None, Some(_)) => {}
            (None, None) => {
                return Err(RenderError::BadSize {
                    field: "file-size",
                    reason: "a new disk needs a size".into(),
                });
            }
        }
        out.push_str(&format!(" slot={}", quoted(ident("slot", &add.slot)?)));
        if let Some(c) = &add.comment {
            out.push_str(&format!(" comment={}", quoted(comment(c)?)));
        }
        if let Some(e) = &add.export {
            if e.port == 0 {
                return Err(RenderError::BadSize {
                    field: "nvme-tcp-server-port",
                    reason: "port 0 is not a valid TCP port".into(),
                });
            }
            out.push_str(&format!(
                " nvme-tcp-export=yes nvme-tcp-server-port={} nvme-tcp-server-nqn={}",
                e.port,
                quoted(ident("nvme-tcp-server-nqn", &e.nqn)?)
            ));
            if let Some(h) = &e.allow_host {
                out.push_str(&format!(
                    " nvme-tcp-server-allow-host-name={}",
                    quoted(ident("nvme-tcp-server-allow-host-name", h)?)
                ));
            }
        }
        Ok(out)
    }

    /// A path under the base path (the base itself allowed, for prefix listings).
    fn path<'a>(&self, field: &'static str, p: &'a str) -> Result<&'a str, RenderError> {
        check_path_syntax(field, p)?;
        if p != self.base_path && !p.starts_with(&format!("{}/", self.base_path)) {
            return Err(unsafe_value(
                field,
                p,
                format!("it is outside the volume base path {:?}", self.base_path),
            ));
        }
        Ok(p)
    }

    /// A file strictly under the base path.
    fn file_path<'a>(&self, field: &'static str, p: &'a str) -> Result<&'a str, RenderError> {
        let p = self.path(field, p)?;
        if p == self.base_path {
            return Err(unsafe_value(
                field,
                p,
                "it names the base directory itself".into(),
            ));
        }
        Ok(p)
    }
}

fn unsafe_value(field: &'static str, value: &str, reason: String) -> RenderError {
    // Keep hostile values printable and bounded in messages.
    let shown: String = value.chars().take(80).collect();
    RenderError::Unsafe {
        field,
        value: shown,
        reason,
    }
}

fn check_chars(
    field: &'static str,
    v: &str,
    max: usize,
    extra: &[char],
) -> Result<(), RenderError> {
    if v.is_empty() {
        return Err(unsafe_value(field, v, "it is empty".into()));
    }
    if v.len() > max {
        return Err(unsafe_value(
            field,
            v,
            format!("it is {} bytes long; at most {max} are allowed", v.len()),
        ));
    }
    if let Some(c) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || extra.contains(c)))
    {
        let what = match c {
            '"' | '\'' => "a quote",
            ';' => "a command separator ';'",
            '[' | ']' => "a command substitution bracket",
            '$' => "a variable reference '$'",
            '\\' => "an escape character '\\'",
            '\n' | '\r' => "a newline",
            c if c.is_control() => "a control character",
            ' ' | '\t' => "whitespace",
            _ => "a character outside letters, digits, '-', '_', '.'",
        };
        return Err(unsafe_value(
            field,
            v,
            format!("it contains {what} ({c:?})"),
        ));
    }
    Ok(())
}

/// A disk comment: the identifier alphabet (the driver encodes free text into it), but
/// longer.
fn comment(v: &str) -> Result<&str, RenderError> {
    check_chars("comment", v, MAX_COMMENT_LEN, &[':'])?;
    Ok(v)
}

/// An identifier (slot, NQN, mount point).
fn ident<'a>(field: &'static str, v: &'a str) -> Result<&'a str, RenderError> {
    check_chars(field, v, MAX_IDENT_LEN, &[':'])?;
    Ok(v)
}

fn check_path_syntax(field: &'static str, p: &str) -> Result<(), RenderError> {
    check_chars(field, p, MAX_PATH_LEN, &['/'])?;
    if p.starts_with('/') {
        return Err(unsafe_value(
            field,
            p,
            "RouterOS file names have no leading '/'".into(),
        ));
    }
    if p.split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err(unsafe_value(
            field,
            p,
            "it has an empty, '.' or '..' path segment".into(),
        ));
    }
    Ok(())
}

fn find_slot(slot: &str) -> Result<String, RenderError> {
    Ok(format!("[find slot={}]", quoted(ident("slot", slot)?)))
}

/// Quotes a value by RouterOS rules: `"` around it, `\`, `"` and `$` escaped.
pub fn quoted(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        if matches!(c, '\\' | '"' | '$') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// An exact size: with a binary unit only when the unit divides it.
fn size(field: &'static str, bytes: u64) -> Result<String, RenderError> {
    if bytes == 0 {
        return Err(RenderError::BadSize {
            field,
            reason: "a size of 0 bytes is not allowed".into(),
        });
    }
    Ok(render_size(bytes))
}

/// Renders `bytes` exactly: `T`/`G`/`M` suffix when it divides, else plain bytes.
pub fn render_size(bytes: u64) -> String {
    for (unit, suffix) in [(TIB, "T"), (GIB, "G"), (MIB, "M")] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::routeros::command::ExportSpec;

    const GIB: u64 = 1 << 30;

    fn r() -> Renderer {
        Renderer::new("raid1/rds-csi").unwrap()
    }

    fn every_command() -> Vec<(&'static str, Command)> {
        let slot = "pvc-3f1c2a9e-8d7b-4c1e-9a0f-1b2c3d4e5f60".to_string();
        let path = r().file_path_for(&slot);
        vec![
            (
                "create volume",
                Command::DiskAdd(DiskAdd {
                    slot: slot.clone(),
                    file_path: path.clone(),
                    size_bytes: Some(50 * GIB),
                    copy_from: None,
                    comment: None,
                    export: Some(ExportSpec {
                        port: 4420,
                        nqn: format!("nqn.2000-02.com.mikrotik:{slot}"),
                        allow_host: None,
                    }),
                }),
            ),
            (
                "create volume fenced to one host, 1.5 GiB",
                Command::DiskAdd(DiskAdd {
                    slot: "pvc-a".into(),
                    file_path: r().file_path_for("pvc-a"),
                    size_bytes: Some(GIB + GIB / 2),
                    copy_from: None,
                    comment: None,
                    export: Some(ExportSpec {
                        port: 4421,
                        nqn: "nqn.2000-02.com.mikrotik:pvc-a".into(),
                        allow_host: Some("nqn.2014-08.org.nvmexpress:uuid:5e1c0b7a".into()),
                    }),
                }),
            ),
            (
                "snapshot (copy-from, no export)",
                Command::DiskAdd(DiskAdd {
                    slot: "snap-1".into(),
                    file_path: r().file_path_for("snap-1"),
                    size_bytes: None,
                    copy_from: Some(slot.clone()),
                    comment: None,
                    export: None,
                }),
            ),
            (
                "clone / restore (copy-from, size, export)",
                Command::DiskAdd(DiskAdd {
                    slot: "pvc-clone".into(),
                    file_path: r().file_path_for("pvc-clone"),
                    size_bytes: Some(1_000_000_007),
                    copy_from: Some("snap-1".into()),
                    comment: None,
                    export: Some(ExportSpec {
                        port: 4420,
                        nqn: "nqn.2000-02.com.mikrotik:pvc-clone".into(),
                        allow_host: None,
                    }),
                }),
            ),
            (
                "resize to 2 TiB",
                Command::DiskSetSize {
                    slot: slot.clone(),
                    size_bytes: 2 << 40,
                },
            ),
            (
                "resize to 1536 MiB",
                Command::DiskSetSize {
                    slot: slot.clone(),
                    size_bytes: GIB + GIB / 2,
                },
            ),
            (
                "fence to a host",
                Command::DiskSetAllowHost {
                    slot: slot.clone(),
                    host_nqn: "nqn.2014-08.org.nvmexpress:uuid:0c1d".into(),
                },
            ),
            (
                "lift the fence",
                Command::DiskUnsetAllowHost { slot: slot.clone() },
            ),
            (
                "record what the driver keeps about a volume",
                Command::DiskSetComment {
                    slot: slot.clone(),
                    comment: "rds-csi-volume:ext4:n.cHZjK2E:clt.-1".into(),
                },
            ),
            (
                "get",
                Command::DiskPrint {
                    filter: DiskFilter::Slot(slot.clone()),
                    style: PrintStyle::Detail,
                },
            ),
            (
                "get two (a snapshot's name and its source)",
                Command::DiskPrint {
                    filter: DiskFilter::Slots(vec!["snap-1".into(), slot.clone()]),
                    style: PrintStyle::Detail,
                },
            ),
            (
                "list",
                Command::DiskPrint {
                    filter: DiskFilter::SlotPrefix("pvc-".into()),
                    style: PrintStyle::Detail,
                },
            ),
            (
                "list terse",
                Command::DiskPrint {
                    filter: DiskFilter::All,
                    style: PrintStyle::Terse,
                },
            ),
            (
                "capacity",
                Command::DiskPrint {
                    filter: DiskFilter::MountPoint("raid1".into()),
                    style: PrintStyle::Detail,
                },
            ),
            (
                "delete disk entry",
                Command::DiskRemove { slot: slot.clone() },
            ),
            (
                "file of a disk",
                Command::FilePrint {
                    name: path.clone(),
                    exact: true,
                },
            ),
            (
                "files under the base path",
                Command::FilePrint {
                    name: "raid1/rds-csi".into(),
                    exact: false,
                },
            ),
            ("delete backing file", Command::FileRemove { name: path }),
            ("traffic", Command::MonitorTraffic { slot }),
        ]
    }

    #[test]
    fn every_command_renders_as_snapshotted() {
        let mut out = String::new();
        for (what, cmd) in every_command() {
            out.push_str(&format!("# {what}\n{}\n\n", r().render(&cmd).unwrap()));
        }
        insta::with_settings!({
            snapshot_path => concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"),
            prepend_module_to_snapshot => false,
        }, {
            insta::assert_snapshot!("routeros_rendered_commands", out);
        });
    }

    #[test]
    fn rendered_commands_read_back_identically() {
        for (what, cmd) in every_command() {
            let line = r().render(&cmd).unwrap();
            let back = crate::routeros::emulator::cli::read_command(line.as_str())
                .unwrap_or_else(|e| panic!("{what}: {line}: {e:?}"));
            // The emulator defaults `terse` when unspecified; everything else is exact.
            assert_eq!(back, cmd, "{what}: {line}");
        }
    }

    #[test]
    fn sizes_are_exact_never_rounded() {
        assert_eq!(render_size(GIB + GIB / 2), "1536M");
        assert_eq!(render_size(50 * GIB), "50G");
        assert_eq!(render_size(3 << 40), "3T");
        assert_eq!(render_size(GIB + 1), (GIB + 1).to_string());
        assert_eq!(render_size(4096), "4096");
        for n in [1, 1023, GIB - 1, GIB + 512, u64::MAX] {
            let s = render_size(n);
            assert_eq!(crate::routeros::parse::parse_size(&s), Some(n), "{s}");
        }
        assert!(matches!(
            r().render(&Command::DiskSetSize {
                slot: "a".into(),
                size_bytes: 0
            }),
            Err(RenderError::BadSize { .. })
        ));
    }

    pub(crate) const HOSTILE: &[&str] = &[
        "",
        "pvc\"; /system reset-configuration",
        "pvc;/file remove [find]",
        "pvc]",
        "[find]",
        "$(reboot)",
        "pvc\\\"",
        "a\nb",
        "a\rb",
        "tab\there",
        "nul\0",
        "bell\u{7}",
        "space here",
        "pvc?",
        "ä",
        "x{y}",
    ];

    #[test]
    fn hostile_values_are_refused_in_every_field() {
        let long = "a".repeat(MAX_IDENT_LEN + 1);
        let too_long_comment = "a".repeat(MAX_COMMENT_LEN + 1);
        let mut hostile: Vec<&str> = HOSTILE.to_vec();
        hostile.push(&long);
        hostile.push(&too_long_comment);
        for h in hostile {
            let h = h.to_string();
            let cmds = vec![
                Command::DiskRemove { slot: h.clone() },
                Command::DiskSetSize {
                    slot: h.clone(),
                    size_bytes: 1,
                },
                Command::DiskSetAllowHost {
                    slot: "ok".into(),
                    host_nqn: h.clone(),
                },
                Command::DiskPrint {
                    filter: DiskFilter::SlotPrefix(h.clone()),
                    style: PrintStyle::Detail,
                },
                Command::DiskPrint {
                    filter: DiskFilter::MountPoint(h.clone()),
                    style: PrintStyle::Detail,
                },
                Command::DiskPrint {
                    filter: DiskFilter::Slots(vec!["ok".into(), h.clone()]),
                    style: PrintStyle::Detail,
                },
                Command::DiskAdd(DiskAdd {
                    slot: "ok".into(),
                    file_path: r().file_path_for("ok"),
                    size_bytes: Some(1),
                    copy_from: Some(h.clone()),
                    comment: None,
                    export: None,
                }),
                Command::DiskAdd(DiskAdd {
                    slot: "ok".into(),
                    file_path: r().file_path_for("ok"),
                    size_bytes: Some(1),
                    copy_from: None,
                    comment: None,
                    export: Some(ExportSpec {
                        port: 4420,
                        nqn: h.clone(),
                        allow_host: None,
                    }),
                }),
                Command::MonitorTraffic { slot: h.clone() },
            ];
            let mut cmds = cmds;
            if h.len() <= MAX_IDENT_LEN || h.len() > MAX_COMMENT_LEN {
                cmds.push(Command::DiskSetComment {
                    slot: "ok".into(),
                    comment: h.clone(),
                });
            }
            if h.len() <= MAX_IDENT_LEN {
                cmds.push(Command::FileRemove {
                    name: format!("raid1/rds-csi/{h}"),
                });
            }
            for cmd in cmds {
                let err = r().render(&cmd).unwrap_err();
                assert!(matches!(err, RenderError::Unsafe { .. }), "{h:?}: {err:?}");
                assert!(!err.to_string().contains('\n'), "{err}");
            }
        }
    }

    #[test]
    fn paths_outside_the_base_path_are_refused() {
        for p in [
            "raid1/rds-csi/../../etc/passwd",
            "raid1/other/x.img",
            "/raid1/rds-csi/x.img",
            "raid1/rds-csi/x.img/",
            "raid1/rds-csi",
            "raid1/rds-csi//x.img",
            "raid1/rds-csi/./x.img",
            "raid1/rds-csix/y.img",
        ] {
            let err = r()
                .render(&Command::FileRemove { name: p.into() })
                .unwrap_err();
            assert!(matches!(err, RenderError::Unsafe { .. }), "{p}: {err:?}");
        }
        assert!(Renderer::new("../x").is_err());
        assert_eq!(
            Renderer::new("/raid1/k8s/").unwrap().base_path(),
            "raid1/k8s"
        );
    }
}
