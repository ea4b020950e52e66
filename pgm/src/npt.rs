//! AMD nested paging (NPT) entry encoding: the AMD64 long-mode page-table format (AMD APM
//! vol. 2, 5.3.3 and 15.25), which the CPU walks from nCR3 for every guest-physical access.
//! The only module that knows NPT's bit layout, as `ept` is for Intel's.
//!
//! How [`Permissions`] map: READ is the present bit, WRITE is R/W, and EXECUTE is the absence
//! of NX. US is set in every entry, since the CPU walks nested tables as user accesses (a
//! supervisor-only nested entry faults every guest access). What NPT cannot express:
//! - **execute-only**: a present entry is readable. The manager never asks for it (every leaf
//!   it builds grants READ); a leaf without READ is encoded not present, granting less rather
//!   than more.
//! - **write-back regardless of the guest's PAT**: EPT's ignore-PAT bit has no counterpart, so
//!   the guest's caching combines with the leaf's (the stronger wins). The leaf's own type
//!   comes from the host PAT through PWT/PCD: index 0 (write-back) for RAM, index 3
//!   (uncacheable) for device memory, as the host's PAT is programmed at reset.
//! - **accessed and dirty flags are always on**: the CPU sets them in nested entries whether
//!   or not anyone reads them, so [`EntryFormat::CPU_WRITE_LOG`] is false only for want of a
//!   log, not of flags.
//!
//! Write monitoring withholds writes through R/W in the entries above the leaves exactly as
//! with EPT; the marks live in bits 52–54, which the CPU ignores in every long-mode entry
//! (and every bit but P of a not-present one).

use crate::addr::{HostPhysAddr, HOST_PHYS_BITS};
use crate::paging::{Entry, EntryFormat, Leaf, MemoryType, Permissions, WithheldWriteBits};

/// Bit 0: present (the page is readable).
const PRESENT: u64 = 1 << 0;
/// Bit 1: read/write.
const WRITE: u64 = 1 << 1;
/// Bit 2: user/supervisor; set everywhere (nested walks are user accesses).
const USER: u64 = 1 << 2;
/// Bit 3: page-level write-through (PAT index bit 0).
const WRITE_THROUGH: u64 = 1 << 3;
/// Bit 4: page-level cache disable (PAT index bit 1).
const CACHE_DISABLE: u64 = 1 << 4;
/// Bit 6 of a leaf: dirty, set by the CPU at the first write through it.
const DIRTY: u64 = 1 << 6;
/// Bit 7 of a PDE/PDPTE: the entry maps a 2 MiB / 1 GiB page.
const LARGE_PAGE: u64 = 1 << 7;
/// Bit 63: no execute.
const NO_EXECUTE: u64 = 1 << 63;
/// Bit 52, available to software: writes withheld for write monitoring (as in `ept`).
const WRITE_WITHHELD: u64 = 1 << 52;
/// Bit 53 of a not-present page-directory entry: the block awaits its page table (as in `ept`).
const AWAITING_TABLES: u64 = 1 << 53;
/// Bit 54, available to software: the R/W bit [`WRITE_WITHHELD`] took, to give back.
const WRITE_TAKEN: u64 = 1 << 54;
/// Write monitoring's marks in NPT entries.
const WITHHELD_WRITE_BITS: WithheldWriteBits = WithheldWriteBits {
    write: WRITE,
    withheld: WRITE_WITHHELD,
    taken: WRITE_TAKEN,
};
/// Bits 12..=51: the physical address.
const ADDRESS_MASK: u64 = ((1 << HOST_PHYS_BITS) - 1) & !0xFFF;

/// The AMD NPT format.
#[derive(Debug)]
pub struct Npt;

/// The permission bits of `permissions`, US included; 0 (not present) without READ.
fn permission_bits(permissions: Permissions) -> u64 {
    if !permissions.contains(Permissions::READ) {
        return 0;
    }
    let write = if permissions.contains(Permissions::WRITE) {
        WRITE
    } else {
        0
    };
    let no_execute = if permissions.contains(Permissions::EXECUTE) {
        0
    } else {
        NO_EXECUTE
    };
    PRESENT | USER | write | no_execute
}

