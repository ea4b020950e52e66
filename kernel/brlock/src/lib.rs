//! `brlock`: a "big-reader" reader-writer lock for data that many CPUs read briefly and often
//! and that is changed rarely — a VM's memory manager, whose read side is the lock-free fault
//! path of every vCPU.
//!
//! A common reader-writer lock counts its readers in one word, so two readers on two CPUs
//! bounce that word's cache line between them at every acquisition: the read side does not
//! scale. Here each reader slot (one per reading CPU; the kernel's vCPUs use their host CPU's)
//! has a counter on a cache line of its own, and the writer announces itself in one flag that
//! readers only read:
//!
//! - a reader increments its slot, then checks the writer flag; if a writer is there it backs
//!   out and waits for the flag to drop;
//! - a writer raises the flag (one writer at a time), then waits until every slot is zero.
//!
//! Both sides store, then load the other side's word, with a sequentially consistent fence
//! between, so at least one of them sees the other (the Dekker pattern): never a reader and a
//! writer inside together. (Fences rather than `SeqCst` operations: the C11 model needs one of
//! the two, and `loom` checks only the fences.) Slots are counters, not flags, so two threads
//! that share a slot are still excluded correctly, only slower. Readers wait only for writers and writers for everyone;
//! nobody waits while holding the lock, so the lock cannot deadlock unless a holder does.
//!
//! The crate is a piece of the kernel that is tested on the host, and under `loom`
//! (`RUSTFLAGS="--cfg loom" cargo test -p brlock --release`).
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

#[cfg(test)]
extern crate std;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::ops::{Deref, DerefMut};

#[cfg(loom)]
use loom::{
    cell::UnsafeCell,
    hint::spin_loop,
    sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering},
};

#[cfg(not(loom))]
use core::{
    hint::spin_loop,
    sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering},
};

/// `core`'s cell with loom's access API, so one body of code serves both.
#[cfg(not(loom))]
#[derive(Debug)]
struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    fn new(value: T) -> Self {
        UnsafeCell(core::cell::UnsafeCell::new(value))
    }

    fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }

    fn into_inner(self) -> T {
        self.0.into_inner()
    }
}

/// One reader slot's count of readers inside, alone on its cache line.
#[repr(align(64))]
#[derive(Debug)]
struct ReaderSlot(AtomicUsize);

/// A reader-writer lock over `T` whose readers name their slot (see the crate docs).
#[derive(Debug)]
pub struct BrLock<T> {
    writer: AtomicBool,
    /// Exclusive accesses so far (see [`ReadGuard::writes`]); changed only by the writer
    /// inside, so the lock orders it.
    writes: AtomicU64,
    readers: Box<[ReaderSlot]>,
    data: UnsafeCell<T>,
}

// SAFETY: the lock hands out `&T` to readers on several threads at once (so `T: Sync`) and
// `&mut T` to one writer at a time, possibly on another thread than the one that made it (so
// `T: Send`), exactly as `std::sync::RwLock` does.
unsafe impl<T: Send + Sync> Sync for BrLock<T> {}
// SAFETY: moving the lock moves `T`.
unsafe impl<T: Send> Send for BrLock<T> {}

impl<T> BrLock<T> {
    /// A lock over `data` with `reader_slots` slots, rounded up to a power of two (at least one
    /// is made), so that naming a slot costs a mask, not a division. Readers name a slot; give
    /// each thread that reads often (each vCPU) its own.
    pub fn new(data: T, reader_slots: usize) -> Self {
        let readers: Vec<ReaderSlot> = (0..reader_slots.max(1).next_power_of_two())
            .map(|_| ReaderSlot(AtomicUsize::new(0)))
            .collect();
        BrLock {
            writer: AtomicBool::new(false),
            writes: AtomicU64::new(0),
            readers: readers.into_boxed_slice(),
            data: UnsafeCell::new(data),
        }
    }

    /// The number of reader slots.
    pub fn reader_slots(&self) -> usize {
        self.readers.len()
    }

