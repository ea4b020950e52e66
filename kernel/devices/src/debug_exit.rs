//! The test exit (QEMU's `isa-debug-exit`, at port 0xF4 as kvm-unit-tests expects): a write
//! stops the VM with the value written as its exit code. QEMU's process status is then
//! `(code << 1) | 1`, which is what test runners decode.

use crate::{all_ones, Platform, PortDevice, StopRequest};

/// The port kvm-unit-tests writes its exit code to.
pub const PORT: u16 = 0xF4;

/// The test-exit device.
#[derive(Clone, Debug, Default)]
pub struct DebugExit;

impl DebugExit {
    /// The status QEMU's process exits with after the guest wrote `code`.
    pub fn qemu_status(code: u32) -> u32 {
        (code << 1) | 1
    }
}

impl PortDevice for DebugExit {
    fn name(&self) -> &'static str {
        "isa-debug-exit"
    }

    fn read(&mut self, _: u16, size: u8, _: &mut dyn Platform) -> u32 {
        all_ones(size)
    }

    /// Any size writes the code (QEMU's device takes 1, 2 and 4 bytes).
    fn write(&mut self, _: u16, _: u8, value: u32, platform: &mut dyn Platform) {
        platform.stop(StopRequest::TestExit(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPlatform;

    #[test]
    fn a_write_stops_the_vm_with_the_code() {
        let mut platform = TestPlatform::default();
        DebugExit.write(PORT, 4, 0, &mut platform);
        DebugExit.write(PORT, 1, 0x7F, &mut platform);
        assert_eq!(
            platform.stops,
            [StopRequest::TestExit(0), StopRequest::TestExit(0x7F)]
        );
        assert_eq!(DebugExit::qemu_status(0), 1);
        assert_eq!(DebugExit::qemu_status(1), 3);
    }
}
