//! Property tests: random sequences of operations run against the manager and against a plain
//! reference model of guest memory (a byte array per page plus a balloon flag). After every
//! operation the two must agree on contents, the EPT must agree with the descriptors, the frame
//! accounting must agree with the allocator, and a harvest must report every page the model saw
//! change. Allocation failures are injected at random; a failed operation must change nothing.

use std::collections::BTreeSet;
use std::format;
use std::vec;
use std::vec::Vec;

use proptest::prelude::*;

use crate::addr::{GuestPhysAddr, PAGE_SIZE};
use crate::error::{AccessError, NoMemory, PageError, RamError};
use crate::manager::FaultOutcome;
use crate::page::PageState;
use crate::paging::{Access, Permissions};
use crate::test_support::*;

/// Pages per range; two ranges with a hole after each.
const RANGE_PAGES: usize = 6;
const PAGES: usize = 2 * RANGE_PAGES;
const RANGE_BASES: [u64; 2] = [0, MIB];
const PAGE: usize = PAGE_SIZE as usize;

fn page_gpa(page: usize) -> u64 {
    RANGE_BASES[page / RANGE_PAGES] + (page % RANGE_PAGES) as u64 * PAGE_SIZE
}

/// The model page at a guest-physical byte address, if it is RAM.
fn model_page(addr: u64) -> Option<(usize, usize)> {
    RANGE_BASES.iter().enumerate().find_map(|(range, &base)| {
        let offset = addr.checked_sub(base)?;
        let page = (offset / PAGE_SIZE) as usize;
        (page < RANGE_PAGES).then_some((range * RANGE_PAGES + page, (offset % PAGE_SIZE) as usize))
    })
}

#[derive(Clone, Debug)]
enum Op {
    GuestWrite {
        page: usize,
        offset: usize,
        value: u8,
    },
    HostWrite {
        page: usize,
        offset: usize,
        len: usize,
        value: u8,
    },
    Reset,
    Inflate(usize),
    Deflate(usize),
    StartMonitoring,
    Harvest,
    StopMonitoring,
    FailAllocationsAfter(u64),
    AllowAllocations,
    SetLimit(Option<u64>),
    SetA20(bool),
    Share,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..PAGES, 0..PAGE, any::<u8>()).prop_map(|(page, offset, value)| Op::GuestWrite { page, offset, value }),
        3 => (0..PAGES, 0..PAGE, 1..2 * PAGE, any::<u8>())
            .prop_map(|(page, offset, len, value)| Op::HostWrite { page, offset, len, value }),
        1 => Just(Op::Reset),
        2 => (0..PAGES).prop_map(Op::Inflate),
        2 => (0..PAGES).prop_map(Op::Deflate),
        1 => Just(Op::StartMonitoring),
        2 => Just(Op::Harvest),
        1 => Just(Op::StopMonitoring),
        1 => (0..4u64).prop_map(Op::FailAllocationsAfter),
        1 => Just(Op::AllowAllocations),
        1 => proptest::option::of(0..8u64).prop_map(Op::SetLimit),
        1 => any::<bool>().prop_map(Op::SetA20),
        2 => Just(Op::Share),
    ]
}

/// Guest memory as the guest should see it.
struct Model {
    contents: Vec<Vec<u8>>,
    ballooned: Vec<bool>,
    monitoring: bool,
    a20_enabled: bool,
    /// Pages whose contents changed since monitoring started or the last harvest.
    changed: BTreeSet<u64>,
}

impl Model {
    fn new() -> Model {
        Model {
            contents: vec![vec![0; PAGE]; PAGES],
            ballooned: vec![false; PAGES],
            monitoring: false,
            a20_enabled: true,
            changed: BTreeSet::new(),
        }
    }

    fn mark(&mut self, page: usize) {
        if self.monitoring {
            self.changed.insert(page_gpa(page));
        }
    }

