//! SSH transport to RouterOS (russh): each command runs as one `exec` channel.
//!
//! - Key authentication with an ed25519 or RSA private key read from a file (never
//!   logged; errors name the file, not its content).
//! - Host key verification is required: a pinned OpenSSH public key or a `SHA256:`
//!   fingerprint. [`HostKeyPolicy::InsecureAcceptAny`] exists only behind
//!   `--rds-insecure-skip-host-key-verification` (the caller logs the warning).
//! - Connect and per-command timeouts: a dead or silent server gives
//!   [`RdsError::Timeout`], never a hang.
//! - A small pool: up to `max_connections` SSH sessions reused across commands, each
//!   multiplexing channels; at most `max_channels` commands in flight overall (a
//!   semaphore). A session that fails or times out is dropped and re-opened by the next
//!   command; retry pacing (seeded backoff) is the adapter's, which alone knows which
//!   commands are safe to repeat.
//!
//! Lock order: the channel semaphore permit is taken before a pool slot's async mutex;
//! the slot mutex is held only while picking or (re)connecting that slot, never while a
//! command runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};

use super::{Connector, Transport};
use crate::metrics::RouterOsMetrics;
use crate::ports::rds::RdsError;
use crate::routeros::render::CommandLine;

/// Longest output of one command we read.
pub const MAX_OUTPUT: usize = 64 << 20;

/// How the server's host key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// The server must present exactly this key.
    Pinned(Box<PublicKey>),
    /// The server's key must have this SHA-256 fingerprint (`SHA256:...`).
    Fingerprint(String),
    /// Any key is accepted (insecure; opt-in only).
    InsecureAcceptAny,
}

impl HostKeyPolicy {
    /// Parses `--rds-host-key`: an OpenSSH public key line (`ssh-ed25519 AAAA... [comment]`)
    /// or a `SHA256:` fingerprint as `ssh-keygen -l` prints it.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some(fp) = s.strip_prefix("SHA256:") {
            if fp.is_empty()
                || !fp
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
            {
                return Err(format!(
                    "{s:?} is not a SHA256 fingerprint (SHA256:<base64>)"
                ));
            }
            return Ok(Self::Fingerprint(format!(
                "SHA256:{}",
                fp.trim_end_matches('=')
            )));
        }
        PublicKey::from_openssh(s)
            .map(|k| Self::Pinned(Box::new(k)))
            .map_err(|e| {
                format!(
                    "not an OpenSSH public key line (e.g. \"ssh-ed25519 AAAA...\") nor a \
                     SHA256:... fingerprint: {e}"
                )
            })
    }

    fn describe(&self) -> String {
        match self {
            Self::Pinned(k) => format!("pinned key {}", k.fingerprint(HashAlg::Sha256)),
            Self::Fingerprint(f) => format!("pinned fingerprint {f}"),
            Self::InsecureAcceptAny => "any key (verification disabled)".into(),
        }
    }

    fn accepts(&self, key: &PublicKey) -> bool {
        match self {
            Self::Pinned(k) => k.key_data() == key.key_data(),
            Self::Fingerprint(f) => {
                key.fingerprint(HashAlg::Sha256)
                    .to_string()
                    .trim_end_matches('=')
                    == f
            }
            Self::InsecureAcceptAny => true,
        }
    }
}

/// SSH settings.
#[derive(Clone)]
pub struct SshConfig {
    /// RouterOS user.
    pub user: String,
    /// Private key for the user.
    pub key: Arc<PrivateKey>,
    /// Host key check.
    pub host_key: HostKeyPolicy,
    /// Bound on TCP connect + SSH handshake + authentication.
    pub connect_timeout: Duration,
    /// Bound on one command, from opening its channel to its last byte.
    pub command_timeout: Duration,
    /// SSH sessions kept open and reused (≥ 1).
    pub max_connections: usize,
    /// Commands in flight at once over all sessions (≥ 1).
    pub max_channels: usize,
}

impl std::fmt::Debug for SshConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("SshConfig")
            .field("user", &self.user)
            .field("host_key", &self.host_key.describe())
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("max_connections", &self.max_connections)
            .field("max_channels", &self.max_channels)
            .finish_non_exhaustive()
    }
}

