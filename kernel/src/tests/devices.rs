//! The virtual PC seen from a guest: CPUID, the MSR policy (#GP for what it refuses), the
//! port bus (UART, fw_cfg, ACPI PM timer, A20 port, an unclaimed port) and the test exit.

use alloc::format;
use alloc::vec::Vec;

use devices::cpuid::SIGNATURE;

use super::{gpa, new_vm, TestResult, CODE};
use crate::arch::guests::programs;
use crate::arch::registers::GuestRegisters;
use crate::vm::devices::MachineSpec;
use crate::vm::VmStop;
use crate::Host;

/// Where the host puts the guest's GDT, its pseudo-descriptors, the IDT and the results.
const GDT: u64 = 0x1000;
const GDTR: u64 = 0x1800;
const IDT: u64 = 0x2000;
const RESULTS: u64 = 0x3000;
/// The vector whose gate the programs' handler (at offset 2) is: #GP in `pc_devices`, the
/// PIC's IRQ 0 in `pic_timer`, the APIC's vector in `apic_timer`.
const GP_VECTOR: u64 = 13;
const IRQ0_VECTOR: u64 = 0x20;
const APIC_VECTOR: u64 = 0x40;
const HANDLER_OFFSET: u64 = 2;

/// A flat GDT (null, 32-bit code at 0x08, data at 0x10), its pseudo-descriptor and the IDT's
/// (at GDTR + 8), and an IDT whose only present gate is `vector`'s, to the program's handler.
fn descriptor_tables(vector: u64) -> Vec<(u64, Vec<u8>)> {
    let gdt: [u64; 3] = [0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];
    let gdt_bytes = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    let idt_limit = (vector + 1) * 8 - 1;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&(gdt.len() as u16 * 8 - 1).to_le_bytes());
    pseudo.extend_from_slice(&(GDT as u32).to_le_bytes());
    pseudo.extend_from_slice(&[0, 0]);
    pseudo.extend_from_slice(&(idt_limit as u16).to_le_bytes());
    pseudo.extend_from_slice(&(IDT as u32).to_le_bytes());
    let handler = CODE + HANDLER_OFFSET;
    // A present 32-bit interrupt gate to CS 0x08.
    let gate = (handler & 0xFFFF) | (0x08 << 16) | ((0x8E00 | (handler & 0xFFFF_0000)) << 32);
    Vec::from([
        (IDT + vector * 8, gate.to_le_bytes().to_vec()),
        (GDT, gdt_bytes),
        (GDTR, pseudo),
    ])
}

/// A PC-like VM with `program` loaded, the descriptor tables for `vector` written, and EDI at
/// the results.
fn prepared_vm(
    host: &'static Host,
    program: crate::arch::guests::GuestProgram<'static>,
    vector: u64,
) -> Result<crate::vm::Vcpu<'static>, alloc::string::String> {
    let vm = new_vm(host, &super::PC_RAM)?;
    with_tables(vm, program, vector)
}

/// The `N` bytes the guest program left at [`RESULTS`].
fn guest_results<const N: usize>(vm: &crate::vm::Vcpu<'_>) -> Result<[u8; N], alloc::string::String> {
    let mut bytes = [0u8; N];
    vm.pgm()
        .read_phys(gpa(RESULTS), &mut bytes)
        .map_err(|e| format!("{e}"))?;
    Ok(bytes)
}

/// [`prepared_vm`] for a machine described by `spec`.
fn vm_with_tables(
    host: &'static Host,
    program: crate::arch::guests::GuestProgram<'static>,
    vector: u64,
    spec: &MachineSpec,
) -> Result<crate::vm::Vcpu<'static>, alloc::string::String> {
    let vmx = host.virt().map_err(|e| format!("{e}"))?;
    let vm = crate::vm::Vcpu::new_machine(vmx, &host.phys, &super::PC_RAM, false, spec)
        .map_err(|e| format!("VM creation: {e}"))?;
    with_tables(vm, program, vector)
}

/// `vm` with the descriptor tables for `vector` written and `program` loaded, EDI at the
/// results.
fn with_tables(
    vm: crate::vm::Vcpu<'static>,
    program: crate::arch::guests::GuestProgram<'static>,
    vector: u64,
) -> Result<crate::vm::Vcpu<'static>, alloc::string::String> {
    with_tables_and(vm, program, vector, GuestRegisters::default())
}

