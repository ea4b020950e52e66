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
use alloc::vec::Vec;

use loader::archive::Archive;

use crate::arch::memory::{self, frames_in_use_outside_heap, is_allocated};
use crate::arch::power::{exit, ExitCode};
use crate::arch::ticks;
use crate::machine;
use crate::vm::budget::Budget;
use crate::vm::devices::MachineSpec;
use crate::vm::load::kvm_unit_tests_environment;
use crate::vm::{Vcpu, VmStop};
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
    let frames_before = frames_in_use_outside_heap();
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
    let leaked = frames_in_use_outside_heap().saturating_sub(frames_before);
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
    let vmx = host.virt().map_err(|e| format!("{e}"))?;
    let ram = machine::pc_ram(entry.memory_mib << 20);
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
    let stop = machine::run_to_end(host, &mut bsp, entry.vcpus, Vec::new(), &mut |_| {
        Ok(machine::Next::Run)
    })?
    .into_stop(entry.name)?;
    let lines = bsp.devices().recent_console_lines();
    // The audit's bookkeeping lives on the kernel heap (which grows by free host frames), whose
    // exhaustion would stop the host: a VM too large for it goes unaudited, and the result
    // says so.
    let pages = bsp.stats().ram_pages;
    let audit_needs = usize::try_from(pages)
        .unwrap_or(usize::MAX)
        .saturating_mul(AUDIT_BYTES_PER_PAGE);
    let heap_available = memory::heap_available();
    let unaudited = heap_available < audit_needs.saturating_add(AUDIT_HEAP_RESERVE);
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
            " [EPT audit skipped: {pages} pages need more than the {heap_available} bytes the kernel heap has and can grow by]"
        ));
    }
    Ok((verdict, detail))
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
