//! The seed sweep, the determinism check, canonical traces, the idle-skip check and the
//! proof of power.
//!
//! `SIM_SEED` (first seed, default 1) and `SIM_COUNT` (default 3000) select the sweep; a
//! failure prints the seed and the exact replay command. Run in release:
//! `cargo test -p sim --release`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sim::{Bug, Options, Report, Stepping};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One thread per core (scenarios share nothing: the sweep scales with cores).
fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Runs `opts(seed)` for `seeds` on [`threads`]; the failing reports, by seed.
fn sweep(seeds: std::ops::Range<u64>, opts: impl Fn(u64) -> Options + Sync) -> Vec<Report> {
    let next = AtomicU64::new(seeds.start);
    let failed = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads() {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= seeds.end {
                        break;
                    }
                    let r = sim::run(opts(seed));
                    if !r.passed() {
                        failed.lock().unwrap().push(r);
                    }
                }
            });
        }
    });
    let mut failed = failed.into_inner().unwrap();
    failed.sort_by_key(|r| r.opts.seed);
    failed
}

#[test]
fn every_seed_passes_the_safety_and_liveness_checks() {
    let start = env_u64("SIM_SEED", 1);
    let count = env_u64("SIM_COUNT", 3000);
    let failed = sweep(start..start + count, Options::from_seed);
    for r in &failed {
        eprintln!(
            "FAILED seed {}: {}\n  replay: {}",
            r.opts.seed,
            r.failures.join("; "),
            r.replay_command()
        );
    }
    assert!(
        failed.is_empty(),
        "{} of {count} seeds failed; first: seed {} — replay with `{}`",
        failed.len(),
        failed[0].opts.seed,
        failed[0].replay_command()
    );
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    for seed in [3, 19, 42, 77, 123, 500, 999, 4242] {
        let a = sim::run(Options::from_seed(seed));
        let b = sim::run(Options::from_seed(seed));
        assert_eq!(
            a.hash, b.hash,
            "seed {seed} is not deterministic; replay with `cargo run -p sim --release -- replay {seed} --check-determinism`"
        );
    }
}

#[test]
fn skipping_idle_ticks_changes_nothing_but_the_speed() {
    // Calm and stormy seeds, lost nodes and their force-detach waits (1..=20: API latency
    // spikes, RDS outages in 1, 3, 19 with reconnects through them, nodes partitioned while
    // alive in 13, 15, 20), controllers lost to ctrl-loss-tmo in 79 and 108, connections
    // writing, and a failing seed of each planted bug, run one turmoil step per tick and
    // skipping idle ticks. A skip that missed a timer, a fault, a reconnect attempt, a
    // data-path write or a message would shift what happens when in nearly every scenario;
    // a correct one leaves the trace (every call, answer, fault, kernel event and verdict,
    // with its time) and the writes judged identical. Rarely, tasks woken in the same
    // millisecond run in another order after a jump (tokio's timer wheel and scheduler
    // counters see one advance instead of many ticks): another valid interleaving, so a
    // few seeds may part ways, but every verdict must agree.
    let mut cases: Vec<Options> = (1..=20).chain([79, 108]).map(Options::from_seed).collect();
    cases.extend([
        Options::from_seed(1).with_bug(Bug::AckBeforePersist),
        Options::from_seed(41).with_bug(Bug::DropPrecondition),
        Options::from_seed(2).with_bug(Bug::NodeGoneWhileAlive),
        Options::from_seed(13).with_bug(Bug::BlindRdsRetry),
        Options::from_seed(1).with_bug(Bug::UnpublishOpensExport),
        Options::from_seed(1).with_bug(Bug::DeleteSkipsHolders),
        Options::from_seed(2).with_bug(Bug::ReissuedPublishSkipsLock),
        Options::from_seed(19).with_bug(Bug::KernelReconnectDefaults),
        Options::from_seed(3).with_bug(Bug::RememberedDevicePath),
        Options::from_seed(1).with_bug(Bug::ThirdNodeAttaches),
    ]);
    let next = AtomicU64::new(0);
    let parted = Mutex::new(Vec::new());
    let wrong = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads() {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                    let Some(opts) = cases.get(i) else { break };
                    let stepped = sim::run_stepping(opts.clone(), Stepping::EveryTick);
                    let skipped = sim::run_stepping(opts.clone(), Stepping::SkipIdle);
                    // Skipping must skip: most ticks are idle, even in a scenario that fails
                    // within seconds.
                    let verdict = stepped.passed() == skipped.passed()
                        && stepped.passed() == opts.bug.is_none();
                    if !verdict || skipped.steps * 3 >= stepped.steps {
                        wrong.lock().unwrap().push(format!(
                            "{opts}: stepped {:?} in {} steps, skipped {:?} in {} steps",
                            stepped.failures, stepped.steps, skipped.failures, skipped.steps
                        ));
                    }
                    if stepped.hash != skipped.hash
                        || stepped.op_checks != skipped.op_checks
                        || stepped.writes != skipped.writes
                    {
                        let first = stepped
                            .trace
                            .lines()
                            .zip(skipped.trace.lines())
                            .find(|(a, b)| a != b);
                        parted
                            .lock()
                            .unwrap()
                            .push(format!("{opts}: first difference {first:?}"));
                    }
                }
            });
        }
    });
    let wrong = wrong.into_inner().unwrap();
    assert!(wrong.is_empty(), "{wrong:#?}");
    let parted = parted.into_inner().unwrap();
    assert!(
        parted.len() * 10 <= cases.len(),
        "{} of {} traces changed by skipping: {parted:#?}",
        parted.len(),
        cases.len()
    );
}

