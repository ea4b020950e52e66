//! System Control Port A (port 0x92, the "fast A20" port of PS/2 and later PCs): bit 1 is the
//! A20 gate, bit 0 a fast reset (writing 1 resets the CPU). The gate itself is the memory
//! manager's (pgm's A20 state), reached through the [`Platform`].

use crate::{all_ones, Platform, PortDevice, StopRequest};

/// The port.
pub const PORT: u16 = 0x92;
/// Bit 1: the A20 gate is open.
pub const A20_GATE: u32 = 1 << 1;
/// Bit 0: fast reset.
pub const FAST_RESET: u32 = 1 << 0;

/// System Control Port A.
#[derive(Clone, Debug, Default)]
pub struct Port92;

impl PortDevice for Port92 {
    fn name(&self) -> &'static str {
        "system control port A"
    }

    /// Bit 1 reads the gate; bit 0 reads 0 (a reset is never pending when the guest runs).
    fn read(&mut self, port: u16, size: u8, platform: &mut dyn Platform) -> u32 {
        if port != PORT || size != 1 {
            return all_ones(size);
        }
        if platform.a20() {
            A20_GATE
        } else {
            0
        }
    }

    /// Opens or closes the gate as bit 1 says; bit 0 asks for a reset.
    fn write(&mut self, port: u16, size: u8, value: u32, platform: &mut dyn Platform) {
        if port != PORT || size != 1 {
            return;
        }
        if value & FAST_RESET != 0 {
            platform.stop(StopRequest::Reset);
            return;
        }
        let open = value & A20_GATE != 0;
        if open != platform.a20() {
            platform.set_a20(open);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPlatform;

    #[test]
    fn bit_1_opens_and_closes_the_gate_and_reads_it_back() {
        let mut port = Port92;
        let mut platform = TestPlatform {
            a20: true,
            ..TestPlatform::default()
        };
        assert_eq!(port.read(PORT, 1, &mut platform), A20_GATE);
        port.write(PORT, 1, 0, &mut platform);
        assert!(!platform.a20);
        assert_eq!(port.read(PORT, 1, &mut platform), 0);
        port.write(PORT, 1, A20_GATE, &mut platform);
        assert!(platform.a20);
        assert!(platform.stops.is_empty());
    }

    #[test]
    fn bit_0_asks_for_a_reset_and_leaves_the_gate() {
        let mut platform = TestPlatform::default();
        Port92.write(PORT, 1, FAST_RESET | A20_GATE, &mut platform);
        assert_eq!(platform.stops, [StopRequest::Reset]);
        assert!(!platform.a20);
    }

    #[test]
    fn wider_accesses_are_not_the_port() {
        let mut platform = TestPlatform::default();
        Port92.write(PORT, 2, A20_GATE, &mut platform);
        assert!(!platform.a20);
        assert_eq!(Port92.read(PORT, 2, &mut platform), 0xFFFF);
    }
}
