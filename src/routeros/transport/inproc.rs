//! In-process transport: hands the command text straight to an [`Emulator`] (the
//! plugin's embedded default). The text still goes through the renderer, the emulator's
//! CLI reader and the parser, exactly as over SSH.

use std::sync::Arc;

use async_trait::async_trait;

use super::Transport;
use crate::ports::rds::RdsError;
use crate::routeros::emulator::{Emulator, Outcome};
use crate::routeros::render::CommandLine;

/// Runs commands on an in-process emulator.
#[derive(Debug, Clone)]
pub struct InProcess {
    emulator: Arc<Emulator>,
}

impl InProcess {
    /// Over `emulator`.
    pub fn new(emulator: Arc<Emulator>) -> Self {
        Self { emulator }
    }
    /// The emulator.
    pub fn emulator(&self) -> &Arc<Emulator> {
        &self.emulator
    }
}

#[async_trait]
impl Transport for InProcess {
    async fn run(&self, cmd: &CommandLine) -> Result<String, RdsError> {
        match self.emulator.execute(cmd.as_str()).await {
            Outcome::Reply(r) => Ok(r.output),
            Outcome::Dropped => Err(RdsError::Timeout(format!(
                "{cmd}: the reply was lost (the command may have been applied)"
            ))),
        }
    }
}
