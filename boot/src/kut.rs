//! `cargo xtask kut [NAME…]`: runs kvm-unit-tests inside the hypervisor in Bochs. Reads the
//! entries of `x86/unittests.cfg` from the build `boot/setup.sh` made in
//! `target/kvm-unit-tests`, packs the `.flat` images the selected entries need and a manifest
//! (vCPUs, memory, timeout, command line per entry) into the boot image's ramdisk, boots the
//! kernel, and prints one line per entry (`PASS name`, `FAIL name (why)`, `SKIP name (why)`)
//! and the summary line `kvm-unit-tests: P passed, F failed, S skipped`.
//!
//! Entries the machine cannot run are skipped here with the upstream runner's reasons
//! (`scripts/runtime.bash`): `arch = i386` ones ("i386 only"), those whose `check` names a
//! host KVM parameter, and those whose image was not built. `qemu_params` give the memory
//! size (`-m`) and, from `-cpu`, the vendor string (`vendor=`); the rest of a `-cpu` feature
//! list is not applied (the CPUID policy is the hypervisor's own).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use crate::emulator::{Emulator, RunOptions};
use crate::{image, target_dir, Variant};

/// QEMU's default memory size, which the upstream runner uses unless `-m` says otherwise.
const DEFAULT_MEMORY_MIB: u64 = 128;
/// The upstream runner's default timeout, in seconds.
const DEFAULT_TIMEOUT_S: u64 = 90;
/// The upstream timeouts are wall-clock seconds of a QEMU run; a test's time in Bochs runs at
/// Bochs's pace instead (its TSC counts 4·10^6 per emulated second at `ips=4000000`, and Bochs
/// emulates 1.2–4.5·10^7 ticks per wall second here). Each timeout is handed to the kernel as
/// this many TSC ticks per second: every test gets at least about as much wall time as
/// upstream gives it, and the vmexit benchmarks, whose measuring loop doubles its count until
/// one round takes 2^30 ticks, get the 2.2–4.3·10^9 ticks they need (where in that range
/// depends on where the doubling lands for the exit's cost).
pub const TICKS_PER_TIMEOUT_SECOND: u64 = 100_000_000;
/// The fewest TSC ticks Bochs emulates per wall second in any entry here (vmexit_cr4_pge ran
/// 2.25·10^9 ticks in 47.6 minutes, 0.8·10^6 a second, sharing the cores); the wall-clock
/// bound of a run assumes it.
const SLOWEST_TICKS_PER_WALL_SECOND: u64 = 1_000_000;
/// Under QEMU's TCG (`--qemu`, the SVM backend) the TSC follows the host's clock (2.1·10^9 a
/// second here): each upstream second of timeout is this many ticks, a little more than one
/// wall second, and the run's wall bound allows twice the timeouts.
pub const QEMU_TICKS_PER_TIMEOUT_SECOND: u64 = 3_000_000_000;

/// One `[section]` of `unittests.cfg`.
#[derive(Debug, Default, Clone)]
pub struct CfgEntry {
    /// The section name.
    pub name: String,
    /// Its fields.
    pub fields: BTreeMap<String, String>,
}

impl CfgEntry {
    fn field(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// vCPUs (`smp`, default 1).
    fn vcpus(&self) -> u32 {
        self.field("smp").and_then(|s| s.trim().parse().ok()).unwrap_or(1)
    }

    /// Memory in MiB from `-m N[M|G]` in `qemu_params` or `extra_params`.
    fn memory_mib(&self) -> u64 {
        let params = [self.field("qemu_params"), self.field("extra_params")];
        let words: Vec<&str> = params
            .iter()
            .flatten()
            .flat_map(|p| p.split_whitespace())
            .collect();
        words
            .windows(2)
            .find(|w| w[0] == "-m")
            .and_then(|w| parse_size_mib(w[1]))
            .unwrap_or(DEFAULT_MEMORY_MIB)
    }

    /// The CPU vendor string of `-cpu MODEL,…,vendor=NAME` in `qemu_params` (empty: the
    /// host's).
    fn vendor(&self) -> String {
        let params = self.field("qemu_params").unwrap_or("");
        let words: Vec<&str> = params.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "-cpu")
            .and_then(|w| w[1].split(',').find_map(|option| option.strip_prefix("vendor=")))
            .filter(|vendor| vendor.len() == 12)
            .unwrap_or("")
            .to_string()
    }

    /// The Multiboot command line: `test_args`, without its quotes, or `-append '…'`.
    fn cmdline(&self) -> String {
        if let Some(args) = self.field("test_args") {
            return unquote(args).to_string();
        }
        let extra = self.field("extra_params").unwrap_or("");
        match extra.find("-append") {
            Some(at) => unquote(extra[at + "-append".len()..].trim()).to_string(),
            None => String::new(),
        }
    }

