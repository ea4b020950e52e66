//! Registered RAM ranges: one descriptor per 4 KiB page, kept sorted by base, found in O(1)
//! through a directory of the guest-physical span they cover (see [`Directory`]).
//!
//! Descriptors are atomic words: the lock-free fault path changes them through `&self` while
//! other vCPUs read them (see `manager::lock_free`); everything else changes them through
//! `&mut self`, with plain accesses.

use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, PAGE_SIZE};
use crate::error::RangeError;
use crate::page::PageDescriptor;
use crate::sync::{AtomicU64, Exclusive, Ordering};

/// A contiguous guest-physical range of RAM pages.
pub struct RamRange {
    base: GuestPhysAddr,
    pages: Vec<AtomicU64>,
    name: &'static str,
    /// The `register_ram` call this range came from (0 for ranges made otherwise): large RAM
    /// is several ranges of one registration.
    registration: u32,
    /// Write monitoring's bookkeeping (see `manager::lazy_protection`): one bit per page
    /// listed written since its 2 MiB block was last settled, one bit per block settled in
    /// full since monitoring started, and one bit per block a lock-free settle has claimed.
    /// Changed under `&mut`, except by a lock-free settle of a claimed block.
    settle: SettleBits,
}

/// Shows where the range lies and its name, not its descriptors.
impl core::fmt::Debug for RamRange {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RamRange")
            .field("base", &self.base)
            .field("pages", &self.pages.len())
            .field("name", &self.name)
            .field("registration", &self.registration)
            .finish_non_exhaustive()
    }
}

/// Which pages a block settle must look at (see [`RamRange`]'s `settle`).
#[derive(Default)]
struct SettleBits {
    listed: Vec<AtomicU64>,
    scanned: Vec<AtomicU64>,
    claimed: Vec<AtomicU64>,
}

impl SettleBits {
    /// Bits for `pages` pages from `base`, in zeroed memory.
    fn new(base: GuestPhysAddr, pages: usize) -> Option<SettleBits> {
        let blocks = block_index(base, pages.saturating_sub(1)) + 1;
        let zeroed = |bits: usize| zeroed_descriptors(bits.div_ceil(64));
        Some(SettleBits {
            listed: zeroed(pages)?,
            scanned: zeroed(blocks)?,
            claimed: zeroed(blocks)?,
        })
    }
}

/// The mask of the bits of `[page, end)` in word `index` (pages `64 * index` on), and the page
/// after them.
fn word_mask(index: usize, page: usize, end: usize) -> (u64, usize) {
    let (low, high) = (page % 64, (end - index * 64).min(64));
    ((u64::MAX << low) & (u64::MAX >> (64 - high)), index * 64 + high)
}

/// The index, within its range, of the 2 MiB block of page `page` of a range at `base`.
fn block_index(base: GuestPhysAddr, page: usize) -> usize {
    let first = base.page_number() as usize;
    ((first + page) >> 9) - (first >> 9)
}

impl RamRange {
    /// A range at `base` made of `pages`; the caller checked alignment and width.
    pub(crate) fn new(base: GuestPhysAddr, pages: Vec<PageDescriptor>, name: &'static str) -> Self {
        let settle = SettleBits::new(base, pages.len()).unwrap_or_default();
        RamRange {
            base,
            pages: pages.into_iter().map(|page| AtomicU64::new(page.raw())).collect(),
            name,
            registration: 0,
            settle,
        }
    }

    /// Notes that page `page` was listed written: the next settle of its block looks at it.
    pub(crate) fn note_listed(&mut self, page: usize) {
        if let Some(word) = self.settle.listed.get_mut(page / 64) {
            let bits = word.get();
            word.set(bits | 1 << (page % 64));
        }
    }

