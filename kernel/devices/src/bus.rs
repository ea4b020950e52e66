//! The port-I/O bus: devices claim port ranges, and every IN or OUT the guest makes goes to the
//! device whose range holds the port. Unclaimed ports behave as on a PC, reading all ones and
//! dropping writes, and are counted per port so that a stop diagnostic or the VM's statistics
//! can name what a guest looked for.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::any::Any;
use core::fmt;

use crate::{all_ones, Platform};

/// A device on the port bus. Accesses come with the absolute port (a device may claim several
/// ranges) and a size of 1, 2 or 4 bytes; the device answers every port of its ranges, with
/// all ones for what it does not model. A device is `Clone` (see [`CloneDevice`]): its state
/// is what a snapshot of the bus copies.
pub trait PortDevice: Send + Any + CloneDevice {
    /// The device's name, for diagnostics.
    fn name(&self) -> &'static str;
    /// An IN of `size` bytes from `port`.
    fn read(&mut self, port: u16, size: u8, platform: &mut dyn Platform) -> u32;
    /// An OUT of `size` bytes of `value` to `port`.
    fn write(&mut self, port: u16, size: u8, value: u32, platform: &mut dyn Platform);
}

/// A copy of a device as it is now, for [`PortBus`]'s `Clone` (a VM's snapshot). Every
/// `Clone` device has it.
pub trait CloneDevice {
    /// The copy.
    fn clone_device(&self) -> Box<dyn PortDevice>;
}

impl<T: PortDevice + Clone> CloneDevice for T {
    fn clone_device(&self) -> Box<dyn PortDevice> {
        Box::new(self.clone())
    }
}

/// Why a device could not be added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or runs past port 0xFFFF.
    BadRange {
        /// The first port asked for.
        first: u16,
        /// The number of ports asked for.
        count: u32,
    },
    /// A port of the range is claimed already.
    Overlap {
        /// The first port both ranges hold.
        port: u16,
        /// The device that holds it.
        holder: &'static str,
    },
    /// There is no device with that index.
    NoDevice(usize),
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusError::BadRange { first, count } => {
                write!(f, "ports {first:#x}+{count} are not a range of 1 to 65536 ports")
            }
            BusError::Overlap { port, holder } => write!(f, "port {port:#x} belongs to {holder} already"),
            BusError::NoDevice(index) => write!(f, "no device {index} on the bus"),
        }
    }
}

impl core::error::Error for BusError {}

/// The index of a device on its bus (to give it another range).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceIndex(usize);

/// The port bus of one VM.
#[derive(Default)]
pub struct PortBus {
    /// Claimed ranges as (first port, last port, device), sorted by first port, disjoint.
    ranges: Vec<(u16, u16, usize)>,
    devices: Vec<Box<dyn PortDevice>>,
    /// Accesses to unclaimed ports, per port.
    unclaimed: BTreeMap<u16, u64>,
}

impl Clone for PortBus {
    /// A bus with the same ranges and a copy of each device in its present state (a VM's
    /// snapshot: the copy answers as the original would from here on).
    fn clone(&self) -> PortBus {
        PortBus {
            ranges: self.ranges.clone(),
            devices: self.devices.iter().map(|device| device.clone_device()).collect(),
            unclaimed: self.unclaimed.clone(),
        }
    }
}

impl fmt::Debug for PortBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for &(first, last, device) in &self.ranges {
            list.entry(&format_args!(
                "{first:#x}-{last:#x}: {}",
                self.devices[device].name()
            ));
        }
        list.finish()
    }
}

impl PortBus {
    /// An empty bus.
    pub fn new() -> PortBus {
        PortBus::default()
    }

    /// Puts `device` on the bus at the `count` ports from `first`. On error the bus is
    /// unchanged and the device is dropped.
    pub fn add(
        &mut self,
        first: u16,
        count: u32,
        device: Box<dyn PortDevice>,
    ) -> Result<DeviceIndex, BusError> {
        let last = self.check_range(first, count)?;
        let index = self.devices.len();
        self.devices.push(device);
        self.insert_range(first, last, index);
        Ok(DeviceIndex(index))
    }

    /// Gives the device at `index` the `count` ports from `first` as well.
    pub fn add_range(&mut self, index: DeviceIndex, first: u16, count: u32) -> Result<(), BusError> {
        if index.0 >= self.devices.len() {
            return Err(BusError::NoDevice(index.0));
        }
        let last = self.check_range(first, count)?;
        self.insert_range(first, last, index.0);
        Ok(())
    }

    /// The last port of the range, if it is one and free.
    fn check_range(&self, first: u16, count: u32) -> Result<u16, BusError> {
        let end = u32::from(first) + count;
        if count == 0 || end > 0x1_0000 {
            return Err(BusError::BadRange { first, count });
        }
        let last = (end - 1) as u16;
        if let Some(&(start, _, device)) = self
            .ranges
            .iter()
            .find(|&&(start, held_last, _)| start <= last && first <= held_last)
        {
            return Err(BusError::Overlap {
                port: first.max(start),
                holder: self.devices[device].name(),
            });
        }
        Ok(last)
    }

    fn insert_range(&mut self, first: u16, last: u16, device: usize) {
        let at = self.ranges.partition_point(|&(start, _, _)| start < first);
        self.ranges.insert(at, (first, last, device));
    }

    /// The device holding `port`.
    fn holder(&self, port: u16) -> Option<usize> {
        let at = self.ranges.partition_point(|&(start, _, _)| start <= port);
        let &(_, last, device) = self.ranges.get(at.checked_sub(1)?)?;
        (port <= last).then_some(device)
    }