    /// The timeout in seconds (`timeout = N[s]`).
    fn timeout_s(&self) -> u64 {
        self.field("timeout")
            .and_then(|t| t.trim().trim_end_matches('s').parse().ok())
            .unwrap_or(DEFAULT_TIMEOUT_S)
    }

    /// Why the entry is skipped without running, as the upstream runner says it.
    fn skip_reason(&self, built: &std::path::Path) -> Option<String> {
        if let Some(arch) = self.field("arch") {
            if arch.trim() != "x86_64" {
                return Some(format!("{} only", arch.trim()));
            }
        }
        if let Some(check) = self.field("check") {
            return Some(format!("needs the host's {}", check.trim()));
        }
        let file = self.field("file").unwrap_or("");
        if !built.join("x86").join(file).is_file() {
            return Some(format!("Test file '{file}' not found"));
        }
        None
    }
}

fn parse_size_mib(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, scale) = match text.chars().last()? {
        'g' | 'G' => (&text[..text.len() - 1], 1024),
        'm' | 'M' => (&text[..text.len() - 1], 1),
        _ => (text, 1),
    };
    number.parse::<u64>().ok().map(|n| n * scale)
}

fn unquote(text: &str) -> &str {
    let text = text.trim();
    text.strip_prefix('\'')
        .and_then(|t| t.split('\'').next())
        .or_else(|| text.strip_prefix('"').and_then(|t| t.split('"').next()))
        .unwrap_or(text)
}

/// The sections of a `unittests.cfg`, in order.
pub fn parse_cfg(text: &str) -> Vec<CfgEntry> {
    let mut entries: Vec<CfgEntry> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            entries.push(CfgEntry {
                name: name.to_string(),
                ..CfgEntry::default()
            });
        } else if let (Some(entry), Some((key, value))) = (entries.last_mut(), line.split_once('=')) {
            entry
                .fields
                .insert(key.trim().to_string(), value.trim().to_string());
        }
    }
    entries
}

/// The entries `make test` runs (`cargo xtask test`): those that pass here and each take a few
/// seconds in Bochs. The vmexit benchmarks are left to `make kut` (each runs about 2·10^9
/// ticks, three minutes of Bochs); so are the entries that do not pass yet.
pub const CI_SUBSET: &[&str] = &[
    "smptest",
    "smptest3",
    "smap",
    "memory",
    "setjmp",
    "rmap_chain",
    "rdpru",
    "umip",
    "pku",
    "pks",
    // The MMIO instruction emulator's yardstick (about 9·10^7 ticks, 25 s of Bochs).
    "emulator",
    // The I/O APIC: edge and level pins, remote IRR, TMR, both destination modes, 4 vCPUs
    // (about 8·10^7 ticks).
    "ioapic",
    // An injected fault's RFLAGS image has RF set, as the CPU's own delivery leaves it (a
    // refused CR4 write's #GP, injected by the hypervisor; QEMU TCG times out here).
    "idt_test",
];

/// The entries `make test` runs on SVM in QEMU's TCG: [`CI_SUBSET`] without `emulator`, two of
/// whose 151 checks fail in QEMU's own CPU (a non-canonical stack access, run natively, raises
/// #GP where it must raise #SS; QEMU TCG fails `emulator` by itself too), and with `syscall`,
/// which needs the single-step trap right after a SYSRET that sets TF: QEMU raises it, Bochs
/// raises it an instruction late; and with `eventinj`, whose NMIs sent from NMI handlers check
/// the SVM backend's NMI window (the single step over the handler's IRET). `ioapic` is left out
/// too: its four vCPUs' stream of exits meets, now and then, a flaw of QEMU 7.2's TCG with
/// several vCPUs (a second #VMEXIT right after one, which saves the host's state as the
/// guest's; the backend stops the VM: kernel/README.md, *Linux guest*).
pub fn ci_subset(qemu: bool) -> Vec<&'static str> {
    const SVM_LEAVES_OUT: [&str; 2] = ["emulator", "ioapic"];
    const SVM_ADDS: [&str; 2] = ["syscall", "eventinj"];
    let mut list: Vec<&'static str> = CI_SUBSET
        .iter()
        .copied()
        .filter(|name| !qemu || !SVM_LEAVES_OUT.contains(name))
        .collect();
    if qemu {
        list.extend(SVM_ADDS);
    }
    list
}

/// Where setup builds kvm-unit-tests.
pub fn build_dir() -> PathBuf {
    target_dir().join("kvm-unit-tests")
}

/// True when setup built kvm-unit-tests (it could not without the tarball or a network).
pub fn is_built() -> bool {
    build_dir().join("x86/unittests.cfg").is_file()
}

