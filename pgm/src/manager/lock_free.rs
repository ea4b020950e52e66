//! The lock-free fault path (as KVM's fast page fault): the faults that change no frame and no
//! table — the write-monitor fault and the remap of a leaf that grants less than its descriptor
//! calls for (a read-only remap, or a fault that another vCPU already resolved) — resolved
//! through `&self`, so on the read side of the VM's lock, where vCPUs on different CPUs fault
//! in parallel.
//!
//! # The rule that makes it safe
//!
//! On the read side no structural change runs (ranges, tables, frames and every other field
//! stand still), and lock-free faults make only these changes:
//!
//! - a descriptor goes from WRITE_MONITORED to ALLOCATED with its written-to flag, by one
//!   compare-exchange (the state machine's own `Write` transition), so exactly one vCPU claims
//!   each page's write;
//! - a 4 KiB leaf is replaced, by one compare-exchange, with the leaf the page's descriptor
//!   calls for, and only while the leaf does not grant the faulting access. A descriptor read
//!   before another vCPU's claim calls for read-only where the claim calls for writable; such a
//!   stale leaf can only replace one that does not grant reads, and the claiming vCPU, whose
//!   write it then does not grant, replaces it in turn. So when every lock-free fault is done,
//!   each leaf is what its descriptor calls for: the auditor's rule holds whenever the write
//!   side gets the lock.
//!
//! Everything else — a page with a handler, locks, a shared frame, a 2 MiB mapping, the A20
//! gate closed, a fault that needs a frame, a full log — returns `None`, and the caller takes the
//! lock and calls [`Pgm::resolve_fault`], which also finishes whatever a lock-free fault left.
//!
//! # Written pages
//!
//! A claimed page goes into its vCPU's written log (one per vCPU, [`WRITTEN_LOG_ENTRIES`]
//! entries, on cache lines of its own, so vCPUs share no written cache line). The manager folds
//! the logs into its written list and state counts under `&mut self` before anything reads or
//! changes them (`fold_lock_free_writes`), so harvests, the counts and the state machine see
//! every lock-free write; [`Pgm::stats`] counts the unfolded ones.

use alloc::boxed::Box;
use alloc::vec::Vec;

use super::{FaultOutcome, Pgm, Resolution};
use crate::addr::{GuestPhysAddr, HostPhysAddr};
use crate::frames::{HostFrameAllocator, HostMemory};
use crate::page::{
    transition, FrameEffect, HandlerState, LargePageState, PageDescriptor, PageEvent, PageState, PageType,
};
use crate::paging::{encode, Access, Entry, EntryFormat, Invalidation, Leaf};
use crate::sync::{fence, AtomicBool, AtomicU64, AtomicUsize, Exclusive, Ordering};

use super::mapping::leaf_for;

/// Entries in each vCPU's written log. A vCPU whose log is full takes its next write-monitor
/// fault under the lock, which empties every log (as a PML-full exit drains the PML buffer).
pub const WRITTEN_LOG_ENTRIES: usize = 512;

/// A log entry whose claim lost to another vCPU: nothing was written.
const NOTHING: u64 = u64::MAX;

/// One vCPU's written log, alone on its cache lines.
#[repr(align(64))]
struct WrittenLog {
    len: AtomicUsize,
    entries: Box<[AtomicU64]>,
}

impl WrittenLog {
    fn new() -> Self {
        WrittenLog {
            len: AtomicUsize::new(0),
            entries: (0..WRITTEN_LOG_ENTRIES)
                .map(|_| AtomicU64::new(NOTHING))
                .collect(),
        }
    }

    /// Reserves the next entry; `None` when the log is full. A compare-exchange rather than an
    /// add, so that the count never passes the capacity even if two threads share a vCPU.
    fn reserve(&self) -> Option<usize> {
        let mut len = self.len.load(Ordering::Relaxed);
        loop {
            if len == WRITTEN_LOG_ENTRIES {
                return None;
            }
            match self
                .len
                .compare_exchange(len, len + 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(len),
                Err(now) => len = now,
            }
        }
    }

    /// The pages logged and not yet folded (`&self`: for statistics while vCPUs run).
    fn logged(&self) -> u64 {
        let len = self.len.load(Ordering::Relaxed).min(WRITTEN_LOG_ENTRIES);
        self.entries[..len]
            .iter()
            .filter(|entry| entry.load(Ordering::Relaxed) != NOTHING)
            .count() as u64
    }

