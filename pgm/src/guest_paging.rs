//! The guest's own paging: how the guest's MMU turns a guest-linear address into a
//! guest-physical one. The VMM needs it to fetch the instruction behind an exit it emulates
//! (the CPU reports the faulting data address as guest-physical, but RIP is linear).
//!
//! The walk reads the guest's paging structures through the A20 gate, as the guest's MMU
//! would, and never sets accessed or dirty bits: it is a lookup, not an access.

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::error::AccessError;
use crate::frames::{HostFrameAllocator, HostMemory};
use crate::manager::Pgm;
use crate::paging::EntryFormat;
use crate::Invalidation;

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1 << 0;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
/// Address bits 51:12 of an 8-byte paging entry.
const ADDRESS_MASK_64: u64 = 0x000F_FFFF_FFFF_F000;

/// The paging structures the guest uses, as its control registers select them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestPaging {
    /// CR0.PG clear: linear addresses are physical (truncated to 32 bits).
    Off,
    /// 32-bit paging: two levels of 4-byte entries; `pse` allows 4 MiB pages.
    Bits32 {
        /// CR4.PSE.
        pse: bool,
    },
    /// PAE paging: a 4-entry PDPT, then two levels of 8-byte entries.
    Pae,
    /// 4-level paging (IA-32e mode).
    Level4,
    /// 5-level paging (IA-32e mode with CR4.LA57: 57-bit linear addresses).
    Level5,
}

impl GuestPaging {
    /// The paging mode the guest's CR0, CR4 and IA32_EFER select.
    pub fn from_registers(cr0: u64, cr4: u64, efer: u64) -> GuestPaging {
        if cr0 & CR0_PG == 0 {
            GuestPaging::Off
        } else if efer & EFER_LMA != 0 && cr4 & CR4_LA57 != 0 {
            GuestPaging::Level5
        } else if efer & EFER_LMA != 0 {
            GuestPaging::Level4
        } else if cr4 & CR4_PAE != 0 {
            GuestPaging::Pae
        } else {
            GuestPaging::Bits32 {
                pse: cr4 & CR4_PSE != 0,
            }
        }
    }
}

/// Why a guest-linear address has no guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestWalkError {
    /// The entry at `level` (4 = PML4 ... 1 = PT; 3 is the PDPT, also under PAE) is not present.
    NotPresent {
        /// The level of the missing entry.
        level: u8,
    },
    /// A paging structure lies outside guest memory (at this entry address).
    TableOutsideMemory(GuestPhysAddr),
    /// The code the walk led to is not in readable guest memory (at this address).
    CodeOutsideMemory(GuestPhysAddr),
    /// Every entry is present but they refuse the access: a write to a read-only page (by
    /// user code, or by the supervisor under CR0.WP), or a user access to a supervisor page.
    Protection,
}

/// A data access as the guest's MMU checks it (see [`Pgm::guest_translate_access`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestAccess {
    /// A write (else a read).
    pub write: bool,
    /// Made at CPL 3.
    pub user: bool,
    /// CR0.WP: supervisor writes honour read-only entries too.
    pub write_protect: bool,
}

/// The accessed and dirty bits a checked walk found clear and the MMU would set: each entry's
/// guest-physical address, its size (4 or 8 bytes) and its value with the bits set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryUpdates {
    entries: [(u64, u8, u64); 4],
    len: u8,
}

impl EntryUpdates {
    /// True when every entry already had its bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn push(&mut self, at: u64, size: u8, value: u64) {
        if let Some(slot) = self.entries.get_mut(usize::from(self.len)) {
            *slot = (at, size, value);
            self.len += 1;
        }
    }
}

/// One level of a walk: where its index sits in the linear address and how wide it is.
struct Level {
    number: u8,
    shift: u32,
    index_bits: u32,
    /// A page-size bit here maps a large page.
    large_allowed: bool,
}

/// Where a walk starts and the levels it goes through.
struct WalkPlan {
    table: u64,
    /// The linear address as the paging mode sees it (32 bits outside 4-level paging).
    linear: u64,
    levels: &'static [Level],
    entry_size: u64,
}

const fn level(number: u8, shift: u32, index_bits: u32, large_allowed: bool) -> Level {
    Level {
        number,
        shift,
        index_bits,
        large_allowed,
    }
}

const LEVELS_32: [Level; 2] = [level(2, 22, 10, false), level(1, 12, 10, false)];
const LEVELS_32_PSE: [Level; 2] = [level(2, 22, 10, true), level(1, 12, 10, false)];
const LEVELS_PAE: [Level; 3] = [
    level(3, 30, 2, false),
    level(2, 21, 9, true),
    level(1, 12, 9, false),
];
const LEVELS_5: [Level; 5] = [
    level(5, 48, 9, false),
    level(4, 39, 9, false),
    level(3, 30, 9, true),
    level(2, 21, 9, true),
    level(1, 12, 9, false),
];
const LEVELS_4: [Level; 4] = [
    level(4, 39, 9, false),
    level(3, 30, 9, true),
    level(2, 21, 9, true),
    level(1, 12, 9, false),
];