/// [`with_tables`] with the registers `regs` (RDI aside, which points at the results).
fn with_tables_and(
    mut vm: crate::vm::Vcpu<'static>,
    program: crate::arch::guests::GuestProgram<'static>,
    vector: u64,
    regs: GuestRegisters,
) -> Result<crate::vm::Vcpu<'static>, alloc::string::String> {
    for (at, bytes) in descriptor_tables(vector) {
        let invalidation = vm
            .pgm_mut()
            .write_phys(gpa(at), &bytes)
            .map_err(|e| format!("{e}"))?;
        vm.flush(invalidation).map_err(|e| format!("{e}"))?;
    }
    let regs = GuestRegisters { rdi: RESULTS, ..regs };
    vm.start(&program, CODE, regs)
        .map_err(|e| format!("start: {e}"))?;
    Ok(vm)
}

/// The PIT's channel 0 raises IRQ 0 through the PIC: a guest halted with interrupts on wakes
/// for each one, and an interrupt that comes while they are off waits (interrupt-window
/// exit) and is taken right after STI.
pub fn the_pit_interrupts_a_halted_guest_through_the_pic(host: &'static Host) -> TestResult {
    // The spin with interrupts off lasts two periods of the PIT (1 ms each), in TSC ticks.
    let spin = GuestRegisters {
        rbp: crate::arch::clock::tsc_hz() / 500,
        ..GuestRegisters::default()
    };
    let vm = new_vm(host, &super::PC_RAM)?;
    let mut vm = with_tables_and(vm, programs::pic_timer(), IRQ0_VECTOR, spin)?;
    let started = crate::arch::ticks();
    let stop = vm.run();
    let elapsed = crate::arch::ticks() - started;
    let VmStop::TestExit(after) = stop else {
        return Err(format!("stop: {stop:?}"));
    };
    let before: [u8; 4] = guest_results(&vm)?;
    let before = u32::from_le_bytes(before);
    ensure!(before >= 10, "interrupts before the spin: {before}");
    // At least the one that waited; another may follow if a period ran out meanwhile.
    ensure!(
        after > before,
        "no interrupt after STI: {before} before, {after} after"
    );
    ensure!(vm.exits.interrupt_windows >= 1, "no interrupt-window exit");
    // Each interrupt wakes a halted guest, but one that comes before the guest halts again is
    // taken without a halt (QEMU's TCG runs the guest's loop slowly against the 1 ms period).
    ensure!(vm.exits.halts >= 1, "HLT exits: {}", vm.exits.halts);
    ensure_eq!(vm.exits.injected, u64::from(after), "interrupts injected");
    // Ten periods of 1193 PIT clocks (10 ms) at least.
    let period = crate::arch::clock::tsc_hz() / 1000;
    ensure!(
        elapsed >= 10 * period,
        "ran {elapsed} ticks, 10 periods are {}",
        10 * period
    );
    Ok(())
}

/// The local APIC's timer in one-shot, periodic and TSC-deadline modes, self IPIs through the
/// xAPIC ICR and the x2APIC SELF IPI MSR, EOI through the page and the MSR: each interrupt
/// wakes the halted guest once.
pub fn the_local_apic_timer_and_self_ipis_interrupt_the_guest(host: &'static Host) -> TestResult {
    // Timer periods of 10,000 counts in Bochs, where that is thousands of instructions; as
    // many more as the backend's timer tests scale by elsewhere.
    let period = GuestRegisters {
        rbp: 10_000 * super::backend::TICK_SCALE,
        ..GuestRegisters::default()
    };
    let vm = new_vm(host, &super::PC_RAM)?;
    let mut vm = with_tables_and(vm, programs::apic_timer(), APIC_VECTOR, period)?;
    let stop = vm.run();
    ensure_eq!(
        stop,
        VmStop::TestExit(9),
        "stop (the exit code counts the interrupts)"
    );
    let versions: [u8; 8] = guest_results(&vm)?;
    let version = devices::lapic::VERSION.to_le_bytes();
    ensure_eq!(&versions[..4], &version[..], "xAPIC version");
    ensure_eq!(&versions[4..], &version[..], "x2APIC version");
    ensure_eq!(vm.exits.injected, 9, "interrupts injected");
    ensure!(vm.exits.halts >= 7, "HLT exits: {}", vm.exits.halts);
    Ok(())
}

