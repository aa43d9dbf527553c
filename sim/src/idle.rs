//! Idle stretches: finding the ticks in which nothing can happen, and running them as one
//! turmoil step.
//!
//! turmoil advances every host by one tick per step, and a step costs about the same
//! whether anything happens or not: each running host's runtime is entered, its timers
//! polled, every link scanned. Most of a scenario's simulated time is idle (pods running,
//! backoffs, the six-minute force-detach wait, the final resync), so the driver loop skips
//! idle ticks:
//!
//! - **When is the world idle?** With no message on the network (turmoil's public link
//!   view), a host does something again only when one of its timers fires: every timer of
//!   the driver and its libraries is a tokio `Sleep` (`sleep`, `timeout`, `interval`,
//!   hyper's and tower's timers), and nothing else wakes a task (the hosts share no tokio
//!   primitive; the fault injector's actions, which can, end an idle stretch by themselves).
//!   tokio's own instrumentation (`--cfg tokio_unstable` and its `tracing` feature) reports
//!   each `Sleep` as a `runtime.resource` span with a `runtime::resource::state_update`
//!   event carrying its duration whenever its timer is registered or reset, and closes the
//!   span when the `Sleep` is dropped: [`Idle::next_deadline`] is the earliest deadline of a
//!   live `Sleep`, in simulated time. A deadline is only ever too early, never too late: a
//!   fired `Sleep` kept alive keeps its past deadline (ignored), a `Sleep` whose timer was
//!   removed without an event keeps its old one (the stretch then ends early: one step
//!   more, never a check less).
//! - **How is an idle stretch run?** As one turmoil step in which every running host moves
//!   its paused clock over the whole stretch: each host runs a helper task
//!   ([`Idle::host`]) that, when the driver loop asks ([`Idle::jump`]), calls
//!   `tokio::time::advance` at the start of the step. No timer falls inside the stretch, so
//!   advancing is exactly what stepping through it would do; a timer due at its very end
//!   fires as it would at the end of a normal step, and its task runs in the next one.
//!   turmoil counts the step as one tick, the hosts' clocks as the whole stretch:
//!   [`crate::trace::SimTime`] adds the difference, and everything in the simulation reads
//!   time there.
//!
//! The idle-skip test (`sim/tests/seeds.rs`) runs scenarios both ways, one step per tick
//! and skipping, and requires identical traces.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::field::{Field, Visit};
use tracing::span::Id;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::trace::SimTime;

/// Where tokio's `Sleep` reports itself.
const SLEEP_MODULE: &str = "tokio::time::sleep";

/// The armed timers of every host.
#[derive(Debug, Default)]
struct Timers {
    /// (deadline in simulated ms, span) of every live `Sleep` whose timer is registered.
    deadlines: BTreeSet<(u64, u64)>,
    /// The deadline of each span in `deadlines`.
    by_span: BTreeMap<u64, u64>,
    /// Live `Sleep`s registered outside any host (time unknown): while there is one,
    /// nothing is idle.
    unknown: BTreeSet<u64>,
}

impl Timers {
    fn forget(&mut self, span: u64) {
        if let Some(d) = self.by_span.remove(&span) {
            self.deadlines.remove(&(d, span));
        }
        self.unknown.remove(&span);
    }
}

/// A request to every host's helper: move the runtime's clock `by` further.
#[derive(Debug, Clone, Copy, Default)]
struct Jump {
    epoch: u64,
    by: Duration,
}

