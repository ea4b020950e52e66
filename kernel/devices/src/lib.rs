//! The devices of a guest's virtual PC, as pure logic: a port-I/O bus with the legacy PC
//! devices on it, the MMIO devices that sit behind pgm's MMIO ranges, and the CPUID and MSR
//! policy. Nothing here touches hardware or a VMCS: a device reaches the rest of the VM only
//! through the [`Platform`] its caller passes with each access (the clock, the A20 gate, the
//! console, stop requests), so every device is tested on the host against its chip's
//! documented behaviour.
//!
//! Guest input is never trusted: any port, size, offset or value a guest can supply is
//! handled (unclaimed ports read all ones and drop writes, as on a PC), and no access panics.

#![cfg_attr(not(test), no_std)]
// No unsafe code; the tests' ACPI oracle maps table bytes for the `acpi` parser.
#![cfg_attr(not(test), forbid(unsafe_code))]
#![warn(missing_docs)]

extern crate alloc;

pub mod acpi;
pub mod bus;
pub mod cmos;
pub mod cpuid;
pub mod debug_exit;
pub mod fw_cfg;
pub mod ioapic;
pub mod lapic;
pub mod msr;
pub mod pc;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod pm;
pub mod port92;
pub mod testdev;
pub mod uart;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use bus::{PortBus, PortDevice};

/// Why a device asks for the VM to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopRequest {
    /// The guest wrote `code` to the test-exit port (QEMU's `isa-debug-exit`; the process
    /// status there is `(code << 1) | 1`).
    TestExit(u32),
    /// The guest entered sleep state S5 (ACPI power-off).
    PowerOff,
    /// The guest asked for a reset (fast reset through port 0x92, port 0xCF9, the keyboard
    /// controller).
    Reset,
}

/// What a device may ask of the VM it belongs to. The kernel implements it per exit over the
/// VM's memory manager and the host clock; tests implement it over plain fields.
pub trait Platform {
    /// Nanoseconds since the VM was created (monotonic).
    fn now_ns(&self) -> u64;
    /// True when the A20 gate is open (addresses keep bit 20).
    fn a20(&self) -> bool;
    /// Opens or closes the A20 gate.
    fn set_a20(&mut self, open: bool);
    /// One byte of console output (the UART's transmitter).
    fn console(&mut self, byte: u8);
    /// Asks for the VM to stop; the exit that made the access ends the run.
    fn stop(&mut self, why: StopRequest);
    /// The host's wall-clock time, in seconds since 1970-01-01 00:00 UTC (the RTC's time).
    fn wall_clock(&self) -> u64;
    /// Drives interrupt line `line` (ISA IRQ 0–15) to `level`; the PIC sees the rising edge.
    fn set_irq(&mut self, line: u8, level: bool);
    /// Makes the next guest access to the page at `gpa` fault into the hypervisor again, as
    /// QEMU's test device does by unmapping the page from the host (kvm-unit-tests uses it to
    /// make an event's delivery fault).
    fn evict_page(&mut self, gpa: u64);
}

/// The value a read of `size` bytes returns where nothing answers: all ones.
pub fn all_ones(size: u8) -> u32 {
    match size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    }
}
