//! Isolation: no guest mapping or page lock may reach a frame the VM does not hold. The three
//! sequences that once gave a guest a writable mapping of a frame already back at the host, and
//! the class of operations behind them, each checked with the EPT auditor.

use crate::addr::PAGE_SIZE;
use crate::error::PgmError;
use crate::paging::Access;
use crate::test_support::*;

/// A VM with RAM at [0, 1 MiB).
fn one_mib_of_ram() -> SimPgm {
    let mut pgm = pgm_with_frames(1024);
    pgm.register_ram(gpa(0), MIB, "ram").unwrap();
    pgm
}

#[test]
fn deregistering_mmio_in_unassigned_space_unmaps_its_mmio2_alias() {
    let mut pgm = one_mib_of_ram();
    let (mmio, _) = pgm.register_mmio(gpa(0x20_0000), PAGE_SIZE).unwrap();
    let region = pgm.create_mmio2(4 * PAGE_SIZE, 0).unwrap();
    pgm.alias_mmio_to_mmio2(mmio, gpa(0x20_0000), region, 0).unwrap();
    assert!(pgm.translate(gpa(0x20_0000), Access::Write).is_ok());
    assert_isolated(&pgm, "with the alias");
    pgm.deregister_mmio(mmio).unwrap();
    assert!(
        pgm.translate(gpa(0x20_0000), Access::Read).is_err(),
        "the alias outlived its MMIO region"
    );
    assert_isolated(&pgm, "after deregistering the MMIO region");
    pgm.deregister_mmio2(region).unwrap();
    assert!(pgm.translate(gpa(0x20_0000), Access::Read).is_err());
    assert_isolated(&pgm, "after deregistering the MMIO2 region");
    assert_accounting(&pgm);
}

#[test]
fn deregistering_mmio2_unmaps_its_a20_alias() {
    let mut pgm = one_mib_of_ram();
    let region = pgm.create_mmio2(4 * PAGE_SIZE, 0).unwrap();
    pgm.map_mmio2(region, gpa(0x40_0000)).unwrap();
    pgm.set_a20(false);
    // 0x50_0000 is 0x40_0000 with bit 20 set: with the gate closed it shows the MMIO2 page.
    assert_eq!(
        guest_write(&mut pgm, gpa(0x50_0000), &[1]),
        GuestAccess::Done { faults: 1 }
    );
    assert_isolated(&pgm, "with the A20 alias mapped");
    pgm.deregister_mmio2(region).unwrap();
    assert!(
        pgm.translate(gpa(0x50_0000), Access::Read).is_err(),
        "the A20 alias outlived the MMIO2 region"
    );
    assert_isolated(&pgm, "after deregistering the MMIO2 region");
    assert_accounting(&pgm);
}

#[test]
fn deregistering_mmio2_is_refused_while_a_page_lock_holds_it() {
    let mut pgm = one_mib_of_ram();
    let region = pgm.create_mmio2(4 * PAGE_SIZE, 0).unwrap();
    pgm.map_mmio2(region, gpa(0xE000_0000)).unwrap();
    let mapping = pgm.lock_page_for_read(gpa(0xE000_1000)).unwrap();
    let frame = mapping.host.page_base();
    assert_eq!(
        pgm.deregister_mmio2(region),
        Err(PgmError::PageLocked(gpa(0xE000_1000)))
    );
    assert_eq!(
        pgm.unmap_mmio2(region),
        Err(PgmError::PageLocked(gpa(0xE000_1000)))
    );
    assert!(
        pgm.frames().inner.is_allocated(frame),
        "the locked frame went back to the host"
    );
    assert_isolated(&pgm, "after the refusals");
    pgm.release_page_lock(mapping.lock);
    pgm.deregister_mmio2(region).unwrap();
    assert!(!pgm.frames().inner.is_allocated(frame));
    assert_isolated(&pgm, "after the lock was released and the region deregistered");
    assert_accounting(&pgm);
}

/// The whole public API in random sequences, with the auditor and the frame accounting as the
/// oracle after every step: whatever the order of operations, failures included, no leaf may
/// reach a frame the VM does not hold, and nothing may leak at the end.
mod whole_api {
    use std::vec;
    use std::vec::Vec;

