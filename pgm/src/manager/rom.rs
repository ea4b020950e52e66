//! ROM ranges (after PGMR3PhysRomRegister/Protect and the ROM part of the RAM reset): each ROM
//! page keeps its virgin frame, holding the image, here; a shadowed ROM's page descriptor is its
//! RAM shadow. Each page's protection mode decides which of the two reads see and where writes
//! go — [`RomProtection::target`] is that one rule, used by the leaf computation, the fault
//! path and host access alike.
//!
//! A ROM lies either in space of its own or over registered RAM pages (the PC's BIOS over
//! system RAM), which it replaces; removing it gives them back as ZERO RAM.

use alloc::vec::Vec;

use super::{page_count, Pgm};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::error::{NoMemory, RomError};
use crate::frames::{HostFrameAllocator, HostMemory};
pub use crate::handles::RomId;
use crate::page::{PageDescriptor, PageEvent, PageType};
use crate::paging::EntryFormat;
use crate::paging::{Access, Invalidation};
use crate::ram::RamRange;

/// Where guest reads and writes of a shadowed ROM page go (PGMROMPROT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RomProtection {
    /// Reads from the ROM image; writes are ignored (the power-on mode).
    ReadRomWriteIgnore,
    /// Reads from the ROM image; writes go to the shadow (BIOS shadowing in progress).
    ReadRomWriteRam,
    /// Reads from the shadow; writes are ignored (shadowed and locked).
    ReadRamWriteIgnore,
    /// Reads and writes go to the shadow, which is mapped like RAM.
    ReadRamWriteRam,
}

/// Where one access to a ROM page goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RomTarget {
    /// The ROM image (the page's virgin frame).
    Image,
    /// The RAM shadow (the page descriptor's frame).
    Shadow,
    /// Nowhere: the write is dropped.
    Ignored,
}

impl RomProtection {
    /// Where `access` goes under this protection: the one routing rule of ROM pages.
    pub fn target(self, access: Access) -> RomTarget {
        use RomProtection::*;
        match (access, self) {
            (Access::Write, ReadRomWriteRam | ReadRamWriteRam) => RomTarget::Shadow,
            (Access::Write, ReadRomWriteIgnore | ReadRamWriteIgnore) => RomTarget::Ignored,
            (_, ReadRamWriteIgnore | ReadRamWriteRam) => RomTarget::Shadow,
            (_, ReadRomWriteIgnore | ReadRomWriteRam) => RomTarget::Image,
        }
    }

    /// True when guest reads see the shadow.
    pub fn reads_shadow(self) -> bool {
        self.target(Access::Read) == RomTarget::Shadow
    }

    /// True when guest writes reach the shadow.
    pub fn writes_shadow(self) -> bool {
        self.target(Access::Write) == RomTarget::Shadow
    }

    /// True when guest writes can be mapped straight to the shadow: reads see it too. (Writes to
    /// the shadow while reads see the image are emulated.)
    pub fn maps_writes(self) -> bool {
        self.reads_shadow() && self.writes_shadow()
    }
}

