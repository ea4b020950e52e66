//! The hypervisor kernel: boots through `bootloader_api`, sets up serial, GDT/IDT, heap and the
//! host frame allocator, enters VMX root operation and then runs either the demo (`make run`)
//! or the kernel-level tests (`--features kernel-tests`, `cargo xtask test`).
#![no_std]
#![no_main]
#![feature(abi_x86_interrupt)]

extern crate alloc;

mod arch;
#[cfg(not(feature = "kernel-tests"))]
mod demo;
#[cfg(feature = "kernel-tests")]
mod tests;
mod vm;

use bootloader_api::{config::Mapping, entry_point, BootInfo, BootloaderConfig};
use spin::Once;

use arch::memory::{self, KernelFrames, PhysMap};
use arch::power::{exit, ExitCode};
use arch::vmx::{self, VmxCaps, VmxError, VmxOn};

/// Asks the bootloader to map all physical memory, so host frames (EPT tables, guest RAM) can be
/// reached at `physical_memory_offset + address`.
pub static BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    config.mappings.physical_memory = Some(Mapping::Dynamic);
    config.kernel_stack_size = 256 * 1024;
    config
};

entry_point!(kernel_main, config = &BOOTLOADER_CONFIG);

/// What the kernel set up at boot, shared by the demo and the tests.
pub struct Host {
    /// Host-physical memory access.
    pub phys: PhysMap,
    /// VMX root operation, or why it could not be entered.
    pub vmx: Result<VmxOn, VmxError>,
}

static HOST: Once<Host> = Once::new();

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    arch::serial::init();
    arch::gdt::init();
    arch::idt::init();
    let apic = arch::apic::init();
    memory::init_heap();
    let Some(offset) = boot_info.physical_memory_offset.into_option() else {
        exit(ExitCode::Failure, "the bootloader did not map physical memory")
    };
    memory::init_frames(&boot_info.memory_regions);
    let frames = memory::frame_counts();
    println!(
        "hypervisor: {} host frames ({} MiB) from the boot memory map",
        frames.total,
        frames.total / 256
    );
    // SAFETY: the boot config asks the bootloader to map all physical memory, and it told us
    // where: at `offset`, for the kernel's whole life.
    let mut phys = unsafe { PhysMap::new(offset) };
    let vmx = VmxCaps::probe()
        .map_err(VmxError::Unavailable)
        .and_then(|caps| vmx::enable(caps, &mut KernelFrames, &mut phys));
    match &vmx {
        Ok(vmx) => println!("hypervisor: VMX on: {}", vmx.caps()),
        Err(error) => println!("hypervisor: {error}"),
    }
    match apic {
        Ok(()) => println!("hypervisor: local APIC in x2APIC mode; legacy PICs masked"),
        Err(error) => println!("hypervisor: no host timer to kick vCPUs with: {error:?}"),
    }
    emulator::warm_up();
    let host = HOST.call_once(|| Host { phys, vmx });
    #[cfg(feature = "kernel-tests")]
    tests::run_all(host);
    #[cfg(not(feature = "kernel-tests"))]
    demo::run(host);
}

/// Called when the host itself fails (panic, CPU exception): in a test run, reports the test
/// that was running and the closing counts first.
pub fn tests_report_abort(reason: &str) {
    #[cfg(feature = "kernel-tests")]
    tests::report_abort(reason);
    #[cfg(not(feature = "kernel-tests"))]
    let _ = reason;
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC: {info}");
    tests_report_abort("kernel panic");
    exit(ExitCode::Failure, "kernel panic")
}
