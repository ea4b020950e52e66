//! Every kind of EPT violation, end to end: guests in real, protected and long mode touch each
//! page kind of the PC layout ([`super::pc`]) and the tests check what the host sees.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use pgm::handlers::HandlerKind;
use pgm::manager::RomProtection;
use pgm::page::PageState;
use pgm::{Access, GuestPhysAddr, RomError, PAGE_SIZE};

use super::pc::{
    self, apply, flush, pc, read_u32, read_u64, write_address_list, Above4G, DeviceAccess, TestDevice,
};
use super::{gpa, stopped, TestResult, XorShift, CODE};
use crate::arch::guests::{programs, GuestProgram};
use crate::arch::memory::frames_in_use_outside_heap;
use crate::arch::registers::GuestRegisters;
use crate::vm::{StopCause, Vcpu, VmStop};
use crate::Host;

/// Where the MMIO guests store what they loaded, and where address lists go.
const RESULTS: u64 = 0x9000;
const LIST: u64 = 0xA000;
/// The page of RAM above 4 GiB the long-mode guest writes.
const ABOVE_4G_TARGET: u64 = pc::ABOVE_4G_BASE + 0x1000;
const R: Access = Access::Read;
const W: Access = Access::Write;

/// The device accesses of `mmio_forms_32`, in program order (see `arch/guests.rs`).
const MMIO_FORMS_ACCESSES: [DeviceAccess; 33] = [
    // Stores.
    (W, 0x00, 1),
    (W, 0x02, 2),
    (W, 0x04, 4),
    (W, 0x08, 4),
    (W, 0x0C, 2),
    (W, 0x0E, 1),
    // Loads, MOVZX/MOVSX, the high-byte load.
    (R, 0x00, 1),
    (R, 0x02, 2),
    (R, 0x04, 4),
    (R, 0x08, 4),
    (R, 0x0E, 1),
    (R, 0x0E, 1),
    (R, 0x0C, 2),
    (R, 0x0C, 2),
    (R, 0x00, 1),
    // OR, AND, XOR to memory, then a load.
    (R, 0x04, 4),
    (W, 0x04, 4),
    (R, 0x00, 1),
    (W, 0x00, 1),
    (R, 0x08, 4),
    (W, 0x08, 4),
    (R, 0x04, 4),
    // AND to zero, OR from memory into a register, OR of a negative byte.
    (R, 0x02, 2),
    (W, 0x02, 2),
    (R, 0x08, 4),
    (R, 0x0E, 1),
    (W, 0x0E, 1),
    // REP STOSD, STOSB, a load.
    (W, 0x20, 4),
    (W, 0x24, 4),
    (W, 0x28, 4),
    (W, 0x2C, 4),
    (W, 0x30, 1),
    (R, 0x2C, 4),
];
/// Instructions of `mmio_forms_32` that touch the device (REP STOSD counts once per element).
const MMIO_FORMS_INSTRUCTIONS: u64 = 28;
/// What `mmio_forms_32` stores at RESULTS, dword by dword.
const MMIO_FORMS_RESULTS: [u32; 16] = [
    0xFFFF_FF11,
    0xFFFF_2233,
    0x4455_6677,
    0x8899_AABB,
    0xEE,
    0xFFFF_FFEE,
    0xCCDD,
    0xFFFF_CCDD,
    0x1100,
    0x4F55_F677,
    1, // ZF after AND to zero
    0x0899_BBBB,
    1, // SF after OR of 0xEE
    0x31,
    0,
    0xA5A5_A5A5,
];

/// Inputs of the MMIO guests: device base, results area, the RAM page above 4 GiB.
fn mmio_regs() -> GuestRegisters {
    GuestRegisters {
        rsi: pc::DEVICE_BASE,
        rdi: RESULTS,
        r12: ABOVE_4G_TARGET,
        ..Default::default()
    }
}

/// The first `count` result dwords the MMIO guests stored.
fn results(vm: &Vcpu<'static>, count: usize) -> Result<Vec<u32>, String> {
    (0..count).map(|k| read_u32(vm, RESULTS + 4 * k as u64)).collect()
}

/// Checks the device after `mmio_forms_32`: its log and its registers.
fn check_mmio_forms_device(device: &TestDevice, extra: &[DeviceAccess]) -> TestResult {
    let mut expected = Vec::from(MMIO_FORMS_ACCESSES);
    expected.extend_from_slice(extra);
    ensure_eq!(device.log, expected, "device accesses (direction, offset, size)");
    ensure_eq!(device.foreign_calls, 0, "calls for other handlers");
    let mut registers = Vec::new();
    registers.extend_from_slice(&[0x01, 0, 0, 0]);
    registers.extend_from_slice(&0x4F55_F677u32.to_le_bytes());
    registers.extend_from_slice(&0x0899_AABBu32.to_le_bytes());
    registers.extend_from_slice(&[0xDD, 0xCC, 0xEE]);
    ensure_eq!(device.registers(0, 15), &registers[..], "device registers 0..15");
    ensure_eq!(
        device.registers(0x20, 17),
        &[
            0xA5, 0xA5, 0xA5, 0xA5, 0xA5, 0xA5, 0xA5, 0xA5, 0xA5, 0xA5, 0xA5, 0xA5, 0xA5, 0xA5, 0xA5, 0xA5,
            0x5A
        ][..],
        "device registers written by STOS"
    );
    Ok(())
}

