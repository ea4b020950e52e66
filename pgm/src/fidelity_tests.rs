//! Tests of the seed's semantics (issue "seed fidelity"): ROM and MMIO2 over RAM, ROM
//! protection by page range, MMIO2 dirty-tracking control and region management, reset
//! modes, external access to unassigned space, map locks, the seed's memory reports and the
//! map dump. Every test that maps memory runs the EPT auditor.

use alloc::vec;
use alloc::vec::Vec;

use crate::addr::PAGE_SIZE;
use crate::error::{AccessError, Mmio2Error, PageError, RangeError, RomError};
use crate::frames::HostMemory;
use crate::handlers::{HandlerId, HandlerKind};
use crate::manager::{
    AccessHandlers, DeviceId, FaultOutcome, GlobalMemoryReport, HandlerAction, Mmio2Spec, RomImage,
    RomProtection, VmMemoryReport, MMIO2_MAX_PAGES, MMIO2_MAX_REGIONS,
};
use crate::page::PageState;
use crate::paging::{Access, Invalidation};
use crate::test_support::*;
use crate::GuestPhysAddr;

const BIOS: u64 = 0xE_0000;
const BIOS_SIZE: u64 = 0x2_0000;

/// A VM with 2 MiB of RAM from 0, as a PC's system RAM before the BIOS is put over it.
fn ram_from_zero() -> SimPgm {
    let mut pgm = pgm_with_frames(4096);
    pgm.register_ram(gpa(0), 2 * MIB, "ram").unwrap();
    pgm
}

fn image(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i % 251) as u8)).collect()
}

/// Frames backing guest memory: what the allocator handed out less the handy pool, pending
/// frees and EPT tables.
fn memory_frames(pgm: &SimPgm) -> u64 {
    let stats = pgm.stats();
    frames_used(pgm) - stats.handy_frames - stats.pending_free_frames - stats.table_frames
}

fn host_read(pgm: &SimPgm, at: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    pgm.read_phys(gpa(at), &mut buf).unwrap();
    buf
}

// 1. ROM over RAM.

