//! A plain TCP line protocol to the emulator, for the simulation (over turmoil TCP) and
//! tests. Generic over [`Connector`] and any `AsyncRead + AsyncWrite` stream.
//!
//! Protocol: the client sends one command line ending in `\n`; the server answers
//! `ok <len>\n` or `err <len>\n` followed by exactly `len` bytes of output. A dropped
//! reply (fault) closes the connection without an answer. One command at a time per
//! connection; the client keeps one connection and reconnects after any error.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::{Connector, Transport};
use crate::ports::rds::RdsError;
use crate::routeros::emulator::{Emulator, Outcome};
use crate::routeros::render::CommandLine;

/// Longest command line the server reads.
pub const MAX_LINE: usize = 64 * 1024;
/// Longest reply the client reads.
pub const MAX_REPLY: usize = 64 << 20;

/// Serves one connection until the peer closes it or a reply is dropped.
pub async fn serve_connection<S>(emulator: Arc<Emulator>, stream: S) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut stream = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut stream)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "command line too long or unterminated",
            ));
        }
        line.pop();
        let text = String::from_utf8_lossy(&line).into_owned();
        match emulator.execute(&text).await {
            Outcome::Reply(r) => {
                let head = format!("{} {}\n", if r.ok { "ok" } else { "err" }, r.output.len());
                stream.get_mut().write_all(head.as_bytes()).await?;
                stream.get_mut().write_all(r.output.as_bytes()).await?;
                stream.get_mut().flush().await?;
            }
            Outcome::Dropped => return Ok(()),
        }
    }
}

/// Accepts connections on a tokio listener and serves each on its own task.
pub async fn serve_listener(emulator: Arc<Emulator>, listener: tokio::net::TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let emu = Arc::clone(&emulator);
        tokio::spawn(async move {
            let _ = serve_connection(emu, stream).await;
        });
    }
}

