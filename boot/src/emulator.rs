//! Running a disk image in Bochs or QEMU, bounded by a timeout, with the guest's serial output
//! streamed to the terminal and saved to a file.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::target_dir;

/// Bochs disk geometry: a flat image must be a whole number of 16-head, 63-sector cylinders.
const BOCHS_HEADS: u64 = 16;
const BOCHS_SECTORS_PER_TRACK: u64 = 63;
const BOCHS_CYLINDER_BYTES: u64 = BOCHS_HEADS * BOCHS_SECTORS_PER_TRACK * 512;

/// OVMF firmware files from Debian's `ovmf` package.
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The I/O port and size of QEMU's `isa-debug-exit` device; the kernel writes its exit code there.
const QEMU_DEBUG_EXIT: &str = "isa-debug-exit,iobase=0xf4,iosize=0x04";

/// Bochs's CPU models: VT-x with EPT, unrestricted guest, VPID and PML; and AMD's with SVM and
/// nested paging (no x2APIC: the host uses its xAPIC).
pub const VMX_MODEL: &str = "corei7_skylake_x";
/// See [`VMX_MODEL`].
pub const SVM_MODEL: &str = "ryzen";

/// Bochs's pace for the kernel tests and kvm-unit-tests: the TSC counts 4·10^6 a second of
/// emulated time (budgets are in ticks, so the tests do not depend on it).
pub const DEFAULT_IPS: u64 = 4_000_000;

/// Which emulator boots the image.
#[derive(Clone, Copy, Debug)]
pub enum Emulator {
    /// Bochs with `corei7_skylake_x`: VT-x with EPT, unrestricted guest, VPID, PML.
    Bochs,
    /// QEMU: TCG (no VT-x) unless `kvm`, which passes the host CPU through; with `gdb`, it
    /// starts halted with its GDB stub on localhost:1234 (`-s -S`).
    Qemu { uefi: bool, kvm: bool, gdb: bool },
}

/// What to boot and for how long.
pub struct RunOptions {
    /// The disk image to boot (BIOS image for Bochs).
    pub image: PathBuf,
    /// Wall-clock bound for the whole emulator run.
    pub timeout_secs: u64,
    /// Processors of the emulated machine.
    pub cpus: u32,
    /// Its memory in MiB.
    pub megs: u64,
    /// Bochs's instructions per emulated second, which the guest's TSC follows.
    pub ips: u64,
    /// Bochs's CPU model: `corei7_skylake_x` (VT-x with EPT) or `ryzen` (SVM with nested
    /// paging, for the SVM kernel's second opinion).
    pub bochs_model: &'static str,
    /// Where the guest's serial output is saved.
    pub serial_log: PathBuf,
    /// The emulator's working directory under `target/` (its disk copy, config and logs), so
    /// that two runs (the kernel tests and kvm-unit-tests) can go on at once.
    pub work_dir: &'static str,
}

/// How an emulator run ended.
pub struct Outcome {
    /// The emulator's exit status (`None` when it had to be killed).
    pub status: Option<ExitStatus>,
    /// True when the run hit the timeout.
    pub timed_out: bool,
    /// Everything the guest wrote to its serial port.
    pub serial: String,
}

impl Emulator {
    /// Short name for messages and log file names.
    pub fn name(self) -> &'static str {
        match self {
            Emulator::Bochs => "bochs",
            Emulator::Qemu { .. } => "qemu",
        }
    }

    /// Boots `options.image`, streams serial output until the emulator exits or the timeout
    /// passes, and returns how it ended. `Err` only when the emulator could not be started.
    pub fn run(self, options: &RunOptions) -> Result<Outcome, String> {
        let dir = target_dir().join(options.work_dir);
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let _ = fs::remove_file(&options.serial_log);
        fs::write(&options.serial_log, b"").map_err(|e| format!("serial log: {e}"))?;
        let mut command = match self {
            Emulator::Bochs => bochs_command(&dir, options)?,
            Emulator::Qemu { uefi, kvm, gdb } => qemu_command(&dir, options, uefi, kvm, gdb)?,
        };
        let stdout_log = dir.join("emulator-output.log");
        let stdout = fs::File::create(&stdout_log).map_err(|e| format!("{e}"))?;
        let stderr = stdout.try_clone().map_err(|e| format!("{e}"))?;
        eprintln!("xtask: booting {} in {}", options.image.display(), self.name());
        let child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e} (run `make setup`)", self.name()))?;
        stream_until_exit(child, options)
    }
}

