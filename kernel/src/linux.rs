//! The Linux boot: `cargo xtask run --linux` packs a bzImage, an initrd and a manifest into the
//! boot image's ramdisk; this makes a PC-like VM of the manifest's size and vCPU count (ACPI
//! tables, the legacy devices, the local APICs), loads the kernel through the boot protocol's
//! 64-bit entry (`loader::linux`), runs every vCPU until the guest powers off, resets or is
//! stopped, audits the VM's EPT and prints how the run ended with the VM's exit counts.
//!
//! Manifest lines, `key=value`: `name` (the console prefix), `vcpus`, `memory_mib`,
//! `limit_ticks` (the TSC ticks the VM may run) and `cmdline`.

use alloc::format;
use alloc::string::{String, ToString};

use loader::archive::Archive;

use crate::arch::memory::{frame_counts, is_allocated};
use crate::arch::power::{exit, ExitCode};
use crate::arch::ticks;
use crate::machine;
use crate::vm::budget::Budget;
use crate::vm::devices::MachineSpec;
use crate::vm::{Vcpu, VmStop};
use crate::{println, Host};

/// The manifest's path in the ramdisk.
pub const MANIFEST: &str = "linux/manifest";
/// The kernel's path in the ramdisk.
const KERNEL: &str = "linux/kernel";
/// The initrd's path in the ramdisk (optional).
const INITRD: &str = "linux/initrd";
/// Ticks a vCPU runs before another one sharing its host CPU gets a turn.
const SLICE: u64 = 2_000_000;

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
    let frames_before = frame_counts().free;
    let outcome = archive
        .file(MANIFEST)
        .ok_or_else(|| "no manifest in the ramdisk".to_string())
        .and_then(|text| Manifest::parse(&String::from_utf8_lossy(text)))
        .and_then(|manifest| boot(host, &archive, &manifest));
    let leaked = frames_before.saturating_sub(frame_counts().free);
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
    let vmx = host.vmx().map_err(|e| format!("{e}"))?;
    let spec = MachineSpec {
        name: manifest.name.clone(),
        vcpus: manifest.vcpus,
        acpi_tables: true,
        test_hypercalls: false,
        unassigned_reads_ones: true,
        ..MachineSpec::default()
    };
    let ram = machine::pc_ram(manifest.memory_mib << 20);
    let mut bsp = Vcpu::new_machine(vmx, &host.phys, &ram, true, &spec).map_err(|e| format!("VM: {e}"))?;
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
    bsp.set_budget(Budget {
        slice: SLICE,
        limit: manifest.limit_ticks,
        exits: u64::MAX,
    });
    let start = ticks();
    let stop = machine::run_to_end(host, &mut bsp, manifest.vcpus)?;
    println!("linux: the run ended after {} ticks: {stop:?}", ticks() - start);
    println!("linux: exits of the bootstrap vCPU: {:?}", bsp.exits);
    bsp.exit_costs.print("the Linux guest's bootstrap vCPU");
    let report = bsp.pgm().audit(is_allocated);
    if !report.is_clean() {
        return Err(format!("EPT audit: {:?}", report.findings));
    }
    println!("linux: EPT audit clean");
    Ok(stop)
}
