//! Page-map locks (after PGMR3PhysGCPhys2CCPtr[ReadOnly]External, the bulk variants and
//! PGMPhysReleasePageMappingLock): the host gets the host-physical address of a guest page and
//! the frame stays put until the lock is released. While locked, a page is never freed:
//! reset zeroes it in place, and the balloon and MMIO refuse it. A write-locked page counts as
//! written at every harvest, since the host may write through its mapping at any time.
//!
//! As in the seed, pages under write or all-access handlers can be locked: the lock's holder
//! acts for the handler (the seed delegates such requests to the EMT and hands out the
//! mapping). A SHARED page locked for reading stays shared: the lock holds a reference on the
//! shared frame, so a guest write copies the page as usual and the frame the host reads
//! stays alive until the lock is released.
//!
//! Counts: a descriptor holds up to [`INLINE_LOCKS_MAX`] locks of each kind; beyond that the
//! count lives in a small table here, up to [`PAGE_MAX_LOCKS`] (after PGM_PAGE_MAX_LOCKS, 254
//! in the seed, where a page reaching it is locked for good).

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::lazy_protection::counted_locked_allocated;
use super::Pgm;
use crate::addr::{GuestPhysAddr, HostPhysAddr};
use crate::error::{LockError, PageError};
use crate::frames::{HostFrameAllocator, HostMemory};
use crate::page::{PageEvent, PageState, PageType, INLINE_LOCKS_MAX};
use crate::paging::EntryFormat;
use crate::paging::Invalidation;
use crate::ram::PageLocation;

/// A held page-map lock. Give it back with [`Pgm::release_page_lock`].
#[must_use = "a page stays locked until the lock is released"]
#[derive(Debug, PartialEq, Eq)]
pub struct PageMapLock {
    page: GuestPhysAddr,
    write: bool,
    /// The shared frame this read lock holds a reference on.
    pinned: Option<HostPhysAddr>,
}

/// A lock count that reached this stays: the page is locked for good. High enough that no
/// ordinary nesting of locks reaches it.
pub const PAGE_MAX_LOCKS: u64 = u32::MAX as u64;

/// Lock counts beyond what a descriptor holds, by page and kind (`true`: write locks).
pub(super) type LockOverflow = BTreeMap<(GuestPhysAddr, bool), u64>;

/// What locking a page gives the caller.
#[must_use = "the lock must be released, and the invalidation carried out"]
#[derive(Debug, PartialEq, Eq)]
pub struct PageMapping {
    /// Host-physical address of the requested guest address.
    pub host: HostPhysAddr,
    /// The lock, to give back with [`Pgm::release_page_lock`].
    pub lock: PageMapLock,
    /// The INVEPT needed because locking changed the page's mapping (a ZERO page got a frame, a
    /// SHARED page was copied).
    pub invalidation: Invalidation,
}

impl PageMapLock {
    /// The locked page (page-aligned).
    pub fn page(&self) -> GuestPhysAddr {
        self.page
    }

    /// True for a write lock.
    pub fn is_write(&self) -> bool {
        self.write
    }
}

