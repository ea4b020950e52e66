//! ROM ranges (after PGMR3PhysRomRegister/Protect and the ROM part of the RAM reset): each ROM
//! page keeps its virgin frame, holding the image, here; a shadowed ROM's page descriptor is its
//! RAM shadow. The protection mode decides which of the two reads see and where writes go.

use alloc::vec::Vec;

use super::{page_count, Pgm};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::error::PgmError;
use crate::frames::{HostFrameAllocator, HostMemory};
pub use crate::handles::RomId;
use crate::page::{PageDescriptor, PageType};
use crate::paging::Invalidation;
use crate::ram::{PageLocation, RamRange};

/// Where guest reads and writes of a shadowed ROM go (PGMROMPROT).
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

impl RomProtection {
    /// True when guest reads see the shadow.
    pub fn reads_shadow(self) -> bool {
        matches!(
            self,
            RomProtection::ReadRamWriteIgnore | RomProtection::ReadRamWriteRam
        )
    }

    /// True when guest writes reach the shadow.
    pub fn writes_shadow(self) -> bool {
        matches!(
            self,
            RomProtection::ReadRomWriteRam | RomProtection::ReadRamWriteRam
        )
    }
}

/// One registered ROM.
pub(super) struct RomRange {
    pub(super) id: RomId,
    pub(super) base: GuestPhysAddr,
    pub(super) shadowed: bool,
    pub(super) protection: RomProtection,
    /// One frame per page holding the image.
    pub(super) virgin: Vec<HostPhysAddr>,
    /// The image, kept to restore corrupted virgin frames at reset.
    image: Vec<u8>,
}

impl RomRange {
    fn contains(&self, gpa: GuestPhysAddr) -> bool {
        gpa >= self.base && gpa.as_u64() < self.base.as_u64() + self.virgin.len() as u64 * PAGE_SIZE
    }

    fn page_index(&self, gpa: GuestPhysAddr) -> usize {
        ((gpa.as_u64() - self.base.as_u64()) / PAGE_SIZE) as usize
    }

    /// The image frame of the page at `gpa`, which the ROM must contain.
    pub(super) fn virgin_frame(&self, gpa: GuestPhysAddr) -> Option<HostPhysAddr> {
        self.virgin.get(self.page_index(gpa)).copied()
    }

    /// The protection in force: an unshadowed ROM is always read-ROM/write-ignore.
    pub(super) fn effective_protection(&self) -> RomProtection {
        if self.shadowed {
            self.protection
        } else {
            RomProtection::ReadRomWriteIgnore
        }
    }
}

/// The ROM of `roms` covering `gpa`.
pub(super) fn covering(roms: &[RomRange], gpa: GuestPhysAddr) -> Option<&RomRange> {
    roms.iter().find(|rom| rom.contains(gpa))
}

impl<A: HostFrameAllocator, M: HostMemory> Pgm<A, M> {
    /// Registers a ROM at `base` holding `image` (a non-empty whole number of pages), in space
    /// no range covers. Each page gets a frame with its part of the image; with `shadowed`,
    /// each page also gets a RAM shadow (ZERO until written). The ROM starts in
    /// [`RomProtection::ReadRomWriteIgnore`]. All or nothing.
    pub fn register_rom(
        &mut self,
        base: GuestPhysAddr,
        image: &[u8],
        shadowed: bool,
    ) -> Result<RomId, PgmError> {
        let size = image.len() as u64;
        let pages = page_count(base, size)?;
        self.ranges.check_free(base, size)?;
        let mut virgin = Vec::with_capacity(pages as usize);
        let taken = self.frames.allocate_frames(pages as usize, &mut virgin);
        if taken < pages as usize {
            self.frames.free_frames(&virgin);
            return Err(PgmError::OutOfFrames);
        }
        for (frame, chunk) in virgin.iter().zip(image.chunks(PAGE_SIZE as usize)) {
            self.memory.write(*frame, chunk);
        }
        let id = RomId(self.roms.len() as u32);
        // The ROM first: its pages' mappings are computed from it.
        self.roms.push(RomRange {
            id,
            base,
            shadowed,
            protection: RomProtection::ReadRomWriteIgnore,
            virgin,
            image: image.to_vec(),
        });
        let page_type = if shadowed {
            PageType::RomShadow
        } else {
            PageType::Rom
        };
        let descriptors = alloc::vec![PageDescriptor::zero(page_type); pages as usize];
        if let Err(error) = self.insert_mapped(alloc::vec![RamRange::new(base, descriptors, "rom")]) {
            if let Some(rom) = self.roms.pop() {
                self.frames.free_frames(&rom.virgin);
            }
            return Err(error);
        }
        if shadowed {
            // Shadow pages live under the page-state machine like RAM.
            self.counts.zero += pages;
        }
        self.counts.rom += pages;
        Ok(id)
    }

    /// Changes where the guest's reads and writes of the shadowed ROM `id` go
    /// (PGMR3PhysRomProtect). The shadow keeps its contents across mode changes.
    pub fn protect_rom(&mut self, id: RomId, protection: RomProtection) -> Result<Invalidation, PgmError> {
        let rom = self
            .roms
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or(PgmError::UnknownRom(id))?;
        if !rom.shadowed {
            return Err(PgmError::RomNotShadowed(id));
        }
        if rom.protection == protection {
            return Ok(Invalidation::None);
        }
        rom.protection = protection;
        let base = rom.base;
        self.sync_rom_pages(base);
        Ok(Invalidation::SingleContext)
    }

    /// The protection mode of ROM `id`.
    pub fn rom_protection(&self, id: RomId) -> Option<RomProtection> {
        self.roms
            .iter()
            .find(|r| r.id == id)
            .map(RomRange::effective_protection)
    }

    /// The ROM part of a VM reset: every ROM goes back to read-ROM/write-ignore and virgin
    /// frames that no longer hold the image get it back. (Shadow pages were reset with RAM.)
    pub(super) fn reset_roms(&mut self) -> Invalidation {
        let mut invalidation = Invalidation::None;
        for index in 0..self.roms.len() {
            let rom = &mut self.roms[index];
            let mode_changed = rom.protection != RomProtection::ReadRomWriteIgnore;
            rom.protection = RomProtection::ReadRomWriteIgnore;
            let mut page_buf = alloc::vec![0u8; PAGE_SIZE as usize];
            for (frame, chunk) in rom.virgin.iter().zip(rom.image.chunks(PAGE_SIZE as usize)) {
                self.memory.read(*frame, &mut page_buf);
                if page_buf != chunk {
                    self.memory.write(*frame, chunk);
                }
            }
            if mode_changed {
                let base = rom.base;
                self.sync_rom_pages(base);
                invalidation = Invalidation::SingleContext;
            }
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

    fn sync_rom_pages(&mut self, base: GuestPhysAddr) {
        let Some(first) = self.ranges.find(base) else {
            return;
        };
        let pages = self.ranges.get(first.range).map_or(0, |r| r.pages().len());
        for page in 0..pages {
            self.sync_leaf(PageLocation {
                range: first.range,
                page,
            });
        }
    }
}
