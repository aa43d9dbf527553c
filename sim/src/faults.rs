//! Fault injection: a seeded schedule of controller crashes, crash points around the
//! attachment write, failovers, partitions and flaky links between the leading controller
//! and kube or rds, 409 storms, API 5xx bursts and latency spikes, RDS command failures and
//! lost replies, node plugin crashes (some leaving the restarted node a connection it does
//! not hold), lost node machines (Node object deleted, the machine replaced later by a fresh
//! one with a new host NQN under the same name), a node partitioned while alive, NVMe
//! controllers lost under their mounts, and an RDS outage (the `rds` host down, every
//! node's controllers reconnecting, some longer than the kernel's 600 s ctrl-loss-tmo); and
//! the heal that starts the liveness phase, once the chaos phase and the outage are over.
//!
//! A node partitioned while alive outlives the heal: it is the case the data-path fence
//! exists for (Kubernetes force-detaches its volumes six minutes after it stopped
//! reporting, while it still has them mounted), so it heals on its own schedule, 20–420 s
//! after it began.
//!
//! The nodes' kernels keep time through [`Injector::tick`] (reconnect attempts,
//! ctrl-loss-tmo).
//!
//! Crash points are armed here and reached by a wrapper at the `AttachmentStore` port
//! boundary ([`crate::crash`]), never by luck.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::{RngExt, SeedableRng, rngs::StdRng};
use rds_csi::kube::fake_api::Kind;
use rds_csi::routeros::command::CommandKind;
use rds_csi::routeros::emulator::faults::Fault;
use rds_csi::types::defaults::DEFAULT_NQN_PREFIX;

use crate::crash::Point;
use crate::options::FORCE_DETACH_SECS;
use crate::world::{CONTROLLERS, Leader, Shared, node_name};

const RDS_KINDS: [CommandKind; 5] = [
    CommandKind::DiskAdd,
    CommandKind::DiskSet,
    CommandKind::DiskPrint,
    CommandKind::DiskRemove,
    CommandKind::FileRemove,
];

/// The seeded fault schedule of one scenario.
pub struct Injector {
    rng: StdRng,
    /// The watch faults' own draws: the other faults' schedule stays what it was before
    /// watch faults existed.
    watch_rng: StdRng,
    next: Duration,
    every: Duration,
    chaos_end: Duration,
    partitions: Vec<(Duration, &'static str, &'static str)>,
    flaky: Vec<(Duration, &'static str, &'static str)>,
    /// The lost node, and when its replacement comes up.
    lost: Option<(Duration, usize)>,
    lost_a_node: bool,
    /// The node partitioned while alive, and when the partition heals.
    cut_off: Option<(Duration, usize)>,
    /// When the partitioned node's partition ended, and which node it was.
    partition_healed: Option<(Duration, usize)>,
    partitioned_a_node: bool,
    /// When the API latency spike ends.
    spike_until: Option<Duration>,
    stale_until: Duration,
    /// The RDS outage: when it starts and ends, and whether it is on.
    outage: Option<(Duration, Duration)>,
    outage_on: bool,
    healed: bool,
    /// Faults injected, by kind.
    pub counts: BTreeMap<&'static str, u64>,
}

impl Injector {
    /// The schedule of `sh`'s options.
    pub fn new(sh: &Shared) -> Self {
        let o = &sh.opts;
        Self {
            rng: StdRng::seed_from_u64(o.seed ^ 0xfa_17),
            watch_rng: StdRng::seed_from_u64(o.seed ^ 0x3a7c_4ed5),
            next: Duration::from_millis(o.fault_every_ms),
            every: Duration::from_millis(o.fault_every_ms),
            chaos_end: Duration::from_secs(o.chaos_secs),
            partitions: Vec::new(),
            flaky: Vec::new(),
            lost: None,
            lost_a_node: false,
            cut_off: None,
            partition_healed: None,
            partitioned_a_node: false,
            spike_until: None,
            stale_until: Duration::ZERO,
            outage: o.rds_outage.map(|(at_ms, secs)| {
                let at = Duration::from_millis(at_ms);
                (at, at + Duration::from_secs(secs))
            }),
            outage_on: false,
            healed: false,
            counts: BTreeMap::new(),
        }
    }

    /// When the chaos phase ends (no new faults after it).
    pub fn chaos_end(&self) -> Duration {
        self.chaos_end
    }

    /// When the world heals and the liveness phase starts: the end of the chaos phase, or
    /// of the RDS outage if that is later.
    pub fn heal_at(&self) -> Duration {
        self.outage
            .map_or(self.chaos_end, |(_, end)| end.max(self.chaos_end))
    }

