//! The PC-like guest the EPT-violation scenarios run in, built entirely through `pgm`, and the
//! MMIO test device behind it.
//!
//! Guest-physical layout:
//!
//! | range | what |
//! |---|---|
//! | 0 – 640 KiB | RAM |
//! | 0xA0000 – 0xC0000 | MMIO test device ([`TestDevice`]) |
//! | 0xC0000 – 0xC8000 | option ROM, not shadowed |
//! | 0xC8000 – 0xF0000 | unassigned |
//! | 0xF0000 – 1 MiB | system ROM, shadowed |
//! | 1 MiB – 16 MiB | RAM |
//! | 16 MiB – 0xE000_0000 | unassigned |
//! | 0xE000_0000 + 256 KiB | MMIO2 framebuffer, dirty tracking on |
//! | 4 GiB – 4 GiB + 16 MiB | RAM, only with [`Above4G::Yes`] |

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use pgm::handlers::HandlerId;
use pgm::manager::{AccessHandlers, DeviceId, HandlerAction, Mmio2Handle, Mmio2Spec, RomId, RomImage};
use pgm::{Access, GuestPhysAddr, Invalidation, PgmError, PAGE_SIZE};

use super::{gpa, new_vm};
use crate::arch::guests::GuestProgram;
use crate::arch::registers::GuestRegisters;
use crate::vm::Vcpu;
use crate::Host;

pub const DEVICE_BASE: u64 = 0xA_0000;
/// Accesses a [`TestDevice`] logs without growing its log.
const DEVICE_LOG_CAPACITY: usize = 1024;
pub const DEVICE_SIZE: u64 = 0x2_0000;
pub const OPTION_ROM_BASE: u64 = 0xC_0000;
pub const OPTION_ROM_SIZE: u64 = 0x8000;
pub const SYSTEM_ROM_BASE: u64 = 0xF_0000;
pub const SYSTEM_ROM_SIZE: u64 = 0x1_0000;
pub const FRAMEBUFFER_BASE: u64 = 0xE000_0000;
pub const FRAMEBUFFER_PAGES: u64 = 64;
pub const ABOVE_4G_BASE: u64 = 0x1_0000_0000;
/// Tags in the high half of every dword of the ROM images (low half: the dword's index).
pub const OPTION_ROM_TAG: u32 = 0x4F50_0000;
pub const SYSTEM_ROM_TAG: u32 = 0x5359_0000;
/// RAM of the PC layout below 4 GiB.
const RAM: [(u64, u64); 2] = [(0, 0xA_0000), (0x10_0000, 0xF0_0000)];
const ABOVE_4G_SIZE: u64 = 0x100_0000;

/// Whether the PC gets RAM above 4 GiB.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Above4G {
    Yes,
    No,
}

/// A VM with the PC layout and the handles of its parts.
pub struct Pc {
    pub vm: Vcpu<'static>,
    pub device: HandlerId,
    pub option_rom: RomId,
    pub system_rom: RomId,
    pub framebuffer: Mmio2Handle,
}

/// Builds the PC layout through pgm.
pub fn pc(host: &'static Host, above_4g: Above4G) -> Result<Pc, String> {
    let mut ram = Vec::from(RAM);
    if above_4g == Above4G::Yes {
        ram.push((ABOVE_4G_BASE, ABOVE_4G_SIZE));
    }
    let mut vm = new_vm(host, &ram)?;
    fn fail(what: &str, error: impl core::fmt::Display) -> String {
        format!("{what}: {error}")
    }
    let mut pgm = vm.pgm_mut();
    let (device, invalidation) = pgm
        .register_mmio(gpa(DEVICE_BASE), DEVICE_SIZE)
        .map_err(|e| fail("MMIO device", e))?;
    let option_image = rom_image(OPTION_ROM_TAG, OPTION_ROM_SIZE);
    let (option_rom, _) = pgm
        .register_rom(
            gpa(OPTION_ROM_BASE),
            OPTION_ROM_SIZE,
            RomImage::Copy(&option_image),
            false,
        )
        .map_err(|e| fail("option ROM", e))?;
    let system_image = rom_image(SYSTEM_ROM_TAG, SYSTEM_ROM_SIZE);
    let (system_rom, _) = pgm
        .register_rom(
            gpa(SYSTEM_ROM_BASE),
            SYSTEM_ROM_SIZE,
            RomImage::Copy(&system_image),
            true,
        )
        .map_err(|e| fail("system ROM", e))?;
    let framebuffer = pgm
        .create_mmio2(framebuffer_spec())
        .map_err(|e| fail("framebuffer", e))?;
    // Tracking before mapping: mapped untracked, the first query would report every page.
    let mapped = pgm
        .set_mmio2_dirty_tracking(framebuffer, true)
        .and_then(|a| Ok(a.max(pgm.map_mmio2(framebuffer, gpa(FRAMEBUFFER_BASE))?)))
        .map_err(|e| fail("framebuffer mapping", e))?;
    drop(pgm);
    vm.flush(invalidation.max(mapped))
        .map_err(|e| format!("INVEPT: {e}"))?;
    Ok(Pc {
        vm,
        device,
        option_rom,
        system_rom,
        framebuffer,
    })
}