    use proptest::prelude::*;

    use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
    use crate::frames::HostMemory;
    use crate::handlers::{HandlerId, HandlerKind};
    use crate::manager::{
        AccessHandlers, FaultOutcome, HandlerAction, Mmio2Handle, PageMapLock, RomId, RomProtection,
    };
    use crate::paging::Access;
    use crate::test_support::*;

    /// RAM pages in each of the two ranges: [0, 256 KiB) and [1 MiB, 1 MiB + 256 KiB), so that
    /// with the A20 gate closed the second shows the first.
    const RAM_PAGES: u64 = 64;
    const HIGH_RAM: u64 = MIB;
    /// Unassigned space for MMIO and MMIO2 (2 MiB) and its A20 alias (3 MiB).
    const SPACE: [u64; 3] = [0x20_0000, 0x20_4000, 0x28_0000];
    /// Where a ROM may be registered: with bit 20 set (shown 1 MiB below while the A20 gate is
    /// closed) or clear (showing through its alias 1 MiB up).
    const ROM_BASES: [u64; 2] = [0x38_0000, 0x2C_0000];
    /// A device page of the caller's (the APIC-access page) for special aliases.
    const SPECIAL_FRAME: u64 = 0xFEE0_0000;

    /// Guest-physical addresses worth touching: RAM, MMIO/MMIO2 slots, A20 aliases, the ROM,
    /// and holes.
    fn interesting(index: usize) -> GuestPhysAddr {
        const ADDRESSES: [u64; 16] = [
            0,
            0x1000,
            0x3F000,
            HIGH_RAM,
            HIGH_RAM + 0x1000,
            HIGH_RAM + 0x3F000,
            SPACE[0],
            SPACE[0] + 0x1000,
            SPACE[1],
            SPACE[2],
            SPACE[0] | MIB,
            SPACE[2] | MIB,
            ROM_BASES[0],
            ROM_BASES[1] | MIB,
            0x10_0000 - 0x1000,
            0x4000_0000,
        ];
        gpa(ADDRESSES[index % ADDRESSES.len()])
    }

