//! The VMCS region of one vCPU and safe field access to it. Fields are reached only through a
//! [`CurrentVmcs`], which only [`Vmcs::current`] hands out, after making the VMCS the current one
//! on this CPU if it was not: a VMREAD or VMWRITE can never land in another vCPU's VMCS. A
//! `Vmcs` belongs to the CPU it was made on; dropping it VMCLEARs it there (sending the work to
//! that CPU when it is dropped elsewhere) and gives its frame back.

use core::marker::PhantomData;
use core::sync::atomic::Ordering;

use pgm::frames::{HostFrameAllocator, HostMemory};
use pgm::HostPhysAddr;
use x86::bits64::vmx;
use x86::vmx::vmcs::ro;

use super::{VmxError, VmxOn};
use crate::arch::memory::KernelFrames;
use crate::arch::smp::{self, this_cpu};

/// A VMCS in a host frame, active on the CPU that made it.
pub struct Vmcs {
    frame: HostPhysAddr,
    /// The CPU the VMCS is active on (the only one that may VMPTRLD or VMCLEAR it).
    cpu: usize,
}

/// Proof that a VMCS is the current one: its fields are read and written through this.
pub struct CurrentVmcs<'a> {
    vmcs: PhantomData<&'a Vmcs>,
}

impl Vmcs {
    /// Allocates (from the kernel's frames), initialises (revision identifier, VMCLEAR) and
    /// makes current a new VMCS on the calling CPU. On error nothing is kept.
    pub fn new(vmx: &VmxOn, memory: &mut impl HostMemory) -> Result<Vmcs, VmxError> {
        let frame = KernelFrames.allocate_frame().ok_or(VmxError::OutOfFrames)?;
        memory.zero_frame(frame);
        memory.write(frame, &vmx.caps().revision.to_le_bytes());
        // From here on dropping `vmcs` gives the frame back.
        let vmcs = Vmcs {
            frame,
            cpu: this_cpu().index,
        };
        // SAFETY: VMX is on (`vmx`); `frame` is an aligned frame with the right revision id.
        if unsafe { vmx::vmclear(frame.as_u64()) }.is_err() {
            return Err(VmxError::Failed {
                instruction: "VMCLEAR",
                error: None,
            });
        }
        vmcs.current()?;
        Ok(vmcs)
    }

    /// The host CPU this VMCS is active on.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// This VMCS as the current one, made so (VMPTRLD) unless it already is. Fails on any CPU
    /// but its own.
    pub fn current(&self) -> Result<CurrentVmcs<'_>, VmxError> {
        let here = this_cpu();
        if here.index != self.cpu {
            return Err(VmxError::WrongCpu);
        }
        let current = &here.current_vmcs;
        if current.load(Ordering::Relaxed) != self.frame.as_u64() {
            // SAFETY: the frame holds a VMCS initialised by `new` and not yet released.
            unsafe { vmx::vmptrld(self.frame.as_u64()) }.map_err(|_| VmxError::Failed {
                instruction: "VMPTRLD",
                error: None,
            })?;
            current.store(self.frame.as_u64(), Ordering::Relaxed);
        }
        Ok(CurrentVmcs { vmcs: PhantomData })
    }
}

/// VMCLEARs the VMCS at `frame` on the calling CPU, which must be the one it is active on.
fn clear(frame: HostPhysAddr) {
    // SAFETY: the VMCS is not running (its vCPU loop has returned, since its owner is being
    // dropped) and is active on this CPU; VMCLEAR writes it back so the frame can be reused.
    let _ = unsafe { vmx::vmclear(frame.as_u64()) };
    // VMCLEAR of the current VMCS leaves none current.
    let _ = this_cpu()
        .current_vmcs
        .compare_exchange(frame.as_u64(), 0, Ordering::Relaxed, Ordering::Relaxed);
}

impl Drop for Vmcs {
    /// VMCLEARs the VMCS on its own CPU (the only one that may) and gives its frame back. If
    /// that CPU cannot take the work, the frame is kept rather than reused while possibly
    /// still active.
    fn drop(&mut self) {
        let frame = self.frame;
        if this_cpu().index == self.cpu {
            clear(frame);
        } else {
            match smp::spawn_on(self.cpu, move || clear(frame)) {
                Ok(task) => task.join(),
                Err(error) => {
                    log::error!("VMCS dropped away from CPU {}; frame kept: {error}", self.cpu);
                    return;
                }
            }
        }
        KernelFrames.free_frame(frame);
    }
}

impl CurrentVmcs<'_> {
    /// Writes `value` to `field`. Fails for a field the CPU does not support (the error names
    /// the field through the VM-instruction error).
    pub fn write(&self, field: u32, value: u64) -> Result<(), VmxError> {
        // SAFETY: this VMCS is current (a `CurrentVmcs` exists only then); VMWRITE only
        // changes the VMCS.
        unsafe { vmx::vmwrite(field, value) }.map_err(|_| VmxError::Failed {
            instruction: "VMWRITE",
            error: Some(self.read(ro::VM_INSTRUCTION_ERROR)),
        })
    }

    /// Reads `field` (0 when the field does not exist).
    pub fn read(&self, field: u32) -> u64 {
        let value: u64;
        let failed: u8;
        // SAFETY: this VMCS is current (as above); VMREAD has no side effect but on the
        // destination register and the flags. Written here rather than through `x86::vmread`,
        // which saves and tests all of RFLAGS: every exit reads a dozen fields, and SETBE (CF or
        // ZF: VMfailInvalid or VMfailValid) is the whole check.
        unsafe {
            core::arch::asm!(
                "vmread {value}, {field}",
                "setbe {failed}",
                field = in(reg) u64::from(field),
                value = lateout(reg) value,
                failed = lateout(reg_byte) failed,
                options(nostack),
            );
        }
        if failed == 0 {
            value
        } else {
            0
        }
    }
}
