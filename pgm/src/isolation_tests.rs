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

/// The whole public API in random sequences (`sim::script`), with the auditor and the frame
/// accounting as the oracle after every step.
mod whole_api {
    use std::collections::BTreeSet;
    use std::format;
    use std::vec::Vec;

    use proptest::prelude::*;

    use crate::sim::script::{self, Op};

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
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let bytes: Vec<u8> = (0..200_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let kinds: BTreeSet<_> = Op::decode_all(&bytes)
            .iter()
            .map(|op| {
                let name = format!("{op:?}");
                std::string::String::from(&name[..name.find('(').unwrap_or(name.len())])
            })
            .collect();
        assert_eq!(kinds.len(), 35, "{kinds:?}");
    }
}