/// The image of a ROM (the `pvBinary`, `cbBinary` and PGMPHYS_ROM_FLAGS_PERMANENT_BINARY of
/// PGMR3PhysRomRegister). It may be shorter than the ROM; the rest reads as zeros.
#[derive(Clone, Copy, Debug)]
pub enum RomImage<'a> {
    /// The manager keeps a copy of the bytes, to restore the virgin frames from at reset.
    Copy(&'a [u8]),
    /// The bytes stay where they are for the VM's lifetime (an image built into the
    /// hypervisor): no copy is made, and reset restores the virgin frames from them.
    Permanent(&'static [u8]),
}

/// The image a ROM keeps for reset.
enum StoredImage {
    Copy(Vec<u8>),
    Permanent(&'static [u8]),
}

impl StoredImage {
    fn bytes(&self) -> &[u8] {
        match self {
            StoredImage::Copy(bytes) => bytes,
            StoredImage::Permanent(bytes) => bytes,
        }
    }

    /// The image's part in page `index`, zero-padded to a whole page.
    fn page(&self, index: usize) -> Vec<u8> {
        let mut page = alloc::vec![0u8; PAGE_SIZE as usize];
        let start = index * PAGE_SIZE as usize;
        if let Some(rest) = self.bytes().get(start..) {
            let len = rest.len().min(page.len());
            page[..len].copy_from_slice(&rest[..len]);
        }
        page
    }
}

/// One registered ROM.
pub(super) struct RomRange {
    pub(super) id: RomId,
    pub(super) base: GuestPhysAddr,
    pub(super) shadowed: bool,
    /// The ROM replaced registered RAM pages (and gives them back when removed).
    pub(super) over_ram: bool,
    /// Per page (PGMROMPAGE::enmProt).
    protection: Vec<RomProtection>,
    /// One frame per page holding the image.
    pub(super) virgin: Vec<HostPhysAddr>,
    image: StoredImage,
}

impl RomRange {
    fn contains(&self, gpa: GuestPhysAddr) -> bool {
        gpa >= self.base && gpa.as_u64() < self.end()
    }

    pub(super) fn end(&self) -> u64 {
        self.base.as_u64() + self.pages() * PAGE_SIZE
    }

    pub(super) fn pages(&self) -> u64 {
        self.virgin.len() as u64
    }

    fn page_index(&self, gpa: GuestPhysAddr) -> usize {
        ((gpa.as_u64() - self.base.as_u64()) / PAGE_SIZE) as usize
    }

    /// The image frame of the page at `gpa`, which the ROM must contain.
    pub(super) fn virgin_frame(&self, gpa: GuestPhysAddr) -> Option<HostPhysAddr> {
        self.virgin.get(self.page_index(gpa)).copied()
    }

    /// The protection in force at `gpa`: an unshadowed ROM is always read-ROM/write-ignore.
    pub(super) fn protection_at(&self, gpa: GuestPhysAddr) -> RomProtection {
        match self.protection.get(self.page_index(gpa)) {
            Some(&protection) if self.shadowed => protection,
            _ => RomProtection::ReadRomWriteIgnore,
        }
    }
}

/// The ROM of `roms` covering `gpa`.
pub(super) fn covering(roms: &[RomRange], gpa: GuestPhysAddr) -> Option<&RomRange> {
    roms.iter().find(|rom| rom.contains(gpa))
}

/// # ROM and its shadow (PGMR3PhysRomRegister, PGMR3PhysRomProtect)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Registers a ROM of `size` bytes at `base` holding `image` (at most `size` bytes; the rest
    /// of the ROM reads as zeros, as in the seed). The ROM lies in space no range covers, or
    /// wholly over registered RAM pages without handlers or map locks, which it replaces (their
    /// frames go back to the host; [`deregister_rom`](Self::deregister_rom) gives them back as
    /// ZERO RAM). Each page gets a frame with its part of the image; with `shadowed`, each page
    /// also gets a RAM shadow (ZERO until written). Every page starts in
    /// [`RomProtection::ReadRomWriteIgnore`]. All or nothing. Returns the handle and the
    /// invalidation replacing RAM needs.
    pub fn register_rom(
        &mut self,
        base: GuestPhysAddr,
        size: u64,
        image: RomImage<'_>,
        shadowed: bool,
    ) -> Result<(RomId, Invalidation), RomError> {
        let pages = page_count(base, size)?;
        let bytes = match image {
            RomImage::Copy(bytes) | RomImage::Permanent(bytes) => bytes,
        };
        if bytes.len() as u64 > size {
            return Err(RomError::ImageTooLarge {
                image: bytes.len(),
                range: size,
            });
        }
        let over_ram = self.placement::<RomError>(base, size, pages)?;
        let mut virgin = Vec::with_capacity(pages as usize);
        let taken = self.frames.allocate_frames(pages as usize, &mut virgin);
        if taken < pages as usize {
            self.frames.free_frames(&virgin);
            return Err(NoMemory::OutOfFrames.into());
        }
        let stored = match image {
            RomImage::Copy(bytes) => StoredImage::Copy(bytes.to_vec()),
            RomImage::Permanent(bytes) => StoredImage::Permanent(bytes),
        };
        for (index, frame) in virgin.iter().enumerate() {
            self.memory.write(*frame, &stored.page(index));
        }
        let id = RomId(self.roms.iter().map(|rom| rom.id.0 + 1).max().unwrap_or(0));
        // The ROM first: its pages' mappings are computed from it.
        self.roms.push(RomRange {
            id,
            base,
            shadowed,
            over_ram: over_ram.is_some(),
            protection: alloc::vec![RomProtection::ReadRomWriteIgnore; pages as usize],
            virgin,
            image: stored,
        });
        let page_type = if shadowed {
            PageType::RomShadow
        } else {
            PageType::Rom
        };
        let invalidation = match over_ram {
            Some(locations) => {
                for location in locations {
                    self.replace_page(location, PageDescriptor::zero(page_type));
                }
                self.pool.flush(&mut self.frames);
                Invalidation::SingleContext
            }
            None => {
                let descriptors = alloc::vec![PageDescriptor::zero(page_type); pages as usize];
                if let Err(error) =
                    self.insert_mapped(alloc::vec![RamRange::new(base, descriptors, "rom")], false)
                {
                    if let Some(rom) = self.roms.pop() {
                        self.frames.free_frames(&rom.virgin);
                    }
                    return Err(error.into());
                }
                if shadowed {
                    // Shadow pages live under the page-state machine like RAM.
                    self.counts.zero += pages;
                }
                Invalidation::None
            }
        };
        self.counts.rom += pages;
        Ok((id, invalidation))
    }

    /// Removes ROM `id` (the seed has no removal; a device going away needs one): its shadow
    /// frames and image frames go back to the host, a ROM over RAM leaves ZERO RAM pages behind
    /// and a ROM of its own leaves unassigned space. Refused, changing nothing, while a map lock
    /// holds one of its pages.
    pub fn deregister_rom(&mut self, id: RomId) -> Result<Invalidation, RomError> {
        let index = self
            .roms
            .iter()
            .position(|rom| rom.id == id)
            .ok_or(RomError::Unknown(id))?;
        let rom = &self.roms[index];
        let (base, pages, shadowed, over_ram) = (rom.base, rom.pages(), rom.shadowed, rom.over_ram);
        let locations = self.located(base, pages);
        self.check_unlocked(&locations)?;
        for &location in &locations {
            // Reset only frees the shadow's frame: it cannot fail.
            let _ = self.apply(location, PageEvent::Reset);
        }
        if over_ram {
            for &location in &locations {
                self.restore_ram_page(location);
            }
        } else {
            if let Some(first) = locations.first() {
                self.remove_range(first.range);
            }
            if shadowed {
                self.counts.zero -= pages;
            }
        }
        self.counts.rom -= pages;
        let rom = self.roms.remove(index);
        let aliases = rom
            .virgin
            .iter()
            .map(|&frame| self.unmap_frame(frame, None))
            .fold(Invalidation::SingleContext, Invalidation::max);
        self.pool.retire_all(&rom.virgin);
        self.pool.flush(&mut self.frames);
        Ok(aliases)
    }

    /// Changes where the guest's reads and writes of the shadowed ROM pages in
    /// `[base, base + size)` go (PGMR3PhysRomProtect). The range may cover several ROMs, parts
    /// of them and space between them: pages of unshadowed ROMs and pages that are no ROM are
    /// skipped, as in the seed; a zero size changes nothing. Shadows keep their contents across
    /// mode changes.
    pub fn protect_rom_range(
        &mut self,
        base: GuestPhysAddr,
        size: u64,
        protection: RomProtection,
    ) -> Result<Invalidation, RomError> {
        if size == 0 {
            return Ok(Invalidation::None);
        }
        page_count(base, size)?;
        let end = base.as_u64() + size;
        let mut changed = Vec::new();
        for rom in self.roms.iter_mut().filter(|rom| rom.shadowed) {
            let first = base.as_u64().max(rom.base.as_u64());
            let last = end.min(rom.end());
            let mut at = first;
            while at < last {
                let index = ((at - rom.base.as_u64()) / PAGE_SIZE) as usize;
                if rom.protection[index] != protection {
                    rom.protection[index] = protection;
                    changed.push(GuestPhysAddr::new_truncate(at));
                }
                at += PAGE_SIZE;
            }
        }
        for &gpa in &changed {
            if let Some(location) = self.ranges.find(gpa) {
                self.sync_leaf(location);
            }
        }
        Ok(if changed.is_empty() {
            Invalidation::None
        } else {
            Invalidation::SingleContext
        })
    }

    /// Changes the protection of every page of the shadowed ROM `id` (see
    /// [`protect_rom_range`](Self::protect_rom_range)).
    pub fn protect_rom(&mut self, id: RomId, protection: RomProtection) -> Result<Invalidation, RomError> {
        let rom = self
            .roms
            .iter()
            .find(|r| r.id == id)
            .ok_or(RomError::Unknown(id))?;
        if !rom.shadowed {
            return Err(RomError::NotShadowed(id));
        }
        let (base, size) = (rom.base, rom.pages() * PAGE_SIZE);
        self.protect_rom_range(base, size, protection)
    }

    /// The protection in force for the ROM page holding `gpa`, if a ROM covers it.
    pub fn rom_protection_at(&self, gpa: GuestPhysAddr) -> Option<RomProtection> {
        Some(self.rom_covering(gpa)?.protection_at(gpa))
    }

    /// The image ROM `id` restores its pages from at reset: a copy, or the caller's own bytes
    /// for a [`RomImage::Permanent`] image.
    pub fn rom_image(&self, id: RomId) -> Option<&[u8]> {
        self.roms
            .iter()
            .find(|rom| rom.id == id)
            .map(|rom| rom.image.bytes())
    }

    /// The ROM part of a VM reset (pgmR3PhysRomReset): every page goes back to
    /// read-ROM/write-ignore and virgin frames that no longer hold the image get it back.
    /// (Shadow pages are reset with RAM.)
    pub(super) fn reset_roms(&mut self) -> Invalidation {
        let mut invalidation = Invalidation::None;
        for index in 0..self.roms.len() {
            let rom = &self.roms[index];
            let mut page_buf = alloc::vec![0u8; PAGE_SIZE as usize];
            for (page, frame) in rom.virgin.iter().enumerate() {
                let image = rom.image.page(page);
                self.memory.read(*frame, &mut page_buf);
                if page_buf != image {
                    self.memory.write(*frame, &image);
                }
            }
            let (base, size) = (rom.base, rom.pages() * PAGE_SIZE);
            let reset = self.protect_rom_range(base, size, RomProtection::ReadRomWriteIgnore);
            invalidation = invalidation.max(reset.unwrap_or(Invalidation::SingleContext));
        }
        invalidation
    }

    /// The ROM covering `gpa`.
    pub(super) fn rom_covering(&self, gpa: GuestPhysAddr) -> Option<&RomRange> {
        covering(&self.roms, gpa)
    }

    /// The virgin frame of the ROM page at `gpa`.
    pub(super) fn virgin_frame(&self, gpa: GuestPhysAddr) -> Option<HostPhysAddr> {
        self.rom_covering(gpa)?.virgin_frame(gpa)
    }

    /// Frees every virgin frame (VM termination).
    pub(super) fn release_roms(&mut self) {
        for rom in core::mem::take(&mut self.roms) {
            self.frames.free_frames(&rom.virgin);
        }
    }
}

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
#[path = "rom_tests.rs"]
mod rom_tests;
