//! Per-page descriptors and the one state machine that decides every page-state transition.
//!
//! # Descriptor layout (one `u64`, VirtualBox's PGMPAGE takes 16 bytes)
//!
//! | bits    | field                                                        |
//! |---------|--------------------------------------------------------------|
//! | 0..=39  | host frame number (host-physical address >> 12), 52-bit HPAs |
//! | 40..=43 | [`PageType`]                                                 |
//! | 44..=46 | [`PageState`]                                                |
//! | 47..=63 | reserved for handler state, large-page state, written-to and map-lock counts |
//!
//! A ZERO page stores no frame of its own (it is backed by the manager's shared zero frame), so
//! its frame field is 0.

use crate::addr::{HostPhysAddr, HOST_PHYS_BITS, PAGE_SHIFT};

const FRAME_BITS: u32 = HOST_PHYS_BITS - PAGE_SHIFT;
const FRAME_MASK: u64 = (1 << FRAME_BITS) - 1;
const TYPE_SHIFT: u32 = 40;
const TYPE_MASK: u64 = 0xF;
const STATE_SHIFT: u32 = 44;
const STATE_MASK: u64 = 0x7;

/// What kind of guest-physical page this is; decides how it is mapped and what faults mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageType {
    /// Ordinary guest RAM.
    Ram = 1,
}

impl PageType {
    fn from_bits(bits: u64) -> Option<PageType> {
        match bits {
            1 => Some(PageType::Ram),
            _ => None,
        }
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
}

impl PageState {
    fn from_bits(bits: u64) -> PageState {
        match bits {
            1 => PageState::Allocated,
            _ => PageState::Zero,
        }
    }
}

/// The packed 8-byte descriptor of one guest page (layout in the module docs).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(transparent)]
pub struct PageDescriptor(u64);

const _: () = assert!(core::mem::size_of::<PageDescriptor>() == 8);

impl PageDescriptor {
    /// A page of `page_type` in the ZERO state, with no frame of its own.
    pub const fn zero(page_type: PageType) -> PageDescriptor {
        PageDescriptor((page_type as u64) << TYPE_SHIFT)
    }

    /// The page's type.
    pub fn page_type(self) -> PageType {
        // Descriptors are only built by this module from a valid PageType.
        PageType::from_bits((self.0 >> TYPE_SHIFT) & TYPE_MASK).unwrap_or(PageType::Ram)
    }

    /// The page's state.
    pub fn state(self) -> PageState {
        PageState::from_bits((self.0 >> STATE_SHIFT) & STATE_MASK)
    }

    /// The page's private host frame; `None` for a page with no frame of its own (ZERO).
    pub fn frame(self) -> Option<HostPhysAddr> {
        let number = self.0 & FRAME_MASK;
        (number != 0).then(|| HostPhysAddr::new_truncate(number << PAGE_SHIFT))
    }

    /// The raw 64-bit value (for diagnostics and size accounting).
    pub const fn raw(self) -> u64 {
        self.0
    }

    fn with_state(self, state: PageState) -> PageDescriptor {
        PageDescriptor((self.0 & !(STATE_MASK << STATE_SHIFT)) | ((state as u64) << STATE_SHIFT))
    }

    fn with_frame(self, frame: Option<HostPhysAddr>) -> PageDescriptor {
        let number = frame.map_or(0, HostPhysAddr::page_number);
        PageDescriptor((self.0 & !FRAME_MASK) | number)
    }
}

impl core::fmt::Debug for PageDescriptor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PageDescriptor")
            .field("type", &self.page_type())
            .field("state", &self.state())
            .field("frame", &self.frame())
            .finish()
    }
}

/// Something that happens to a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageEvent {
    /// The guest (through a fault) or the host (through the physical access API) writes the page.
    Write,
    /// The page is returned to its power-on state (RAM reset).
    Reset,
}