/// The framebuffer: device 0's region 0, tracking dirty pages.
pub fn framebuffer_spec() -> Mmio2Spec {
    Mmio2Spec {
        device: DeviceId(0),
        region_no: 0,
        size: FRAMEBUFFER_PAGES * PAGE_SIZE,
        track_dirty_pages: true,
    }
}

/// The classic PC layout of the seed-fidelity scenarios: system RAM from 0 to
/// [`CLASSIC_RAM_SIZE`] in one registration, the system BIOS ([`CLASSIC_BIOS_SIZE`] bytes at
/// [`CLASSIC_BIOS_BASE`], shadowed) registered over it, holding `bios` (shorter than the ROM:
/// the rest reads as zeros).
pub const CLASSIC_RAM_SIZE: u64 = 0x100_0000;
pub const CLASSIC_BIOS_BASE: u64 = 0xE_0000;
pub const CLASSIC_BIOS_SIZE: u64 = 0x2_0000;

/// Builds the classic PC layout; returns the VM and the BIOS's handle.
pub fn classic_pc(host: &'static Host, bios: &[u8]) -> Result<(Vcpu<'static>, RomId), String> {
    let mut vm = new_vm(host, &[(0, CLASSIC_RAM_SIZE)])?;
    let registered = vm.pgm_mut().register_rom(
        gpa(CLASSIC_BIOS_BASE),
        CLASSIC_BIOS_SIZE,
        RomImage::Copy(bios),
        true,
    );
    let (bios, invalidation) = registered.map_err(|e| format!("BIOS over RAM: {e}"))?;
    vm.flush(invalidation).map_err(|e| format!("INVEPT: {e}"))?;
    Ok((vm, bios))
}

/// A ROM image whose dword `k` is `tag | k`.
pub fn rom_image(tag: u32, size: u64) -> Vec<u8> {
    (0..size as u32 / 4)
        .flat_map(|k| (tag | k).to_le_bytes())
        .collect()
}

/// Carries out the invalidation of a host-side pgm call on `vm`, or reports its error.
pub fn apply(
    vm: &mut Vcpu<'static>,
    result: Result<Invalidation, impl Into<PgmError>>,
) -> Result<(), String> {
    let result = result.map_err(Into::into);
    let invalidation = result.map_err(|e| format!("{e}"))?;
    vm.flush(invalidation).map_err(|e| format!("INVEPT: {e}"))
}

/// Carries out an invalidation a host-side pgm call returned on `vm`.
pub fn flush(vm: &mut Vcpu<'static>, invalidation: Invalidation) -> Result<(), String> {
    apply(vm, Ok::<_, PgmError>(invalidation))
}

/// Reads a little-endian value of `N` bytes from guest memory as the host sees it.
pub fn read_bytes<const N: usize>(vm: &Vcpu<'static>, at: u64) -> Result<[u8; N], String> {
    let mut bytes = [0u8; N];
    vm.pgm()
        .read_phys(gpa(at), &mut bytes)
        .map_err(|e| format!("read at {at:#x}: {e}"))?;
    Ok(bytes)
}

/// The dword at `at` as the host sees it.
pub fn read_u32(vm: &Vcpu<'static>, at: u64) -> Result<u32, String> {
    read_bytes::<4>(vm, at).map(u32::from_le_bytes)
}

/// The qword at `at` as the host sees it.
pub fn read_u64(vm: &Vcpu<'static>, at: u64) -> Result<u64, String> {
    read_bytes::<8>(vm, at).map(u64::from_le_bytes)
}

/// Writes `addresses` as a list of dwords at `at` (the input of the `write_list` program).
pub fn write_address_list(vm: &mut Vcpu<'static>, at: u64, addresses: &[u64]) -> Result<(), String> {
    let bytes: Vec<u8> = addresses
        .iter()
        .flat_map(|&address| (address as u32).to_le_bytes())
        .collect();
    let result = vm.pgm_mut().write_phys(gpa(at), &bytes);
    apply(vm, result)
}

/// One access a device saw: direction, offset from the device base, size in bytes.
pub type DeviceAccess = (Access, u64, usize);

