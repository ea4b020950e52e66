//! How write monitoring learns of guest writes: by write-protecting pages (the default, see
//! `lazy_protection`), or from the CPU's page-modification log (PML, SDM 29.3.6): pages stay
//! writable, the CPU sets the dirty flag of a leaf at the first write through it and logs the
//! address in the vCPU's 512-entry buffer, and a full buffer exits to the host, which hands the
//! addresses to [`Pgm::log_written`]. Guest writes then cost no exit of their own, only one
//! per 512 newly dirtied pages.
//!
//! A harvest in PML mode lists what the logs reported (the host drains every vCPU's buffer
//! first), clears the listed pages' dirty flags so their next write is logged again, and asks
//! for the single-context INVEPT that makes the CPU forget the dirty flags it cached. PML works
//! on 4 KiB pages: a 2 MiB leaf would be logged once for all 512, so starting PML logging
//! splits every large block (write faults do not fill them while monitoring). Starting it costs
//! one pass over the leaves (their dirty flags cleared): the O(1) start is write-protect mode's.

use alloc::vec::Vec;

use super::Pgm;
use crate::addr::GuestPhysAddr;
use crate::error::DirtyLogError;
use crate::frames::{HostFrameAllocator, HostMemory};
use crate::paging::EntryFormat;
use crate::paging::Invalidation;

/// How write monitoring learns of guest writes (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyLogMode {
    /// Monitored pages are write-protected; the first write to each faults.
    #[default]
    WriteProtect,
    /// Pages stay writable; the CPU's page-modification log reports writes
    /// ([`Pgm::log_written`]). The EPT pointer must enable accessed and dirty flags and the
    /// vCPUs must log while monitoring is on.
    Pml,
}

/// # How write monitoring learns of writes (write protection or the CPU's write log)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Chooses how the next write monitoring learns of writes. Fails, changing nothing, with
    /// [`DirtyLogError::MonitoringActive`] while monitoring is on, and with
    /// [`DirtyLogError::NoCpuWriteLog`] for [`DirtyLogMode::Pml`] on a format without a CPU write
    /// log ([`EntryFormat::CPU_WRITE_LOG`]).
    pub fn set_dirty_log_mode(&mut self, mode: DirtyLogMode) -> Result<(), DirtyLogError> {
        if self.monitoring && mode != self.dirty_log_mode {
            return Err(DirtyLogError::MonitoringActive);
        }
        if mode == DirtyLogMode::Pml && !F::CPU_WRITE_LOG {
            return Err(DirtyLogError::NoCpuWriteLog);
        }
        self.dirty_log_mode = mode;
        Ok(())
    }

    /// How write monitoring learns of writes.
    pub fn dirty_log_mode(&self) -> DirtyLogMode {
        self.dirty_log_mode
    }

    /// True while monitoring takes its writes from the CPU's log: the vCPUs must log, and the
    /// EPT pointer must enable accessed and dirty flags.
    pub fn is_pml_logging(&self) -> bool {
        self.monitoring && self.dirty_log_mode == DirtyLogMode::Pml
    }

    /// Records the guest-physical addresses a vCPU's page-modification log holds (any order,
    /// any offset within the page, duplicates allowed): each page they fall in, through the A20
    /// gate, is marked written, once per round. Addresses outside guest RAM are ignored, as is
    /// everything while monitoring is off. Returns how many pages were newly marked. Costs
    /// O(addresses).
    pub fn log_written(&mut self, addresses: &[GuestPhysAddr]) -> usize {
        if !self.monitoring {
            return 0;
        }
        let before = self.written.len();
        for &gpa in addresses {
            if let Some(location) = self.ranges.find(self.a20_apply(gpa)) {
                self.mark_written(location);
            }
        }
        self.written.len() - before
    }

    /// Starts PML logging: large blocks are split, and every leaf's dirty flag cleared so that
    /// the first write through each is logged. Returns the invalidation that needs.
    pub(super) fn start_pml_logging(&mut self) -> Invalidation {
        self.split_all_large_blocks();
        self.tables.clear_dirty_everywhere(&mut self.memory);
        Invalidation::SingleContext
    }

    /// The PML part of a harvest: clears the written-to flags of the `listed` pages (except
    /// those a write lock keeps written, which it returns) and their leaves' dirty flags, at
    /// their own addresses and, with the A20 gate closed, at their aliases.
    pub(super) fn rearm_pml_pages(&mut self, listed: &[GuestPhysAddr]) -> Vec<GuestPhysAddr> {
        let mut still_written = Vec::new();
        for &gpa in listed {
            let Some(location) = self.ranges.find(gpa) else {
                continue;
            };
            let page = self.ranges.page(location);
            if page.write_locks() > 0 {
                still_written.push(gpa);
                continue;
            }
            self.ranges.set_page(location, page.with_written_to(false));
            self.tables.clear_dirty(&mut self.memory, gpa);
            if !self.a20_enabled {
                let alias = GuestPhysAddr::new_truncate(gpa.as_u64() | super::A20_BIT);
                self.tables.clear_dirty(&mut self.memory, alias);
            }
        }
        still_written
    }
}

