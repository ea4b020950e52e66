//! Tests of 2 MiB mappings (`large.rs`): filling, splitting and merging blocks.

use crate::addr::PAGE_SIZE;
use crate::handlers::HandlerKind;
use crate::manager::{FaultOutcome, Resolution};
use crate::paging::{Access, Invalidation};
use crate::test_support::*;

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
