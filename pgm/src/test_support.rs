//! Helpers shared by the manager tests and the model tests: a simulated VM and guest accesses
//! that go through the software EPT walker the way the CPU's do.

use alloc::vec;
use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::frames::HostMemory;
use crate::handlers::HandlerId;
use crate::manager::{
    AccessHandlers, DeviceId, FaultOutcome, HandlerAction, Mmio2Spec, Pgm, Resolution, RomId, RomImage,
};
use crate::paging::{Access, Invalidation};
pub use crate::sim::{SimFormat, SimPgm};
use crate::sim::{SimFrames, SimMemory};
use crate::RomError;

pub const MIB: u64 = 1 << 20;

pub fn gpa(addr: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(addr).unwrap()
}

pub fn hpa(addr: u64) -> HostPhysAddr {
    HostPhysAddr::new(addr).unwrap()
}

/// A VM over `frames` simulated frames, with 4 KiB pages only: most tests count frames and
/// tables page by page. Large pages (the default) have their own tests, and the whole-API
/// script starts from the default.
pub fn pgm_with_frames(frames: u64) -> SimPgm {
    let mut pgm = Pgm::new(SimFrames::new(frames), SimMemory::default()).unwrap();
    pgm.set_large_pages(false);
    pgm
}

/// A VM over `frames` simulated frames as `Pgm::new` makes it: large pages on.
pub fn pgm_with_defaults(frames: u64) -> SimPgm {
    Pgm::new(SimFrames::new(frames), SimMemory::default()).unwrap()
}

/// A VM with RAM at [0, 640 KiB) and [1 MiB, 16 MiB).
pub fn pc_like() -> SimPgm {
    let mut pgm = pgm_with_frames(4096);
    pgm.register_ram(gpa(0), 640 * 1024, "low").unwrap();
    pgm.register_ram(gpa(MIB), 15 * MIB, "high").unwrap();
    pgm
}

pub fn frames_used(pgm: &SimPgm) -> u64 {
    pgm.frames().inner.counts().used()
}

/// The allocator's view and the manager's accounting must agree at every step.
pub fn assert_accounting(pgm: &SimPgm) {
    assert_eq!(frames_used(pgm), pgm.stats().host_frames(), "{:?}", pgm.stats());
}

/// How a simulated guest access ended.
#[derive(Debug, PartialEq, Eq)]
pub enum GuestAccess {
    /// Completed after this many EPT violations.
    Done { faults: u32 },
    /// Stopped by a fault the manager did not resolve.
    Stopped(FaultOutcome),
}

/// Performs a guest write of `data` (within one page) the way the CPU would: translate, fault,
/// resolve, retry.
pub fn guest_write(pgm: &mut SimPgm, at: GuestPhysAddr, data: &[u8]) -> GuestAccess {
    let mut faults = 0;
    loop {
        match pgm.translate(at, Access::Write) {
            Ok(hpa) => {
                write_host(pgm, hpa, data);
                return GuestAccess::Done { faults };
            }
            Err(violation) => {
                faults += 1;
                assert!(faults < 3, "fault loop at {at}: {violation:?}");
                match pgm.resolve_fault(at, Access::Write) {
                    // A large fill remaps 511 other pages: a flush everywhere. A frame that
                    // replaced the zero or a shared frame: a flush on the other CPUs.
                    FaultOutcome::Resolved {
                        invalidation,
                        resolution,
                    } => {
                        let expected = match resolution {
                            _ if pgm.is_mapped_large(at) => Invalidation::SingleContext,
                            Resolution::ZeroFill | Resolution::CopyOnWrite => Invalidation::OtherCpus,
                            Resolution::WriteMonitor | Resolution::Remap => Invalidation::None,
                        };
                        assert_eq!(invalidation, expected)
                    }
                    other => return GuestAccess::Stopped(other),
                }
            }
        }
    }
}

/// What the kernel does after a change that asked for an invalidation: every CPU that ran the
/// VM flushes, and the frames the change retired can then be reused or given back.
pub fn flush_every_cpu(pgm: &mut SimPgm) {
    let flush = pgm.begin_tlb_flush();
    pgm.end_tlb_flush(flush);
}

/// Reads what the guest would read at `at` (no fault expected).
pub fn guest_read(pgm: &SimPgm, at: GuestPhysAddr, len: usize) -> Vec<u8> {
    let hpa = pgm.translate(at, Access::Read).expect("RAM is always readable");
    let mut buf = vec![0; len];
    pgm.memory().read(hpa, &mut buf);
    buf
}

/// Writes host-physical memory directly (what a guest store does once translated).
pub fn write_host(pgm: &mut SimPgm, hpa: HostPhysAddr, data: &[u8]) {
    pgm.memory_mut().write(hpa, data);
}