impl WalkPlan {
    /// The walk of `linear` under `paging` rooted at `cr3`; `None` with paging off.
    fn of(paging: GuestPaging, cr3: u64, linear: u64) -> Option<WalkPlan> {
        let (table, linear, levels, entry_size): (u64, u64, &'static [Level], u64) = match paging {
            GuestPaging::Off => return None,
            GuestPaging::Bits32 { pse: true } => (cr3 & 0xFFFF_F000, linear & 0xFFFF_FFFF, &LEVELS_32_PSE, 4),
            GuestPaging::Bits32 { pse: false } => (cr3 & 0xFFFF_F000, linear & 0xFFFF_FFFF, &LEVELS_32, 4),
            GuestPaging::Pae => (cr3 & 0xFFFF_FFE0, linear & 0xFFFF_FFFF, &LEVELS_PAE, 8),
            GuestPaging::Level4 => (cr3 & ADDRESS_MASK_64, linear, &LEVELS_4, 8),
            GuestPaging::Level5 => (cr3 & ADDRESS_MASK_64, linear, &LEVELS_5, 8),
        };
        Some(WalkPlan {
            table,
            linear,
            levels,
            entry_size,
        })
    }
}

/// What one walk read: each paging entry's host address and value, kept when every entry lay
/// in a frame only an exclusive change of the manager can replace, so the walk can be checked
/// later by reading the entries again instead of walking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct WalkTrace {
    entries: [(HostPhysAddr, u64); 4],
    len: u8,
    entry_size: u8,
}

impl WalkTrace {
    /// Notes the entry read at `at` (`None`: in a frame that may change under a shared
    /// manager, so the walk cannot be checked cheaply).
    fn note(trace: &mut Option<WalkTrace>, at: Option<HostPhysAddr>, value: u64) {
        let slot = trace.as_mut().and_then(|kept| {
            let slot = kept.entries.get_mut(usize::from(kept.len))?;
            kept.len += 1;
            Some(slot)
        });
        match (slot, at) {
            (Some(slot), Some(at)) => *slot = (at, value),
            _ => *trace = None,
        }
    }
}

/// Accessed and dirty bits: the CPU sets them in the guest's entries as it walks; they do not
/// change where a walk leads.
const ACCESSED_DIRTY: u64 = 0b11 << 5;

/// One code page's translation, remembered by [`Pgm::read_code`] for the next instruction
/// fetch from the same page (a vCPU keeps one between emulated exits). It holds the host
/// addresses of the guest's paging entries and code page, so it is used only after checking
/// that the guest left those entries as they were, and only while the caller's `epoch` says
/// the manager has not been changed exclusively since (see [`Pgm::read_code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeTranslation {
    epoch: u64,
    paging: GuestPaging,
    cr3: u64,
    linear_page: u64,
    code_gpa: GuestPhysAddr,
    code_frame: HostPhysAddr,
    walk: WalkTrace,
}

/// What [`Pgm::read_code`] read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeRead {
    /// Bytes read into the buffer: as many as it holds, up to the end of the code page.
    pub len: usize,
    /// The guest-physical address of the first byte (through the A20 gate).
    pub gpa: GuestPhysAddr,
    /// True when the remembered translation was still good and no walk was needed.
    pub reused: bool,
}

impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Translates the guest-linear address `linear` through the guest's paging structures
    /// rooted at `cr3`, as the guest's MMU would. Reads guest memory only; changes nothing.
    pub fn guest_linear_to_phys(
        &self,
        paging: GuestPaging,
        cr3: u64,
        linear: u64,
    ) -> Result<GuestPhysAddr, GuestWalkError> {
        self.traced_walk(paging, cr3, linear, &mut None)
    }

    /// Translates the guest-linear address `linear` for a data `access` as the guest's MMU
    /// would (SDM vol. 3, 4.6): every entry present, the page writable for a write (by user
    /// code always; by the supervisor under CR0.WP) and user-accessible for a user access
    /// (PAE's PDPT entries carry no such rights). Returns the guest-physical address (through
    /// the A20 gate) and the accessed bits, and the leaf's dirty bit for a write, that the MMU
    /// would set: [`set_accessed_dirty`](Self::set_accessed_dirty) sets them. Reads guest memory
    /// only; changes nothing. SMAP and protection keys are not checked.
    pub fn guest_translate_access(
        &self,
        paging: GuestPaging,
        cr3: u64,
        linear: u64,
        access: GuestAccess,
    ) -> Result<(GuestPhysAddr, EntryUpdates), GuestWalkError> {
        let Some(plan) = WalkPlan::of(paging, cr3, linear) else {
            let gpa = GuestPhysAddr::new_truncate(linear & 0xFFFF_FFFF);
            return Ok((self.a20_apply(gpa), EntryUpdates::default()));
        };
        let WalkPlan {
            table,
            linear,
            levels,
            entry_size,
        } = plan;
        let mut table = table;
        let (mut writable, mut user) = (true, true);
        let mut updates = EntryUpdates::default();
        for &Level {
            number,
            shift,
            index_bits,
            large_allowed,
        } in levels
        {
            let index = (linear >> shift) & ((1 << index_bits) - 1);
            let at = self
                .a20_apply(GuestPhysAddr::new_truncate(table + index * entry_size))
                .as_u64();
            let (entry, _) = self.read_guest_entry(at, entry_size)?;
            if entry & PRESENT == 0 {
                return Err(GuestWalkError::NotPresent { level: number });
            }
            // PAE's PDPT entries have no rights bits (and no accessed bit to set).
            let pae_pdpt = paging == GuestPaging::Pae && number == 3;
            if !pae_pdpt {
                writable &= entry & WRITABLE != 0;
                user &= entry & USER != 0;
            }
            let leaf = number == 1 || (large_allowed && entry & PAGE_SIZE_BIT != 0);
            let mut wanted = if pae_pdpt { 0 } else { ACCESSED };
            if leaf && access.write {
                wanted |= DIRTY;
            }
            if entry & wanted != wanted {
                updates.push(at, entry_size as u8, entry | wanted);
            }
            if leaf {
                let refused = (access.user && !user)
                    || (access.write && !writable && (access.user || access.write_protect));
                if refused {
                    return Err(GuestWalkError::Protection);
                }
                let offset_mask = (1u64 << shift) - 1;
                let base = leaf_base(entry, entry_size, shift);
                return Ok((
                    self.a20_apply(GuestPhysAddr::new_truncate(base | (linear & offset_mask))),
                    updates,
                ));
            }
            table = if entry_size == 4 {
                entry & 0xFFFF_F000
            } else {
                entry & ADDRESS_MASK_64
            };
        }
        // Every list of levels ends with level 1, which returns above.
        Err(GuestWalkError::NotPresent { level: 1 })
    }

    /// Sets the accessed and dirty bits a checked walk found clear ([`EntryUpdates`]), as the
    /// guest's MMU sets them after a walk. Returns the invalidation the writes need.
    pub fn set_accessed_dirty(&mut self, updates: &EntryUpdates) -> Result<Invalidation, AccessError> {
        let mut invalidation = Invalidation::None;
        for &(at, size, value) in &updates.entries[..usize::from(updates.len)] {
            let bytes = value.to_le_bytes();
            invalidation = invalidation
                .max(self.write_phys(GuestPhysAddr::new_truncate(at), &bytes[..usize::from(size)])?);
        }
        Ok(invalidation)
    }

    /// Reads the instruction bytes at the guest-linear address `linear` (through the guest's
    /// paging rooted at `cr3`, and the A20 gate) into `buf`, up to the end of the code page.
    ///
    /// `cache` is the caller's remembered translation: used when it is for the same paging
    /// mode, CR3 and linear page, was made at the same `epoch`, and the guest's paging entries
    /// it walked still hold what they held (accessed and dirty bits aside); otherwise the walk
    /// is done and remembered, when its entries and the code page all have frames of their own.
    ///
    /// `epoch` is the caller's promise: it changes whenever the manager may have been changed
    /// exclusively (`&mut self`) since `cache` was made. The kernel uses the count of write
    /// acquisitions of the VM's lock; the lock-free path changes no page's frame.
    ///
    /// Errors: the walk's, or [`GuestWalkError::CodeOutsideMemory`] when the code is not in
    /// readable guest memory. Changes nothing in the manager.
    pub fn read_code(
        &self,
        paging: GuestPaging,
        cr3: u64,
        linear: u64,
        buf: &mut [u8],
        cache: &mut Option<CodeTranslation>,
        epoch: u64,
    ) -> Result<CodeRead, GuestWalkError> {
        let offset = linear & (PAGE_SIZE - 1);
        let len = buf.len().min((PAGE_SIZE - offset) as usize);
        let buf = &mut buf[..len];
        let linear_page = linear - offset;
        let still_good = |kept: &CodeTranslation| {
            kept.epoch == epoch
                && kept.paging == paging
                && kept.cr3 == cr3
                && kept.linear_page == linear_page
                && self.walk_holds(&kept.walk)
        };
        if let Some(kept) = cache.as_ref().filter(|kept| still_good(kept)) {
            self.memory().read(kept.code_frame.at_page_offset(offset), buf);
            return Ok(CodeRead {
                len,
                gpa: kept.code_gpa.at_page_offset(offset),
                reused: true,
            });
        }
        let mut trace = Some(WalkTrace::default());
        let gpa = self.a20_apply(self.traced_walk(paging, cr3, linear, &mut trace)?);
        let code_frame = self
            .read_in_page(gpa, buf)
            .map_err(|_| GuestWalkError::CodeOutsideMemory(gpa))?;
        *cache = trace.zip(code_frame).map(|(walk, code_frame)| CodeTranslation {
            epoch,
            paging,
            cr3,
            linear_page,
            code_gpa: gpa.page_base(),
            code_frame,
            walk,
        });
        Ok(CodeRead {
            len,
            gpa,
            reused: false,
        })
    }

    /// True when every entry `walk` read still holds the value it read (accessed and dirty
    /// bits aside).
    fn walk_holds(&self, walk: &WalkTrace) -> bool {
        walk.entries[..walk.len as usize].iter().all(|&(at, value)| {
            let now = match walk.entry_size {
                8 => self.memory().read_u64(at),
                _ => {
                    let mut bytes = [0u8; 4];
                    self.memory().read(at, &mut bytes);
                    u64::from(u32::from_le_bytes(bytes))
                }
            };
            (now ^ value) & !ACCESSED_DIRTY == 0
        })
    }

    /// [`guest_linear_to_phys`](Self::guest_linear_to_phys), noting in `trace` (when `Some`)
    /// the entries read.
    fn traced_walk(
        &self,
        paging: GuestPaging,
        cr3: u64,
        linear: u64,
        trace: &mut Option<WalkTrace>,
    ) -> Result<GuestPhysAddr, GuestWalkError> {
        let Some(plan) = WalkPlan::of(paging, cr3, linear) else {
            return Ok(GuestPhysAddr::new_truncate(linear & 0xFFFF_FFFF));
        };
        if let Some(kept) = trace.as_mut() {
            kept.entry_size = plan.entry_size as u8;
        }
        self.walk(plan.table, plan.linear, plan.levels, plan.entry_size, trace)
    }

    /// Walks `levels` from the table at `table`, with entries of `entry_size` bytes, noting
    /// each entry read in `trace`.
    fn walk(
        &self,
        mut table: u64,
        linear: u64,
        levels: &[Level],
        entry_size: u64,
        trace: &mut Option<WalkTrace>,
    ) -> Result<GuestPhysAddr, GuestWalkError> {
        for level in levels {
            let index = (linear >> level.shift) & ((1 << level.index_bits) - 1);
            let (entry, at) = self.read_guest_entry(table + index * entry_size, entry_size)?;
            WalkTrace::note(trace, at, entry);
            if entry & PRESENT == 0 {
                return Err(GuestWalkError::NotPresent { level: level.number });
            }
            let offset_mask = (1u64 << level.shift) - 1;
            let last = level.number == 1;
            if last || (level.large_allowed && entry & PAGE_SIZE_BIT != 0) {
                let base = leaf_base(entry, entry_size, level.shift);
                return Ok(GuestPhysAddr::new_truncate(base | (linear & offset_mask)));
            }
            table = if entry_size == 4 {
                entry & 0xFFFF_F000
            } else {
                entry & ADDRESS_MASK_64
            };
        }
        // `levels` always ends with level 1, which returns above.
        Err(GuestWalkError::NotPresent { level: 1 })
    }

    /// Reads one paging entry of `size` bytes the way the guest's MMU would see it; also the
    /// host address it was read at, when its frame is stable (see [`WalkTrace`]).
    fn read_guest_entry(&self, at: u64, size: u64) -> Result<(u64, Option<HostPhysAddr>), GuestWalkError> {
        let gpa = self.a20_apply(GuestPhysAddr::new_truncate(at));
        let mut bytes = [0u8; 8];
        let frame = self
            .read_in_page(gpa, &mut bytes[..size as usize])
            .map_err(|_| GuestWalkError::TableOutsideMemory(gpa))?;
        let host = frame.map(|frame| frame.at_page_offset(gpa.page_offset()));
        Ok((u64::from_le_bytes(bytes), host))
    }
}