    /// The pages of `[first, first + count)` (all in one 2 MiB block) a settle of the block
    /// must look at: all of them the first time since monitoring started, else those listed
    /// written since the last settle (found a word of bits at a time). Forgets them (the
    /// caller settles them).
    pub(crate) fn take_unsettled(&mut self, first: usize, count: usize) -> Vec<usize> {
        let block = block_index(self.base, first);
        let scanned = self.block_scanned(block);
        let mut pages = Vec::new();
        for (index, word, mask) in self.listed_words(first, count) {
            // Under `&mut`: a plain load and store, no read-modify-write.
            let listed = word.load(Ordering::Relaxed);
            let mut bits = if scanned { listed & mask } else { mask };
            word.store(listed & !mask, Ordering::Relaxed);
            while bits != 0 {
                pages.push(index * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        if let Some(word) = self.settle.scanned.get_mut(block / 64) {
            let bits = word.get();
            word.set(bits | 1 << (block % 64));
        }
        pages
    }

    /// True when block `block` (its index in the range) was settled in full since monitoring
    /// started.
    fn block_scanned(&self, block: usize) -> bool {
        self.settle
            .scanned
            .get(block / 64)
            .is_some_and(|word| word.load(Ordering::Relaxed) & (1 << (block % 64)) != 0)
    }

    /// Claims the 2 MiB block whose first page in the range is `first`, for a settle through
    /// `&self` (the lock-free fault path's): true when this caller now holds it. Refused for a
    /// block never settled in full since monitoring started (the locked settle looks at all of
    /// its pages) and for one another caller holds.
    pub(crate) fn claim_block(&self, first: usize) -> bool {
        let block = block_index(self.base, first);
        let Some(word) = self.settle.claimed.get(block / 64) else {
            return false;
        };
        let bit = 1 << (block % 64);
        self.block_scanned(block) && word.fetch_or(bit, Ordering::Acquire) & bit == 0
    }

    /// Gives back the claim of [`claim_block`](Self::claim_block).
    pub(crate) fn release_block(&self, first: usize) {
        let block = block_index(self.base, first);
        if let Some(word) = self.settle.claimed.get(block / 64) {
            word.fetch_and(!(1 << (block % 64)), Ordering::Release);
        }
    }

    /// Calls `visit` with each page of `[first, first + count)` (a block the caller claimed)
    /// listed written since the block's last settle; stops at the first `false` and returns
    /// it. Leaves the bits as they are.
    pub(crate) fn each_listed(
        &self,
        first: usize,
        count: usize,
        mut visit: impl FnMut(usize) -> bool,
    ) -> bool {
        for (index, word, mask) in self.listed_words(first, count) {
            let mut bits = word.load(Ordering::Relaxed) & mask;
            while bits != 0 {
                if !visit(index * 64 + bits.trailing_zeros() as usize) {
                    return false;
                }
                bits &= bits - 1;
            }
        }
        true
    }

    /// Forgets the listed bits of `[first, first + count)` (a block the caller claimed and
    /// settled). Other blocks' bits in the same words may change meanwhile: an atomic AND.
    pub(crate) fn clear_listed(&self, first: usize, count: usize) {
        for (_, word, mask) in self.listed_words(first, count) {
            word.fetch_and(!mask, Ordering::Relaxed);
        }
    }

    /// The words of listed bits that `[first, first + count)` covers, each with its index and
    /// the mask of the span's bits in it.
    fn listed_words(
        &self,
        first: usize,
        count: usize,
    ) -> impl Iterator<Item = (usize, &AtomicU64, u64)> + '_ {
        let end = first + count;
        let mut page = first;
        core::iter::from_fn(move || {
            if page >= end {
                return None;
            }
            let index = page / 64;
            let word = self.settle.listed.get(index)?;
            let (mask, next) = word_mask(index, page, end);
            page = next;
            Some((index, word, mask))
        })
    }

    /// The descriptor word of page `page` (for a lock-free settle of its claimed block).
    pub(crate) fn descriptor_word(&self, page: usize) -> Option<&AtomicU64> {
        self.pages.get(page)
    }

    /// Forgets which blocks were settled: monitoring starts, every block to be looked at in
    /// full once. O(blocks / 64).
    pub(crate) fn forget_settled_blocks(&mut self) {
        self.settle.scanned.iter_mut().for_each(|word| word.set(0));
    }

    /// Forgets every settle bit: monitoring ends. O(pages / 64).
    pub(crate) fn reset_settle_bits(&mut self) {
        self.settle.listed.iter_mut().for_each(|word| word.set(0));
        self.settle.scanned.iter_mut().for_each(|word| word.set(0));
    }

    /// A range of `pages` ZERO RAM pages at `base`, its descriptors in zeroed memory (an
    /// all-zero descriptor is a ZERO RAM page), so no pass writes them. `None` when the heap
    /// cannot hold them.
    pub(crate) fn zero_ram(base: GuestPhysAddr, pages: usize, name: &'static str) -> Option<Self> {
        Some(RamRange {
            base,
            pages: zeroed_descriptors(pages)?,
            name,
            registration: 0,
            settle: SettleBits::new(base, pages)?,
        })
    }

    /// The range as part of RAM registration `id`.
    pub(crate) fn with_registration(mut self, id: u32) -> Self {
        self.registration = id;
        self
    }

    /// The RAM registration this range belongs to (0: not RAM from `register_ram`).
    pub fn registration(&self) -> u32 {
        self.registration
    }

    /// First guest-physical address of the range.
    pub fn base(&self) -> GuestPhysAddr {
        self.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.pages.len() as u64 * PAGE_SIZE
    }

    /// One past the last byte (as a number: it may equal 2^48).
    pub fn end(&self) -> u64 {
        self.base.as_u64() + self.size()
    }

    /// The name given at registration (for diagnostics).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The number of pages.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// The page descriptors, in address order.
    pub fn descriptors(&self) -> impl Iterator<Item = PageDescriptor> + '_ {
        self.pages.iter().map(load)
    }

    /// The descriptor of page `index` of the range, if the range has that many pages.
    pub fn page(&self, index: usize) -> Option<PageDescriptor> {
        self.pages.get(index).map(load)
    }

    fn contains(&self, gpa: GuestPhysAddr) -> bool {
        gpa >= self.base && gpa.as_u64() < self.end()
    }
}

/// Where a guest page's descriptor lives: range index and page index within the range.
/// Internal: a location is valid only until the ranges change, so the manager's callers get
/// addresses and checked indices instead ([`RamRanges::locate`], [`RamRange::page`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PageLocation {
    /// Index of the range in address order.
    pub(crate) range: usize,
    /// Index of the page within the range.
    pub(crate) page: usize,
}

