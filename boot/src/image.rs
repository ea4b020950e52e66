//! Building the kernel ELF and turning it into bootable BIOS and UEFI disk images.

use std::path::PathBuf;
use std::process::Command;

use bootloader::{BiosBoot, BootConfig, UefiBoot};
use bootloader_boot_config::LevelFilter;

use crate::{cargo, target_dir, workspace_root, Backend, Variant};

/// Paths of the two disk images made for one kernel variant.
pub struct Images {
    /// MBR/BIOS-bootable raw disk image.
    pub bios: PathBuf,
    /// GPT/UEFI-bootable raw disk image.
    pub uefi: PathBuf,
}

/// Builds the kernel for `x86_64-unknown-none` (release) with the virtualization `backend`
/// and copies the ELF to `target/kernel-<variant>[-svm].elf`, so the variants never overwrite
/// each other. Returns the copied path, or the reason the build failed.
pub fn build_kernel(variant: Variant, backend: Backend) -> Result<PathBuf, String> {
    let mut build = Command::new(cargo());
    build
        .args(["build", "--release", "-p", "kernel"])
        .current_dir(workspace_root());
    let mut features = Vec::new();
    if variant == Variant::Test {
        features.push("kernel-tests");
    }
    if backend == Backend::Svm {
        features.push("svm");
    }
    if !features.is_empty() {
        build.args(["--features", &features.join(",")]);
    }
    // The kvm-unit-tests variant is the demo kernel: it runs what the ramdisk's manifest lists.
    let status = build
        .status()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if !status.success() {
        return Err("kernel build failed (see above)".into());
    }
    let built = target_dir().join("x86_64-unknown-none/release/kernel");
    let copy = target_dir().join(format!("kernel-{}{}.elf", variant.name(), backend.suffix()));
    std::fs::copy(&built, &copy).map_err(|e| format!("copy {}: {e}", built.display()))?;
    Ok(copy)
}

/// Builds the kernel and makes `target/images/<variant>/{bios,uefi}.img`, with `ramdisk` (the
/// guest images' archive) loaded beside the kernel when given.
/// `tag` names the images' directory (`target/images/<tag>[-svm]`).
pub fn make_images(
    variant: Variant,
    backend: Backend,
    ramdisk: Option<&std::path::Path>,
    tag: &str,
) -> Result<Images, String> {
    let kernel = build_kernel(variant, backend)?;
    let dir = target_dir()
        .join("images")
        .join(format!("{tag}{}", backend.suffix()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let images = Images {
        bios: dir.join("bios.img"),
        uefi: dir.join("uefi.img"),
    };
    let config = boot_config();
    let mut bios = BiosBoot::new(&kernel);
    bios.set_boot_config(&config);
    let mut uefi = UefiBoot::new(&kernel);
    uefi.set_boot_config(&config);
    if let Some(ramdisk) = ramdisk {
        bios.set_ramdisk(ramdisk);
        uefi.set_ramdisk(ramdisk);
    }
    bios.create_disk_image(&images.bios)
        .map_err(|e| format!("BIOS image: {e:#}"))?;
    uefi.create_disk_image(&images.uefi)
        .map_err(|e| format!("UEFI image: {e:#}"))?;
    Ok(images)
}

/// The bootloader's own run-time settings: it logs to serial only (drawing its log on the
/// framebuffer costs seconds in an emulator) and only warnings, so the serial log is ours.
fn boot_config() -> BootConfig {
    let mut config = BootConfig::default();
    config.frame_buffer_logging = false;
    config.serial_logging = true;
    config.log_level = LevelFilter::Warn;
    config
}