/// The little-endian 64-bit words of `bytes` (a page of 64-bit paging entries), in order; a
/// tail shorter than 8 bytes is left out.
pub fn entries_64(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .as_chunks::<8>()
        .0
        .iter()
        .map(|word| u64::from_le_bytes(*word))
}

/// True when the page `now` differs from `before` (both whole pages) only as a CPU walking
/// them as 64-bit paging entries would change them: in present entries whose accessed and
/// dirty flags `now` has set and `before` had clear, and in nothing else (equal pages too).
///
/// A migration's comparison uses it to tell such walker updates apart from lost writes on an
/// emulator whose walker sets those flags without an EPT write (Bochs 2.7: its walk
/// translates an entry's address for a read, then writes the flags to memory; on hardware the
/// update is an EPT write that dirty logging sees).
pub fn differs_only_in_walker_flags(now: &[u8], before: &[u8]) -> bool {
    now.len() == before.len()
        && entries_64(now).zip(entries_64(before)).all(|(now, before)| {
            let changed = now ^ before;
            let walker_set =
                now & PRESENT != 0 && changed & !(ACCESSED | DIRTY) == 0 && now & changed == changed;
            changed == 0 || walker_set
        })
}

/// The physical base of the page an entry at the level with `shift` maps.
fn leaf_base(entry: u64, entry_size: u64, shift: u32) -> u64 {
    let offset_mask = (1u64 << shift) - 1;
    if entry_size == 8 {
        return entry & ADDRESS_MASK_64 & !offset_mask;
    }
    if shift == 22 {
        // PSE-36: a 4 MiB entry keeps physical-address bits 39:32 in its bits 20:13.
        return (entry & 0xFFC0_0000) | (((entry >> 13) & 0xFF) << 32);
    }
    entry & 0xFFFF_F000
}

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
mod tests {
    use super::*;
    use crate::test_support::{gpa, pc_like};

