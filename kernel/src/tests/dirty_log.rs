//! Write monitoring's two ways of learning of guest writes, side by side in Bochs: the same
//! random writes, in rounds, harvested after each round, once with the pages write-protected
//! (a fault per page and round) and once with the CPU's page-modification log (an exit per 512
//! pages logged). Both must harvest exactly the pages each round wrote.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use pgm::manager::DirtyLogMode;
use pgm::{GuestPhysAddr, PAGE_SIZE};

use super::hostile::audit_memory;
use super::{gpa, new_vm, TestResult, CODE, PC_RAM};
use crate::arch::guests::{programs, GuestMode};
use crate::arch::registers::GuestRegisters;
use crate::vm::exits::{ExitCosts, ExitCounts, ExitKind};
use crate::vm::VmStop;
use crate::Host;

/// The area the guest writes: 2,048 pages (8 MiB) from 4 MiB.
const AREA: u64 = 0x40_0000;
const AREA_PAGES: u32 = 2048;
/// Writes per round: about half the area's pages each round, more than one log's worth.
const WRITES: u32 = 1500;
const ROUNDS: u32 = 8;
const FIRST_SEED: u32 = 0x2545_F491;

/// What one mode's run saw.
struct Rounds {
    harvests: Vec<Vec<u64>>,
    exits: ExitCounts,
    costs: ExitCosts,
}

/// The pages one round of `random_writes` writes from `seed`, and the seed it ends with.
fn pages_written(mut seed: u32) -> (BTreeSet<u64>, u32) {
    let mut pages = BTreeSet::new();
    for _ in 0..WRITES {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        pages.insert(AREA + u64::from(seed & (AREA_PAGES - 1)) * PAGE_SIZE);
    }
    (pages, seed)
}

fn run_rounds(host: &'static Host, mode: DirtyLogMode) -> Result<Rounds, String> {
    let mut vm = new_vm(host, &PC_RAM)?;
    if mode == DirtyLogMode::Pml && !vm.pml_supported() {
        return Err("the CPU has no PML (with EPT accessed and dirty flags)".into());
    }
    let memory = vm.memory();
    // Every page of the area has a frame before monitoring starts: each round's first write
    // to a page is a write-monitor fault or a logged address, never a zero-fill.
    for page in 0..u64::from(AREA_PAGES) {
        let invalidation = memory
            .lock()
            .write_phys(gpa(AREA + page * PAGE_SIZE), &[1])
            .map_err(|e| format!("{e}"))?;
        memory.flush(invalidation).map_err(|e| format!("{e}"))?;
    }
    let regs = |seed: u32| GuestRegisters {
        rsi: AREA,
        rcx: u64::from(WRITES),
        rdx: u64::from(AREA_PAGES - 1),
        rbx: u64::from(seed),
        rdi: 0xD1D0_0000,
        ..GuestRegisters::default()
    };
    vm.start(&programs::random_writes(), CODE, regs(FIRST_SEED))
        .map_err(|e| format!("start: {e}"))?;
    let invalidation = memory
        .start_dirty_log(mode)
        .map_err(|e| format!("monitoring: {e}"))?;
    memory.flush(invalidation).map_err(|e| format!("flush: {e}"))?;
    let mut seed = FIRST_SEED;
    let mut harvests = Vec::new();
    for round in 0..ROUNDS {
        if round > 0 {
            vm.enter_at(GuestMode::Flat32, CODE, 0, regs(seed))
                .map_err(|e| format!("re-entry: {e}"))?;
        }
        let (expected, next_seed) = pages_written(seed);
        let stop = vm.run();
        ensure!(
            stop == VmStop::Done(u64::from(next_seed)),
            "round {round} ended {stop:?}"
        );
        seed = next_seed;
        let mut harvest = Vec::new();
        let invalidation = memory.lock().harvest_written(&mut harvest);
        memory.flush(invalidation).map_err(|e| format!("flush: {e}"))?;
        let mut pages: Vec<u64> = harvest.iter().map(|gpa: &GuestPhysAddr| gpa.as_u64()).collect();
        pages.sort_unstable();
        let expected: Vec<u64> = expected.into_iter().collect();
        ensure!(
            pages == expected,
            "round {round} in {mode:?} mode harvested {} pages, wrote {}; first difference at {:#x?}",
            pages.len(),
            expected.len(),
            pages.iter().zip(&expected).find(|(a, b)| a != b)
        );
        harvests.push(pages);
    }
    let invalidation = memory.stop_dirty_log();
    memory.flush(invalidation).map_err(|e| format!("flush: {e}"))?;
    audit_memory(&memory, &format!("{ROUNDS} rounds in {mode:?} mode"))?;
    Ok(Rounds {
        harvests,
        exits: vm.exits,
        costs: vm.exit_costs,
    })
}

/// The acceptance test of PML mode: identical harvests, each exactly the pages written, and
/// far fewer exits.
pub(super) fn pml_harvests_equal_write_protect_harvests(host: &'static Host) -> TestResult {
    let protected = run_rounds(host, DirtyLogMode::WriteProtect)?;
    let logged = run_rounds(host, DirtyLogMode::Pml)?;
    ensure!(
        logged.harvests == protected.harvests,
        "the two modes harvested differently"
    );
    protected.costs.print("random writes, write-protect mode");
    logged.costs.print("random writes, PML mode");
    let pages: usize = protected.harvests.iter().map(Vec::len).sum();
    let faults = protected.costs.of(ExitKind::WriteMonitor).count
        + protected.costs.of(ExitKind::WriteMonitorLockFree).count;
    crate::println!(
        "  {ROUNDS} rounds, {pages} pages harvested: write-protect mode {} exits ({faults} \
         write-monitor faults), PML mode {} exits ({} PML full)",
        protected.exits.total,
        logged.exits.total,
        logged.exits.pml_full
    );
    ensure!(
        faults as usize >= pages,
        "write-protect mode faulted {faults} times for {pages} pages"
    );
    ensure!(logged.exits.pml_full > 0, "the log never filled");
    ensure!(
        logged.exits.total * 10 < protected.exits.total,
        "PML mode took {} exits, write-protect mode {}",
        logged.exits.total,
        protected.exits.total
    );
    Ok(())
}
