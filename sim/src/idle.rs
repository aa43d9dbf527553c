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
//!   its paused clock over the whole stretch: each host's software is wrapped
//!   ([`Idle::host`]); when the driver loop asks ([`Idle::jump`]), the wrapper is woken and,
//!   first thing in the step, calls `tokio::time::advance`. No timer falls inside the
//!   stretch, so advancing is exactly what stepping through it would do; a timer due at its
//!   very end fires as it would at the end of a normal step, and its task runs in the next
//!   one. The wrapper adds no task and no poll between jumps, so the hosts schedule their
//!   tasks exactly as without it.
//!   turmoil counts the step as one tick, the hosts' clocks as the whole stretch:
//!   [`crate::trace::SimTime`] adds the difference, and everything in the simulation reads
//!   time there.
//!
//! The result is the run one step per tick would give: the traces of all but about one
//! seed in a hundred are identical (the rest take another valid interleaving: after a jump,
//! tasks woken in the same millisecond can run in another order, tokio's timer wheel and
//! scheduler counters having seen one advance instead of many ticks). The idle-skip test
//! (`sim/tests/seeds.rs`) runs scenarios both ways and compares.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

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

/// The jump asked of every host: move the runtime's clock `by` further.
#[derive(Debug, Clone, Copy, Default)]
struct Jump {
    epoch: u64,
    by: Duration,
}

/// A host whose software runs in a [`Jumping`] wrapper.
#[derive(Debug)]
struct Jumper {
    /// Which incarnation of the host's software.
    id: u64,
    /// The last jump it applied.
    applied: u64,
    /// Wakes its software's task.
    waker: Waker,
}

/// The jumps and the hosts that take them.
#[derive(Debug, Default)]
struct Jumps {
    current: Jump,
    hosts: BTreeMap<String, Jumper>,
    /// Incarnations wrapped so far.
    wrapped: u64,
}

/// Idle detection and idle jumps for one scenario. Clones share.
#[derive(Debug, Clone)]
pub struct Idle {
    time: SimTime,
    timers: Arc<Mutex<Timers>>,
    jumps: Arc<Mutex<Jumps>>,
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
            jumps: Arc::default(),
        }
    }

    fn timers(&self) -> std::sync::MutexGuard<'_, Timers> {
        self.timers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn jumps(&self) -> std::sync::MutexGuard<'_, Jumps> {
        self.jumps.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Host `name`'s software, wrapped so that it takes idle jumps.
    pub fn host<F: Future>(&self, name: &str, software: F) -> Jumping<F> {
        let id = {
            let mut j = self.jumps();
            j.wrapped += 1;
            j.wrapped
        };
        Jumping {
            idle: self.clone(),
            name: name.to_string(),
            id,
            software: Box::pin(software),
        }
    }

    /// Whether host `name`'s software takes jumps (it started, and the host did not
    /// crash since).
    pub fn can_jump(&self, name: &str) -> bool {
        self.jumps().hosts.contains_key(name)
    }

    /// Asks every host to move its clock `by` further at the start of the next step (wakes
    /// their software); the jump's number, for [`Self::missed`].
    pub fn jump(&self, by: Duration) -> u64 {
        let (epoch, wakers) = {
            let mut j = self.jumps();
            j.current = Jump {
                epoch: j.current.epoch + 1,
                by,
            };
            let wakers: Vec<Waker> = j.hosts.values().map(|h| h.waker.clone()).collect();
            (j.current.epoch, wakers)
        };
        for w in wakers {
            w.wake();
        }
        epoch
    }

    /// The hosts among `hosts` that did not apply jump `epoch`.
    pub fn missed<'a>(&self, epoch: u64, hosts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let j = self.jumps();
        hosts
            .into_iter()
            .filter(|n| j.hosts.get(*n).is_none_or(|h| h.applied != epoch))
            .map(str::to_string)
            .collect()
    }
}

/// A host's software that takes idle jumps: when a jump is asked for, the next poll (at
/// the start of the next step, the jump having woken it) moves the runtime's paused clock
/// with `tokio::time::advance` before anything else runs. It adds no task and no poll of
/// the software: the hosts schedule their tasks exactly as without it.
pub struct Jumping<F: Future> {
    idle: Idle,
    name: String,
    /// This incarnation.
    id: u64,
    software: Pin<Box<F>>,
}

impl<F: Future> Future for Jumping<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let jump = {
            let mut j = this.idle.jumps();
            let current = j.current;
            let host = match j.hosts.get_mut(&this.name) {
                Some(h) if h.id == this.id => {
                    if !h.waker.will_wake(cx.waker()) {
                        h.waker = cx.waker().clone();
                    }
                    h
                }
                // First poll of this incarnation (the old one's drop may come later).
                _ => {
                    let fresh = Jumper {
                        id: this.id,
                        applied: current.epoch,
                        waker: cx.waker().clone(),
                    };
                    j.hosts.insert(this.name.clone(), fresh);
                    j.hosts.get_mut(&this.name).expect("just inserted")
                }
            };
            (host.applied < current.epoch).then(|| {
                host.applied = current.epoch;
                current.by
            })
        };
        if let Some(by) = jump {
            // Only the jump woke this task (nothing else was due): move the clock and leave
            // the software unpolled, as a step without the jump would. `advance` moves the
            // clock in its first poll, then yields; the yield's wake-up goes nowhere, so the
            // software sees no extra poll either. The runtime then fires the step's own
            // timer, which now lies in the past, and the step ends.
            let mut advance = std::pin::pin!(tokio::time::advance(by));
            let _ = advance
                .as_mut()
                .poll(&mut TaskContext::from_waker(Waker::noop()));
            return Poll::Pending;
        }
        this.software.as_mut().poll(cx)
    }
}

impl<F: Future> Drop for Jumping<F> {
    fn drop(&mut self) {
        let mut j = self.idle.jumps();
        if j.hosts.get(&self.name).is_some_and(|h| h.id == self.id) {
            j.hosts.remove(&self.name);
        }
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
