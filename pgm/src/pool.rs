//! The VM's private-frame pool, in place of VirtualBox's handy pages and GMM free batches:
//! faults take pre-allocated frames from a pool of [`HANDY_PAGES`] that is topped up in one
//! batch when [`HANDY_REFILL_AT`] remain, freed frames go back in batches of [`FREE_BATCH`], and
//! a per-VM limit caps the frames backing guest pages.
//!
//! A frame the guest could reach is not reused nor freed at once: it is *retired*, stamped with
//! the current TLB-flush generation, because any CPU that ran the VM may still hold a
//! translation to it. Only when a flush that started after the retirement has finished on
//! every such CPU ([`FramePool::flushed`]) does it join the pending-free batch, which refills
//! the pool or goes back to the host.

use alloc::vec::Vec;

use crate::addr::HostPhysAddr;
use crate::error::NoMemory;
use crate::frames::HostFrameAllocator;

/// Frames the pool holds when full.
pub const HANDY_PAGES: usize = 128;
/// The pool is topped up when this many or fewer remain.
pub const HANDY_REFILL_AT: usize = 32;
/// Freed frames are given back to the allocator this many at a time.
pub const FREE_BATCH: usize = 128;

/// Private frames of one VM: the handy pool, the pending-free batch and the limit.
#[derive(Default)]
pub struct FramePool {
    handy: Vec<HostPhysAddr>,
    /// Frames no CPU can reach any more: reused first, given back in batches.
    pending_free: Vec<HostPhysAddr>,
    /// Frames unmapped since a flush began, oldest first, with the generation they were
    /// retired in.
    retired: Vec<(u64, HostPhysAddr)>,
    /// The TLB-flush generation: raised by [`FramePool::begin_flush`].
    generation: u64,
    /// An operation that gives frames back (balloon, unregister, removal) found some still
    /// retired: they go back to the host as soon as their flush ends, not a batch later.
    give_back_when_flushed: bool,
    limit: Option<u64>,
    in_use: u64,
    taken: u64,
}

impl FramePool {
    /// Frames backing guest pages now (the manager counts them in its own statistics).
    #[cfg(test)]
    pub fn in_use(&self) -> u64 {
        self.in_use
    }

    /// Frames handed out for guest pages since creation.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    /// Frames waiting in the handy pool.
    pub fn handy(&self) -> usize {
        self.handy.len()
    }

    /// Freed frames not yet given back to the allocator (those awaiting a TLB flush included).
    pub fn pending_free(&self) -> usize {
        self.pending_free.len() + self.retired.len()
    }

    /// Retired frames that wait for a TLB flush before they can be reused or freed.
    pub fn awaiting_flush(&self) -> usize {
        self.retired.len()
    }

