//! The kvm-unit-tests runner: `cargo xtask kut` packs the tests' `.flat` images and a manifest
//! into the boot image's ramdisk; this runs each entry in a VM of its own (its vCPU count,
//! memory and command line from `x86/unittests.cfg`), decides PASS, FAIL or SKIP as the upstream
//! runner does (`scripts/runtime.bash`: the test-exit code 0 passes, 38 (77 >> 1) skips, any
//! other code or no exit fails), audits the VM's EPT before destroying it, and prints one
//! `kut-result` line per test for xtask to report.
//!
//! Manifest lines: `name<TAB>file<TAB>vcpus<TAB>memory MiB<TAB>time limit<TAB>command line`,
//! the time limit in TSC ticks the VM may run (xtask derives it from the upstream timeout).

use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use loader::archive::Archive;

use crate::arch::memory::{self, frame_counts, is_allocated};
use crate::arch::power::{exit, ExitCode};
use crate::arch::smp;
use crate::arch::ticks;
use crate::vm::budget::Budget;
use crate::vm::devices::MachineSpec;
use crate::vm::load::kvm_unit_tests_environment;
use crate::vm::{Vcpu, VmMemory, VmStop};
use crate::{println, Host};

/// The manifest's path in the ramdisk.
pub const MANIFEST: &str = "kut/manifest";
/// The code the upstream runner reads as SKIP (77, halved by QEMU's debug-exit mangling).
const SKIP_CODE: u32 = 77 >> 1;
/// Ticks a vCPU runs before another one sharing its host CPU gets a turn.
const SLICE: u64 = 2_000_000;
/// Heap bytes the EPT audit may take per guest page (its per-frame records), and what must
/// stay free beside them.
const AUDIT_BYTES_PER_PAGE: usize = 8;
const AUDIT_HEAP_RESERVE: usize = 1 << 20;
/// The most exits one run may take (the vmexit tests take millions; time bounds them).
const EXITS: u64 = u64::MAX;

/// One manifest entry.
struct Entry<'a> {
    name: &'a str,
    file: &'a str,
    vcpus: u32,
    memory_mib: u64,
    limit_ticks: u64,
    /// The CPU vendor string the guest sees (empty: the host's).
    vendor: &'a str,
    cmdline: &'a str,
}

impl<'a> Entry<'a> {
    fn parse(line: &'a str) -> Option<Entry<'a>> {
        let mut fields = line.splitn(7, '\t');
        Some(Entry {
            name: fields.next()?,
            file: fields.next()?,
            vcpus: fields.next()?.parse().ok().filter(|&n| (1..=64).contains(&n))?,
            memory_mib: fields
                .next()?
                .parse()
                .ok()
                .filter(|&m| (2..=1 << 20).contains(&m))?,
            limit_ticks: fields.next()?.parse().ok()?,
            vendor: fields
                .next()
                .filter(|vendor| vendor.is_empty() || vendor.len() == 12)?,
            cmdline: fields.next().unwrap_or(""),
        })
    }
}

/// A test's result.
enum Verdict {
    Pass,
    Fail,
    Skip,
}

/// Runs every manifest entry and ends the machine.
pub fn run(host: &'static Host, archive: Archive<'_>) -> ! {
    let Some(manifest) = archive.file(MANIFEST) else {
        exit(ExitCode::Failure, "kut: no manifest in the ramdisk")
    };
    let manifest = String::from_utf8_lossy(manifest);
    let frames_before = frame_counts().free;
    for line in manifest
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
    {
        let Some(entry) = Entry::parse(line) else {
            println!("kut-result\t?\tFAIL\tmalformed manifest line: {line}");
            continue;
        };
        println!(
            "kut: running {} ({} vCPUs, {} MiB, {})",
            entry.name, entry.vcpus, entry.memory_mib, entry.cmdline
        );
        let start = ticks();
        let (verdict, detail) = match run_entry(host, &archive, &entry) {
            Ok(outcome) => outcome,
            Err(message) => (Verdict::Fail, message),
        };
        let verdict = match verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        };
        println!(
            "kut-result\t{}\t{verdict}\t{}\t{} ticks",
            entry.name,
            detail.replace('\t', " "),
            ticks() - start
        );
    }
    let leaked = frames_before.saturating_sub(frame_counts().free);
    if leaked > 0 {
        exit(
            ExitCode::Failure,
            &format!("kut: {leaked} host frames not given back"),
        );
    }
    println!("kut-done");
    exit(ExitCode::Success, "")
}

