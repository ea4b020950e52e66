//! Access handlers and MMIO regions of the manager (after PGMHandlerPhysical* and
//! PGMR3PhysMMIORegister/Deregister): page ranges whose accesses go to the VMM instead of
//! memory. A handler's pages carry its state in their descriptors, and their EPT entries lose
//! the permissions the handler intercepts, so the CPU faults exactly on those accesses.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use super::Mmio2Handle;
use super::{page_count, Pgm, Pieces};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::error::{AccessError, HandlerError, PageError, RangeError};
use crate::frames::{HostFrameAllocator, HostMemory};
use crate::handlers::{HandlerId, HandlerKind, MmioPlacement, Registration};
use crate::page::{HandlerState, PageDescriptor, PageType};
use crate::paging::EntryFormat;
use crate::paging::{Access, Invalidation};
use crate::ram::{PageLocation, RamRange};

/// What an access handler did with an access handed to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandlerAction {
    /// The handler performed the access; memory is not touched.
    Handled,
    /// Let pgm perform the access on memory as if there were no handler (for MMIO, which has
    /// no memory: reads return all ones, writes are dropped).
    Default,
}

/// One page's part of a handled access: the page (`None`: unassigned space), the address, the
/// length.
type Span = (Option<PageLocation>, GuestPhysAddr, usize);

/// What a handled access does with unassigned space.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unassigned {
    /// The access fails, naming the first unassigned address (the hypervisor's own accesses).
    Refused,
    /// Reads there return 0xFF bytes and writes are dropped (the seed's external accesses).
    Skipped,
}

/// The VMM's access handlers, called by [`Pgm::read_phys_handled`] and
/// [`Pgm::write_phys_handled`] (as PGMPhysRead/PGMPhysWrite call PGM's handlers).
pub trait AccessHandlers {
    /// `access` of `data.len()` bytes at `gpa` (within one page) falls to `handler`. For a read
    /// the handler fills `data`; for a write `data` holds the bytes written.
    fn access(
        &mut self,
        handler: HandlerId,
        gpa: GuestPhysAddr,
        access: Access,
        data: &mut [u8],
    ) -> HandlerAction;
}

/// The MMIO page an emulated access falls on and the handler behind it, found once per exit by
/// [`Pgm::mmio_target`]. It stays right only while nothing changes the manager, i.e. while the
/// caller holds it shared from the lookup to the access: that is what lets the access skip a
/// second lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioTarget {
    /// The page, through the A20 gate.
    page: GuestPhysAddr,
    handler: HandlerId,
}

impl MmioTarget {
    /// The handler the page's accesses go to.
    pub fn handler(&self) -> HandlerId {
        self.handler
    }

    /// The page, through the A20 gate.
    pub fn page(&self) -> GuestPhysAddr {
        self.page
    }
}

/// Hands a write of `data` at `at` to `handler` and returns what it did with it. The handler
/// may change what it is handed, so it gets a copy and the guest's data stays as it was: a CPU
/// access (at most 8 bytes) is copied on the stack, a larger one on the heap.
fn hand_write(
    handlers: &mut impl AccessHandlers,
    handler: HandlerId,
    at: GuestPhysAddr,
    data: &[u8],
) -> HandlerAction {
    let mut small = [0u8; 8];
    let mut large;
    let bytes = match small.get_mut(..data.len()) {
        Some(small) => small,
        None => {
            large = alloc::vec![0u8; data.len()];
            &mut large[..]
        }
    };
    bytes.copy_from_slice(data);
    handlers.access(handler, at, Access::Write, bytes)
}

