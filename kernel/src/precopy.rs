//! A live migration's pre-copy of a running VM's RAM: the proof of dirty logging on a real OS.
//!
//! Between two slices of the bootstrap vCPU (the other vCPUs go on running on their CPUs) the
//! host starts write monitoring in one mode and copies every page of guest RAM that is not a
//! ZERO page into frames of its own (the *mirror*). Then, slice after slice, it harvests the
//! pages written since the last round, carries out the flush the harvest asks for (after which
//! any further write is reported next time) and copies those pages again. When a round's
//! dirty set is small, or after a bounded number of rounds, it parks every vCPU, harvests and
//! copies the last dirty set and compares the mirror with guest RAM page by page: a page that
//! differs is a write dirty logging lost. Monitoring then stops, the mirror's frames go back,
//! and the guest runs on.
//!
//! A pre-copy that ends in a migration ([`Ending::Migrate`]) asks instead for the VM to be
//! paused ([`Next::Pause`]: every vCPU stops for good and its state is saved), takes the last
//! round and the comparison on the stopped VM ([`PreCopy::finish_paused`]), and keeps the
//! mirror, which becomes the RAM of the VM that goes on ([`PreCopy::load_into`]).
//!
//! Locking: the VM's lock per page copied (the vCPUs' faults interleave with the copy), never
//! across a flush or the rendezvous.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use pgm::frames::{HostFrameAllocator, HostMemory};
use pgm::guest_paging::{differs_only_in_walker_flags, entries_64};
use pgm::manager::DirtyLogMode;
use pgm::page::PageState;
use pgm::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};

use crate::arch::memory::{KernelFrames, PhysMap};
use crate::arch::ticks;
use crate::machine::Next;
use crate::println;
use crate::vm::{Vcpu, VmMemory};

/// A round whose dirty set is at most this many pages is the last before the parked one
/// (once [`MIN_ROUNDS`] are done).
const CONVERGED_PAGES: usize = 64;
/// Rounds after the full copy, at least: a guest that dirties little still has its harvests
/// and flushes checked several times under running vCPUs.
const MIN_ROUNDS: u32 = 8;
/// Rounds after the full copy, at most, before the parked one.
const MAX_ROUNDS: u32 = 40;

/// One round: pages copied and the ticks the harvest, flush and copy took.
#[derive(Clone, Copy, Debug)]
struct Round {
    pages: usize,
    ticks: u64,
}

/// Where a pre-copy is.
#[derive(Debug)]
enum Phase {
    /// Waiting for the host tick count to reach `start`.
    Waiting { start: u64 },
    /// Monitoring is on; the full copy and this many rounds are done.
    Copying { rounds: u32 },
    /// The pre-copy asked for the VM to be paused for its last round.
    Pausing { converged: bool },
    /// Compared and finished.
    Done,
}

/// How a pre-copy's last round is taken, and what happens after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// With the vCPUs parked for a moment; the guest then runs on and the copy is dropped.
    #[cfg_attr(feature = "kernel-tests", allow(dead_code))]
    Rendezvous,
    /// On the paused VM, whose vCPUs never run again: the copy is a migration's RAM.
    Migrate,
}

/// A pre-copy of one VM's RAM in one dirty-logging mode (see the module docs).
pub struct PreCopy {
    mode: DirtyLogMode,
    ending: Ending,
    /// The RAM ranges as `(start, pages, index of their first page in the mirror)`.
    ranges: Vec<(u64, u64, usize)>,
    /// A frame per RAM page, `None` for a page never copied (zeros).
    mirror: Vec<Option<HostPhysAddr>>,
    phys: &'static PhysMap,
    phase: Phase,
    rounds: Vec<Round>,
    /// Pages that differed at the comparison (`None` until then).
    differing: Option<u64>,
    /// Pages that differed only in the accessed and dirty flags of paging entries, which
    /// Bochs's page walker sets without an EPT write (see [`differs_only_in_walker_flags`]).
    walker_updates: u64,
    page: Vec<u8>,
}