    /// Shared access through reader slot `slot` (taken modulo the slot count, so any number is
    /// correct; sharing a slot only costs speed). Waits while a writer holds or waits for the
    /// lock. Costs two atomic operations on the slot's own cache line and one read of the
    /// writer flag.
    pub fn read(&self, slot: usize) -> ReadGuard<'_, T> {
        // The slot count is a power of two: the mask is the modulo.
        let counter = &self.readers[slot & (self.readers.len() - 1)].0;
        loop {
            counter.fetch_add(1, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            // Acquire: the last writer's changes happen before this reader's reads.
            if !self.writer.load(Ordering::Acquire) {
                return ReadGuard { lock: self, counter };
            }
            // A writer is in or on its way: let it have the lock first.
            counter.fetch_sub(1, Ordering::Release);
            while self.writer.load(Ordering::Relaxed) {
                spin_loop();
            }
        }
    }

    /// Exclusive access. Waits for the writer before it, then for every reader inside to leave;
    /// readers arriving meanwhile wait for it.
    pub fn write(&self) -> WriteGuard<'_, T> {
        while self
            .writer
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            // Test before the next exchange: waiting writers only read the flag's line.
            while self.writer.load(Ordering::Relaxed) {
                spin_loop();
            }
        }
        fence(Ordering::SeqCst);
        for slot in self.readers.iter() {
            // Acquire: what every reader did before it left happens before this writer's entry.
            while slot.0.load(Ordering::Acquire) != 0 {
                spin_loop();
            }
        }
        self.entered_exclusively()
    }

    /// Counts an exclusive access that has begun, and hands out its guard.
    fn entered_exclusively(&self) -> WriteGuard<'_, T> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        WriteGuard { lock: self }
    }

    /// Exclusive access if no one else holds the lock now; `None` otherwise (for a caller that
    /// has other work to do while it waits, e.g. answering flush requests).
    pub fn try_write(&self) -> Option<WriteGuard<'_, T>> {
        self.writer
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        fence(Ordering::SeqCst);
        if self
            .readers
            .iter()
            .any(|slot| slot.0.load(Ordering::Acquire) != 0)
        {
            self.writer.store(false, Ordering::Release);
            return None;
        }
        Some(self.entered_exclusively())
    }

    /// Exclusive access through `&mut self`: no other reference exists, so no waiting.
    pub fn get_mut(&mut self) -> &mut T {
        self.writes.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `&mut self` excludes every guard, which borrows the lock.
        self.data.with_mut(|data| unsafe { &mut *data })
    }

    /// The data, the lock gone.
    pub fn into_inner(self) -> T {
        self.data.into_inner()
    }
}

/// Shared access to a [`BrLock`]'s data; the reader leaves when it drops.
#[must_use = "the lock is held only while the guard lives"]
pub struct ReadGuard<'a, T> {
    lock: &'a BrLock<T>,
    counter: &'a AtomicUsize,
}

impl<T> ReadGuard<'_, T> {
    /// How many times the data has been accessed exclusively (write guards and `get_mut`)
    /// since the lock was made. It cannot change while this guard lives, so two guards that
    /// read the same count saw the data with no exclusive access in between: what a reader
    /// remembered under the first still holds under the second, as far as writers go.
    pub fn writes(&self) -> u64 {
        // Relaxed: the writer changed it inside the lock, which this reader's entry ordered.
        self.lock.writes.load(Ordering::Relaxed)
    }
}

impl<T> Deref for ReadGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the guard's count keeps every writer out (see `BrLock::write`) until it drops,
        // and readers only ever get `&T`.
        self.lock.data.with(|data| unsafe { &*data })
    }
}

impl<T> Drop for ReadGuard<'_, T> {
    fn drop(&mut self) {
        // Release: what this reader did happens before the next writer's entry.
        self.counter.fetch_sub(1, Ordering::Release);
    }
}

/// Exclusive access to a [`BrLock`]'s data; the writer leaves when it drops.
#[must_use = "the lock is held only while the guard lives"]
pub struct WriteGuard<'a, T> {
    lock: &'a BrLock<T>,
}

impl<T> Deref for WriteGuard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the writer flag and the empty reader slots make this guard the only access.
        self.lock.data.with(|data| unsafe { &*data })
    }
}

impl<T> DerefMut for WriteGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes this the guard's only borrow.
        self.lock.data.with_mut(|data| unsafe { &mut *data })
    }
}

