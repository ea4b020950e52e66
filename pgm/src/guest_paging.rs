//! The guest's own paging: how the guest's MMU turns a guest-linear address into a
//! guest-physical one. The VMM needs it to fetch the instruction behind an exit it emulates
//! (the CPU reports the faulting data address as guest-physical, but RIP is linear).
//!
//! The walk reads the guest's paging structures through the A20 gate, as the guest's MMU
//! would, and never sets accessed or dirty bits: it is a lookup, not an access.

use crate::addr::GuestPhysAddr;
use crate::frames::{HostFrameAllocator, HostMemory};
use crate::manager::Pgm;

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1 << 0;
const PAGE_SIZE_BIT: u64 = 1 << 7;
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
}

impl GuestPaging {
    /// The paging mode the guest's CR0, CR4 and IA32_EFER select.
    pub fn from_registers(cr0: u64, cr4: u64, efer: u64) -> GuestPaging {
        if cr0 & CR0_PG == 0 {
            GuestPaging::Off
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
}

/// One level of a walk: where its index sits in the linear address and how wide it is.
struct Level {
    number: u8,
    shift: u32,
    index_bits: u32,
    /// A page-size bit here maps a large page.
    large_allowed: bool,
}

impl<A: HostFrameAllocator, M: HostMemory> Pgm<A, M> {
    /// Translates the guest-linear address `linear` through the guest's paging structures
    /// rooted at `cr3`, as the guest's MMU would. Reads guest memory only; changes nothing.
    pub fn guest_linear_to_phys(
        &self,
        paging: GuestPaging,
        cr3: u64,
        linear: u64,
    ) -> Result<GuestPhysAddr, GuestWalkError> {
        let level = |number, shift, index_bits, large_allowed| Level {
            number,
            shift,
            index_bits,
            large_allowed,
        };
        match paging {
            GuestPaging::Off => Ok(GuestPhysAddr::new_truncate(linear & 0xFFFF_FFFF)),
            GuestPaging::Bits32 { pse } => self.walk(
                cr3 & 0xFFFF_F000,
                linear & 0xFFFF_FFFF,
                &[level(2, 22, 10, pse), level(1, 12, 10, false)],
                4,
            ),
            GuestPaging::Pae => self.walk(
                cr3 & 0xFFFF_FFE0,
                linear & 0xFFFF_FFFF,
                &[
                    level(3, 30, 2, false),
                    level(2, 21, 9, true),
                    level(1, 12, 9, false),
                ],
                8,
            ),
            GuestPaging::Level4 => self.walk(
                cr3 & ADDRESS_MASK_64,
                linear,
                &[
                    level(4, 39, 9, false),
                    level(3, 30, 9, true),
                    level(2, 21, 9, true),
                    level(1, 12, 9, false),
                ],
                8,
            ),
        }
    }

    /// Walks `levels` from the table at `table`, with entries of `entry_size` bytes.
    fn walk(
        &self,
        mut table: u64,
        linear: u64,
        levels: &[Level],
        entry_size: u64,
    ) -> Result<GuestPhysAddr, GuestWalkError> {
        for level in levels {
            let index = (linear >> level.shift) & ((1 << level.index_bits) - 1);
            let entry = self.read_guest_entry(table + index * entry_size, entry_size)?;
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

    /// Reads one paging entry of `size` bytes the way the guest's MMU would see it.
    fn read_guest_entry(&self, at: u64, size: u64) -> Result<u64, GuestWalkError> {
        let gpa = self.a20_apply(GuestPhysAddr::new_truncate(at));
        let mut bytes = [0u8; 8];
        self.read_phys(gpa, &mut bytes[..size as usize])
            .map_err(|_| GuestWalkError::TableOutsideMemory(gpa))?;
        Ok(u64::from_le_bytes(bytes))
    }
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
mod tests {
    use super::*;
    use crate::test_support::{gpa, pc_like};

    const P: u64 = PRESENT | 0b10;

    fn put64(pgm: &mut crate::test_support::SimPgm, at: u64, value: u64) {
        pgm.write_phys_u64(gpa(at), value).unwrap();
    }

    fn put32(pgm: &mut crate::test_support::SimPgm, at: u64, value: u32) {
        pgm.write_phys_u32(gpa(at), value).unwrap();
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
}