    /// Empties the log, handing each page logged to `visit`.
    fn drain(&mut self, mut visit: impl FnMut(GuestPhysAddr)) {
        let len = self.len.get();
        for entry in &mut self.entries[..len] {
            let raw = entry.get();
            if raw != NOTHING {
                visit(GuestPhysAddr::new_truncate(raw));
            }
            // A reserved entry reads as nothing until it is filled (for `logged`).
            entry.set(NOTHING);
        }
        self.len.set(0);
    }
}

/// The written logs of a VM's vCPUs, and whether any holds something to fold.
#[derive(Default)]
pub(super) struct LockFreeLogs {
    logs: Box<[WrittenLog]>,
    /// Set (once, then only read, so the line stays shared) by a vCPU that logged something.
    pending: AtomicBool,
}

impl LockFreeLogs {
    fn new(vcpus: usize) -> Self {
        let logs: Vec<WrittenLog> = (0..vcpus).map(|_| WrittenLog::new()).collect();
        LockFreeLogs {
            logs: logs.into_boxed_slice(),
            pending: AtomicBool::new(false),
        }
    }

    fn mark_pending(&self) {
        if !self.pending.load(Ordering::Relaxed) {
            self.pending.store(true, Ordering::Relaxed);
        }
    }
}

/// True for a page the lock-free path may resolve: plain RAM mapped by its own 4 KiB leaf —
/// no handler, no map lock (whose bookkeeping the lock keeps), no shared frame (which the
/// reverse map records), no 2 MiB mapping (which a change must split).
pub(super) fn takes_lock_free_faults(page: PageDescriptor) -> bool {
    page.page_type() == PageType::Ram
        && page.handler() == HandlerState::None
        && page.large_page() != LargePageState::Large
        && !page.is_locked()
        && matches!(
            page.state(),
            PageState::Zero | PageState::Allocated | PageState::WriteMonitored
        )
}