/// Audits the VM's EPT against what it holds and what the simulated host has allocated;
/// panics naming every finding.
pub fn assert_isolated(pgm: &SimPgm, context: &str) {
    let report = pgm.audit_simulated();
    assert!(
        report.is_clean(),
        "EPT audit {context}: {} finding(s): {:?}",
        report.findings.len(),
        report.findings
    );
}

/// What a test checks after a change that may have taken frames from the guest: a complete
/// flush on every CPU, then the kept per-state counts against a recount, the EPT audit and the
/// frame accounting.
pub fn assert_sound_after_flush(pgm: &mut SimPgm, context: &str) {
    flush_every_cpu(pgm);
    assert_eq!(pgm.stats().state_counts(), pgm.recount_states(), "{context}");
    assert_isolated(pgm, context);
    assert_accounting(pgm);
}

/// Registers a ROM whose range is exactly its copied `image` (the common case in tests).
pub fn register_rom_copy(
    pgm: &mut SimPgm,
    base: GuestPhysAddr,
    image: &[u8],
    shadowed: bool,
) -> Result<RomId, RomError> {
    pgm.register_rom(base, image.len() as u64, RomImage::Copy(image), shadowed)
        .map(|(id, _)| id)
}

/// A trackable MMIO2 region of `size` bytes for device 0, number `region_no`.
pub fn mmio2_spec(size: u64, region_no: u32) -> Mmio2Spec {
    Mmio2Spec {
        device: DeviceId(0),
        region_no,
        size,
        track_dirty_pages: true,
    }
}

/// The page numbers set in a dirty bitmap (page 0 in bit 0 of word 0).
pub fn bits(bitmap: &[u64]) -> Vec<usize> {
    (0..bitmap.len() * 64)
        .filter(|&i| bitmap[i / 64] & (1 << (i % 64)) != 0)
        .collect()
}

// Helpers the manager's test modules share.

pub fn private(pgm: &SimPgm) -> u64 {
    pgm.stats().private_frames()
}

pub fn harvest(pgm: &mut SimPgm) -> Vec<u64> {
    let mut out = Vec::new();
    let _ = pgm.harvest_written(&mut out);
    out.iter().map(|gpa| gpa.as_u64()).collect()
}

/// A two-page image with a recognisable pattern.
pub fn rom_image() -> Vec<u8> {
    (0..2 * PAGE_SIZE as usize)
        .map(|i| (i % 253) as u8 ^ 0x5A)
        .collect()
}

pub const ROM_BASE: u64 = 0xE_0000;

pub fn guest_sees(pgm: &SimPgm, at: u64, len: usize) -> Vec<u8> {
    guest_read(pgm, gpa(at), len)
}

pub const BLOCK: u64 = 4 * MIB;

pub const LARGE: u64 = 2 * MIB;

pub fn large_pc() -> SimPgm {
    let mut pgm = pc_like();
    pgm.set_large_pages(true);
    pgm
}

/// Lets a guest write fill the block at `BLOCK` as one large page, then writes a distinct tag
/// into each of its pages through the host.
pub fn tag_block(pgm: &mut SimPgm) {
    assert_eq!(
        guest_write(pgm, gpa(BLOCK), b"first"),
        GuestAccess::Done { faults: 1 }
    );
    for page in 0..512u64 {
        let _ = pgm
            .write_phys(gpa(BLOCK + page * PAGE_SIZE), &page.to_le_bytes())
            .unwrap();
    }
}

pub fn assert_block_tags(pgm: &SimPgm) {
    for page in 0..512u64 {
        assert_eq!(
            guest_read(pgm, gpa(BLOCK + page * PAGE_SIZE), 8),
            page.to_le_bytes(),
            "page {page}"
        );
    }
}

/// Records what it is handed; fills reads with 0xAB; answers `action`.
pub struct Recorder {
    pub action: HandlerAction,
    pub calls: Vec<(HandlerId, u64, Access, Vec<u8>)>,
}

impl AccessHandlers for Recorder {
    fn access(
        &mut self,
        handler: HandlerId,
        at: GuestPhysAddr,
        access: Access,
        data: &mut [u8],
    ) -> HandlerAction {
        if access == Access::Read && self.action == HandlerAction::Handled {
            data.fill(0xAB);
        }
        self.calls.push((handler, at.as_u64(), access, data.to_vec()));
        self.action
    }
}

pub fn recorder(action: HandlerAction) -> Recorder {
    Recorder {
        action,
        calls: Vec::new(),
    }
}

pub const VGA: u64 = 0xA_0000;
