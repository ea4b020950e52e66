//! Tests of page sharing (`sharing.rs`) on the simulated host.

use crate::page::PageState;
use crate::paging::{Access, Invalidation, Permissions};
use crate::test_support::*;

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
