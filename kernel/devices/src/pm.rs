//! The ACPI fixed hardware the FADT names (ACPI 6.5, 4.8): the PM1a event block (status and
//! enable), the PM1a control block, where writing SLP_EN with sleep type S5 powers the
//! machine off, and the PM timer, a 24-bit counter at 3.579545 MHz. The blocks sit at ports
//! 0x600 (event), 0x604 (control) and 0x608 (timer), where QEMU's q35 puts them.

use crate::{all_ones, Platform, PortDevice, StopRequest};

/// PM1a event block: PM1_STS (2 bytes) then PM1_EN (2 bytes).
pub const PM1A_EVENT: u16 = 0x600;
/// PM1a control block (2 bytes).
pub const PM1A_CONTROL: u16 = 0x604;
/// PM timer block (4 bytes).
pub const PM_TIMER: u16 = 0x608;
/// The ports from [`PM1A_EVENT`] this device answers.
pub const PORTS: u32 = 12;
/// The PM timer's frequency in Hz.
pub const TIMER_HZ: u64 = 3_579_545;
/// The sleep type this machine's `\_S5` names (QEMU's value).
pub const S5_SLEEP_TYPE: u16 = 0;

/// PM1 control: SCI_EN (the machine is in ACPI mode), SLP_TYP (bits 12:10), SLP_EN (bit 13).
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_EN: u16 = 1 << 13;

/// The PM1a blocks and the PM timer.
#[derive(Clone, Debug, Default)]
pub struct AcpiPm {
    status: u16,
    enable: u16,
    control: u16,
}

impl AcpiPm {
    /// The PM timer's count at `now_ns` nanoseconds (24 bits, wrapping).
    pub fn timer(now_ns: u64) -> u32 {
        let ticks = u128::from(now_ns) * u128::from(TIMER_HZ) / 1_000_000_000;
        (ticks & 0xFF_FFFF) as u32
    }

    fn read16(&self, port: u16) -> u16 {
        match port {
            PM1A_EVENT => self.status,
            p if p == PM1A_EVENT + 2 => self.enable,
            // There is no SMI to switch modes with: the machine is always in ACPI mode.
            PM1A_CONTROL => self.control | SCI_EN,
            _ => 0xFFFF,
        }
    }

    fn write16(&mut self, port: u16, value: u16, platform: &mut dyn Platform) {
        match port {
            // Status bits are cleared by writing 1.
            PM1A_EVENT => self.status &= !value,
            p if p == PM1A_EVENT + 2 => self.enable = value,
            PM1A_CONTROL => {
                self.control = value & !SLP_EN;
                if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & 7 == S5_SLEEP_TYPE {
                    platform.stop(StopRequest::PowerOff);
                }
            }
            _ => {}
        }
    }
}

impl PortDevice for AcpiPm {
    fn name(&self) -> &'static str {
        "ACPI PM"
    }

    fn read(&mut self, port: u16, size: u8, platform: &mut dyn Platform) -> u32 {
        match (port, size) {
            (PM_TIMER, 4) => AcpiPm::timer(platform.now_ns()),
            (PM1A_EVENT | PM1A_CONTROL, 2) => u32::from(self.read16(port)),
            (p, 2) if p == PM1A_EVENT + 2 => u32::from(self.read16(port)),
            (PM1A_EVENT, 4) => u32::from(self.status) | (u32::from(self.enable) << 16),
            _ => all_ones(size),
        }
    }

    fn write(&mut self, port: u16, size: u8, value: u32, platform: &mut dyn Platform) {
        match (port, size) {
            (_, 2) => self.write16(port, value as u16, platform),
            (PM1A_EVENT, 4) => {
                self.write16(PM1A_EVENT, value as u16, platform);
                self.write16(PM1A_EVENT + 2, (value >> 16) as u16, platform);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPlatform;

    #[test]
    fn the_timer_counts_at_3_579545_mhz_and_wraps_at_24_bits() {
        let mut pm = AcpiPm::default();
        let mut platform = TestPlatform::default();
        assert_eq!(pm.read(PM_TIMER, 4, &mut platform), 0);
        platform.now = 1_000_000_000;
        assert_eq!(pm.read(PM_TIMER, 4, &mut platform), (TIMER_HZ & 0xFF_FFFF) as u32);
        platform.now = 1_000_000;
        assert_eq!(pm.read(PM_TIMER, 4, &mut platform), 3579);
        // 2^24 counts take 4.687 s.
        platform.now = 4_687_000_000 + 1_000_000;
        assert!(pm.read(PM_TIMER, 4, &mut platform) < 10_000);
    }

    #[test]
    fn slp_en_with_the_s5_type_powers_off_and_other_types_do_not() {
        let mut pm = AcpiPm::default();
        let mut platform = TestPlatform::default();
        pm.write(
            PM1A_CONTROL,
            2,
            u32::from((1 << SLP_TYP_SHIFT) | SLP_EN),
            &mut platform,
        );
        assert!(platform.stops.is_empty(), "S1 is not S5");
        pm.write(
            PM1A_CONTROL,
            2,
            u32::from(S5_SLEEP_TYPE << SLP_TYP_SHIFT),
            &mut platform,
        );
        assert!(platform.stops.is_empty(), "no SLP_EN");
        pm.write(
            PM1A_CONTROL,
            2,
            u32::from((S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN),
            &mut platform,
        );
        assert_eq!(platform.stops, [StopRequest::PowerOff]);
        assert_eq!(
            pm.read(PM1A_CONTROL, 2, &mut platform) as u16 & SLP_EN,
            0,
            "SLP_EN reads 0"
        );
    }

    #[test]
    fn the_machine_is_in_acpi_mode_and_status_bits_clear_on_writing_one() {
        let mut pm = AcpiPm::default();
        let mut platform = TestPlatform::default();
        assert_eq!(pm.read(PM1A_CONTROL, 2, &mut platform) as u16 & SCI_EN, SCI_EN);
        pm.status = 0b101;
        pm.write(PM1A_EVENT, 2, 0b001, &mut platform);
        assert_eq!(pm.read(PM1A_EVENT, 2, &mut platform), 0b100);
        pm.write(PM1A_EVENT + 2, 2, 0x21, &mut platform);
        assert_eq!(pm.read(PM1A_EVENT, 4, &mut platform), 0x21_0004);
        assert_eq!(
            pm.read(PM_TIMER, 2, &mut platform),
            0xFFFF,
            "the timer is a dword register"
        );
    }
}
