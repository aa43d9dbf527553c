//! Per-volume async lock table: operations on one volume are serialised, operations on
//! different volumes never wait on each other.
//!
//! The table is a small synchronous core — one mutex over a `BTreeMap` of entries — with a
//! hand-written future on top, so `tests/loom_*.rs` can model-check the whole protocol (loom
//! drives the future with `loom::future::block_on`, whose waker loom models too: a lost
//! wake-up shows up as a deadlock). Types come from [`crate::sync`], std or loom.
//!
//! Invariants:
//! - an entry exists exactly while its key has an owner (a live [`LockGuard`], or a waiter
//!   the lock was handed to but that has not been polled yet); waiters queue behind the
//!   owner, so "no holder and no waiter" ⇔ "no entry": memory is O(active keys);
//! - at most one owner per key (mutual exclusion); release hands the lock to the oldest
//!   waiter (FIFO, no barging), so a waiter cannot starve;
//! - a cancelled waiter (its future dropped) leaves the queue; if the lock had already been
//!   handed to it, it passes the lock on (or frees the entry), so nothing is leaked.
//!
//! Lock order: the table's mutex is held only inside `poll`/`drop`, never across `.await`,
//! and no other lock is taken while it is held. Wakers are woken after it is released.
//! Callers (the attachment manager) must not hold their own sync locks while awaiting
//! [`LockTable::lock`]; they may take them briefly while holding a [`LockGuard`].

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use crate::sync::{Arc, Mutex, lock};

/// A table of async locks keyed by `K` (a volume id in the driver).
pub struct LockTable<K> {
    inner: Arc<Mutex<Table<K>>>,
}

impl<K> Clone for LockTable<K> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K: Ord + Clone> Default for LockTable<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K> std::fmt::Debug for LockTable<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockTable").finish_non_exhaustive()
    }
}

struct Table<K> {
    entries: BTreeMap<K, Entry>,
    next_ticket: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// A live guard holds the lock.
    Guard,
    /// Handed to the waiter with this ticket, which has not been polled since.
    Granted(u64),
}

struct Entry {
    owner: Owner,
    waiters: VecDeque<Waiter>,
}

struct Waiter {
    ticket: u64,
    waker: Waker,
}

impl<K: Ord + Clone> Table<K> {
    /// Releases `key`'s lock: hands it to the oldest waiter (returning its waker, to be
    /// woken once the table mutex is released) or frees the entry.
    fn release(&mut self, key: &K) -> Option<Waker> {
        let entry = self.entries.get_mut(key)?;
        match entry.waiters.pop_front() {
            Some(next) => {
                entry.owner = Owner::Granted(next.ticket);
                Some(next.waker)
            }
            None => {
                self.entries.remove(key);
                None
            }
        }
    }
}

