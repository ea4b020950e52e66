//! `pgm`: the guest-physical memory manager of a bare-metal hypervisor, after VirtualBox's
//! PGMPhys, building Intel EPT or AMD NPT tables from one descriptor per guest page. Pure
//! logic: no inline assembly and no global state. The host supplies frames
//! ([`frames::HostFrameAllocator`]) and access to host-physical memory
//! ([`frames::HostMemory`]); [`Pgm`] does the rest: RAM, MMIO, MMIO2, ROM with shadows,
//! access handlers, the balloon, write monitoring, page-map locks, sharing and the A20 gate.
//!
//! A VM's memory on the simulated host (feature `sim`), with RAM and one MMIO device:
//!
//! ```
//! # #[cfg(feature = "sim")] {
//! use pgm::handlers::HandlerId;
//! use pgm::manager::{AccessHandlers, HandlerAction};
//! use pgm::sim::{FlatMemory, SimFrames};
//! use pgm::{Access, FaultOutcome, GuestPhysAddr, Pgm};
//!
//! /// A device whose registers all read 0x1234_5678.
//! struct Device;
//! impl AccessHandlers for Device {
//!     fn access(&mut self, _: HandlerId, _: GuestPhysAddr, access: Access, data: &mut [u8]) -> HandlerAction {
//!         if access == Access::Read {
//!             data.copy_from_slice(&0x1234_5678u32.to_le_bytes()[..data.len()]);
//!         }
//!         HandlerAction::Handled
//!     }
//! }
//!
//! let gpa = |at| GuestPhysAddr::new(at).unwrap();
//! let mut pgm: Pgm<_, _> = Pgm::new(SimFrames::new(1024), FlatMemory::new(1024)).unwrap();
//! pgm.register_ram(gpa(0), 16 << 20, "ram").unwrap();
//! let (device, _) = pgm.register_mmio(gpa(0xFEC0_0000), 0x1000).unwrap();
//! // The guest's first write to a page faults: the page gets a frame, the guest retries.
//! let fault = pgm.resolve_fault(gpa(0x5000), Access::Write);
//! assert!(matches!(fault, FaultOutcome::Resolved { .. }));
//! // A read of the device faults to its handler: the VMM emulates it through the device.
//! let fault = pgm.resolve_fault(gpa(0xFEC0_0010), Access::Read);
//! assert_eq!(fault, FaultOutcome::Handler { handler: device });
//! assert_eq!(pgm.read_phys_u32(gpa(0xFEC0_0010), &mut Device), Ok(0x1234_5678));
//! # }
//! ```
//!
//! Where to look: [`Pgm`] lists its facets (RAM, MMIO and MMIO2, ROM, handlers, locks,
//! monitoring, reset, statistics) with the seed's names; [`error`] has one error type per
//! family of operations; [`addr`] typed addresses; [`page`] the descriptors; [`paging`] the
//! format-independent entries and the software walker; [`guest_paging`] the guest's own page
//! tables; [`Ept`] and [`Npt`] the two formats; `examples/host_vmm.rs` a VMM loop on the
//! simulated host. Locking rules are in [`manager`].
#![no_std]
#![warn(missing_docs)]
#![deny(missing_debug_implementations)]
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
pub use ram::{RamRange, RamRanges};
