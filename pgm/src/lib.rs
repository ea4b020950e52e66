//! `pgm`: the guest-physical memory manager of a bare-metal VT-x hypervisor, after VirtualBox's
//! PGMPhys. Pure logic: no inline assembly and no global state. The host supplies frames
//! ([`frames::HostFrameAllocator`]) and access to host-physical memory ([`frames::HostMemory`]);
//! the manager keeps one descriptor per guest page and builds EPT tables from them.
//!
//! Modules: [`addr`] typed addresses, [`page`] descriptors and the page-state machine, [`ram`]
//! RAM ranges, [`frames`] host frames, [`guest_paging`] the guest's own page tables, [`paging`] format-independent nested tables and the
//! software walker, [`ept`] the Intel EPT encoding, [`manager`] the per-VM manager.
#![no_std]
#![warn(missing_docs)]

extern crate alloc;

pub mod addr;
pub mod ept;
pub mod error;
pub mod frames;
pub mod guest_paging;
pub mod handlers;
pub mod manager;
pub mod page;
pub mod paging;
pub mod pool;
pub mod ram;
#[cfg(any(test, feature = "sim"))]
pub mod sim;

#[cfg(test)]
extern crate std;
#[cfg(test)]
mod isolation_tests;
#[cfg(test)]
mod manager_tests;
#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod test_support;

pub use addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
pub use error::PgmError;
pub use manager::{FaultOutcome, MemoryStats, Pgm, Resolution};
pub use paging::{Access, Invalidation};
