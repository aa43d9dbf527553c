//! The embedded [`Initiator`]: loop devices over the embedded RDS's backing files.
//!
//! In the embedded default the controller and the node run in one process on one machine;
//! "connecting" volume `<slot>` (NQN `<prefix><slot>`) attaches its backing file
//! `<rds-dir>/<slot>.img` to a loop device with `losetup`, so the whole node path (format,
//! mount, bind, expand, stats) runs for real.
//!
//! Invariants:
//! - The NQN → file mapping is pure (prefix + a validated slot), so unstage, expand and
//!   restart recovery find the device from the volume id alone.
//! - Which loop device backs which file is read from the kernel
//!   (`<sysfs>/block/loop*/loop/backing_file`), never remembered: a restarted plugin sees
//!   exactly what is attached.
//! - Only loop devices whose backing file is one of this driver's `<rds-dir>/*.img` files
//!   are detached or listed; every other loop device on the host is left alone.
//! - A new attach is admitted by the embedded RDS first, as an NVMe/TCP target admits a
//!   connect: the volume's export must allow this host's NQN (the data-path fence; a parked
//!   export allows nobody), read fresh from the emulator's tables. An attached device is
//!   kept, as a live NVMe/TCP connection is not re-checked.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::node::exec::{CommandRunner, ExecError, command_line};
use crate::ports::initiator::{Connection, Initiator, InitiatorError, NvmeTarget};
use crate::routeros::emulator::{Admission, admission_in};
use crate::types::VolumeId;

/// How often to look while waiting for a loop device to go away.
const DETACH_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// An attached loop device as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LoopDev {
    device: PathBuf,
    file: PathBuf,
    /// `losetup -d` was asked while something (often udev probing after a close) held the
    /// device open: the kernel set autoclear and detaches it on the last close. Such a
    /// device is on its way out and is never handed out again.
    detaching: bool,
}

/// Loop-device initiator.
pub struct LoopInitiator {
    detach_wait: std::time::Duration,
    runner: Arc<dyn CommandRunner>,
    rds_dir: PathBuf,
    nqn_prefix: String,
    host_nqn: String,
    /// The embedded RDS's emulator directory, whose tables hold the export allow lists.
    exports: PathBuf,
    sysfs_root: PathBuf,
    dev_root: PathBuf,
}

impl LoopInitiator {
    /// Loop devices over `<rds_dir>/<slot>.img` for NQNs `<nqn_prefix><slot>`, admitted by
    /// the export allow lists of the emulator whose tables are in `exports`.
    pub fn new(
        runner: Arc<dyn CommandRunner>,
        rds_dir: &Path,
        exports: &Path,
        nqn_prefix: String,
        host_nqn: String,
    ) -> Self {
        let rds_dir = rds_dir.to_path_buf();
        Self {
            detach_wait: std::time::Duration::from_secs(10),
            runner,
            rds_dir,
            nqn_prefix,
            host_nqn,
            exports: exports.to_path_buf(),
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
        }
    }

    /// The backing file of `nqn`, or NotForThisDriver.
    pub fn file_for(&self, nqn: &str) -> Result<PathBuf, InitiatorError> {
        let not_ours = || {
            InitiatorError::NotForThisDriver(format!(
                "{nqn:?} is not <{}><volume id>",
                self.nqn_prefix
            ))
        };
        let slot = nqn.strip_prefix(&self.nqn_prefix).ok_or_else(not_ours)?;
        let slot = VolumeId::new(slot).map_err(|_| not_ours())?;
        Ok(self.dir().join(format!("{slot}.img")))
    }

    /// Whether the embedded RDS admits this host to `nqn`'s export (the allow list a target
    /// checks at connect).
    fn admitted(&self, nqn: &str) -> Result<(), InitiatorError> {
        let slot = nqn.strip_prefix(&self.nqn_prefix).unwrap_or(nqn);
        let refused = |why: String| {
            Err(InitiatorError::Unavailable(format!(
                "the RDS refused host {} for {nqn}: {why}",
                self.host_nqn
            )))
        };
        match admission_in(&self.exports, slot, &self.host_nqn) {
            Ok(Admission::Admitted) => Ok(()),
            Ok(Admission::Refused { allowed }) => refused(format!(
                "its export admits only {allowed} (the data-path fence: publish the volume to \
                 this node first)"
            )),
            Ok(Admission::NotExported) => refused("the disk is not exported".into()),
            Ok(Admission::NoDisk) => refused("no such disk (volume deleted?)".into()),
            Err(e) => Err(InitiatorError::Command(e.to_string())),
        }
    }

    /// The disk directory as the kernel records backing files: symlinks resolved (the
    /// directory may only appear after start-up, so resolved on each use).
    fn dir(&self) -> PathBuf {
        std::fs::canonicalize(&self.rds_dir).unwrap_or_else(|_| self.rds_dir.clone())
    }

