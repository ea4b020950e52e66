//! Hostile guests: a guest that flips the A20 gate while it writes across 1 MiB, probes every
//! page of its layout and random addresses up to the physical-address width, runs random bytes
//! against a device, keeps its page tables in MMIO or in a page it gave to the balloon, and has
//! the instruction being emulated rewritten under it. In each the host must not panic, every
//! run must end in a clean stop or with a diagnostic, and the in-kernel EPT audit (the same
//! checks as pgm's host tests, on real memory) must find nothing afterwards.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use pgm::frames::HostMemory;
use pgm::{Access, HostPhysAddr, PAGE_SIZE};

use super::pc::{self, pc, read_bytes, read_u32, read_u64, Above4G, TestDevice};
use super::preemption::outcome_name;
use super::{gpa, new_vm, TestResult, XorShift, CODE};
use crate::arch::guests::{programs, GuestMode, GuestProgram};
use crate::arch::memory::{self, PhysMap};
use crate::arch::registers::GuestRegisters;
use crate::println;
use crate::vm::budget::Budget;
use crate::vm::{Diagnostic, StopCause, Vcpu, VmMemory, VmStop};
use crate::Host;

/// Audits the VM's EPT against the host's frame allocator; fails the test on any finding.
pub(super) fn audit(vm: &Vcpu<'static>, after: &str) -> TestResult {
    audit_memory(&vm.memory(), after)
}

/// Audits the EPT of the VM whose memory is `vm_memory` (see [`audit`]).
pub(super) fn audit_memory(vm_memory: &VmMemory, after: &str) -> TestResult {
    let report = vm_memory.lock().audit(memory::is_allocated);
    ensure!(
        report.is_clean(),
        "EPT audit after {after}: {} finding(s): {:?}",
        report.findings.len(),
        report.findings
    );
    println!(
        "  audit after {after}: {} pages mapped, {} frames held, clean",
        report.mapped_pages, report.held_frames
    );
    Ok(())
}

/// The device was called only for its own handler and only inside its range.
fn device_kept_to_its_range(device: &TestDevice) -> TestResult {
    ensure!(
        device.foreign_calls == 0,
        "the device was called for another handler"
    );
    ensure!(
        device
            .log
            .iter()
            .all(|&(_, offset, len)| offset + len as u64 <= pc::DEVICE_SIZE),
        "the device saw an access outside its range"
    );
    Ok(())
}

/// Gives the VM `ticks` more to run (its limit counts all runs so far).
fn allow(vm: &mut Vcpu<'static>, ticks: u64) {
    vm.set_budget(Budget::sliced(ticks, vm.ticks_used() + ticks));
}