    #[derive(Clone, Debug)]
    enum Op {
        Guest(usize, u8),
        HostWrite(usize, u16, u16),
        HostRead(usize, u16),
        Reset,
        Preallocate,
        LargePages(bool),
        Inflate(usize),
        Deflate(usize),
        Monitoring(u8),
        A20(bool),
        Share,
        FailAfter(Option<u64>),
        Limit(Option<u64>),
        RegisterMmio(usize, u64),
        DeregisterMmio(usize),
        RegisterHandler(bool, usize, u64),
        DeregisterHandler(usize),
        DisableHandlerPage(usize, usize),
        ResetHandler(usize),
        CreateMmio2(u64),
        MapMmio2(usize, usize),
        UnmapMmio2(usize),
        ReduceMmio2(usize, u64),
        DeregisterMmio2(usize),
        Tracking(usize, bool),
        QueryDirty(usize),
        DeviceWrite(usize, u64),
        AliasMmio2(usize, usize, usize, u64),
        AliasHost(usize, usize),
        RegisterRom(bool, usize),
        ProtectRom(u8),
        Lock(usize, bool),
        Release(usize),
        UnregisterHighRam,
        RegisterHighRam,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0..64usize, 0..3u8).prop_map(|(at, access)| Op::Guest(at, access)),
            3 => (0..64usize, 0..4096u16, 1..6000u16).prop_map(|(at, off, len)| Op::HostWrite(at, off, len)),
            1 => (0..64usize, 1..6000u16).prop_map(|(at, len)| Op::HostRead(at, len)),
            1 => Just(Op::Reset),
            1 => Just(Op::Preallocate),
            1 => any::<bool>().prop_map(Op::LargePages),
            2 => (0..64usize).prop_map(Op::Inflate),
            1 => (0..64usize).prop_map(Op::Deflate),
            2 => (0..3u8).prop_map(Op::Monitoring),
            2 => any::<bool>().prop_map(Op::A20),
            1 => Just(Op::Share),
            1 => proptest::option::of(0..6u64).prop_map(Op::FailAfter),
            1 => proptest::option::of(0..40u64).prop_map(Op::Limit),
            2 => (0..64usize, 1..3u64).prop_map(|(at, pages)| Op::RegisterMmio(at, pages)),
            1 => (0..4usize).prop_map(Op::DeregisterMmio),
            1 => (any::<bool>(), 0..64usize, 1..3u64).prop_map(|(w, at, p)| Op::RegisterHandler(w, at, p)),
            1 => (0..4usize).prop_map(Op::DeregisterHandler),
            1 => (0..4usize, 0..64usize).prop_map(|(h, at)| Op::DisableHandlerPage(h, at)),
            1 => (0..4usize).prop_map(Op::ResetHandler),
            2 => (1..4u64).prop_map(Op::CreateMmio2),
            2 => (0..4usize, 0..3usize).prop_map(|(r, slot)| Op::MapMmio2(r, slot)),
            1 => (0..4usize).prop_map(Op::UnmapMmio2),
            1 => (0..4usize, 1..4u64).prop_map(|(r, pages)| Op::ReduceMmio2(r, pages)),
            1 => (0..4usize).prop_map(Op::DeregisterMmio2),
            1 => (0..4usize, any::<bool>()).prop_map(|(r, on)| Op::Tracking(r, on)),
            1 => (0..4usize).prop_map(Op::QueryDirty),
            1 => (0..4usize, 0..4u64).prop_map(|(r, page)| Op::DeviceWrite(r, page)),
            2 => (0..4usize, 0..64usize, 0..4usize, 0..4u64).prop_map(|(m, at, r, p)| Op::AliasMmio2(m, at, r, p)),
            1 => (0..4usize, 0..64usize).prop_map(|(m, at)| Op::AliasHost(m, at)),
            1 => (any::<bool>(), 0..2usize).prop_map(|(shadowed, at)| Op::RegisterRom(shadowed, at)),
            1 => (0..4u8).prop_map(Op::ProtectRom),
            2 => (0..64usize, any::<bool>()).prop_map(|(at, write)| Op::Lock(at, write)),
            2 => (0..8usize).prop_map(Op::Release),
            1 => Just(Op::UnregisterHighRam),
            1 => Just(Op::RegisterHighRam),
        ]
    }

    /// Handles the test holds, as a VMM would.
    #[derive(Default)]
    struct Held {
        mmio: Vec<HandlerId>,
        handlers: Vec<HandlerId>,
        mmio2: Vec<Mmio2Handle>,
        rom: Option<RomId>,
        locks: Vec<PageMapLock>,
    }

    fn pick<T: Copy>(items: &[T], index: usize) -> Option<T> {
        (!items.is_empty()).then(|| items[index % items.len()])
    }

    /// A device that answers every access itself.
    struct Devices;

    impl AccessHandlers for Devices {
        fn access(&mut self, _: HandlerId, _: GuestPhysAddr, _: Access, data: &mut [u8]) -> HandlerAction {
            data.fill(0x5A);
            HandlerAction::Handled
        }
    }

    /// A guest access the way the CPU makes it: translate, fault, resolve, retry (a few times).
    fn guest_access(pgm: &mut SimPgm, at: GuestPhysAddr, access: Access) {
        for _ in 0..3 {
            match pgm.translate(at, access) {
                Ok(hpa) => {
                    if access == Access::Write {
                        pgm.memory_mut().write(hpa, &[0xC3]);
                    }
                    return;
                }
                Err(_) => match pgm.resolve_fault(at, access) {
                    FaultOutcome::Resolved { .. } => {}
                    FaultOutcome::Handler { .. } => {
                        let mut byte = [0xC3];
                        let _ = match access {
                            Access::Write => pgm.write_phys_handled(at, &byte, &mut Devices).map(|_| ()),
                            _ => pgm.read_phys_handled(at, &mut byte, &mut Devices),
                        };
                        return;
                    }
                    FaultOutcome::EmulateWrite => {
                        let _ = pgm.write_phys(at, &[0xC3]);
                        return;
                    }
                    _ => return,
                },
            }
        }
    }

    fn apply(pgm: &mut SimPgm, held: &mut Held, op: &Op) {
        let page_at = |index: usize| interesting(index).page_base();
        match *op {
            Op::Guest(at, access) => {
                let access = [Access::Read, Access::Write, Access::Execute][access as usize];
                guest_access(pgm, interesting(at), access);
            }
            Op::HostWrite(at, offset, len) => {
                let data = std::vec![0x77; len as usize];
                let _ = pgm.write_phys(gpa(interesting(at).as_u64() + u64::from(offset)), &data);
            }
            Op::HostRead(at, len) => {
                let mut buf = std::vec![0; len as usize];
                let _ = pgm.read_phys(interesting(at), &mut buf);
                let _ = pgm.read_phys_handled(interesting(at), &mut buf, &mut Devices);
            }
            Op::Reset => {
                pgm.reset_ram();
            }
            Op::Preallocate => {
                let _ = pgm.preallocate_ram();
            }
            Op::LargePages(on) => pgm.set_large_pages(on),
            Op::Inflate(at) => {
                let _ = pgm.balloon_inflate(&[page_at(at)]);
            }
            Op::Deflate(at) => {
                let _ = pgm.balloon_deflate(&[page_at(at)]);
            }
            Op::Monitoring(what) => {
                match what {
                    0 => pgm.start_write_monitoring(),
                    1 => pgm.harvest_written(&mut Vec::new()),
                    _ => pgm.stop_write_monitoring(),
                };
            }
            Op::A20(on) => {
                pgm.set_a20(on);
            }
            Op::Share => {
                pgm.share_identical_pages();
            }
            Op::FailAfter(n) => pgm.frames_mut().fail_after = n,
            Op::Limit(limit) => pgm.set_frame_limit(limit),
            Op::RegisterMmio(at, pages) => {
                if let Ok((id, _)) = pgm.register_mmio(page_at(at), pages * PAGE_SIZE) {
                    held.mmio.push(id);
                }
            }
            Op::DeregisterMmio(index) => {
                if let Some(id) = pick(&held.mmio, index) {
                    pgm.deregister_mmio(id).unwrap();
                    held.mmio.retain(|&other| other != id);
                }
            }
            Op::RegisterHandler(write, at, pages) => {
                let kind = if write {
                    HandlerKind::Write
                } else {
                    HandlerKind::All
                };
                if let Ok((id, _)) = pgm.register_handler(kind, page_at(at), pages * PAGE_SIZE) {
                    held.handlers.push(id);
                }
            }
            Op::DeregisterHandler(index) => {
                if let Some(id) = pick(&held.handlers, index) {
                    pgm.deregister_handler(id).unwrap();
                    held.handlers.retain(|&other| other != id);
                }
            }
            Op::DisableHandlerPage(index, at) => {
                if let Some(id) = pick(&held.handlers, index) {
                    let _ = pgm.disable_handler_page(id, page_at(at));
                }
            }
            Op::ResetHandler(index) => {
                let all: Vec<HandlerId> = held.handlers.iter().chain(&held.mmio).copied().collect();
                if let Some(id) = pick(&all, index) {
                    pgm.reset_handler(id).unwrap();
                }
            }
            Op::CreateMmio2(pages) => {
                if let Ok(handle) = pgm.create_mmio2(pages * PAGE_SIZE, 0) {
                    held.mmio2.push(handle);
                }
            }
            Op::MapMmio2(index, slot) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    let _ = pgm.map_mmio2(handle, gpa(SPACE[slot]));
                }
            }
            Op::UnmapMmio2(index) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    let _ = pgm.unmap_mmio2(handle);
                }
            }
            Op::ReduceMmio2(index, pages) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    let _ = pgm.reduce_mmio2(handle, pages * PAGE_SIZE);
                }
            }
            Op::DeregisterMmio2(index) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    if pgm.deregister_mmio2(handle).is_ok() {
                        held.mmio2.retain(|&other| other != handle);
                    }
                }
            }
            Op::Tracking(index, on) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    pgm.set_mmio2_dirty_tracking(handle, on).unwrap();
                }
            }
            Op::QueryDirty(index) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    pgm.query_and_reset_mmio2_dirty(handle, &mut Vec::new()).unwrap();
                }
            }
            Op::DeviceWrite(index, page) => {
                if let Some(handle) = pick(&held.mmio2, index) {
                    let _ = pgm.mmio2_write(handle, page * PAGE_SIZE, &[0x99; 16]);
                }
            }
            Op::AliasMmio2(mmio, at, region, page) => {
                if let (Some(id), Some(handle)) = (pick(&held.mmio, mmio), pick(&held.mmio2, region)) {
                    let _ = pgm.alias_mmio_to_mmio2(id, page_at(at), handle, page * PAGE_SIZE);
                }
            }
            Op::AliasHost(mmio, at) => {
                if let Some(id) = pick(&held.mmio, mmio) {
                    let frame = HostPhysAddr::new_truncate(SPECIAL_FRAME);
                    let _ = pgm.alias_mmio_to_host(id, page_at(at), frame);
                }
            }
            Op::RegisterRom(shadowed, at) => {
                if held.rom.is_none() {
                    let image = std::vec![0xAB; 2 * PAGE_SIZE as usize];
                    held.rom = pgm.register_rom(gpa(ROM_BASES[at]), &image, shadowed).ok();
                }
            }
            Op::ProtectRom(mode) => {
                if let Some(rom) = held.rom {
                    let protection = [
                        RomProtection::ReadRomWriteIgnore,
                        RomProtection::ReadRomWriteRam,
                        RomProtection::ReadRamWriteIgnore,
                        RomProtection::ReadRamWriteRam,
                    ][mode as usize];
                    let _ = pgm.protect_rom(rom, protection);
                }
            }
            Op::Lock(at, write) => {
                let at = interesting(at);
                let locked = if write {
                    pgm.lock_page_for_write(at)
                } else {
                    pgm.lock_page_for_read(at)
                };
                if let Ok(mapping) = locked {
                    held.locks.push(mapping.lock);
                }
            }
            Op::Release(index) => {
                if !held.locks.is_empty() {
                    let lock = held.locks.remove(index % held.locks.len());
                    pgm.release_page_lock(lock);
                }
            }
            Op::UnregisterHighRam => {
                let _ = pgm.unregister_ram(gpa(HIGH_RAM), RAM_PAGES * PAGE_SIZE);
            }
            Op::RegisterHighRam => {
                let _ = pgm.register_ram(gpa(HIGH_RAM), RAM_PAGES * PAGE_SIZE, "high");
            }
        }
    }

    fn run(ops: &[Op]) {
        let mut pgm = pgm_with_frames(2048);
        pgm.register_ram(gpa(0), RAM_PAGES * PAGE_SIZE, "low").unwrap();
        pgm.register_ram(gpa(HIGH_RAM), RAM_PAGES * PAGE_SIZE, "high")
            .unwrap();
        let mut held = Held::default();
        for (step, op) in ops.iter().enumerate() {
            apply(&mut pgm, &mut held, op);
            let context = std::format!("after step {step} ({op:?})");
            assert_isolated(&pgm, &context);
            assert_accounting(&pgm);
        }
        pgm.frames_mut().fail_after = None;
        for lock in held.locks.drain(..) {
            pgm.release_page_lock(lock);
        }
        let (frames, _) = pgm.terminate();
        assert_eq!(frames.inner.counts().used(), 0, "frames leaked");
    }

    /// Cases per run: the default for CI; `PGM_AUDIT_CASES` for a long run (see the README).
    fn cases() -> u32 {
        std::env::var("PGM_AUDIT_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(256)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

        #[test]
        fn random_sequences_over_the_whole_api_never_map_a_frame_the_vm_does_not_hold(
            ops in proptest::collection::vec(op(), 1..80)
        ) {
            run(&ops);
        }
    }
}
