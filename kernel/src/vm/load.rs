//! Loading guests through the memory manager: a Multiboot v1 kernel or a Linux bzImage (the
//! `loader` crate plans each; this writes the plan into guest RAM through pgm and sets the
//! vCPU up to enter it). The memory map the guest gets is derived from pgm's registered ranges.

use alloc::string::String;
use alloc::vec::Vec;

use loader::linux::{self, LinuxError, BOOT_CODE_DESCRIPTOR, BOOT_CS, BOOT_DATA_DESCRIPTOR, BOOT_DS};
use loader::multiboot::{self, LoadError, MemoryRange, RangeKind};
use pgm::page::PageType;
use pgm::GuestPhysAddr;

use super::backend::{Segment, SegmentState, VirtualCpu};
use super::{Vcpu, VmError};
use crate::arch::guests::GuestMode;
use crate::arch::registers::GuestRegisters;

/// Why a guest could not be loaded.
#[derive(Debug)]
pub enum LoadFailure {
    /// The image is malformed or does not fit (nothing was written).
    Image(LoadError),
    /// The Linux image is malformed, or it or its initrd does not fit (nothing was written).
    Linux(LinuxError),
    /// Writing it or setting the vCPU up failed.
    Vm(VmError),
}

impl core::fmt::Display for LoadFailure {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            LoadFailure::Image(error) => write!(f, "{error}"),
            LoadFailure::Linux(error) => write!(f, "{error}"),
            LoadFailure::Vm(error) => write!(f, "{error}"),
        }
    }
}

impl From<VmError> for LoadFailure {
    fn from(error: VmError) -> Self {
        LoadFailure::Vm(error)
    }
}

impl Vcpu<'_> {
    /// The VM's memory map as a guest sees it: registered RAM available, ROM reserved, MMIO
    /// and unassigned space absent. Adjacent ranges of one kind are merged.
    pub fn memory_map(&self) -> Vec<MemoryRange> {
        let pgm = self.pgm();
        let mut map: Vec<MemoryRange> = Vec::new();
        for range in pgm.ranges().iter() {
            let kind = match range.descriptors().next().map(|page| page.page_type()) {
                _ if range.registration() != 0 => RangeKind::Available,
                Some(PageType::Rom | PageType::RomShadow) => RangeKind::Reserved,
                _ => continue,
            };
            match map.last_mut() {
                Some(last) if last.kind == kind && last.base + last.size == range.base().as_u64() => {
                    last.size += range.size();
                }
                _ => map.push(MemoryRange {
                    base: range.base().as_u64(),
                    size: range.size(),
                    kind,
                }),
            }
        }
        map
    }

    /// Loads the Multiboot v1 `image` with command line `cmdline` and one module (`module`:
    /// its name and contents) into this VM, whose RAM must still be untouched (a new VM:
    /// segments' BSS is not written, it reads zero), and sets this vCPU up to enter it in
    /// 32-bit protected mode, paging off, EAX = 0x2BADB002, EBX = the boot information.
    pub fn load_multiboot(
        &mut self,
        image: &[u8],
        cmdline: &str,
        module: Option<(&str, &[u8])>,
    ) -> Result<(), LoadFailure> {
        let map = self.memory_map();
        let plan = multiboot::plan(image, cmdline, module, &map).map_err(LoadFailure::Image)?;
        let mut writes: Vec<(u64, &[u8])> = plan.placements.iter().map(|p| (p.gpa, p.bytes)).collect();
        writes.push((plan.info_at, &plan.info));
        self.write_guest(&writes)?;
        let regs = GuestRegisters {
            rax: u64::from(plan.eax),
            rbx: u64::from(plan.ebx),
            ..GuestRegisters::default()
        };
        self.enter_at(GuestMode::Flat32, u64::from(plan.entry), 0, regs)?;
        Ok(())
    }
}

impl Vcpu<'_> {
    /// Loads the Linux bzImage `image` with command line `cmdline` and `initrd` into this VM,
    /// whose RAM must still be untouched, and sets this vCPU up at the kernel's 64-bit entry
    /// as the boot protocol asks: long mode on the loader's identity map, CS = `__BOOT_CS`,
    /// DS, ES and SS = `__BOOT_DS` from the loader's GDT, interrupts off, RSI = the zero page.
    pub fn load_linux(
        &mut self,
        image: &[u8],
        cmdline: &str,
        initrd: Option<&[u8]>,
    ) -> Result<(), LoadFailure> {
        let map = self.memory_map();
        let plan = linux::plan(image, cmdline, initrd, &map).map_err(LoadFailure::Linux)?;
        let mut writes: Vec<(u64, &[u8])> = plan.placements.iter().map(|p| (p.gpa, p.bytes)).collect();
        writes.extend(plan.boot_data.iter().map(|(gpa, bytes)| (*gpa, bytes.as_slice())));
        self.write_guest(&writes)?;
        let regs = GuestRegisters {
            rsi: plan.rsi,
            ..GuestRegisters::default()
        };
        self.enter_at(GuestMode::Long64, plan.entry, plan.cr3, regs)?;
        // The segment registers hold what the loader's GDT says, as if the guest had loaded
        // them.
        let code = SegmentState::from_descriptor(BOOT_CS, BOOT_CODE_DESCRIPTOR);
        let data = SegmentState::from_descriptor(BOOT_DS, BOOT_DATA_DESCRIPTOR);
        let cpu = &mut self.cpu;
        cpu.set_segment(Segment::Cs, code).map_err(VmError::from)?;
        for segment in [Segment::Ds, Segment::Es, Segment::Ss] {
            cpu.set_segment(segment, data).map_err(VmError::from)?;
        }
        cpu.set_gdt(plan.gdt.0, plan.gdt.1).map_err(VmError::from)?;
        Ok(())
    }

    /// Writes each `(gpa, bytes)` into guest RAM through pgm, flushing what each write needs.
    fn write_guest(&mut self, writes: &[(u64, &[u8])]) -> Result<(), VmError> {
        for &(gpa, bytes) in writes {
            let invalidation = self
                .pgm_mut()
                .write_phys(GuestPhysAddr::new_truncate(gpa), bytes)
                .map_err(VmError::from)?;
            self.flush(invalidation)?;
        }
        Ok(())
    }
}

/// The environment module kvm-unit-tests reads (its values override fw_cfg's).
pub fn kvm_unit_tests_environment(vcpus: u32, memory_mib: u64) -> String {
    alloc::format!("NR_CPUS={vcpus}\nMEMSIZE={memory_mib}\n")
}
