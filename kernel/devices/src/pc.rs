//! The legacy PC's port layout, in one place for the kernel and the fuzz target: which device
//! answers which ports.

use alloc::boxed::Box;

use crate::bus::{BusError, DeviceIndex};
use crate::{cmos, debug_exit, fw_cfg, pci, pic, pit, pm, port92, testdev, uart, PortBus};

/// A PC's port bus, and where the devices the caller drives itself are on it.
#[derive(Debug)]
pub struct LegacyPc {
    /// The bus.
    pub bus: PortBus,
    /// The 8259A pair (the caller raises its requests and takes its vectors).
    pub pic: DeviceIndex,
    /// The 8254 (the caller reads channel 0's period).
    pub pit: DeviceIndex,
}

/// The port bus of a PC with `vcpus` vCPUs and `ram_bytes` of RAM: system control port A
/// (0x92), COM1 (0x3F8), the PIC pair (0x20, 0xA0), the PIT and port 0x61, the CMOS RTC
/// (0x70), PCI configuration (0xCF8–0xCFF), the ACPI PM blocks (0x600), the test exit (0xF4),
/// fw_cfg (0x510) and pc-testdev (0xE0–0xE7, 0x2000–0x2017).
pub fn legacy_pc(vcpus: u16, ram_bytes: u64) -> Result<LegacyPc, BusError> {
    let mut bus = PortBus::new();
    bus.add(port92::PORT, 1, Box::new(port92::Port92))?;
    bus.add(uart::COM1, 8, Box::new(uart::Uart::new(uart::COM1)))?;
    let pic = bus.add(pic::MASTER, 2, Box::new(pic::Pic::default()))?;
    bus.add_range(pic, pic::SLAVE, 2)?;
    let pit = bus.add(pit::CHANNEL0, 4, Box::new(pit::Pit::default()))?;
    bus.add_range(pit, pit::PORT_B, 1)?;
    bus.add(cmos::INDEX, 2, Box::new(cmos::Cmos::default()))?;
    bus.add(pci::ADDRESS, 8, Box::new(pci::PciConfig::default()))?;
    bus.add(pm::PM1A_EVENT, pm::PORTS, Box::new(pm::AcpiPm::default()))?;
    bus.add(debug_exit::PORT, 1, Box::new(debug_exit::DebugExit))?;
    bus.add(
        fw_cfg::SELECTOR,
        2,
        Box::new(fw_cfg::FwCfg::new(vcpus, ram_bytes)),
    )?;
    let testdev = bus.add(testdev::DATA_PORT, 8, Box::new(testdev::TestDev::default()))?;
    bus.add_range(testdev, testdev::IRQ_PORTS, testdev::IRQ_PORT_COUNT)?;
    Ok(LegacyPc { bus, pic, pit })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPlatform;

    #[test]
    fn every_device_answers_at_its_ports_and_the_rest_is_unclaimed() {
        let mut pc = legacy_pc(2, 64 << 20).unwrap();
        let mut platform = TestPlatform::default();
        for (port, name) in [
            (0x92, "system control port A"),
            (0x3FD, "16550A UART"),
            (0xA1, "8259A PIC pair"),
            (0x61, "8254 PIT"),
            (0x71, "CMOS RTC"),
            (0xCFC, "PCI configuration"),
            (0x608, "ACPI PM"),
            (0xF4, "isa-debug-exit"),
            (0x511, "fw_cfg"),
            (0x200B, "pc-testdev"),
        ] {
            assert_eq!(pc.bus.device_at(port), Some(name), "{port:#x}");
        }
        assert_eq!(pc.bus.device_at(0x80), None);
        assert!(pc.bus.device_mut::<pic::Pic>(pc.pic).is_some());
        assert!(pc.bus.device_mut::<pit::Pit>(pc.pit).is_some());
        pc.bus.write(0x510, 2, 5, &mut platform);
        assert_eq!(pc.bus.read(0x511, 1, &mut platform), 2, "fw_cfg's CPU count");
    }

    #[test]
    fn a_cloned_bus_answers_as_the_original_did_and_then_goes_its_own_way() {
        let mut pc = legacy_pc(1, 64 << 20).unwrap();
        let mut platform = TestPlatform::default();
        // The UART's scratch register, the master PIC's mask, an unclaimed port.
        pc.bus.write(0x3FF, 1, 0x5A, &mut platform);
        pc.bus.write(0x21, 1, 0xFB, &mut platform);
        pc.bus.read(0x80, 1, &mut platform);
        let mut copy = pc.bus.clone();
        for port in [0x3FF, 0x21] {
            let original = pc.bus.read(port, 1, &mut platform);
            assert_eq!(copy.read(port, 1, &mut platform), original, "{port:#x}");
        }
        assert_eq!(pc.bus.read(0x3FF, 1, &mut platform), 0x5A);
        assert!(copy.unclaimed().eq(pc.bus.unclaimed()));
        copy.write(0x3FF, 1, 0x11, &mut platform);
        assert_eq!(pc.bus.read(0x3FF, 1, &mut platform), 0x5A);
        assert_eq!(copy.read(0x3FF, 1, &mut platform), 0x11);
    }
}
