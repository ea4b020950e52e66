//! One `Pgm` driven by several threads, as the kernel drives it from several CPUs: vCPU threads
//! fault and access guest pages through TLBs of their own, a host thread harvests written
//! pages, balloons and writes, and every change that needs it is followed by the shootdown
//! protocol (`begin_tlb_flush`, every vCPU flushes its TLB, `end_tlb_flush`). The oracle runs at
//! every access through a TLB: the frame a cached translation reaches must still be allocated
//! and must back no other guest page — a frame reused while another CPU can still reach it is
//! a guest-to-guest (or guest-to-host) leak. At quiescent points, with every vCPU parked, the
//! EPT auditor and the frame accounting check the whole manager.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use brlock::{BrLock, WriteGuard};
use std::thread;
use std::vec::Vec;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::frames::HostMemory;
use crate::manager::FaultOutcome;
use crate::paging::{Access, Invalidation};
use crate::test_support::{assert_accounting, assert_isolated, gpa, pgm_with_frames, SimPgm, MIB};

/// Guest RAM of the stress VM: few pages, so that threads collide on them, in part of one
/// 2 MiB block (whose settles take the lock).
const RAM_BASE: u64 = MIB;
const RAM_PAGES: u64 = 64;
/// Guest RAM of the second stress VM: two whole 2 MiB blocks, which lock-free faults settle
/// after each harvest (see pgm's `lazy_protection`).
const BLOCKS_BASE: u64 = 2 * MIB;
const BLOCKS_PAGES: u64 = 1024;
const VCPUS: usize = 2;
const ACCESSES_PER_VCPU: u64 = 250_000;
const HOST_OPERATIONS: u64 = 30_000;
/// One vCPU access in this many is a balloon hypercall instead.
const BALLOON_ONE_IN: u64 = 64;
/// Host operations between two quiescent checks.
const CHECK_EVERY: u64 = 1_000;

/// A software TLB of one vCPU: page number → (frame, writable).
type Tlb = BTreeMap<u64, (HostPhysAddr, bool)>;

/// What a vCPU shares with the threads that flush it or park it.
#[derive(Default)]
struct VcpuShared {
    flushes_requested: AtomicU64,
    flushes_done: AtomicU64,
    tlb: Mutex<Tlb>,
}

struct World {
    pgm: BrLock<SimPgm>,
    /// The first RAM page's number, and the number of RAM pages.
    ram: (u64, u64),
    vcpus: Vec<VcpuShared>,
    /// Set while the host wants every vCPU parked.
    park: AtomicBool,
    parked: AtomicUsize,
    finished: AtomicUsize,
    /// Accesses that went through a cached translation (the oracle's checks).
    tlb_hits: AtomicU64,
    /// Faults the lock-free path resolved.
    lock_free_faults: AtomicU64,
    /// Set when a thread panicked: every wait gives up, so the test fails instead of hanging.
    failed: AtomicBool,
}

/// Marks the world failed when the thread holding it unwinds.
struct FailOnPanic<'w>(&'w World);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.failed.store(true, Ordering::SeqCst);
        }
    }
}

impl World {
    /// Yields between two looks at a condition; panics if another thread failed.
    fn wait(&self) {
        assert!(!self.failed.load(Ordering::SeqCst), "another thread failed");
        thread::yield_now();
    }

    /// Flushes the TLB of `vcpu` if a flush was asked of it (what the NMI handler does).
    fn serve_flushes(&self, vcpu: usize) {
        let shared = &self.vcpus[vcpu];
        let requested = shared.flushes_requested.load(Ordering::SeqCst);
        if shared.flushes_done.load(Ordering::SeqCst) < requested {
            shared.tlb.lock().unwrap().clear();
            shared.flushes_done.fetch_max(requested, Ordering::SeqCst);
        }
    }

