//! StorageClass parameters of CreateVolume / GetCapacity, parsed once into [`VolumeParams`].
//!
//! Unknown keys are refused (naming the key) so that a typo in a StorageClass is found at
//! the first provisioning, not after data was written with the wrong settings. Keys the
//! Kubernetes external-provisioner adds itself (`csi.storage.k8s.io/...`) are accepted.
//!
//! Drop-in for the earlier Go driver (same driver name, same hardware): every key its
//! StorageClasses may carry is accepted. `migrationTimeoutSeconds` is read as it read it
//! (clamped to 30–3600 s, a value that is not a positive number means the default, each
//! with a warning) and carried in the `volume_context`; `keepAliveTmo=0` means the
//! kernel's default (the node then passes no `--keep-alive-tmo`); `sshPort` and
//! `nqnPrefix`, which it declared but never used, are accepted with a warning
//! ([`keys::IGNORED`]): the controller's `--rds-port` and `--nvme-nqn-prefix` are what count.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// Parameter names accepted in a StorageClass.
pub mod keys {
    /// RDS management address this class is for (must match the controller's RDS).
    pub const RDS_ADDRESS: &str = "rdsAddress";
    /// NVMe/TCP address nodes connect to.
    pub const NVME_ADDRESS: &str = "nvmeAddress";
    /// NVMe/TCP port of the export.
    pub const NVME_PORT: &str = "nvmePort";
    /// Directory of the backing files on the RDS (must match the controller's).
    pub const VOLUME_PATH: &str = "volumePath";
    /// Filesystem of mount volumes.
    pub const FS_TYPE: &str = "fsType";
    /// nvme connect `--ctrl-loss-tmo`.
    pub const CTRL_LOSS_TMO: &str = "ctrlLossTmo";
    /// nvme connect `--reconnect-delay`.
    pub const RECONNECT_DELAY: &str = "reconnectDelay";
    /// nvme connect `--keep-alive-tmo`.
    pub const KEEP_ALIVE_TMO: &str = "keepAliveTmo";
    /// How long a live migration of a multi-node block volume may run (seconds).
    pub const MIGRATION_TIMEOUT: &str = crate::types::context::MIGRATION_TIMEOUT;
    /// The earlier driver's SSH port key: declared there, never used; accepted, ignored.
    pub const SSH_PORT: &str = "sshPort";
    /// The earlier driver's NQN prefix key: declared there, never used; accepted, ignored.
    pub const NQN_PREFIX: &str = "nqnPrefix";
    /// Prefix of the keys Kubernetes sidecars add (PVC name/namespace, PV name).
    pub const KUBERNETES_PREFIX: &str = "csi.storage.k8s.io/";

    /// Every key we accept, sorted.
    pub const ALL: &[&str] = &[
        CTRL_LOSS_TMO,
        FS_TYPE,
        KEEP_ALIVE_TMO,
        MIGRATION_TIMEOUT,
        NQN_PREFIX,
        NVME_ADDRESS,
        NVME_PORT,
        RDS_ADDRESS,
        RECONNECT_DELAY,
        SSH_PORT,
        VOLUME_PATH,
    ];

    /// Keys accepted for the earlier driver's StorageClasses but without effect here.
    pub const IGNORED: &[&str] = &[NQN_PREFIX, SSH_PORT];
}

/// Filesystems the node can create and grow.
pub const SUPPORTED_FS: &[&str] = &["ext4", "xfs"];

/// What the controller must agree with for a StorageClass to be valid here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Expected {
    /// The RDS the controller manages (`--rds-address`), when known.
    pub rds_address: Option<String>,
    /// Directory of the backing files the controller uses.
    pub volume_path: Option<String>,
}

/// Parsed parameters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeParams {
    /// NVMe/TCP address override.
    pub nvme_address: Option<String>,
    /// NVMe/TCP port override.
    pub nvme_port: Option<u16>,
    /// Filesystem (validated).
    pub fs_type: Option<String>,
    /// Controller loss timeout (-1 forever).
    pub ctrl_loss_tmo: Option<i32>,
    /// Reconnect delay (seconds, ≥ 1).
    pub reconnect_delay: Option<u32>,
    /// Keep-alive timeout (seconds; 0: the kernel's default).
    pub keep_alive_tmo: Option<u32>,
    /// `migrationTimeoutSeconds`, as the controller will use it (clamped), when given.
    pub migration_timeout: Option<std::time::Duration>,
    /// What was given but is not used as given (ignored keys, clamped or defaulted
    /// values): one line each, for a warning.
    pub warnings: Vec<String>,
}