/// The MMIO test device: 256 bytes of registers repeated over its whole range; reads return
/// what was last written. It logs every access and counts the handler calls.
pub struct TestDevice {
    base: u64,
    handler: HandlerId,
    registers: [u8; 256],
    /// Every access, in order.
    pub log: Vec<DeviceAccess>,
    /// Calls for a handler other than this device's.
    pub foreign_calls: u64,
    /// `Default` instead of `Handled`: pgm performs the access on memory after the device saw it
    /// (a write-watching handler over RAM).
    pass_through: bool,
}

impl TestDevice {
    /// A device answering for `handler`, whose range starts at `base`.
    pub fn new(handler: HandlerId, base: u64) -> Self {
        TestDevice {
            base,
            handler,
            registers: [0; 256],
            // Room for every test's accesses up front: a log that grew on the exit path would
            // put the heap's reallocations into the measured MMIO exits.
            log: Vec::with_capacity(DEVICE_LOG_CAPACITY),
            foreign_calls: 0,
            pass_through: false,
        }
    }

    /// A handler that only watches: it logs and lets pgm perform the access on memory.
    pub fn watcher(handler: HandlerId, base: u64) -> Self {
        TestDevice {
            pass_through: true,
            ..TestDevice::new(handler, base)
        }
    }

    /// The register bytes at `offset`.
    pub fn registers(&self, offset: usize, len: usize) -> &[u8] {
        &self.registers[offset..offset + len]
    }
}

impl AccessHandlers for TestDevice {
    fn access(
        &mut self,
        handler: HandlerId,
        gpa: GuestPhysAddr,
        access: Access,
        data: &mut [u8],
    ) -> HandlerAction {
        if handler != self.handler {
            self.foreign_calls += 1;
            return HandlerAction::Default;
        }
        let offset = gpa.as_u64() - self.base;
        self.log.push((access, offset, data.len()));
        if self.pass_through {
            return HandlerAction::Default;
        }
        for (i, byte) in data.iter_mut().enumerate() {
            let register = &mut self.registers[(offset as usize + i) % 256];
            match access {
                Access::Write => *register = *byte,
                _ => *byte = *register,
            }
        }
        HandlerAction::Handled
    }
}

/// Guest page tables for the long-mode guest, in guest RAM at [`PML4`]: the first 5 GiB
/// identity-mapped with 2 MiB pages, and mapped a second time from [`HIGH_HALF`].
pub const PML4: u64 = 0x1_0000;
pub const HIGH_HALF: u64 = 0xFFFF_8000_0000_0000;
pub const PDPT: u64 = PML4 + 0x1000;
pub const FIRST_PD: u64 = PML4 + 0x2000;
const MAPPED_GIB: u64 = 5;
const PRESENT_WRITABLE: u64 = 0b11;
const LARGE: u64 = 1 << 7;

/// Loads `program` at [`CODE`](super::CODE) and starts it from its [`HIGH_HALF`] mapping with
/// the page tables at `cr3` ([`build_long_mode_tables`]).
pub fn start_high_half(
    vm: &mut Vcpu<'static>,
    program: &GuestProgram,
    cr3: u64,
    regs: GuestRegisters,
) -> Result<(), String> {
    vm.start_paged(program, super::CODE, HIGH_HALF + super::CODE, cr3, regs)
        .map_err(|e| format!("{e}"))
}

/// Writes the long-mode guest's page tables; returns the CR3 value.
pub fn build_long_mode_tables(vm: &mut Vcpu<'static>) -> Result<u64, String> {
    let table = |entries: &mut dyn Iterator<Item = u64>| -> Vec<u8> {
        let mut bytes: Vec<u8> = entries.flat_map(u64::to_le_bytes).collect();
        bytes.resize(PAGE_SIZE as usize, 0);
        bytes
    };
    let mut pml4 = table(&mut core::iter::empty());
    pml4[..8].copy_from_slice(&(PDPT | PRESENT_WRITABLE).to_le_bytes());
    pml4[256 * 8..257 * 8].copy_from_slice(&(PDPT | PRESENT_WRITABLE).to_le_bytes());
    let pdpt = table(&mut (0..MAPPED_GIB).map(|g| (FIRST_PD + g * PAGE_SIZE) | PRESENT_WRITABLE));
    let mut writes = Vec::from([(PML4, pml4), (PDPT, pdpt)]);
    for g in 0..MAPPED_GIB {
        let pd = table(&mut (0..512).map(|i| (g << 30) | (i << 21) | PRESENT_WRITABLE | LARGE));
        writes.push((FIRST_PD + g * PAGE_SIZE, pd));
    }
    for (at, bytes) in writes {
        let result = vm.pgm_mut().write_phys(gpa(at), &bytes);
        apply(vm, result)?;
    }
    Ok(PML4)
}
