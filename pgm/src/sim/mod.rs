//! A simulated host for tests and benchmarks: host-physical memory as a sparse map of frames,
//! and a frame allocator that can be told to fail; and [`script`], the whole API driven from
//! bytes with the EPT auditor as the oracle.

pub mod script;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::addr::{HostPhysAddr, PAGE_SIZE};
use crate::frames::{BitmapFrameAllocator, HostFrameAllocator, HostMemory};
use crate::manager::{AuditReport, Pgm};

pub use script::SimPgm;

/// Host-physical memory that exists only where it was written; unwritten bytes read as zero.
/// Frames below [`DENSE_PAGES`] (where [`SimFrames`] hands frames out) are found by index, so
/// that walking tables costs what it does on a direct-mapped host; the rest in a sparse map.
#[derive(Default)]
pub struct SimMemory {
    dense: Vec<Option<Box<Frame>>>,
    sparse: BTreeMap<u64, Box<Frame>>,
}

type Frame = [u8; PAGE_SIZE as usize];

/// Page numbers below this (256 MiB) are held by index.
pub const DENSE_PAGES: u64 = 1 << 16;

impl SimMemory {
    fn frame(&self, page: u64) -> Option<&Frame> {
        if page < DENSE_PAGES {
            self.dense.get(page as usize)?.as_deref()
        } else {
            self.sparse.get(&page).map(|frame| &**frame)
        }
    }

    fn frame_mut(&mut self, page: u64) -> &mut Frame {
        let new_frame = || Box::new([0; PAGE_SIZE as usize]);
        if page < DENSE_PAGES {
            let index = page as usize;
            if self.dense.len() <= index {
                self.dense.resize_with(index + 1, || None);
            }
            self.dense[index].get_or_insert_with(new_frame)
        } else {
            self.sparse.entry(page).or_insert_with(new_frame)
        }
    }
}

// SAFETY: simulated memory is a map of heap buffers: every address is backed (unwritten
// frames read as zeros) and a write changes only the bytes addressed.
#[allow(unsafe_code)]
unsafe impl HostMemory for SimMemory {
    fn read(&self, addr: HostPhysAddr, buf: &mut [u8]) {
        let offset = addr.page_offset() as usize;
        match self.frame(addr.page_number()) {
            Some(frame) => buf.copy_from_slice(&frame[offset..offset + buf.len()]),
            None => buf.fill(0),
        }
    }

    fn write(&mut self, addr: HostPhysAddr, data: &[u8]) {
        let offset = addr.page_offset() as usize;
        self.frame_mut(addr.page_number())[offset..offset + data.len()].copy_from_slice(data);
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

// SAFETY: frames come from the inner bitmap allocator (see its impl) over simulated memory,
// which backs every address.
#[allow(unsafe_code)]
unsafe impl HostFrameAllocator for SimFrames {
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

impl Pgm<SimFrames, SimMemory> {
    /// Gives every frame back, as dropping the manager does, and returns the simulated
    /// allocator, for a test to check that nothing leaked.
    pub fn terminate(mut self) -> SimFrames {
        self.release_all();
        core::mem::replace(self.frames_mut(), SimFrames::new(0))
    }

    /// [`Pgm::audit`] against the simulated host: a frame is the host's to lend when its bitmap
    /// has it out.
    pub fn audit_simulated(&self) -> AuditReport {
        self.audit(|frame| self.frames().inner.is_allocated(frame))
    }
}