/// # Lock-free faults (the read side of the VM lock)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Gives each of `vcpus` vCPUs (numbered from 0) a written log, so that they can take
    /// write-monitor faults without the lock; with none (the default) every such fault takes
    /// it. Costs 4 KiB per vCPU. Locking: exclusive.
    pub fn set_lock_free_vcpus(&mut self, vcpus: usize) {
        self.fold_lock_free_writes();
        self.lock_free = LockFreeLogs::new(vcpus);
    }

    /// Resolves the EPT violation of vCPU `vcpu` at `gpa` for `access` without the lock, when
    /// it needs neither a frame nor a table (see the module docs): a write to a write-monitored
    /// page marks it written, logs it and makes its leaf writable; a leaf that grants less than
    /// the page's descriptor calls for is rewritten. `None`: nothing was changed that the
    /// caller must act on; take the lock and call [`resolve_fault`](Self::resolve_fault).
    ///
    /// Locking: shared (the read side of the VM's lock), with other lock-free faults running.
    /// `vcpu` picks the written log: each vCPU should use its own number (shared numbers are
    /// correct, only slower; a number without a log declines every write-monitor fault). The violation itself flushed the faulting CPU's translations of
    /// `gpa`, and permissions only grow here, so the resolution needs no invalidation.
    pub fn resolve_fault_lock_free(
        &self,
        vcpu: usize,
        gpa: GuestPhysAddr,
        access: Access,
    ) -> Option<FaultOutcome> {
        // With the gate closed a page shows at a second address: the lock keeps both in step.
        if !self.a20_enabled {
            return None;
        }
        // A page under a 2 MiB leaf or in an unmapped block has no page table: the locked
        // path's, as is a write under an entry that withholds writes (it pushes write
        // monitoring's protection down first, see `lazy_protection`), unless the first write
        // in a block since a harvest can settle the block here.
        let entry = match self.tables.leaf_entry_addr(&self.memory, gpa, access) {
            Some(entry) => entry,
            None if access == Access::Write && self.settle_block_shared(gpa) => {
                self.tables.leaf_entry_addr(&self.memory, gpa, access)?
            }
            None => return None,
        };
        // Whatever a settle on another CPU did before it gave a table entry on this walk its
        // write permission back is seen from here on (the entry's compare-exchange releases).
        fence(Ordering::Acquire);
        let location = self.ranges.find(gpa)?;
        let word = self.ranges.descriptor(location);
        let mut page = PageDescriptor::from_raw(word.load(Ordering::Acquire));
        if !takes_lock_free_faults(page) {
            return None;
        }
        let mut resolution = Resolution::Remap;
        if access == Access::Write && page.state() == PageState::WriteMonitored {
            let claimed;
            (page, claimed) = self.claim_write(vcpu, gpa.page_base(), word, page)?;
            if claimed {
                resolution = Resolution::WriteMonitor;
            }
        }
        // A write to a ZERO page needs a frame: the lock's work. So does anything a page that
        // changed under a lost claim no longer allows.
        let leaf =
            leaf_for(page, self.zero_frame).filter(|leaf| leaf.permissions.contains(access.needs()))?;
        self.install_leaf(entry, leaf, access);
        Some(FaultOutcome::Resolved {
            invalidation: Invalidation::None,
            resolution,
        })
    }

    /// Claims the write of the write-monitored `page` (at `word`, guest address `gpa`) for
    /// `vcpu`: reserves an entry in its log, then moves the descriptor through the state
    /// machine's `Write` transition with one compare-exchange. Returns the descriptor as it now
    /// is and whether this vCPU claimed it (`false`: another vCPU did first). `None`, changing
    /// nothing: monitoring is off, the page is already written, or the log is missing or full.
    fn claim_write(
        &self,
        vcpu: usize,
        gpa: GuestPhysAddr,
        word: &AtomicU64,
        page: PageDescriptor,
    ) -> Option<(PageDescriptor, bool)> {
        if !self.monitoring || page.written_to() {
            return None;
        }
        let step = transition(page, PageEvent::Write).ok()?;
        if step.effect != FrameEffect::None {
            return None;
        }
        let written = step.apply(page, None).with_written_to(true);
        let log = self.lock_free.logs.get(vcpu)?;
        let entry = &log.entries[log.reserve()?];
        let outcome = word.compare_exchange(page.raw(), written.raw(), Ordering::AcqRel, Ordering::Acquire);
        // Pending either way, so that a log holding only lost claims is emptied too.
        self.lock_free.mark_pending();
        match outcome {
            Ok(_) => {
                entry.store(gpa.as_u64(), Ordering::Relaxed);
                Some((written, true))
            }
            Err(now) => {
                entry.store(NOTHING, Ordering::Relaxed);
                let now = PageDescriptor::from_raw(now);
                takes_lock_free_faults(now).then_some((now, false))
            }
        }
    }

    /// Makes the leaf at `entry` grant `access` as `leaf` (what the page's descriptor calls
    /// for): done when it already does (another vCPU got there first), else replaced by a
    /// compare-exchange, retried if the leaf changed meanwhile (another vCPU, or the
    /// processor's accessed and dirty bits).
    fn install_leaf(&self, entry: HostPhysAddr, leaf: Leaf, access: Access) {
        let wanted = encode::<F>(Some(leaf));
        loop {
            let raw = self.memory.read_u64(entry);
            if let Entry::Leaf(current) = F::decode(raw, 0) {
                if current.frame == leaf.frame && current.permissions.contains(access.needs()) {
                    return;
                }
            }
            if self.memory.compare_exchange_u64(entry, raw, wanted).is_ok() {
                return;
            }
        }
    }

    /// Moves what lock-free faults logged into the written list and the state counts. Runs
    /// (under `&mut self`, so with no lock-free fault running) before anything reads or
    /// changes either; costs one flag test when nothing was logged.
    pub(super) fn fold_lock_free_writes(&mut self) {
        if !self.lock_free.pending.get() {
            return;
        }
        self.lock_free.pending.set(false);
        let mut written = 0;
        let ranges = &mut self.ranges;
        for log in self.lock_free.logs.iter_mut() {
            log.drain(|gpa| {
                if let Some(location) = ranges.find(gpa) {
                    if let Some(range) = ranges.get_mut(location.range) {
                        range.note_listed(location.page);
                    }
                }
                self.written.push(gpa);
                written += 1;
            });
        }
        self.counts.lock_free_written(written);
    }

    /// Pages lock-free faults moved from WRITE_MONITORED to ALLOCATED that the counts do not
    /// show yet.
    pub(super) fn lock_free_writes_unfolded(&self) -> u64 {
        self.lock_free.logs.iter().map(WrittenLog::logged).sum()
    }
}

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
mod tests {
    use std::vec::Vec;

