//! The simulation harness: seeded turmoil worlds that run the real driver code (controller
//! and node plugins, kube adapters, RouterOS adapter and emulator) under chaos, check the
//! safety properties after every step and convergence at the end, and replay any seed
//! exactly.
//!
//! One concern per module, in layers (each imports only the ones above it in this list;
//! `tests/layers.rs` at the workspace root keeps it so):
//! - [`options`] (knobs from the seed), [`trace`] (events and hash);
//! - [`model`] (the workload's acknowledged history), [`overlap`] (the online no-overlap
//!   checker and its port wrappers), [`idle`] (the hosts' armed timers: when the next thing
//!   can happen), [`crash`] (crash points at the store port), [`bugs`] (planted bugs for
//!   the proof-of-power tests);
//! - [`world`] (hosts, network plumbing, the plugins built by the composition root);
//! - [`workload`] (the CO), [`faults`] (the fault schedule), [`checkers`] (safety and
//!   liveness), [`datapath`] (the nodes' NVMe connections and their writes, judged).
//!
//! [`run`] drives one scenario: a turmoil step per tick of virtual time, except that ticks
//! in which nothing can happen (no message on the network; no timer, fault, kernel
//! reconnect attempt or data-path write due) run as one step ([`Stepping`]).

pub mod bugs;
pub mod checkers;
pub mod crash;
pub mod datapath;
pub mod events;
pub mod faults;
pub mod idle;
pub mod model;
pub mod options;
pub mod overlap;
pub mod reconciled;
pub mod trace;
pub mod workload;
pub mod world;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rds_csi::kube::fake_api::Kind;
use tracing_subscriber::layer::SubscriberExt;

pub use options::{Bug, Options};

use crate::faults::Injector;
use crate::idle::Idle;
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
    /// turmoil steps run (a step runs one tick, or an idle stretch of several).
    pub steps: u64,
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

/// How the driver loop advances virtual time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stepping {
    /// One turmoil step per tick: the reference.
    EveryTick,
    /// Ticks in which nothing can happen run as one step ([`idle`]): what [`run`] does.
    /// The same run as `EveryTick`, but for a rare reordering of tasks woken in one
    /// millisecond.
    SkipIdle,
}

/// Runs one scenario (on the calling thread, with the no-overlap checker's and the idle
/// detection's tracing subscriber installed for that thread only).
pub fn run(opts: Options) -> Report {
    run_stepping(opts, Stepping::SkipIdle)
}

/// Runs one scenario, advancing virtual time as `stepping` says.
pub fn run_stepping(opts: Options, stepping: Stepping) -> Report {
    let sh = Shared::new(opts);
    let idle = Idle::new(sh.trace.time().clone());
    let subscriber = tracing_subscriber::registry()
        .with(sh.ops.layer())
        .with(idle.layer())
        .with(log_layer(sh.trace.time().clone()));
    tracing::subscriber::with_default(subscriber, || run_world(&sh, &idle, stepping))
}

/// The driver's own log lines on stderr, stamped with simulated time, when `SIM_LOG` holds
/// a filter (`SIM_LOG=rds_csi::attachment=info sim replay 2442`): for reading a replay next
/// to its trace. Logging observes the run; it changes nothing in it.
fn log_layer<S>(time: trace::SimTime) -> Option<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    struct Stamp(trace::SimTime);
    impl tracing_subscriber::fmt::time::FormatTime for Stamp {
        fn format_time(
            &self,
            w: &mut tracing_subscriber::fmt::format::Writer<'_>,
        ) -> std::fmt::Result {
            write!(w, "{:>9.3}s", self.0.now().as_secs_f64())
        }
    }
    use tracing_subscriber::Layer;
    let filter = std::env::var("SIM_LOG").ok()?;
    let filter = tracing_subscriber::EnvFilter::try_new(filter).ok()?;
    Some(
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_timer(Stamp(time))
            .with_filter(filter),
    )
}

/// Whether a message is on its way over turmoil's network.
fn messages_in_flight(sim: &turmoil::Sim<'_>) -> bool {
    let mut any = false;
    sim.links(|mut links| any = links.any(|mut link| link.next().is_some()));
    any
}

/// How many ticks from `now` the next step may run as one: every tick before the one in
/// which the next timer fires, up to the one at whose end the injector acts or the data
/// path writes next (`due`) or the liveness bound `deadline` is passed. At least 1.
fn idle_ticks(idle: &Idle, due: Option<Duration>, deadline: Duration, now: Duration) -> u64 {
    let tick = TICK.as_millis();
    let ms = |d: Duration| d.saturating_sub(now).as_millis();
    // A timer at t runs its task in the tick that contains t: the ticks before it are idle.
    let mut n = idle.next_deadline(now).map_or(u128::MAX, |t| ms(t) / tick);
    // The injector acts, and the data path writes, after the first step that ends at or
    // after `due`.
    if let Some(due) = due {
        n = n.min(ms(due).div_ceil(tick));
    }
    // The liveness bound fails after the first step that ends past it.
    n = n.min(ms(deadline) / tick + 1);
    u64::try_from(n).unwrap_or(u64::MAX).max(1)
}

