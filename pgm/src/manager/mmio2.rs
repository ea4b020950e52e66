//! MMIO2 regions (after PGMR3PhysMmio2*): device memory, such as a framebuffer, that the device
//! reaches by offset and the guest reaches once the region is mapped at a guest-physical
//! address. Optional dirty-page tracking write-protects the mapped pages so that only the first
//! guest write to each page since the last query traps.

use alloc::vec::Vec;

use super::{page_count, Pgm};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::error::{Mmio2Error, NoMemory, RangeError};
use crate::frames::{HostFrameAllocator, HostMemory};
pub use crate::handles::{DeviceId, Mmio2Handle};
use crate::page::{PageDescriptor, PageType};
use crate::paging::EntryFormat;
use crate::paging::Invalidation;
use crate::ram::{PageLocation, RamRange};

/// At most this many MMIO2 regions per VM (PGM_MMIO2_MAX_RANGES).
pub const MMIO2_MAX_REGIONS: usize = 32;
/// At most this many pages per MMIO2 region (PGM_MMIO2_MAX_PAGE_COUNT: 64 GiB).
pub const MMIO2_MAX_PAGES: u64 = 0x0100_0000;

/// What a device asks for when it creates an MMIO2 region (PGMR3PhysMmio2Register).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mmio2Spec {
    /// The device instance that owns the region.
    pub device: DeviceId,
    /// The device's own number for the region (PCI BAR etc.), unique per device.
    pub region_no: u32,
    /// Bytes, a non-zero whole number of pages, at most [`MMIO2_MAX_PAGES`] pages.
    pub size: u64,
    /// PGMPHYS_MMIO2_FLAGS_TRACK_DIRTY_PAGES: the region may track dirty pages.
    pub track_dirty_pages: bool,
}

/// One MMIO2 region.
pub(super) struct Mmio2Region {
    handle: Mmio2Handle,
    device: DeviceId,
    /// The device's own number for the region (PCI BAR etc.), kept for the device.
    region_no: u32,
    frames: Vec<HostPhysAddr>,
    mapped_at: Option<GuestPhysAddr>,
    /// Mapped over RAM pages, which become ZERO RAM again when it is unmapped.
    over_ram: bool,
    /// Created with the track-dirty-pages flag.
    trackable: bool,
    tracking: bool,
    /// One bit per page: written by the guest while tracked since the last query.
    dirty: Vec<u64>,
    /// The region was mapped with tracking off since the last query: the guest may have
    /// written any page unseen, so the next query reports every page.
    unseen_writes: bool,
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

    /// Notes that tracking may have stopped seeing guest writes.
    fn note_untracked_mapping(&mut self) {
        if self.mapped_at.is_some() && !self.tracking {
            self.unseen_writes = true;
        }
    }

    /// A bitmap with every page of the region set.
    fn all_dirty(&self) -> Vec<u64> {
        let pages = self.frames.len();
        let mut bits = alloc::vec![u64::MAX; pages.div_ceil(64)];
        if let Some(last) = bits.last_mut() {
            *last &= last_word_mask(pages);
        }
        bits
    }
}

