//! AMD SVM with nested paging (AMD APM vol. 2, chapter 15): capability checks, enabling SVM
//! (EFER.SVME and the host save area), the VMCB, guest entry/exit and TLB control by ASID.
//! The thin unsafe layer, as `arch::vmx` is for VT-x; VM policy lives in `crate::vm` and reaches
//! this only through `VirtualCpu`.

mod entry;
mod vcpu;
mod vmcb;

use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use pgm::frames::{HostFrameAllocator, HostMemory};
use pgm::HostPhysAddr;
use x86::msr::{rdmsr, wrmsr};

use crate::arch::memory::{KernelFrames, PhysMap};

pub use crate::arch::registers::GuestRegisters;
pub use entry::host_resume_address;
pub use vcpu::SvmVcpu;

/// The backend's name for messages.
pub const NAME: &str = "SVM";
/// The backend contract's names (see `arch::virt`).
pub type On = SvmOn;
/// See [`On`].
pub type Error = SvmError;
/// See [`On`].
pub type Vcpu<'a> = SvmVcpu<'a>;
/// See [`On`].
pub type Format = pgm::Npt;
/// A nested page fault leaves the faulting CPU's cached translations as they were (AMD
/// documents no flush; QEMU's TCG keeps its TLB until told): a fault's resolution that
/// changed a present entry's frame flushes the faulting CPU too.
pub const FAULT_FLUSHES_FAULTING_CPU: bool = false;

/// EFER.SVME (bit 12): SVM instructions enabled.
const EFER_SVME: u64 = 1 << 12;
/// VM_CR (MSR C001_0114) bit 4: SVM disabled by firmware.
const MSR_VM_CR: u32 = 0xC001_0114;
const VM_CR_SVMDIS: u64 = 1 << 4;
/// VM_HSAVE_PA (MSR C001_0117): where VMRUN saves the host's state.
const MSR_VM_HSAVE_PA: u32 = 0xC001_0117;
const MSR_EFER: u32 = 0xC000_0080;

/// CPUID 8000_0001h ECX bit 2: SVM.
const CPUID_SVM: u32 = 1 << 2;
/// CPUID 8000_000Ah EDX feature bits.
const SVM_NESTED_PAGING: u32 = 1 << 0;
const SVM_NRIP_SAVE: u32 = 1 << 3;
const SVM_FLUSH_BY_ASID: u32 = 1 << 6;
const SVM_DECODE_ASSISTS: u32 = 1 << 7;
const SVM_PAUSE_FILTER: u32 = 1 << 10;
const SVM_VGIF: u32 = 1 << 16;

/// Why SVM cannot be used on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// CPUID.8000_0001h:ECX.SVM is clear (an Intel CPU, or QEMU without `+svm`).
    NoSvm,
    /// VM_CR.SVMDIS is set: the firmware disabled SVM.
    DisabledByFirmware,
    /// A required feature is missing; the text names it.
    Missing(&'static str),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::NoSvm => write!(f, "SVM not available: CPUID reports no SVM on this CPU"),
            Unavailable::DisabledByFirmware => {
                write!(f, "SVM not available: disabled by firmware (VM_CR.SVMDIS)")
            }
            Unavailable::Missing(what) => write!(f, "SVM not usable: the CPU lacks {what}"),
        }
    }
}

/// What an SVM operation failed for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmError {
    /// SVM itself cannot be used.
    Unavailable(Unavailable),
    /// No host frame for an SVM structure.
    OutOfFrames,
    /// The CPU asked about has not been started.
    NotStarted,
    /// A vCPU was used on a CPU other than the one it was made on.
    WrongCpu,
}

impl fmt::Display for SvmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SvmError::Unavailable(reason) => write!(f, "{reason}"),
            SvmError::OutOfFrames => write!(f, "no host frame for an SVM structure"),
            SvmError::NotStarted => write!(f, "the CPU has not been started"),
            SvmError::WrongCpu => write!(f, "the VMCB belongs to another CPU"),
        }
    }
}

/// What the CPU's SVM offers (CPUID 8000_000Ah).
#[derive(Clone, Copy, Debug)]
pub struct SvmCaps {
    /// SVM revision.
    pub revision: u8,
    /// Number of ASIDs.
    pub asids: u32,
    /// CPUID 8000_000Ah EDX.
    features: u32,
}

impl SvmCaps {
    /// Reads the capabilities and checks what this hypervisor needs: SVM, not disabled by
    /// firmware, nested paging.
    pub fn probe() -> Result<SvmCaps, Unavailable> {
        let cpuid = |leaf: u32| x86::cpuid::cpuid!(leaf);
        if cpuid(0x8000_0000).eax < 0x8000_000A || cpuid(0x8000_0001).ecx & CPUID_SVM == 0 {
            return Err(Unavailable::NoSvm);
        }
        // SAFETY: VM_CR exists on every CPU with SVM (checked above).
        if unsafe { rdmsr(MSR_VM_CR) } & VM_CR_SVMDIS != 0 {
            return Err(Unavailable::DisabledByFirmware);
        }
        let leaf = cpuid(0x8000_000A);
        let caps = SvmCaps {
            revision: leaf.eax as u8,
            asids: leaf.ebx,
            features: leaf.edx,
        };
        if !caps.has(SVM_NESTED_PAGING) {
            return Err(Unavailable::Missing("nested paging"));
        }
        Ok(caps)
    }