pub fn cpuid_msrs_and_ports_behave_as_the_policy_and_devices_say(host: &'static Host) -> TestResult {
    let mut vm = prepared_vm(host, programs::pc_devices(), GP_VECTOR)?;
    let stop = vm.run();
    ensure_eq!(stop, VmStop::TestExit(0x11), "stop");
    let results: [u8; 60] = guest_results(&vm)?;
    let dword = |i: usize| u32::from_le_bytes(results[4 * i..4 * i + 4].try_into().unwrap());
    let signature: Vec<u8> = (0..3).flat_map(|i| dword(i).to_le_bytes()).collect();
    ensure_eq!(&signature[..], &SIGNATURE[..], "hypervisor signature");
    ensure!(dword(3) & (1 << 31) != 0, "CPUID.1:ECX.hypervisor set");
    ensure!(dword(3) & (1 << 5) == 0, "CPUID.1:ECX.VMX clear");
    ensure!(dword(3) & (1 << 21) != 0, "CPUID.1:ECX.x2APIC offered");
    ensure_eq!(dword(4) >> 24, 0, "APIC ID of vCPU 0");
    ensure_eq!(dword(5), 0xFEE0_0900, "APIC base: enabled, BSP");
    ensure_eq!(dword(6), 0x0606_0606, "PAT read back");
    ensure_eq!(dword(7), 0, "EFER of a 32-bit guest");
    ensure_eq!(dword(8), 0x1234_5678, "LSTAR read back");
    ensure_eq!(
        dword(9),
        3,
        "#GPs: SPEC_CTRL, an undefined PAT type, a non-canonical LSTAR"
    );
    let line = vm.devices().last_console_line();
    ensure_eq!(line.as_str(), "ok", "console line");
    ensure_eq!(dword(10), 1, "fw_cfg CPU count");
    ensure_eq!(dword(11), 0xFF, "an unclaimed port");
    ensure!(dword(13) != dword(12), "the PM timer moves");
    ensure_eq!(dword(14), 0x02, "port 0x92: A20 open");
    ensure_eq!(vm.devices().unclaimed_ports(), [(0x80, 1)], "unclaimed ports");
    ensure_eq!(vm.exits.cpuid, 2, "CPUID exits");
    ensure_eq!(vm.exits.msr, 9, "MSR exits");
    ensure_eq!(vm.exits.injected, 3, "events injected");
    Ok(())
}

/// INS and OUTS with and without REP, up and down: each element is one exit, emulated through
/// the port bus and guest memory, and REP resumes the instruction until RCX runs out.
pub fn string_port_io_moves_each_element_between_memory_and_the_port(host: &'static Host) -> TestResult {
    const LINE: u64 = RESULTS + 0x100;
    let mut vm = prepared_vm(host, programs::string_io(), GP_VECTOR)?;
    let invalidation = vm
        .pgm_mut()
        .write_phys(gpa(LINE), b"hello\n")
        .map_err(|e| format!("{e}"))?;
    vm.flush(invalidation).map_err(|e| format!("{e}"))?;
    let stop = vm.run();
    ensure_eq!(stop, VmStop::TestExit(0), "stop (ECX after the REPs)");
    let results: [u8; 8] = guest_results(&vm)?;
    ensure_eq!(&results[..4], &[0xFF; 4][..], "REP INSW from an unclaimed port");
    let esi = u32::from_le_bytes(results[4..].try_into().unwrap());
    ensure_eq!(u64::from(esi), RESULTS - 4, "ESI after OUTSD stepped down");
    let line = vm.devices().last_console_line();
    ensure_eq!(line.as_str(), "hello", "console line");
    ensure_eq!(
        vm.devices().unclaimed_ports(),
        [(0x80, 3)],
        "unclaimed port accesses: two words in, one dword out"
    );
    ensure_eq!(vm.exits.emulated, 9, "emulated elements: 6 + 2 + 1");
    Ok(())
}

