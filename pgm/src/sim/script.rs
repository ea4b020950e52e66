//! The whole public API driven from bytes, with the EPT auditor and the frame accounting as the
//! oracle after every step. One interpreter serves the property test (`cargo test`, random
//! byte strings) and the fuzz target (`pgm/fuzz`, coverage-guided byte strings): whatever the
//! order of operations, failures included, no leaf may reach a frame the VM does not hold, the
//! manager's frame count must equal the allocator's, and nothing may leak at the end.
//!
//! The VM has RAM at [0, 256 KiB) and [1 MiB, 1 MiB + 256 KiB), so that with the A20 gate closed
//! the second range shows the first, unassigned space for MMIO and MMIO2 at 2 MiB and its A20
//! alias at 3 MiB, two places for a ROM (one either side of an A20 alias), and one whole 2 MiB
//! block of RAM at 6 MiB: mapped large on the zero chunk, filled large, split, merged, and left
//! unmapped for want of a page table when the host refuses frames and the VM's reserve is
//! given back ([`Op::ReleaseIdle`]). The script completes TLB flushes ([`Op::Flush`]), so
//! retired frames return to the host and are handed out again, and it unregisters and
//! registers both the high RAM and the block at the same addresses.
//!
//! [`Coverage`] counts, per operation, the states it met (the block large, split or awaiting
//! tables; monitoring on or off; a page locked; the A20 gate closed; an MMIO alias; frames
//! awaiting a flush), so a run can show that no state it means to test went unvisited.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use super::{SimFrames, SimMemory};
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::frames::HostMemory;
use crate::handlers::{HandlerId, HandlerKind};
use crate::manager::{
    AccessHandlers, DeviceId, FaultOutcome, HandlerAction, Mmio2Handle, Mmio2Spec, PageMapLock, Pgm, RomId,
    RomImage, RomProtection,
};
use crate::page::{PageState, PageType};
use crate::paging::Access;
use crate::{AccessError, PageError};

/// The nested-paging format of [`SimPgm`]: Intel EPT, or AMD NPT with the feature `sim-npt`.
/// The host suites (unit tests, the whole-API script, the auditor, the model tests, the fuzz
/// target, the benchmarks) are written against this one name, so one suite runs on each
/// format: `cargo test -p pgm --features sim` and `cargo test -p pgm --features sim-npt`.
#[cfg(not(feature = "sim-npt"))]
pub type SimFormat = crate::Ept;
/// See the EPT variant.
#[cfg(feature = "sim-npt")]
pub type SimFormat = crate::Npt;

/// The manager over the simulated host, with [`SimFormat`]'s tables.
pub type SimPgm = Pgm<SimFrames, SimMemory, SimFormat>;

const MIB: u64 = 1 << 20;
/// RAM pages in each of the two ranges.
const RAM_PAGES: u64 = 64;
const HIGH_RAM: u64 = MIB;
/// Unassigned space for MMIO and MMIO2 (2 MiB) and its A20 alias (3 MiB).
const SPACE: [u64; 3] = [0x20_0000, 0x20_4000, 0x28_0000];
/// Where a ROM may be registered: with bit 20 set (shown 1 MiB below while the A20 gate is
/// closed) or clear (showing through its alias 1 MiB up), and over high RAM.
const ROM_BASES: [u64; 3] = [0x38_0000, 0x2C_0000, HIGH_RAM + 0x2_0000];
/// ROM pages: the image fills one and a half of them (the rest reads as zeros).
const ROM_PAGES: u64 = 2;
/// The image a permanent ROM keeps (not copied).
static PERMANENT_IMAGE: [u8; 6144] = [0xCD; 6144];
/// Where MMIO2 may be mapped: the unassigned slots, and over high RAM.
const MMIO2_SLOTS: [u64; 4] = [SPACE[0], SPACE[1], SPACE[2], HIGH_RAM + 0x3_0000];
/// A device page of the caller's (the APIC-access page) for special aliases.
const SPECIAL_FRAME: u64 = 0xFEE0_0000;
/// The 2 MiB block of RAM.
const BLOCK: u64 = 0x60_0000;
/// Pages in the block.
const BLOCK_PAGES: u64 = 512;
/// Host frames the simulated host has: the zero chunk, a large fill and a pre-allocation of
/// everything fit.
const HOST_FRAMES: u64 = 3072;

/// Guest-physical addresses worth touching: RAM, MMIO/MMIO2 slots, A20 aliases, the ROM, the
/// 2 MiB block and its alias, and holes.
const INTERESTING: [u64; 22] = [
    0,
    0x1000,
    0x3F000,
    HIGH_RAM,
    HIGH_RAM + 0x1000,
    HIGH_RAM + 0x3F000,
    SPACE[0],
    SPACE[0] + 0x1000,
    SPACE[1],
    SPACE[2],
    SPACE[0] | MIB,
    SPACE[2] | MIB,
    ROM_BASES[0],
    ROM_BASES[1] | MIB,
    ROM_BASES[2] + 0x1000,
    0x10_0000 - 0x1000,
    0x4000_0000,
    BLOCK,
    BLOCK + 0x1000,
    BLOCK + 0x5000,
    BLOCK + 0x1F_F000,
    BLOCK | MIB,
];

fn interesting(index: u8) -> GuestPhysAddr {
    GuestPhysAddr::new_truncate(INTERESTING[index as usize % INTERESTING.len()])
}

