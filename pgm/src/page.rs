//! Per-page descriptors and the one state machine that decides every page-state transition.
//!
//! # Descriptor layout (one `u64`; VirtualBox's PGMPAGE takes 16 bytes)
//!
//! | bits    | field                                                              |
//! |---------|--------------------------------------------------------------------|
//! | 0..=39  | host frame number (host-physical address >> 12): 52-bit HPAs       |
//! | 40..=43 | [`PageType`]                                                       |
//! | 44..=46 | [`PageState`]                                                      |
//! | 47..=48 | [`HandlerState`]                                                   |
//! | 49..=50 | [`LargePageState`]                                                 |
//! | 51      | written-to (set by a write while write monitoring is on)           |
//! | 52..=57 | write map locks (63: 63 or more, the count is kept by the manager) |
//! | 58..=63 | read map locks (63: 63 or more, the count is kept by the manager)  |
//!
//! A page with no frame of its own (ZERO, BALLOONED, MMIO) stores frame number 0.

use core::fmt;

use crate::addr::{HostPhysAddr, HOST_PHYS_BITS, PAGE_SHIFT};

const FRAME_BITS: u32 = HOST_PHYS_BITS - PAGE_SHIFT;
const FRAME_MASK: u64 = (1 << FRAME_BITS) - 1;

/// A bit field of the descriptor: `(shift, mask)`.
#[derive(Clone, Copy)]
struct Field(u32, u64);

const TYPE: Field = Field(40, 0xF);
const STATE: Field = Field(44, 0x7);
const HANDLER: Field = Field(47, 0x3);
const LARGE: Field = Field(49, 0x3);
const WRITTEN_TO: Field = Field(51, 0x1);
const WRITE_LOCKS: Field = Field(52, 0x3F);
const READ_LOCKS: Field = Field(58, 0x3F);

/// The largest lock count a descriptor holds itself: a page with this many locks or more has
/// its count kept by the manager (rarely needed: nested locks of one page).
pub const INLINE_LOCKS_MAX: u64 = 0x3F;

/// What kind of guest-physical page this is; decides how it is mapped and what faults mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageType {
    /// Ordinary guest RAM. Encoded as 0, so that an all-zero descriptor is a ZERO RAM page:
    /// RAM's descriptors come from zeroed memory, which a host hands out without touching it.
    Ram = 0,
    /// Memory-mapped I/O: no backing frame, every access goes to the region's handler.
    Mmio = 2,
    /// Device memory (MMIO2, e.g. a framebuffer) mapped into the guest: frames owned by the
    /// region, mapped like RAM, never reset or ballooned.
    Mmio2 = 3,
    /// An MMIO page mapped straight to a page of an MMIO2 region (e.g. a VGA bank) until the
    /// MMIO region's handler is reset; the frame belongs to the MMIO2 region.
    Mmio2AliasMmio = 4,
    /// An MMIO page mapped straight to a host frame the VMM owns (e.g. the APIC-access page)
    /// until the MMIO region's handler is reset.
    SpecialAliasMmio = 5,
    /// ROM without a shadow: reads come from the ROM image, writes are ignored.
    Rom = 6,
    /// ROM with a RAM shadow; the descriptor's state and frame are the shadow page's, and the
    /// ROM's protection mode decides whether reads and writes reach it.
    RomShadow = 7,
}

impl PageType {
    /// True when the page's frame is its own, to free when the page lets it go (RAM and ROM
    /// shadows); MMIO2 frames belong to their region and alias frames to their owner.
    pub fn owns_frame(self) -> bool {
        matches!(self, PageType::Ram | PageType::RomShadow)
    }

    /// True for MMIO pages aliased to a frame.
    pub fn is_mmio_alias(self) -> bool {
        matches!(self, PageType::Mmio2AliasMmio | PageType::SpecialAliasMmio)
    }
}