/// PML is EPT's: these tests simulate Intel's log and run in the EPT suite only.
#[cfg(all(test, not(feature = "sim-npt")))]
mod tests {
    use std::vec::Vec;

    use super::*;
    use crate::addr::PAGE_SIZE;
    use crate::paging::Access;
    use crate::test_support::*;

    /// A vCPU's page-modification log, simulated: what the CPU does on a guest write.
    struct Cpu {
        log: Vec<GuestPhysAddr>,
        full_exits: u32,
        faults: u32,
    }

    impl Cpu {
        fn new() -> Cpu {
            Cpu {
                log: Vec::new(),
                full_exits: 0,
                faults: 0,
            }
        }

        /// A guest write at `at`: faults until the EPT allows it; then, in PML mode, sets the
        /// leaf's dirty flag and logs the address if the flag was clear, a full log exiting
        /// to the host first.
        fn write(&mut self, pgm: &mut SimPgm, at: GuestPhysAddr) {
            while pgm.translate(at, Access::Write).is_err() {
                self.faults += 1;
                assert!(self.faults < 1_000_000);
                pgm.resolve_fault(at, Access::Write);
            }
            if pgm.dirty_log_mode() != DirtyLogMode::Pml || pgm.tables.is_dirty(&pgm.memory, at) {
                return;
            }
            if self.log.len() == 512 {
                self.full_exits += 1;
                self.drain(pgm);
            }
            set_dirty(pgm, at);
            self.log.push(at.page_base());
        }

        fn drain(&mut self, pgm: &mut SimPgm) {
            pgm.log_written(&self.log);
            self.log.clear();
        }
    }

    /// Sets the dirty flag of the leaf mapping `at`, as the CPU does.
    fn set_dirty(pgm: &mut SimPgm, at: GuestPhysAddr) {
        let slot = pgm.tables.leaf_slot(&pgm.memory, at).unwrap();
        let raw = pgm.memory.read_u64(slot);
        pgm.memory.write_u64(slot, raw | (1 << 9));
    }