/// One call (or guest access) of the whole API. Indices pick among the interesting addresses
/// and among the handles the script holds, modulo their count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)] // Each variant is the call of the same name.
pub enum Op {
    /// A guest read (0), write (1) or fetch (2), as the CPU makes it.
    Guest(u8, u8),
    HostWrite(u8, u16, u16),
    HostRead(u8, u16),
    Reset,
    Preallocate,
    LargePages(bool),
    Inflate(u8),
    Deflate(u8),
    /// Start (0), harvest (1) or stop (2) write monitoring.
    Monitoring(u8),
    A20(bool),
    Share,
    /// Inject allocation failure after this many further allocations (`None`: stop injecting).
    FailAfter(Option<u8>),
    Limit(Option<u8>),
    RegisterMmio(u8, u8),
    DeregisterMmio(u8),
    RegisterHandler(bool, u8, u8),
    DeregisterHandler(u8),
    DisableHandlerPage(u8, u8),
    ResetHandler(u8),
    CreateMmio2(u8, bool),
    MapMmio2(u8, u8),
    UnmapMmio2(u8),
    ReduceMmio2(u8, u8),
    DeregisterMmio2(u8),
    Tracking(u8, bool),
    QueryDirty(u8, bool),
    DeviceWrite(u8, u8),
    AliasMmio2(u8, u8, u8, u8),
    AliasHost(u8, u8),
    RegisterRom(bool, u8, bool),
    ProtectRom(u8, u8, u8),
    DeregisterRom,
    ResetModes(bool, bool),
    External(u8, bool),
    DeregisterDevice(u8),
    Lock(u8, bool),
    Release(u8),
    UnregisterHighRam,
    RegisterHighRam,
    /// A complete TLB flush on every CPU (`begin_tlb_flush` / `end_tlb_flush`).
    Flush,
    UnregisterBlock,
    RegisterBlock,
    /// `release_idle_frames`: the VM's reserve goes back to the host.
    ReleaseIdle,
}

/// How often each operation is drawn (out of [`WEIGHT_TOTAL`]): guest accesses most, the
/// structural changes less, so that sequences build state before they tear it down.
const WEIGHTS: [(u8, OpKind); 43] = [
    (8, OpKind::Guest),
    (3, OpKind::HostWrite),
    (1, OpKind::HostRead),
    (1, OpKind::Reset),
    (1, OpKind::Preallocate),
    (1, OpKind::LargePages),
    (2, OpKind::Inflate),
    (1, OpKind::Deflate),
    (2, OpKind::Monitoring),
    (2, OpKind::A20),
    (1, OpKind::Share),
    (1, OpKind::FailAfter),
    (1, OpKind::Limit),
    (2, OpKind::RegisterMmio),
    (1, OpKind::DeregisterMmio),
    (1, OpKind::RegisterHandler),
    (1, OpKind::DeregisterHandler),
    (1, OpKind::DisableHandlerPage),
    (1, OpKind::ResetHandler),
    (2, OpKind::CreateMmio2),
    (2, OpKind::MapMmio2),
    (1, OpKind::UnmapMmio2),
    (1, OpKind::ReduceMmio2),
    (1, OpKind::DeregisterMmio2),
    (1, OpKind::Tracking),
    (1, OpKind::QueryDirty),
    (1, OpKind::DeviceWrite),
    (2, OpKind::AliasMmio2),
    (1, OpKind::AliasHost),
    (1, OpKind::RegisterRom),
    (1, OpKind::ProtectRom),
    (1, OpKind::DeregisterRom),
    (1, OpKind::ResetModes),
    (1, OpKind::External),
    (1, OpKind::DeregisterDevice),
    (2, OpKind::Lock),
    (2, OpKind::Release),
    (1, OpKind::UnregisterHighRam),
    (1, OpKind::RegisterHighRam),
    (2, OpKind::Flush),
    (1, OpKind::UnregisterBlock),
    (1, OpKind::RegisterBlock),
    (1, OpKind::ReleaseIdle),
];

const WEIGHT_TOTAL: u32 = {
    let mut total = 0;
    let mut i = 0;
    while i < WEIGHTS.len() {
        total += WEIGHTS[i].0 as u32;
        i += 1;
    }
    total
};

/// The operation an opcode byte selects (the parameters follow it).
#[derive(Clone, Copy)]
enum OpKind {
    Guest,
    HostWrite,
    HostRead,
    Reset,
    Preallocate,
    LargePages,
    Inflate,
    Deflate,
    Monitoring,
    A20,
    Share,
    FailAfter,
    Limit,
    RegisterMmio,
    DeregisterMmio,
    RegisterHandler,
    DeregisterHandler,
    DisableHandlerPage,
    ResetHandler,
    CreateMmio2,
    MapMmio2,
    UnmapMmio2,
    ReduceMmio2,
    DeregisterMmio2,
    Tracking,
    QueryDirty,
    DeviceWrite,
    AliasMmio2,
    AliasHost,
    RegisterRom,
    ProtectRom,
    DeregisterRom,
    ResetModes,
    External,
    DeregisterDevice,
    Lock,
    Release,
    UnregisterHighRam,
    RegisterHighRam,
    Flush,
    UnregisterBlock,
    RegisterBlock,
    ReleaseIdle,
}

/// Reads parameters off the byte string; every read fails once it is used up.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(first)
    }

    /// A value in `low..low + span`.
    fn within(&mut self, low: u8, span: u8) -> Option<u8> {
        Some(low + self.byte()? % span)
    }

    fn flag(&mut self) -> Option<bool> {
        Some(self.byte()? & 1 != 0)
    }

    fn word(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.byte()?, self.byte()?]))
    }

    /// `None` or a value below `bound`, half the time each.
    fn optional(&mut self, bound: u8) -> Option<Option<u8>> {
        let byte = self.byte()?;
        Some((byte & 1 != 0).then_some((byte >> 1) % bound))
    }
}