    /// What a host write of `len` bytes at `addr` must fail with, if anything, before
    /// allocation: the first address outside RAM. (Bytes for ballooned pages are dropped.)
    fn host_write_refusal(&self, addr: u64, len: usize) -> Option<AccessError> {
        let hole = (addr..addr + len as u64).find(|&a| model_page(a).is_none())?;
        Some(AccessError::Page(PageError::NotGuestMemory(gpa(hole))))
    }
}

fn run(ops: &[Op]) {
    let mut pgm = pgm_with_frames(512);
    for base in RANGE_BASES {
        pgm.register_ram(gpa(base), RANGE_PAGES as u64 * PAGE_SIZE, "ram")
            .unwrap();
    }
    let mut model = Model::new();
    for (step, op) in ops.iter().enumerate() {
        apply(&mut pgm, &mut model, op);
        check(&pgm, &model, step, op);
    }
    pgm.frames_mut().fail_after = None;
    let frames = pgm.terminate();
    assert_eq!(frames.inner.counts().used(), 0, "frames leaked");
}

fn apply(pgm: &mut SimPgm, model: &mut Model, op: &Op) {
    match *op {
        Op::GuestWrite { page, offset, value } => {
            let at = gpa(page_gpa(page) + offset as u64);
            // The guest's write lands where the A20 gate sends it.
            let masked = if model.a20_enabled {
                at.as_u64()
            } else {
                at.as_u64() & !MIB
            };
            let Some((page, offset)) = model_page(masked) else {
                assert_eq!(
                    guest_write(pgm, at, &[value]),
                    GuestAccess::Stopped(FaultOutcome::NotGuestMemory)
                );
                return;
            };
            match guest_write(pgm, at, &[value]) {
                GuestAccess::Done { .. } => {
                    assert!(!model.ballooned[page], "wrote a ballooned page");
                    model.contents[page][offset] = value;
                    model.mark(page);
                }
                GuestAccess::Stopped(FaultOutcome::Ballooned) => assert!(model.ballooned[page]),
                GuestAccess::Stopped(FaultOutcome::OutOfMemory) => assert!(!model.ballooned[page]),
                GuestAccess::Stopped(other) => panic!("unexpected {other:?}"),
            }
        }
        Op::HostWrite {
            page,
            offset,
            len,
            value,
        } => {
            let addr = page_gpa(page) + offset as u64;
            let data = vec![value; len];
            let refusal = model.host_write_refusal(addr, len);
            match pgm.write_phys(gpa(addr), &data) {
                Ok(_) => {
                    assert_eq!(refusal, None);
                    for a in addr..addr + len as u64 {
                        let (page, offset) = model_page(a).unwrap();
                        if !model.ballooned[page] {
                            model.contents[page][offset] = value;
                            model.mark(page);
                        }
                    }
                }
                Err(AccessError::NoMemory(NoMemory::OutOfFrames | NoMemory::FrameLimit)) => {
                    assert_eq!(refusal, None)
                }
                Err(error) => assert_eq!(Some(error), refusal),
            }
        }
        Op::Reset => {
            pgm.reset_ram();
            for page in 0..PAGES {
                if model.contents[page].iter().any(|&b| b != 0) {
                    model.mark(page);
                }
                model.contents[page].fill(0);
                model.ballooned[page] = false;
            }
        }
        Op::Inflate(page) => match pgm.balloon_inflate(&[gpa(page_gpa(page))]) {
            Ok(_) => {
                assert!(!model.ballooned[page]);
                model.ballooned[page] = true;
                model.contents[page].fill(0);
                model.mark(page);
            }
            Err(RamError::Page(PageError::State {
                state: PageState::Ballooned,
                ..
            })) => assert!(model.ballooned[page]),
            Err(error) => panic!("inflate: {error}"),
        },
        Op::Deflate(page) => match pgm.balloon_deflate(&[gpa(page_gpa(page))]) {
            Ok(_) => {
                assert!(model.ballooned[page]);
                model.ballooned[page] = false;
            }
            Err(RamError::Page(PageError::State { .. })) => assert!(!model.ballooned[page]),
            Err(error) => panic!("deflate: {error}"),
        },
        Op::StartMonitoring => {
            pgm.start_write_monitoring();
            model.monitoring = true;
            model.changed.clear();
        }
        Op::Harvest => {
            let mut harvested = Vec::new();
            pgm.harvest_written(&mut harvested);
            let harvested: BTreeSet<u64> = harvested.iter().map(|g| g.as_u64()).collect();
            let missing: Vec<_> = model.changed.difference(&harvested).collect();
            assert!(missing.is_empty(), "changed pages not harvested: {missing:x?}");
            model.changed.clear();
        }
        Op::StopMonitoring => {
            pgm.stop_write_monitoring();
            model.monitoring = false;
            model.changed.clear();
        }
        Op::FailAllocationsAfter(n) => pgm.frames_mut().fail_after = Some(n),
        Op::AllowAllocations => pgm.frames_mut().fail_after = None,
        Op::SetLimit(limit) => pgm.set_frame_limit(limit),
        // Sharing never changes what the guest reads.
        Op::Share => {
            pgm.share_identical_pages();
        }
        Op::SetA20(enabled) => {
            pgm.set_a20(enabled);
            model.a20_enabled = enabled;
        }
    }
}

