#![no_std]
#![no_main]

mod arch;

use bootloader_api::{config::Mapping, entry_point, BootInfo, BootloaderConfig};

use arch::power::{exit, ExitCode};

/// Asks the bootloader to map all physical memory, so host frames (EPT tables, guest RAM) can be
/// reached at `physical_memory_offset + address`.
pub static BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    config.mappings.physical_memory = Some(Mapping::Dynamic);
    config.kernel_stack_size = 256 * 1024;
    config
};

entry_point!(kernel_main, config = &BOOTLOADER_CONFIG);

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    arch::serial::init();
    println!(
        "hypervisor: booted, physical memory at {:?}",
        boot_info.physical_memory_offset
    );
    exit(ExitCode::Success, "")
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC: {info}");
    exit(ExitCode::Failure, "kernel panic")
}
