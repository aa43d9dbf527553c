//! The simulation harness: seeded turmoil worlds that run the real driver code (controller
//! and node plugins, kube adapters, RouterOS adapter and emulator) under chaos, check the
//! safety properties after every step and convergence at the end, and replay any seed
//! exactly.
//!
//! One concern per module, in layers (each imports only the ones above it in this list;
//! `tests/layers.rs` at the workspace root keeps it so):
//! - [`options`] (knobs from the seed), [`trace`] (events and hash);
//! - [`model`] (the workload's acknowledged history), [`overlap`] (the online no-overlap
//!   checker and its port wrappers), [`crash`] (crash points at the store port), [`bugs`]
//!   (planted bugs for the proof-of-power tests);
//! - [`world`] (hosts, network plumbing, the plugins built by the composition root);
//! - [`workload`] (the CO), [`faults`] (the fault schedule), [`checkers`] (safety and
//!   liveness), [`datapath`] (the nodes' NVMe connections and their writes, judged).
//!
//! [`run`] drives one scenario.

pub mod bugs;
pub mod checkers;
pub mod crash;
pub mod datapath;
pub mod faults;
pub mod model;
pub mod options;
pub mod overlap;
pub mod trace;
pub mod workload;
pub mod world;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rds_csi::kube::fake_api::Kind;

pub use options::{Bug, Options};

use crate::faults::Injector;
use crate::world::{Shared, node_name};

/// Turmoil tick: the granularity of virtual time.
pub const TICK: Duration = Duration::from_millis(5);

/// The outcome of one scenario.
#[derive(Debug, Clone)]
pub struct Report {
    /// The knobs.
    pub opts: Options,
    /// The rendered trace (knobs first).
    pub trace: String,
    /// Hash of the trace.
    pub hash: u64,
    /// Violations found (empty: passed); the first one stops the scenario.
    pub failures: Vec<String>,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Checker runs.
    pub checks: u64,
    /// Port calls judged by the no-overlap checker.
    pub op_checks: u64,
    /// Calls kept out while another call on their volume ran (the checker met overlap).
    pub op_refused: u64,
    /// Writes over the nodes' NVMe connections judged by the data-path checker.
    pub writes: u64,
    /// Simulated time.
    pub sim_time: Duration,
    /// Wall time (not part of the trace).
    pub wall: Duration,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// The command that replays this scenario.
    pub fn replay_command(&self) -> String {
        match self.opts.bug {
            None => format!("cargo run -p sim --release -- replay {}", self.opts.seed),
            Some(b) => format!(
                "cargo run -p sim --release -- replay {} --bug {b:?}",
                self.opts.seed
            ),
        }
    }
}

/// Runs one scenario (on the calling thread, with the no-overlap checker's tracing
/// subscriber installed for that thread only).
pub fn run(opts: Options) -> Report {
    let sh = Shared::new(opts);
    tracing::subscriber::with_default(sh.ops.subscriber(), || run_world(&sh))
}

fn run_world(sh: &Shared) -> Report {
    let started = Instant::now();
    let opts = (*sh.opts).clone();
    sh.trace.at(Duration::ZERO, "sim", opts.to_string());
    for i in 0..opts.nodes {
        sh.api.put_object(Kind::Node, "", world::node_object(i, 0));
    }
    sh.api
        .set_latency(Duration::from_millis(opts.api_latency_ms));
    let mut sim = turmoil::Builder::new()
        .rng_seed(opts.seed)
        .epoch(std::time::UNIX_EPOCH + Duration::from_secs(world::EPOCH_SECS))
        .tick_duration(TICK)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(5))
        .simulation_duration(Duration::from_secs(
            opts.chaos_secs
                + opts
                    .rds_outage
                    .map_or(0, |(at_ms, secs)| at_ms / 1000 + secs)
                + options::LIVENESS_SECS
                + options::FORCE_DETACH_SECS
                + 60,
        ))
        .build();
    let api = sh.api.clone();
    sim.host("kube", move || world::kube_host(api.clone()));
    let emulator = sh.emulator.clone();
    sim.host("rds", move || world::rds_host(emulator.clone()));
    for name in world::CONTROLLERS {
        let s = sh.clone();
        sim.host(name, move || world::controller_host(s.clone(), name));
    }
    for i in 0..opts.nodes {
        let s = sh.clone();
        sim.host(node_name(i), move || world::node_host(s.clone(), i));
    }
    sim.client("co", workload::run(sh.clone()));

    let mut injector = Injector::new(sh);
    let mut data = datapath::DataPath::default();
    let mut failures = Vec::new();
    let mut checks = 0u64;
    let mut seen = 0usize;
    loop {
        let done = match sim.step() {
            Ok(done) => done,
            Err(e) => {
                failures.push(format!("simulation error: {e}"));
                break;
            }
        };
        let now = sim.elapsed();
        // The kernels' events are judged before a fault can change what the CO was told.
        let mut bad = checkers::data_path::judge_events(sh, now);
        injector.tick(&mut sim, sh, now);
        sh.sync_data_path();
        bad.extend(data.step(sh, now));
        if sh.trace.len() != seen || done || !bad.is_empty() {
            checks += 1;
            bad.extend(checkers::safety::check(sh));
            bad.extend(checkers::data_path::check_usable(sh, now, |i| {
                injector.heal_of(i)
            }));
            if !bad.is_empty() {
                for b in &bad {
                    sh.trace.at(now, "check", format!("VIOLATION {b}"));
                }
                failures.extend(bad);
                break;
            }
            seen = sh.trace.len();
        }
        if done {
            checks += 1;
            let bad = checkers::liveness::check(sh);
            for b in &bad {
                sh.trace.at(now, "check", format!("LIVENESS {b}"));
            }
            failures.extend(bad);
            break;
        }
        // The bound after the heal; a lost node's volumes also wait for their force-detach.
        let allowed = options::LIVENESS_SECS
            + if injector.lost_a_node() {
                options::FORCE_DETACH_SECS
            } else {
                0
            };
        if now > injector.heal_at() + Duration::from_secs(allowed) {
            let msg =
                format!("liveness: the workload did not finish within {allowed}s of the heal");
            sh.trace.at(now, "check", msg.clone());
            failures.push(msg);
            break;
        }
    }
    let sim_time = sim.elapsed();
    sh.trace.at(
        sim_time,
        "sim",
        format!(
            "end: {} after {checks} checks",
            if failures.is_empty() { "PASS" } else { "FAIL" }
        ),
    );
    Report {
        hash: sh.trace.hash(),
        trace: sh.trace.render(),
        opts,
        failures,
        faults: injector.counts,
        checks,
        op_checks: sh.ops.checks(),
        op_refused: sh.ops.refused(),
        writes: data.writes,
        sim_time,
        wall: started.elapsed(),
    }
}
