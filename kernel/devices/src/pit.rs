//! The 8254 programmable interval timer (Intel 8254 data sheet) at ports 0x40–0x43, with the
//! PC's port 0x61 (NMI status and control), whose bit 0 gates channel 2 and whose bit 5 shows
//! channel 2's output: what a guest calibrating its TSC against the PIT uses (Linux's
//! `pit_calibrate_tsc` and `quick_pit_calibrate`). Channels 0 and 2 count at 1.193182 MHz in
//! modes 0 (interrupt on terminal count), 2 (rate generator) and 3 (square wave); the counter
//! is computed from the [`Platform`]'s clock when read, so nothing runs between accesses.
//! Channel 0's output period is [`Pit::channel0_period_ns`], for the caller's timer. Channel 1
//! (DRAM refresh) is not modelled: its port reads all ones.

use crate::{all_ones, Platform, PortDevice};

/// Channel 0's data port; channel 2's is 0x42, the control word 0x43.
pub const CHANNEL0: u16 = 0x40;
/// Channel 2's data port.
pub const CHANNEL2: u16 = 0x42;
/// The control-word port.
pub const CONTROL: u16 = 0x43;
/// NMI status and control (port B).
pub const PORT_B: u16 = 0x61;
/// The counters' input clock in Hz.
pub const CLOCK_HZ: u64 = 1_193_182;

/// Port B: channel 2 gate (bit 0), speaker data (bit 1), channel 2 output (bit 5).
const GATE2: u8 = 1 << 0;
const SPEAKER: u8 = 1 << 1;
const OUT2: u8 = 1 << 5;

/// How a channel's 16-bit count is read and written (control word bits 5:4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Access {
    Low,
    High,
    #[default]
    LowThenHigh,
}

/// One counter.
#[derive(Clone, Copy, Debug, Default)]
struct Channel {
    mode: u8,
    access: Access,
    /// The count written (0 means 65536).
    reload: u32,
    /// The low byte of a count being written low-then-high.
    pending_low: Option<u8>,
    /// When counting started, in ns; `None` before a count is written (or while gated off).
    started: Option<u64>,
    /// Counts already done before a gate went low (mode 0 holds its count then).
    held: u64,
    /// A latched count (counter-latch command), read before the live one.
    latched: Option<u16>,
    /// The next read of a low-then-high count returns the high byte.
    read_high: bool,
}

impl Channel {
    /// Input clock ticks counted by `now`.
    fn elapsed(&self, now: u64) -> u64 {
        let running = self.started.map_or(0, |start| {
            let ns = now.saturating_sub(start);
            (u128::from(ns) * u128::from(CLOCK_HZ) / 1_000_000_000) as u64
        });
        self.held + running
    }

    fn reload(&self) -> u64 {
        if self.reload == 0 {
            0x1_0000
        } else {
            u64::from(self.reload)
        }
    }

    /// The counter's value at `now`.
    fn count(&self, now: u64) -> u16 {
        let elapsed = self.elapsed(now);
        let reload = self.reload();
        match self.mode {
            // Mode 0 counts down once and wraps through 0xFFFF on.
            0 => (reload.wrapping_sub(elapsed) & 0xFFFF) as u16,
            // Mode 3 counts down by two, twice per period.
            3 => (reload - (2 * elapsed) % reload) as u16,
            _ => (reload - elapsed % reload) as u16,
        }
    }

