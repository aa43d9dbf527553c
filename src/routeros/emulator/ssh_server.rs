//! The emulator behind a real SSH server (russh), for integration tests and benchmarks of
//! the SSH transport: public-key authentication against a list of authorized keys, one
//! command per `exec` channel, output on stdout, exit status 0/1, then EOF and close.
//! A dropped-reply fault leaves the channel open and silent (the client times out).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId};

use super::{Emulator, Outcome};

/// Who may log in, and the server's identity.
#[derive(Clone)]
pub struct SshServerConfig {
    /// The server's host key.
    pub host_key: PrivateKey,
    /// The user name accepted.
    pub user: String,
    /// Public keys accepted for that user.
    pub authorized_keys: Vec<PublicKey>,
    /// Counts accepted TCP connections (tests check that the client pools them).
    pub accepted: Arc<AtomicUsize>,
}

impl std::fmt::Debug for SshServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshServerConfig")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

struct Handler {
    emulator: Arc<Emulator>,
    user: String,
    authorized: Arc<Vec<PublicKey>>,
}

impl Handler {
    fn allowed(&self, user: &str, key: &PublicKey) -> Auth {
        if user == self.user
            && self
                .authorized
                .iter()
                .any(|k| k.key_data() == key.key_data())
        {
            Auth::Accept
        } else {
            Auth::reject()
        }
    }
}

impl server::Handler for Handler {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.allowed(user, offer.public_key))
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.allowed(user, key.public_key))
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)?;
        let line = String::from_utf8_lossy(data).into_owned();
        let handle = session.handle();
        let emulator = Arc::clone(&self.emulator);
        // Run off the session loop so channels of one connection proceed concurrently.
        tokio::spawn(async move {
            match emulator.execute(&line).await {
                Outcome::Reply(r) => {
                    let _ = handle.data(channel, r.output.into_bytes()).await;
                    let _ = handle
                        .exit_status_request(channel, if r.ok { 0 } else { 1 })
                        .await;
                    let _ = handle.eof(channel).await;
                    let _ = handle.close(channel).await;
                }
                Outcome::Dropped => {}
            }
        });
        Ok(())
    }
}

/// Serves SSH on `listener` until the listener fails; one task per connection.
pub async fn serve(
    emulator: Arc<Emulator>,
    listener: tokio::net::TcpListener,
    cfg: SshServerConfig,
) {
    let config = Arc::new(server::Config {
        keys: vec![cfg.host_key.clone()],
        auth_rejection_time: std::time::Duration::from_millis(10),
        auth_rejection_time_initial: Some(std::time::Duration::ZERO),
        nodelay: true,
        ..Default::default()
    });
    let authorized = Arc::new(cfg.authorized_keys.clone());
    while let Ok((stream, _)) = listener.accept().await {
        cfg.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let handler = Handler {
            emulator: Arc::clone(&emulator),
            user: cfg.user.clone(),
            authorized: Arc::clone(&authorized),
        };
        let config = Arc::clone(&config);
        tokio::spawn(async move {
            if let Ok(session) = server::run_stream(config, stream, handler).await {
                let _ = session.await;
            }
        });
    }
}