/// A guest told it runs on AMD (`MachineSpec::vendor`) on this Intel CPU: its SYSCALL outside
/// 64-bit code raises #UD on the CPU, and the hypervisor carries it out as AMD's CPUs do
/// (legacy mode: EIP from STAR, CS from STAR[47:32], ECX the return address, IF cleared); a
/// #UD of another instruction still reaches the guest.
pub fn syscall_outside_64_bit_code_is_emulated_for_an_amd_guest(host: &'static Host) -> TestResult {
    const UD_VECTOR: u64 = 6;
    let spec = MachineSpec {
        vendor: Some(*b"AuthenticAMD"),
        ..MachineSpec::default()
    };
    let mut vm = vm_with_tables(host, programs::syscall_legacy(), UD_VECTOR, &spec)?;
    let stop = vm.run();
    ensure_eq!(
        stop,
        VmStop::TestExit(1),
        "stop (the exit code counts the guest's #UDs)"
    );
    let results: [u8; 8] = guest_results(&vm)?;
    let dword = |i: usize| u32::from_le_bytes(results[4 * i..4 * i + 4].try_into().unwrap());
    let mut around = [0u8; 3];
    vm.pgm()
        .read_phys(gpa(u64::from(dword(0)) - 2), &mut around)
        .map_err(|e| format!("{e}"))?;
    ensure_eq!(
        around,
        [0x0F, 0x05, 0xF4],
        "ECX: just after the SYSCALL, at the HLT"
    );
    ensure_eq!(dword(1) & (1 << 9), 0, "IF cleared by the SYSCALL");
    ensure_eq!(vm.exits.injected, 1, "the UD2's #UD reinjected");
    Ok(())
}

/// Neither VMX nor SVM switches the x87/SSE registers: a VM loads XMM0 with a pattern and
/// stops, a second VM on the same CPU stores its XMM0, and finds its own (reset) zeros, not
/// the first VM's pattern; the first VM, run again, still has it.
pub fn vector_registers_stay_with_their_vm(host: &'static Host) -> TestResult {
    const PATTERN: u64 = 0x4000;
    let mut first = new_vm(host, &super::PC_RAM)?;
    let invalidation = first
        .pgm_mut()
        .write_phys(gpa(PATTERN), &[0xA5; 16])
        .map_err(|e| format!("{e}"))?;
    first.flush(invalidation).map_err(|e| format!("{e}"))?;
    let load = GuestRegisters {
        rsi: PATTERN,
        ..GuestRegisters::default()
    };
    first
        .start(&programs::xmm_load(), CODE, load)
        .map_err(|e| format!("start: {e}"))?;
    ensure_eq!(first.run(), VmStop::Done(0), "the first VM's stop");
    let store = GuestRegisters {
        rdi: RESULTS,
        ..GuestRegisters::default()
    };
    let mut second = new_vm(host, &super::PC_RAM)?;
    second
        .start(&programs::xmm_store(), CODE, store)
        .map_err(|e| format!("start: {e}"))?;
    ensure_eq!(second.run(), VmStop::Done(0), "the second VM's stop");
    let seen: [u8; 16] = guest_results(&second)?;
    ensure_eq!(seen, [0; 16], "the second VM's XMM0");
    first
        .start(&programs::xmm_store(), CODE, store)
        .map_err(|e| format!("start: {e}"))?;
    ensure_eq!(first.run(), VmStop::Done(0), "the first VM's second stop");
    let seen: [u8; 16] = guest_results(&first)?;
    ensure_eq!(seen, [0xA5; 16], "the first VM's XMM0, kept");
    Ok(())
}

/// `program` as an i386 ELF executable with a Multiboot header: one segment at `at` holding
/// the header (12 bytes) and then the code, entered just after the header.
fn multiboot_image(program: &[u8], at: u32) -> Vec<u8> {
    const HEADER: usize = 0x60;
    let mut elf = alloc::vec![0u8; HEADER];
    elf[..7].copy_from_slice(&[0x7F, b'E', b'L', b'F', 1, 1, 1]);
    elf[16..18].copy_from_slice(&2u16.to_le_bytes());
    elf[18..20].copy_from_slice(&3u16.to_le_bytes());
    elf[24..28].copy_from_slice(&(at + 12).to_le_bytes());
    elf[28..32].copy_from_slice(&52u32.to_le_bytes());
    elf[42..44].copy_from_slice(&32u16.to_le_bytes());
    elf[44..46].copy_from_slice(&1u16.to_le_bytes());
    let size = (12 + program.len()) as u32;
    for (i, value) in [1, HEADER as u32, at, at, size, size].iter().enumerate() {
        elf[52 + 4 * i..56 + 4 * i].copy_from_slice(&value.to_le_bytes());
    }
    let magic = loader::multiboot::HEADER_MAGIC;
    elf.extend_from_slice(&magic.to_le_bytes());
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&0u32.wrapping_sub(magic).to_le_bytes());
    elf.extend_from_slice(program);
    elf
}

