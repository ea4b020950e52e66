//! The CMOS RTC (Motorola MC146818A, as in every PC) at ports 0x70 (index; bit 7 masks NMI)
//! and 0x71 (data). The time registers give the host's wall-clock time (UTC) in the format
//! status register B selects (BCD or binary, 12- or 24-hour); the update-in-progress bit is
//! never set, since the time is computed at each read. The other bytes of the 128-byte RAM
//! hold what the guest writes.

use crate::{all_ones, Platform, PortDevice};

/// The index port.
pub const INDEX: u16 = 0x70;
/// The data port.
pub const DATA: u16 = 0x71;

/// Register numbers.
pub mod reg {
    /// Seconds, minutes, hours (0x00, 0x02, 0x04).
    pub const SECONDS: u8 = 0x00;
    /// Minutes.
    pub const MINUTES: u8 = 0x02;
    /// Hours.
    pub const HOURS: u8 = 0x04;
    /// Day of the week (1 = Sunday).
    pub const WEEKDAY: u8 = 0x06;
    /// Day of the month.
    pub const DAY: u8 = 0x07;
    /// Month.
    pub const MONTH: u8 = 0x08;
    /// Year within the century.
    pub const YEAR: u8 = 0x09;
    /// Status A: update in progress (bit 7), dividers.
    pub const STATUS_A: u8 = 0x0A;
    /// Status B: 24-hour (bit 1), binary (bit 2).
    pub const STATUS_B: u8 = 0x0B;
    /// Status C: interrupt flags.
    pub const STATUS_C: u8 = 0x0C;
    /// Status D: valid RAM and time (bit 7).
    pub const STATUS_D: u8 = 0x0D;
    /// Century (the ACPI FADT's default).
    pub const CENTURY: u8 = 0x32;
}

const B_24_HOUR: u8 = 1 << 1;
const B_BINARY: u8 = 1 << 2;
const D_VALID: u8 = 1 << 7;

/// The RTC and its RAM.
#[derive(Clone, Debug)]
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        let mut ram = [0; 128];
        // 32.768 kHz time base, 1.024 kHz periodic rate; BCD, 24-hour.
        ram[usize::from(reg::STATUS_A)] = 0x26;
        ram[usize::from(reg::STATUS_B)] = B_24_HOUR;
        Cmos { index: 0, ram }
    }
}

/// The civil date of day `days` since 1970-01-01: (year, month, day).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    // Howard Hinnant's algorithm: eras of 400 years starting on March 1st.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Cmos {
    fn encode(&self, value: u8) -> u8 {
        if self.ram[usize::from(reg::STATUS_B)] & B_BINARY != 0 {
            value
        } else {
            ((value / 10) << 4) | (value % 10)
        }
    }

    fn hours(&self, hours: u8) -> u8 {
        if self.ram[usize::from(reg::STATUS_B)] & B_24_HOUR != 0 {
            return self.encode(hours);
        }
        // 12-hour: 12, 1..11, with bit 7 for PM.
        let pm = if hours >= 12 { 0x80 } else { 0 };
        let twelve = match hours % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve) | pm
    }

    /// Register `index` at wall-clock time `now` (seconds since 1970).
    fn register(&mut self, index: u8, now: u64) -> u8 {
        let seconds_of_day = now % 86_400;
        let days = (now / 86_400) as i64;
        let (year, month, day) = civil_from_days(days);
        match index {
            reg::SECONDS => self.encode((seconds_of_day % 60) as u8),
            reg::MINUTES => self.encode((seconds_of_day / 60 % 60) as u8),
            reg::HOURS => self.hours((seconds_of_day / 3600) as u8),
            // 1970-01-01 was a Thursday (5 with Sunday = 1).
            reg::WEEKDAY => self.encode(((days + 4).rem_euclid(7) + 1) as u8),
            reg::DAY => self.encode(day),
            reg::MONTH => self.encode(month),
            reg::YEAR => self.encode(year.rem_euclid(100) as u8),
            reg::CENTURY => self.encode((year / 100) as u8),
            // Update never in progress: the time is computed on each read.
            reg::STATUS_A => self.ram[usize::from(index)] & 0x7F,
            reg::STATUS_C => core::mem::take(&mut self.ram[usize::from(index)]),
            reg::STATUS_D => D_VALID,
            _ => self.ram[usize::from(index)],
        }
    }
}