#[test]
fn canonical_traces() {
    // 12: a node machine lost and re-created under its name with a new host NQN, its two
    // volumes force-detached six minutes after the loss; API latency spikes, the attacher's
    // reconciliation, re-issued calls.
    // 66: a node partitioned while alive (its controllers reconnecting): Kubernetes
    // force-detaches its volume six minutes later, the export is parked, the partition heals
    // and the node's reconnects are refused by the allow list; its kubelet's unmount waits on
    // the queued I/O until the node's orphan sweep disconnects the fenced-away controller.
    // 76: calm (no faults) with the fence: re-issued ControllerUnpublish calls ABORTED while
    // the first runs, DeleteVolume racing the last detach (FAILED_PRECONDITION until the
    // record is gone), the operator removing a VolumeAttachment's finalizer by hand.
    // 120: an RDS outage (33 s) with a node's NVMe controller lost under its mounts: the
    // kubelet sees the volume abnormal and restarts the pod, whose NodePublishVolume repairs
    // it once the RDS is back; the controller's reconcilers in a dry run while the CO
    // abandons a volume (its PV deleted by hand): it stays.
    // 494: the reconcilers deleting: the CO gives up after a CreateVolume and deletes a PV
    // by hand; the orphan reconciler deletes both after its grace;
    // a node machine lost with a volume, force-detached six minutes later (its
    // VolumeAttachment deleting before the attacher's unpublish).
    // 58: calm with the fence, two KubeVirt VMs' live migrations: one failed (the target
    // detached first), others completed, one outlasting its 38 s timeout (a third node's
    // attach FAILED_PRECONDITION meanwhile) and then completing after 57 s.
    for seed in [12u64, 58, 66, 76, 120, 494] {
        let r = sim::run(Options::from_seed(seed));
        assert!(r.passed(), "seed {seed}: {:?}", r.failures);
        insta::with_settings!({
            snapshot_path => concat!(env!("CARGO_MANIFEST_DIR"), "/../snapshots"),
            prepend_module_to_snapshot => false,
        }, {
            insta::assert_snapshot!(format!("sim_trace_seed_{seed}"), r.trace);
        });
    }
}

/// The harness finds `bug` within 1,000 seeds.
fn finds(bug: Bug) {
    let mut found = None;
    for chunk in (1..=1000u64).step_by(50) {
        let failed = sweep(chunk..chunk + 50, |s| Options::from_seed(s).with_bug(bug));
        if let Some(r) = failed.into_iter().next() {
            found = Some(r);
            break;
        }
    }
    let r = found.unwrap_or_else(|| panic!("no seed in 1..=1000 finds {bug:?}"));
    eprintln!(
        "{bug:?}: found by seed {}: {}\n  replay: {}",
        r.opts.seed,
        r.failures[0],
        r.replay_command()
    );
}

#[test]
fn finds_a_store_that_acknowledges_before_persisting() {
    finds(Bug::AckBeforePersist);
}

#[test]
fn finds_a_node_reported_gone_while_alive() {
    finds(Bug::NodeGoneWhileAlive);
}

#[test]
fn finds_a_store_that_drops_the_precondition() {
    finds(Bug::DropPrecondition);
}

#[test]
fn finds_an_rds_link_that_retries_a_lost_reply_blindly() {
    finds(Bug::BlindRdsRetry);
}

#[test]
fn finds_an_unpublish_that_opens_the_export_to_any_host() {
    finds(Bug::UnpublishOpensExport);
}

#[test]
fn finds_a_delete_that_does_not_check_the_holders() {
    finds(Bug::DeleteSkipsHolders);
}

#[test]
fn finds_a_reissued_publish_that_skips_the_lock() {
    finds(Bug::ReissuedPublishSkipsLock);
}

#[test]
fn finds_a_node_that_connects_without_its_reconnect_defaults() {
    finds(Bug::KernelReconnectDefaults);
}

#[test]
fn finds_a_node_that_remembers_device_paths() {
    finds(Bug::RememberedDevicePath);
}

#[test]
fn finds_a_third_node_let_in_during_a_live_migration() {
    finds(Bug::ThirdNodeAttaches);
}

#[test]
fn finds_an_rds_that_forgets_the_recorded_name() {
    finds(Bug::NamelessRds);
}

#[test]
fn finds_an_attachment_event_that_is_dropped() {
    finds(Bug::AttachedEventDropped);
}

#[test]
fn finds_an_orphan_reconciler_that_loses_the_persistent_volumes() {
    finds(Bug::OrphanReferencesLost);
}
