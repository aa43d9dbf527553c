//! The driver's vocabulary, the lowest layer: every other module may import it, it
//! imports nothing of the crate.
//!
//! - identifiers ([`VolumeId`], [`SnapshotId`], [`NodeId`], [`Nqn`]) validated once at the
//!   edge and trusted everywhere after; a [`VolumeId`] doubles as the RDS disk slot and as
//!   the suffix of the NVMe NQN, so its alphabet is deliberately narrow: nothing that
//!   RouterOS, a file path or a shell could read as syntax;
//! - [`AccessMode`], the CSI access modes reduced to what fencing needs;
//! - [`kinds`]: what a plugin instance is (its [`Mode`], its initiator, its endpoint);
//! - [`defaults`]: the names, prefixes and ports both sides of the driver agree on;
//! - [`context`]: the keys of the maps the controller hands to the node;
//! - [`note`]: what the driver records with each disk on the RDS (the disk comment).

pub mod context;
pub mod defaults;
pub mod kinds;
pub mod note;

use std::fmt;

pub use kinds::{Endpoint, InitiatorKind, Mode};

/// A malformed identifier; the message names the field kind and what is wrong with it.
/// Converted to INVALID_ARGUMENT at the CSI boundary (`From<InvalidId> for crate::Error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub String);

/// Longest volume id we accept: the CSI spec asks plugins to support names of 128 bytes.
pub const MAX_VOLUME_ID_LEN: usize = 128;
/// Longest node id we accept (a Kubernetes node name is a DNS subdomain, ≤ 253).
pub const MAX_NODE_ID_LEN: usize = 253;

fn check_token(kind: &str, value: &str, max: usize, extra: &[char]) -> Result<(), InvalidId> {
    if value.is_empty() {
        return Err(InvalidId(format!("{kind} must not be empty")));
    }
    if value.len() > max {
        return Err(InvalidId(format!(
            "{kind} is {} characters long; at most {max} are allowed",
            value.len()
        )));
    }
    let first = value.as_bytes()[0];
    if !first.is_ascii_alphanumeric() {
        return Err(InvalidId(format!(
            "{kind} {value:?} must start with a letter or digit"
        )));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || extra.contains(c)))
    {
        return Err(InvalidId(format!(
            "{kind} {value:?} contains {bad:?}; only letters, digits, '-' and {extra:?} are allowed"
        )));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr, $extra:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates `value` and wraps it; an [`InvalidId`] naming the problem otherwise.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidId> {
                let value = value.into();
                check_token($kind, &value, $max, $extra)?;
                Ok(Self(value))
            }
            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(value: String) -> Result<Self, InvalidId> {
                Self::new(value)
            }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A volume id: also the RDS disk slot. Letters, digits, `-`, `_` and `.`; ≤ 128 chars.
    VolumeId, "volume id", MAX_VOLUME_ID_LEN, &['_', '.']
);
id_type!(
    /// A snapshot id: an RDS disk slot of a non-exported copy. Same alphabet as [`VolumeId`].
    SnapshotId, "snapshot id", MAX_VOLUME_ID_LEN, &['_', '.']
);
id_type!(
    /// A Kubernetes node name (DNS subdomain: letters, digits, `-`, `.`).
    NodeId, "node id", MAX_NODE_ID_LEN, &['.']
);
id_type!(
    /// An NVMe Qualified Name, e.g. `nqn.2000-02.com.mikrotik:pvc-1`.
    Nqn, "NQN", 223, &['.', ':', '_']
);

/// How a volume may be attached, reduced from the CSI access modes to what fencing needs.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum AccessMode {
    /// At most one node (SINGLE_NODE_* modes): a second node is fenced off.
    SingleNode,
    /// Many nodes, read only.
    MultiNodeReadOnly,
    /// Many nodes, read-write (block only).
    MultiNodeMultiWriter,
}

impl AccessMode {
    /// Whether a second node must be refused while one holds the volume.
    pub fn is_single_node(self) -> bool {
        matches!(self, AccessMode::SingleNode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_id_accepts_provisioner_names_and_128_chars() {
        assert!(VolumeId::new("pvc-3f1c2a9e-8d7b-4c1e-9a0f-1b2c3d4e5f60").is_ok());
        assert!(VolumeId::new("a".repeat(128)).is_ok());
        assert!(VolumeId::new("a".repeat(129)).is_err());
    }

    #[test]
    fn volume_id_rejects_hostile_text() {
        for bad in [
            "",
            "pvc\"; /system reset",
            "a b",
            "../etc",
            "-x",
            "[find]",
            "$x",
            "a\nb",
            "ä",
        ] {
            let err = VolumeId::new(bad).unwrap_err();
            assert!(err.0.starts_with("volume id"), "{bad:?} -> {err:?}");
        }
    }

    #[test]
    fn ids_round_trip_through_serde_with_validation() {
        let id: NodeId = serde_json::from_str("\"worker-1.example\"").unwrap();
        assert_eq!(id.as_str(), "worker-1.example");
        assert!(serde_json::from_str::<NodeId>("\"bad node\"").is_err());
    }
}
