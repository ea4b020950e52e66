//! `cargo xtask`: builds the hypervisor kernel, makes BIOS/UEFI disk images with the `bootloader`
//! crate, and runs them in Bochs (VT-x with EPT, the default) or QEMU.
//!
//! Commands:
//! - `build [--test]`: build the kernel ELF (`--test`: the kernel-test variant) and print its path.
//! - `image [--test]`: build the kernel and make `bios.img` and `uefi.img`; print their paths.
//! - `run [--qemu] [--uefi] [--kvm] [--gdb] [--test] [--cpus N] [--timeout S]`: boot an image
//!   with N CPUs (default 2) and stream its serial output; the exit status says whether the kernel reported success. `--gdb` (QEMU only:
//!   Debian's Bochs is built without a GDB stub) starts the emulator halted, waiting for GDB on
//!   localhost:1234.
//! - `test [--cpus N] [--timeout S]`: run the workspace's host tests, the `loom` models and the in-kernel tests under Bochs, then
//!   print one combined closing line `N passed, N failed`.
//! - `run --linux [--kernel PATH] [--initrd PATH] [--append CMDLINE] [--mem MIB] [--cpus N]`:
//!   boot a Linux guest (by default the pinned Debian kernel and an initramfs of busybox and
//!   `boot/linux/init`) with MIB of RAM and N vCPUs (and N emulated CPUs), the guest's console
//!   on the terminal; succeeds when the guest powers off.
//! - `kut [NAME...] [--cpus N] [--timeout S]`: run kvm-unit-tests (every entry of
//!   `x86/unittests.cfg`, or those named) inside the hypervisor in Bochs: a line per entry and
//!   `kvm-unit-tests: P passed, F failed, S skipped`.

mod emulator;
mod image;
mod kut;
mod linux;
mod report;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use emulator::{Emulator, RunOptions};
use report::{HostTestCounts, KernelRun};

/// Which kernel variant to build: the demo that `run` boots, or the in-kernel test run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Variant {
    /// Boots the hypervisor, runs a demo guest and prints page statistics.
    Run,
    /// Runs the kernel-level tests and prints `N passed, N failed`.
    Test,
    /// The demo kernel with kvm-unit-tests in its ramdisk (`kut`).
    Kut,
}

impl Variant {
    /// Short name used in file names under `target/`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Run => "run",
            Variant::Test => "test",
            Variant::Kut => "kut",
        }
    }
}

/// The virtualization backend a kernel is built with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// VT-x with EPT: Bochs (`corei7_skylake_x`), or QEMU with KVM on an Intel host.
    Vmx,
    /// AMD SVM with nested paging: QEMU's TCG (`-cpu max`, which offers SVM and NPT), or QEMU
    /// with KVM on an AMD host.
    Svm,
}

impl Backend {
    /// What the names of its kernel files and image directories end with.
    pub fn suffix(self) -> &'static str {
        match self {
            Backend::Vmx => "",
            Backend::Svm => "-svm",
        }
    }

    /// The backend the machine `args` selects runs: SVM under QEMU's TCG; under KVM the host
    /// CPU's own (SVM when /proc/cpuinfo lists it); VMX in Bochs.
    fn for_args(args: &Args) -> Backend {
        if args.bochs_svm {
            return Backend::Svm;
        }
        if !args.qemu {
            return Backend::Vmx;
        }
        if !args.kvm {
            return Backend::Svm;
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if cpuinfo.split_whitespace().any(|flag| flag == "svm") {
            Backend::Svm
        } else {
            Backend::Vmx
        }
    }
}

/// Parsed command line of one `cargo xtask` invocation.
struct Args {
    command: String,
    qemu: bool,
    uefi: bool,
    kvm: bool,
    gdb: bool,
    test: bool,
    /// Bochs with its SVM CPU model (`ryzen`) and the SVM kernel: a second opinion on the SVM
    /// backend beside QEMU's.
    bochs_svm: bool,
    cpus: u32,
    timeout_secs: u64,
    /// Positional arguments after the command (`kut`'s test names).
    names: Vec<String>,
    /// `run --linux` and its options.
    linux: Option<linux::LinuxOptions>,
}

