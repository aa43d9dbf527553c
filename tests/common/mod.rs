//! Shared helpers of the integration tests: start the real plugin binary on a unix socket in
//! a temporary directory and wait (on its log, never on a timer) until it serves.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};

use tonic::transport::Channel;

/// A running plugin process, killed when dropped.
pub struct Plugin {
    pub child: Child,
    pub socket: PathBuf,
    pub stderr: BufReader<ChildStderr>,
    pub log: Vec<String>,
}

impl Plugin {
    /// Starts the plugin with `args` on `socket`, state under `state_dir`; returns once it
    /// logged that it serves (or panics with its log if it exited first).
    pub fn start(socket: &Path, state_dir: &Path, args: &[&str]) -> Plugin {
        let mut plugin = Self::spawn(socket, state_dir, args);
        plugin.wait_for_log("serving");
        plugin
    }

    /// Spawns without waiting.
    pub fn spawn(socket: &Path, state_dir: &Path, args: &[&str]) -> Plugin {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rds-csi-plugin"))
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--state-dir")
            .arg(state_dir)
            .args([
                "--node-id",
                "test-node",
                "--log-format",
                "text",
                "--log-level",
                "info",
            ])
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rds-csi-plugin");
        let stderr = BufReader::new(child.stderr.take().expect("stderr"));
        Plugin {
            child,
            socket: socket.to_path_buf(),
            stderr,
            log: Vec::new(),
        }
    }

    /// Reads the log until a line contains `needle`; panics with the log on EOF.
    pub fn wait_for_log(&mut self, needle: &str) {
        loop {
            let mut line = String::new();
            let n = self.stderr.read_line(&mut line).expect("read plugin log");
            if n == 0 {
                panic!(
                    "plugin exited before logging {needle:?}; log:\n{}",
                    self.log.join("")
                );
            }
            self.log.push(line.clone());
            if line.contains(needle) {
                return;
            }
        }
    }

    /// Reads the rest of the log (until the process closes stderr).
    pub fn drain_log(&mut self) -> String {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stderr, &mut rest).expect("read plugin log");
        self.log.push(rest);
        self.log.join("")
    }

    /// A gRPC channel to the plugin.
    pub async fn channel(&self) -> Channel {
        rds_csi::client::connect_unix(self.socket.clone())
            .await
            .expect("connect to plugin")
    }

    /// Sends a signal to the plugin.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Node id of the clusters the in-process drivers run in.
pub const TEST_NODE: &str = "node-a";

/// A started controller-mode plugin over `rds`, built by the composition root with its
/// local attachment store under `dir` and a local cluster holding the node [`TEST_NODE`].
pub async fn controller_plugin(
    rds: std::sync::Arc<dyn rds_csi::ports::Rds>,
    dir: &Path,
) -> rds_csi::compose::Plugin {
    use rds_csi::compose::{Seams, build};
    use rds_csi::ports::time::{SeededEntropy, SystemClock};
    use rds_csi::settings::Settings;
    use std::sync::Arc;
    let node = rds_csi::types::NodeId::new(TEST_NODE).unwrap();
    let settings = Settings::embedded(node, rds_csi::types::Mode::Controller, dir.join("state"));
    let mut seams = Seams::with(Arc::new(SystemClock), Arc::new(SeededEntropy::from_seed(7)));
    seams.rds = Some(rds);
    let plugin = build(&settings, seams).unwrap();
    plugin.start().await.unwrap();
    plugin
}

/// Serves `plugin` in this process on a unix socket in `dir` until `stop` resolves (then
/// drains for at most `drain`); returns a channel to it and the server task.
pub async fn serve_plugin(
    plugin: rds_csi::compose::Plugin,
    dir: &Path,
    stop: impl Future<Output = ()> + Send + 'static,
    drain: std::time::Duration,
) -> (
    Channel,
    tokio::task::JoinHandle<Result<(), rds_csi::server::ServeError>>,
) {
    let socket = dir.join("csi.sock");
    let (listener, guard) = rds_csi::server::bind_unix(&socket).await.unwrap();
    let server = tokio::spawn(async move {
        let _guard = guard;
        rds_csi::server::serve(
            plugin.services(),
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            stop,
            drain,
        )
        .await
    });
    let channel = rds_csi::client::connect_unix(socket).await.unwrap();
    (channel, server)
}