/// The set of registered RAM ranges, sorted by base, never overlapping.
#[derive(Default)]
pub struct RamRanges {
    ranges: Vec<RamRange>,
    directory: Directory,
}

/// Shows the ranges.
impl core::fmt::Debug for RamRanges {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(&self.ranges).finish()
    }
}

/// Which range covers each granule (2 MiB or more, a power of two) of the span from the first
/// range's base to the last range's end: one `u16` slot per granule, at most [`MAX_SLOTS`]
/// (128 KiB; a guest spanning up to 128 GiB gets 2 MiB granules). A lookup reads one slot and
/// checks the range's bounds: no search, no branch on the number of ranges, no shared write
/// (the one-entry cache it replaces was written by every vCPU that missed it). Granules that
/// two ranges share (the first megabyte of a PC, say) send the lookup to a binary search.
/// Rebuilt when a range is added or removed: O(slots + ranges).
#[derive(Default)]
struct Directory {
    /// First guest-physical address of the first granule.
    base: u64,
    /// log2 of the granule size.
    shift: u32,
    slots: Vec<u16>,
}

/// No range in the granule.
const EMPTY: u16 = u16::MAX;
/// More than one range in the granule, or a range index too large for a slot: search.
const SEARCH: u16 = u16::MAX - 1;
/// The most slots a directory holds.
const MAX_SLOTS: u64 = 1 << 16;
/// log2 of the smallest granule: 2 MiB, the large-page size.
const MIN_GRANULE_SHIFT: u32 = 21;

