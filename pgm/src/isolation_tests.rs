//! Isolation: no guest mapping or page lock may reach a frame the VM does not hold. The three
//! sequences that once gave a guest a writable mapping of a frame already back at the host, and
//! the class of operations behind them, each checked with the EPT auditor.

use crate::addr::GuestPhysAddr;
use crate::addr::PAGE_SIZE;
use crate::error::{Mmio2Error, PageError};
use crate::handlers::HandlerId;
use crate::manager::Mmio2Handle;
use crate::paging::Access;
use crate::test_support::*;
use std::vec::Vec;

/// A VM with RAM at [0, 1 MiB).
fn one_mib_of_ram() -> SimPgm {
    let mut pgm = pgm_with_frames(1024);
    pgm.register_ram(gpa(0), MIB, "ram").unwrap();
    pgm
}

/// [`one_mib_of_ram`] with a one-page MMIO2 region and a one-page MMIO range at `at` aliased
/// to it.
fn one_page_of_mmio2_aliased_at(at: GuestPhysAddr) -> (SimPgm, Mmio2Handle, HandlerId) {
    let mut pgm = one_mib_of_ram();
    let region = pgm.create_mmio2(mmio2_spec(PAGE_SIZE, 0)).unwrap();
    let (mmio, _) = pgm.register_mmio(at, PAGE_SIZE).unwrap();
    pgm.alias_mmio_to_mmio2(mmio, at, region, 0).unwrap();
    (pgm, region, mmio)
}

#[test]
fn deregistering_mmio_in_unassigned_space_unmaps_its_mmio2_alias() {
    let mut pgm = one_mib_of_ram();
    let (mmio, _) = pgm.register_mmio(gpa(0x20_0000), PAGE_SIZE).unwrap();
    let region = pgm.create_mmio2(mmio2_spec(4 * PAGE_SIZE, 0)).unwrap();
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
    let region = pgm.create_mmio2(mmio2_spec(4 * PAGE_SIZE, 0)).unwrap();
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
    let region = pgm.create_mmio2(mmio2_spec(4 * PAGE_SIZE, 0)).unwrap();
    pgm.map_mmio2(region, gpa(0xE000_0000)).unwrap();
    let mapping = pgm.lock_page_for_read(gpa(0xE000_1000)).unwrap();
    let frame = mapping.host.page_base();
    assert_eq!(
        pgm.deregister_mmio2(region),
        Err(Mmio2Error::Page(PageError::Locked(gpa(0xE000_1000))))
    );
    assert_eq!(
        pgm.unmap_mmio2(region),
        Err(Mmio2Error::Page(PageError::Locked(gpa(0xE000_1000))))
    );
    assert!(
        pgm.frames().inner.is_allocated(frame),
        "the locked frame went back to the host"
    );
    assert_isolated(&pgm, "after the refusals");
    pgm.release_page_lock(mapping.lock);
    pgm.deregister_mmio2(region).unwrap();
    assert!(
        pgm.frames().inner.is_allocated(frame),
        "the frame went back before the TLBs were flushed"
    );
    flush_every_cpu(&mut pgm);
    assert!(!pgm.frames().inner.is_allocated(frame));
    assert_isolated(&pgm, "after the lock was released and the region deregistered");
    assert_accounting(&pgm);
}

