//! Tests of MMIO2 regions and their dirty tracking (`mmio2.rs`) on the simulated host.

use alloc::vec::Vec;

use crate::addr::PAGE_SIZE;
use crate::error::{Mmio2Error, RangeError};
use crate::manager::{FaultOutcome, Mmio2Handle};
use crate::paging::{Access, Invalidation};
use crate::test_support::*;

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