impl Directory {
    /// The directory of `ranges` (sorted, not overlapping).
    fn of(ranges: &[RamRange]) -> Directory {
        let (Some(first), Some(last)) = (ranges.first(), ranges.last()) else {
            return Directory::default();
        };
        let span = last.end() - first.base.as_u64();
        let mut shift = MIN_GRANULE_SHIFT;
        let base = |shift: u32| first.base.as_u64() >> shift << shift;
        while (last.end() - base(shift)).div_ceil(1 << shift) > MAX_SLOTS {
            shift += 1;
        }
        debug_assert!(span > 0);
        let base = base(shift);
        let granules = (last.end() - base).div_ceil(1 << shift) as usize;
        let mut slots = alloc::vec![EMPTY; granules];
        for (index, range) in ranges.iter().enumerate() {
            let first_slot = ((range.base.as_u64() - base) >> shift) as usize;
            let last_slot = ((range.end() - 1 - base) >> shift) as usize;
            let value = u16::try_from(index).unwrap_or(SEARCH).min(SEARCH);
            for slot in &mut slots[first_slot..=last_slot] {
                *slot = if *slot == EMPTY { value } else { SEARCH };
            }
        }
        Directory { base, shift, slots }
    }

    /// What the slot of `gpa` says: `None` outside the span.
    #[inline]
    fn slot(&self, gpa: GuestPhysAddr) -> Option<u16> {
        let granule = gpa.as_u64().checked_sub(self.base)? >> self.shift;
        self.slots.get(granule as usize).copied()
    }
}

impl RamRanges {
    /// Number of registered ranges.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// True when no range is registered.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The range at `index` in address order.
    pub fn get(&self, index: usize) -> Option<&RamRange> {
        self.ranges.get(index)
    }

    /// All ranges in address order.
    pub fn iter(&self) -> impl Iterator<Item = &RamRange> {
        self.ranges.iter()
    }

    /// Checks that `[base, base + size)` overlaps no registered range.
    pub fn check_free(&self, base: GuestPhysAddr, size: u64) -> Result<(), RangeError> {
        let end = base.as_u64() + size;
        match self
            .ranges
            .iter()
            .find(|r| base.as_u64() < r.end() && r.base.as_u64() < end)
        {
            Some(existing) => Err(RangeError::Overlap {
                existing: existing.base,
            }),
            None => Ok(()),
        }
    }

    /// Adds a range that [`check_free`](Self::check_free) accepted, keeping address order.
    pub(crate) fn insert(&mut self, range: RamRange) {
        self.insert_all(core::iter::once(range));
    }

    /// Adds ranges [`check_free`](Self::check_free) accepted, keeping address order; the
    /// directory is rebuilt once for all of them.
    pub(crate) fn insert_all(&mut self, ranges: impl IntoIterator<Item = RamRange>) {
        for range in ranges {
            let at = self.ranges.partition_point(|r| r.base < range.base);
            self.ranges.insert(at, range);
        }
        self.directory = Directory::of(&self.ranges);
    }

    /// The range at `index`, to change its settle bits (see [`RamRange::take_unsettled`]).
    pub(crate) fn get_mut(&mut self, index: usize) -> Option<&mut RamRange> {
        self.ranges.get_mut(index)
    }

    /// The ranges overlapping `[start, end)`, each with the first page index in it and the
    /// number of its pages there, in address order.
    pub(crate) fn parts(&self, start: GuestPhysAddr, end: u64) -> Vec<(usize, usize, usize)> {
        let first = self.ranges.partition_point(|r| r.end() <= start.as_u64());
        self.ranges[first..]
            .iter()
            .take_while(|r| r.base.as_u64() < end)
            .enumerate()
            .map(|(i, r)| {
                let from = start.as_u64().max(r.base.as_u64());
                let to = end.min(r.end());
                let page = ((from - r.base.as_u64()) / PAGE_SIZE) as usize;
                (first + i, page, ((to - from) / PAGE_SIZE) as usize)
            })
            .collect()
    }

