//! The virtual PC under random guest input: sequences of port reads and writes (any port, any
//! size, any value) on the whole legacy bus, xAPIC MMIO and x2APIC MSR accesses and timer
//! ticks on a local APIC, I/O APIC register accesses and pin levels (its messages and its
//! EOIs reaching the local APIC), and MSR accesses on the MSR policy. Nothing may panic; the
//! bus answers every port; a refused MSR write changes nothing.

#![no_main]

use devices::ioapic::IoApic;
use devices::lapic::{Effect, LocalApic};
use devices::msr::{MsrOutcome, MsrState};
use devices::pc::legacy_pc;
use devices::testing::TestPlatform;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut bus = legacy_pc(2, 1 << 27).expect("the PC's ranges are disjoint").bus;
    let mut platform = TestPlatform::default();
    let mut apic = LocalApic::new(1);
    let mut msrs = MsrState::new(0, 39);
    let mut ioapic = IoApic::new(0);
    for op in data.chunks_exact(12) {
        let word = |i: usize| u32::from_le_bytes([op[i], op[i + 1], op[i + 2], op[i + 3]]);
        let (a, b) = (word(4), word(8));
        let size = [1, 2, 4, 3][usize::from(op[1] & 3)];
        platform.now = platform.now.wrapping_add(u64::from(op[2]) << (op[3] & 31));
        match op[0] % 10 {
            0 => drop(bus.read(a as u16, size, &mut platform)),
            1 => bus.write(a as u16, size, b, &mut platform),
            2 => drop(apic.mmio_read(u64::from(a) & 0xFFF, platform.now)),
            3 => match apic.mmio_write(u64::from(a) & 0xFFF, b, platform.now) {
                Effect::Ipi(ipi) => apic.receive(&ipi),
                Effect::LevelEoi(vector) => ioapic.end_of_interrupt(vector).for_each(|ipi| apic.receive(&ipi)),
                Effect::None => {}
            },
            4 => {
                apic.set_mode(op[1] & 4 != 0, op[1] & 8 != 0);
                let _ = apic.msr_write(0x800 + (a & 0xFF), u64::from(b) | (u64::from(a) << 32), platform.now);
                let _ = apic.msr_read(0x800 + (b & 0xFF), platform.now);
            }
            5 => {
                apic.fire_timer(platform.now);
                let _ = apic.acknowledge();
                apic.set_tsc_deadline(u64::from(b));
            }
            6 => {
                let before = msrs.clone();
                let msr = a % 0x1000 | if op[1] & 4 != 0 { 0xC000_0000 } else { 0 };
                if msrs.write(msr, u64::from(b) | (u64::from(op[3]) << 40)) == MsrOutcome::Refused {
                    assert_eq!(msrs, before, "a refused write changed the MSRs");
                }
            }
            7 => drop(msrs.read(a)),
            8 => {
                if let Some(ipi) = ioapic.mmio_write(u64::from(a) & 0xFFF, b) {
                    apic.receive(&ipi);
                }
                drop(ioapic.mmio_read(u64::from(b) & 0xFFF));
            }
            _ => {
                if let Some(ipi) = ioapic.set_line(a as usize % 32, op[1] & 4 != 0) {
                    apic.receive(&ipi);
                }
            }
        }
    }
});
