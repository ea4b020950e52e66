//! Performance at scale (issue 11), pgm against rust-vmm's vm-memory in the same run, on a flat
//! direct-mapped host memory (`FlatMemory`: an index per access, as the kernel's physical
//! window is). Prints one markdown table, pgm/README.md's: each figure is the median of its
//! rounds (the first round of each is a warm-up and not counted), with the reference measured
//! beside it and the ratio between them.
//!
//! Run: `cargo bench -p pgm --features sim --bench scale` (`make bench` does).

// The benchmarks measure the calls, not the flushes their invalidations ask for.
#![allow(unused_must_use)]

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use pgm::sim::{FlatMemory, SimFormat, SimFrames};
use pgm::{Access, GuestPhysAddr, Pgm, PAGE_SIZE};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

type FlatPgm = Pgm<SimFrames, FlatMemory, SimFormat>;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Rounds per harvest and lookup figure (plus one warm-up).
const ROUNDS: usize = 11;
/// Rounds per figure whose set-up costs seconds at 64 GiB (plus one warm-up).
const SLOW_ROUNDS: usize = 5;

fn gpa(addr: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(addr).unwrap()
}

/// Xorshift, fixed seed: both sides see the same numbers.
struct Random(u64);

impl Random {
    fn new() -> Random {
        Random(0x9E37_79B9_7F4A_7C15)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// `count` distinct random page numbers below `pages`, sorted.
fn random_pages(count: u64, pages: u64) -> Vec<u64> {
    let mut random = Random::new();
    let mut chosen: Vec<u64> = (0..count).map(|_| random.below(pages)).collect();
    chosen.sort_unstable();
    chosen.dedup();
    chosen
}

/// The median of `rounds` timings by `one`, after one warm-up call.
fn median(rounds: usize, mut one: impl FnMut() -> Duration) -> Duration {
    one();
    let mut times: Vec<Duration> = (0..rounds).map(|_| one()).collect();
    times.sort_unstable();
    times[rounds / 2]
}

/// A VM with `guest` bytes of RAM at 0 mapped with 4 KiB pages (the dirty-logging figures
/// are per page), on a flat memory big enough for its tables and `frames_for_pages` frames of
/// guest pages.
fn flat_vm(guest: u64, frames_for_pages: u64) -> FlatPgm {
    let tables = guest / (2 * MIB) + guest / GIB + 16;
    let frames = tables + frames_for_pages + 4096;
    let mut pgm: FlatPgm = Pgm::new(SimFrames::new(frames), FlatMemory::new(frames)).unwrap();
    pgm.set_large_pages(false);
    pgm.register_ram(gpa(0), guest, "ram").unwrap();
    pgm
}

/// One printed row: what, pgm's figure, the reference's, the ratio, the goal.
struct Row {
    measure: String,
    pgm: String,
    reference: String,
    ratio: String,
    goal: &'static str,
}

fn print(rows: &[Row]) {
    println!();
    println!("| measure | pgm | reference (same run) | ratio | goal |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.measure, row.pgm, row.reference, row.ratio, row.goal
        );
    }
}

fn micros(time: Duration) -> String {
    format!("{:.0} µs", time.as_secs_f64() * 1e6)
}

fn ratio(reference: Duration, pgm: Duration) -> String {
    format!("{:.1}× faster", reference.as_secs_f64() / pgm.as_secs_f64())
}

/// Harvest of `permille`‰ of a `guest`-byte guest: pgm lists the written pages and re-arms
/// monitoring; vm-memory's bitmap is read, reset and turned into the same list.
fn harvest_row(guest: u64, permille: u64) -> Row {
    let pages = guest / PAGE_SIZE;
    let dirty = random_pages(pages * permille / 1000, pages);
    let mut pgm = flat_vm(guest, dirty.len() as u64);
    let _ = pgm.start_write_monitoring();
    let mut out = Vec::with_capacity(dirty.len());
    let mut fault_times = Vec::new();
    let pgm_time = median(ROUNDS, || {
        // The guest writes the dirty set: one write fault per page, timed apart (the first
        // write in each 2 MiB block also re-protects what the block's earlier rounds wrote).
        let faults = Instant::now();
        for &page in &dirty {
            pgm.resolve_fault(gpa(page * PAGE_SIZE), Access::Write);
        }
        fault_times.push(faults.elapsed());
        out.clear();
        let start = Instant::now();
        black_box(pgm.harvest_written(&mut out));
        let time = start.elapsed();
        assert_eq!(out.len(), dirty.len(), "every written page harvested");
        time
    });
    drop(pgm);

    let bitmap = AtomicBitmap::new(guest as usize, NonZeroUsize::new(PAGE_SIZE as usize).unwrap());
    let reference = median(ROUNDS, || {
        for &page in &dirty {
            bitmap.set_bit(page as usize);
        }
        let start = Instant::now();
        let words = bitmap.get_and_reset();
        let mut listed = Vec::with_capacity(dirty.len());
        for (w, word) in words.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                listed.push(gpa((w as u64 * 64 + u64::from(bits.trailing_zeros())) * PAGE_SIZE));
                bits &= bits - 1;
            }
        }
        black_box(listed);
        start.elapsed()
    });
    Row {
        measure: format!(
            "harvest {} GiB, {}.{} % dirty ({} pages)",
            guest / GIB,
            permille / 10,
            permille % 10,
            dirty.len()
        ),
        pgm: format!("{} (the round's write faults: {})", micros(pgm_time), {
            fault_times.sort_unstable();
            micros(fault_times[fault_times.len() / 2])
        }),
        reference: format!("vm-memory bitmap {}", micros(reference)),
        ratio: ratio(reference, pgm_time),
        goal: if permille == 1 {
            "≥ 5× at 64 GiB"
        } else {
            "faster"
        },
    }
}

