//! The data path between the nodes' kernels and the RDS, as the checkers see it: each NVMe
//! connection a node's kernel holds, whether it is live at the RDS, and the writes that
//! reach the disk through it.
//!
//! A connection is made by NodeStage through the RDS's allow list (the kernels refuse what
//! the allow lists exclude, [`crate::world::Shared::sync_data_path`]), so it starts live.
//! Whether it is live is the node kernel's ([`rds_csi::node::fake::FakeKernel`]): a node
//! partitioned while alive loses it, and so does every node while the RDS is down; the
//! kernel keeps reconnecting (until its `ctrl-loss-tmo`), and each attempt is admitted or
//! refused by the export's allow list *at that moment* (mirrored into the kernel; the trace
//! says which, from [`rds_csi::routeros::emulator::Emulator::admission`]) — exactly what
//! the data-path fence is for. A live connection is not re-checked when the allow list
//! changes (as with a real NVMe/TCP target).
//!
//! Every [`WRITE_EVERY`] of virtual time (at its multiples, whatever the steps: the same
//! writes whether idle stretches are skipped or stepped through) each live connection whose
//! device is in use (a filesystem mount or a raw block bind: its kubelet kept the mount;
//! dirty pages, journal) writes, and each write is judged: it may only reach a disk whose
//! durable records (the PV annotations) name the writing node a holder. And at every step:
//! no disk is deleted while a node still has a live connection in use to it. A connection
//! nothing uses (one an unstage left behind in an earlier life of the node, until the
//! node's orphan sweep removes it) carries no I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rds_csi::ports::Initiator;
use rds_csi::ports::initiator::Connection;
use rds_csi::routeros::emulator::Admission;
use rds_csi::types::defaults::DEFAULT_NQN_PREFIX;

use crate::world::{Shared, in_use, node_name};

/// How often each live connection writes (virtual time).
pub const WRITE_EVERY: Duration = Duration::from_millis(500);

/// One connection a node's kernel holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Live at the RDS: its writes reach the disk.
    Live,
    /// Lost (the node is cut off), reconnecting.
    Reconnecting,
    /// Reconnected, but the export's allow list refused it: reconnecting still.
    Refused,
}

/// The data path of one scenario.
#[derive(Debug, Default)]
pub struct DataPath {
    links: BTreeMap<(usize, String), Link>,
    next_write: Duration,
    /// Writes judged so far.
    pub writes: u64,
}

impl DataPath {
    /// When the next write is due, if a connection is live to make it: the driver loop
    /// runs no idle stretch past it.
    pub fn next_write_due(&self) -> Option<Duration> {
        self.links
            .values()
            .any(|l| *l == Link::Live)
            .then_some(self.next_write)
    }

    /// Follows the kernels' connections after a step at `now`: links lost and regained,
    /// writes made and judged. Returns the violations.
    pub fn step(&mut self, sh: &Shared, now: Duration) -> Vec<String> {
        let mut bad = Vec::new();
        let write_now = now >= self.next_write;
        if write_now {
            let every = WRITE_EVERY.as_millis();
            let next = (now.as_millis() / every + 1) * every;
            self.next_write = Duration::from_millis(u64::try_from(next).unwrap_or(u64::MAX));
        }
        let mut seen = BTreeSet::new();
        for (i, kernel) in sh.kernels.iter().enumerate() {
            let conns =
                futures::executor::block_on(Initiator::connections(kernel)).unwrap_or_default();
            if conns.is_empty() {
                continue;
            }
            let node = node_name(i);
            let partitioned = sh.partitioned_since(i).is_some();
            for c in conns {
                let Connection { nqn, device, .. } = c;
                let Some(slot) = nqn.strip_prefix(DEFAULT_NQN_PREFIX) else {
                    continue;
                };
                let slot = slot.to_string();
                seen.insert((i, nqn.clone()));
                // The kernel's controller says whether the link is live (it reconnects through
                // the allow lists mirrored into it); while it is not, the export's allow list
                // says whether its attempts are refused or the RDS is just away.
                let live = !partitioned && kernel.is_live(&nqn);
                let link = self.links.entry((i, nqn)).or_insert(Link::Live);
                let was = *link;
                *link = if live {
                    Link::Live
                } else if partitioned {
                    Link::Reconnecting
                } else {
                    match sh.emulator.admission(&slot, &sh.host_nqn_now(i)) {
                        Admission::Admitted => Link::Reconnecting,
                        _ => Link::Refused,
                    }
                };
                if *link != was {
                    let what = match link {
                        Link::Live => "reconnects: admitted",
                        Link::Reconnecting => "loses its connection: reconnecting",
                        Link::Refused => "reconnects: refused by the export's allow list",
                    };
                    sh.trace.at(now, "data", format!("{node} {what} ({slot})"));
                }
                if *link != Link::Live || !in_use(kernel, &device) {
                    continue;
                }
                if sh.emulator.disk_size(&slot).is_none() {
                    bad.push(format!(
                        "{slot} was deleted while {node} still has a live connection to it"
                    ));
                }
                if write_now {
                    self.writes += 1;
                    let holders = sh.stored_holders(&slot);
                    if !holders.as_ref().is_some_and(|h| h.contains(&node)) {
                        bad.push(format!(
                            "I/O from {node} reached {slot}, which it does not hold (holders \
                             in the store: {holders:?})"
                        ));
                    }
                }
            }
        }
        self.links.retain(|k, _| seen.contains(k));
        bad
    }
}
