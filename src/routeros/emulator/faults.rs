//! Fault hooks of the emulator, per command kind, for the simulation to drive: fail with
//! a RouterOS error, delay, or apply the command but drop its reply.
//!
//! Faults are queued per [`CommandKind`] and consumed one per command, in order, so a
//! seeded schedule gives the same run every time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use crate::routeros::command::CommandKind;

/// What happens to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Not applied; RouterOS prints this error line (e.g. `failure: device busy`).
    Fail(String),
    /// Applied after this delay (the client's timeout may fire first).
    Delay(Duration),
    /// Applied, but the reply never reaches the client.
    DropReply,
}

/// Queued faults, per command kind. The mutex is never held across `.await`.
#[derive(Debug, Default)]
pub struct Faults {
    queued: Mutex<BTreeMap<CommandKind, VecDeque<Fault>>>,
}

impl Faults {
    /// Queues `fault` for the next command of `kind`.
    pub fn push(&self, kind: CommandKind, fault: Fault) {
        self.lock().entry(kind).or_default().push_back(fault);
    }

    /// Drops every queued fault.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Takes the next fault for a command of `kind`, if any.
    pub fn take(&self, kind: CommandKind) -> Option<Fault> {
        self.lock().get_mut(&kind).and_then(VecDeque::pop_front)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<CommandKind, VecDeque<Fault>>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }
}