#[test]
fn freeing_an_mmio2_frame_unmaps_every_mapping_the_reverse_map_records() {
    let mut pgm = one_mib_of_ram();
    let region = pgm.create_mmio2(mmio2_spec(4 * PAGE_SIZE, 0)).unwrap();
    pgm.map_mmio2(region, gpa(0x40_0000)).unwrap();
    let (low, _) = pgm.register_mmio(gpa(0x20_0000), PAGE_SIZE).unwrap();
    let (high, _) = pgm.register_mmio(gpa(0x60_0000), PAGE_SIZE).unwrap();
    pgm.alias_mmio_to_mmio2(low, gpa(0x20_0000), region, 0).unwrap();
    pgm.alias_mmio_to_mmio2(high, gpa(0x60_0000), region, 0).unwrap();
    pgm.set_a20(false);
    // Bit 20 set: with the gate closed these show the region's page and the low alias.
    for at in [0x50_0000, 0x30_0000] {
        assert_eq!(
            guest_write(&mut pgm, gpa(at), &[7]),
            GuestAccess::Done { faults: 1 }
        );
    }
    let frame = pgm.translate(gpa(0x40_0000), Access::Read).unwrap();
    let everywhere: Vec<_> = [0x20_0000, 0x30_0000, 0x40_0000, 0x50_0000, 0x60_0000]
        .into_iter()
        .map(gpa)
        .collect();
    assert_eq!(pgm.recorded_mappings(frame), everywhere);
    assert_isolated(&pgm, "with five mappings of one MMIO2 frame");
    pgm.deregister_mmio2(region).unwrap();
    assert!(pgm.recorded_mappings(frame).is_empty());
    for &at in &everywhere {
        assert!(
            pgm.translate(at, Access::Read).is_err(),
            "{at} still maps the freed frame"
        );
    }
    // The aliased pages trap to their MMIO regions again.
    assert_eq!(
        pgm.resolve_fault(gpa(0x60_0000), Access::Read),
        crate::manager::FaultOutcome::Handler { handler: high }
    );
    assert_isolated(&pgm, "after deregistering the region");
    assert_accounting(&pgm);
}

#[test]
fn a_guest_access_through_the_a20_alias_of_an_mmio2_alias_completes() {
    // Found by the fault-loop check of the whole-API test: the fault was answered `Resolved`
    // without mapping the alias, so the retry faulted for ever.
    let (mut pgm, region, _) = one_page_of_mmio2_aliased_at(gpa(0x20_0000));
    pgm.set_a20(false);
    assert_eq!(
        guest_write(&mut pgm, gpa(0x30_0010), &[9]),
        GuestAccess::Done { faults: 1 }
    );
    let mut byte = [0];
    pgm.mmio2_read(region, 0x10, &mut byte).unwrap();
    assert_eq!(byte, [9], "the write did not reach the region");
    assert_isolated(&pgm, "with the alias of the alias mapped");
}

#[test]
fn the_reverse_map_records_shared_frames_and_a20_aliases_but_not_private_frames() {
    let mut pgm = pgm_with_frames(1024);
    pgm.register_ram(gpa(0), 2 * MIB, "ram").unwrap();
    for at in [0x1000, 0x2000, 0x3000] {
        guest_write(&mut pgm, gpa(at), &[0x5A]);
    }
    let private = pgm.translate(gpa(0x3000), Access::Read).unwrap();
    assert!(
        pgm.recorded_mappings(private).is_empty(),
        "a private frame is recorded"
    );
    let (report, _) = pgm.share_identical_pages();
    assert_eq!(report.pages_shared, 3);
    let shared = pgm.translate(gpa(0x1000), Access::Read).unwrap();
    assert_eq!(
        pgm.recorded_mappings(shared),
        [gpa(0x1000), gpa(0x2000), gpa(0x3000)]
    );
    // Copy on write takes the writer out of the record.
    guest_write(&mut pgm, gpa(0x2000), &[1]);
    assert_eq!(pgm.recorded_mappings(shared), [gpa(0x1000), gpa(0x3000)]);
    let own = pgm.translate(gpa(0x2000), Access::Read).unwrap();
    assert!(pgm.recorded_mappings(own).is_empty());
    // With the gate closed, 0x10_2000 shows 0x2000: its frame is now mapped twice.
    pgm.set_a20(false);
    assert_eq!(pgm.recorded_mappings(own), [gpa(0x10_2000)]);
    assert_isolated(&pgm, "with the gate closed");
    pgm.set_a20(true);
    assert!(pgm.recorded_mappings(own).is_empty());
    assert_isolated(&pgm, "with the gate open again");
    assert_accounting(&pgm);
}