/// A result line, as printed.
pub struct Verdict {
    /// PASS, FAIL or SKIP.
    pub status: String,
    /// The entry.
    pub name: String,
    /// Why (FAIL, SKIP) or the SUMMARY line (PASS).
    pub detail: String,
}

/// Runs the entries named in `names` (all when empty) and returns every verdict, in the
/// configuration's order. `Err` only when nothing could run.
///
/// `tag` names the run's files under `target/` (`serial-<tag>-bochs.log`, `bochs-<tag>/`,
/// `<tag>-ramdisk.tar`), so that `make kut` and `make test`'s subset can run at once.
pub fn run(
    names: &[String],
    cpus: u32,
    timeout_secs: u64,
    tag: &'static str,
    qemu: bool,
) -> Result<Vec<Verdict>, String> {
    let ticks_per_second = if qemu {
        QEMU_TICKS_PER_TIMEOUT_SECOND
    } else {
        TICKS_PER_TIMEOUT_SECOND
    };
    let built = build_dir();
    let cfg = std::fs::read_to_string(built.join("x86/unittests.cfg")).map_err(|e| {
        format!(
            "{}: {e} (run boot/setup.sh)",
            built.join("x86/unittests.cfg").display()
        )
    })?;
    let entries: Vec<CfgEntry> = parse_cfg(&cfg)
        .into_iter()
        .filter(|e| names.is_empty() || names.iter().any(|n| n == &e.name))
        .collect();
    if let Some(unknown) = names.iter().find(|n| !entries.iter().any(|e| &e.name == *n)) {
        return Err(format!("no entry `{unknown}` in x86/unittests.cfg"));
    }
    let mut manifest =
        String::from("# name\tfile\tvcpus\tmemory MiB\ttime limit (TSC ticks)\tCPU vendor\tcommand line\n");
    let mut wall_seconds = 0;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut skipped = BTreeMap::new();
    for entry in &entries {
        if let Some(reason) = entry.skip_reason(&built) {
            skipped.insert(entry.name.clone(), reason);
            continue;
        }
        let file = entry.field("file").unwrap_or_default().to_string();
        if !files.contains_key(&file) {
            let bytes = std::fs::read(built.join("x86").join(&file)).map_err(|e| format!("{file}: {e}"))?;
            files.insert(file.clone(), bytes);
        }
        wall_seconds += entry.timeout_s();
        let _ = writeln!(
            manifest,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            entry.name,
            file,
            entry.vcpus(),
            entry.memory_mib(),
            entry.timeout_s() * ticks_per_second,
            entry.vendor(),
            entry.cmdline()
        );
    }
    let mut results: BTreeMap<String, Verdict> = BTreeMap::new();
    if !files.is_empty() {
        // Every test may use its whole limit: at Bochs's slowest pace here (10^6 ticks a wall
        // second, vmexit_cr4_pge's and vmexit_cr0_wp's beside another emulator) that is 100
        // wall seconds per upstream second, plus the boot; the caller's bound, when shorter,
        // wins. A run that ends sooner is not held up by it.
        let pace = if qemu {
            2
        } else {
            TICKS_PER_TIMEOUT_SECOND / SLOWEST_TICKS_PER_WALL_SECOND
        };
        let bound = timeout_secs.min(wall_seconds * pace + 120);
        let serial = boot_with(&manifest, &files, cpus, bound, tag, qemu)?;
        for line in serial.lines() {
            let mut fields = line.trim_end_matches('\r').split('\t');
            if fields.next() != Some("kut-result") {
                continue;
            }
            let (Some(name), Some(status)) = (fields.next(), fields.next()) else {
                continue;
            };
            let detail = fields.next().unwrap_or("").to_string();
            results.insert(
                name.to_string(),
                Verdict {
                    status: status.to_string(),
                    name: name.to_string(),
                    detail,
                },
            );
        }
    }
    Ok(entries
        .iter()
        .map(|entry| {
            if let Some(reason) = skipped.remove(&entry.name) {
                return Verdict {
                    status: "SKIP".into(),
                    name: entry.name.clone(),
                    detail: reason,
                };
            }
            results.remove(&entry.name).unwrap_or(Verdict {
                status: "FAIL".into(),
                name: entry.name.clone(),
                detail: "no result: the run ended before this test (see the serial log)".into(),
            })
        })
        .collect())
}

