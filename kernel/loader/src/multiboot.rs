//! The Multiboot v1 loader (Multiboot Specification 0.6.96): finds the header in the image's
//! first 8 KiB, loads the ELF32 image's `PT_LOAD` segments at their physical addresses, and
//! builds the boot information a Multiboot kernel reads: `mem_lower` and `mem_upper`, the
//! command line, one module and the memory map. The map is the VM's own layout as the caller
//! gives it (its RAM ranges as available memory, its ROM as reserved), not a second table.
//!
//! The boot information goes at [`INFO_BASE`] (below 640 KiB, where QEMU puts it) unless the
//! image lies there (kvm-unit-tests' `realmode.flat` loads at 0x8000); then on the first page
//! boundary after the image. The module follows on the next page boundary. The kernel then starts in 32-bit protected mode
//! with paging off, EAX = [`BOOTLOADER_MAGIC`] and EBX = the information's address.

use alloc::vec::Vec;
use core::fmt;

use crate::layout::in_ram;
pub use crate::layout::{MemoryRange, Placement, RangeKind};

/// The header's magic.
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// What EAX holds at the kernel's entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// Where the boot information is placed when the image leaves room there.
pub const INFO_BASE: u64 = 0x9000;
/// The most bytes the boot information (with the command line and the map) may take.
pub const INFO_LIMIT: u64 = 0x7000;
/// How far into the image the header may start.
const HEADER_SEARCH: usize = 8192;
/// Header flag bit 16: the address fields are valid (the a.out kludge).
const FLAG_ADDRESSES: u32 = 1 << 16;
/// Information flags: memory sizes, command line, modules, memory map.
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODULES: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
/// The information structure's size (up to and including the APM table pointer).
const INFO_SIZE: usize = 88;
/// ELF constants.
const PT_LOAD: u32 = 1;
const EM_386: u16 = 3;
const ET_EXEC: u16 = 2;

/// Why an image cannot be loaded. Nothing is loaded then.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// No valid Multiboot header in the first 8 KiB.
    NoHeader,
    /// The header asks for the a.out kludge, which this loader does not do (ELF only).
    AoutKludge,
    /// Not a 32-bit little-endian i386 ELF executable.
    NotElf32,
    /// A program header or segment lies outside the file, or its sizes are inconsistent.
    BadSegment {
        /// The program header's index.
        index: usize,
    },
    /// A segment (or the module) does not fit in the VM's RAM at its address.
    OutsideRam {
        /// The first byte that does not fit.
        gpa: u64,
        /// How many bytes were to go there.
        len: u64,
    },
    /// The entry point is in no loaded segment.
    EntryOutsideImage(u32),
    /// The command line and memory map do not fit in the space for the boot information.
    InfoTooLarge,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NoHeader => write!(f, "no Multiboot header in the image's first 8 KiB"),
            LoadError::AoutKludge => write!(f, "the image asks for the a.out kludge; only ELF images load"),
            LoadError::NotElf32 => write!(f, "not a 32-bit i386 ELF executable"),
            LoadError::BadSegment { index } => {
                write!(
                    f,
                    "program header {index} lies outside the image or is inconsistent"
                )
            }
            LoadError::OutsideRam { gpa, len } => {
                write!(f, "{len} bytes at {gpa:#x} do not fit in the VM's RAM")
            }
            LoadError::EntryOutsideImage(entry) => {
                write!(f, "entry point {entry:#x} is in no loaded segment")
            }
            LoadError::InfoTooLarge => write!(
                f,
                "the command line and memory map do not fit in the boot information"
            ),
        }
    }
}

impl core::error::Error for LoadError {}

