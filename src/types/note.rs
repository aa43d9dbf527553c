//! The note the driver keeps with every disk it makes on the RDS (the disk entry's
//! `comment`): what the CO asked for that RouterOS does not keep by itself, so that any
//! controller — after a restart, or the other replica — answers from the RDS alone: a
//! repeated CreateVolume or CreateSnapshot recognises its disk, ListVolumes returns the
//! `volume_context` CreateVolume returned, ControllerPublishVolume hands the node the
//! connect tunables ControllerModifyVolume last set.
//!
//! Format (one list, here, so writer and readers cannot drift):
//! - volume: `rds-csi-volume:<layout>` then, each optional, `:n.<name>` (the CSI name, when
//!   the id is derived from it rather than equal to it), `:a.<address>` (the StorageClass'
//!   `nvmeAddress`), `:clt.<seconds>`, `:rd.<seconds>`, `:kat.<seconds>` (the connect
//!   tunables the volume was created with: its `volume_context`, which "SHALL NOT be
//!   mutable"), `:mclt.<seconds>`, `:mrd.<seconds>`, `:mkat.<seconds>` (what
//!   ControllerModifyVolume set since: they win in the publish context), `:mto.<seconds>`
//!   (the StorageClass' `migrationTimeoutSeconds` as the controller uses it, part of the
//!   `volume_context`); `<layout>` is `ext4`, `xfs` or `block`;
//! - snapshot: `rds-csi-snapshot-of:<source volume id>` then, optional, `:n.<name>`.
//!
//! Free text (names, addresses) is base64url without padding, so a note holds only the
//! renderer's comment alphabet (letters, digits, `-`, `_`, `.`, `:`), whatever the CO sent.
//! Notes written before the optional fields existed (`rds-csi-volume:ext4`,
//! `rds-csi-snapshot-of:pvc-1`) read the same, with those fields absent. Unknown fields are
//! skipped (a newer driver's note stays readable); a field that does not decode makes the
//! note unreadable, which callers treat as a disk that is not theirs.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

/// Tag of a volume's note.
pub const VOLUME_TAG: &str = "rds-csi-volume";
/// Tag of a snapshot's note.
pub const SNAPSHOT_TAG: &str = "rds-csi-snapshot-of";

/// The NVMe/TCP connect tunables of a volume (`nvme connect` options the node uses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tunables {
    /// `--ctrl-loss-tmo` seconds (-1: forever).
    pub ctrl_loss_tmo: Option<i32>,
    /// `--reconnect-delay` seconds.
    pub reconnect_delay: Option<u32>,
    /// `--keep-alive-tmo` seconds.
    pub keep_alive_tmo: Option<u32>,
}

impl Tunables {
    /// `self` with every value `newer` sets replacing ours.
    pub fn updated(self, newer: Tunables) -> Tunables {
        Tunables {
            ctrl_loss_tmo: newer.ctrl_loss_tmo.or(self.ctrl_loss_tmo),
            reconnect_delay: newer.reconnect_delay.or(self.reconnect_delay),
            keep_alive_tmo: newer.keep_alive_tmo.or(self.keep_alive_tmo),
        }
    }

    /// The values set, as `volume_context`/`publish_context` entries.
    pub fn context(&self) -> Vec<(&'static str, String)> {
        use super::context::{CTRL_LOSS_TMO, KEEP_ALIVE_TMO, RECONNECT_DELAY};
        let mut out = Vec::new();
        if let Some(v) = self.ctrl_loss_tmo {
            out.push((CTRL_LOSS_TMO, v.to_string()));
        }
        if let Some(v) = self.reconnect_delay {
            out.push((RECONNECT_DELAY, v.to_string()));
        }
        if let Some(v) = self.keep_alive_tmo {
            out.push((KEEP_ALIVE_TMO, v.to_string()));
        }
        out
    }
}

