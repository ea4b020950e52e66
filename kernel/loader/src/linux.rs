//! The Linux loader: the x86 boot protocol's 64-bit entry (Documentation/arch/x86/boot.rst).
//!
//! It reads a bzImage's setup header, puts the protected-mode kernel at 1 MiB, the initrd as
//! high as the header allows, and builds the zero page (`struct boot_params`): the setup header
//! with the loader's fields filled in, the command line's and initrd's addresses, and an e820
//! table made from the VM's layout as the caller gives it (its registered RAM usable, its ROM
//! reserved), not a second table. The kernel is entered at its 64-bit entry point (the load
//! address plus 0x200) in long mode, with the first 4 GiB identity-mapped by 2 MiB pages, a flat
//! GDT holding `__BOOT_CS` (0x10) and `__BOOT_DS` (0x18), interrupts off and RSI = the zero page.
//!
//! The 64-bit entry rather than PVH: it is what QEMU, cloud-hypervisor and Firecracker load a
//! bzImage through, it needs nothing but the bzImage (PVH needs the uncompressed ELF `vmlinux`
//! and its note), and its e820 table is the boot protocol's own, where PVH's memory map is a
//! separate structure with the same content.
//!
//! The boot structures sit below 640 KiB, which Linux reserves for itself in any case (it
//! keeps the first megabyte out of its allocator): the GDT at [`GDT`], the zero page at
//! [`ZERO_PAGE`], the page tables from [`PAGE_TABLES`], the command line at [`COMMAND_LINE`].

use alloc::vec::Vec;
use core::fmt;

use crate::layout::{in_ram, MemoryRange, Placement, RangeKind};

/// Where the protected-mode kernel is loaded (boot.rst: "the protected-mode kernel ... at
/// 0x100000"); a relocatable kernel moves itself from there.
pub const KERNEL_LOAD: u64 = 0x10_0000;
/// The offset of the 64-bit entry point from the load address.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// The GDT.
pub const GDT: u64 = 0x6000;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// The identity map: one PML4, one page-directory-pointer table, then one page directory per
/// GiB.
pub const PAGE_TABLES: u64 = 0x9000;
/// The command line.
pub const COMMAND_LINE: u64 = 0x2_0000;
/// The code selector the protocol asks for (`__BOOT_CS`).
pub const BOOT_CS: u16 = 0x10;
/// The data selector the protocol asks for (`__BOOT_DS`).
pub const BOOT_DS: u16 = 0x18;
/// `__BOOT_CS`'s descriptor: flat 64-bit code (L, G; present, DPL 0, execute/read, accessed).
pub const BOOT_CODE_DESCRIPTOR: u64 = 0x00AF_9B00_0000_FFFF;
/// `__BOOT_DS`'s descriptor: flat data (D/B, G; present, DPL 0, read/write, accessed).
pub const BOOT_DATA_DESCRIPTOR: u64 = 0x00CF_9300_0000_FFFF;
/// How much of guest-physical space the boot page tables map.
const IDENTITY_GIB: u64 = 4;
/// The most e820 entries the zero page holds.
pub const E820_MAX: usize = 128;
/// The oldest protocol with `xloadflags` (2.12), which says whether a 64-bit entry exists.
pub const OLDEST_PROTOCOL: u16 = 0x020C;
const PAGE: u64 = 4096;

/// Offsets in the image and the zero page (boot.rst, "The real-mode kernel header";
/// zero-page.rst).
mod offset {
    pub const EXT_RAMDISK_IMAGE: usize = 0x0C0;
    pub const EXT_RAMDISK_SIZE: usize = 0x0C4;
    pub const EXT_CMD_LINE_PTR: usize = 0x0C8;
    pub const E820_ENTRIES: usize = 0x1E8;
    pub const SETUP_HEADER: usize = 0x1F1;
    pub const SETUP_SECTS: usize = 0x1F1;
    pub const SYSSIZE: usize = 0x1F4;
    pub const BOOT_FLAG: usize = 0x1FE;
    pub const JUMP_TARGET: usize = 0x201;
    pub const HEADER_MAGIC: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21C;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22C;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const RELOCATABLE_KERNEL: usize = 0x234;
    pub const XLOADFLAGS: usize = 0x236;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const PREF_ADDRESS: usize = 0x258;
    pub const INIT_SIZE: usize = 0x260;
    pub const E820_TABLE: usize = 0x2D0;
}

