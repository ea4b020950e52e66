//! The ACPI tables a guest looks for (ACPI 6.5, chapter 5), built with rust-vmm's
//! `acpi_tables`: an RSDP at the start of the BIOS area (0xE0000, where a guest scans for
//! "RSD PTR "), the XSDT, a FADT naming the PM1a event and control blocks and the PM timer
//! ([`crate::pm`]), a DSDT whose only object is `\_S5` (the sleep type that powers off), a
//! FACS, and a MADT listing every vCPU's local APIC, the I/O APIC ([`crate::ioapic`]) with
//! ISA IRQ 0 on its pin 2 (an interrupt source override, as on every PC), and the dual 8259s
//! (PCAT_COMPAT). The caller places the returned image as ROM at [`BIOS_AREA`].

use alloc::vec::Vec;

use acpi_tables::aml::{Name, Package, Path, ZERO};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::FADTBuilder;
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use crate::ioapic::IOAPIC_BASE;
use crate::lapic::XAPIC_BASE;
use crate::pm;

/// The BIOS area the tables go in (the RSDP must lie in 0xE0000–0xFFFFF).
pub const BIOS_AREA: u64 = 0xE_0000;
/// Its size.
pub const BIOS_AREA_SIZE: u64 = 0x2_0000;
/// The I/O APIC's ID (QEMU's choice: its ID space is the I/O APICs', apart from the CPUs').
pub const IOAPIC_ID: u8 = 0;
/// The I/O APIC pin the PIT's ISA IRQ 0 is wired to (the MADT's interrupt source override).
const TIMER_PIN: u8 = 2;
/// The MADT's interrupt source override structure (ACPI 6.5, 5.2.12.5): type 2, 10 bytes.
const INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
/// Its MPS INTI flags for an active-high (polarity 01), level-triggered (trigger 11) line.
const ACTIVE_HIGH_LEVEL: u16 = 0b1101;

/// The I/O APIC pin ISA IRQ `irq` is wired to: IRQ 0 on pin 2, the others on their own.
pub fn isa_irq_pin(irq: u8) -> u8 {
    if irq == 0 {
        TIMER_PIN
    } else {
        irq
    }
}

/// The OEM identity the tables carry.
const OEM_ID: [u8; 6] = *b"PGMHV ";
const OEM_TABLE_ID: [u8; 8] = *b"PGMHVTBL";
const OEM_REVISION: u32 = 1;
/// Where each table lies in the area (the FACS must be 64-byte aligned).
const XSDT_AT: u64 = 0x40;
const FADT_AT: u64 = 0x100;
const FACS_AT: u64 = 0x240;
const DSDT_AT: u64 = 0x280;
const MADT_AT: u64 = 0x400;
/// The SCI's interrupt (the PIIX4's).
const SCI_IRQ: u16 = 9;
/// The MADT flags' offset, and PCAT_COMPAT.
const MADT_FLAGS: usize = 40;
const PCAT_COMPAT: u8 = 1;
/// The RTC's century register (`crate::cmos::reg::CENTURY`).
const CENTURY: u8 = 0x32;

/// The bytes of one table.
fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// Sets byte 9 (the checksum) so that the table's bytes sum to 0.
fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |sum, &b| sum.wrapping_add(b));
    table[9] = 0u8.wrapping_sub(sum);
}

/// The BIOS area's image for a VM with `vcpus` vCPUs (APIC IDs 0..vcpus).
pub fn bios_area(vcpus: u32) -> Vec<u8> {
    let mut area = alloc::vec![0u8; MADT_AT as usize];
    let place = |area: &mut Vec<u8>, at: u64, table: &[u8]| {
        let at = at as usize;
        if area.len() < at + table.len() {
            area.resize(at + table.len(), 0);
        }
        area[at..at + table.len()].copy_from_slice(table);
    };
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for table in [FADT_AT, MADT_AT] {
        xsdt.add_entry(BIOS_AREA + table);
    }
    place(&mut area, 0, &bytes(&Rsdp::new(OEM_ID, BIOS_AREA + XSDT_AT)));
    place(&mut area, XSDT_AT, &bytes(&xsdt));
    place(&mut area, FADT_AT, &bytes(&fadt()));
    place(&mut area, FACS_AT, &bytes(&FACS::new()));
    place(&mut area, DSDT_AT, &dsdt());
    place(&mut area, MADT_AT, &madt(vcpus));
    area
}

fn fadt() -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_32((BIOS_AREA + DSDT_AT) as u32)
        .firmware_ctrl_32((BIOS_AREA + FACS_AT) as u32);
    fadt.sci_int = SCI_IRQ.into();
    fadt.pm1a_evt_blk = u32::from(pm::PM1A_EVENT).into();
    fadt.pm1a_cnt_blk = u32::from(pm::PM1A_CONTROL).into();
    fadt.pm_tmr_blk = u32::from(pm::PM_TIMER).into();
    fadt.pm1_evt_len = 4;
    fadt.pm1_cnt_len = 2;
    fadt.pm_tmr_len = 4;
    fadt.century = CENTURY;
    fadt.finalize()
}

/// The DSDT: `Name (\_S5, Package () { 0, 0, 0, 0 })`, the sleep type [`pm::S5_SLEEP_TYPE`].
fn dsdt() -> Vec<u8> {
    let s5 = Name::new(
        Path::from("_S5_"),
        &Package::new(alloc::vec![&ZERO, &ZERO, &ZERO, &ZERO]),
    );
    let mut table = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    table.append_slice(&bytes(&s5));
    table.as_slice().to_vec()
}