    /// The device at `index`, if it is a `T` (for the caller's own work with it: raising an
    /// interrupt, reading a timer).
    pub fn device_mut<T: PortDevice>(&mut self, index: DeviceIndex) -> Option<&mut T> {
        let device: &mut dyn Any = self.devices.get_mut(index.0)?.as_mut();
        device.downcast_mut()
    }

    /// The name of the device holding `port`.
    pub fn device_at(&self, port: u16) -> Option<&'static str> {
        self.holder(port).map(|device| self.devices[device].name())
    }

    /// An IN of `size` bytes (1, 2 or 4; anything else reads all ones) from `port`.
    pub fn read(&mut self, port: u16, size: u8, platform: &mut dyn Platform) -> u32 {
        match self.holder(port) {
            Some(device) if matches!(size, 1 | 2 | 4) => {
                self.devices[device].read(port, size, platform) & all_ones(size)
            }
            _ => {
                self.count_unclaimed(port);
                all_ones(size)
            }
        }
    }

    /// An OUT of `size` bytes (1, 2 or 4; anything else is dropped) of `value` to `port`.
    pub fn write(&mut self, port: u16, size: u8, value: u32, platform: &mut dyn Platform) {
        match self.holder(port) {
            Some(device) if matches!(size, 1 | 2 | 4) => {
                self.devices[device].write(port, size, value & all_ones(size), platform)
            }
            _ => self.count_unclaimed(port),
        }
    }

    fn count_unclaimed(&mut self, port: u16) {
        *self.unclaimed.entry(port).or_default() += 1;
    }

    /// Accesses to unclaimed ports so far, as (port, count), by port.
    pub fn unclaimed(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.unclaimed.iter().map(|(&port, &count)| (port, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPlatform;

    /// Remembers the last write and answers reads with the port number.
    #[derive(Clone)]
    struct Echo(&'static str, Option<(u16, u8, u32)>);

    impl PortDevice for Echo {
        fn name(&self) -> &'static str {
            self.0
        }
        fn read(&mut self, port: u16, _: u8, _: &mut dyn Platform) -> u32 {
            u32::from(port)
        }
        fn write(&mut self, port: u16, size: u8, value: u32, _: &mut dyn Platform) {
            self.1 = Some((port, size, value));
        }
    }

    #[test]
    fn accesses_go_to_the_device_whose_range_holds_the_port() {
        let mut bus = PortBus::new();
        let mut platform = TestPlatform::default();
        bus.add(0x40, 4, Box::new(Echo("pit", None))).unwrap();
        let pic = bus.add(0x20, 2, Box::new(Echo("pic", None))).unwrap();
        bus.add_range(pic, 0xA0, 2).unwrap();
        assert_eq!(bus.read(0x43, 1, &mut platform), 0x43);
        assert_eq!(bus.read(0xA1, 2, &mut platform), 0xA1);
        assert_eq!(bus.device_at(0xA0), Some("pic"));
        assert_eq!(bus.device_at(0x22), None);
        assert_eq!(bus.unclaimed().count(), 0);
        assert!(bus.device_mut::<Echo>(pic).is_some());
        assert!(
            bus.device_mut::<crate::port92::Port92>(pic).is_none(),
            "not a Port92"
        );
        assert!(bus.device_mut::<Echo>(DeviceIndex(9)).is_none());
    }

    #[test]
    fn an_unclaimed_port_reads_all_ones_drops_writes_and_is_counted() {
        let mut bus = PortBus::new();
        let mut platform = TestPlatform::default();
        bus.add(0x80, 1, Box::new(Echo("post", None))).unwrap();
        assert_eq!(bus.read(0x81, 1, &mut platform), 0xFF);
        assert_eq!(bus.read(0x81, 2, &mut platform), 0xFFFF);
        assert_eq!(bus.read(0x7F, 4, &mut platform), 0xFFFF_FFFF);
        bus.write(0x81, 1, 0, &mut platform);
        assert_eq!(bus.unclaimed().collect::<Vec<_>>(), [(0x7F, 1), (0x81, 3)]);
    }

    #[test]
    fn a_bad_size_is_treated_as_unclaimed_and_values_are_cut_to_the_size() {
        let mut bus = PortBus::new();
        let mut platform = TestPlatform::default();
        bus.add(0x10, 1, Box::new(Echo("dev", None))).unwrap();
        assert_eq!(bus.read(0x10, 3, &mut platform), 0xFFFF_FFFF);
        bus.write(0x10, 1, 0x1234, &mut platform);
        assert_eq!(bus.unclaimed().collect::<Vec<_>>(), [(0x10, 1)]);
    }

    #[test]
    fn overlapping_or_empty_ranges_are_refused_and_leave_the_bus_unchanged() {
        let mut bus = PortBus::new();
        bus.add(0x3F8, 8, Box::new(Echo("uart", None))).unwrap();
        assert_eq!(
            bus.add(0x3F0, 9, Box::new(Echo("fdc", None))).unwrap_err(),
            BusError::Overlap {
                port: 0x3F8,
                holder: "uart"
            }
        );
        assert!(matches!(
            bus.add(0xFFFF, 2, Box::new(Echo("x", None))),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.add(0x10, 0, Box::new(Echo("x", None))),
            Err(BusError::BadRange { .. })
        ));
        assert_eq!(bus.add_range(DeviceIndex(7), 0, 1), Err(BusError::NoDevice(7)));
        assert_eq!(bus.device_at(0x3F0), None);
        bus.add(0xFFFF, 1, Box::new(Echo("last", None))).unwrap();
        assert_eq!(bus.device_at(0xFFFF), Some("last"));
    }
}
