//! A [`Platform`] for the device tests: a settable clock, an A20 flag, the console bytes and
//! the stop requests, all in plain fields.

use alloc::vec::Vec;

use crate::{Platform, StopRequest};

/// A platform whose state tests read and set directly.
#[derive(Debug, Default)]
pub struct TestPlatform {
    /// The clock, in nanoseconds.
    pub now: u64,
    /// The A20 gate.
    pub a20: bool,
    /// Every console byte, in order.
    pub console: Vec<u8>,
    /// Every stop request, in order.
    pub stops: Vec<StopRequest>,
    /// The wall clock, in seconds since 1970.
    pub wall_clock: u64,
    /// Every page evicted, in order.
    pub evicted: Vec<u64>,
    /// Every interrupt line change, in order.
    pub irqs: Vec<(u8, bool)>,
}

impl Platform for TestPlatform {
    fn now_ns(&self) -> u64 {
        self.now
    }
    fn a20(&self) -> bool {
        self.a20
    }
    fn set_a20(&mut self, open: bool) {
        self.a20 = open;
    }
    fn console(&mut self, byte: u8) {
        self.console.push(byte);
    }
    fn stop(&mut self, why: StopRequest) {
        self.stops.push(why);
    }
    fn wall_clock(&self) -> u64 {
        self.wall_clock
    }
    fn evict_page(&mut self, gpa: u64) {
        self.evicted.push(gpa);
    }
    fn set_irq(&mut self, line: u8, level: bool) {
        self.irqs.push((line, level));
    }
}
