//! Intel EPT entry encoding (SDM Vol. 3C, 29.3.2) and the EPT pointer. The only module that knows
//! EPT's bit layout; the tables themselves are format-independent ([`crate::paging`]).

use crate::addr::{HostPhysAddr, HOST_PHYS_BITS};
use crate::paging::{Entry, EntryFormat, Leaf, MemoryType, Permissions, WithheldWriteBits};

/// Bits 0..=2: read, write, execute (for supervisor-mode linear addresses).
const PERMISSION_BITS: u64 = 0b111;
/// Bit 1: write.
const WRITE: u64 = 1 << 1;
/// Bits 3..=5 of a leaf: the EPT memory type.
const MEMORY_TYPE_SHIFT: u32 = 3;
/// Bit 6 of a leaf: ignore the guest PAT, so the EPT memory type alone decides caching.
const IGNORE_PAT: u64 = 1 << 6;
/// Bit 7 of a PDE/PDPTE: the entry maps a 2 MiB / 1 GiB page.
const LARGE_PAGE: u64 = 1 << 7;
/// Bit 9 of a leaf: dirty, set by the CPU on a write when the EPT pointer enables accessed
/// and dirty flags (and, with PML on, the write's address logged).
const DIRTY: u64 = 1 << 9;
/// Bit 52, ignored by the CPU in every EPT entry: write monitoring withholds writes here (see
/// `manager::lazy_protection`): the pages below are protected until the protection is pushed
/// down. Set on every present entry (and awaiting-tables marker) monitoring arms, whether the
/// entry granted writes or not, so a read-only 2 MiB leaf keeps its pages pending too.
const WRITE_WITHHELD: u64 = 1 << 52;
/// Bit 54, ignored by the CPU: the write permission bit 1 granted was taken by
/// [`WRITE_WITHHELD`], and comes back with it. Tells a withheld permission from one the entry
/// never granted.
const WRITE_TAKEN: u64 = 1 << 54;
/// Bit 53 of a not-present page-directory entry (bits 0..=2 clear, so the CPU ignores every
/// other bit, SDM 29.3.2): the 2 MiB block it covers was unmapped for want of a page table and
/// is mapped again from its descriptors at its next access. Such an entry withholds writes
/// (bit 52) as a present one would, so write monitoring's pending protection survives it.
const AWAITING_TABLES: u64 = 1 << 53;
/// Write monitoring's marks in EPT entries.
const WITHHELD_WRITE_BITS: WithheldWriteBits = WithheldWriteBits {
    write: WRITE,
    withheld: WRITE_WITHHELD,
    taken: WRITE_TAKEN,
};
/// Bits 12..=51: the physical address.
const ADDRESS_MASK: u64 = ((1 << HOST_PHYS_BITS) - 1) & !0xFFF;

/// EPT memory-type encodings (also used in the EPT pointer).
const UNCACHEABLE: u64 = 0;
const WRITE_BACK: u64 = 6;

/// The Intel EPT format.
#[derive(Debug)]
pub struct Ept;

impl EntryFormat for Ept {
    const CPU_WRITE_LOG: bool = true;

    fn encode_table(table: HostPhysAddr) -> u64 {
        table.as_u64() | PERMISSION_BITS
    }

    fn encode_leaf(leaf: &Leaf) -> u64 {
        let memory_type = match leaf.memory_type {
            MemoryType::Uncacheable => UNCACHEABLE,
            MemoryType::WriteBack => WRITE_BACK,
        };
        leaf.frame.as_u64()
            | u64::from(leaf.permissions.bits())
            | (memory_type << MEMORY_TYPE_SHIFT)
            | IGNORE_PAT
    }

    fn encode_large_leaf(leaf: &Leaf) -> u64 {
        Self::encode_leaf(leaf) | LARGE_PAGE
    }

    fn decode(raw: u64, level: usize) -> Entry {
        let permissions = Permissions::from_bits_truncate((raw & PERMISSION_BITS) as u8);
        if permissions.is_empty() {
            return Entry::Absent;
        }
        let address = HostPhysAddr::new_truncate(raw & ADDRESS_MASK);
        if level > 0 && raw & LARGE_PAGE == 0 {
            return Entry::Table(address);
        }
        let memory_type = match (raw >> MEMORY_TYPE_SHIFT) & 0b111 {
            WRITE_BACK => MemoryType::WriteBack,
            _ => MemoryType::Uncacheable,
        };
        Entry::Leaf(Leaf {
            frame: address,
            permissions,
            memory_type,
        })
    }

    fn table_permissions(raw: u64) -> Permissions {
        Permissions::from_bits_truncate((raw & PERMISSION_BITS) as u8)
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
        raw & PERMISSION_BITS == 0 && raw & AWAITING_TABLES != 0
    }

