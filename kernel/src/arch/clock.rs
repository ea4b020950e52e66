//! The host's clocks, as the guests' devices need them: the TSC's rate, measured once at boot
//! against the PIT (channel 2, gated through port 0x61, as Linux's `pit_calibrate_tsc` does),
//! and the wall-clock time read from the host's CMOS RTC at boot. Both are kept in statics;
//! everything after boot is TSC arithmetic.

use core::sync::atomic::{AtomicU64, Ordering};

use x86_64::instructions::port::Port;

use super::ticks;

/// The PIT's input clock in Hz.
const PIT_HZ: u64 = 1_193_182;
/// The calibration's length in PIT clocks (10 ms).
const CALIBRATION_CLOCKS: u16 = 11_932;
/// The rate assumed when calibration fails (no PIT): Bochs's CI rate, so that times stay in
/// the right order of magnitude.
const FALLBACK_HZ: u64 = 4_000_000;

static TSC_HZ: AtomicU64 = AtomicU64::new(FALLBACK_HZ);
static BOOT_TSC: AtomicU64 = AtomicU64::new(0);
static BOOT_EPOCH: AtomicU64 = AtomicU64::new(0);

/// Measures the TSC's rate and reads the RTC. Call once at boot, on the bootstrap CPU, before
/// any guest runs (the guests' PIT and RTC are emulated, so nothing else drives these ports).
pub fn init() {
    let hz = measure_tsc_hz().unwrap_or(FALLBACK_HZ);
    TSC_HZ.store(hz, Ordering::Relaxed);
    BOOT_TSC.store(ticks(), Ordering::Relaxed);
    BOOT_EPOCH.store(read_rtc_epoch(), Ordering::Relaxed);
}

/// TSC ticks per second.
pub fn tsc_hz() -> u64 {
    TSC_HZ.load(Ordering::Relaxed)
}

/// Nanoseconds between TSC values `from` and `to`.
pub fn ticks_to_ns(from: u64, to: u64) -> u64 {
    (u128::from(to.saturating_sub(from)) * 1_000_000_000 / u128::from(tsc_hz())) as u64
}

/// The wall-clock time now, in seconds since 1970-01-01 UTC.
pub fn wall_clock() -> u64 {
    BOOT_EPOCH.load(Ordering::Relaxed)
        + ticks_to_ns(BOOT_TSC.load(Ordering::Relaxed), ticks()) / 1_000_000_000
}

/// TSC ticks over [`CALIBRATION_CLOCKS`] PIT clocks; `None` when the PIT's output never rises.
fn measure_tsc_hz() -> Option<u64> {
    let mut port_b = Port::<u8>::new(0x61);
    let mut control = Port::<u8>::new(0x43);
    let mut channel2 = Port::<u8>::new(0x42);
    // SAFETY: the PIT and port 0x61 belong to the host kernel, which uses them nowhere else;
    // channel 2 drives only the speaker, which stays off (bit 1 clear).
    unsafe {
        let b = port_b.read();
        port_b.write((b & !0x02) | 0x01);
        // Channel 2, low then high byte, mode 0, binary.
        control.write(0xB0);
        channel2.write(CALIBRATION_CLOCKS as u8);
        channel2.write((CALIBRATION_CLOCKS >> 8) as u8);
    }
    let start = ticks();
    // At most ~10^8 polls: far beyond 10 ms at any speed this kernel runs at.
    for _ in 0..100_000_000u64 {
        // SAFETY: as above; reading port 0x61 has no side effect.
        if unsafe { port_b.read() } & 0x20 != 0 {
            let elapsed = ticks() - start;
            return Some(elapsed * PIT_HZ / u64::from(CALIBRATION_CLOCKS));
        }
    }
    None
}

/// The host RTC's time as seconds since 1970 (0 when the RTC looks invalid).
fn read_rtc_epoch() -> u64 {
    let mut index = Port::<u8>::new(0x70);
    let mut data = Port::<u8>::new(0x71);
    let mut read = |register: u8| {
        // SAFETY: the CMOS ports belong to the host kernel, which uses them nowhere else;
        // NMIs stay enabled (bit 7 clear).
        unsafe {
            index.write(register);
            data.read()
        }
    };
    // Wait out an update in progress (status A bit 7), at most a few thousand reads.
    for _ in 0..10_000 {
        if read(0x0A) & 0x80 == 0 {
            break;
        }
    }
    let binary = read(0x0B) & 0x04 != 0;
    let twelve_hour = read(0x0B) & 0x02 == 0;
    let decode = |value: u8| {
        if binary {
            u64::from(value)
        } else {
            u64::from(value >> 4) * 10 + u64::from(value & 0x0F)
        }
    };
    let seconds = decode(read(0x00));
    let minutes = decode(read(0x02));
    let raw_hours = read(0x04);
    let mut hours = decode(raw_hours & 0x7F);
    if twelve_hour {
        hours = (hours % 12) + if raw_hours & 0x80 != 0 { 12 } else { 0 };
    }
    let day = decode(read(0x07));
    let month = decode(read(0x08));
    let year = 2000 + decode(read(0x09));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return 0;
    }
    days_from_civil(year, month, day) * 86_400 + hours * 3600 + minutes * 60 + seconds
}

/// Days from 1970-01-01 to the given date (Howard Hinnant's algorithm; years from 1970).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}
