//! Registered RAM ranges: one descriptor per 4 KiB page, kept sorted by base for a binary-search
//! lookup with a one-entry cache in front (faults cluster in one range).
//!
//! Descriptors are atomic words: the lock-free fault path changes them through `&self` while
//! other vCPUs read them (see `manager::lock_free`); everything else changes them through
//! `&mut self`, with plain accesses.

use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, PAGE_SIZE};
use crate::error::PgmError;
use crate::page::PageDescriptor;
use crate::sync::{AtomicU64, AtomicUsize, Exclusive, Ordering};

/// A contiguous guest-physical range of RAM pages.
pub struct RamRange {
    base: GuestPhysAddr,
    pages: Vec<AtomicU64>,
    name: &'static str,
    /// The `register_ram` call this range came from (0 for ranges made otherwise): large RAM
    /// is several ranges of one registration.
    registration: u32,
}

impl RamRange {
    /// A range at `base` made of `pages`; the caller checked alignment and width.
    pub(crate) fn new(base: GuestPhysAddr, pages: Vec<PageDescriptor>, name: &'static str) -> Self {
        RamRange {
            base,
            pages: pages.into_iter().map(|page| AtomicU64::new(page.raw())).collect(),
            name,
            registration: 0,
        }
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

    fn contains(&self, gpa: GuestPhysAddr) -> bool {
        gpa >= self.base && gpa.as_u64() < self.end()
    }
}

/// Where a guest page's descriptor lives: range index and page index within the range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageLocation {
    /// Index of the range in address order.
    pub range: usize,
    /// Index of the page within the range.
    pub page: usize,
}

/// The set of registered RAM ranges, sorted by base, never overlapping.
#[derive(Default)]
pub struct RamRanges {
    ranges: Vec<RamRange>,
    /// Index of the range that answered the last lookup (a hint: any value is safe).
    last_hit: AtomicUsize,
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
    pub fn check_free(&self, base: GuestPhysAddr, size: u64) -> Result<(), PgmError> {
        let end = base.as_u64() + size;
        match self
            .ranges
            .iter()
            .find(|r| base.as_u64() < r.end() && r.base.as_u64() < end)
        {
            Some(existing) => Err(PgmError::Overlap {
                existing: existing.base,
            }),
            None => Ok(()),
        }
    }

    /// Adds a range that [`check_free`](Self::check_free) accepted, keeping address order.
    pub(crate) fn insert(&mut self, range: RamRange) {
        let at = self.ranges.partition_point(|r| r.base < range.base);
        self.ranges.insert(at, range);
        self.last_hit.set(0);
    }

    /// Removes the range at `index` and returns it.
    pub(crate) fn remove(&mut self, index: usize) -> RamRange {
        self.last_hit.set(0);
        self.ranges.remove(index)
    }

    /// Finds the page holding `gpa`: the cached range first, then a binary search.
    pub fn find(&self, gpa: GuestPhysAddr) -> Option<PageLocation> {
        let hint = self.last_hit.load(Ordering::Relaxed);
        let range = match self.ranges.get(hint) {
            Some(cached) if cached.contains(gpa) => hint,
            _ => {
                let after = self.ranges.partition_point(|r| r.base <= gpa);
                let candidate = after.checked_sub(1)?;
                if !self.ranges[candidate].contains(gpa) {
                    return None;
                }
                // Only on a miss: a hint every vCPU keeps hitting stays in every CPU's cache.
                self.last_hit.store(candidate, Ordering::Relaxed);
                candidate
            }
        };
        let page = (gpa.page_number() - self.ranges[range].base.page_number()) as usize;
        Some(PageLocation { range, page })
    }

    /// The descriptor at `location`.
    pub fn page(&self, location: PageLocation) -> PageDescriptor {
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
    pub fn gpa_of(&self, location: PageLocation) -> GuestPhysAddr {
        let base = self.ranges[location.range].base.as_u64();
        GuestPhysAddr::new_truncate(base + location.page as u64 * PAGE_SIZE)
    }
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

    #[test]
    fn overlap_is_detected_at_both_edges() {
        let ranges = ranges();
        assert_eq!(
            ranges.check_free(gpa(0x9_F000), 0x2000),
            Err(PgmError::Overlap { existing: gpa(0) })
        );
        assert_eq!(
            ranges.check_free(gpa(0xF_F000), 0x2000),
            Err(PgmError::Overlap {
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
