//! The errors of the manager's API, one type per family of operations ([`RamError`],
//! [`AccessError`], [`HandlerError`], [`RomError`], [`Mmio2Error`], [`LockError`],
//! [`DirtyLogError`]), built from three causes they share: a request's geometry
//! ([`RangeError`]), a page that does not allow the operation ([`PageError`]) and a shortage of
//! host memory ([`NoMemory`]). [`PgmError`] holds any of them, for a VMM that keeps one error
//! type. Every error leaves the manager's state unchanged unless its operation's doc says
//! otherwise, and names the address or handle it is about where there is one.

use core::fmt;

use crate::addr::GuestPhysAddr;
use crate::handlers::HandlerId;
use crate::handles::{DeviceId, Mmio2Handle, RomId};
use crate::page::PageState;

/// What is wrong with the guest-physical range (or page address) a request named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeError {
    /// This address or size must be page-aligned and is not.
    Misaligned(u64),
    /// The range starting here has zero bytes.
    ZeroSize(GuestPhysAddr),
    /// The range or access starting at this address runs past the guest-physical address
    /// width (or the address itself does).
    BeyondAddressWidth(u64),
    /// The range overlaps the registered range at `existing` (for `unregister_ram`: the range
    /// is not one whole registration, `existing` is the registration it cuts into).
    Overlap {
        /// Base of the registered range in the way.
        existing: GuestPhysAddr,
    },
}

impl fmt::Display for RangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RangeError::Misaligned(value) => write!(f, "{value:#x} is not a multiple of 4 KiB"),
            RangeError::ZeroSize(base) => write!(f, "the range at {base} has zero size"),
            RangeError::BeyondAddressWidth(base) => {
                write!(
                    f,
                    "the range at {base:#x} runs past the guest-physical address width"
                )
            }
            RangeError::Overlap { existing } => {
                write!(f, "the range overlaps the registered range at {existing}")
            }
        }
    }
}

impl core::error::Error for RangeError {}

/// Why a page does not allow the operation asked of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageError {
    /// The address lies in no registered range.
    NotGuestMemory(GuestPhysAddr),
    /// The page is not RAM (MMIO, MMIO2, ROM) and the operation needs RAM.
    NotRam(GuestPhysAddr),
    /// The page's state does not allow the operation (ballooning a ballooned page, say).
    State {
        /// The page.
        gpa: GuestPhysAddr,
        /// Its state.
        state: PageState,
    },
    /// A page-map lock pins the page's frame, which the operation would free or replace.
    Locked(GuestPhysAddr),
    /// An access handler covers the page, which the operation does not allow.
    HandlerPresent(GuestPhysAddr),
}

impl fmt::Display for PageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PageError::NotGuestMemory(gpa) => write!(f, "{gpa} lies in no registered range"),
            PageError::NotRam(gpa) => write!(f, "{gpa} is not RAM"),
            PageError::State { gpa, state } => {
                write!(f, "page {gpa} is {state:?}, which does not allow this")
            }
            PageError::Locked(gpa) => {
                write!(f, "page {gpa} is locked by a mapping: release the lock first")
            }
            PageError::HandlerPresent(gpa) => {
                write!(f, "{gpa} is covered by an access handler: deregister it first")
            }
        }
    }
}

impl core::error::Error for PageError {}

/// The host memory an operation needed and could not have. Nothing changed; the same request
/// succeeds once frames are back (freed, or the VM's limit raised).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoMemory {
    /// The host frame allocator has no free frame.
    OutOfFrames,
    /// The VM holds as many private frames as its limit allows (`Pgm::set_frame_limit`).
    FrameLimit,
    /// The host heap could not hold the bookkeeping (page descriptors) for the request.
    OutOfHeap,
}

impl fmt::Display for NoMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NoMemory::OutOfFrames => "the host has no free frame",
            NoMemory::FrameLimit => "the VM's frame limit is reached: raise it or free frames",
            NoMemory::OutOfHeap => "the host heap cannot hold the page descriptors",
        })
    }
}

