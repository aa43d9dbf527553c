//! The `Rds` adapter over real SSH: russh client → the emulator's russh server on
//! 127.0.0.1 with a pinned host key. No sleeps: every wait is bounded by the transport's
//! own timeouts, and an outer bound turns a hang into a failure.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rds_csi::ports::Rds;
use rds_csi::ports::rds::{DiskSpec, NvmeExport, RdsError};
use rds_csi::ports::time::{SeededEntropy, SystemClock};
use rds_csi::retry::Backoff;
use rds_csi::routeros::command::CommandKind;
use rds_csi::routeros::emulator::faults::Fault;
use rds_csi::routeros::emulator::ssh_server::{self, SshServerConfig};
use rds_csi::routeros::emulator::{Emulator, PoolConfig};
use rds_csi::routeros::transport::TcpConnector;
use rds_csi::routeros::transport::ssh::{HostKeyPolicy, SshConfig, SshTransport, load_private_key};
use rds_csi::routeros::{RdsLayout, RouterOsRds};
use russh::keys::PublicKey;

const GIB: u64 = 1 << 30;
const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/routeros/ssh");

fn public(name: &str) -> String {
    std::fs::read_to_string(format!("{KEYS}/{name}.pub")).unwrap()
}

struct Server {
    addr: String,
    emulator: Arc<Emulator>,
    accepted: Arc<AtomicUsize>,
}

