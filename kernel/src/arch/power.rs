//! Ending the machine: QEMU's isa-debug-exit device and Bochs's shutdown port.

use x86_64::instructions::port::Port;

use super::serial;

/// QEMU `isa-debug-exit` port (see boot/src/emulator.rs); QEMU exits with `(value << 1) | 1`.
const QEMU_DEBUG_EXIT: u16 = 0xF4;
/// Bochs exits when the string `Shutdown` is written byte by byte to this port.
const BOCHS_SHUTDOWN: u16 = 0x8900;

/// The outcome the kernel reports to the emulator.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ExitCode {
    /// Everything the run was asked to do succeeded (QEMU exit status 33).
    Success = 0x10,
    /// Something failed (QEMU exit status 35).
    Failure = 0x11,
}

/// Prints the `[exit]` line the host tool reads, drains the UART and stops the emulator.
/// On real hardware (no emulator port answers) it halts forever.
pub fn exit(code: ExitCode, reason: &str) -> ! {
    match code {
        ExitCode::Success => crate::println!("[exit] success"),
        ExitCode::Failure => crate::println!("[exit] failure: {reason}"),
    }
    serial::drain();
    // SAFETY: these ports are emulator exit devices; on hardware without them the writes go to
    // unassigned ports and are ignored.
    unsafe {
        Port::<u32>::new(QEMU_DEBUG_EXIT).write(code as u32);
        let mut bochs = Port::<u8>::new(BOCHS_SHUTDOWN);
        for byte in b"Shutdown" {
            bochs.write(*byte);
        }
    }
    halt_forever()
}

/// Disables interrupts and halts the CPU in a loop.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
