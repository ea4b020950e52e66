//! A simulated host for tests and benchmarks: host-physical memory as a sparse map of frames,
//! and a frame allocator that can be told to fail; and [`script`], the whole API driven from
//! bytes with the EPT auditor as the oracle.

pub mod script;

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{HostPhysAddr, PAGE_SIZE};
use crate::frames::{BitmapFrameAllocator, HostFrameAllocator, HostMemory};
use crate::manager::{AuditReport, Pgm};

pub use script::{SimFormat, SimPgm};

/// Host-physical memory that exists only where it was written; unwritten bytes read as zero.
/// Frames below [`DENSE_PAGES`] (where [`SimFrames`] hands frames out) are found by index, so
/// that walking tables costs what it does on a direct-mapped host; the rest in a sparse map.
/// Frames are atomic words, as the machine's memory is: the lock-free fault path reads and
/// compare-exchanges EPT entries through `&self` while other threads do the same.
#[derive(Default)]
pub struct SimMemory {
    dense: Vec<Option<Box<Frame>>>,
    sparse: BTreeMap<u64, Box<Frame>>,
}

type Frame = [AtomicU64; WORDS];

/// Shows how many frames were touched, not their contents.
impl core::fmt::Debug for SimMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let dense = self.dense.iter().filter(|frame| frame.is_some()).count();
        f.debug_struct("SimMemory")
            .field("frames", &(dense + self.sparse.len()))
            .finish()
    }
}

const WORDS: usize = PAGE_SIZE as usize / 8;

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
        let new_frame = || Box::new([const { AtomicU64::new(0) }; WORDS]);
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
        let Some(frame) = self.frame(addr.page_number()) else {
            buf.fill(0);
            return;
        };
        let offset = addr.page_offset() as usize;
        if offset.is_multiple_of(8) && buf.len().is_multiple_of(8) {
            // Whole words (tables, page copies): the common case, kept fast for the tests.
            for (chunk, word) in buf.as_chunks_mut::<8>().0.iter_mut().zip(&frame[offset / 8..]) {
                *chunk = word.load(Ordering::Relaxed).to_le_bytes();
            }
            return;
        }
        for_each_word(offset, buf.len(), |word, bytes, at| {
            let value = frame[word].load(Ordering::Relaxed).to_le_bytes();
            buf[at..at + bytes.len()].copy_from_slice(&value[bytes]);
        });
    }

    fn write(&mut self, addr: HostPhysAddr, data: &[u8]) {
        let frame = self.frame_mut(addr.page_number());
        let offset = addr.page_offset() as usize;
        if offset.is_multiple_of(8) && data.len().is_multiple_of(8) {
            for (chunk, word) in data.as_chunks::<8>().0.iter().zip(&mut frame[offset / 8..]) {
                *word.get_mut() = u64::from_le_bytes(*chunk);
            }
            return;
        }
        for_each_word(offset, data.len(), |word, bytes, at| {
            let word = frame[word].get_mut();
            let mut value = word.to_le_bytes();
            value[bytes.clone()].copy_from_slice(&data[at..at + bytes.len()]);
            *word = u64::from_le_bytes(value);
        });
    }

    fn zero_frame(&mut self, frame: HostPhysAddr) {
        for word in self.frame_mut(frame.page_number()) {
            *word.get_mut() = 0;
        }
    }

    fn read_u64(&self, addr: HostPhysAddr) -> u64 {
        self.frame(addr.page_number()).map_or(0, |frame| {
            frame[addr.page_offset() as usize / 8].load(Ordering::SeqCst)
        })
    }

    fn compare_exchange_u64(&self, addr: HostPhysAddr, current: u64, new: u64) -> Result<(), u64> {
        // Entries are compare-exchanged only in tables, which were zeroed (so exist) first.
        let frame = self
            .frame(addr.page_number())
            .expect("simulated tables are written before their entries are exchanged");
        frame[addr.page_offset() as usize / 8]
            .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| ())
    }
}

/// Splits the `len` bytes at `offset` of a frame by 8-byte word: calls `visit(word, bytes,
/// at)` with the word's index, the byte range within the word and where those bytes start in
/// the caller's buffer.
fn for_each_word(offset: usize, len: usize, mut visit: impl FnMut(usize, core::ops::Range<usize>, usize)) {
    let mut at = 0;
    while at < len {
        let byte = offset + at;
        let within = byte % 8;
        let bytes = within..(within + len - at).min(8);
        let taken = bytes.len();
        visit(byte / 8, bytes, at);
        at += taken;
    }
}

/// Host-physical memory as one flat array of words from [`FLAT_BASE`] up, as the kernel's
/// direct map is: an access is an index, with no search and no indirection. For benchmarks
/// (the sparse [`SimMemory`] tolerates any address; this backs only what it was made for, and
/// reads outside it as zeros). Pair it with [`SimFrames::new`] over the same number of frames.
pub struct FlatMemory {
    words: Vec<AtomicU64>,
}

/// Shows its size, not its contents.
impl core::fmt::Debug for FlatMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FlatMemory")
            .field("frames", &(self.words.len() / WORDS))
            .finish()
    }
}

/// Where [`FlatMemory`] and [`SimFrames`] start: host-physical 1 MiB.
pub const FLAT_BASE: u64 = 0x10_0000;

