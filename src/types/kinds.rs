//! What a plugin instance is: which services it serves, how its node attaches volumes,
//! where it listens. Plain values the command line parses and every layer may read.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Which CSI services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity + Controller (the controller Deployment).
    Controller,
    /// Identity + Node (the node DaemonSet).
    Node,
    /// Identity + Controller + Node (development, the embedded default).
    All,
}

impl Mode {
    /// Serves the Controller service.
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
    /// Serves the Node service.
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
}

/// Which initiator the node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InitiatorKind {
    /// The kernel NVMe/TCP initiator through nvme-cli (production).
    Nvme,
    /// Loop devices over the embedded RDS's backing files (embedded default).
    Loop,
}

/// Where the CSI gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const HINT: &str = "expected unix:///absolute/path.sock or tcp://host:port";
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: the socket path must be absolute ({HINT})"));
            }
            if path.ends_with('/') {
                return Err(format!("{s:?}: the socket path names a directory ({HINT})"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp://") {
            use std::net::ToSocketAddrs;
            let mut addrs = addr
                .to_socket_addrs()
                .map_err(|e| format!("{s:?}: not a host:port address: {e} ({HINT})"))?;
            return addrs
                .next()
                .map(Endpoint::Tcp)
                .ok_or_else(|| format!("{s:?}: the address resolves to nothing ({HINT})"));
        }
        Err(format!("{s:?}: unknown scheme ({HINT})"))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parses_unix_and_tcp_and_explains_errors() {
        assert_eq!(
            "unix:///run/csi/csi.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/csi/csi.sock".into())
        );
        assert!(matches!(
            "tcp://127.0.0.1:10000".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp(_)
        ));
        for bad in [
            "/tmp/x.sock",
            "unix://relative.sock",
            "http://x",
            "tcp://nohost",
            "unix:///tmp/",
        ] {
            let err = bad.parse::<Endpoint>().unwrap_err();
            assert!(err.contains("expected unix://"), "{bad}: {err}");
        }
    }
}