    fn writes_withheld(raw: u64) -> bool {
        raw & WRITE_WITHHELD != 0
    }
}

/// Bits 3..=5 of the EPT pointer: page-walk length minus one (4 levels).
const EPTP_WALK_LENGTH_4: u64 = 3 << 3;
/// Bit 6 of the EPT pointer: the CPU sets accessed/dirty flags in EPT entries.
const EPTP_ACCESSED_DIRTY: u64 = 1 << 6;

/// The VMCS EPT-pointer value for tables rooted at `root`: write-back paging structures,
/// 4-level walk, accessed/dirty flags on when `accessed_dirty` (the CPU must support them).
pub fn pointer(root: HostPhysAddr, accessed_dirty: bool) -> u64 {
    let ad = if accessed_dirty { EPTP_ACCESSED_DIRTY } else { 0 };
    root.as_u64() | WRITE_BACK | EPTP_WALK_LENGTH_4 | ad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::hpa;

    #[test]
    fn leaf_encoding_matches_the_sdm() {
        let leaf = Leaf {
            frame: hpa(0x1234_5000),
            permissions: Permissions::READ | Permissions::EXECUTE,
            memory_type: MemoryType::WriteBack,
        };
        // R=1, X=4, WB=6<<3, ignore-PAT=1<<6.
        assert_eq!(Ept::encode_leaf(&leaf), 0x1234_5000 | 0b101 | (6 << 3) | (1 << 6));
        assert_eq!(Ept::decode(Ept::encode_leaf(&leaf), 0), Entry::Leaf(leaf));
        let mmio = Leaf {
            memory_type: MemoryType::Uncacheable,
            permissions: Permissions::all(),
            ..leaf
        };
        assert_eq!(Ept::encode_leaf(&mmio) & 0x3F, 0b111);
    }

    #[test]
    fn tables_absent_and_large_entries_decode() {
        assert_eq!(Ept::encode_table(hpa(0x7000)), 0x7007);
        assert_eq!(Ept::decode(0x7007, 3), Entry::Table(hpa(0x7000)));
        assert_eq!(
            Ept::decode(0x7000, 3),
            Entry::Absent,
            "no permission bit means not present"
        );
        let large = Ept::decode(0x20_0000 | 0b111 | (6 << 3) | LARGE_PAGE, 1);
        assert!(matches!(large, Entry::Leaf(leaf) if leaf.frame == hpa(0x20_0000)));
    }

    #[test]
    fn a_block_awaiting_tables_is_not_present_and_carries_withheld_writes() {
        let marker = Ept::awaiting_tables();
        assert_eq!(marker & PERMISSION_BITS, 0, "the CPU sees no entry");
        assert_eq!(Ept::decode(marker, 1), Entry::Absent);
        assert!(Ept::awaits_tables(marker) && !Ept::awaits_tables(0));
        assert!(!Ept::writes_withheld(marker));
        let withheld = Ept::withhold_write(marker);
        assert!(Ept::writes_withheld(withheld) && Ept::awaits_tables(withheld));
        assert_eq!(withheld & PERMISSION_BITS, 0, "withholding grants nothing");
        assert_eq!(
            Ept::restore_write(withheld),
            marker,
            "and restoring grants nothing either"
        );
        let table = Ept::encode_table(hpa(0x7000));
        assert!(!Ept::awaits_tables(table) && !Ept::awaits_tables(Ept::withhold_write(table)));
    }

    #[test]
    fn withholding_writes_marks_every_entry_and_restores_only_what_it_took() {
        let leaf = |permissions| Leaf {
            frame: hpa(0x20_0000),
            permissions,
            memory_type: MemoryType::WriteBack,
        };
        let writable = Ept::encode_large_leaf(&leaf(Permissions::all()));
        let withheld = Ept::withhold_write(writable);
        assert!(Ept::writes_withheld(withheld) && withheld & WRITE == 0);
        assert_eq!(
            Ept::withhold_write(withheld),
            withheld,
            "withholding twice changes nothing"
        );
        assert_eq!(Ept::restore_write(withheld), writable);
        // A read-only leaf (the zero chunk) is marked too: its pages are pending as well.
        let read_only = Ept::encode_large_leaf(&leaf(Permissions::READ | Permissions::EXECUTE));
        let marked = Ept::withhold_write(read_only);
        assert!(Ept::writes_withheld(marked));
        assert_eq!(
            Ept::restore_write(marked),
            read_only,
            "no write permission appears"
        );
        assert_eq!(Ept::restore_write(read_only), read_only);
    }

    #[test]
    fn ept_pointer_fields() {
        assert_eq!(pointer(hpa(0x5000), false), 0x5000 | 6 | (3 << 3));
        assert_eq!(pointer(hpa(0x5000), true), 0x5000 | 6 | (3 << 3) | (1 << 6));
    }
}
