//! The production [`Initiator`]: the kernel NVMe/TCP host driven by `nvme-cli`, with devices
//! discovered through sysfs.
//!
//! Invariants:
//! - A namespace's block device is found from the kernel's own records:
//!   `<sysfs>/class/nvme-subsystem/*/subsysnqn` names the subsystem, and its namespace
//!   (`nvmeXnY`, directly under the subsystem with native multipath, or under one of its
//!   controllers without) names the device. Never a guessed `/dev/nvmeXnY`.
//! - Only NQNs that start with this driver's prefix are connected, disconnected or listed;
//!   every other NVMe-oF disk on the host is invisible to this adapter.
//! - Connect observes first: a subsystem that is already connected is success. After
//!   `nvme connect` the device is awaited with a bounded wait (tokio time); if it never
//!   appears the connection is torn down again, so no half-attached state remains.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::node::exec::{CommandRunner, ExecError, command_line};
use crate::ports::initiator::{Connection, Initiator, InitiatorError, NvmeTarget};

/// `EALREADY` on Linux: nvme-cli's exit status when the controller is already connected.
const EALREADY: i32 = 114;

/// Settings of the nvme-cli initiator.
#[derive(Debug, Clone)]
pub struct NvmeCliConfig {
    /// This driver's NQN prefix: only subsystems whose NQN starts with it are touched.
    pub nqn_prefix: String,
    /// Host NQN from the command line; when unset it is read from `hostnqn_file`.
    pub host_nqn: Option<String>,
    /// Where the host NQN is kept (`/etc/nvme/hostnqn`).
    pub hostnqn_file: PathBuf,
    /// sysfs mount point (`/sys`; a fixture tree in tests).
    pub sysfs_root: PathBuf,
    /// Device directory (`/dev`; a fixture tree in tests).
    pub dev_root: PathBuf,
    /// How long to wait for the namespace device after connecting.
    pub device_wait: Duration,
    /// Interval between looks while waiting.
    pub poll_interval: Duration,
}

impl NvmeCliConfig {
    /// Production paths with `nqn_prefix` and an optional host NQN override.
    pub fn new(nqn_prefix: String, host_nqn: Option<String>) -> Self {
        Self {
            nqn_prefix,
            host_nqn,
            hostnqn_file: PathBuf::from("/etc/nvme/hostnqn"),
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            device_wait: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
        }
    }
}

/// `nvme-cli` + sysfs initiator.
pub struct NvmeCli {
    cfg: NvmeCliConfig,
    runner: Arc<dyn CommandRunner>,
}

/// A subsystem as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Subsystem {
    /// Its sysfs directory (`<sysfs>/class/nvme-subsystem/nvme-subsysN`).
    dir: PathBuf,
    nqn: String,
    /// Controller names (`nvme0`), sorted.
    controllers: Vec<String>,
    /// Namespace block device names (`nvme0n1`), sorted by (controller, namespace) number.
    namespaces: Vec<String>,
    /// Whether a controller is live: its sysfs `state` reads `live` (a controller without a
    /// readable `state` counts as live).
    live: bool,
}

/// `nvme<digits>` → Some(number).
fn controller_number(name: &str) -> Option<u32> {
    name.strip_prefix("nvme")?.parse().ok()
}

/// `nvme<digits>n<digits>` (not the hidden per-path `nvmeXcYnZ`) → Some((X, Z)).
fn namespace_numbers(name: &str) -> Option<(u32, u32)> {
    let rest = name.strip_prefix("nvme")?;
    let (c, n) = rest.split_once('n')?;
    Some((c.parse().ok()?, n.parse().ok()?))
}

