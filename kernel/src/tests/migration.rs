//! A migration in the small: a guest whose state sits in registers, SSE registers, memory, a
//! port device and its local APIC is paused by a pre-copy part way through its work, moved to
//! a second VM on the copy (`crate::migration`), and must end exactly as the same guest run
//! without a break: the same reports, the same memory.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use pgm::manager::DirtyLogMode;

use super::{gpa, TestResult, CODE, PC_RAM};
use crate::arch::guests::programs;
use crate::arch::registers::GuestRegisters;
use crate::machine::{self, Next, RunEnd};
use crate::migration::{self, Source, Target};
use crate::precopy::{Ending, PreCopy};
use crate::vm::budget::Budget;
use crate::vm::devices::MachineSpec;
use crate::vm::{Vcpu, VmStop};
use crate::{println, Host};

/// The area the guest adds to: 64 pages from 2 MiB.
const AREA: u64 = 0x20_0000;
const AREA_BYTES: u64 = 64 * 4096;
/// Rounds of the guest's loop (about 19 instructions each): several times what the pre-copy's
/// full copy and its rounds take at one slice each.
const ITERATIONS: u64 = 300_000 * super::backend::TICK_SCALE;
const SEED: u64 = 0x2545_F491;
/// Each vCPU's budget: slices of 10^5 ticks, the pre-copy taking a step between two.
const BUDGET: Budget = Budget {
    slice: 100_000 * super::backend::TICK_SCALE,
    ..Budget::DEFAULT
};

/// What a run of the guest left: its reports (final xorshift state, XMM0's sum, the UART's
/// scratch register, the TPR) and its area.
#[derive(PartialEq, Eq)]
struct Outcome {
    reports: Vec<u64>,
    area: Vec<u8>,
}

/// A VM with the guest loaded, its budget set.
fn loaded_vm(host: &'static Host) -> Result<Vcpu<'static>, String> {
    let vmx = host.virt().map_err(|e| format!("{e}"))?;
    let mut vm = Vcpu::new_machine(vmx, &host.phys, &PC_RAM, false, &MachineSpec::default())
        .map_err(|e| format!("VM creation: {e}"))?;
    let regs = GuestRegisters {
        rsi: AREA,
        rdx: AREA_BYTES / 4 - 1,
        rcx: ITERATIONS,
        rbx: SEED,
        ..GuestRegisters::default()
    };
    vm.start(&programs::migration_workload(), CODE, regs)
        .map_err(|e| format!("start: {e}"))?;
    vm.set_budget(BUDGET);
    Ok(vm)
}

/// What the guest of `vm`, run to `stop`, left.
fn outcome(vm: &Vcpu<'_>, stop: VmStop) -> Result<Outcome, String> {
    ensure!(matches!(stop, VmStop::Done(0)), "the guest ended with {stop:?}");
    let mut area = vec![0; AREA_BYTES as usize];
    vm.pgm()
        .read_phys(gpa(AREA), &mut area)
        .map_err(|e| format!("read the area: {e}"))?;
    Ok(Outcome {
        reports: vm.reports.clone(),
        area,
    })
}

/// The guest run without a break.
fn run_whole(host: &'static Host) -> Result<Outcome, String> {
    let mut vm = loaded_vm(host)?;
    let stop = machine::run_to_end(host, &mut vm, 1, Vec::new(), &mut |_| Ok(Next::Run))?
        .into_stop("the unbroken run")?;
    outcome(&vm, stop)
}

/// The guest paused by a pre-copy in `mode` and moved to a second VM, which runs it to its
/// end; `None` when the CPU lacks the mode.
fn run_migrated(host: &'static Host, mode: DirtyLogMode) -> Result<Option<Outcome>, String> {
    let mut vm = loaded_vm(host)?;
    if mode == DirtyLogMode::Pml && !vm.pml_supported() {
        return Ok(None);
    }
    let mut precopy = PreCopy::new(mode, Ending::Migrate, &PC_RAM, 0, &host.phys);
    let end = machine::run_to_end(host, &mut vm, 1, Vec::new(), &mut |bsp| precopy.step(bsp))?;
    let RunEnd::Paused(aps) = end else {
        return Err(format!("{mode:?}: the guest ended before the pre-copy paused it"));
    };
    let source = Source {
        bsp: vm,
        aps,
        precopy: &mut precopy,
    };
    let target = Target {
        ram: &PC_RAM,
        spec: &MachineSpec::default(),
        large_pages: false,
        budget: BUDGET,
    };
    let mut destination = migration::migrate(host, source, &target)?;
    ensure_eq!(
        precopy.differing_pages(),
        Some(0),
        "pages differing from the copy"
    );
    let stop = machine::run_to_end(host, &mut destination.bsp, 1, destination.aps, &mut |_| {
        Ok(Next::Run)
    })?
    .into_stop("the migrated run")?;
    migration::audit(&destination.bsp, "the destination")?;
    outcome(&destination.bsp, stop).map(Some)
}

pub fn a_guest_moved_mid_run_ends_as_it_would_have(host: &'static Host) -> TestResult {
    let whole = run_whole(host)?;
    ensure_eq!(whole.reports.len(), 4, "reports of the unbroken run");
    ensure_eq!(whole.reports[2], 0xA5, "the UART's scratch register");
    ensure_eq!(whole.reports[3], 0x20, "the TPR");
    for mode in [DirtyLogMode::WriteProtect, DirtyLogMode::Pml] {
        let Some(moved) = run_migrated(host, mode)? else {
            println!("  {mode:?}: the CPU lacks it; not run");
            continue;
        };
        ensure_eq!(moved.reports, whole.reports, "reports after the move");
        let differing = moved
            .area
            .chunks(4)
            .zip(whole.area.chunks(4))
            .filter(|(a, b)| a != b)
            .count();
        ensure_eq!(differing, 0, "area dwords that differ from the unbroken run's");
    }
    Ok(())
}
