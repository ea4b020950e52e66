//! MMIO2 regions (after PGMR3PhysMmio2*): device memory, such as a framebuffer, that the device
//! reaches by offset and the guest reaches once the region is mapped at a guest-physical
//! address. Optional dirty-page tracking write-protects the mapped pages so that only the first
//! guest write to each page since the last query traps.

use alloc::vec::Vec;

use super::{page_count, Pgm};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::error::PgmError;
use crate::frames::{HostFrameAllocator, HostMemory};
pub use crate::handles::Mmio2Handle;
use crate::page::{PageDescriptor, PageType};
use crate::paging::Invalidation;
use crate::ram::{PageLocation, RamRange};

/// One MMIO2 region.
pub(super) struct Mmio2Region {
    handle: Mmio2Handle,
    /// The device's own number for the region (PCI BAR etc.), kept for the device.
    region_no: u32,
    frames: Vec<HostPhysAddr>,
    mapped_at: Option<GuestPhysAddr>,
    tracking: bool,
    /// One bit per page: written by the guest since the last query.
    dirty: Vec<u64>,
}

impl Mmio2Region {
    fn size(&self) -> u64 {
        self.frames.len() as u64 * PAGE_SIZE
    }

    fn page_of(&self, gpa: GuestPhysAddr) -> Option<usize> {
        let base = self.mapped_at?;
        let offset = gpa.as_u64().checked_sub(base.as_u64())?;
        (offset < self.size()).then_some((offset / PAGE_SIZE) as usize)
    }

    fn is_dirty(&self, page: usize) -> bool {
        self.dirty[page / 64] & (1 << (page % 64)) != 0
    }

    /// The frame holding byte `offset` of the region, and the offset within it.
    fn frame_at(&self, offset: u64) -> (HostPhysAddr, u64) {
        let frame = self.frames[(offset / PAGE_SIZE) as usize];
        (frame, offset % PAGE_SIZE)
    }
}

impl<A: HostFrameAllocator, M: HostMemory> Pgm<A, M> {
    /// Creates an unmapped MMIO2 region of `size` bytes (a non-zero whole number of pages), its
    /// memory allocated and zeroed now. `region_no` is the device's own number for it.
    pub fn create_mmio2(&mut self, size: u64, region_no: u32) -> Result<Mmio2Handle, PgmError> {
        let pages = page_count(GuestPhysAddr::default(), size)? as usize;
        let mut frames = Vec::with_capacity(pages);
        if self.frames.allocate_frames(pages, &mut frames) < pages {
            self.frames.free_frames(&frames);
            return Err(PgmError::OutOfFrames);
        }
        for &frame in &frames {
            self.memory.zero_frame(frame);
        }
        let handle = Mmio2Handle(self.next_mmio2);
        self.next_mmio2 += 1;
        self.mmio2.push(Mmio2Region {
            handle,
            region_no,
            frames,
            mapped_at: None,
            tracking: false,
            dirty: alloc::vec![0; pages.div_ceil(64)],
        });
        Ok(handle)
    }

    /// Maps the region at `base`, in space no range covers. The pages map like RAM
    /// (write-protected where dirty tracking or write monitoring wants their next write).
    pub fn map_mmio2(&mut self, handle: Mmio2Handle, base: GuestPhysAddr) -> Result<Invalidation, PgmError> {
        let region = self.region(handle)?;
        if region.mapped_at.is_some() {
            return Err(PgmError::Mmio2Mapped(true));
        }
        let size = region.size();
        page_count(base, size)?;
        self.ranges.check_free(base, size)?;
        let descriptors: Vec<PageDescriptor> = region
            .frames
            .iter()
            .map(|&frame| PageDescriptor::allocated(PageType::Mmio2, frame))
            .collect();
        self.insert_mapped(alloc::vec![RamRange::new(base, descriptors, "mmio2")])?;
        self.region_mut(handle)?.mapped_at = Some(base);
        // Newly mapped: protection can only be added here, to pages nobody has cached.
        self.refresh_region_protection(handle);
        Ok(Invalidation::None)
    }

    /// Unmaps the region; its memory and dirty bits stay with it. Refused, changing nothing,
    /// while a page-map lock holds one of its pages ([`PgmError::PageLocked`]): the host's
    /// pointer into device memory must be released before the memory can go.
    pub fn unmap_mmio2(&mut self, handle: Mmio2Handle) -> Result<Invalidation, PgmError> {
        let base = self
            .region(handle)?
            .mapped_at
            .ok_or(PgmError::Mmio2Mapped(false))?;
        let location = self.ranges.find(base).ok_or(PgmError::NotGuestMemory(base))?;
        let pages = self.ranges.get(location.range).map_or(&[][..], |r| r.pages());
        if let Some(locked) = pages.iter().position(|page| page.is_locked()) {
            let gpa = GuestPhysAddr::new_truncate(base.as_u64() + locked as u64 * PAGE_SIZE);
            return Err(PgmError::PageLocked(gpa));
        }
        self.remove_range(location.range);
        self.region_mut(handle)?.mapped_at = None;
        Ok(Invalidation::SingleContext)
    }