impl core::error::Error for NoMemory {}

/// What a state-machine step can meet: a page that refuses the event, or no frame for it.
/// Internal: every family that changes pages converts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    Page(PageError),
    NoMemory(NoMemory),
}

impl From<PageError> for Failure {
    fn from(error: PageError) -> Self {
        Failure::Page(error)
    }
}

impl From<NoMemory> for Failure {
    fn from(error: NoMemory) -> Self {
        Failure::NoMemory(error)
    }
}

/// Declares a family's `From` conversions from the shared causes it wraps, its `Display` and
/// its `Error` (whose `source` is the shared cause).
macro_rules! family {
    ($family:ident { $($shared:ident($cause:ty)),* }) => {
        $(impl From<$cause> for $family {
            fn from(error: $cause) -> Self {
                $family::$shared(error)
            }
        })*
    };
}

/// `From<Failure>` for a family with `Page` and `NoMemory` variants.
macro_rules! from_failure {
    ($($family:ident),*) => {$(
        impl From<Failure> for $family {
            fn from(error: Failure) -> Self {
                match error {
                    Failure::Page(error) => $family::Page(error),
                    Failure::NoMemory(error) => $family::NoMemory(error),
                }
            }
        }
    )*};
}

/// `Display` and `Error` for a family: the shared causes show as themselves and are the
/// error's source; the arms given format the family's own variants with the formatter named.
macro_rules! display_family {
    ($family:ident, [$($shared:ident),*]) => {
        display_family!($family, [$($shared),*], _f => {});
    };
    ($family:ident, [$($shared:ident),*], $f:ident => { $($arms:tt)* }) => {
        impl fmt::Display for $family {
            fn fmt(&self, $f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match *self {
                    $($family::$shared(ref cause) => cause.fmt($f),)*
                    $($arms)*
                }
            }
        }

        impl core::error::Error for $family {
            fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
                match self {
                    $($family::$shared(cause) => Some(cause),)*
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
        }
    };
}

/// Why registering, unregistering, pre-allocating or ballooning RAM was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamError {
    /// The range or a page address is malformed or taken.
    Range(RangeError),
    /// A page in the way does not allow it.
    Page(PageError),
    /// No frame or heap for it.
    NoMemory(NoMemory),
}

family!(RamError { Range(RangeError), Page(PageError), NoMemory(NoMemory) });
from_failure!(RamError);
display_family!(RamError, [Range, Page, NoMemory]);

/// Why a host access to guest memory (`read_phys`, `write_phys` and their handled, external
/// and typed variants, `read_mmio` / `write_mmio`) failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessError {
    /// The access runs past the guest-physical address width.
    Range(RangeError),
    /// A byte lies outside guest memory, or on a page without memory (MMIO) for an access
    /// that bypasses handlers.
    Page(PageError),
    /// A write needed a frame and none could be had.
    NoMemory(NoMemory),
    /// An access through an `MmioTarget` reaches past the target's page, at this address.
    OutsideTarget(GuestPhysAddr),
}

family!(AccessError { Range(RangeError), Page(PageError), NoMemory(NoMemory) });
from_failure!(AccessError);
display_family!(AccessError, [Range, Page, NoMemory], f => {
    AccessError::OutsideTarget(gpa) => {
        write!(f, "{gpa} lies outside the MMIO page the access was looked up for")
    }
});

/// Why an access-handler or MMIO-region request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandlerError {
    /// The range is malformed, or overlaps RAM or another range where it may not.
    Range(RangeError),
    /// A page in the way does not allow it.
    Page(PageError),
    /// No frame or heap for it.
    NoMemory(NoMemory),
    /// No handler or MMIO region of the kind the call needs has this handle.
    Unknown(HandlerId),
    /// The range overlaps the pages of this handler.
    Overlap {
        /// The handler already covering part of the range.
        existing: HandlerId,
    },
    /// This page is not covered by the handler named.
    NotHandled(GuestPhysAddr),
    /// The MMIO2 page an alias was to show is not there.
    Mmio2(Mmio2Error),
}