    /// `rounds` rounds of `writes` random writes over 1,024 pages of RAM at 1 MiB, each round
    /// harvested (the simulated logs drained first); returns the harvests, sorted, and the
    /// CPU's counts.
    fn run(mode: DirtyLogMode, rounds: u32, writes: u32) -> (Vec<Vec<GuestPhysAddr>>, Cpu) {
        let mut pgm = pgm_with_frames(2048);
        pgm.register_ram(gpa(MIB), 1024 * PAGE_SIZE, "ram").unwrap();
        pgm.set_dirty_log_mode(mode).unwrap();
        let mut cpu = Cpu::new();
        let mut seed = 0x2545_F491u32;
        let mut harvests = Vec::new();
        let _ = pgm.start_write_monitoring();
        for _ in 0..rounds {
            for _ in 0..writes {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let at = gpa(MIB + u64::from(seed % 1024) * PAGE_SIZE + 8);
                cpu.write(&mut pgm, at);
            }
            cpu.drain(&mut pgm);
            let mut harvest = Vec::new();
            let invalidation = pgm.harvest_written(&mut harvest);
            assert!(harvest.is_empty() || invalidation == Invalidation::SingleContext);
            harvest.sort();
            harvests.push(harvest);
            assert_isolated(&pgm, "after a harvest");
            assert_accounting(&pgm);
        }
        let _ = pgm.stop_write_monitoring();
        assert_isolated(&pgm, "after monitoring");
        (harvests, cpu)
    }

    #[test]
    fn pml_harvests_equal_write_protect_harvests() {
        let (protected, by_faults) = run(DirtyLogMode::WriteProtect, 6, 700);
        let (logged, by_log) = run(DirtyLogMode::Pml, 6, 700);
        assert_eq!(logged, protected);
        assert!(protected.iter().all(|round| round.len() > 400));
        // Write-protect mode faults once per page and round; PML only fills the first round's
        // frames and exits when a log of 512 fills.
        assert!(by_faults.faults > 6 * 400, "{} faults", by_faults.faults);
        assert!(by_log.faults < 1024, "{} faults", by_log.faults);
        assert!(by_log.full_exits >= 1);
    }

    #[test]
    fn a_harvest_rearms_the_dirty_flags_of_the_pages_it_lists() {
        let mut pgm = pgm_with_frames(256);
        pgm.register_ram(gpa(MIB), 16 * PAGE_SIZE, "ram").unwrap();
        pgm.set_dirty_log_mode(DirtyLogMode::Pml).unwrap();
        let _ = pgm.start_write_monitoring();
        assert!(pgm.is_pml_logging());
        let mut cpu = Cpu::new();
        cpu.write(&mut pgm, gpa(MIB + 0x3000));
        assert!(pgm.tables.is_dirty(&pgm.memory, gpa(MIB + 0x3000)));
        cpu.drain(&mut pgm);
        assert_eq!(pgm.log_written(&[gpa(MIB + 0x3010)]), 0, "listed once a round");
        let mut harvest = Vec::new();
        assert_eq!(pgm.harvest_written(&mut harvest), Invalidation::SingleContext);
        assert_eq!(harvest, [gpa(MIB + 0x3000)]);
        assert!(!pgm.tables.is_dirty(&pgm.memory, gpa(MIB + 0x3000)));
        assert_eq!(pgm.stats().write_monitored_pages, 0, "nothing is write-protected");
        assert_eq!(
            pgm.set_dirty_log_mode(DirtyLogMode::WriteProtect),
            Err(DirtyLogError::MonitoringActive)
        );
        let _ = pgm.stop_write_monitoring();
        assert_eq!(pgm.log_written(&[gpa(MIB)]), 0, "monitoring is off");
        pgm.set_dirty_log_mode(DirtyLogMode::WriteProtect).unwrap();
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;
    use crate::sim::{SimFrames, SimMemory};
    use crate::{Ept, Npt};

    #[test]
    fn pml_is_refused_where_the_format_has_no_cpu_write_log() {
        let mut npt = Pgm::<_, _, Npt>::new(SimFrames::new(64), SimMemory::default()).unwrap();
        assert_eq!(
            npt.set_dirty_log_mode(DirtyLogMode::Pml),
            Err(DirtyLogError::NoCpuWriteLog)
        );
        assert_eq!(npt.dirty_log_mode(), DirtyLogMode::WriteProtect, "unchanged");
        let mut ept = Pgm::<_, _, Ept>::new(SimFrames::new(64), SimMemory::default()).unwrap();
        assert_eq!(ept.set_dirty_log_mode(DirtyLogMode::Pml), Ok(()));
    }
}