fn read_dir_names(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Reads every NVMe subsystem under `sysfs_root`, sorted by NQN.
fn scan_subsystems(sysfs_root: &Path) -> Result<Vec<Subsystem>, InitiatorError> {
    let class = sysfs_root.join("class/nvme-subsystem");
    let entries = match std::fs::read_dir(&class) {
        Ok(rd) => rd,
        // No NVMe subsystem at all (module not loaded yet): nothing is connected.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(InitiatorError::Command(format!("{}: {e}", class.display())));
        }
    };
    let mut out = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let dir = entry.path();
        let Ok(nqn) = std::fs::read_to_string(dir.join("subsysnqn")) else {
            // Subsystem going away while we look: skip it.
            continue;
        };
        let names = read_dir_names(&dir);
        let mut controllers: Vec<String> = names
            .iter()
            .filter(|n| controller_number(n).is_some())
            .cloned()
            .collect();
        controllers.sort_by_key(|n| controller_number(n));
        let mut namespaces: Vec<String> = names
            .iter()
            .filter(|n| namespace_numbers(n).is_some())
            .cloned()
            .collect();
        if namespaces.is_empty() {
            // Without native multipath the namespaces hang under each controller.
            for c in &controllers {
                namespaces.extend(
                    read_dir_names(&dir.join(c))
                        .into_iter()
                        .filter(|n| namespace_numbers(n).is_some()),
                );
            }
        }
        namespaces.sort_by_key(|n| namespace_numbers(n));
        namespaces.dedup();
        let live = controllers.is_empty()
            || controllers.iter().any(|c| {
                std::fs::read_to_string(dir.join(c).join("state"))
                    .map_or(true, |s| s.trim() == "live")
            });
        out.push(Subsystem {
            dir: dir.clone(),
            nqn: nqn.trim().to_string(),
            controllers,
            namespaces,
            live,
        });
    }
    out.sort_by(|a, b| a.nqn.cmp(&b.nqn));
    Ok(out)
}

/// `ctrl_loss_tmo` as sysfs shows it: `off` when reconnecting forever, else the attempts
/// times the delay (a store rounds the attempts up: 600 s at a 7 s delay shows 602).
fn shown_ctrl_loss_tmo(tmo: i32, delay: u32) -> String {
    if tmo < 0 {
        "off".to_string()
    } else {
        let delay = delay.max(1);
        (u32::try_from(tmo).unwrap_or(0).div_ceil(delay) * delay).to_string()
    }
}

/// Gives the controller whose sysfs directory is `ctrl` the settings of `target`: the
/// writable `reconnect_delay` first (a `ctrl_loss_tmo` store divides by it), then
/// `ctrl_loss_tmo`. Both attributes are writable from Linux 5.13 on; an older kernel lacks
/// them and this fails saying so.
fn apply_reconnect_sysfs(ctrl: &Path, target: &NvmeTarget) -> Result<bool, InitiatorError> {
    let read = |name: &str| {
        std::fs::read_to_string(ctrl.join(name))
            .map(|s| s.trim().to_string())
            .map_err(|e| {
                InitiatorError::Command(format!(
                    "{}: {e} (changing the reconnect settings of a live connection needs Linux 5.13 or later)",
                    ctrl.join(name).display()
                ))
            })
    };
    let write = |name: &str, value: String| {
        std::fs::write(ctrl.join(name), &value).map_err(|e| {
            InitiatorError::Command(format!("writing {value} to {}: {e}", ctrl.join(name).display()))
        })
    };
    let mut changed = false;
    let current = read("reconnect_delay")?;
    let mut delay: u32 = current.parse().map_err(|_| {
        InitiatorError::Command(format!(
            "{}: unexpected reconnect_delay {current:?}",
            ctrl.display()
        ))
    })?;
    if let Some(want) = target.reconnect_delay.filter(|v| *v != delay) {
        write("reconnect_delay", want.to_string())?;
        delay = want;
        changed = true;
    }
    if let Some(tmo) = target.ctrl_loss_tmo {
        // Re-read: a new delay changes what the kernel shows for the same attempts.
        if read("ctrl_loss_tmo")? != shown_ctrl_loss_tmo(tmo, delay) {
            write("ctrl_loss_tmo", tmo.to_string())?;
            changed = true;
        }
    }
    Ok(changed)
}

impl NvmeCli {
    /// An initiator over `runner` with `cfg`.
    pub fn new(cfg: NvmeCliConfig, runner: Arc<dyn CommandRunner>) -> Self {
        Self { cfg, runner }
    }

    fn check_ours(&self, nqn: &str) -> Result<(), InitiatorError> {
        if self.cfg.nqn_prefix.is_empty()
            || !nqn.starts_with(&self.cfg.nqn_prefix)
            || nqn.len() == self.cfg.nqn_prefix.len()
        {
            return Err(InitiatorError::NotForThisDriver(format!(
                "{nqn:?} does not start with this driver's NQN prefix {:?}",
                self.cfg.nqn_prefix
            )));
        }
        Ok(())
    }

