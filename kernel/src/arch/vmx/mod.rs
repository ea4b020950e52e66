//! VT-x: capability checks, VMX operation (VMXON), the VMCS, guest entry/exit and INVEPT.
//! Everything here is the thin unsafe layer; VM policy lives in `crate::vm`.

pub mod caps;
mod entry;
pub mod exits;
pub mod host;
mod vcpu;
pub mod vmcs;

use core::fmt;

use pgm::frames::{HostFrameAllocator, HostMemory};
use pgm::HostPhysAddr;
use x86::msr::{rdmsr, wrmsr, IA32_FEATURE_CONTROL};
use x86_64::registers::control::{Cr0, Cr4};

pub use caps::{Unavailable, VmxCaps};
pub use entry::{run_guest, GuestRegisters};
pub use vcpu::VmxVcpu;

/// The backend's name for messages.
pub const NAME: &str = "VMX";

/// The backend contract's names (see `arch::virt`).
pub type On = VmxOn;
/// See [`On`].
pub type Error = VmxError;
/// See [`On`].
pub type Vcpu<'a> = VmxVcpu<'a>;
/// See [`On`].
pub type Format = pgm::Ept;
/// An EPT violation drops the faulting CPU's translations of the address (SDM 29.4.3.1), so
/// a fault's resolution flushes only the other CPUs (pgm's `Invalidation::OtherCpus`).
pub const FAULT_FLUSHES_FAULTING_CPU: bool = true;

/// Probes VT-x and enters VMX root operation on the calling CPU (see [`enable`]).
pub fn enable_this_cpu(phys: &'static crate::arch::memory::PhysMap) -> Result<VmxOn, VmxError> {
    VmxCaps::probe()
        .map_err(VmxError::Unavailable)
        .and_then(|caps| enable(caps, &mut crate::arch::memory::KernelFrames, &mut { phys }))
}

/// Drops the calling CPU's cached nested translations: those of the tables rooted at `root`
/// (INVEPT single-context), or of every VM when `root` is `None` (all-context).
pub fn flush_this_cpu(vmx: &VmxOn, root: Option<HostPhysAddr>) -> Result<(), VmxError> {
    match root {
        Some(root) => invept(vmx, InveptType::SingleContext, pgm::ept::pointer(root, false)),
        None => invept(vmx, InveptType::AllContexts, 0),
    }
}

/// IA32_FEATURE_CONTROL: lock bit and "VMX outside SMX" enable bit.
const FEATURE_CONTROL_LOCKED: u64 = 1 << 0;
const FEATURE_CONTROL_VMX_OUTSIDE_SMX: u64 = 1 << 2;
/// CR4.VMXE.
const CR4_VMXE: u64 = 1 << 13;

/// A VMX instruction that failed, with the VM-instruction error number when the CPU gave one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// VMX itself cannot be used.
    Unavailable(Unavailable),
    /// No host frame for a VMX structure.
    OutOfFrames,
    /// The CPU asked about has not been started.
    NotStarted,
    /// A VMCS was used on a CPU other than the one it is active on.
    WrongCpu,
    /// The CPU cannot set VMX control bits `missing` of the `which` controls that a vCPU needs.
    Control {
        /// Which controls: pin-based, primary or secondary processor-based, VM-exit, VM-entry.
        which: &'static str,
        /// The bits the CPU does not allow.
        missing: u32,
    },
    /// `instruction` failed (VMfailInvalid when `error` is `None`).
    Failed {
        /// The instruction's mnemonic.
        instruction: &'static str,
        /// The VM-instruction error field (SDM 31.4), for VMfailValid.
        error: Option<u64>,
    },
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmxError::Unavailable(reason) => write!(f, "{reason}"),
            VmxError::OutOfFrames => write!(f, "no host frame for a VMX structure"),
            VmxError::NotStarted => write!(f, "the CPU has not been started"),
            VmxError::WrongCpu => write!(f, "the VMCS is active on another CPU"),
            VmxError::Control { which, missing } => {
                write!(f, "the CPU cannot set {which} control bits {missing:#x}")
            }
            VmxError::Failed {
                instruction,
                error: Some(error),
            } => {
                write!(f, "{instruction} failed with VM-instruction error {error}")
            }
            VmxError::Failed {
                instruction,
                error: None,
            } => {
                write!(f, "{instruction} failed (VMfailInvalid)")
            }
        }
    }
}