/// The Multiboot loader through pgm: the image's segment lands at its address, the guest
/// starts in 32-bit protected mode with the magic in EAX and the boot information in EBX, and
/// reads its memory size, command line and module from it. A truncated image is refused and
/// loads nothing.
pub fn a_multiboot_image_starts_with_its_boot_information(host: &'static Host) -> TestResult {
    const AT: u32 = 0x20_0000;
    let image = multiboot_image(programs::multiboot_probe().code, AT);
    let mut vm = new_vm(host, &super::PC_RAM)?;
    let truncated = vm.load_multiboot(&image[..image.len() - 8], "x", None);
    ensure!(truncated.is_err(), "a truncated image loaded");
    ensure_eq!(
        vm.stats().allocated_pages,
        0,
        "pages allocated by the refused load"
    );
    let environment = crate::vm::load::kvm_unit_tests_environment(1, 16);
    vm.load_multiboot(&image, "quiet", Some(("env", environment.as_bytes())))
        .map_err(|e| format!("load: {e}"))?;
    let stop = vm.run();
    ensure_eq!(stop, VmStop::TestExit(0x2a), "stop");
    let seen: [u8; 12] = guest_results(&vm)?;
    let dword = |i: usize| u32::from_le_bytes(seen[4 * i..4 * i + 4].try_into().unwrap());
    ensure_eq!(dword(0), 15 * 1024, "mem_upper in KiB (15 MiB from 1 MiB)");
    ensure_eq!(dword(1), u32::from(b'q'), "the command line");
    ensure_eq!(dword(2), 1, "modules");
    let map = vm.memory_map();
    ensure_eq!(
        map.len(),
        2,
        "memory map entries (RAM below 640 KiB and from 1 MiB)"
    );
    Ok(())
}

/// IA32_TSC_ADJUST (SDM 17.17.3), which CPUID offers: it reads 0 at first, writing it moves
/// the TSC by the change, and writing the TSC moves it by as much as the TSC moved.
pub fn tsc_adjust_moves_with_the_tsc(host: &'static Host) -> TestResult {
    const CLOSE: u64 = 1_000_000;
    let mut vm = prepared_vm(host, programs::tsc_adjust_probe(), GP_VECTOR)?;
    let stop = vm.run();
    ensure_eq!(stop, VmStop::TestExit(0x3b), "stop");
    let results: [u8; 24] = guest_results(&vm)?;
    let qword = |i: usize| u64::from_le_bytes(results[8 * i..8 * i + 8].try_into().unwrap());
    ensure_eq!(qword(0), 0, "TSC_ADJUST at first");
    let moved = qword(1);
    ensure!(
        (1 << 32..(1 << 32) + CLOSE).contains(&moved),
        "the TSC moved by {moved:#x} across TSC_ADJUST = 2^32"
    );
    let sum = qword(2);
    ensure!(
        ((1 << 32) - CLOSE..=1 << 32).contains(&sum),
        "TSC_ADJUST + TSC before zeroing the TSC: {sum:#x}, not just under 2^32"
    );
    Ok(())
}

/// A bzImage as the kernel's build lays it out, small: one setup sector after the boot
/// sector, then the protected-mode part: `program` at its 64-bit entry (offset 0x200). It
/// decompresses (so its header says) to 2 MiB and needs 1 MiB there.
fn bzimage(program: &[u8]) -> Vec<u8> {
    let mut payload = alloc::vec![0u8; 0x200];
    payload.extend_from_slice(program);
    payload.resize(payload.len().next_multiple_of(16), 0);
    let mut image = alloc::vec![0u8; 1024];
    let mut put = |at: usize, bytes: &[u8]| image[at..at + bytes.len()].copy_from_slice(bytes);
    put(0x1F1, &[1]);
    put(0x1F4, &((payload.len() / 16) as u32).to_le_bytes());
    put(0x1FE, &0xAA55u16.to_le_bytes());
    put(0x200, &[0xEB, 0x6A]);
    put(0x202, b"HdrS");
    put(0x206, &0x020Fu16.to_le_bytes());
    put(0x22C, &0x7FFF_FFFFu32.to_le_bytes());
    put(0x230, &0x20_0000u32.to_le_bytes());
    put(0x234, &[1]);
    put(0x236, &1u16.to_le_bytes());
    put(0x238, &255u32.to_le_bytes());
    put(0x258, &0x20_0000u64.to_le_bytes());
    put(0x260, &0x10_0000u32.to_le_bytes());
    image.extend_from_slice(&payload);
    image
}