/// What a volume's note records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeNote {
    /// `ext4`, `xfs` or `block`.
    pub layout: String,
    /// The CSI name, when the volume id is derived from it.
    pub name: Option<String>,
    /// The StorageClass' NVMe/TCP address, when it overrode the controller's.
    pub nvme_address: Option<String>,
    /// The connect tunables the volume was created with (part of its `volume_context`).
    pub tunables: Tunables,
    /// The connect tunables ControllerModifyVolume set since.
    pub modified: Tunables,
    /// `migrationTimeoutSeconds` (clamped), when the StorageClass gave one.
    pub migration_timeout_secs: Option<u64>,
}

impl VolumeNote {
    /// The connect tunables in force: the creation values, with the modified ones over them.
    pub fn in_force(&self) -> Tunables {
        self.tunables.updated(self.modified)
    }
}

/// What a snapshot's note records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotNote {
    /// The volume it is a copy of.
    pub source: String,
    /// The CSI name, when the snapshot id is derived from it.
    pub name: Option<String>,
}

fn text(v: &str) -> String {
    B64.encode(v.as_bytes())
}

fn untext(v: &str) -> Option<String> {
    String::from_utf8(B64.decode(v).ok()?).ok()
}

/// The `:k.v` fields after the tag and first value, or `None` when one is malformed.
fn fields(rest: &[&str]) -> Option<Vec<(String, String)>> {
    rest.iter()
        .map(|f| {
            let (k, v) = f.split_once('.')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

impl VolumeNote {
    /// The comment text.
    pub fn render(&self) -> String {
        let mut out = format!("{VOLUME_TAG}:{}", self.layout);
        if let Some(n) = &self.name {
            out.push_str(&format!(":n.{}", text(n)));
        }
        if let Some(a) = &self.nvme_address {
            out.push_str(&format!(":a.{}", text(a)));
        }
        for (prefix, t) in [("", &self.tunables), ("m", &self.modified)] {
            if let Some(v) = t.ctrl_loss_tmo {
                out.push_str(&format!(":{prefix}clt.{v}"));
            }
            if let Some(v) = t.reconnect_delay {
                out.push_str(&format!(":{prefix}rd.{v}"));
            }
            if let Some(v) = t.keep_alive_tmo {
                out.push_str(&format!(":{prefix}kat.{v}"));
            }
        }
        if let Some(v) = self.migration_timeout_secs {
            out.push_str(&format!(":mto.{v}"));
        }
        out
    }

    /// Reads a comment; `None` when it is not a readable volume note.
    pub fn parse(comment: &str) -> Option<Self> {
        let parts: Vec<&str> = comment.split(':').collect();
        let (tag, layout, rest) = match parts.as_slice() {
            [tag, layout, rest @ ..] => (*tag, *layout, rest),
            _ => return None,
        };
        if tag != VOLUME_TAG || layout.is_empty() {
            return None;
        }
        let mut note = VolumeNote {
            layout: layout.to_string(),
            ..Default::default()
        };
        for (k, v) in fields(rest)? {
            match k.as_str() {
                "n" => note.name = Some(untext(&v)?),
                "a" => note.nvme_address = Some(untext(&v)?),
                "clt" => note.tunables.ctrl_loss_tmo = Some(v.parse().ok()?),
                "rd" => note.tunables.reconnect_delay = Some(v.parse().ok()?),
                "kat" => note.tunables.keep_alive_tmo = Some(v.parse().ok()?),
                "mclt" => note.modified.ctrl_loss_tmo = Some(v.parse().ok()?),
                "mrd" => note.modified.reconnect_delay = Some(v.parse().ok()?),
                "mkat" => note.modified.keep_alive_tmo = Some(v.parse().ok()?),
                "mto" => note.migration_timeout_secs = Some(v.parse().ok()?),
                _ => {}
            }
        }
        Some(note)
    }
}

impl SnapshotNote {
    /// The comment text.
    pub fn render(&self) -> String {
        let mut out = format!("{SNAPSHOT_TAG}:{}", self.source);
        if let Some(n) = &self.name {
            out.push_str(&format!(":n.{}", text(n)));
        }
        out
    }

    /// Reads a comment; `None` when it is not a readable snapshot note.
    pub fn parse(comment: &str) -> Option<Self> {
        let parts: Vec<&str> = comment.split(':').collect();
        let (tag, source, rest) = match parts.as_slice() {
            [tag, source, rest @ ..] => (*tag, *source, rest),
            _ => return None,
        };
        if tag != SNAPSHOT_TAG || source.is_empty() {
            return None;
        }
        let mut note = SnapshotNote {
            source: source.to_string(),
            name: None,
        };
        for (k, v) in fields(rest)? {
            if k == "n" {
                note.name = Some(untext(&v)?);
            }
        }
        Some(note)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_comment_alphabet(s: &str) -> bool {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
    }

    #[test]
    fn notes_round_trip_in_the_comment_alphabet_whatever_the_name() {
        let hostile = "pvc \"; /system reset [find] $x\\ \u{e4}\u{1F4BE}+/=".repeat(2);
        let v = VolumeNote {
            layout: "xfs".into(),
            name: Some(hostile.clone()),
            nvme_address: Some("[fd00::1]".into()),
            tunables: Tunables {
                ctrl_loss_tmo: Some(-1),
                reconnect_delay: Some(5),
                keep_alive_tmo: Some(30),
            },
            modified: Tunables {
                ctrl_loss_tmo: Some(600),
                ..Default::default()
            },
            migration_timeout_secs: Some(300),
        };
        assert_eq!(v.in_force().ctrl_loss_tmo, Some(600));
        assert_eq!(v.in_force().keep_alive_tmo, Some(30));
        let text = v.render();
        assert!(in_comment_alphabet(&text), "{text}");
        assert_eq!(VolumeNote::parse(&text), Some(v));
        let s = SnapshotNote {
            source: "pvc-1".into(),
            name: Some(hostile),
        };
        let text = s.render();
        assert!(in_comment_alphabet(&text), "{text}");
        assert_eq!(SnapshotNote::parse(&text), Some(s));
    }

    #[test]
    fn notes_of_earlier_versions_read_with_the_new_fields_absent() {
        assert_eq!(
            VolumeNote::parse("rds-csi-volume:ext4"),
            Some(VolumeNote {
                layout: "ext4".into(),
                ..Default::default()
            })
        );
        assert_eq!(
            SnapshotNote::parse("rds-csi-snapshot-of:pvc-1"),
            Some(SnapshotNote {
                source: "pvc-1".into(),
                name: None
            })
        );
        // Unknown fields are skipped; broken ones make the note unreadable.
        assert!(VolumeNote::parse("rds-csi-volume:ext4:future.x").is_some());
        for bad in [
            "rds-csi-volume",
            "rds-csi-volume:",
            "rds-csi-volume:ext4:n.!!",
            "rds-csi-volume:ext4:clt.x",
            "rds-csi-volume:block:mto.-1",
            "rds-csi-volume:ext4:nofield",
            "rds-csi-snapshot-of:pvc-1",
            "something else",
        ] {
            assert_eq!(VolumeNote::parse(bad), None, "{bad}");
        }
        assert_eq!(SnapshotNote::parse("rds-csi-volume:ext4"), None);
    }

    #[test]
    fn tunables_update_only_what_is_set() {
        let old = Tunables {
            ctrl_loss_tmo: Some(-1),
            reconnect_delay: Some(5),
            keep_alive_tmo: None,
        };
        let new = old.updated(Tunables {
            reconnect_delay: Some(10),
            keep_alive_tmo: Some(30),
            ..Default::default()
        });
        assert_eq!(
            new,
            Tunables {
                ctrl_loss_tmo: Some(-1),
                reconnect_delay: Some(10),
                keep_alive_tmo: Some(30)
            }
        );
        assert_eq!(new.context().len(), 3);
    }
}