    use super::*;
    use crate::paging::Permissions;
    use crate::test_support::{
        assert_accounting, assert_isolated, gpa, guest_write, pgm_with_frames, GuestAccess, SimPgm, MIB,
    };

    const PAGES: u64 = 8;

    /// A VM with `PAGES` pages of RAM at 1 MiB, all written once, under write monitoring with
    /// its protection pushed down to their leaves, with written logs for two vCPUs.
    fn monitored() -> SimPgm {
        monitored_pages(PAGES, 256, 2)
    }

    /// [`monitored`] with `pages` pages on `frames` frames and logs for `vcpus` vCPUs.
    fn monitored_pages(pages: u64, frames: u64, vcpus: usize) -> SimPgm {
        let mut pgm = pgm_with_frames(frames);
        pgm.register_ram(gpa(MIB), pages * PAGE, "ram").unwrap();
        for page in 0..pages {
            pgm.write_phys(page_at(page), &[1]).unwrap();
        }
        pgm.start_write_monitoring();
        push_protection_down(&mut pgm, pages);
        pgm.set_lock_free_vcpus(vcpus);
        pgm
    }

    /// What the first locked write fault under the root does for the first `pages` pages: the
    /// protection armed at the root comes down to their leaves.
    fn push_protection_down(pgm: &mut SimPgm, pages: u64) {
        for page in 0..pages {
            pgm.open_write_path(page_at(page));
        }
    }

    fn writable(pgm: &SimPgm, at: GuestPhysAddr) -> bool {
        pgm.translate(at, Access::Write).is_ok()
    }

    const PAGE: u64 = crate::addr::PAGE_SIZE;

    fn page_at(page: u64) -> GuestPhysAddr {
        gpa(MIB + page * PAGE)
    }

    fn permissions(pgm: &SimPgm, at: GuestPhysAddr) -> Option<Permissions> {
        match pgm.nested_entry(at) {
            Entry::Leaf(leaf) => Some(leaf.permissions),
            _ => None,
        }
    }

    fn resolved(resolution: Resolution) -> Option<FaultOutcome> {
        Some(FaultOutcome::Resolved {
            invalidation: Invalidation::None,
            resolution,
        })
    }

    fn harvest(pgm: &mut SimPgm) -> Vec<GuestPhysAddr> {
        let mut written = Vec::new();
        let _ = pgm.harvest_written(&mut written);
        written
    }

    #[test]
    fn a_lock_free_write_monitor_fault_is_logged_counted_and_harvested_once() {
        let mut pgm = monitored();
        let before = pgm.stats();
        assert_eq!(
            permissions(&pgm, page_at(3)),
            Some(Permissions::READ | Permissions::EXECUTE)
        );
        assert_eq!(
            pgm.resolve_fault_lock_free(1, gpa(page_at(3).as_u64() + 0x10), Access::Write),
            resolved(Resolution::WriteMonitor)
        );
        assert_eq!(permissions(&pgm, page_at(3)), Some(Permissions::all()));
        let page = pgm.page(page_at(3)).unwrap();
        assert_eq!((page.state(), page.written_to()), (PageState::Allocated, true));
        // Counted before the fold (stats through `&self`, as while vCPUs run) and after.
        let after = pgm.stats();
        assert_eq!(after.allocated_pages, before.allocated_pages + 1);
        assert_eq!(after.write_monitored_pages, before.write_monitored_pages - 1);
        assert_isolated(&pgm, "after a lock-free fault");
        // The same vCPU's retry, or another vCPU faulting on its stale translation, finds the
        // work done.
        assert_eq!(
            pgm.resolve_fault_lock_free(0, page_at(3), Access::Write),
            resolved(Resolution::Remap)
        );
        assert_eq!(harvest(&mut pgm), [page_at(3)]);
        assert_eq!(pgm.stats(), before, "re-protected");
        assert!(!writable(&pgm, page_at(3)), "re-armed above the leaf");
        assert_eq!(harvest(&mut pgm), []);
        assert_isolated(&pgm, "after the harvest");
        assert_accounting(&pgm);
    }

