//! One virtual machine: the memory its vCPUs share ([`VmMemory`]: the memory manager `pgm`,
//! the EPT, the vCPU list, the rendezvous) and its vCPUs ([`Vcpu`]: a backend each (a VMCS on
//! VT-x, behind [`backend::VirtualCpu`]) and the loop that handles their exits). A guest can only stop its own VM: every exit the hypervisor cannot
//! handle ends the run with a [`Diagnostic`], never a host panic, and stops the VM's other
//! vCPUs too; no guest keeps the CPU longer than its time budget ([`budget`]); the host can
//! kick a running vCPU out ([`requests`]) or stop them all ([`VmMemory::with_vcpus_parked`]).
//!
//! Files: `backend.rs` the backend-neutral exit vocabulary and vCPU trait, `memory.rs` per-VM
//! state, `vcpu.rs` the per-vCPU state and run loop, `exits.rs` exit statistics, `stop.rs` how
//! runs end, `emulation.rs` the emulated accesses, `pml.rs` the dirty log's vCPU side, `snapshot.rs` the state a migration moves.

mod apic;
pub mod backend;
pub mod budget;
pub mod devices;
mod emulation;
pub mod exits;
pub mod load;
mod memory;
mod pml;
pub mod requests;
pub mod snapshot;
mod stop;
mod vcpu;

use core::fmt;

use pgm::manager::{AccessHandlers, HandlerAction};
use pgm::{Access, GuestPhysAddr, PgmError};

use crate::arch::virt;
use backend::BackendError;
#[cfg_attr(not(feature = "kernel-tests"), allow(unused_imports))]
pub use exits::{exit_costs_of_finished_vms, overrun_of_finished_vms};
#[cfg_attr(not(feature = "kernel-tests"), allow(unused_imports))]
pub use memory::{shootdown_costs, KernelPgm, VmMemory};
pub use requests::host_timer_fired;
#[cfg_attr(not(feature = "kernel-tests"), allow(unused_imports))]
pub use stop::{Diagnostic, StopCause, VmStop};
pub use vcpu::Vcpu;

/// Hypercall numbers (guest RAX at VMCALL).
pub mod hypercall {
    /// The guest is finished; RBX is its result. Ends the run with [`super::VmStop::Done`].
    pub const DONE: u64 = 0;
    /// Record RBX in [`super::Vcpu::reports`] and continue.
    pub const REPORT: u64 = 1;
    /// What RAX holds after an unknown hypercall.
    pub const UNKNOWN: u64 = u64::MAX;
    /// What RAX holds after any VMCALL on a machine without the test hypercalls: KVM's
    /// -KVM_ENOSYS.
    pub const NO_SUCH_HYPERCALL: u64 = (-1000i64) as u64;
}

/// Access handlers for a VM without devices: handler pages behave as pgm's default (MMIO reads
/// all ones and drops writes; handled RAM is plain memory).
pub struct NoDevices;

impl AccessHandlers for NoDevices {
    fn access(
        &mut self,
        _: pgm::handlers::HandlerId,
        _: GuestPhysAddr,
        _: Access,
        _: &mut [u8],
    ) -> HandlerAction {
        HandlerAction::Default
    }
}

/// Why a VM could not be created.
#[derive(Debug)]
pub enum VmError {
    /// The memory manager refused (bad range, no frames).
    Memory(PgmError),
    /// The virtualization backend could not make the vCPU (a VMX or SVM instruction failed, a
    /// control is unsupported).
    Virt(virt::Error),
    /// The backend failed a request for the new vCPU.
    Backend(BackendError),
    /// A device could not be placed on the VM's bus.
    Devices(::devices::bus::BusError),
    /// The VM has as many vCPUs as it can have (64).
    TooManyVcpus,
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Memory(error) => write!(f, "memory: {error}"),
            VmError::Virt(error) => write!(f, "{error}"),
            VmError::Backend(error) => write!(f, "{error}"),
            VmError::Devices(error) => write!(f, "devices: {error}"),
            VmError::TooManyVcpus => write!(f, "the VM has its 64 vCPUs already"),
        }
    }
}

/// Every pgm error converts, through pgm's umbrella [`PgmError`].
macro_rules! memory_errors {
    ($($error:ty),*) => {$(
        impl From<$error> for VmError {
            fn from(error: $error) -> Self {
                VmError::Memory(error.into())
            }
        }
    )*};
}

memory_errors!(
    PgmError,
    pgm::NoMemory,
    pgm::RamError,
    pgm::AccessError,
    pgm::HandlerError,
    pgm::RomError,
    pgm::Mmio2Error,
    pgm::LockError,
    pgm::DirtyLogError
);

impl From<BackendError> for VmError {
    fn from(error: BackendError) -> Self {
        VmError::Backend(error)
    }
}

impl From<virt::Error> for VmError {
    fn from(error: virt::Error) -> Self {
        VmError::Virt(error)
    }
}
