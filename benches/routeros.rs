//! RouterOS layer figures, printed (not asserted): run with `cargo bench --bench routeros`.
//!
//! 1. Parsing: `/disk print detail` of 10,000 file-backed disks as the emulator prints
//!    them (wrapped lines, quoted values, units), parsed and typed.
//! 2. Commands per second on loopback against the emulator's SSH server: the pooled SSH
//!    transport vs a new SSH session per command (the earlier Go driver's way).
//!    Target: the pool at least 5× faster.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use rds_csi::ports::time::SystemClock;
use rds_csi::routeros::command::{Command, DiskAdd, DiskFilter, ExportSpec, PrintStyle};
use rds_csi::routeros::emulator::ssh_server::{self, SshServerConfig};
use rds_csi::routeros::emulator::{Emulator, PoolConfig};
use rds_csi::routeros::parse::{DiskInfo, parse_print};
use rds_csi::routeros::render::Renderer;
use rds_csi::routeros::transport::ssh::{HostKeyPolicy, SshConfig, SshTransport, load_private_key};
use rds_csi::routeros::transport::{TcpConnector, Transport};
use russh::keys::PublicKey;

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/routeros/ssh");
const RECORDS: usize = 10_000;

fn emulator_with(n: usize, renderer: &Renderer) -> Arc<Emulator> {
    let emu = Emulator::in_memory(
        PoolConfig {
            slot: "raid1".into(),
            mount_point: "storage-pool".into(),
            size_bytes: 1 << 60,
        },
        Arc::new(SystemClock),
    );
    for i in 0..n {
        let slot = format!("pvc-{i:08x}-8d7b-4c1e-9a0f-1b2c3d4e5f60");
        let r = emu.apply(&Command::DiskAdd(DiskAdd {
            file_path: renderer.file_path_for(&slot),
            size_bytes: Some(((i as u64 % 97) + 1) << 30),
            copy_from: None,
            comment: None,
            export: Some(ExportSpec {
                port: 4420,
                nqn: format!("nqn.2000-02.com.mikrotik:{slot}"),
                allow_host: (i % 3 == 0).then(|| format!("nqn.2014-08.org.nvmexpress:uuid:{i}")),
            }),
            slot,
        }));
        assert!(r.ok, "{}", r.output);
    }
    Arc::new(emu)
}

fn bench_parse(renderer: &Renderer) {
    let emu = emulator_with(RECORDS, renderer);
    let out = emu
        .apply(&Command::DiskPrint {
            filter: DiskFilter::SlotPrefix("pvc-".into()),
            style: PrintStyle::Detail,
        })
        .output;
    let rounds = 5;
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        let records = parse_print(&out).expect("parse");
        let disks: Vec<DiskInfo> = records
            .iter()
            .map(|r| DiskInfo::from_record(r).expect("typed"))
            .collect();
        let el = t.elapsed();
        assert_eq!(disks.len(), RECORDS);
        best = best.min(el);
    }
    println!(
        "parse: {RECORDS} disk records ({:.1} MiB of `print detail`, {} lines) in {:.1} ms \
         (best of {rounds}) = {:.0} records/s, {:.0} MiB/s",
        out.len() as f64 / (1 << 20) as f64,
        out.lines().count(),
        best.as_secs_f64() * 1e3,
        RECORDS as f64 / best.as_secs_f64(),
        out.len() as f64 / (1 << 20) as f64 / best.as_secs_f64(),
    );
}

async fn bench_ssh(renderer: &Renderer) {
    let emu = emulator_with(20, renderer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let cfg = SshServerConfig {
        host_key: (*load_private_key(format!("{KEYS}/host_ed25519").as_ref()).expect("host key"))
            .clone(),
        user: "rds-csi".into(),
        authorized_keys: vec![
            PublicKey::from_openssh(
                &std::fs::read_to_string(format!("{KEYS}/client_ed25519.pub")).expect("pub"),
            )
            .expect("pub"),
        ],
        accepted: Arc::new(AtomicUsize::new(0)),
    };
    tokio::spawn(ssh_server::serve(emu, listener, cfg));
    let host = std::fs::read_to_string(format!("{KEYS}/host_ed25519.pub")).expect("pub");
    let transport = Arc::new(SshTransport::new(
        TcpConnector { addr },
        SshConfig {
            user: "rds-csi".into(),
            key: load_private_key(format!("{KEYS}/client_ed25519").as_ref()).expect("key"),
            host_key: HostKeyPolicy::parse(&host).expect("host key"),
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(10),
            max_connections: 2,
            max_channels: 8,
        },
    ));
    let get = renderer
        .render(&Command::DiskPrint {
            filter: DiskFilter::Slot("pvc-00000003-8d7b-4c1e-9a0f-1b2c3d4e5f60".into()),
            style: PrintStyle::Detail,
        })
        .expect("render");

    // Warm up (first connection, JIT-free but caches).
    transport.run(&get).await.expect("warm-up");
    transport.run_unpooled(&get).await.expect("warm-up");

    let n_pool = 2000;
    let t = Instant::now();
    for _ in 0..n_pool {
        let out = transport.run(&get).await.expect("pooled");
        assert_eq!(parse_print(&out).expect("parse").len(), 1);
    }
    let pool_seq = n_pool as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let tr = Arc::clone(&transport);
        let get = get.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n_pool / 8 {
                tr.run(&get).await.expect("pooled");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let pool_conc = n_pool as f64 / t.elapsed().as_secs_f64();

    let n_new = 200;
    let t = Instant::now();
    for _ in 0..n_new {
        let out = transport.run_unpooled(&get).await.expect("unpooled");
        assert_eq!(parse_print(&out).expect("parse").len(), 1);
    }
    let per_session = n_new as f64 / t.elapsed().as_secs_f64();

    println!("ssh (loopback, ed25519, `/disk print detail where slot=...` + parse):");
    println!("  pooled, sequential:               {pool_seq:>8.0} commands/s ({n_pool} commands)");
    println!("  pooled, 8 in flight (2 sessions): {pool_conc:>8.0} commands/s ({n_pool} commands)");
    println!(
        "  new SSH session per command:      {per_session:>8.0} commands/s ({n_new} commands)"
    );
    println!(
        "  pool speed-up: {:.1}x sequential, {:.1}x concurrent (target: >= 5x)",
        pool_seq / per_session,
        pool_conc / per_session
    );
}

fn main() {
    let renderer = Renderer::new("/storage-pool/kubernetes").expect("base path");
    bench_parse(&renderer);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench_ssh(&renderer));
}
