//! Kicking a running vCPU. Another context (a host timer interrupt now, another CPU in an SMP
//! host) posts requests to the vCPU's [`VcpuRequests`] and makes the CPU take an interrupt:
//! external-interrupt exiting turns it into a VM exit, the host handles the interrupt, and the
//! vCPU loop takes every posted request before its next VM entry.
//!
//! NMI exiting is on as well, so an NMI that arrives while a guest runs goes to the host's NMI
//! handler, never to the guest; kicks use a normal vector because the host has free ones.

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU32, Ordering};

use spin::Mutex;

use crate::arch::apic;

/// Work a vCPU is asked to do before it next enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request(u32);

impl Request {
    /// Return from the run with `VmStop::StopRequested` (resumable: the guest state is intact).
    pub const STOP: Request = Request(1 << 0);
    /// Flush the VM's EPT-derived translations (INVEPT single-context) before re-entry.
    pub const FLUSH: Request = Request(1 << 1);
    /// Another vCPU stopped the VM (a triple fault, an exit nobody handles): return with
    /// `StopCause::VmStopped`.
    pub const VM_STOPPED: Request = Request(1 << 2);

    /// True when `self` includes `other`.
    pub const fn contains(self, other: Request) -> bool {
        self.0 & other.0 == other.0
    }
}

/// The requests posted to one vCPU and not yet taken.
#[derive(Debug, Default)]
pub struct VcpuRequests(AtomicU32);

impl VcpuRequests {
    /// Posts `request`; it is taken before the vCPU's next VM entry.
    pub fn post(&self, request: Request) {
        self.0.fetch_or(request.0, Ordering::AcqRel);
    }

    /// Takes every posted request (`None` when there are none).
    pub fn take(&self) -> Option<Request> {
        let bits = self.0.swap(0, Ordering::AcqRel);
        (bits != 0).then_some(Request(bits))
    }
}

/// What the host timer posts, and to whom, when it fires.
static TIMER_KICK: Mutex<Option<(Arc<VcpuRequests>, Request)>> = Mutex::new(None);

/// Arms the host's one-shot timer to post `request` to `target` after `ticks` TSC ticks and
/// so kick the vCPU out of the guest if it is running. `false` when the host has no usable
/// local APIC timer (nothing is armed).
pub fn kick_on_timer(target: &Arc<VcpuRequests>, request: Request, ticks: u64) -> bool {
    if !apic::available() {
        return false;
    }
    *TIMER_KICK.lock() = Some((Arc::clone(target), request));
    apic::arm_kick(ticks)
}

/// Called by the host timer's interrupt handler: posts the armed request once, when the kick
/// is due (the interrupt may be a run timer's).
pub fn host_timer_fired() {
    if !apic::kick_due() {
        return;
    }
    // The handler runs only where the host opened an interrupt window, never while this lock
    // is held; `try_lock` keeps even a mistaken window from deadlocking.
    if let Some(mut kick) = TIMER_KICK.try_lock() {
        if let Some((target, request)) = kick.take() {
            target.post(request);
        }
    }
}
