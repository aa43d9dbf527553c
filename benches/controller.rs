//! Benchmark: CreateVolume + DeleteVolume cycles per second over the unix socket, on the
//! embedded backend (the RouterOS emulator on files), with 1 and 16 concurrent callers.
//! Run: `cargo bench --bench controller` (release). Prints its figures; asserts nothing
//! about speed.

use std::time::{Duration, Instant};

use clap::Parser;
use rds_csi::cli::Cli;
use rds_csi::proto::csi::{
    CapacityRange, CreateVolumeRequest, DeleteVolumeRequest, VolumeCapability,
    controller_client::ControllerClient,
    volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode},
};

const CYCLES_PER_CALLER: usize = 200;

fn req(name: String) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name,
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }],
        ..Default::default()
    }
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("csi.sock");
    let cli = Cli::parse_from([
        "rds-csi-plugin",
        "--endpoint",
        &format!("unix://{}", socket.display()),
        "--state-dir",
        &dir.path().join("state").display().to_string(),
        "--mode",
        "controller",
        "--node-id",
        "bench-node",
    ]);
    let settings = cli.settings().expect("settings");
    let plugin = rds_csi::compose::build(&settings, rds_csi::compose::Seams::os()).expect("plugin");
    plugin.start().await.expect("start");
    let (listener, _guard) = rds_csi::server::bind_unix(&socket).await.expect("bind");
    tokio::spawn(rds_csi::server::serve(
        plugin.services(),
        tokio_stream::wrappers::UnixListenerStream::new(listener),
        std::future::pending(),
        Duration::from_secs(1),
    ));
    let channel = rds_csi::client::connect_unix(socket)
        .await
        .expect("connect");

    println!(
        "CreateVolume+DeleteVolume over a unix socket, embedded backend ({CYCLES_PER_CALLER} cycles per caller)"
    );
    for callers in [1usize, 16] {
        let started = Instant::now();
        let mut tasks = Vec::new();
        for caller in 0..callers {
            let mut c = ControllerClient::new(channel.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..CYCLES_PER_CALLER {
                    let name = format!("pvc-bench-{callers}-{caller}-{i}");
                    c.create_volume(req(name.clone())).await.expect("create");
                    c.delete_volume(DeleteVolumeRequest {
                        volume_id: name,
                        ..Default::default()
                    })
                    .await
                    .expect("delete");
                }
            }));
        }
        for t in tasks {
            t.await.expect("caller");
        }
        let secs = started.elapsed().as_secs_f64();
        let cycles = (callers * CYCLES_PER_CALLER) as f64;
        println!(
            "  {callers:>2} caller(s): {cycles:>6.0} cycles in {secs:>6.2} s = {:>8.1} cycles/s ({:.2} ms per cycle per caller)",
            cycles / secs,
            secs * 1000.0 * callers as f64 / cycles
        );
    }
}
