//! The Linux guest (`cargo xtask run --linux`): the initramfs made from busybox and the repo's
//! `/init`, and the ramdisk that carries the kernel, the initrd and the manifest the
//! hypervisor's Linux boot reads (`kernel/src/linux.rs`).
//!
//! `boot/setup.sh` fetches Debian's kernel and busybox (the versions are pinned there) and
//! unpacks both into `target/linux/root`.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::target_dir;

/// Where setup unpacks the pinned packages.
pub fn packages_root() -> PathBuf {
    target_dir().join("linux/root")
}

/// The `/init` script kept in the repo.
fn init_script() -> PathBuf {
    crate::workspace_root().join("boot/linux/init")
}

/// The command line unless `--append` gives one: the console on COM1, and a panic reboots
/// (the VM then stops as reset rather than hanging).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

/// The emulated machine's memory for a guest of `guest_mib`: the guest's RAM, and room for
/// the hypervisor (its image, heap and page tables) and the ramdisk the bootloader loads.
pub fn host_memory_mib(guest_mib: u64) -> u64 {
    guest_mib + 256
}

/// The TSC ticks the guest may run before the hypervisor stops it with a diagnostic (its RIP
/// and last exit): `LINUX_LIMIT_TICKS` from the environment, else no limit (the wall-clock
/// `--timeout` still bounds the emulator).
pub fn limit_ticks() -> Result<u64, String> {
    match std::env::var("LINUX_LIMIT_TICKS") {
        Ok(value) => value
            .parse()
            .map_err(|_| format!("LINUX_LIMIT_TICKS: not a number of ticks: {value}")),
        Err(_) => Ok(u64::MAX),
    }
}

/// Bochs's pace for a Linux guest: 2·10^8 instructions per emulated second (the guest's TSC
/// runs at 200 MHz), so that its 250 Hz tick comes every 800,000 instructions. An exit costs
/// a few thousand of Bochs's instructions; at the tests' 4·10^6 a tick came every 16,000, and
/// a console line (two port exits a character, with interrupts off) outlasted several ticks:
/// ticks were lost, and Linux's clocksource watchdog found the TSC running ahead of jiffies
/// (by 46% at 4·10^6, 26% at 4·10^7) and marked it unstable.
pub const IPS: u64 = 40_000_000;

/// True when setup fetched the pinned kernel and busybox.
pub fn is_fetched() -> bool {
    pinned_kernel().is_ok() && packages_root().join("bin/busybox").is_file()
}

/// The pre-copies the kernel runs during the boot, by the name its verdict line gives each,
/// in order: on VMX the second takes its writes from PML; SVM has no CPU write log, and both
/// write-protect.
pub const VMX_PRECOPY_MODES: [&str; 2] = ["write-protect", "PML"];
/// See [`VMX_PRECOPY_MODES`].
pub const SVM_PRECOPY_MODES: [&str; 2] = ["write-protect", "write-protect"];

/// The boot test's verdict on a run's serial output: it passes only when the guest reached
/// `/init`, the workload reported success after that, the hypervisor saw the guest power
/// off afterwards, and the pre-copies (`modes`, in order) found no page differing from their
/// copy. `Ok` carries the run's ticks; `Err` says what is missing.
pub fn judge(serial: &str, modes: &[&str]) -> Result<u64, String> {
    let lines: Vec<&str> = serial.lines().map(|line| line.trim_end_matches('\r')).collect();
    let verdicts: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|line| line.starts_with("precopy: ") && line.contains(" pages differ"))
        .collect();
    for (index, mode) in modes.iter().enumerate() {
        let line = verdicts
            .get(index)
            .filter(|line| line.starts_with(&format!("precopy: {mode}: ")))
            .ok_or_else(|| format!("no {mode} pre-copy finished (pre-copy {})", index + 1))?;
        if !line.ends_with("; 0 pages differ") {
            return Err(format!("the {mode} pre-copy lost writes: {line}"));
        }
    }
    let position = |what: &str, from: usize| {
        lines[from..]
            .iter()
            .position(|line| line.contains(what))
            .map(|at| at + from)
    };
    let migrated = position("migration: the source VM is gone; the guest resumed", 0)
        .ok_or("the guest was not migrated to a second VM")?;
    let init = position("] init: reached /init", 0).ok_or("the guest never reached /init")?;
    let workload = position("] workload: ok", init).ok_or("no workload success line after /init")?;
    let end =
        position("linux: the run ended after ", workload).ok_or("the run did not end after the workload")?;
    if migrated > end {
        return Err("the migration came after the run's end".into());
    }
    let ended = lines[end];
    if !ended.ends_with(": PowerOff") {
        return Err(format!("the guest did not power off: {ended}"));
    }
    ended
        .split_whitespace()
        .nth(5)
        .and_then(|ticks| ticks.parse().ok())
        .ok_or_else(|| format!("no tick count in: {ended}"))
}