/// Proof that this CPU is in VMX root operation; VMCS work needs a reference to it.
pub struct VmxOn {
    caps: VmxCaps,
    _vmxon_region: HostPhysAddr,
}

impl VmxOn {
    /// The capabilities VMX was enabled with.
    pub fn caps(&self) -> &VmxCaps {
        &self.caps
    }
}

/// Enters VMX root operation: enables VMX in IA32_FEATURE_CONTROL if firmware left it unlocked,
/// applies the CR0/CR4 fixed bits, sets CR4.VMXE and executes VMXON on a fresh region.
pub fn enable(
    caps: VmxCaps,
    frames: &mut impl HostFrameAllocator,
    memory: &mut impl HostMemory,
) -> Result<VmxOn, VmxError> {
    // SAFETY: IA32_FEATURE_CONTROL exists on every CPU with VMX (checked by `caps`).
    let control = unsafe { rdmsr(IA32_FEATURE_CONTROL) };
    if control & FEATURE_CONTROL_LOCKED == 0 {
        // SAFETY: the MSR is unlocked, so setting the enable and lock bits is allowed.
        unsafe {
            wrmsr(
                IA32_FEATURE_CONTROL,
                control | FEATURE_CONTROL_VMX_OUTSIDE_SMX | FEATURE_CONTROL_LOCKED,
            )
        };
    } else if control & FEATURE_CONTROL_VMX_OUTSIDE_SMX == 0 {
        return Err(VmxError::Unavailable(Unavailable::DisabledByFirmware));
    }
    let region = frames.allocate_frame().ok_or(VmxError::OutOfFrames)?;
    memory.zero_frame(region);
    memory.write(region, &caps.revision.to_le_bytes());
    // SAFETY: the fixed bits come from the CPU's own VMX MSRs; setting the required CR0 bits
    // (PE, NE, PG are already set in long mode) and CR4.VMXE does not change how the kernel runs.
    unsafe {
        Cr0::write_raw((Cr0::read_raw() | caps.cr0_fixed.0) & caps.cr0_fixed.1);
        Cr4::write_raw((Cr4::read_raw() | caps.cr4_fixed.0 | CR4_VMXE) & caps.cr4_fixed.1);
    }
    // SAFETY: `region` is a zeroed, 4 KiB-aligned frame holding the VMCS revision identifier,
    // owned by VMX from now on (never freed: VMX stays on for the kernel's lifetime).
    unsafe { x86::bits64::vmx::vmxon(region.as_u64()) }.map_err(|_| VmxError::Failed {
        instruction: "VMXON",
        error: None,
    })?;
    Ok(VmxOn {
        caps,
        _vmxon_region: region,
    })
}

/// INVEPT types (SDM 31.3, INVEPT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InveptType {
    /// Mappings tagged with one EPT pointer.
    SingleContext = 1,
    /// Mappings of every EPT pointer.
    AllContexts = 2,
}

/// Flushes EPT-derived translations for `eptp` (single-context) or for all contexts.
pub fn invept(_vmx: &VmxOn, kind: InveptType, eptp: u64) -> Result<(), VmxError> {
    let descriptor: [u64; 2] = [eptp, 0];
    let failed: u8;
    // SAFETY: in VMX root operation (proved by `_vmx`); the descriptor is a valid 128-bit
    // memory operand and the type is one the capability check found supported.
    unsafe {
        core::arch::asm!(
            "invept {kind}, [{descriptor}]",
            "setna {failed}",
            kind = in(reg) kind as u64,
            descriptor = in(reg) &descriptor,
            failed = out(reg_byte) failed,
            options(nostack),
        );
    }
    if failed != 0 {
        return Err(VmxError::Failed {
            instruction: "INVEPT",
            error: None,
        });
    }
    Ok(())
}
