//! The registry of physical access handlers: which guest-physical pages a handler covers and
//! what it intercepts. The per-page truth (active, temporarily off) lives in the descriptors;
//! this registry names the handler a fault on a page belongs to.

use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, PAGE_SIZE};
use crate::page::HandlerState;

/// The handle of an access handler or of an MMIO region (whose pages an `All` handler covers).
/// Only the manager makes them, so a handle names a registration it made (which may have
/// gone since: calls then fail with `Unknown`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HandlerId(pub(crate) u32);

/// What a handler intercepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandlerKind {
    /// Writes only; reads and fetches go to memory.
    Write,
    /// Every access.
    All,
}

impl HandlerKind {
    /// The page handler state of an active handler of this kind.
    pub fn page_state(self) -> HandlerState {
        match self {
            HandlerKind::Write => HandlerState::Write,
            HandlerKind::All => HandlerState::All,
        }
    }
}

/// How an MMIO region sits in the address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioPlacement {
    /// In space no RAM covered: the region is a range of its own.
    Unassigned,
    /// Over RAM pages, which become RAM (ZERO) again when the region goes.
    ReplacingRam,
}

/// One registered handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Registration {
    /// Its handle.
    pub id: HandlerId,
    /// What it intercepts.
    pub kind: HandlerKind,
    /// First page covered.
    pub base: GuestPhysAddr,
    /// Pages covered.
    pub pages: u64,
    /// `Some` for an MMIO region.
    pub mmio: Option<MmioPlacement>,
}

impl Registration {
    /// One past the last byte covered.
    pub fn end(&self) -> u64 {
        self.base.as_u64() + self.pages * PAGE_SIZE
    }

    /// True when `gpa` lies in one of the pages covered.
    pub fn contains(&self, gpa: GuestPhysAddr) -> bool {
        gpa >= self.base && gpa.as_u64() < self.end()
    }
}

/// Registered handlers, sorted by base, never overlapping.
#[derive(Default)]
pub(crate) struct Handlers {
    sorted: Vec<Registration>,
    next_id: u32,
}

impl Handlers {
    /// The handler covering `gpa`.
    pub fn covering(&self, gpa: GuestPhysAddr) -> Option<&Registration> {
        let after = self.sorted.partition_point(|r| r.base <= gpa);
        self.sorted[..after].last().filter(|r| r.contains(gpa))
    }

    /// The handler with handle `id`.
    pub fn get(&self, id: HandlerId) -> Option<&Registration> {
        self.sorted.iter().find(|r| r.id == id)
    }

    /// The first handler overlapping `[base, base + pages)`.
    pub fn overlapping(&self, base: GuestPhysAddr, pages: u64) -> Option<&Registration> {
        let end = base.as_u64() + pages * PAGE_SIZE;
        self.sorted
            .iter()
            .find(|r| base.as_u64() < r.end() && r.base.as_u64() < end)
    }

    /// Records a handler the caller checked does not overlap; returns its new handle.
    pub fn insert(
        &mut self,
        kind: HandlerKind,
        base: GuestPhysAddr,
        pages: u64,
        mmio: Option<MmioPlacement>,
    ) -> HandlerId {
        let id = HandlerId(self.next_id);
        self.next_id += 1;
        let at = self.sorted.partition_point(|r| r.base < base);
        self.sorted.insert(
            at,
            Registration {
                id,
                kind,
                base,
                pages,
                mmio,
            },
        );
        id
    }

    /// Forgets the handler `id` and returns what it was.
    pub fn remove(&mut self, id: HandlerId) -> Option<Registration> {
        let at = self.sorted.iter().position(|r| r.id == id)?;
        Some(self.sorted.remove(at))
    }

    /// Every registration, by base.
    pub fn iter(&self) -> impl Iterator<Item = &Registration> {
        self.sorted.iter()
    }
}
