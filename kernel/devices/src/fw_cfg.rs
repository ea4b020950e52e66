//! QEMU's firmware configuration device, legacy port interface (QEMU's
//! `docs/specs/fw_cfg.rst`): a 16-bit write to the selector port 0x510 picks an item, and byte
//! reads of the data port 0x511 return its bytes in order, zeros past its end. kvm-unit-tests
//! reads the CPU count and RAM size here. Items: the signature "QEMU", the interface ID
//! (traditional interface only), the RAM size, the CPU count and its maximum.

use alloc::vec::Vec;

use crate::{all_ones, Platform, PortDevice};

/// The selector port (16-bit writes).
pub const SELECTOR: u16 = 0x510;
/// The data port (byte reads).
pub const DATA: u16 = 0x511;

/// Item keys (QEMU's `FW_CFG_*`).
pub mod key {
    /// "QEMU".
    pub const SIGNATURE: u16 = 0x00;
    /// Interface ID: bit 0, the traditional interface.
    pub const ID: u16 = 0x01;
    /// RAM size in bytes (u64).
    pub const RAM_SIZE: u16 = 0x03;
    /// Number of CPUs started (u16).
    pub const NB_CPUS: u16 = 0x05;
    /// Maximum number of CPUs (u16).
    pub const MAX_CPUS: u16 = 0x0F;
}

/// The device, with its items fixed when the VM is made.
#[derive(Clone, Debug)]
pub struct FwCfg {
    selected: u16,
    offset: usize,
    items: Vec<(u16, Vec<u8>)>,
}

impl FwCfg {
    /// A device describing a VM with `cpus` vCPUs and `ram_bytes` of RAM.
    pub fn new(cpus: u16, ram_bytes: u64) -> FwCfg {
        FwCfg {
            selected: key::SIGNATURE,
            offset: 0,
            items: Vec::from([
                (key::SIGNATURE, b"QEMU".to_vec()),
                (key::ID, 1u32.to_le_bytes().to_vec()),
                (key::RAM_SIZE, ram_bytes.to_le_bytes().to_vec()),
                (key::NB_CPUS, cpus.to_le_bytes().to_vec()),
                (key::MAX_CPUS, cpus.to_le_bytes().to_vec()),
            ]),
        }
    }

    fn item(&self) -> &[u8] {
        self.items
            .iter()
            .find(|(key, _)| *key == self.selected)
            .map_or(&[], |(_, data)| data)
    }
}

impl PortDevice for FwCfg {
    fn name(&self) -> &'static str {
        "fw_cfg"
    }

    /// Each byte of a data-port read is the item's next byte (0 past its end or for an unknown
    /// item); the selector port reads all ones.
    fn read(&mut self, port: u16, size: u8, _: &mut dyn Platform) -> u32 {
        if port != DATA {
            return all_ones(size);
        }
        let mut value = 0;
        for byte in 0..u32::from(size) {
            let next = self.item().get(self.offset).copied().unwrap_or(0);
            self.offset = self.offset.saturating_add(1);
            value |= u32::from(next) << (8 * byte);
        }
        value
    }

    /// A 16-bit selector write picks an item and rewinds; data-port writes are ignored (the
    /// legacy interface's write channel is gone from QEMU since 2.4).
    fn write(&mut self, port: u16, size: u8, value: u32, _: &mut dyn Platform) {
        if port == SELECTOR && size == 2 {
            self.selected = value as u16;
            self.offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPlatform;

    fn read_item(device: &mut FwCfg, key: u16, bytes: usize) -> Vec<u8> {
        let mut platform = TestPlatform::default();
        device.write(SELECTOR, 2, u32::from(key), &mut platform);
        (0..bytes)
            .map(|_| device.read(DATA, 1, &mut platform) as u8)
            .collect()
    }

    #[test]
    fn items_read_byte_by_byte_as_kvm_unit_tests_reads_them() {
        let mut device = FwCfg::new(2, 256 << 20);
        assert_eq!(read_item(&mut device, key::SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut device, key::NB_CPUS, 2), [2, 0]);
        assert_eq!(
            u64::from_le_bytes(read_item(&mut device, key::RAM_SIZE, 8).try_into().unwrap()),
            256 << 20
        );
        assert_eq!(read_item(&mut device, key::ID, 4), [1, 0, 0, 0]);
    }

    #[test]
    fn unknown_items_and_reads_past_the_end_give_zeros() {
        let mut device = FwCfg::new(1, 1 << 20);
        assert_eq!(read_item(&mut device, 0x11, 8), [0; 8]);
        assert_eq!(read_item(&mut device, key::SIGNATURE, 6), b"QEMU\0\0");
    }

    #[test]
    fn only_a_word_write_to_the_selector_selects() {
        let mut device = FwCfg::new(4, 1 << 20);
        let mut platform = TestPlatform::default();
        device.write(SELECTOR, 2, u32::from(key::NB_CPUS), &mut platform);
        device.write(SELECTOR, 1, u32::from(key::SIGNATURE), &mut platform);
        device.write(DATA, 1, 0xAA, &mut platform);
        assert_eq!(device.read(DATA, 2, &mut platform), 4);
        assert_eq!(device.read(SELECTOR, 2, &mut platform), 0xFFFF);
    }
}