/// `xloadflags` bit 0: the kernel has the 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// The boot sector's signature.
const BOOT_FLAG: u16 = 0xAA55;
/// "HdrS".
const HEADER_MAGIC: u32 = 0x5372_6448;
/// The loader ID for a loader without an assigned one.
const UNDEFINED_LOADER: u8 = 0xFF;

/// Why a kernel cannot be loaded. Nothing is loaded then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinuxError {
    /// No boot-sector signature or no `HdrS` setup header: not a bzImage.
    NotBzImage,
    /// The boot protocol is older than 2.12, which has no 64-bit entry to announce.
    OldProtocol {
        /// The header's protocol version (0x020C is 2.12).
        version: u16,
    },
    /// The kernel has no 64-bit entry point (`xloadflags` bit 0 clear).
    No64BitEntry,
    /// A header field is out of its range (a setup header longer than its place in the
    /// zero page, a kernel alignment that is not a power of two, …).
    BadHeader(&'static str),
    /// The file is shorter than its header says.
    Truncated {
        /// Bytes the header accounts for.
        expected: u64,
        /// Bytes the file has.
        actual: u64,
    },
    /// The kernel (with the room it decompresses into) or a boot structure does not fit in
    /// the VM's RAM or in the boot page tables' identity map.
    DoesNotFit {
        /// First guest-physical address of what does not fit.
        gpa: u64,
        /// Its size.
        len: u64,
    },
    /// The command line is longer than the kernel takes, or holds a NUL byte.
    CommandLineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's limit (`cmdline_size`).
        max: usize,
    },
    /// No RAM below the initrd address limit has room for the initrd beside the kernel.
    InitrdDoesNotFit {
        /// The initrd's size.
        len: u64,
    },
    /// The VM's layout has more ranges than the zero page's e820 table holds.
    TooManyRanges {
        /// How many.
        count: usize,
    },
}

impl fmt::Display for LinuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinuxError::NotBzImage => write!(f, "not a bzImage: no boot signature or no HdrS setup header"),
            LinuxError::OldProtocol { version } => write!(
                f,
                "boot protocol {}.{:02} is older than 2.12, which has the 64-bit entry",
                version >> 8,
                version & 0xFF
            ),
            LinuxError::No64BitEntry => write!(f, "the kernel has no 64-bit entry point (xloadflags bit 0)"),
            LinuxError::BadHeader(what) => write!(f, "bad setup header: {what}"),
            LinuxError::Truncated { expected, actual } => write!(
                f,
                "the image is truncated: its header accounts for {expected} bytes, the file has {actual}"
            ),
            LinuxError::DoesNotFit { gpa, len } => write!(
                f,
                "{len} bytes at {gpa:#x} do not fit in the VM's RAM (the kernel needs its init_size from where it decompresses)"
            ),
            LinuxError::CommandLineTooLong { len, max } => write!(
                f,
                "the command line has {len} bytes (or a NUL byte); the kernel takes at most {max}"
            ),
            LinuxError::InitrdDoesNotFit { len } => write!(
                f,
                "no RAM below the initrd limit has room for the {len}-byte initrd beside the kernel"
            ),
            LinuxError::TooManyRanges { count } => write!(
                f,
                "the VM's layout has {count} ranges; the e820 table holds {E820_MAX}"
            ),
        }
    }
}

impl core::error::Error for LinuxError {}