fn parse_int<T: std::str::FromStr>(key: &str, value: &str, what: &str) -> Result<T> {
    value
        .trim()
        .parse::<T>()
        .map_err(|_| Error::InvalidArgument(format!("parameters.{key}: {value:?} is not {what}")))
}

/// Validates an address-like value: a host name or IP, no spaces or syntax.
fn parse_host(key: &str, value: &str) -> Result<String> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "parameters.{key}: {value:?} is not a host name or IP address"
        )));
    }
    Ok(value.to_string())
}

/// Parses and validates `params` (the map's order does not matter: keys are checked sorted).
pub fn parse(params: &HashMap<String, String>, expected: &Expected) -> Result<VolumeParams> {
    let mut sorted: Vec<(&String, &String)> = params.iter().collect();
    sorted.sort();
    let mut out = VolumeParams::default();
    for (key, value) in sorted {
        match key.as_str() {
            keys::NVME_ADDRESS => out.nvme_address = Some(parse_host(key, value)?),
            keys::NVME_PORT => {
                let port: u16 = parse_int(key, value, "a TCP port (1-65535)")?;
                if port == 0 {
                    return Err(Error::InvalidArgument(format!(
                        "parameters.{key}: port 0 is not a TCP port (1-65535)"
                    )));
                }
                out.nvme_port = Some(port);
            }
            keys::FS_TYPE => {
                if !SUPPORTED_FS.contains(&value.as_str()) {
                    return Err(Error::InvalidArgument(format!(
                        "parameters.{key}: {value:?} is not supported; use one of {SUPPORTED_FS:?}"
                    )));
                }
                out.fs_type = Some(value.clone());
            }
            keys::CTRL_LOSS_TMO => {
                let v: i32 = parse_int(key, value, "a number of seconds (-1: forever)")?;
                if v < -1 {
                    return Err(Error::InvalidArgument(format!(
                        "parameters.{key}: {v} must be -1 (forever) or ≥ 0"
                    )));
                }
                out.ctrl_loss_tmo = Some(v);
            }
            keys::RECONNECT_DELAY => {
                let v: u32 = parse_int(key, value, "a positive number of seconds")?;
                if v == 0 {
                    return Err(Error::InvalidArgument(format!(
                        "parameters.{key}: must be at least 1 second"
                    )));
                }
                out.reconnect_delay = Some(v);
            }
            keys::KEEP_ALIVE_TMO => {
                out.keep_alive_tmo = Some(parse_int(
                    key,
                    value,
                    "a number of seconds (0: the kernel's default)",
                )?);
            }
            keys::MIGRATION_TIMEOUT => {
                let used = match crate::attachment::migration::timeout_from(Some(value)) {
                    Ok(t) => t,
                    Err((t, why)) => {
                        out.warnings.push(format!("parameters.{key}: {why}"));
                        t
                    }
                };
                out.migration_timeout = Some(used);
            }
            k if keys::IGNORED.contains(&k) => out.warnings.push(format!(
                "parameters.{key}={value:?} is accepted for StorageClasses of the earlier \
                 driver but has no effect; the controller's flags decide"
            )),
            keys::RDS_ADDRESS => {
                let v = parse_host(key, value)?;
                if let Some(mine) = &expected.rds_address
                    && *mine != v
                {
                    return Err(Error::InvalidArgument(format!(
                        "parameters.{key}: {v:?} is not the RDS this controller manages ({mine:?}); \
                         run one controller per RDS"
                    )));
                }
            }
            keys::VOLUME_PATH => {
                if let Some(mine) = &expected.volume_path
                    && mine.trim_matches('/') != value.trim_matches('/')
                {
                    return Err(Error::InvalidArgument(format!(
                        "parameters.{key}: {value:?} differs from the controller's volume path \
                         {mine:?}; one controller serves one path"
                    )));
                }
            }
            k if k.starts_with(keys::KUBERNETES_PREFIX) => {}
            other => {
                return Err(Error::InvalidArgument(format!(
                    "parameters: unknown key {other:?}; supported keys are {:?}",
                    keys::ALL
                )));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn field_parameters_parse() {
        let p = parse(
            &map(&[
                ("nvmeAddress", "10.0.0.5"),
                ("nvmePort", "4421"),
                ("fsType", "xfs"),
                ("ctrlLossTmo", "-1"),
                ("reconnectDelay", "5"),
                ("keepAliveTmo", "30"),
                ("volumePath", "/storage-pool/rds-csi"),
                ("csi.storage.k8s.io/pvc/name", "data"),
            ]),
            &Expected {
                rds_address: None,
                volume_path: Some("storage-pool/rds-csi".into()),
            },
        )
        .unwrap();
        assert_eq!(p.nvme_port, Some(4421));
        assert_eq!(p.fs_type.as_deref(), Some("xfs"));
        assert_eq!(p.ctrl_loss_tmo, Some(-1));
        assert_eq!(p.keep_alive_tmo, Some(30));
    }

    #[test]
    fn the_earlier_drivers_storage_classes_are_accepted() {
        use std::time::Duration;
        // As the earlier driver's chart wrote them (its defaults included).
        let p = parse(
            &map(&[
                ("rdsAddress", "10.0.0.1"),
                ("nvmeAddress", "10.0.0.5"),
                ("nvmePort", "4420"),
                ("volumePath", "/storage-pool/metal-csi"),
                ("fsType", "ext4"),
                ("ctrlLossTmo", "-1"),
                ("reconnectDelay", "5"),
                ("keepAliveTmo", "0"),
                ("migrationTimeoutSeconds", "600"),
                ("sshPort", "22"),
                ("nqnPrefix", "nqn.2000-02.com.mikrotik"),
            ]),
            &Expected {
                rds_address: Some("10.0.0.1".into()),
                volume_path: Some("storage-pool/metal-csi".into()),
            },
        )
        .unwrap();
        assert_eq!(p.keep_alive_tmo, Some(0), "0: the kernel's default");
        assert_eq!(p.migration_timeout, Some(Duration::from_secs(600)));
        assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
        assert!(p.warnings.iter().any(|w| w.contains("sshPort")));
        assert!(p.warnings.iter().any(|w| w.contains("nqnPrefix")));
        // Out of range or not a number: used as the earlier driver used it, and said so.
        for (v, used) in [("5", 30), ("86400", 3600), ("abc", 300), ("0", 300)] {
            let p = parse(&map(&[("migrationTimeoutSeconds", v)]), &Expected::default())
                .unwrap();
            assert_eq!(p.migration_timeout, Some(Duration::from_secs(used)), "{v}");
            assert_eq!(p.warnings.len(), 1, "{v}: {:?}", p.warnings);
        }
        // A typo stays refused.
        let err = parse(&map(&[("migrationTimeout", "300")]), &Expected::default()).unwrap_err();
        assert!(err.to_string().contains("unknown key \"migrationTimeout\""), "{err}");
    }

    #[test]
    fn bad_parameters_are_named() {
        for (k, v, needle) in [
            ("fstype", "ext4", "unknown key \"fstype\""),
            ("fsType", "btrfs", "parameters.fsType"),
            ("nvmePort", "0", "parameters.nvmePort"),
            ("nvmePort", "99999", "parameters.nvmePort"),
            ("ctrlLossTmo", "-2", "parameters.ctrlLossTmo"),
            ("reconnectDelay", "0", "parameters.reconnectDelay"),
            ("keepAliveTmo", "-1", "parameters.keepAliveTmo"),
            (
                "nvmeAddress",
                "1.2.3.4; /system reset",
                "parameters.nvmeAddress",
            ),
            (
                "rdsAddress",
                "10.9.9.9",
                "not the RDS this controller manages",
            ),
            (
                "volumePath",
                "other",
                "differs from the controller's volume path",
            ),
        ] {
            let err = parse(
                &map(&[(k, v)]),
                &Expected {
                    rds_address: Some("10.0.0.1".into()),
                    volume_path: Some("pool/csi".into()),
                },
            )
            .unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains(needle)),
                "{k}={v}: {err}"
            );
        }
    }
}