    #[test]
    fn a_claim_lost_to_another_vcpu_logs_nothing_and_still_maps_the_page() {
        let mut pgm = monitored();
        let location = pgm.ranges.find(page_at(5)).unwrap();
        let monitored = pgm.ranges.page(location);
        // vCPU 0 read the descriptor as write-monitored; vCPU 1 claims the page first.
        assert_eq!(
            pgm.resolve_fault_lock_free(1, page_at(5), Access::Write),
            resolved(Resolution::WriteMonitor)
        );
        pgm.tables
            .set_leaf(&mut pgm.memory, page_at(5), leaf_for(monitored, pgm.zero_frame));
        let word = pgm.ranges.descriptor(location);
        let (now, claimed) = pgm.claim_write(0, page_at(5), word, monitored).unwrap();
        assert!(!claimed);
        assert_eq!(now.state(), PageState::Allocated);
        assert_eq!(
            pgm.lock_free_writes_unfolded(),
            1,
            "the lost claim logged nothing"
        );
        // vCPU 0 goes on to make the leaf writable (vCPU 1 has not yet, above).
        assert_eq!(
            pgm.resolve_fault_lock_free(0, page_at(5), Access::Write),
            resolved(Resolution::Remap)
        );
        assert_eq!(permissions(&pgm, page_at(5)), Some(Permissions::all()));
        assert_isolated(&pgm, "after the race");
        assert_eq!(harvest(&mut pgm), [page_at(5)], "listed once");
    }

    #[test]
    fn a_leaf_that_lost_sync_is_remapped_read_only_without_the_lock() {
        let mut pgm = monitored();
        pgm.tables.set_leaf(&mut pgm.memory, page_at(2), None);
        assert_eq!(
            pgm.resolve_fault_lock_free(0, page_at(2), Access::Read),
            resolved(Resolution::Remap)
        );
        assert_eq!(
            permissions(&pgm, page_at(2)),
            Some(Permissions::READ | Permissions::EXECUTE)
        );
        assert_isolated(&pgm, "after the remap");
        assert_eq!(harvest(&mut pgm), [], "a read writes nothing");
    }

    #[test]
    fn the_locked_fault_finishes_a_leaf_a_lock_free_fault_left_read_only() {
        let mut pgm = monitored();
        let location = pgm.ranges.find(page_at(1)).unwrap();
        let monitored = pgm.ranges.page(location);
        pgm.resolve_fault_lock_free(0, page_at(1), Access::Write).unwrap();
        // As if the claiming vCPU had not yet written the leaf when another took the lock.
        pgm.tables
            .set_leaf(&mut pgm.memory, page_at(1), leaf_for(monitored, pgm.zero_frame));
        assert_eq!(
            guest_write(&mut pgm, page_at(1), &[7]),
            GuestAccess::Done { faults: 1 },
            "one locked fault rewrites the leaf"
        );
        assert_isolated(&pgm, "after the locked fault");
        assert_eq!(harvest(&mut pgm), [page_at(1)]);
    }

    #[test]
    fn a_write_under_protection_armed_above_the_leaf_is_the_locks() {
        let mut pgm = monitored();
        let _ = harvest(&mut pgm);
        let before = (pgm.stats(), pgm.page(page_at(4)), pgm.nested_entry(page_at(4)));
        assert_eq!(
            pgm.resolve_fault_lock_free(0, page_at(4), Access::Write),
            None,
            "declined: the root entry withholds writes"
        );
        assert_eq!(
            (pgm.stats(), pgm.page(page_at(4)), pgm.nested_entry(page_at(4))),
            before
        );
        assert!(matches!(
            pgm.resolve_fault(page_at(4), Access::Write),
            FaultOutcome::Resolved {
                resolution: Resolution::WriteMonitor,
                ..
            }
        ));
        // The locked fault pushed the protection down: its neighbours' faults are lock-free.
        assert_eq!(
            pgm.resolve_fault_lock_free(0, page_at(6), Access::Write),
            resolved(Resolution::WriteMonitor)
        );
        assert_isolated(&pgm, "after both faults");
        assert_eq!(harvest(&mut pgm), [page_at(4), page_at(6)]);
    }