impl Op {
    /// Decodes the operations in `bytes` (an opcode byte, then its parameters), in order; a
    /// trailing operation cut short is dropped.
    pub fn decode_all(bytes: &[u8]) -> Vec<Op> {
        let mut bytes = Bytes(bytes);
        let mut ops = Vec::new();
        while let Some(op) = Op::decode(&mut bytes) {
            ops.push(op);
        }
        ops
    }

    fn decode(bytes: &mut Bytes) -> Option<Op> {
        let mut pick = (u32::from(bytes.byte()?) * WEIGHT_TOTAL) >> 8;
        let kind = WEIGHTS
            .iter()
            .find(|(weight, _)| {
                let here = pick < u32::from(*weight);
                pick = pick.wrapping_sub(u32::from(*weight));
                here
            })
            .map(|&(_, kind)| kind)?;
        let b = bytes;
        Some(match kind {
            OpKind::Guest => Op::Guest(b.byte()?, b.within(0, 3)?),
            OpKind::HostWrite => Op::HostWrite(b.byte()?, b.word()? % 4096, 1 + b.word()? % 6000),
            OpKind::HostRead => Op::HostRead(b.byte()?, 1 + b.word()? % 6000),
            OpKind::Reset => Op::Reset,
            OpKind::Preallocate => Op::Preallocate,
            OpKind::LargePages => Op::LargePages(b.flag()?),
            OpKind::Inflate => Op::Inflate(b.byte()?),
            OpKind::Deflate => Op::Deflate(b.byte()?),
            OpKind::Monitoring => Op::Monitoring(b.within(0, 3)?),
            OpKind::A20 => Op::A20(b.flag()?),
            OpKind::Share => Op::Share,
            OpKind::FailAfter => Op::FailAfter(b.optional(6)?),
            OpKind::Limit => Op::Limit(b.optional(40)?),
            OpKind::RegisterMmio => Op::RegisterMmio(b.byte()?, b.within(1, 2)?),
            OpKind::DeregisterMmio => Op::DeregisterMmio(b.byte()?),
            OpKind::RegisterHandler => Op::RegisterHandler(b.flag()?, b.byte()?, b.within(1, 2)?),
            OpKind::DeregisterHandler => Op::DeregisterHandler(b.byte()?),
            OpKind::DisableHandlerPage => Op::DisableHandlerPage(b.byte()?, b.byte()?),
            OpKind::ResetHandler => Op::ResetHandler(b.byte()?),
            OpKind::CreateMmio2 => Op::CreateMmio2(b.within(1, 3)?, b.flag()?),
            OpKind::MapMmio2 => Op::MapMmio2(b.byte()?, b.within(0, 4)?),
            OpKind::UnmapMmio2 => Op::UnmapMmio2(b.byte()?),
            OpKind::ReduceMmio2 => Op::ReduceMmio2(b.byte()?, b.within(1, 3)?),
            OpKind::DeregisterMmio2 => Op::DeregisterMmio2(b.byte()?),
            OpKind::Tracking => Op::Tracking(b.byte()?, b.flag()?),
            OpKind::QueryDirty => Op::QueryDirty(b.byte()?, b.flag()?),
            OpKind::DeviceWrite => Op::DeviceWrite(b.byte()?, b.within(0, 4)?),
            OpKind::AliasMmio2 => Op::AliasMmio2(b.byte()?, b.byte()?, b.byte()?, b.within(0, 4)?),
            OpKind::AliasHost => Op::AliasHost(b.byte()?, b.byte()?),
            OpKind::RegisterRom => Op::RegisterRom(b.flag()?, b.within(0, 3)?, b.flag()?),
            OpKind::ProtectRom => Op::ProtectRom(b.within(0, 4)?, b.within(0, 3)?, b.within(1, 2)?),
            OpKind::DeregisterRom => Op::DeregisterRom,
            OpKind::ResetModes => Op::ResetModes(b.flag()?, b.flag()?),
            OpKind::External => Op::External(b.byte()?, b.flag()?),
            OpKind::DeregisterDevice => Op::DeregisterDevice(b.within(0, 2)?),
            OpKind::Lock => Op::Lock(b.byte()?, b.flag()?),
            OpKind::Release => Op::Release(b.byte()?),
            OpKind::UnregisterHighRam => Op::UnregisterHighRam,
            OpKind::RegisterHighRam => Op::RegisterHighRam,
            OpKind::Flush => Op::Flush,
            OpKind::UnregisterBlock => Op::UnregisterBlock,
            OpKind::RegisterBlock => Op::RegisterBlock,
            OpKind::ReleaseIdle => Op::ReleaseIdle,
        })
    }
}

/// What the oracle found wrong, and after which step.
#[derive(Debug)]
pub struct Failure {
    /// The step after which it was found (the number of operations for the final checks).
    pub step: usize,
    /// The operation of that step (`None` for the final checks).
    pub op: Option<Op>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            Some(op) => write!(f, "after step {} ({op:?}): {}", self.step, self.message),
            None => write!(f, "at the end, after {} steps: {}", self.step, self.message),
        }
    }
}

/// Handles the script holds, as a VMM would.
#[derive(Default)]
struct Held {
    mmio: Vec<HandlerId>,
    handlers: Vec<HandlerId>,
    mmio2: Vec<Mmio2Handle>,
    rom: Option<(RomId, GuestPhysAddr)>,
    locks: Vec<PageMapLock>,
}

fn pick<T: Copy>(items: &[T], index: u8) -> Option<T> {
    (!items.is_empty()).then(|| items[index as usize % items.len()])
}

/// A device that answers every access itself.
struct Devices;

impl AccessHandlers for Devices {
    fn access(&mut self, _: HandlerId, _: GuestPhysAddr, _: Access, data: &mut [u8]) -> HandlerAction {
        data.fill(0x5A);
        HandlerAction::Handled
    }
}