/// What `run --linux` boots.
#[derive(Clone, Debug)]
pub struct LinuxOptions {
    /// The bzImage (default: the pinned Debian kernel).
    pub kernel: Option<PathBuf>,
    /// The initrd (default: the initramfs made from busybox and `boot/linux/init`).
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// The guest's vCPUs.
    pub vcpus: u32,
}

impl Default for LinuxOptions {
    fn default() -> Self {
        LinuxOptions {
            kernel: None,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            memory_mib: 256,
            vcpus: 1,
        }
    }
}

/// The pinned kernel: the one `vmlinuz-*` setup unpacked.
fn pinned_kernel() -> Result<PathBuf, String> {
    let boot = packages_root().join("boot");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&boot)
        .map_err(|e| format!("{}: {e} (run boot/setup.sh, or pass --kernel)", boot.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    found
        .pop()
        .ok_or_else(|| format!("no vmlinuz-* in {} (run boot/setup.sh)", boot.display()))
}

/// Packs the ramdisk for `options` (kernel, initrd, manifest) into `target/<file>` and
/// returns its path. `limit_ticks` bounds the guest's run in TSC ticks.
pub fn ramdisk(options: &LinuxOptions, limit_ticks: u64, file: &str) -> Result<PathBuf, String> {
    let kernel_path = match &options.kernel {
        Some(path) => path.clone(),
        None => pinned_kernel()?,
    };
    let kernel = std::fs::read(&kernel_path).map_err(|e| format!("{}: {e}", kernel_path.display()))?;
    let initrd = match &options.initrd {
        Some(path) => std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?,
        None => initramfs(&packages_root().join("bin/busybox"), &init_script())?,
    };
    if options.cmdline.contains('\n') {
        return Err("--append: the command line is one line".into());
    }
    let manifest = format!(
        "name=linux\nvcpus={}\nmemory_mib={}\nlimit_ticks={limit_ticks}\ncmdline={}\n",
        options.vcpus, options.memory_mib, options.cmdline
    );
    let files: Vec<(&str, &[u8])> = vec![
        ("linux/manifest", manifest.as_bytes()),
        ("linux/kernel", &kernel),
        ("linux/initrd", &initrd),
    ];
    let path = target_dir().join(file);
    std::fs::write(&path, loader::archive::build(&files)).map_err(|e| format!("ramdisk: {e}"))?;
    Ok(path)
}

/// The initramfs: a gzip-compressed newc cpio archive with busybox as `/bin/busybox`, the
/// script `init` as `/init`, `/dev/console` (the kernel opens it for init's output before any
/// file system is mounted) and the empty directories `/init` mounts on.
pub fn initramfs(busybox: &Path, init: &Path) -> Result<Vec<u8>, String> {
    let busybox =
        std::fs::read(busybox).map_err(|e| format!("{}: {e} (run boot/setup.sh)", busybox.display()))?;
    let init = std::fs::read(init).map_err(|e| format!("{}: {e}", init.display()))?;
    let mut archive = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "tmp"] {
        archive.directory(dir);
    }
    archive.char_device("dev/console", 5, 1);
    archive.file("bin/busybox", 0o755, &busybox);
    archive.symlink("bin/sh", "busybox");
    archive.file("init", 0o755, &init);
    let cpio = archive.finish();
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&cpio).map_err(|e| format!("gzip: {e}"))?;
    gzip.finish().map_err(|e| format!("gzip: {e}"))
}

