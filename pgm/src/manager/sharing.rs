//! Page sharing (the SHARED state; after VirtualBox's page fusion, here within one VM): pages
//! with identical contents are pointed at one read-only frame and their other frames go back to
//! the host. The first write to a shared page copies it to a private frame again.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::Pgm;
use crate::addr::{HostPhysAddr, PAGE_SIZE};
use crate::frames::{HostFrameAllocator, HostMemory};
use crate::page::{HandlerState, LargePageState, PageEvent, PageState, PageType};
use crate::paging::EntryFormat;
use crate::paging::Invalidation;
use crate::ram::PageLocation;

/// What a sharing pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharingReport {
    /// Pages that became SHARED in this pass.
    pub pages_shared: u64,
    /// Frames given back to the host in this pass.
    pub frames_freed: u64,
}

/// A frame that later pages with the same contents can share, and the page that still owns it
/// privately (`None` once it is a shared frame).
type Candidate = (HostPhysAddr, Option<PageLocation>);

/// # Page sharing (identical pages share one frame until written)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Shares the frames of RAM pages whose contents are identical: every ALLOCATED or
    /// WRITE_MONITORED page without a handler, a map lock or a 2 MiB mapping takes part. Returns
    /// what the pass did and the invalidation its remapping needs. Costs one read of each page.
    pub fn share_identical_pages(&mut self) -> (SharingReport, Invalidation) {
        let mut candidates: BTreeMap<u64, Vec<Candidate>> = BTreeMap::new();
        let shared: Vec<HostPhysAddr> = self.shared.keys().copied().collect();
        for frame in shared {
            candidates
                .entry(self.frame_hash(frame))
                .or_default()
                .push((frame, None));
        }
        let mut report = SharingReport::default();
        self.for_each_page(|pgm, location| {
            let page = pgm.ranges.page(location);
            let eligible = page.page_type() == PageType::Ram
                && matches!(page.state(), PageState::Allocated | PageState::WriteMonitored)
                && page.handler() == HandlerState::None
                && !page.is_locked()
                && page.large_page() != LargePageState::Large;
            let (Some(frame), true) = (page.frame(), eligible) else {
                return;
            };
            let same = candidates.entry(pgm.frame_hash(frame)).or_default();
            match same
                .iter_mut()
                .find(|(other, _)| pgm.same_contents(*other, frame))
            {
                Some((other, owner)) => {
                    if let Some(first) = owner.take() {
                        // The first page with these contents starts sharing its own frame.
                        pgm.share(first, *other, &mut report);
                    }
                    pgm.share(location, *other, &mut report);
                }
                None => same.push((frame, Some(location))),
            }
        });
        self.pool.flush(&mut self.frames);
        let invalidation = if report.pages_shared > 0 {
            Invalidation::SingleContext
        } else {
            Invalidation::None
        };
        (report, invalidation)
    }

    /// Makes the page at `location` share `frame`, counting what that did.
    fn share(&mut self, location: PageLocation, frame: HostPhysAddr, report: &mut SharingReport) {
        let own = self.ranges.page(location).frame();
        if self.apply_with(location, PageEvent::Share, Some(frame)) == Ok(true) {
            report.pages_shared += 1;
            report.frames_freed += u64::from(own != Some(frame));
        }
    }

    /// The page at `location` took `shared` in place of its frame `own` (possibly the same
    /// frame).
    pub(super) fn adopt_share(
        &mut self,
        own: HostPhysAddr,
        shared: Option<HostPhysAddr>,
        location: PageLocation,
    ) {
        let Some(shared) = shared else {
            return;
        };
        *self.shared.entry(shared).or_insert(0) += 1;
        if own == shared {
            // The frame stays, no longer private.
            self.pool.forget();
        } else {
            // The page's own entry changed in the caller, whose invalidation covers the rest
            // (and the pool keeps the frame until the next complete flush).
            let _: Invalidation = self.unmap_frame(own, Some(self.ranges.gpa_of(location)));
            self.pool.release(own);
        }
    }

    /// A page let go of the shared frame `frame`; the last one frees it.
    pub(super) fn drop_share(&mut self, frame: HostPhysAddr) {
        let Some(count) = self.shared.get_mut(&frame) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.shared.remove(&frame);
            // The last sharer's entry changed in the caller, whose invalidation covers the
            // rest (and the pool keeps the frame until the next complete flush).
            let _: Invalidation = self.unmap_frame(frame, None);
            self.pool.discard(frame);
        }
    }

    /// A read lock takes a reference on the shared frame `frame`, so it outlives the pages
    /// sharing it until the lock is released.
    pub(super) fn pin_share(&mut self, frame: HostPhysAddr) {
        *self.shared.entry(frame).or_insert(0) += 1;
        *self.share_pins.entry(frame).or_insert(0) += 1;
    }

    /// A read lock gives its reference on the shared frame `frame` back; the last reference
    /// frees it.
    pub(super) fn unpin_share(&mut self, frame: HostPhysAddr) {
        let Some(pins) = self.share_pins.get_mut(&frame) else {
            return;
        };
        *pins -= 1;
        if *pins == 0 {
            self.share_pins.remove(&frame);
        }
        self.drop_share(frame);
        self.pool.flush(&mut self.frames);
    }

    /// Frees every shared frame (VM termination).
    pub(super) fn release_shared(&mut self) {
        let frames: Vec<HostPhysAddr> = core::mem::take(&mut self.shared).into_keys().collect();
        self.frames.free_frames(&frames);
    }

    fn frame_hash(&self, frame: HostPhysAddr) -> u64 {
        let mut contents = [0u8; PAGE_SIZE as usize];
        self.memory.read(frame, &mut contents);
        // FNV-1a: cheap, and a match is confirmed byte by byte anyway.
        contents.iter().fold(0xCBF2_9CE4_8422_2325u64, |hash, &byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01B3)
        })
    }

    fn same_contents(&self, a: HostPhysAddr, b: HostPhysAddr) -> bool {
        if a == b {
            return false;
        }
        let (mut left, mut right) = ([0u8; PAGE_SIZE as usize], [0u8; PAGE_SIZE as usize]);
        self.memory.read(a, &mut left);
        self.memory.read(b, &mut right);
        left == right
    }
}

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
#[path = "sharing_tests.rs"]
mod sharing_tests;