    /// The NQN of the volume whose backing file is `file` (in `dir`, the resolved disk
    /// directory), if it is one.
    fn nqn_of_file(&self, dir: &Path, file: &Path) -> Option<String> {
        if file.parent() != Some(dir) {
            return None;
        }
        let slot = file
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".img"))?;
        VolumeId::new(slot).ok()?;
        Some(format!("{}{slot}", self.nqn_prefix))
    }

    /// Attached loop devices, sorted by device number.
    async fn loops(&self) -> Result<Vec<LoopDev>, InitiatorError> {
        let block = self.sysfs_root.join("block");
        let dev_root = self.dev_root.clone();
        tokio::task::spawn_blocking(move || {
            let rd = std::fs::read_dir(&block)
                .map_err(|e| InitiatorError::Command(format!("{}: {e}", block.display())))?;
            let mut out: Vec<(u32, LoopDev)> = Vec::new();
            for e in rd.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(n) = name
                    .strip_prefix("loop")
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                // Only attached loop devices have a backing file.
                let Ok(f) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
                    continue;
                };
                let autoclear = std::fs::read_to_string(e.path().join("loop/autoclear"))
                    .is_ok_and(|v| v.trim() == "1");
                out.push((
                    n,
                    LoopDev {
                        device: dev_root.join(&name),
                        file: PathBuf::from(f.trim_end_matches('\n')),
                        detaching: autoclear,
                    },
                ));
            }
            out.sort_by_key(|(n, _)| *n);
            Ok(out.into_iter().map(|(_, l)| l).collect())
        })
        .await
        .map_err(|e| InitiatorError::Command(format!("sysfs scan: {e}")))?
    }

    /// Loop devices over `file` that are in use (not being detached).
    async fn devices_of(&self, file: &Path) -> Result<Vec<PathBuf>, InitiatorError> {
        Ok(self
            .loops()
            .await?
            .into_iter()
            .filter(|l| l.file == file && !l.detaching)
            .map(|l| l.device)
            .collect())
    }

    /// Waits (bounded) until no loop device, in use or being detached, is over `file`.
    async fn wait_detached(&self, file: &Path) -> Result<(), InitiatorError> {
        let deadline = tokio::time::Instant::now() + self.detach_wait;
        loop {
            let left: Vec<PathBuf> = self
                .loops()
                .await?
                .into_iter()
                .filter(|l| l.file == file)
                .map(|l| l.device)
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(InitiatorError::Timeout(format!(
                    "{left:?} over {} still held open by another process after {}s \
                     (the kernel detaches it when that process closes it)",
                    file.display(),
                    self.detach_wait.as_secs()
                )));
            }
            tokio::time::sleep(DETACH_POLL).await;
        }
    }

    async fn losetup(&self, args: Vec<String>) -> Result<String, InitiatorError> {
        let out = self
            .runner
            .run("losetup", &args)
            .await
            .map_err(|e| match e {
                ExecError::Timeout { .. } => InitiatorError::Timeout(e.to_string()),
                ExecError::Spawn { .. } => InitiatorError::Command(e.to_string()),
            })?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(InitiatorError::Command(format!(
                "`{}` failed: {}",
                command_line("losetup", &args),
                out.failure_text()
            )))
        }
    }
}

#[async_trait]
impl Initiator for LoopInitiator {
    async fn host_nqn(&self) -> Result<String, InitiatorError> {
        Ok(self.host_nqn.clone())
    }

    async fn connect(&self, target: &NvmeTarget) -> Result<PathBuf, InitiatorError> {
        let file = self.file_for(&target.nqn)?;
        // Observe first: an attached loop device over the file is success.
        if let Some(dev) = self.devices_of(&file).await?.into_iter().next() {
            return Ok(dev);
        }
        self.admitted(&target.nqn)?;
        // A device still being detached (from an earlier unstage) must be gone before the
        // file is attached afresh.
        self.wait_detached(&file).await?;
        if !tokio::fs::try_exists(&file).await.unwrap_or(false) {
            return Err(InitiatorError::Unavailable(format!(
                "backing file {} of {} does not exist (volume deleted?)",
                file.display(),
                target.nqn
            )));
        }
        let stdout = self
            .losetup(vec![
                "--find".into(),
                "--show".into(),
                file.display().to_string(),
            ])
            .await?;
        let dev = PathBuf::from(stdout.trim());
        if !dev.starts_with(&self.dev_root) {
            return Err(InitiatorError::Command(format!(
                "losetup printed {:?}, not a device under {}",
                stdout.trim(),
                self.dev_root.display()
            )));
        }
        Ok(dev)
    }