/// Where a page's contents live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// Reads as zeros, backed by the shared zero frame, mapped read/execute only; the first write
    /// gives it a frame of its own.
    Zero = 0,
    /// Backed by a private host frame, mapped read/write/execute.
    Allocated = 1,
    /// Backed by a private frame but write-protected so the next write is noticed (write
    /// monitoring); the write makes it ALLOCATED again.
    WriteMonitored = 2,
    /// Backed by a read-only frame shared with other pages of identical contents; the first
    /// write copies it to a private frame.
    Shared = 3,
    /// Handed to the balloon: no frame, not mapped; any guest access is reported.
    Ballooned = 4,
}

/// Whether and how an access handler covers the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum HandlerState {
    /// No handler.
    None = 0,
    /// A handler covers the page but is temporarily off for it: mapped as without handler.
    Disabled = 1,
    /// Writes go to the handler; reads and fetches do not.
    Write = 2,
    /// Every access goes to the handler.
    All = 3,
}

/// Whether the page is part of a 2 MiB EPT mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum LargePageState {
    /// Mapped with 4 KiB entries.
    None = 0,
    /// Part of a 2 MiB mapping.
    Large = 1,
    /// Its 2 MiB block may not be mapped large (a handler or monitoring needs 4 KiB).
    Disabled = 2,
}

/// The packed 8-byte descriptor of one guest page (layout in the module docs).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct PageDescriptor(u64);

const _: () = assert!(core::mem::size_of::<PageDescriptor>() == 8);

impl PageDescriptor {
    /// A page of `page_type` in the ZERO state, with no frame and no handler.
    pub const fn zero(page_type: PageType) -> PageDescriptor {
        PageDescriptor((page_type as u64) << TYPE.0)
    }

    /// A page of `page_type` born ALLOCATED with `frame` (device memory whose frames exist
    /// before the page does).
    pub fn allocated(page_type: PageType, frame: HostPhysAddr) -> PageDescriptor {
        PageDescriptor::zero(page_type)
            .with_state(PageState::Allocated)
            .with_frame(Some(frame))
    }

    /// The page's type.
    pub fn page_type(self) -> PageType {
        match self.get(TYPE) {
            2 => PageType::Mmio,
            3 => PageType::Mmio2,
            4 => PageType::Mmio2AliasMmio,
            5 => PageType::SpecialAliasMmio,
            6 => PageType::Rom,
            7 => PageType::RomShadow,
            _ => PageType::Ram,
        }
    }

    /// The page's state.
    pub fn state(self) -> PageState {
        match self.get(STATE) {
            1 => PageState::Allocated,
            2 => PageState::WriteMonitored,
            3 => PageState::Shared,
            4 => PageState::Ballooned,
            _ => PageState::Zero,
        }
    }

    /// The handler state.
    pub fn handler(self) -> HandlerState {
        match self.get(HANDLER) {
            1 => HandlerState::Disabled,
            2 => HandlerState::Write,
            3 => HandlerState::All,
            _ => HandlerState::None,
        }
    }

    /// The large-page state.
    pub fn large_page(self) -> LargePageState {
        match self.get(LARGE) {
            1 => LargePageState::Large,
            2 => LargePageState::Disabled,
            _ => LargePageState::None,
        }
    }

    /// True when the page was written since write monitoring last reset the flag.
    pub fn written_to(self) -> bool {
        self.get(WRITTEN_TO) != 0
    }

    /// Write map locks held on the page.
    pub fn write_locks(self) -> u64 {
        self.get(WRITE_LOCKS)
    }

    /// Read map locks held on the page.
    pub fn read_locks(self) -> u64 {
        self.get(READ_LOCKS)
    }

    /// True while any map lock pins the page's frame.
    pub fn is_locked(self) -> bool {
        self.write_locks() + self.read_locks() > 0
    }

    /// The descriptor with `count` locks of the given kind, as far as it holds them: a count
    /// of [`INLINE_LOCKS_MAX`] or more is stored as [`INLINE_LOCKS_MAX`].
    pub fn with_locks(self, write: bool, count: u64) -> PageDescriptor {
        let field = if write { WRITE_LOCKS } else { READ_LOCKS };
        self.set(field, count.min(INLINE_LOCKS_MAX))
    }

    /// The page's private host frame; `None` for a page with no frame of its own.
    pub fn frame(self) -> Option<HostPhysAddr> {
        let number = self.0 & FRAME_MASK;
        (number != 0).then(|| HostPhysAddr::new_truncate(number << PAGE_SHIFT))
    }