/// Reads a private key (OpenSSH or PEM; unencrypted) from `path`.
pub fn load_private_key(path: &std::path::Path) -> Result<Arc<PrivateKey>, String> {
    russh::keys::load_secret_key(path, None)
        .map(Arc::new)
        // The error names the file and the problem, never the key material.
        .map_err(|e| format!("{}: cannot load the SSH private key: {e}", path.display()))
}

/// The client side of one session: checks the host key, remembers why it refused it.
struct Client {
    policy: HostKeyPolicy,
    refused: Arc<std::sync::Mutex<Option<String>>>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) =
                Some("the server presented a certificate; pin its host key instead".into());
            return Ok(false);
        };
        if self.policy.accepts(key) {
            return Ok(true);
        }
        *self.refused.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
            "the server presented host key {} ({}), which does not match the {}; \
             if the RDS was reinstalled, verify its new key and update --rds-host-key",
            key.fingerprint(HashAlg::Sha256),
            key.algorithm().as_str(),
            self.policy.describe()
        ));
        Ok(false)
    }
}

type Session = client::Handle<Client>;

/// The SSH transport, over any [`Connector`] (tokio TCP; turmoil TCP in the simulation).
pub struct SshTransport<C: Connector> {
    connector: C,
    cfg: SshConfig,
    client_cfg: Arc<client::Config>,
    slots: Vec<tokio::sync::Mutex<Slot>>,
    next: AtomicUsize,
    channels: tokio::sync::Semaphore,
    metrics: RouterOsMetrics,
}

/// One pooled session.
#[derive(Default)]
struct Slot {
    session: Option<Arc<Session>>,
    /// A session was open here before (a new one is a reconnect).
    had_session: bool,
}