    /// Shrinks an unmapped region to `size` bytes, giving the tail's frames back (MMIO pages
    /// aliased to them trap again; the invalidation that needs is returned).
    pub fn reduce_mmio2(&mut self, handle: Mmio2Handle, size: u64) -> Result<Invalidation, PgmError> {
        let pages = page_count(GuestPhysAddr::default(), size)? as usize;
        let region = self.region(handle)?;
        if region.mapped_at.is_some() {
            return Err(PgmError::Mmio2Mapped(true));
        }
        if pages > region.frames.len() {
            return Err(PgmError::OutOfRange);
        }
        let tail = self.region(handle)?.frames[pages..].to_vec();
        let invalidation = self.unmap_frames(&tail);
        let region = self.region_mut(handle)?;
        region.frames.truncate(pages);
        region.dirty.truncate(pages.div_ceil(64));
        if let Some(last) = region.dirty.last_mut() {
            if !pages.is_multiple_of(64) {
                *last &= (1 << (pages % 64)) - 1;
            }
        }
        self.frames.free_frames(&tail);
        Ok(invalidation)
    }

    /// Unmaps the region if mapped and frees its memory; refused, changing nothing, where
    /// [`unmap_mmio2`](Self::unmap_mmio2) is.
    pub fn deregister_mmio2(&mut self, handle: Mmio2Handle) -> Result<Invalidation, PgmError> {
        let invalidation = match self.region(handle)?.mapped_at {
            Some(_) => self.unmap_mmio2(handle)?,
            None => Invalidation::None,
        };
        let frames = self.region(handle)?.frames.clone();
        let invalidation = invalidation.max(self.unmap_frames(&frames));
        let index = self
            .mmio2
            .iter()
            .position(|r| r.handle == handle)
            .ok_or(PgmError::UnknownMmio2(handle))?;
        let region = self.mmio2.remove(index);
        self.frames.free_frames(&region.frames);
        Ok(invalidation)
    }

    /// Takes every alias and mapping of the region frames `frames` away before they are freed
    /// (see [`unmap_frame`](Self::unmap_frame)); returns the invalidation that needs.
    fn unmap_frames(&mut self, frames: &[HostPhysAddr]) -> Invalidation {
        // Alias pages name the frames even where they are not mapped (the A20 gate hides
        // them): they change first, then no descriptor calls for a mapping of the frames.
        let aliases = self.unalias_frames(&frames.iter().copied().collect());
        frames
            .iter()
            .map(|&frame| self.unmap_frame(frame, None))
            .fold(aliases, Invalidation::max)
    }

    /// The frame holding the page at `offset` (page-aligned) of the region.
    pub(super) fn mmio2_frame(&self, handle: Mmio2Handle, offset: u64) -> Result<HostPhysAddr, PgmError> {
        let region = self.region(handle)?;
        if !offset.is_multiple_of(PAGE_SIZE) {
            return Err(PgmError::Misaligned);
        }
        if offset >= region.size() {
            return Err(PgmError::OutOfRange);
        }
        Ok(region.frame_at(offset).0)
    }

    /// True when `handle` names a live MMIO2 region.
    pub fn is_mmio2_handle(&self, handle: Mmio2Handle) -> bool {
        self.region(handle).is_ok()
    }

    /// Where the region is mapped, if it is.
    pub fn mmio2_mapping(&self, handle: Mmio2Handle) -> Option<GuestPhysAddr> {
        self.region(handle).ok()?.mapped_at
    }

    /// The device's region number.
    pub fn mmio2_region_no(&self, handle: Mmio2Handle) -> Option<u32> {
        self.region(handle).ok().map(|r| r.region_no)
    }

    /// Changes the device's region number (PGMR3PhysMmio2ChangeRegionNo).
    pub fn change_mmio2_region_no(&mut self, handle: Mmio2Handle, region_no: u32) -> Result<(), PgmError> {
        self.region_mut(handle)?.region_no = region_no;
        Ok(())
    }

    /// The device reads its memory at `offset` (never tracked).
    pub fn mmio2_read(&self, handle: Mmio2Handle, offset: u64, buf: &mut [u8]) -> Result<(), PgmError> {
        let region = self.region(handle)?;
        for (at, range) in device_pieces(region.size(), offset, buf.len())? {
            let (frame, within) = region.frame_at(at);
            self.memory.read(
                HostPhysAddr::new_truncate(frame.as_u64() + within),
                &mut buf[range],
            );
        }
        Ok(())
    }

