//! Guests that would keep the CPU: spinning in every mode, counting through a hundred
//! preemptions, halting with interrupts off, a `rep stosb` longer than its budget, PAUSE and
//! MWAIT loops, random instruction bytes; a host timer that kicks a running vCPU; and the
//! harness failing a test that outlives its budget.

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;

use pgm::page::PageState;
use pgm::PAGE_SIZE;

use super::pc::{self, pc, read_bytes, Above4G, TestDevice};
use super::{gpa, new_vm, run_one, run_program, stopped, TestResult, XorShift, CODE, PC_RAM};
use crate::arch::guests::{programs, GuestMode, GuestProgram};
use crate::arch::idt;
use crate::arch::memory::{self, frames_in_use_outside_heap};
use crate::arch::registers::GuestRegisters;
use crate::arch::ticks;
use crate::println;
use crate::vm::budget::{host_deadline_hit, Budget, DEFAULT_LIMIT};
use crate::vm::exits::ExitCounts;
use crate::vm::requests::{kick_on_timer, Request, VcpuRequests};
use crate::vm::{StopCause, Vcpu, VmStop};
use crate::Host;

/// What the tests' slices, limits and kick delays (set for Bochs, whose TSC counts
/// instructions) are multiplied by on this backend, so that each stays well above the run
/// timer's lateness there ([`LATENESS`]).
const SCALE: u64 = super::backend::TICK_SCALE;
/// The slice of the spinning guests, and how often they are resumed before their limit.
const SLICE: u64 = 200_000 * SCALE;
const RESUMES: u64 = 3;
/// How far past a deadline a run may end: the exit that notices it and the way back out, and
/// the run timer's own lateness on this backend.
const LATENESS: u64 = super::backend::RUN_LATENESS;
/// TSC ticks after which the kick tests' timer fires.
const KICK_AFTER: u64 = 300_000 * SCALE;

/// Registers no spinning guest touches: each a different 64-bit pattern.
fn marked_registers() -> GuestRegisters {
    let mark = |k: u64| 0x5EED_0000_0000_0000 | (k << 32) | (k * 0x0101_0101);
    GuestRegisters {
        rax: mark(1),
        rbx: mark(2),
        rcx: mark(3),
        rdx: mark(4),
        rsi: mark(5),
        rdi: mark(6),
        rbp: mark(7),
        r8: mark(8),
        r9: mark(9),
        r10: mark(10),
        r11: mark(11),
        r12: mark(12),
        r13: mark(13),
        r14: mark(14),
        r15: mark(15),
    }
}

/// A VM whose guest spins on `jmp $` in `mode`, with marked registers; returns the VM and the
/// RIP it spins at.
fn spinning_vm(host: &'static Host, mode: GuestMode) -> Result<(Vcpu<'static>, u64), String> {
    let mut vm = new_vm(host, &PC_RAM)?;
    let regs = marked_registers();
    let rip = match mode {
        GuestMode::Real => {
            vm.start(&programs::spin_real(), CODE, regs)
                .map_err(|e| format!("{e}"))?;
            CODE
        }
        GuestMode::Flat32 => {
            vm.start(&programs::spin_flat32(), CODE, regs)
                .map_err(|e| format!("{e}"))?;
            CODE
        }
        GuestMode::Long64 => {
            let cr3 = pc::build_long_mode_tables(&mut vm)?;
            let rip = pc::HIGH_HALF + CODE;
            vm.start_paged(&programs::spin_long64(), CODE, rip, cr3, regs)
                .map_err(|e| format!("{e}"))?;
            rip
        }
    };
    Ok((vm, rip))
}

/// Checks that a run that ended at a deadline took at least `budget` ticks and at most
/// [`LATENESS`] more.
fn within(took: u64, budget: u64, what: &str) -> TestResult {
    ensure!(
        took >= budget && took <= budget + LATENESS,
        "{what} took {took} ticks for a budget of {budget}"
    );
    Ok(())
}