impl FlatMemory {
    /// `frames` frames of zeroed memory from [`FLAT_BASE`].
    pub fn new(frames: u64) -> FlatMemory {
        let words = frames as usize * WORDS;
        FlatMemory {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The index of the word at `addr`, if the memory holds it.
    #[inline]
    fn index(&self, addr: HostPhysAddr) -> Option<usize> {
        let index = (addr.as_u64().checked_sub(FLAT_BASE)? / 8) as usize;
        (index < self.words.len()).then_some(index)
    }

    /// The words of `len` bytes at `addr` (8-byte aligned and sized); panics outside the memory,
    /// which only a broken benchmark reaches.
    fn span_mut(&mut self, addr: HostPhysAddr, len: usize) -> &mut [AtomicU64] {
        let first = self
            .index(addr)
            .expect("flat memory holds the frames it was made for");
        &mut self.words[first..first + len / 8]
    }
}

// SAFETY: flat memory is one heap array: every address a frame allocator over the same range
// hands out is backed, and a write changes only the words addressed.
#[allow(unsafe_code)]
unsafe impl HostMemory for FlatMemory {
    fn read(&self, addr: HostPhysAddr, buf: &mut [u8]) {
        for (at, byte) in buf.iter_mut().enumerate() {
            let addr = HostPhysAddr::new_truncate(addr.as_u64() + at as u64);
            let word = self
                .index(addr)
                .map_or(0, |index| self.words[index].load(Ordering::Relaxed));
            *byte = word.to_le_bytes()[addr.as_u64() as usize % 8];
        }
    }

    fn write(&mut self, addr: HostPhysAddr, data: &[u8]) {
        for (at, &byte) in data.iter().enumerate() {
            let addr = HostPhysAddr::new_truncate(addr.as_u64() + at as u64);
            let word = self.span_mut(HostPhysAddr::new_truncate(addr.as_u64() & !7), 8)[0].get_mut();
            let mut bytes = word.to_le_bytes();
            bytes[addr.as_u64() as usize % 8] = byte;
            *word = u64::from_le_bytes(bytes);
        }
    }

    #[inline]
    fn read_u64(&self, addr: HostPhysAddr) -> u64 {
        self.index(addr)
            .map_or(0, |index| self.words[index].load(Ordering::Relaxed))
    }

    #[inline]
    fn write_u64(&mut self, addr: HostPhysAddr, value: u64) {
        *self.span_mut(addr, 8)[0].get_mut() = value;
    }

    fn compare_exchange_u64(&self, addr: HostPhysAddr, current: u64, new: u64) -> Result<(), u64> {
        let index = self.index(addr).expect("flat memory holds the tables");
        self.words[index]
            .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| ())
    }

    fn zero_frame(&mut self, frame: HostPhysAddr) {
        for word in self.span_mut(frame, PAGE_SIZE as usize) {
            *word.get_mut() = 0;
        }
    }
}

/// A bitmap allocator over simulated RAM, with failure injection: after `fail_after`
/// further allocations, every allocation fails.
#[derive(Debug)]
pub struct SimFrames {
    /// The allocator doing the real work; its counters are the test's ground truth.
    pub inner: BitmapFrameAllocator,
    /// Allocations still allowed before injected failure (`None`: no injection).
    pub fail_after: Option<u64>,
}

impl SimFrames {
    /// `frames` free frames starting at host-physical 1 MiB ([`FLAT_BASE`]).
    pub fn new(frames: u64) -> SimFrames {
        let start = HostPhysAddr::new_truncate(FLAT_BASE);
        let end = HostPhysAddr::new_truncate(FLAT_BASE + frames * PAGE_SIZE);
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

impl<F: crate::paging::EntryFormat> Pgm<SimFrames, SimMemory, F> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::hpa;

    #[test]
    fn flat_memory_reads_back_what_was_written_and_zeros_elsewhere() {
        let mut memory = FlatMemory::new(2);
        memory.write(hpa(FLAT_BASE + 0xFFD), b"across");
        let mut back = [0u8; 6];
        memory.read(hpa(FLAT_BASE + 0xFFD), &mut back);
        assert_eq!(&back, b"across", "bytes across a frame boundary");
        memory.write_u64(hpa(FLAT_BASE + 0x1008), 0x1122_3344_5566_7788);
        assert_eq!(memory.read_u64(hpa(FLAT_BASE + 0x1008)), 0x1122_3344_5566_7788);
        assert_eq!(
            memory.compare_exchange_u64(hpa(FLAT_BASE + 0x1008), 1, 2),
            Err(0x1122_3344_5566_7788)
        );
        memory.zero_frame(hpa(FLAT_BASE + 0x1000));
        assert_eq!(memory.read_u64(hpa(FLAT_BASE + 0x1008)), 0);
        memory.read(hpa(FLAT_BASE + 0xFFD), &mut back);
        assert_eq!(&back, b"acr\0\0\0", "the first frame kept its bytes");
        assert_eq!(
            memory.read_u64(hpa(FLAT_BASE + 0x2000)),
            0,
            "outside reads as zeros"
        );
        assert_eq!(memory.read_u64(hpa(0x1000)), 0, "below reads as zeros");
    }
}