/// The most memory Bochs 2.7 allocates for the emulated machine. A larger machine (a 4 GiB
/// Linux guest's host) keeps this much in the emulator's memory and the rest of its blocks in a
/// swap file, which only blocks written beyond this size ever reach.
const BOCHS_MAX_HOST_MEGS: u64 = 2048;

/// Writes the Bochs configuration and a padded copy of the image, and returns the command that
/// runs Bochs headless under Xvfb, bounded by `timeout`.
fn bochs_command(dir: &Path, options: &RunOptions) -> Result<Command, String> {
    let disk = dir.join("disk.img");
    let cylinders = padded_copy(&options.image, &disk)?;
    // A killed Bochs leaves the lock behind and the next run cannot open the image.
    let _ = fs::remove_file(dir.join("disk.img.lock"));
    let config = format!(
        "memory: guest={megs}, host={host_megs}\n\
         cpu: model={model}, count={cpus}, ips={ips}, reset_on_triple_fault=0\n\
         clock: sync=none, time0=946684800\n\
         romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
         vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest\n\
         vga: extension=vbe\n\
         display_library: x\n\
         ata0-master: type=disk, path=\"{disk}\", mode=flat, cylinders={cylinders}, heads={BOCHS_HEADS}, spt={BOCHS_SECTORS_PER_TRACK}\n\
         boot: disk\n\
         com1: enabled=1, mode=file, dev=\"{serial}\"\n\
         port_e9_hack: enabled=1\n\
         sound: waveoutdrv=dummy, waveindrv=dummy, midioutdrv=dummy\n\
         speaker: enabled=0\n\
         mouse: enabled=0\n\
         panic: action=fatal\n\
         error: action=report\n\
         log: \"{log}\"\n",
        disk = disk.display(),
        model = options.bochs_model,
        cpus = options.cpus,
        megs = options.megs,
        host_megs = options.megs.min(BOCHS_MAX_HOST_MEGS),
        ips = options.ips,
        serial = options.serial_log.display(),
        log = dir.join("bochs.log").display(),
    );
    let bochsrc = dir.join("bochsrc");
    fs::write(&bochsrc, config).map_err(|e| format!("write bochsrc: {e}"))?;
    // Debian's Bochs starts in its debugger; this script tells it to continue.
    let rc = dir.join("continue.rc");
    fs::write(&rc, "c\n").map_err(|e| format!("write rc: {e}"))?;
    let mut command = Command::new("xvfb-run");
    command
        .args(["-a", "-s", "-screen 0 1280x1024x24", "timeout", "-k", "5"])
        .arg(options.timeout_secs.to_string())
        .args(["bochs", "-q", "-f"])
        .arg(&bochsrc)
        .arg("-rc")
        .arg(&rc)
        .current_dir(dir);
    Ok(command)
}

/// Copies `image` to `disk`, padded with zeros to whole Bochs cylinders; returns the cylinder count.
fn padded_copy(image: &Path, disk: &Path) -> Result<u64, String> {
    let mut bytes = fs::read(image).map_err(|e| format!("read {}: {e}", image.display()))?;
    let cylinders = (bytes.len() as u64).div_ceil(BOCHS_CYLINDER_BYTES);
    bytes.resize((cylinders * BOCHS_CYLINDER_BYTES) as usize, 0);
    fs::write(disk, bytes).map_err(|e| format!("write {}: {e}", disk.display()))?;
    Ok(cylinders)
}