    async fn disconnect(&self, nqn: &str) -> Result<(), InitiatorError> {
        let file = self.file_for(nqn)?;
        for dev in self.devices_of(&file).await? {
            self.losetup(vec!["--detach".into(), dev.display().to_string()])
                .await?;
        }
        self.wait_detached(&file).await
    }

    async fn find_device(&self, nqn: &str) -> Result<Option<PathBuf>, InitiatorError> {
        let Ok(file) = self.file_for(nqn) else {
            return Ok(None);
        };
        Ok(self.devices_of(&file).await?.into_iter().next())
    }

    async fn nqn_of_device(&self, device: &Path) -> Result<Option<String>, InitiatorError> {
        let dir = self.dir();
        Ok(self
            .loops()
            .await?
            .into_iter()
            .find(|l| l.device == device)
            .and_then(|l| self.nqn_of_file(&dir, &l.file)))
    }

    async fn connections(&self) -> Result<Vec<Connection>, InitiatorError> {
        let mut out: Vec<Connection> = Vec::new();
        let dir = self.dir();
        for LoopDev {
            device,
            file,
            detaching,
        } in self.loops().await?
        {
            if detaching {
                continue;
            }
            let Some(nqn) = self.nqn_of_file(&dir, &file) else {
                continue;
            };
            if out.iter().any(|c| c.nqn == nqn) {
                continue;
            }
            out.push(Connection {
                nqn,
                device,
                live: true,
            });
        }
        out.sort_by(|a, b| a.nqn.cmp(&b.nqn));
        Ok(out)
    }

    async fn rescan(&self, nqn: &str) -> Result<(), InitiatorError> {
        let file = self.file_for(nqn)?;
        let devs = self.devices_of(&file).await?;
        if devs.is_empty() {
            return Err(InitiatorError::Unavailable(format!(
                "{nqn} is not attached on this node"
            )));
        }
        for dev in devs {
            // --set-capacity: re-read the backing file's size.
            self.losetup(vec!["--set-capacity".into(), dev.display().to_string()])
                .await?;
        }
        Ok(())
    }

