//! Tests of the manager's core (`mod.rs`) on the simulated host: RAM registration and
//! unregistration, fault resolution, host access, reset, write monitoring, the balloon, the
//! frame limit, pre-allocation and the A20 gate. Guest accesses go through the software
//! nested-paging walker as the CPU's would: a violation is handed to `resolve_fault` and the
//! access retried (`test_support::guest_write`).

use alloc::vec;
use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::error::{AccessError, NoMemory, PageError, RamError, RangeError};
use crate::frames::HostMemory;
use crate::manager::{FaultOutcome, HandlerAction, Resolution};
use crate::page::PageState;
use crate::paging::{Access, Entry, Invalidation, MemoryType, Permissions};
use crate::test_support::*;

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

/// The seed's VM_FF_PGM_NO_MEMORY: a fault that finds no frame stops the VM without changing
/// the page (nor anything else), and the same access resolves once frames are back, whether
/// the VM freed some (here: a page given to the balloon) or its limit was raised.
#[test]
fn out_of_frames_is_a_resumable_stop_once_frames_are_freed_or_the_limit_raised() {
    let mut pgm = pc_like();
    guest_write(&mut pgm, gpa(0x1000), b"a");
    guest_write(&mut pgm, gpa(0x2000), b"b");
    pgm.set_frame_limit(Some(private(&pgm)));
    let (stats, used) = (pgm.stats(), frames_used(&pgm));
    assert_eq!(
        pgm.resolve_fault(gpa(0x3000), Access::Write),
        FaultOutcome::OutOfMemory
    );
    assert_eq!(
        (pgm.stats(), frames_used(&pgm)),
        (stats, used),
        "the stop changed nothing"
    );
    assert_eq!(pgm.page(gpa(0x3000)).unwrap().state(), PageState::Zero);
    assert_isolated(&pgm, "stopped for want of a frame");
    // Resumed after the VM freed a frame: the same access resolves.
    pgm.balloon_inflate(&[gpa(0x1000)]).unwrap();
    assert_eq!(
        guest_write(&mut pgm, gpa(0x3000), b"c"),
        GuestAccess::Done { faults: 1 }
    );
    // Stopped again at the limit, and resumed once it is raised.
    assert_eq!(
        guest_write(&mut pgm, gpa(0x4000), b"d"),
        GuestAccess::Stopped(FaultOutcome::OutOfMemory)
    );
    pgm.set_frame_limit(Some(private(&pgm) + 1));
    assert_eq!(
        guest_write(&mut pgm, gpa(0x4000), b"d"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(
        [
            guest_read(&pgm, gpa(0x2000), 1),
            guest_read(&pgm, gpa(0x3000), 1),
            guest_read(&pgm, gpa(0x4000), 1)
        ],
        [b"b", b"c", b"d"]
    );
    assert_accounting(&pgm);
    assert_isolated(&pgm, "resumed");
}

/// The seed emulates a guest's accesses to a ballooned page (PGMAllBth.h 840-849) through
/// PGMPhysRead, which reads its zero page (PGMAllPhys.cpp 1261-1277), and PGMPhysWrite, which
/// ignores the write (PGMAllPhys.cpp 2788-2801). Here the fault names the page, and every host
/// access path reads zeros and drops writes, without the page getting a frame.
#[test]
fn ballooned_pages_read_as_zeros_and_writes_to_them_are_dropped() {
    let mut pgm = pc_like();
    guest_write(&mut pgm, gpa(0x5000), b"gone");
    pgm.balloon_inflate(&[gpa(0x5000)]).unwrap();
    let stats = pgm.stats();
    for access in [Access::Read, Access::Write, Access::Execute] {
        assert_eq!(pgm.resolve_fault(gpa(0x5000), access), FaultOutcome::Ballooned);
    }
    // Straddling into the next page: the ballooned part is dropped, the rest lands.
    assert_eq!(
        pgm.write_phys(gpa(0x5FFE), b"abcd"),
        Ok(Invalidation::SingleContext)
    );
    assert_eq!(
        pgm.write_phys_u32_bypassing_handlers(gpa(0x5010), 7),
        Ok(Invalidation::None)
    );
    let mut devices = recorder(HandlerAction::Default);
    pgm.write_phys_handled(gpa(0x5020), b"xyz", &mut devices).unwrap();
    pgm.write_phys_u64(gpa(0x5030), u64::MAX, &mut devices).unwrap();
    let mut page = vec![0xFF; PAGE_SIZE as usize];
    pgm.read_phys(gpa(0x5000), &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0), "a ballooned page reads as zeros");
    assert_eq!(pgm.read_phys_u64(gpa(0x5030), &mut devices), Ok(0));
    let mut handled = [0xFF; 8];
    pgm.read_phys_handled(gpa(0x5FFC), &mut handled, &mut devices)
        .unwrap();
    assert_eq!(handled, [0, 0, 0, 0, b'c', b'd', 0, 0]);
    assert!(devices.calls.is_empty(), "no handler covers the page");
    let page = pgm.page(gpa(0x5000)).unwrap();
    assert_eq!((page.state(), page.frame()), (PageState::Ballooned, None));
    let after = pgm.stats();
    assert_eq!(
        (after.ballooned_pages, after.private_frames()),
        (stats.ballooned_pages, stats.private_frames() + 1),
        "only the page after the balloon got a frame"
    );
    assert_isolated(&pgm, "after the writes to the balloon");
}