family!(HandlerError { Range(RangeError), Page(PageError), NoMemory(NoMemory), Mmio2(Mmio2Error) });
from_failure!(HandlerError);
display_family!(HandlerError, [Range, Page, NoMemory, Mmio2], f => {
    HandlerError::Unknown(id) => write!(f, "no handler or MMIO region of this kind is {id:?}"),
    HandlerError::Overlap { existing } => write!(f, "the range overlaps handler {existing:?}"),
    HandlerError::NotHandled(gpa) => write!(f, "{gpa} is not covered by that handler"),
});

/// Why a ROM request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RomError {
    /// The range is malformed, or overlaps what it may not.
    Range(RangeError),
    /// A page in the way does not allow it.
    Page(PageError),
    /// No frame or heap for the image or the shadow.
    NoMemory(NoMemory),
    /// No ROM has this handle.
    Unknown(RomId),
    /// The ROM has no shadow, so only its default protection applies.
    NotShadowed(RomId),
    /// The image has more bytes than the ROM's range.
    ImageTooLarge {
        /// The image's length in bytes.
        image: usize,
        /// The range's size in bytes.
        range: u64,
    },
}

family!(RomError { Range(RangeError), Page(PageError), NoMemory(NoMemory) });
from_failure!(RomError);
display_family!(RomError, [Range, Page, NoMemory], f => {
    RomError::Unknown(id) => write!(f, "no ROM is {id:?}"),
    RomError::NotShadowed(id) => {
        write!(f, "ROM {id:?} has no shadow: register it shadowed to change its protection")
    }
    RomError::ImageTooLarge { image, range } => {
        write!(f, "the ROM image has {image} bytes, more than its range's {range}")
    }
});

/// Why an MMIO2 request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mmio2Error {
    /// The mapping address or an offset is malformed, or the mapping overlaps what it may not.
    Range(RangeError),
    /// A RAM page under the mapping does not allow it.
    Page(PageError),
    /// No frame or heap for the region.
    NoMemory(NoMemory),
    /// No MMIO2 region has this handle.
    Unknown(Mmio2Handle),
    /// The region is mapped, and the operation needs it unmapped.
    Mapped(Mmio2Handle),
    /// The region is not mapped, and the operation needs it mapped.
    NotMapped(Mmio2Handle),
    /// The device already has an MMIO2 region with this region number (VERR_ALREADY_EXISTS).
    RegionExists {
        /// The device.
        device: DeviceId,
        /// The region number.
        region_no: u32,
    },
    /// The VM has [`MMIO2_MAX_REGIONS`](crate::manager::MMIO2_MAX_REGIONS) MMIO2 regions already.
    TooManyRegions,
    /// A region of this many bytes would be larger than
    /// [`MMIO2_MAX_PAGES`](crate::manager::MMIO2_MAX_PAGES) pages.
    TooLarge(u64),
    /// The region was created without dirty-page tracking (VERR_INVALID_FUNCTION).
    NotTrackable(Mmio2Handle),
    /// An offset or size reaches beyond the region.
    OutOfRange(Mmio2Handle),
}

