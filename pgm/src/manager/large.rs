//! 2 MiB large pages: a write fault in an untouched, unhandled 2 MiB block of RAM fills the
//! whole block from one contiguous host chunk and maps it with a single EPT entry. Whatever
//! later needs 4 KiB granularity inside the block (a handler, write monitoring, a reset or
//! balloon of one page, the A20 gate closing) splits it; when that need is gone and the frames
//! are still the contiguous chunk, the block is merged again.

use alloc::vec::Vec;

use super::Pgm;
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::frames::{HostFrameAllocator, HostMemory, FRAMES_PER_LARGE_PAGE};
use crate::page::{HandlerState, LargePageState, PageDescriptor, PageState, PageType};
use crate::paging::Invalidation;
use crate::ram::PageLocation;

const LARGE_PAGE_SIZE: u64 = FRAMES_PER_LARGE_PAGE * PAGE_SIZE;

impl<A: HostFrameAllocator, M: HostMemory> Pgm<A, M> {
    /// Lets write faults fill whole 2 MiB blocks from contiguous host memory (off by default:
    /// a block then costs 512 frames at its first write).
    pub fn set_large_pages(&mut self, enabled: bool) {
        self.large_pages = enabled;
    }

    /// True when `gpa` is mapped by a 2 MiB EPT entry.
    pub fn is_mapped_large(&self, gpa: GuestPhysAddr) -> bool {
        self.tables.is_large(&self.memory, gpa)
    }

    /// Fills the 2 MiB block around the ZERO page at `location` with one contiguous chunk and
    /// maps it large, when large pages are on and the whole block is untouched, unhandled RAM of
    /// one range. `None` when the block does not qualify or no chunk could be had; the caller
    /// then falls back to a 4 KiB page. The other 511 pages lose cached zero-frame translations,
    /// so the fill needs a single-context INVEPT.
    pub(super) fn try_large_fill(&mut self, location: PageLocation) -> Option<Invalidation> {
        if !self.large_pages || self.monitoring || !self.a20_enabled {
            return None;
        }
        let pages = self.block_pages(location)?;
        let untouched = pages.iter().all(|&at| {
            let page = self.ranges.page(at);
            page.page_type() == PageType::Ram
                && page.state() == PageState::Zero
                && page.handler() == HandlerState::None
        });
        if !untouched {
            return None;
        }
        let chunk = self.pool.take_large(&mut self.frames).ok()?;
        for (i, &at) in pages.iter().enumerate() {
            let frame = HostPhysAddr::new_truncate(chunk.as_u64() + i as u64 * PAGE_SIZE);
            self.memory.zero_frame(frame);
            let page = PageDescriptor::allocated(PageType::Ram, frame).with_large_page(LargePageState::Large);
            self.ranges.set_page(at, page);
        }
        self.counts.zero -= FRAMES_PER_LARGE_PAGE;
        self.counts.allocated += FRAMES_PER_LARGE_PAGE;
        let block = self.ranges.gpa_of(pages[0]);
        self.map_block_large(block, chunk);
        Some(Invalidation::SingleContext)
    }

    /// Maps the large block holding `location` with 4 KiB entries again; its pages remember
    /// that they were large, so [`merge_large_blocks`](Self::merge_large_blocks) can try later.
    pub(super) fn split_large_block(&mut self, location: PageLocation) {
        let Some(pages) = self.block_pages(location) else {
            return;
        };
        for &at in &pages {
            let page = self.ranges.page(at);
            self.ranges
                .set_page(at, page.with_large_page(LargePageState::Disabled));
        }
        let block = self.ranges.gpa_of(pages[0]);
        self.map_block_small(block);
    }

    /// Maps every split block large again whose pages are all plain, writable RAM still backed
    /// by their original contiguous chunk. Returns the invalidation the remapping needs.
    pub(super) fn merge_large_blocks(&mut self) -> Invalidation {
        if self.monitoring || !self.a20_enabled {
            return Invalidation::None;
        }
        let mut invalidation = Invalidation::None;
        for range in 0..self.ranges.len() {
            let Some(pages) = self.ranges.get(range).map(|r| r.page_count()) else {
                continue;
            };
            let mut page = 0;
            while page < pages {
                let location = PageLocation { range, page };
                if self.ranges.page(location).large_page() == LargePageState::Disabled {
                    if let Some(block) = self.block_pages(location) {
                        if self.merge(&block) {
                            invalidation = Invalidation::SingleContext;
                        }
                        page = block[block.len() - 1].page + 1;
                        continue;
                    }
                }
                page += 1;
            }
        }
        invalidation
    }

    fn merge(&mut self, block: &[PageLocation]) -> bool {
        let Some(chunk) = self.ranges.page(block[0]).frame() else {
            return false;
        };
        let eligible = chunk.as_u64() % LARGE_PAGE_SIZE == 0
            && block.iter().enumerate().all(|(i, &at)| {
                let page = self.ranges.page(at);
                page.page_type() == PageType::Ram
                    && page.state() == PageState::Allocated
                    && page.handler() == HandlerState::None
                    && page.frame() == Some(HostPhysAddr::new_truncate(chunk.as_u64() + i as u64 * PAGE_SIZE))
            });
        if !eligible {
            return false;
        }
        for &at in block {
            let page = self.ranges.page(at);
            self.ranges
                .set_page(at, page.with_large_page(LargePageState::Large));
        }
        let gpa = self.ranges.gpa_of(block[0]);
        self.map_block_large(gpa, chunk)
    }

    /// The 512 locations of the 2 MiB block holding `location`, when the block lies wholly in
    /// that page's range.
    pub(super) fn block_pages(&self, location: PageLocation) -> Option<Vec<PageLocation>> {
        let gpa = self.ranges.gpa_of(location).as_u64();
        let block = gpa & !(LARGE_PAGE_SIZE - 1);
        let range = self.ranges.get(location.range)?;
        if block < range.base().as_u64() || block + LARGE_PAGE_SIZE > range.end() {
            return None;
        }
        let first = location.page - ((gpa - block) / PAGE_SIZE) as usize;
        Some(
            (first..first + FRAMES_PER_LARGE_PAGE as usize)
                .map(|page| PageLocation {
                    range: location.range,
                    page,
                })
                .collect(),
        )
    }
}