    async fn apply_reconnect(&self, target: &NvmeTarget) -> Result<bool, InitiatorError> {
        // A loop device has no controller to reconnect: nothing to tune.
        self.file_for(&target.nqn)?;
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::exec::testing::{ScriptedRunner, ok};
    use crate::ports::time::SystemClock;
    use crate::routeros::command::{Command, DiskAdd, ExportSpec};
    use crate::routeros::emulator::{Emulator, PoolConfig};
    use std::fs;

    /// The embedded RDS's tables in `dir/emu`, for the allow-list check.
    fn emulator(dir: &Path) -> Emulator {
        let pool = PoolConfig {
            slot: "pool".into(),
            mount_point: "pool".into(),
            size_bytes: 1 << 30,
        };
        Emulator::open_dir(&dir.join("emu"), pool, Arc::new(SystemClock)).unwrap()
    }

    /// Exports `slot` on `emu`, admitting `allow` (`None`: any host).
    fn export(emu: &Emulator, slot: &str, allow: Option<&str>) {
        let reply = emu.apply(&Command::DiskAdd(DiskAdd {
            slot: slot.into(),
            file_path: format!("pool/{slot}.img"),
            size_bytes: Some(1 << 20),
            copy_from: None,
            export: Some(ExportSpec {
                port: 4420,
                nqn: format!("nqn.2000-02.com.mikrotik:{slot}"),
                allow_host: allow.map(str::to_string),
            }),
            comment: None,
        }));
        assert!(reply.ok, "{reply:?}");
    }

    fn target(slot: &str) -> NvmeTarget {
        NvmeTarget {
            address: "127.0.0.1".into(),
            port: 4420,
            nqn: format!("nqn.2000-02.com.mikrotik:{slot}"),
            ctrl_loss_tmo: None,
            reconnect_delay: None,
            keep_alive_tmo: None,
        }
    }

    fn fixture() -> (tempfile::TempDir, LoopInitiator, Arc<ScriptedRunner>, Emulator) {
        let dir = tempfile::tempdir().unwrap();
        let rds = dir.path().join("rds");
        fs::create_dir_all(&rds).unwrap();
        let rds = fs::canonicalize(&rds).unwrap();
        let loops = [
            (0, Some(rds.join("pvc-1.img"))),
            (1, Some(PathBuf::from("/var/lib/snapd/snaps/core.snap"))),
            (2, None),
            (3, Some(rds.join("disks.json.img.other"))),
        ];
        for (n, f) in loops {
            let d = dir.path().join(format!("sys/block/loop{n}/loop"));
            fs::create_dir_all(&d).unwrap();
            if let Some(f) = f {
                fs::write(d.join("backing_file"), format!("{}\n", f.display())).unwrap();
            }
        }
        // The "kernel": a detach removes the device's backing file record.
        let sys = dir.path().join("sys/block");
        let runner = Arc::new(ScriptedRunner::new(move |argv| {
            if argv[1] == "--detach" {
                let name = Path::new(&argv[2]).file_name().unwrap();
                fs::remove_file(sys.join(name).join("loop/backing_file")).unwrap();
            }
            ok("/dev/loop5\n")
        }));
        let emu = emulator(dir.path());
        let mut l = LoopInitiator::new(
            runner.clone(),
            &rds,
            &dir.path().join("emu"),
            "nqn.2000-02.com.mikrotik:".into(),
            "nqn.host".into(),
        );
        l.sysfs_root = dir.path().join("sys");
        (dir, l, runner, emu)
    }

    #[tokio::test]
    async fn finds_only_loop_devices_over_our_backing_files() {
        let (_d, l, runner, _emu) = fixture();
        assert_eq!(
            l.find_device("nqn.2000-02.com.mikrotik:pvc-1")
                .await
                .unwrap(),
            Some(PathBuf::from("/dev/loop0"))
        );
        let c = l.connections().await.unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].nqn, "nqn.2000-02.com.mikrotik:pvc-1");
        // Foreign loop devices are never detached.
        assert!(l.disconnect("nqn.other:core").await.is_err());
        assert!(
            l.disconnect("nqn.2000-02.com.mikrotik:../etc")
                .await
                .is_err()
        );
        l.disconnect("nqn.2000-02.com.mikrotik:pvc-1")
            .await
            .unwrap();
        assert_eq!(
            runner.calls(),
            vec![vec!["losetup", "--detach", "/dev/loop0"]]
        );
    }

    #[tokio::test]
    async fn connect_attaches_the_backing_file_once() {
        let (_d, l, runner, emu) = fixture();
        // Already attached: no command.
        l.connect(&NvmeTarget {
            address: "127.0.0.1".into(),
            port: 4420,
            nqn: "nqn.2000-02.com.mikrotik:pvc-1".into(),
            ctrl_loss_tmo: None,
            reconnect_delay: None,
            keep_alive_tmo: None,
        })
        .await
        .unwrap();
        assert!(runner.calls().is_empty());
        let file = l.file_for("nqn.2000-02.com.mikrotik:pvc-2").unwrap();
        let t = NvmeTarget {
            address: "127.0.0.1".into(),
            port: 4420,
            nqn: "nqn.2000-02.com.mikrotik:pvc-2".into(),
            ctrl_loss_tmo: None,
            reconnect_delay: None,
            keep_alive_tmo: None,
        };
        // Missing backing file: a clear error, nothing run.
        assert!(matches!(
            l.connect(&t).await,
            Err(InitiatorError::Unavailable(_))
        ));
        fs::write(&file, "").unwrap();
        export(&emu, "pvc-2", None);
        assert_eq!(l.connect(&t).await.unwrap(), PathBuf::from("/dev/loop5"));
        assert_eq!(
            runner.calls(),
            vec![vec![
                "losetup".to_string(),
                "--find".into(),
                "--show".into(),
                file.display().to_string()
            ]]
        );
    }

    #[tokio::test]
    async fn an_export_that_does_not_admit_this_host_is_never_attached() {
        let (d, l, runner, emu) = fixture();
        let rds = fs::canonicalize(d.path().join("rds")).unwrap();
        for slot in ["pvc-parked", "pvc-other", "pvc-mine"] {
            fs::write(rds.join(format!("{slot}.img")), "").unwrap();
        }
        export(
            &emu,
            "pvc-parked",
            Some("nqn.2014-08.io.srvlab.rds-csi:parked:pvc-parked"),
        );
        export(&emu, "pvc-other", Some("nqn.other-host"));
        export(&emu, "pvc-mine", Some("nqn.host"));
        for slot in ["pvc-parked", "pvc-other"] {
            let err = l.connect(&target(slot)).await.unwrap_err();
            assert!(
                matches!(&err, InitiatorError::Unavailable(m) if m.contains("admits only")),
                "{slot}: {err:?}"
            );
        }
        assert!(runner.calls().is_empty(), "nothing attached: {:?}", runner.calls());
        assert_eq!(
            l.connect(&target("pvc-mine")).await.unwrap(),
            PathBuf::from("/dev/loop5")
        );
        // An attached device is kept when the fence moves on (a live connection is not
        // re-checked): pvc-1 is attached, and its export now admits another host.
        export(&emu, "pvc-1", Some("nqn.other-host"));
        assert_eq!(
            l.connect(&target("pvc-1")).await.unwrap(),
            PathBuf::from("/dev/loop0")
        );
    }
}