/// CPUs the emulator gives the machine unless `--cpus` says otherwise (CI runs with two).
const DEFAULT_CPUS: u32 = 2;

const USAGE: &str = "usage: cargo xtask <build|image|run|test> [--test] [--qemu | --bochs-svm] [--uefi] [--kvm] \
                     [--gdb] [--cpus N] [--timeout SECONDS]\n       cargo xtask run --linux [--kernel PATH] \
                     [--initrd PATH] [--append CMDLINE] [--mem MIB] [--cpus N] [--timeout SECONDS]\n       cargo xtask kut [NAME...] [--cpus N] [--timeout SECONDS]";

/// Why `--gdb` needs `--qemu`.
const NO_BOCHS_GDB: &str = "--gdb needs --qemu: Debian's Bochs 2.7 is built without its GDB stub \
                            (`bochs --help features` lists no gdbstub); use `cargo xtask run --qemu --gdb` \
                            (add --kvm on a host with nested VT-x to debug the hypervisor running VMs)";

/// Parses `std::env::args`; returns a message naming the offending argument on error.
fn parse_args() -> Result<Args, String> {
    let mut argv = std::env::args().skip(1);
    let command = argv.next().ok_or_else(|| USAGE.to_string())?;
    let mut args = Args {
        command,
        qemu: false,
        uefi: false,
        kvm: false,
        gdb: false,
        test: false,
        bochs_svm: false,
        cpus: DEFAULT_CPUS,
        timeout_secs: 600,
        names: Vec::new(),
        linux: None,
    };
    let mut cpus_given = false;
    while let Some(flag) = argv.next() {
        match flag.as_str() {
            "--qemu" => args.qemu = true,
            "--uefi" => args.uefi = true,
            "--kvm" => args.kvm = true,
            "--gdb" => args.gdb = true,
            "--test" => args.test = true,
            "--bochs-svm" => args.bochs_svm = true,
            "--cpus" => {
                let value = argv.next().ok_or("--cpus needs a number of CPUs")?;
                cpus_given = true;
                args.cpus = value
                    .parse()
                    .ok()
                    .filter(|&n| (1..=8).contains(&n))
                    .ok_or_else(|| format!("--cpus: not a number of CPUs from 1 to 8: {value}"))?;
            }
            "--timeout" => {
                let value = argv.next().ok_or("--timeout needs a number of seconds")?;
                args.timeout_secs = value
                    .parse()
                    .map_err(|_| format!("--timeout: not a number of seconds: {value}"))?;
            }
            "--linux" => args.linux = Some(linux::LinuxOptions::default()),
            "--kernel" | "--initrd" | "--append" | "--mem" => {
                let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
                let options = args
                    .linux
                    .as_mut()
                    .ok_or_else(|| format!("{flag} belongs to `run --linux`; put --linux first"))?;
                match flag.as_str() {
                    "--kernel" => options.kernel = Some(PathBuf::from(value)),
                    "--initrd" => options.initrd = Some(PathBuf::from(value)),
                    "--append" => options.cmdline = value,
                    _ => {
                        options.memory_mib = value
                            .parse()
                            .ok()
                            .filter(|m| (64..=16384).contains(m))
                            .ok_or_else(|| format!("--mem: not a size from 64 to 16384 MiB: {value}"))?
                    }
                }
            }
            other if args.command == "kut" && !other.starts_with('-') => args.names.push(other.to_string()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    if let Some(options) = args.linux.as_mut() {
        if args.command != "run" {
            return Err("--linux belongs to `run`".into());
        }
        // One vCPU unless asked; the emulated machine gets a CPU per vCPU.
        if !cpus_given {
            args.cpus = 1;
        }
        options.vcpus = args.cpus;
    }
    if args.gdb && !args.qemu {
        return Err(NO_BOCHS_GDB.to_string());
    }
    if (args.uefi || args.kvm) && !args.qemu {
        // Bochs boots the BIOS image only; UEFI and KVM are QEMU options.
        args.qemu = true;
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("xtask: {message}");
            return ExitCode::from(2);
        }
    };
    let variant = if args.test || args.command == "test" {
        Variant::Test
    } else {
        Variant::Run
    };
    let result = match args.command.as_str() {
        "build" => {
            image::build_kernel(variant, Backend::for_args(&args)).map(|elf| println!("{}", elf.display()))
        }
        "image" => {
            image::make_images(variant, Backend::for_args(&args), None, variant.name()).map(|images| {
                println!("{}", images.bios.display());
                println!("{}", images.uefi.display());
            })
        }
        "run" => run(&args, variant).map(|_| ()),
        "test" => test(&args),
        "kut" => kvm_unit_tests(&args),
        other => Err(format!("unknown command `{other}`\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("xtask: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the images for `variant`, boots the one `args` selects and returns what the kernel
/// reported; `Err` when the kernel did not report success (the message says why).
fn run(args: &Args, variant: Variant) -> Result<KernelRun, String> {
    let (ramdisk, tag, megs, ips) = match &args.linux {
        Some(options) => (
            Some(linux::ramdisk(
                options,
                linux::limit_ticks()?,
                &format!("linux-ramdisk{}.tar", Backend::for_args(args).suffix()),
            )?),
            "linux",
            linux::host_memory_mib(options.memory_mib),
            linux::IPS,
        ),
        None => (None, variant.name(), 256, emulator::DEFAULT_IPS),
    };
    let backend = Backend::for_args(args);
    let images = image::make_images(variant, backend, ramdisk.as_deref(), tag)?;
    let emulator = if args.qemu {
        Emulator::Qemu {
            uefi: args.uefi,
            kvm: args.kvm,
            gdb: args.gdb,
        }
    } else {
        Emulator::Bochs
    };
    let image = if args.uefi { images.uefi } else { images.bios };
    let options = RunOptions {
        image,
        timeout_secs: args.timeout_secs,
        cpus: args.cpus,
        megs,
        ips,
        bochs_model: if args.bochs_svm {
            emulator::SVM_MODEL
        } else {
            emulator::VMX_MODEL
        },
        serial_log: target_dir().join(format!(
            "serial-{tag}-{}{}.log",
            emulator.name(),
            if args.bochs_svm { "-svm" } else { "" }
        )),
        work_dir: match (args.linux.is_some(), args.qemu, args.bochs_svm) {
            (true, false, _) => "bochs-linux",
            (true, true, _) => "qemu-linux",
            (false, false, true) => "bochs-svm",
            (false, _, _) => emulator.name(),
        },
    };
    if args.gdb {
        let elf = image::build_kernel(variant, backend)?;
        eprintln!(
            "xtask: QEMU waits for GDB on localhost:1234; in another terminal:\n  \
             gdb {} -ex 'target remote :1234'",
            elf.display()
        );
    }
    let outcome = emulator.run(&options)?;
    let kernel_run = KernelRun::parse(&outcome.serial);
    eprintln!("xtask: serial output saved in {}", options.serial_log.display());
    if outcome.timed_out {
        return Err(format!(
            "{} did not finish within {} s (hung kernel?); serial log: {}",
            emulator.name(),
            args.timeout_secs,
            options.serial_log.display()
        ));
    }
    match &kernel_run.exit {
        Some(report::KernelExit::Success) => Ok(kernel_run),
        Some(report::KernelExit::Failure(reason)) => Err(format!("kernel reported failure: {reason}")),
        None => Err(format!(
            "{} ended without the kernel's exit line (status {:?}); serial log: {}",
            emulator.name(),
            outcome.status,
            options.serial_log.display()
        )),
    }
}

/// Runs kvm-unit-tests in the hypervisor (all entries, or those named), prints a line per entry
/// and the summary; fails when an entry failed.
fn kvm_unit_tests(args: &Args) -> Result<(), String> {
    // KUT_TAG names the run's files (`kut` unless set), so that runs of disjoint lists can go
    // on at once, one Bochs per host core.
    let tag: &'static str = Box::leak(
        std::env::var("KUT_TAG")
            .unwrap_or_else(|_| "kut".into())
            .into_boxed_str(),
    );
    let verdicts = kut::run(&args.names, args.cpus, args.timeout_secs, tag, args.qemu)?;
    let (_, failed) = report_kut(&verdicts);
    if failed > 0 {
        return Err(format!("{failed} kvm-unit-tests entries failed"));
    }
    Ok(())
}

/// Prints a line per kvm-unit-tests entry and the summary; returns (passed, failed).
fn report_kut(verdicts: &[kut::Verdict]) -> (usize, usize) {
    let count = |status: &str| verdicts.iter().filter(|v| v.status == status).count();
    for verdict in verdicts {
        match verdict.status.as_str() {
            "PASS" if verdict.detail.is_empty() => println!("PASS {}", verdict.name),
            "PASS" => println!("PASS {} ({})", verdict.name, verdict.detail),
            status => println!("{status} {} ({})", verdict.name, verdict.detail),
        }
    }
    let (passed, failed, skipped) = (count("PASS"), count("FAIL"), count("SKIP"));
    println!("kvm-unit-tests: {passed} passed, {failed} failed, {skipped} skipped");
    (passed, failed)
}

/// Runs the host tests of the workspace, then the kernel tests on each backend (VMX in Bochs,
/// SVM in QEMU's TCG; with `--qemu` only the latter), and prints the combined closing line.
/// Fails when any test failed or a run did not complete.
fn test(args: &Args) -> Result<(), String> {
    let host = run_host_tests()?;
    let backends: &[bool] = if args.qemu { &[true] } else { &[false, true] };
    let mut passed = host.passed;
    let mut failed = host.failed;
    let mut lines = vec![format!(
        "host tests: {} passed, {} failed",
        host.passed, host.failed
    )];
    let mut kernel_error = None;
    // One backend after the other: side by side, QEMU's vCPU threads and Bochs share the two
    // cores, and the SMP tests' timing (two vCPUs' accesses overlapping) no longer holds.
    let runs: Vec<BackendRun> = backends
        .iter()
        .map(|&qemu| {
            let suite = kernel_suite(args, qemu);
            (suite, kut_subset(args, qemu), linux_boots(args, qemu))
        })
        .collect();
    for (suite, (kut_passed, kut_failed), (linux_passed, linux_failed)) in runs {
        lines.push(format!(
            "{}: kernel tests {} passed, {} failed, {} skipped; kvm-unit-tests subset {} passed, \
             {} failed; Linux boot {} passed, {} failed",
            suite.name,
            suite.passed,
            suite.failed,
            suite.skipped,
            kut_passed,
            kut_failed,
            linux_passed,
            linux_failed
        ));
        passed += suite.passed + kut_passed + linux_passed;
        failed += suite.failed + kut_failed + linux_failed;
        kernel_error = kernel_error.or(suite.error);
    }
    for line in &lines {
        println!("{line}");
    }
    println!("{passed} passed, {failed} failed");
    match kernel_error {
        Some(message) => Err(message),
        None if failed > 0 => Err(format!("{failed} test(s) failed")),
        None => Ok(()),
    }
}

/// The kvm-unit-tests subset ([`kut::ci_subset`]) on VMX in Bochs, or (`qemu`) on SVM in
/// QEMU's TCG; returns (passed, failed).
fn kut_subset(args: &Args, qemu: bool) -> (usize, usize) {
    if !kut::is_built() {
        // setup.sh said why (no tarball, no network); the other suites still count.
        println!("kvm-unit-tests: not built here (see setup's warning): the subset is not run");
        return (0, 0);
    }
    let tag = if qemu { "kut-ci-svm" } else { "kut-ci" };
    let subset: Vec<String> = kut::ci_subset(qemu).iter().map(|name| name.to_string()).collect();
    match kut::run(&subset, args.cpus, args.timeout_secs, tag, qemu) {
        Ok(verdicts) => report_kut(&verdicts),
        Err(message) => {
            eprintln!("xtask: kvm-unit-tests: {message}");
            (0, 1)
        }
    }
}

/// The Linux boot test with 2 vCPUs on VMX in Bochs, or (`qemu`) with 1 vCPU on SVM in QEMU's
/// TCG; returns (passed, failed). The others are left to `make linux`: the 1-vCPU boot in Bochs
/// for CI's time (about 5 minutes; 1 vCPU runs on SVM, and the 2-vCPU boot takes the same
/// pre-copies), the 2-vCPU boot on SVM as it often fails there, through a flaw of QEMU's TCG
/// (see kernel/README.md, *Linux guest*).
fn linux_boots(args: &Args, qemu: bool) -> (usize, usize) {
    if !linux::is_fetched() {
        println!("linux boot: the pinned kernel and busybox are not here (see setup's warning): not run");
        return (0, 0);
    }
    let (mut passed, mut failed) = (0, 0);
    let vcpu_counts: &[u32] = if qemu { &[1] } else { &[2] };
    for &vcpus in vcpu_counts {
        match linux_boot_test(args, vcpus, qemu) {
            Ok(()) => passed += 1,
            Err(message) => {
                println!("linux boot ({vcpus} vCPUs): FAILED: {message}");
                failed += 1;
            }
        }
    }
    (passed, failed)
}

/// One backend's part of `cargo xtask test`: its kernel tests, and the (passed, failed) of its
/// kvm-unit-tests subset and of its Linux boots.
type BackendRun = (KernelSuite, (usize, usize), (usize, usize));

/// One backend's kernel-test run.
struct KernelSuite {
    /// The backend and its emulator, for the summary.
    name: &'static str,
    passed: usize,
    failed: usize,
    skipped: usize,
    /// Why the run did not complete, if it did not.
    error: Option<String>,
}

/// Runs the kernel tests on VMX in Bochs, or (`qemu`) on SVM in QEMU's TCG, and prints the
/// suite's own summary line. A run that never reached its closing line counts as one failure
/// at least.
fn kernel_suite(args: &Args, qemu: bool) -> KernelSuite {
    let name = if qemu {
        "QEMU TCG, SVM + NPT"
    } else {
        "Bochs, VT-x + EPT"
    };
    let suite_args = Args {
        command: "test".into(),
        qemu,
        uefi: false,
        kvm: false,
        gdb: false,
        test: true,
        bochs_svm: false,
        cpus: args.cpus,
        timeout_secs: args.timeout_secs,
        names: Vec::new(),
        linux: None,
    };
    let emulator = if qemu { "qemu" } else { "bochs" };
    let suite = match run(&suite_args, Variant::Test) {
        Ok(run) => KernelSuite {
            name,
            passed: run.passed,
            failed: run.failed,
            skipped: run.skipped.len(),
            error: None,
        },
        Err(message) => {
            let log = target_dir().join(format!("serial-test-{emulator}.log"));
            let partial = KernelRun::parse(&std::fs::read_to_string(log).unwrap_or_default());
            KernelSuite {
                name,
                passed: partial.passed,
                failed: partial.failed.max(1),
                skipped: partial.skipped.len(),
                error: Some(format!("{name}: {message}")),
            }
        }
    };
    println!(
        "kernel tests ({name}): {} passed, {} failed, {} skipped (named above with the reason)",
        suite.passed, suite.failed, suite.skipped
    );
    suite
}

/// The Linux boot test: the pinned kernel with the repo's `/init` and `vcpus` vCPUs, in
/// Bochs (VMX) or QEMU's TCG (`qemu`: SVM); it passes only when the guest powers off after its workload's success line.
fn linux_boot_test(args: &Args, vcpus: u32, qemu: bool) -> Result<(), String> {
    let started = std::time::Instant::now();
    let boot = Args {
        command: "run".into(),
        qemu,
        uefi: false,
        kvm: false,
        gdb: false,
        test: false,
        bochs_svm: false,
        cpus: vcpus,
        timeout_secs: args.timeout_secs.max(LINUX_TEST_WALL_SECONDS),
        names: Vec::new(),
        linux: Some(linux::LinuxOptions {
            vcpus,
            ..linux::LinuxOptions::default()
        }),
    };
    // The kernel's own verdict (success: the guest powered off) comes first, then the
    // markers in order.
    run(&boot, Variant::Run)?;
    let (log, modes) = if qemu {
        ("serial-linux-qemu.log", linux::SVM_PRECOPY_MODES)
    } else {
        ("serial-linux-bochs.log", linux::VMX_PRECOPY_MODES)
    };
    let serial = std::fs::read_to_string(target_dir().join(log)).map_err(|e| format!("serial log: {e}"))?;
    let ticks = linux::judge(&serial, &modes)?;
    println!(
        "linux boot: PASS ({}, {vcpus} vCPUs: /init, the workload and power-off in {ticks} ticks, {} s of wall time)",
        if qemu { "SVM in QEMU" } else { "VMX in Bochs" },
        started.elapsed().as_secs()
    );
    Ok(())
}

/// The wall-clock bound of each Linux boot test (one takes 3 to 6 minutes here).
const LINUX_TEST_WALL_SECONDS: u64 = 900;

/// Runs `cargo test` for the host crates, then the `loom` models, and sums the counts of every
/// test binary.
fn run_host_tests() -> Result<HostTestCounts, String> {
    // With pgm's simulated host, which its crate-doc example runs on.
    let tests = cargo_test(Command::new(cargo()).args([
        "test",
        "--workspace",
        "--exclude",
        "kernel",
        "--features",
        "pgm/sim",
    ]))?;
    // pgm's suites a second time, on AMD NPT tables (`sim::SimFormat`).
    let npt = cargo_test(Command::new(cargo()).args(["test", "-p", "pgm", "--features", "sim-npt"]))?;
    // The models of the VM lock and of pgm's lock-free fault path: built with `--cfg loom`
    // (which swaps their atomics for loom's) in a target directory of their own, so that the
    // two builds do not invalidate each other.
    let models = cargo_test(
        Command::new(cargo())
            .args([
                "test",
                "--release",
                "-p",
                "brlock",
                "-p",
                "pgm",
                "--features",
                "pgm/sim",
                "--lib",
            ])
            .args(["--", "loom"])
            .env("RUSTFLAGS", "--cfg loom")
            .env("CARGO_TARGET_DIR", target_dir().join("loom")),
    )?;
    // pgm as a library: its crate-doc example ran above, on each format; its example VMM loop
    // runs here, and the crate must package.
    let library = [
        host_check(
            "pgm example host_vmm",
            Command::new(cargo()).args([
                "run",
                "--quiet",
                "-p",
                "pgm",
                "--features",
                "sim",
                "--example",
                "host_vmm",
            ]),
        ),
        host_check(
            "cargo package -p pgm",
            Command::new(cargo()).args(["package", "--quiet", "-p", "pgm", "--allow-dirty"]),
        ),
    ];
    let library_passed = library.iter().filter(|&&ok| ok).count();
    Ok(HostTestCounts {
        passed: tests.passed + npt.passed + models.passed + library_passed,
        failed: tests.failed + npt.failed + models.failed + library.len() - library_passed,
    })
}

/// Runs one host command that passes or fails as a whole, printing a `cargo test`-style line
/// for it; true when it succeeded.
fn host_check(name: &str, command: &mut Command) -> bool {
    let ok = command
        .current_dir(workspace_root())
        .status()
        .is_ok_and(|status| status.success());
    println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
    ok
}

/// Runs one `cargo test` command and counts its results.
fn cargo_test(command: &mut Command) -> Result<HostTestCounts, String> {
    let output = command
        .current_dir(workspace_root())
        .output()
        .map_err(|e| format!("cannot run cargo test: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    let counts = HostTestCounts::parse(&stdout);
    if !output.status.success() && counts.failed == 0 {
        return Err("host tests did not build or run (see above)".into());
    }
    Ok(counts)
}

/// The cargo binary that started us, so the pinned toolchain is used throughout.
fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The workspace root (the parent of this crate's manifest directory).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("boot/ lies inside the workspace")
        .to_path_buf()
}

/// `target/` of the workspace, where images, logs and emulator configs are written.
pub fn target_dir() -> PathBuf {
    workspace_root().join("target")
}