    async fn subsystems(&self) -> Result<Vec<Subsystem>, InitiatorError> {
        let root = self.cfg.sysfs_root.clone();
        tokio::task::spawn_blocking(move || scan_subsystems(&root))
            .await
            .map_err(|e| InitiatorError::Command(format!("sysfs scan: {e}")))?
    }

    async fn subsystem(&self, nqn: &str) -> Result<Option<Subsystem>, InitiatorError> {
        Ok(self.subsystems().await?.into_iter().find(|s| s.nqn == nqn))
    }

    /// The first namespace device of `sub` whose node exists under the device directory.
    fn device_of(&self, sub: &Subsystem) -> Option<PathBuf> {
        sub.namespaces
            .iter()
            .map(|n| self.cfg.dev_root.join(n))
            .find(|p| p.exists())
    }

    async fn run(
        &self,
        args: Vec<String>,
    ) -> Result<crate::node::exec::CommandOutput, InitiatorError> {
        self.runner.run("nvme", &args).await.map_err(|e| match e {
            ExecError::Timeout { .. } => InitiatorError::Timeout(e.to_string()),
            ExecError::Spawn { .. } => InitiatorError::Command(e.to_string()),
        })
    }

    /// The `nvme connect` argv for `target` (without the program name).
    pub fn connect_args(target: &NvmeTarget, host_nqn: &str) -> Vec<String> {
        let mut args = vec![
            "connect".to_string(),
            "--transport=tcp".into(),
            format!("--traddr={}", target.address),
            format!("--trsvcid={}", target.port),
            format!("--nqn={}", target.nqn),
            format!("--hostnqn={host_nqn}"),
        ];
        if let Some(v) = target.ctrl_loss_tmo {
            args.push(format!("--ctrl-loss-tmo={v}"));
        }
        if let Some(v) = target.reconnect_delay {
            args.push(format!("--reconnect-delay={v}"));
        }
        if let Some(v) = target.keep_alive_tmo {
            args.push(format!("--keep-alive-tmo={v}"));
        }
        args
    }

    async fn wait_for_device(&self, nqn: &str) -> Result<Option<PathBuf>, InitiatorError> {
        let deadline = tokio::time::Instant::now() + self.cfg.device_wait;
        loop {
            if let Some(sub) = self.subsystem(nqn).await?
                && let Some(dev) = self.device_of(&sub)
            {
                return Ok(Some(dev));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(self.cfg.poll_interval).await;
        }
    }
}

#[async_trait]
impl Initiator for NvmeCli {
    async fn host_nqn(&self) -> Result<String, InitiatorError> {
        if let Some(h) = &self.cfg.host_nqn {
            return Ok(h.clone());
        }
        let path = self.cfg.hostnqn_file.clone();
        let text = tokio::fs::read_to_string(&path).await.map_err(|e| {
            InitiatorError::Unavailable(format!(
                "no host NQN: {} unreadable ({e}); create it (nvme gen-hostnqn) or pass --nvme-host-nqn",
                path.display()
            ))
        })?;
        let nqn = text.trim();
        if nqn.is_empty() {
            return Err(InitiatorError::Unavailable(format!(
                "no host NQN: {} is empty; fill it (nvme gen-hostnqn) or pass --nvme-host-nqn",
                path.display()
            )));
        }
        Ok(nqn.to_string())
    }

    async fn connect(&self, target: &NvmeTarget) -> Result<PathBuf, InitiatorError> {
        self.check_ours(&target.nqn)?;
        // Observe first: an existing connection with its device is success.
        let existing = self.subsystem(&target.nqn).await?;
        if let Some(sub) = &existing
            && let Some(dev) = self.device_of(sub)
        {
            return Ok(dev);
        }
        let host_nqn = self.host_nqn().await?;
        let args = Self::connect_args(target, &host_nqn);
        let out = self.run(args.clone()).await?;
        if !out.success() && out.code != Some(EALREADY) {
            // The connect may have raced with another one: the kernel state decides.
            if self.subsystem(&target.nqn).await?.is_none() {
                return Err(InitiatorError::Unavailable(format!(
                    "`{}` failed: {}",
                    command_line("nvme", &args),
                    out.failure_text()
                )));
            }
        }
        match self.wait_for_device(&target.nqn).await? {
            Some(dev) => Ok(dev),
            None => {
                // Never leave a connection we made without a usable device behind; one that
                // existed before this call (e.g. reconnecting) is not ours to tear down.
                if existing.is_none()
                    && let Err(e) = self.disconnect(&target.nqn).await
                {
                    tracing::warn!(nqn = %target.nqn, error = %e, "cleanup after device wait failed");
                }
                Err(InitiatorError::Timeout(format!(
                    "connected to {} but no namespace block device appeared within {}s",
                    target.nqn,
                    self.cfg.device_wait.as_secs()
                )))
            }
        }
    }