/// What the entry `raw` grants, by its present, R/W and NX bits.
fn permissions_of(raw: u64) -> Permissions {
    if raw & PRESENT == 0 {
        return Permissions::empty();
    }
    let mut permissions = Permissions::READ;
    permissions.set(Permissions::WRITE, raw & WRITE != 0);
    permissions.set(Permissions::EXECUTE, raw & NO_EXECUTE == 0);
    permissions
}

impl EntryFormat for Npt {
    const CPU_WRITE_LOG: bool = false;

    fn encode_table(table: HostPhysAddr) -> u64 {
        table.as_u64() | PRESENT | WRITE | USER
    }

    fn encode_leaf(leaf: &Leaf) -> u64 {
        let bits = permission_bits(leaf.permissions);
        if bits == 0 {
            return 0;
        }
        let caching = match leaf.memory_type {
            MemoryType::WriteBack => 0,
            MemoryType::Uncacheable => WRITE_THROUGH | CACHE_DISABLE,
        };
        leaf.frame.as_u64() | bits | caching
    }

    fn encode_large_leaf(leaf: &Leaf) -> u64 {
        match Self::encode_leaf(leaf) {
            0 => 0,
            raw => raw | LARGE_PAGE,
        }
    }

    fn decode(raw: u64, level: usize) -> Entry {
        let permissions = permissions_of(raw);
        if permissions.is_empty() {
            return Entry::Absent;
        }
        let address = HostPhysAddr::new_truncate(raw & ADDRESS_MASK);
        if level > 0 && raw & LARGE_PAGE == 0 {
            return Entry::Table(address);
        }
        let memory_type = if raw & CACHE_DISABLE != 0 {
            MemoryType::Uncacheable
        } else {
            MemoryType::WriteBack
        };
        Entry::Leaf(Leaf {
            frame: address,
            permissions,
            memory_type,
        })
    }

    fn table_permissions(raw: u64) -> Permissions {
        permissions_of(raw)
    }

    fn without_dirty(raw: u64) -> u64 {
        raw & !DIRTY
    }

    fn is_dirty(raw: u64) -> bool {
        raw & DIRTY != 0
    }

    fn withhold_write(raw: u64) -> u64 {
        WITHHELD_WRITE_BITS.withhold(raw)
    }

    fn restore_write(raw: u64) -> u64 {
        WITHHELD_WRITE_BITS.restore(raw)
    }

    fn awaiting_tables() -> u64 {
        AWAITING_TABLES
    }

    fn awaits_tables(raw: u64) -> bool {
        raw & PRESENT == 0 && raw & AWAITING_TABLES != 0
    }