fn run_world(sh: &Shared, idle: &Idle, stepping: Stepping) -> Report {
    let started = Instant::now();
    let opts = (*sh.opts).clone();
    let time = sh.trace.time();
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
    // Every host's software is wrapped to take idle jumps.
    let mut hosts: Vec<String> = vec!["kube".into(), "rds".into()];
    let (api, i) = (sh.api.clone(), idle.clone());
    sim.host("kube", move || {
        i.host("kube", world::kube_host(api.clone()))
    });
    let (emulator, i) = (sh.emulator.clone(), idle.clone());
    sim.host("rds", move || {
        i.host("rds", world::rds_host(emulator.clone()))
    });
    for name in world::CONTROLLERS {
        let (s, i) = (sh.clone(), idle.clone());
        sim.host(name, move || {
            i.host(name, world::controller_host(s.clone(), name))
        });
        hosts.push(name.into());
    }
    for n in 0..opts.nodes {
        let (s, i, name) = (sh.clone(), idle.clone(), node_name(n));
        hosts.push(name.clone());
        sim.host(name.clone(), move || {
            i.host(&name, world::node_host(s.clone(), n))
        });
    }
    sim.client("co", idle.host("co", workload::run(sh.clone())));
    hosts.push("co".into());

    let mut injector = Injector::new(sh);
    let mut data = datapath::DataPath::default();
    let mut failures = Vec::new();
    let mut checks = 0u64;
    let mut steps = 0u64;
    let mut seen = 0usize;
    // The idle jump asked of every running host for the coming step, and its length.
    let mut jump: Option<(u64, Duration, Vec<String>)> = None;
    loop {
        let before = sh.trace.len();
        steps += 1;
        let done = match sim.step() {
            Ok(done) => done,
            Err(e) => {
                failures.push(format!("simulation error: {e}"));
                break;
            }
        };
        if let Some((epoch, by, running)) = jump.take() {
            let missed = idle.missed(epoch, running.iter().map(String::as_str));
            if !missed.is_empty() {
                failures.push(format!(
                    "simulation error: the idle jump was not applied on {missed:?}"
                ));
                break;
            }
            time.skipped(by.saturating_sub(TICK));
        }
        let now = time.of(sim.elapsed());
        // The kernels' events are judged before a fault can change what the CO was told.
        let mut bad = checkers::data_path::judge_events(sh, now);
        injector.tick(&mut sim, sh, now);
        sh.sync_data_path();
        sh.report_node_status();
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
            let mut bad = checkers::liveness::check(sh);
            bad.extend(checkers::events::check(sh));
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
        let deadline = injector.heal_at() + Duration::from_secs(allowed);
        if now > deadline {
            let msg =
                format!("liveness: the workload did not finish within {allowed}s of the heal");
            sh.trace.at(now, "check", msg.clone());
            failures.push(msg);
            break;
        }
        // Skip only from a quiet step (nothing traced: no call answered, no fault injected,
        // which could have woken a task the timers do not show; no kernel event waiting to
        // be judged after the next step; no watch event the API server has yet to stream:
        // a direct write by the CO wakes the kube host's watch streams, which no timer
        // shows), with nothing on the network and every running host able to jump.
        if stepping == Stepping::SkipIdle
            && sh.trace.len() == before
            && !messages_in_flight(&sim)
            && sh.api.watch_lines_pending() == 0
            && !sh.kernels.iter().any(|k| k.has_events())
        {
            let due = injector
                .next_due(sh, now)
                .into_iter()
                .chain(data.next_write_due())
                .min();
            let ticks = idle_ticks(idle, due, deadline, now);
            if ticks > 1 {
                let running: Vec<String> = hosts
                    .iter()
                    .filter(|h| sim.is_host_running(h.as_str()))
                    .cloned()
                    .collect();
                if running.iter().all(|h| idle.can_jump(h)) {
                    let by = TICK * u32::try_from(ticks).unwrap_or(u32::MAX);
                    jump = Some((idle.jump(by), by, running));
                }
            }
        }
    }
    let sim_time = time.of(sim.elapsed());
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
        steps,
        op_checks: sh.ops.checks(),
        op_refused: sh.ops.refused(),
        writes: data.writes,
        sim_time,
        wall: started.elapsed(),
    }
}
