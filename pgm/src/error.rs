//! The errors of the manager's API. Every error leaves the manager's state unchanged.

use core::fmt;

use crate::addr::GuestPhysAddr;
use crate::handles::{DeviceId, Mmio2Handle, RomId};

/// Why a request to the memory manager was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgmError {
    /// An address or size that must be page-aligned is not.
    Misaligned,
    /// A range of zero bytes was given.
    ZeroSize,
    /// The range does not fit in the guest-physical address width.
    BeyondAddressWidth,
    /// The range overlaps an already registered range.
    Overlap {
        /// Base of the existing range that overlaps.
        existing: GuestPhysAddr,
    },
    /// The address lies in no registered range.
    NotGuestMemory(GuestPhysAddr),
    /// The host frame allocator has no free frame.
    OutOfFrames,
    /// The VM holds as many private frames as its limit allows.
    FrameLimit,
    /// The page's state does not allow the operation (e.g. writing a ballooned page).
    PageState {
        /// The page.
        gpa: GuestPhysAddr,
        /// Its state.
        state: crate::page::PageState,
    },
    /// The page is not RAM (e.g. MMIO) and the operation needs RAM.
    NotRam(GuestPhysAddr),
    /// No handler or MMIO region has this handle.
    UnknownHandler(crate::handlers::HandlerId),
    /// The range overlaps the pages of an existing handler.
    HandlerOverlap {
        /// The handler already covering part of the range.
        existing: crate::handlers::HandlerId,
    },
    /// The page is covered by an access handler, which the operation does not allow.
    HandlerPresent(GuestPhysAddr),
    /// The page is not covered by the handler named.
    NotHandled(GuestPhysAddr),
    /// No ROM has this handle.
    UnknownRom(RomId),
    /// The ROM has no shadow, so only its default protection applies.
    RomNotShadowed(RomId),
    /// No MMIO2 region has this handle.
    UnknownMmio2(Mmio2Handle),
    /// The MMIO2 region is mapped, and the operation needs it unmapped (or the reverse).
    Mmio2Mapped(bool),
    /// An offset or size beyond the object it applies to.
    OutOfRange,
    /// A map lock pins the page's frame, which the operation would free or replace.
    PageLocked(GuestPhysAddr),
    /// The host heap could not hold the bookkeeping (page descriptors) for the request.
    OutOfHeap,
    /// The device already has an MMIO2 region with this region number (VERR_ALREADY_EXISTS).
    Mmio2RegionExists {
        /// The device.
        device: DeviceId,
        /// The region number.
        region_no: u32,
    },
    /// The VM has [`MMIO2_MAX_REGIONS`](crate::manager::MMIO2_MAX_REGIONS) MMIO2 regions already.
    TooManyMmio2Regions,
    /// The region would be larger than
    /// [`MMIO2_MAX_PAGES`](crate::manager::MMIO2_MAX_PAGES) pages.
    Mmio2TooLarge,
    /// The MMIO2 region was created without dirty-page tracking (VERR_INVALID_FUNCTION).
    Mmio2NotTrackable(Mmio2Handle),
    /// The ROM image is larger than the ROM's range.
    RomImageTooLarge,
    /// Write monitoring is on: the change must wait until it stops.
    MonitoringActive,
    /// The nested-paging format has no CPU write log (AMD NPT): write monitoring can only
    /// write-protect.
    NoCpuWriteLog,
}

impl fmt::Display for PgmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PgmError::Misaligned => write!(f, "address or size is not page-aligned"),
            PgmError::ZeroSize => write!(f, "range has zero size"),
            PgmError::BeyondAddressWidth => write!(f, "range exceeds the guest-physical width"),
            PgmError::Overlap { existing } => write!(f, "range overlaps the range at {existing}"),
            PgmError::NotGuestMemory(gpa) => write!(f, "{gpa} is not guest memory"),
            PgmError::OutOfFrames => write!(f, "no free host frame"),
            PgmError::FrameLimit => write!(f, "the VM's frame limit is reached"),
            PgmError::PageState { gpa, state } => write!(f, "page {gpa} is {state:?}"),
            PgmError::NotRam(gpa) => write!(f, "{gpa} is not RAM"),
            PgmError::UnknownHandler(id) => write!(f, "no handler {id:?}"),
            PgmError::HandlerOverlap { existing } => write!(f, "range overlaps handler {existing:?}"),
            PgmError::HandlerPresent(gpa) => write!(f, "{gpa} is covered by an access handler"),
            PgmError::NotHandled(gpa) => write!(f, "{gpa} is not covered by that handler"),
            PgmError::UnknownRom(id) => write!(f, "no ROM {id:?}"),
            PgmError::RomNotShadowed(id) => write!(f, "ROM {id:?} has no shadow"),
            PgmError::UnknownMmio2(handle) => write!(f, "no MMIO2 region {handle:?}"),
            PgmError::Mmio2Mapped(true) => write!(f, "the MMIO2 region is mapped"),
            PgmError::Mmio2Mapped(false) => write!(f, "the MMIO2 region is not mapped"),
            PgmError::OutOfRange => write!(f, "offset or size out of range"),
            PgmError::PageLocked(gpa) => write!(f, "page {gpa} is locked by a mapping"),
            PgmError::OutOfHeap => write!(f, "the host heap is exhausted"),
            PgmError::Mmio2RegionExists { device, region_no } => {
                write!(f, "device {device:?} already has MMIO2 region {region_no}")
            }
            PgmError::TooManyMmio2Regions => write!(f, "the VM has the most MMIO2 regions it may have"),
            PgmError::Mmio2TooLarge => write!(f, "the MMIO2 region is larger than allowed"),
            PgmError::Mmio2NotTrackable(handle) => {
                write!(
                    f,
                    "MMIO2 region {handle:?} was created without dirty-page tracking"
                )
            }
            PgmError::RomImageTooLarge => write!(f, "the ROM image is larger than its range"),
            PgmError::MonitoringActive => write!(f, "write monitoring is on"),
            PgmError::NoCpuWriteLog => {
                write!(
                    f,
                    "this nested-paging format has no CPU write log: use write-protect mode"
                )
            }
        }
    }
}
