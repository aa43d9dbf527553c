//! Benchmark of the controller on the embedded default (release, over the unix socket):
//!
//! 1. CreateVolume+DeleteVolume cycles per second with 1 and 16 concurrent callers;
//! 2. the same with ControllerPublishVolume+ControllerUnpublishVolume in each cycle;
//! 3. the RouterOS commands every controller RPC sends on its success path, counted at the
//!    RouterOS transport (each is one SSH round trip against a real RDS), with the
//!    data-path fence off and on.
//!
//! Run: `cargo bench --bench controller`. It prints its figures (and the machine's load
//! average, since wall-clock rates on a shared machine are noisy); it asserts nothing about
//! speed. RPCs a plugin does not serve are reported, not fatal, so the same bench measures
//! older versions too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use clap::Parser;
use rds_csi::cli::Cli;
use rds_csi::compose::{PortLayers, Seams};
use rds_csi::ports::rds::RdsError;
use rds_csi::proto::csi::{
    CapacityRange, ControllerExpandVolumeRequest, ControllerGetVolumeRequest,
    ControllerModifyVolumeRequest, ControllerPublishVolumeRequest,
    ControllerUnpublishVolumeRequest, CreateSnapshotRequest, CreateVolumeRequest,
    DeleteSnapshotRequest, DeleteVolumeRequest, GetCapacityRequest, GetSnapshotRequest,
    ListSnapshotsRequest, ListVolumesRequest, ProbeRequest, ValidateVolumeCapabilitiesRequest,
    VolumeCapability, VolumeContentSource,
    controller_client::ControllerClient,
    identity_client::IdentityClient,
    volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode},
    volume_content_source,
};
use rds_csi::routeros::render::CommandLine;
use rds_csi::routeros::transport::Transport;
use tonic::transport::Channel;

const ONE_CALLER_CYCLES: usize = 2000;
const SIXTEEN_CALLER_CYCLES: usize = 400;
const NODE: &str = "bench-node";

fn cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn create(name: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap()],
        ..Default::default()
    }
}

fn publish(volume: &str) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: volume.to_string(),
        node_id: NODE.to_string(),
        volume_capability: Some(cap()),
        ..Default::default()
    }
}

fn unpublish(volume: &str) -> ControllerUnpublishVolumeRequest {
    ControllerUnpublishVolumeRequest {
        volume_id: volume.to_string(),
        node_id: NODE.to_string(),
        ..Default::default()
    }
}

fn delete(volume: &str) -> DeleteVolumeRequest {
    DeleteVolumeRequest {
        volume_id: volume.to_string(),
        ..Default::default()
    }
}

/// The command lines the RouterOS transport sent since the last [`Log::take`].
#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl Log {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// A transport that records the first words of every command (`/disk print`, ...).
struct Counting {
    inner: Arc<dyn Transport>,
    log: Arc<Log>,
}

#[async_trait]
impl Transport for Counting {
    async fn run(&self, cmd: &CommandLine) -> Result<String, RdsError> {
        let words: Vec<&str> = cmd.as_str().split(' ').take(2).collect();
        self.log.0.lock().unwrap().push(words.join(" "));
        self.inner.run(cmd).await
    }
}

struct CountingLayers(Arc<Log>);

impl PortLayers for CountingLayers {
    fn transport(&self, port: Arc<dyn Transport>) -> Arc<dyn Transport> {
        Arc::new(Counting {
            inner: port,
            log: Arc::clone(&self.0),
        })
    }
}

/// A plugin on the embedded default in `dir`, served on a unix socket.
async fn serve(
    dir: &std::path::Path,
    mode: &str,
    fence: bool,
    layers: Option<Arc<Log>>,
) -> Channel {
    let socket = dir.join("csi.sock");
    let cli = Cli::parse_from([
        "rds-csi-plugin",
        "--endpoint",
        &format!("unix://{}", socket.display()),
        "--state-dir",
        &dir.join("state").display().to_string(),
        "--mode",
        mode,
        "--node-id",
        NODE,
    ]);
    let mut settings = cli.settings().expect("settings");
    settings.attachment.data_path_fence = fence;
    let mut seams = Seams::os();
    if let Some(log) = layers {
        seams.layers = Arc::new(CountingLayers(log));
    }
    let plugin = rds_csi::compose::build(&settings, seams).expect("plugin");
    plugin.start().await.expect("start");
    let (listener, guard) = rds_csi::server::bind_unix(&socket).await.expect("bind");
    std::mem::forget(guard); // the socket lives as long as the bench
    tokio::spawn(rds_csi::server::serve(
        plugin.services(),
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        std::future::pending(),
        Duration::from_secs(1),
    ));
    std::mem::forget(plugin);
    rds_csi::client::connect_unix(socket)
        .await
        .expect("connect")
}