    /// Removes the range at `index` and returns it.
    pub(crate) fn remove(&mut self, index: usize) -> RamRange {
        let range = self.ranges.remove(index);
        self.directory = Directory::of(&self.ranges);
        range
    }

    /// Finds the page holding `gpa`: one directory slot, or a binary search where ranges
    /// share a granule.
    #[inline]
    pub(crate) fn find(&self, gpa: GuestPhysAddr) -> Option<PageLocation> {
        let range = match self.directory.slot(gpa)? {
            EMPTY => return None,
            SEARCH => self.search(gpa)?,
            index => usize::from(index),
        };
        let found = self.ranges.get(range)?;
        if !found.contains(gpa) {
            return None;
        }
        let page = (gpa.page_number() - found.base.page_number()) as usize;
        Some(PageLocation { range, page })
    }

    /// The page holding `gpa` and its descriptor, in one pass (no second bounds check or
    /// range lookup on the way to the descriptor).
    #[inline]
    pub(crate) fn find_page(&self, gpa: GuestPhysAddr) -> Option<(PageLocation, PageDescriptor)> {
        let location = self.find(gpa)?;
        let word = self.ranges.get(location.range)?.pages.get(location.page)?;
        Some((location, load(word)))
    }

    /// The index of the last range starting at or below `gpa` (binary search).
    fn search(&self, gpa: GuestPhysAddr) -> Option<usize> {
        self.ranges.partition_point(|r| r.base <= gpa).checked_sub(1)
    }

    /// The range index and page index of the page holding `gpa` (one directory slot, or a
    /// binary search where ranges share a granule), for [`get`](Self::get) and
    /// [`RamRange::page`], which check them.
    #[inline]
    pub fn locate(&self, gpa: GuestPhysAddr) -> Option<(usize, usize)> {
        self.find(gpa).map(|location| (location.range, location.page))
    }

    /// The descriptor at `location`.
    pub(crate) fn page(&self, location: PageLocation) -> PageDescriptor {
        load(self.descriptor(location))
    }

    pub(crate) fn set_page(&mut self, location: PageLocation, page: PageDescriptor) {
        self.ranges[location.range].pages[location.page].set(page.raw());
    }

    /// The descriptor's word at `location`, for the lock-free fault path's compare-exchange.
    pub(crate) fn descriptor(&self, location: PageLocation) -> &AtomicU64 {
        &self.ranges[location.range].pages[location.page]
    }

    /// Guest-physical address of the page at `location`.
    pub(crate) fn gpa_of(&self, location: PageLocation) -> GuestPhysAddr {
        let base = self.ranges[location.range].base.as_u64();
        GuestPhysAddr::new_truncate(base + location.page as u64 * PAGE_SIZE)
    }
}

/// `count` all-zero descriptor words from zeroed memory, or `None` when the heap has no room.
#[cfg(not(loom))]
fn zeroed_descriptors(count: usize) -> Option<Vec<AtomicU64>> {
    bytemuck::allocation::try_zeroed_slice_box::<AtomicU64>(count)
        .ok()
        .map(|words| words.into_vec())
}

/// Loom's atomics are not plain words: built one by one (models use a few pages).
#[cfg(loom)]
fn zeroed_descriptors(count: usize) -> Option<Vec<AtomicU64>> {
    Some((0..count).map(|_| AtomicU64::new(0)).collect())
}