    #[test]
    fn faults_the_lock_free_path_cannot_take_change_nothing() {
        let mut pgm = monitored();
        let untouched = |pgm: &SimPgm| (pgm.stats(), pgm.page(page_at(0)), pgm.nested_entry(page_at(0)));
        let before = untouched(&pgm);
        // A vCPU without a log.
        assert_eq!(pgm.resolve_fault_lock_free(2, page_at(0), Access::Write), None);
        // Outside RAM.
        assert_eq!(pgm.resolve_fault_lock_free(0, gpa(64 * MIB), Access::Write), None);
        // A ZERO page needs a frame.
        pgm.register_ram(gpa(2 * MIB), PAGE, "zero").unwrap();
        assert_eq!(pgm.resolve_fault_lock_free(0, gpa(2 * MIB), Access::Write), None);
        // A map lock's bookkeeping is the lock's.
        let lock = pgm.lock_page_for_read(page_at(0)).unwrap();
        assert_eq!(pgm.resolve_fault_lock_free(0, page_at(0), Access::Write), None);
        pgm.release_page_lock(lock.lock);
        // The A20 gate closed.
        let _ = pgm.set_a20(false);
        assert_eq!(pgm.resolve_fault_lock_free(0, page_at(0), Access::Write), None);
        let _ = pgm.set_a20(true);
        assert_eq!(untouched(&pgm).1, before.1);
        assert_eq!(untouched(&pgm).2, before.2);
        // Monitoring off: nothing to log.
        let _ = pgm.stop_write_monitoring();
        pgm.tables.set_leaf(&mut pgm.memory, page_at(0), None);
        assert_eq!(
            pgm.resolve_fault_lock_free(0, page_at(0), Access::Write),
            resolved(Resolution::Remap)
        );
    }

    #[test]
    fn a_full_log_sends_the_fault_to_the_lock_which_empties_every_log() {
        let pages = WRITTEN_LOG_ENTRIES as u64 + 1;
        let mut pgm = monitored_pages(pages, 2048, 1);
        for page in 0..WRITTEN_LOG_ENTRIES as u64 {
            assert_eq!(
                pgm.resolve_fault_lock_free(0, page_at(page), Access::Write),
                resolved(Resolution::WriteMonitor)
            );
        }
        let last = page_at(WRITTEN_LOG_ENTRIES as u64);
        assert_eq!(
            pgm.resolve_fault_lock_free(0, last, Access::Write),
            None,
            "the log is full"
        );
        assert!(matches!(
            pgm.resolve_fault(last, Access::Write),
            FaultOutcome::Resolved { .. }
        ));
        assert_eq!(
            pgm.lock_free_writes_unfolded(),
            0,
            "the locked fault folded the log"
        );
        let written = harvest(&mut pgm);
        assert_eq!(written.len() as u64, pages);
        let mut sorted = written.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len() as u64, pages, "each page once");
        assert_isolated(&pgm, "after the harvest");
        assert_accounting(&pgm);
    }
}

/// The `loom` model that needs the manager's private tables (see `crate::loom_model_tests`).
#[cfg(all(test, loom))]
mod loom_models {
    use loom::sync::Arc;
    use loom::thread;

    use super::*;
    use crate::loom_model_tests::{model, monitored_vm, page_at, write_fault};
    use crate::test_support::assert_isolated;

    /// A vCPU reads a page whose leaf lost sync while another claims the page's write: the
    /// reader may remap it read-only from a descriptor read before the claim, but the page ends
    /// writable, as its descriptor calls for (the auditor), and harvested once.
    #[test]
    fn a_stale_read_only_remap_never_outlives_a_claim() {
        model(|| {
            let vm = monitored_vm();
            {
                let mut pgm = vm.write();
                let pgm = &mut *pgm;
                pgm.tables.set_leaf(&mut pgm.memory, page_at(0), None);
            }
            let reader = {
                let vm = Arc::clone(&vm);
                thread::spawn(move || vm.read(1).resolve_fault_lock_free(1, page_at(0), Access::Read))
            };
            assert!(write_fault(&vm, 0, 0), "the only writer claims the page");
            assert!(
                reader.join().unwrap().is_some(),
                "a plain RAM read is resolved lock-free"
            );
            let mut pgm = vm.write();
            assert_isolated(&pgm, "after the remap and the claim");
            let mut written = Vec::new();
            let _ = pgm.harvest_written(&mut written);
            assert_eq!(written, [page_at(0)]);
        });
    }
}