/// Write-protect-all (starting monitoring) and `register_ram` at 64 GiB, with 1 % of the
/// guest written; and what the guest's tables cost per page.
fn protect_all_and_register_rows() -> Vec<Row> {
    let guest = 64 * GIB;
    let pages = guest / PAGE_SIZE;
    let dirty = random_pages(pages / 100, pages);
    let mut pgm = flat_vm(guest, dirty.len() as u64);
    for &page in &dirty {
        pgm.resolve_fault(gpa(page * PAGE_SIZE), Access::Write);
    }
    let protect = median(SLOW_ROUNDS, || {
        let _ = pgm.stop_write_monitoring();
        let start = Instant::now();
        black_box(pgm.start_write_monitoring());
        start.elapsed()
    });
    let small_tables = pgm.stats().table_frames * PAGE_SIZE;
    drop(pgm);
    // As `Pgm::new` makes it: large pages on, untouched blocks on the zero chunk.
    let mut large_tables = 0;
    let register = median(SLOW_ROUNDS, || {
        let frames = 1024;
        let mut pgm: FlatPgm = Pgm::new(SimFrames::new(frames), FlatMemory::new(frames)).unwrap();
        let start = Instant::now();
        pgm.register_ram(gpa(0), guest, "ram").unwrap();
        let time = start.elapsed();
        large_tables = pgm.stats().table_frames * PAGE_SIZE;
        time
    });
    let per_page = |bytes: u64| bytes as f64 / pages as f64;
    vec![
        Row {
            measure: format!("write-protect-all, 64 GiB ({} pages written)", dirty.len()),
            pgm: micros(protect),
            reference: "—".into(),
            ratio: "—".into(),
            goal: "≤ 1 ms",
        },
        Row {
            measure: "`register_ram` 64 GiB (large pages, the default)".into(),
            pgm: format!("{:.2} ms", register.as_secs_f64() * 1e3),
            reference: "—".into(),
            ratio: "—".into(),
            goal: "≤ 1 ms",
        },
        Row {
            measure: "metadata per 4 KiB page, 64 GiB registered".into(),
            pgm: format!(
                "descriptor 8 B + nested tables {:.3} B (2 MiB pages); 8 B + {:.2} B mapped 4 KiB",
                per_page(large_tables),
                per_page(small_tables)
            ),
            reference: "VirtualBox 16 B + 8 B".into(),
            ratio: "—".into(),
            goal: "≤ 12 B with 2 MiB pages",
        },
    ]
}

