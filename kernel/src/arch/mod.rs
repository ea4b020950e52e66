//! The architecture layer: everything that touches the CPU, ports or raw memory lives here.

pub mod acpi;
pub mod apic;
pub mod clock;
pub mod gdt;
// The demo build runs one guest program; the rest are fixtures of the kernel tests.
#[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
pub mod guests;
pub mod idt;
pub mod memory;
pub mod power;
pub mod serial;
pub mod smp;
pub mod vector;
pub mod vmx;

/// Reads the time-stamp counter (deterministic in Bochs with `clock: sync=none`).
pub fn ticks() -> u64 {
    // SAFETY: RDTSC has no side effects and is allowed at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}