    fn writes_withheld(raw: u64) -> bool {
        raw & WRITE_WITHHELD != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::hpa;

    fn leaf(permissions: Permissions, memory_type: MemoryType) -> Leaf {
        Leaf {
            frame: hpa(0x1234_5000),
            permissions,
            memory_type,
        }
    }

    #[test]
    fn leaf_encoding_matches_the_amd64_page_table_format() {
        let ram = leaf(Permissions::READ | Permissions::EXECUTE, MemoryType::WriteBack);
        // P=1, US=4, no R/W, NX clear, PAT index 0.
        assert_eq!(Npt::encode_leaf(&ram), 0x1234_5000 | 0b101);
        assert_eq!(Npt::decode(Npt::encode_leaf(&ram), 0), Entry::Leaf(ram));
        let device = leaf(Permissions::all(), MemoryType::Uncacheable);
        assert_eq!(
            Npt::encode_leaf(&device),
            0x1234_5000 | 0b1_1111,
            "PWT and PCD: PAT index 3"
        );
        assert_eq!(Npt::decode(Npt::encode_leaf(&device), 0), Entry::Leaf(device));
        let data = leaf(Permissions::READ | Permissions::WRITE, MemoryType::WriteBack);
        assert_eq!(Npt::encode_leaf(&data), 0x1234_5000 | 0b111 | NO_EXECUTE);
        assert_eq!(Npt::decode(Npt::encode_leaf(&data), 0), Entry::Leaf(data));
    }

    #[test]
    fn execute_only_cannot_be_expressed_and_is_not_granted_more() {
        let execute_only = leaf(Permissions::EXECUTE, MemoryType::WriteBack);
        assert_eq!(
            Npt::encode_leaf(&execute_only),
            0,
            "not present: less, never more"
        );
        assert_eq!(Npt::encode_large_leaf(&execute_only), 0);
    }

    #[test]
    fn tables_absent_and_large_entries_decode() {
        assert_eq!(Npt::encode_table(hpa(0x7000)), 0x7007);
        assert_eq!(Npt::decode(0x7007, 3), Entry::Table(hpa(0x7000)));
        assert_eq!(Npt::decode(0x7006, 3), Entry::Absent, "P clear means not present");
        assert_eq!(Npt::table_permissions(0x7007), Permissions::all());
        let large = Npt::decode(0x20_0000 | 0b111 | LARGE_PAGE, 1);
        assert!(matches!(large, Entry::Leaf(leaf) if leaf.frame == hpa(0x20_0000)));
        assert_eq!(
            Npt::decode(0x20_0000 | 0b111 | LARGE_PAGE, 0),
            Npt::decode(0x20_0000 | 0b111, 0),
            "bit 7 of a page-table entry is PAT, not a size"
        );
    }

    #[test]
    fn a_block_awaiting_tables_is_not_present_and_carries_withheld_writes() {
        let marker = Npt::awaiting_tables();
        assert_eq!(marker & PRESENT, 0, "the CPU sees no entry");
        assert_eq!(Npt::decode(marker, 1), Entry::Absent);
        assert!(Npt::awaits_tables(marker) && !Npt::awaits_tables(0));
        let withheld = Npt::withhold_write(marker);
        assert!(Npt::writes_withheld(withheld) && Npt::awaits_tables(withheld));
        assert_eq!(withheld & PRESENT, 0, "withholding grants nothing");
        assert_eq!(Npt::restore_write(withheld), marker);
        let table = Npt::encode_table(hpa(0x7000));
        assert!(!Npt::awaits_tables(table) && !Npt::awaits_tables(Npt::withhold_write(table)));
    }

    #[test]
    fn withholding_writes_clears_rw_and_restores_only_what_it_took() {
        let writable = Npt::encode_large_leaf(&leaf(Permissions::all(), MemoryType::WriteBack));
        let withheld = Npt::withhold_write(writable);
        assert!(Npt::writes_withheld(withheld) && withheld & WRITE == 0);
        assert_eq!(
            Npt::table_permissions(withheld),
            Permissions::READ | Permissions::EXECUTE
        );
        assert_eq!(Npt::withhold_write(withheld), withheld);
        assert_eq!(Npt::restore_write(withheld), writable);
        let read_only = Npt::encode_large_leaf(&leaf(
            Permissions::READ | Permissions::EXECUTE,
            MemoryType::WriteBack,
        ));
        let marked = Npt::withhold_write(read_only);
        assert!(Npt::writes_withheld(marked));
        assert_eq!(
            Npt::restore_write(marked),
            read_only,
            "no write permission appears"
        );
    }

    #[test]
    fn the_dirty_flag_is_bit_six() {
        let raw = Npt::encode_leaf(&leaf(Permissions::all(), MemoryType::WriteBack)) | DIRTY;
        assert!(Npt::is_dirty(raw) && !Npt::is_dirty(Npt::without_dirty(raw)));
        assert_eq!(Npt::decode(raw, 0), Npt::decode(Npt::without_dirty(raw), 0));
    }
}