#[test]
fn a_rom_over_ram_replaces_the_pages_and_removing_it_gives_them_back_as_zero_ram() {
    let mut pgm = ram_from_zero();
    guest_write(&mut pgm, gpa(BIOS + 0x1000), b"old RAM");
    let used = memory_frames(&pgm);
    let bios = image(BIOS_SIZE as usize, 7);
    let (id, invalidation) = pgm
        .register_rom(gpa(BIOS), BIOS_SIZE, RomImage::Copy(&bios), true)
        .unwrap();
    assert_eq!(
        invalidation,
        Invalidation::SingleContext,
        "RAM mappings were replaced"
    );
    assert_eq!(guest_read(&pgm, gpa(BIOS + 0x1000), 16), bios[0x1000..0x1010]);
    assert_eq!(pgm.stats().rom_pages, 32);
    assert_eq!(
        memory_frames(&pgm),
        used + 32 - 1,
        "32 image frames in, the written RAM page's frame out"
    );
    assert_accounting(&pgm);
    assert_isolated(&pgm, "with the BIOS over RAM");
    // Shadowing works as for a ROM of its own.
    pgm.protect_rom(id, RomProtection::ReadRamWriteRam).unwrap();
    assert_eq!(
        guest_write(&mut pgm, gpa(BIOS), b"shadow"),
        GuestAccess::Done { faults: 1 }
    );
    assert_isolated(&pgm, "with the shadow written");

    assert_eq!(pgm.deregister_rom(id), Ok(Invalidation::SingleContext));
    assert_eq!(guest_read(&pgm, gpa(BIOS), 6), [0; 6], "ZERO RAM again");
    assert_eq!(pgm.page(gpa(BIOS)).unwrap().state(), PageState::Zero);
    assert_eq!(
        guest_write(&mut pgm, gpa(BIOS), b"ram"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(pgm.stats().rom_pages, 0);
    assert_eq!(memory_frames(&pgm), used, "image and shadow frames went back");
    assert_accounting(&pgm);
    assert_isolated(&pgm, "after the BIOS went");
    assert_eq!(pgm.deregister_rom(id), Err(RomError::Unknown(id)));
}

#[test]
fn a_rom_over_ram_is_refused_under_a_handler_a_lock_or_partly_over_unassigned_space() {
    let mut pgm = ram_from_zero();
    let bios = image(BIOS_SIZE as usize, 1);
    let (handler, _) = pgm
        .register_handler(HandlerKind::Write, gpa(BIOS + 0x3000), PAGE_SIZE)
        .unwrap();
    let used = memory_frames(&pgm);
    assert_eq!(
        pgm.register_rom(gpa(BIOS), BIOS_SIZE, RomImage::Copy(&bios), false),
        Err(RomError::Page(PageError::HandlerPresent(gpa(BIOS + 0x3000))))
    );
    pgm.deregister_handler(handler).unwrap();
    let lock = pgm.lock_page_for_read(gpa(BIOS + 0x5000)).unwrap().lock;
    assert_eq!(
        pgm.register_rom(gpa(BIOS), BIOS_SIZE, RomImage::Copy(&bios), false),
        Err(RomError::Page(PageError::Locked(gpa(BIOS + 0x5000))))
    );
    pgm.release_page_lock(lock);
    assert!(matches!(
        pgm.register_rom(
            gpa(2 * MIB - 0x1000),
            0x2000,
            RomImage::Copy(&bios[..0x2000]),
            false
        ),
        Err(RomError::Range(RangeError::Overlap { .. }))
    ));
    assert_eq!(memory_frames(&pgm), used, "nothing was kept");
    assert_isolated(&pgm, "after the refusals");
}

#[test]
fn a_rom_image_shorter_than_its_range_reads_zeros_after_it_even_after_reset() {
    let mut pgm = ram_from_zero();
    let short = image(5000, 3);
    let (id, _) = pgm
        .register_rom(gpa(BIOS), 3 * PAGE_SIZE, RomImage::Copy(&short), false)
        .unwrap();
    let seen = host_read(&pgm, BIOS, 3 * PAGE_SIZE as usize);
    assert_eq!(&seen[..5000], &short[..]);
    assert!(seen[5000..].iter().all(|&b| b == 0), "the rest reads as zeros");
    // Corrupt the tail behind the manager's back: reset restores zeros there.
    let virgin = pgm.translate(gpa(BIOS + 0x2000), Access::Read).unwrap();
    write_host(&mut pgm, virgin, b"junk");
    pgm.reset_ram();
    assert_eq!(host_read(&pgm, BIOS + 0x2000, 4), [0; 4]);
    assert_eq!(pgm.rom_image(id).map(<[u8]>::len), Some(5000));
    assert_eq!(
        pgm.register_rom(gpa(0x4000), PAGE_SIZE, RomImage::Copy(&short), false),
        Err(RomError::ImageTooLarge {
            image: 5000,
            range: PAGE_SIZE
        })
    );
    assert_isolated(&pgm, "after the reset");
}

static PERMANENT: [u8; 8192] = [0x5A; 8192];

#[test]
fn a_permanent_rom_image_is_not_copied_and_reset_restores_from_it() {
    let mut pgm = ram_from_zero();
    let (id, _) = pgm
        .register_rom(gpa(BIOS), 2 * PAGE_SIZE, RomImage::Permanent(&PERMANENT), false)
        .unwrap();
    assert!(
        core::ptr::eq(pgm.rom_image(id).unwrap(), &PERMANENT[..]),
        "the ROM keeps the caller's bytes, not a copy"
    );
    let copied = vec![0x5A; 8192];
    let (other, _) = pgm
        .register_rom(gpa(0x10_0000), 2 * PAGE_SIZE, RomImage::Copy(&copied), false)
        .unwrap();
    assert!(
        !core::ptr::eq(pgm.rom_image(other).unwrap(), &copied[..]),
        "a copy is a copy"
    );
    let virgin = pgm.translate(gpa(BIOS + 0x1000), Access::Read).unwrap();
    write_host(&mut pgm, virgin, b"corrupt");
    pgm.reset_ram();
    assert_eq!(
        host_read(&pgm, BIOS + 0x1000, 7),
        [0x5A; 7],
        "restored from the permanent bytes"
    );
    assert_isolated(&pgm, "after the reset");
}

// 2. ROM protection by page range.

#[test]
fn protecting_part_of_a_rom_changes_only_those_pages_and_skips_what_is_not_shadowed_rom() {
    let mut pgm = ram_from_zero();
    let bios = image(4 * PAGE_SIZE as usize, 9);
    let option = image(PAGE_SIZE as usize, 100);
    pgm.register_rom(gpa(BIOS), 4 * PAGE_SIZE, RomImage::Copy(&bios), true)
        .unwrap();
    pgm.register_rom(gpa(0xC_0000), PAGE_SIZE, RomImage::Copy(&option), false)
        .unwrap();
    // Pages 1 and 2 only.
    assert_eq!(
        pgm.protect_rom_range(gpa(BIOS + 0x1000), 2 * PAGE_SIZE, RomProtection::ReadRamWriteRam),
        Ok(Invalidation::SingleContext)
    );
    let modes: Vec<_> = (0..4)
        .map(|page| pgm.rom_protection_at(gpa(BIOS + page * PAGE_SIZE)).unwrap())
        .collect();
    assert_eq!(
        modes,
        [
            RomProtection::ReadRomWriteIgnore,
            RomProtection::ReadRamWriteRam,
            RomProtection::ReadRamWriteRam,
            RomProtection::ReadRomWriteIgnore
        ]
    );
    assert_eq!(
        guest_write(&mut pgm, gpa(BIOS + 0x1000), b"shadow"),
        GuestAccess::Done { faults: 1 }
    );
    assert_eq!(guest_read(&pgm, gpa(BIOS + 0x1000), 6), b"shadow");
    assert_eq!(
        guest_write(&mut pgm, gpa(BIOS + 0x3000), b"x"),
        GuestAccess::Stopped(FaultOutcome::WriteIgnored),
        "page 3 kept its mode"
    );
    assert_eq!(guest_read(&pgm, gpa(BIOS), 4), bios[..4]);
    // A range over the unshadowed option ROM, RAM and the BIOS: the rest is skipped.
    assert_eq!(
        pgm.protect_rom_range(
            gpa(0xC_0000),
            BIOS - 0xC_0000 + PAGE_SIZE,
            RomProtection::ReadRomWriteRam
        ),
        Ok(Invalidation::SingleContext)
    );
    assert_eq!(
        pgm.rom_protection_at(gpa(0xC_0000)),
        Some(RomProtection::ReadRomWriteIgnore)
    );
    assert_eq!(
        pgm.rom_protection_at(gpa(BIOS)),
        Some(RomProtection::ReadRomWriteRam)
    );
    assert_eq!(
        guest_write(&mut pgm, gpa(BIOS), b"x"),
        GuestAccess::Stopped(FaultOutcome::EmulateWrite)
    );
    assert_eq!(
        pgm.protect_rom_range(gpa(BIOS), 0, RomProtection::ReadRamWriteRam),
        Ok(Invalidation::None)
    );
    assert_eq!(
        pgm.protect_rom_range(gpa(BIOS + 1), PAGE_SIZE, RomProtection::ReadRamWriteRam),
        Err(RomError::Range(RangeError::Misaligned(BIOS + 1)))
    );
    assert_isolated(&pgm, "after the partial protections");
}

// 3. MMIO2 over RAM.

#[test]
fn mmio2_over_ram_replaces_the_pages_while_mapped_and_gives_them_back_as_zero_pages() {
    let mut pgm = ram_from_zero();
    let at = 0x10_0000;
    for page in 0..4 {
        guest_write(&mut pgm, gpa(at + page * PAGE_SIZE), b"ram data");
    }
    let fb = pgm.create_mmio2(mmio2_spec(4 * PAGE_SIZE, 0)).unwrap();
    pgm.mmio2_write(fb, 0x2000, b"pixels").unwrap();
    let used = memory_frames(&pgm);
    assert_eq!(pgm.map_mmio2(fb, gpa(at)), Ok(Invalidation::SingleContext));
    assert_eq!(memory_frames(&pgm), used - 4, "the RAM pages' frames went back");
    assert_eq!(guest_read(&pgm, gpa(at + 0x2000), 6), b"pixels");
    assert_eq!(
        guest_write(&mut pgm, gpa(at + 0x3000), b"guest"),
        GuestAccess::Done { faults: 0 }
    );
    let mut device = [0; 5];
    pgm.mmio2_read(fb, 0x3000, &mut device).unwrap();
    assert_eq!(&device, b"guest");
    assert_accounting(&pgm);
    assert_isolated(&pgm, "with the framebuffer over RAM");

    assert_eq!(pgm.unmap_mmio2(fb), Ok(Invalidation::SingleContext));
    for page in 0..4 {
        let gpa = gpa(at + page * PAGE_SIZE);
        assert_eq!(pgm.page(gpa).unwrap().state(), PageState::Zero);
        assert_eq!(guest_read(&pgm, gpa, 8), [0; 8]);
    }
    pgm.mmio2_read(fb, 0x3000, &mut device).unwrap();
    assert_eq!(&device, b"guest", "device memory stays with the region");
    assert_isolated(&pgm, "after unmapping");
    pgm.deregister_mmio2(fb).unwrap();
    assert_accounting(&pgm);
    assert_isolated(&pgm, "after deregistering");
}

// 4. MMIO2 dirty-tracking control.

fn tracked_framebuffer(pgm: &mut SimPgm, pages: u64) -> crate::manager::Mmio2Handle {
    let fb = pgm.create_mmio2(mmio2_spec(pages * PAGE_SIZE, 0)).unwrap();
    pgm.set_mmio2_dirty_tracking(fb, true).unwrap();
    pgm.map_mmio2(fb, gpa(0xE000_0000)).unwrap();
    fb
}

fn dirty_pages(pgm: &mut SimPgm, fb: crate::manager::Mmio2Handle) -> Vec<usize> {
    let mut bitmap = Vec::new();
    pgm.query_and_reset_mmio2_dirty(fb, Some(&mut bitmap)).unwrap();
    bits(&bitmap)
}

#[test]
fn switching_mmio2_tracking_off_keeps_the_bits_already_collected() {
    let mut pgm = pc_like();
    let fb = tracked_framebuffer(&mut pgm, 8);
    guest_write(&mut pgm, gpa(0xE000_3000), b"x");
    pgm.set_mmio2_dirty_tracking(fb, false).unwrap();
    pgm.set_mmio2_dirty_tracking(fb, true).unwrap();
    // Off while mapped: writes could have gone unseen, so the whole region is reported.
    assert_eq!(dirty_pages(&mut pgm, fb), (0..8).collect::<Vec<_>>());
    // Off after unmapping: nothing can go unseen; the collected bit stays.
    guest_write(&mut pgm, gpa(0xE000_5000), b"x");
    pgm.unmap_mmio2(fb).unwrap();
    pgm.set_mmio2_dirty_tracking(fb, false).unwrap();
    assert_eq!(
        dirty_pages(&mut pgm, fb),
        [5],
        "kept across unmapping and switching off"
    );
    assert_eq!(dirty_pages(&mut pgm, fb), Vec::<usize>::new());
    assert_isolated(&pgm, "after the queries");
}

#[test]
fn an_mmio2_region_mapped_untracked_reports_every_page_at_its_next_query() {
    let mut pgm = pc_like();
    let fb = pgm.create_mmio2(mmio2_spec(3 * PAGE_SIZE, 0)).unwrap();
    pgm.map_mmio2(fb, gpa(0xE000_0000)).unwrap();
    assert_eq!(
        guest_write(&mut pgm, gpa(0xE000_1000), b"x"),
        GuestAccess::Done { faults: 0 }
    );
    assert_eq!(dirty_pages(&mut pgm, fb), [0, 1, 2]);
    pgm.set_mmio2_dirty_tracking(fb, true).unwrap();
    assert_eq!(
        dirty_pages(&mut pgm, fb),
        [0, 1, 2],
        "the untracked time since the last query"
    );
    assert_eq!(
        dirty_pages(&mut pgm, fb),
        Vec::<usize>::new(),
        "tracked from then on"
    );
}

#[test]
fn a_dirty_query_without_a_buffer_only_resets() {
    let mut pgm = pc_like();
    let fb = tracked_framebuffer(&mut pgm, 4);
    guest_write(&mut pgm, gpa(0xE000_2000), b"x");
    assert_eq!(
        pgm.query_and_reset_mmio2_dirty(fb, None),
        Ok(Invalidation::SingleContext)
    );
    assert_eq!(dirty_pages(&mut pgm, fb), Vec::<usize>::new());
    assert_eq!(
        guest_write(&mut pgm, gpa(0xE000_2000), b"y"),
        GuestAccess::Done { faults: 1 },
        "the page is protected again"
    );
    assert_eq!(dirty_pages(&mut pgm, fb), [2]);
}

#[test]
fn a_region_created_without_dirty_tracking_refuses_it() {
    let mut pgm = pc_like();
    let spec = Mmio2Spec {
        track_dirty_pages: false,
        ..mmio2_spec(PAGE_SIZE, 0)
    };
    let plain = pgm.create_mmio2(spec).unwrap();
    assert_eq!(
        pgm.set_mmio2_dirty_tracking(plain, true),
        Err(Mmio2Error::NotTrackable(plain))
    );
    assert_eq!(
        pgm.query_and_reset_mmio2_dirty(plain, None),
        Err(Mmio2Error::NotTrackable(plain))
    );
}

// 5. MMIO2 region management.

#[test]
fn mmio2_region_numbers_are_unique_per_device_and_the_seed_limits_hold() {
    let mut pgm = pgm_with_frames(4096);
    let spec = |device, region_no| Mmio2Spec {
        device: DeviceId(device),
        region_no,
        size: PAGE_SIZE,
        track_dirty_pages: false,
    };
    let first = pgm.create_mmio2(spec(1, 0)).unwrap();
    assert_eq!(
        pgm.create_mmio2(spec(1, 0)),
        Err(Mmio2Error::RegionExists {
            device: DeviceId(1),
            region_no: 0
        })
    );
    let second = pgm.create_mmio2(spec(1, 1)).unwrap();
    pgm.create_mmio2(spec(2, 0)).unwrap();
    assert_eq!(
        pgm.change_mmio2_region_no(second, 0),
        Err(Mmio2Error::RegionExists {
            device: DeviceId(1),
            region_no: 0
        })
    );
    pgm.change_mmio2_region_no(first, 7).unwrap();
    pgm.change_mmio2_region_no(second, 0).unwrap();
    assert_eq!(pgm.mmio2_device(second), Some(DeviceId(1)));
    assert_eq!(
        pgm.create_mmio2(Mmio2Spec {
            size: (MMIO2_MAX_PAGES + 1) * PAGE_SIZE,
            ..spec(3, 0)
        }),
        Err(Mmio2Error::TooLarge((MMIO2_MAX_PAGES + 1) * PAGE_SIZE))
    );
    for region_no in 0..(MMIO2_MAX_REGIONS - 3) as u32 {
        pgm.create_mmio2(spec(4, region_no)).unwrap();
    }
    let used = memory_frames(&pgm);
    assert_eq!(pgm.create_mmio2(spec(5, 0)), Err(Mmio2Error::TooManyRegions));
    assert_eq!(memory_frames(&pgm), used, "refusals allocate nothing");
}

#[test]
fn deregistering_a_device_removes_all_its_regions_at_once_or_none() {
    let mut pgm = pc_like();
    let device = DeviceId(9);
    let spec = |region_no| Mmio2Spec {
        device,
        region_no,
        size: 2 * PAGE_SIZE,
        track_dirty_pages: true,
    };
    let used = memory_frames(&pgm);
    let a = pgm.create_mmio2(spec(0)).unwrap();
    let b = pgm.create_mmio2(spec(1)).unwrap();
    let other = pgm.create_mmio2(mmio2_spec(PAGE_SIZE, 0)).unwrap();
    pgm.map_mmio2(a, gpa(0xE000_0000)).unwrap();
    pgm.map_mmio2(b, gpa(0x10_0000)).unwrap();
    let lock = pgm.lock_page_for_read(gpa(0x10_1000)).unwrap().lock;
    assert_eq!(
        pgm.deregister_device_mmio2(device),
        Err(Mmio2Error::Page(PageError::Locked(gpa(0x10_1000))))
    );
    assert!(pgm.is_mmio2_handle(a) && pgm.is_mmio2_handle(b), "all or none");
    pgm.release_page_lock(lock);
    assert_eq!(
        pgm.deregister_device_mmio2(device),
        Ok(Invalidation::SingleContext)
    );
    assert!(!pgm.is_mmio2_handle(a) && !pgm.is_mmio2_handle(b));
    assert!(pgm.is_mmio2_handle(other), "another device's region stays");
    assert_eq!(
        pgm.page(gpa(0x10_1000)).unwrap().state(),
        PageState::Zero,
        "RAM is back"
    );
    assert_eq!(memory_frames(&pgm), used + 1);
    assert_isolated(&pgm, "after the device went");
}

#[test]
fn reducing_an_mmio2_region_shrinks_its_next_mapping_and_gives_the_tail_back() {
    let mut pgm = pc_like();
    let fb = pgm.create_mmio2(mmio2_spec(4 * PAGE_SIZE, 0)).unwrap();
    let used = memory_frames(&pgm);
    pgm.map_mmio2(fb, gpa(0xE000_0000)).unwrap();
    assert_eq!(pgm.reduce_mmio2(fb, PAGE_SIZE), Err(Mmio2Error::Mapped(fb)));
    pgm.unmap_mmio2(fb).unwrap();
    pgm.reduce_mmio2(fb, PAGE_SIZE).unwrap();
    assert_eq!(memory_frames(&pgm), used - 3, "the tail's three frames went back");
    pgm.map_mmio2(fb, gpa(0xE000_0000)).unwrap();
    assert!(pgm.page(gpa(0xE000_0000)).is_some());
    assert!(
        pgm.page(gpa(0xE000_1000)).is_none(),
        "the mapping is one page now"
    );
    assert_eq!(
        pgm.mmio2_write(fb, PAGE_SIZE, b"x"),
        Err(Mmio2Error::OutOfRange(fb))
    );
    assert_eq!(pgm.reduce_mmio2(fb, 2 * PAGE_SIZE), Err(Mmio2Error::Mapped(fb)));
    assert_isolated(&pgm, "after reducing");
}

// 6. Reset modes.

#[test]
fn reset_with_zeroing_off_keeps_frames_and_contents() {
    let mut pgm = pc_like();
    pgm.set_zero_ram_on_reset(false);
    guest_write(&mut pgm, gpa(0x3000), b"survives");
    pgm.balloon_inflate(&[gpa(0x5000)]).unwrap();
    let frame = pgm.page(gpa(0x3000)).unwrap().frame();
    assert_eq!(pgm.reset_ram(), Invalidation::None);
    assert_eq!(guest_read(&pgm, gpa(0x3000), 8), b"survives");
    assert_eq!(pgm.page(gpa(0x3000)).unwrap().frame(), frame, "same frame");
    assert_eq!(
        pgm.page(gpa(0x5000)).unwrap().state(),
        PageState::Zero,
        "the balloon is deflated"
    );
    assert_isolated(&pgm, "after the reset");
}

#[test]
fn preallocation_is_a_mode_that_survives_reset_which_zeroes_in_place() {
    let mut pgm = pgm_with_frames(4096);
    pgm.register_ram(gpa(0), 64 * PAGE_SIZE, "ram").unwrap();
    pgm.set_ram_preallocation(true).unwrap();
    assert_eq!(pgm.stats().zero_pages, 0);
    pgm.register_ram(gpa(MIB), 16 * PAGE_SIZE, "more").unwrap();
    assert_eq!(
        pgm.stats().zero_pages,
        0,
        "RAM registered later is pre-allocated too"
    );
    guest_write(&mut pgm, gpa(0x2000), b"data");
    let frames = memory_frames(&pgm);
    let frame = pgm.page(gpa(0x2000)).unwrap().frame();
    assert_eq!(pgm.reset_ram(), Invalidation::None, "no mapping changed");
    assert_eq!(memory_frames(&pgm), frames, "no frame was freed");
    assert_eq!(pgm.page(gpa(0x2000)).unwrap().frame(), frame);
    assert_eq!(guest_read(&pgm, gpa(0x2000), 4), [0; 4], "zeroed in place");
    assert_eq!(pgm.stats().zero_pages, 0);
    pgm.set_ram_preallocation(false).unwrap();
    pgm.reset_ram();
    assert_eq!(pgm.stats().zero_pages, 80, "off again: reset frees");
    assert_isolated(&pgm, "after the resets");
}

#[test]
fn reset_zeroes_a_2mib_block_in_place_and_keeps_it_mapped_large() {
    let mut pgm = pgm_with_frames(4096);
    pgm.register_ram(gpa(0), 4 * MIB, "ram").unwrap();
    pgm.set_large_pages(true);
    guest_write(&mut pgm, gpa(0x20_1000), b"large");
    assert!(pgm.is_mapped_large(gpa(0x20_0000)));
    let frames = memory_frames(&pgm);
    assert_eq!(pgm.reset_ram(), Invalidation::None);
    assert!(pgm.is_mapped_large(gpa(0x20_0000)), "still one 2 MiB mapping");
    assert_eq!(memory_frames(&pgm), frames);
    assert_eq!(guest_read(&pgm, gpa(0x20_1000), 5), [0; 5]);
    assert_isolated(&pgm, "after the reset");
}

#[test]
fn reset_turns_mmio2_aliases_back_into_plain_mmio() {
    let mut pgm = pc_like();
    let (vga, _) = pgm.register_mmio(gpa(0xA_0000), PAGE_SIZE).unwrap();
    let bank = pgm.create_mmio2(mmio2_spec(PAGE_SIZE, 0)).unwrap();
    pgm.alias_mmio_to_mmio2(vga, gpa(0xA_0000), bank, 0).unwrap();
    assert!(pgm.translate(gpa(0xA_0000), Access::Write).is_ok());
    assert_eq!(pgm.reset_ram(), Invalidation::SingleContext);
    assert_eq!(
        pgm.resolve_fault(gpa(0xA_0000), Access::Read),
        FaultOutcome::Handler { handler: vga }
    );
    assert_isolated(&pgm, "after the reset");
}

// 7. External access to unassigned space.

struct NoDevices;

impl AccessHandlers for NoDevices {
    fn access(&mut self, _: HandlerId, _: GuestPhysAddr, _: Access, _: &mut [u8]) -> HandlerAction {
        HandlerAction::Default
    }
}

#[test]
fn external_reads_of_unassigned_space_return_all_ones_and_writes_are_dropped() {
    let mut pgm = pc_like();
    let edge = 640 * 1024 - 4;
    pgm.write_phys(gpa(edge), b"ram!").unwrap();
    let mut buf = [0u8; 8];
    pgm.read_phys_external(gpa(edge), &mut buf, &mut NoDevices)
        .unwrap();
    assert_eq!(&buf, b"ram!\xFF\xFF\xFF\xFF");
    assert_eq!(
        pgm.read_phys_handled(gpa(edge), &mut buf, &mut NoDevices),
        Err(AccessError::Page(PageError::NotGuestMemory(gpa(640 * 1024)))),
        "the strict variant names the first unassigned address"
    );
    let used = memory_frames(&pgm);
    pgm.write_phys_external(gpa(edge), b"12345678", &mut NoDevices)
        .unwrap();
    assert_eq!(host_read(&pgm, edge, 4), b"1234");
    assert!(pgm.page(gpa(640 * 1024)).is_none(), "nothing appeared there");
    assert_eq!(memory_frames(&pgm), used);
    assert_eq!(
        pgm.write_phys_handled(gpa(edge), b"12345678", &mut NoDevices),
        Err(AccessError::Page(PageError::NotGuestMemory(gpa(640 * 1024))))
    );
    assert_isolated(&pgm, "after the external accesses");
}

// 8. Map locks.

#[test]
fn pages_under_write_and_all_access_handlers_can_be_locked() {
    let mut pgm = pc_like();
    let (watcher, _) = pgm
        .register_handler(HandlerKind::Write, gpa(0x4000), PAGE_SIZE)
        .unwrap();
    pgm.register_handler(HandlerKind::All, gpa(0x6000), PAGE_SIZE)
        .unwrap();
    let write = pgm.lock_page_for_write(gpa(0x4010)).unwrap();
    let all = pgm.lock_page_for_read(gpa(0x6000)).unwrap();
    assert_eq!(write.host.as_u64() % PAGE_SIZE, 0x10);
    assert_eq!(
        pgm.resolve_fault(gpa(0x4000), Access::Write),
        FaultOutcome::Handler { handler: watcher },
        "the guest's writes still go to the handler"
    );
    assert_isolated(&pgm, "with handled pages locked");
    pgm.release_page_lock(write.lock);
    pgm.release_page_lock(all.lock);
    assert!(!pgm.page(gpa(0x4000)).unwrap().is_locked());
}

#[test]
fn a_read_lock_keeps_a_shared_page_shared_and_its_frame_alive_until_released() {
    let mut pgm = pc_like();
    for at in [0x1000, 0x2000] {
        guest_write(&mut pgm, gpa(at), b"twin");
    }
    pgm.share_identical_pages();
    let mapping = pgm.lock_page_for_read(gpa(0x1000)).unwrap();
    assert_eq!(
        pgm.page(gpa(0x1000)).unwrap().state(),
        PageState::Shared,
        "not unshared"
    );
    // Both sharers copy on write: the frame lives on for the lock.
    guest_write(&mut pgm, gpa(0x1000), b"new1");
    guest_write(&mut pgm, gpa(0x2000), b"new2");
    assert_eq!(pgm.stats().shared_pages, 0);
    assert_eq!(pgm.stats().shared_frames, 1, "held by the lock");
    let mut seen = [0u8; 4];
    pgm.memory().read(mapping.host, &mut seen);
    assert_eq!(&seen, b"twin", "the locked frame still holds what was read");
    assert_accounting(&pgm);
    assert_isolated(&pgm, "with only the lock holding the shared frame");
    pgm.release_page_lock(mapping.lock);
    assert_eq!(pgm.stats().shared_frames, 0, "the last reference freed it");
    assert_accounting(&pgm);
    assert_isolated(&pgm, "after the release");
}

#[test]
fn nested_locks_beyond_63_are_counted_and_released_exactly() {
    let mut pgm = pc_like();
    let mut locks = Vec::new();
    for _ in 0..200 {
        locks.push(pgm.lock_page_for_read(gpa(0x3000)).unwrap().lock);
    }
    locks.push(pgm.lock_page_for_write(gpa(0x3000)).unwrap().lock);
    assert_eq!(pgm.page_lock_count(gpa(0x3000), false), 200);
    assert_eq!(pgm.page_lock_count(gpa(0x3000), true), 1);
    assert_eq!(
        (pgm.stats().read_locked_pages, pgm.stats().write_locked_pages),
        (1, 1)
    );
    for lock in locks {
        pgm.release_page_lock(lock);
    }
    assert_eq!(pgm.page_lock_count(gpa(0x3000), false), 0);
    assert!(!pgm.page(gpa(0x3000)).unwrap().is_locked(), "not locked for good");
    assert_eq!(
        (pgm.stats().read_locked_pages, pgm.stats().write_locked_pages),
        (0, 0)
    );
    pgm.balloon_inflate(&[gpa(0x3000)]).unwrap();
    assert_isolated(&pgm, "after the release");
}

// 9. Stats.

#[test]
fn memory_reports_add_up_as_the_seeds_do() {
    let mut pgm = pc_like();
    for at in [0x1000, 0x2000, 0x3000] {
        guest_write(&mut pgm, gpa(at), b"same");
    }
    guest_write(&mut pgm, gpa(0x4000), b"own");
    pgm.share_identical_pages();
    pgm.balloon_inflate(&[gpa(0x5000)]).unwrap();
    register_rom_copy(&mut pgm, gpa(0xE_0000), &[1; 8192], false).unwrap();
    pgm.create_mmio2(mmio2_spec(4 * PAGE_SIZE, 0)).unwrap();
    let stats = pgm.stats();
    let ram_pages = (640 * 1024 + 15 * MIB) / PAGE_SIZE;
    assert_eq!(
        stats.report(),
        VmMemoryReport {
            total: (ram_pages + 2 + 4) * PAGE_SIZE,
            private: (1 + 2 + 4) * PAGE_SIZE,
            shared: 3 * PAGE_SIZE,
            zero: (ram_pages - 5) * PAGE_SIZE,
        }
    );
    let host = pgm.frames().inner.counts();
    let global = GlobalMemoryReport::new(host, &[stats]);
    assert_eq!(global.used, frames_used(&pgm) * PAGE_SIZE);
    assert_eq!(global.free + global.used, global.total);
    assert_eq!((global.ballooned, global.shared), (PAGE_SIZE, PAGE_SIZE));
}

// 10. The map dump.

#[test]
fn the_physical_map_of_the_pc_layout_reads_as_expected() {
    let mut pgm = pgm_with_frames(4096);
    pgm.register_ram(gpa(0), 16 * MIB, "ram").unwrap();
    let (vga, _) = pgm.register_mmio(gpa(0xA_0000), 0x2_0000).unwrap();
    let bank = pgm.create_mmio2(mmio2_spec(PAGE_SIZE, 1)).unwrap();
    pgm.alias_mmio_to_mmio2(vga, gpa(0xA_0000), bank, 0).unwrap();
    register_rom_copy(&mut pgm, gpa(0xC_0000), &[0x55; 0x8000], false).unwrap();
    let bios = register_rom_copy(&mut pgm, gpa(BIOS), &[0xAA; BIOS_SIZE as usize], true).unwrap();
    pgm.protect_rom_range(gpa(0xF_0000), 0x1_0000, RomProtection::ReadRamWriteIgnore)
        .unwrap();
    let _ = bios;
    pgm.register_handler(HandlerKind::Write, gpa(0x10_0000), 2 * PAGE_SIZE)
        .unwrap();
    let fb = pgm.create_mmio2(mmio2_spec(16 * PAGE_SIZE, 0)).unwrap();
    pgm.set_mmio2_dirty_tracking(fb, true).unwrap();
    pgm.map_mmio2(fb, gpa(0xE000_0000)).unwrap();
    guest_write(&mut pgm, gpa(0x1000), b"x");
    pgm.balloon_inflate(&[gpa(0x2000)]).unwrap();
    let expected = "\
guest-physical map: A20 open, write monitoring off
0x000000000000-0x00000009ffff ram   ram      zero 158 allocated 1 ballooned 1
0x0000000a0000-0x0000000bffff mmio  ram      region #0 aliased 1
0x0000000c0000-0x0000000c7fff rom   ram      #0 unshadowed read-rom/write-ignore
0x0000000c8000-0x0000000dffff ram   ram      zero 24
0x0000000e0000-0x0000000effff rom   ram      #1 shadowed read-rom/write-ignore zero 16
0x0000000f0000-0x0000000fffff rom   ram      #1 shadowed read-ram/write-ignore zero 16
0x000000100000-0x000000101fff ram   ram      handler #1 write zero 2
0x000000102000-0x000000ffffff ram   ram      zero 3838
0x0000e0000000-0x0000e000ffff mmio2 mmio2    region #1 device 0 no 0 tracking on
";
    assert_eq!(pgm.physical_map(), expected);
    assert_isolated(&pgm, "in the PC layout");
}