    #[test]
    fn only_set_accessed_and_dirty_flags_of_present_entries_count_as_walker_updates() {
        let page = |entries: &[(usize, u64)]| {
            let mut bytes = alloc::vec![0u8; PAGE_SIZE as usize];
            for &(index, value) in entries {
                bytes[index * 8..index * 8 + 8].copy_from_slice(&value.to_le_bytes());
            }
            bytes
        };
        let before = page(&[(1, 0x20_0083), (26, 0x340_0083), (40, 0x1234)]);
        let walked = page(&[(1, 0x20_00A3), (26, 0x340_00E3), (40, 0x1234)]);
        assert!(differs_only_in_walker_flags(&walked, &before));
        assert!(differs_only_in_walker_flags(&before, &before));
        // A flag cleared, another bit changed, a flag in a non-present word, a byte anywhere
        // else: lost writes, not the walker's.
        assert!(!differs_only_in_walker_flags(&before, &walked));
        assert!(!differs_only_in_walker_flags(
            &page(&[(1, 0x20_00A7)]),
            &page(&[(1, 0x20_0083)])
        ));
        assert!(!differs_only_in_walker_flags(
            &page(&[(3, 0x60)]),
            &page(&[(3, 0)])
        ));
        assert!(!differs_only_in_walker_flags(&page(&[(40, 0x1235)]), &before));
        assert!(!differs_only_in_walker_flags(&walked[..8], &before));
    }

    const P: u64 = PRESENT | 0b10;

    fn put64(pgm: &mut crate::test_support::SimPgm, at: u64, value: u64) {
        pgm.write_phys_u64_bypassing_handlers(gpa(at), value).unwrap();
    }

    fn put32(pgm: &mut crate::test_support::SimPgm, at: u64, value: u32) {
        pgm.write_phys_u32_bypassing_handlers(gpa(at), value).unwrap();
    }

    #[test]
    fn paging_mode_follows_the_control_registers() {
        assert_eq!(GuestPaging::from_registers(0x11, 0, 0), GuestPaging::Off);
        assert_eq!(
            GuestPaging::from_registers(CR0_PG | 1, CR4_PSE, 0),
            GuestPaging::Bits32 { pse: true }
        );
        assert_eq!(
            GuestPaging::from_registers(CR0_PG | 1, CR4_PAE, 0),
            GuestPaging::Pae
        );
        assert_eq!(
            GuestPaging::from_registers(CR0_PG | 1, CR4_PAE, EFER_LMA | (1 << 8)),
            GuestPaging::Level4
        );
        assert_eq!(
            GuestPaging::from_registers(CR0_PG | 1, CR4_PAE | CR4_LA57, EFER_LMA | (1 << 8)),
            GuestPaging::Level5
        );
    }

    #[test]
    fn five_level_walk_starts_at_the_pml5() {
        let mut pgm = pc_like();
        let (pml5, pml4, pdpt, pd, pt) = (0x1000, 0x2000, 0x3000, 0x4000, 0x5000);
        // Linear 0xFF11_0000_0000_0000 + 0x5123: PML5 index 0x1F1 (bits 48..57), then 0s.
        let high = 0xFF11_0000_0000_0000u64;
        let pml5_index = (high >> 48) & 0x1FF;
        put64(&mut pgm, pml5 + pml5_index * 8, pml4 | P);
        put64(&mut pgm, pml4, pdpt | P);
        put64(&mut pgm, pdpt, pd | P);
        put64(&mut pgm, pd, pt | P);
        put64(&mut pgm, pt + 5 * 8, 0x7000 | P);
        let walk = |pgm: &crate::test_support::SimPgm, paging, linear| {
            pgm.guest_linear_to_phys(paging, pml5, linear)
        };
        assert_eq!(walk(&pgm, GuestPaging::Level5, high + 0x5123), Ok(gpa(0x7123)));
        assert_eq!(
            walk(&pgm, GuestPaging::Level5, 0x5123),
            Err(GuestWalkError::NotPresent { level: 5 })
        );
        // The same root read as a PML4 names other tables: the levels differ.
        assert_ne!(walk(&pgm, GuestPaging::Level4, high + 0x5123), Ok(gpa(0x7123)));
    }

