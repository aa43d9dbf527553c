//! From a CSI name to the id (= RDS disk slot) of its volume or snapshot.
//!
//! The spec leaves names to the CO: "Any Unicode string that conforms to the length limit
//! is allowed except those containing the following banned characters: U+0000-U+0008,
//! U+000B, U+000C, U+000E-U+001F, U+007F-U+009F." A slot, a file name and an NQN suffix
//! take far less (see [`crate::types::VolumeId`]). So:
//!
//! - a name that is a safe slot is its own id (`pvc-<uuid>` stays `pvc-<uuid>`, as the
//!   Kubernetes provisioner names volumes and as the earlier driver's disks are named);
//! - any other name gets a deterministic id derived from it — `vol-` or `snap-` and 32 hex
//!   digits of its SHA-256 — and the name itself is recorded in the disk's note
//!   ([`crate::types::note`]), so a repeated call finds its disk (also after a restart)
//!   and a different name whose id collides is told apart from it (ALREADY_EXISTS, never
//!   its volume).
//!
//! The disk's name, read back, is the recorded name if there is one, else its slot.

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::types::{SnapshotId, VolumeId};

/// Longest name: "Unless otherwise specified, fields SHALL NOT exceed the limits documented
/// here", 128 bytes for a string.
pub const MAX_NAME_BYTES: usize = 128;

/// Hex digits of the digest kept in a derived id (128 bits).
const DIGEST_HEX: usize = 32;

/// Checks a CSI name (`field` for messages).
fn check(name: &str, field: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{field} is {} bytes long; CSI names are at most {MAX_NAME_BYTES} bytes",
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| {
        matches!(*c as u32, 0x00..=0x08 | 0x0B | 0x0C | 0x0E..=0x1F | 0x7F..=0x9F)
    }) {
        return Err(Error::InvalidArgument(format!(
            "{field} contains the control character U+{:04X}, which CSI names may not hold",
            c as u32
        )));
    }
    Ok(())
}

fn derived(prefix: &str, kind: &str, name: &str) -> String {
    let digest = Sha256::new()
        .chain_update(kind.as_bytes())
        .chain_update([0u8])
        .chain_update(name.as_bytes())
        .finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{}", &hex[..DIGEST_HEX])
}

/// The id of the volume named `name`, and the name to record when the id is derived.
pub fn volume_id_for(name: &str, field: &str) -> Result<(VolumeId, Option<String>)> {
    check(name, field)?;
    if let Ok(id) = VolumeId::new(name) {
        return Ok((id, None));
    }
    let id = VolumeId::new(derived("vol-", "volume", name))
        .map_err(|e| Error::Internal(format!("derived volume id: {e}")))?;
    Ok((id, Some(name.to_string())))
}

/// The id of the snapshot named `name`, and the name to record when the id is derived.
pub fn snapshot_id_for(name: &str, field: &str) -> Result<(SnapshotId, Option<String>)> {
    check(name, field)?;
    if let Ok(id) = SnapshotId::new(name) {
        return Ok((id, None));
    }
    let id = SnapshotId::new(derived("snap-", "snapshot", name))
        .map_err(|e| Error::Internal(format!("derived snapshot id: {e}")))?;
    Ok((id, Some(name.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_slots_are_their_own_ids_and_other_names_derive_stable_ones() {
        let uuid = "pvc-3f1c2a9e-8d7b-4c1e-9a0f-1b2c3d4e5f60";
        assert_eq!(volume_id_for(uuid, "name").unwrap(), (VolumeId::new(uuid).unwrap(), None));
        let longest = "x".repeat(MAX_NAME_BYTES - 1) + "+";
        for name in ["a+b", "a b", "ä", &longest, "-leading", "[find]"] {
            let (id, recorded) = volume_id_for(name, "name").unwrap();
            assert_eq!(recorded.as_deref(), Some(name));
            assert!(id.as_str().starts_with("vol-") && id.as_str().len() == 4 + 32, "{id}");
            assert_eq!(volume_id_for(name, "name").unwrap().0, id, "deterministic");
            let (snap, _) = snapshot_id_for(name, "name").unwrap();
            assert!(snap.as_str().starts_with("snap-"), "{snap}");
        }
        assert_ne!(
            volume_id_for("a+b", "name").unwrap().0,
            volume_id_for("a+c", "name").unwrap().0
        );
    }

    #[test]
    fn names_the_spec_rules_out_are_invalid_arguments() {
        for (name, needle) in [
            (String::new(), "name is required"),
            ("x".repeat(129), "at most 128 bytes"),
            ("a\u{0}b".into(), "U+0000"),
            ("a\u{1b}b".into(), "U+001B"),
            ("a\u{85}b".into(), "U+0085"),
        ] {
            let err = volume_id_for(&name, "name").unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains(needle)),
                "{name:?}: {err}"
            );
        }
        // Tab, newline and carriage return are common whitespace: allowed.
        assert!(volume_id_for("a\tb\nc\r", "name").is_ok());
    }
}