/// Runs the operations `bytes` decode to on a fresh VM, auditing after every step; the first
/// finding ends the run.
pub fn run(bytes: &[u8]) -> Result<(), Failure> {
    run_ops(&Op::decode_all(bytes))
}

/// Runs `ops` on a fresh VM, auditing after every step; the first finding ends the run.
pub fn run_ops(ops: &[Op]) -> Result<(), Failure> {
    run_counted(ops, None)
}

/// [`run`], counting in `coverage` the states each operation met.
pub fn run_counting(bytes: &[u8], coverage: &mut Coverage) -> Result<(), Failure> {
    run_counted(&Op::decode_all(bytes), Some(coverage))
}

fn run_counted(ops: &[Op], mut coverage: Option<&mut Coverage>) -> Result<(), Failure> {
    let mut vm = Scripted::new();
    for (step, op) in ops.iter().enumerate() {
        if let Some(coverage) = coverage.as_deref_mut() {
            coverage.count(op, vm.states());
        }
        vm.step(op).and_then(|()| vm.check()).map_err(|message| Failure {
            step,
            op: Some(*op),
            message,
        })?;
    }
    vm.finish().map_err(|message| Failure {
        step: ops.len(),
        op: None,
        message,
    })
}

/// The VM a script drives and the handles it holds.
struct Scripted {
    pgm: SimPgm,
    held: Held,
}

impl Scripted {
    fn new() -> Self {
        let mut pgm =
            Pgm::new(SimFrames::new(HOST_FRAMES), SimMemory::default()).expect("tables for a new VM");
        for (base, pages, name) in [
            (0, RAM_PAGES, "low"),
            (HIGH_RAM, RAM_PAGES, "high"),
            (BLOCK, BLOCK_PAGES, "block"),
        ] {
            pgm.register_ram(GuestPhysAddr::new_truncate(base), pages * PAGE_SIZE, name)
                .expect("RAM of a new VM");
        }
        Scripted {
            pgm,
            held: Held::default(),
        }
    }

    /// The auditor on the simulated host, and the manager's frame count against the
    /// allocator's.
    fn check(&self) -> Result<(), String> {
        let report = self.pgm.audit_simulated();
        if !report.is_clean() {
            return Err(format!("EPT audit: {:?}", report.findings));
        }
        let (allocated, counted) = (
            self.pgm.frames().inner.counts().used(),
            self.pgm.stats().host_frames(),
        );
        if allocated != counted {
            return Err(format!(
                "the allocator has {allocated} frames out, the manager counts {counted}"
            ));
        }
        // The kept per-state counts are a side record too: recounted page by page.
        let (kept, recounted) = (self.pgm.stats().state_counts(), self.pgm.recount_states());
        if kept != recounted {
            return Err(format!(
                "the manager counts pages per state as {kept:?}, a recount finds {recounted:?}"
            ));
        }
        self.check_views_agree()
    }

    /// Carries out `op` and checks what it did to guest memory: an operation that must not
    /// change contents leaves every watched page reading as before; a write reads back; a
    /// reset leaves RAM reading zeros; an inflated page reads zeros.
    fn step(&mut self, op: &Op) -> Result<(), String> {
        let before = preserves_contents(op).then(|| self.snapshot());
        self.apply(op)?;
        if let Some(before) = before {
            let after = self.snapshot();
            if let Some(page) = (0..before.len()).find(|&i| before[i] != after[i]) {
                return Err(format!("contents of {} changed", watched_page(page)));
            }
        }
        let pgm = &self.pgm;
        let zeroed: Vec<GuestPhysAddr> = match *op {
            Op::Reset if !pgm.zero_ram_on_reset() => Vec::new(),
            Op::Reset => (0..INTERESTING.len())
                .map(watched_page)
                .filter(|&at| pgm.page(at).is_some_and(|p| p.page_type() == PageType::Ram))
                .collect(),
            Op::Inflate(at) => core::iter::once(watched_page(at as usize))
                .filter(|&at| pgm.page(at).is_some_and(|p| p.state() == PageState::Ballooned))
                .collect(),
            _ => Vec::new(),
        };
        for at in zeroed {
            let mut page = vec![0xAA; PAGE_SIZE as usize];
            if pgm.read_phys(at, &mut page).is_ok() && page.iter().any(|&b| b != 0) {
                return Err(format!("{at} does not read as zeros after {op:?}"));
            }
        }
        Ok(())
    }

    /// What the host path ([`Pgm::read_phys`]) reads of every watched page (`None` where it
    /// refuses).
    fn snapshot(&self) -> Vec<Option<Vec<u8>>> {
        (0..INTERESTING.len())
            .map(|index| {
                let mut page = vec![0; PAGE_SIZE as usize];
                self.pgm
                    .read_phys(watched_page(index), &mut page)
                    .ok()
                    .map(|()| page)
            })
            .collect()
    }

    /// Wherever the guest can read a watched page, it reads what the host path reads there
    /// (through the A20 gate): the EPT maps the storage the descriptors name.
    fn check_views_agree(&self) -> Result<(), String> {
        let pgm = &self.pgm;
        for index in 0..INTERESTING.len() {
            let at = watched_page(index);
            let Ok(hpa) = pgm.translate(at, Access::Read) else {
                continue;
            };
            let (mut guest, mut host) = (vec![0; PAGE_SIZE as usize], vec![0; PAGE_SIZE as usize]);
            pgm.memory().read(hpa, &mut guest);
            match pgm.read_phys(pgm.a20_apply(at), &mut host) {
                Ok(()) if guest == host => {}
                Ok(()) => return Err(format!("the guest reads other contents at {at} than the host")),
                Err(error) => return Err(format!("the guest reads {at}, the host is refused: {error:?}")),
            }
        }
        Ok(())
    }

