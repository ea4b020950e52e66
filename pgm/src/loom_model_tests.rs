//! `loom` models of the lock-free fault path, run with
//! `RUSTFLAGS="--cfg loom" cargo test -p pgm --features sim --release --lib loom`
//! (`make test` does). The manager, the VM's `BrLock` and the fault path are the production
//! code; under `--cfg loom` their atomics — descriptors, the range hint, the written logs and
//! the lock — are loom's, so every interleaving of them (up to the preemption bound) is
//! explored. Simulated host memory keeps machine atomics (see `sync`).

use std::vec::Vec;

use brlock::BrLock;
use loom::sync::Arc;
use loom::thread;

use crate::addr::{GuestPhysAddr, PAGE_SIZE};
use crate::manager::{FaultOutcome, Resolution};
use crate::paging::Access;
use crate::test_support::{assert_accounting, assert_isolated, gpa, pgm_with_frames, SimPgm, MIB};

pub(crate) fn page_at(page: u64) -> GuestPhysAddr {
    gpa(MIB + page * PAGE_SIZE)
}

/// Two pages of RAM, both written once, under write monitoring with its protection already
/// down at their leaves (so their faults can be lock-free), with logs for two vCPUs.
pub(crate) fn monitored_vm() -> Arc<BrLock<SimPgm>> {
    let mut pgm = pgm_with_frames(64);
    pgm.register_ram(page_at(0), 2 * PAGE_SIZE, "ram").unwrap();
    for page in 0..2 {
        pgm.write_phys(page_at(page), &[1]).unwrap();
    }
    pgm.start_write_monitoring();
    pgm.open_write_path(page_at(0));
    pgm.set_lock_free_vcpus(2);
    Arc::new(BrLock::new(pgm, 2))
}

/// A vCPU's write to `page` as the kernel takes it: lock-free, else under the lock. Returns
/// whether this vCPU claimed the page's write-monitor fault.
pub(crate) fn write_fault(vm: &BrLock<SimPgm>, vcpu: usize, page: u64) -> bool {
    let at = page_at(page);
    let lock_free = vm.read(vcpu).resolve_fault_lock_free(vcpu, at, Access::Write);
    let outcome = lock_free.unwrap_or_else(|| vm.write().resolve_fault(at, Access::Write));
    match outcome {
        FaultOutcome::Resolved { resolution, .. } => resolution == Resolution::WriteMonitor,
        other => panic!("a write-monitor fault ended {other:?}"),
    }
}

pub(crate) fn model(test: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(test);
}

/// Two vCPUs write the same page and each another: every write is claimed by exactly one
/// vCPU, every page is harvested once, the leaves end as the descriptors call for (the auditor)
/// and the counts match the frames.
#[test]
fn vcpus_claiming_the_same_page_claim_it_once() {
    model(|| {
        let vm = monitored_vm();
        let vcpus: Vec<_> = [(0, [0, 1]), (1, [1, 1])]
            .into_iter()
            .map(|(vcpu, pages)| {
                let vm = Arc::clone(&vm);
                thread::spawn(move || pages.iter().filter(|&&page| write_fault(&vm, vcpu, page)).count())
            })
            .collect();
        let claims: usize = vcpus.into_iter().map(|vcpu| vcpu.join().unwrap()).sum();
        assert_eq!(claims, 2, "each page's write claimed once");
        let mut pgm = vm.write();
        let mut written = Vec::new();
        let _ = pgm.harvest_written(&mut written);
        written.sort();
        assert_eq!(written, [page_at(0), page_at(1)]);
        assert_isolated(&pgm, "after the claims");
        assert_accounting(&pgm);
    });
}

/// A vCPU writes two pages while the host harvests: no write is lost — every page the vCPU
/// claimed is in a harvest that came after the claim — and none is reported twice in one
/// harvest.
#[test]
fn a_harvest_during_lock_free_faults_loses_no_write() {
    model(|| {
        let vm = monitored_vm();
        let vcpu = {
            let vm = Arc::clone(&vm);
            thread::spawn(move || (0..2).filter(|&page| write_fault(&vm, 0, page)).count())
        };
        let mut during = Vec::new();
        let _ = vm.write().harvest_written(&mut during);
        let claims = vcpu.join().unwrap();
        let mut after = Vec::new();
        let _ = vm.write().harvest_written(&mut after);
        assert_eq!(claims, 2, "both pages were write-monitored when written");
        let mut reported = during.clone();
        reported.extend(&after);
        reported.sort();
        assert_eq!(
            reported,
            [page_at(0), page_at(1)],
            "harvested {during:?}, then {after:?}"
        );
        let pgm = vm.read(0);
        assert_isolated(&pgm, "after the harvests");
        assert_accounting(&pgm);
    });
}