pub fn mmio_forms_in_protected_mode(host: &'static Host) -> TestResult {
    let mut pc = pc(host, Above4G::No)?;
    let mut device = TestDevice::new(pc.device, pc::DEVICE_BASE);
    pc.vm
        .start(&programs::mmio_forms_flat32(), CODE, mmio_regs())
        .map_err(|e| format!("{e}"))?;
    ensure_eq!(pc.vm.run_with(&mut device), VmStop::Done(0), "stop");
    check_mmio_forms_device(&device, &[])?;
    ensure_eq!(
        results(&pc.vm, 16)?,
        MMIO_FORMS_RESULTS,
        "values the guest loaded"
    );
    ensure_eq!(
        pc.vm.exits.emulated,
        MMIO_FORMS_INSTRUCTIONS,
        "instructions emulated"
    );
    Ok(())
}

/// The long-mode guest runs at a high linear address that only its own page tables map: the
/// emulator must fetch each instruction through them.
pub fn mmio_forms_in_long_mode_through_guest_paging(host: &'static Host) -> TestResult {
    let mut pc = pc(host, Above4G::Yes)?;
    let cr3 = pc::build_long_mode_tables(&mut pc.vm)?;
    let mut device = TestDevice::new(pc.device, pc::DEVICE_BASE);
    pc::start_high_half(&mut pc.vm, &programs::mmio_forms_long64(), cr3, mmio_regs())?;
    ensure_eq!(pc.vm.run_with(&mut device), VmStop::Done(0), "stop");
    check_mmio_forms_device(
        &device,
        &[
            (W, 0x40, 8),
            (W, 0x48, 8),
            (R, 0x40, 8),
            (R, 0x48, 4),
            (R, 0x40, 8),
            (W, 0x40, 8),
            (R, 0x40, 8),
        ],
    )?;
    ensure_eq!(
        results(&pc.vm, 16)?,
        MMIO_FORMS_RESULTS,
        "values the guest loaded"
    );
    let wide = [
        read_u64(&pc.vm, RESULTS + 0x40)?,
        read_u64(&pc.vm, RESULTS + 0x48)?,
        read_u64(&pc.vm, RESULTS + 0x50)?,
    ];
    ensure_eq!(
        wide,
        [
            0x1122_3344_5566_7788,
            0xFFFF_FFFF_FFFF_FFFE,
            0x1122_3344_5566_778F
        ],
        "8-byte loads, MOVSXD, OR to a qword"
    );
    ensure_eq!(
        pc.vm.exits.emulated,
        MMIO_FORMS_INSTRUCTIONS + 6,
        "instructions emulated"
    );
    ensure_eq!(read_u32(&pc.vm, ABOVE_4G_TARGET)?, 0x600D_CAFE, "RAM above 4 GiB");
    let page = pc
        .vm
        .pgm()
        .page(gpa(ABOVE_4G_TARGET))
        .ok_or("no page above 4 GiB")?;
    ensure_eq!(
        page.state(),
        PageState::Allocated,
        "state of the page above 4 GiB"
    );
    Ok(())
}