/// Everything the caller writes into guest RAM, and the entry state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadPlan<'a> {
    /// The image's segments and the module.
    pub placements: Vec<Placement<'a>>,
    /// The boot information block, to write at `info_at`.
    pub info: Vec<u8>,
    /// Where the boot information goes.
    pub info_at: u64,
    /// The entry point (EIP, 32-bit protected mode, paging off).
    pub entry: u32,
    /// EAX at entry.
    pub eax: u32,
    /// EBX at entry: the boot information's address.
    pub ebx: u32,
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(at..at.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// The header's flags, if the image has a valid header.
pub fn header_flags(image: &[u8]) -> Option<u32> {
    let end = image.len().min(HEADER_SEARCH);
    (0..end.saturating_sub(11)).step_by(4).find_map(|at| {
        let magic = u32_at(image, at)?;
        let flags = u32_at(image, at + 4)?;
        let checksum = u32_at(image, at + 8)?;
        (magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(checksum) == 0).then_some(flags)
    })
}

/// A loadable segment: physical address, the file's bytes, size in memory.
type Segment<'a> = (u64, &'a [u8], u64);

/// The image's entry point and loadable segments.
fn elf_segments(image: &[u8]) -> Result<(u32, Vec<Segment<'_>>), LoadError> {
    let is_elf32 = image.get(..7) == Some(&[0x7F, b'E', b'L', b'F', 1, 1, 1][..]);
    let kind = u16_at(image, 16);
    let machine = u16_at(image, 18);
    if !is_elf32 || kind != Some(ET_EXEC) || machine != Some(EM_386) {
        return Err(LoadError::NotElf32);
    }
    let entry = u32_at(image, 24).ok_or(LoadError::NotElf32)?;
    let table = u32_at(image, 28).ok_or(LoadError::NotElf32)? as usize;
    let entry_size = usize::from(u16_at(image, 42).ok_or(LoadError::NotElf32)?);
    let count = usize::from(u16_at(image, 44).ok_or(LoadError::NotElf32)?);
    if entry_size < 32 {
        return Err(LoadError::NotElf32);
    }
    let mut segments = Vec::new();
    for index in 0..count {
        let bad = LoadError::BadSegment { index };
        let at = index
            .checked_mul(entry_size)
            .and_then(|offset| offset.checked_add(table))
            .ok_or(bad.clone())?;
        let field = |offset: usize| u32_at(image, at + offset).ok_or(bad.clone());
        if field(0)? != PT_LOAD {
            continue;
        }
        let (offset, paddr, file_size, mem_size) = (field(4)?, field(12)?, field(16)?, field(20)?);
        if file_size > mem_size {
            return Err(bad);
        }
        let start = offset as usize;
        let bytes = start
            .checked_add(file_size as usize)
            .and_then(|end| image.get(start..end))
            .ok_or(bad)?;
        segments.push((u64::from(paddr), bytes, u64::from(mem_size)));
    }
    Ok((entry, segments))
}

/// Plans the load of `image` with command line `cmdline` and module `module` (named
/// `module_name`) into a VM laid out as `ranges`. Every address is checked against the RAM
/// ranges; on error nothing is planned.
pub fn plan<'a>(
    image: &'a [u8],
    cmdline: &str,
    module: Option<(&str, &'a [u8])>,
    ranges: &[MemoryRange],
) -> Result<LoadPlan<'a>, LoadError> {
    let flags = header_flags(image).ok_or(LoadError::NoHeader)?;
    if flags & FLAG_ADDRESSES != 0 {
        return Err(LoadError::AoutKludge);
    }
    let (entry, segments) = elf_segments(image)?;
    let mut placements = Vec::new();
    let mut image_end = 0u64;
    let mut info_at = INFO_BASE;
    for (gpa, bytes, mem_size) in segments {
        if !in_ram(ranges, gpa, mem_size) {
            return Err(LoadError::OutsideRam { gpa, len: mem_size });
        }
        if overlaps_info(gpa, mem_size) {
            info_at = 0;
        }
        image_end = image_end.max(gpa + mem_size);
        placements.push(Placement {
            gpa,
            bytes,
            zeros: mem_size - bytes.len() as u64,
        });
    }
    let entry_loaded = placements.iter().any(|p| {
        let end = p.gpa + p.bytes.len() as u64 + p.zeros;
        (p.gpa..end).contains(&u64::from(entry))
    });
    if !entry_loaded {
        return Err(LoadError::EntryOutsideImage(entry));
    }
    let mut free = image_end.next_multiple_of(4096);
    if info_at == 0 {
        info_at = free;
        free += INFO_LIMIT;
        if !in_ram(ranges, info_at, INFO_LIMIT) {
            return Err(LoadError::OutsideRam {
                gpa: info_at,
                len: INFO_LIMIT,
            });
        }
    }
    let module_at = free;
    if let Some((_, bytes)) = module {
        let len = bytes.len() as u64;
        if !in_ram(ranges, module_at, len) || module_at + len > u64::from(u32::MAX) {
            return Err(LoadError::OutsideRam { gpa: module_at, len });
        }
        placements.push(Placement {
            gpa: module_at,
            bytes,
            zeros: 0,
        });
    }
    let module = module.map(|(name, bytes)| (name, module_at, bytes.len() as u64));
    let info = boot_information(info_at, cmdline, module, ranges)?;
    Ok(LoadPlan {
        placements,
        info,
        info_at,
        entry,
        eax: BOOTLOADER_MAGIC,
        ebx: info_at as u32,
    })
}