family!(Mmio2Error { Range(RangeError), Page(PageError), NoMemory(NoMemory) });
from_failure!(Mmio2Error);
display_family!(Mmio2Error, [Range, Page, NoMemory], f => {
    Mmio2Error::Unknown(handle) => write!(f, "no MMIO2 region is {handle:?}"),
    Mmio2Error::Mapped(handle) => write!(f, "MMIO2 region {handle:?} is mapped: unmap it first"),
    Mmio2Error::NotMapped(handle) => write!(f, "MMIO2 region {handle:?} is not mapped"),
    Mmio2Error::RegionExists { device, region_no } => {
        write!(f, "device {device:?} already has MMIO2 region {region_no}")
    }
    Mmio2Error::TooManyRegions => write!(f, "the VM has the most MMIO2 regions it may have"),
    Mmio2Error::TooLarge(size) => write!(f, "an MMIO2 region of {size:#x} bytes is too large"),
    Mmio2Error::NotTrackable(handle) => {
        write!(f, "MMIO2 region {handle:?} was created without dirty-page tracking")
    }
    Mmio2Error::OutOfRange(handle) => {
        write!(f, "the offset or size reaches beyond MMIO2 region {handle:?}")
    }
});

/// Why a page could not be locked for host access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockError {
    /// The page is not lockable RAM, MMIO2 or ROM, or its state refuses the lock.
    Page(PageError),
    /// A write lock needed a frame for a ZERO or SHARED page and none could be had.
    NoMemory(NoMemory),
}

family!(LockError { Page(PageError), NoMemory(NoMemory) });
from_failure!(LockError);
display_family!(LockError, [Page, NoMemory]);

/// Why the way write monitoring learns of guest writes could not change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogError {
    /// Write monitoring is on: the change must wait until it stops.
    MonitoringActive,
    /// The nested-paging format has no CPU write log (AMD NPT): write monitoring can only
    /// write-protect.
    NoCpuWriteLog,
}

impl fmt::Display for DirtyLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DirtyLogError::MonitoringActive => "write monitoring is on: stop it first",
            DirtyLogError::NoCpuWriteLog => {
                "this nested-paging format has no CPU write log: use write-protect mode"
            }
        })
    }
}

impl core::error::Error for DirtyLogError {}

/// Any of the manager's errors, for a VMM that keeps one error type: every family converts
/// into it with `?`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgmError {
    /// Creating the manager found no frame for its tables.
    NoMemory(NoMemory),
    /// A RAM request (see [`RamError`]).
    Ram(RamError),
    /// A host access to guest memory (see [`AccessError`]).
    Access(AccessError),
    /// A handler or MMIO request (see [`HandlerError`]).
    Handler(HandlerError),
    /// A ROM request (see [`RomError`]).
    Rom(RomError),
    /// An MMIO2 request (see [`Mmio2Error`]).
    Mmio2(Mmio2Error),
    /// A page-map lock (see [`LockError`]).
    Lock(LockError),
    /// A change of dirty logging (see [`DirtyLogError`]).
    DirtyLog(DirtyLogError),
}

family!(PgmError {
    NoMemory(NoMemory),
    Ram(RamError),
    Access(AccessError),
    Handler(HandlerError),
    Rom(RomError),
    Mmio2(Mmio2Error),
    Lock(LockError),
    DirtyLog(DirtyLogError)
});
display_family!(
    PgmError,
    [NoMemory, Ram, Access, Handler, Rom, Mmio2, Lock, DirtyLog]
);

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use core::error::Error;

    /// A family's message is its cause's, and the cause is its source; the umbrella type
    /// says the same.
    #[test]
    fn errors_name_their_address_and_chain_to_their_cause() {
        let gpa = GuestPhysAddr::new(0x5000).unwrap();
        let error = RamError::from(PageError::Locked(gpa));
        assert_eq!(
            error.to_string(),
            "page 0x5000 is locked by a mapping: release the lock first"
        );
        assert_eq!(
            error.source().map(|s| s.to_string()),
            Some(PageError::Locked(gpa).to_string())
        );
        let any = PgmError::from(Mmio2Error::Mapped(Mmio2Handle(3)));
        assert_eq!(
            any.to_string(),
            "MMIO2 region Mmio2Handle(3) is mapped: unmap it first"
        );
        assert!(Mmio2Error::TooManyRegions.source().is_none());
    }
}