/// A descriptor read outside the lock-free path: whatever a concurrent lock-free fault did to
/// it is whole (one word), and the lock ordered everything else.
#[inline]
fn load(word: &AtomicU64) -> PageDescriptor {
    PageDescriptor::from_raw(word.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::{PageDescriptor, PageType};

    fn gpa(addr: u64) -> GuestPhysAddr {
        GuestPhysAddr::new(addr).unwrap()
    }

    fn range(base: u64, pages: usize) -> RamRange {
        RamRange::new(
            gpa(base),
            alloc::vec![PageDescriptor::zero(PageType::Ram); pages],
            "test",
        )
    }

    fn ranges() -> RamRanges {
        let mut ranges = RamRanges::default();
        // Inserted out of order on purpose: lookups rely on the sort.
        ranges.insert(range(0x1_0000_0000, 4));
        ranges.insert(range(0, 160));
        ranges.insert(range(0x10_0000, 256));
        ranges
    }

    #[test]
    fn lookup_finds_the_page_in_every_range_and_nothing_in_holes() {
        let ranges = ranges();
        assert_eq!(
            ranges.find(gpa(0x9_FFFF)),
            Some(PageLocation { range: 0, page: 159 })
        );
        assert_eq!(ranges.find(gpa(0xA_0000)), None, "hole between 640 KiB and 1 MiB");
        assert_eq!(
            ranges.find(gpa(0x10_2345)),
            Some(PageLocation { range: 1, page: 2 })
        );
        assert_eq!(
            ranges.find(gpa(0x1_0000_3FFF)),
            Some(PageLocation { range: 2, page: 3 })
        );
        assert_eq!(ranges.find(gpa(0x1_0000_4000)), None);
        // The cache must not answer for an address outside the cached range.
        assert_eq!(ranges.find(gpa(0x20_0000)), None);
        assert_eq!(ranges.find(gpa(0)), Some(PageLocation { range: 0, page: 0 }));
    }

    /// The page a linear scan finds for `gpa`.
    fn scanned(ranges: &RamRanges, gpa: GuestPhysAddr) -> Option<PageLocation> {
        ranges
            .iter()
            .enumerate()
            .find(|(_, r)| r.contains(gpa))
            .map(|(range, r)| PageLocation {
                range,
                page: (gpa.page_number() - r.base.page_number()) as usize,
            })
    }

    #[test]
    fn the_directory_agrees_with_a_scan_in_dense_shared_and_sparse_layouts() {
        let layouts: [&[(u64, usize)]; 3] = [
            // A PC: ranges sharing the first 2 MiB granule, RAM above 4 GiB.
            &[
                (0, 160),
                (0xC_0000, 32),
                (0xE_0000, 32),
                (0x10_0000, 3840),
                (0x1_0000_0000, 1024),
            ],
            // Adjacent ranges meeting inside a granule.
            &[(0x20_0000, 300), (0x20_0000 + 300 * 4096, 900), (0x80_0000, 1)],
            // Far apart: the granule grows so the directory stays small.
            &[(0x1000, 1), (0x7FFF_0000_0000, 16), (0x4000_0000, 512)],
        ];
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        for layout in layouts {
            let mut ranges = RamRanges::default();
            for &(base, pages) in layout {
                ranges.insert(range(base, pages));
            }
            assert!(ranges.directory.slots.len() as u64 <= MAX_SLOTS);
            let edges = layout.iter().flat_map(|&(base, pages)| {
                let end = base + pages as u64 * PAGE_SIZE;
                [base.saturating_sub(1), base, end - 1, end]
            });
            let random = (0..2000).map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let (base, pages) = layout[(seed % layout.len() as u64) as usize];
                base + (seed >> 8) % (2 * pages as u64 * PAGE_SIZE + 0x40_0000)
            });
            for at in edges.chain(random).filter(|&at| at < 1 << 48) {
                assert_eq!(ranges.find(gpa(at)), scanned(&ranges, gpa(at)), "at {at:#x}");
            }
            let removed = ranges.remove(1);
            assert_eq!(ranges.find(removed.base), None, "removed from the directory");
        }
    }

    #[test]
    fn overlap_is_detected_at_both_edges() {
        let ranges = ranges();
        assert_eq!(
            ranges.check_free(gpa(0x9_F000), 0x2000),
            Err(RangeError::Overlap { existing: gpa(0) })
        );
        assert_eq!(
            ranges.check_free(gpa(0xF_F000), 0x2000),
            Err(RangeError::Overlap {
                existing: gpa(0x10_0000)
            })
        );
        assert_eq!(
            ranges.check_free(gpa(0xA_0000), 0x6_0000),
            Ok(()),
            "fills the hole exactly"
        );
    }
}