    /// When node `i` heals: the world's heal, or the end of its partition while alive if
    /// that came later.
    pub fn heal_of(&self, i: usize) -> Duration {
        match self.partition_healed {
            Some((at, j)) if j == i => at.max(self.heal_at()),
            _ => self.heal_at(),
        }
    }

    /// Whether a node's machine was lost, or a node partitioned while alive, in this
    /// scenario: its volumes wait for Kubernetes' force-detach.
    pub fn lost_a_node(&self) -> bool {
        self.lost_a_node || self.partitioned_a_node
    }

    /// Hosts a partitioned node is cut off from on the simulated network: the CO, which
    /// plays its kubelet and the control plane (its kernel's link to the RDS is the data
    /// path's, cut through [`Shared::set_partitioned`] and the kernel's unreachability).
    const NODE_PEERS: [&'static str; 1] = ["co"];

    fn count(&mut self, kind: &'static str, sh: &Shared, now: Duration, what: String) {
        *self.counts.entry(kind).or_default() += 1;
        sh.trace.at(now, "fault", what);
    }

    fn roll(&mut self, pct: u32) -> bool {
        pct > 0 && self.rng.random_range(0..100) < pct
    }

    /// Called after every simulation step at virtual time `now`.
    pub fn tick(&mut self, sim: &mut turmoil::Sim<'_>, sh: &Shared, now: Duration) {
        if let Some((p, host)) = sh.crash.take_fired() {
            self.count("crash_point", sh, now, format!("{host} crashes at {p:?}"));
            sim.bounce(host);
        }
        for k in &sh.kernels {
            k.advance(now);
        }
        self.rds_outage(sim, sh, now);
        let healing = now >= self.heal_at();
        for (_, a, b) in take_due(&mut self.partitions, now, healing) {
            sim.repair(a, b);
            sh.trace.at(now, "fault", format!("repair {a}<->{b}"));
        }
        for (_, a, b) in take_due(&mut self.flaky, now, healing) {
            sim.set_link_fail_rate(a, b, 0.0);
            sh.trace.at(now, "fault", format!("{a}<->{b} steady again"));
        }
        if let Some((back, i)) = self.lost
            && (back <= now || healing)
        {
            self.lost = None;
            let name = node_name(i);
            // A fresh machine under the same name: re-provisioned, with a new host NQN.
            let generation = sh.node_life(i).generation;
            sh.kernels[i].set_host_nqn(&crate::world::host_nqn_of_machine(i, generation));
            sh.forget_data_path();
            sh.api
                .put_object(Kind::Node, "", crate::world::node_object(i, generation));
            sh.restore_node(i);
            sim.bounce(name.as_str());
            sh.trace.at(
                now,
                "fault",
                format!(
                    "{name} back as a fresh machine (host NQN {})",
                    sh.host_nqn_now(i)
                ),
            );
        }
        // The partitioned node heals on its own schedule, not at the heal.
        if let Some((until, i)) = self.cut_off
            && until <= now
        {
            self.cut_off = None;
            self.partition_healed = Some((now, i));
            let name = node_name(i);
            for peer in Self::NODE_PEERS {
                sim.repair(name.as_str(), peer);
            }
            // During an RDS outage the kernel stays cut off until the RDS is back.
            if !self.outage_on {
                sh.kernels[i].outage_ends();
            }
            sh.set_partitioned(i, None);
            sh.trace
                .at(now, "fault", format!("{name}: partition heals"));
        }
        if let Some(until) = self.spike_until
            && (until <= now || healing)
        {
            self.spike_until = None;
            sh.api
                .set_latency(Duration::from_millis(sh.opts.api_latency_ms));
            sh.trace.at(now, "fault", "API latency back to normal");
        }
        let l = sh.leader();
        if let Some(stale) = l.stale
            && (now >= self.stale_until || healing)
        {
            sh.set_leader(Leader {
                active: l.active,
                stale: None,
            });
            sh.trace.at(
                now,
                "fault",
                format!("{stale} learns it lost the lease: its sidecars stop calling it"),
            );
        }
        if healing {
            if !self.healed {
                self.healed = true;
                sh.emulator.faults().clear();
                // Storms queued while nothing wrote would otherwise meet the first writes
                // of the liveness phase (the reconcilers' Lease: seed 1557).
                sh.api.clear_injected_faults();
                sh.crash.disarm();
                sh.trace
                    .at(now, "fault", "heal: faults off, liveness phase");
            }
            return;
        }
        if now < self.next || now >= self.chaos_end {
            return;
        }
        self.next += self.every;
        let o = Arc::clone(&sh.opts);
        let leader = sh.leader();
        if self.roll(o.bounce_pct) {
            let host = leader.active;
            self.count("bounce", sh, now, format!("{host} crash + restart"));
            sim.bounce(host);
        }
        if leader.stale.is_none() && self.roll(o.failover_pct) {
            // The other replica takes the lease (and starts over from the API, as an
            // elected replica does); the old leader's sidecars have not noticed yet and
            // keep working their queues against it until `stale_until`.
            let new = if leader.active == CONTROLLERS[0] {
                CONTROLLERS[1]
            } else {
                CONTROLLERS[0]
            };
            let ms = self.rng.random_range(1_000..=10_000);
            sim.bounce(new);
            sh.set_leader(Leader {
                active: new,
                stale: Some(leader.active),
            });
            self.stale_until = now + Duration::from_millis(ms);
            self.count(
                "failover",
                sh,
                now,
                format!(
                    "failover {} -> {new}, old leader stale for {ms}ms",
                    leader.active
                ),
            );
        }
        if self.roll(o.crash_point_pct) {
            let p = if self.rng.random_bool(0.5) {
                Point::BeforeWrite
            } else {
                Point::AfterWrite
            };
            sh.crash.arm(p);
            sh.trace.at(now, "fault", format!("arm crash point {p:?}"));
        }
        if self.roll(o.partition_pct) {
            let other = self.backend();
            let ms = self.rng.random_range(500..=15_000);
            let host = leader.active;
            sim.partition(host, other);
            self.partitions
                .push((now + Duration::from_millis(ms), host, other));
            self.count(
                "partition",
                sh,
                now,
                format!("partition {host}<->{other} for {ms}ms"),
            );
        }
        if self.roll(o.flaky_link_pct) {
            let other = self.backend();
            let ms = self.rng.random_range(1_000..=10_000);
            let rate = self.rng.random_range(1..=5u32);
            let host = leader.active;
            sim.set_link_fail_rate(host, other, f64::from(rate) / 1000.0);
            self.flaky
                .push((now + Duration::from_millis(ms), host, other));
            self.count(
                "flaky_link",
                sh,
                now,
                format!("{host}<->{other} drops out at {rate}\u{2030} per step for {ms}ms"),
            );
        }
        if self.roll(o.api_conflict_pct) {
            let n = self.rng.random_range(1..=6);
            sh.api.conflict_next_writes(n);
            self.count("api_409", sh, now, format!("409 storm: next {n} writes"));
        }
        if self.roll(o.api_5xx_pct) {
            let n = self.rng.random_range(1..=4);
            let codes: Vec<u16> = (0..n)
                .map(|_| if self.rng.random_bool(0.5) { 500 } else { 503 })
                .collect();
            self.count("api_5xx", sh, now, format!("API answers {codes:?}"));
            sh.api.fail_next_requests(codes);
        }
        if o.watch_fault_pct > 0 && self.watch_rng.random_range(0..100) < o.watch_fault_pct {
            if self.watch_rng.random_bool(0.5) {
                sh.api.cut_watches();
                self.count(
                    "watch_cut",
                    sh,
                    now,
                    "API server cuts every watch stream".into(),
                );
            } else {
                let n = self.watch_rng.random_range(1..=4);
                sh.api.gone_next_watches(n);
                sh.api.cut_watches();
                self.count(
                    "watch_gone",
                    sh,
                    now,
                    format!(
                        "API server cuts every watch stream; the next {n} watches answer 410 Gone"
                    ),
                );
            }
        }
        if self.spike_until.is_none() && self.roll(o.api_spike_pct) {
            // Longer than the CO's deadline: its call times out while the write lands.
            let latency = o.rpc_timeout_ms + self.rng.random_range(500..=3_000);
            let ms = self.rng.random_range(1_000..=5_000);
            sh.api.set_latency(Duration::from_millis(latency));
            self.spike_until = Some(now + Duration::from_millis(ms));
            self.count(
                "api_spike",
                sh,
                now,
                format!("API latency spikes to {latency}ms for {ms}ms"),
            );
        }
        if self.roll(o.rds_fail_pct) {
            let kind = RDS_KINDS[self.rng.random_range(0..RDS_KINDS.len())];
            sh.emulator
                .faults()
                .push(kind, Fault::Fail("failure: device busy".into()));
            self.count("rds_fail", sh, now, format!("RDS {kind:?} fails"));
        }
        if self.roll(o.rds_lost_reply_pct) {
            let kind = RDS_KINDS[self.rng.random_range(0..RDS_KINDS.len())];
            sh.emulator.faults().push(kind, Fault::DropReply);
            self.count(
                "rds_lost_reply",
                sh,
                now,
                format!("RDS {kind:?} reply lost"),
            );
        }
        let live = sh.live_nodes();
        if self.roll(o.node_crash_pct) {
            let i = live[self.rng.random_range(0..live.len())];
            let name = node_name(i);
            self.count(
                "node_crash",
                sh,
                now,
                format!("{name} plugin crash + restart"),
            );
            if self.roll(o.leftover_pct) {
                self.leave_connection(sh, i, now);
            }
            sim.bounce(name);
        }
        if self.roll(o.device_loss_pct) {
            let i = live[self.rng.random_range(0..live.len())];
            // Not a VM disk's: the VM workload does not model a migration's source whose
            // controller is lost (it cannot reconnect until the migration ends: the export
            // admits the target), nor restarts the pods of two nodes independently.
            let nqns: Vec<String> = sh.kernels[i]
                .connected_nqns()
                .into_iter()
                .filter(|n| !n.contains(crate::options::VM_PREFIX))
                .collect();
            if !nqns.is_empty() {
                let nqn = &nqns[self.rng.random_range(0..nqns.len())];
                sh.kernels[i].lose_connection(nqn);
                self.count(
                    "device_loss",
                    sh,
                    now,
                    format!("{} loses the NVMe controller of {nqn}", node_name(i)),
                );
            }
        }
        // At most one machine lost per scenario, and never the last one up (nor the
        // partitioned one): each loss costs the workload a force-detach wait of
        // FORCE_DETACH_SECS of virtual time.
        let up = sh.schedulable_nodes();
        if !self.lost_a_node && up.len() >= 2 && self.roll(o.node_delete_pct) {
            self.lost_a_node = true;
            let i = up[self.rng.random_range(0..up.len())];
            let back = self
                .rng
                .random_range(5_000..=(FORCE_DETACH_SECS * 1000 / 2));
            let name = node_name(i);
            sim.crash(name.as_str());
            sh.kernels[i].power_loss();
            sh.api.remove_object(Kind::Node, "", &name);
            sh.lose_node(i, now);
            sh.model
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .node_lost(&name);
            self.lost = Some((now + Duration::from_millis(back), i));
            self.count(
                "node_lost",
                sh,
                now,
                format!("{name} machine lost, Node object deleted; a fresh one joins in {back}ms"),
            );
        }
        self.partition_node(sim, sh, now);
    }

    /// At most one node partitioned while alive per scenario, never while a machine is
    /// lost, and only while another node stays up and reachable for the workload.
    fn partition_node(&mut self, sim: &mut turmoil::Sim<'_>, sh: &Shared, now: Duration) {
        let live = sh.schedulable_nodes();
        if self.partitioned_a_node
            || self.lost.is_some()
            || live.len() < 2
            || !self.roll(sh.opts.node_partition_pct)
        {
            return;
        }
        self.partitioned_a_node = true;
        let i = live[self.rng.random_range(0..live.len())];
        // Half heal around the force-detach (when a node that missed it reconnects while
        // its volume moves on), the others anywhere from well before to well after it.
        let ms = if self.rng.random_bool(0.5) {
            self.rng
                .random_range(FORCE_DETACH_SECS * 1000..=(FORCE_DETACH_SECS + 20) * 1000)
        } else {
            self.rng
                .random_range(20_000..=(FORCE_DETACH_SECS + 60) * 1000)
        };
        let name = node_name(i);
        for peer in Self::NODE_PEERS {
            sim.partition(name.as_str(), peer);
        }
        // Its kernel loses the RDS like in an outage: every controller reconnects.
        sh.kernels[i].outage_begins(now);
        sh.set_partitioned(i, Some(now));
        self.cut_off = Some((now + Duration::from_millis(ms), i));
        self.count(
            "node_partition",
            sh,
            now,
            format!(
                "{name} partitioned while alive for {ms}ms (its kubelet and kernel cut off; \
                 Kubernetes force-detaches its volumes {FORCE_DETACH_SECS}s after it stopped \
                 reporting)"
            ),
        );
    }

    /// Starts or ends the RDS outage when due: the `rds` host goes down (management and
    /// NVMe/TCP), every node's controllers start reconnecting; at the end it comes back
    /// with its disks (a reboot).
    fn rds_outage(&mut self, sim: &mut turmoil::Sim<'_>, sh: &Shared, now: Duration) {
        let Some((start, end)) = self.outage else {
            return;
        };
        if !self.outage_on && now >= start && now < end {
            self.outage_on = true;
            sim.crash("rds");
            for k in &sh.kernels {
                k.outage_begins(now);
            }
            let secs = (end - start).as_secs();
            self.count(
                "rds_outage",
                sh,
                now,
                format!("RDS down for {secs}s (reboot)"),
            );
        } else if self.outage_on && now >= end {
            self.outage_on = false;
            sim.bounce("rds");
            for k in &sh.kernels {
                k.outage_ends();
            }
            // A node still partitioned stays cut off from the RDS until its partition heals.
            if let Some((_, i)) = self.cut_off {
                sh.kernels[i].outage_begins(now);
            }
            sh.trace.at(now, "fault", "RDS back");
        }
    }

    /// Node `i`'s kernel keeps a connection to a volume the node does not hold, as an
    /// unstage that never finished in an earlier life would leave it.
    fn leave_connection(&mut self, sh: &Shared, i: usize, now: Duration) {
        let node = node_name(i);
        let kernel = &sh.kernels[i];
        let connected = kernel.connected_nqns();
        let candidates: Vec<String> = {
            let model = sh.model.lock().unwrap_or_else(|p| p.into_inner());
            sh.emulator
                .disk_slots()
                .into_iter()
                .filter(|v| {
                    v.starts_with("pvc-")
                        && !v.starts_with(crate::options::VM_PREFIX)
                        && !model.holds(v, &node)
                })
                .filter(|v| !connected.contains(&format!("{DEFAULT_NQN_PREFIX}{v}")))
                .collect()
        };
        if candidates.is_empty() {
            return;
        }
        let vol = &candidates[self.rng.random_range(0..candidates.len())];
        let nqn = format!("{DEFAULT_NQN_PREFIX}{vol}");
        if kernel.disk(&nqn).is_none() {
            kernel.add_disk(&nqn, sh.emulator.disk_size(vol).unwrap_or(1 << 30));
        }
        if kernel.leave_connection(&nqn).is_some() {
            self.count(
                "leftover",
                sh,
                now,
                format!("{node} restarts with a connection to {vol}, which it does not hold"),
            );
        }
    }

    /// The earliest simulated time at which [`Self::tick`] acts without being prompted by a
    /// host after a step at `now`: a fault tick, the heal, a repair, a lost node's return, a
    /// partitioned node's heal, the end of a latency spike, a stale leader stepping down,
    /// the start or end of the RDS outage, a kernel's next reconnect attempt (the kernels
    /// keep time through `tick`, after the heal too, as does a partitioned node's heal). The
    /// driver loop runs no idle stretch past it, so every time-triggered action of `tick`
    /// must be covered here (the idle-skip test in `sim/tests/seeds.rs` compares traces
    /// with and without skipping).
    pub fn next_due(&self, sh: &Shared, now: Duration) -> Option<Duration> {
        let kernels = sh.kernels.iter().filter_map(|k| k.next_attempt());
        let always = kernels.chain(self.cut_off.map(|(until, _)| until));
        if self.healed {
            return always.min();
        }
        let timed = self
            .partitions
            .iter()
            .chain(&self.flaky)
            .map(|(t, _, _)| *t);
        let stale = sh.leader().stale.map(|_| self.stale_until);
        let fault_tick = (self.next < self.chaos_end).then_some(self.next);
        let outage = self.outage.and_then(|(start, end)| {
            if self.outage_on {
                Some(end)
            } else {
                (start > now).then_some(start)
            }
        });
        [self.heal_at()]
            .into_iter()
            .chain(fault_tick)
            .chain(always)
            .chain(timed)
            .chain(self.lost.map(|(back, _)| back))
            .chain(self.spike_until)
            .chain(stale)
            .chain(outage)
            .min()
    }

    fn backend(&mut self) -> &'static str {
        if self.rng.random_bool(0.5) {
            "kube"
        } else {
            "rds"
        }
    }
}

/// Removes and returns the timed entries due at `now` (all of them when `all`).
fn take_due(
    entries: &mut Vec<(Duration, &'static str, &'static str)>,
    now: Duration,
    all: bool,
) -> Vec<(Duration, &'static str, &'static str)> {
    let (due, keep) = entries.drain(..).partition(|(t, _, _)| all || *t <= now);
    *entries = keep;
    due
}