/// What the caller writes into guest RAM, and the state the boot CPU starts in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxPlan<'a> {
    /// The protected-mode kernel and the initrd, from the caller's buffers.
    pub placements: Vec<Placement<'a>>,
    /// The boot structures the loader made: the GDT, the zero page, the page tables and the
    /// command line, each with its guest-physical address.
    pub boot_data: Vec<(u64, Vec<u8>)>,
    /// RIP: the 64-bit entry point.
    pub entry: u64,
    /// RSI: the zero page.
    pub rsi: u64,
    /// CR3: the identity map's PML4.
    pub cr3: u64,
    /// GDTR's base and limit.
    pub gdt: (u64, u16),
    /// Where a relocatable kernel decompresses itself to (or a fixed one must run), and the
    /// room it needs there (`init_size`).
    pub decompress_to: (u64, u64),
}

/// The setup header's fields the loader uses.
#[derive(Clone, Copy, Debug)]
struct SetupHeader {
    /// Where the protected-mode kernel starts in the file.
    kernel_offset: usize,
    /// Its length in the file.
    kernel_len: usize,
    /// Where the header ends in the file (and in the zero page).
    header_end: usize,
    initrd_addr_max: u64,
    kernel_alignment: u64,
    relocatable: bool,
    cmdline_size: usize,
    pref_address: u64,
    init_size: u64,
}

