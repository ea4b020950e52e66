//! The host's CPUs, as the ACPI MADT lists them (found through the RSDP the bootloader passes).

use alloc::vec::Vec;
use core::ptr::NonNull;

use acpi::madt::{Madt, MadtEntry};
use acpi::{AcpiHandler, AcpiTables, PhysicalMapping};
use pgm::HostPhysAddr;

use super::memory::PhysMap;

/// MADT processor flags: bit 0 "enabled" (the CPU is usable as is).
const PROCESSOR_ENABLED: u32 = 1 << 0;

/// Why the host's CPUs could not be listed.
#[derive(Debug)]
pub enum CpuListError {
    /// The boot info carries no RSDP address.
    NoRsdp,
    /// The tables were unreadable or had no MADT.
    Acpi(acpi::AcpiError),
}

impl core::fmt::Display for CpuListError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CpuListError::NoRsdp => write!(f, "the bootloader found no RSDP"),
            CpuListError::Acpi(error) => write!(f, "ACPI tables unreadable: {error:?}"),
        }
    }
}

/// The APIC IDs of every enabled processor in the MADT, in table order (the boot processor
/// included). Local x2APIC entries and local APIC entries are both read.
pub fn enabled_apic_ids(phys: &'static PhysMap, rsdp: Option<u64>) -> Result<Vec<u32>, CpuListError> {
    let rsdp = rsdp.ok_or(CpuListError::NoRsdp)?;
    let handler = Window(phys);
    // SAFETY: the address is the RSDP the bootloader found in firmware memory; the handler maps
    // physical memory through the kernel's window onto all of it.
    let tables = unsafe { AcpiTables::from_rsdp(handler, rsdp as usize) }.map_err(CpuListError::Acpi)?;
    let madt = tables.find_table::<Madt>().map_err(CpuListError::Acpi)?;
    let mut ids = Vec::new();
    for entry in madt.get().entries() {
        let (id, flags) = match entry {
            MadtEntry::LocalApic(cpu) => (u32::from(cpu.apic_id), cpu.flags),
            MadtEntry::LocalX2Apic(cpu) => (cpu.x2apic_id, cpu.flags),
            _ => continue,
        };
        if flags & PROCESSOR_ENABLED != 0 && !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(ids)
}

/// The ACPI crate's view of physical memory: the kernel's window onto all of it, so nothing is
/// mapped or unmapped.
#[derive(Clone, Copy)]
struct Window(&'static PhysMap);

impl AcpiHandler for Window {
    unsafe fn map_physical_region<T>(
        &self,
        physical_address: usize,
        size: usize,
    ) -> PhysicalMapping<Self, T> {
        let virt = self.0.virt(HostPhysAddr::new_truncate(physical_address as u64));
        let virt = NonNull::new(virt.cast::<T>()).expect("the physical window is not at address 0");
        // SAFETY: all physical memory is mapped at the window (PhysMap's contract), so `size`
        // bytes from `virt` are mapped; the caller vouches that a `T` lies there.
        unsafe { PhysicalMapping::new(physical_address, virt, size, size, *self) }
    }

    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}
}
