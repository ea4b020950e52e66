//! QEMU's `pc-testdev` (hw/misc/pc-testdev.c), which kvm-unit-tests expects beside the PC:
//! - ports 0xE0–0xE3: a 32-bit register that reads back what was written, at any size and
//!   offset (the `emulator` and `realmode` tests check port I/O of every width with it);
//! - ports 0xE4–0xE7: a 32-bit write names a guest-physical page whose mapping is dropped, so
//!   that the guest's next access to it faults into the hypervisor (`eventinj` makes an
//!   interrupt's delivery fault this way);
//! - ports 0x2000–0x2017: a write to port 0x2000 + n drives ISA interrupt line n (up to 15)
//!   high (non-zero) or low (`realmode` raises IRQ 11 this way);
//! - [`IoRam`]: 64 KiB at 0xFF00_0000 that read back what was written, reached through MMIO
//!   exits (the `emulator` test runs its instructions on it).

use alloc::vec;
use alloc::vec::Vec;

use crate::{all_ones, Platform, PortDevice};

/// The data register's port.
pub const DATA_PORT: u16 = 0xE0;
/// The page-eviction port.
pub const EVICT_PORT: u16 = 0xE4;
/// The first interrupt-line port, and how many there are.
pub const IRQ_PORTS: u16 = 0x2000;
/// See [`IRQ_PORTS`].
pub const IRQ_PORT_COUNT: u32 = 24;
/// The guest-physical base of the MMIO "ioram".
pub const IORAM_BASE: u64 = 0xFF00_0000;
/// Its size.
pub const IORAM_SIZE: usize = 0x1_0000;

/// The port half of the test device.
#[derive(Clone, Debug, Default)]
pub struct TestDev {
    data: u32,
}

/// The bits of the data register an access of `size` bytes at `port` covers, and the shift.
fn lane(port: u16, size: u8) -> (u32, u32) {
    let shift = 8 * u32::from(port & 3);
    let mask = all_ones(size).checked_shl(shift).unwrap_or(0);
    (mask, shift)
}

impl PortDevice for TestDev {
    fn name(&self) -> &'static str {
        "pc-testdev"
    }

    fn read(&mut self, port: u16, size: u8, _: &mut dyn Platform) -> u32 {
        if port & !3 != DATA_PORT {
            return all_ones(size);
        }
        let (mask, shift) = lane(port, size);
        (self.data & mask) >> shift
    }

    fn write(&mut self, port: u16, size: u8, value: u32, platform: &mut dyn Platform) {
        if let Some(line) = port.checked_sub(IRQ_PORTS).filter(|&line| line < 16) {
            platform.set_irq(line as u8, value != 0);
            return;
        }
        if port & !3 == DATA_PORT {
            let (mask, shift) = lane(port, size);
            self.data = (self.data & !mask) | ((value << shift) & mask);
        } else if port == EVICT_PORT && size == 4 {
            platform.evict_page(u64::from(value));
        }
    }
}

/// The test device's 64 KiB MMIO memory.
#[derive(Clone, Debug)]
pub struct IoRam {
    bytes: Vec<u8>,
}

impl Default for IoRam {
    fn default() -> Self {
        IoRam {
            bytes: vec![0; IORAM_SIZE],
        }
    }
}

impl IoRam {
    /// Reads `data.len()` bytes at `offset` (past the end: all ones).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self
                .byte(offset.saturating_add(i as u64))
                .copied()
                .unwrap_or(0xFF);
        }
    }

    /// Writes `data` at `offset` (past the end: dropped).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            if let Some(byte) = self.byte_mut(offset.saturating_add(i as u64)) {
                *byte = value;
            }
        }
    }

    fn byte(&self, offset: u64) -> Option<&u8> {
        self.bytes.get(usize::try_from(offset).ok()?)
    }

    fn byte_mut(&mut self, offset: u64) -> Option<&mut u8> {
        self.bytes.get_mut(usize::try_from(offset).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPlatform;

    #[test]
    fn the_data_register_reads_back_at_every_width_and_offset() {
        let mut dev = TestDev::default();
        let mut platform = TestPlatform::default();
        dev.write(DATA_PORT, 4, 0x1234_5678, &mut platform);
        assert_eq!(dev.read(DATA_PORT, 1, &mut platform), 0x78);
        assert_eq!(dev.read(DATA_PORT + 1, 2, &mut platform), 0x3456);
        assert_eq!(dev.read(DATA_PORT + 3, 1, &mut platform), 0x12);
        dev.write(DATA_PORT + 2, 1, 0xAB, &mut platform);
        assert_eq!(dev.read(DATA_PORT, 4, &mut platform), 0x12AB_5678);
        dev.write(DATA_PORT, 2, 0x9999, &mut platform);
        assert_eq!(dev.read(DATA_PORT, 4, &mut platform), 0x12AB_9999);
        // A dword at offset 3 keeps only the lane inside the register.
        dev.write(DATA_PORT + 3, 4, 0xFFFF_FF00, &mut platform);
        assert_eq!(dev.read(DATA_PORT, 4, &mut platform), 0x00AB_9999);
    }

    #[test]
    fn a_dword_to_the_eviction_port_names_the_page() {
        let mut dev = TestDev::default();
        let mut platform = TestPlatform::default();
        dev.write(EVICT_PORT, 4, 0x7000, &mut platform);
        dev.write(EVICT_PORT, 1, 0x8000, &mut platform);
        assert_eq!(platform.evicted, [0x7000]);
        assert_eq!(dev.read(EVICT_PORT, 4, &mut platform), 0xFFFF_FFFF);
    }

    #[test]
    fn the_irq_ports_drive_the_isa_lines() {
        let mut dev = TestDev::default();
        let mut platform = TestPlatform::default();
        dev.write(IRQ_PORTS + 11, 4, 1, &mut platform);
        dev.write(IRQ_PORTS + 11, 4, 0, &mut platform);
        dev.write(IRQ_PORTS + 20, 4, 1, &mut platform);
        assert_eq!(
            platform.irqs,
            [(11, true), (11, false)],
            "lines 16 and up are not ISA"
        );
    }

    #[test]
    fn ioram_reads_back_and_ignores_what_lies_past_its_end() {
        let mut ram = IoRam::default();
        ram.write(0x10, &[1, 2, 3, 4]);
        ram.write(IORAM_SIZE as u64 - 2, &[5, 6, 7, 8]);
        let mut data = [0; 4];
        ram.read(0x10, &mut data);
        assert_eq!(data, [1, 2, 3, 4]);
        ram.read(IORAM_SIZE as u64 - 2, &mut data);
        assert_eq!(data, [5, 6, 0xFF, 0xFF]);
        ram.read(u64::MAX, &mut data);
        assert_eq!(data, [0xFF; 4]);
    }
}