    async fn disconnect(&self, nqn: &str) -> Result<(), InitiatorError> {
        self.check_ours(nqn)?;
        if self.subsystem(nqn).await?.is_none() {
            return Ok(());
        }
        let args = vec!["disconnect".to_string(), format!("--nqn={nqn}")];
        let out = self.run(args.clone()).await?;
        if !out.success() && self.subsystem(nqn).await?.is_some() {
            return Err(InitiatorError::Command(format!(
                "`{}` failed: {}",
                command_line("nvme", &args),
                out.failure_text()
            )));
        }
        Ok(())
    }

    async fn find_device(&self, nqn: &str) -> Result<Option<PathBuf>, InitiatorError> {
        if self.check_ours(nqn).is_err() {
            return Ok(None);
        }
        Ok(self.subsystem(nqn).await?.and_then(|s| self.device_of(&s)))
    }

    async fn nqn_of_device(&self, device: &Path) -> Result<Option<String>, InitiatorError> {
        let Some(name) = device
            .strip_prefix(&self.cfg.dev_root)
            .ok()
            .and_then(|n| n.to_str())
        else {
            return Ok(None);
        };
        Ok(self
            .subsystems()
            .await?
            .into_iter()
            .filter(|s| self.check_ours(&s.nqn).is_ok())
            .find(|s| s.namespaces.iter().any(|n| n == name))
            .map(|s| s.nqn))
    }

    async fn connections(&self) -> Result<Vec<Connection>, InitiatorError> {
        Ok(self
            .subsystems()
            .await?
            .into_iter()
            .filter(|s| self.check_ours(&s.nqn).is_ok())
            .filter_map(|s| {
                self.device_of(&s).map(|device| Connection {
                    nqn: s.nqn.clone(),
                    device,
                    live: s.live,
                })
            })
            .collect())
    }

    async fn apply_reconnect(&self, target: &NvmeTarget) -> Result<bool, InitiatorError> {
        self.check_ours(&target.nqn)?;
        let Some(sub) = self.subsystem(&target.nqn).await? else {
            return Ok(false);
        };
        let target = target.clone();
        tokio::task::spawn_blocking(move || {
            let mut changed = false;
            for c in &sub.controllers {
                changed |= apply_reconnect_sysfs(&sub.dir.join(c), &target)?;
            }
            Ok(changed)
        })
        .await
        .map_err(|e| InitiatorError::Command(format!("sysfs write: {e}")))?
    }