    /// The raw 64-bit value (for diagnostics, and the atomic word the descriptor is kept in).
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The descriptor whose raw value is `raw` (as [`raw`](Self::raw) gave it).
    pub(crate) const fn from_raw(raw: u64) -> PageDescriptor {
        PageDescriptor(raw)
    }

    /// The descriptor with another handler state.
    pub fn with_handler(self, handler: HandlerState) -> PageDescriptor {
        self.set(HANDLER, handler as u64)
    }

    /// The descriptor with another large-page state.
    pub fn with_large_page(self, large: LargePageState) -> PageDescriptor {
        self.set(LARGE, large as u64)
    }

    /// The descriptor with the written-to flag set or cleared.
    pub fn with_written_to(self, written: bool) -> PageDescriptor {
        self.set(WRITTEN_TO, written as u64)
    }

    /// The descriptor with another type (frame and state untouched).
    pub fn with_type(self, page_type: PageType) -> PageDescriptor {
        self.set(TYPE, page_type as u64)
    }

    fn get(self, field: Field) -> u64 {
        (self.0 >> field.0) & field.1
    }

    fn set(self, field: Field, value: u64) -> PageDescriptor {
        PageDescriptor((self.0 & !(field.1 << field.0)) | ((value & field.1) << field.0))
    }

    fn with_state(self, state: PageState) -> PageDescriptor {
        self.set(STATE, state as u64)
    }

    fn with_frame(self, frame: Option<HostPhysAddr>) -> PageDescriptor {
        let number = frame.map_or(0, HostPhysAddr::page_number);
        PageDescriptor((self.0 & !FRAME_MASK) | number)
    }
}

impl fmt::Debug for PageDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageDescriptor")
            .field("type", &self.page_type())
            .field("state", &self.state())
            .field("handler", &self.handler())
            .field("large", &self.large_page())
            .field("written_to", &self.written_to())
            .field("frame", &self.frame())
            .finish()
    }
}

/// Something that happens to a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageEvent {
    /// The guest (through a fault) or the host (through the physical access API) writes the page.
    Write,
    /// The page is returned to its power-on state (RAM reset).
    Reset,
    /// Write monitoring or dirty tracking write-protects the page one by one (MMIO2 pages; RAM
    /// is protected all at once and settled through [`monitored_view`]).
    Protect,
    /// Write monitoring ends: the page is writable again.
    Unprotect,
    /// The balloon takes the page.
    Inflate,
    /// The balloon gives the page back.
    Deflate,
    /// Page sharing found another page with the same contents: the page takes the shared frame.
    Share,
}

/// What the caller must do with host frames to carry a transition out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameEffect {
    /// Nothing: the page keeps what backs it.
    None,
    /// Allocate a zero-filled private frame and pass it to [`Transition::apply`].
    AllocateZeroed,
    /// Free the page's private frame once the descriptor and EPT no longer name it.
    Free(HostPhysAddr),
    /// Point the page at the shared frame passed to [`Transition::apply`]; give up the page's
    /// own frame (named here) unless it is that shared frame.
    AdoptShared(HostPhysAddr),
    /// Allocate a private frame holding a copy of this shared frame (copy on write), pass it to
    /// [`Transition::apply`], then drop the page's reference to the shared frame.
    AllocateCopyOf(HostPhysAddr),
    /// Drop the page's reference to this shared frame (freed with its last reference).
    DropShare(HostPhysAddr),
}

/// A decided transition: the next state and the frame work it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub(crate) struct Transition {
    /// The state after the event.
    pub next: PageState,
    /// The frame work the caller does before applying.
    pub effect: FrameEffect,
}

impl Transition {
    /// True when the transition changes the page's state or backing (and so its EPT entry).
    pub fn changes_page(&self, from: PageState) -> bool {
        self.next != from || self.effect != FrameEffect::None
    }