async fn server() -> Server {
    let emulator = Arc::new(Emulator::in_memory(
        PoolConfig {
            slot: "raid1".into(),
            mount_point: "storage-pool".into(),
            size_bytes: 100 * GIB,
        },
        Arc::new(SystemClock),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let cfg = SshServerConfig {
        host_key: (*load_private_key(format!("{KEYS}/host_ed25519").as_ref()).unwrap()).clone(),
        user: "rds-csi".into(),
        authorized_keys: ["client_ed25519", "client_rsa"]
            .iter()
            .map(|k| PublicKey::from_openssh(&public(k)).unwrap())
            .collect(),
        accepted: Arc::clone(&accepted),
    };
    tokio::spawn(ssh_server::serve(Arc::clone(&emulator), listener, cfg));
    Server {
        addr,
        emulator,
        accepted,
    }
}

fn ssh_config(key: &str, host_key: HostKeyPolicy) -> SshConfig {
    SshConfig {
        user: "rds-csi".into(),
        key: load_private_key(format!("{KEYS}/{key}").as_ref()).unwrap(),
        host_key,
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        max_connections: 2,
        max_channels: 4,
    }
}

fn adapter(addr: &str, cfg: SshConfig) -> RouterOsRds<SshTransport<TcpConnector>> {
    RouterOsRds::new(
        SshTransport::new(
            TcpConnector {
                addr: addr.to_string(),
            },
            cfg,
        ),
        &RdsLayout {
            volume_base_path: "/storage-pool/kubernetes".into(),
            pool_mount_point: "storage-pool".into(),
        },
        Backoff {
            base: Duration::from_millis(1),
            max: Duration::from_millis(10),
            max_attempts: 2,
        },
        Arc::new(SeededEntropy::from_seed(42)),
    )
    .unwrap()
}

fn pinned(name: &str) -> HostKeyPolicy {
    HostKeyPolicy::parse(&public(name)).unwrap()
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

/// Fails the test instead of hanging.
async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("the operation hung")
}

#[tokio::test]
async fn adapter_over_ssh_creates_lists_resizes_snapshots_clones_and_deletes() {
    let srv = server().await;
    let rds = adapter(
        &srv.addr,
        ssh_config("client_ed25519", pinned("host_ed25519")),
    );
    bounded(async {
        rds.ping().await.unwrap();
        let d = rds
            .create_disk(&spec("pvc-a", GIB + GIB / 2))
            .await
            .unwrap();
        assert_eq!(d.size_bytes, GIB + GIB / 2);
        assert_eq!(d.file_path, "storage-pool/kubernetes/pvc-a.img");
        rds.create_disk(&spec("pvc-b", GIB)).await.unwrap();
        let slots: Vec<String> = rds
            .list_disks("pvc-")
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.slot)
            .collect();
        assert_eq!(slots, ["pvc-a", "pvc-b"]);
        assert_eq!(
            rds.resize_disk("pvc-a", 5 * GIB + 3)
                .await
                .unwrap()
                .size_bytes,
            5 * GIB + 3
        );
        let snap = rds
            .create_snapshot("pvc-a", "snap-a", "rds-csi-snapshot-of:pvc-a")
            .await
            .unwrap();
        assert_eq!((snap.size_bytes, snap.export), (5 * GIB + 3, None));
        assert_eq!(rds.list_snapshots("snap-").await.unwrap().len(), 1);
        let clone = rds
            .create_disk(&DiskSpec {
                copy_from: Some("snap-a".to_string()),
                ..spec("pvc-c", 6 * GIB)
            })
            .await
            .unwrap();
        assert_eq!(clone.size_bytes, 6 * GIB);
        rds.set_allowed_host("pvc-c", Some("nqn.2014-08.org.nvmexpress:uuid:42"))
            .await
            .unwrap();
        let cap = rds.capacity().await.unwrap();
        assert_eq!(
            cap.free_bytes,
            100 * GIB - (GIB + 5 * GIB + 3 + 5 * GIB + 3 + 6 * GIB)
        );
        for slot in ["pvc-a", "pvc-b", "pvc-c", "snap-a", "pvc-a"] {
            rds.delete_disk(slot).await.unwrap();
        }
        assert!(rds.list_disks("").await.unwrap().is_empty());
    })
    .await;
    assert!(srv.emulator.disk_slots().is_empty());
    assert!(srv.emulator.file_names().is_empty());
    // Dozens of commands, over the pool's two sessions at most.
    let accepted = srv.accepted.load(Ordering::Relaxed);
    assert!((1..=2).contains(&accepted), "{accepted} connections");
}

#[tokio::test]
async fn rsa_client_key_and_fingerprint_pin_work() {
    let srv = server().await;
    let fp = std::process::Command::new("ssh-keygen")
        .args(["-lf", &format!("{KEYS}/host_ed25519.pub")])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
        // The fingerprint of the committed test host key.
        .unwrap_or_else(|| "SHA256:Q7XO5JDejOrfjrV/kI0Ih9MsOGOoz3vrU6Oil4LeB7k".into());
    let policy = HostKeyPolicy::parse(&fp).unwrap();
    let rds = adapter(&srv.addr, ssh_config("client_rsa", policy));
    bounded(rds.ping()).await.unwrap();
}

#[tokio::test]
async fn wrong_host_key_is_refused_with_a_clear_error() {
    let srv = server().await;
    let rds = adapter(
        &srv.addr,
        ssh_config("client_ed25519", pinned("other_host_ed25519")),
    );
    let err = bounded(rds.create_disk(&spec("pvc-a", GIB)))
        .await
        .unwrap_err();
    let RdsError::HostKey(msg) = &err else {
        panic!("expected a host key error, got {err:?}");
    };
    assert!(
        msg.contains("does not match the pinned key SHA256:"),
        "{msg}"
    );
    assert!(msg.contains(&srv.addr), "{msg}");
    assert!(srv.emulator.disk_slots().is_empty());
}

#[tokio::test]
async fn unknown_client_key_is_refused_with_a_clear_error() {
    let srv = server().await;
    // The other host key doubles as an unauthorized client key.
    let rds = adapter(
        &srv.addr,
        ssh_config("other_host_ed25519", pinned("host_ed25519")),
    );
    let err = bounded(rds.ping()).await.unwrap_err();
    assert!(
        matches!(&err, RdsError::Unavailable(m) if m.contains("refused SSH key authentication")),
        "{err:?}"
    );
}

#[tokio::test]
async fn dead_server_gives_a_timeout_not_a_hang() {
    // A server that accepts TCP (the kernel's backlog) but never speaks SSH.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut cfg = ssh_config("client_ed25519", pinned("host_ed25519"));
    cfg.connect_timeout = Duration::from_millis(300);
    let rds = adapter(&addr, cfg);
    let err = bounded(rds.ping()).await.unwrap_err();
    assert!(
        matches!(&err, RdsError::Timeout(m) if m.contains("took longer than")),
        "{err:?}"
    );
    drop(listener);
}

#[tokio::test]
async fn silent_reply_times_out_and_a_write_is_resolved_by_observing() {
    let srv = server().await;
    let mut cfg = ssh_config("client_ed25519", pinned("host_ed25519"));
    cfg.command_timeout = Duration::from_millis(500);
    let rds = adapter(&srv.addr, cfg);
    // The add is applied but its reply never comes: the adapter times out, reconnects,
    // observes the disk as asked, and succeeds without adding twice.
    srv.emulator
        .faults()
        .push(CommandKind::DiskAdd, Fault::DropReply);
    let d = bounded(rds.create_disk(&spec("pvc-a", GIB))).await.unwrap();
    assert_eq!(d.size_bytes, GIB);
    assert_eq!(srv.emulator.disk_slots(), ["pvc-a"]);
}

fn settings(args: &[&str]) -> Result<rds_csi::settings::Settings, rds_csi::server::ServeError> {
    use clap::Parser;
    let mut all = vec!["rds-csi-plugin", "--node-id", "n1", "--mode", "controller"];
    all.extend_from_slice(args);
    rds_csi::cli::Cli::try_parse_from(all)
        .unwrap()
        .settings_in(false)
}

fn config_error(args: &[&str]) -> String {
    match settings(args) {
        Err(rds_csi::server::ServeError::Config(m)) => m,
        Err(e) => panic!("expected a configuration error, got {e}"),
        Ok(_) => panic!("expected a configuration error for {args:?}"),
    }
}

#[tokio::test]
async fn rds_flags_build_the_ssh_adapter_and_refuse_unsafe_configurations() {
    let key = format!("{KEYS}/client_ed25519");
    let host = public("host_ed25519");
    // Without an address: the embedded backend.
    assert!(matches!(
        settings(&[]).unwrap().rds.access,
        rds_csi::settings::RdsAccess::Embedded
    ));
    assert!(config_error(&["--rds-address", "127.0.0.1"]).contains("--rds-key-file"));
    assert!(
        config_error(&["--rds-address", "127.0.0.1", "--rds-key-file", &key])
            .contains("--rds-host-key: required")
    );
    assert!(
        config_error(&[
            "--rds-address",
            "127.0.0.1",
            "--rds-key-file",
            &key,
            "--rds-host-key",
            &host,
            "--rds-insecure-skip-host-key-verification",
        ])
        .contains("exclude each other")
    );
    assert!(
        config_error(&[
            "--rds-address",
            "127.0.0.1",
            "--rds-key-file",
            &format!("{KEYS}/missing"),
            "--rds-host-key",
            &host,
        ])
        .contains("cannot load the SSH private key")
    );
    assert!(
        config_error(&[
            "--rds-address",
            "127.0.0.1",
            "--rds-key-file",
            &key,
            "--rds-host-key",
            "not a key",
        ])
        .contains("--rds-host-key")
    );
    // The flags as a deployment passes them reach a working adapter.
    let srv = server().await;
    let (ip, port) = srv.addr.rsplit_once(':').unwrap();
    let state = tempfile::tempdir().unwrap();
    let state_dir = state.path().display().to_string();
    let settings = settings(&[
        "--state-dir",
        &state_dir,
        "--rds-address",
        ip,
        "--rds-port",
        port,
        "--rds-user",
        "rds-csi",
        "--rds-key-file",
        &key,
        "--rds-host-key",
        &host,
        "--rds-volume-path",
        "/storage-pool/kubernetes",
    ])
    .unwrap();
    let seams = rds_csi::compose::Seams::with(
        Arc::new(rds_csi::ports::time::SystemClock),
        Arc::new(SeededEntropy::from_seed(1)),
    );
    let plugin = rds_csi::compose::build(&settings, seams).unwrap();
    let rds = plugin.rds().unwrap();
    let d = bounded(rds.create_disk(&spec("pvc-flags", GIB)))
        .await
        .unwrap();
    assert_eq!(d.file_path, "storage-pool/kubernetes/pvc-flags.img");
    assert_eq!(bounded(rds.capacity()).await.unwrap().free_bytes, 99 * GIB);
}