impl<T> Drop for WriteGuard<'_, T> {
    fn drop(&mut self) {
        // Release: what the writer did happens before every later reader's and writer's entry.
        self.lock.writer.store(false, Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::thread;

    /// Readers on several slots and a writer, each checking that no one else is inside in a
    /// way it excludes; the data's two halves must always agree.
    #[test]
    fn readers_and_writers_exclude_each_other() {
        let lock = BrLock::new((0u64, 0u64), 3);
        let inside = AtomicU64::new(0);
        const WRITER: u64 = 1 << 32;
        thread::scope(|scope| {
            for slot in 0..3 {
                let (lock, inside) = (&lock, &inside);
                scope.spawn(move || {
                    for _ in 0..20_000 {
                        let guard = lock.read(slot);
                        let seen = inside.fetch_add(1, Ordering::SeqCst);
                        assert_eq!(seen & !(WRITER - 1), 0, "a reader met a writer");
                        assert_eq!(guard.0, guard.1, "a reader saw a half-done write");
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
            let (lock, inside) = (&lock, &inside);
            scope.spawn(move || {
                for round in 1..=2_000 {
                    let mut guard = lock.write();
                    assert_eq!(
                        inside.fetch_add(WRITER, Ordering::SeqCst),
                        0,
                        "a writer met someone"
                    );
                    guard.0 = round;
                    thread::yield_now();
                    guard.1 = round;
                    inside.fetch_sub(WRITER, Ordering::SeqCst);
                }
            });
        });
        assert_eq!(lock.into_inner(), (2_000, 2_000));
    }

    #[test]
    fn readers_see_the_count_of_exclusive_accesses_before_them() {
        let mut lock = BrLock::new(0u32, 2);
        let before = lock.read(0).writes();
        assert_eq!(lock.read(1).writes(), before, "reads count nothing");
        *lock.write() += 1;
        let after_write = lock.read(0).writes();
        assert_eq!(after_write, before + 1);
        drop(lock.try_write().unwrap());
        *lock.get_mut() += 1;
        assert_eq!(lock.read(1).writes(), after_write + 2);
    }

    #[test]
    fn slots_wrap_and_may_be_shared() {
        let lock = BrLock::new(7, 2);
        let first = lock.read(0);
        let same_slot = lock.read(2);
        assert_eq!((*first, *same_slot), (7, 7));
        drop(first);
        // One reader is still inside on slot 0: the count, not a flag, says so.
        assert_eq!(lock.readers[0].0.load(Ordering::SeqCst), 1);
        assert!(lock.try_write().is_none(), "a reader is inside");
        drop(same_slot);
        let writer = lock.try_write().expect("no one is inside");
        assert!(lock.try_write().is_none(), "a writer is inside");
        drop(writer);
        *lock.write() += 1;
        assert_eq!(*lock.read(5), 8);
        assert_eq!(BrLock::new((), 0).reader_slots(), 1);
        assert_eq!(BrLock::new((), 3).reader_slots(), 4);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Every interleaving (up to three preemptions) of a reader and a writer: the writer's
    /// update of two words is seen whole or not at all, and loom checks each access of the data
    /// against the lock's orderings. (It fails without either fence. A second reader makes the
    /// spin loops' state space too large to finish; the host test above runs three.)
    /// Spin loops are branches to loom: bound the preemptions, as loom's docs advise.
    fn model(test: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.max_branches = 100_000;
        builder.check(test);
    }

    #[test]
    fn a_reader_never_sees_half_a_write() {
        model(|| {
            let lock = Arc::new(BrLock::new((0u64, 0u64), 2));
            let readers: Vec<_> = (0..1)
                .map(|slot: usize| {
                    let lock = Arc::clone(&lock);
                    thread::spawn(move || {
                        let guard = lock.read(slot);
                        assert_eq!(guard.0, guard.1);
                    })
                })
                .collect();
            {
                let mut guard = lock.write();
                guard.0 = 1;
                guard.1 = 1;
            }
            for reader in readers {
                reader.join().unwrap();
            }
            assert_eq!(*lock.read(0), (1, 1));
        });
    }
}
