//! The seed-fidelity scenarios in Bochs, in the classic PC layout (`pc::classic_pc`): a guest
//! executing from shadowed ROM over RAM, an MMIO2 framebuffer mapped over RAM and unmapped
//! again, and a VM reset in the middle of a run. Each ends with the EPT audit on real memory.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use pgm::manager::{DeviceId, Mmio2Spec, RomProtection};
use pgm::page::PageState;
use pgm::PAGE_SIZE;

use super::hostile::audit;
use super::pc::{self, apply, classic_pc, flush, read_bytes, read_u32};
use super::{gpa, TestResult, CODE};
use crate::arch::guests::programs;
use crate::arch::registers::GuestRegisters;
use crate::vm::budget::Budget;
use crate::vm::VmStop;
use crate::Host;

/// Where the BIOS image puts its code: the start of the F segment.
const BIOS_CODE: u64 = 0xF_0000;
/// What the `done` program reports.
const DONE: u64 = 0x600D_F00D;

/// A BIOS image with the `done` program at [`BIOS_CODE`]; shorter than the ROM.
fn bios_image() -> Vec<u8> {
    let offset = (BIOS_CODE - pc::CLASSIC_BIOS_BASE) as usize;
    let mut image = alloc::vec![0x90; offset];
    image.extend_from_slice(programs::done().code);
    image
}