/// Client of the line protocol.
pub struct TcpTransport<C: Connector> {
    connector: C,
    conn: tokio::sync::Mutex<Option<BufReader<C::Io>>>,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl<C: Connector> TcpTransport<C> {
    /// A client that connects lazily through `connector`.
    pub fn new(connector: C, connect_timeout: Duration, command_timeout: Duration) -> Self {
        Self {
            connector,
            conn: tokio::sync::Mutex::new(None),
            connect_timeout,
            command_timeout,
        }
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    text: &str,
) -> std::io::Result<String> {
    s.get_mut().write_all(text.as_bytes()).await?;
    s.get_mut().write_all(b"\n").await?;
    s.get_mut().flush().await?;
    let mut head = String::new();
    (&mut *s).take(64).read_line(&mut head).await?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad reply header");
    let (_status, len) = head.trim_end().split_once(' ').ok_or_else(bad)?;
    let len: usize = len.parse().map_err(|_| bad())?;
    if len > MAX_REPLY {
        return Err(bad());
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    String::from_utf8(body).map_err(|_| bad())
}

#[async_trait]
impl<C: Connector> Transport for TcpTransport<C> {
    async fn run(&self, cmd: &CommandLine) -> Result<String, RdsError> {
        // An async mutex: one command at a time on the single connection.
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            let io = tokio::time::timeout(self.connect_timeout, self.connector.connect())
                .await
                .map_err(|_| {
                    RdsError::Timeout(format!(
                        "connecting to {} took longer than {:?}",
                        self.connector.describe(),
                        self.connect_timeout
                    ))
                })?
                .map_err(|e| {
                    RdsError::Unavailable(format!(
                        "connecting to {}: {e}",
                        self.connector.describe()
                    ))
                })?;
            *guard = Some(BufReader::new(io));
        }
        // Taken out for the exchange and put back only after a whole reply: if this future
        // is dropped mid-exchange (the caller's deadline), the connection is dropped with
        // it instead of being left with a reply in flight for the next command to read.
        let Some(mut conn) = guard.take() else {
            return Err(RdsError::Unavailable("no connection".into()));
        };
        let result =
            tokio::time::timeout(self.command_timeout, exchange(&mut conn, cmd.as_str())).await;
        match result {
            Ok(Ok(out)) => {
                *guard = Some(conn);
                Ok(out)
            }
            Ok(Err(e)) => {
                Err(RdsError::Unavailable(format!(
                    "{}: connection lost during {cmd:?}: {e} (the command may have been applied)",
                    self.connector.describe(),
                    cmd = cmd.as_str()
                )))
            }
            Err(_) => {
                Err(RdsError::Timeout(format!(
                    "{}: no reply to {:?} within {:?}",
                    self.connector.describe(),
                    cmd.as_str(),
                    self.command_timeout
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::Rds;
    use crate::ports::rds::{DiskSpec, NvmeExport};
    use crate::ports::time::{SeededEntropy, SystemClock};
    use crate::routeros::command::CommandKind;
    use crate::routeros::emulator::PoolConfig;
    use crate::routeros::emulator::faults::Fault;
    use crate::routeros::{RdsLayout, RouterOsRds};

    /// An in-memory emulator with a pool `raid1` of `size_bytes`.
    fn emulator(size_bytes: u64) -> Arc<Emulator> {
        Arc::new(Emulator::in_memory(
            PoolConfig {
                slot: "raid1".into(),
                mount_point: "raid1".into(),
                size_bytes,
            },
            Arc::new(SystemClock),
        ))
    }

    /// A connector over in-memory duplex pipes, each served by the emulator: the same
    /// shape as a turmoil `TcpStream` connector in the simulation.
    struct Pipe(Arc<Emulator>);

    #[async_trait]
    impl Connector for Pipe {
        type Io = tokio::io::DuplexStream;
        async fn connect(&self) -> std::io::Result<Self::Io> {
            let (client, server) = tokio::io::duplex(64 * 1024);
            tokio::spawn(serve_connection(Arc::clone(&self.0), server));
            Ok(client)
        }
        fn describe(&self) -> String {
            "pipe".into()
        }
    }

    #[tokio::test]
    async fn adapter_over_the_line_protocol_survives_lost_replies() {
        let emu = emulator(10 << 30);
        let transport = TcpTransport::new(
            Pipe(Arc::clone(&emu)),
            Duration::from_secs(5),
            Duration::from_secs(5),
        );
        let rds = RouterOsRds::new(
            transport,
            &RdsLayout {
                volume_base_path: "raid1/k8s".into(),
                pool_mount_point: "raid1".into(),
            },
            crate::retry::Backoff {
                base: Duration::from_millis(1),
                max: Duration::from_millis(2),
                max_attempts: 3,
            },
            Arc::new(SeededEntropy::from_seed(5)),
        )
        .unwrap();
        let spec = DiskSpec {
            slot: "pvc-1".into(),
            size_bytes: 1 << 30,
            export: Some(NvmeExport {
                port: 4420,
                nqn: "nqn.2000-02.com.mikrotik:pvc-1".into(),
            }),
            copy_from: None,
            comment: None,
            allowed_host_nqn: None,
        };
        // The reply is dropped: the connection closes, the adapter reconnects and observes.
        emu.faults().push(CommandKind::DiskAdd, Fault::DropReply);
        assert_eq!(rds.create_disk(&spec).await.unwrap().size_bytes, 1 << 30);
        assert_eq!(rds.capacity().await.unwrap().free_bytes, 9 << 30);
        rds.delete_disk("pvc-1").await.unwrap();
        assert!(emu.file_names().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_cancelled_mid_exchange_does_not_hand_its_reply_to_the_next() {
        use crate::routeros::command::{Command, DiskFilter, PrintStyle};
        let emu = emulator(1 << 30);
        let render = crate::routeros::render::Renderer::new("raid1/k8s").unwrap();
        let print = render
            .render(&Command::DiskPrint {
                filter: DiskFilter::All,
                style: PrintStyle::Terse,
            })
            .unwrap();
        let monitor = render
            .render(&Command::MonitorTraffic {
                slot: "nope".into(),
            })
            .unwrap();
        let transport = TcpTransport::new(
            Pipe(Arc::clone(&emu)),
            Duration::from_secs(5),
            Duration::from_secs(5),
        );
        // The print's reply is slow; its caller gives up first (a gRPC deadline).
        emu.faults()
            .push(CommandKind::DiskPrint, Fault::Delay(Duration::from_secs(1)));
        let gave_up =
            tokio::time::timeout(Duration::from_millis(100), transport.run(&print)).await;
        assert!(gave_up.is_err(), "the print was cut short");
        // The next command gets its own reply, not the print's.
        let out = transport.run(&monitor).await.unwrap();
        assert!(out.contains("no such item"), "{out}");
        assert!(!out.contains("raid1"), "{out}");
    }

    #[tokio::test]
    async fn oversized_and_garbage_lines_close_the_connection_without_panicking() {
        let emu = emulator(1 << 30);
        let (mut client, server) = tokio::io::duplex(4 * MAX_LINE);
        let task = tokio::spawn(serve_connection(Arc::clone(&emu), server));
        client.write_all(b"/disk frobnicate\n").await.unwrap();
        let mut head = String::new();
        let mut reader = BufReader::new(&mut client);
        reader.read_line(&mut head).await.unwrap();
        assert!(head.starts_with("err "), "{head}");
        let len: usize = head.trim_end()[4..].parse().unwrap();
        let mut body = vec![0; len];
        reader.read_exact(&mut body).await.unwrap();
        assert!(String::from_utf8(body).unwrap().starts_with("bad command name"));
        client.write_all(&vec![b'a'; MAX_LINE + 10]).await.unwrap();
        assert!(task.await.unwrap().is_err());
    }
}
