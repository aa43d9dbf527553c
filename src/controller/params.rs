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
use crate::types::note::Tunables;

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
    /// The NVMe/TCP connect tunables (the mutable parameters).
    pub tunables: Tunables,
    /// `migrationTimeoutSeconds`, as the controller will use it (clamped), when given.
    pub migration_timeout: Option<std::time::Duration>,
    /// What was given but is not used as given (ignored keys, clamped or defaulted
    /// values): one line each, for a warning.
    pub warnings: Vec<String>,
}

/// The parameters that may change on a live volume (CreateVolume's and
/// ControllerModifyVolume's `mutable_parameters`): the NVMe/TCP connect tunables. They are
/// options of the node's `nvme connect`, recorded on the RDS and handed to the node in the
/// publish context, so a change applies the next time the volume is attached (published
/// and staged); a connection open now keeps its settings. Everything else is fixed at
/// creation: the filesystem is on the disk, the export's port and the address nodes reach
/// are part of the volume's identity, the RDS and its directory are the controller's.
pub const MUTABLE: &[&str] = &[keys::CTRL_LOSS_TMO, keys::KEEP_ALIVE_TMO, keys::RECONNECT_DELAY];

fn parse_int<T: std::str::FromStr>(key: &str, value: &str, what: &str) -> Result<T> {
    value
        .trim()
        .parse::<T>()
        .map_err(|_| Error::InvalidArgument(format!("parameters.{key}: {value:?} is not {what}")))
}

/// Validates an address-like value: a host name or IP, no spaces or syntax, and no leading
/// `-` (no host name starts with one; nvme-cli would read it as an option, so the node
/// refuses it: found checking, with the `csi_request` fuzz target, that every volume
/// context the controller answers is one the node accepts).
fn parse_host(key: &str, value: &str) -> Result<String> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && !value.starts_with('-')
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
            k if MUTABLE.contains(&k) => tunable(&mut out.tunables, "parameters", key, value)?,
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

/// Reads one connect tunable into `t` (`field` names the request map in messages).
fn tunable(t: &mut Tunables, field: &str, key: &str, value: &str) -> Result<()> {
    let int = |what: &str| -> Result<i64> {
        value.trim().parse::<i64>().map_err(|_| {
            Error::InvalidArgument(format!("{field}.{key}: {value:?} is not {what}"))
        })
    };
    match key {
        keys::CTRL_LOSS_TMO => {
            let v = int("a number of seconds (-1: forever)")?;
            let v = i32::try_from(v).ok().filter(|v| *v >= -1).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{field}.{key}: {v} must be -1 (forever) or ≥ 0"
                ))
            })?;
            t.ctrl_loss_tmo = Some(v);
        }
        keys::RECONNECT_DELAY => {
            let v = int("a positive number of seconds")?;
            let v = u32::try_from(v).ok().filter(|v| *v > 0).ok_or_else(|| {
                Error::InvalidArgument(format!("{field}.{key}: must be at least 1 second"))
            })?;
            t.reconnect_delay = Some(v);
        }
        _ => {
            // 0: the kernel's default (as the earlier driver's StorageClasses may say).
            let v = int("a number of seconds (0: the kernel's default)")?;
            let v = u32::try_from(v).map_err(|_| {
                Error::InvalidArgument(format!(
                    "{field}.{key}: {v} must be ≥ 0 (0: the kernel's default)"
                ))
            })?;
            t.keep_alive_tmo = Some(v);
        }
    }
    Ok(())
}

/// Parses `mutable_parameters` (CreateVolume, ControllerModifyVolume): only the
/// [`MUTABLE`] keys; any other is INVALID_ARGUMENT naming it — the spec's "Indicates that
/// the CO has specified mutable parameters not supported by the volume."
pub fn parse_mutable(params: &HashMap<String, String>) -> Result<Tunables> {
    let mut sorted: Vec<(&String, &String)> = params.iter().collect();
    sorted.sort();
    let mut out = Tunables::default();
    for (key, value) in sorted {
        if !MUTABLE.contains(&key.as_str()) {
            let fixed = if keys::ALL.contains(&key.as_str()) {
                " is fixed when the volume is created"
            } else {
                " is not a parameter of this driver"
            };
            // The key escaped: it is the CO's text (found by fuzzing: a key with NULs reached
            // the message as it was).
            return Err(Error::InvalidArgument(format!(
                "mutable_parameters.{}{fixed}; the parameters that can change on a live \
                 volume are {MUTABLE:?} (applied the next time the volume is attached)",
                key.escape_debug()
            )));
        }
        tunable(&mut out, "mutable_parameters", key, value)?;
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
        assert_eq!(p.tunables.ctrl_loss_tmo, Some(-1));
        assert_eq!(p.tunables.keep_alive_tmo, Some(30));
    }

    #[test]
    fn only_the_connect_tunables_are_mutable() {
        let t = parse_mutable(&map(&[("ctrlLossTmo", "-1"), ("keepAliveTmo", "15")])).unwrap();
        assert_eq!(
            t,
            Tunables {
                ctrl_loss_tmo: Some(-1),
                reconnect_delay: None,
                keep_alive_tmo: Some(15)
            }
        );
        assert_eq!(parse_mutable(&HashMap::new()).unwrap(), Tunables::default());
        for (k, v, needle) in [
            ("fsType", "xfs", "fixed when the volume is created"),
            ("nvmePort", "4421", "fixed when the volume is created"),
            ("iops", "100", "not a parameter of this driver"),
            ("reconnectDelay", "0", "at least 1 second"),
            ("ctrlLossTmo", "-5", "must be -1"),
            ("keepAliveTmo", "soon", "is not a number of seconds"),
        ] {
            let err = parse_mutable(&map(&[(k, v)])).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains(needle) && m.contains(k)),
                "{k}={v}: {err}"
            );
        }
        // Found by fuzzing (`csi_request`): an unknown key is escaped, never echoed raw.
        let err = parse_mutable(&map(&[("nvmeA\0\0\nx", "1")])).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains(r"mutable_parameters.nvmeA\0\0\nx") && !m.contains('\0') && !m.contains('\n')),
            "{err}"
        );
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
        assert_eq!(p.tunables.keep_alive_tmo, Some(0), "0: the kernel's default");
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
            ("nvmeAddress", "-0.0.0.5", "parameters.nvmeAddress"),
            ("rdsAddress", "-x", "parameters.rdsAddress"),
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
