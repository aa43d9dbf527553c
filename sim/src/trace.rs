//! The trace of a scenario: every workload call and its outcome, every fault injected and
//! every checker verdict, each stamped with simulated time ([`SimTime`]); and its hash
//! (FNV-1a 64 over the lines), which two runs of one seed must share.
//!
//! Shared by the hosts and the driver loop of one simulation (one thread); the mutex is
//! never held across `.await`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Simulated time: turmoil's elapsed time plus the idle stretches the driver loop ran as a
/// single turmoil step ([`crate::idle`]): turmoil counts such a step as one tick, while
/// every host's clock moved through the whole stretch. Everything in the simulation reads
/// time here, never from turmoil directly. Clones share.
#[derive(Debug, Clone, Default)]
pub struct SimTime {
    /// Simulated time turmoil did not count, in ms.
    skipped_ms: Arc<AtomicU64>,
}

impl SimTime {
    /// Simulated time, inside a host; `None` outside one.
    pub fn in_host(&self) -> Option<Duration> {
        turmoil::sim_elapsed().map(|t| self.of(t))
    }

    /// Simulated time inside a host (zero outside one).
    pub fn now(&self) -> Duration {
        self.in_host().unwrap_or_default()
    }

    /// Simulated time when turmoil's clock reads `elapsed` (the driver loop's
    /// `Sim::elapsed`).
    pub fn of(&self, elapsed: Duration) -> Duration {
        elapsed + Duration::from_millis(self.skipped_ms.load(Ordering::Relaxed))
    }

    /// The hosts' clocks moved `extra` further than turmoil counted.
    pub fn skipped(&self, extra: Duration) {
        let ms = u64::try_from(extra.as_millis()).unwrap_or(u64::MAX);
        self.skipped_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// One line of the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Simulated time since the start of the scenario.
    pub at: Duration,
    /// Who: `co`, `fault`, `check`, a host name.
    pub who: &'static str,
    /// What happened.
    pub what: String,
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.at.as_millis();
        write!(
            f,
            "{:>6}.{:03}s {:<6} {}",
            ms / 1000,
            ms % 1000,
            self.who,
            self.what
        )
    }
}

/// The events of one scenario. Clones share them.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    events: Arc<Mutex<Vec<Event>>>,
    time: SimTime,
}

impl Trace {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an event at `at`.
    pub fn at(&self, at: Duration, who: &'static str, what: impl Into<String>) {
        self.lock().push(Event {
            at,
            who,
            what: what.into(),
        });
    }

    /// Appends an event stamped with the current simulated time (inside a host).
    pub fn log(&self, who: &'static str, what: impl Into<String>) {
        self.at(self.time.now(), who, what);
    }

    /// The scenario's simulated time.
    pub fn time(&self) -> &SimTime {
        &self.time
    }

    /// Number of events so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there is no event yet.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// A copy of every event.
    pub fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    /// The events in canonical order: by time, then text. Events of one tick are sorted
    /// because tokio numbers tasks with a process-wide counter, so the order in which a
    /// crashed host's tasks are dropped (and peers see their connections reset) within one
    /// tick can differ between two runs in one process; what happens at which tick cannot.
    fn canonical(&self) -> Vec<Event> {
        let mut events = self.lock().clone();
        events.sort_by(|a, b| (a.at, a.who, &a.what).cmp(&(b.at, b.who, &b.what)));
        events
    }

    /// The FNV-1a 64 hash of the rendered lines, in canonical order.
    pub fn hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for e in self.canonical().iter() {
            for b in e.to_string().bytes().chain(std::iter::once(b'\n')) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    /// Every line, rendered, in canonical order.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for e in self.canonical().iter() {
            out.push_str(&e.to_string());
            out.push('\n');
        }
        out
    }
}
