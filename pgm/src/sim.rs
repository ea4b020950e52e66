//! A simulated host for tests and benchmarks: host-physical memory as a sparse map of frames,
//! and a frame allocator that can be told to fail.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;

use crate::addr::{HostPhysAddr, PAGE_SIZE};
use crate::frames::{BitmapFrameAllocator, HostFrameAllocator, HostMemory};

/// Host-physical memory that exists only where it was written; unwritten bytes read as zero.
#[derive(Default)]
pub struct SimMemory {
    frames: BTreeMap<u64, Box<[u8; PAGE_SIZE as usize]>>,
}

impl HostMemory for SimMemory {
    fn read(&self, addr: HostPhysAddr, buf: &mut [u8]) {
        let offset = addr.page_offset() as usize;
        match self.frames.get(&addr.page_number()) {
            Some(frame) => buf.copy_from_slice(&frame[offset..offset + buf.len()]),
            None => buf.fill(0),
        }
    }

    fn write(&mut self, addr: HostPhysAddr, data: &[u8]) {
        let offset = addr.page_offset() as usize;
        let frame = self
            .frames
            .entry(addr.page_number())
            .or_insert_with(|| Box::new([0; PAGE_SIZE as usize]));
        frame[offset..offset + data.len()].copy_from_slice(data);
    }
}

/// A bitmap allocator over simulated RAM, with failure injection: after `fail_after`
/// further allocations, every allocation fails.
pub struct SimFrames {
    /// The allocator doing the real work; its counters are the test's ground truth.
    pub inner: BitmapFrameAllocator,
    /// Allocations still allowed before injected failure (`None`: no injection).
    pub fail_after: Option<u64>,
}

impl SimFrames {
    /// `frames` free frames starting at host-physical 1 MiB.
    pub fn new(frames: u64) -> SimFrames {
        let start = HostPhysAddr::new_truncate(0x10_0000);
        let end = HostPhysAddr::new_truncate(0x10_0000 + frames * PAGE_SIZE);
        SimFrames {
            inner: BitmapFrameAllocator::new([(start, end)]),
            fail_after: None,
        }
    }
}

impl SimFrames {
    /// Counts one allocation against the injected limit; false when it must fail.
    fn permit(&mut self) -> bool {
        match self.fail_after.as_mut() {
            Some(0) => false,
            Some(left) => {
                *left -= 1;
                true
            }
            None => true,
        }
    }
}

impl HostFrameAllocator for SimFrames {
    fn allocate_frame(&mut self) -> Option<HostPhysAddr> {
        if !self.permit() {
            return None;
        }
        self.inner.allocate()
    }

    fn free_frame(&mut self, frame: HostPhysAddr) {
        self.inner
            .free(frame)
            .expect("the manager frees only frames it holds");
    }

    fn allocate_large(&mut self) -> Option<HostPhysAddr> {
        if !self.permit() {
            return None;
        }
        self.inner.allocate_large()
    }
}