/// Idle detection and idle jumps for one scenario. Clones share.
#[derive(Debug, Clone)]
pub struct Idle {
    time: SimTime,
    timers: Arc<Mutex<Timers>>,
    jump: Arc<watch::Sender<Jump>>,
    /// The hosts whose helper runs, with the last jump each applied.
    helpers: Arc<Mutex<BTreeMap<String, u64>>>,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Idle {
    /// Idle detection for a scenario whose simulated time is `time`.
    pub fn new(time: SimTime) -> Self {
        Self {
            time,
            timers: Arc::default(),
            jump: Arc::new(watch::Sender::new(Jump::default())),
            helpers: Arc::default(),
        }
    }

    fn timers(&self) -> std::sync::MutexGuard<'_, Timers> {
        self.timers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn helpers(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        self.helpers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The earliest deadline at or after `now` of a live timer of any host (`now` itself if
    /// a timer was armed outside any host), `None` if no timer is armed.
    pub fn next_deadline(&self, now: Duration) -> Option<Duration> {
        let t = self.timers();
        if !t.unknown.is_empty() {
            return Some(now);
        }
        t.deadlines
            .range((ms(now), 0)..)
            .next()
            .map(|&(d, _)| Duration::from_millis(d))
    }

    /// The layer that follows tokio's `Sleep`s; add it to the scenario's subscriber.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        // Decided once per callsite (`filter_fn` caches it): every other tokio resource,
        // task and poll event stays disabled and costs nothing.
        let only_sleep = tracing_subscriber::filter::filter_fn(|m| {
            m.module_path() == Some(SLEEP_MODULE)
                && ((m.is_span() && m.name() == "runtime.resource")
                    || (m.is_event() && m.target() == "runtime::resource::state_update"))
        });
        SleepLayer { idle: self.clone() }.with_filter(only_sleep)
    }

    /// Host `name`'s software, with the helper that moves the host's clock through idle
    /// jumps (spawned on the host's runtime when the software starts, gone when the host
    /// crashes).
    pub fn host<F>(&self, name: &str, software: F) -> impl Future<Output = F::Output> + use<F>
    where
        F: Future,
    {
        let jumps = self.jump.subscribe();
        let helpers = Arc::clone(&self.helpers);
        let name = name.to_string();
        async move {
            tokio::spawn(helper(name, jumps, helpers));
            software.await
        }
    }

    /// Whether host `name`'s helper runs.
    pub fn has_helper(&self, name: &str) -> bool {
        self.helpers().contains_key(name)
    }

    /// Asks every helper to move its host's clock `by` further at the start of the next
    /// step; the jump's number, for [`Self::missed`].
    pub fn jump(&self, by: Duration) -> u64 {
        let epoch = self.jump.borrow().epoch + 1;
        self.jump.send_replace(Jump { epoch, by });
        epoch
    }

    /// The hosts among `hosts` whose helper did not apply jump `epoch`.
    pub fn missed<'a>(&self, epoch: u64, hosts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let h = self.helpers();
        hosts
            .into_iter()
            .filter(|n| h.get(*n) != Some(&epoch))
            .map(str::to_string)
            .collect()
    }
}

/// Removes a host's helper from the list when its runtime drops it.
struct Registered {
    helpers: Arc<Mutex<BTreeMap<String, u64>>>,
    name: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.helpers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// A host's helper: applies every jump at the start of the step after it was asked for.
async fn helper(
    name: String,
    mut jumps: watch::Receiver<Jump>,
    helpers: Arc<Mutex<BTreeMap<String, u64>>>,
) {
    let seen = jumps.borrow_and_update().epoch;
    helpers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(name.clone(), seen);
    let registered = Registered { helpers, name };
    while jumps.changed().await.is_ok() {
        let jump = *jumps.borrow_and_update();
        registered
            .helpers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(registered.name.clone(), jump.epoch);
        // The clock moves when this future is first polled; the yield inside lets the
        // runtime fire the step's own timer, which now lies in the past.
        tokio::time::advance(jump.by).await;
    }
}

/// Updates the timers from tokio's `Sleep` instrumentation.
struct SleepLayer {
    idle: Idle,
}

/// The `duration` (ms) of a state update.
#[derive(Default)]
struct DurationMs(Option<u64>);

impl Visit for DurationMs {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "duration" {
            self.0 = Some(value);
        }
    }
    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

impl<S> Layer<S> for SleepLayer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.event_span(event) else {
            return;
        };
        let mut d = DurationMs::default();
        event.record(&mut d);
        let Some(duration) = d.0 else {
            return;
        };
        let id = span.id().into_u64();
        let now = self.idle.time.in_host();
        let mut t = self.idle.timers();
        t.forget(id);
        match now {
            Some(now) => {
                let deadline = ms(now).saturating_add(duration);
                t.by_span.insert(id, deadline);
                t.deadlines.insert((deadline, id));
            }
            None => {
                t.unknown.insert(id);
            }
        }
    }

    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        self.idle.timers().forget(id.into_u64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    fn run_to(world: &mut turmoil::Sim<'_>, t: Duration) {
        while world.elapsed() < t {
            world.step().unwrap();
        }
    }

    #[test]
    fn a_hosts_timers_are_followed_from_arming_through_reset_to_drop() {
        let idle = Idle::new(SimTime::default());
        let subscriber = tracing_subscriber::registry().with(idle.layer());
        tracing::subscriber::with_default(subscriber, || {
            let mut world = turmoil::Builder::new()
                .tick_duration(Duration::from_millis(10))
                .simulation_duration(Duration::from_secs(60))
                .build();
            let (s, ms) = (Duration::from_secs, Duration::from_millis);
            world.client("c", async move {
                let a = tokio::time::sleep(s(3));
                tokio::pin!(a);
                let _ = futures::poll!(a.as_mut());
                tokio::time::sleep(s(1)).await;
                // At 1 s, `a` moves to 1.5 s.
                a.as_mut()
                    .reset(tokio::time::Instant::now() + Duration::from_millis(500));
                tokio::time::sleep(s(5)).await;
                // At 6 s, a timer armed and dropped at once.
                let mut b = Box::pin(tokio::time::sleep(s(1)));
                let _ = futures::poll!(b.as_mut());
                drop(b);
                tokio::time::sleep(s(10)).await;
                Ok(())
            });
            let mut next_at = |t| {
                run_to(&mut world, ms(t));
                idle.next_deadline(world.elapsed())
            };
            assert_eq!(
                next_at(500),
                Some(ms(1_000)),
                "the 1 s sleep, before `a` at 3 s"
            );
            assert_eq!(
                next_at(1_200),
                Some(ms(1_500)),
                "`a`, reset from 3 s to 1.5 s"
            );
            assert_eq!(next_at(2_000), Some(ms(6_000)), "`a` fired: the 5 s sleep");
            assert_eq!(
                next_at(6_500),
                Some(ms(16_000)),
                "the dropped timer is gone"
            );
        });
    }

    #[test]
    fn simulated_time_is_read_only_through_sim_time() {
        // turmoil's clock misses every skipped stretch: anything reading it directly would
        // drift from the hosts' clocks (trace.rs holds SimTime, the one reader).
        let forbidden = [
            ["turmoil::", "sim_elapsed"].concat(),
            ["turmoil::", "elapsed("].concat(),
            ["turmoil::", "since_epoch"].concat(),
        ];
        let mut stack = vec![std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
        let mut bad = Vec::new();
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                if path.file_name().is_some_and(|n| n == "trace.rs") {
                    continue;
                }
                let src = std::fs::read_to_string(&path).unwrap();
                for f in &forbidden {
                    if src.contains(f.as_str()) {
                        bad.push(format!("{}: {f}", path.display()));
                    }
                }
                let loop_read = ["sim", ".elapsed()"].concat();
                let loop_reads = src.matches(loop_read.as_str()).count();
                let through_sim_time = src.matches(&format!("time.of({loop_read})")).count();
                if loop_reads != through_sim_time {
                    bad.push(format!(
                        "{}: Sim::elapsed read outside SimTime::of",
                        path.display()
                    ));
                }
            }
        }
        assert!(bad.is_empty(), "{bad:#?}");
    }
}