/// Runs one test in a VM of its own and judges it.
fn run_entry(
    host: &'static Host,
    archive: &Archive<'_>,
    entry: &Entry<'_>,
) -> Result<(Verdict, String), String> {
    let image = archive
        .file(&format!("kut/{}", entry.file))
        .ok_or_else(|| format!("{} is not in the ramdisk", entry.file))?;
    let vmx = host.vmx().map_err(|e| format!("{e}"))?;
    let ram = pc_ram(entry.memory_mib << 20);
    let spec = MachineSpec {
        name: entry.name.to_string(),
        vcpus: entry.vcpus,
        test_device: true,
        acpi_tables: true,
        test_hypercalls: false,
        unassigned_reads_ones: true,
        vendor: entry.vendor.as_bytes().try_into().ok(),
        ..MachineSpec::default()
    };
    let mut bsp = Vcpu::new_machine(vmx, &host.phys, &ram, true, &spec).map_err(|e| format!("VM: {e}"))?;
    let environment = kvm_unit_tests_environment(entry.vcpus, entry.memory_mib);
    // As QEMU does, the command line starts with the image's name: the test's argv[0].
    let cmdline = format!("{} {}", entry.file, entry.cmdline);
    bsp.load_multiboot(image, cmdline.trim_end(), Some(("env", environment.as_bytes())))
        .map_err(|e| format!("load {}: {e}", entry.file))?;
    let budget = Budget {
        slice: SLICE,
        limit: entry.limit_ticks,
        exits: EXITS,
    };
    bsp.set_budget(budget);
    let memory = bsp.memory();
    let aps = start_application_processors(host, &memory, entry.vcpus, budget)?;
    let mut stop = run_to_end(&mut bsp, &aps.done);
    aps.done.store(true, Ordering::SeqCst);
    memory.stop_all_vcpus();
    let mut ap_stops = Vec::new();
    for worker in aps.workers {
        ap_stops.extend(worker.join()?);
    }
    // Stopped by another vCPU: that vCPU's diagnostic says why.
    if let VmStop::Stopped(diagnostic) = &stop {
        if diagnostic.cause == crate::vm::StopCause::VmStopped {
            if let Some(cause) = ap_stops
                .into_iter()
                .find(|s| matches!(s, VmStop::Stopped(d) if d.cause.stops_vm()))
            {
                stop = cause;
            }
        }
    }
    let lines = bsp.devices().recent_console_lines();
    // The audit's bookkeeping lives on the kernel heap, whose exhaustion would stop the host:
    // a VM too large for it goes unaudited, and the result says so.
    let pages = bsp.stats().ram_pages;
    let audit_needs = usize::try_from(pages)
        .unwrap_or(usize::MAX)
        .saturating_mul(AUDIT_BYTES_PER_PAGE);
    let heap_free = memory::heap_free();
    let unaudited = heap_free < audit_needs.saturating_add(AUDIT_HEAP_RESERVE);
    if !unaudited {
        let report = bsp.pgm().audit(is_allocated);
        if !report.is_clean() {
            return Ok((Verdict::Fail, format!("EPT audit: {:?}", report.findings)));
        }
    }
    drop(bsp);
    let (verdict, mut detail) = judge(stop, &lines);
    if unaudited {
        detail.push_str(&format!(
            " [EPT audit skipped: {pages} pages need more than the kernel heap's {heap_free} free bytes]"
        ));
    }
    Ok((verdict, detail))
}

/// The RAM ranges of a PC with `bytes` of memory, as QEMU lays them out: 640 KiB low memory,
/// then from 1 MiB up to 3 GiB, the rest from 4 GiB (the hole holds the APIC page and the
/// test device).
fn pc_ram(bytes: u64) -> Vec<(u64, u64)> {
    const LOW_END: u64 = 0xC000_0000;
    let mut ram = alloc::vec![(0, 0xA_0000), (0x10_0000, bytes.min(LOW_END) - 0x10_0000)];
    if bytes > LOW_END {
        ram.push((0x1_0000_0000, bytes - LOW_END));
    }
    ram
}