/// Runs `cycles` cycles on each of `callers` callers; returns cycles per second.
async fn cycles(channel: &Channel, tag: &str, callers: usize, cycles: usize, attach: bool) -> f64 {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..callers {
        let mut c = ControllerClient::new(channel.clone());
        let tag = tag.to_string();
        tasks.push(tokio::spawn(async move {
            for i in 0..cycles {
                let name = format!("pvc-bench-{tag}-{callers}-{caller}-{i}");
                c.create_volume(create(&name)).await.expect("create");
                if attach {
                    c.controller_publish_volume(publish(&name))
                        .await
                        .expect("publish");
                    c.controller_unpublish_volume(unpublish(&name))
                        .await
                        .expect("unpublish");
                }
                c.delete_volume(delete(&name)).await.expect("delete");
            }
        }));
    }
    for t in tasks {
        t.await.expect("caller");
    }
    let secs = started.elapsed().as_secs_f64();
    let total = (callers * cycles) as f64;
    println!(
        "  {callers:>2} caller(s): {total:>6.0} cycles in {secs:>6.2} s = {:>8.1} cycles/s ({:.2} ms per cycle per caller)",
        total / secs,
        secs * 1000.0 * callers as f64 / total
    );
    total / secs
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Prints the commands each RPC sent, one line per RPC, in call order.
async fn command_counts(fence: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(Log::default());
    // The fence needs the node's host NQN, which the node plugin publishes at start-up.
    let mode = if fence { "all" } else { "controller" };
    let channel = serve(dir.path(), mode, fence, Some(Arc::clone(&log))).await;
    let mut c = ControllerClient::new(channel.clone());
    let mut id = IdentityClient::new(channel);
    log.take();
    println!(
        "RouterOS commands per RPC, success path (data-path fence {}):",
        if fence { "on" } else { "off" }
    );
    let report = |rpc: &str, ok: Result<(), tonic::Status>| {
        let sent = log.take();
        let mut counted: Vec<(String, usize)> = Vec::new();
        for s in sent.iter() {
            match counted.last_mut() {
                Some((last, n)) if *last == *s => *n += 1,
                _ => counted.push((s.clone(), 1)),
            }
        }
        let what: Vec<String> = counted
            .iter()
            .map(|(s, n)| {
                if *n > 1 {
                    format!("{s} x{n}")
                } else {
                    s.clone()
                }
            })
            .collect();
        match ok {
            Ok(()) => println!("  {rpc:<44} {:>2}  {}", sent.len(), what.join(", ")),
            Err(e) => println!("  {rpc:<44}  -  {:?}: {}", e.code(), e.message()),
        }
    };
    macro_rules! call {
        ($rpc:expr, $f:expr) => {{
            let r = $f.await.map(|_| ());
            report($rpc, r);
        }};
    }
    call!("Probe", id.probe(ProbeRequest {}));
    call!("GetCapacity", c.get_capacity(GetCapacityRequest::default()));
    call!("CreateVolume", c.create_volume(create("pvc-a")));
    call!("CreateVolume (repeated)", c.create_volume(create("pvc-a")));
    call!(
        "CreateVolume (name that is no RDS slot)",
        c.create_volume(create("volume with spaces+plus"))
    );
    call!(
        "ValidateVolumeCapabilities",
        c.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-a".into(),
            volume_capabilities: vec![cap()],
            ..Default::default()
        })
    );
    call!(
        "ControllerGetVolume",
        c.controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-a".into()
        })
    );
    call!("ListVolumes", c.list_volumes(ListVolumesRequest::default()));
    call!(
        "ControllerPublishVolume",
        c.controller_publish_volume(publish("pvc-a"))
    );
    call!(
        "ControllerPublishVolume (repeated)",
        c.controller_publish_volume(publish("pvc-a"))
    );
    call!(
        "ControllerUnpublishVolume",
        c.controller_unpublish_volume(unpublish("pvc-a"))
    );
    call!(
        "ControllerExpandVolume",
        c.controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: "pvc-a".into(),
            capacity_range: Some(CapacityRange {
                required_bytes: 2 << 30,
                limit_bytes: 0
            }),
            volume_capability: Some(cap()),
            ..Default::default()
        })
    );
    call!(
        "ControllerModifyVolume",
        c.controller_modify_volume(ControllerModifyVolumeRequest {
            volume_id: "pvc-a".into(),
            mutable_parameters: HashMap::from([("ctrlLossTmo".into(), "60".into())]),
            ..Default::default()
        })
    );
    let snap = CreateSnapshotRequest {
        source_volume_id: "pvc-a".into(),
        name: "snap-a".into(),
        ..Default::default()
    };
    call!("CreateSnapshot", c.create_snapshot(snap.clone()));
    call!("CreateSnapshot (repeated)", c.create_snapshot(snap));
    call!(
        "GetSnapshot",
        c.get_snapshot(GetSnapshotRequest {
            snapshot_id: "snap-a".into(),
            ..Default::default()
        })
    );
    call!(
        "ListSnapshots",
        c.list_snapshots(ListSnapshotsRequest::default())
    );
    let mut restore = create("pvc-restored");
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "snap-a".into(),
            },
        )),
    });
    restore.capacity_range = None;
    call!(
        "CreateVolume (restore a snapshot)",
        c.create_volume(restore)
    );
    let mut clone = create("pvc-clone");
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Volume(
            volume_content_source::VolumeSource {
                volume_id: "pvc-a".into(),
            },
        )),
    });
    clone.capacity_range = None;
    call!("CreateVolume (clone a volume)", c.create_volume(clone));
    call!(
        "DeleteSnapshot",
        c.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: "snap-a".into(),
            ..Default::default()
        })
    );
    call!("DeleteVolume", c.delete_volume(delete("pvc-a")));
    call!(
        "DeleteVolume (already gone)",
        c.delete_volume(delete("pvc-a"))
    );
    println!();
}

#[tokio::main]
async fn main() {
    println!("load average at start: {}", loadavg());
    for (attach, title) in [
        (false, "CreateVolume+DeleteVolume"),
        (
            true,
            "CreateVolume+ControllerPublishVolume+ControllerUnpublishVolume+DeleteVolume",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let channel = serve(dir.path(), "controller", false, None).await;
        println!("{title} over a unix socket, embedded backend:");
        let tag = if attach { "p" } else { "c" };
        cycles(&channel, tag, 1, ONE_CALLER_CYCLES, attach).await;
        cycles(&channel, tag, 16, SIXTEEN_CALLER_CYCLES, attach).await;
    }
    println!("load average at end: {}\n", loadavg());
    command_counts(false).await;
    command_counts(true).await;
}
