//! `make run`: boots a guest that touches memory, then prints the page statistics.

use crate::arch::guests::programs;
use crate::arch::memory::frame_counts;
use crate::arch::power::{exit, ExitCode};
use crate::arch::ticks;
use crate::arch::vmx::GuestRegisters;
use crate::vm::{Vm, VmStop};
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

fn demo(host: &'static Host) -> Result<(), alloc::string::String> {
    use alloc::format;
    let vmx = host.vmx.as_ref().map_err(|e| format!("{e}"))?;
    let before = frame_counts();
    let mut vm = Vm::new(vmx, host.phys, &RAM).map_err(|e| format!("{e}"))?;
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
    vm.exit_costs.print("the demo VM");
    println!(
        "demo: exits {} (EPT violations {}, hypercalls {}, INVEPTs {})",
        vm.exits.total, vm.exits.ept_violations, vm.exits.hypercalls, vm.exits.invepts
    );
    if stop != VmStop::Done(0) {
        return Err(format!("the guest did not finish: {stop:?}"));
    }
    drop(vm);
    let after = frame_counts();
    println!(
        "demo: VM destroyed; host frames used {} (before the VM: {})",
        after.used(),
        before.used()
    );
    Ok(())
}

fn print_stats(when: &str, vm: &Vm) {
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
