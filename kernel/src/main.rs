//! The hypervisor kernel: boots through `bootloader_api`, sets up serial, GDT/IDT, heap and the
//! host frame allocator, enters VMX root operation and then runs the demo (`make run`), the
//! kvm-unit-tests the ramdisk carries (`cargo xtask kut`), or the kernel-level tests
//! (`--features kernel-tests`, `cargo xtask test`).
#![no_std]
#![no_main]
#![feature(abi_x86_interrupt)]

extern crate alloc;

mod arch;
#[cfg(not(feature = "kernel-tests"))]
mod demo;
#[cfg(not(feature = "kernel-tests"))]
mod kut;
#[cfg(not(feature = "kernel-tests"))]
mod linux;
mod machine;
mod migration;
mod precopy;
#[cfg(feature = "kernel-tests")]
mod tests;
mod vm;

use bootloader_api::{config::Mapping, entry_point, BootInfo, BootloaderConfig};
use spin::Once;

use arch::memory::{self, PhysMap};
use arch::power::{exit, ExitCode};
use arch::smp::{self, CpuState};
use arch::virt;

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
}

impl Host {
    /// Virtualization enabled on the calling CPU (VMX root operation, or SVM), or why it
    /// could not be.
    pub fn virt(&self) -> Result<&'static virt::On, virt::Error> {
        smp::this_cpu().virt()
    }
}

static HOST: Once<Host> = Once::new();

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    arch::serial::init();
    let boot_tss = arch::gdt::init();
    arch::idt::init();
    arch::clock::init();
    memory::init_heap();
    let Some(offset) = boot_info.physical_memory_offset.into_option() else {
        exit(ExitCode::Failure, "the bootloader did not map physical memory")
    };
    let apic = arch::apic::init(offset);
    memory::init_frames(&boot_info.memory_regions);
    let frames = memory::frame_counts();
    println!(
        "hypervisor: {} host frames ({} MiB) from the boot memory map",
        frames.total,
        frames.total / 256
    );
    // SAFETY: the boot config asks the bootloader to map all physical memory, and it told us
    // where: at `offset`, for the kernel's whole life.
    let phys = unsafe { PhysMap::new(offset) };
    let host = HOST.call_once(|| Host { phys });
    memory::grow_heap_from(&host.phys);
    let trampoline = memory::trampoline_frame(&boot_info.memory_regions);
    let smp = smp::init(
        &host.phys,
        boot_info.rsdp_addr.into_option(),
        boot_tss,
        trampoline,
    );
    report_cpus(&smp);
    println!(
        "hypervisor: TSC at {} Hz (measured against the PIT)",
        arch::clock::tsc_hz()
    );
    match apic {
        Ok(mode) => println!("hypervisor: local APIC in {mode} mode; legacy PICs masked"),
        Err(error) => println!("hypervisor: no host timer to kick vCPUs with: {error:?}"),
    }
    emulator::warm_up();
    #[cfg(feature = "kernel-tests")]
    tests::run_all(host);
    #[cfg(not(feature = "kernel-tests"))]
    {
        // Guest images in the ramdisk with a kvm-unit-tests manifest: run those instead.
        let archive = memory::ramdisk(boot_info).map(loader::archive::Archive::new);
        if let Some(archive) = archive {
            if archive.file(kut::MANIFEST).is_some() {
                kut::run(host, archive);
            }
            if archive.file(linux::MANIFEST).is_some() {
                linux::run(host, archive);
            }
        }
        demo::run(host);
    }
}

/// Prints what the CPU start-up found: every CPU's state and VMX capabilities.
fn report_cpus(report: &smp::SmpReport) {
    if let Some(error) = &report.madt_error {
        println!("hypervisor: no CPU list from ACPI ({error}): the boot processor only");
    }
    if let Some(error) = report.start_error {
        println!("hypervisor: application processors not started: {error}");
    }
    let ready = smp::ready_cpus().count();
    println!("hypervisor: {} CPUs listed, {ready} ready", report.listed);
    if report.listed > smp::MAX_CPUS {
        println!(
            "hypervisor: CPUs past the first {} left out (CPU sets are 64-bit masks)",
            smp::MAX_CPUS
        );
    }
    for cpu in smp::cpus() {
        match (cpu.state(), cpu.virt()) {
            (CpuState::Ready, Ok(on)) => {
                println!(
                    "hypervisor: CPU {} (APIC {}): {} on: {}",
                    cpu.index,
                    cpu.apic_id,
                    virt::NAME,
                    on.caps()
                )
            }
            (_, Err(error)) if cpu.state() != CpuState::Absent => {
                println!(
                    "hypervisor: CPU {} (APIC {}): left out: {error}",
                    cpu.index, cpu.apic_id
                )
            }
            (state, _) => println!(
                "hypervisor: CPU {} (APIC {}): left out: {state:?}",
                cpu.index, cpu.apic_id
            ),
        }
    }
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
