//! Manager tests on the simulated host. Guest accesses go through the software EPT walker as the
//! CPU's would: a violation is handed to `resolve_fault` and the access retried.

use alloc::vec;
use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::error::{
    AccessError, HandlerError, LockError, Mmio2Error, NoMemory, PageError, RamError, RangeError, RomError,
};
use crate::frames::HostMemory;
use crate::manager::{FaultOutcome, Resolution};
use crate::page::PageState;
use crate::paging::{Access, Entry, Invalidation, MemoryType, Permissions};
use crate::test_support::*;

fn private(pgm: &SimPgm) -> u64 {
    pgm.stats().private_frames()
}

#[test]
fn dropping_the_manager_gives_every_frame_back() {
    use crate::manager::{Pgm, RomImage};
    use crate::sim::{SimFrames, SimMemory};
    let mut frames = SimFrames::new(8192);
    {
        // The manager borrows the allocator, so the test can look at it once the manager is gone.
        let mut pgm = Pgm::<_, _, SimFormat>::new(&mut frames, SimMemory::default()).unwrap();
        pgm.set_large_pages(true);
        pgm.register_ram(gpa(0), 16 * MIB, "ram").unwrap();
        for page in 0..40 {
            pgm.write_phys(gpa(MIB + page * PAGE_SIZE), b"data").unwrap();
        }
        // A whole 2 MiB block through a fault, a shadowed ROM over RAM, a mapped MMIO2 region,
        // a ballooned page (retired, awaiting a flush) and the pool's handy frames.
        assert!(matches!(
            pgm.resolve_fault(gpa(8 * MIB), Access::Write),
            FaultOutcome::Resolved { .. }
        ));
        pgm.register_rom(gpa(0xE_0000), 0x2_0000, RomImage::Copy(&[0x90; 4096]), true)
            .unwrap();
        let fb = pgm.create_mmio2(mmio2_spec(64 * PAGE_SIZE, 0)).unwrap();
        pgm.map_mmio2(fb, gpa(0xE000_0000)).unwrap();
        pgm.balloon_inflate(&[gpa(MIB)]).unwrap();
        assert!(pgm.frames_awaiting_flush() > 0);
    }
    assert_eq!(frames.inner.counts().used(), 0, "frames the dropped manager kept");
}

#[test]
fn registration_rejects_bad_ranges_and_changes_nothing() {
    let mut pgm = pc_like();
    let before = (pgm.stats(), frames_used(&pgm), pgm.ranges().len());
    let cases = [
        (
            gpa(0x10_0000 * 32),
            0,
            RamError::Range(RangeError::ZeroSize(gpa(0x10_0000 * 32))),
        ),
        (
            gpa(0x2000_0800),
            PAGE_SIZE,
            RamError::Range(RangeError::Misaligned(0x2000_0800)),
        ),
        (
            gpa(0x2000_0000),
            100,
            RamError::Range(RangeError::Misaligned(100)),
        ),
        (
            gpa((1 << 48) - PAGE_SIZE),
            2 * PAGE_SIZE,
            RamError::Range(RangeError::BeyondAddressWidth((1 << 48) - PAGE_SIZE)),
        ),
        (
            gpa(0x9_F000),
            2 * PAGE_SIZE,
            RamError::Range(RangeError::Overlap { existing: gpa(0) }),
        ),
        (
            gpa(0x80_0000),
            MIB,
            RamError::Range(RangeError::Overlap { existing: gpa(MIB) }),
        ),
    ];
    for (base, size, expected) in cases {
        assert_eq!(
            pgm.register_ram(base, size, "bad"),
            Err(expected),
            "{base} + {size:#x}"
        );
        assert_eq!((pgm.stats(), frames_used(&pgm), pgm.ranges().len()), before);
    }
}

#[test]
fn registered_ram_reads_as_zeros_from_the_zero_frame_without_allocating() {
    let pgm = pc_like();
    let used = frames_used(&pgm);
    for at in [0, 0x9_F000, MIB, 15 * MIB + 0xFF8] {
        assert_eq!(
            pgm.translate(gpa(at), Access::Read).unwrap().page_base(),
            pgm.zero_frame()
        );
        assert_eq!(guest_read(&pgm, gpa(at), 8), [0; 8]);
        assert_eq!(pgm.page(gpa(at)).unwrap().state(), PageState::Zero);
    }
    assert_eq!(frames_used(&pgm), used);
    let stats = pgm.stats();
    assert_eq!(
        (stats.ram_pages, stats.zero_pages, stats.allocated_pages),
        (160 + 3840, 4000, 0)
    );
}

#[test]
fn zero_page_is_mapped_read_execute_and_the_first_write_faults_with_that_permission() {
    let pgm = pc_like();
    let violation = pgm.translate(gpa(0x5000), Access::Write).unwrap_err();
    assert_eq!(violation.permitted, Permissions::READ | Permissions::EXECUTE);
    assert!(pgm.translate(gpa(0x5000), Access::Execute).is_ok());
    match pgm.nested_entry(gpa(0x5000)) {
        Entry::Leaf(leaf) => assert_eq!(leaf.memory_type, MemoryType::WriteBack),
        other => panic!("no leaf: {other:?}"),
    }
}

