//! The plugin binary end to end on a real unix socket: identity RPCs, socket ownership,
//! graceful stop, and configuration errors; gRPC reflection, in process.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::Plugin;
use rds_csi::proto::csi::{
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, ProbeRequest,
    identity_client::IdentityClient, plugin_capability,
};

#[tokio::test]
async fn identity_rpcs_answer_on_the_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(&dir.path().join("csi.sock"), &dir.path().join("state"), &[]);
    let mut client = IdentityClient::new(plugin.channel().await);

    let info = client
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "rds.csi.srvlab.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let caps = client
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let kinds: Vec<_> = caps.iter().map(|c| c.r#type.unwrap()).collect();
    use plugin_capability::{Type, service, volume_expansion};
    assert!(kinds.iter().any(
        |t| matches!(t, Type::Service(s) if s.r#type == service::Type::ControllerService as i32)
    ));
    assert!(kinds.iter().any(|t| matches!(t, Type::Service(s) if s.r#type == service::Type::VolumeAccessibilityConstraints as i32)));
    assert!(kinds.iter().any(|t| matches!(t, Type::VolumeExpansion(v) if v.r#type == volume_expansion::Type::Online as i32)));

    let probe = client.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test]
async fn node_mode_does_not_advertise_the_controller_service() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = Plugin::start(
        &dir.path().join("csi.sock"),
        &dir.path().join("state"),
        &["--mode", "node"],
    );
    let mut client = IdentityClient::new(plugin.channel().await);
    let caps = client
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use plugin_capability::{Type, service};
    assert!(!caps.capabilities.iter().any(|c| matches!(&c.r#type, Some(Type::Service(s)) if s.r#type == service::Type::ControllerService as i32)));
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    // A socket file nobody listens on, as left by a killed plugin.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let plugin = Plugin::start(&socket, &dir.path().join("state"), &[]);
    let mut client = IdentityClient::new(plugin.channel().await);
    assert!(
        client
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_socket_held_by_a_live_plugin_is_not_stolen() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let first = Plugin::start(&socket, &dir.path().join("state"), &[]);

    let mut second = Plugin::spawn(&socket, &dir.path().join("state2"), &[]);
    let status = second.child.wait().unwrap();
    let log = second.drain_log();
    assert!(!status.success());
    assert!(log.contains("in use by another running plugin"), "{log}");

    let mut client = IdentityClient::new(first.channel().await);
    assert!(
        client
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_regular_file_at_the_socket_path_is_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    std::fs::write(&socket, b"precious").unwrap();
    let mut plugin = Plugin::spawn(&socket, &dir.path().join("state"), &[]);
    assert!(!plugin.child.wait().unwrap().success());
    assert!(
        plugin
            .drain_log()
            .contains("is not a socket; refusing to replace it")
    );
    assert_eq!(std::fs::read(&socket).unwrap(), b"precious");
}

// Multi-threaded so the client's connection task can answer the server's GOAWAY while the
// test thread waits for the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_plugin_with_exit_code_zero_and_removes_the_socket() {
    for sig in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi.sock");
        let mut plugin = Plugin::start(&socket, &dir.path().join("state"), &[]);
        {
            let mut client = IdentityClient::new(plugin.channel().await);
            client.probe(ProbeRequest {}).await.unwrap();
        }
        plugin.signal(sig);
        let status = tokio::task::block_in_place(|| plugin.child.wait().unwrap());
        let log = plugin.drain_log();
        assert!(status.success(), "SIG{sig}: {status:?}\n{log}");
        assert!(log.contains(&format!("SIG{sig} received")), "{log}");
        assert!(!socket.exists());
    }
}

#[test]
fn a_bad_endpoint_is_explained_and_exits_non_zero() {
    for bad in [
        "/tmp/no-scheme.sock",
        "unix://relative.sock",
        "http://localhost:1",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_rds-csi-plugin"))
            .args(["--endpoint", bad])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--endpoint")
                && err.contains("expected unix:///absolute/path.sock or tcp://host:port"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn a_bad_driver_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rds-csi-plugin"))
        .arg("--endpoint")
        .arg(format!("unix://{}/csi.sock", dir.path().display()))
        .args(["--driver-name", "Not A Name", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be a domain name"));
}

/// The drain itself, in process: a Probe blocked inside the backend is still answered after
/// the stop signal, and the server returns only afterwards.
#[tokio::test]
async fn stop_signal_drains_an_in_flight_rpc() {
    use rds_csi::ports::rds::{Disk, DiskSpec, PoolCapacity, Rds, RdsError};
    use tokio::sync::Notify;

    /// An RDS whose ping waits until released (after the first, start-up, ping).
    struct SlowPing {
        entered: Notify,
        release: Notify,
        pings: std::sync::atomic::AtomicU32,
    }
    #[async_trait::async_trait]
    impl Rds for SlowPing {
        async fn ping(&self) -> Result<(), RdsError> {
            if self.pings.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                self.entered.notify_one();
                self.release.notified().await;
            }
            Ok(())
        }
        async fn create_disk(&self, _: &DiskSpec) -> Result<Disk, RdsError> {
            unreachable!()
        }
        async fn get_disk(&self, _: &str) -> Result<Option<Disk>, RdsError> {
            unreachable!()
        }
        async fn list_disks(&self, _: &str) -> Result<Vec<Disk>, RdsError> {
            // Start-up settles the exports of the disks there are: none.
            Ok(Vec::new())
        }
        async fn resize_disk(&self, _: &str, _: u64) -> Result<Disk, RdsError> {
            unreachable!()
        }
        async fn delete_disk(&self, _: &str) -> Result<(), RdsError> {
            unreachable!()
        }
        async fn capacity(&self) -> Result<PoolCapacity, RdsError> {
            unreachable!()
        }
        async fn set_allowed_host(&self, _: &str, _: Option<&str>) -> Result<(), RdsError> {
            unreachable!()
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let rds = Arc::new(SlowPing {
        entered: Notify::new(),
        release: Notify::new(),
        pings: 0.into(),
    });
    let plugin = common::controller_plugin(rds.clone(), dir.path()).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
        // The server polls this future; once it resolves, graceful shutdown has begun.
        let _ = seen_tx.send(());
    };
    let (channel, server) =
        common::serve_plugin(plugin, dir.path(), stop, Duration::from_secs(3600)).await;

    let mut client = IdentityClient::new(channel);
    let probe = tokio::spawn(async move { client.probe(ProbeRequest {}).await });
    rds.entered.notified().await;
    stop_tx.send(()).unwrap();
    seen_rx.await.unwrap();
    assert!(
        !server.is_finished(),
        "server stopped with an RPC in flight"
    );
    rds.release.notify_one();
    let answer = probe.await.unwrap().unwrap().into_inner();
    assert_eq!(answer.ready, Some(true));
    server.await.unwrap().unwrap();
}

/// The services gRPC reflection lists, in protocol version v1 and v1alpha, on `channel`.
async fn reflected_services(channel: tonic::transport::Channel) -> (Vec<String>, Vec<String>) {
    use tonic_reflection::pb::{v1, v1alpha};
    let mut c1 = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = c1
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("v1: not a service list");
    };
    let v1_names = list.service.into_iter().map(|s| s.name).collect();
    let mut c0 = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = c0
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("v1alpha: not a service list");
    };
    (v1_names, list.service.into_iter().map(|s| s.name).collect())
}

#[tokio::test]
async fn reflection_lists_the_csi_services_in_both_versions_on_every_server_of_a_process() {
    // The reflection services are decoded once per process and shared by every server the
    // process starts (the simulation starts thousands): each must still answer.
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let rds = rds_csi::routeros::in_memory_rds(1 << 40);
        let plugin = common::controller_plugin(rds, dir.path()).await;
        let (channel, _server) = common::serve_plugin(
            plugin,
            dir.path(),
            std::future::pending(),
            Duration::from_secs(1),
        )
        .await;
        let (v1, v1alpha) = reflected_services(channel).await;
        for names in [&v1, &v1alpha] {
            for want in ["csi.v1.Identity", "csi.v1.Controller", "csi.v1.Node"] {
                assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
            }
        }
    }
}
