//! Address lookup and dirty harvest, pgm against rust-vmm's vm-memory on the same layout in the
//! same run: 8 RAM regions of 64 MiB with 64 MiB holes between them (512 MiB, 131072 pages).
//!
//! Run: `cargo bench -p pgm --features sim --bench lookup_and_harvest`

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use pgm::sim::{SimFrames, SimMemory};
use pgm::{Access, GuestPhysAddr, Pgm, PAGE_SIZE};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const REGIONS: u64 = 8;
const REGION_SIZE: u64 = 64 << 20;
const STRIDE: u64 = 128 << 20;
const PAGES: u64 = REGIONS * REGION_SIZE / PAGE_SIZE;

type SimPgm = Pgm<SimFrames, SimMemory>;

fn region_base(region: u64) -> u64 {
    region * STRIDE
}

/// Guest-physical address of RAM page `page` (0..PAGES) of the layout.
fn page_address(page: u64) -> u64 {
    let per_region = REGION_SIZE / PAGE_SIZE;
    region_base(page / per_region) + (page % per_region) * PAGE_SIZE
}

fn pgm_layout(frames: u64) -> SimPgm {
    let mut pgm = Pgm::new(SimFrames::new(frames), SimMemory::default()).unwrap();
    for region in 0..REGIONS {
        let base = GuestPhysAddr::new(region_base(region)).unwrap();
        pgm.register_ram(base, REGION_SIZE, "ram").unwrap();
    }
    pgm
}

fn vm_memory_layout() -> GuestMemoryMmap {
    let ranges: Vec<_> = (0..REGIONS)
        .map(|r| (GuestAddress(region_base(r)), REGION_SIZE as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

/// `count` pseudo-random page numbers (xorshift, fixed seed, so both sides see the same).
fn random_pages(count: usize) -> Vec<u64> {
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    (0..count)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % PAGES
        })
        .collect()
}

/// Sums the time `one` reports over `iterations` runs (each run sets up untimed, then times the
/// part measured).
fn timed(iterations: u64, mut one: impl FnMut() -> Duration) -> Duration {
    (0..iterations).map(|_| one()).sum()
}

fn lookup(c: &mut Criterion) {
    let pgm = pgm_layout(2048);
    let mem = vm_memory_layout();
    let random: Vec<u64> = random_pages(4096)
        .into_iter()
        .map(|p| page_address(p) + 0x123)
        .collect();
    let sequential: Vec<u64> = (0..4096).map(|p| page_address(p) + 0x123).collect();
    for (pattern, addresses) in [("random", &random), ("sequential", &sequential)] {
        let mut group = c.benchmark_group(format!("lookup 4096 {pattern}"));
        group.bench_function("pgm page()", |b| {
            b.iter(|| {
                for &a in addresses {
                    black_box(pgm.page(GuestPhysAddr::new(a).unwrap()));
                }
            })
        });
        group.bench_function("vm-memory find_region()", |b| {
            b.iter(|| {
                for &a in addresses {
                    black_box(mem.find_region(GuestAddress(a)));
                }
            })
        });
        group.finish();
    }
}

fn harvest(c: &mut Criterion) {
    for percent in [1u64, 25] {
        let mut dirty = random_pages((PAGES * percent / 100) as usize);
        dirty.sort_unstable();
        dirty.dedup();
        let mut group = c.benchmark_group(format!("harvest {percent}% of {PAGES} pages"));
        group.sample_size(20);

        let mut pgm = pgm_layout(2048 + dirty.len() as u64 + 256);
        pgm.start_write_monitoring();
        let mut out = Vec::with_capacity(dirty.len());
        group.bench_function("pgm harvest_written()", |b| {
            b.iter_custom(|iterations| {
                timed(iterations, || {
                    // The guest writes the dirty set: one write fault per page (not timed).
                    for &page in &dirty {
                        pgm.resolve_fault(GuestPhysAddr::new(page_address(page)).unwrap(), Access::Write);
                    }
                    out.clear();
                    let start = Instant::now();
                    black_box(pgm.harvest_written(&mut out));
                    start.elapsed()
                })
            })
        });

        let bitmap = AtomicBitmap::new(
            (PAGES * PAGE_SIZE) as usize,
            NonZeroUsize::new(PAGE_SIZE as usize).unwrap(),
        );
        group.bench_function("vm-memory AtomicBitmap get_and_reset()", |b| {
            b.iter_custom(|iterations| {
                timed(iterations, || {
                    for &page in &dirty {
                        bitmap.set_bit(page as usize);
                    }
                    let start = Instant::now();
                    // The same result as pgm's: the dirty pages' addresses, and a clean bitmap.
                    let words = bitmap.get_and_reset();
                    let mut pages = Vec::with_capacity(dirty.len());
                    for (w, word) in words.iter().enumerate() {
                        let mut bits = *word;
                        while bits != 0 {
                            pages.push(page_address(w as u64 * 64 + u64::from(bits.trailing_zeros())));
                            bits &= bits - 1;
                        }
                    }
                    black_box(pages);
                    start.elapsed()
                })
            })
        });
        group.finish();
    }
}

criterion_group!(benches, lookup, harvest);
criterion_main!(benches);