    /// The device writes its memory at `offset` (never tracked: only guest writes are).
    pub fn mmio2_write(&mut self, handle: Mmio2Handle, offset: u64, data: &[u8]) -> Result<(), PgmError> {
        let pieces = device_pieces(self.region(handle)?.size(), offset, data.len())?;
        for (at, range) in pieces {
            let (frame, within) = self.region(handle)?.frame_at(at);
            self.memory
                .write(HostPhysAddr::new_truncate(frame.as_u64() + within), &data[range]);
        }
        Ok(())
    }

    /// Switches dirty-page tracking of the region on or off. Switched on, tracking starts clean:
    /// every mapped page is write-protected until the guest writes it.
    pub fn set_mmio2_dirty_tracking(
        &mut self,
        handle: Mmio2Handle,
        enabled: bool,
    ) -> Result<Invalidation, PgmError> {
        let region = self.region_mut(handle)?;
        region.tracking = enabled;
        region.dirty.fill(0);
        Ok(self.refresh_region_protection(handle))
    }

    /// Puts the region's dirty bitmap (one bit per page, page 0 in bit 0 of word 0) into `out`,
    /// clears it and write-protects the pages that were dirty again.
    pub fn query_and_reset_mmio2_dirty(
        &mut self,
        handle: Mmio2Handle,
        out: &mut Vec<u64>,
    ) -> Result<Invalidation, PgmError> {
        let region = self.region_mut(handle)?;
        out.clear();
        out.extend_from_slice(&region.dirty);
        region.dirty.fill(0);
        Ok(self.refresh_region_protection(handle))
    }

    /// True when `location` is a page of a tracked MMIO2 region not yet written since the last
    /// query: its next write must trap.
    pub(super) fn mmio2_wants_protection(&self, location: PageLocation) -> bool {
        if self.ranges.page(location).page_type() != PageType::Mmio2 {
            return false;
        }
        let gpa = self.ranges.gpa_of(location);
        self.mmio2
            .iter()
            .find_map(|region| Some((region, region.page_of(gpa)?)))
            .is_some_and(|(region, page)| region.tracking && !region.is_dirty(page))
    }

    /// Records a guest write to the MMIO2 page at `location` in its region's bitmap.
    pub(super) fn mark_mmio2_dirty(&mut self, location: PageLocation) {
        let gpa = self.ranges.gpa_of(location);
        for region in &mut self.mmio2 {
            if let Some(page) = region.page_of(gpa) {
                if region.tracking {
                    region.dirty[page / 64] |= 1 << (page % 64);
                }
            }
        }
    }

    /// Frees every region's frames (VM termination).
    pub(super) fn release_mmio2(&mut self) {
        for region in core::mem::take(&mut self.mmio2) {
            self.frames.free_frames(&region.frames);
        }
    }

    /// Every frame of every live region.
    pub(super) fn mmio2_region_frames(&self) -> impl Iterator<Item = HostPhysAddr> + '_ {
        self.mmio2.iter().flat_map(|region| region.frames.iter().copied())
    }

    /// Frames held by MMIO2 regions.
    pub(super) fn mmio2_frames(&self) -> u64 {
        self.mmio2.iter().map(|r| r.frames.len() as u64).sum()
    }

    /// Re-applies the write-protection rule to every mapped page of the region.
    fn refresh_region_protection(&mut self, handle: Mmio2Handle) -> Invalidation {
        let Some(base) = self.region(handle).ok().and_then(|r| r.mapped_at) else {
            return Invalidation::None;
        };
        let Some(first) = self.ranges.find(base) else {
            return Invalidation::None;
        };
        let pages = self.ranges.get(first.range).map_or(0, |r| r.pages().len());
        let mut invalidation = Invalidation::None;
        for page in 0..pages {
            invalidation = invalidation.max(self.refresh_protection(PageLocation {
                range: first.range,
                page,
            }));
        }
        invalidation
    }

    fn region(&self, handle: Mmio2Handle) -> Result<&Mmio2Region, PgmError> {
        self.mmio2
            .iter()
            .find(|r| r.handle == handle)
            .ok_or(PgmError::UnknownMmio2(handle))
    }

    fn region_mut(&mut self, handle: Mmio2Handle) -> Result<&mut Mmio2Region, PgmError> {
        self.mmio2
            .iter_mut()
            .find(|r| r.handle == handle)
            .ok_or(PgmError::UnknownMmio2(handle))
    }
}

/// Splits a device access of `len` bytes at `offset` into per-page pieces (region offset,
/// buffer range); fails when it would leave a region of `size` bytes.
fn device_pieces(
    size: u64,
    offset: u64,
    len: usize,
) -> Result<Vec<(u64, core::ops::Range<usize>)>, PgmError> {
    let end = offset.checked_add(len as u64).ok_or(PgmError::OutOfRange)?;
    if end > size {
        return Err(PgmError::OutOfRange);
    }
    let mut pieces = Vec::new();
    let mut done = 0usize;
    while done < len {
        let at = offset + done as u64;
        let piece = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(len - done);
        pieces.push((at, done..done + piece));
        done += piece;
    }
    Ok(pieces)
}