/// A spinning guest is preempted after each slice with RIP and registers unchanged, resumed
/// three times, then stopped by its limit; another VM runs afterwards.
fn spinning_guest_is_preempted_then_stopped(host: &'static Host, mode: GuestMode) -> TestResult {
    let (mut vm, rip) = spinning_vm(host, mode)?;
    let limit = (RESUMES + 1) * SLICE + SLICE / 2;
    vm.set_budget(Budget::sliced(SLICE, limit));
    for run in 0..=RESUMES {
        let before = vm.ticks_used();
        let stop = vm.run();
        ensure!(stop == VmStop::Preempted { rip }, "run {run}: {stop:x?}");
        ensure_eq!(*vm.regs(), marked_registers(), "registers after the preemption");
        within(vm.ticks_used() - before, SLICE, "a sliced run")?;
    }
    let diagnostic = stopped(vm.run())?;
    ensure_eq!(diagnostic.cause, StopCause::TimeBudget, "cause");
    ensure_eq!(diagnostic.rip, rip, "RIP");
    ensure_eq!(diagnostic.exit_reason, super::backend::RUN_TIMER, "exit reason");
    within(diagnostic.ticks, limit, "the VM")?;
    ensure_eq!(
        vm.exits.total,
        vm.exits.preemption_timer,
        "exits other than the preemption timer's"
    );
    drop(vm);
    let (_, stop) = run_program(host, programs::done(), GuestRegisters::default())?;
    ensure_eq!(stop, VmStop::Done(0x600D_F00D), "the next VM");
    Ok(())
}

pub fn spinning_real_mode_guest_is_preempted_then_stopped(host: &'static Host) -> TestResult {
    spinning_guest_is_preempted_then_stopped(host, GuestMode::Real)
}

pub fn spinning_protected_mode_guest_is_preempted_then_stopped(host: &'static Host) -> TestResult {
    spinning_guest_is_preempted_then_stopped(host, GuestMode::Flat32)
}

pub fn spinning_long_mode_guest_is_preempted_then_stopped(host: &'static Host) -> TestResult {
    spinning_guest_is_preempted_then_stopped(host, GuestMode::Long64)
}

/// Runs `vm` again after every preemption (at most `most` times); returns how the last run
/// ended and how many preemptions there were.
fn run_through_preemptions(vm: &mut Vcpu<'static>, most: u64) -> Result<(VmStop, u64), String> {
    for preemptions in 0..most {
        match vm.run() {
            VmStop::Preempted { .. } => {}
            stop => return Ok((stop, preemptions)),
        }
    }
    Err(format!("still running after {most} preemptions"))
}

/// A guest counting in registers ends with the same registers and RIP whether it runs
/// straight through or is preempted more than 100 times.
pub fn counting_guest_preempted_100_times_ends_with_the_exact_count(host: &'static Host) -> TestResult {
    const COUNT: u64 = 1_000_000 * SCALE;
    const COUNT_SLICE: u64 = 20_000 * SCALE;
    let start = |vm: &mut Vcpu<'static>| {
        let regs = GuestRegisters {
            rcx: COUNT,
            ..marked_registers()
        };
        vm.start(&programs::count_loop(), CODE, regs)
            .map_err(|e| format!("{e}"))
    };
    let mut straight = new_vm(host, &PC_RAM)?;
    start(&mut straight)?;
    let (stop, preemptions) = run_through_preemptions(&mut straight, 1)?;
    ensure_eq!(preemptions, 0, "preemptions of the straight run");
    let expected_ebx = (marked_registers().rbx as u32).wrapping_add(COUNT as u32);
    ensure_eq!(stop, VmStop::Done(u64::from(expected_ebx)), "straight run");
    let mut sliced = new_vm(host, &PC_RAM)?;
    start(&mut sliced)?;
    sliced.set_budget(Budget::sliced(COUNT_SLICE, DEFAULT_LIMIT));
    let (stop, preemptions) = run_through_preemptions(&mut sliced, 100_000)?;
    println!(
        "  {preemptions} preemptions; {} ticks sliced, {} straight",
        sliced.ticks_used(),
        straight.ticks_used()
    );
    ensure!(preemptions >= 100, "only {preemptions} preemptions");
    ensure_eq!(stop, VmStop::Done(u64::from(expected_ebx)), "preempted run");
    ensure_eq!(
        *sliced.regs(),
        *straight.regs(),
        "registers, preempted vs straight"
    );
    ensure_eq!(
        sliced.guest_rip(),
        straight.guest_rip(),
        "RIP, preempted vs straight"
    );
    Ok(())
}

