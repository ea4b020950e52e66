//! The VM's guest-physical layout as a loader sees it, and what a loader asks the caller to
//! write: shared by the Multiboot and Linux loaders.

/// What a range of the VM's guest-physical space is, for the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeKind {
    /// RAM the kernel may use (map type 1).
    Available,
    /// Present but not for the kernel (ROM, firmware tables: map type 2).
    Reserved,
}

/// One range of the VM's layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRange {
    /// First guest-physical address.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
    /// What it is.
    pub kind: RangeKind,
}

impl MemoryRange {
    /// The first address after the range.
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }
}

/// Bytes to put at a guest-physical address, followed by `zeros` zero bytes (a segment's BSS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement<'a> {
    /// Where.
    pub gpa: u64,
    /// The bytes.
    pub bytes: &'a [u8],
    /// Zero bytes after them.
    pub zeros: u64,
}

/// True when `len` bytes at `gpa` lie in one available range.
pub(crate) fn in_ram(ranges: &[MemoryRange], gpa: u64, len: u64) -> bool {
    let Some(end) = gpa.checked_add(len) else {
        return false;
    };
    ranges
        .iter()
        .any(|r| r.kind == RangeKind::Available && r.base <= gpa && end <= r.end())
}

/// A PC's layout with `ram_mib` MiB of RAM, for the loaders' tests: low memory, the BIOS
/// area as ROM, RAM from 1 MiB.
#[cfg(test)]
pub(crate) fn pc_layout(ram_mib: u64) -> alloc::vec::Vec<MemoryRange> {
    const MIB: u64 = 1 << 20;
    alloc::vec![
        MemoryRange {
            base: 0,
            size: 0xA_0000,
            kind: RangeKind::Available,
        },
        MemoryRange {
            base: 0xE_0000,
            size: 0x2_0000,
            kind: RangeKind::Reserved,
        },
        MemoryRange {
            base: MIB,
            size: (ram_mib - 1) * MIB,
            kind: RangeKind::Available,
        },
    ]
}
