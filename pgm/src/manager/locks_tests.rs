//! Tests of page-map locks (`locks.rs`) on the simulated host.

use crate::addr::PAGE_SIZE;
use crate::error::{HandlerError, LockError, PageError, RamError};
use crate::frames::HostMemory;
use crate::handlers::HandlerKind;
use crate::manager::PageMapping;
use crate::page::PageState;
use crate::paging::Invalidation;
use crate::test_support::*;

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