fn overlaps_info(gpa: u64, len: u64) -> bool {
    gpa < INFO_BASE + INFO_LIMIT && INFO_BASE < gpa.saturating_add(len)
}

/// The boot information block for `base`: the structure, the module entry, the memory map,
/// then the strings.
fn boot_information(
    base: u64,
    cmdline: &str,
    module: Option<(&str, u64, u64)>,
    ranges: &[MemoryRange],
) -> Result<Vec<u8>, LoadError> {
    let mut block = alloc::vec![0u8; INFO_SIZE];
    let put =
        |block: &mut Vec<u8>, at: usize, value: u32| block[at..at + 4].copy_from_slice(&value.to_le_bytes());
    let address = |block: &Vec<u8>| (base + block.len() as u64) as u32;
    // mem_lower: KiB of RAM from 0 (at most 640); mem_upper: KiB of RAM from 1 MiB without a
    // hole.
    let contiguous_from = |start: u64| {
        let mut end = start;
        while let Some(range) = ranges
            .iter()
            .find(|r| r.kind == RangeKind::Available && r.base <= end && end < r.end())
        {
            end = range.end();
        }
        end - start
    };
    let lower = contiguous_from(0).min(640 * 1024) / 1024;
    let upper = (contiguous_from(0x10_0000) / 1024).min(u64::from(u32::MAX));
    let mut flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP;
    put(&mut block, 4, lower as u32);
    put(&mut block, 8, upper as u32);
    let module_entry = block.len();
    if module.is_some() {
        flags |= INFO_MODULES;
        block.resize(block.len() + 16, 0);
        put(&mut block, 20, 1);
        put(&mut block, 24, (base + module_entry as u64) as u32);
    }
    let map_start = block.len();
    for range in ranges {
        let kind: u32 = match range.kind {
            RangeKind::Available => 1,
            RangeKind::Reserved => 2,
        };
        block.extend_from_slice(&20u32.to_le_bytes());
        block.extend_from_slice(&range.base.to_le_bytes());
        block.extend_from_slice(&range.size.to_le_bytes());
        block.extend_from_slice(&kind.to_le_bytes());
    }
    let map_length = (block.len() - map_start) as u32;
    put(&mut block, 44, map_length);
    put(&mut block, 48, (base + map_start as u64) as u32);
    let cmdline_at = address(&block);
    block.extend_from_slice(cmdline.as_bytes());
    block.push(0);
    put(&mut block, 16, cmdline_at);
    if let Some((name, at, len)) = module {
        let name_at = address(&block);
        block.extend_from_slice(name.as_bytes());
        block.push(0);
        put(&mut block, module_entry, at as u32);
        put(&mut block, module_entry + 4, (at + len) as u32);
        put(&mut block, module_entry + 8, name_at);
    }
    put(&mut block, 0, flags);
    if block.len() as u64 > INFO_LIMIT {
        return Err(LoadError::InfoTooLarge);
    }
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal i386 ELF executable with a Multiboot header: two segments, the second with
    /// BSS, entry in the first.
    fn image(entry: u32) -> Vec<u8> {
        let mut elf = alloc::vec![0u8; 0x200];
        elf[..7].copy_from_slice(&[0x7F, b'E', b'L', b'F', 1, 1, 1]);
        elf[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        elf[18..20].copy_from_slice(&EM_386.to_le_bytes());
        elf[24..28].copy_from_slice(&entry.to_le_bytes());
        elf[28..32].copy_from_slice(&52u32.to_le_bytes());
        elf[42..44].copy_from_slice(&32u16.to_le_bytes());
        elf[44..46].copy_from_slice(&2u16.to_le_bytes());
        let segment = |elf: &mut Vec<u8>, at: usize, offset: u32, paddr: u32, file: u32, mem: u32| {
            for (i, value) in [PT_LOAD, offset, paddr, paddr, file, mem].iter().enumerate() {
                elf[at + 4 * i..at + 4 * i + 4].copy_from_slice(&value.to_le_bytes());
            }
        };
        segment(&mut elf, 52, 0x100, 0x40_0100, 0x80, 0x80);
        segment(&mut elf, 84, 0x180, 0x40_1000, 0x80, 0x2000);
        // The Multiboot header at 0x100, in the first segment.
        let checksum = 0u32.wrapping_sub(HEADER_MAGIC);
        elf[0x100..0x104].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        elf[0x108..0x10C].copy_from_slice(&checksum.to_le_bytes());
        elf[0x180] = 0xAA;
        elf
    }

    fn pc(ram_mib: u64) -> Vec<MemoryRange> {
        crate::layout::pc_layout(ram_mib)
    }

    fn u32_in(info: &[u8], at: usize) -> u32 {
        u32_at(info, at).unwrap()
    }

    #[test]
    fn segments_load_at_their_addresses_with_bss_and_the_entry_state_is_multiboot() {
        let elf = image(0x40_0110);
        let plan = plan(&elf, "cpuid", None, &pc(32)).unwrap();
        assert_eq!(plan.placements.len(), 2);
        assert_eq!(
            (
                plan.placements[0].gpa,
                plan.placements[0].bytes.len(),
                plan.placements[0].zeros
            ),
            (0x40_0100, 0x80, 0)
        );
        assert_eq!(
            (
                plan.placements[1].gpa,
                plan.placements[1].bytes[0],
                plan.placements[1].zeros
            ),
            (0x40_1000, 0xAA, 0x1F80)
        );
        assert_eq!(
            (plan.entry, plan.eax, plan.ebx),
            (0x40_0110, BOOTLOADER_MAGIC, INFO_BASE as u32)
        );
    }

    #[test]
    fn the_boot_information_has_memory_sizes_the_command_line_a_module_and_the_map() {
        let elf = image(0x40_0110);
        let env = b"NR_CPUS=2\n";
        let plan = plan(&elf, "a b", Some(("env", env)), &pc(32)).unwrap();
        let info = &plan.info;
        let flags = u32_in(info, 0);
        assert_eq!(flags, INFO_MEMORY | INFO_CMDLINE | INFO_MODULES | INFO_MMAP);
        assert_eq!(u32_in(info, 4), 640);
        assert_eq!(u32_in(info, 8), 31 * 1024);
        let at = |address: u32| (u64::from(address) - INFO_BASE) as usize;
        let cmdline = at(u32_in(info, 16));
        assert_eq!(&info[cmdline..cmdline + 4], b"a b\0");
        assert_eq!(u32_in(info, 20), 1);
        let module = at(u32_in(info, 24));
        let (start, end) = (u32_in(info, module), u32_in(info, module + 4));
        assert_eq!(start, 0x40_3000, "the page after the image");
        assert_eq!(end - start, env.len() as u32);
        assert_eq!(plan.placements.last().unwrap().bytes, env);
        let map = at(u32_in(info, 48));
        assert_eq!(u32_in(info, 44), 3 * 24);
        let entry = |i: usize| {
            let e = map + 24 * i;
            (
                u32_in(info, e),
                u64::from(u32_in(info, e + 4)) | (u64::from(u32_in(info, e + 8)) << 32),
                u32_in(info, e + 20),
            )
        };
        assert_eq!(entry(0), (20, 0, 1));
        assert_eq!(entry(1), (20, 0xE_0000, 2));
        assert_eq!(entry(2), (20, 0x10_0000, 1));
    }

    #[test]
    fn bad_images_are_refused_with_the_reason() {
        let ram = pc(32);
        assert_eq!(plan(&[0u8; 100], "", None, &ram), Err(LoadError::NoHeader));
        let mut elf = image(0x40_0110);
        elf[4] = 2;
        assert_eq!(plan(&elf, "", None, &ram), Err(LoadError::NotElf32));
        let elf = image(0x50_0000);
        assert_eq!(
            plan(&elf, "", None, &ram),
            Err(LoadError::EntryOutsideImage(0x50_0000))
        );
        let mut elf = image(0x40_0110);
        elf[0x104..0x108].copy_from_slice(&FLAG_ADDRESSES.to_le_bytes());
        let checksum = 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(FLAG_ADDRESSES));
        elf[0x108..0x10C].copy_from_slice(&checksum.to_le_bytes());
        assert_eq!(plan(&elf, "", None, &ram), Err(LoadError::AoutKludge));
        // Truncated: the second segment's bytes are gone.
        let elf = image(0x40_0110);
        assert_eq!(
            plan(&elf[..0x1A0], "", None, &ram),
            Err(LoadError::BadSegment { index: 1 })
        );
        // A segment offset that overflows.
        let mut elf = image(0x40_0110);
        elf[84 + 4..84 + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            plan(&elf, "", None, &ram),
            Err(LoadError::BadSegment { index: 1 })
        );
    }

    /// An image that covers the usual place of the boot information (as kvm-unit-tests'
    /// `realmode.flat` does at 0x8000) gets it after its end instead, the module after that.
    #[test]
    fn an_image_over_the_usual_place_gets_its_boot_information_after_it() {
        let mut elf = image(0x9010);
        for (at, paddr) in [(52 + 8, 0x9000u32), (84 + 8, 0xA000)] {
            elf[at..at + 4].copy_from_slice(&paddr.to_le_bytes());
            elf[at + 4..at + 8].copy_from_slice(&paddr.to_le_bytes());
        }
        let plan = plan(&elf, "", Some(("env", b"x")), &pc(32)).unwrap();
        assert_eq!(plan.info_at, 0xC000, "the page after the image (0xA000 + 0x2000)");
        assert_eq!(u64::from(plan.ebx), plan.info_at);
        assert_eq!(plan.placements.last().unwrap().gpa, 0xC000 + INFO_LIMIT);
        let map = (u64::from(u32_in(&plan.info, 48)) - plan.info_at) as usize;
        assert!(map < plan.info.len());
    }

    #[test]
    fn an_image_or_module_beyond_ram_is_refused() {
        let elf = image(0x40_0110);
        assert_eq!(
            plan(&elf, "", None, &pc(4)),
            Err(LoadError::OutsideRam {
                gpa: 0x40_0100,
                len: 0x80
            })
        );
        let big = alloc::vec![0u8; 0x10_0000];
        assert_eq!(
            plan(&elf, "", Some(("m", &big)), &pc(5)),
            Err(LoadError::OutsideRam {
                gpa: 0x40_3000,
                len: 0x10_0000
            })
        );
        let long = "x".repeat(INFO_LIMIT as usize);
        assert_eq!(plan(&elf, &long, None, &pc(32)), Err(LoadError::InfoTooLarge));
    }
}