impl<K: Ord + Clone> LockTable<K> {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Table {
                entries: BTreeMap::new(),
                next_ticket: 0,
            })),
        }
    }

    /// Waits for `key`'s lock. Dropping the returned future before it completes gives up
    /// the place in the queue (and the lock, if it was already handed over).
    pub fn lock(&self, key: K) -> Acquire<K> {
        Acquire {
            table: Arc::clone(&self.inner),
            key,
            state: AcquireState::Start,
        }
    }

    /// Takes `key`'s lock if it is free right now.
    pub fn try_lock(&self, key: K) -> Option<LockGuard<K>> {
        let mut table = lock(&self.inner);
        if table.entries.contains_key(&key) {
            return None;
        }
        table.entries.insert(
            key.clone(),
            Entry {
                owner: Owner::Guard,
                waiters: VecDeque::new(),
            },
        );
        drop(table);
        Some(LockGuard {
            table: Arc::clone(&self.inner),
            key,
        })
    }

    /// Number of entries retained (keys with an owner). Zero when nothing is locked.
    pub fn len(&self) -> usize {
        lock(&self.inner).entries.len()
    }

    /// Whether no key is locked or awaited.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of waiters queued on `key`.
    pub fn waiters(&self, key: &K) -> usize {
        lock(&self.inner)
            .entries
            .get(key)
            .map_or(0, |e| e.waiters.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AcquireState {
    Start,
    Waiting(u64),
    Done,
}

/// Future of [`LockTable::lock`].
#[must_use = "the lock is taken only when the future is awaited"]
pub struct Acquire<K: Ord + Clone> {
    table: Arc<Mutex<Table<K>>>,
    key: K,
    state: AcquireState,
}

impl<K: Ord + Clone + Unpin> Future for Acquire<K> {
    type Output = LockGuard<K>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<LockGuard<K>> {
        let this = self.get_mut();
        let mut table = lock(&this.table);
        let table = &mut *table;
        match this.state {
            AcquireState::Start => match table.entries.get_mut(&this.key) {
                None => {
                    table.entries.insert(
                        this.key.clone(),
                        Entry {
                            owner: Owner::Guard,
                            waiters: VecDeque::new(),
                        },
                    );
                }
                Some(entry) => {
                    let ticket = table.next_ticket;
                    table.next_ticket = table.next_ticket.wrapping_add(1);
                    entry.waiters.push_back(Waiter {
                        ticket,
                        waker: cx.waker().clone(),
                    });
                    this.state = AcquireState::Waiting(ticket);
                    return Poll::Pending;
                }
            },
            AcquireState::Waiting(ticket) => {
                // While we wait, the entry exists: it has an owner ahead of us.
                let Some(entry) = table.entries.get_mut(&this.key) else {
                    // Unreachable by the invariants; recover by taking the free lock.
                    table.entries.insert(
                        this.key.clone(),
                        Entry {
                            owner: Owner::Guard,
                            waiters: VecDeque::new(),
                        },
                    );
                    this.state = AcquireState::Done;
                    return Poll::Ready(LockGuard {
                        table: Arc::clone(&this.table),
                        key: this.key.clone(),
                    });
                };
                if entry.owner != Owner::Granted(ticket) {
                    if let Some(w) = entry.waiters.iter_mut().find(|w| w.ticket == ticket)
                        && !w.waker.will_wake(cx.waker())
                    {
                        w.waker = cx.waker().clone();
                    }
                    return Poll::Pending;
                }
                entry.owner = Owner::Guard;
            }
            AcquireState::Done => panic!("lock future polled after completion"),
        }
        this.state = AcquireState::Done;
        Poll::Ready(LockGuard {
            table: Arc::clone(&this.table),
            key: this.key.clone(),
        })
    }
}

impl<K: Ord + Clone> Drop for Acquire<K> {
    fn drop(&mut self) {
        let AcquireState::Waiting(ticket) = self.state else {
            return;
        };
        let mut table = lock(&self.table);
        let wake = match table.entries.get_mut(&self.key) {
            Some(entry) if entry.owner == Owner::Granted(ticket) => table.release(&self.key),
            Some(entry) => {
                entry.waiters.retain(|w| w.ticket != ticket);
                None
            }
            None => None,
        };
        drop(table);
        if let Some(w) = wake {
            w.wake();
        }
    }
}

/// Holds one key's lock; releases it (to the next waiter, or frees the entry) on drop.
#[must_use = "the lock is released when the guard is dropped"]
pub struct LockGuard<K: Ord + Clone> {
    table: Arc<Mutex<Table<K>>>,
    key: K,
}

impl<K: Ord + Clone> LockGuard<K> {
    /// The locked key.
    pub fn key(&self) -> &K {
        &self.key
    }
}

impl<K: Ord + Clone + std::fmt::Debug> std::fmt::Debug for LockGuard<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard").field("key", &self.key).finish()
    }
}

impl<K: Ord + Clone> Drop for LockGuard<K> {
    fn drop(&mut self) {
        let wake = lock(&self.table).release(&self.key);
        if let Some(w) = wake {
            w.wake();
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::task::Waker;

    fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(f).poll(&mut cx)
    }

    #[test]
    fn second_locker_waits_and_gets_the_lock_on_release_then_the_entry_is_freed() {
        let t = LockTable::<u32>::new();
        let g = t.try_lock(1).unwrap();
        let mut a = t.lock(1);
        assert!(poll_once(&mut a).is_pending());
        assert_eq!(t.waiters(&1), 1);
        // Another key is independent.
        let other = t.try_lock(2).unwrap();
        drop(other);
        drop(g);
        let Poll::Ready(g2) = poll_once(&mut a) else {
            panic!("lock not handed over")
        };
        assert_eq!(t.len(), 1);
        drop(g2);
        drop(a);
        assert!(t.is_empty());
    }

    #[test]
    fn cancelled_waiter_leaves_the_queue_and_a_cancelled_grant_passes_the_lock_on() {
        let t = LockTable::<u32>::new();
        let g = t.try_lock(7).unwrap();
        let mut a = t.lock(7);
        let mut b = t.lock(7);
        let mut c = t.lock(7);
        assert!(poll_once(&mut a).is_pending());
        assert!(poll_once(&mut b).is_pending());
        assert!(poll_once(&mut c).is_pending());
        drop(b); // cancelled while queued
        assert_eq!(t.waiters(&7), 2);
        drop(g); // handed to a
        drop(a); // cancelled after the grant: passes to c
        let Poll::Ready(gc) = poll_once(&mut c) else {
            panic!("lock not passed on")
        };
        assert!(t.try_lock(7).is_none());
        drop(gc);
        assert!(t.is_empty());
    }

    #[tokio::test]
    async fn many_tasks_on_one_key_run_one_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let t = LockTable::<u32>::new();
        let inside = std::sync::Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (t, inside) = (t.clone(), std::sync::Arc::clone(&inside));
            tasks.push(tokio::spawn(async move {
                for _ in 0..50 {
                    let _g = t.lock(1).await;
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert!(t.is_empty());
    }
}