fn bytes_at<const N: usize>(image: &[u8], at: usize) -> Option<[u8; N]> {
    image.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u16_at(image: &[u8], at: usize) -> Option<u16> {
    bytes_at(image, at).map(u16::from_le_bytes)
}

fn u32_at(image: &[u8], at: usize) -> Option<u32> {
    bytes_at(image, at).map(u32::from_le_bytes)
}

fn u64_at(image: &[u8], at: usize) -> Option<u64> {
    bytes_at(image, at).map(u64::from_le_bytes)
}

impl SetupHeader {
    /// Reads and checks the setup header of `image`.
    fn parse(image: &[u8]) -> Result<SetupHeader, LinuxError> {
        if u16_at(image, offset::BOOT_FLAG) != Some(BOOT_FLAG)
            || u32_at(image, offset::HEADER_MAGIC) != Some(HEADER_MAGIC)
        {
            return Err(LinuxError::NotBzImage);
        }
        let version = u16_at(image, offset::VERSION).ok_or(LinuxError::NotBzImage)?;
        if version < OLDEST_PROTOCOL {
            return Err(LinuxError::OldProtocol { version });
        }
        // The header ends where the jump at 0x200 lands.
        let header_end = 0x202 + usize::from(image[offset::JUMP_TARGET]);
        if !(offset::INIT_SIZE + 4..=offset::E820_TABLE).contains(&header_end) {
            return Err(LinuxError::BadHeader(
                "its length does not fit the zero page's layout",
            ));
        }
        let field32 = |at| u32_at(image, at).ok_or(LinuxError::NotBzImage);
        let xloadflags = u16_at(image, offset::XLOADFLAGS).ok_or(LinuxError::NotBzImage)?;
        if xloadflags & XLF_KERNEL_64 == 0 {
            return Err(LinuxError::No64BitEntry);
        }
        let setup_sects = match image[offset::SETUP_SECTS] {
            0 => 4,
            n => usize::from(n),
        };
        let kernel_offset = (setup_sects + 1) * 512;
        let kernel_len = field32(offset::SYSSIZE)? as usize * 16;
        let expected = kernel_offset + kernel_len;
        if image.len() < expected || kernel_len == 0 {
            return Err(LinuxError::Truncated {
                expected: expected as u64,
                actual: image.len() as u64,
            });
        }
        let kernel_alignment = u64::from(field32(offset::KERNEL_ALIGNMENT)?);
        if !kernel_alignment.is_power_of_two() {
            return Err(LinuxError::BadHeader("kernel_alignment is not a power of two"));
        }
        Ok(SetupHeader {
            kernel_offset,
            kernel_len,
            header_end,
            initrd_addr_max: u64::from(field32(offset::INITRD_ADDR_MAX)?),
            kernel_alignment,
            relocatable: image[offset::RELOCATABLE_KERNEL] != 0,
            cmdline_size: field32(offset::CMDLINE_SIZE)? as usize,
            pref_address: u64_at(image, offset::PREF_ADDRESS).ok_or(LinuxError::NotBzImage)?,
            init_size: u64::from(field32(offset::INIT_SIZE)?),
        })
    }

    /// Where the kernel decompresses itself to when entered at [`KERNEL_LOAD`]: a relocatable
    /// kernel at its load address aligned up, but not below its preferred address; a fixed
    /// one at its preferred address (arch/x86/boot/compressed/head_64.S, `startup_64`).
    fn decompress_base(&self) -> u64 {
        if self.relocatable {
            KERNEL_LOAD
                .next_multiple_of(self.kernel_alignment)
                .max(self.pref_address)
        } else {
            self.pref_address
        }
    }
}

/// Plans the load of the bzImage `image` with `cmdline` and `initrd` into a VM laid out as
/// `ranges`. Every address is checked against the RAM ranges and the identity map; on error
/// nothing is planned.
pub fn plan<'a>(
    image: &'a [u8],
    cmdline: &str,
    initrd: Option<&'a [u8]>,
    ranges: &[MemoryRange],
) -> Result<LinuxPlan<'a>, LinuxError> {
    let header = SetupHeader::parse(image)?;
    if cmdline.len() > header.cmdline_size || cmdline.as_bytes().contains(&0) {
        return Err(LinuxError::CommandLineTooLong {
            len: cmdline.len(),
            max: header.cmdline_size,
        });
    }
    let e820 = e820_entries(ranges)?;
    let identity_end = IDENTITY_GIB << 30;
    let fits = |gpa: u64, len: u64| {
        if in_ram(ranges, gpa, len) && gpa + len <= identity_end {
            Ok(())
        } else {
            Err(LinuxError::DoesNotFit { gpa, len })
        }
    };
    let kernel_len = header.kernel_len as u64;
    fits(KERNEL_LOAD, kernel_len)?;
    let decompress_to = (header.decompress_base(), header.init_size);
    fits(decompress_to.0, decompress_to.1)?;
    let tables_len = (2 + IDENTITY_GIB) * PAGE;
    for (gpa, len) in [
        (GDT, 32),
        (ZERO_PAGE, PAGE),
        (PAGE_TABLES, tables_len),
        (COMMAND_LINE, cmdline.len() as u64 + 1),
    ] {
        fits(gpa, len)?;
    }
    let kernel_end = (KERNEL_LOAD + kernel_len).max(decompress_to.0 + decompress_to.1);
    let mut placements = alloc::vec![Placement {
        gpa: KERNEL_LOAD,
        bytes: &image[header.kernel_offset..header.kernel_offset + header.kernel_len],
        zeros: 0,
    }];
    let initrd_at = match initrd {
        Some(bytes) => {
            let len = bytes.len() as u64;
            let limit = header.initrd_addr_max.saturating_add(1).min(identity_end);
            let at =
                initrd_address(ranges, len, kernel_end, limit).ok_or(LinuxError::InitrdDoesNotFit { len })?;
            placements.push(Placement {
                gpa: at,
                bytes,
                zeros: 0,
            });
            Some((at, len))
        }
        None => None,
    };
    let zero_page = zero_page(image, &header, initrd_at, &e820);
    let mut command_line = Vec::from(cmdline.as_bytes());
    command_line.push(0);
    Ok(LinuxPlan {
        placements,
        boot_data: alloc::vec![
            (GDT, gdt()),
            (ZERO_PAGE, zero_page),
            (PAGE_TABLES, identity_map()),
            (COMMAND_LINE, command_line),
        ],
        entry: KERNEL_LOAD + ENTRY_64_OFFSET,
        rsi: ZERO_PAGE,
        cr3: PAGE_TABLES,
        gdt: (GDT, 31),
        decompress_to,
    })
}

