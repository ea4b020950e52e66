//! The VMCS region of one vCPU and safe field access to it.

use pgm::frames::{HostFrameAllocator, HostMemory};
use pgm::HostPhysAddr;
use x86::bits64::vmx;
use x86::vmx::vmcs::ro;

use super::{VmxError, VmxOn};

/// A VMCS in a host frame. Fields are read and written while it is the current VMCS, which
/// [`Vmcs::make_current`] ensures.
pub struct Vmcs {
    frame: HostPhysAddr,
}

impl Vmcs {
    /// Allocates, initialises (revision identifier, VMCLEAR) and makes current a new VMCS.
    pub fn new(
        vmx: &VmxOn,
        frames: &mut impl HostFrameAllocator,
        memory: &mut impl HostMemory,
    ) -> Result<Vmcs, VmxError> {
        let frame = frames.allocate_frame().ok_or(VmxError::OutOfFrames)?;
        memory.zero_frame(frame);
        memory.write(frame, &vmx.caps().revision.to_le_bytes());
        let vmcs = Vmcs { frame };
        // SAFETY: VMX is on (`vmx`); `frame` is an aligned frame with the right revision id.
        if unsafe { vmx::vmclear(frame.as_u64()) }.is_err() {
            frames.free_frame(frame);
            return Err(VmxError::Failed {
                instruction: "VMCLEAR",
                error: None,
            });
        }
        if let Err(error) = vmcs.make_current() {
            frames.free_frame(frame);
            return Err(error);
        }
        Ok(vmcs)
    }

    /// Makes this VMCS the current one (VMPTRLD).
    pub fn make_current(&self) -> Result<(), VmxError> {
        // SAFETY: the frame holds a VMCS initialised by `new` and not yet released.
        unsafe { vmx::vmptrld(self.frame.as_u64()) }.map_err(|_| VmxError::Failed {
            instruction: "VMPTRLD",
            error: None,
        })
    }

    /// Writes `value` to `field`. Fails for a field the CPU does not support (the error names
    /// the field through the VM-instruction error).
    pub fn write(&self, field: u32, value: u64) -> Result<(), VmxError> {
        // SAFETY: this VMCS is current (made so in `new`/`make_current`); VMWRITE only changes
        // the VMCS.
        unsafe { vmx::vmwrite(field, value) }.map_err(|_| VmxError::Failed {
            instruction: "VMWRITE",
            error: Some(self.read(ro::VM_INSTRUCTION_ERROR)),
        })
    }

    /// Reads `field` (0 when the field does not exist).
    pub fn read(&self, field: u32) -> u64 {
        // SAFETY: this VMCS is current; VMREAD has no side effect.
        unsafe { vmx::vmread(field) }.unwrap_or(0)
    }

    /// VMCLEARs the VMCS and gives its frame back.
    pub fn release(self, frames: &mut impl HostFrameAllocator) {
        // SAFETY: the VMCS is not running (its vCPU loop has returned); VMCLEAR flushes it
        // so the frame can be reused.
        let _ = unsafe { vmx::vmclear(self.frame.as_u64()) };
        frames.free_frame(self.frame);
    }
}