impl PreCopy {
    /// A pre-copy of the RAM `ram` (`(start, size)` ranges, page-aligned) in `mode`, starting
    /// at its first step once the host's tick count reaches `start` and ending as `ending`
    /// says, with mirror frames reached through `phys`.
    pub fn new(
        mode: DirtyLogMode,
        ending: Ending,
        ram: &[(u64, u64)],
        start: u64,
        phys: &'static PhysMap,
    ) -> Self {
        let mut ranges = Vec::new();
        let mut pages = 0usize;
        for &(start, size) in ram {
            ranges.push((start, size / PAGE_SIZE, pages));
            pages += (size / PAGE_SIZE) as usize;
        }
        PreCopy {
            mode,
            ending,
            ranges,
            // Made when the pre-copy starts: at 16 bytes a RAM page, it need not wait on the
            // heap meanwhile.
            mirror: Vec::new(),
            phys,
            phase: Phase::Waiting { start },
            rounds: Vec::new(),
            differing: None,
            walker_updates: 0,
            page: vec![0; PAGE_SIZE as usize],
        }
    }

    /// The mode's name in reports.
    fn mode_name(&self) -> &'static str {
        match self.mode {
            DirtyLogMode::WriteProtect => "write-protect",
            DirtyLogMode::Pml => "PML",
        }
    }

    /// True once the comparison is done.
    #[cfg_attr(feature = "kernel-tests", allow(dead_code))]
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// Pages that differed at the comparison, once it is done.
    pub fn differing_pages(&self) -> Option<u64> {
        self.differing
    }

    /// True once the pre-copy has asked for the VM to be paused, until
    /// [`finish_paused`](Self::finish_paused).
    #[cfg_attr(feature = "kernel-tests", allow(dead_code))]
    pub fn is_pausing(&self) -> bool {
        matches!(self.phase, Phase::Pausing { .. })
    }

    /// Takes the pre-copy's next step between two slices of `bsp` (not in a run): the start
    /// and full copy, a round, or the parked last round and the comparison; or, ending in a
    /// migration, asks for the pause ([`Next::Pause`]). An error is a failure of the VM's
    /// memory or of a flush; a differing page is not an error (see
    /// [`differing_pages`](Self::differing_pages)).
    pub fn step(&mut self, bsp: &Vcpu<'_>) -> Result<Next, String> {
        let memory = bsp.memory();
        match self.phase {
            Phase::Waiting { start } if ticks() < start => Ok(Next::Run),
            Phase::Waiting { .. } => {
                if self.mode == DirtyLogMode::Pml && !bsp.pml_supported() {
                    println!("precopy: PML: the CPU has no page-modification log; not run");
                    self.phase = Phase::Done;
                    return Ok(Next::Run);
                }
                self.start(&memory)?;
                Ok(Next::Run)
            }
            Phase::Copying { rounds } => {
                let last = self.rounds.last().map_or(usize::MAX, |round| round.pages);
                let converged = last <= CONVERGED_PAGES && rounds >= MIN_ROUNDS;
                if converged || rounds >= MAX_ROUNDS {
                    return match self.ending {
                        Ending::Rendezvous => self.finish(&memory, converged).map(|()| Next::Run),
                        Ending::Migrate => {
                            self.phase = Phase::Pausing { converged };
                            Ok(Next::Pause)
                        }
                    };
                }
                let round = self.round(&memory)?;
                self.report(rounds + 1, round);
                self.phase = Phase::Copying { rounds: rounds + 1 };
                Ok(Next::Run)
            }
            Phase::Pausing { .. } | Phase::Done => Ok(Next::Run),
        }
    }

    /// Starts monitoring and takes the full copy (round 0).
    fn start(&mut self, memory: &VmMemory) -> Result<(), String> {
        let began = ticks();
        let invalidation = memory
            .start_dirty_log(self.mode)
            .map_err(|e| format!("precopy: start {} monitoring: {e}", self.mode_name()))?;
        memory
            .flush(invalidation)
            .map_err(|e| format!("precopy: flush: {e:?}"))?;
        self.mirror = vec![None; self.ram_pages()];
        let mut copied = 0;
        for index in 0..self.mirror.len() {
            let gpa = self.gpa_of(index);
            let zero = memory
                .lock()
                .page(gpa)
                .is_none_or(|page| page.state() == PageState::Zero);
            if !zero {
                self.copy(memory, gpa)?;
                copied += 1;
            }
        }
        let round = Round {
            pages: copied,
            ticks: ticks() - began,
        };
        self.report(0, round);
        self.phase = Phase::Copying { rounds: 0 };
        Ok(())
    }

    /// One round under running vCPUs: harvest, flush, copy what was written.
    fn round(&mut self, memory: &VmMemory) -> Result<Round, String> {
        let began = ticks();
        let written = harvest(memory)?;
        for &gpa in &written {
            self.copy(memory, gpa)?;
        }
        Ok(Round {
            pages: written.len(),
            ticks: ticks() - began,
        })
    }

    /// The last round with every vCPU parked, the comparison, and the end of monitoring; the
    /// mirror goes back.
    fn finish(&mut self, memory: &VmMemory, converged: bool) -> Result<(), String> {
        let (outcome, rendezvous) = memory.with_vcpus_parked(|| self.last_round(memory));
        let (round, differing) = outcome?;
        let stopped = format!("{} vCPUs parked for the last round", rendezvous.parked);
        self.conclude(memory, converged, round, differing, &stopped)?;
        self.free_mirror();
        Ok(())
    }

    /// After [`Next::Pause`]: the last round and the comparison on the VM of `memory`, whose
    /// `vcpus` vCPUs have all stopped for good, and the end of monitoring. The mirror stays
    /// for [`load_into`](Self::load_into).
    pub fn finish_paused(&mut self, memory: &VmMemory, vcpus: u32) -> Result<(), String> {
        let Phase::Pausing { converged } = self.phase else {
            return Err("precopy: finish_paused without a pause asked for".into());
        };
        if memory.vcpus_running() != 0 {
            return Err("precopy: a vCPU still runs in the paused VM".into());
        }
        let (round, differing) = self.last_round(memory)?;
        let stopped = format!("{vcpus} vCPUs stopped for the last round");
        self.conclude(memory, converged, round, differing, &stopped)
    }

    /// The last round and the comparison, with no vCPU running.
    fn last_round(&mut self, memory: &VmMemory) -> Result<(Round, u64), String> {
        let round = self.round(memory)?;
        Ok((round, self.compare(memory)?))
    }

    /// Reports the last round and the pre-copy's outcome (`stopped`: how the vCPUs were
    /// held for it) and stops monitoring.
    fn conclude(
        &mut self,
        memory: &VmMemory,
        converged: bool,
        round: Round,
        differing: u64,
        stopped: &str,
    ) -> Result<(), String> {
        self.report(self.rounds.len() as u32, round);
        let invalidation = memory.stop_dirty_log();
        memory
            .flush(invalidation)
            .map_err(|e| format!("precopy: flush: {e:?}"))?;
        if self.walker_updates > 0 {
            println!(
                "precopy: {}: {} pages differ only in the accessed and dirty flags of paging \
                 entries, which Bochs's page walker sets without an EPT write",
                self.mode_name(),
                self.walker_updates
            );
        }
        let copied: usize = self.rounds.iter().map(|round| round.pages).sum();
        let copy_ticks: u64 = self.rounds.iter().map(|round| round.ticks).sum();
        println!(
            "precopy: {}: {} after {} rounds; {copied} pages copied in {copy_ticks} ticks; \
             {stopped}; {differing} pages differ",
            self.mode_name(),
            if converged {
                "converged"
            } else {
                "round limit reached"
            },
            self.rounds.len(),
        );
        self.differing = Some(differing);
        self.phase = Phase::Done;
        Ok(())
    }

    /// Writes the mirror into the RAM of `memory` (a new VM with the same RAM ranges, not yet
    /// run: a migration's destination) and gives the mirror's frames back. Pages never copied
    /// stay as the new VM has them (zero). Returns how many pages were written.
    pub fn load_into(&mut self, memory: &VmMemory) -> Result<usize, String> {
        let mut loaded = 0;
        for index in 0..self.mirror.len() {
            let Some(frame) = self.mirror[index] else {
                continue;
            };
            HostMemory::read(&self.phys, frame, &mut self.page);
            let gpa = self.gpa_of(index);
            // The VM has not run: nothing caches a translation to invalidate.
            let _ = memory
                .lock()
                .write_phys(gpa, &self.page)
                .map_err(|e| format!("migration: write {gpa}: {e}"))?;
            loaded += 1;
        }
        self.free_mirror();
        Ok(loaded)
    }

    /// Gives the mirror's frames back, and the heap its table took.
    fn free_mirror(&mut self) {
        let frames: Vec<HostPhysAddr> = self.mirror.iter().filter_map(|&frame| frame).collect();
        KernelFrames.free_frames(&frames);
        self.mirror = Vec::new();
    }

    /// The pages of the RAM ranges, in all.
    fn ram_pages(&self) -> usize {
        self.ranges
            .last()
            .map_or(0, |&(_, pages, first)| first + pages as usize)
    }

    /// Prints round `number` and keeps it.
    fn report(&mut self, number: u32, round: Round) {
        println!(
            "precopy: {} round {number}: {} pages copied in {} ticks",
            self.mode_name(),
            round.pages,
            round.ticks
        );
        self.rounds.push(round);
    }

    /// The mirror index of RAM page `gpa`, if it is RAM.
    fn index_of(&self, gpa: GuestPhysAddr) -> Option<usize> {
        let at = gpa.as_u64();
        self.ranges.iter().find_map(|&(start, pages, first)| {
            (start..start + pages * PAGE_SIZE)
                .contains(&at)
                .then(|| first + ((at - start) / PAGE_SIZE) as usize)
        })
    }

    /// The guest-physical address of mirror page `index`.
    fn gpa_of(&self, index: usize) -> GuestPhysAddr {
        let &(start, _, first) = self
            .ranges
            .iter()
            .rev()
            .find(|&&(_, _, first)| first <= index)
            .expect("index 0 is in the first range");
        GuestPhysAddr::new_truncate(start + (index - first) as u64 * PAGE_SIZE)
    }

    /// Copies RAM page `gpa` into its mirror frame (taken at its first copy); pages outside
    /// RAM (an MMIO2 page the harvest reported) are left out.
    fn copy(&mut self, memory: &VmMemory, gpa: GuestPhysAddr) -> Result<(), String> {
        let Some(index) = self.index_of(gpa) else {
            return Ok(());
        };
        memory
            .lock()
            .read_phys(gpa, &mut self.page)
            .map_err(|e| format!("precopy: read {gpa}: {e}"))?;
        let frame = match self.mirror[index] {
            Some(frame) => frame,
            None => {
                let frame = KernelFrames
                    .allocate_frame()
                    .ok_or("precopy: out of host frames for the mirror")?;
                self.mirror[index] = Some(frame);
                frame
            }
        };
        let mut window = self.phys;
        HostMemory::write(&mut window, frame, &self.page);
        Ok(())
    }

    /// Compares every RAM page with its mirror (zeros where none); returns how many differ and
    /// prints the first few.
    fn compare(&mut self, memory: &VmMemory) -> Result<u64, String> {
        let mut mirrored = vec![0u8; PAGE_SIZE as usize];
        let mut differing = 0u64;
        for index in 0..self.mirror.len() {
            let gpa = self.gpa_of(index);
            let pgm = memory.lock();
            let zero = pgm.page(gpa).is_none_or(|page| page.state() == PageState::Zero);
            if zero && self.mirror[index].is_none() {
                // Zeros on both sides.
                continue;
            }
            pgm.read_phys(gpa, &mut self.page)
                .map_err(|e| format!("precopy: read {gpa}: {e}"))?;
            drop(pgm);
            match self.mirror[index] {
                Some(frame) => HostMemory::read(&self.phys, frame, &mut mirrored),
                None => mirrored.fill(0),
            }
            if self.page != mirrored {
                if differs_only_in_walker_flags(&self.page, &mirrored) {
                    self.walker_updates += 1;
                    continue;
                }
                if differing < 8 {
                    self.print_difference(gpa, &mirrored);
                }
                differing += 1;
            }
        }
        Ok(differing)
    }
}