/// # Host access as the guest sees it (PGMPhysRead, PGMPhysWrite, PGMR3PhysRead/WriteExternal)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// The MMIO page and handler behind a guest access that faulted at `faulting`, when the
    /// fault is one to emulate on an MMIO page; `None` for every other fault (for
    /// [`resolve_fault`](Self::resolve_fault)). An MMIO page has no memory, so its accesses
    /// change nothing in the manager and can be carried out on a shared one
    /// ([`read_mmio`](Self::read_mmio), [`write_mmio`](Self::write_mmio)).
    pub fn mmio_target(&self, faulting: GuestPhysAddr) -> Option<MmioTarget> {
        let gpa = self.a20_apply(faulting);
        let (_, page) = self.ranges.find_page(gpa)?;
        if page.page_type() != PageType::Mmio {
            return None;
        }
        // A handler that takes reads takes every access (MMIO regions take all), so the target
        // serves both halves of a read-modify-write.
        let handler = self.intercepting_handler(gpa, page, Access::Read)?;
        Some(MmioTarget {
            page: gpa.page_base(),
            handler,
        })
    }

    /// Reads `buf.len()` bytes at `gpa` (through the A20 gate) on the page of `target` as
    /// [`read_phys_handled`](Self::read_phys_handled) would, without looking the page up
    /// again: the handler fills `buf`, or it reads as all ones when the handler leaves it to
    /// the default. Fails with [`AccessError::OutsideTarget`] for bytes outside the target's
    /// page.
    pub fn read_mmio(
        &self,
        target: MmioTarget,
        gpa: GuestPhysAddr,
        buf: &mut [u8],
        handlers: &mut impl AccessHandlers,
    ) -> Result<(), AccessError> {
        let gpa = self.on_target(target, gpa, buf.len())?;
        if handlers.access(target.handler, gpa, Access::Read, buf) == HandlerAction::Default {
            buf.fill(0xFF);
        }
        Ok(())
    }

    /// Writes `data` at `gpa` (through the A20 gate) on the page of `target` as
    /// [`write_phys_handled`](Self::write_phys_handled) would, without looking the page up
    /// again: the handler gets a copy of the bytes, and a write it leaves to the default is
    /// dropped. Fails with [`AccessError::OutsideTarget`] for bytes outside the target's page.
    pub fn write_mmio(
        &self,
        target: MmioTarget,
        gpa: GuestPhysAddr,
        data: &[u8],
        handlers: &mut impl AccessHandlers,
    ) -> Result<(), AccessError> {
        let gpa = self.on_target(target, gpa, data.len())?;
        hand_write(handlers, target.handler, gpa, data);
        Ok(())
    }

    /// `gpa` through the A20 gate, when its `len` bytes lie on the page of `target`.
    fn on_target(
        &self,
        target: MmioTarget,
        gpa: GuestPhysAddr,
        len: usize,
    ) -> Result<GuestPhysAddr, AccessError> {
        let gpa = self.a20_apply(gpa);
        let fits = gpa.page_offset() + len as u64 <= PAGE_SIZE;
        match gpa.page_base() == target.page && fits {
            true => Ok(gpa),
            false => Err(AccessError::OutsideTarget(gpa)),
        }
    }

    /// Reads guest memory at `gpa` into `buf` as the guest would see it, handing every piece an
    /// access handler intercepts (all-access handlers, MMIO) to `handlers`. Strict about
    /// unassigned space: fails with [`PageError::NotGuestMemory`] before any handler runs (see
    /// [`read_phys_external`](Self::read_phys_external) for the seed's lenient reads).
    pub fn read_phys_handled(
        &self,
        gpa: GuestPhysAddr,
        buf: &mut [u8],
        handlers: &mut impl AccessHandlers,
    ) -> Result<(), AccessError> {
        self.read_spans(&self.spans(gpa, buf.len(), Unassigned::Refused)?, buf, handlers)
    }

    /// Reads guest memory as [`read_phys_handled`](Self::read_phys_handled) does, but as
    /// PGMR3PhysReadExternal does: unassigned space reads as 0xFF bytes instead of failing.
    /// Fails only for an access beyond the guest-physical width.
    pub fn read_phys_external(
        &self,
        gpa: GuestPhysAddr,
        buf: &mut [u8],
        handlers: &mut impl AccessHandlers,
    ) -> Result<(), AccessError> {
        self.read_spans(&self.spans(gpa, buf.len(), Unassigned::Skipped)?, buf, handlers)
    }

    fn read_spans(
        &self,
        spans: &Pieces<Span>,
        buf: &mut [u8],
        handlers: &mut impl AccessHandlers,
    ) -> Result<(), AccessError> {
        let mut done = 0;
        for &(location, at, len) in spans.iter() {
            let out = &mut buf[done..done + len];
            done += len;
            let Some(location) = location else {
                out.fill(0xFF);
                continue;
            };
            let page = self.ranges.page(location);
            if let Some(handler) = self.intercepting_handler(at, page, Access::Read) {
                if handlers.access(handler, at, Access::Read, out) == HandlerAction::Handled {
                    continue;
                }
            }
            if page.page_type() == PageType::Mmio {
                out.fill(0xFF);
            } else {
                self.read_phys(at, out)?;
            }
        }
        Ok(())
    }

    /// Writes `data` to guest memory at `gpa` as a guest store would land, handing every piece
    /// an access handler intercepts (write and all-access handlers, MMIO) to `handlers`.
    /// Strict about unassigned space: fails with [`PageError::NotGuestMemory`] before any
    /// handler runs (see [`write_phys_external`](Self::write_phys_external)); a later failure
    /// (no frame) leaves the pieces before it written, as the handlers already saw them.
    pub fn write_phys_handled(
        &mut self,
        gpa: GuestPhysAddr,
        data: &[u8],
        handlers: &mut impl AccessHandlers,
    ) -> Result<Invalidation, AccessError> {
        let spans = self.spans(gpa, data.len(), Unassigned::Refused)?;
        self.write_spans(&spans, data, handlers)
    }

    /// Writes as [`write_phys_handled`](Self::write_phys_handled) does, but as
    /// PGMR3PhysWriteExternal does: bytes for unassigned space are dropped instead of failing.
    pub fn write_phys_external(
        &mut self,
        gpa: GuestPhysAddr,
        data: &[u8],
        handlers: &mut impl AccessHandlers,
    ) -> Result<Invalidation, AccessError> {
        let spans = self.spans(gpa, data.len(), Unassigned::Skipped)?;
        self.write_spans(&spans, data, handlers)
    }

    fn write_spans(
        &mut self,
        spans: &Pieces<Span>,
        data: &[u8],
        handlers: &mut impl AccessHandlers,
    ) -> Result<Invalidation, AccessError> {
        let mut invalidation = Invalidation::None;
        let mut done = 0;
        for &(location, at, len) in spans.iter() {
            let piece = &data[done..done + len];
            done += len;
            let Some(location) = location else {
                continue;
            };
            let page = self.ranges.page(location);
            if let Some(handler) = self.intercepting_handler(at, page, Access::Write) {
                if hand_write(handlers, handler, at, piece) == HandlerAction::Handled {
                    continue;
                }
            }
            if page.page_type() != PageType::Mmio {
                invalidation = invalidation.max(self.write_phys(at, piece)?);
            }
        }
        Ok(invalidation)
    }

    /// Splits `[gpa, gpa + len)` into per-page spans `(page, address, length)`; a span of
    /// unassigned space has no page, and fails the call when `unassigned` refuses it.
    fn spans(
        &self,
        gpa: GuestPhysAddr,
        len: usize,
        unassigned: Unassigned,
    ) -> Result<Pieces<Span>, AccessError> {
        let mut spans = Pieces::default();
        let mut done = 0usize;
        while done < len {
            let at = gpa
                .checked_add(done as u64)
                .ok_or(RangeError::BeyondAddressWidth(gpa.as_u64()))?;
            let location = self.ranges.find(at);
            if location.is_none() && unassigned == Unassigned::Refused {
                return Err(PageError::NotGuestMemory(at).into());
            }
            let piece = ((PAGE_SIZE - at.page_offset()) as usize).min(len - done);
            spans.push((location, at, piece));
            done += piece;
        }
        Ok(spans)
    }
}

