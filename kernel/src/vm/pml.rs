//! The dirty log's vCPU side: while the VM's write monitoring runs in PML mode
//! (`VmMemory::start_dirty_log`), each vCPU turns on its backend's write logging (VT-x:
//! page-modification logging with the EPT's accessed and dirty flags) at its next entry. The
//! CPU records the guest-physical address of every write that dirties a page; when its log is
//! full it exits ([`VmExit::DirtyLogFull`](super::backend::VmExit)). The log goes to pgm's
//! `log_written` at that exit, at the end of every run, and before logging stops, so the host
//! has every address once a vCPU it drives is out of its run.

use alloc::vec::Vec;

use super::backend::{BackendError, VirtualCpu};
use super::exits::{ExitKind, PML_ENTRIES};
use super::stop::{StopCause, VmStop};
use super::Vcpu;

impl Vcpu<'_> {
    /// True when this vCPU's CPU can log written addresses, as `VmMemory::start_dirty_log` in
    /// PML mode needs.
    pub fn pml_supported(&self) -> bool {
        self.cpu.dirty_log_supported()
    }

    /// Before an entry: turns logging on or off as the VM's monitoring now asks, draining the
    /// log when it goes off. `Some` stops the run: logging was asked of a CPU without it.
    /// Inline, so that the usual case (no change) costs a load and a compare on every exit,
    /// not a call.
    #[inline]
    pub(super) fn follow_dirty_log_mode(&mut self) -> Option<VmStop> {
        let wanted = self.memory.pml_logging();
        if wanted == self.dirty_logging {
            return None;
        }
        self.switch_dirty_log_mode(wanted)
    }

    /// [`follow_dirty_log_mode`](Self::follow_dirty_log_mode) when the mode changes.
    #[inline(never)]
    fn switch_dirty_log_mode(&mut self, wanted: bool) -> Option<VmStop> {
        if wanted && !self.cpu.dirty_log_supported() {
            return Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit)));
        }
        if !wanted && self.drain_dirty_log().is_err() {
            return Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit)));
        }
        match self.cpu.set_dirty_logging(wanted) {
            Ok(()) => {
                self.dirty_logging = wanted;
                None
            }
            Err(_) => Some(VmStop::Stopped(self.diagnostic(StopCause::EntryFailed))),
        }
    }

    /// Hands the addresses the CPU logged since the last drain to pgm and empties the log.
    /// Returns how many pages were newly marked written. Locking: takes the VM's lock when
    /// there is something to hand over.
    pub fn drain_dirty_log(&mut self) -> Result<usize, BackendError> {
        if !self.dirty_logging {
            return Ok(0);
        }
        let mut logged = Vec::with_capacity(PML_ENTRIES);
        self.cpu.drain_dirty_log(&mut logged)?;
        if logged.is_empty() {
            return Ok(0);
        }
        Ok(self.memory.lock().log_written(&logged))
    }

    /// The log-full exit: drains the log; the guest retries the write that found it full.
    pub(super) fn handle_dirty_log_full(&mut self, exit_tick: u64) -> Option<VmStop> {
        self.exits.pml_full += 1;
        self.measuring = Some((ExitKind::PmlFull, exit_tick));
        match self.drain_dirty_log() {
            Ok(_) => None,
            Err(_) => Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit))),
        }
    }
}