/// A device driver's loop: the same MMIO store from the same code page to the same device
/// page, over and over. The vCPU reuses its code page's translation, its decoded instruction
/// and the device page's lookup, until the guest maps another page at the code's address (in
/// its page tables, with no exit: the emulator walks again and runs the new instruction, as the
/// CPU does), or the host moves the device to another handler (the next access reaches it).
pub fn mmio_loop_reuses_its_lookups_until_the_code_or_the_device_moves(host: &'static Host) -> TestResult {
    const ROUTINE: u64 = 0x60_0000;
    const STORE_ECX: [u8; 3] = [0x89, 0x0E, 0xC3]; // mov [rsi], ecx; ret
    const STORE_EDX: [u8; 3] = [0x89, 0x16, 0xC3]; // mov [rsi], edx; ret
    const ECX: u32 = 0xC0DE_000C;
    const EDX: u32 = 0xC0DE_000D;
    let mut pc = pc(host, Above4G::No)?;
    let cr3 = pc::build_long_mode_tables(&mut pc.vm)?;
    for (at, routine) in [(0x20_0000, STORE_ECX), (0x40_0000, STORE_EDX)] {
        let result = pc.vm.pgm_mut().write_phys(gpa(at), &routine);
        apply(&mut pc.vm, result)?;
    }
    let regs = GuestRegisters {
        rcx: u64::from(ECX),
        rdx: u64::from(EDX),
        rsi: pc::DEVICE_BASE,
        r8: pc::FIRST_PD + (ROUTINE >> 21) * 8,
        r9: ROUTINE,
        ..GuestRegisters::default()
    };
    let mut device = TestDevice::new(pc.device, pc::DEVICE_BASE);
    pc::start_high_half(&mut pc.vm, &programs::mmio_code_remapped(), cr3, regs)?;
    ensure_eq!(pc.vm.run_with(&mut device), VmStop::Done(0), "stop");
    let stored: Vec<u32> = device
        .registers(0, 20)
        .chunks(4)
        .map(|dword| u32::from_le_bytes([dword[0], dword[1], dword[2], dword[3]]))
        .collect();
    ensure_eq!(stored, [ECX, ECX, ECX, EDX, ECX], "values the device got");
    // The second and third stores reuse both; the remapped ones walk and decode afresh.
    ensure_eq!(pc.vm.exits.emulated, 5, "instructions emulated");
    ensure_eq!(pc.vm.exits.code_fetches_without_walk, 2, "fetches without a walk");
    ensure_eq!(pc.vm.exits.decodes_reused, 2, "decodes reused");
    ensure_eq!(pc.vm.exits.mmio_lookups_reused, 4, "MMIO lookups reused");
    // The host moves the device to another handler (an exclusive change): the next access must
    // reach the new one, not the target the vCPU remembered.
    let mut pgm = pc.vm.pgm_mut();
    let removed = pgm.deregister_mmio(pc.device).map_err(|e| format!("{e}"))?;
    let (handler, added) = pgm
        .register_mmio(gpa(pc::DEVICE_BASE), pc::DEVICE_SIZE)
        .map_err(|e| format!("{e}"))?;
    drop(pgm);
    pc.vm.flush(removed.max(added)).map_err(|e| format!("{e}"))?;
    let mut moved = TestDevice::new(handler, pc::DEVICE_BASE);
    pc.vm
        .enter_at(
            programs::mmio_code_remapped().mode,
            pc::HIGH_HALF + CODE,
            cr3,
            regs,
        )
        .map_err(|e| format!("{e}"))?;
    ensure_eq!(pc.vm.run_with(&mut moved), VmStop::Done(0), "stop after the move");
    ensure_eq!(moved.log.len(), 5, "stores the moved device got");
    ensure_eq!(moved.foreign_calls, 0, "accesses handed to the old handler");
    Ok(())
}

pub fn mmio_forms_in_real_mode(host: &'static Host) -> TestResult {
    let mut pc = pc(host, Above4G::No)?;
    let mut device = TestDevice::new(pc.device, pc::DEVICE_BASE);
    pc.vm
        .start(&programs::mmio_forms_real(), CODE, GuestRegisters::default())
        .map_err(|e| format!("{e}"))?;
    ensure_eq!(pc.vm.run_with(&mut device), VmStop::Done(0), "stop");
    ensure_eq!(
        device.log,
        [
            (W, 0x00, 1),
            (W, 0x02, 2),
            (W, 0x04, 2),
            (W, 0x08, 4),
            (R, 0x00, 1),
            (R, 0x02, 2),
            (R, 0x08, 4),
            (R, 0x00, 1),
            (R, 0x04, 2),
            (W, 0x04, 2),
            (W, 0x10, 1),
            (W, 0x11, 1),
            (W, 0x12, 1),
            (R, 0x04, 2),
        ],
        "device accesses (direction, offset, size)"
    );
    ensure_eq!(
        results(&pc.vm, 4)?,
        [0x2233_0011, 0x8899_AABB, 0x11, 0x0013_4F55],
        "values the guest stored (byte, word, dword, MOVZX, OR result, DI after REP STOSB)"
    );
    ensure_eq!(
        device.registers(0x10, 3),
        &[0x77, 0x77, 0x77][..],
        "REP STOSB bytes"
    );
    Ok(())
}