    /// The output at `now`.
    fn output(&self, now: u64) -> bool {
        if self.started.is_none() && self.held == 0 {
            // Mode 0's output is low from the control word until the count runs out; the
            // others' is high while idle.
            return self.mode != 0;
        }
        let elapsed = self.elapsed(now);
        let reload = self.reload();
        match self.mode {
            0 => elapsed >= reload,
            3 => elapsed % reload < reload.div_ceil(2),
            // Mode 2: low for one clock at the end of each period.
            _ => elapsed % reload != reload - 1,
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        let value = self.latched.unwrap_or_else(|| self.count(now));
        match self.access {
            Access::Low => {
                self.latched = None;
                value as u8
            }
            Access::High => {
                self.latched = None;
                (value >> 8) as u8
            }
            Access::LowThenHigh => {
                self.read_high = !self.read_high;
                if self.read_high {
                    value as u8
                } else {
                    self.latched = None;
                    (value >> 8) as u8
                }
            }
        }
    }

    /// A byte of a new count; the count takes effect (and counting starts, if `gate`) when
    /// it is complete.
    fn write(&mut self, byte: u8, now: u64, gate: bool) {
        let count = match (self.access, self.pending_low.take()) {
            (Access::Low, _) => u32::from(byte),
            (Access::High, _) => u32::from(byte) << 8,
            (Access::LowThenHigh, None) => {
                self.pending_low = Some(byte);
                return;
            }
            (Access::LowThenHigh, Some(low)) => u32::from(low) | (u32::from(byte) << 8),
        };
        self.reload = count;
        self.held = 0;
        self.started = gate.then_some(now);
    }

    fn set_gate(&mut self, gate: bool, now: u64) {
        match (gate, self.started) {
            (false, Some(_)) => {
                // Mode 0 holds its count while the gate is low; the periodic modes restart
                // on the next rising edge.
                self.held = if self.mode == 0 { self.elapsed(now) } else { 0 };
                self.started = None;
            }
            (true, None) if self.reload != 0 || self.mode != 0 || self.held != 0 => {
                self.started = Some(now);
            }
            _ => {}
        }
    }
}

/// The PIT and port 0x61.
#[derive(Clone, Debug, Default)]
pub struct Pit {
    channels: [Channel; 3],
    port_b: u8,
}

impl Pit {
    /// Channel 0's period in nanoseconds when it runs periodically (modes 2 and 3), else
    /// `None`: the caller raises IRQ 0 at that rate.
    pub fn channel0_period_ns(&self) -> Option<u64> {
        let channel = &self.channels[0];
        (channel.started.is_some() && matches!(channel.mode, 2 | 3))
            .then(|| channel.reload() * 1_000_000_000 / CLOCK_HZ)
    }

    fn control(&mut self, value: u8, now: u64) {
        let select = usize::from(value >> 6);
        if select == 3 {
            // Read-back command: latch the counts of the channels named in bits 3:1.
            if value & (1 << 5) == 0 {
                for (index, channel) in self.channels.iter_mut().enumerate() {
                    if value & (2 << index) != 0 && channel.latched.is_none() {
                        channel.latched = Some(channel.count(now));
                    }
                }
            }
            return;
        }
        let channel = &mut self.channels[select];
        let access = match (value >> 4) & 3 {
            0 => {
                if channel.latched.is_none() {
                    channel.latched = Some(channel.count(now));
                    channel.read_high = false;
                }
                return;
            }
            1 => Access::Low,
            2 => Access::High,
            _ => Access::LowThenHigh,
        };
        // Modes 6 and 7 are modes 2 and 3.
        let mode = match (value >> 1) & 7 {
            mode @ 6..=7 => mode - 4,
            mode => mode,
        };
        *channel = Channel {
            mode,
            access,
            ..Channel::default()
        };
    }
}

impl PortDevice for Pit {
    fn name(&self) -> &'static str {
        "8254 PIT"
    }

    fn read(&mut self, port: u16, size: u8, platform: &mut dyn Platform) -> u32 {
        let now = platform.now_ns();
        match (port, size) {
            (CHANNEL0 | CHANNEL2, 1) => u32::from(self.channels[usize::from(port - CHANNEL0)].read(now)),
            (PORT_B, 1) => {
                let out2 = if self.channels[2].output(now) { OUT2 } else { 0 };
                u32::from((self.port_b & (GATE2 | SPEAKER)) | out2)
            }
            _ => all_ones(size),
        }
    }