    /// Releases every lock and tears the VM down: every frame must be back at the host.
    fn finish(mut self) -> Result<(), String> {
        self.pgm.frames_mut().fail_after = None;
        for lock in self.held.locks.drain(..) {
            self.pgm.release_page_lock(lock);
        }
        let frames = self.pgm.terminate();
        match frames.inner.counts().used() {
            0 => Ok(()),
            leaked => Err(format!("{leaked} frames leaked")),
        }
    }

    /// A guest access the way the CPU makes it: translate, fault, resolve, retry. A fault the
    /// manager resolved must not come back on the retry (the kernel would stop the VM as a
    /// fault loop): that is a failure.
    fn guest_access(&mut self, at: GuestPhysAddr, access: Access) -> Result<(), String> {
        let pgm = &mut self.pgm;
        let mut resolved = None;
        loop {
            let violation = match pgm.translate(at, access) {
                Ok(hpa) if access == Access::Write => {
                    pgm.memory_mut().write(hpa, &[0xC3]);
                    // A write through a writable mapping lands where the host sees the page.
                    let mut byte = [0];
                    let seen = pgm.read_phys(pgm.a20_apply(at), &mut byte).map(|()| byte[0]);
                    if seen != Ok(0xC3) {
                        return Err(format!("the guest wrote 0xC3 at {at}, the host reads {seen:?}"));
                    }
                    return Ok(());
                }
                Ok(_) => return Ok(()),
                Err(violation) => violation,
            };
            if let Some(outcome) = resolved {
                return Err(format!(
                    "fault loop: {access:?} at {at} faults again ({violation:?}) after {outcome:?}"
                ));
            }
            match pgm.resolve_fault(at, access) {
                outcome @ FaultOutcome::Resolved { .. } => resolved = Some(outcome),
                FaultOutcome::Handler { .. } => {
                    let mut byte = [0xC3];
                    let _ = match access {
                        Access::Write => pgm.write_phys_handled(at, &byte, &mut Devices).map(|_| ()),
                        _ => pgm.read_phys_handled(at, &mut byte, &mut Devices),
                    };
                    return Ok(());
                }
                FaultOutcome::EmulateWrite => {
                    let _ = pgm.write_phys(at, &[0xC3]);
                    return Ok(());
                }
                _ => return Ok(()),
            }
        }
    }