    fn has(&self, feature: u32) -> bool {
        self.features & feature != 0
    }

    /// The CPU saves the next instruction's RIP at an instruction's exit (NRIP save).
    pub fn next_rip_save(&self) -> bool {
        self.has(SVM_NRIP_SAVE)
    }

    /// The guest may run RDTSCP (every CPU with SVM has it; the TSC_AUX it reads is swapped).
    pub fn rdtscp(&self) -> bool {
        true
    }

    /// The CPU offers a PAUSE filter.
    pub fn pause_loop_exiting(&self) -> bool {
        self.has(SVM_PAUSE_FILTER)
    }
}

impl fmt::Display for SvmCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |present: bool| if present { "yes" } else { "no" };
        write!(
            f,
            "SVM revision {}; {} ASIDs; nested paging yes; NRIP save {}; flush by ASID {}; \
             decode assists {}; PAUSE filter {}; vGIF {}; run timer: the local APIC's",
            self.revision,
            self.asids,
            yes(self.has(SVM_NRIP_SAVE)),
            yes(self.has(SVM_FLUSH_BY_ASID)),
            yes(self.has(SVM_DECODE_ASSISTS)),
            yes(self.has(SVM_PAUSE_FILTER)),
            yes(self.has(SVM_VGIF)),
        )
    }
}

/// Proof that SVM is enabled on this CPU, with what the CPU's vCPUs share: the area
/// VMSAVE/VMLOAD keep the host's segment and system-call state in around each run, and which
/// nested translations the CPU's TLB may hold.
pub struct SvmOn {
    caps: SvmCaps,
    /// The host's state beyond what VMRUN saves (FS, GS, TR, LDTR, KERNEL_GS_BASE, the
    /// SYSCALL and SYSENTER MSRs): VMSAVE before each entry, VMLOAD after each exit.
    host_area: HostPhysAddr,
    _host_save: HostPhysAddr,
    /// A flush was asked of this CPU (`flush_this_cpu`): the next entry flushes the whole TLB.
    flush_pending: AtomicBool,
    /// The nested root the last entry on this CPU ran: every vCPU uses ASID 1, so entering a
    /// VM other than the last one flushes first (its translations are tagged with ASID 1 too).
    last_root: AtomicU64,
}

impl SvmOn {
    /// The capabilities SVM was enabled with.
    pub fn caps(&self) -> &SvmCaps {
        &self.caps
    }

    /// Whether the entry about to run the VM whose nested root is `root` must flush the TLB
    /// first (a flush was asked, or the CPU last ran another VM); records `root` as the last.
    fn take_flush(&self, root: HostPhysAddr) -> bool {
        let other_vm = self.last_root.swap(root.as_u64(), Ordering::AcqRel) != root.as_u64();
        let asked = self.flush_pending.swap(false, Ordering::AcqRel);
        other_vm || asked
    }
}

/// Enables SVM on the calling CPU: EFER.SVME, a host save area for VMRUN and one for
/// VMSAVE/VMLOAD (and, on the first CPU, the permission maps every vCPU shares).
pub fn enable_this_cpu(phys: &'static PhysMap) -> Result<SvmOn, SvmError> {
    let caps = SvmCaps::probe().map_err(SvmError::Unavailable)?;
    let host_save = KernelFrames.allocate_frame().ok_or(SvmError::OutOfFrames)?;
    let Some(host_area) = KernelFrames.allocate_frame() else {
        KernelFrames.free_frame(host_save);
        return Err(SvmError::OutOfFrames);
    };
    let mut memory = phys;
    memory.zero_frame(host_save);
    memory.zero_frame(host_area);
    // SAFETY: SVM is present and not disabled (`probe`); setting EFER.SVME only makes the SVM
    // instructions available, and VM_HSAVE_PA gets a zeroed frame owned by SVM from now on
    // (never freed: SVM stays on for the kernel's lifetime).
    unsafe {
        wrmsr(MSR_EFER, rdmsr(MSR_EFER) | EFER_SVME);
        wrmsr(MSR_VM_HSAVE_PA, host_save.as_u64());
    }
    vcpu::permission_maps(phys).ok_or(SvmError::OutOfFrames)?;
    Ok(SvmOn {
        caps,
        host_area,
        _host_save: host_save,
        flush_pending: AtomicBool::new(true),
        last_root: AtomicU64::new(0),
    })
}

/// Drops the calling CPU's cached nested translations (those of the tables at `root`, or of
/// every VM): SVM has no instruction for it, so the CPU's next entry flushes its whole TLB
/// (TLB_CONTROL). Sound because nothing uses guest translations before that entry: the host
/// runs with ASID 0.
pub fn flush_this_cpu(on: &SvmOn, _root: Option<HostPhysAddr>) -> Result<(), SvmError> {
    on.flush_pending.store(true, Ordering::Release);
    Ok(())
}
