//! The virtual PC under random guest input: sequences of port reads and writes (any port, any
//! size, any value) on the whole legacy bus, xAPIC MMIO and x2APIC MSR accesses and timer
//! ticks on a local APIC, and MSR accesses on the MSR policy. Nothing may panic; the bus
//! answers every port; a refused MSR write changes nothing.

#![no_main]

use devices::lapic::{Effect, LocalApic};
use devices::msr::{MsrOutcome, MsrState};
use devices::{cmos, debug_exit, fw_cfg, pci, pic, pit, pm, port92, testdev, uart};
use devices::{Platform, PortBus, StopRequest};
use libfuzzer_sys::fuzz_target;

/// A platform with a clock the input advances.
#[derive(Default)]
struct Fuzzed {
    now: u64,
    a20: bool,
    stops: usize,
}

impl Platform for Fuzzed {
    fn now_ns(&self) -> u64 {
        self.now
    }
    fn a20(&self) -> bool {
        self.a20
    }
    fn set_a20(&mut self, open: bool) {
        self.a20 = open;
    }
    fn console(&mut self, _: u8) {}
    fn stop(&mut self, _: StopRequest) {
        self.stops += 1;
    }
    fn wall_clock(&self) -> u64 {
        self.now / 1_000_000_000
    }
    fn evict_page(&mut self, _: u64) {}
    fn set_irq(&mut self, _: u8, _: bool) {}
}

fn bus() -> PortBus {
    let mut bus = PortBus::new();
    bus.add(port92::PORT, 1, Box::new(port92::Port92)).unwrap();
    bus.add(uart::COM1, 8, Box::new(uart::Uart::new(uart::COM1))).unwrap();
    let p = bus.add(pic::MASTER, 2, Box::new(pic::Pic::default())).unwrap();
    bus.add_range(p, pic::SLAVE, 2).unwrap();
    let t = bus.add(pit::CHANNEL0, 4, Box::new(pit::Pit::default())).unwrap();
    bus.add_range(t, pit::PORT_B, 1).unwrap();
    bus.add(cmos::INDEX, 2, Box::new(cmos::Cmos::default())).unwrap();
    bus.add(pci::ADDRESS, 8, Box::new(pci::PciConfig::default())).unwrap();
    bus.add(pm::PM1A_EVENT, pm::PORTS, Box::new(pm::AcpiPm::default())).unwrap();
    bus.add(debug_exit::PORT, 1, Box::new(debug_exit::DebugExit)).unwrap();
    bus.add(fw_cfg::SELECTOR, 2, Box::new(fw_cfg::FwCfg::new(2, 1 << 27))).unwrap();
    let d = bus.add(testdev::DATA_PORT, 8, Box::new(testdev::TestDev::default())).unwrap();
    bus.add_range(d, testdev::IRQ_PORTS, testdev::IRQ_PORT_COUNT).unwrap();
    bus
}

fuzz_target!(|data: &[u8]| {
    let mut bus = bus();
    let mut platform = Fuzzed::default();
    let mut apic = LocalApic::new(1);
    let mut msrs = MsrState::new(0, 39);
    for op in data.chunks_exact(12) {
        let word = |i: usize| u32::from_le_bytes([op[i], op[i + 1], op[i + 2], op[i + 3]]);
        let (a, b) = (word(4), word(8));
        let size = [1, 2, 4, 3][usize::from(op[1] & 3)];
        platform.now = platform.now.wrapping_add(u64::from(op[2]) << (op[3] & 31));
        match op[0] % 8 {
            0 => drop(bus.read(a as u16, size, &mut platform)),
            1 => bus.write(a as u16, size, b, &mut platform),
            2 => drop(apic.mmio_read(u64::from(a) & 0xFFF, platform.now)),
            3 => {
                if let Effect::Ipi(ipi) = apic.mmio_write(u64::from(a) & 0xFFF, b, platform.now) {
                    apic.receive(&ipi);
                }
            }
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
            _ => drop(msrs.read(a)),
        }
    }
});