/// # MMIO2: device memory the guest maps (PGMR3PhysMmio2*)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Creates an unmapped MMIO2 region for `spec.device`, its memory allocated and zeroed now.
    /// Refused, changing nothing, when the device already has region `spec.region_no`
    /// ([`Mmio2Error::RegionExists`]), the VM has [`MMIO2_MAX_REGIONS`] regions, or the size
    /// is not a whole number of pages up to [`MMIO2_MAX_PAGES`].
    pub fn create_mmio2(&mut self, spec: Mmio2Spec) -> Result<Mmio2Handle, Mmio2Error> {
        let pages = page_count(GuestPhysAddr::default(), spec.size)?;
        if pages > MMIO2_MAX_PAGES {
            return Err(Mmio2Error::TooLarge(spec.size));
        }
        if self.mmio2.len() >= MMIO2_MAX_REGIONS {
            return Err(Mmio2Error::TooManyRegions);
        }
        self.check_region_no_free(spec.device, spec.region_no)?;
        let pages = pages as usize;
        let mut frames = Vec::with_capacity(pages);
        if self.frames.allocate_frames(pages, &mut frames) < pages {
            self.frames.free_frames(&frames);
            return Err(NoMemory::OutOfFrames.into());
        }
        for &frame in &frames {
            self.memory.zero_frame(frame);
        }
        let handle = Mmio2Handle(self.next_mmio2);
        self.next_mmio2 += 1;
        self.mmio2.push(Mmio2Region {
            handle,
            device: spec.device,
            region_no: spec.region_no,
            frames,
            mapped_at: None,
            over_ram: false,
            trackable: spec.track_dirty_pages,
            tracking: false,
            dirty: alloc::vec![0; pages.div_ceil(64)],
            unseen_writes: false,
        });
        Ok(handle)
    }

    /// Maps the region at `base`: in space no range covers, or wholly over registered RAM pages
    /// without handlers or map locks (the seed's overlapping mapping), which it replaces while
    /// mapped — their frames go back to the host, and [`unmap_mmio2`](Self::unmap_mmio2) gives
    /// them back as ZERO pages. The pages map like RAM (write-protected where dirty tracking or
    /// write monitoring wants their next write). Returns the invalidation replacing RAM needs.
    pub fn map_mmio2(
        &mut self,
        handle: Mmio2Handle,
        base: GuestPhysAddr,
    ) -> Result<Invalidation, Mmio2Error> {
        let region = self.region(handle)?;
        if region.mapped_at.is_some() {
            return Err(Mmio2Error::Mapped(handle));
        }
        let size = region.size();
        let pages = page_count(base, size)?;
        let frames = region.frames.clone();
        let over_ram = self.placement::<Mmio2Error>(base, size, pages)?;
        let replaces_ram = over_ram.is_some();
        let invalidation = match over_ram {
            None => {
                let descriptors: Vec<PageDescriptor> = frames
                    .iter()
                    .map(|&frame| PageDescriptor::allocated(PageType::Mmio2, frame))
                    .collect();
                self.insert_mapped(alloc::vec![RamRange::new(base, descriptors, "mmio2")], false)?;
                Invalidation::None
            }
            Some(locations) => {
                for (location, frame) in locations.into_iter().zip(frames) {
                    self.replace_page(location, PageDescriptor::allocated(PageType::Mmio2, frame));
                }
                self.pool.flush(&mut self.frames);
                Invalidation::SingleContext
            }
        };
        let region = self.region_mut(handle)?;
        region.mapped_at = Some(base);
        region.over_ram = replaces_ram;
        region.note_untracked_mapping();
        // Newly mapped: protection can only be added here, to pages nobody has cached.
        let _: Invalidation = self.refresh_region_protection(handle);
        Ok(invalidation)
    }

    /// Unmaps the region; its memory and dirty bits stay with it. RAM it replaced becomes ZERO
    /// RAM again. Refused, changing nothing, while a page-map lock holds one of its pages
    /// ([`PageError::Locked`](crate::error::PageError::Locked)): the host's pointer into device memory must be released
    /// before the memory can go.
    pub fn unmap_mmio2(&mut self, handle: Mmio2Handle) -> Result<Invalidation, Mmio2Error> {
        let region = self.region(handle)?;
        let base = region.mapped_at.ok_or(Mmio2Error::NotMapped(handle))?;
        let over_ram = region.over_ram;
        let locations = self.located(base, region.frames.len() as u64);
        self.check_unlocked(&locations)?;
        if over_ram {
            for location in locations {
                self.restore_ram_page(location);
            }
        } else if let Some(first) = locations.first() {
            self.remove_range(first.range);
        }
        let region = self.region_mut(handle)?;
        region.mapped_at = None;
        region.over_ram = false;
        Ok(Invalidation::SingleContext)
    }

    /// Shrinks an unmapped region to `size` bytes (PGMR3PhysMmio2Reduce): its next mapping
    /// covers only that much. Unlike the seed, which keeps the tail's memory allocated, the
    /// tail's frames go back to the host now; MMIO pages aliased to them trap again (the
    /// invalidation that needs is returned), and the tail's dirty bits are dropped.
    pub fn reduce_mmio2(&mut self, handle: Mmio2Handle, size: u64) -> Result<Invalidation, Mmio2Error> {
        let pages = page_count(GuestPhysAddr::default(), size)? as usize;
        let region = self.region(handle)?;
        if region.mapped_at.is_some() {
            return Err(Mmio2Error::Mapped(handle));
        }
        if pages > region.frames.len() {
            return Err(Mmio2Error::OutOfRange(handle));
        }
        let tail = self.region(handle)?.frames[pages..].to_vec();
        let invalidation = self.unmap_frames(&tail);
        let region = self.region_mut(handle)?;
        region.frames.truncate(pages);
        region.dirty.truncate(pages.div_ceil(64));
        if let Some(last) = region.dirty.last_mut() {
            *last &= last_word_mask(pages);
        }
        self.pool.retire_all(&tail);
        Ok(invalidation)
    }

    /// Unmaps the region if mapped and frees its memory; refused, changing nothing, where
    /// [`unmap_mmio2`](Self::unmap_mmio2) is.
    pub fn deregister_mmio2(&mut self, handle: Mmio2Handle) -> Result<Invalidation, Mmio2Error> {
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
            .ok_or(Mmio2Error::Unknown(handle))?;
        let region = self.mmio2.remove(index);
        self.pool.retire_all(&region.frames);
        Ok(invalidation)
    }

    /// Deregisters every MMIO2 region of `device` (PGMR3PhysMmio2Deregister with no handle, as
    /// a device's destruction does). All or nothing: refused, changing nothing, while a
    /// page-map lock holds a page of any of them.
    pub fn deregister_device_mmio2(&mut self, device: DeviceId) -> Result<Invalidation, Mmio2Error> {
        let handles: Vec<Mmio2Handle> = self
            .mmio2
            .iter()
            .filter(|region| region.device == device)
            .map(|region| region.handle)
            .collect();
        for &handle in &handles {
            let region = self.region(handle)?;
            if let Some(base) = region.mapped_at {
                self.check_unlocked(&self.located(base, region.frames.len() as u64))?;
            }
        }
        let mut invalidation = Invalidation::None;
        for handle in handles {
            invalidation = invalidation.max(self.deregister_mmio2(handle)?);
        }
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
    pub(super) fn mmio2_frame(&self, handle: Mmio2Handle, offset: u64) -> Result<HostPhysAddr, Mmio2Error> {
        let region = self.region(handle)?;
        if !offset.is_multiple_of(PAGE_SIZE) {
            return Err(RangeError::Misaligned(offset).into());
        }
        if offset >= region.size() {
            return Err(Mmio2Error::OutOfRange(handle));
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

    /// The device that owns the region.
    pub fn mmio2_device(&self, handle: Mmio2Handle) -> Option<DeviceId> {
        self.region(handle).ok().map(|r| r.device)
    }

    /// Changes the device's region number (PGMR3PhysMmio2ChangeRegionNo); refused when the
    /// device has another region with that number.
    pub fn change_mmio2_region_no(&mut self, handle: Mmio2Handle, region_no: u32) -> Result<(), Mmio2Error> {
        let region = self.region(handle)?;
        if region.region_no != region_no {
            self.check_region_no_free(region.device, region_no)?;
        }
        self.region_mut(handle)?.region_no = region_no;
        Ok(())
    }

    fn check_region_no_free(&self, device: DeviceId, region_no: u32) -> Result<(), Mmio2Error> {
        let taken = self
            .mmio2
            .iter()
            .any(|region| region.device == device && region.region_no == region_no);
        if taken {
            return Err(Mmio2Error::RegionExists { device, region_no });
        }
        Ok(())
    }

    /// The device reads its memory at `offset` (never tracked).
    pub fn mmio2_read(&self, handle: Mmio2Handle, offset: u64, buf: &mut [u8]) -> Result<(), Mmio2Error> {
        let region = self.region(handle)?;
        for (at, range) in
            device_pieces(region.size(), offset, buf.len()).ok_or(Mmio2Error::OutOfRange(handle))?
        {
            let (frame, within) = region.frame_at(at);
            self.memory.read(
                HostPhysAddr::new_truncate(frame.as_u64() + within),
                &mut buf[range],
            );
        }
        Ok(())
    }

    /// The device writes its memory at `offset` (never tracked: only guest writes are).
    pub fn mmio2_write(&mut self, handle: Mmio2Handle, offset: u64, data: &[u8]) -> Result<(), Mmio2Error> {
        let pieces = device_pieces(self.region(handle)?.size(), offset, data.len())
            .ok_or(Mmio2Error::OutOfRange(handle))?;
        for (at, range) in pieces {
            let (frame, within) = self.region(handle)?.frame_at(at);
            self.memory
                .write(HostPhysAddr::new_truncate(frame.as_u64() + within), &data[range]);
        }
        Ok(())
    }

    /// Switches dirty-page tracking of the region on or off
    /// (PGMR3PhysMmio2ControlDirtyPageTracking). Bits already collected are kept either way;
    /// while tracking is on, pages not yet dirty are write-protected until the guest writes
    /// them. Switched off while mapped, the guest's writes go unseen, so the next query reports
    /// the whole region. Refused for a region created without
    /// [`Mmio2Spec::track_dirty_pages`].
    pub fn set_mmio2_dirty_tracking(
        &mut self,
        handle: Mmio2Handle,
        enabled: bool,
    ) -> Result<Invalidation, Mmio2Error> {
        let region = self.trackable_region(handle)?;
        region.tracking = enabled;
        region.note_untracked_mapping();
        Ok(self.refresh_region_protection(handle))
    }

    /// True while the region tracks dirty pages.
    pub fn mmio2_dirty_tracking(&self, handle: Mmio2Handle) -> Option<bool> {
        self.region(handle).ok().map(|region| region.tracking)
    }

    /// Puts the region's dirty bitmap (one bit per page, page 0 in bit 0 of word 0) into `out`
    /// and resets it (PGMR3PhysMmio2QueryAndResetDirtyBitmap); with no `out`, only resets. The
    /// bitmap holds the pages the guest wrote while tracked — kept across switching tracking
    /// off and unmapping, where the seed can only report the whole region — or every page when
    /// the region was mapped untracked since the last query (the guest may have written any
    /// page unseen; the seed reports nothing then). Pages that were dirty are write-protected
    /// again while tracking is on. Refused for a region created without tracking.
    pub fn query_and_reset_mmio2_dirty(
        &mut self,
        handle: Mmio2Handle,
        out: Option<&mut Vec<u64>>,
    ) -> Result<Invalidation, Mmio2Error> {
        let region = self.trackable_region(handle)?;
        let bits = if region.unseen_writes {
            region.all_dirty()
        } else {
            core::mem::take(&mut region.dirty)
        };
        region.dirty = alloc::vec![0; region.frames.len().div_ceil(64)];
        region.unseen_writes = false;
        region.note_untracked_mapping();
        if let Some(out) = out {
            out.clear();
            out.extend_from_slice(&bits);
        }
        Ok(self.refresh_region_protection(handle))
    }

    fn trackable_region(&mut self, handle: Mmio2Handle) -> Result<&mut Mmio2Region, Mmio2Error> {
        let region = self.region_mut(handle)?;
        if !region.trackable {
            return Err(Mmio2Error::NotTrackable(handle));
        }
        Ok(region)
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

    /// The region mapped over `gpa`, if any.
    pub(super) fn mmio2_at(&self, gpa: GuestPhysAddr) -> Option<Mmio2Handle> {
        self.mmio2
            .iter()
            .find(|region| region.page_of(gpa).is_some())
            .map(|region| region.handle)
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

    /// Where each mapped region is mapped, with its frames in page order.
    pub(super) fn mmio2_mappings(&self) -> impl Iterator<Item = (GuestPhysAddr, &[HostPhysAddr])> + '_ {
        self.mmio2
            .iter()
            .filter_map(|region| Some((region.mapped_at?, region.frames.as_slice())))
    }

    /// Frames held by MMIO2 regions.
    pub(super) fn mmio2_frames(&self) -> u64 {
        self.mmio2.iter().map(|r| r.frames.len() as u64).sum()
    }

    /// True when a region is mapped.
    pub(super) fn mmio2_mapped(&self) -> bool {
        self.mmio2.iter().any(|region| region.mapped_at.is_some())
    }

    /// Re-applies the write-protection rule to every mapped page of every region.
    pub(super) fn refresh_mmio2_protection(&mut self) -> Invalidation {
        let handles: Vec<Mmio2Handle> = self.mmio2.iter().map(|region| region.handle).collect();
        handles
            .into_iter()
            .map(|handle| self.refresh_region_protection(handle))
            .max()
            .unwrap_or(Invalidation::None)
    }

    /// Re-applies the write-protection rule to every mapped page of the region.
    fn refresh_region_protection(&mut self, handle: Mmio2Handle) -> Invalidation {
        let Some(base) = self.region(handle).ok().and_then(|r| r.mapped_at) else {
            return Invalidation::None;
        };
        let pages = self.region(handle).map_or(0, |r| r.frames.len() as u64);
        let mut invalidation = Invalidation::None;
        for location in self.located(base, pages) {
            invalidation = invalidation.max(self.refresh_protection(location));
        }
        invalidation
    }

    fn region(&self, handle: Mmio2Handle) -> Result<&Mmio2Region, Mmio2Error> {
        self.mmio2
            .iter()
            .find(|r| r.handle == handle)
            .ok_or(Mmio2Error::Unknown(handle))
    }

    fn region_mut(&mut self, handle: Mmio2Handle) -> Result<&mut Mmio2Region, Mmio2Error> {
        self.mmio2
            .iter_mut()
            .find(|r| r.handle == handle)
            .ok_or(Mmio2Error::Unknown(handle))
    }
}

/// The bits of the last word of a bitmap of `pages` pages that stand for pages.
fn last_word_mask(pages: usize) -> u64 {
    match pages % 64 {
        0 => u64::MAX,
        rest => (1 << rest) - 1,
    }
}

/// Splits a device access of `len` bytes at `offset` into per-page pieces (region offset,
/// buffer range); `None` when it would leave a region of `size` bytes.
fn device_pieces(size: u64, offset: u64, len: usize) -> Option<Vec<(u64, core::ops::Range<usize>)>> {
    let end = offset.checked_add(len as u64)?;
    if end > size {
        return None;
    }
    let mut pieces = Vec::new();
    let mut done = 0usize;
    while done < len {
        let at = offset + done as u64;
        let piece = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(len - done);
        pieces.push((at, done..done + piece));
        done += piece;
    }
    Some(pieces)
}

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
#[path = "mmio2_tests.rs"]
mod mmio2_tests;