/// Returns the QEMU command for a BIOS or UEFI boot, with the debug-exit device the kernel uses.
fn qemu_command(
    dir: &Path,
    options: &RunOptions,
    uefi: bool,
    kvm: bool,
    gdb: bool,
) -> Result<Command, String> {
    let mut command = Command::new("qemu-system-x86_64");
    command
        .arg("-drive")
        .arg(format!("format=raw,file={}", options.image.display()))
        .arg("-serial")
        .arg(format!("file:{}", options.serial_log.display()))
        .args([
            "-display",
            "none",
            "-no-reboot",
            "-m",
            &format!("{}M", options.megs),
            "-smp",
            &options.cpus.to_string(),
            "-device",
            QEMU_DEBUG_EXIT,
        ]);
    if uefi {
        let vars = dir.join("OVMF_VARS.fd");
        fs::copy(OVMF_VARS, &vars).map_err(|e| format!("copy {OVMF_VARS}: {e} (run `make setup`)"))?;
        command
            .args(["-machine", "q35", "-drive"])
            .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,file={}", vars.display()));
    }
    if kvm {
        command.args(["-enable-kvm", "-cpu", "host"]);
    } else {
        // Every feature TCG emulates, SVM with nested paging among them (QEMU 7.2's TCG has no
        // VT-x, no x2APIC and no NRIP save; the kernel copes with all three).
        command.args(["-cpu", "max"]);
    }
    if gdb {
        // The GDB stub on tcp::1234, the CPU stopped until GDB continues it.
        command.args(["-s", "-S"]);
    }
    Ok(command)
}

/// Copies new serial bytes to the terminal until the child exits or the deadline passes.
fn stream_until_exit(mut child: Child, options: &RunOptions) -> Result<Outcome, String> {
    // The emulator's own `timeout` fires first; this is the backstop a little later.
    let deadline = Instant::now() + Duration::from_secs(options.timeout_secs + 15);
    let mut shown = 0usize;
    let mut serial = Vec::new();
    let (status, mut timed_out) = loop {
        show_new_serial(&options.serial_log, &mut serial, &mut shown);
        if let Some(status) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
            break (Some(status), false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    show_new_serial(&options.serial_log, &mut serial, &mut shown);
    // coreutils `timeout` exits 124 when it stopped the command (137 after its KILL).
    if let Some(code) = status.and_then(|s| s.code()) {
        timed_out |= code == 124 || code == 137;
    }
    Ok(Outcome {
        status,
        timed_out,
        serial: String::from_utf8_lossy(&serial).into_owned(),
    })
}

/// Reads the serial log and prints the bytes not shown yet.
fn show_new_serial(path: &Path, serial: &mut Vec<u8>, shown: &mut usize) {
    serial.clear();
    if let Ok(mut file) = fs::File::open(path) {
        let _ = file.read_to_end(serial);
    }
    if serial.len() > *shown {
        let mut out = std::io::stdout();
        let _ = out.write_all(&serial[*shown..]);
        let _ = out.flush();
        *shown = serial.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_of(gdb: bool) -> Vec<String> {
        let options = RunOptions {
            image: PathBuf::from("bios.img"),
            timeout_secs: 1,
            cpus: 2,
            megs: 256,
            ips: DEFAULT_IPS,
            bochs_model: VMX_MODEL,
            serial_log: PathBuf::from("serial.log"),
            work_dir: "qemu",
        };
        let command = qemu_command(Path::new("."), &options, false, false, gdb).unwrap();
        command
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn qemu_waits_for_gdb_only_when_asked() {
        let with = args_of(true);
        assert!(with.ends_with(&["-s".to_string(), "-S".to_string()]), "{with:?}");
        assert!(!args_of(false).iter().any(|a| a == "-s" || a == "-S"));
    }
}