    fn write(&mut self, port: u16, size: u8, value: u32, platform: &mut dyn Platform) {
        if size != 1 {
            return;
        }
        let now = platform.now_ns();
        let byte = value as u8;
        match port {
            CHANNEL0 => self.channels[0].write(byte, now, true),
            CHANNEL2 => {
                let gate = self.port_b & GATE2 != 0;
                self.channels[2].write(byte, now, gate);
            }
            CONTROL => self.control(byte, now),
            PORT_B => {
                self.port_b = byte & (GATE2 | SPEAKER);
                self.channels[2].set_gate(byte & GATE2 != 0, now);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPlatform;

    const MS: u64 = 1_000_000;

    fn out(pit: &mut Pit, p: &mut TestPlatform, port: u16, value: u8) {
        pit.write(port, 1, u32::from(value), p);
    }

    fn inb(pit: &mut Pit, p: &mut TestPlatform, port: u16) -> u8 {
        pit.read(port, 1, p) as u8
    }

    /// Linux's `pit_calibrate_tsc`: gate channel 2 on, speaker off, mode 0 with a count of
    /// 50 ms (59659), then poll port 0x61 until OUT2 rises.
    #[test]
    fn channel_2_in_mode_0_raises_out2_after_its_count() {
        let (mut pit, mut p) = (Pit::default(), TestPlatform::default());
        out(&mut pit, &mut p, PORT_B, 0x01);
        out(&mut pit, &mut p, CONTROL, 0xB0);
        out(&mut pit, &mut p, CHANNEL2, (59659 & 0xFF) as u8);
        out(&mut pit, &mut p, CHANNEL2, (59659 >> 8) as u8);
        assert_eq!(inb(&mut pit, &mut p, PORT_B) & OUT2, 0);
        p.now = 49 * MS;
        assert_eq!(inb(&mut pit, &mut p, PORT_B) & OUT2, 0);
        p.now = 51 * MS;
        assert_eq!(inb(&mut pit, &mut p, PORT_B) & OUT2, OUT2);
        assert_eq!(inb(&mut pit, &mut p, PORT_B) & GATE2, GATE2);
    }

    /// Linux's `quick_pit_calibrate`: mode 0 from 0xFFFF, reading the count's bytes without
    /// latching; the high byte falls by one every 256 clocks (214.5 µs).
    #[test]
    fn an_unlatched_count_falls_at_the_input_clock() {
        let (mut pit, mut p) = (Pit::default(), TestPlatform::default());
        out(&mut pit, &mut p, PORT_B, 0x01);
        out(&mut pit, &mut p, CONTROL, 0xB0);
        out(&mut pit, &mut p, CHANNEL2, 0xFF);
        out(&mut pit, &mut p, CHANNEL2, 0xFF);
        p.now = 10 * MS;
        let low = inb(&mut pit, &mut p, CHANNEL2);
        let high = inb(&mut pit, &mut p, CHANNEL2);
        let count = u16::from(low) | (u16::from(high) << 8);
        // 10 ms = 11931 clocks.
        assert_eq!(count, 0xFFFF - 11931);
    }

    #[test]
    fn a_latched_count_holds_until_both_bytes_are_read() {
        let (mut pit, mut p) = (Pit::default(), TestPlatform::default());
        out(&mut pit, &mut p, CONTROL, 0x34);
        out(&mut pit, &mut p, CHANNEL0, 0x00);
        out(&mut pit, &mut p, CHANNEL0, 0x10);
        p.now = MS;
        out(&mut pit, &mut p, CONTROL, 0x00);
        p.now = 2 * MS;
        let low = inb(&mut pit, &mut p, CHANNEL0);
        let high = inb(&mut pit, &mut p, CHANNEL0);
        assert_eq!(u16::from(low) | (u16::from(high) << 8), 0x1000 - 1193);
        let live =
            u16::from(inb(&mut pit, &mut p, CHANNEL0)) | (u16::from(inb(&mut pit, &mut p, CHANNEL0)) << 8);
        assert_eq!(live, 0x1000 - 2386);
    }

    #[test]
    fn channel_0_as_a_rate_generator_reports_its_period() {
        let (mut pit, mut p) = (Pit::default(), TestPlatform::default());
        assert_eq!(pit.channel0_period_ns(), None);
        // 1193 clocks: Linux's HZ=1000 latch.
        out(&mut pit, &mut p, CONTROL, 0x34);
        out(&mut pit, &mut p, CHANNEL0, (1193 & 0xFF) as u8);
        out(&mut pit, &mut p, CHANNEL0, (1193 >> 8) as u8);
        assert_eq!(pit.channel0_period_ns(), Some(999_847));
        p.now = 1_500_000;
        // Past one period the count restarts from the reload value.
        let low = inb(&mut pit, &mut p, CHANNEL0);
        let high = inb(&mut pit, &mut p, CHANNEL0);
        assert_eq!(u16::from(low) | (u16::from(high) << 8), 1193 - (1789 - 1193));
    }

    #[test]
    fn a_gated_off_channel_2_holds_its_count_in_mode_0() {
        let (mut pit, mut p) = (Pit::default(), TestPlatform::default());
        out(&mut pit, &mut p, CONTROL, 0x90);
        out(&mut pit, &mut p, CHANNEL2, 0xFF);
        p.now = 10 * MS;
        assert_eq!(
            inb(&mut pit, &mut p, CHANNEL2),
            0xFF,
            "the gate is low: no counting"
        );
        out(&mut pit, &mut p, PORT_B, 0x01);
        p.now = 10 * MS + 100_000;
        assert_eq!(inb(&mut pit, &mut p, CHANNEL2), 0xFF - 119);
        out(&mut pit, &mut p, PORT_B, 0x00);
        p.now = 50 * MS;
        assert_eq!(inb(&mut pit, &mut p, CHANNEL2), 0xFF - 119);
        assert_eq!(pit.read(0x41, 1, &mut p), 0xFF, "channel 1 is not modelled");
    }
}
