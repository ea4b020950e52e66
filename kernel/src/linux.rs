//! The Linux boot: `cargo xtask run --linux` packs a bzImage, an initrd and a manifest into the
//! boot image's ramdisk; this makes a PC-like VM of the manifest's size and vCPU count (ACPI
//! tables, the legacy devices, the local APICs), loads the kernel through the boot protocol's
//! 64-bit entry (`loader::linux`), runs every vCPU until the guest powers off, resets or is
//! stopped, audits the VM's EPT and prints how the run ended with the VM's exit counts. On the
//! way two pre-copies of its RAM prove dirty logging (`crate::precopy`); the second ends in
//! the guest's migration to a second VM (`crate::migration`), which runs it to its end.
//!
//! Manifest lines, `key=value`: `name` (the console prefix), `vcpus`, `memory_mib`,
//! `limit_ticks` (the TSC ticks the VM may run) and `cmdline`.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use loader::archive::Archive;

use crate::arch::memory::{frames_in_use_outside_heap, heap_stats};
use crate::arch::power::{exit, ExitCode};
use crate::arch::ticks;
use crate::machine::{self, Next, RunEnd};
use crate::migration::{self, Source, Target};
use crate::precopy::{Ending, PreCopy};
use crate::vm::budget::Budget;
use crate::vm::devices::MachineSpec;
use crate::vm::{exit_costs_of_finished_vms, Vcpu, VmStop};
use crate::{println, Host};
use pgm::manager::DirtyLogMode;
use pgm::GuestPhysAddr;

/// The manifest's path in the ramdisk.
pub const MANIFEST: &str = "linux/manifest";
/// The kernel's path in the ramdisk.
const KERNEL: &str = "linux/kernel";
/// The initrd's path in the ramdisk (optional).
const INITRD: &str = "linux/initrd";
/// Ticks a vCPU runs before another one sharing its host CPU gets a turn (and the host
/// takes a pre-copy's next step).
const SLICE: u64 = 2_000_000;
/// Ticks from the start of the run to the write-protect pre-copy: 10 s of guest time at
/// 40·10⁶ ticks a second, while the kernel boots (`/init` comes at about 1.5·10⁹).
const WRITE_PROTECT_PRECOPY_AFTER: u64 = 400_000_000;
/// Ticks from the start of the run to the PML pre-copy (or the end of the write-protect one,
/// if that is later): while `/init`'s workload writes.
const PML_PRECOPY_AFTER: u64 = 2_000_000_000;

/// What the manifest asks for.
struct Manifest {
    name: String,
    vcpus: u32,
    memory_mib: u64,
    limit_ticks: u64,
    cmdline: String,
}

impl Manifest {
    /// Reads the manifest's `key=value` lines; an unknown key or a value out of range is an
    /// error naming it.
    fn parse(text: &str) -> Result<Manifest, String> {
        let mut manifest = Manifest {
            name: "linux".to_string(),
            vcpus: 1,
            memory_mib: 256,
            limit_ticks: u64::MAX,
            cmdline: String::new(),
        };
        for line in text
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
        {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("manifest line without `=`: {line}"))?;
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("manifest: `{key}` is not a number: {value}"))
            };
            match key {
                "name" => manifest.name = value.to_string(),
                "vcpus" => {
                    manifest.vcpus = u32::try_from(number()?)
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or("manifest: vcpus must be 1 to 64")?
                }
                "memory_mib" => {
                    manifest.memory_mib = Some(number()?)
                        .filter(|m| (16..=1 << 20).contains(m))
                        .ok_or("manifest: memory_mib must be 16 MiB to 1 TiB")?
                }
                "limit_ticks" => manifest.limit_ticks = number()?,
                "cmdline" => manifest.cmdline = value.to_string(),
                _ => return Err(format!("manifest: unknown key `{key}`")),
            }
        }
        Ok(manifest)
    }
}

/// Boots the ramdisk's Linux guest, reports how it ended and ends the machine: success when
/// the guest powered off.
pub fn run(host: &'static Host, archive: Archive<'_>) -> ! {
    let frames_before = frames_in_use_outside_heap();
    let outcome = archive
        .file(MANIFEST)
        .ok_or_else(|| "no manifest in the ramdisk".to_string())
        .and_then(|text| Manifest::parse(&String::from_utf8_lossy(text)))
        .and_then(|manifest| boot(host, &archive, &manifest));
    let leaked = frames_in_use_outside_heap().saturating_sub(frames_before);
    match outcome {
        Err(message) => exit(ExitCode::Failure, &format!("linux: {message}")),
        Ok(_) if leaked > 0 => exit(
            ExitCode::Failure,
            &format!("linux: {leaked} host frames not given back"),
        ),
        Ok(VmStop::PowerOff) => exit(ExitCode::Success, "linux: the guest powered off"),
        Ok(stop) => exit(
            ExitCode::Failure,
            &format!("linux: the guest did not power off: {stop:?}"),
        ),
    }
}