    async fn rescan(&self, nqn: &str) -> Result<(), InitiatorError> {
        self.check_ours(nqn)?;
        let Some(sub) = self.subsystem(nqn).await? else {
            return Err(InitiatorError::Unavailable(format!(
                "{nqn} is not connected on this node"
            )));
        };
        for c in &sub.controllers {
            let args = vec![
                "ns-rescan".to_string(),
                self.cfg.dev_root.join(c).display().to_string(),
            ];
            let out = self.run(args.clone()).await?;
            if !out.success() {
                return Err(InitiatorError::Command(format!(
                    "`{}` failed: {}",
                    command_line("nvme", &args),
                    out.failure_text()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::exec::testing::{ScriptedRunner, fail, ok};
    use std::fs;

    const PREFIX: &str = "nqn.2000-02.com.mikrotik:";

    /// A fixture host: sysfs + /dev trees under a temp dir.
    struct Host {
        dir: tempfile::TempDir,
    }

    impl Host {
        fn new() -> Self {
            let h = Self {
                dir: tempfile::tempdir().unwrap(),
            };
            fs::create_dir_all(h.sys().join("class/nvme-subsystem")).unwrap();
            fs::create_dir_all(h.dev()).unwrap();
            h
        }
        fn sys(&self) -> PathBuf {
            self.dir.path().join("sys")
        }
        fn dev(&self) -> PathBuf {
            self.dir.path().join("dev")
        }
        /// Adds a subsystem; `multipath` puts the namespace directly under it.
        fn add(&self, subsys: u32, ctrl: u32, nqn: &str, multipath: bool) {
            add_subsystem(&self.sys(), &self.dev(), subsys, ctrl, nqn, multipath);
        }
        fn cfg(&self) -> NvmeCliConfig {
            NvmeCliConfig {
                nqn_prefix: PREFIX.into(),
                host_nqn: Some("nqn.2014-08.org.nvmexpress:uuid:host-a".into()),
                hostnqn_file: self.dir.path().join("etc/nvme/hostnqn"),
                sysfs_root: self.sys(),
                dev_root: self.dev(),
                device_wait: Duration::from_secs(10),
                poll_interval: Duration::from_millis(100),
            }
        }
    }

    fn add_subsystem(sys: &Path, dev: &Path, subsys: u32, ctrl: u32, nqn: &str, multipath: bool) {
        let d = sys.join(format!("class/nvme-subsystem/nvme-subsys{subsys}"));
        fs::create_dir_all(d.join(format!("nvme{ctrl}"))).unwrap();
        fs::write(d.join("subsysnqn"), format!("{nqn}\n")).unwrap();
        let ns = format!("nvme{ctrl}n1");
        if multipath {
            fs::create_dir_all(d.join(&ns)).unwrap();
            // The hidden per-path device must not be picked.
            fs::create_dir_all(d.join(format!("nvme{ctrl}/nvme{subsys}c{ctrl}n1"))).unwrap();
        } else {
            fs::create_dir_all(d.join(format!("nvme{ctrl}/{ns}"))).unwrap();
        }
        fs::write(dev.join(&ns), "").unwrap();
    }

    /// A host that already has NVMe-oF disks of someone else (and one of ours).
    fn busy_host() -> Host {
        let h = Host::new();
        h.add(
            0,
            0,
            "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-local-ssd",
            true,
        );
        h.add(1, 1, "nqn.2016-06.io.spdk:cnode1", false);
        h.add(2, 2, "nqn.2000-02.com.mikrotik", false);
        h.add(3, 3, &format!("{PREFIX}pvc-ours"), true);
        h
    }

    fn target(nqn: &str) -> NvmeTarget {
        NvmeTarget {
            address: "10.42.0.5".into(),
            port: 4420,
            nqn: nqn.into(),
            ctrl_loss_tmo: Some(-1),
            reconnect_delay: Some(5),
            keep_alive_tmo: Some(30),
        }
    }

    #[test]
    fn connect_command_line_carries_host_nqn_and_timeouts() {
        let args = NvmeCli::connect_args(&target(&format!("{PREFIX}pvc-1")), "nqn.host");
        assert_eq!(
            args,
            vec![
                "connect",
                "--transport=tcp",
                "--traddr=10.42.0.5",
                "--trsvcid=4420",
                "--nqn=nqn.2000-02.com.mikrotik:pvc-1",
                "--hostnqn=nqn.host",
                "--ctrl-loss-tmo=-1",
                "--reconnect-delay=5",
                "--keep-alive-tmo=30",
            ]
        );
        let mut t = target(&format!("{PREFIX}pvc-1"));
        t.ctrl_loss_tmo = None;
        t.reconnect_delay = None;
        t.keep_alive_tmo = None;
        assert_eq!(NvmeCli::connect_args(&t, "h").len(), 6);
    }

    #[tokio::test]
    async fn discovery_finds_namespaces_with_and_without_multipath_and_only_ours() {
        let h = busy_host();
        h.add(4, 5, &format!("{PREFIX}pvc-flat"), false);
        let runner = Arc::new(ScriptedRunner::new(|_| ok("")));
        let nvme = NvmeCli::new(h.cfg(), runner.clone());
        assert_eq!(
            nvme.find_device(&format!("{PREFIX}pvc-ours"))
                .await
                .unwrap(),
            Some(h.dev().join("nvme3n1"))
        );
        assert_eq!(
            nvme.find_device(&format!("{PREFIX}pvc-flat"))
                .await
                .unwrap(),
            Some(h.dev().join("nvme5n1"))
        );
        assert_eq!(
            nvme.find_device(&format!("{PREFIX}pvc-absent"))
                .await
                .unwrap(),
            None
        );
        // Foreign subsystems are invisible, even when asked for by name.
        assert_eq!(
            nvme.find_device("nqn.2016-06.io.spdk:cnode1")
                .await
                .unwrap(),
            None
        );
        let conns = nvme.connections().await.unwrap();
        let nqns: Vec<_> = conns.iter().map(|c| c.nqn.as_str()).collect();
        assert_eq!(
            nqns,
            vec![
                "nqn.2000-02.com.mikrotik:pvc-flat",
                "nqn.2000-02.com.mikrotik:pvc-ours"
            ]
        );
        assert!(runner.calls().is_empty());
    }

    #[tokio::test]
    async fn foreign_nvme_disks_are_never_disconnected_or_connected() {
        let h = busy_host();
        let runner = Arc::new(ScriptedRunner::new(|_| ok("")));
        let nvme = NvmeCli::new(h.cfg(), runner.clone());
        for foreign in [
            "nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-local-ssd",
            "nqn.2016-06.io.spdk:cnode1",
            // The bare vendor NQN is not one of our volumes either.
            "nqn.2000-02.com.mikrotik:",
            "nqn.2000-02.com.mikrotik",
        ] {
            assert!(
                matches!(
                    nvme.disconnect(foreign).await,
                    Err(InitiatorError::NotForThisDriver(_))
                ),
                "{foreign}"
            );
            assert!(matches!(
                nvme.connect(&target(foreign)).await,
                Err(InitiatorError::NotForThisDriver(_))
            ));
            assert!(nvme.rescan(foreign).await.is_err());
        }
        assert!(runner.calls().is_empty(), "{:?}", runner.calls());
    }

    #[tokio::test]
    async fn connections_report_whether_a_controller_is_live() {
        let h = busy_host();
        h.add(4, 4, &format!("{PREFIX}pvc-away"), false);
        h.add(5, 5, &format!("{PREFIX}pvc-back"), true);
        let sub = |n: u32, c: u32| {
            h.sys()
                .join(format!("class/nvme-subsystem/nvme-subsys{n}/nvme{c}/state"))
        };
        fs::write(sub(3, 3), "live\n").unwrap();
        fs::write(sub(4, 4), "connecting\n").unwrap();
        fs::write(sub(5, 5), "resetting\n").unwrap();
        let nvme = NvmeCli::new(h.cfg(), Arc::new(ScriptedRunner::new(|_| ok(""))));
        let live: Vec<(String, bool)> = nvme
            .connections()
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.nqn, c.live))
            .collect();
        assert_eq!(
            live,
            vec![
                (format!("{PREFIX}pvc-away"), false),
                (format!("{PREFIX}pvc-back"), false),
                (format!("{PREFIX}pvc-ours"), true),
            ]
        );
        // A second controller that is live makes the subsystem live again.
        fs::create_dir_all(h.sys().join("class/nvme-subsystem/nvme-subsys4/nvme6")).unwrap();
        fs::write(sub(4, 6), "live\n").unwrap();
        let c = nvme.connections().await.unwrap();
        assert!(c.iter().any(|c| c.nqn.ends_with("pvc-away") && c.live));
    }

    #[tokio::test]
    async fn reconnect_settings_are_written_to_a_connection_made_without_them() {
        let h = busy_host();
        let ctrl = h.sys().join("class/nvme-subsystem/nvme-subsys3/nvme3");
        // Connected by hand with the kernel's defaults: 600 s, every 10 s.
        fs::write(ctrl.join("reconnect_delay"), "10\n").unwrap();
        fs::write(ctrl.join("ctrl_loss_tmo"), "600\n").unwrap();
        let runner = Arc::new(ScriptedRunner::new(|_| ok("")));
        let nvme = NvmeCli::new(h.cfg(), runner.clone());
        let mut t = target(&format!("{PREFIX}pvc-ours"));
        t.ctrl_loss_tmo = Some(-1);
        t.reconnect_delay = Some(5);
        assert!(nvme.apply_reconnect(&t).await.unwrap());
        let read = |n: &str| fs::read_to_string(ctrl.join(n)).unwrap();
        assert_eq!(read("reconnect_delay"), "5");
        assert_eq!(read("ctrl_loss_tmo"), "-1");
        // What the kernel then shows is already right: nothing is written again.
        fs::write(ctrl.join("ctrl_loss_tmo"), "off\n").unwrap();
        assert!(!nvme.apply_reconnect(&t).await.unwrap());
        // A finite timeout is compared as the kernel rounds it (600 s at 7 s shows 602).
        t.ctrl_loss_tmo = Some(600);
        t.reconnect_delay = Some(7);
        assert!(nvme.apply_reconnect(&t).await.unwrap());
        fs::write(ctrl.join("ctrl_loss_tmo"), "602\n").unwrap();
        assert!(!nvme.apply_reconnect(&t).await.unwrap());
        // A kernel without the writable attributes says what it lacks.
        fs::remove_file(ctrl.join("reconnect_delay")).unwrap();
        let e = nvme.apply_reconnect(&t).await.unwrap_err();
        assert!(e.to_string().contains("Linux 5.13"), "{e}");
        // Not connected: nothing to do; another driver's NQN: refused; no command runs.
        assert!(!nvme.apply_reconnect(&target(&format!("{PREFIX}pvc-gone"))).await.unwrap());
        assert!(nvme.apply_reconnect(&target("nqn.2014-08.org.nvmexpress:uuid:1b4e28ba-local-ssd")).await.is_err());
        assert!(runner.calls().is_empty());
    }

    #[tokio::test]
    async fn disconnect_names_exactly_our_nqn_and_absent_is_success() {
        let h = busy_host();
        let runner = Arc::new(ScriptedRunner::new(|_| ok("")));
        let nvme = NvmeCli::new(h.cfg(), runner.clone());
        nvme.disconnect(&format!("{PREFIX}pvc-gone")).await.unwrap();
        assert!(runner.calls().is_empty());
        nvme.disconnect(&format!("{PREFIX}pvc-ours")).await.unwrap();
        assert_eq!(
            runner.calls(),
            vec![vec![
                "nvme",
                "disconnect",
                "--nqn=nqn.2000-02.com.mikrotik:pvc-ours"
            ]]
        );
    }

    #[tokio::test]
    async fn already_connected_is_success_without_running_nvme() {
        let h = busy_host();
        let runner = Arc::new(ScriptedRunner::new(|_| ok("")));
        let nvme = NvmeCli::new(h.cfg(), runner.clone());
        let dev = nvme
            .connect(&target(&format!("{PREFIX}pvc-ours")))
            .await
            .unwrap();
        assert_eq!(dev, h.dev().join("nvme3n1"));
        assert!(runner.calls().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn connect_runs_nvme_then_waits_for_the_kernel_device() {
        let h = busy_host();
        let (sys, dev) = (h.sys(), h.dev());
        let nqn = format!("{PREFIX}pvc-new");
        let n2 = nqn.clone();
        // The "kernel": nvme connect makes the subsystem appear.
        let runner = Arc::new(ScriptedRunner::new(move |argv| {
            if argv[1] == "connect" {
                add_subsystem(&sys, &dev, 7, 9, &n2, true);
            }
            ok("")
        }));
        let nvme = NvmeCli::new(h.cfg(), runner.clone());
        let got = nvme.connect(&target(&nqn)).await.unwrap();
        assert_eq!(got, h.dev().join("nvme9n1"));
        assert_eq!(runner.calls().len(), 1);
        assert_eq!(runner.calls()[0][1], "connect");
        assert!(
            runner.calls()[0]
                .contains(&"--hostnqn=nqn.2014-08.org.nvmexpress:uuid:host-a".to_string())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ealready_from_nvme_cli_is_success_when_the_device_is_there() {
        let h = busy_host();
        let (sys, dev) = (h.sys(), h.dev());
        let nqn = format!("{PREFIX}pvc-race");
        let n2 = nqn.clone();
        let runner = Arc::new(ScriptedRunner::new(move |_| {
            add_subsystem(&sys, &dev, 8, 10, &n2, false);
            fail(
                EALREADY,
                "Failed to write to /dev/nvme-fabrics: Operation already in progress",
            )
        }));
        let nvme = NvmeCli::new(h.cfg(), runner);
        assert_eq!(
            nvme.connect(&target(&nqn)).await.unwrap(),
            h.dev().join("nvme10n1")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_device_that_never_appears_times_out_and_is_disconnected() {
        let h = busy_host();
        let sys = h.sys();
        let nqn = format!("{PREFIX}pvc-nodev");
        let n2 = nqn.clone();
        // The subsystem appears but its namespace never does.
        let runner = Arc::new(ScriptedRunner::new(move |argv| {
            if argv[1] == "connect" {
                let d = sys.join("class/nvme-subsystem/nvme-subsys9");
                fs::create_dir_all(d.join("nvme11")).unwrap();
                fs::write(d.join("subsysnqn"), &n2).unwrap();
            }
            ok("")
        }));
        let nvme = NvmeCli::new(h.cfg(), runner.clone());
        let err = nvme.connect(&target(&nqn)).await.unwrap_err();
        assert!(matches!(err, InitiatorError::Timeout(_)), "{err}");
        let calls = runner.calls();
        assert_eq!(
            calls.last().unwrap(),
            &vec![
                "nvme",
                "disconnect",
                "--nqn=nqn.2000-02.com.mikrotik:pvc-nodev"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reconnecting_subsystem_is_not_torn_down_when_its_device_is_late() {
        let h = busy_host();
        let nqn = format!("{PREFIX}pvc-reconnecting");
        // Present before the call, but its namespace is not (controller reconnecting).
        let d = h.sys().join("class/nvme-subsystem/nvme-subsys12");
        fs::create_dir_all(d.join("nvme12")).unwrap();
        fs::write(d.join("subsysnqn"), &nqn).unwrap();
        let runner = Arc::new(ScriptedRunner::new(|_| fail(EALREADY, "already connected")));
        let nvme = NvmeCli::new(h.cfg(), runner.clone());
        let err = nvme.connect(&target(&nqn)).await.unwrap_err();
        assert!(matches!(err, InitiatorError::Timeout(_)), "{err}");
        assert!(runner.calls().iter().all(|c| c[1] != "disconnect"), "{:?}", runner.calls());
    }

    #[tokio::test]
    async fn failed_connect_reports_the_command_and_stderr() {
        let h = busy_host();
        let runner = Arc::new(ScriptedRunner::new(|_| {
            fail(
                1,
                "could not add new controller: failed to write to nvme-fabrics device",
            )
        }));
        let nvme = NvmeCli::new(h.cfg(), runner);
        let err = nvme
            .connect(&target(&format!("{PREFIX}pvc-x")))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, InitiatorError::Unavailable(_)));
        assert!(
            msg.contains("--traddr=10.42.0.5") && msg.contains("could not add new controller"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn host_nqn_comes_from_the_flag_or_the_file() {
        let h = Host::new();
        let mut cfg = h.cfg();
        cfg.host_nqn = None;
        let runner = Arc::new(ScriptedRunner::new(|_| ok("")));
        let nvme = NvmeCli::new(cfg.clone(), runner.clone());
        let err = nvme.host_nqn().await.unwrap_err();
        assert!(err.to_string().contains("--nvme-host-nqn"), "{err}");
        fs::create_dir_all(cfg.hostnqn_file.parent().unwrap()).unwrap();
        fs::write(&cfg.hostnqn_file, "nqn.2014-08.org.nvmexpress:uuid:abc\n").unwrap();
        assert_eq!(
            nvme.host_nqn().await.unwrap(),
            "nqn.2014-08.org.nvmexpress:uuid:abc"
        );
    }

    #[tokio::test]
    async fn rescan_targets_each_controller_of_the_subsystem() {
        let h = busy_host();
        let runner = Arc::new(ScriptedRunner::new(|_| ok("")));
        let nvme = NvmeCli::new(h.cfg(), runner.clone());
        nvme.rescan(&format!("{PREFIX}pvc-ours")).await.unwrap();
        assert_eq!(
            runner.calls(),
            vec![vec![
                "nvme".to_string(),
                "ns-rescan".into(),
                h.dev().join("nvme3").display().to_string()
            ]]
        );
    }
}
