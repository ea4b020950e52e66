//! Page-map locks (after PGMR3PhysGCPhys2CCPtr[ReadOnly]External, the bulk variants and
//! PGMPhysReleasePageMappingLock): the host gets the host-physical address of a guest page and
//! the page's frame stays put until the lock is released. While locked, a page is never freed:
//! reset zeroes it in place, and the balloon and MMIO refuse it. A write-locked page counts as
//! written at every harvest, since the host may write through its mapping at any time.

use alloc::vec::Vec;

use super::Pgm;
use crate::addr::{GuestPhysAddr, HostPhysAddr};
use crate::error::PgmError;
use crate::frames::{HostFrameAllocator, HostMemory};
use crate::page::{HandlerState, PageEvent, PageState, PageType};
use crate::paging::Invalidation;
use crate::ram::PageLocation;

/// A held page-map lock. Give it back with [`Pgm::release_page_lock`].
#[must_use = "a page stays locked until the lock is released"]
#[derive(Debug, PartialEq, Eq)]
pub struct PageMapLock {
    page: GuestPhysAddr,
    write: bool,
}

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

impl<A: HostFrameAllocator, M: HostMemory> Pgm<A, M> {
    /// Locks the page holding `gpa` for writing and returns the host-physical address of `gpa`
    /// in its frame. The page gets a frame if it had none and counts as written. Only RAM and
    /// MMIO2 pages without an active handler can be write-locked.
    pub fn lock_page_for_write(&mut self, gpa: GuestPhysAddr) -> Result<PageMapping, PgmError> {
        let location = self.lockable(gpa, true)?;
        let remapped = self.apply_remapping(location, PageEvent::Write)?;
        if self.monitoring {
            self.mark_written(location);
        }
        let frame = self.ranges.page(location).frame().ok_or(PgmError::NotRam(gpa))?;
        Ok(self.mapping(location, frame, gpa, true, remapped))
    }

    /// Locks the page holding `gpa` for reading and returns the host-physical address of `gpa`
    /// in the frame guest reads see (the shared zero frame for a ZERO page). A SHARED page is
    /// copied to a private frame first: locked pages are never shared.
    pub fn lock_page_for_read(&mut self, gpa: GuestPhysAddr) -> Result<PageMapping, PgmError> {
        let location = self.lockable(gpa, false)?;
        let remapped = self.ranges.page(location).state() == PageState::Shared
            && self.apply_remapping(location, PageEvent::Write)?;
        let frame = self.read_source(location).unwrap_or(self.zero_frame);
        Ok(self.mapping(location, frame, gpa, false, remapped))
    }

    /// Locks every page in `pages` for reading (or for writing with `write`). All or nothing: on
    /// an error no page stays locked by this call.
    pub fn lock_pages(&mut self, pages: &[GuestPhysAddr], write: bool) -> Result<Vec<PageMapping>, PgmError> {
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
        let Some(location) = self.ranges.find(lock.page) else {
            return;
        };
        let page = self.ranges.page(location).with_lock_change(lock.write, -1);
        self.ranges.set_page(location, page);
    }

    /// Marks the page at `location` written (monitoring on), once.
    pub(super) fn mark_written(&mut self, location: PageLocation) {
        let page = self.ranges.page(location);
        if !page.written_to() {
            self.ranges.set_page(location, page.with_written_to(true));
            self.written.push(self.ranges.gpa_of(location));
        }
    }

    /// Marks every write-locked page written: its host mapping can change it unseen.
    pub(super) fn mark_write_locked_pages(&mut self) {
        self.for_each_page(|pgm, location| {
            if pgm.ranges.page(location).write_locks() > 0 {
                pgm.mark_written(location);
            }
        });
    }

    fn lockable(&self, gpa: GuestPhysAddr, write: bool) -> Result<PageLocation, PgmError> {
        let location = self.ranges.find(gpa).ok_or(PgmError::NotGuestMemory(gpa))?;
        let page = self.ranges.page(location);
        let type_ok = match page.page_type() {
            PageType::Ram | PageType::Mmio2 => true,
            PageType::Rom | PageType::RomShadow => !write,
            PageType::Mmio | PageType::Mmio2AliasMmio | PageType::SpecialAliasMmio => false,
        };
        if !type_ok {
            return Err(PgmError::NotRam(gpa));
        }
        if page.state() == PageState::Ballooned {
            return Err(PgmError::PageState {
                gpa,
                state: page.state(),
            });
        }
        let handled = match page.handler() {
            HandlerState::All => true,
            HandlerState::Write => write,
            HandlerState::None | HandlerState::Disabled => false,
        };
        if handled {
            return Err(PgmError::HandlerPresent(gpa));
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
        let page = self.ranges.page(location).with_lock_change(write, 1);
        self.ranges.set_page(location, page);
        PageMapping {
            host: offset_in(frame, gpa),
            lock: PageMapLock {
                page: self.ranges.gpa_of(location),
                write,
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
