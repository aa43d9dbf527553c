//! Transports: they only move rendered command text to RouterOS and its output back.
//!
//! A [`Transport`] takes a [`CommandLine`] (which only the renderer can build) and
//! returns the raw output; interpreting it is the parser's job and retrying is the
//! adapter's (it knows which commands are reads and how to observe a write). Errors are
//! [`RdsError::Unavailable`] (not connected or connection lost) or [`RdsError::Timeout`]
//! (sent, no complete answer in time: the command may or may not have been applied), and
//! [`RdsError::HostKey`] for a host key mismatch.

pub mod inproc;
pub mod ssh;
pub mod tcp;

use async_trait::async_trait;

use crate::ports::rds::RdsError;
use crate::routeros::render::CommandLine;

/// Moves one command to RouterOS and its output back.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Runs `cmd` and returns everything it printed.
    async fn run(&self, cmd: &CommandLine) -> Result<String, RdsError>;
}

#[async_trait]
impl<T: Transport + ?Sized> Transport for std::sync::Arc<T> {
    async fn run(&self, cmd: &CommandLine) -> Result<String, RdsError> {
        (**self).run(cmd).await
    }
}

/// Opens byte streams to the RDS: a tokio `TcpStream` in production, a turmoil
/// `TcpStream` in the simulation.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    /// The stream type.
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// Opens a new stream.
    async fn connect(&self) -> std::io::Result<Self::Io>;
    /// Where it connects to, for messages.
    fn describe(&self) -> String;
}

/// Connects to `host:port` with tokio TCP (no delay: commands are small).
#[derive(Debug, Clone)]
pub struct TcpConnector {
    /// `host:port`.
    pub addr: String,
}

#[async_trait]
impl Connector for TcpConnector {
    type Io = tokio::net::TcpStream;

    async fn connect(&self) -> std::io::Result<Self::Io> {
        let s = tokio::net::TcpStream::connect(&self.addr).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    fn describe(&self) -> String {
        self.addr.clone()
    }
}