impl Drop for PreCopy {
    /// A pre-copy ended early (the guest stopped, or an error) still gives its frames back.
    fn drop(&mut self) {
        self.free_mirror();
    }
}

impl PreCopy {
    /// Prints how the guest's page at `gpa` (in `self.page`) differs from its copy: how many
    /// 8-byte words, and the first few with both values.
    fn print_difference(&self, gpa: GuestPhysAddr, copy: &[u8]) {
        let differing: Vec<(usize, u64, u64)> = entries_64(&self.page)
            .zip(entries_64(copy))
            .enumerate()
            .filter(|(_, (guest, copied))| guest != copied)
            .map(|(index, (guest, copied))| (index * 8, guest, copied))
            .collect();
        let first: Vec<String> = differing
            .iter()
            .take(4)
            .map(|(offset, guest, copied)| format!("+{offset:#x}: {guest:#x} (copy {copied:#x})"))
            .collect();
        println!(
            "precopy: {}: page {gpa} differs from its copy in {} words: {}",
            self.mode_name(),
            differing.len(),
            first.join(", ")
        );
    }
}

/// Harvests the pages written since the last harvest and carries out the flush it asks for:
/// a write after it faults (or is logged) and is reported next time.
fn harvest(memory: &VmMemory) -> Result<Vec<GuestPhysAddr>, String> {
    let mut written = Vec::new();
    let invalidation = memory.lock().harvest_written(&mut written);
    memory
        .flush(invalidation)
        .map_err(|e| format!("precopy: flush: {e:?}"))?;
    Ok(written)
}