    /// Carries out one operation. Refusals are part of the API under test (the auditor runs
    /// after them too); only calls the API promises succeed are unwrapped.
    fn apply(&mut self, op: &Op) -> Result<(), String> {
        let (pgm, held) = (&mut self.pgm, &mut self.held);
        let page_at = |index: u8| interesting(index).page_base();
        let gpa = GuestPhysAddr::new_truncate;
        match *op {
            Op::Guest(at, access) => {
                let access = [Access::Read, Access::Write, Access::Execute][access as usize % 3];
                return self.guest_access(interesting(at), access);
            }
            Op::HostWrite(at, offset, len) => {
                let data = vec![0x77; len as usize];
                let start = gpa(interesting(at).as_u64() + u64::from(offset));
                if pgm.write_phys(start, &data).is_ok() {
                    return written_back(pgm, start, &data);
                }
            }
            Op::HostRead(at, len) => {
                let mut buf = vec![0; len as usize];
                let _ = pgm.read_phys(interesting(at), &mut buf);
                let _ = pgm.read_phys_handled(interesting(at), &mut buf, &mut Devices);
            }
            Op::Reset => {
                // Invalidations are the script's `Flush` operation's business: a sequence that
                // never flushes must still keep every frame it retired out of reuse.
                let _ = pgm.reset_ram();
            }
            Op::Preallocate => {
                let _ = pgm.preallocate_ram();
            }
            Op::LargePages(on) => pgm.set_large_pages(on),
            Op::Inflate(at) => {
                let _ = pgm.balloon_inflate(&[page_at(at)]);
            }
            Op::Deflate(at) => {
                let _ = pgm.balloon_deflate(&[page_at(at)]);
            }
            Op::Monitoring(what) => {
                let _ = match what % 3 {
                    0 => pgm.start_write_monitoring(),
                    1 => pgm.harvest_written(&mut Vec::new()),
                    _ => pgm.stop_write_monitoring(),
                };
            }
            Op::A20(on) => {
                let _ = pgm.set_a20(on);
            }
            Op::Share => {
                let _ = pgm.share_identical_pages();
            }
            Op::FailAfter(n) => pgm.frames_mut().fail_after = n.map(u64::from),
            Op::Limit(limit) => pgm.set_frame_limit(limit.map(u64::from)),
            Op::RegisterMmio(at, pages) => {
                if let Ok((id, _)) = pgm.register_mmio(page_at(at), u64::from(pages) * PAGE_SIZE) {
                    held.mmio.push(id);
                }
            }
            Op::DeregisterMmio(index) => {
                if let Some(id) = pick(&held.mmio, index) {
                    let _ = pgm.deregister_mmio(id).expect("a live MMIO range deregisters");
                    held.mmio.retain(|&other| other != id);
                }
            }
            Op::RegisterHandler(write, at, pages) => {
                let kind = if write {
                    HandlerKind::Write
                } else {
                    HandlerKind::All
                };
                if let Ok((id, _)) = pgm.register_handler(kind, page_at(at), u64::from(pages) * PAGE_SIZE) {
                    held.handlers.push(id);
                }
            }
            Op::DeregisterHandler(index) => {
                if let Some(id) = pick(&held.handlers, index) {
                    let _ = pgm.deregister_handler(id).expect("a live handler deregisters");
                    held.handlers.retain(|&other| other != id);
                }
            }
            Op::DisableHandlerPage(index, at) => {
                if let Some(id) = pick(&held.handlers, index) {
                    let _ = pgm.disable_handler_page(id, page_at(at));
                }
            }
            Op::ResetHandler(index) => {
                let all: Vec<HandlerId> = held.handlers.iter().chain(&held.mmio).copied().collect();
                if let Some(id) = pick(&all, index) {
                    let _ = pgm.reset_handler(id).expect("a live handler resets");
                }
            }
            Op::CreateMmio2(pages, trackable) => {
                let spec = Mmio2Spec {
                    device: DeviceId(u32::from(pages % 2)),
                    region_no: held.mmio2.len() as u32 % 3,
                    size: u64::from(pages) * PAGE_SIZE,
                    track_dirty_pages: trackable,
                };
                if let Ok(handle) = pgm.create_mmio2(spec) {
                    held.mmio2.push(handle);
                }
            }
            Op::MapMmio2(index, slot) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    let _ = pgm.map_mmio2(handle, gpa(MMIO2_SLOTS[slot as usize % MMIO2_SLOTS.len()]));
                }
            }
            Op::UnmapMmio2(index) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    let _ = pgm.unmap_mmio2(handle);
                }
            }
            Op::ReduceMmio2(index, pages) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    let _ = pgm.reduce_mmio2(handle, u64::from(pages) * PAGE_SIZE);
                }
            }
            Op::DeregisterMmio2(index) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    if pgm.deregister_mmio2(handle).is_ok() {
                        held.mmio2.retain(|&other| other != handle);
                    }
                }
            }
            Op::Tracking(index, on) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    // Refused only for a region created without tracking.
                    let _ = pgm.set_mmio2_dirty_tracking(handle, on);
                }
            }
            Op::QueryDirty(index, with_buffer) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    let mut bitmap = Vec::new();
                    let out = with_buffer.then_some(&mut bitmap);
                    let _ = pgm.query_and_reset_mmio2_dirty(handle, out);
                }
            }
            Op::DeviceWrite(index, page) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    let _ = pgm.mmio2_write(handle, u64::from(page) * PAGE_SIZE, &[0x99; 16]);
                }
            }
            Op::AliasMmio2(mmio, at, region, page) => {
                if let (Some(id), Some(handle)) = (pick(&held.mmio, mmio), pick(&held.mmio2, region)) {
                    let _ = pgm.alias_mmio_to_mmio2(id, page_at(at), handle, u64::from(page) * PAGE_SIZE);
                }
            }
            Op::AliasHost(mmio, at) => {
                if let Some(id) = pick(&held.mmio, mmio) {
                    let frame = HostPhysAddr::new_truncate(SPECIAL_FRAME);
                    let _ = pgm.alias_mmio_to_host(id, page_at(at), frame);
                }
            }
            Op::RegisterRom(shadowed, at, permanent) => {
                if held.rom.is_none() {
                    let copied = vec![0xAB; 6144];
                    let image = if permanent {
                        RomImage::Permanent(&PERMANENT_IMAGE)
                    } else {
                        RomImage::Copy(&copied)
                    };
                    let base = gpa(ROM_BASES[at as usize % ROM_BASES.len()]);
                    if let Ok((id, _)) = pgm.register_rom(base, ROM_PAGES * PAGE_SIZE, image, shadowed) {
                        held.rom = Some((id, base));
                    }
                }
            }
            Op::ProtectRom(mode, first, pages) => {
                if let Some((_, base)) = held.rom {
                    let protection = [
                        RomProtection::ReadRomWriteIgnore,
                        RomProtection::ReadRomWriteRam,
                        RomProtection::ReadRamWriteIgnore,
                        RomProtection::ReadRamWriteRam,
                    ][mode as usize % 4];
                    // From a page before the ROM to one past it: the rest is skipped.
                    let start = gpa((base.as_u64() + u64::from(first) * PAGE_SIZE).saturating_sub(PAGE_SIZE));
                    let _ = pgm
                        .protect_rom_range(start, u64::from(pages) * PAGE_SIZE, protection)
                        .expect("any page-aligned range protects");
                }
            }
            Op::DeregisterRom => {
                if let Some((id, _)) = held.rom {
                    if pgm.deregister_rom(id).is_ok() {
                        held.rom = None;
                    }
                }
            }
            Op::ResetModes(zero, preallocated) => {
                pgm.set_zero_ram_on_reset(zero);
                let _ = pgm.set_ram_preallocation(preallocated);
            }
            Op::External(at, write) => {
                // From a watched page into whatever follows it, often unassigned space.
                let start = gpa(interesting(at).as_u64() + PAGE_SIZE - 8);
                if write {
                    // Pages may refuse (ballooned, no frame); unassigned space never does.
                    if let Err(error @ AccessError::Page(PageError::NotGuestMemory(_))) =
                        pgm.write_phys_external(start, &[0x66; 24], &mut Devices)
                    {
                        return Err(format!("external write at {start}: {error:?}"));
                    }
                } else {
                    let mut buf = [0u8; 24];
                    pgm.read_phys_external(start, &mut buf, &mut Devices)
                        .map_err(|e| format!("external read at {start}: {e:?}"))?;
                    for (i, &byte) in buf.iter().enumerate() {
                        let at = gpa(start.as_u64() + i as u64);
                        if pgm.page(at).is_none() && byte != 0xFF {
                            return Err(format!("unassigned {at} reads {byte:#x} externally"));
                        }
                    }
                }
            }
            Op::DeregisterDevice(device) => {
                if pgm.deregister_device_mmio2(DeviceId(u32::from(device))).is_ok() {
                    held.mmio2.retain(|&handle| pgm.is_mmio2_handle(handle));
                }
            }
            Op::Lock(at, write) => {
                let at = interesting(at);
                let locked = if write {
                    pgm.lock_page_for_write(at)
                } else {
                    pgm.lock_page_for_read(at)
                };
                if let Ok(mapping) = locked {
                    held.locks.push(mapping.lock);
                }
            }
            Op::Release(index) => {
                if !held.locks.is_empty() {
                    let lock = held.locks.remove(index as usize % held.locks.len());
                    pgm.release_page_lock(lock);
                }
            }
            Op::UnregisterHighRam => {
                let _ = pgm.unregister_ram(gpa(HIGH_RAM), RAM_PAGES * PAGE_SIZE);
            }
            Op::RegisterHighRam => {
                let _ = pgm.register_ram(gpa(HIGH_RAM), RAM_PAGES * PAGE_SIZE, "high");
            }
            Op::Flush => {
                let flush = pgm.begin_tlb_flush();
                pgm.end_tlb_flush(flush);
            }
            Op::UnregisterBlock => {
                let _ = pgm.unregister_ram(gpa(BLOCK), BLOCK_PAGES * PAGE_SIZE);
            }
            Op::RegisterBlock => {
                let _ = pgm.register_ram(gpa(BLOCK), BLOCK_PAGES * PAGE_SIZE, "block");
            }
            Op::ReleaseIdle => pgm.release_idle_frames(),
        }
        Ok(())
    }
}

