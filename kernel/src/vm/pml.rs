//! Page-modification logging (SDM Vol. 3C, 29.3.6): while the VM's write monitoring runs in
//! PML mode (`VmMemory::start_dirty_log`), each vCPU enables PML and the EPT's accessed and
//! dirty flags at its next entry. The CPU then writes the guest-physical address of every
//! write that sets a leaf's dirty flag into the vCPU's 512-entry buffer, from index 511 down;
//! when it would log past entry 0 it exits instead (PML full). The buffer goes to pgm's
//! `log_written` at that exit, at the end of every run, and before logging stops, so the host
//! has every address once a vCPU it drives is out of its run.

use alloc::vec::Vec;

use pgm::frames::{HostFrameAllocator, HostMemory};
use pgm::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use x86::vmx::vmcs::control::{
    SecondaryControls, EPTP_FULL, PML_ADDR_FULL, SECONDARY_PROCBASED_EXEC_CONTROLS,
};
use x86::vmx::vmcs::guest;

use super::exits::{ExitKind, PML_ENTRIES};
use super::stop::{StopCause, VmStop};
use super::Vm;
use crate::arch::memory::KernelFrames;
use crate::arch::vmx::VmxError;

/// The index the CPU logs the next address at: the buffer's last entry.
const FIRST_INDEX: u64 = PML_ENTRIES as u64 - 1;
/// EPT pointer bit 6: the CPU sets accessed and dirty flags in EPT entries.
const EPTP_ACCESSED_DIRTY: u64 = 1 << 6;

impl Vm<'_> {
    /// True when this vCPU's CPU can log written addresses (PML with EPT accessed and dirty
    /// flags), as `VmMemory::start_dirty_log` in PML mode needs.
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn pml_supported(&self) -> bool {
        self.pml_buffer.is_some()
    }

    /// Gives the vCPU its log buffer and points the VMCS at it, when the CPU supports PML
    /// (logging itself is enabled only while the VM's monitoring asks for it).
    pub(super) fn set_up_pml(&mut self) -> Result<(), VmxError> {
        if !self.vmx.caps().pml() {
            return Ok(());
        }
        let frame = KernelFrames.allocate_frame().ok_or(VmxError::OutOfFrames)?;
        let mut phys = self.phys;
        phys.zero_frame(frame);
        self.pml_buffer = Some(frame);
        let vmcs = self.vmcs.current()?;
        vmcs.write(PML_ADDR_FULL, frame.as_u64())?;
        vmcs.write(guest::PML_INDEX, FIRST_INDEX)
    }

    /// Before an entry: turns logging on or off as the VM's monitoring now asks (secondary
    /// controls and the EPT pointer's accessed/dirty bit), draining the buffer when it goes
    /// off. `Some` stops the run: logging was asked of a CPU without PML.
    /// Inline, so that the usual case (no change) costs a load and a compare on every exit,
    /// not a call.
    #[inline]
    pub(super) fn follow_pml_mode(&mut self) -> Option<VmStop> {
        let wanted = self.memory.pml_logging();
        if wanted == self.pml_on {
            return None;
        }
        self.switch_pml_mode(wanted)
    }

    /// [`follow_pml_mode`](Self::follow_pml_mode) when the mode changes.
    #[inline(never)]
    fn switch_pml_mode(&mut self, wanted: bool) -> Option<VmStop> {
        if wanted && self.pml_buffer.is_none() {
            return Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit, 0)));
        }
        if !wanted && self.drain_pml().is_err() {
            return Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit, 0)));
        }
        match self.write_pml_controls(wanted) {
            Ok(()) => {
                self.pml_on = wanted;
                None
            }
            Err(_) => Some(VmStop::Stopped(self.diagnostic(StopCause::EntryFailed, 0))),
        }
    }

    fn write_pml_controls(&self, on: bool) -> Result<(), VmxError> {
        let vmcs = self.vmcs.current()?;
        let (pml, accessed_dirty) = if on {
            (SecondaryControls::ENABLE_PML.bits().into(), EPTP_ACCESSED_DIRTY)
        } else {
            (0, 0)
        };
        vmcs.write(SECONDARY_PROCBASED_EXEC_CONTROLS, self.secondary_controls | pml)?;
        vmcs.write(EPTP_FULL, self.memory.eptp() | accessed_dirty)?;
        vmcs.write(guest::PML_INDEX, FIRST_INDEX)
    }

    /// Hands the addresses the CPU logged since the last drain to pgm and empties the buffer.
    /// Returns how many pages were newly marked written. Locking: takes the VM's lock when
    /// there is something to hand over.
    pub fn drain_pml(&mut self) -> Result<usize, VmxError> {
        let (Some(buffer), true) = (self.pml_buffer, self.pml_on) else {
            return Ok(0);
        };
        let vmcs = self.vmcs.current()?;
        let index = vmcs.read(guest::PML_INDEX) & 0xFFFF;
        // Entries above the index are filled; an index past 511 (it wrapped below 0) means all.
        let first = if index > FIRST_INDEX { 0 } else { index + 1 };
        if first > FIRST_INDEX {
            return Ok(0);
        }
        let logged: Vec<GuestPhysAddr> = (first..PML_ENTRIES as u64)
            .map(|entry| {
                let at = HostPhysAddr::new_truncate(buffer.as_u64() + entry * 8);
                GuestPhysAddr::new_truncate(self.phys.read_u64(at) & !(PAGE_SIZE - 1))
            })
            .collect();
        vmcs.write(guest::PML_INDEX, FIRST_INDEX)?;
        Ok(self.memory.lock().log_written(&logged))
    }

    /// The PML-full exit: drains the buffer; the guest retries the write that found it full.
    pub(super) fn handle_pml_full(&mut self, exit_tick: u64) -> Option<VmStop> {
        self.exits.pml_full += 1;
        self.measuring = Some((ExitKind::PmlFull, exit_tick));
        match self.drain_pml() {
            Ok(_) => None,
            Err(_) => Some(VmStop::Stopped(
                self.diagnostic(StopCause::UnhandledExit, super::exits::exit_reason::PML_FULL),
            )),
        }
    }

    /// Gives the log buffer back (the VMCS that named it is gone).
    pub(super) fn release_pml(&mut self) {
        if let Some(frame) = self.pml_buffer.take() {
            KernelFrames.free_frame(frame);
        }
    }
}
