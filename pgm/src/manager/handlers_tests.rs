//! Tests of access handlers, MMIO regions, handled host accesses and MMIO aliases
//! (`handlers.rs`) on the simulated host.

use alloc::vec;
use alloc::vec::Vec;

use crate::addr::{HostPhysAddr, PAGE_SIZE};
use crate::error::{AccessError, HandlerError, Mmio2Error, PageError, RamError, RangeError};
use crate::handlers::HandlerKind;
use crate::manager::{FaultOutcome, HandlerAction};
use crate::paging::{Access, Entry, Invalidation, MemoryType, Permissions};
use crate::test_support::*;

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

/// The seed's PGMR3PhysReadU8..U64 / WriteU8..U64 go through PGMPhysRead / PGMPhysWrite:
/// access handlers and MMIO see the access, and unassigned space reads all ones and drops
/// writes. The `_bypassing_handlers` variants touch memory only.
#[test]
fn typed_accessors_go_through_access_handlers_and_mmio_as_the_seeds_do() {
    let mut pgm = pc_like();
    let (mmio, _) = pgm.register_mmio(gpa(0xFEC0_0000), PAGE_SIZE).unwrap();
    let (watch, _) = pgm
        .register_handler(HandlerKind::Write, gpa(0x7000), PAGE_SIZE)
        .unwrap();
    let mut device = recorder(HandlerAction::Handled);
    assert_eq!(pgm.read_phys_u32(gpa(0xFEC0_0010), &mut device), Ok(0xABAB_ABAB));
    pgm.write_phys_u16(gpa(0xFEC0_0020), 0xBEEF, &mut device).unwrap();
    pgm.write_phys_u64(gpa(0x7008), 0x1122_3344_5566_7788, &mut device)
        .unwrap();
    assert_eq!(
        device.calls,
        [
            (mmio, 0xFEC0_0010, Access::Read, vec![0xAB; 4]),
            (mmio, 0xFEC0_0020, Access::Write, vec![0xEF, 0xBE]),
            (
                watch,
                0x7008,
                Access::Write,
                0x1122_3344_5566_7788u64.to_le_bytes().to_vec()
            ),
        ]
    );
    assert_eq!(
        pgm.read_phys_u64_bypassing_handlers(gpa(0x7008)),
        Ok(0),
        "the write handler took the write"
    );
    // Handlers that leave the access to memory: MMIO reads all ones, RAM takes the write.
    let mut passes = recorder(HandlerAction::Default);
    assert_eq!(pgm.read_phys_u8(gpa(0xFEC0_0010), &mut passes), Ok(0xFF));
    pgm.write_phys_u32(gpa(0x7010), 0xDEAD_BEEF, &mut passes).unwrap();
    assert_eq!(pgm.read_phys_u32_bypassing_handlers(gpa(0x7010)), Ok(0xDEAD_BEEF));
    // Unassigned space, as PGMPhysRead/PGMPhysWrite treat it.
    assert_eq!(pgm.read_phys_u16(gpa(0xD000_0000), &mut passes), Ok(0xFFFF));
    assert_eq!(
        pgm.write_phys_u8(gpa(0xD000_0000), 1, &mut passes),
        Ok(Invalidation::None)
    );
    // The handler-free variants do not reach devices.
    assert_eq!(
        pgm.read_phys_u32_bypassing_handlers(gpa(0xFEC0_0010)),
        Err(AccessError::Page(PageError::NotRam(gpa(0xFEC0_0010))))
    );
    assert_eq!(
        pgm.read_phys_u8_bypassing_handlers(gpa(0xD000_0000)),
        Err(AccessError::Page(PageError::NotGuestMemory(gpa(0xD000_0000))))
    );
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
