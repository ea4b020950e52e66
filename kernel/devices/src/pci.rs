//! PCI configuration mechanism #1 (PCI Local Bus Specification 3.0, 3.2.2.3.2): the address
//! register at 0xCF8 (a dword: enable bit 31, bus, device, function, register) and the data
//! window at 0xCFC–0xCFF. Bus 0 holds one device, a host bridge at 00:00.0 (Intel's 440FX
//! IDs, as QEMU's `pc` machine has); every other function reads all ones, as an empty slot
//! does. The host bridge's configuration space is read-only here.
//!
//! Byte port 0xCF9, inside the address register's dword, is the PC's reset control register
//! (Intel ICH): writing it with bit 2 (reset CPU) set resets the machine.

use crate::{all_ones, Platform, PortDevice, StopRequest};

/// The address register.
pub const ADDRESS: u16 = 0xCF8;
/// The reset control register (byte access only).
pub const RESET_CONTROL: u16 = 0xCF9;
/// The data window.
pub const DATA: u16 = 0xCFC;

const ENABLE: u32 = 1 << 31;
/// Reset control: bit 1 system reset (hard), bit 2 reset CPU (the write that acts).
const RESET_CPU: u32 = 1 << 2;

/// The host bridge's first 16 bytes: vendor 0x8086, device 0x1237 (82441FX), command
/// (memory and I/O space), status, revision 2, class 06:00:00 (host bridge), header type 0.
const HOST_BRIDGE: [u8; 16] = [
    0x86, 0x80, 0x37, 0x12, 0x06, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x06, 0x00, 0x00, 0x00, 0x00,
];

/// The configuration-space access ports.
#[derive(Clone, Debug, Default)]
pub struct PciConfig {
    address: u32,
    reset_control: u8,
}

impl PciConfig {
    /// The byte at configuration offset `offset` of the function the address register names.
    fn config_byte(&self, offset: u8) -> u8 {
        let bus = (self.address >> 16) & 0xFF;
        let device = (self.address >> 11) & 0x1F;
        let function = (self.address >> 8) & 7;
        if (bus, device, function) != (0, 0, 0) {
            return 0xFF;
        }
        HOST_BRIDGE.get(usize::from(offset)).copied().unwrap_or(0)
    }
}

impl PortDevice for PciConfig {
    fn name(&self) -> &'static str {
        "PCI configuration"
    }

    fn read(&mut self, port: u16, size: u8, _: &mut dyn Platform) -> u32 {
        match (port, size) {
            (ADDRESS, 4) => self.address,
            (RESET_CONTROL, 1) => u32::from(self.reset_control),
            (DATA..=0xCFF, _) if self.address & ENABLE != 0 => {
                let register = (self.address & 0xFC) as u8 + (port - DATA) as u8;
                (0..size).fold(0, |value, i| {
                    value | (u32::from(self.config_byte(register.wrapping_add(i))) << (8 * i))
                })
            }
            _ => all_ones(size),
        }
    }

    fn write(&mut self, port: u16, size: u8, value: u32, platform: &mut dyn Platform) {
        match (port, size) {
            (ADDRESS, 4) => self.address = value & 0x80FF_FFFC,
            (RESET_CONTROL, 1) => {
                self.reset_control = value as u8 & 0x0A;
                if value & RESET_CPU != 0 {
                    platform.stop(StopRequest::Reset);
                }
            }
            // The host bridge's registers are read-only; nothing else exists.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPlatform;

    fn address(bus: u32, device: u32, function: u32, register: u32) -> u32 {
        ENABLE | (bus << 16) | (device << 11) | (function << 8) | register
    }

    #[test]
    fn the_host_bridge_answers_at_00_00_0_and_empty_slots_read_all_ones() {
        let mut pci = PciConfig::default();
        let mut p = TestPlatform::default();
        pci.write(ADDRESS, 4, address(0, 0, 0, 0), &mut p);
        assert_eq!(pci.read(ADDRESS, 4, &mut p), address(0, 0, 0, 0));
        assert_eq!(pci.read(DATA, 4, &mut p), 0x1237_8086);
        assert_eq!(pci.read(DATA + 2, 2, &mut p), 0x1237);
        pci.write(ADDRESS, 4, address(0, 0, 0, 8), &mut p);
        assert_eq!(pci.read(DATA, 4, &mut p), 0x0600_0002);
        pci.write(ADDRESS, 4, address(0, 0, 0, 0x3C), &mut p);
        assert_eq!(pci.read(DATA, 4, &mut p), 0);
        pci.write(ADDRESS, 4, address(0, 3, 0, 0), &mut p);
        assert_eq!(pci.read(DATA, 4, &mut p), 0xFFFF_FFFF);
        pci.write(ADDRESS, 4, address(1, 0, 0, 0), &mut p);
        assert_eq!(pci.read(DATA, 2, &mut p), 0xFFFF);
    }

    #[test]
    fn without_the_enable_bit_the_window_reads_all_ones_and_writes_change_nothing() {
        let mut pci = PciConfig::default();
        let mut p = TestPlatform::default();
        pci.write(ADDRESS, 4, 0, &mut p);
        assert_eq!(pci.read(DATA, 4, &mut p), 0xFFFF_FFFF);
        pci.write(ADDRESS, 4, address(0, 0, 0, 0), &mut p);
        pci.write(DATA, 4, 0, &mut p);
        assert_eq!(pci.read(DATA, 4, &mut p), 0x1237_8086);
    }

    #[test]
    fn a_reset_cpu_write_to_cf9_resets_and_other_bits_do_not() {
        let mut pci = PciConfig::default();
        let mut p = TestPlatform::default();
        pci.write(RESET_CONTROL, 1, 0x02, &mut p);
        assert!(p.stops.is_empty());
        assert_eq!(pci.read(RESET_CONTROL, 1, &mut p), 0x02);
        pci.write(RESET_CONTROL, 1, 0x06, &mut p);
        assert_eq!(p.stops, [StopRequest::Reset]);
    }
}