    #[test]
    fn four_level_walk_handles_4k_2m_and_1g_pages() {
        let mut pgm = pc_like();
        let (pml4, pdpt, pd, pt) = (0x1000, 0x2000, 0x3000, 0x4000);
        // Linear 0xFFFF_8000_0000_0000 + ... : PML4 index 256.
        put64(&mut pgm, pml4 + 256 * 8, pdpt | P);
        put64(&mut pgm, pdpt, pd | P);
        put64(&mut pgm, pdpt + 8, 0x4000_0000 | P | PAGE_SIZE_BIT); // 1 GiB page
        put64(&mut pgm, pd, pt | P);
        put64(&mut pgm, pd + 8, 0x60_0000 | P | PAGE_SIZE_BIT); // 2 MiB page
        put64(&mut pgm, pt + 5 * 8, 0x7000 | P);
        let walk = |pgm: &crate::test_support::SimPgm, linear| {
            pgm.guest_linear_to_phys(GuestPaging::Level4, pml4, linear)
        };
        let high = 0xFFFF_8000_0000_0000;
        assert_eq!(walk(&pgm, high + 0x5123), Ok(gpa(0x7123)));
        assert_eq!(walk(&pgm, high + 0x20_0000 + 0x1_2345), Ok(gpa(0x61_2345)));
        assert_eq!(walk(&pgm, high + 0x4000_0000 + 0x123_4567), Ok(gpa(0x4123_4567)));
        assert_eq!(
            walk(&pgm, high + 0x6000),
            Err(GuestWalkError::NotPresent { level: 1 })
        );
        assert_eq!(walk(&pgm, 0x5123), Err(GuestWalkError::NotPresent { level: 4 }));
    }

    #[test]
    fn pae_walk_uses_the_four_entry_pdpt() {
        let mut pgm = pc_like();
        let (pdpt, pd, pt) = (0x1020, 0x3000, 0x4000);
        put64(&mut pgm, pdpt + 3 * 8, pd | PRESENT);
        put64(&mut pgm, pd + 2 * 8, 0x80_0000 | P | PAGE_SIZE_BIT);
        put64(&mut pgm, pd + 3 * 8, pt | P);
        put64(&mut pgm, pt + 8, 0x9000 | P);
        let walk = |linear| pgm.guest_linear_to_phys(GuestPaging::Pae, pdpt, linear);
        assert_eq!(walk(0xC040_0321), Ok(gpa(0x80_0321)));
        assert_eq!(walk(0xC060_1321), Ok(gpa(0x9321)));
        assert_eq!(walk(0x4000_0000), Err(GuestWalkError::NotPresent { level: 3 }));
    }

    #[test]
    fn thirty_two_bit_walk_honours_pse() {
        let mut pgm = pc_like();
        let (pd, pt) = (0x2000, 0x3000);
        put32(&mut pgm, pd + 4, 0x0040_0000 | P as u32 | PAGE_SIZE_BIT as u32);
        put32(&mut pgm, pd + 8, pt as u32 | P as u32);
        put32(&mut pgm, pt + 4, 0x5000 | P as u32);
        let with_pse = pgm.guest_linear_to_phys(GuestPaging::Bits32 { pse: true }, pd, 0x0041_2345);
        assert_eq!(with_pse, Ok(gpa(0x41_2345)));
        // Without CR4.PSE the PS bit is ignored and the entry names a page table.
        let without = pgm.guest_linear_to_phys(GuestPaging::Bits32 { pse: false }, pd, 0x0080_1ABC);
        assert_eq!(without, Ok(gpa(0x5ABC)));
    }

    #[test]
    fn tables_outside_memory_are_an_error_and_paging_off_is_identity() {
        let pgm = pc_like();
        let outside = 0xFFF0_0000;
        assert_eq!(
            pgm.guest_linear_to_phys(GuestPaging::Level4, outside, 0),
            Err(GuestWalkError::TableOutsideMemory(gpa(outside)))
        );
        assert_eq!(
            pgm.guest_linear_to_phys(GuestPaging::Off, 0, 0x1_0000_1234),
            Ok(gpa(0x1234))
        );
    }

    /// Long-mode tables at 0x1000..0x4FFF mapping linear 0x40_5000 to the code at `code`.
    fn code_tables(pgm: &mut crate::test_support::SimPgm, code: u64) -> u64 {
        let (pml4, pdpt, pd, pt) = (0x1000, 0x2000, 0x3000, 0x4000);
        put64(pgm, pml4, pdpt | P);
        put64(pgm, pdpt, pd | P);
        put64(pgm, pd + 2 * 8, pt | P);
        put64(pgm, pt + 5 * 8, code | P);
        pml4
    }