/// Runs `jump_to` from RAM into `target`; returns the stop.
fn jump_into(vm: &mut crate::vm::Vcpu<'static>, target: u64) -> Result<VmStop, String> {
    let regs = GuestRegisters {
        rsi: target,
        ..Default::default()
    };
    vm.start(&programs::jump_to(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    Ok(vm.run())
}

/// The guest runs the BIOS from its ROM image over RAM, then from its shadow once the host
/// copied other code there in write-RAM mode: reads follow the protection mode page by page.
pub fn a_guest_executes_from_shadowed_rom_over_ram(host: &'static Host) -> TestResult {
    let (mut vm, bios) = classic_pc(host, &bios_image())?;
    ensure_eq!(
        jump_into(&mut vm, BIOS_CODE)?,
        VmStop::Done(DONE),
        "from the ROM image"
    );
    ensure_eq!(
        read_bytes::<4>(&vm, pc::CLASSIC_BIOS_BASE + pc::CLASSIC_BIOS_SIZE - 4)?,
        [0; 4],
        "past the image the ROM reads as zeros"
    );
    // Shadowing: writes go to the shadow while reads still come from the ROM.
    let result = vm
        .pgm_mut()
        .protect_rom_range(gpa(BIOS_CODE), PAGE_SIZE, RomProtection::ReadRomWriteRam);
    apply(&mut vm, result)?;
    let result = vm.pgm_mut().write_phys(gpa(BIOS_CODE), programs::load().code);
    apply(&mut vm, result)?;
    ensure_eq!(
        jump_into(&mut vm, BIOS_CODE)?,
        VmStop::Done(DONE),
        "still the ROM image"
    );
    // Reads from the shadow: the guest runs `load`, which loads its own first dword.
    let result = vm
        .pgm_mut()
        .protect_rom_range(gpa(BIOS_CODE), PAGE_SIZE, RomProtection::ReadRamWriteIgnore);
    apply(&mut vm, result)?;
    let own = u32::from_le_bytes(
        programs::load().code[..4]
            .try_into()
            .map_err(|_| "short program")?,
    );
    ensure_eq!(
        jump_into(&mut vm, BIOS_CODE)?,
        VmStop::Done(u64::from(own)),
        "from the shadow"
    );
    ensure_eq!(
        vm.pgm().rom_protection_at(gpa(pc::CLASSIC_BIOS_BASE)),
        Some(RomProtection::ReadRomWriteIgnore),
        "the rest of the BIOS kept its mode"
    );
    ensure_eq!(
        vm.pgm()
            .page(gpa(pc::CLASSIC_BIOS_BASE - PAGE_SIZE))
            .map(|p| p.state()),
        Some(PageState::Zero),
        "RAM below the BIOS"
    );
    let _ = bios;
    audit(&vm, "running from the shadowed BIOS")
}

/// A framebuffer mapped over RAM: the guest's writes land in device memory (all tracked as
/// dirty), the RAM pages' frames went back; unmapped, the pages are ZERO RAM again.
pub fn an_mmio2_framebuffer_mapped_over_ram_and_unmapped_again(host: &'static Host) -> TestResult {
    const AT: u64 = 0x80_0000;
    const PAGES: u64 = 16;
    let (mut vm, _) = classic_pc(host, &bios_image())?;
    let write_pages = |vm: &mut crate::vm::Vcpu<'static>, first: u64| -> TestResult {
        let regs = GuestRegisters {
            rsi: AT,
            rcx: PAGES,
            rdx: PAGE_SIZE,
            rdi: first,
            ..Default::default()
        };
        vm.start(&programs::write_pages(), CODE, regs)
            .map_err(|e| format!("{e}"))?;
        ensure_eq!(vm.run(), VmStop::Done(0), "write_pages");
        Ok(())
    };
    write_pages(&mut vm, 100)?;
    let allocated = vm.pgm().stats().allocated_pages;
    let spec = Mmio2Spec {
        device: DeviceId(1),
        region_no: 0,
        size: PAGES * PAGE_SIZE,
        track_dirty_pages: true,
    };
    let fb = vm.pgm_mut().create_mmio2(spec).map_err(|e| format!("{e}"))?;
    let tracking = vm.pgm_mut().set_mmio2_dirty_tracking(fb, true);
    apply(&mut vm, tracking)?;
    let mapped = vm.pgm_mut().map_mmio2(fb, gpa(AT));
    apply(&mut vm, mapped)?;
    ensure_eq!(
        vm.pgm().stats().allocated_pages,
        allocated - PAGES,
        "the RAM pages' frames went back"
    );
    ensure_eq!(read_u32(&vm, AT)?, 0, "the guest sees device memory");
    write_pages(&mut vm, 500)?;
    for page in 0..PAGES {
        let mut value = [0u8; 4];
        vm.pgm()
            .mmio2_read(fb, page * PAGE_SIZE, &mut value)
            .map_err(|e| format!("{e}"))?;
        ensure!(
            u32::from_le_bytes(value) == 500 + page as u32,
            "device memory of page {page}: {value:x?}"
        );
    }
    let mut bitmap = Vec::new();
    let query = vm.pgm_mut().query_and_reset_mmio2_dirty(fb, Some(&mut bitmap));
    apply(&mut vm, query)?;
    ensure_eq!(bitmap.first().copied(), Some((1u64 << PAGES) - 1), "dirty pages");
    audit(&vm, "mapping the framebuffer over RAM")?;
    let unmapped = vm.pgm_mut().unmap_mmio2(fb);
    apply(&mut vm, unmapped)?;
    let regs = GuestRegisters {
        rsi: AT,
        rcx: PAGES,
        rdx: PAGE_SIZE,
        ..Default::default()
    };
    vm.start(&programs::read_pages(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    ensure_eq!(vm.run(), VmStop::Done(0), "the RAM back under it reads as zeros");
    audit(&vm, "unmapping the framebuffer")
}

/// A guest filling RAM is preempted part-way; the VM is reset (RAM and ROM as at power-on, the
/// shadow's frames freed) and the guest starts over from the BIOS image.
pub fn a_reset_in_the_middle_of_a_run_clears_ram_and_restores_rom(host: &'static Host) -> TestResult {
    const START: u64 = 0x20_0000;
    const BYTES: u64 = 4 << 20;
    let (mut vm, bios) = classic_pc(host, &bios_image())?;
    // The shadow in RAM mode, written.
    let result = vm.pgm_mut().protect_rom(bios, RomProtection::ReadRamWriteRam);
    apply(&mut vm, result)?;
    let result = vm.pgm_mut().write_phys(gpa(BIOS_CODE), b"shadow");
    apply(&mut vm, result)?;
    let regs = GuestRegisters {
        rax: 0xA5,
        rcx: BYTES,
        rdi: START,
        ..Default::default()
    };
    vm.start(&programs::fill_bytes(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    vm.set_budget(Budget::sliced(1_000_000, 100_000_000));
    ensure_eq!(
        vm.run(),
        VmStop::Preempted { rip: CODE + 1 },
        "the fill is preempted"
    );
    ensure!(vm.regs().rdi > START, "the fill made progress");
    ensure_eq!(read_bytes::<1>(&vm, START)?, [0xA5], "filled before the reset");
    let reset = vm.pgm_mut().reset_ram();
    flush(&mut vm, reset)?;
    let stats = vm.pgm().stats();
    ensure_eq!(stats.allocated_pages, 0, "private frames after the reset");
    ensure_eq!(read_bytes::<1>(&vm, START)?, [0], "RAM reads zeros");
    ensure_eq!(
        vm.pgm().rom_protection_at(gpa(BIOS_CODE)),
        Some(RomProtection::ReadRomWriteIgnore),
        "the BIOS is back in its power-on mode"
    );
    audit(&vm, "the reset")?;
    vm.set_budget(Budget::DEFAULT);
    ensure_eq!(
        jump_into(&mut vm, BIOS_CODE)?,
        VmStop::Done(DONE),
        "the guest starts over from the BIOS"
    );
    Ok(())
}