/// (a) The guest flips the A20 gate through port 0x92 64 times, writing at 0x100010 (0x10 while
/// closed) and across the 1 MiB boundary each time, and reads 0x10 back: every read sees the
/// write of the last iteration the gate was closed, memory ends as the PC would leave it, and
/// the gate's aliases leave nothing behind.
pub fn a20_gate_flipped_through_port_0x92_while_writing_across_1_mib(host: &'static Host) -> TestResult {
    const ITERATIONS: u64 = 64;
    const RESULTS: u64 = 0x20_0000;
    let mut vm = new_vm(host, &[(0, 16 << 20)])?;
    let regs = GuestRegisters {
        rbx: ITERATIONS,
        rdi: RESULTS,
        ..GuestRegisters::default()
    };
    vm.start(&programs::a20_toggle_writes(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    let stop = vm.run();
    ensure!(matches!(stop, VmStop::Done(0)), "the guest ended with {stop:?}");
    ensure_eq!(vm.exits.port_io, 2 * ITERATIONS, "port 0x92 exits (IN and OUT)");
    for i in 1..=ITERATIONS {
        // Odd iterations run with the gate closed: their write reached 0x10.
        let expected = if i % 2 == 1 { i } else { i - 1 } as u32;
        ensure_eq!(
            read_u32(&vm, RESULTS + 4 * i)?,
            expected,
            "read-back of an iteration"
        );
    }
    let last = ITERATIONS as u16;
    ensure_eq!(
        read_u32(&vm, 0x10_0010)?,
        ITERATIONS as u32,
        "0x100010 (gate open at the end)"
    );
    ensure_eq!(
        read_u32(&vm, 0x10)?,
        ITERATIONS as u32 - 1,
        "0x10 (the last closed-gate write)"
    );
    ensure_eq!(
        u16::from_le_bytes(read_bytes(&vm, 0xF_FFFE)?),
        last,
        "below 1 MiB"
    );
    ensure_eq!(u16::from_le_bytes(read_bytes(&vm, 0x10_0000)?), last, "at 1 MiB");
    ensure_eq!(
        u16::from_le_bytes(read_bytes(&vm, 0)?),
        last - 1,
        "at 0, the alias of 1 MiB"
    );
    ensure!(vm.pgm().a20_enabled(), "the gate ends open");
    audit(&vm, "64 flips of the A20 gate")
}

/// What a probe does at its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Probe {
    Read = 0,
    WriteBack = 1,
    Call = 2,
}

/// Where the probe list, the progress cell and the PDPT entry of the probe window live.
const PROBE_LIST: u64 = 0x20_0000;
const PROBE_PROGRESS: u64 = 0x1F_F000;
const PROBE_WINDOW_ENTRY: u64 = pc::PDPT + 5 * 8;
/// Ticks one run of the probe list may take before it is preempted (and resumed), and ticks a
/// run may take at most: a call into arbitrary bytes ends at this limit.
const PROBE_SLICE: u64 = 50_000_000 * super::backend::TICK_SCALE;
const CALL_LIMIT: u64 = 3_000_000 * super::backend::TICK_SCALE;

/// The guest-physical address width of this CPU (the guest's too: CPUID is not virtualized).
fn physical_address_bits() -> u32 {
    x86::cpuid::CpuId::new()
        .get_processor_capacity_feature_info()
        .map_or(36, |info| u32::from(info.physical_address_bits()))
}

/// True when `address` lies in a part of the PC layout (RAM, device, ROMs, MMIO2).
fn assigned(address: u64) -> bool {
    let framebuffer = pc::FRAMEBUFFER_BASE..pc::FRAMEBUFFER_BASE + pc::FRAMEBUFFER_PAGES * PAGE_SIZE;
    let above_4g = pc::ABOVE_4G_BASE..pc::ABOVE_4G_BASE + (16 << 20);
    let unassigned_low = 0xC_8000..pc::SYSTEM_ROM_BASE;
    (address < 16 << 20 && !unassigned_low.contains(&address))
        || framebuffer.contains(&address)
        || above_4g.contains(&address)
}

/// Runs the probes `list[from..]` in the PC until the list is done, restarting after each stop
/// from the probe after the one that stopped. Returns each stop with its probe's index.
fn run_probes(
    pc: &mut pc::Pc,
    device: &mut TestDevice,
    cr3: u64,
    list: &[(u64, Probe)],
    limit_per_run: u64,
) -> Result<Vec<(usize, Diagnostic)>, String> {
    let bytes: Vec<u8> = list
        .iter()
        .flat_map(|&(address, probe)| {
            address
                .to_le_bytes()
                .into_iter()
                .chain((probe as u64).to_le_bytes())
        })
        .collect();
    let written = pc.vm.pgm_mut().write_phys(gpa(PROBE_LIST), &bytes);
    pc::apply(&mut pc.vm, written)?;
    let mut stops = Vec::new();
    let mut next = 0;
    while next < list.len() {
        let regs = GuestRegisters {
            rsi: PROBE_LIST,
            rdi: list.len() as u64,
            rbx: next as u64,
            r12: PROBE_PROGRESS,
            r13: PROBE_WINDOW_ENTRY,
            ..GuestRegisters::default()
        };
        pc.vm
            .start_paged(&programs::probe_list(), CODE, pc::HIGH_HALF + CODE, cr3, regs)
            .map_err(|e| format!("restart: {e}"))?;
        allow(&mut pc.vm, limit_per_run);
        let stop = loop {
            match pc.vm.run_with(device) {
                VmStop::Preempted { .. } => continue,
                stop => break stop,
            }
        };
        match stop {
            VmStop::Done(0) => break,
            VmStop::Stopped(diagnostic) => {
                let at = read_u64(&pc.vm, PROBE_PROGRESS)? as usize;
                ensure!(
                    at >= next && at < list.len(),
                    "progress cell {at} out of {next}..{}",
                    list.len()
                );
                stops.push((at, diagnostic));
                next = at + 1;
            }
            other => return Err(format!("probe {next}..: the guest ended with {other:?}")),
        }
    }
    Ok(stops)
}

/// (b) The guest reads and writes back every page of its PC layout (16 MiB of RAM, ROM, device
/// and unassigned space below 16 MiB, the framebuffer, RAM above 4 GiB) and 256 random
/// addresses below its physical-address width, and calls into the device, the ROMs, unassigned
/// space and random addresses. Reads and writes of assigned pages complete; of unassigned ones
/// stop with `NotGuestMemory` naming that very page; calls end with a diagnostic or come back.
pub fn probing_every_page_and_random_addresses_reaches_nothing_else(host: &'static Host) -> TestResult {
    let mut pc = pc(host, Above4G::Yes)?;
    let mut device = TestDevice::new(pc.device, pc::DEVICE_BASE);
    let cr3 = pc::build_long_mode_tables(&mut pc.vm)?;
    let width = physical_address_bits();
    println!("  guest-physical address width: {width} bits");
    let mut random = XorShift(0xB0B5_1EED_0DD5_F00D);
    let mut pages: Vec<u64> = (0..16u64 << 20).step_by(PAGE_SIZE as usize).collect();
    pages.extend((0..pc::FRAMEBUFFER_PAGES).map(|page| pc::FRAMEBUFFER_BASE + page * PAGE_SIZE));
    pages.extend(
        (0..16u64 << 20)
            .step_by(16 * PAGE_SIZE as usize)
            .map(|offset| pc::ABOVE_4G_BASE + offset),
    );
    let random_addresses: Vec<u64> = (0..256).map(|_| random.below(1 << width) & !7).collect();
    let mut list: Vec<(u64, Probe)> = Vec::new();
    for &address in pages.iter().chain(&random_addresses) {
        list.push((address, Probe::Read));
        list.push((address, Probe::WriteBack));
    }
    let stops = run_probes(&mut pc, &mut device, cr3, &list, PROBE_SLICE)?;
    for (index, diagnostic) in &stops {
        let (address, probe) = list[*index];
        ensure!(
            !assigned(address),
            "{probe:?} of assigned {address:#x} stopped: {diagnostic}"
        );
        ensure_eq!(
            diagnostic.cause,
            StopCause::NotGuestMemory,
            "cause of a probe of unassigned space"
        );
        let page = diagnostic.gpa.map(|gpa| gpa.page_base().as_u64());
        ensure_eq!(
            page,
            Some(address & !(PAGE_SIZE - 1)),
            "page the diagnostic names"
        );
    }
    let unassigned = list.iter().filter(|(address, _)| !assigned(*address)).count();
    ensure_eq!(
        stops.len(),
        unassigned,
        "stops (one per probe of unassigned space)"
    );
    device_kept_to_its_range(&device)?;
    println!(
        "  {} reads and write-backs: {} completed, {} stopped with NotGuestMemory",
        list.len(),
        list.len() - stops.len(),
        stops.len()
    );
    audit(&pc.vm, "reading and writing every page")?;

    // Calls: each in a run of its own, bounded by its limit.
    let mut calls: Vec<(u64, Probe)> = [
        pc::DEVICE_BASE,
        pc::OPTION_ROM_BASE,
        0xC_8000,
        pc::SYSTEM_ROM_BASE,
    ]
    .into_iter()
    .chain(random_addresses.iter().take(32).copied())
    .map(|address| (address, Probe::Call))
    .collect();
    calls.push((pc::FRAMEBUFFER_BASE, Probe::Call));
    let mut outcomes: BTreeMap<String, u32> = BTreeMap::new();
    for call in &calls {
        let stops = run_probes(&mut pc, &mut device, cr3, core::slice::from_ref(call), CALL_LIMIT)?;
        let outcome = stops
            .first()
            .map_or("came back".into(), |(_, d)| format!("{:?}", d.cause));
        *outcomes.entry(outcome).or_default() += 1;
    }
    println!("  {} calls: {outcomes:?}", calls.len());
    audit(&pc.vm, "calls into every kind of space")
}

/// (c) 200 programs of random bytes in real and protected mode with every register, the
/// stack pointer included, pointing into the MMIO device, then a jump into the device itself.
/// Every run ends (any outcome), the device sees only accesses inside its range, and the audit
/// after the last finds nothing.
pub fn random_bytes_run_against_mmio(host: &'static Host) -> TestResult {
    const PROGRAMS: u64 = 200;
    const RUN_LIMIT: u64 = 2_000_000;
    let mut pc = pc(host, Above4G::No)?;
    let mut device = TestDevice::new(pc.device, pc::DEVICE_BASE);
    let mut random = XorShift(0x3A7F_00D5_EED0_0001);
    let mut outcomes: BTreeMap<String, u32> = BTreeMap::new();
    for index in 0..PROGRAMS {
        let code: Vec<u8> = (0..64).map(|_| random.next() as u8).collect();
        let mode = if index % 2 == 0 {
            GuestMode::Real
        } else {
            GuestMode::Flat32
        };
        let program = GuestProgram {
            name: "random bytes on MMIO",
            mode,
            code: &code,
        };
        let mut into_device = || pc::DEVICE_BASE + random.below(pc::DEVICE_SIZE);
        let regs = GuestRegisters {
            rax: into_device(),
            rbx: into_device(),
            rcx: into_device(),
            rdx: into_device(),
            rsi: into_device(),
            rdi: into_device(),
            rbp: into_device(),
            ..GuestRegisters::default()
        };
        pc.vm.start(&program, CODE, regs).map_err(|e| format!("{e}"))?;
        pc.vm
            .set_stack_pointer(into_device())
            .map_err(|e| format!("{e}"))?;
        allow(&mut pc.vm, RUN_LIMIT);
        let stop = loop {
            match pc.vm.run_with(&mut device) {
                VmStop::Preempted { .. } => continue,
                stop => break stop,
            }
        };
        *outcomes.entry(outcome_name(&stop)).or_default() += 1;
    }
    println!(
        "  {PROGRAMS} programs: {outcomes:?}; the device saw {} accesses",
        device.log.len()
    );
    device_kept_to_its_range(&device)?;
    audit(&pc.vm, "200 random programs on MMIO")?;

    // Executing the device itself: no instruction can be fetched from a page without memory.
    let jump = [0xFF, 0xE6]; // jmp esi
    let program = GuestProgram {
        name: "jump into the device",
        mode: GuestMode::Flat32,
        code: &jump,
    };
    let regs = GuestRegisters {
        rsi: pc::DEVICE_BASE,
        ..GuestRegisters::default()
    };
    let accesses_before = device.log.len();
    pc.vm.start(&program, CODE, regs).map_err(|e| format!("{e}"))?;
    allow(&mut pc.vm, RUN_LIMIT);
    let diagnostic = super::stopped(pc.vm.run_with(&mut device))?;
    ensure_eq!(
        diagnostic.cause,
        StopCause::ExecuteFromHandledPage,
        "cause of a fetch from MMIO"
    );
    ensure_eq!(diagnostic.rip, pc::DEVICE_BASE, "RIP");
    ensure_eq!(device.log.len(), accesses_before, "device accesses of the fetch");
    audit(&pc.vm, "a jump into the device")
}

/// Runs the VM to its stop, which must be for `cause` at the guest-physical page `page`.
fn expect_stop_at(
    vm: &mut Vcpu<'static>,
    device: &mut TestDevice,
    cause: StopCause,
    page: u64,
) -> TestResult {
    let diagnostic = super::stopped(vm.run_with(device))?;
    ensure_eq!(diagnostic.cause, cause, "cause");
    ensure_eq!(
        diagnostic.gpa.map(|g| g.page_base().as_u64()),
        Some(page),
        "page the diagnostic names"
    );
    Ok(())
}

/// (d) The guest's page tables in MMIO (paging turned on with CR3 in the device), and in a page
/// the host gave to the balloon under a long-mode guest: the CPU's own page walk faults, no
/// device ever sees a page-walk access, and the VM stops with a diagnostic naming the page.
pub fn page_tables_in_mmio_or_a_ballooned_page_stop_the_vm(host: &'static Host) -> TestResult {
    let mut pc = pc(host, Above4G::No)?;
    let mut device = TestDevice::new(pc.device, pc::DEVICE_BASE);
    let regs = GuestRegisters {
        rax: pc::DEVICE_BASE,
        ..GuestRegisters::default()
    };
    pc.vm
        .start(&programs::paging_from_eax(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    expect_stop_at(
        &mut pc.vm,
        &mut device,
        StopCause::PageWalkOutsideMemory,
        pc::DEVICE_BASE,
    )?;
    ensure!(
        device.log.is_empty(),
        "the device saw page-walk accesses: {:?}",
        device.log
    );
    audit(&pc.vm, "page tables in MMIO")?;

    let mut pc = pc::pc(host, Above4G::No)?;
    let cr3 = pc::build_long_mode_tables(&mut pc.vm)?;
    let ballooned = pc.vm.pgm_mut().balloon_inflate(&[gpa(pc::PDPT)]);
    pc::apply(&mut pc.vm, ballooned)?;
    pc::start_high_half(
        &mut pc.vm,
        &programs::spin_long64(),
        cr3,
        GuestRegisters::default(),
    )?;
    expect_stop_at(&mut pc.vm, &mut device, StopCause::BalloonedPage, pc::PDPT)?;
    audit(&pc.vm, "page tables in a ballooned page")
}

/// A device that, while the store to it is emulated, rewrites that store in guest RAM (as
/// another vCPU or a DMA engine could): `mov [esi], eax` becomes `mov [esi], ebx`. It logs the
/// values stored.
struct Rewriter {
    handler: pgm::handlers::HandlerId,
    phys: &'static PhysMap,
    /// Host-physical address of the ModRM byte of the store.
    modrm: HostPhysAddr,
    stores: Vec<u32>,
}

impl pgm::manager::AccessHandlers for Rewriter {
    fn access(
        &mut self,
        handler: pgm::handlers::HandlerId,
        _: pgm::GuestPhysAddr,
        access: Access,
        data: &mut [u8],
    ) -> pgm::manager::HandlerAction {
        if handler == self.handler && access == Access::Write && data.len() == 4 {
            self.stores
                .push(u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
            // ModRM 0x06 = [esi], EAX; 0x1E = [esi], EBX.
            self.phys.write(self.modrm, &[0x1E]);
        }
        pgm::manager::HandlerAction::Handled
    }
}

/// (e) The store being emulated is rewritten from another page while it is emulated: the
/// emulator acts on the bytes it fetched once (the device gets EAX), and the guest's next
/// execution runs the new instruction (EBX).
pub fn an_instruction_rewritten_while_emulated_runs_as_fetched(host: &'static Host) -> TestResult {
    const EAX: u32 = 0xAAAA_0001;
    const EBX: u32 = 0xBBBB_0002;
    let mut pc = pc(host, Above4G::No)?;
    let regs = GuestRegisters {
        rax: u64::from(EAX),
        rbx: u64::from(EBX),
        rcx: 3,
        rsi: pc::DEVICE_BASE,
        ..GuestRegisters::default()
    };
    pc.vm
        .start(&programs::rewritten_store(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    let code = pc
        .vm
        .pgm()
        .translate(gpa(CODE), Access::Read)
        .map_err(|e| format!("code page: {e:?}"))?;
    let mut device = Rewriter {
        handler: pc.device,
        phys: &host.phys,
        modrm: HostPhysAddr::new_truncate(code.as_u64() + 1),
        stores: Vec::new(),
    };
    let stop = pc.vm.run_with(&mut device);
    ensure!(matches!(stop, VmStop::Done(0)), "the guest ended with {stop:?}");
    ensure_eq!(device.stores, [EAX, EBX, EBX], "values the device got");
    ensure_eq!(
        read_bytes::<2>(&pc.vm, CODE)?,
        [0x89, 0x1E],
        "the store as rewritten"
    );
    audit(&pc.vm, "an instruction rewritten while emulated")
}