/// A 4 GiB guest written once in every 4 KiB page: the write faults taken, the EPT tables it
/// ends with and the time, with large pages (the default) and with 4 KiB pages.
fn touched_everywhere_row() -> Row {
    let guest = 4 * GIB;
    let touch = |large: bool| {
        let pages = guest / PAGE_SIZE;
        // The guest's frames, the zero chunk, tables and the pool.
        let frames = pages + 512 + 4096;
        let mut pgm: FlatPgm = Pgm::new(SimFrames::new(frames), FlatMemory::new(frames)).unwrap();
        pgm.set_large_pages(large);
        pgm.register_ram(gpa(0), guest, "ram").unwrap();
        let mut faults = 0u64;
        let start = Instant::now();
        for page in 0..pages {
            let at = gpa(page * PAGE_SIZE);
            while pgm.translate(at, Access::Write).is_err() {
                faults += 1;
                pgm.resolve_fault(at, Access::Write);
            }
        }
        let time = start.elapsed();
        (
            faults,
            pgm.stats().table_frames * PAGE_SIZE / 1024,
            time.as_secs_f64() * 1e3,
        )
    };
    let (faults, tables, time) = touch(true);
    let (small_faults, small_tables, small_time) = touch(false);
    Row {
        measure: "4 GiB guest written in every 4 KiB page".into(),
        pgm: format!("{faults} write faults, {tables} KiB of nested tables, {time:.0} ms"),
        reference: format!("4 KiB pages: {small_faults} faults, {small_tables} KiB, {small_time:.0} ms"),
        ratio: format!("{:.0}× fewer faults", small_faults as f64 / faults as f64),
        goal: "≤ 2,048 faults, ≤ 24 KiB",
    }
}

/// Lookup layouts: 256 RAM ranges, each `size` bytes and as far from the next.
const RANGES: u64 = 256;
const LOOKUPS: usize = 1 << 20;

/// A lookup layout with 1M random addresses in it.
struct Layout {
    pgm: FlatPgm,
    range_size: u64,
    addresses: Vec<u64>,
}

impl Layout {
    fn new(range_size: u64) -> Layout {
        let per_range = range_size / PAGE_SIZE;
        let frames = RANGES * (range_size / (2 * MIB) + 2) + 64;
        let mut pgm: FlatPgm = Pgm::new(SimFrames::new(frames), FlatMemory::new(frames)).unwrap();
        for range in 0..RANGES {
            pgm.register_ram(gpa(range * 2 * range_size), range_size, "ram")
                .unwrap();
        }
        let mut random = Random::new();
        let addresses = (0..LOOKUPS)
            .map(|_| {
                let page = random.below(RANGES * per_range);
                (page / per_range) * 2 * range_size + (page % per_range) * PAGE_SIZE + 0x123
            })
            .collect();
        Layout {
            pgm,
            range_size,
            addresses,
        }
    }

    /// Nanoseconds per lookup of `ours` and of `reference` over the addresses, and the ratio
    /// `ours / reference`: the median of each, and the median of the ratios of rounds that time
    /// one right after the other. This machine's caches and memory latency change from minute
    /// to minute (the same descriptor read has taken 20 ns in one run and 93 ns in another), so
    /// a ratio of two medians taken apart can be off by a third; a ratio within one round
    /// compares the two under the same conditions.
    fn paired(&self, mut ours: impl FnMut(&[u64]), mut reference: impl FnMut(&[u64])) -> (f64, f64, f64) {
        let one = |lookups: &mut dyn FnMut(&[u64])| {
            let start = Instant::now();
            lookups(&self.addresses);
            start.elapsed().as_secs_f64() * 1e9 / LOOKUPS as f64
        };
        one(&mut ours);
        one(&mut reference);
        let rounds: Vec<(f64, f64)> = (0..ROUNDS)
            .map(|_| (one(&mut ours), one(&mut reference)))
            .collect();
        let middle = |values: Vec<f64>| {
            let mut values = values;
            values.sort_unstable_by(f64::total_cmp);
            values[values.len() / 2]
        };
        (
            middle(rounds.iter().map(|r| r.0).collect()),
            middle(rounds.iter().map(|r| r.1).collect()),
            middle(rounds.iter().map(|(a, b)| a / b).collect()),
        )
    }

