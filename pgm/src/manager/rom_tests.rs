//! Tests of ROM and its shadow (`rom.rs`) on the simulated host.

use alloc::vec;
use alloc::vec::Vec;

use crate::addr::PAGE_SIZE;
use crate::error::{NoMemory, RangeError, RomError};
use crate::manager::{FaultOutcome, RomId, RomProtection};
use crate::paging::{Access, Invalidation};
use crate::test_support::*;

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