/// # Page-map locks (PGMPhysGCPhys2CCPtr, PGMPhysReleasePageMappingLock)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Locks the page holding `gpa` for writing and returns the host-physical address of `gpa`
    /// in its frame. The page gets a frame if it had none and counts as written. RAM and MMIO2
    /// pages can be write-locked whatever handler covers them: the lock's holder acts for the
    /// handler, as with the seed's PGMPhysGCPhys2CCPtr (ROM and MMIO pages cannot).
    pub fn lock_page_for_write(&mut self, gpa: GuestPhysAddr) -> Result<PageMapping, LockError> {
        let location = self.lockable(gpa, true)?;
        let remapped = self.apply_remapping(location, PageEvent::Write)?;
        if self.monitoring {
            self.mark_written(location);
        }
        let frame = self.ranges.page(location).frame().ok_or(PageError::NotRam(gpa))?;
        Ok(self.mapping(location, frame, gpa, true, remapped))
    }

    /// Locks the page holding `gpa` for reading and returns the host-physical address of `gpa`
    /// in the frame guest reads see (the shared zero frame for a ZERO page). A SHARED page
    /// stays shared: the lock holds a reference on its frame until released.
    pub fn lock_page_for_read(&mut self, gpa: GuestPhysAddr) -> Result<PageMapping, LockError> {
        let location = self.lockable(gpa, false)?;
        let page = self.ranges.page(location);
        let frame = self.read_source(location).unwrap_or(self.zero_frame);
        let mut mapping = self.mapping(location, frame, gpa, false, false);
        if page.state() == PageState::Shared && page.page_type() == PageType::Ram {
            self.pin_share(frame);
            mapping.lock.pinned = Some(frame);
        }
        Ok(mapping)
    }

    /// Locks every page in `pages` for reading (or for writing with `write`). All or nothing: on
    /// an error no page stays locked by this call.
    pub fn lock_pages(
        &mut self,
        pages: &[GuestPhysAddr],
        write: bool,
    ) -> Result<Vec<PageMapping>, LockError> {
        let mut locked = Vec::with_capacity(pages.len());
        for &gpa in pages {
            let result = if write {
                self.lock_page_for_write(gpa)
            } else {
                self.lock_page_for_read(gpa)
            };
            match result {
                Ok(mapping) => locked.push(mapping),
                Err(error) => {
                    // Pages already given frames keep them: only the locks are undone.
                    for mapping in locked {
                        self.release_page_lock(mapping.lock);
                    }
                    return Err(error);
                }
            }
        }
        Ok(locked)
    }

    /// Releases a page-map lock.
    pub fn release_page_lock(&mut self, lock: PageMapLock) {
        if let Some(frame) = lock.pinned {
            self.unpin_share(frame);
        }
        let Some(location) = self.ranges.find(lock.page) else {
            return;
        };
        let count = self.lock_count(location, lock.write);
        if count < PAGE_MAX_LOCKS {
            self.set_lock_count(location, lock.write, count.saturating_sub(1));
        }
    }

    /// Locks of the given kind held on the page at `location`.
    pub(super) fn lock_count(&self, location: PageLocation, write: bool) -> u64 {
        let page = self.ranges.page(location);
        let inline = if write {
            page.write_locks()
        } else {
            page.read_locks()
        };
        if inline < INLINE_LOCKS_MAX {
            return inline;
        }
        let key = (self.ranges.gpa_of(location), write);
        self.lock_overflow.get(&key).copied().unwrap_or(inline)
    }

    /// Locks of the given kind held on the page holding `gpa` (0 for no page).
    pub fn page_lock_count(&self, gpa: GuestPhysAddr, write: bool) -> u64 {
        self.ranges
            .find(gpa)
            .map_or(0, |location| self.lock_count(location, write))
    }

    /// Sets the page's count of locks of the given kind, keeping the overflow table and the
    /// locked-page counts in step.
    fn set_lock_count(&mut self, location: PageLocation, write: bool, count: u64) {
        // A write lock takes its page out of the lazy protection: settle the page first.
        self.settle(location);
        let before = self.lock_count(location, write);
        let page = self.ranges.page(location).with_locks(write, count);
        self.ranges.set_page(location, page);
        let key = (self.ranges.gpa_of(location), write);
        if count >= INLINE_LOCKS_MAX {
            self.lock_overflow.insert(key, count);
        } else {
            self.lock_overflow.remove(&key);
        }
        let locked_pages = if write {
            &mut self.locked_pages.write
        } else {
            &mut self.locked_pages.read
        };
        match (before, count) {
            (0, 1..) => *locked_pages += 1,
            (1.., 0) => *locked_pages -= 1,
            _ => {}
        }
    }

    /// Marks the page at `location` written (monitoring on), once.
    pub(super) fn mark_written(&mut self, location: PageLocation) {
        self.settle(location);
        let page = self.ranges.page(location);
        if !page.written_to() {
            let written = page.with_written_to(true);
            self.ranges.set_page(location, written);
            // An ALLOCATED page awaiting protection is not WRITE_MONITORED any more.
            self.recount(page, written);
            self.list_written(location);
        }
    }

    /// Marks every write-locked page written: its host mapping can change it unseen. Returns
    /// how many of them count as ALLOCATED.
    pub(super) fn mark_write_locked_pages(&mut self) -> u64 {
        let mut allocated = 0;
        self.for_each_page(|pgm, location| {
            let page = pgm.ranges.page(location);
            if page.write_locks() > 0 {
                pgm.mark_written(location);
                allocated += u64::from(counted_locked_allocated(page));
            }
        });
        allocated
    }

    /// Locates the page holding `gpa` if it can be locked: RAM, MMIO2 and (for reading) ROM
    /// pages that are not ballooned, whatever handler covers them.
    fn lockable(&self, gpa: GuestPhysAddr, write: bool) -> Result<PageLocation, PageError> {
        let location = self.ranges.find(gpa).ok_or(PageError::NotGuestMemory(gpa))?;
        let page = self.ranges.page(location);
        let type_ok = match page.page_type() {
            PageType::Ram | PageType::Mmio2 => true,
            PageType::Rom | PageType::RomShadow => !write,
            PageType::Mmio | PageType::Mmio2AliasMmio | PageType::SpecialAliasMmio => false,
        };
        if !type_ok {
            return Err(PageError::NotRam(gpa));
        }
        if page.state() == PageState::Ballooned {
            return Err(PageError::State {
                gpa,
                state: page.state(),
            });
        }
        Ok(location)
    }

    /// Takes the lock and describes the mapping of `gpa` in `frame`.
    fn mapping(
        &mut self,
        location: PageLocation,
        frame: HostPhysAddr,
        gpa: GuestPhysAddr,
        write: bool,
        remapped: bool,
    ) -> PageMapping {
        let count = self.lock_count(location, write);
        if count < PAGE_MAX_LOCKS {
            self.set_lock_count(location, write, count + 1);
        }
        PageMapping {
            host: offset_in(frame, gpa),
            lock: PageMapLock {
                page: self.ranges.gpa_of(location),
                write,
                pinned: None,
            },
            invalidation: if remapped {
                Invalidation::SingleContext
            } else {
                Invalidation::None
            },
        }
    }
}

fn offset_in(frame: HostPhysAddr, gpa: GuestPhysAddr) -> HostPhysAddr {
    HostPhysAddr::new_truncate(frame.as_u64() + gpa.page_offset())
}

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
#[path = "locks_tests.rs"]
mod locks_tests;
