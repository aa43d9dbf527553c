//! Measures the node path on real loop devices (root only): per-operation latency of
//! stage (connect + mkfs on first use + mount), publish, stats, unpublish and unstage, for
//! ext4, xfs and raw block volumes.
//!
//! Run: `cargo run --release --example node_bench [-- ROUNDS]` (default 20 rounds).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rds_csi::node::exec::TokioRunner;
use rds_csi::node::ops::{NodeAccess, NodeCapability, Publish, Stage, VolumeKind};
use rds_csi::node::{COMMAND_TIMEOUT, NodeOps, NodeOptions, SYSCALL_TIMEOUT};
use rds_csi::ports::initiator::NvmeTarget;
use rds_csi::routeros::command::{Command, DiskAdd, ExportSpec};
use rds_csi::settings::EMBEDDED_VOLUME_PATH;
use rds_csi::types::VolumeId;

fn summary(name: &str, v: &mut [Duration]) {
    v.sort();
    let total: Duration = v.iter().sum();
    let mean = total / v.len().max(1) as u32;
    println!(
        "{name:<28} n={:<4} mean={:>8.2}ms p50={:>8.2}ms max={:>8.2}ms",
        v.len(),
        mean.as_secs_f64() * 1e3,
        v[v.len() / 2].as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().expect("tempdir");
    let root = std::fs::canonicalize(dir.path()).expect("canonicalize");
    // The embedded RDS's layout: its tables admit the loop initiator to each export.
    let emulator =
        rds_csi::compose::embedded_emulator(&root, Arc::new(rds_csi::ports::time::SystemClock))
            .expect("embedded RDS");
    let vols = rds_csi::compose::embedded_volume_dir(&root);
    let prefix = rds_csi::types::defaults::DEFAULT_NQN_PREFIX;
    let runner = Arc::new(TokioRunner::new(COMMAND_TIMEOUT));
    let init = Arc::new(rds_csi::node::loopdev::LoopInitiator::new(
        runner.clone(),
        &vols,
        &rds_csi::compose::embedded_rds_dir(&root),
        prefix.into(),
        "nqn.bench".into(),
    ));
    let mounter = Arc::new(rds_csi::node::mount::RealMounter::new(
        runner,
        SYSCALL_TIMEOUT,
    ));
    let ops = NodeOps::new(init, mounter, NodeOptions::default());

    let kinds: [(&str, VolumeKind, u64); 3] = [
        (
            "ext4",
            VolumeKind::Mount {
                fs_type: "ext4".into(),
                flags: vec![],
            },
            256 << 20,
        ),
        (
            "xfs",
            VolumeKind::Mount {
                fs_type: "xfs".into(),
                flags: vec![],
            },
            320 << 20,
        ),
        ("block", VolumeKind::Block, 64 << 20),
    ];
    println!("node_bench: {rounds} rounds per kind on loop devices");
    for (label, kind, size) in kinds {
        let id = VolumeId::new(format!("bench-{label}")).expect("id");
        let nqn = format!("{prefix}{id}");
        let add = emulator.apply(&Command::DiskAdd(DiskAdd {
            slot: id.to_string(),
            file_path: format!("{EMBEDDED_VOLUME_PATH}/{id}.img"),
            size_bytes: Some(size),
            copy_from: None,
            export: Some(ExportSpec {
                port: 4420,
                nqn: nqn.clone(),
                allow_host: None,
            }),
            comment: None,
        }));
        assert!(add.ok, "backing disk: {}", add.output);
        let cap = NodeCapability {
            kind: kind.clone(),
            access: NodeAccess::Writer,
        };
        let staging = root.join(format!("stage-{label}"));
        let target = root.join(format!("target-{label}"));
        let nvme = NvmeTarget {
            address: String::new(),
            port: 4420,
            nqn,
            ctrl_loss_tmo: None,
            reconnect_delay: None,
            keep_alive_tmo: None,
        };
        let stage = Stage {
            volume_id: id.clone(),
            staging_path: staging.clone(),
            cap: cap.clone(),
            target: nvme.clone(),
        };
        let publish = Publish {
            volume_id: id.clone(),
            staging_path: staging.clone(),
            target_path: target.clone(),
            cap,
            readonly: false,
            target: nvme,
        };
        let mut t: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
        for round in 0..rounds {
            let s = Instant::now();
            ops.stage(&stage).await.expect("stage");
            t.entry(if round == 0 {
                "stage (first round, mkfs)"
            } else {
                "stage"
            })
            .or_default()
            .push(s.elapsed());
            let s = Instant::now();
            ops.stage(&stage).await.expect("stage again");
            t.entry("stage (already staged)")
                .or_default()
                .push(s.elapsed());
            let s = Instant::now();
            ops.publish(&publish).await.expect("publish");
            t.entry("publish").or_default().push(s.elapsed());
            let s = Instant::now();
            ops.stats(&id, &target).await.expect("stats");
            t.entry("stats").or_default().push(s.elapsed());
            let s = Instant::now();
            ops.unpublish(&id, &target).await.expect("unpublish");
            t.entry("unpublish").or_default().push(s.elapsed());
            let s = Instant::now();
            ops.unstage(&id, &staging).await.expect("unstage");
            t.entry("unstage").or_default().push(s.elapsed());
        }
        println!("-- {label} ({} MiB)", size >> 20);
        for (name, mut v) in t {
            summary(name, &mut v);
        }
        assert!(!Path::new(&target).exists());
    }
}
