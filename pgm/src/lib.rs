//! `pgm`: the guest-physical memory manager of a bare-metal VT-x hypervisor, after VirtualBox's
//! PGMPhys. Pure logic: no inline assembly and no global state. The host supplies frames
//! ([`frames::HostFrameAllocator`]) and access to host-physical memory ([`frames::HostMemory`]);
//! the manager keeps one descriptor per guest page and builds EPT tables from them.
//!
//! Public modules: [`addr`] typed addresses, [`page`] descriptors and the page-state machine,
//! [`frames`] host frames and the contracts of the host's implementations, [`guest_paging`] the
//! guest's own page tables, [`paging`] format-independent nested tables and the software
//! walker, [`handlers`] access handlers, [`handles`] ROM and MMIO2 handles, [`manager`] the
//! per-VM manager, and (feature `sim`) [`sim`], a simulated host. Internal: `ram` (RAM ranges),
//! `pool` (the handy-frame pool), `ept` (the Intel EPT encoding), `error` ([`PgmError`]).
#![no_std]
#![warn(missing_docs)]
// Pure logic: the only unsafe items are the two host traits' declarations (their contracts)
// and their `unsafe impl`s for pgm's own bitmap allocator and simulated memory, each allowed
// where it stands.
#![deny(unsafe_code)]

extern crate alloc;

pub mod addr;
pub mod ept;
pub mod error;
pub mod frames;
pub mod guest_paging;
pub mod handlers;
pub mod handles;
pub mod manager;
pub mod npt;
pub mod page;
pub mod paging;
pub(crate) mod pool;
pub(crate) mod ram;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub(crate) mod sync;

#[cfg(test)]
extern crate std;
// The tests below drop most `Invalidation`s: the simulated host has no TLB, and the tests that
// check flushing end their scenarios with a complete flush (`test_support`).
#[cfg(test)]
#[allow(unused_must_use)]
mod fidelity_tests;
#[cfg(test)]
#[allow(unused_must_use)]
mod isolation_tests;
#[cfg(all(test, loom))]
#[allow(unused_must_use)]
mod loom_model_tests;
#[cfg(test)]
#[allow(unused_must_use)]
mod model_tests;
#[cfg(test)]
#[allow(unused_must_use)]
mod smp_stress_tests;
#[cfg(test)]
mod test_support;

pub use addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
pub use ept::Ept;
pub use error::{
    AccessError, DirtyLogError, HandlerError, LockError, Mmio2Error, NoMemory, PageError, PgmError, RamError,
    RangeError, RomError,
};
pub use manager::{FaultOutcome, MemoryStats, Pgm, Resolution, TlbFlush};
pub use npt::Npt;
pub use paging::{Access, EntryFormat, Invalidation};
pub use ram::{PageLocation, RamRange, RamRanges};