impl PortDevice for Cmos {
    fn name(&self) -> &'static str {
        "CMOS RTC"
    }

    fn read(&mut self, port: u16, size: u8, platform: &mut dyn Platform) -> u32 {
        match (port, size) {
            (DATA, 1) => u32::from(self.register(self.index, platform.wall_clock())),
            _ => all_ones(size),
        }
    }

    fn write(&mut self, port: u16, size: u8, value: u32, _: &mut dyn Platform) {
        if size != 1 {
            return;
        }
        let byte = value as u8;
        match port {
            // Bit 7 masks NMIs on a PC; there are none to mask here.
            INDEX => self.index = byte & 0x7F,
            DATA => match self.index {
                // The clock follows the host; status C and D are read-only.
                reg::SECONDS..=reg::YEAR | reg::CENTURY | reg::STATUS_C | reg::STATUS_D => {}
                index => self.ram[usize::from(index)] = byte,
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPlatform;

    /// 2026-12-06 05:49:29 UTC, a Sunday.
    const NOW: u64 = 1_796_536_169;

    fn read(cmos: &mut Cmos, p: &mut TestPlatform, index: u8) -> u8 {
        cmos.write(INDEX, 1, u32::from(index), p);
        cmos.read(DATA, 1, p) as u8
    }

    #[test]
    fn the_time_registers_give_the_host_time_in_bcd_by_default() {
        let mut cmos = Cmos::default();
        let mut p = TestPlatform {
            wall_clock: NOW,
            ..TestPlatform::default()
        };
        let got: alloc::vec::Vec<u8> = [
            reg::SECONDS,
            reg::MINUTES,
            reg::HOURS,
            reg::WEEKDAY,
            reg::DAY,
            reg::MONTH,
            reg::YEAR,
            reg::CENTURY,
        ]
        .iter()
        .map(|&r| read(&mut cmos, &mut p, r))
        .collect();
        assert_eq!(got, [0x29, 0x49, 0x05, 0x01, 0x06, 0x12, 0x26, 0x20]);
        assert_eq!(
            read(&mut cmos, &mut p, reg::STATUS_A) & 0x80,
            0,
            "no update in progress"
        );
        assert_eq!(read(&mut cmos, &mut p, reg::STATUS_D), D_VALID);
    }

    #[test]
    fn status_b_selects_binary_and_twelve_hour_formats() {
        let mut cmos = Cmos::default();
        let mut p = TestPlatform {
            wall_clock: NOW + 10 * 3600,
            ..TestPlatform::default()
        };
        cmos.write(INDEX, 1, u32::from(reg::STATUS_B), &mut p);
        cmos.write(DATA, 1, u32::from(B_BINARY), &mut p);
        assert_eq!(read(&mut cmos, &mut p, reg::HOURS), 0x80 | 3, "15:49 is 3 PM");
        assert_eq!(read(&mut cmos, &mut p, reg::MINUTES), 49);
        assert_eq!(read(&mut cmos, &mut p, reg::YEAR), 26);
    }

    #[test]
    fn dates_convert_across_leap_years_and_centuries() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(47_482), (2100, 1, 1));
    }

    #[test]
    fn ram_bytes_hold_writes_and_the_clock_ignores_them() {
        let mut cmos = Cmos::default();
        let mut p = TestPlatform::default();
        cmos.write(INDEX, 1, 0x80 | 0x40, &mut p);
        cmos.write(DATA, 1, 0x5A, &mut p);
        assert_eq!(read(&mut cmos, &mut p, 0x40), 0x5A);
        cmos.write(INDEX, 1, u32::from(reg::SECONDS), &mut p);
        cmos.write(DATA, 1, 0x59, &mut p);
        assert_eq!(read(&mut cmos, &mut p, reg::SECONDS), 0);
        assert_eq!(cmos.read(INDEX, 1, &mut p), 0xFF);
    }
}