    const CODE_LINEAR: u64 = 0x40_5000;

    fn read_code(
        pgm: &crate::test_support::SimPgm,
        cr3: u64,
        linear: u64,
        cache: &mut Option<CodeTranslation>,
        epoch: u64,
    ) -> ([u8; 4], CodeRead) {
        let mut bytes = [0u8; 4];
        let read = pgm
            .read_code(GuestPaging::Level4, cr3, linear, &mut bytes, cache, epoch)
            .unwrap();
        (bytes, read)
    }

    #[test]
    fn code_translation_is_reused_until_the_guest_changes_an_entry() {
        let mut pgm = pc_like();
        let cr3 = code_tables(&mut pgm, 0x7000);
        put32(&mut pgm, 0x7010, 0x1111_1111);
        put32(&mut pgm, 0x8010, 0x2222_2222);
        let mut cache = None;
        let (bytes, first) = read_code(&pgm, cr3, CODE_LINEAR + 0x10, &mut cache, 0);
        assert_eq!((bytes, first.gpa, first.reused), ([0x11; 4], gpa(0x7010), false));
        let (bytes, again) = read_code(&pgm, cr3, CODE_LINEAR + 0x10, &mut cache, 0);
        assert_eq!((bytes, again.gpa, again.reused), ([0x11; 4], gpa(0x7010), true));
        // The CPU setting accessed and dirty bits changes nothing.
        put64(&mut pgm, 0x3000 + 2 * 8, 0x4000 | P | ACCESSED_DIRTY);
        assert!(read_code(&pgm, cr3, CODE_LINEAR + 0x10, &mut cache, 0).1.reused);
        // The guest maps the linear page elsewhere, with no exit in between: the next fetch
        // sees it (a cache that skipped the check would return the old bytes).
        put64(&mut pgm, 0x4000 + 5 * 8, 0x8000 | P);
        let (bytes, moved) = read_code(&pgm, cr3, CODE_LINEAR + 0x10, &mut cache, 0);
        assert_eq!((bytes, moved.gpa, moved.reused), ([0x22; 4], gpa(0x8010), false));
        assert!(read_code(&pgm, cr3, CODE_LINEAR + 0x10, &mut cache, 0).1.reused);
    }

    #[test]
    fn code_translation_is_for_one_page_cr3_and_epoch() {
        let mut pgm = pc_like();
        let cr3 = code_tables(&mut pgm, 0x7000);
        put64(&mut pgm, 0x4000 + 6 * 8, 0x9000 | P);
        put32(&mut pgm, 0x9000, 0x3333_3333);
        let mut cache = None;
        read_code(&pgm, cr3, CODE_LINEAR, &mut cache, 0);
        let (bytes, next_page) = read_code(&pgm, cr3, CODE_LINEAR + 0x1000, &mut cache, 0);
        assert_eq!((bytes, next_page.reused), ([0x33; 4], false));
        assert!(read_code(&pgm, cr3, CODE_LINEAR + 0x1000, &mut cache, 0).1.reused);
        // An exclusive change of the manager may have moved any frame: walk again.
        assert!(!read_code(&pgm, cr3, CODE_LINEAR + 0x1000, &mut cache, 1).1.reused);
        // Another address space over the same tables below its PML4.
        put64(&mut pgm, 0x5000, 0x2000 | P);
        let (bytes, other_cr3) = read_code(&pgm, 0x5000, CODE_LINEAR + 0x1000, &mut cache, 1);
        assert_eq!((bytes, other_cr3.reused), ([0x33; 4], false));
    }

    #[test]
    fn code_translation_is_not_kept_for_pages_whose_frame_a_write_replaces() {
        let mut pgm = pc_like();
        // The code page was never written: it is a ZERO page, whose first write gives it a
        // frame of its own, so the zero frame must not be remembered.
        let cr3 = code_tables(&mut pgm, 0x7000);
        let mut cache = None;
        let (bytes, read) = read_code(&pgm, cr3, CODE_LINEAR, &mut cache, 0);
        assert_eq!((bytes, read.reused, cache), ([0; 4], false, None));
        // The same under paging off, with no entries at all.
        let mut bytes = [0u8; 2];
        pgm.read_code(GuestPaging::Off, 0, 0x6000, &mut bytes, &mut cache, 0)
            .unwrap();
        assert_eq!(cache, None);
        put32(&mut pgm, 0x6000, 0x4444_4444);
        let mut off = |cache: &mut Option<CodeTranslation>| {
            pgm.read_code(GuestPaging::Off, 0, 0x6000, &mut bytes, cache, 0)
                .unwrap()
                .reused
        };
        assert!(!off(&mut cache));
        assert!(off(&mut cache));
    }