    /// The descriptor after the transition; `new_frame` is the frame allocated for
    /// [`FrameEffect::AllocateZeroed`] and is ignored otherwise.
    #[inline]
    pub fn apply(&self, page: PageDescriptor, new_frame: Option<HostPhysAddr>) -> PageDescriptor {
        let frame = match self.effect {
            FrameEffect::None => page.frame(),
            FrameEffect::AllocateZeroed | FrameEffect::AllocateCopyOf(_) | FrameEffect::AdoptShared(_) => {
                new_frame
            }
            FrameEffect::Free(_) | FrameEffect::DropShare(_) => None,
        };
        page.with_state(self.next).with_frame(frame)
    }
}

/// Why the state machine refused an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct InvalidTransition {
    /// The page's state.
    pub state: PageState,
    /// The refused event.
    pub event: PageEvent,
}

/// The page-state machine: decides the next state of `page` on `event` and the frame work that
/// goes with it. Every state change of every page goes through here.
///
/// | state \ event   | Write          | Reset      | Protect        | Unprotect | Inflate      | Deflate |
/// |-----------------|----------------|------------|----------------|-----------|--------------|---------|
/// | Zero            | Allocated +new | Zero       | Zero           | Zero      | Ballooned    | refused |
/// | Allocated       | Allocated      | Zero −free | WriteMonitored | Allocated | Ballooned −free | refused |
/// | WriteMonitored  | Allocated      | Zero −free | WriteMonitored | Allocated | Ballooned −free | refused |
/// | Ballooned       | refused        | Zero       | Ballooned      | Ballooned | refused      | Zero    |
/// | Shared          | Allocated copy | Zero −ref  | Shared         | Shared    | Ballooned −ref | refused |
///
/// `Share` takes ALLOCATED and WRITE_MONITORED pages to SHARED (adopting the shared frame),
/// leaves SHARED pages alone and is refused for ZERO and BALLOONED pages.
///
/// MMIO2 pages belong to their device: reset and the balloon do not apply to them. MMIO alias
/// pages accept no event at all.
#[inline]
pub(crate) fn transition(page: PageDescriptor, event: PageEvent) -> Result<Transition, InvalidTransition> {
    use PageEvent::*;
    use PageState::*;
    let state = page.state();
    let refused = match page.page_type() {
        PageType::Mmio2 => matches!(event, Reset | Inflate | Deflate),
        // An alias maps a frame the page does not own: no event may change or free it.
        PageType::Mmio2AliasMmio | PageType::SpecialAliasMmio => true,
        PageType::Ram | PageType::Mmio | PageType::Rom | PageType::RomShadow => false,
    };
    if refused {
        return Err(InvalidTransition { state, event });
    }
    let free = || page.frame().map_or(FrameEffect::None, FrameEffect::Free);
    let shared = |frame: fn(HostPhysAddr) -> FrameEffect| page.frame().map_or(FrameEffect::None, frame);
    let (next, effect) = match (state, event) {
        (Allocated | WriteMonitored, Share) => (Shared, shared(FrameEffect::AdoptShared)),
        (Shared, Share | Protect | Unprotect) => (Shared, FrameEffect::None),
        (Shared, Write) => (Allocated, shared(FrameEffect::AllocateCopyOf)),
        (Shared, Reset) => (Zero, shared(FrameEffect::DropShare)),
        (Shared, Inflate) => (Ballooned, shared(FrameEffect::DropShare)),
        (Shared, Deflate) | (Zero | Ballooned, Share) => return Err(InvalidTransition { state, event }),
        (Zero, Write) => (Allocated, FrameEffect::AllocateZeroed),
        (Allocated | WriteMonitored, Write) => (Allocated, FrameEffect::None),
        (Allocated | WriteMonitored, Reset) => (Zero, free()),
        (Zero | Ballooned, Reset) => (Zero, FrameEffect::None),
        (Allocated | WriteMonitored, Protect) => (WriteMonitored, FrameEffect::None),
        (Allocated | WriteMonitored, Unprotect) => (Allocated, FrameEffect::None),
        (Zero | Ballooned, Protect | Unprotect) => (state, FrameEffect::None),
        (Zero, Inflate) => (Ballooned, FrameEffect::None),
        (Allocated | WriteMonitored, Inflate) => (Ballooned, free()),
        (Ballooned, Deflate) => (Zero, FrameEffect::None),
        (Ballooned, Write | Inflate) | (Zero | Allocated | WriteMonitored, Deflate) => {
            return Err(InvalidTransition { state, event });
        }
    };
    Ok(Transition { next, effect })
}