/// PASS, FAIL or SKIP for how the VM ended, with the SUMMARY line or the last line printed
/// (or the stop's diagnostic).
fn judge(stop: VmStop, lines: &[String]) -> (Verdict, String) {
    let summary = lines.iter().rev().find(|line| line.starts_with("SUMMARY:"));
    let last = lines.iter().rev().find(|line| !line.trim().is_empty());
    let said = summary.or(last).cloned().unwrap_or_default();
    match stop {
        VmStop::TestExit(0) => (Verdict::Pass, said),
        VmStop::TestExit(SKIP_CODE) => (Verdict::Skip, said),
        VmStop::TestExit(code) => (Verdict::Fail, format!("exit code {code}: {said}")),
        VmStop::Stopped(diagnostic) => (Verdict::Fail, format!("{diagnostic}; last line: {said}")),
        other => (Verdict::Fail, format!("{other:?}; last line: {said}")),
    }
}

/// Runs the bootstrap vCPU until the VM's run is over: a stop that is not a slice's end.
fn run_to_end(bsp: &mut Vcpu<'_>, done: &AtomicBool) -> VmStop {
    loop {
        match bsp.run() {
            VmStop::Preempted { .. } | VmStop::StopRequested { .. } if !done.load(Ordering::SeqCst) => {
                continue
            }
            stop => break stop,
        }
    }
}

/// The application processors' host threads.
struct ApWorkers {
    workers: Vec<smp::Task<Result<Vec<VmStop>, String>>>,
    /// Set when the VM's run is over: the workers return.
    done: Arc<AtomicBool>,
}

/// Creates vCPUs 1.. of the VM on the other host CPUs (round-robin; a CPU with several runs
/// them in turns of one slice), in index order so that each gets the APIC ID of its index,
/// each waiting for INIT and a startup message.
fn start_application_processors(
    host: &'static Host,
    memory: &Arc<VmMemory>,
    vcpus: u32,
    budget: Budget,
) -> Result<ApWorkers, String> {
    let done = Arc::new(AtomicBool::new(false));
    let others: Vec<usize> = smp::ready_cpus()
        .map(|cpu| cpu.index)
        .filter(|&index| index != smp::this_cpu().index)
        .collect();
    if vcpus > 1 && others.is_empty() {
        return Err(format!("{vcpus} vCPUs need a second host CPU"));
    }
    let next = Arc::new(AtomicU32::new(1));
    let mut workers = Vec::new();
    for (slot, &cpu) in others.iter().enumerate() {
        let mine: Vec<u32> = (1..vcpus)
            .filter(|i| (*i as usize - 1) % others.len() == slot)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let (memory, done, next) = (Arc::clone(memory), Arc::clone(&done), Arc::clone(&next));
        let task = smp::spawn_on(cpu, move || ap_worker(host, memory, mine, next, done, budget))
            .map_err(|e| format!("{e}"))?;
        workers.push(task);
    }
    // Every vCPU exists before the bootstrap vCPU can send it INIT.
    while next.load(Ordering::SeqCst) < vcpus {
        if workers.iter().any(|w| w.is_done()) {
            break;
        }
        core::hint::spin_loop();
    }
    Ok(ApWorkers { workers, done })
}

/// One host CPU's application processors: made in index order, then run in turns until the
/// VM's run is over. Returns how each one's run ended for good.
fn ap_worker(
    host: &'static Host,
    memory: Arc<VmMemory>,
    mine: Vec<u32>,
    next: Arc<AtomicU32>,
    done: Arc<AtomicBool>,
    budget: Budget,
) -> Result<Vec<VmStop>, String> {
    let vmx = host.vmx().map_err(|e| format!("{e}"))?;
    let mut vcpus = Vec::new();
    for index in mine {
        while next.load(Ordering::SeqCst) != index {
            core::hint::spin_loop();
        }
        let made = Vcpu::new_vcpu(vmx, Arc::clone(&memory), &host.phys);
        next.fetch_add(1, Ordering::SeqCst);
        let mut vcpu = made.map_err(|e| format!("vCPU {index}: {e}"))?;
        vcpu.wait_for_startup();
        vcpu.set_budget(budget);
        vcpus.push((vcpu, None));
    }
    while !done.load(Ordering::SeqCst) {
        for (vcpu, finished) in vcpus.iter_mut().filter(|(_, finished)| finished.is_none()) {
            match vcpu.run() {
                VmStop::Preempted { .. } | VmStop::StopRequested { .. } => {}
                // An AP that halted for good or stopped leaves the others running; a stop of
                // the whole VM reaches the bootstrap vCPU through its requests.
                stop => *finished = Some(stop),
            }
        }
        if vcpus.iter().all(|(_, finished)| finished.is_some()) {
            break;
        }
    }
    Ok(vcpus.into_iter().filter_map(|(_, stop)| stop).collect())
}
