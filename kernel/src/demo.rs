//! `make run`: boots a guest that touches memory and prints the page statistics, then a guest
//! that never exits by itself: it is preempted at the end of each slice, kicked out by the
//! host timer, and stopped at its time limit.

use alloc::format;
use alloc::string::String;

use crate::arch::guests::programs;
use crate::arch::memory::frame_counts;
use crate::arch::power::{exit, ExitCode};
use crate::arch::registers::GuestRegisters;
use crate::arch::{idt, ticks};
use crate::vm::budget::Budget;
use crate::vm::requests::{kick_on_timer, Request};
use crate::vm::{Vcpu, VmStop};
use crate::{println, Host};

/// Guest RAM: 640 KiB low memory and 15 MiB from 1 MiB up, as a PC has.
const RAM: [(u64, u64); 2] = [(0, 0xA_0000), (0x10_0000, 0xF0_0000)];
/// Where the guest program is loaded and started.
const CODE: u64 = 0x8000;
/// The guest writes one dword into each of this many pages...
const PAGES_WRITTEN: u64 = 64;
/// ...every 3rd page from 2 MiB up.
const FIRST_PAGE: u64 = 0x20_0000;
const STRIDE: u64 = 3 * 4096;
/// The spinning guest's slice and limit, and when the host timer kicks it.
const SLICE: u64 = 1_000_000;
const LIMIT: u64 = 3_500_000;
const KICK_AFTER: u64 = 250_000;

/// Runs the demo guest and ends the machine.
pub fn run(host: &'static Host) -> ! {
    match demo(host) {
        Ok(()) => exit(ExitCode::Success, ""),
        Err(message) => {
            println!("demo: {message}");
            exit(ExitCode::Failure, &message)
        }
    }
}

fn demo(host: &'static Host) -> Result<(), String> {
    let vmx = host.virt().map_err(|e| format!("{e}"))?;
    let before = frame_counts();
    let mut vm = Vcpu::new(vmx, &host.phys, &RAM).map_err(|e| format!("{e}"))?;
    print_stats("after creating the VM", &vm);
    let regs = GuestRegisters {
        rsi: FIRST_PAGE,
        rcx: PAGES_WRITTEN,
        rdx: STRIDE,
        rdi: 1,
        ..Default::default()
    };
    vm.start(&programs::write_pages(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    let start = ticks();
    let stop = vm.run();
    let elapsed = ticks() - start;
    println!("demo: guest wrote {PAGES_WRITTEN} pages and stopped: {stop:?} after {elapsed} ticks");
    print_stats("after the guest ran", &vm);
    for line in vm.pgm().physical_map().lines() {
        println!("demo: map: {line}");
    }
    vm.exit_costs.print("the demo VM");
    println!(
        "demo: exits {} (EPT violations {}, hypercalls {}, INVEPTs {})",
        vm.exits.total, vm.exits.ept_violations, vm.exits.hypercalls, vm.exits.invepts
    );
    if stop != VmStop::Done(0) {
        return Err(format!("the guest did not finish: {stop:?}"));
    }
    drop(vm);
    spinning_guest(host)?;
    let after = frame_counts();
    println!(
        "demo: VMs destroyed; host frames used {} (before the VMs: {})",
        after.used(),
        before.used()
    );
    Ok(())
}

/// Runs `jmp $` with a slice of [`SLICE`] ticks and a limit of [`LIMIT`], kicking it out once
/// with the host timer, and prints how each run ended.
fn spinning_guest(host: &'static Host) -> Result<(), String> {
    let vmx = host.virt().map_err(|e| format!("{e}"))?;
    let mut vm = Vcpu::new(vmx, &host.phys, &RAM).map_err(|e| format!("{e}"))?;
    vm.start(&programs::spin_interrupts_on(), CODE, GuestRegisters::default())
        .map_err(|e| format!("{e}"))?;
    vm.set_budget(Budget::sliced(SLICE, LIMIT));
    println!("demo: a guest spinning on `jmp $`, slice {SLICE} ticks, limit {LIMIT}");
    let mut run = 0;
    loop {
        run += 1;
        if run == 2 && !kick_on_timer(&vm.requests(), Request::STOP, KICK_AFTER) {
            println!("demo: no host timer to kick the vCPU with");
        }
        let before = vm.ticks_used();
        let stop = vm.run();
        let took = vm.ticks_used() - before;
        if stop.is_resumable() {
            println!("demo: run {run}: {stop:x?} after {took} ticks");
            continue;
        }
        println!(
            "demo: run {run} ended after {took} ticks; host timer interrupts taken: {}",
            idt::timer_interrupts()
        );
        return match stop {
            VmStop::Stopped(diagnostic) => {
                println!("demo: {diagnostic}");
                Ok(())
            }
            other => Err(format!("the spinning guest ended with {other:?}")),
        };
    }
}

fn print_stats(when: &str, vm: &Vcpu) {
    let stats = vm.stats();
    let frames = frame_counts();
    println!(
        "page statistics {when}: RAM {} pages, zero {}, allocated {}, EPT table frames {}; \
         host frames used {} of {}",
        stats.ram_pages,
        stats.zero_pages,
        stats.allocated_pages,
        stats.table_frames,
        frames.used(),
        frames.total
    );
}