/// A newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it
/// (Documentation/driver-api/early-userspace/buffer-format.rst).
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Cpio {
    const DIRECTORY: u32 = 0o040_000;
    const REGULAR: u32 = 0o100_000;
    const SYMLINK: u32 = 0o120_000;
    const CHAR_DEVICE: u32 = 0o020_000;

    fn directory(&mut self, name: &str) {
        self.entry(name, Self::DIRECTORY | 0o755, (0, 0), b"");
    }

    fn file(&mut self, name: &str, permissions: u32, data: &[u8]) {
        self.entry(name, Self::REGULAR | permissions, (0, 0), data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, Self::SYMLINK | 0o777, (0, 0), target.as_bytes());
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, Self::CHAR_DEVICE | 0o600, (major, minor), b"");
    }

    /// One header (13 eight-digit hex fields after the magic), the NUL-terminated name padded
    /// to four bytes, the data padded to four bytes.
    fn entry(&mut self, name: &str, mode: u32, (major, minor): (u32, u32), data: &[u8]) {
        self.next_inode += 1;
        let links = if mode & Self::DIRECTORY != 0 { 2 } else { 1 };
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            links,
            0, // mtime
            data.len() as u32,
            0, // device major
            0, // device minor
            major,
            minor,
            name.len() as u32 + 1,
            0, // checksum
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes.extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    /// The archive with its `TRAILER!!!` entry.
    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), b"");
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge_vmx(serial: &str) -> Result<u64, String> {
        judge(serial, &VMX_PRECOPY_MODES)
    }

    /// One entry read back: name, mode, device (major, minor), data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Reads a newc archive back.
    fn entries(bytes: &[u8]) -> Vec<Entry> {
        let mut at = 0;
        let mut out = Vec::new();
        let field = |at: usize, index: usize| {
            let start = at + 6 + index * 8;
            u32::from_str_radix(std::str::from_utf8(&bytes[start..start + 8]).unwrap(), 16).unwrap()
        };
        loop {
            assert_eq!(&bytes[at..at + 6], b"070701");
            let (mode, size, major, minor, name_len) = (
                field(at, 1),
                field(at, 6) as usize,
                field(at, 9),
                field(at, 10),
                field(at, 11) as usize,
            );
            let name_at = at + 110;
            let name = String::from_utf8(bytes[name_at..name_at + name_len - 1].to_vec()).unwrap();
            let data_at = (name_at + name_len).next_multiple_of(4);
            let data = bytes[data_at..data_at + size].to_vec();
            at = (data_at + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((name, mode, (major, minor), data));
        }
    }

    #[test]
    fn the_boot_test_passes_only_on_power_off_after_the_workload() {
        let precopies = "precopy: write-protect: converged after 9 rounds; 1 vCPUs parked for \
                         the last round; 0 pages differ\n\
                         precopy: PML: round limit reached after 41 rounds; 1 vCPUs stopped for \
                         the last round; 0 pages differ\n";
        let migration = "migration: the source VM is gone; the guest resumed in a second VM on \
                         its copy: 29000 pages\n";
        let good = format!(
            "[linux] [ 36.3] Run /init as init process\n[linux] init: reached /init\n\
             {precopies}{migration}[linux] workload: ok: wrote\r\n[linux] cpus: 1\n\
             linux: the run ended after 4312749685 ticks: PowerOff\n"
        );
        assert_eq!(judge_vmx(&good), Ok(4_312_749_685));
        let without = |line: &str| good.replace(line, "");
        assert!(judge_vmx(&without("[linux] init: reached /init\n")).is_err());
        assert!(judge_vmx(&without("[linux] workload: ok: wrote\r\n")).is_err());
        assert!(judge_vmx(&good.replace("PowerOff", "Reset")).is_err());
        // Both pre-copies must have finished, each with no page differing.
        assert!(judge_vmx(&good.replacen("0 pages differ", "3 pages differ", 1)).is_err());
        assert!(judge_vmx(&good.replace("precopy: PML: ", "precopy: PML round 3: ")).is_err());
        // On SVM both pre-copies write-protect; each backend's list is what it is judged by.
        let svm = good.replace("precopy: PML: ", "precopy: write-protect: ");
        assert_eq!(judge(&svm, &SVM_PRECOPY_MODES), Ok(4_312_749_685));
        assert!(judge_vmx(&svm).is_err());
        assert!(judge(&good, &SVM_PRECOPY_MODES).is_err());
        // The guest must have moved to a second VM before its run ended.
        assert!(judge_vmx(&without(migration)).is_err());
        let late = good.replace(migration, "") + migration;
        assert!(judge_vmx(&late).is_err());
        // The workload's line must come after /init, and the power-off after the workload.
        let reordered = format!(
            "{precopies}{migration}[linux] workload: ok\n[linux] init: reached /init\n\
             linux: the run ended after 5 ticks: PowerOff\n"
        );
        assert!(judge_vmx(&reordered).is_err());
    }

    #[test]
    fn the_archive_holds_each_entry_aligned_with_its_kind_and_data() {
        let mut cpio = Cpio::default();
        cpio.directory("dev");
        cpio.char_device("dev/console", 5, 1);
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        cpio.symlink("bin/sh", "busybox");
        let bytes = cpio.finish();
        assert_eq!(bytes.len() % 4, 0);
        let read = entries(&bytes);
        assert_eq!(
            read,
            vec![
                ("dev".into(), 0o040_755, (0, 0), vec![]),
                ("dev/console".into(), 0o020_600, (5, 1), vec![]),
                ("init".into(), 0o100_755, (0, 0), b"#!/bin/sh\n".to_vec()),
                ("bin/sh".into(), 0o120_777, (0, 0), b"busybox".to_vec()),
            ]
        );
    }

    #[test]
    fn the_initramfs_is_gzip_of_the_archive_with_busybox_and_init() {
        let dir = std::env::temp_dir().join(format!("xtask-initramfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("busybox"), b"\x7fELF busybox").unwrap();
        std::fs::write(dir.join("init"), b"#!/bin/sh\necho hi\n").unwrap();
        let gz = initramfs(&dir.join("busybox"), &dir.join("init")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(&gz[..2], &[0x1F, 0x8B]);
        let mut cpio = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut cpio).unwrap();
        let read = entries(&cpio);
        let find = |name: &str| read.iter().find(|e| e.0 == name).unwrap();
        assert_eq!(find("bin/busybox").3, b"\x7fELF busybox");
        assert_eq!(find("init").1, 0o100_755);
        assert_eq!(find("dev/console").2, (5, 1));
    }
}