#[test]
fn deregistering_mmio2_undoes_an_alias_the_a20_gate_hides() {
    // Found by the whole-API test once the reverse map replaced the walk over every page: an
    // alias whose page the closed gate hides is in no mapping, but its descriptor names the
    // frame, and opening the gate would map it again.
    let (mut pgm, region, mmio) = one_page_of_mmio2_aliased_at(gpa(0x38_0000));
    let frame = pgm.translate(gpa(0x38_0000), Access::Read).unwrap();
    pgm.set_a20(false);
    assert!(
        pgm.translate(gpa(0x38_0000), Access::Read).is_err(),
        "the gate shows 0x28_0000"
    );
    pgm.deregister_mmio2(region).unwrap();
    flush_every_cpu(&mut pgm);
    assert!(!pgm.frames().inner.is_allocated(frame));
    assert_isolated(&pgm, "with the gate closed");
    pgm.set_a20(true);
    assert!(
        pgm.translate(gpa(0x38_0000), Access::Read).is_err(),
        "opening the gate mapped the freed frame"
    );
    assert_eq!(
        pgm.resolve_fault(gpa(0x38_0000), Access::Read),
        crate::manager::FaultOutcome::Handler { handler: mmio }
    );
    assert_isolated(&pgm, "with the gate open again");
    assert_accounting(&pgm);
}

/// The whole public API in random sequences (`sim::script`), with the auditor and the frame
/// accounting as the oracle after every step.
mod whole_api {
    use std::collections::BTreeSet;
    use std::vec::Vec;

    use proptest::prelude::*;

    use crate::sim::script::{self, Op};

    /// Cases per run: the default for CI; `PGM_AUDIT_CASES` for a long run (see pgm/README.md).
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
            bytes in proptest::collection::vec(any::<u8>(), 1..400)
        ) {
            if let Err(failure) = script::run(&bytes) {
                panic!("{failure}");
            }
        }
    }

    /// The decoder reaches every operation (a weight table that lost one would silently stop
    /// testing it).
    #[test]
    fn random_bytes_decode_to_every_operation() {
        let kinds: BTreeSet<_> = Op::decode_all(&xorshift_bytes(1, 200_000))
            .iter()
            .map(Op::name)
            .collect();
        assert_eq!(kinds.len(), 43, "{kinds:?}");
    }

    /// `len` pseudo-random bytes from `seed`.
    fn xorshift_bytes(seed: u64, len: usize) -> Vec<u8> {
        script::ByteSource::new(0x2545_F491_4F6C_DD1D ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)).bytes(len)
    }

    /// The script reaches every state it means to test: the 2 MiB block large, split and
    /// awaiting tables (the state the stale-record bug hid in, which the script never reached
    /// while it had no whole block), monitoring on and off, a lock held, the gate closed, an
    /// MMIO alias, and frames awaiting a flush. Fixed seeds: the counts do not change between
    /// runs, and a change to the script that loses a state fails here.
    #[test]
    fn the_script_reaches_every_state_it_means_to_test() {
        let mut coverage = script::Coverage::default();
        for seed in 0..300 {
            let bytes = xorshift_bytes(seed, 64 + (seed as usize * 7) % 336);
            if let Err(failure) = script::run_counting(&bytes, &mut coverage) {
                panic!("seed {seed}: {failure}");
            }
        }
        for state in script::ALL_STATES {
            assert!(
                coverage.total(state) > 0,
                "no operation met {state:?}:\n{coverage}"
            );
        }
        let awaiting = script::State::BlockAwaitingTables as usize;
        for op in ["Guest", "Inflate", "UnregisterBlock", "Flush", "Preallocate"] {
            assert!(
                coverage.counts.get(op).is_some_and(|cells| cells[awaiting] > 0),
                "{op} never met a block awaiting tables:\n{coverage}"
            );
        }
    }
}