    /// Every frame the pool holds: the handy ones, the free batch and those awaiting a flush.
    /// None of them may be held by a page or reached by a leaf (the auditor checks it).
    pub fn frames(&self) -> impl Iterator<Item = HostPhysAddr> + '_ {
        self.handy
            .iter()
            .chain(&self.pending_free)
            .copied()
            .chain(self.retired.iter().map(|&(_, frame)| frame))
    }

    /// True when `frame` is retired and waits for a TLB flush.
    #[cfg(test)]
    pub fn is_awaiting_flush(&self, frame: HostPhysAddr) -> bool {
        self.retired.iter().any(|&(_, retired)| retired == frame)
    }

    /// Starts a TLB flush: frames retired so far may be reused once it has finished on every
    /// CPU. Returns the generation to pass to [`flushed`](Self::flushed).
    pub fn begin_flush(&mut self) -> u64 {
        self.generation += 1;
        self.generation - 1
    }

    /// The flush begun as `generation` has finished everywhere: frames retired up to it join
    /// the pending-free batch (given back when a batch is full).
    pub fn flushed(&mut self, generation: u64, frames: &mut impl HostFrameAllocator) {
        let reachable = self
            .retired
            .partition_point(|&(retired_in, _)| retired_in <= generation);
        self.pending_free
            .extend(self.retired.drain(..reachable).map(|(_, frame)| frame));
        if self.pending_free.len() >= FREE_BATCH || self.give_back_when_flushed {
            self.flush(frames);
        }
    }

    /// Retires frames the guest could reach that do not belong to the pool (ROM images, MMIO2
    /// regions): they go back to the host as soon as the next TLB flush ends.
    pub fn retire_all(&mut self, retired: &[HostPhysAddr]) {
        self.retire(retired);
        self.give_back_when_flushed = true;
    }

    fn retire(&mut self, retired: &[HostPhysAddr]) {
        let generation = self.generation;
        self.retired
            .extend(retired.iter().map(|&frame| (generation, frame)));
    }

    /// Sets the limit. A limit below what is in use only stops further allocation.
    pub fn set_limit(&mut self, limit: Option<u64>) {
        self.limit = limit;
    }

    /// True when the next [`take`](Self::take) would fail on the limit.
    pub fn at_limit(&self) -> bool {
        self.limit.is_some_and(|limit| self.in_use >= limit)
    }

    /// Takes a frame for a guest page: from the handy pool, topping it up first when it is
    /// empty. [`NoMemory::FrameLimit`] or [`NoMemory::OutOfFrames`] change nothing.
    pub fn take(&mut self, frames: &mut impl HostFrameAllocator) -> Result<HostPhysAddr, NoMemory> {
        if self.at_limit() {
            return Err(NoMemory::FrameLimit);
        }
        if self.handy.is_empty() {
            self.refill(frames);
        }
        let frame = self.handy.pop().ok_or(NoMemory::OutOfFrames)?;
        self.in_use += 1;
        self.taken += 1;
        Ok(frame)
    }

    /// Takes a 2 MiB chunk (512 contiguous frames) for a large page straight from the host;
    /// the limit counts all 512. [`NoMemory::FrameLimit`] or [`NoMemory::OutOfFrames`] change
    /// nothing.
    pub fn take_large(&mut self, frames: &mut impl HostFrameAllocator) -> Result<HostPhysAddr, NoMemory> {
        let count = crate::frames::FRAMES_PER_LARGE_PAGE;
        if self.limit.is_some_and(|limit| self.in_use + count > limit) {
            return Err(NoMemory::FrameLimit);
        }
        let chunk = frames.allocate_large().ok_or(NoMemory::OutOfFrames)?;
        self.in_use += count;
        self.taken += count;
        Ok(chunk)
    }

    /// Takes a frame for an EPT page table (a split of a 2 MiB block) from the handy pool,
    /// topping it up first when it is empty: the pool is the small reserve faults leave full.
    /// Not a guest page, so the limit does not count it. [`NoMemory::OutOfFrames`] changes
    /// nothing.
    pub fn take_table(&mut self, frames: &mut impl HostFrameAllocator) -> Result<HostPhysAddr, NoMemory> {
        if self.handy.is_empty() {
            self.refill(frames);
        }
        self.handy.pop().ok_or(NoMemory::OutOfFrames)
    }

    /// Gives back a frame [`take_table`](Self::take_table) gave that was not used.
    pub fn return_table(&mut self, frame: HostPhysAddr) {
        self.handy.push(frame);
    }

    /// True when the pool is down to [`HANDY_REFILL_AT`] frames.
    pub fn needs_refill(&self) -> bool {
        self.handy.len() <= HANDY_REFILL_AT
    }

    /// Tops the pool up to [`HANDY_PAGES`] in one allocator call; frames pending free are
    /// reused first. Returns how many frames the pool gained.
    pub fn refill(&mut self, frames: &mut impl HostFrameAllocator) -> usize {
        let before = self.handy.len();
        while self.handy.len() < HANDY_PAGES {
            match self.pending_free.pop() {
                Some(frame) => self.handy.push(frame),
                None => break,
            }
        }
        let wanted = HANDY_PAGES - self.handy.len();
        frames.allocate_frames(wanted, &mut self.handy);
        self.handy.len() - before
    }

    /// Takes back the frame of a guest page: retired until the next TLB flush, then reused or
    /// given back with a full batch.
    pub fn release(&mut self, frame: HostPhysAddr) {
        self.in_use -= 1;
        self.retire(&[frame]);
    }

    /// A frame backing a guest page stops counting as private without being freed (it became
    /// a shared frame).
    pub fn forget(&mut self) {
        self.in_use -= 1;
    }

    /// Retires a frame that no longer counts as private (a shared frame's last reference went).
    pub fn discard(&mut self, frame: HostPhysAddr) {
        self.retire(&[frame]);
    }

    /// Gives every pending frame no CPU can reach back to the allocator now; retired frames
    /// follow as soon as their flush ends.
    pub fn flush(&mut self, frames: &mut impl HostFrameAllocator) {
        frames.free_frames(&self.pending_free);
        self.pending_free.clear();
        self.give_back_when_flushed = !self.retired.is_empty();
    }

    /// Gives the handy frames and the free batch back to the allocator now (host memory
    /// pressure); frames awaiting a flush stay until it ends. The next take refills the pool.
    pub fn give_back_idle(&mut self, frames: &mut impl HostFrameAllocator) {
        self.flush(frames);
        frames.free_frames(&self.handy);
        self.handy.clear();
    }

    /// Gives back the handy, pending and retired frames (frames still in use are the
    /// caller's). Only when no CPU can reach the VM's memory any more (its termination).
    pub fn drain(&mut self, frames: &mut impl HostFrameAllocator) {
        let generation = self.begin_flush();
        self.flushed(generation, frames);
        self.flush(frames);
        frames.free_frames(&self.handy);
        self.handy.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimFrames;

    #[test]
    fn the_first_take_fills_the_pool_in_one_batch() {
        let mut frames = SimFrames::new(1000);
        let mut pool = FramePool::default();
        pool.take(&mut frames).unwrap();
        assert_eq!(pool.handy(), HANDY_PAGES - 1);
        assert_eq!(frames.inner.counts().used(), HANDY_PAGES as u64);
        assert_eq!((pool.in_use(), pool.taken()), (1, 1));
    }

    #[test]
    fn refill_tops_up_and_reuses_pending_frees_first() {
        let mut frames = SimFrames::new(1000);
        let mut pool = FramePool::default();
        let taken: Vec<_> = (0..100).map(|_| pool.take(&mut frames).unwrap()).collect();
        assert!(pool.needs_refill());
        for frame in &taken[..10] {
            pool.release(*frame);
        }
        let generation = pool.begin_flush();
        pool.flushed(generation, &mut frames);
        assert_eq!(pool.pending_free(), 10);
        let used = frames.inner.counts().used();
        assert_eq!(pool.refill(&mut frames), 100);
        assert_eq!(pool.handy(), HANDY_PAGES);
        assert_eq!(pool.pending_free(), 0);
        assert_eq!(
            frames.inner.counts().used(),
            used + 90,
            "10 came from the pending frees"
        );
    }

    #[test]
    fn frees_go_back_in_batches() {
        let mut frames = SimFrames::new(1000);
        let mut pool = FramePool::default();
        let taken: Vec<_> = (0..300).map(|_| pool.take(&mut frames).unwrap()).collect();
        let mut flushes = 0;
        for frame in taken {
            let before = frames.inner.counts().frees;
            pool.release(frame);
            let generation = pool.begin_flush();
            pool.flushed(generation, &mut frames);
            flushes += (frames.inner.counts().frees != before) as u32;
        }
        assert_eq!(flushes, 2, "300 frees make two full batches of 128");
        assert_eq!(pool.pending_free(), 300 - 2 * FREE_BATCH);
        pool.drain(&mut frames);
        assert_eq!(frames.inner.counts().used(), 0);
    }

    #[test]
    fn a_retired_frame_is_neither_reused_nor_freed_before_a_flush_begun_after_it_ends() {
        let mut frames = SimFrames::new(1000);
        let mut pool = FramePool::default();
        let taken: Vec<_> = (0..HANDY_PAGES)
            .map(|_| pool.take(&mut frames).unwrap())
            .collect();
        let early = pool.begin_flush();
        for &frame in &taken[..FREE_BATCH] {
            pool.release(frame);
        }
        // A flush that began before the retirement does not cover it.
        pool.flushed(early, &mut frames);
        assert_eq!(pool.awaiting_flush(), FREE_BATCH);
        pool.refill(&mut frames);
        assert!(!pool.handy.contains(&taken[0]), "a retired frame was reused");
        let used = frames.inner.counts().used();
        pool.flush(&mut frames);
        assert_eq!(frames.inner.counts().used(), used, "a retired frame was freed");
        let covering = pool.begin_flush();
        pool.flushed(covering, &mut frames);
        assert_eq!(pool.awaiting_flush(), 0);
        assert_eq!(
            frames.inner.counts().used(),
            used - FREE_BATCH as u64,
            "a full batch goes back once flushed"
        );
    }

    #[test]
    fn the_limit_and_exhaustion_are_distinct_and_change_nothing() {
        let mut frames = SimFrames::new(1000);
        let mut pool = FramePool::default();
        pool.set_limit(Some(2));
        pool.take(&mut frames).unwrap();
        pool.take(&mut frames).unwrap();
        assert_eq!(pool.take(&mut frames), Err(NoMemory::FrameLimit));
        assert_eq!(pool.in_use(), 2);
        let mut empty = SimFrames::new(0);
        let mut pool = FramePool::default();
        assert_eq!(pool.take(&mut empty), Err(NoMemory::OutOfFrames));
        assert_eq!((pool.in_use(), pool.handy()), (0, 0));
    }
}