/// Makes the VM, loads the kernel, runs it to its end and prints the run's figures; returns
/// how the run ended.
fn boot(host: &'static Host, archive: &Archive<'_>, manifest: &Manifest) -> Result<VmStop, String> {
    let kernel = archive.file(KERNEL).ok_or("no kernel in the ramdisk")?;
    let initrd = archive.file(INITRD);
    let vmx = host.virt().map_err(|e| format!("{e}"))?;
    let spec = MachineSpec {
        name: manifest.name.clone(),
        vcpus: manifest.vcpus,
        acpi_tables: true,
        test_hypercalls: false,
        unassigned_reads_ones: true,
        ..MachineSpec::default()
    };
    let ram = machine::pc_ram(manifest.memory_mib << 20);
    let heap_before = heap_stats().allocated;
    let mut bsp = Vcpu::new_machine(vmx, &host.phys, &ram, true, &spec).map_err(|e| format!("VM: {e}"))?;
    let heap_for_vm = heap_stats().allocated.saturating_sub(heap_before);
    bsp.load_linux(kernel, &manifest.cmdline, initrd)
        .map_err(|e| format!("load: {e}"))?;
    println!(
        "linux: booting {} bytes of kernel{} with {} vCPUs and {} MiB: {}",
        kernel.len(),
        initrd
            .map(|i| format!(" and {} bytes of initrd", i.len()))
            .unwrap_or_default(),
        manifest.vcpus,
        manifest.memory_mib,
        manifest.cmdline
    );
    let budget = Budget {
        slice: SLICE,
        limit: manifest.limit_ticks,
        exits: u64::MAX,
    };
    bsp.set_budget(budget);
    // The pre-copies run one after the other while the guest boots and runs its workload; the
    // second ends in the guest's migration to a second VM.
    let now = ticks();
    // The second pre-copy takes its writes from the CPU's log where there is one (PML, on
    // VT-x); elsewhere (SVM) it write-protects as the first does.
    let second_mode = if bsp.pml_supported() {
        DirtyLogMode::Pml
    } else {
        DirtyLogMode::WriteProtect
    };
    let mut precopies = [
        PreCopy::new(
            DirtyLogMode::WriteProtect,
            Ending::Rendezvous,
            &ram,
            now + WRITE_PROTECT_PRECOPY_AFTER,
            &host.phys,
        ),
        PreCopy::new(
            second_mode,
            Ending::Migrate,
            &ram,
            now + PML_PRECOPY_AFTER,
            &host.phys,
        ),
    ];
    let start = ticks();
    let end = machine::run_to_end(
        host,
        &mut bsp,
        manifest.vcpus,
        Vec::new(),
        &mut |bsp| match precopies.iter_mut().find(|p| !p.is_done()) {
            Some(precopy) => precopy.step(bsp),
            None => Ok(Next::Run),
        },
    )?;
    let (bsp, stop) = match end {
        RunEnd::Stopped(stop) => (bsp, stop),
        RunEnd::Paused(aps) => {
            let precopy = precopies
                .iter_mut()
                .find(|p| p.is_pausing())
                .ok_or("the VM was paused with no pre-copy asking for it")?;
            let source = Source { bsp, aps, precopy };
            let target = Target {
                ram: &ram,
                spec: &spec,
                large_pages: true,
                budget,
            };
            let mut destination = migration::migrate(host, source, &target)?;
            let stop = machine::run_to_end(
                host,
                &mut destination.bsp,
                manifest.vcpus,
                destination.aps,
                &mut |_| Ok(Next::Run),
            )?
            .into_stop("the migrated guest")?;
            (destination.bsp, stop)
        }
    };
    let run_ticks = ticks() - start;
    println!("linux: the run ended after {run_ticks} ticks: {stop:?}");
    println!("linux: exits of the bootstrap vCPU: {:?}", bsp.exits);
    // The application processors' vCPUs have ended, and added their costs to the finished
    // VMs' table (the only VM this boot runs).
    let costs = bsp.exit_costs.with(&exit_costs_of_finished_vms());
    costs.print("the Linux guest, every vCPU");
    let vcpu_ticks = run_ticks * u64::from(manifest.vcpus);
    println!(
        "linux: exit handling took {} of {vcpu_ticks} vCPU ticks ({} per mille)",
        costs.total_ticks(),
        costs.total_ticks() * 1000 / vcpu_ticks.max(1)
    );
    print_memory(&bsp, &ram, heap_for_vm);
    for precopy in &precopies {
        match precopy.differing_pages() {
            Some(0) => {}
            Some(differing) => return Err(format!("pre-copy: {differing} pages differ from the copy")),
            None => println!("precopy: one pre-copy had not finished when the guest stopped"),
        }
    }
    migration::audit(&bsp, "linux")?;
    Ok(stop)
}

/// Prints what the VM holds at its end (pages, large blocks, EPT tables, host frames) and what
/// its descriptors took of the kernel heap.
fn print_memory(bsp: &Vcpu<'_>, ram: &[(u64, u64)], heap_for_vm: usize) {
    const LARGE: u64 = 2 << 20;
    let stats = bsp.stats();
    let pgm = bsp.pgm();
    let large_blocks = ram
        .iter()
        .flat_map(|&(start, size)| (start.next_multiple_of(LARGE)..start + size).step_by(LARGE as usize))
        .filter(|&block| GuestPhysAddr::new(block).is_some_and(|gpa| pgm.is_mapped_large(gpa)))
        .count();
    drop(pgm);
    println!(
        "linux: memory at the end: {} RAM pages, {} with a private frame, {} zero; {} 2 MiB \
         blocks mapped large; {} EPT table frames; {} host frames in all ({} MiB)",
        stats.ram_pages,
        stats.private_frames(),
        stats.zero_pages,
        large_blocks,
        stats.table_frames,
        stats.host_frames(),
        stats.host_frames() / 256
    );
    let registered: u64 = ram.iter().map(|&(_, size)| size).sum();
    let per_gib = (heap_for_vm as u128 * (1 << 30)) / u128::from(registered.max(1));
    let heap = heap_stats();
    println!(
        "linux: kernel heap: {heap_for_vm} bytes for the VM's creation ({per_gib} per GiB \
         registered); at most {} bytes allocated, {} bytes of chunks held beside the {} byte \
         seed",
        heap.peak_allocated, heap.peak_chunk_bytes, heap.seed_bytes
    );
}