    /// `Pgm::page` against reading the same descriptors where they are (their location already
    /// known: the memory-latency limit). A fault handler's one lookup costs its latency, so
    /// each address depends on the descriptor read before it (`raw >> 58`, the read-lock count,
    /// is 0 here, which the compiler cannot know) and the lookups cannot overlap.
    fn descriptor_row(&self) -> Row {
        let pgm = &self.pgm;
        let locations: Vec<_> = self
            .addresses
            .iter()
            .map(|&a| pgm.ranges().locate(gpa(a)).unwrap())
            .collect();
        let (page, read, ratio) = self.paired(
            |addresses| {
                let mut carry = 0;
                for &a in addresses {
                    carry = pgm.page(gpa(a + carry)).unwrap().raw() >> 58;
                }
                black_box(carry);
            },
            |_| {
                let mut carry = 0;
                for &(range, page) in &locations {
                    let range = pgm.ranges().get(range).unwrap();
                    carry = range.page(page + carry as usize).unwrap().raw() >> 58;
                }
                black_box(carry);
            },
        );
        let descriptors = RANGES * self.range_size / PAGE_SIZE * 8;
        Row {
            measure: format!(
                "GPA → descriptor (`Pgm::page`), 256 ranges × {} MiB ({} of descriptors), each lookup after the last",
                self.range_size / MIB,
                if descriptors < MIB {
                    format!("{} KiB", descriptors / 1024)
                } else {
                    format!("{} MiB", descriptors / MIB)
                }
            ),
            pgm: format!("{page:.1} ns"),
            reference: format!("the descriptor read at its known place {read:.1} ns"),
            ratio: format!("{ratio:.2}× the read"),
            goal: "≤ 1.2× the read",
        }
    }
}

/// Lookups of 1M random addresses: GPA → range and page index against vm-memory's
/// `find_region` over 256 ranges of 16 MiB; GPA → descriptor against the descriptor read over
/// 256 ranges of 16 MiB (8 MiB of descriptors: in the caches or not, as this machine's state
/// has it), 256 MiB (not) and 1 MiB (512 KiB: in the caches).
fn lookup_rows() -> Vec<Row> {
    let small = Layout::new(16 * MIB);
    let regions: Vec<_> = (0..RANGES)
        .map(|r| (GuestAddress(r * 2 * small.range_size), small.range_size as usize))
        .collect();
    let vm_memory: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&regions).unwrap();
    let (find, find_region, ratio) = small.paired(
        |addresses| {
            for &a in addresses {
                black_box(small.pgm.ranges().locate(gpa(a)));
            }
        },
        |addresses| {
            for &a in addresses {
                black_box(vm_memory.find_region(GuestAddress(a)));
            }
        },
    );
    let mut rows = vec![
        Row {
            measure: "GPA → range + page index, 1M random, 256 ranges × 16 MiB".into(),
            pgm: format!("{find:.1} ns"),
            reference: format!("vm-memory `find_region` {find_region:.1} ns"),
            ratio: format!("{:.1}× faster", 1.0 / ratio),
            goal: "≥ 3×",
        },
        small.descriptor_row(),
    ];
    drop(small);
    rows.push(Layout::new(256 * MIB).descriptor_row());
    rows.push(Layout::new(MIB).descriptor_row());
    rows
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument picks sections by name.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    let mut rows = Vec::new();
    if wanted("lookup") {
        rows.extend(lookup_rows());
    }
    if wanted("harvest") {
        for guest in [GIB, 16 * GIB, 64 * GIB] {
            for permille in [1, 10] {
                rows.push(harvest_row(guest, permille));
            }
        }
    }
    if wanted("protect") {
        rows.extend(protect_all_and_register_rows());
    }
    if wanted("large") {
        rows.push(touched_everywhere_row());
    }
    print(&rows);
}