/// The Linux loader through pgm: a bzImage's 64-bit entry runs in long mode on the loader's
/// identity map, with CS = __BOOT_CS, DS and SS = __BOOT_DS and RSI = the zero page, whose
/// e820 table is the VM's memory map and which names the initrd where it was written. A
/// truncated image and a command line past the kernel's limit are refused and load nothing.
pub fn a_linux_bzimage_starts_at_its_64_bit_entry(host: &'static Host) -> TestResult {
    use loader::linux::{BOOT_CS, BOOT_DS, PAGE_TABLES, ZERO_PAGE};
    let image = bzimage(programs::linux_entry_probe().code);
    let mut vm = new_vm(host, &super::PC_RAM)?;
    let truncated = vm.load_linux(&image[..image.len() - 16], "", None);
    ensure!(truncated.is_err(), "a truncated image loaded");
    let long = "x".repeat(256);
    ensure!(
        vm.load_linux(&image, &long, None).is_err(),
        "an overlong command line loaded"
    );
    ensure_eq!(
        vm.stats().allocated_pages,
        0,
        "pages allocated by the refused loads"
    );
    let initrd = [0x5Au8; 100];
    vm.load_linux(&image, "console=ttyS0", Some(&initrd))
        .map_err(|e| format!("load: {e}"))?;
    let stop = vm.run();
    ensure_eq!(stop, VmStop::TestExit(0x2b), "stop");
    let seen: [u8; 24] = guest_results(&vm)?;
    let dword = |i: usize| u32::from_le_bytes(seen[4 * i..4 * i + 4].try_into().unwrap());
    ensure_eq!(dword(0), u32::from(BOOT_CS), "CS");
    ensure_eq!(dword(1), u32::from(BOOT_DS), "DS");
    ensure_eq!(dword(2), u32::from(BOOT_DS), "SS");
    ensure_eq!(u64::from(dword(3)), ZERO_PAGE, "RSI");
    ensure_eq!(dword(4) as usize, vm.memory_map().len(), "e820 entries");
    ensure_eq!(u64::from(dword(5)), PAGE_TABLES, "CR3");
    let mut ramdisk = [0u8; 8];
    vm.pgm()
        .read_phys(gpa(ZERO_PAGE + 0x218), &mut ramdisk)
        .map_err(|e| format!("{e}"))?;
    let at = u64::from(u32::from_le_bytes(ramdisk[..4].try_into().unwrap()));
    ensure_eq!(
        u32::from_le_bytes(ramdisk[4..].try_into().unwrap()),
        100,
        "initrd size"
    );
    let mut written = [0u8; 100];
    vm.pgm()
        .read_phys(gpa(at), &mut written)
        .map_err(|e| format!("{e}"))?;
    ensure_eq!(written, initrd, "the initrd where the zero page says");
    Ok(())
}

/// On a machine that models a PC's unassigned space, a read there gives all ones and a write
/// goes nowhere, and the guest runs on; on the memory core's test machines (the default) the
/// same access stops the VM, as their tests want.
pub fn unassigned_space_reads_all_ones_on_a_pc(host: &'static Host) -> TestResult {
    let vmx = host.virt().map_err(|e| format!("{e}"))?;
    let spec = crate::vm::devices::MachineSpec {
        unassigned_reads_ones: true,
        ..crate::vm::devices::MachineSpec::default()
    };
    let mut vm = crate::vm::Vcpu::new_machine(vmx, &host.phys, &super::PC_RAM, false, &spec)
        .map_err(|e| format!("VM: {e}"))?;
    let regs = GuestRegisters {
        rdi: RESULTS,
        ..GuestRegisters::default()
    };
    vm.start(&programs::touch_unassigned(), CODE, regs)
        .map_err(|e| format!("start: {e}"))?;
    ensure_eq!(vm.run(), VmStop::TestExit(0x55), "stop");
    let value: [u8; 4] = guest_results(&vm)?;
    ensure_eq!(u32::from_le_bytes(value), u32::MAX, "the read");
    ensure_eq!(
        vm.exit_costs.of(crate::vm::exits::ExitKind::Unassigned).count,
        2,
        "unassigned-space exits measured (the read and the write)"
    );
    let mut strict = new_vm(host, &super::PC_RAM)?;
    strict
        .start(&programs::touch_unassigned(), CODE, regs)
        .map_err(|e| format!("start: {e}"))?;
    let stop = strict.run();
    ensure!(
        matches!(stop, VmStop::Stopped(d) if d.cause == crate::vm::StopCause::NotGuestMemory),
        "the memory core's machine: {stop:?}"
    );
    Ok(())
}