impl Scripted {
    /// The states of [`State`] the VM is in now.
    fn states(&self) -> [bool; STATES] {
        let pgm = &self.pgm;
        let block = GuestPhysAddr::new_truncate(BLOCK);
        let large = pgm.is_mapped_large(block);
        let awaiting = pgm.awaits_tables(block);
        let registered = pgm
            .page(block)
            .is_some_and(|page| page.page_type() == PageType::Ram);
        let aliased = (0..INTERESTING.len()).any(|index| {
            pgm.page(watched_page(index))
                .is_some_and(|page| page.page_type().is_mmio_alias())
        });
        let mut states = [false; STATES];
        states[State::BlockLarge as usize] = large;
        states[State::BlockSplit as usize] = registered && !large && !awaiting;
        states[State::BlockAwaitingTables as usize] = awaiting;
        states[State::MonitoringOn as usize] = pgm.is_write_monitoring();
        states[State::MonitoringOff as usize] = !pgm.is_write_monitoring();
        states[State::PageLocked as usize] = !self.held.locks.is_empty();
        states[State::A20Closed as usize] = !pgm.a20_enabled();
        states[State::MmioAliased as usize] = aliased;
        states[State::FramesAwaitingFlush as usize] = pgm.frames_awaiting_flush() > 0;
        states
    }
}

/// The states [`Coverage`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The 2 MiB block is mapped by one 2 MiB leaf (on the zero chunk or its own chunk).
    BlockLarge,
    /// The block is registered RAM mapped with 4 KiB leaves.
    BlockSplit,
    /// The block is unmapped, awaiting the page table that could not be had.
    BlockAwaitingTables,
    /// Write monitoring is on.
    MonitoringOn,
    /// Write monitoring is off.
    MonitoringOff,
    /// The script holds a page-map lock.
    PageLocked,
    /// The A20 gate is closed (addresses with bit 20 set alias the page 1 MiB below).
    A20Closed,
    /// A watched page is an MMIO2 or special alias.
    MmioAliased,
    /// Frames taken from the guest wait for a TLB flush.
    FramesAwaitingFlush,
}

/// How many states [`State`] has.
pub const STATES: usize = 9;

/// Every state, in the order of [`Coverage`]'s columns.
pub const ALL_STATES: [State; STATES] = [
    State::BlockLarge,
    State::BlockSplit,
    State::BlockAwaitingTables,
    State::MonitoringOn,
    State::MonitoringOff,
    State::PageLocked,
    State::A20Closed,
    State::MmioAliased,
    State::FramesAwaitingFlush,
];

/// How often each operation met each state over a run: the proof that a run reached what it
/// means to test. Merge the counts of several threads with [`Coverage::merge`].
#[derive(Clone, Debug, Default)]
pub struct Coverage {
    /// Per operation name, the number of times it ran in each state.
    pub counts: alloc::collections::BTreeMap<&'static str, [u64; STATES]>,
}

impl Coverage {
    fn count(&mut self, op: &Op, states: [bool; STATES]) {
        let cells = self.counts.entry(op.name()).or_default();
        for (cell, met) in cells.iter_mut().zip(states) {
            *cell += u64::from(met);
        }
    }

    /// Adds `other`'s counts to these.
    pub fn merge(&mut self, other: &Coverage) {
        for (name, cells) in &other.counts {
            let mine = self.counts.entry(name).or_default();
            for (cell, more) in mine.iter_mut().zip(cells) {
                *cell += more;
            }
        }
    }

    /// How often any operation met `state`.
    pub fn total(&self, state: State) -> u64 {
        self.counts.values().map(|cells| cells[state as usize]).sum()
    }

    /// The (operation, state) pairs never met, for the operations that ran.
    pub fn unmet(&self) -> Vec<(&'static str, State)> {
        self.counts
            .iter()
            .flat_map(|(&name, cells)| {
                ALL_STATES
                    .iter()
                    .filter(move |&&state| cells[state as usize] == 0)
                    .map(move |&state| (name, state))
            })
            .collect()
    }
}