    #[test]
    fn code_reads_stop_at_the_page_end_and_name_code_outside_memory() {
        let mut pgm = pc_like();
        let cr3 = code_tables(&mut pgm, 0x7000);
        put32(&mut pgm, 0x7FFC, 0x5555_5555);
        let mut bytes = [0u8; 15];
        let read = pgm
            .read_code(
                GuestPaging::Level4,
                cr3,
                CODE_LINEAR + 0xFFE,
                &mut bytes,
                &mut None,
                0,
            )
            .unwrap();
        assert_eq!((read.len, &bytes[..3]), (2, &[0x55, 0x55, 0][..]));
        put64(&mut pgm, 0x4000 + 5 * 8, 0xFFF0_0000 | P);
        assert_eq!(
            pgm.read_code(GuestPaging::Level4, cr3, CODE_LINEAR, &mut bytes, &mut None, 0),
            Err(GuestWalkError::CodeOutsideMemory(gpa(0xFFF0_0000)))
        );
    }

    /// Long-mode tables mapping linear 0x40_5000 to 0x7000 with `leaf` rights (and every upper
    /// level writable and user): the PML4 at 0x1000.
    fn data_tables(pgm: &mut crate::test_support::SimPgm, leaf: u64) -> u64 {
        let (pml4, pdpt, pd, pt) = (0x1000, 0x2000, 0x3000, 0x4000);
        put64(pgm, pml4, pdpt | P | USER);
        put64(pgm, pdpt, pd | P | USER);
        put64(pgm, pd + 2 * 8, pt | P | USER);
        put64(pgm, pt + 5 * 8, 0x7000 | PRESENT | leaf);
        pml4
    }

    #[test]
    fn a_checked_walk_refuses_what_the_entries_refuse() {
        let mut pgm = pc_like();
        let access = |write, user, write_protect| GuestAccess {
            write,
            user,
            write_protect,
        };
        let translate = |pgm: &crate::test_support::SimPgm, cr3, access| {
            pgm.guest_translate_access(GuestPaging::Level4, cr3, 0x40_5123, access)
                .map(|(gpa, _)| gpa)
        };
        let read_only_supervisor = data_tables(&mut pgm, 0);
        assert_eq!(
            translate(&pgm, read_only_supervisor, access(false, false, true)),
            Ok(gpa(0x7123))
        );
        assert_eq!(
            translate(&pgm, read_only_supervisor, access(false, true, true)),
            Err(GuestWalkError::Protection),
            "a user read of a supervisor page"
        );
        assert_eq!(
            translate(&pgm, read_only_supervisor, access(true, false, true)),
            Err(GuestWalkError::Protection),
            "a supervisor write to a read-only page under CR0.WP"
        );
        assert_eq!(
            translate(&pgm, read_only_supervisor, access(true, false, false)),
            Ok(gpa(0x7123)),
            "without CR0.WP the supervisor writes anyway"
        );
        let user_writable = data_tables(&mut pgm, WRITABLE | USER);
        assert_eq!(
            translate(&pgm, user_writable, access(true, true, true)),
            Ok(gpa(0x7123))
        );
        // A read-only upper level makes the whole walk read-only.
        put64(&mut pgm, 0x3000 + 2 * 8, 0x4000 | PRESENT | USER);
        assert_eq!(
            translate(&pgm, user_writable, access(true, true, true)),
            Err(GuestWalkError::Protection)
        );
        assert_eq!(
            translate(&pgm, user_writable, access(false, true, true)).map(|_| ()),
            Ok(()),
        );
        assert_eq!(
            pgm.guest_translate_access(
                GuestPaging::Level4,
                user_writable,
                0x80_0000,
                access(false, false, false)
            ),
            Err(GuestWalkError::NotPresent { level: 2 })
        );
    }

    #[test]
    fn a_checked_walk_sets_accessed_bits_and_dirty_for_a_write() {
        let mut pgm = pc_like();
        let cr3 = data_tables(&mut pgm, WRITABLE);
        let write = GuestAccess {
            write: true,
            ..GuestAccess::default()
        };
        let (_, updates) = pgm
            .guest_translate_access(GuestPaging::Level4, cr3, 0x40_5000, write)
            .unwrap();
        assert!(!updates.is_empty());
        pgm.set_accessed_dirty(&updates).unwrap();
        for entry in [0x1000, 0x2000, 0x3000 + 2 * 8] {
            assert_eq!(
                pgm.read_phys_u64_bypassing_handlers(gpa(entry)).unwrap() & (ACCESSED | DIRTY),
                ACCESSED,
                "{entry:#x}"
            );
        }
        assert_eq!(
            pgm.read_phys_u64_bypassing_handlers(gpa(0x4000 + 5 * 8)).unwrap() & (ACCESSED | DIRTY),
            ACCESSED | DIRTY
        );
        // Nothing left to set: the next walk asks for nothing.
        let (_, again) = pgm
            .guest_translate_access(GuestPaging::Level4, cr3, 0x40_5000, write)
            .unwrap();
        assert!(again.is_empty());
    }
}