/// Counts a channel in flight while it lives (a cancelled command included).
struct InUse(prometheus_client::metrics::gauge::Gauge);

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl<C: Connector> std::fmt::Debug for SshTransport<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshTransport")
            .field("to", &self.connector.describe())
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl<C: Connector> SshTransport<C> {
    /// A transport that connects lazily through `connector`.
    pub fn new(connector: C, cfg: SshConfig) -> Self {
        let client_cfg = client::Config {
            // Pooled sessions idle between commands: keepalives detect a dead peer.
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        };
        let n = cfg.max_connections.max(1);
        Self {
            slots: (0..n).map(|_| tokio::sync::Mutex::new(Slot::default())).collect(),
            next: AtomicUsize::new(0),
            channels: tokio::sync::Semaphore::new(cfg.max_channels.max(1)),
            client_cfg: Arc::new(client_cfg),
            connector,
            cfg,
            metrics: RouterOsMetrics::default(),
        }
    }

    /// Records the pool's sessions, channels and (re)connects into `metrics` (the plugin's
    /// registry) instead of unregistered series.
    pub fn with_metrics(mut self, metrics: RouterOsMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Opens and authenticates a new session, within the connect timeout.
    async fn connect(&self) -> Result<Session, RdsError> {
        let to = self.connector.describe();
        let refused = Arc::new(std::sync::Mutex::new(None));
        let handler = Client {
            policy: self.cfg.host_key.clone(),
            refused: Arc::clone(&refused),
        };
        let attempt = async {
            let io = self
                .connector
                .connect()
                .await
                .map_err(|e| RdsError::Unavailable(format!("connecting to {to}: {e}")))?;
            let mut session =
                match client::connect_stream(Arc::clone(&self.client_cfg), io, handler).await {
                    Ok(s) => s,
                    Err(e) => {
                        if let Some(why) = refused.lock().unwrap_or_else(|p| p.into_inner()).take()
                        {
                            return Err(RdsError::HostKey(format!("{to}: {why}")));
                        }
                        return Err(RdsError::Unavailable(format!(
                            "SSH handshake with {to}: {e}"
                        )));
                    }
                };
            let hash = session
                .best_supported_rsa_hash()
                .await
                .map_err(|e| RdsError::Unavailable(format!("SSH handshake with {to}: {e}")))?
                .flatten();
            let auth = session
                .authenticate_publickey(
                    self.cfg.user.clone(),
                    PrivateKeyWithHashAlg::new(Arc::clone(&self.cfg.key), hash),
                )
                .await
                .map_err(|e| RdsError::Unavailable(format!("SSH authentication with {to}: {e}")))?;
            if !auth.success() {
                return Err(RdsError::Unavailable(format!(
                    "{to} refused SSH key authentication for user {:?} (key {}); \
                     check --rds-user and that the key is in the user's authorized keys",
                    self.cfg.user,
                    self.cfg.key.public_key().fingerprint(HashAlg::Sha256)
                )));
            }
            Ok(session)
        };
        match tokio::time::timeout(self.cfg.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(RdsError::Timeout(format!(
                "connecting to {to} (TCP + SSH handshake + authentication) took longer than {:?}",
                self.cfg.connect_timeout
            ))),
        }
    }

    /// A live pooled session (re-opened when closed).
    async fn session(&self) -> Result<Arc<Session>, RdsError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(s) = slot.session.as_ref() {
            if !s.is_closed() {
                return Ok(Arc::clone(s));
            }
            slot.session = None;
            self.metrics.ssh_connections().dec();
        }
        let connected = self.connect().await;
        self.metrics.ssh_connect(connected.is_ok(), slot.had_session);
        let s = Arc::new(connected?);
        slot.session = Some(Arc::clone(&s));
        slot.had_session = true;
        self.metrics.ssh_connections().inc();
        Ok(s)
    }

    /// Drops `s` from the pool (after an error or timeout on it).
    async fn evict(&self, s: &Arc<Session>) {
        for slot in &self.slots {
            let mut g = slot.lock().await;
            if g.session.as_ref().is_some_and(|x| Arc::ptr_eq(x, s)) {
                g.session = None;
                self.metrics.ssh_connections().dec();
            }
        }
    }

    async fn timed_exec(&self, s: &Session, cmd: &CommandLine) -> Result<String, RdsError> {
        let to = self.connector.describe();
        match tokio::time::timeout(self.cfg.command_timeout, exec(s, cmd.as_str())).await {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(RdsError::Unavailable(format!(
                "{to}: SSH channel failed during {:?}: {e} (the command may have been applied)",
                cmd.as_str()
            ))),
            Err(_) => Err(RdsError::Timeout(format!(
                "{to}: no complete reply to {:?} within {:?} (the command may have been applied)",
                cmd.as_str(),
                self.cfg.command_timeout
            ))),
        }
    }

    /// Runs one command on a fresh session and closes it: the earlier driver's way, kept
    /// for the benchmark's comparison.
    pub async fn run_unpooled(&self, cmd: &CommandLine) -> Result<String, RdsError> {
        let s = self.connect().await?;
        let out = self.timed_exec(&s, cmd).await;
        let _ = s
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        out
    }
}

/// Runs `line` on a new channel of `s` and collects stdout and stderr until the channel
/// closes.
async fn exec(s: &Session, line: &str) -> Result<String, russh::Error> {
    let mut ch = s.channel_open_session().await?;
    ch.exec(true, line).await?;
    let mut out: Vec<u8> = Vec::new();
    while let Some(msg) = ch.wait().await {
        match msg {
            russh::ChannelMsg::Data { data } | russh::ChannelMsg::ExtendedData { data, .. } => {
                if out.len() + data.len() > MAX_OUTPUT {
                    return Err(russh::Error::WrongChannel);
                }
                out.extend_from_slice(&data);
            }
            russh::ChannelMsg::Close => break,
            _ => {}
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[async_trait]
impl<C: Connector> Transport for SshTransport<C> {
    async fn run(&self, cmd: &CommandLine) -> Result<String, RdsError> {
        let _permit = self
            .channels
            .acquire()
            .await
            .map_err(|_| RdsError::Unavailable("SSH transport closed".into()))?;
        let channels = self.metrics.ssh_channels_in_use();
        channels.inc();
        let _in_use = InUse(channels);
        let s = self.session().await?;
        let result = self.timed_exec(&s, cmd).await;
        if result.is_err() {
            self.evict(&s).await;
        }
        result
    }
}