/// Packs the ramdisk, boots the kernel in Bochs (VMX) or QEMU's TCG (`qemu`: SVM) and
/// returns its serial output.
fn boot_with(
    manifest: &str,
    files: &BTreeMap<String, Vec<u8>>,
    cpus: u32,
    timeout_secs: u64,
    tag: &'static str,
    qemu: bool,
) -> Result<String, String> {
    let mut archive_files: Vec<(String, &[u8])> = vec![("kut/manifest".into(), manifest.as_bytes())];
    for (name, bytes) in files {
        archive_files.push((format!("kut/{name}"), bytes));
    }
    let borrowed: Vec<(&str, &[u8])> = archive_files.iter().map(|(n, b)| (n.as_str(), *b)).collect();
    let ramdisk = target_dir().join(format!("{tag}-ramdisk.tar"));
    std::fs::write(&ramdisk, loader::archive::build(&borrowed)).map_err(|e| format!("ramdisk: {e}"))?;
    let (backend, emulator) = if qemu {
        (
            crate::Backend::Svm,
            Emulator::Qemu {
                uefi: false,
                kvm: false,
                gdb: false,
            },
        )
    } else {
        (crate::Backend::Vmx, Emulator::Bochs)
    };
    let images = image::make_images(Variant::Kut, backend, Some(&ramdisk), tag)?;
    let options = RunOptions {
        image: images.bios,
        timeout_secs,
        cpus,
        megs: 256,
        ips: crate::emulator::DEFAULT_IPS,
        bochs_model: crate::emulator::VMX_MODEL,
        serial_log: target_dir().join(format!("serial-{tag}-{}.log", emulator.name())),
        work_dir: Box::leak(format!("{}-{tag}", emulator.name()).into_boxed_str()),
    };
    let outcome = emulator.run(&options)?;
    eprintln!("xtask: serial output saved in {}", options.serial_log.display());
    if outcome.timed_out {
        eprintln!(
            "xtask: {} did not finish within {timeout_secs} s; the tests without a result fail",
            emulator.name()
        );
    }
    Ok(outcome.serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = "\
# comment
[x2apic]
file = apic.flat
smp = 2
qemu_params = -cpu qemu64,+x2apic,+tsc-deadline
arch = x86_64
timeout = 30

[vmexit_cpuid]
file = vmexit.flat
test_args = 'cpuid'
groups = vmexit

[cmpxchg8b]
file = cmpxchg8b.flat
arch = i386

[big]
file = svm.flat
qemu_params = -cpu max,+svm -m 4g
extra_params = -append 'a b'
timeout = 240s
check = /sys/module/kvm/parameters/x=Y
";

    #[test]
    fn the_configuration_gives_vcpus_memory_timeout_and_command_line() {
        let entries = parse_cfg(CFG);
        assert_eq!(entries.len(), 4);
        let x2apic = &entries[0];
        assert_eq!(
            (x2apic.vcpus(), x2apic.memory_mib(), x2apic.timeout_s()),
            (2, 128, 30)
        );
        assert_eq!(x2apic.cmdline(), "");
        assert_eq!(x2apic.vendor(), "", "a -cpu without vendor= keeps the host's");
        assert_eq!(entries[1].cmdline(), "cpuid");
        assert_eq!((entries[1].vcpus(), entries[1].timeout_s()), (1, 90));
        let big = &entries[3];
        assert_eq!(
            (big.memory_mib(), big.timeout_s(), big.cmdline().as_str()),
            (4096, 240, "a b")
        );
    }

    #[test]
    fn entries_the_machine_cannot_run_are_skipped_with_the_upstream_reasons() {
        let entries = parse_cfg(CFG);
        let dir = std::env::temp_dir().join(format!("kut-cfg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("x86")).unwrap();
        std::fs::write(dir.join("x86/apic.flat"), b"").unwrap();
        assert_eq!(entries[0].skip_reason(&dir), None);
        assert_eq!(
            entries[1].skip_reason(&dir).unwrap(),
            "Test file 'vmexit.flat' not found"
        );
        assert_eq!(entries[2].skip_reason(&dir).unwrap(), "i386 only");
        assert!(entries[3]
            .skip_reason(&dir)
            .unwrap()
            .starts_with("needs the host's"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_svm_subset_trades_emulator_and_ioapic_for_syscall_and_eventinj() {
        assert_eq!(ci_subset(false), CI_SUBSET);
        let svm = ci_subset(true);
        assert!(svm.contains(&"syscall") && svm.contains(&"eventinj"));
        assert!(!svm.contains(&"emulator") && !svm.contains(&"ioapic"));
        assert_eq!(svm.len(), CI_SUBSET.len());
    }

    #[test]
    fn a_cpu_model_names_its_vendor() {
        let entries =
            parse_cfg("[syscall]\nfile = syscall.flat\nqemu_params = -cpu Opteron_G1,vendor=AuthenticAMD\n");
        assert_eq!(entries[0].vendor(), "AuthenticAMD");
    }
}