/// The e820 table of `ranges`: available RAM is type 1 (usable), the rest type 2 (reserved).
fn e820_entries(ranges: &[MemoryRange]) -> Result<Vec<(u64, u64, u32)>, LinuxError> {
    if ranges.len() > E820_MAX {
        return Err(LinuxError::TooManyRanges { count: ranges.len() });
    }
    Ok(ranges
        .iter()
        .map(|range| {
            let kind = match range.kind {
                RangeKind::Available => 1,
                RangeKind::Reserved => 2,
            };
            (range.base, range.size, kind)
        })
        .collect())
}

/// The highest page-aligned address below `limit` where `len` bytes lie in one available
/// range and above `kernel_end`, as boot.rst advises ("as high as possible").
fn initrd_address(ranges: &[MemoryRange], len: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    ranges
        .iter()
        .filter(|range| range.kind == RangeKind::Available)
        .filter_map(|range| {
            let top = range.end().min(limit);
            let at = top.checked_sub(len)? & !(PAGE - 1);
            (at >= range.base.max(kernel_end)).then_some(at)
        })
        .max()
}

/// The zero page: the image's setup header with the loader's fields, the initrd, the command
/// line and the e820 table.
fn zero_page(
    image: &[u8],
    header: &SetupHeader,
    initrd: Option<(u64, u64)>,
    e820: &[(u64, u64, u32)],
) -> Vec<u8> {
    let mut page = alloc::vec![0u8; PAGE as usize];
    page[offset::SETUP_HEADER..header.header_end]
        .copy_from_slice(&image[offset::SETUP_HEADER..header.header_end]);
    let put32 = |page: &mut Vec<u8>, at: usize, value: u64| {
        page[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
    };
    page[offset::TYPE_OF_LOADER] = UNDEFINED_LOADER;
    put32(&mut page, offset::CMD_LINE_PTR, COMMAND_LINE);
    put32(&mut page, offset::EXT_CMD_LINE_PTR, COMMAND_LINE >> 32);
    let (initrd_at, initrd_len) = initrd.unwrap_or((0, 0));
    put32(&mut page, offset::RAMDISK_IMAGE, initrd_at);
    put32(&mut page, offset::RAMDISK_SIZE, initrd_len);
    put32(&mut page, offset::EXT_RAMDISK_IMAGE, initrd_at >> 32);
    put32(&mut page, offset::EXT_RAMDISK_SIZE, initrd_len >> 32);
    page[offset::E820_ENTRIES] = e820.len() as u8;
    for (index, &(base, size, kind)) in e820.iter().enumerate() {
        let at = offset::E820_TABLE + index * 20;
        page[at..at + 8].copy_from_slice(&base.to_le_bytes());
        page[at + 8..at + 16].copy_from_slice(&size.to_le_bytes());
        page[at + 16..at + 20].copy_from_slice(&kind.to_le_bytes());
    }
    page
}

/// The GDT: two null descriptors, then `__BOOT_CS` (64-bit code) and `__BOOT_DS` (flat data).
fn gdt() -> Vec<u8> {
    let descriptors: [u64; 4] = [0, 0, BOOT_CODE_DESCRIPTOR, BOOT_DATA_DESCRIPTOR];
    descriptors.iter().flat_map(|d| d.to_le_bytes()).collect()
}

/// The identity map of the first [`IDENTITY_GIB`] GiB by 2 MiB pages: the PML4, the
/// page-directory-pointer table, then the page directories, one page each from
/// [`PAGE_TABLES`].
fn identity_map() -> Vec<u8> {
    const PRESENT_WRITABLE: u64 = 0b11;
    const LARGE: u64 = 1 << 7;
    let mut entries = alloc::vec![0u64; ((2 + IDENTITY_GIB) * 512) as usize];
    entries[0] = (PAGE_TABLES + PAGE) | PRESENT_WRITABLE;
    for gib in 0..IDENTITY_GIB {
        entries[512 + gib as usize] = (PAGE_TABLES + (2 + gib) * PAGE) | PRESENT_WRITABLE;
        for slot in 0..512 {
            let at = ((2 + gib) * 512 + slot) as usize;
            entries[at] = (gib << 30 | slot << 21) | PRESENT_WRITABLE | LARGE;
        }
    }
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn pc(ram_mib: u64) -> Vec<MemoryRange> {
        crate::layout::pc_layout(ram_mib)
    }

    /// A bzImage as the kernel's build makes it: `setup_sects` sectors of setup after the boot
    /// sector, then `kernel_len` bytes of protected-mode kernel (a counting pattern).
    fn bzimage(kernel_len: usize) -> Vec<u8> {
        let setup_sects = 3;
        let kernel_offset = (setup_sects + 1) * 512;
        let mut image = alloc::vec![0u8; kernel_offset + kernel_len];
        image[offset::SETUP_SECTS] = setup_sects as u8;
        image[offset::SYSSIZE..offset::SYSSIZE + 4]
            .copy_from_slice(&((kernel_len / 16) as u32).to_le_bytes());
        image[offset::BOOT_FLAG..offset::BOOT_FLAG + 2].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        image[0x200] = 0xEB;
        image[offset::JUMP_TARGET] = 0x6A; // header ends at 0x26C, as 6.1's does
        image[offset::HEADER_MAGIC..offset::HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        image[offset::VERSION..offset::VERSION + 2].copy_from_slice(&0x020Fu16.to_le_bytes());
        image[offset::INITRD_ADDR_MAX..offset::INITRD_ADDR_MAX + 4]
            .copy_from_slice(&0x7FFF_FFFFu32.to_le_bytes());
        image[offset::KERNEL_ALIGNMENT..offset::KERNEL_ALIGNMENT + 4]
            .copy_from_slice(&0x20_0000u32.to_le_bytes());
        image[offset::RELOCATABLE_KERNEL] = 1;
        image[offset::XLOADFLAGS..offset::XLOADFLAGS + 2].copy_from_slice(&0x7Fu16.to_le_bytes());
        image[offset::CMDLINE_SIZE..offset::CMDLINE_SIZE + 4].copy_from_slice(&2047u32.to_le_bytes());
        image[offset::PREF_ADDRESS..offset::PREF_ADDRESS + 8].copy_from_slice(&0x100_0000u64.to_le_bytes());
        image[offset::INIT_SIZE..offset::INIT_SIZE + 4].copy_from_slice(&(40 * MIB as u32).to_le_bytes());
        for (i, byte) in image[kernel_offset..].iter_mut().enumerate() {
            *byte = i as u8;
        }
        image
    }

    fn boot_data<'p>(plan: &'p LinuxPlan<'_>, at: u64) -> &'p [u8] {
        &plan.boot_data.iter().find(|(gpa, _)| *gpa == at).unwrap().1
    }

    #[test]
    fn the_kernel_goes_at_one_mib_and_is_entered_at_its_64_bit_entry() {
        let image = bzimage(64 * 1024);
        let plan = plan(&image, "console=ttyS0", None, &pc(128)).unwrap();
        assert_eq!(plan.placements.len(), 1);
        assert_eq!(plan.placements[0].gpa, 0x10_0000);
        assert_eq!(plan.placements[0].bytes, &image[4 * 512..]);
        assert_eq!(
            (plan.entry, plan.rsi, plan.cr3),
            (0x10_0200, ZERO_PAGE, PAGE_TABLES)
        );
        // Relocatable, aligned to 2 MiB, not below its preferred 16 MiB.
        assert_eq!(plan.decompress_to, (0x100_0000, 40 * MIB));
    }

    #[test]
    fn the_zero_page_holds_the_header_the_loader_fields_and_the_command_line() {
        let image = bzimage(4096);
        let plan = plan(&image, "console=ttyS0 panic=-1", None, &pc(128)).unwrap();
        let page = boot_data(&plan, ZERO_PAGE);
        // The header as the image has it, but for the loader's fields (0x210–0x22B).
        assert_eq!(&page[0x1F1..0x210], &image[0x1F1..0x210]);
        assert_eq!(&page[0x22C..0x26C], &image[0x22C..0x26C]);
        assert!(page[..0x1F1]
            .iter()
            .enumerate()
            .all(|(at, &b)| b == 0 || at == offset::E820_ENTRIES));
        assert_eq!(page[offset::TYPE_OF_LOADER], 0xFF);
        assert_eq!(u32_at(page, offset::CMD_LINE_PTR), Some(COMMAND_LINE as u32));
        assert_eq!(u32_at(page, offset::RAMDISK_IMAGE), Some(0));
        assert_eq!(boot_data(&plan, COMMAND_LINE), b"console=ttyS0 panic=-1\0");
    }

    #[test]
    fn the_e820_table_is_the_vms_layout() {
        let image = bzimage(4096);
        let plan = plan(&image, "", None, &pc(128)).unwrap();
        let page = boot_data(&plan, ZERO_PAGE);
        assert_eq!(page[offset::E820_ENTRIES], 3);
        let entry = |i: usize| {
            let at = offset::E820_TABLE + i * 20;
            (
                u64_at(page, at).unwrap(),
                u64_at(page, at + 8).unwrap(),
                u32_at(page, at + 16).unwrap(),
            )
        };
        assert_eq!(entry(0), (0, 0xA_0000, 1));
        assert_eq!(entry(1), (0xE_0000, 0x2_0000, 2));
        assert_eq!(entry(2), (MIB, 127 * MIB, 1));
    }

    #[test]
    fn the_initrd_goes_as_high_as_ram_and_the_header_allow() {
        let image = bzimage(4096);
        let initrd = alloc::vec![7u8; 10_000];
        let plan = plan(&image, "", Some(&initrd), &pc(128)).unwrap();
        let at = plan.placements[1].gpa;
        assert_eq!(at, (128 * MIB - 10_000) & !4095);
        let page = boot_data(&plan, ZERO_PAGE);
        assert_eq!(u32_at(page, offset::RAMDISK_IMAGE), Some(at as u32));
        assert_eq!(u32_at(page, offset::RAMDISK_SIZE), Some(10_000));
        // Above the RAM a 4 GiB guest has beyond the hole, the header's limit wins.
        let mut big = pc(3 * 1024);
        big.push(MemoryRange {
            base: 4 << 30,
            size: 1 << 30,
            kind: RangeKind::Available,
        });
        let plan = super::plan(&image, "", Some(&initrd), &big).unwrap();
        assert!(plan.placements[1].gpa + 10_000 <= 0x8000_0000);
    }

    #[test]
    fn the_boot_tables_map_the_first_four_gib_and_hold_the_boot_selectors() {
        let image = bzimage(4096);
        let plan = plan(&image, "", None, &pc(128)).unwrap();
        let tables = boot_data(&plan, PAGE_TABLES);
        let entry =
            |table: u64, index: u64| u64_at(tables, ((table - PAGE_TABLES) + index * 8) as usize).unwrap();
        // Walk a few addresses as the CPU would.
        for address in [0u64, 0x10_0200, 0x7FFF_F000, 0xFEE0_0000, 0xFFFF_FFFF] {
            let pdpt = entry(PAGE_TABLES, address >> 39 & 511) & !0xFFF;
            let pd = entry(pdpt, address >> 30 & 511);
            assert_eq!(pd & 1, 1, "{address:#x}");
            let leaf = entry(pd & !0xFFF, address >> 21 & 511);
            assert_eq!(leaf & 0x83, 0x83);
            assert_eq!((leaf & !0x1F_FFFF) | (address & 0x1F_FFFF), address);
        }
        let gdt = boot_data(&plan, GDT);
        let descriptor = |selector: u16| u64_at(gdt, usize::from(selector)).unwrap();
        assert_eq!(descriptor(BOOT_CS) >> 40 & 0xFF, 0x9B);
        assert_eq!(descriptor(BOOT_CS) >> 53 & 1, 1, "64-bit code");
        assert_eq!(descriptor(BOOT_DS) >> 40 & 0xFF, 0x93);
        assert_eq!(plan.gdt, (GDT, 31));
    }

    #[test]
    fn bad_images_are_refused_with_what_is_wrong() {
        let ram = pc(128);
        let good = bzimage(4096);
        let with = |at: usize, bytes: &[u8]| {
            let mut image = good.clone();
            image[at..at + bytes.len()].copy_from_slice(bytes);
            image
        };
        let refused = |image: &[u8]| plan(image, "", None, &ram).unwrap_err();
        assert_eq!(refused(&good[..0x100]), LinuxError::NotBzImage);
        assert_eq!(refused(&with(offset::BOOT_FLAG, &[0, 0])), LinuxError::NotBzImage);
        assert_eq!(
            refused(&with(offset::HEADER_MAGIC, b"HdrX")),
            LinuxError::NotBzImage
        );
        assert_eq!(
            refused(&with(offset::VERSION, &0x0206u16.to_le_bytes())),
            LinuxError::OldProtocol { version: 0x0206 }
        );
        assert_eq!(
            refused(&with(offset::XLOADFLAGS, &[0x7E, 0])),
            LinuxError::No64BitEntry
        );
        assert!(matches!(
            refused(&with(offset::JUMP_TARGET, &[0xFF])),
            LinuxError::BadHeader(_)
        ));
        assert!(matches!(
            refused(&with(offset::KERNEL_ALIGNMENT, &3u32.to_le_bytes())),
            LinuxError::BadHeader(_)
        ));
        assert_eq!(
            refused(&good[..good.len() - 16]),
            LinuxError::Truncated {
                expected: good.len() as u64,
                actual: good.len() as u64 - 16
            }
        );
    }

    #[test]
    fn a_kernel_or_initrd_too_large_for_the_guest_is_refused() {
        let image = bzimage(4096);
        // 40 MiB from 16 MiB: 48 MiB of RAM is too little.
        assert_eq!(
            plan(&image, "", None, &pc(48)).unwrap_err(),
            LinuxError::DoesNotFit {
                gpa: 0x100_0000,
                len: 40 * MIB
            }
        );
        assert!(plan(&image, "", None, &pc(57)).is_ok());
        let initrd = alloc::vec![0u8; (10 * MIB) as usize];
        assert_eq!(
            plan(&image, "", Some(&initrd), &pc(60)).unwrap_err(),
            LinuxError::InitrdDoesNotFit { len: 10 * MIB }
        );
        assert!(plan(&image, "", Some(&initrd), &pc(67)).is_ok());
    }

    #[test]
    fn a_command_line_past_the_kernels_limit_is_refused() {
        let image = bzimage(4096);
        let long = "x".repeat(2048);
        assert_eq!(
            plan(&image, &long, None, &pc(128)).unwrap_err(),
            LinuxError::CommandLineTooLong { len: 2048, max: 2047 }
        );
        assert!(plan(&image, &long[..2047], None, &pc(128)).is_ok());
        assert!(matches!(
            plan(&image, "a\0b", None, &pc(128)).unwrap_err(),
            LinuxError::CommandLineTooLong { .. }
        ));
    }

    #[test]
    fn a_layout_beyond_the_e820_table_is_refused() {
        let ranges: Vec<MemoryRange> = (0..129)
            .map(|i| MemoryRange {
                base: i * 2 * MIB,
                size: MIB,
                kind: RangeKind::Available,
            })
            .collect();
        assert_eq!(
            plan(&bzimage(4096), "", None, &ranges).unwrap_err(),
            LinuxError::TooManyRanges { count: 129 }
        );
    }

    #[test]
    fn no_input_panics() {
        // Every prefix of a valid image, and every header byte set to extremes.
        let image = bzimage(4096);
        for len in 0..0x300 {
            let _ = plan(&image[..len], "", None, &pc(128));
        }
        for at in 0x1F1..0x270 {
            for value in [0u8, 0xFF] {
                let mut bad = image.clone();
                bad[at] = value;
                let _ = plan(&bad, "", Some(&[1, 2, 3]), &pc(128));
            }
        }
    }
}