impl fmt::Display for Coverage {
    /// A table: one row per operation, one column per state.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "| operation |")?;
        for state in ALL_STATES {
            write!(f, " {state:?} |")?;
        }
        writeln!(f)?;
        write!(f, "|---|")?;
        for _ in ALL_STATES {
            write!(f, "---:|")?;
        }
        writeln!(f)?;
        for (name, cells) in &self.counts {
            write!(f, "| {name} |")?;
            for cell in cells {
                write!(f, " {cell} |")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

impl Op {
    /// The operation's name (its variant).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Guest(..) => "Guest",
            Op::HostWrite(..) => "HostWrite",
            Op::HostRead(..) => "HostRead",
            Op::Reset => "Reset",
            Op::Preallocate => "Preallocate",
            Op::LargePages(_) => "LargePages",
            Op::Inflate(_) => "Inflate",
            Op::Deflate(_) => "Deflate",
            Op::Monitoring(_) => "Monitoring",
            Op::A20(_) => "A20",
            Op::Share => "Share",
            Op::FailAfter(_) => "FailAfter",
            Op::Limit(_) => "Limit",
            Op::RegisterMmio(..) => "RegisterMmio",
            Op::DeregisterMmio(_) => "DeregisterMmio",
            Op::RegisterHandler(..) => "RegisterHandler",
            Op::DeregisterHandler(_) => "DeregisterHandler",
            Op::DisableHandlerPage(..) => "DisableHandlerPage",
            Op::ResetHandler(_) => "ResetHandler",
            Op::CreateMmio2(..) => "CreateMmio2",
            Op::MapMmio2(..) => "MapMmio2",
            Op::UnmapMmio2(_) => "UnmapMmio2",
            Op::ReduceMmio2(..) => "ReduceMmio2",
            Op::DeregisterMmio2(_) => "DeregisterMmio2",
            Op::Tracking(..) => "Tracking",
            Op::QueryDirty(..) => "QueryDirty",
            Op::DeviceWrite(..) => "DeviceWrite",
            Op::AliasMmio2(..) => "AliasMmio2",
            Op::AliasHost(..) => "AliasHost",
            Op::RegisterRom(..) => "RegisterRom",
            Op::ProtectRom(..) => "ProtectRom",
            Op::DeregisterRom => "DeregisterRom",
            Op::ResetModes(..) => "ResetModes",
            Op::External(..) => "External",
            Op::DeregisterDevice(_) => "DeregisterDevice",
            Op::Lock(..) => "Lock",
            Op::Release(_) => "Release",
            Op::UnregisterHighRam => "UnregisterHighRam",
            Op::RegisterHighRam => "RegisterHighRam",
            Op::Flush => "Flush",
            Op::UnregisterBlock => "UnregisterBlock",
            Op::RegisterBlock => "RegisterBlock",
            Op::ReleaseIdle => "ReleaseIdle",
        }
    }
}

/// Reproducible pseudo-random byte strings for the script (xorshift64): the fixed-seed tests
/// and the soak draw their sequences from it.
#[derive(Debug)]
pub struct ByteSource(u64);

impl ByteSource {
    /// A source starting from `state` (any value but zero).
    pub fn new(state: u64) -> Self {
        ByteSource(state)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// The next `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// The page of interesting address number `index` (modulo their count).
fn watched_page(index: usize) -> GuestPhysAddr {
    GuestPhysAddr::new_truncate(INTERESTING[index % INTERESTING.len()]).page_base()
}

/// True for operations that must leave every page reading as before (through the host path):
/// reads, guest reads and fetches, and every call that changes only mappings, protection,
/// bookkeeping or policy. A balloon deflate turns pages that read as zeros into ZERO pages.
fn preserves_contents(op: &Op) -> bool {
    match op {
        Op::Guest(_, access) => *access % 3 != 1,
        Op::HostRead(..)
        | Op::Preallocate
        | Op::LargePages(_)
        | Op::Deflate(_)
        | Op::Monitoring(_)
        | Op::A20(_)
        | Op::Share
        | Op::FailAfter(_)
        | Op::Limit(_)
        | Op::RegisterHandler(..)
        | Op::DeregisterHandler(_)
        | Op::DisableHandlerPage(..)
        | Op::CreateMmio2(..)
        | Op::Tracking(..)
        | Op::QueryDirty(..)
        | Op::ResetModes(..)
        | Op::External(_, false)
        | Op::Lock(..)
        | Op::Release(_)
        | Op::Flush
        | Op::ReleaseIdle => true,
        _ => false,
    }
}

/// After a host write of `data` at `start` succeeded: every byte that went to a page that
/// keeps what is written (RAM not in the balloon, MMIO2, an alias) reads back, and every byte
/// for a ballooned page was dropped (it reads as zero).
fn written_back(pgm: &SimPgm, start: GuestPhysAddr, data: &[u8]) -> Result<(), String> {
    for (i, &byte) in data.iter().enumerate() {
        let at = GuestPhysAddr::new_truncate(start.as_u64() + i as u64);
        let ballooned = pgm
            .page(at)
            .is_some_and(|page| page.state() == PageState::Ballooned);
        if ballooned && pgm.read_phys_u8_bypassing_handlers(at) != Ok(0) {
            return Err(format!("the host's write to ballooned {at} was not dropped"));
        }
        let keeps = !ballooned
            && pgm.page(at).is_some_and(|page| {
                matches!(
                    page.page_type(),
                    PageType::Ram | PageType::Mmio2 | PageType::Mmio2AliasMmio | PageType::SpecialAliasMmio
                )
            });
        if keeps && pgm.read_phys_u8_bypassing_handlers(at) != Ok(byte) {
            return Err(format!(
                "the host wrote {byte:#x} at {at}, it reads back {:?}",
                pgm.read_phys_u8_bypassing_handlers(at)
            ));
        }
    }
    Ok(())
}