/// An instruction the emulator does not support (LGDT, CMPXCHG8B from the device) stops the VM
/// before the device sees anything.
pub fn unsupported_mmio_instruction_stops_the_vm(host: &'static Host) -> TestResult {
    let cases: [(GuestProgram<'static>, &[u8]); 2] = [
        (programs::lgdt_mmio(), &[0x0F, 0x01, 0x16]),
        (programs::cmpxchg8b_mmio(), &[0x0F, 0xC7, 0x0E]),
    ];
    for (program, bytes) in cases {
        let mut pc = pc(host, Above4G::No)?;
        let mut device = TestDevice::new(pc.device, pc::DEVICE_BASE);
        pc.vm
            .start(&program, CODE, mmio_regs())
            .map_err(|e| format!("{e}"))?;
        let stop = pc.vm.run_with(&mut device);
        let diagnostic = stopped(stop)?;
        ensure_eq!(diagnostic.cause, StopCause::UnsupportedInstruction, "cause");
        ensure_eq!(diagnostic.instruction.as_slice(), bytes, "instruction bytes");
        ensure_eq!(diagnostic.rip, CODE, "RIP");
        ensure_eq!(
            diagnostic.gpa,
            Some(gpa(pc::DEVICE_BASE)),
            "guest-physical address"
        );
        ensure!(
            device.log.is_empty(),
            "{}: the device saw {:?}",
            program.name,
            device.log
        );
    }
    Ok(())
}

/// An emulated instruction's access that the guest's own page tables refuse (MOVSQ from the
/// device to a read-only 2 MiB page, CR0.WP set) is the guest's page fault, not a write: the
/// guest, which has no IDT, takes the #PF and shuts down at the MOVSQ, and the page keeps
/// what it held.
pub fn an_emulated_write_the_guest_tables_refuse_is_its_page_fault(host: &'static Host) -> TestResult {
    const READ_ONLY: u64 = 0x40_0000;
    let mut pc = pc(host, Above4G::No)?;
    let cr3 = pc::build_long_mode_tables(&mut pc.vm)?;
    // The first GiB's third 2 MiB entry: present, large, not writable.
    let result = pc
        .vm
        .pgm_mut()
        .write_phys(gpa(pc::FIRST_PD + 2 * 8), &(READ_ONLY | 0x81).to_le_bytes());
    apply(&mut pc.vm, result)?;
    let result = pc
        .vm
        .pgm_mut()
        .write_phys(gpa(READ_ONLY), &0x5AFE_u64.to_le_bytes());
    apply(&mut pc.vm, result)?;
    let mut device = TestDevice::new(pc.device, pc::DEVICE_BASE);
    let regs = GuestRegisters {
        rsi: pc::DEVICE_BASE,
        rdi: READ_ONLY,
        ..Default::default()
    };
    pc::start_high_half(&mut pc.vm, &programs::movs_to_read_only_long64(), cr3, regs)?;
    let diagnostic = stopped(pc.vm.run_with(&mut device))?;
    ensure_eq!(diagnostic.cause, StopCause::TripleFault, "cause");
    ensure_eq!(pc.vm.exits.injected, 1, "events injected (the #PF)");
    ensure_eq!(read_u64(&pc.vm, READ_ONLY)?, 0x5AFE, "the read-only page");
    ensure_eq!(device.log, [(R, 0x00, 8)], "device accesses (the MOVSQ's load)");
    Ok(())
}

/// A store that starts in RAM and ends in the device is emulated in both halves: the exit
/// names the device page, the operand starts on the page before (reached through the guest's
/// paging), and each half lands where it belongs.
pub fn mmio_access_crossing_a_page_is_emulated_in_both_halves(host: &'static Host) -> TestResult {
    const STRADDLING: u64 = pc::DEVICE_BASE - 2;
    let mut pc = pc(host, Above4G::No)?;
    let mut device = TestDevice::new(pc.device, pc::DEVICE_BASE);
    start_write_list(&mut pc.vm, &[STRADDLING], 0x1234_5678)?;
    ensure_eq!(pc.vm.run_with(&mut device), VmStop::Done(0), "stop");
    // write_list stores at the address and 8 bytes on: the second store is all device.
    ensure_eq!(device.log, [(W, 0x00, 2), (W, 0x06, 4)], "device accesses");
    ensure_eq!(device.registers(0, 2), &[0x34, 0x12][..], "the device's half");
    let ram = read_u32(&pc.vm, STRADDLING - 2)?;
    ensure_eq!(ram >> 16, 0x5678, "the RAM half");
    Ok(())
}

/// Executing from MMIO stops the VM; the device sees nothing.
pub fn executing_from_mmio_stops_the_vm(host: &'static Host) -> TestResult {
    let mut pc = pc(host, Above4G::No)?;
    let mut device = TestDevice::new(pc.device, pc::DEVICE_BASE);
    let regs = GuestRegisters {
        rsi: pc::DEVICE_BASE + 0x10,
        ..Default::default()
    };
    pc.vm
        .start(&programs::jump_to(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    let stop = pc.vm.run_with(&mut device);
    let diagnostic = stopped(stop)?;
    ensure_eq!(diagnostic.cause, StopCause::ExecuteFromHandledPage, "cause");
    ensure_eq!(diagnostic.rip, pc::DEVICE_BASE + 0x10, "RIP");
    ensure_eq!(
        diagnostic.gpa,
        Some(gpa(pc::DEVICE_BASE + 0x10)),
        "guest-physical address"
    );
    ensure!(device.log.is_empty(), "the device saw {:?}", device.log);
    Ok(())
}

/// An exit whose saved guest state is the host's own (the RIP after the entry's VMRUN) stops
/// the VM instead of entering with it, which would hand the guest host addresses. The guest
/// jumps to that address itself (unmapped in its tables: its triple fault saves it as RIP).
pub fn an_exit_carrying_the_hosts_own_state_stops_the_vm(host: &'static Host) -> TestResult {
    let address = super::backend::host_resume_address().ok_or("this backend has no host resume address")?;
    let mut pc = pc(host, Above4G::No)?;
    let cr3 = pc::build_long_mode_tables(&mut pc.vm)?;
    let regs = GuestRegisters {
        rax: address,
        ..Default::default()
    };
    pc::start_high_half(&mut pc.vm, &programs::jump_to_rax_long64(), cr3, regs)?;
    let diagnostic = stopped(pc.vm.run())?;
    ensure_eq!(diagnostic.cause, StopCause::EntryFailed, "cause");
    ensure_eq!(diagnostic.rip, address, "RIP");
    Ok(())
}

/// Untouched pages read as zero without a frame; the first write allocates once, later writes
/// to the same page do not exit.
pub fn first_write_to_a_zero_page_allocates_once(host: &'static Host) -> TestResult {
    const PAGE: u64 = 0x30_0000;
    let mut pc = pc(host, Above4G::No)?;
    // The same page three times, at +0 and +8 each time.
    start_write_list(&mut pc.vm, &[PAGE, PAGE + 0x10, PAGE + 0x20], 0xFEED)?;
    let (before, neighbour) = (pc.vm.stats(), gpa(PAGE + PAGE_SIZE));
    ensure_eq!(
        pc.vm.pgm().page(gpa(PAGE)).map(|p| p.state()),
        Some(PageState::Zero),
        "before"
    );
    ensure_eq!(pc.vm.run(), VmStop::Done(0), "stop");
    let after = pc.vm.stats();
    ensure_eq!(
        after.private_allocations - before.private_allocations,
        1,
        "frames given"
    );
    ensure_eq!(pc.vm.exits.ept_violations, 1, "EPT violations");
    ensure_eq!(read_u32(&pc.vm, PAGE + 0x28)?, 0xFEED, "last value written");
    ensure_eq!(
        pc.vm.pgm().page(neighbour).map(|p| p.state()),
        Some(PageState::Zero),
        "neighbour page"
    );
    Ok(())
}

/// Runs `rom_probe` at `address` writing `value`; returns the two values the guest read.
fn probe_rom(vm: &mut Vcpu<'static>, address: u64, value: u32) -> Result<Vec<u64>, String> {
    let regs = GuestRegisters {
        rsi: address,
        rdi: u64::from(value),
        ..Default::default()
    };
    vm.start(&programs::rom_probe(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    vm.reports.clear();
    ensure_eq!(
        vm.run(),
        VmStop::Done(0),
        "stop (the guest continued after its ROM write)"
    );
    Ok(core::mem::take(&mut vm.reports))
}

/// An unshadowed option ROM reads its image and ignores writes; the guest goes on with the
/// next instruction.
pub fn rom_reads_the_image_and_ignores_writes(host: &'static Host) -> TestResult {
    const DWORD: u32 = 0x10;
    let mut pc = pc(host, Above4G::No)?;
    let address = pc::OPTION_ROM_BASE + 4 * u64::from(DWORD);
    let image = u64::from(pc::OPTION_ROM_TAG | DWORD);
    let reads = probe_rom(&mut pc.vm, address, 0xBAD0_BAD0)?;
    ensure_eq!(reads, [image, image], "guest reads before and after its write");
    ensure_eq!(
        u64::from(read_u32(&pc.vm, address)?),
        image,
        "host view of the ROM"
    );
    ensure_eq!(
        pc.vm.exits.emulated,
        1,
        "instructions emulated (the ignored write)"
    );
    let refused = pc
        .vm
        .pgm_mut()
        .protect_rom(pc.option_rom, RomProtection::ReadRamWriteRam);
    ensure_eq!(
        refused,
        Err(RomError::NotShadowed(pc.option_rom)),
        "protecting an unshadowed ROM"
    );
    Ok(())
}

/// The four protection modes of a shadowed ROM, switched while the guest runs, the shadow
/// written in one mode and read in the next.
pub fn rom_protection_modes_route_reads_and_writes(host: &'static Host) -> TestResult {
    const DWORD: u32 = 0x40;
    let mut pc = pc(host, Above4G::No)?;
    let address = pc::SYSTEM_ROM_BASE + 4 * u64::from(DWORD);
    let image = u64::from(pc::SYSTEM_ROM_TAG | DWORD);
    // (mode, value the guest writes, what it reads before and after its write)
    let phases = [
        (RomProtection::ReadRomWriteIgnore, 0x1111_1111, [image, image]),
        (RomProtection::ReadRomWriteRam, 0x2222_2222, [image, image]),
        (
            RomProtection::ReadRamWriteIgnore,
            0x3333_3333,
            [0x2222_2222, 0x2222_2222],
        ),
        (
            RomProtection::ReadRamWriteRam,
            0x4444_4444,
            [0x2222_2222, 0x4444_4444],
        ),
        (RomProtection::ReadRomWriteIgnore, 0x5555_5555, [image, image]),
    ];
    for (mode, value, expected) in phases {
        let result = pc.vm.pgm_mut().protect_rom(pc.system_rom, mode);
        apply(&mut pc.vm, result)?;
        let reads = probe_rom(&mut pc.vm, address, value)?;
        ensure!(
            reads == expected,
            "{mode:?}: guest read {reads:x?}, expected {expected:x?}"
        );
        ensure_eq!(u64::from(read_u32(&pc.vm, address)?), expected[1], "host view");
    }
    // Back in read-ROM mode the shadow still holds the last write.
    let result = pc
        .vm
        .pgm_mut()
        .protect_rom(pc.system_rom, RomProtection::ReadRamWriteIgnore);
    apply(&mut pc.vm, result)?;
    ensure_eq!(
        read_u32(&pc.vm, address)?,
        0x4444_4444,
        "shadow after the last phases"
    );
    Ok(())
}

/// Reads the framebuffer's dirty bitmap as a set of page numbers.
fn harvest_dirty(pc: &mut pc::Pc) -> Result<BTreeSet<u64>, String> {
    let mut bitmap = Vec::new();
    let result = pc
        .vm
        .pgm_mut()
        .query_and_reset_mmio2_dirty(pc.framebuffer, Some(&mut bitmap));
    apply(&mut pc.vm, result)?;
    Ok((0..pc::FRAMEBUFFER_PAGES)
        .filter(|&page| bitmap[(page / 64) as usize] & (1 << (page % 64)) != 0)
        .collect())
}

/// Runs `write_list` over `pages` of the framebuffer (each written twice).
fn write_framebuffer(pc: &mut pc::Pc, pages: &[u64], value: u64) -> TestResult {
    let addresses: Vec<u64> = pages
        .iter()
        .map(|page| pc::FRAMEBUFFER_BASE + page * PAGE_SIZE + 0x40)
        .collect();
    guest_write(&mut pc.vm, &addresses, value)
}

/// The guest writes a chosen subset of framebuffer pages; query-and-reset returns exactly that
/// subset, and only the first write to each page exits.
pub fn mmio2_dirty_tracking_reports_exactly_the_written_pages(host: &'static Host) -> TestResult {
    let mut pc = pc(host, Above4G::No)?;
    let rounds: [&[u64]; 3] = [&[0, 3, 7, 8, 31, 63], &[1, 3], &[]];
    for (round, pages) in rounds.iter().enumerate() {
        let violations_before = pc.vm.exits.ept_violations;
        write_framebuffer(&mut pc, pages, 0xF00 + round as u64)?;
        ensure_eq!(
            pc.vm.exits.ept_violations - violations_before,
            pages.len() as u64,
            "EPT violations (one per page, not per write)"
        );
        let dirty = harvest_dirty(&mut pc)?;
        ensure_eq!(
            dirty,
            pages.iter().copied().collect::<BTreeSet<_>>(),
            "dirty pages"
        );
        for &page in pages.iter() {
            let mut value = [0u8; 4];
            pc.vm
                .pgm()
                .mmio2_read(pc.framebuffer, page * PAGE_SIZE + 0x48, &mut value)
                .map_err(|e| format!("{e}"))?;
            ensure_eq!(
                u32::from_le_bytes(value),
                0xF00 + round as u32,
                "framebuffer content"
            );
        }
    }
    Ok(())
}

/// In the manner of KVM's dirty_log_test: over 12 rounds the guest writes random pages with the
/// round number; after each round the host copies only the harvested pages into its mirror,
/// which must then equal guest memory. No written page may be missing from a harvest.
pub fn write_monitoring_keeps_a_mirror_in_step(host: &'static Host) -> TestResult {
    const REGION: u64 = 0x40_0000;
    const PAGES: u64 = 128;
    const ROUNDS: u64 = 12;
    const WRITES_PER_ROUND: usize = 40;
    let mut pc = pc(host, Above4G::No)?;
    let region_bytes = (PAGES * PAGE_SIZE) as usize;
    let mut mirror = vec![0u8; region_bytes];
    let invalidation = pc.vm.pgm_mut().start_write_monitoring();
    flush(&mut pc.vm, invalidation)?;
    pc.vm
        .pgm()
        .read_phys(gpa(REGION), &mut mirror)
        .map_err(|e| format!("{e}"))?;
    let mut random = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut harvested = Vec::new();
    for round in 1..=ROUNDS {
        let pages: Vec<u64> = (0..WRITES_PER_ROUND)
            .map(|_| REGION + (random.next() % PAGES) * PAGE_SIZE + (random.next() % 8) * 0x100)
            .collect();
        guest_write(&mut pc.vm, &pages, round)?;
        harvested.clear();
        let invalidation = pc.vm.pgm_mut().harvest_written(&mut harvested);
        flush(&mut pc.vm, invalidation)?;
        let in_region: BTreeSet<u64> = harvested
            .iter()
            .map(|gpa| gpa.as_u64())
            .filter(|&at| (REGION..REGION + PAGES * PAGE_SIZE).contains(&at))
            .collect();
        let written: BTreeSet<u64> = pages.iter().map(|&at| at & !(PAGE_SIZE - 1)).collect();
        ensure!(
            in_region == written,
            "round {round}: harvested {} region pages, the guest wrote {}; missing {:x?}, extra {:x?}",
            in_region.len(),
            written.len(),
            written.difference(&in_region).collect::<Vec<_>>(),
            in_region.difference(&written).collect::<Vec<_>>()
        );
        for &page in &in_region {
            let offset = (page - REGION) as usize;
            pc.vm
                .pgm()
                .read_phys(gpa(page), &mut mirror[offset..offset + PAGE_SIZE as usize])
                .map_err(|e| format!("{e}"))?;
        }
        let mut memory = vec![0u8; region_bytes];
        pc.vm
            .pgm()
            .read_phys(gpa(REGION), &mut memory)
            .map_err(|e| format!("{e}"))?;
        ensure!(
            memory == mirror,
            "round {round}: the mirror differs from guest memory"
        );
    }
    let invalidation = pc.vm.pgm_mut().stop_write_monitoring();
    flush(&mut pc.vm, invalidation)
}

/// Runs `load` at `address` in a fresh start of the VM; returns how it stopped.
fn guest_load(vm: &mut Vcpu<'static>, address: u64) -> Result<VmStop, String> {
    let regs = GuestRegisters {
        rsi: address,
        ..Default::default()
    };
    vm.start(&programs::load(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    Ok(vm.run())
}

/// Puts `addresses` in the list page and starts `write_list` over them with `value`.
fn start_write_list(vm: &mut Vcpu<'static>, addresses: &[u64], value: u64) -> TestResult {
    write_address_list(vm, LIST, addresses)?;
    let regs = GuestRegisters {
        rsi: LIST,
        rcx: addresses.len() as u64,
        rdi: value,
        ..Default::default()
    };
    vm.start(&programs::write_list(), CODE, regs)
        .map_err(|e| format!("{e}"))
}

/// Runs `write_list` over `addresses` with `value` (no devices) to its end.
fn guest_write(vm: &mut Vcpu<'static>, addresses: &[u64], value: u64) -> TestResult {
    start_write_list(vm, addresses, value)?;
    ensure_eq!(vm.run(), VmStop::Done(0), "stop");
    Ok(())
}

/// Inflating the balloon frees frames; a guest touching a ballooned page reads zeros and its
/// writes there are dropped, as in the seed, without the page getting a frame; deflating makes
/// the page usable (and zero) again.
pub fn balloon_frees_frames_and_deflate_restores_pages(host: &'static Host) -> TestResult {
    const BASE: u64 = 0x50_0000;
    let pages: Vec<u64> = (0..8).map(|i| BASE + i * PAGE_SIZE).collect();
    let mut pc = pc(host, Above4G::No)?;
    guest_write(&mut pc.vm, &pages, 0xAB)?;
    let ballooned: Vec<GuestPhysAddr> = pages[2..5].iter().map(|&at| gpa(at)).collect();
    let used_before = frames_in_use_outside_heap();
    let result = pc.vm.pgm_mut().balloon_inflate(&ballooned);
    apply(&mut pc.vm, result)?;
    let freed = used_before - frames_in_use_outside_heap();
    ensure!(freed >= 3, "inflating 3 pages freed {freed} host frames");
    ensure_eq!(pc.vm.stats().ballooned_pages, 3, "ballooned pages");
    ensure_eq!(
        guest_load(&mut pc.vm, pages[3])?,
        VmStop::Done(0),
        "a guest read of a ballooned page"
    );
    let used_ballooned = frames_in_use_outside_heap();
    guest_write(&mut pc.vm, &pages[2..4], 0xEE)?;
    ensure_eq!(
        guest_load(&mut pc.vm, pages[2])?,
        VmStop::Done(0),
        "a ballooned page after a guest write"
    );
    ensure_eq!(
        pc.vm.stats().ballooned_pages,
        3,
        "ballooned pages after the writes"
    );
    ensure_eq!(
        frames_in_use_outside_heap(),
        used_ballooned,
        "host frames after the guest's writes to the balloon"
    );
    ensure_eq!(
        guest_load(&mut pc.vm, pages[5])?,
        VmStop::Done(0xAB),
        "a page next to the balloon"
    );
    let result = pc.vm.pgm_mut().balloon_deflate(&ballooned);
    apply(&mut pc.vm, result)?;
    ensure_eq!(
        guest_load(&mut pc.vm, pages[3])?,
        VmStop::Done(0),
        "a deflated page reads zero"
    );
    guest_write(&mut pc.vm, &pages[3..4], 0xCD)?;
    ensure_eq!(
        read_u32(&pc.vm, pages[3])?,
        0xCD,
        "a deflated page after a guest write"
    );
    ensure_eq!(
        pc.vm.stats().ballooned_pages,
        0,
        "ballooned pages after deflating"
    );
    Ok(())
}

/// Large pages: a written 2 MiB block of RAM is one EPT entry; a handler inside splits it, its
/// removal merges it back, and the guest sees the same data throughout.
pub fn large_pages_split_for_a_handler_and_merge_back(host: &'static Host) -> TestResult {
    const BLOCK: u64 = 0x40_0000;
    const WATCHED: u64 = BLOCK + 0x5000;
    const DATA: u64 = BLOCK + 0x1000;
    let mut pc = pc(host, Above4G::No)?;
    pc.vm.pgm_mut().set_large_pages(true);
    guest_write(&mut pc.vm, &[DATA, WATCHED], 0x1A)?;
    ensure!(
        pc.vm.pgm().is_mapped_large(gpa(BLOCK)),
        "the block is not mapped with a 2 MiB entry"
    );
    ensure_eq!(
        pc.vm.exits.ept_violations,
        1,
        "EPT violations (one fill for the block)"
    );
    let result = pc
        .vm
        .pgm_mut()
        .register_handler(HandlerKind::Write, gpa(WATCHED), PAGE_SIZE);
    let (handler, invalidation) = result.map_err(|e| format!("register handler: {e}"))?;
    flush(&mut pc.vm, invalidation)?;
    ensure!(
        !pc.vm.pgm().is_mapped_large(gpa(BLOCK)),
        "the handler did not split the block"
    );
    ensure_eq!(read_u32(&pc.vm, DATA)?, 0x1A, "data after the split");
    // The guest writes the watched page (the handler sees both writes) and a plain one.
    let mut watcher = TestDevice::watcher(handler, WATCHED);
    start_write_list(&mut pc.vm, &[WATCHED, DATA], 0x2B)?;
    ensure_eq!(pc.vm.run_with(&mut watcher), VmStop::Done(0), "stop");
    ensure_eq!(watcher.log, [(W, 0, 4), (W, 8, 4)], "writes the handler saw");
    ensure_eq!(
        [read_u32(&pc.vm, WATCHED)?, read_u32(&pc.vm, DATA)?],
        [0x2B, 0x2B],
        "data"
    );
    let result = pc.vm.pgm_mut().deregister_handler(handler);
    apply(&mut pc.vm, result)?;
    ensure!(
        pc.vm.pgm().is_mapped_large(gpa(BLOCK)),
        "removing the handler did not merge the block"
    );
    ensure_eq!(
        guest_load(&mut pc.vm, WATCHED)?,
        VmStop::Done(0x2B),
        "guest read after the merge"
    );
    Ok(())
}

/// With the A20 gate off, guest accesses at 1 MiB + x reach x; with it on, they do not.
pub fn a20_gate_wraps_accesses_at_one_megabyte(host: &'static Host) -> TestResult {
    const LOW: u64 = 0x5000;
    const HIGH: u64 = 0x10_0000 + LOW;
    let mut pc = pc(host, Above4G::No)?;
    let invalidation = pc.vm.pgm_mut().set_a20(false);
    flush(&mut pc.vm, invalidation)?;
    guest_write(&mut pc.vm, &[HIGH], 0xA20_0FF)?;
    ensure_eq!(
        [read_u32(&pc.vm, LOW)?, read_u32(&pc.vm, HIGH)?],
        [0xA20_0FF, 0],
        "gate off: low, high"
    );
    ensure_eq!(
        guest_load(&mut pc.vm, HIGH)?,
        VmStop::Done(0xA20_0FF),
        "gate off: guest read at 1 MiB + x"
    );
    let invalidation = pc.vm.pgm_mut().set_a20(true);
    flush(&mut pc.vm, invalidation)?;
    guest_write(&mut pc.vm, &[HIGH], 0xA20_011)?;
    ensure_eq!(
        [read_u32(&pc.vm, LOW)?, read_u32(&pc.vm, HIGH)?],
        [0xA20_0FF, 0xA20_011],
        "gate on: low, high"
    );
    ensure_eq!(
        guest_load(&mut pc.vm, LOW)?,
        VmStop::Done(0xA20_0FF),
        "gate on: guest read at x"
    );
    Ok(())
}

/// A guest that needs more frames than its VM may have is stopped with the out-of-memory
/// diagnostic; what it wrote before stays, and other VMs run on. The stop is a pause, as the
/// seed's VM_FF_PGM_NO_MEMORY suspend: once the limit is raised, the same vCPU runs on from
/// the access that stopped it and finishes.
pub fn out_of_frames_pauses_only_that_vm_until_frames_are_back(host: &'static Host) -> TestResult {
    const BASE: u64 = 0x60_0000;
    const ALLOWED: u64 = 5;
    let mut pc = pc(host, Above4G::No)?;
    let regs = GuestRegisters {
        rsi: BASE,
        rcx: 20,
        rdx: PAGE_SIZE,
        rdi: 0x100,
        ..Default::default()
    };
    pc.vm
        .start(&programs::write_pages(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    let limit = pc.vm.stats().private_frames() + ALLOWED;
    pc.vm.pgm_mut().set_frame_limit(Some(limit));
    let stop = pc.vm.run();
    let diagnostic = stopped(stop)?;
    ensure_eq!(diagnostic.cause, StopCause::OutOfMemory, "cause");
    ensure_eq!(
        diagnostic.gpa,
        Some(gpa(BASE + ALLOWED * PAGE_SIZE)),
        "guest-physical address"
    );
    ensure_eq!(pc.vm.stats().private_frames(), limit, "frames the VM holds");
    for i in 0..ALLOWED {
        ensure_eq!(
            read_u32(&pc.vm, BASE + i * PAGE_SIZE)?,
            0x100 + i as u32,
            "data written before"
        );
    }
    let mut other = pc::pc(host, Above4G::No)?;
    other
        .vm
        .start(&programs::done(), CODE, GuestRegisters::default())
        .map_err(|e| format!("{e}"))?;
    ensure_eq!(other.vm.run(), VmStop::Done(0x600D_F00D), "another VM");
    pc.vm.pgm_mut().set_frame_limit(None);
    ensure_eq!(pc.vm.run(), VmStop::Done(0), "the resumed VM");
    for i in 0..20 {
        ensure_eq!(
            read_u32(&pc.vm, BASE + i * PAGE_SIZE)?,
            0x100 + i as u32,
            "data written before and after the pause"
        );
    }
    Ok(())
}