#[test]
fn first_write_allocates_one_frame_and_later_writes_do_not_fault() {
    let mut pgm = pc_like();
    assert_eq!(
        guest_write(&mut pgm, gpa(0x2_0010), b"hello"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(private(&pgm), 1);
    assert_eq!(pgm.stats().private_allocations, 1);
    assert_accounting(&pgm);
    let page = pgm.page(gpa(0x2_0000)).unwrap();
    assert_eq!(page.state(), PageState::Allocated);
    assert_ne!(page.frame(), Some(pgm.zero_frame()));
    assert_eq!(
        guest_write(&mut pgm, gpa(0x2_0100), b"again"),
        GuestAccess::Done { faults: 0 }
    );
    assert_eq!(private(&pgm), 1);
    assert_eq!(guest_read(&pgm, gpa(0x2_0010), 5), b"hello");
    // The rest of the fresh frame is zero, and the zero frame itself is untouched.
    assert_eq!(guest_read(&pgm, gpa(0x2_0000), 16), [0; 16]);
    assert_eq!(guest_read(&pgm, gpa(0x3_0000), 16), [0; 16]);
}

#[test]
fn writing_n_distinct_pages_allocates_exactly_n_frames() {
    let mut pgm = pc_like();
    let pages: Vec<u64> = (0..37).map(|i| MIB + i * 3 * PAGE_SIZE + 8).collect();
    for (i, &at) in pages.iter().enumerate() {
        let value = (i as u64).to_le_bytes();
        assert_eq!(
            guest_write(&mut pgm, gpa(at), &value),
            GuestAccess::Done { faults: 1 }
        );
    }
    assert_eq!(pgm.stats().private_allocations, 37);
    assert_eq!(pgm.stats().allocated_pages, 37);
    assert_accounting(&pgm);
    for (i, &at) in pages.iter().enumerate() {
        let mut back = [0; 8];
        pgm.read_phys(gpa(at), &mut back).unwrap();
        assert_eq!(u64::from_le_bytes(back), i as u64);
    }
}

#[test]
fn access_outside_ram_is_not_guest_memory_and_changes_nothing() {
    let mut pgm = pc_like();
    let used = frames_used(&pgm);
    for at in [0xA_0000, 0xF_FFFF, 16 * MIB, 0x8000_0000, (1 << 48) - 1] {
        let violation = pgm.translate(gpa(at), Access::Read).unwrap_err();
        assert_eq!(violation.permitted, Permissions::empty());
        assert_eq!(
            pgm.resolve_fault(gpa(at), Access::Read),
            FaultOutcome::NotGuestMemory
        );
        assert_eq!(
            pgm.resolve_fault(gpa(at), Access::Write),
            FaultOutcome::NotGuestMemory
        );
    }
    assert_eq!(frames_used(&pgm), used);
}

#[test]
fn out_of_frames_on_a_write_fault_is_reported_and_leaves_the_page_zero() {
    let mut pgm = pc_like();
    // The handy pool is empty until the first fault, so the refill meets the failure.
    pgm.frames_mut().fail_after = Some(0);
    let used = frames_used(&pgm);
    assert_eq!(
        guest_write(&mut pgm, gpa(0x4000), b"x"),
        GuestAccess::Stopped(FaultOutcome::OutOfMemory)
    );
    assert_eq!(pgm.page(gpa(0x4000)).unwrap().state(), PageState::Zero);
    assert!(
        pgm.translate(gpa(0x4000), Access::Write).is_err(),
        "still write-protected"
    );
    assert_eq!(frames_used(&pgm), used);
    pgm.frames_mut().fail_after = None;
    assert_eq!(
        guest_write(&mut pgm, gpa(0x4000), b"x"),
        GuestAccess::Done { faults: 1 }
    );
}

#[test]
fn registration_that_runs_out_of_table_frames_frees_what_it_took() {
    let mut pgm = pgm_with_frames(4096);
    let used = frames_used(&pgm);
    // 64 MiB above 4 GiB needs a PDPT, a PD and 32 page tables; allow only 10.
    pgm.frames_mut().fail_after = Some(10);
    let result = pgm.register_ram(gpa(0x1_0000_0000), 64 * MIB, "big");
    assert_eq!(result, Err(RamError::NoMemory(NoMemory::OutOfFrames)));
    assert_eq!(frames_used(&pgm), used);
    assert_eq!(pgm.ranges().len(), 0);
    assert_eq!(pgm.stats().table_frames, 1);
    assert!(pgm.translate(gpa(0x1_0000_0000), Access::Read).is_err());
    pgm.frames_mut().fail_after = None;
    pgm.register_ram(gpa(0x1_0000_0000), 64 * MIB, "big").unwrap();
    assert_eq!(pgm.stats().table_frames, 1 + 1 + 1 + 32);
    assert_eq!(
        guest_write(&mut pgm, gpa(0x1_03FF_F000), b"top"),
        GuestAccess::Done { faults: 1 }
    );
}

#[test]
fn host_writes_cross_pages_and_ranges_and_the_guest_sees_them() {
    let mut pgm = pgm_with_frames(4096);
    pgm.register_ram(gpa(0), 2 * PAGE_SIZE, "a").unwrap();
    pgm.register_ram(gpa(2 * PAGE_SIZE), 2 * PAGE_SIZE, "b").unwrap();
    let data: Vec<u8> = (0..3 * PAGE_SIZE as usize).map(|i| (i % 251) as u8).collect();
    let invalidation = pgm.write_phys(gpa(0x800), &data).unwrap();
    assert_eq!(
        invalidation,
        Invalidation::SingleContext,
        "pages the guest may cache changed"
    );
    assert_eq!(pgm.stats().allocated_pages, 4);
    assert_accounting(&pgm);
    let mut back = vec![0; data.len()];
    pgm.read_phys(gpa(0x800), &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(guest_read(&pgm, gpa(0x2800), 4), data[0x2000..0x2004]);
    assert_eq!(pgm.write_phys(gpa(0x800), b"again"), Ok(Invalidation::None));
}

#[test]
fn host_access_outside_ram_fails_before_touching_anything() {
    let mut pgm = pgm_with_frames(4096);
    pgm.register_ram(gpa(0), 2 * PAGE_SIZE, "a").unwrap();
    let used = frames_used(&pgm);
    assert_eq!(
        pgm.write_phys(gpa(0x1000), &[1; 0x1800]),
        Err(AccessError::Page(PageError::NotGuestMemory(gpa(0x2000))))
    );
    assert_eq!(frames_used(&pgm), used);
    assert_eq!(pgm.page(gpa(0x1000)).unwrap().state(), PageState::Zero);
    let mut buf = [0; 16];
    assert_eq!(
        pgm.read_phys(gpa(0x1FF8), &mut buf),
        Err(AccessError::Page(PageError::NotGuestMemory(gpa(0x2000))))
    );
}

#[test]
fn host_write_that_runs_out_of_frames_rolls_back() {
    let mut pgm = pgm_with_frames(4096);
    pgm.register_ram(gpa(0), 4 * PAGE_SIZE, "a").unwrap();
    pgm.write_phys(gpa(0x1000), b"keep").unwrap();
    // Room for one more frame: of the two ZERO pages written, the second finds none.
    pgm.set_frame_limit(Some(2));
    assert_eq!(
        pgm.write_phys(gpa(0), &[7; 3 * PAGE_SIZE as usize]),
        Err(AccessError::NoMemory(NoMemory::FrameLimit))
    );
    assert_accounting(&pgm);
    assert_eq!(pgm.stats().allocated_pages, 1);
    let mut buf = [0; 4];
    pgm.read_phys(gpa(0x1000), &mut buf).unwrap();
    assert_eq!(&buf, b"keep", "the already allocated page kept its data");
    pgm.read_phys(gpa(0), &mut buf).unwrap();
    assert_eq!(buf, [0; 4]);
}

#[test]
fn reset_returns_every_page_to_zero_and_frees_its_frame() {
    let mut pgm = pc_like();
    for at in [0x1000, MIB, 8 * MIB] {
        guest_write(&mut pgm, gpa(at), b"data");
    }
    assert_eq!(private(&pgm), 3);
    assert_eq!(pgm.reset_ram(), Invalidation::SingleContext);
    assert_eq!(private(&pgm), 0);
    assert_eq!(pgm.stats().zero_pages, pgm.stats().ram_pages);
    assert_accounting(&pgm);
    assert_eq!(guest_read(&pgm, gpa(MIB), 4), [0; 4]);
    assert_eq!(pgm.reset_ram(), Invalidation::None, "nothing left to reset");
}

#[test]
fn terminate_gives_back_every_frame() {
    let mut pgm = pc_like();
    guest_write(&mut pgm, gpa(0x3000), b"x");
    guest_write(&mut pgm, gpa(9 * MIB), b"y");
    let frames = pgm.terminate();
    assert_eq!(frames.inner.counts().used(), 0);
}

#[test]
fn a_read_fault_on_ram_rewrites_a_lost_entry() {
    let mut pgm = pc_like();
    guest_write(&mut pgm, gpa(0x7000), b"kept");
    // Simulate a lost entry by clearing it behind the manager's back.
    let root = pgm.nested_root().as_u64();
    let entry = pte_address(&pgm, HostPhysAddr::new(root).unwrap(), gpa(0x7000));
    write_host(&mut pgm, entry, &0u64.to_le_bytes());
    assert!(pgm.translate(gpa(0x7000), Access::Read).is_err());
    assert_eq!(
        pgm.resolve_fault(gpa(0x7000), Access::Read),
        FaultOutcome::Resolved {
            invalidation: Invalidation::None,
            resolution: Resolution::Remap,
        }
    );
    assert_eq!(guest_read(&pgm, gpa(0x7000), 4), b"kept");
}

/// Host-physical address of the 4 KiB entry for `at`, found by walking the raw tables.
fn pte_address(pgm: &SimPgm, root: HostPhysAddr, at: GuestPhysAddr) -> HostPhysAddr {
    let mut table = root.as_u64();
    for level in (1..4).rev() {
        let index = (at.as_u64() >> (12 + 9 * level)) & 511;
        table = pgm
            .memory()
            .read_u64(HostPhysAddr::new(table + index * 8).unwrap())
            & 0x000F_FFFF_FFFF_F000;
    }
    HostPhysAddr::new(table + ((at.as_u64() >> 12) & 511) * 8).unwrap()
}

fn harvest(pgm: &mut SimPgm) -> Vec<u64> {
    let mut out = Vec::new();
    pgm.harvest_written(&mut out);
    out.iter().map(|gpa| gpa.as_u64()).collect()
}

#[test]
fn write_monitoring_reports_exactly_the_written_pages_in_order() {
    let mut pgm = pc_like();
    for at in [0x1000, 0x2000] {
        guest_write(&mut pgm, gpa(at), b"before");
    }
    assert_eq!(pgm.start_write_monitoring(), Invalidation::SingleContext);
    assert_eq!(pgm.stats().write_monitored_pages, 2);
    let violation = pgm.translate(gpa(0x1000), Access::Write).unwrap_err();
    assert_eq!(violation.permitted, Permissions::READ | Permissions::EXECUTE);
    assert_eq!(guest_read(&pgm, gpa(0x1000), 6), b"before", "reads do not fault");
    // A monitored page, a ZERO page, and the monitored page again.
    assert_eq!(
        guest_write(&mut pgm, gpa(0x2008), b"x"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(
        guest_write(&mut pgm, gpa(3 * MIB), b"y"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(
        guest_write(&mut pgm, gpa(0x2010), b"z"),
        GuestAccess::Done { faults: 0 }
    );
    assert_eq!(harvest(&mut pgm), [0x2000, 3 * MIB]);
    assert_eq!(
        pgm.stats().write_monitored_pages,
        3,
        "harvested pages are protected again"
    );
    assert_eq!(harvest(&mut pgm), [] as [u64; 0]);
    assert_eq!(
        guest_write(&mut pgm, gpa(3 * MIB), b"w"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(harvest(&mut pgm), [3 * MIB]);
    assert_eq!(pgm.stop_write_monitoring(), Invalidation::None);
    assert_eq!(pgm.stats().write_monitored_pages, 0);
    assert_eq!(
        guest_write(&mut pgm, gpa(0x1000), b"free"),
        GuestAccess::Done { faults: 0 }
    );
    assert_accounting(&pgm);
}

/// In the manner of KVM's dirty_log_test: each round the guest writes random pages with the
/// round number; the host copies only the harvested pages into its mirror, which must then
/// equal guest memory.
#[test]
fn harvested_pages_keep_a_mirror_equal_to_guest_memory() {
    const PAGES: u64 = 512;
    let mut pgm = pgm_with_frames(4096);
    pgm.register_ram(gpa(0), PAGES * PAGE_SIZE, "ram").unwrap();
    let mut mirror = vec![[0u8; 8]; PAGES as usize];
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    pgm.start_write_monitoring();
    for round in 1..=20u64 {
        for _ in 0..60 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let page = seed % PAGES;
            guest_write(&mut pgm, gpa(page * PAGE_SIZE), &round.to_le_bytes());
        }
        if round % 5 == 0 {
            // Balloon churn between harvests must show up too.
            let at = gpa((seed % PAGES) * PAGE_SIZE);
            pgm.balloon_inflate(&[at]).unwrap();
            pgm.balloon_deflate(&[at]).unwrap();
        }
        for at in harvest(&mut pgm) {
            pgm.read_phys(gpa(at), &mut mirror[(at / PAGE_SIZE) as usize])
                .unwrap();
        }
        for page in 0..PAGES {
            let mut now = [0u8; 8];
            pgm.read_phys(gpa(page * PAGE_SIZE), &mut now).unwrap();
            assert_eq!(mirror[page as usize], now, "round {round}, page {page}");
        }
    }
    assert_accounting(&pgm);
}

#[test]
fn reset_during_monitoring_reports_the_pages_it_cleared() {
    let mut pgm = pc_like();
    guest_write(&mut pgm, gpa(0x5000), b"data");
    pgm.start_write_monitoring();
    pgm.reset_ram();
    assert_eq!(harvest(&mut pgm), [0x5000]);
}

#[test]
fn ballooning_frees_frames_and_deflating_makes_pages_usable_again() {
    let mut pgm = pc_like();
    for at in [0x3000, 0x4000] {
        guest_write(&mut pgm, gpa(at), b"data");
    }
    let used = frames_used(&pgm);
    let pages = [gpa(0x3000), gpa(0x4000), gpa(0x9000)];
    assert_eq!(pgm.balloon_inflate(&pages), Ok(Invalidation::SingleContext));
    assert_eq!(
        frames_used(&pgm),
        used,
        "nothing goes back before the TLBs are flushed"
    );
    assert_eq!(pgm.frames_awaiting_flush(), 2);
    flush_every_cpu(&mut pgm);
    assert_eq!(pgm.frames_awaiting_flush(), 0);
    assert_eq!(
        frames_used(&pgm),
        used - 2,
        "both private frames went back to the host"
    );
    assert_eq!(pgm.stats().ballooned_pages, 3);
    assert_accounting(&pgm);
    for at in pages {
        assert_eq!(
            pgm.translate(at, Access::Read).unwrap_err().permitted,
            Permissions::empty()
        );
        assert_eq!(pgm.resolve_fault(at, Access::Read), FaultOutcome::Ballooned);
        assert_eq!(pgm.resolve_fault(at, Access::Write), FaultOutcome::Ballooned);
    }
    let mut buf = [0xFF; 4];
    pgm.read_phys(gpa(0x3000), &mut buf).unwrap();
    assert_eq!(buf, [0; 4], "a ballooned page reads as zeros");
    assert_eq!(pgm.write_phys(gpa(0x3000), b"no"), Ok(Invalidation::None));
    pgm.read_phys(gpa(0x3000), &mut buf).unwrap();
    assert_eq!(buf, [0; 4], "the host's write was dropped");
    assert_eq!(pgm.balloon_deflate(&pages), Ok(Invalidation::None));
    assert_eq!(pgm.stats().ballooned_pages, 0);
    assert_eq!(guest_read(&pgm, gpa(0x3000), 4), [0; 4]);
    assert_eq!(
        guest_write(&mut pgm, gpa(0x3000), b"back"),
        GuestAccess::Done { faults: 1 }
    );
    assert_accounting(&pgm);
}

#[test]
fn balloon_requests_with_a_bad_page_change_nothing() {
    let mut pgm = pc_like();
    guest_write(&mut pgm, gpa(0x3000), b"data");
    pgm.balloon_inflate(&[gpa(0x6000)]).unwrap();
    let before = pgm.stats();
    let bad: [(&[GuestPhysAddr], RamError); 5] = [
        (
            &[gpa(0x3000), gpa(0x7800)],
            RamError::Range(RangeError::Misaligned(0x7800)),
        ),
        (
            &[gpa(0x3000), gpa(0xA_0000)],
            RamError::Page(PageError::NotGuestMemory(gpa(0xA_0000))),
        ),
        (
            &[gpa(0x3000), gpa(0x6000)],
            RamError::Page(PageError::State {
                gpa: gpa(0x6000),
                state: PageState::Ballooned,
            }),
        ),
        (
            &[gpa(0x3000), gpa(0x3000)],
            RamError::Page(PageError::State {
                gpa: gpa(0x3000),
                state: PageState::Allocated,
            }),
        ),
        (
            &[gpa(0x3000)],
            RamError::Page(PageError::State {
                gpa: gpa(0x3000),
                state: PageState::Allocated,
            }),
        ),
    ];
    for (i, (pages, expected)) in bad.into_iter().enumerate() {
        let result = if i < 4 {
            pgm.balloon_inflate(pages)
        } else {
            pgm.balloon_deflate(pages)
        };
        assert_eq!(result, Err(expected), "case {i}");
        assert_eq!(pgm.stats(), before, "case {i}");
    }
    assert_eq!(guest_read(&pgm, gpa(0x3000), 4), b"data");
}

#[test]
fn the_frame_limit_stops_a_writing_guest_with_out_of_memory() {
    let mut pgm = pc_like();
    pgm.set_frame_limit(Some(2));
    guest_write(&mut pgm, gpa(0x1000), b"a");
    guest_write(&mut pgm, gpa(0x2000), b"b");
    assert_eq!(
        guest_write(&mut pgm, gpa(0x3000), b"c"),
        GuestAccess::Stopped(FaultOutcome::OutOfMemory)
    );
    assert_eq!(pgm.page(gpa(0x3000)).unwrap().state(), PageState::Zero);
    assert_eq!(guest_read(&pgm, gpa(0x2000), 1), b"b");
    pgm.set_frame_limit(Some(3));
    assert_eq!(
        guest_write(&mut pgm, gpa(0x3000), b"c"),
        GuestAccess::Done { faults: 1 }
    );
    assert_accounting(&pgm);
}

#[test]
fn faults_are_served_from_the_handy_pool_in_batches() {
    let mut pgm = pc_like();
    for i in 0..300 {
        guest_write(&mut pgm, gpa(MIB + i * PAGE_SIZE), b"p");
        let handy = pgm.stats().handy_frames;
        assert!(
            handy > crate::pool::HANDY_REFILL_AT as u64,
            "pool ran low: {handy}"
        );
        assert_accounting(&pgm);
    }
    // 300 faults were served by a first fill of 128 and top-ups of 96 at most every 96 faults.
    let allocations = pgm.frames().inner.counts().allocations;
    let batches_worth = allocations - pgm.stats().table_frames - 1;
    assert!(
        batches_worth <= 128 + 3 * 96,
        "{batches_worth} frames taken from the allocator"
    );
}

use crate::handlers::HandlerKind;

#[test]
fn a_write_handler_intercepts_writes_only_until_deregistered() {
    let mut pgm = pc_like();
    guest_write(&mut pgm, gpa(0x10_1000), b"orig");
    let (id, invalidation) = pgm
        .register_handler(HandlerKind::Write, gpa(MIB), 4 * PAGE_SIZE)
        .unwrap();
    assert_eq!(
        invalidation,
        Invalidation::SingleContext,
        "permissions were taken away"
    );
    assert_eq!(
        guest_read(&pgm, gpa(0x10_1000), 4),
        b"orig",
        "reads still go to memory"
    );
    for at in [MIB, 0x10_1000, 0x10_3FFF] {
        assert_eq!(
            guest_write(&mut pgm, gpa(at), b"w"),
            GuestAccess::Stopped(FaultOutcome::Handler { handler: id })
        );
    }
    assert_eq!(
        pgm.stats().private_frames(),
        1,
        "a handled write to a ZERO page allocates nothing"
    );
    assert_eq!(
        guest_write(&mut pgm, gpa(0x10_4000), b"w"),
        GuestAccess::Done { faults: 1 },
        "outside"
    );
    assert_eq!(pgm.deregister_handler(id), Ok(Invalidation::None));
    assert_eq!(
        guest_write(&mut pgm, gpa(0x10_1000), b"free"),
        GuestAccess::Done { faults: 0 }
    );
    assert_eq!(pgm.deregister_handler(id), Err(HandlerError::Unknown(id)));
    assert_accounting(&pgm);
}

#[test]
fn an_all_handler_intercepts_reads_too_and_a_page_can_be_turned_off_and_reset() {
    let mut pgm = pc_like();
    let (id, _) = pgm
        .register_handler(HandlerKind::All, gpa(0x5000), 2 * PAGE_SIZE)
        .unwrap();
    assert_eq!(
        pgm.translate(gpa(0x5000), Access::Read).unwrap_err().permitted,
        Permissions::empty()
    );
    assert_eq!(
        pgm.resolve_fault(gpa(0x5000), Access::Read),
        FaultOutcome::Handler { handler: id }
    );
    assert_eq!(
        pgm.resolve_fault(gpa(0x6000), Access::Execute),
        FaultOutcome::Handler { handler: id }
    );
    assert_eq!(pgm.disable_handler_page(id, gpa(0x6123)), Ok(Invalidation::None));
    assert!(
        pgm.translate(gpa(0x6000), Access::Read).is_ok(),
        "the page maps as plain RAM"
    );
    assert_eq!(
        guest_write(&mut pgm, gpa(0x6000), b"ram"),
        GuestAccess::Done { faults: 1 }
    );
    assert!(
        pgm.translate(gpa(0x5000), Access::Read).is_err(),
        "the other page is still handled"
    );
    assert_eq!(
        pgm.disable_handler_page(id, gpa(0x7000)),
        Err(HandlerError::NotHandled(gpa(0x7000)))
    );
    assert_eq!(pgm.reset_handler(id), Ok(Invalidation::SingleContext));
    assert_eq!(
        pgm.resolve_fault(gpa(0x6000), Access::Read),
        FaultOutcome::Handler { handler: id }
    );
    assert_eq!(pgm.reset_handler(id), Ok(Invalidation::None), "nothing was off");
}

#[test]
fn bad_handler_registrations_change_nothing() {
    let mut pgm = pc_like();
    let (first, _) = pgm
        .register_handler(HandlerKind::Write, gpa(0x8000), 2 * PAGE_SIZE)
        .unwrap();
    let before: Vec<_> = (0..16).map(|i| pgm.page(gpa(i * PAGE_SIZE)).unwrap()).collect();
    let cases = [
        (
            gpa(0x9000),
            2 * PAGE_SIZE,
            HandlerError::Overlap { existing: first },
        ),
        (
            gpa(0x9F000),
            2 * PAGE_SIZE,
            HandlerError::Page(PageError::NotGuestMemory(gpa(0xA_0000))),
        ),
        (
            gpa(0x1800),
            PAGE_SIZE,
            HandlerError::Range(RangeError::Misaligned(0x1800)),
        ),
        (
            gpa(0x1000),
            0,
            HandlerError::Range(RangeError::ZeroSize(gpa(0x1000))),
        ),
    ];
    for (base, size, expected) in cases {
        assert_eq!(pgm.register_handler(HandlerKind::All, base, size), Err(expected));
    }
    let after: Vec<_> = (0..16).map(|i| pgm.page(gpa(i * PAGE_SIZE)).unwrap()).collect();
    assert_eq!(before, after);
    assert_eq!(
        pgm.balloon_inflate(&[gpa(0x8000)]),
        Err(RamError::Page(PageError::HandlerPresent(gpa(0x8000))))
    );
}

#[test]
fn mmio_in_unassigned_space_faults_to_its_handler_and_goes_away_cleanly() {
    let mut pgm = pc_like();
    let used = frames_used(&pgm);
    let (id, invalidation) = pgm.register_mmio(gpa(0xFEC0_0000), 2 * PAGE_SIZE).unwrap();
    assert_eq!(invalidation, Invalidation::None);
    assert_eq!(frames_used(&pgm), used, "MMIO needs no frames and no tables");
    assert_eq!(pgm.stats().mmio_pages, 2);
    for access in [Access::Read, Access::Write, Access::Execute] {
        assert_eq!(
            pgm.resolve_fault(gpa(0xFEC0_1FFC), access),
            FaultOutcome::Handler { handler: id }
        );
    }
    let mut buf = [0; 4];
    assert_eq!(
        pgm.read_phys(gpa(0xFEC0_0000), &mut buf),
        Err(AccessError::Page(PageError::NotRam(gpa(0xFEC0_0000))))
    );
    assert_eq!(
        pgm.write_phys(gpa(0xFEC0_0000), &buf),
        Err(AccessError::Page(PageError::NotRam(gpa(0xFEC0_0000))))
    );
    assert_eq!(
        pgm.register_mmio(gpa(0xFEC0_1000), PAGE_SIZE),
        Err(HandlerError::Overlap { existing: id })
    );
    assert_eq!(
        pgm.deregister_handler(id),
        Err(HandlerError::Unknown(id)),
        "MMIO is not a plain handler"
    );
    assert_eq!(pgm.deregister_mmio(id), Ok(Invalidation::None));
    assert_eq!(
        pgm.resolve_fault(gpa(0xFEC0_0000), Access::Read),
        FaultOutcome::NotGuestMemory
    );
    assert_eq!(pgm.stats().mmio_pages, 0);
    assert_eq!(pgm.ranges().len(), 2);
    assert_accounting(&pgm);
}

#[test]
fn mmio_over_ram_returns_its_frames_and_leaves_zero_ram_when_removed() {
    let mut pgm = pc_like();
    guest_write(&mut pgm, gpa(0xE_0000 + MIB), b"gone");
    guest_write(&mut pgm, gpa(0xE_1000 + MIB), b"gone");
    pgm.start_write_monitoring();
    let (id, invalidation) = pgm.register_mmio(gpa(0xE_0000 + MIB), 4 * PAGE_SIZE).unwrap();
    assert_eq!(invalidation, Invalidation::SingleContext);
    assert_eq!(pgm.stats().private_frames(), 0);
    assert_eq!(pgm.stats().mmio_pages, 4);
    assert_eq!(
        pgm.resolve_fault(gpa(0xE_2000 + MIB), Access::Read),
        FaultOutcome::Handler { handler: id }
    );
    assert_eq!(
        harvest(&mut pgm),
        [0xE_0000 + MIB, 0xE_1000 + MIB],
        "the replaced contents are gone"
    );
    assert_accounting(&pgm);
    assert_eq!(pgm.deregister_mmio(id), Ok(Invalidation::None));
    assert_eq!(guest_read(&pgm, gpa(0xE_0000 + MIB), 4), [0; 4]);
    assert_eq!(
        pgm.stats().zero_pages + pgm.stats().write_monitored_pages,
        pgm.stats().ram_pages
    );
    // Part RAM, part hole: refused.
    assert_eq!(
        pgm.register_mmio(gpa(0x9_F000), 2 * PAGE_SIZE),
        Err(HandlerError::Page(PageError::NotGuestMemory(gpa(0xA_0000))))
    );
    assert_accounting(&pgm);
}

use crate::manager::{PageMapping, RomId, RomProtection};

/// A two-page image with a recognisable pattern.
fn rom_image() -> Vec<u8> {
    (0..2 * PAGE_SIZE as usize)
        .map(|i| (i % 253) as u8 ^ 0x5A)
        .collect()
}

const ROM_BASE: u64 = 0xE_0000;

fn guest_sees(pgm: &SimPgm, at: u64, len: usize) -> Vec<u8> {
    guest_read(pgm, gpa(at), len)
}

#[test]
fn unshadowed_rom_reads_its_image_and_ignores_writes() {
    let mut pgm = pc_like();
    let image = rom_image();
    let id = register_rom_copy(&mut pgm, gpa(ROM_BASE), &image, false).unwrap();
    assert_eq!(pgm.stats().rom_pages, 2);
    assert_accounting(&pgm);
    assert_eq!(guest_sees(&pgm, ROM_BASE + 0x1000, 16), image[0x1000..0x1010]);
    assert_eq!(
        guest_write(&mut pgm, gpa(ROM_BASE + 8), b"x"),
        GuestAccess::Stopped(FaultOutcome::WriteIgnored)
    );
    assert_eq!(pgm.write_phys(gpa(ROM_BASE), b"ignored"), Ok(Invalidation::None));
    let mut back = vec![0; 7];
    pgm.read_phys(gpa(ROM_BASE), &mut back).unwrap();
    assert_eq!(back, image[..7]);
    assert_eq!(
        pgm.protect_rom(id, RomProtection::ReadRamWriteRam),
        Err(RomError::NotShadowed(id))
    );
    assert_eq!(
        pgm.rom_protection_at(gpa(ROM_BASE)),
        Some(RomProtection::ReadRomWriteIgnore)
    );
}

/// The BIOS shadowing sequence through all four modes, switching after the guest wrote.
#[test]
fn shadowed_rom_follows_each_protection_mode() {
    let mut pgm = pc_like();
    let image = rom_image();
    let id = register_rom_copy(&mut pgm, gpa(ROM_BASE), &image, true).unwrap();
    let at = ROM_BASE + 0x1000;

    // Power-on: ROM reads, ignored writes.
    assert_eq!(
        guest_write(&mut pgm, gpa(at), b"w"),
        GuestAccess::Stopped(FaultOutcome::WriteIgnored)
    );

    // Copy the ROM into its shadow: reads still see the ROM, writes must be emulated into the shadow.
    assert_eq!(
        pgm.protect_rom(id, RomProtection::ReadRomWriteRam),
        Ok(Invalidation::SingleContext)
    );
    assert_eq!(
        guest_write(&mut pgm, gpa(at), b"w"),
        GuestAccess::Stopped(FaultOutcome::EmulateWrite)
    );
    pgm.write_phys(gpa(ROM_BASE), &image).unwrap();
    pgm.write_phys(gpa(at), b"patched").unwrap();
    assert_eq!(
        guest_sees(&pgm, at, 7),
        image[0x1000..0x1007],
        "reads still come from the ROM"
    );
    assert_eq!(
        pgm.stats().allocated_pages,
        2,
        "both shadow pages now have frames"
    );

    // Lock the shadow: reads see it, writes are ignored.
    pgm.protect_rom(id, RomProtection::ReadRamWriteIgnore).unwrap();
    assert_eq!(guest_sees(&pgm, at, 7), b"patched");
    assert_eq!(guest_sees(&pgm, ROM_BASE, 16), image[..16]);
    assert_eq!(
        guest_write(&mut pgm, gpa(at), b"w"),
        GuestAccess::Stopped(FaultOutcome::WriteIgnored)
    );

    // Shadow as RAM: the guest writes it directly.
    pgm.protect_rom(id, RomProtection::ReadRamWriteRam).unwrap();
    assert_eq!(
        guest_write(&mut pgm, gpa(at), b"GUEST"),
        GuestAccess::Done { faults: 0 }
    );
    assert_eq!(guest_sees(&pgm, at, 7), b"GUESTed");

    // Back to the ROM and to the shadow again: the shadow kept the guest's write.
    pgm.protect_rom(id, RomProtection::ReadRomWriteIgnore).unwrap();
    assert_eq!(guest_sees(&pgm, at, 5), image[0x1000..0x1005]);
    pgm.protect_rom(id, RomProtection::ReadRamWriteIgnore).unwrap();
    assert_eq!(guest_sees(&pgm, at, 5), b"GUEST");
    assert_accounting(&pgm);
}

#[test]
fn reset_frees_the_shadow_restores_the_mode_and_repairs_the_image() {
    let mut pgm = pc_like();
    let image = rom_image();
    let id = register_rom_copy(&mut pgm, gpa(ROM_BASE), &image, true).unwrap();
    pgm.protect_rom(id, RomProtection::ReadRamWriteRam).unwrap();
    assert_eq!(
        guest_write(&mut pgm, gpa(ROM_BASE), b"shadow"),
        GuestAccess::Done { faults: 1 }
    );
    // Corrupt the ROM's own frame behind the manager's back.
    let virgin = {
        pgm.protect_rom(id, RomProtection::ReadRomWriteIgnore).unwrap();
        pgm.translate(gpa(ROM_BASE), Access::Read).unwrap()
    };
    write_host(&mut pgm, virgin, b"corrupt");
    assert_eq!(guest_sees(&pgm, ROM_BASE, 7), b"corrupt");
    pgm.reset_ram();
    assert_eq!(
        pgm.rom_protection_at(gpa(ROM_BASE)),
        Some(RomProtection::ReadRomWriteIgnore)
    );
    assert_eq!(guest_sees(&pgm, ROM_BASE, 16), image[..16], "image restored");
    assert_eq!(pgm.stats().allocated_pages, 0, "shadow frames freed");
    pgm.protect_rom(id, RomProtection::ReadRamWriteIgnore).unwrap();
    assert_eq!(
        guest_sees(&pgm, ROM_BASE, 6),
        [0; 6],
        "the shadow starts over as zeros"
    );
    assert_accounting(&pgm);
}

#[test]
fn bad_rom_registrations_change_nothing_and_termination_frees_rom_frames() {
    let mut pgm = pc_like();
    let used = frames_used(&pgm);
    let image = rom_image();
    assert_eq!(
        register_rom_copy(&mut pgm, gpa(0x9_F000), &image, true),
        Err(RomError::Range(RangeError::Overlap { existing: gpa(0) }))
    );
    assert_eq!(
        register_rom_copy(&mut pgm, gpa(ROM_BASE), &image[..100], false),
        Err(RomError::Range(RangeError::Misaligned(100)))
    );
    assert_eq!(
        register_rom_copy(&mut pgm, gpa(ROM_BASE), &[], false),
        Err(RomError::Range(RangeError::ZeroSize(gpa(ROM_BASE))))
    );
    pgm.frames_mut().fail_after = Some(1);
    assert_eq!(
        register_rom_copy(&mut pgm, gpa(ROM_BASE), &image, false),
        Err(RomError::NoMemory(NoMemory::OutOfFrames))
    );
    pgm.frames_mut().fail_after = None;
    assert_eq!(frames_used(&pgm), used);
    assert_eq!(
        pgm.protect_rom(RomId(7), RomProtection::ReadRamWriteRam),
        Err(RomError::Unknown(RomId(7)))
    );
    let id = register_rom_copy(&mut pgm, gpa(ROM_BASE), &image, true).unwrap();
    pgm.protect_rom(id, RomProtection::ReadRamWriteRam).unwrap();
    guest_write(&mut pgm, gpa(ROM_BASE), b"s");
    let frames = pgm.terminate();
    assert_eq!(frames.inner.counts().used(), 0);
}

#[test]
fn with_a20_off_accesses_above_1_mib_reach_the_page_below() {
    let mut pgm = pc_like();
    guest_write(&mut pgm, gpa(0x1000), b"low");
    guest_write(&mut pgm, gpa(MIB + 0x1000), b"high");
    guest_write(&mut pgm, gpa(2 * MIB + 0x1000), b"even");
    assert_eq!(pgm.set_a20(false), Invalidation::SingleContext);
    assert_eq!(
        pgm.translate(gpa(MIB + 0x1000), Access::Read),
        pgm.translate(gpa(0x1000), Access::Read)
    );
    assert_eq!(guest_read(&pgm, gpa(MIB + 0x1000), 3), b"low");
    assert_eq!(
        guest_read(&pgm, gpa(3 * MIB + 0x1000), 4),
        b"even",
        "3 MiB + x shows 2 MiB + x"
    );
    // A write through the alias gives the page below its frame, and both views follow.
    assert_eq!(
        guest_write(&mut pgm, gpa(MIB + 0x2000), b"via alias"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(guest_read(&pgm, gpa(0x2000), 9), b"via alias");
    assert_eq!(
        pgm.page(gpa(MIB + 0x2000)).unwrap().state(),
        PageState::Zero,
        "the hidden page is untouched"
    );
    let mut host_view = [0; 4];
    pgm.read_phys(gpa(MIB + 0x1000), &mut host_view).unwrap();
    assert_eq!(&host_view, b"high", "host accesses are not masked");
    assert_eq!(pgm.set_a20(true), Invalidation::SingleContext);
    assert_eq!(guest_read(&pgm, gpa(MIB + 0x1000), 4), b"high");
    assert_eq!(guest_read(&pgm, gpa(MIB + 0x2000), 4), [0; 4]);
    assert_eq!(pgm.set_a20(true), Invalidation::None);
    assert_accounting(&pgm);
}

#[test]
fn a20_aliases_outside_ram_are_mapped_on_demand_and_dropped_when_the_gate_opens() {
    let mut pgm = pgm_with_frames(4096);
    pgm.register_ram(gpa(0), MIB, "real mode").unwrap();
    guest_write(&mut pgm, gpa(0x10), b"wrap");
    pgm.set_a20(false);
    // The HMA: 0xFFFF:0x0020 = 0x10_0010 wraps to 0x10.
    assert!(
        pgm.translate(gpa(0x10_0010), Access::Read).is_err(),
        "not mapped before it is touched"
    );
    assert_eq!(
        pgm.resolve_fault(gpa(0x10_0010), Access::Read),
        FaultOutcome::Resolved {
            invalidation: Invalidation::None,
            resolution: Resolution::Remap,
        }
    );
    assert_eq!(guest_read(&pgm, gpa(0x10_0010), 4), b"wrap");
    // The page below changes: the alias follows.
    guest_write(&mut pgm, gpa(0x10), b"next");
    assert_eq!(guest_read(&pgm, gpa(0x10_0010), 4), b"next");
    pgm.set_a20(true);
    assert!(pgm.translate(gpa(0x10_0010), Access::Read).is_err());
    assert_eq!(
        pgm.resolve_fault(gpa(0x10_0010), Access::Read),
        FaultOutcome::NotGuestMemory
    );
    assert_accounting(&pgm);
    let frames = pgm.terminate();
    assert_eq!(frames.inner.counts().used(), 0, "alias tables are freed too");
}

use crate::manager::Mmio2Handle;

const FB: u64 = 0xE000_0000;

#[test]
fn mmio2_is_device_memory_the_guest_sees_once_mapped() {
    let mut pgm = pc_like();
    let fb = pgm.create_mmio2(mmio2_spec(4 * PAGE_SIZE, 2)).unwrap();
    assert_eq!(pgm.stats().mmio2_frames, 4);
    assert_accounting(&pgm);
    pgm.mmio2_write(fb, PAGE_SIZE - 2, b"span").unwrap();
    assert_eq!(pgm.mmio2_mapping(fb), None);
    assert_eq!(pgm.map_mmio2(fb, gpa(FB)), Ok(Invalidation::None));
    assert_eq!(pgm.mmio2_mapping(fb), Some(gpa(FB)));
    assert_eq!(guest_read(&pgm, gpa(FB + PAGE_SIZE - 2), 2), b"sp");
    assert_eq!(guest_read(&pgm, gpa(FB + PAGE_SIZE), 2), b"an");
    assert_eq!(
        guest_write(&mut pgm, gpa(FB + 3 * PAGE_SIZE), b"guest"),
        GuestAccess::Done { faults: 0 }
    );
    let mut seen = [0; 5];
    pgm.mmio2_read(fb, 3 * PAGE_SIZE, &mut seen).unwrap();
    assert_eq!(&seen, b"guest");
    assert_eq!(pgm.unmap_mmio2(fb), Ok(Invalidation::SingleContext));
    assert_eq!(
        pgm.resolve_fault(gpa(FB), Access::Read),
        FaultOutcome::NotGuestMemory
    );
    pgm.mmio2_read(fb, 3 * PAGE_SIZE, &mut seen).unwrap();
    assert_eq!(&seen, b"guest", "memory stays with the region");
    pgm.map_mmio2(fb, gpa(FB + 0x10_0000)).unwrap();
    assert_eq!(guest_read(&pgm, gpa(FB + 0x10_0000 + 3 * PAGE_SIZE), 5), b"guest");
    pgm.reset_ram();
    assert_eq!(
        guest_read(&pgm, gpa(FB + 0x10_0000 + 3 * PAGE_SIZE), 5),
        b"guest",
        "reset leaves MMIO2 alone"
    );
    assert_accounting(&pgm);
}

#[test]
fn mmio2_dirty_tracking_reports_exactly_the_written_pages_and_traps_once_per_page() {
    let mut pgm = pc_like();
    let fb = pgm.create_mmio2(mmio2_spec(100 * PAGE_SIZE, 0)).unwrap();
    // Tracking first: a region mapped untracked first reports every page at its first query.
    assert_eq!(pgm.set_mmio2_dirty_tracking(fb, true), Ok(Invalidation::None));
    pgm.map_mmio2(fb, gpa(FB)).unwrap();
    let chosen = [0usize, 1, 63, 64, 99];
    for &page in &chosen {
        let at = FB + page as u64 * PAGE_SIZE;
        assert_eq!(
            guest_write(&mut pgm, gpa(at), b"a"),
            GuestAccess::Done { faults: 1 },
            "first write traps"
        );
        assert_eq!(
            guest_write(&mut pgm, gpa(at + 8), b"b"),
            GuestAccess::Done { faults: 0 },
            "second does not"
        );
    }
    let mut bitmap = Vec::new();
    assert_eq!(
        pgm.query_and_reset_mmio2_dirty(fb, Some(&mut bitmap)),
        Ok(Invalidation::SingleContext)
    );
    assert_eq!(bits(&bitmap), chosen);
    assert_eq!(
        pgm.query_and_reset_mmio2_dirty(fb, Some(&mut bitmap)),
        Ok(Invalidation::None)
    );
    assert_eq!(bits(&bitmap), [] as [usize; 0]);
    assert_eq!(
        guest_write(&mut pgm, gpa(FB + 64 * PAGE_SIZE), b"c"),
        GuestAccess::Done { faults: 1 },
        "re-armed"
    );
    pgm.mmio2_write(fb, 5 * PAGE_SIZE, b"device").unwrap();
    pgm.query_and_reset_mmio2_dirty(fb, Some(&mut bitmap)).unwrap();
    assert_eq!(bits(&bitmap), [64], "device writes are not tracked");
    assert_eq!(pgm.set_mmio2_dirty_tracking(fb, false), Ok(Invalidation::None));
    assert_eq!(
        guest_write(&mut pgm, gpa(FB), b"free"),
        GuestAccess::Done { faults: 0 }
    );
}

#[test]
fn mmio2_tracking_and_write_monitoring_do_not_undo_each_other() {
    let mut pgm = pc_like();
    let fb = pgm.create_mmio2(mmio2_spec(2 * PAGE_SIZE, 0)).unwrap();
    pgm.map_mmio2(fb, gpa(FB)).unwrap();
    pgm.set_mmio2_dirty_tracking(fb, true).unwrap();
    pgm.start_write_monitoring();
    pgm.stop_write_monitoring();
    assert_eq!(
        guest_write(&mut pgm, gpa(FB), b"x"),
        GuestAccess::Done { faults: 1 },
        "tracking survived"
    );
    pgm.start_write_monitoring();
    assert_eq!(
        guest_write(&mut pgm, gpa(FB + PAGE_SIZE), b"y"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(
        harvest(&mut pgm),
        [FB + PAGE_SIZE],
        "MMIO2 is write-monitored too"
    );
    let mut bitmap = Vec::new();
    pgm.query_and_reset_mmio2_dirty(fb, Some(&mut bitmap)).unwrap();
    assert_eq!(bits(&bitmap), [0, 1]);
    assert_eq!(
        guest_write(&mut pgm, gpa(FB), b"z"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(
        harvest(&mut pgm),
        [FB],
        "a write both want traps once and reaches both"
    );
    pgm.query_and_reset_mmio2_dirty(fb, Some(&mut bitmap)).unwrap();
    assert_eq!(bits(&bitmap), [0]);
}

#[test]
fn mmio2_region_management_and_bad_requests() {
    let mut pgm = pc_like();
    let (used, tables) = (frames_used(&pgm), pgm.stats().table_frames);
    let fb = pgm.create_mmio2(mmio2_spec(8 * PAGE_SIZE, 1)).unwrap();
    assert!(pgm.is_mmio2_handle(fb));
    assert!(!pgm.is_mmio2_handle(Mmio2Handle(99)));
    assert_eq!(
        pgm.map_mmio2(Mmio2Handle(99), gpa(FB)),
        Err(Mmio2Error::Unknown(Mmio2Handle(99)))
    );
    assert_eq!(
        pgm.map_mmio2(fb, gpa(0x9_F000)),
        Err(Mmio2Error::Range(RangeError::Overlap { existing: gpa(0) }))
    );
    assert_eq!(
        pgm.map_mmio2(fb, gpa(FB + 0x800)),
        Err(Mmio2Error::Range(RangeError::Misaligned(FB + 0x800)))
    );
    assert_eq!(
        pgm.mmio2_write(fb, 8 * PAGE_SIZE - 1, b"xy"),
        Err(Mmio2Error::OutOfRange(fb))
    );
    pgm.map_mmio2(fb, gpa(FB)).unwrap();
    assert_eq!(pgm.map_mmio2(fb, gpa(FB + MIB)), Err(Mmio2Error::Mapped(fb)));
    assert_eq!(pgm.reduce_mmio2(fb, 4 * PAGE_SIZE), Err(Mmio2Error::Mapped(fb)));
    pgm.unmap_mmio2(fb).unwrap();
    assert_eq!(pgm.unmap_mmio2(fb), Err(Mmio2Error::NotMapped(fb)));
    assert_eq!(
        pgm.reduce_mmio2(fb, 16 * PAGE_SIZE),
        Err(Mmio2Error::OutOfRange(fb))
    );
    pgm.reduce_mmio2(fb, 3 * PAGE_SIZE).unwrap();
    assert_eq!(pgm.stats().mmio2_frames, 3);
    assert_accounting(&pgm);
    pgm.change_mmio2_region_no(fb, 5).unwrap();
    assert_eq!(pgm.mmio2_region_no(fb), Some(5));
    pgm.map_mmio2(fb, gpa(FB)).unwrap();
    assert_eq!(pgm.deregister_mmio2(fb), Ok(Invalidation::SingleContext));
    flush_every_cpu(&mut pgm);
    assert!(!pgm.is_mmio2_handle(fb));
    let new_tables = pgm.stats().table_frames - tables;
    assert_eq!(
        frames_used(&pgm),
        used + new_tables,
        "only the tables made for the mapping remain"
    );
    let kept = pgm.create_mmio2(mmio2_spec(2 * PAGE_SIZE, 0)).unwrap();
    pgm.map_mmio2(kept, gpa(FB)).unwrap();
    let frames = pgm.terminate();
    assert_eq!(frames.inner.counts().used(), 0, "MMIO2 frames are freed once");
}

const BLOCK: u64 = 4 * MIB;
const LARGE: u64 = 2 * MIB;

fn large_pc() -> SimPgm {
    let mut pgm = pc_like();
    pgm.set_large_pages(true);
    pgm
}

/// Lets a guest write fill the block at `BLOCK` as one large page, then writes a distinct tag
/// into each of its pages through the host.
fn tag_block(pgm: &mut SimPgm) {
    assert_eq!(
        guest_write(pgm, gpa(BLOCK), b"first"),
        GuestAccess::Done { faults: 1 }
    );
    for page in 0..512u64 {
        pgm.write_phys(gpa(BLOCK + page * PAGE_SIZE), &page.to_le_bytes())
            .unwrap();
    }
}

fn assert_block_tags(pgm: &SimPgm) {
    for page in 0..512u64 {
        assert_eq!(
            guest_read(pgm, gpa(BLOCK + page * PAGE_SIZE), 8),
            page.to_le_bytes(),
            "page {page}"
        );
    }
}

#[test]
fn a_write_to_an_untouched_block_maps_it_with_one_2mib_entry() {
    let mut pgm = large_pc();
    assert_eq!(
        pgm.resolve_fault(gpa(BLOCK + 0x5123), Access::Write),
        FaultOutcome::Resolved {
            invalidation: Invalidation::SingleContext,
            resolution: Resolution::ZeroFill,
        },
        "the other 511 pages drop their zero-frame translations"
    );
    assert!(pgm.is_mapped_large(gpa(BLOCK)) && pgm.is_mapped_large(gpa(BLOCK + LARGE - 1)));
    assert!(!pgm.is_mapped_large(gpa(BLOCK + LARGE)));
    assert_eq!(pgm.stats().allocated_pages, 512);
    let chunk = pgm.translate(gpa(BLOCK), Access::Write).unwrap();
    assert_eq!(chunk.as_u64() % LARGE, 0);
    assert_eq!(
        pgm.translate(gpa(BLOCK + 0x5123), Access::Write)
            .unwrap()
            .as_u64(),
        chunk.as_u64() + 0x5123
    );
    assert_eq!(
        pgm.page(gpa(BLOCK + 0x5000)).unwrap().large_page(),
        crate::page::LargePageState::Large
    );
    assert_eq!(guest_read(&pgm, gpa(BLOCK + 0x1F_F000), 8), [0; 8]);
    assert_accounting(&pgm);
}

#[test]
fn a_handler_splits_a_large_block_and_removing_it_merges_it_back_with_the_data() {
    let mut pgm = large_pc();
    tag_block(&mut pgm);
    assert!(pgm.is_mapped_large(gpa(BLOCK)));
    let tables = pgm.stats().table_frames;
    let (id, _) = pgm
        .register_handler(HandlerKind::Write, gpa(BLOCK + 0x3000), PAGE_SIZE)
        .unwrap();
    assert!(!pgm.is_mapped_large(gpa(BLOCK)));
    assert_eq!(
        pgm.stats().table_frames,
        tables + 1,
        "the split took a page table from the handy pool"
    );
    assert_block_tags(&pgm);
    assert_eq!(
        guest_write(&mut pgm, gpa(BLOCK + 0x3000), b"h"),
        GuestAccess::Stopped(FaultOutcome::Handler { handler: id })
    );
    assert_eq!(
        guest_write(&mut pgm, gpa(BLOCK + 0x4000), b"ok"),
        GuestAccess::Done { faults: 0 }
    );
    assert_eq!(pgm.deregister_handler(id), Ok(Invalidation::SingleContext));
    assert!(pgm.is_mapped_large(gpa(BLOCK)));
    assert_eq!(
        pgm.stats().table_frames,
        tables,
        "the merge retired the page table"
    );
    assert_eq!(guest_read(&pgm, gpa(BLOCK + 0x4000), 2), b"ok");
    assert_eq!(guest_read(&pgm, gpa(BLOCK + 0x3000), 8), 3u64.to_le_bytes());
    assert_accounting(&pgm);
}

#[test]
fn write_monitoring_splits_large_blocks_and_stopping_it_merges_them() {
    let mut pgm = large_pc();
    tag_block(&mut pgm);
    pgm.start_write_monitoring();
    assert!(
        pgm.translate(gpa(BLOCK), Access::Write).is_err(),
        "protected above the 2 MiB leaf"
    );
    assert_eq!(
        guest_write(&mut pgm, gpa(BLOCK + 0x7000), b"w"),
        GuestAccess::Done { faults: 1 }
    );
    assert!(!pgm.is_mapped_large(gpa(BLOCK)), "the first write split it");
    assert_isolated(&pgm, "after the split");
    assert_eq!(
        harvest(&mut pgm),
        [BLOCK + 0x7000],
        "4 KiB granularity while monitoring"
    );
    assert_eq!(pgm.stop_write_monitoring(), Invalidation::SingleContext);
    assert!(pgm.is_mapped_large(gpa(BLOCK)));
    assert_eq!(guest_read(&pgm, gpa(BLOCK + 0x7000), 1), b"w");
}

#[test]
fn resetting_one_page_of_a_large_block_splits_it_for_good() {
    let mut pgm = large_pc();
    tag_block(&mut pgm);
    pgm.balloon_inflate(&[gpa(BLOCK + 0x9000)]).unwrap();
    assert!(!pgm.is_mapped_large(gpa(BLOCK)));
    assert_eq!(pgm.stats().allocated_pages, 511);
    pgm.balloon_deflate(&[gpa(BLOCK + 0x9000)]).unwrap();
    let (id, _) = pgm
        .register_handler(HandlerKind::All, gpa(BLOCK + 0x1000), PAGE_SIZE)
        .unwrap();
    pgm.deregister_handler(id).unwrap();
    assert!(
        !pgm.is_mapped_large(gpa(BLOCK)),
        "a hole in the chunk: the block stays 4 KiB"
    );
    assert_eq!(guest_read(&pgm, gpa(BLOCK + 0xA000), 8), 10u64.to_le_bytes());
    assert_accounting(&pgm);
    let frames = pgm.terminate();
    assert_eq!(
        frames.inner.counts().used(),
        0,
        "chunk frames and reserved tables are all freed"
    );
}

#[test]
fn blocks_that_do_not_qualify_get_4kib_pages() {
    let mut pgm = large_pc();
    // The first block crosses the end of low RAM at 640 KiB.
    assert_eq!(
        guest_write(&mut pgm, gpa(0x1000), b"a"),
        GuestAccess::Done { faults: 1 }
    );
    assert!(!pgm.is_mapped_large(gpa(0x1000)));
    // A block with a handler on one page.
    pgm.register_handler(HandlerKind::Write, gpa(6 * MIB), PAGE_SIZE)
        .unwrap();
    assert_eq!(
        guest_write(&mut pgm, gpa(6 * MIB + 0x8000), b"b"),
        GuestAccess::Done { faults: 1 }
    );
    assert!(!pgm.is_mapped_large(gpa(6 * MIB)));
    // The VM's limit leaves no room for 512 frames.
    pgm.set_frame_limit(Some(100));
    assert_eq!(
        guest_write(&mut pgm, gpa(8 * MIB), b"c"),
        GuestAccess::Done { faults: 1 }
    );
    assert!(!pgm.is_mapped_large(gpa(8 * MIB)));
    assert_eq!(pgm.stats().allocated_pages, 3);
    // No contiguous chunk on the host.
    let mut small = pgm_with_frames(600);
    small.set_large_pages(true);
    small.register_ram(gpa(0), 4 * MIB, "ram").unwrap();
    assert_eq!(
        guest_write(&mut small, gpa(2 * MIB), b"d"),
        GuestAccess::Done { faults: 1 }
    );
    assert!(!small.is_mapped_large(gpa(2 * MIB)));
    assert_accounting(&pgm);
}

#[test]
fn preallocation_gives_every_zero_page_a_frame_or_nothing_at_all() {
    let mut pgm = pgm_with_frames(4096);
    pgm.register_ram(gpa(0), 640 * 1024, "low").unwrap();
    pgm.register_ram(gpa(MIB), 5 * MIB, "high").unwrap();
    pgm.balloon_inflate(&[gpa(0x2000)]).unwrap();
    guest_write(&mut pgm, gpa(0x3000), b"kept");
    pgm.set_large_pages(true);
    // Room for the 4 KiB pages and the block at 2 MiB, not for the block at 4 MiB.
    pgm.set_frame_limit(Some(1000));
    let before = pgm.stats();
    assert_eq!(
        pgm.preallocate_ram(),
        Err(RamError::NoMemory(NoMemory::FrameLimit))
    );
    assert_eq!(
        pgm.stats().allocated_pages,
        before.allocated_pages,
        "rolled back, large block too"
    );
    assert!(!pgm.is_mapped_large(gpa(2 * MIB)));
    assert_eq!(pgm.stats().zero_pages, before.zero_pages);
    assert_accounting(&pgm);
    pgm.set_frame_limit(None);
    assert_eq!(pgm.preallocate_ram(), Ok(Invalidation::SingleContext));
    let stats = pgm.stats();
    assert_eq!(stats.zero_pages, 0);
    assert_eq!(stats.ballooned_pages, 1, "the balloon keeps its page");
    assert!(
        pgm.is_mapped_large(gpa(2 * MIB)),
        "the aligned block inside high RAM is one chunk"
    );
    assert_eq!(guest_read(&pgm, gpa(0x3000), 4), b"kept");
    assert_eq!(pgm.preallocate_ram(), Ok(Invalidation::None));
    assert_accounting(&pgm);
}

#[test]
fn a_write_lock_gives_the_host_the_guest_page_and_pins_its_frame() {
    let mut pgm = pc_like();
    let PageMapping {
        host: hpa,
        lock,
        invalidation,
    } = pgm.lock_page_for_write(gpa(0x5010)).unwrap();
    assert_eq!(
        invalidation,
        Invalidation::SingleContext,
        "the ZERO page was remapped to its frame"
    );
    assert_eq!(pgm.stats().allocated_pages, 1, "the ZERO page got its frame");
    write_host(&mut pgm, hpa, b"via lock");
    assert_eq!(guest_read(&pgm, gpa(0x5010), 8), b"via lock");
    let frame = pgm.page(gpa(0x5000)).unwrap().frame();
    pgm.reset_ram();
    assert_eq!(
        pgm.page(gpa(0x5000)).unwrap().frame(),
        frame,
        "reset zeroes a locked page in place"
    );
    assert_eq!(guest_read(&pgm, gpa(0x5010), 8), [0; 8]);
    assert_eq!(
        pgm.balloon_inflate(&[gpa(0x5000)]),
        Err(RamError::Page(PageError::Locked(gpa(0x5000))))
    );
    assert_eq!(
        pgm.register_mmio(gpa(0x5000), PAGE_SIZE),
        Err(HandlerError::Page(PageError::Locked(gpa(0x5000))))
    );
    pgm.release_page_lock(lock);
    assert!(!pgm.page(gpa(0x5000)).unwrap().is_locked());
    assert_eq!(
        pgm.balloon_inflate(&[gpa(0x5000)]),
        Ok(Invalidation::SingleContext)
    );
    assert_accounting(&pgm);
}

#[test]
fn a_read_lock_maps_what_the_guest_reads() {
    let mut pgm = pc_like();
    let PageMapping {
        host: zero,
        lock,
        invalidation,
    } = pgm.lock_page_for_read(gpa(0x6000)).unwrap();
    assert_eq!(invalidation, Invalidation::None);
    assert_eq!(zero, pgm.zero_frame(), "a ZERO page reads the zero frame");
    assert_eq!(pgm.stats().allocated_pages, 0);
    pgm.release_page_lock(lock);
    let image = rom_image();
    register_rom_copy(&mut pgm, gpa(ROM_BASE), &image, false).unwrap();
    let PageMapping { host: rom, lock, .. } = pgm.lock_page_for_read(gpa(ROM_BASE + 0x1004)).unwrap();
    let mut seen = [0; 4];
    pgm.memory().read(rom, &mut seen);
    assert_eq!(seen, image[0x1004..0x1008]);
    pgm.release_page_lock(lock);
    assert_eq!(
        pgm.lock_page_for_write(gpa(ROM_BASE)),
        Err(LockError::Page(PageError::NotRam(gpa(ROM_BASE))))
    );
}

#[test]
fn write_locked_pages_are_reported_at_every_harvest() {
    let mut pgm = pc_like();
    let lock = pgm.lock_page_for_write(gpa(0x7000)).unwrap().lock;
    pgm.start_write_monitoring();
    assert_eq!(harvest(&mut pgm), [0x7000]);
    assert_eq!(harvest(&mut pgm), [0x7000], "the host may have written it again");
    // The harvest re-armed the protection at the root: one fault brings it down, and the
    // page's own leaf, never protected, lets the write through.
    assert_eq!(
        guest_write(&mut pgm, gpa(0x7008), b"g"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(
        pgm.page(gpa(0x7000)).map(|page| page.state()),
        Some(PageState::Allocated),
        "never protected"
    );
    pgm.release_page_lock(lock);
    assert_eq!(harvest(&mut pgm), [0x7000]);
    assert_eq!(harvest(&mut pgm), [] as [u64; 0]);
    assert_eq!(
        guest_write(&mut pgm, gpa(0x7008), b"g"),
        GuestAccess::Done { faults: 1 },
        "protected again"
    );
}

#[test]
fn bulk_locking_is_all_or_nothing_and_refuses_what_cannot_be_locked() {
    let mut pgm = pc_like();
    let pages = [gpa(0x1000), gpa(0x2000), gpa(0xA_0000)];
    assert_eq!(
        pgm.lock_pages(&pages, true),
        Err(LockError::Page(PageError::NotGuestMemory(gpa(0xA_0000))))
    );
    for at in &pages[..2] {
        assert!(!pgm.page(*at).unwrap().is_locked(), "no lock left behind at {at}");
    }
    let locks = pgm.lock_pages(&pages[..2], false).unwrap();
    assert_eq!(locks.len(), 2);
    for mapping in locks {
        pgm.release_page_lock(mapping.lock);
    }
    pgm.register_mmio(gpa(0xFEC0_0000), PAGE_SIZE).unwrap();
    pgm.register_handler(HandlerKind::Write, gpa(0x8000), PAGE_SIZE)
        .unwrap();
    pgm.balloon_inflate(&[gpa(0x9000)]).unwrap();
    assert_eq!(
        pgm.lock_page_for_read(gpa(0xFEC0_0000)),
        Err(LockError::Page(PageError::NotRam(gpa(0xFEC0_0000))))
    );
    assert!(
        pgm.lock_page_for_write(gpa(0x8000)).is_ok(),
        "the lock's holder acts for the write handler, as in the seed"
    );
    assert_eq!(
        pgm.lock_page_for_write(gpa(0x9000)),
        Err(LockError::Page(PageError::State {
            gpa: gpa(0x9000),
            state: PageState::Ballooned
        }))
    );
}

use crate::handlers::HandlerId;
use crate::manager::{AccessHandlers, HandlerAction};

/// Records what it is handed; fills reads with 0xAB; answers `action`.
struct Recorder {
    action: HandlerAction,
    calls: Vec<(HandlerId, u64, Access, Vec<u8>)>,
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

fn recorder(action: HandlerAction) -> Recorder {
    Recorder {
        action,
        calls: Vec::new(),
    }
}

#[test]
fn handled_writes_go_to_the_handler_for_handled_pages_only() {
    let mut pgm = pc_like();
    let (id, _) = pgm
        .register_handler(HandlerKind::Write, gpa(0x5000), PAGE_SIZE)
        .unwrap();
    let data: Vec<u8> = (0..0x20).collect();
    // 0x4FF0..0x5010: half on a plain page, half on the handled one.
    let mut handled = recorder(HandlerAction::Handled);
    pgm.write_phys_handled(gpa(0x4FF0), &data, &mut handled).unwrap();
    assert_eq!(
        handled.calls,
        [(id, 0x5000, Access::Write, data[0x10..].to_vec())]
    );
    let mut seen = [0u8; 0x20];
    pgm.read_phys(gpa(0x4FF0), &mut seen).unwrap();
    assert_eq!(seen[..0x10], data[..0x10], "the plain page was written");
    assert_eq!(seen[0x10..], [0; 0x10], "the handler took the rest");
    let mut passes = recorder(HandlerAction::Default);
    pgm.write_phys_handled(gpa(0x4FF0), &data, &mut passes).unwrap();
    pgm.read_phys(gpa(0x4FF0), &mut seen).unwrap();
    assert_eq!(seen.to_vec(), data, "Default lets the write reach memory");
    let mut reads = recorder(HandlerAction::Handled);
    pgm.read_phys_handled(gpa(0x5000), &mut seen, &mut reads).unwrap();
    assert!(reads.calls.is_empty(), "a write handler does not see reads");
}

#[test]
fn handled_accesses_reach_mmio_handlers_and_default_to_open_bus() {
    let mut pgm = pc_like();
    let (id, _) = pgm.register_mmio(gpa(0xFEC0_0000), PAGE_SIZE).unwrap();
    let mut buf = [0u8; 4];
    let mut handled = recorder(HandlerAction::Handled);
    pgm.read_phys_handled(gpa(0xFEC0_0010), &mut buf, &mut handled)
        .unwrap();
    assert_eq!(buf, [0xAB; 4]);
    assert_eq!(handled.calls, [(id, 0xFEC0_0010, Access::Read, vec![0xAB; 4])]);
    let mut passes = recorder(HandlerAction::Default);
    pgm.read_phys_handled(gpa(0xFEC0_0010), &mut buf, &mut passes)
        .unwrap();
    assert_eq!(buf, [0xFF; 4], "MMIO has no memory: all ones");
    pgm.write_phys_handled(gpa(0xFEC0_0010), b"reg!", &mut handled)
        .unwrap();
    assert_eq!(
        handled.calls[1],
        (id, 0xFEC0_0010, Access::Write, b"reg!".to_vec())
    );
    assert_eq!(
        pgm.write_phys_handled(gpa(0xFEBF_FFFE), b"xx", &mut handled),
        Err(AccessError::Page(PageError::NotGuestMemory(gpa(0xFEBF_FFFE))))
    );
    assert_eq!(handled.calls.len(), 2, "no handler ran for a refused access");
}

#[test]
fn an_mmio_target_found_once_serves_accesses_as_the_handled_paths_do() {
    let mut pgm = pc_like();
    let (id, _) = pgm.register_mmio(gpa(0xFEC0_0000), 2 * PAGE_SIZE).unwrap();
    pgm.register_handler(HandlerKind::All, gpa(0x5000), PAGE_SIZE)
        .unwrap();
    // Only MMIO pages are targets: a handled RAM page has memory a write may change.
    assert_eq!(pgm.mmio_target(gpa(0x5000)), None);
    assert_eq!(pgm.mmio_target(gpa(0x6000)), None);
    assert_eq!(pgm.mmio_target(gpa(0xFEC0_2000)), None);
    let target = pgm.mmio_target(gpa(0xFEC0_1010)).unwrap();
    assert_eq!((target.handler(), target.page()), (id, gpa(0xFEC0_1000)));
    // The same calls and results as read_phys_handled / write_phys_handled.
    for action in [HandlerAction::Handled, HandlerAction::Default] {
        let (mut by_target, mut by_lookup) = (recorder(action), recorder(action));
        let (mut read, mut looked_up) = ([0u8; 4], [0u8; 4]);
        pgm.read_mmio(target, gpa(0xFEC0_1010), &mut read, &mut by_target)
            .unwrap();
        pgm.read_phys_handled(gpa(0xFEC0_1010), &mut looked_up, &mut by_lookup)
            .unwrap();
        pgm.write_mmio(target, gpa(0xFEC0_1FF8), b"register", &mut by_target)
            .unwrap();
        pgm.write_phys_handled(gpa(0xFEC0_1FF8), b"register", &mut by_lookup)
            .unwrap();
        assert_eq!(read, looked_up);
        assert_eq!(by_target.calls, by_lookup.calls);
    }
    // Bytes off the target's page are refused before any handler runs.
    let mut refused = recorder(HandlerAction::Handled);
    assert_eq!(
        pgm.write_mmio(target, gpa(0xFEC0_1FFC), b"register", &mut refused),
        Err(AccessError::OutsideTarget(gpa(0xFEC0_1FFC)))
    );
    assert_eq!(
        pgm.read_mmio(target, gpa(0xFEC0_0010), &mut [0u8; 4], &mut refused),
        Err(AccessError::OutsideTarget(gpa(0xFEC0_0010)))
    );
    assert!(refused.calls.is_empty());
    // With the A20 gate closed, an address with bit 20 set reaches the page below it.
    let (low, _) = pgm.register_mmio(gpa(0xE000_0000), PAGE_SIZE).unwrap();
    pgm.set_a20(false);
    let through_gate = pgm.mmio_target(gpa(0xE010_0010)).unwrap();
    assert_eq!(
        (through_gate.handler(), through_gate.page()),
        (low, gpa(0xE000_0000))
    );
    let mut gated = recorder(HandlerAction::Handled);
    pgm.write_mmio(through_gate, gpa(0xE010_0010), b"a20", &mut gated)
        .unwrap();
    assert_eq!(gated.calls, [(low, 0xE000_0010, Access::Write, b"a20".to_vec())]);
}

#[test]
fn large_ram_is_registered_as_chunks_that_behave_as_one_range() {
    use crate::manager::RAM_CHUNK_PAGES;
    let chunk = RAM_CHUNK_PAGES * PAGE_SIZE;
    // 48 GiB: large pages, so that untouched blocks need no page tables.
    let mut pgm = pgm_with_defaults(8192);
    let base = 0x1_0000_0000;
    pgm.register_ram(gpa(base), 3 * chunk + 2 * PAGE_SIZE, "above 4 GiB")
        .unwrap();
    assert_eq!(pgm.ranges().len(), 4);
    assert_eq!(pgm.stats().ram_pages, 3 * RAM_CHUNK_PAGES + 2);
    // A host write across a chunk boundary, and guest writes on both sides of one.
    pgm.write_phys(gpa(base + chunk - 2), b"span").unwrap();
    let mut back = [0; 4];
    pgm.read_phys(gpa(base + chunk - 2), &mut back).unwrap();
    assert_eq!(&back, b"span");
    assert_eq!(
        guest_write(&mut pgm, gpa(base + 3 * chunk + PAGE_SIZE), b"end"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(
        pgm.register_ram(gpa(base + chunk), PAGE_SIZE, "inside"),
        Err(RamError::Range(RangeError::Overlap {
            existing: gpa(base + chunk)
        }))
    );
    assert_accounting(&pgm);
}

#[test]
fn typed_accessors_bypassing_handlers_are_little_endian_and_straddle_pages() {
    let mut pgm = pc_like();
    pgm.write_phys_u64_bypassing_handlers(gpa(0x1FFC), 0x1122_3344_5566_7788)
        .unwrap();
    assert_eq!(
        pgm.read_phys_u64_bypassing_handlers(gpa(0x1FFC)),
        Ok(0x1122_3344_5566_7788)
    );
    assert_eq!(pgm.read_phys_u32_bypassing_handlers(gpa(0x2000)), Ok(0x1122_3344));
    assert_eq!(pgm.read_phys_u16_bypassing_handlers(gpa(0x1FFC)), Ok(0x7788));
    assert_eq!(pgm.read_phys_u8_bypassing_handlers(gpa(0x1FFF)), Ok(0x55));
    pgm.write_phys_u8_bypassing_handlers(gpa(0x2003), 0xAA).unwrap();
    pgm.write_phys_u16_bypassing_handlers(gpa(0x3000), 0xBEEF)
        .unwrap();
    pgm.write_phys_u32_bypassing_handlers(gpa(0x4000), 0xDEAD_BEEF)
        .unwrap();
    assert_eq!(pgm.read_phys_u32_bypassing_handlers(gpa(0x2000)), Ok(0xAA22_3344));
    assert_eq!(
        (
            pgm.read_phys_u16_bypassing_handlers(gpa(0x3000)),
            pgm.read_phys_u32_bypassing_handlers(gpa(0x4000))
        ),
        (Ok(0xBEEF), Ok(0xDEAD_BEEF))
    );
    assert_eq!(
        pgm.read_phys_u16_bypassing_handlers(gpa(0x9_FFFF)),
        Err(AccessError::Page(PageError::NotGuestMemory(gpa(0xA_0000))))
    );
}

#[test]
fn a_host_write_across_write_ignoring_rom_and_ram_puts_each_byte_in_its_place() {
    let mut pgm = pgm_with_frames(4096);
    let image = rom_image();
    // ROM at [0, 8 KiB), RAM right after it.
    register_rom_copy(&mut pgm, gpa(0), &image, false).unwrap();
    pgm.register_ram(gpa(2 * PAGE_SIZE), PAGE_SIZE, "ram").unwrap();
    let data: Vec<u8> = (0..16).collect();
    pgm.write_phys(gpa(2 * PAGE_SIZE - 8), &data).unwrap();
    let mut back = [0u8; 16];
    pgm.read_phys(gpa(2 * PAGE_SIZE - 8), &mut back).unwrap();
    assert_eq!(
        back[..8],
        image[2 * PAGE_SIZE as usize - 8..],
        "the ROM ignored its half"
    );
    assert_eq!(back[8..], data[8..], "the RAM got the second half, not the first");
}

const VGA: u64 = 0xA_0000;

#[test]
fn an_mmio_page_aliased_to_mmio2_stops_trapping_until_the_region_is_reset() {
    let mut pgm = pc_like();
    let (vga, _) = pgm.register_mmio(gpa(VGA), 2 * PAGE_SIZE).unwrap();
    let bank = pgm.create_mmio2(mmio2_spec(4 * PAGE_SIZE, 0)).unwrap();
    pgm.mmio2_write(bank, 2 * PAGE_SIZE, b"bank two").unwrap();
    assert_eq!(
        pgm.alias_mmio_to_mmio2(vga, gpa(VGA + 0x10), bank, 2 * PAGE_SIZE),
        Ok(Invalidation::None)
    );
    assert_eq!(guest_read(&pgm, gpa(VGA), 8), b"bank two");
    assert_eq!(
        guest_write(&mut pgm, gpa(VGA + 4), b"TWO!"),
        GuestAccess::Done { faults: 0 }
    );
    let mut seen = [0; 8];
    pgm.mmio2_read(bank, 2 * PAGE_SIZE, &mut seen).unwrap();
    assert_eq!(&seen, b"bankTWO!", "the guest wrote the MMIO2 page");
    assert_eq!(
        pgm.resolve_fault(gpa(VGA + PAGE_SIZE), Access::Read),
        FaultOutcome::Handler { handler: vga }
    );
    // Switching banks remaps the page.
    assert_eq!(
        pgm.alias_mmio_to_mmio2(vga, gpa(VGA), bank, 0),
        Ok(Invalidation::SingleContext)
    );
    assert_eq!(guest_read(&pgm, gpa(VGA), 4), [0; 4]);
    assert_eq!(pgm.reset_handler(vga), Ok(Invalidation::SingleContext));
    assert_eq!(
        pgm.resolve_fault(gpa(VGA), Access::Read),
        FaultOutcome::Handler { handler: vga }
    );
    assert_accounting(&pgm);
}

#[test]
fn a_special_alias_maps_a_host_frame_the_vmm_keeps() {
    let mut pgm = pc_like();
    let (apic, _) = pgm.register_mmio(gpa(0xFEE0_0000), PAGE_SIZE).unwrap();
    let page = pgm.frames_mut().inner.allocate().unwrap();
    write_host(&mut pgm, page, b"apic");
    assert_eq!(
        pgm.alias_mmio_to_host(apic, gpa(0xFEE0_0000), page),
        Ok(Invalidation::None)
    );
    assert_eq!(
        pgm.translate(gpa(0xFEE0_0030), Access::Write).unwrap().as_u64(),
        page.as_u64() + 0x30
    );
    assert_eq!(guest_read(&pgm, gpa(0xFEE0_0000), 4), b"apic");
    // As pgmR3PhysRamZeroAll does: reset turns the alias back into plain MMIO.
    assert_eq!(pgm.reset_ram(), Invalidation::SingleContext);
    assert_eq!(
        pgm.resolve_fault(gpa(0xFEE0_0000), Access::Read),
        FaultOutcome::Handler { handler: apic },
        "reset undoes the alias"
    );
    assert_isolated(&pgm, "after the reset");
    let mut frames = pgm.terminate();
    // The frame is still the VMM's: freeing it here must succeed (it was not freed twice).
    frames.inner.free(page).unwrap();
    assert_eq!(frames.inner.counts().used(), 0);
}

#[test]
fn aliases_into_an_mmio2_region_go_when_the_region_or_its_tail_goes() {
    let mut pgm = pc_like();
    let (vga, _) = pgm.register_mmio(gpa(VGA), 2 * PAGE_SIZE).unwrap();
    let bank = pgm.create_mmio2(mmio2_spec(4 * PAGE_SIZE, 0)).unwrap();
    pgm.alias_mmio_to_mmio2(vga, gpa(VGA), bank, 0).unwrap();
    pgm.alias_mmio_to_mmio2(vga, gpa(VGA + PAGE_SIZE), bank, 3 * PAGE_SIZE)
        .unwrap();
    assert_eq!(
        pgm.reduce_mmio2(bank, 2 * PAGE_SIZE),
        Ok(Invalidation::SingleContext)
    );
    assert_eq!(
        pgm.resolve_fault(gpa(VGA + PAGE_SIZE), Access::Read),
        FaultOutcome::Handler { handler: vga }
    );
    assert!(
        pgm.translate(gpa(VGA), Access::Read).is_ok(),
        "the alias into the kept part stays"
    );
    pgm.deregister_mmio2(bank).unwrap();
    assert_eq!(
        pgm.resolve_fault(gpa(VGA), Access::Read),
        FaultOutcome::Handler { handler: vga }
    );
    assert_accounting(&pgm);
}

#[test]
fn bad_alias_requests_are_refused() {
    let mut pgm = pc_like();
    let (vga, _) = pgm.register_mmio(gpa(VGA), PAGE_SIZE).unwrap();
    let (plain, _) = pgm
        .register_handler(HandlerKind::Write, gpa(0x1000), PAGE_SIZE)
        .unwrap();
    let bank = pgm.create_mmio2(mmio2_spec(PAGE_SIZE, 0)).unwrap();
    assert_eq!(
        pgm.alias_mmio_to_mmio2(plain, gpa(0x1000), bank, 0),
        Err(HandlerError::Unknown(plain))
    );
    assert_eq!(
        pgm.alias_mmio_to_mmio2(vga, gpa(VGA + PAGE_SIZE), bank, 0),
        Err(HandlerError::NotHandled(gpa(VGA + PAGE_SIZE)))
    );
    assert_eq!(
        pgm.alias_mmio_to_mmio2(vga, gpa(VGA), bank, 0x800),
        Err(HandlerError::Mmio2(Mmio2Error::Range(RangeError::Misaligned(
            0x800
        ))))
    );
    assert_eq!(
        pgm.alias_mmio_to_mmio2(vga, gpa(VGA), bank, PAGE_SIZE),
        Err(HandlerError::Mmio2(Mmio2Error::OutOfRange(bank)))
    );
    assert_eq!(
        pgm.alias_mmio_to_host(vga, gpa(VGA), HostPhysAddr::new(0x1234).unwrap()),
        Err(HandlerError::Range(RangeError::Misaligned(0x1234)))
    );
    assert_eq!(
        pgm.resolve_fault(gpa(VGA), Access::Read),
        FaultOutcome::Handler { handler: vga }
    );
}

#[test]
fn identical_pages_share_one_frame_until_written() {
    let mut pgm = pc_like();
    for at in [0x1000, 0x2000, MIB, 5 * MIB] {
        guest_write(&mut pgm, gpa(at), b"same contents");
    }
    guest_write(&mut pgm, gpa(0x3000), b"different");
    let used = frames_used(&pgm);
    let (report, invalidation) = pgm.share_identical_pages();
    assert_eq!(
        report,
        crate::manager::SharingReport {
            pages_shared: 4,
            frames_freed: 3
        }
    );
    assert_eq!(invalidation, Invalidation::SingleContext);
    flush_every_cpu(&mut pgm);
    let stats = pgm.stats();
    assert_eq!(
        (stats.shared_pages, stats.shared_frames, stats.allocated_pages),
        (4, 1, 1)
    );
    assert_accounting(&pgm);
    assert_eq!(
        frames_used(&pgm),
        used - 3,
        "the pass gives the duplicates back to the host"
    );
    let frame = pgm.page(gpa(0x1000)).unwrap().frame();
    assert_eq!(pgm.page(gpa(5 * MIB)).unwrap().frame(), frame);
    assert_eq!(
        pgm.translate(gpa(MIB), Access::Write).unwrap_err().permitted,
        Permissions::READ | Permissions::EXECUTE
    );
    // Copy on write: the writer gets its own frame, the others keep the shared one.
    assert_eq!(
        guest_write(&mut pgm, gpa(MIB + 1), b"A"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(guest_read(&pgm, gpa(MIB), 13), b"sAme contents");
    assert_eq!(guest_read(&pgm, gpa(0x2000), 13), b"same contents");
    assert_eq!(pgm.stats().shared_pages, 3);
    assert_eq!(
        pgm.share_identical_pages().0.pages_shared,
        0,
        "nothing new to share"
    );
    // A host write copies a shared page too, and the guest's cached translation of it is stale.
    assert_eq!(
        pgm.write_phys(gpa(0x2000), b"host"),
        Ok(Invalidation::SingleContext)
    );
    assert_eq!(guest_read(&pgm, gpa(0x1000), 4), b"same");
    assert_eq!(
        pgm.write_phys(gpa(0x2000), b"HOST"),
        Ok(Invalidation::None),
        "private now"
    );
    assert_accounting(&pgm);
}

#[test]
fn the_last_page_to_let_go_frees_the_shared_frame() {
    let mut pgm = pc_like();
    for at in [0x1000, 0x2000] {
        guest_write(&mut pgm, gpa(at), b"twin");
    }
    pgm.share_identical_pages();
    pgm.balloon_inflate(&[gpa(0x1000)]).unwrap();
    assert_eq!(pgm.stats().shared_frames, 1, "one sharer left");
    pgm.reset_ram();
    assert_eq!((pgm.stats().shared_frames, pgm.stats().shared_pages), (0, 0));
    assert_accounting(&pgm);
    guest_write(&mut pgm, gpa(0x4000), b"x");
    guest_write(&mut pgm, gpa(0x5000), b"x");
    pgm.share_identical_pages();
    let mapping = pgm.lock_page_for_read(gpa(0x4000)).unwrap();
    assert_eq!(
        mapping.invalidation,
        Invalidation::None,
        "reading does not unshare"
    );
    assert_eq!(pgm.page(gpa(0x4000)).unwrap().state(), PageState::Shared);
    pgm.release_page_lock(mapping.lock);
    assert_accounting(&pgm);
    let frames = pgm.terminate();
    assert_eq!(frames.inner.counts().used(), 0, "shared frames are freed once");
}

#[test]
fn unregistering_ram_gives_its_frames_back_and_unmaps_it() {
    let mut pgm = pc_like();
    let chunk = crate::manager::RAM_CHUNK_PAGES * PAGE_SIZE;
    let base = 0x1_0000_0000;
    // 16 GiB: large pages, so that untouched blocks need no page tables.
    pgm.set_large_pages(true);
    pgm.register_ram(gpa(base), chunk + 4 * PAGE_SIZE, "hotplug")
        .unwrap();
    guest_write(&mut pgm, gpa(base + chunk), b"x");
    pgm.balloon_inflate(&[gpa(base)]).unwrap();
    let (stats, used) = (pgm.stats(), frames_used(&pgm));
    assert_eq!(
        pgm.unregister_ram(gpa(base), chunk),
        Err(RamError::Range(RangeError::Overlap { existing: gpa(base) })),
        "part of it"
    );
    assert_eq!(
        pgm.unregister_ram(gpa(0x9_F000), PAGE_SIZE),
        Err(RamError::Range(RangeError::Overlap { existing: gpa(0) }))
    );
    let lock = pgm.lock_page_for_read(gpa(base + 0x1000)).unwrap().lock;
    assert_eq!(
        pgm.unregister_ram(gpa(base), chunk + 4 * PAGE_SIZE),
        Err(RamError::Page(PageError::Locked(gpa(base + 0x1000))))
    );
    pgm.release_page_lock(lock);
    assert_eq!(
        (pgm.stats(), frames_used(&pgm)),
        (stats, used),
        "refusals changed nothing"
    );
    assert_eq!(
        pgm.unregister_ram(gpa(base), chunk + 4 * PAGE_SIZE),
        Ok(Invalidation::SingleContext)
    );
    assert_eq!(pgm.stats().ram_pages, 160 + 3840);
    assert_eq!(pgm.stats().ballooned_pages, 0);
    assert_eq!(
        pgm.resolve_fault(gpa(base + chunk), Access::Read),
        FaultOutcome::NotGuestMemory
    );
    assert!(pgm.translate(gpa(base + chunk), Access::Read).is_err());
    assert_accounting(&pgm);
    pgm.register_ram(gpa(base), PAGE_SIZE, "again").unwrap();
}

#[test]
fn a_special_alias_is_mapped_uncacheable() {
    let mut pgm = pc_like();
    let (apic, _) = pgm.register_mmio(gpa(0xFEE0_0000), PAGE_SIZE).unwrap();
    let page = pgm.frames_mut().inner.allocate().unwrap();
    pgm.alias_mmio_to_host(apic, gpa(0xFEE0_0000), page).unwrap();
    match pgm.nested_entry(gpa(0xFEE0_0000)) {
        Entry::Leaf(leaf) => assert_eq!(leaf.memory_type, MemoryType::Uncacheable),
        other => panic!("not mapped: {other:?}"),
    }
}

#[test]
fn locking_a_write_monitored_page_keeps_its_frame_and_needs_no_flush() {
    let mut pgm = pc_like();
    guest_write(&mut pgm, gpa(0x6000), b"m");
    pgm.start_write_monitoring();
    let frame = pgm.page(gpa(0x6000)).unwrap().frame();
    let mapping = pgm.lock_page_for_write(gpa(0x6000)).unwrap();
    assert_eq!(
        mapping.invalidation,
        Invalidation::None,
        "only write permission was added"
    );
    assert_eq!(pgm.page(gpa(0x6000)).unwrap().frame(), frame);
    pgm.release_page_lock(mapping.lock);
}

#[test]
fn a_resolved_fault_names_what_it_did_to_the_page() {
    let mut pgm = pc_like();
    let (page, twin) = (gpa(0x20_0000), gpa(0x30_0000));
    let write_fault = |pgm: &mut SimPgm, at| match pgm.resolve_fault(at, Access::Write) {
        FaultOutcome::Resolved { resolution, .. } => resolution,
        other => panic!("write fault at {at}: {other:?}"),
    };
    assert_eq!(write_fault(&mut pgm, page), Resolution::ZeroFill);
    pgm.start_write_monitoring();
    assert_eq!(write_fault(&mut pgm, page), Resolution::WriteMonitor);
    pgm.stop_write_monitoring();
    pgm.write_phys(page, b"twin").unwrap();
    pgm.write_phys(twin, b"twin").unwrap();
    pgm.share_identical_pages();
    assert_eq!(pgm.page(page).unwrap().state(), PageState::Shared);
    assert_eq!(write_fault(&mut pgm, page), Resolution::CopyOnWrite);
    assert_eq!(
        pgm.resolve_fault(page, Access::Read),
        FaultOutcome::Resolved {
            invalidation: Invalidation::None,
            resolution: Resolution::Remap,
        }
    );
}

#[test]
fn accesses_of_one_two_and_many_pages_round_trip() {
    let mut pgm = pc_like();
    // Lengths that give one piece, two pieces (kept inline) and five (kept on the heap).
    for (at, len) in [
        (0x20_0100, 64),
        (0x20_0FFC, 8),
        (0x30_0800, 4 * PAGE_SIZE as usize),
    ] {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + at as usize) as u8).collect();
        pgm.write_phys(gpa(at), &data).unwrap();
        let mut back = vec![0u8; len];
        pgm.read_phys(gpa(at), &mut back).unwrap();
        assert_eq!(back, data, "{len} bytes at {at:#x}");
    }
    assert_accounting(&pgm);
}