/// # Access handlers and MMIO regions (PGMHandlerPhysical*, PGMR3PhysMMIORegister)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Registers a handler of `kind` over the RAM pages of `[base, base + size)`. The range must
    /// be page-aligned, registered RAM, and clear of other handlers; on error nothing changes.
    /// Returns the handle and the invalidation the reduced permissions need.
    pub fn register_handler(
        &mut self,
        kind: HandlerKind,
        base: GuestPhysAddr,
        size: u64,
    ) -> Result<(HandlerId, Invalidation), HandlerError> {
        let pages = page_count(base, size)?;
        self.check_no_handler(base, pages)?;
        let locations = self.ram_pages(base, pages)?;
        let id = self.handlers.insert(kind, base, pages, None);
        for location in locations {
            self.set_handler_state(location, kind.page_state());
        }
        Ok((id, Invalidation::SingleContext))
    }

    /// Removes the handler `id`; its pages map as plain RAM again. Permissions only grow, so no
    /// invalidation is needed. MMIO regions go through [`deregister_mmio`](Self::deregister_mmio).
    pub fn deregister_handler(&mut self, id: HandlerId) -> Result<Invalidation, HandlerError> {
        let registration = self.plain_handler(id)?;
        self.handlers.remove(id);
        for location in self.registered_pages(&registration) {
            self.set_handler_state(location, HandlerState::None);
        }
        Ok(self.merge_large_blocks())
    }

    /// Turns the handler `id` off for the one page at `gpa` until
    /// [`reset_handler`](Self::reset_handler) (PGMHandlerPhysicalPageTempOff): the page maps as
    /// plain RAM. Permissions only grow, so no invalidation is needed.
    pub fn disable_handler_page(
        &mut self,
        id: HandlerId,
        gpa: GuestPhysAddr,
    ) -> Result<Invalidation, HandlerError> {
        let registration = self.plain_handler(id)?;
        let page_base = gpa.page_base();
        if !registration.contains(page_base) {
            return Err(HandlerError::NotHandled(gpa));
        }
        let location = self
            .ranges
            .find(page_base)
            .ok_or(PageError::NotGuestMemory(gpa))?;
        self.set_handler_state(location, HandlerState::Disabled);
        Ok(Invalidation::None)
    }

    /// Maps the page at `gpa` of the MMIO region `mmio` straight to the MMIO2 page at `offset`
    /// of `region` (PGMHandlerPhysicalPageAliasMmio2): guest accesses to it no longer trap
    /// until [`reset_handler`](Self::reset_handler) on `mmio`.
    pub fn alias_mmio_to_mmio2(
        &mut self,
        mmio: HandlerId,
        gpa: GuestPhysAddr,
        region: Mmio2Handle,
        offset: u64,
    ) -> Result<Invalidation, HandlerError> {
        let frame = self.mmio2_frame(region, offset)?;
        self.alias_mmio_page(mmio, gpa, PageType::Mmio2AliasMmio, frame)
    }

    /// Maps the page at `gpa` of the MMIO region `mmio` straight to the host frame `frame`,
    /// which stays the caller's (PGMHandlerPhysicalPageAliasHC, e.g. the APIC-access page),
    /// until [`reset_handler`](Self::reset_handler) on `mmio`.
    pub fn alias_mmio_to_host(
        &mut self,
        mmio: HandlerId,
        gpa: GuestPhysAddr,
        frame: HostPhysAddr,
    ) -> Result<Invalidation, HandlerError> {
        if !frame.is_page_aligned() {
            return Err(RangeError::Misaligned(frame.as_u64()).into());
        }
        self.alias_mmio_page(mmio, gpa, PageType::SpecialAliasMmio, frame)
    }

    /// Turns the handler `id` back on for every page it was turned off for; for an MMIO region,
    /// undoes every alias so all its pages trap again.
    pub fn reset_handler(&mut self, id: HandlerId) -> Result<Invalidation, HandlerError> {
        let registration = *self.handlers.get(id).ok_or(HandlerError::Unknown(id))?;
        if registration.mmio.is_some() {
            let mut invalidation = Invalidation::None;
            for location in self.registered_pages(&registration) {
                invalidation = invalidation.max(self.unalias(location));
            }
            return Ok(invalidation);
        }
        let mut invalidation = Invalidation::None;
        for location in self.registered_pages(&registration) {
            if self.ranges.page(location).handler() == HandlerState::Disabled {
                self.set_handler_state(location, registration.kind.page_state());
                invalidation = Invalidation::SingleContext;
            }
        }
        Ok(invalidation)
    }

    /// Undoes the aliases of every MMIO region (the MMIO part of a VM reset, as
    /// pgmR3PhysRamZeroAll resets aliased pages); returns the invalidation needed.
    pub(super) fn reset_mmio_aliases(&mut self) -> Invalidation {
        self.mmio_regions()
            .into_iter()
            .map(|region| self.reset_handler(region.id).unwrap_or(Invalidation::None))
            .fold(Invalidation::None, Invalidation::max)
    }

    /// Registers an MMIO region at `[base, base + size)`: every access to it faults as
    /// [`super::FaultOutcome::Handler`] with the returned handle. The region either lies in space
    /// no range covers, or entirely over registered RAM pages, which it replaces (their frames go
    /// back to the host; the pages must have no handler). Anything else — part RAM, part
    /// unassigned — fails, changing nothing.
    pub fn register_mmio(
        &mut self,
        base: GuestPhysAddr,
        size: u64,
    ) -> Result<(HandlerId, Invalidation), HandlerError> {
        let pages = page_count(base, size)?;
        self.check_no_handler(base, pages)?;
        if self.ranges.check_free(base, size).is_ok() {
            let mmio = PageDescriptor::zero(PageType::Mmio).with_handler(HandlerState::All);
            self.ranges
                .insert(RamRange::new(base, alloc::vec![mmio; pages as usize], "mmio"));
            self.forget_a20_aliases(base, pages);
            self.counts.mmio += pages;
            let id = self
                .handlers
                .insert(HandlerKind::All, base, pages, Some(MmioPlacement::Unassigned));
            return Ok((id, Invalidation::None));
        }
        // The handler check above already refused pages under handlers.
        let locations = self.replaceable_ram(base, pages)?;
        let id = self
            .handlers
            .insert(HandlerKind::All, base, pages, Some(MmioPlacement::ReplacingRam));
        let mmio = PageDescriptor::zero(PageType::Mmio).with_handler(HandlerState::All);
        for location in locations {
            self.replace_page(location, mmio);
            self.counts.mmio += 1;
        }
        self.pool.flush(&mut self.frames);
        Ok((id, Invalidation::SingleContext))
    }

    /// Removes the MMIO region `id`: a region of its own disappears with every alias mapped in
    /// it; a region over RAM leaves ZERO RAM pages behind. Returns the invalidation the removed
    /// aliases need.
    pub fn deregister_mmio(&mut self, id: HandlerId) -> Result<Invalidation, HandlerError> {
        let registration = *self.handlers.get(id).ok_or(HandlerError::Unknown(id))?;
        let placement = registration.mmio.ok_or(HandlerError::Unknown(id))?;
        let locations = self.registered_pages(&registration);
        let had_alias = locations
            .iter()
            .any(|&location| self.ranges.page(location).page_type().is_mmio_alias());
        self.handlers.remove(id);
        self.counts.mmio -= registration.pages;
        match placement {
            MmioPlacement::Unassigned => {
                // Aliased pages are mapped: the range takes its mappings with it.
                if let Some(first) = locations.first() {
                    self.remove_range(first.range);
                }
            }
            MmioPlacement::ReplacingRam => {
                for location in locations {
                    // Whatever the page was (MMIO or an alias), it is ZERO RAM again.
                    self.restore_ram_page(location);
                }
            }
        }
        // An alias (a frame mapped straight through) is replaced by nothing or by the zero
        // frame: cached translations of it must go.
        Ok(if had_alias {
            Invalidation::SingleContext
        } else {
            Invalidation::None
        })
    }

    /// Undoes an alias at `location` (the page traps again); returns the invalidation needed.
    pub(super) fn unalias(&mut self, location: PageLocation) -> Invalidation {
        if !self.ranges.page(location).page_type().is_mmio_alias() {
            return Invalidation::None;
        }
        let mmio = PageDescriptor::zero(PageType::Mmio).with_handler(HandlerState::All);
        self.replace_descriptor(location, mmio);
        self.sync_leaf(location);
        Invalidation::SingleContext
    }

    /// Undoes every MMIO2 alias that names one of `frames` (before those frames are freed),
    /// mapped or not: only MMIO regions hold alias pages, so only their pages are looked at.
    /// Returns the invalidation needed.
    pub(super) fn unalias_frames(&mut self, frames: &BTreeSet<HostPhysAddr>) -> Invalidation {
        let mut invalidation = Invalidation::None;
        for registration in self.mmio_regions() {
            for location in self.registered_pages(&registration) {
                let page = self.ranges.page(location);
                if page.page_type() == PageType::Mmio2AliasMmio
                    && page.frame().is_some_and(|frame| frames.contains(&frame))
                {
                    invalidation = invalidation.max(self.unalias(location));
                }
            }
        }
        invalidation
    }

    fn alias_mmio_page(
        &mut self,
        mmio: HandlerId,
        gpa: GuestPhysAddr,
        page_type: PageType,
        frame: HostPhysAddr,
    ) -> Result<Invalidation, HandlerError> {
        let registration = *self.handlers.get(mmio).ok_or(HandlerError::Unknown(mmio))?;
        if registration.mmio.is_none() {
            return Err(HandlerError::Unknown(mmio));
        }
        let page_base = gpa.page_base();
        if !registration.contains(page_base) {
            return Err(HandlerError::NotHandled(gpa));
        }
        let location = self
            .ranges
            .find(page_base)
            .ok_or(PageError::NotGuestMemory(gpa))?;
        let was_alias = self.ranges.page(location).page_type().is_mmio_alias();
        let alias = PageDescriptor::allocated(page_type, frame).with_handler(HandlerState::Disabled);
        // MMIO in unassigned space has no tables yet: make them (the only step that can fail)
        // before the descriptor changes; the mapping itself comes from the descriptor. A block
        // mapped by one 2 MiB leaf gets its page table from the split in `sync_leaf` (or
        // awaits it there, unmapped, when none can be had).
        if !self.tables.is_large(&self.memory, page_base) {
            self.ensure_tables(page_base, 1)?;
        }
        self.replace_descriptor(location, alias);
        self.sync_leaf(location);
        Ok(if was_alias {
            Invalidation::SingleContext
        } else {
            Invalidation::None
        })
    }

    /// The registration behind handle `id`.
    pub fn handler(&self, id: HandlerId) -> Option<&Registration> {
        self.handlers.get(id)
    }

    /// The handler that intercepts `access` to the page at `gpa`, if any.
    pub(super) fn intercepting_handler(
        &self,
        gpa: GuestPhysAddr,
        page: PageDescriptor,
        access: Access,
    ) -> Option<HandlerId> {
        let intercepts = match page.handler() {
            HandlerState::All => true,
            HandlerState::Write => access == Access::Write,
            HandlerState::None | HandlerState::Disabled => false,
        };
        intercepts
            .then(|| self.handlers.covering(gpa))
            .flatten()
            .map(|r| r.id)
    }

    /// A handler that is not an MMIO region.
    fn plain_handler(&self, id: HandlerId) -> Result<Registration, HandlerError> {
        match self.handlers.get(id) {
            Some(registration) if registration.mmio.is_none() => Ok(*registration),
            _ => Err(HandlerError::Unknown(id)),
        }
    }

    fn check_no_handler(&self, base: GuestPhysAddr, pages: u64) -> Result<(), HandlerError> {
        match self.handlers.overlapping(base, pages) {
            Some(existing) => Err(HandlerError::Overlap {
                existing: existing.id,
            }),
            None => Ok(()),
        }
    }

    /// Locates every page of `[base, base + pages)`, which must all be registered RAM.
    pub(super) fn ram_pages(&self, base: GuestPhysAddr, pages: u64) -> Result<Vec<PageLocation>, PageError> {
        (0..pages)
            .map(|page| {
                let gpa = GuestPhysAddr::new_truncate(base.as_u64() + page * PAGE_SIZE);
                let location = self.ranges.find(gpa).ok_or(PageError::NotGuestMemory(gpa))?;
                match self.ranges.page(location).page_type() {
                    PageType::Ram => Ok(location),
                    PageType::Mmio
                    | PageType::Mmio2
                    | PageType::Mmio2AliasMmio
                    | PageType::SpecialAliasMmio
                    | PageType::Rom
                    | PageType::RomShadow => Err(PageError::NotRam(gpa)),
                }
            })
            .collect()
    }

    /// The locations of a registration's pages (all registered while it exists).
    fn registered_pages(&self, registration: &Registration) -> Vec<PageLocation> {
        self.located(registration.base, registration.pages)
    }

    /// The registrations of MMIO regions.
    fn mmio_regions(&self) -> Vec<Registration> {
        self.handlers
            .iter()
            .filter(|r| r.mmio.is_some())
            .copied()
            .collect()
    }

    fn set_handler_state(&mut self, location: PageLocation, state: HandlerState) {
        let page = self.ranges.page(location);
        self.ranges.set_page(location, page.with_handler(state));
        self.sync_leaf(location);
    }
}

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
#[path = "handlers_tests.rs"]
mod handlers_tests;