/// HLT with interrupts off can never wake: it ends the run at once, not at the deadline.
pub fn hlt_with_interrupts_off_ends_the_run_at_once(host: &'static Host) -> TestResult {
    let mut vm = new_vm(host, &PC_RAM)?;
    vm.start(&programs::hlt_interrupts_off(), CODE, GuestRegisters::default())
        .map_err(|e| format!("{e}"))?;
    vm.set_budget(Budget::sliced(SLICE, SLICE));
    ensure_eq!(vm.run(), VmStop::Halted { rip: CODE + 1 }, "stop (after CLI)");
    ensure!(
        vm.ticks_used() < SLICE / 4,
        "the halt took {} ticks",
        vm.ticks_used()
    );
    ensure_eq!(vm.exits.preemption_timer, 0, "preemption-timer exits");
    Ok(())
}

/// `rep stosb` over 8 MiB of ZERO RAM with a budget it cannot finish in: each preemption
/// leaves RDI + RCX at the end of the fill and RIP on the instruction, the limit stops the VM
/// part-way, and memory is filled exactly up to RDI.
pub fn rep_stosb_longer_than_its_budget_is_preempted_then_stopped(host: &'static Host) -> TestResult {
    const START: u64 = 0x20_0000;
    const BYTES: u64 = 8 << 20;
    const VALUE: u8 = 0xA5;
    // Scaled less than the other tests: the fill (8 MiB, all the RAM there is) must outlast
    // its limit on this backend too.
    const FILL_SCALE: u64 = SCALE.div_ceil(20);
    const FILL_SLICE: u64 = 1_000_000 * FILL_SCALE;
    const FILL_LIMIT: u64 = 4_000_000 * FILL_SCALE;
    let mut vm = new_vm(host, &PC_RAM)?;
    let regs = GuestRegisters {
        rax: u64::from(VALUE),
        rcx: BYTES,
        rdi: START,
        ..Default::default()
    };
    vm.start(&programs::fill_bytes(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    vm.set_budget(Budget::sliced(FILL_SLICE, FILL_LIMIT));
    let rep_rip = CODE + 1; // after CLD
    let mut preemptions = 0;
    let mut last_rdi = START;
    let stop = loop {
        let stop = vm.run();
        if stop != (VmStop::Preempted { rip: rep_rip }) {
            break stop;
        }
        preemptions += 1;
        ensure_eq!(vm.regs().rdi + vm.regs().rcx, START + BYTES, "RDI + RCX");
        ensure!(vm.regs().rdi > last_rdi, "no progress in a slice");
        last_rdi = vm.regs().rdi;
    };
    let diagnostic = stopped(stop)?;
    ensure_eq!(diagnostic.cause, StopCause::TimeBudget, "cause");
    ensure_eq!(diagnostic.rip, rep_rip, "RIP");
    within(diagnostic.ticks, FILL_LIMIT, "the fill")?;
    ensure!(preemptions >= 2, "only {preemptions} preemptions");
    let (rdi, rcx) = (vm.regs().rdi, vm.regs().rcx);
    println!("  stopped after {} of {BYTES} bytes", rdi - START);
    ensure!(rcx > 0, "the fill finished within its budget");
    ensure_eq!(rdi + rcx, START + BYTES, "RDI + RCX at the stop");
    ensure_eq!(read_bytes::<1>(&vm, START)?, [VALUE], "first byte");
    ensure_eq!(read_bytes::<1>(&vm, rdi - 1)?, [VALUE], "last byte filled");
    ensure_eq!(read_bytes::<1>(&vm, rdi)?, [0], "the byte at RDI");
    let next_page = (rdi & !(PAGE_SIZE - 1)) + PAGE_SIZE;
    let state = vm.pgm().page(gpa(next_page)).map(|page| page.state());
    ensure_eq!(state, Some(PageState::Zero), "the page after RDI's");
    Ok(())
}

/// Runs `vm` again and again until it stops, which must be at its time limit of `limit` ticks
/// (within [`LATENESS`]); returns how many runs that took.
fn runs_to_the_time_limit(vm: &mut Vcpu<'static>, limit: u64, what: &str) -> Result<u64, String> {
    const MOST: u64 = 10_000;
    for runs in 1..=MOST {
        let stop = vm.run();
        if stop.is_resumable() {
            continue;
        }
        let diagnostic = stopped(stop)?;
        ensure_eq!(diagnostic.cause, StopCause::TimeBudget, "cause");
        within(diagnostic.ticks, limit, what)?;
        return Ok(runs);
    }
    Err(format!("{what}: still resumable after {MOST} runs"))
}

/// A PAUSE loop gives up its slice (PAUSE-loop exiting) where the CPU offers it, and is
/// stopped at its limit in any case.
pub fn pause_loop_yields_and_is_stopped_at_its_limit(host: &'static Host) -> TestResult {
    const PAUSE_SLICE: u64 = 2_000_000 * SCALE;
    const PAUSE_LIMIT: u64 = 1_000_000 * SCALE;
    let vmx = host.virt().map_err(|e| format!("{e}"))?;
    let mut vm = new_vm(host, &PC_RAM)?;
    vm.start(&programs::pause_loop(), CODE, GuestRegisters::default())
        .map_err(|e| format!("{e}"))?;
    vm.set_budget(Budget::sliced(PAUSE_SLICE, DEFAULT_LIMIT));
    let stop = vm.run();
    ensure!(
        matches!(stop, VmStop::Preempted { rip } if rip == CODE || rip == CODE + 2),
        "first run: {stop:?}"
    );
    if vmx.caps().pause_loop_exiting() {
        ensure_eq!(vm.exits.pause_loops, 1, "PAUSE-loop exits");
        ensure!(
            vm.ticks_used() < PAUSE_SLICE / 10,
            "the loop yielded after {} ticks",
            vm.ticks_used()
        );
    } else {
        within(
            vm.ticks_used(),
            PAUSE_SLICE,
            "the PAUSE loop without PAUSE-loop exiting",
        )?;
    }
    // The limit counts from here (without PAUSE-loop exiting the first run took a slice).
    let limit = vm.ticks_used() + PAUSE_LIMIT;
    vm.set_budget(Budget::sliced(PAUSE_SLICE, limit));
    let runs = runs_to_the_time_limit(&mut vm, limit, "the PAUSE loop")?;
    println!(
        "  {runs} more runs to the limit, {} PAUSE-loop exits",
        vm.exits.pause_loops
    );
    Ok(())
}

/// MONITOR and MWAIT exit and complete at once, so a wait loop spins through its slice and is
/// stopped at its limit.
pub fn monitor_mwait_loop_is_bounded_by_its_budget(host: &'static Host) -> TestResult {
    const WAIT_SLICE: u64 = 500_000 * SCALE;
    const WAIT_LIMIT: u64 = 1_250_000 * SCALE;
    let mut vm = new_vm(host, &PC_RAM)?;
    let regs = GuestRegisters {
        rsi: 0x9000,
        ..Default::default()
    };
    vm.start(&programs::monitor_mwait_loop(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    vm.set_budget(Budget::sliced(WAIT_SLICE, WAIT_LIMIT));
    let stop = vm.run();
    ensure!(matches!(stop, VmStop::Preempted { .. }), "first run: {stop:?}");
    within(vm.ticks_used(), WAIT_SLICE, "the first slice")?;
    let wakeups = vm.regs().rbx;
    ensure!(wakeups >= 2, "MWAIT returned {wakeups} times");
    ensure!(
        vm.exits.monitor_mwait.abs_diff(2 * wakeups) <= 2,
        "{} MONITOR/MWAIT exits for {wakeups} wake-ups",
        vm.exits.monitor_mwait
    );
    runs_to_the_time_limit(&mut vm, WAIT_LIMIT, "the wait loop")?;
    Ok(())
}

/// The host timer interrupts `vm`'s preemptions took so far: none where the backend has a
/// timer of its own (VMX), one each where the run timer is the host's (SVM).
fn run_timer_interrupts(vm: &Vcpu<'_>) -> u64 {
    if super::backend::RUN_TIMER_IS_THE_HOSTS {
        vm.exits.preemption_timer
    } else {
        0
    }
}

/// Arms the host timer to post `request` to `requests` after `ticks` TSC ticks.
fn kick_after(requests: &Arc<VcpuRequests>, request: Request, ticks: u64) -> TestResult {
    ensure!(
        kick_on_timer(requests, request, ticks),
        "the host has no local APIC timer"
    );
    Ok(())
}

/// The host's timer kicks a spinning vCPU out long before its slice ends: the host takes the
/// interrupt (once), the vCPU loop takes the posted request — a stop returns to the caller,
/// a flush is carried out and the guest goes on. The guest has interrupts enabled: Bochs 2.7
/// keeps host interrupts masked for a guest entered with IF clear (it decides the masking
/// before it marks the CPU as in the guest), which hardware does not (see the next test).
pub fn host_timer_kicks_a_running_vcpu(host: &'static Host) -> TestResult {
    const LONG_SLICE: u64 = 50_000_000 * SCALE;
    let mut vm = new_vm(host, &PC_RAM)?;
    vm.start(&programs::spin_interrupts_on(), CODE, marked_registers())
        .map_err(|e| format!("{e}"))?;
    let rip = CODE + 1; // after STI
    vm.set_budget(Budget::sliced(LONG_SLICE, DEFAULT_LIMIT));
    let requests = vm.requests();
    let interrupts = idt::timer_interrupts();
    kick_after(&requests, Request::STOP, KICK_AFTER)?;
    ensure_eq!(vm.run(), VmStop::StopRequested { rip }, "stop");
    let took = vm.ticks_used();
    println!("  kicked out after {took} ticks (timer armed for {KICK_AFTER})");
    ensure!(took < LONG_SLICE / 10, "the kick took {took} ticks");
    ensure_eq!(
        idt::timer_interrupts(),
        interrupts + 1 + run_timer_interrupts(&vm),
        "host timer interrupts"
    );
    ensure_eq!(vm.exits.external_interrupts, 1, "external-interrupt exits");
    ensure_eq!(*vm.regs(), marked_registers(), "registers");
    let invepts = vm.exits.invepts;
    vm.set_budget(Budget::sliced(2 * KICK_AFTER, DEFAULT_LIMIT));
    kick_after(&requests, Request::FLUSH, KICK_AFTER)?;
    ensure_eq!(vm.run(), VmStop::Preempted { rip }, "after a flush request");
    ensure_eq!(vm.exits.invepts, invepts + 1, "INVEPTs");
    ensure!(
        vm.exits.external_interrupts == 2,
        "external-interrupt exits: {:?}",
        vm.exits
    );
    ensure_eq!(
        idt::timer_interrupts(),
        interrupts + 2 + run_timer_interrupts(&vm),
        "host timer interrupts"
    );
    ensure!(requests.take().is_none(), "a request was left over");
    Ok(())
}

/// A kick is never lost: however the interrupt reaches the host (an external-interrupt exit
/// on hardware; the next exit of any kind in Bochs for a guest with IF clear), the stop
/// request ends the run no later than the slice would have.
pub fn a_kick_is_taken_by_the_end_of_the_slice_at_the_latest(host: &'static Host) -> TestResult {
    let (mut vm, rip) = spinning_vm(host, GuestMode::Flat32)?;
    let slice = 4 * KICK_AFTER;
    vm.set_budget(Budget::sliced(slice, DEFAULT_LIMIT));
    let interrupts = idt::timer_interrupts();
    kick_after(&vm.requests(), Request::STOP, KICK_AFTER)?;
    ensure_eq!(vm.run(), VmStop::StopRequested { rip }, "stop");
    let took = vm.ticks_used();
    println!(
        "  stopped after {took} ticks (timer armed for {KICK_AFTER}, slice {slice}); \
         external-interrupt exits {}",
        vm.exits.external_interrupts
    );
    ensure!(took <= slice + LATENESS, "the kick took {took} ticks");
    ensure_eq!(
        idt::timer_interrupts(),
        interrupts + 1 + run_timer_interrupts(&vm),
        "host timer interrupts"
    );
    ensure_eq!(*vm.regs(), marked_registers(), "registers");
    Ok(())
}

/// An inner test whose guest spins while it waits for a result that never comes.
fn waits_for_a_spinning_guest(host: &'static Host) -> TestResult {
    let (_vm, stop) = run_program(host, programs::spin_flat32(), GuestRegisters::default())?;
    ensure_eq!(stop, VmStop::Done(0), "stop");
    Ok(())
}

/// The harness stops a test's guest at the test's budget, fails the test by name with that
/// reason, and goes on with the outer test's own deadline intact.
pub fn a_test_that_outlives_its_budget_is_failed_and_the_run_goes_on(host: &'static Host) -> TestResult {
    const INNER_BUDGET: u64 = 3_000_000 * SCALE;
    let start = ticks();
    let result = run_one(
        host,
        "waits_for_a_spinning_guest",
        waits_for_a_spinning_guest,
        INNER_BUDGET,
    );
    let took = ticks() - start;
    let reason = result
        .err()
        .ok_or("the inner test passed although its guest spins")?;
    println!("  inner test: FAILED: {reason}");
    ensure!(
        reason.contains("did not finish within its budget") && reason.contains("HostDeadline"),
        "reason: {reason}"
    );
    // The inner test's VM is torn down after the deadline stopped it.
    ensure!(
        took < INNER_BUDGET + INNER_BUDGET / 10 + LATENESS,
        "the inner test took {took} ticks"
    );
    ensure!(!host_deadline_hit(), "the outer deadline was reported hit");
    Ok(())
}

/// Where the random programs' registers point: every kind of space of the PC layout.
const TARGETS: [(&str, u64, u64); 7] = [
    ("low RAM", 0, 0xA_0000),
    ("MMIO", pc::DEVICE_BASE, pc::DEVICE_SIZE),
    ("option ROM", pc::OPTION_ROM_BASE, pc::OPTION_ROM_SIZE),
    ("unassigned", 0xC_8000, 0x2_8000),
    ("system ROM", pc::SYSTEM_ROM_BASE, pc::SYSTEM_ROM_SIZE),
    ("RAM", 0x10_0000, 0xF0_0000),
    ("MMIO2", pc::FRAMEBUFFER_BASE, pc::FRAMEBUFFER_PAGES * PAGE_SIZE),
];

/// Random register values, each pointing into one of [`TARGETS`].
fn random_registers(random: &mut XorShift) -> GuestRegisters {
    let mut next = || {
        let (_, base, size) = TARGETS[random.below(TARGETS.len() as u64) as usize];
        base + random.below(size)
    };
    GuestRegisters {
        rax: next(),
        rbx: next(),
        rcx: next(),
        rdx: next(),
        rsi: next(),
        rdi: next(),
        rbp: next(),
        r8: next(),
        r9: next(),
        r10: next(),
        r11: next(),
        r12: next(),
        r13: next(),
        r14: next(),
        r15: next(),
    }
}

/// The kind of a stop, for the tally.
pub(super) fn outcome_name(stop: &VmStop) -> String {
    match stop {
        VmStop::Stopped(diagnostic) => format!("{:?}", diagnostic.cause),
        VmStop::Done(_) => "Done".into(),
        VmStop::Halted { .. } => "Halted".into(),
        VmStop::Preempted { .. } => "Preempted".into(),
        VmStop::StopRequested { .. } => "StopRequested".into(),
        VmStop::TestExit(_) => "TestExit".into(),
        VmStop::PowerOff => "PowerOff".into(),
        VmStop::Reset => "Reset".into(),
    }
}

/// 600 programs of random bytes, half in real and half in protected mode, with registers
/// pointing into RAM, MMIO, ROM, MMIO2 and unassigned space, each in a fresh PC: every one
/// ends within its budget (any outcome), the host never panics, no frame leaks, and the EPT
/// audit (on real memory, against the host's frame bitmap) finds nothing after every 8th.
/// Four instructions of the virtual PC (CPUID, RDMSR, WRMSR, HLT, STI, IN, OUT) are dropped
/// into each program at random places; the exits they make (port I/O, CPUID, MSRs, injected
/// faults, HLT) are counted over all programs, and each is reached.
pub fn random_instruction_bytes_end_within_budget(host: &'static Host) -> TestResult {
    const PROGRAMS: u64 = 600;
    const PROGRAM_BYTES: usize = 128;
    /// CPUID, RDMSR, WRMSR, HLT, STI; IN and OUT through DX.
    const DICTIONARY: [&[u8]; 7] = [
        &[0x0F, 0xA2],
        &[0x0F, 0x32],
        &[0x0F, 0x30],
        &[0xF4],
        &[0xFB],
        &[0xEC],
        &[0xEE],
    ];
    const DICTIONARY_INSERTS: usize = 4;
    const RANDOM_BUDGET: u64 = 400_000 * SCALE;
    const SEED: u64 = 0x0BAD_C0DE_5EED_1234;
    // An audit of the 16 MiB PC costs a few million ticks: every 8th program is audited.
    const AUDIT_EVERY: u64 = 8;
    let mut random = XorShift(SEED);
    let mut tally: BTreeMap<String, u64> = BTreeMap::new();
    let mut audited_pages = 0;
    let mut reached = ExitCounts::default();
    for index in 0..PROGRAMS {
        let frames = frames_in_use_outside_heap();
        let mut code: Vec<u8> = (0..PROGRAM_BYTES).map(|_| random.next() as u8).collect();
        // A few instructions of the virtual PC dropped in at random places (as a fuzzer's
        // dictionary does): two-byte opcodes are rare in random bytes.
        for _ in 0..DICTIONARY_INSERTS {
            let word = DICTIONARY[random.next() as usize % DICTIONARY.len()];
            let at = random.next() as usize % (PROGRAM_BYTES - word.len());
            code[at..at + word.len()].copy_from_slice(word);
        }
        let mode = if index % 2 == 0 {
            GuestMode::Real
        } else {
            GuestMode::Flat32
        };
        let program = GuestProgram {
            name: "random bytes",
            mode,
            code: &code,
        };
        let mut pc = pc(host, Above4G::No)?;
        pc.vm
            .start(&program, CODE, random_registers(&mut random))
            .map_err(|e| format!("{e}"))?;
        pc.vm.set_budget(Budget::sliced(RANDOM_BUDGET, RANDOM_BUDGET));
        let mut device = TestDevice::new(pc.device, pc::DEVICE_BASE);
        let stop = pc.vm.run_with(&mut device);
        let took = pc.vm.ticks_used();
        ensure!(
            took <= RANDOM_BUDGET + super::backend::RANDOM_CODE_LATENESS,
            "program {index} ({mode:?}, bytes {code:02x?}) ran {took} ticks: {stop:?}; exits {:?}",
            pc.vm.exits
        );
        *tally.entry(outcome_name(&stop)).or_default() += 1;
        // The guest's input may not reach a state VM entry refuses: that would be ours.
        if let VmStop::Stopped(diagnostic) = &stop {
            ensure!(
                diagnostic.cause != crate::vm::StopCause::EntryFailed,
                "program {index} ({mode:?}, bytes {code:02x?}): {diagnostic}"
            );
        }
        let exits = pc.vm.exits;
        reached.port_io += exits.port_io;
        reached.cpuid += exits.cpuid;
        reached.msr += exits.msr;
        reached.injected += exits.injected;
        reached.halts += exits.halts;
        reached.tpr += exits.tpr;
        if index % AUDIT_EVERY == 0 {
            let audit = pc.vm.pgm().audit(memory::is_allocated);
            ensure!(
                audit.is_clean(),
                "program {index} ({mode:?}, bytes {code:02x?}): EPT audit: {:?}",
                audit.findings
            );
            audited_pages += audit.mapped_pages;
        }
        drop(pc);
        let leaked = frames_in_use_outside_heap() as i64 - frames as i64;
        ensure!(leaked == 0, "program {index} leaked {leaked} host frames");
    }
    println!("  outcomes of {PROGRAMS} programs (seed {SEED:#x}): {tally:?}");
    println!(
        "  virtual-PC exits reached: port I/O {}, CPUID {}, MSR {}, injected {}, HLT {}, CR8 {}",
        reached.port_io, reached.cpuid, reached.msr, reached.injected, reached.halts, reached.tpr
    );
    ensure!(
        reached.port_io > 0
            && reached.cpuid > 0
            && reached.msr > 0
            && reached.injected > 0
            && reached.halts > 0,
        "an exit of the virtual PC was never reached: {reached:?}"
    );
    println!(
        "  EPT audits after {} programs: clean, {audited_pages} mapped pages checked",
        PROGRAMS.div_ceil(AUDIT_EVERY)
    );
    Ok(())
}