fn check(pgm: &SimPgm, model: &Model, step: usize, op: &Op) {
    let context = || format!("after step {step} ({op:?})");
    assert_accounting(pgm);
    let stats = pgm.stats();
    assert_eq!(stats.ram_pages, PAGES as u64, "{}", context());
    let ballooned = model.ballooned.iter().filter(|&&b| b).count() as u64;
    assert_eq!(stats.ballooned_pages, ballooned, "{}", context());
    for page in 0..PAGES {
        let at: GuestPhysAddr = gpa(page_gpa(page));
        let mut contents = vec![0xAA; PAGE];
        pgm.read_phys(at, &mut contents).unwrap();
        assert!(
            contents == model.contents[page],
            "page {page} differs {}",
            context()
        );
        // The EPT entry shows the page the A20 gate sends guest accesses to.
        let descriptor = pgm.page(pgm.a20_apply(at)).unwrap();
        let write = pgm.translate(at, Access::Write);
        let read = pgm.translate(at, Access::Read);
        match descriptor.state() {
            PageState::Ballooned => {
                let shown = model_page(pgm.a20_apply(at).as_u64()).unwrap().0;
                assert!(model.ballooned[shown], "{}", context());
                assert_eq!(read.unwrap_err().permitted, Permissions::empty(), "{}", context());
            }
            PageState::Zero => {
                assert_eq!(read.unwrap(), pgm.zero_frame(), "{}", context());
                assert!(write.is_err(), "{}", context());
            }
            PageState::Shared => {
                assert_eq!(read.unwrap(), descriptor.frame().unwrap(), "{}", context());
                assert!(write.is_err(), "a shared page is read-only {}", context());
            }
            PageState::WriteMonitored => {
                assert!(pgm.is_write_monitoring(), "{}", context());
                assert_eq!(read.unwrap(), descriptor.frame().unwrap(), "{}", context());
                assert!(write.is_err(), "{}", context());
            }
            PageState::Allocated => {
                assert_eq!(read.unwrap(), descriptor.frame().unwrap(), "{}", context());
                match write {
                    Ok(host) => assert_eq!(host, descriptor.frame().unwrap(), "{}", context()),
                    // Write monitoring re-armed at the root: a page written since holds its
                    // writes until the first write fault pushes that protection down.
                    Err(_) => assert!(
                        pgm.is_write_monitoring() && descriptor.written_to(),
                        "{}",
                        context()
                    ),
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_agree_with_the_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(&ops);
    }
}