    /// Locks the manager while answering flush requests (a CPU spinning on the VM's lock
    /// still takes NMIs). `me` is the calling vCPU, if any.
    fn lock(&self, me: Option<usize>) -> WriteGuard<'_, SimPgm> {
        loop {
            if let Some(pgm) = self.pgm.try_write() {
                return pgm;
            }
            if let Some(vcpu) = me {
                self.serve_flushes(vcpu);
            }
            self.wait();
        }
    }

    /// The shootdown protocol the kernel follows after a change (`VmMemory::flush`): every
    /// other vCPU's TLB is emptied, and the caller's unless the change is
    /// [`Invalidation::OtherCpus`]; only a complete flush lets the frames retired before it
    /// be reused. Call without the lock.
    fn flush(&self, invalidation: Invalidation, me: Option<usize>) {
        if invalidation == Invalidation::None {
            return;
        }
        let complete = invalidation != Invalidation::OtherCpus;
        let ticket = complete.then(|| self.lock(me).begin_tlb_flush());
        let mut waiting = Vec::new();
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            if Some(index) == me {
                if complete {
                    vcpu.tlb.lock().unwrap().clear();
                }
                continue;
            }
            waiting.push((index, vcpu.flushes_requested.fetch_add(1, Ordering::SeqCst) + 1));
        }
        for (index, ticket) in waiting {
            while self.vcpus[index].flushes_done.load(Ordering::SeqCst) < ticket {
                if let Some(vcpu) = me {
                    self.serve_flushes(vcpu);
                }
                self.wait();
            }
        }
        if let Some(ticket) = ticket {
            self.lock(me).end_tlb_flush(ticket);
        }
    }

    /// The oracle: an access through a cached translation of `page` to `frame` reaches the
    /// frame that still backs the page, the zero frame, or a frame taken from the guest that
    /// waits for the flush this vCPU has not yet served. Anything else — a frame given back to
    /// the host, reused for another page, or released to the pool — is a leak.
    fn check_cached(&self, pgm: &SimPgm, page: u64, frame: HostPhysAddr) {
        let backing = pgm.page(gpa(page * PAGE_SIZE)).and_then(|page| page.frame());
        let reachable = backing == Some(frame) || frame == pgm.zero_frame() || pgm.is_awaiting_flush(frame);
        assert!(
            reachable,
            "a TLB reaches frame {frame} for page {page:#x}, which now has {backing:?}; the frame \
             is {}",
            if pgm.frames().inner.is_allocated(frame) {
                "released to the pool or reused"
            } else {
                "back with the host"
            }
        );
    }

    /// Waits while the host has the vCPUs parked.
    fn park_if_asked(&self, vcpu: usize) {
        if !self.park.load(Ordering::SeqCst) {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        while self.park.load(Ordering::SeqCst) {
            self.serve_flushes(vcpu);
            self.wait();
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A small xorshift generator: each thread its own, seeded apart.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A random RAM page of `world`.
    fn page(&mut self, world: &World) -> u64 {
        let (first, pages) = world.ram;
        first + self.next() % pages
    }
}

/// One guest access by `vcpu`: through its TLB when it has the translation, else through the
/// EPT, resolving faults as the kernel's exit handler does.
fn access(world: &World, vcpu: usize, page: u64, write: bool, value: u64) {
    let kind = if write { Access::Write } else { Access::Read };
    for _ in 0..8 {
        world.serve_flushes(vcpu);
        let cached = world.vcpus[vcpu].tlb.lock().unwrap().get(&page).copied();
        if let Some((frame, writable)) = cached.filter(|&(_, writable)| writable || !write) {
            let mut pgm = world.lock(Some(vcpu));
            // A flush served while waiting for the lock came before this access: the access
            // starts again without the translation.
            if world.vcpus[vcpu].tlb.lock().unwrap().get(&page) != Some(&(frame, writable)) {
                continue;
            }
            world.check_cached(&pgm, page, frame);
            if writable && write {
                pgm.memory_mut().write(frame, &value.to_le_bytes());
            }
            world.tlb_hits.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let at = gpa(page * PAGE_SIZE);
        let pgm = world.lock(Some(vcpu));
        match pgm.translate(at, kind) {
            Ok(frame) => {
                let writable = pgm.translate(at, Access::Write).is_ok();
                drop(pgm);
                world.vcpus[vcpu]
                    .tlb
                    .lock()
                    .unwrap()
                    .insert(page, (frame, writable));
            }
            Err(_) => {
                // The violation drops the CPU's translation of the page (SDM 29.4.3.1).
                world.vcpus[vcpu].tlb.lock().unwrap().remove(&page);
                // As the kernel does: lock-free first, under the lock when that declines.
                drop(pgm);
                let lock_free = world.pgm.read(vcpu).resolve_fault_lock_free(vcpu, at, kind);
                if lock_free.is_some() {
                    world.lock_free_faults.fetch_add(1, Ordering::Relaxed);
                }
                let outcome = lock_free.unwrap_or_else(|| world.lock(Some(vcpu)).resolve_fault(at, kind));
                match outcome {
                    FaultOutcome::Resolved { invalidation, .. } => world.flush(invalidation, Some(vcpu)),
                    // A ballooned page stops the guest in the kernel; here the vCPU moves on.
                    FaultOutcome::Ballooned => return,
                    other => panic!("unexpected fault outcome at {at}: {other:?}"),
                }
            }
        }
    }
}

/// The guest's balloon driver on `vcpu` gives `page` up (or takes it back when it is already
/// ballooned), as a hypercall handled on the vCPU's own CPU would: its flush is a complete one
/// that overlaps the host's and the other vCPU's.
fn balloon_from_guest(world: &World, vcpu: usize, page: u64) {
    let at = gpa(page * PAGE_SIZE);
    let invalidation = {
        let mut pgm = world.lock(Some(vcpu));
        match pgm.balloon_inflate(&[at]) {
            Ok(invalidation) => invalidation,
            Err(_) => pgm
                .balloon_deflate(&[at])
                .expect("a page the balloon refused is in it"),
        }
    };
    world.flush(invalidation, Some(vcpu));
}

fn vcpu_thread(world: &World, vcpu: usize) {
    let _guard = FailOnPanic(world);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((vcpu as u64 + 1) * 0x1234_5678));
    for n in 0..ACCESSES_PER_VCPU {
        world.park_if_asked(vcpu);
        let page = rng.page(world);
        if rng.next().is_multiple_of(BALLOON_ONE_IN) {
            balloon_from_guest(world, vcpu, page);
            continue;
        }
        let write = !rng.next().is_multiple_of(3);
        access(world, vcpu, page, write, n);
    }
    world.finished.fetch_add(1, Ordering::SeqCst);
    // Answer flushes until every thread is done: the host may still be waiting for one. A
    // finished vCPU counts as parked for the quiescent checks (it no longer accesses).
    while world.finished.load(Ordering::SeqCst) < VCPUS + 1 {
        world.serve_flushes(vcpu);
        world.wait();
    }
}

/// One random host operation: harvest, balloon, deflate or a write, each followed by the
/// shootdown it asks for.
fn host_operation(world: &World, rng: &mut Rng, ballooned: &mut Vec<GuestPhysAddr>) {
    let choice = rng.next() % 8;
    let invalidation = {
        let mut pgm = world.lock(None);
        match choice {
            0..=2 => {
                let mut written = Vec::new();
                pgm.harvest_written(&mut written)
            }
            3 | 4 => {
                let at = gpa(rng.page(world) * PAGE_SIZE);
                match pgm.balloon_inflate(&[at]) {
                    Ok(invalidation) => {
                        ballooned.push(at);
                        invalidation
                    }
                    // Already ballooned.
                    Err(_) => Invalidation::None,
                }
            }
            5 if !ballooned.is_empty() => {
                let at = ballooned.swap_remove((rng.next() as usize) % ballooned.len());
                // The guest may have taken it back meanwhile.
                pgm.balloon_deflate(&[at]).unwrap_or(Invalidation::None)
            }
            _ => {
                let at = gpa(rng.page(world) * PAGE_SIZE + 8);
                // A ballooned page refuses the write; nothing changes then.
                pgm.write_phys(at, &rng.next().to_le_bytes())
                    .unwrap_or(Invalidation::None)
            }
        }
    };
    world.flush(invalidation, None);
}

/// Parks every vCPU, audits the manager and lets them go on.
fn quiescent_check(world: &World, context: &str) {
    world.park.store(true, Ordering::SeqCst);
    while world.parked.load(Ordering::SeqCst) + world.finished.load(Ordering::SeqCst) < VCPUS {
        world.wait();
    }
    {
        let pgm = world.lock(None);
        assert_isolated(&pgm, context);
        assert_accounting(&pgm);
    }
    world.park.store(false, Ordering::SeqCst);
}

/// A VM with [`RAM_PAGES`] pages of RAM under write monitoring and `vcpus` vCPUs.
fn world(vcpus: usize) -> World {
    world_with(vcpus, RAM_BASE, RAM_PAGES)
}

/// A VM with `pages` pages of RAM from `base` under write monitoring (4 KiB mappings) and
/// `vcpus` vCPUs.
fn world_with(vcpus: usize, base: u64, pages: u64) -> World {
    let mut pgm = pgm_with_frames(pages + 448);
    pgm.set_large_pages(false);
    pgm.register_ram(gpa(base), pages * PAGE_SIZE, "ram").unwrap();
    // No vCPU has run yet: nothing cached to flush.
    let _ = pgm.start_write_monitoring();
    pgm.set_lock_free_vcpus(VCPUS);
    World {
        pgm: BrLock::new(pgm, VCPUS),
        ram: (base / PAGE_SIZE, pages),
        vcpus: (0..vcpus).map(|_| VcpuShared::default()).collect(),
        park: AtomicBool::new(false),
        parked: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        tlb_hits: AtomicU64::new(0),
        lock_free_faults: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    }
}

/// The race the threads rarely hit, played in order: a frame the host took from the guest
/// while a vCPU still caches it must not be released by that vCPU's own fault flush, which
/// leaves its own TLB as it was.
#[test]
fn a_flush_that_skips_the_faulting_cpu_releases_nothing_that_cpu_may_reach() {
    let world = world(1);
    let (ballooned, zero) = (RAM_BASE / PAGE_SIZE, RAM_BASE / PAGE_SIZE + 1);
    access(&world, 0, ballooned, true, 1);
    let (frame, writable) = world.vcpus[0].tlb.lock().unwrap()[&ballooned];
    assert!(writable, "the write left a writable translation");
    let invalidation = world
        .lock(None)
        .balloon_inflate(&[gpa(ballooned * PAGE_SIZE)])
        .unwrap();
    assert_eq!(invalidation, Invalidation::SingleContext);
    // Before the host's flush: vCPU 0 fills another page, whose flush skips vCPU 0 itself.
    access(&world, 0, zero, true, 2);
    assert!(
        world.lock(None).is_awaiting_flush(frame),
        "the ballooned frame was released"
    );
    // vCPU 0 still reaches the frame through its TLB: the oracle accepts it only while it waits.
    access(&world, 0, ballooned, true, 3);
    // The host's flush, from vCPU 0's CPU (the only one).
    world.flush(invalidation, Some(0));
    assert!(
        !world.lock(None).is_awaiting_flush(frame),
        "the complete flush released it"
    );
}

#[test]
fn threads_faulting_harvesting_and_ballooning_never_reach_a_reused_frame() {
    finish(stress(world(VCPUS)));
}

/// The same over two whole 2 MiB blocks, so that after each harvest the vCPUs settle blocks
/// on the read side while the other faults in them (and the auditor checks what they left).
#[test]
fn threads_settling_blocks_on_the_read_side_never_reach_a_reused_frame() {
    let world = world_with(VCPUS, BLOCKS_BASE, BLOCKS_PAGES);
    let world = stress(world);
    let settles = world.pgm.read(0).shared_settles();
    assert!(
        settles > 100,
        "only {settles} blocks were settled on the read side"
    );
    finish(world);
}

/// Runs the vCPU threads and the host's operations on `world`, with quiescent checks, and
/// checks the oracle ran; returns the world for more checks.
fn stress(world: World) -> World {
    thread::scope(|scope| {
        for vcpu in 0..VCPUS {
            let world = &world;
            scope.spawn(move || vcpu_thread(world, vcpu));
        }
        let _guard = FailOnPanic(&world);
        let mut rng = Rng(0xC0FF_EE00_D15E_A5E5);
        let mut ballooned = Vec::new();
        for n in 0..HOST_OPERATIONS {
            host_operation(&world, &mut rng, &mut ballooned);
            if n % CHECK_EVERY == CHECK_EVERY - 1 {
                quiescent_check(&world, &std::format!("after host operation {n}"));
            }
        }
        world.finished.fetch_add(1, Ordering::SeqCst);
    });
    quiescent_check(&world, "at the end");
    let hits = world.tlb_hits.load(Ordering::Relaxed);
    assert!(
        hits > ACCESSES_PER_VCPU / 2,
        "only {hits} accesses went through a cached translation: the oracle barely ran"
    );
    let lock_free = world.lock_free_faults.load(Ordering::Relaxed);
    assert!(
        lock_free > 1_000,
        "only {lock_free} faults were resolved lock-free"
    );
    world
}

/// Ends the VM of `world`: every frame must go back.
fn finish(world: World) {
    let frames = world.pgm.into_inner().terminate();
    assert_eq!(frames.inner.counts().used(), 0, "frames leaked");
}
