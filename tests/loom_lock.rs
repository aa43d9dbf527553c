//! loom model checks of the per-volume lock table (`rds_csi::attachment::lock`).
//!
//! Run with:
//! `RUSTFLAGS="--cfg loom --cfg tokio_unstable" CARGO_TARGET_DIR=/work/target/loom cargo test --release --test 'loom_*'`
//! (`LOOM_MAX_PREEMPTIONS=3` explores more interleavings.) loom drives the lock futures
//! with its own `block_on`, whose waker it models: a lost wake-up is reported as a deadlock,
//! which aborts the run. So the deadlock checks are positive: "this order never deadlocks".
#![cfg(loom)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use rds_csi::attachment::lock::LockTable;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

/// Per-volume mutual exclusion: never two holders of one key; the entry is gone after.
#[test]
fn one_holder_per_key_and_the_entry_is_freed() {
    model(|| {
        let table = LockTable::<u8>::new();
        let inside = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let (table, inside) = (table.clone(), Arc::clone(&inside));
                thread::spawn(move || {
                    let guard = loom::future::block_on(table.lock(1));
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(guard);
                })
            })
            .collect();
        let guard = loom::future::block_on(table.lock(1));
        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
        inside.fetch_sub(1, Ordering::SeqCst);
        drop(guard);
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(
            table.len(),
            0,
            "entry retained with no holder and no waiter"
        );
    });
}

/// Different keys never wait on each other: a holder of key 1 that waits (spins) for a
/// holder of key 2 to finish always sees it finish.
#[test]
fn different_keys_do_not_block_each_other() {
    model(|| {
        let table = LockTable::<u8>::new();
        let done = Arc::new(AtomicUsize::new(0));
        let g1 = loom::future::block_on(table.lock(1));
        let t = {
            let (table, done) = (table.clone(), Arc::clone(&done));
            thread::spawn(move || {
                let g2 = loom::future::block_on(table.lock(2));
                done.store(1, Ordering::SeqCst);
                drop(g2);
            })
        };
        while done.load(Ordering::SeqCst) == 0 {
            thread::yield_now();
        }
        drop(g1);
        t.join().unwrap();
        assert_eq!(table.len(), 0);
    });
}

/// The documented lock order: the manager's map lock is taken only briefly while holding
/// a per-volume lock, and released before a per-volume lock is awaited. With two volumes
/// and a shared map lock, no interleaving deadlocks.
#[test]
fn the_documented_lock_order_never_deadlocks() {
    model(|| {
        let table = LockTable::<u8>::new();
        let map = Arc::new(Mutex::new(0u32));
        let worker = |key: u8, table: LockTable<u8>, map: Arc<Mutex<u32>>| {
            move || {
                // Read the map (released), then await the volume lock, then update the map.
                let _seen = *map.lock().unwrap();
                let g = loom::future::block_on(table.lock(key));
                *map.lock().unwrap() += 1;
                drop(g);
            }
        };
        let a = thread::spawn(worker(1, table.clone(), Arc::clone(&map)));
        let b = thread::spawn(worker(1, table.clone(), Arc::clone(&map)));
        worker(2, table.clone(), Arc::clone(&map))();
        a.join().unwrap();
        b.join().unwrap();
        assert_eq!(*map.lock().unwrap(), 3);
        assert_eq!(table.len(), 0);
    });
}

/// Polls `fut` once (registering its waker), then drops it: a caller that gives up while
/// queued (an RPC cancelled by its client).
struct PollOnceThenDrop<F>(Option<F>);
impl<F: Future + Unpin> Future for PollOnceThenDrop<F> {
    type Output = bool;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<bool> {
        let mut fut = self.0.take().expect("polled once");
        let got = Pin::new(&mut fut).poll(cx).is_ready();
        drop(fut);
        Poll::Ready(got)
    }
}

/// A waiter cancelled at any point (queued, or after the lock was handed to it) neither
/// leaks the entry nor loses the wake-up of the waiter behind it; no freed entry is reused
/// by a stale ticket.
#[test]
fn a_cancelled_waiter_neither_leaks_nor_loses_a_wakeup() {
    model(|| {
        let table = LockTable::<u8>::new();
        let holder = {
            let table = table.clone();
            thread::spawn(move || {
                let g = loom::future::block_on(table.lock(1));
                drop(g);
            })
        };
        let canceller = {
            let table = table.clone();
            thread::spawn(move || {
                let _ = loom::future::block_on(PollOnceThenDrop(Some(table.lock(1))));
            })
        };
        // A third locker must always get the lock (no lost wake-up after the cancel).
        let g = loom::future::block_on(table.lock(1));
        drop(g);
        holder.join().unwrap();
        canceller.join().unwrap();
        assert_eq!(table.len(), 0, "entry leaked");
    });
}

/// try_lock never takes a key that has an owner, and frees like lock does.
#[test]
fn try_lock_respects_the_owner() {
    model(|| {
        let table = LockTable::<u8>::new();
        let inside = Arc::new(AtomicUsize::new(0));
        let t = {
            let (table, inside) = (table.clone(), Arc::clone(&inside));
            thread::spawn(move || {
                if let Some(g) = table.try_lock(1) {
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(g);
                }
            })
        };
        let g = loom::future::block_on(table.lock(1));
        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
        inside.fetch_sub(1, Ordering::SeqCst);
        drop(g);
        t.join().unwrap();
        assert_eq!(table.len(), 0);
    });
}