/// What the caller must do with host frames to carry a transition out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameEffect {
    /// Nothing: the page keeps what backs it.
    None,
    /// Allocate a zero-filled private frame and pass it to [`Transition::apply`].
    AllocateZeroed,
    /// Free the page's private frame once the descriptor no longer names it.
    Free(HostPhysAddr),
}

/// A decided transition: the next state and the frame work it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Transition {
    /// The state after the event.
    pub next: PageState,
    /// The frame work the caller does before applying.
    pub effect: FrameEffect,
}

impl Transition {
    /// True when the transition changes the page's mapping (EPT entry) or backing.
    pub fn changes_mapping(&self, from: PageState) -> bool {
        self.next != from || self.effect != FrameEffect::None
    }

    /// The descriptor after the transition; `new_frame` is the frame allocated for
    /// [`FrameEffect::AllocateZeroed`] and is ignored otherwise.
    pub fn apply(&self, page: PageDescriptor, new_frame: Option<HostPhysAddr>) -> PageDescriptor {
        let frame = match self.effect {
            FrameEffect::None => page.frame(),
            FrameEffect::AllocateZeroed => new_frame,
            FrameEffect::Free(_) => None,
        };
        page.with_state(self.next).with_frame(frame)
    }
}

/// The page-state machine: decides the next state of `page` on `event`, and the frame work
/// that goes with it. Every state change of every page goes through here.
pub fn transition(page: PageDescriptor, event: PageEvent) -> Transition {
    use PageState::*;
    let (next, effect) = match (page.state(), event) {
        (Zero, PageEvent::Write) => (Allocated, FrameEffect::AllocateZeroed),
        (Zero, PageEvent::Reset) => (Zero, FrameEffect::None),
        (Allocated, PageEvent::Write) => (Allocated, FrameEffect::None),
        (Allocated, PageEvent::Reset) => match page.frame() {
            Some(frame) => (Zero, FrameEffect::Free(frame)),
            None => (Zero, FrameEffect::None),
        },
    };
    Transition { next, effect }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hpa(addr: u64) -> HostPhysAddr {
        HostPhysAddr::new(addr).unwrap()
    }

    #[test]
    fn new_page_is_zero_without_frame() {
        let page = PageDescriptor::zero(PageType::Ram);
        assert_eq!(page.page_type(), PageType::Ram);
        assert_eq!(page.state(), PageState::Zero);
        assert_eq!(page.frame(), None);
    }

    #[test]
    fn first_write_allocates_then_later_writes_do_not() {
        let page = PageDescriptor::zero(PageType::Ram);
        let first = transition(page, PageEvent::Write);
        assert_eq!(first.effect, FrameEffect::AllocateZeroed);
        let page = first.apply(page, Some(hpa(0xABCD_E000)));
        assert_eq!(page.state(), PageState::Allocated);
        assert_eq!(page.frame(), Some(hpa(0xABCD_E000)));
        assert_eq!(page.page_type(), PageType::Ram);
        let again = transition(page, PageEvent::Write);
        assert_eq!(again.effect, FrameEffect::None);
        assert!(!again.changes_mapping(page.state()));
    }

    #[test]
    fn reset_frees_the_private_frame() {
        let page = PageDescriptor::zero(PageType::Ram);
        let page = transition(page, PageEvent::Write).apply(page, Some(hpa(0x5000)));
        let reset = transition(page, PageEvent::Reset);
        assert_eq!(reset.effect, FrameEffect::Free(hpa(0x5000)));
        let page = reset.apply(page, None);
        assert_eq!(page.state(), PageState::Zero);
        assert_eq!(page.frame(), None);
    }

    #[test]
    fn frame_field_holds_52_bit_addresses() {
        let page = PageDescriptor::zero(PageType::Ram);
        let top = hpa((1 << 52) - PAGE_SIZE_FOR_TEST);
        let page = transition(page, PageEvent::Write).apply(page, Some(top));
        assert_eq!(page.frame(), Some(top));
        assert_eq!(page.state(), PageState::Allocated);
    }

    const PAGE_SIZE_FOR_TEST: u64 = crate::addr::PAGE_SIZE;
}