fn madt(vcpus: u32) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(XAPIC_BASE as u32),
    );
    for id in 0..vcpus.min(255) {
        madt.add_structure(ProcessorLocalApic::new(
            id as u8,
            id as u8,
            EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(IOAPIC_ID, IOAPIC_BASE as u32, 0));
    let mut table = bytes(&madt);
    table[MADT_FLAGS] |= PCAT_COMPAT;
    // acpi_tables has no type for the override. ISA (bus 0) IRQ 0 is GSI 2, polarity and
    // trigger as the bus says (flags 0); the SCI is active-high and level-triggered, as the
    // PIIX4's is (without the override ACPI's default for the SCI is active-low, and an
    // undriven line would then be asserted for ever).
    for (irq, gsi, flags) in [
        (0, TIMER_PIN, 0u16),
        (SCI_IRQ as u8, SCI_IRQ as u8, ACTIVE_HIGH_LEVEL),
    ] {
        table.extend_from_slice(&[INTERRUPT_SOURCE_OVERRIDE, 10, 0, irq]);
        table.extend_from_slice(&u32::from(gsi).to_le_bytes());
        table.extend_from_slice(&flags.to_le_bytes());
    }
    let length = table.len() as u32;
    table[4..8].copy_from_slice(&length.to_le_bytes());
    fix_checksum(&mut table);
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables as the `acpi` crate (rust-osdev, an independent parser) reads them from
    /// guest memory.
    #[derive(Clone)]
    struct GuestMemory(std::sync::Arc<Vec<u8>>);

    impl acpi::AcpiHandler for GuestMemory {
        unsafe fn map_physical_region<T>(
            &self,
            address: usize,
            size: usize,
        ) -> acpi::PhysicalMapping<Self, T> {
            let offset = address - BIOS_AREA as usize;
            assert!(offset + size <= self.0.len(), "a table reaches past the area");
            let pointer = self.0.as_ptr().wrapping_add(offset) as *mut T;
            // SAFETY: host-only test oracle: the region lies in the area's bytes (checked
            // above), which outlive the mapping (the handler holds them).
            unsafe {
                acpi::PhysicalMapping::new(
                    address,
                    core::ptr::NonNull::new(pointer).unwrap(),
                    size,
                    size,
                    self.clone(),
                )
            }
        }

        fn unmap_physical_region<T>(_: &acpi::PhysicalMapping<Self, T>) {}
    }

    fn tables(vcpus: u32) -> acpi::AcpiTables<GuestMemory> {
        let area = std::sync::Arc::new(bios_area(vcpus));
        assert_eq!(&area[..8], b"RSD PTR ");
        // SAFETY: host-only test oracle: the address is the RSDP's in the area.
        unsafe { acpi::AcpiTables::from_rsdp(GuestMemory(area), BIOS_AREA as usize) }
            .expect("RSDP and XSDT valid")
    }

    #[test]
    fn the_fadt_names_the_pm_timer_and_the_madt_every_vcpu() {
        let tables = tables(3);
        let platform = tables.platform_info().expect("FADT and MADT parse");
        let timer = platform.pm_timer.expect("a PM timer");
        assert_eq!(timer.base.address, u64::from(pm::PM_TIMER));
        let processors = platform.processor_info.expect("processors");
        assert_eq!(processors.boot_processor.local_apic_id, 0);
        let aps: Vec<u32> = processors
            .application_processors
            .iter()
            .map(|p| p.local_apic_id)
            .collect();
        assert_eq!(aps, [1, 2]);
        match platform.interrupt_model {
            acpi::InterruptModel::Apic(apic) => {
                assert_eq!(apic.local_apic_address, XAPIC_BASE);
                assert!(apic.also_has_legacy_pics, "PCAT_COMPAT");
                let ioapics: Vec<(u8, u32, u32)> = apic
                    .io_apics
                    .iter()
                    .map(|io| (io.id, io.address, io.global_system_interrupt_base))
                    .collect();
                assert_eq!(ioapics, [(IOAPIC_ID, IOAPIC_BASE as u32, 0)]);
                let overrides: Vec<(u8, u32)> = apic
                    .interrupt_source_overrides
                    .iter()
                    .map(|o| (o.isa_source, o.global_system_interrupt))
                    .collect();
                assert_eq!(overrides, [(0, 2), (9, 9)], "the PIT on pin 2, the SCI");
                let sci = &apic.interrupt_source_overrides[1];
                assert_eq!(
                    (sci.polarity, sci.trigger_mode),
                    (
                        acpi::platform::interrupt::Polarity::ActiveHigh,
                        acpi::platform::interrupt::TriggerMode::Level
                    )
                );
            }
            _ => panic!("no APIC interrupt model"),
        }
    }

    #[test]
    fn the_dsdt_holds_s5_and_every_table_sums_to_zero() {
        let area = bios_area(1);
        let dsdt = &area[DSDT_AT as usize..];
        let length = u32::from_le_bytes(dsdt[4..8].try_into().unwrap()) as usize;
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(dsdt[36..length].windows(4).any(|w| w == b"_S5_"));
        for at in [XSDT_AT, FADT_AT, DSDT_AT, MADT_AT] {
            let table = &area[at as usize..];
            let length = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            let sum = table[..length].iter().fold(0u8, |s, &b| s.wrapping_add(b));
            assert_eq!(sum, 0, "table at {at:#x}");
        }
        assert!(area.len() as u64 <= BIOS_AREA_SIZE);
    }
}