/// The page as write monitoring sees it. `pending` tells that the protection monitoring armed
/// at the top of the EPT has not been pushed down to the page's leaf yet (its 2 MiB block's walk
/// withholds writes), so the descriptor may be behind in two ways, both put right when the
/// protection comes down: the written-to flag, left from a round already harvested, is clear
/// (whatever the page is now: an MMIO page that replaced a written RAM page carries its flag
/// back when RAM returns), and a RAM page or ROM shadow that is ALLOCATED is WRITE_MONITORED.
/// Write-locked pages are the exception (the host may write them at any time: they stay
/// ALLOCATED and written), and MMIO2 pages, protected one by one since their region's dirty
/// tracking shares the leaves, are always what they say. Every decision of the state machine
/// and every count is taken on this view.
pub(crate) fn monitored_view(page: PageDescriptor, pending: bool) -> PageDescriptor {
    if !pending || page.page_type() == PageType::Mmio2 || page.write_locks() > 0 {
        return page;
    }
    let page = page.with_written_to(false);
    let lazily_protected = matches!(page.page_type(), PageType::Ram | PageType::RomShadow);
    if lazily_protected && page.state() == PageState::Allocated {
        page.with_state(PageState::WriteMonitored)
    } else {
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_SIZE;
    use crate::test_support::hpa;

    fn allocated(frame: u64) -> PageDescriptor {
        let page = PageDescriptor::zero(PageType::Ram);
        transition(page, PageEvent::Write)
            .unwrap()
            .apply(page, Some(hpa(frame)))
    }

    #[test]
    fn new_page_is_zero_without_frame_or_handler() {
        let page = PageDescriptor::zero(PageType::Ram);
        assert_eq!(page.page_type(), PageType::Ram);
        assert_eq!(page.state(), PageState::Zero);
        assert_eq!(page.frame(), None);
        assert_eq!(page.handler(), HandlerState::None);
        assert_eq!(page.large_page(), LargePageState::None);
        assert!(!page.written_to());
    }

    #[test]
    fn fields_are_independent() {
        let top = hpa((1 << 52) - PAGE_SIZE);
        let page = allocated(top.as_u64())
            .with_handler(HandlerState::All)
            .with_large_page(LargePageState::Disabled)
            .with_written_to(true)
            .with_type(PageType::Mmio);
        assert_eq!(page.frame(), Some(top));
        assert_eq!(page.state(), PageState::Allocated);
        assert_eq!(page.handler(), HandlerState::All);
        assert_eq!(page.large_page(), LargePageState::Disabled);
        assert!(page.written_to());
        assert_eq!(page.page_type(), PageType::Mmio);
        let cleared = page.with_written_to(false).with_handler(HandlerState::None);
        assert_eq!(
            (cleared.frame(), cleared.state()),
            (Some(top), PageState::Allocated)
        );
        assert!(!cleared.written_to());
    }

    #[test]
    fn lock_counts_are_held_up_to_the_inline_limit() {
        let page = allocated(0x4000);
        let locked = page.with_locks(true, 1).with_locks(false, 2);
        assert_eq!((locked.write_locks(), locked.read_locks()), (1, 2));
        assert_eq!(
            locked.frame(),
            Some(hpa(0x4000)),
            "lock bits do not touch the frame"
        );
        assert!(!locked.with_locks(true, 0).with_locks(false, 0).is_locked());
        assert_eq!(page.with_locks(false, 100).read_locks(), INLINE_LOCKS_MAX);
        assert_eq!(
            page.with_locks(false, 100).state(),
            page.state(),
            "a large count stays in its field"
        );
    }

    #[test]
    fn first_write_allocates_then_later_writes_do_not() {
        let page = allocated(0xABCD_E000);
        assert_eq!(page.state(), PageState::Allocated);
        assert_eq!(page.frame(), Some(hpa(0xABCD_E000)));
        let again = transition(page, PageEvent::Write).unwrap();
        assert!(!again.changes_page(page.state()));
    }

    #[test]
    fn monitoring_round_trip_keeps_the_frame() {
        let page = allocated(0x5000);
        let protected = transition(page, PageEvent::Protect).unwrap().apply(page, None);
        assert_eq!(protected.state(), PageState::WriteMonitored);
        assert_eq!(protected.frame(), Some(hpa(0x5000)));
        let written = transition(protected, PageEvent::Write).unwrap();
        assert_eq!(
            written.effect,
            FrameEffect::None,
            "a monitored write needs no new frame"
        );
        assert_eq!(written.apply(protected, None).frame(), Some(hpa(0x5000)));
        let zero = PageDescriptor::zero(PageType::Ram);
        assert!(!transition(zero, PageEvent::Protect)
            .unwrap()
            .changes_page(PageState::Zero));
    }

    #[test]
    fn reset_and_inflate_free_the_private_frame() {
        for event in [PageEvent::Reset, PageEvent::Inflate] {
            let page = allocated(0x5000);
            let step = transition(page, event).unwrap();
            assert_eq!(step.effect, FrameEffect::Free(hpa(0x5000)));
            assert_eq!(step.apply(page, None).frame(), None);
        }
    }

    #[test]
    fn mmio2_pages_are_never_reset_or_ballooned() {
        let page = allocated(0x7000).with_type(PageType::Mmio2);
        for event in [PageEvent::Reset, PageEvent::Inflate, PageEvent::Deflate] {
            assert_eq!(
                transition(page, event),
                Err(InvalidTransition {
                    state: PageState::Allocated,
                    event
                })
            );
        }
        let protected = transition(page, PageEvent::Protect).unwrap().apply(page, None);
        assert_eq!(protected.state(), PageState::WriteMonitored);
        assert_eq!(protected.frame(), Some(hpa(0x7000)));
    }

    #[test]
    fn sharing_adopts_a_frame_and_the_first_write_copies_it() {
        let page = allocated(0x5000);
        let share = transition(page, PageEvent::Share).unwrap();
        assert_eq!(share.effect, FrameEffect::AdoptShared(hpa(0x5000)));
        let shared = share.apply(page, Some(hpa(0x9000)));
        assert_eq!(
            (shared.state(), shared.frame()),
            (PageState::Shared, Some(hpa(0x9000)))
        );
        let write = transition(shared, PageEvent::Write).unwrap();
        assert_eq!(write.effect, FrameEffect::AllocateCopyOf(hpa(0x9000)));
        let private = write.apply(shared, Some(hpa(0x7000)));
        assert_eq!(
            (private.state(), private.frame()),
            (PageState::Allocated, Some(hpa(0x7000)))
        );
        for event in [PageEvent::Reset, PageEvent::Inflate] {
            assert_eq!(
                transition(shared, event).unwrap().effect,
                FrameEffect::DropShare(hpa(0x9000))
            );
        }
        let zero = PageDescriptor::zero(PageType::Ram);
        assert!(transition(zero, PageEvent::Share).is_err());
        assert!(transition(shared, PageEvent::Deflate).is_err());
    }

    #[test]
    fn balloon_round_trip_and_refusals() {
        let zero = PageDescriptor::zero(PageType::Ram);
        let ballooned = transition(zero, PageEvent::Inflate).unwrap().apply(zero, None);
        assert_eq!(ballooned.state(), PageState::Ballooned);
        for event in [PageEvent::Write, PageEvent::Inflate] {
            assert_eq!(
                transition(ballooned, event),
                Err(InvalidTransition {
                    state: PageState::Ballooned,
                    event
                })
            );
        }
        assert_eq!(
            transition(zero, PageEvent::Deflate),
            Err(InvalidTransition {
                state: PageState::Zero,
                event: PageEvent::Deflate
            })
        );
        let back = transition(ballooned, PageEvent::Deflate)
            .unwrap()
            .apply(ballooned, None);
        assert_eq!(back.state(), PageState::Zero);
    }
}
