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
pub mod registers;
pub mod serial;
pub mod smp;
#[cfg(feature = "svm")]
pub mod svm;
pub mod vector;
#[cfg(not(feature = "svm"))]
pub mod vmx;

/// See the VMX variant.
#[cfg(feature = "svm")]
pub use svm as virt;
/// The virtualization backend this kernel is built for: VT-x with EPT (`vmx`), or AMD SVM
/// with nested paging (`svm`, with the cargo feature `svm`), as KVM builds `kvm-intel` and
/// `kvm-amd`. Each offers the same names: `On` (proof that this CPU has it enabled), `Error`,
/// `Vcpu`, `Format` (its nested-table encoding), `enable_this_cpu` and `flush_this_cpu`.
#[cfg(not(feature = "svm"))]
pub use vmx as virt;

/// Reads the time-stamp counter (deterministic in Bochs with `clock: sync=none`).
pub fn ticks() -> u64 {
    // SAFETY: RDTSC has no side effects and is allowed at CPL 0.
    unsafe { core::arch::x86_64::_rdtsc() }
}
