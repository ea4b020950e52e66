//! The EPT auditor: asks of a VM's tables "which frames can the guest reach?" and checks the
//! answer against what the VM holds. Isolation is the first invariant of the hypervisor: every
//! leaf the CPU can use must map a frame this VM holds (the zero frame, a private frame, a ROM
//! frame, a frame of a live MMIO2 region, a shared frame, or a caller's special-alias frame),
//! and every such frame must still be allocated at the host.
//!
//! The auditor derives what the VM holds from its ownership records (descriptors, ROM and MMIO2
//! regions, the shared-frame counts) independently of the code that writes the tables, and
//! compares every leaf with the mapping its page's descriptor calls for, and the reverse map
//! (`mapping`) with the leaves, both ways. It reads only; the
//! tests run it after every operation, the kernel after its hostile-guest scenarios.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;
use core::fmt;

use super::Pgm;
use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::frames::{HostFrameAllocator, HostMemory};
use crate::page::{PageState, PageType};
use crate::paging::{Leaf, Permissions};
use crate::ram::PageLocation;

/// What is wrong with one mapping or frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A leaf maps a frame this VM does not hold (given back to the host, or never its own).
    FrameNotHeld,
    /// A frame the VM holds is not allocated at the host.
    HeldFrameFreed,
    /// A leaf maps a guest-physical address that lies in no registered range and is no A20
    /// alias of a mapped page.
    OutsideRanges,
    /// A leaf (or a missing leaf) of a registered page differs from what its descriptor calls
    /// for.
    OutOfSync,
    /// The zero frame or a shared frame is mapped writable.
    SharedFrameWritable,
    /// An MMIO page (not an alias) or a ballooned page is mapped.
    MappedWithoutMemory,
    /// A page holds a map lock but its frame is not one the VM holds.
    LockedFrameNotHeld,
    /// An MMIO2 alias page names a frame of no live region (mapped or not: the A20 gate can
    /// hide it, and opening the gate would map it).
    AliasFrameNotHeld,
    /// A shared frame's reference count differs from the pages that map it and the read locks
    /// that hold it.
    ShareCountWrong,
    /// The reverse map disagrees with the tables: a leaf of a frame no single page owns (or an
    /// A20 alias) is not recorded, a record names a leaf that is not there, or the map's two
    /// indexes differ.
    ReverseMapWrong,
    /// A page write monitoring protects (WRITE_MONITORED as the state machine sees it, or an
    /// unwritten RAM page with a frame while monitoring is on) is writable: neither its leaf
    /// nor an entry above it withholds writes.
    MonitoredPageWritable,
    /// A table entry above a leaf takes away more than write monitoring may: reads or
    /// fetches, or writes while monitoring is off.
    TableEntryRestricts,
}

/// One finding: where, which frame, what is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The guest-physical page concerned (the zero address for a frame with no page).
    pub gpa: GuestPhysAddr,
    /// The host frame concerned, if any.
    pub frame: Option<HostPhysAddr>,
    /// What is wrong.
    pub problem: Problem,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} at {}", self.problem, self.gpa)?;
        if let Some(frame) = self.frame {
            write!(f, " (frame {frame})")?;
        }
        Ok(())
    }
}

/// What an audit saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditReport {
    /// Guest pages the tables map (a 2 MiB leaf counts 512).
    pub mapped_pages: u64,
    /// Frames the VM holds.
    pub held_frames: u64,
    /// Mappings in the reverse map.
    pub recorded_mappings: u64,
    /// Everything found wrong (empty for a sound VM).
    pub findings: Vec<Finding>,
}

impl AuditReport {
    /// True when nothing was found wrong.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Why the VM holds a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    /// The shared zero frame or a shared frame: never writable by the guest.
    ReadOnlyShared,
    /// Held by one page, a ROM, an MMIO2 region, or the caller (special alias).
    Owned,
}

impl<A: HostFrameAllocator, M: HostMemory> Pgm<A, M> {
    /// Audits the VM's EPT against its ownership records. `host_holds(frame)` tells whether the
    /// host's allocator has `frame` allocated (the simulated or kernel bitmap); special-alias
    /// frames are the caller's and are not asked about. Reads only.
    pub fn audit(&self, host_holds: impl Fn(HostPhysAddr) -> bool) -> AuditReport {
        let mut report = AuditReport::default();
        let held = self.held_frames(&mut report, &host_holds);
        report.held_frames = held.len() as u64;
        let mut mapped = BTreeMap::new();
        let mut granted_above = BTreeMap::new();
        self.tables
            .for_each_leaf(&self.memory, |gpa, pages, leaf, above| {
                for page in 0..pages {
                    let at = GuestPhysAddr::new_truncate(gpa.as_u64() + page * PAGE_SIZE);
                    let frame = HostPhysAddr::new_truncate(leaf.frame.as_u64() + page * PAGE_SIZE);
                    mapped.insert(at, Leaf { frame, ..leaf });
                    if above != Permissions::all() {
                        granted_above.insert(at, above);
                    }
                }
            });
        report.mapped_pages = mapped.len() as u64;
        for (&gpa, leaf) in &mapped {
            let above = granted_above.get(&gpa).copied().unwrap_or(Permissions::all());
            self.audit_leaf(gpa, leaf, above, &held, &mut report);
        }
        self.audit_pages(&mapped, &held, &mut report);
        self.audit_reverse_map(&mapped, &mut report);
        report
    }

    /// Checks the reverse map against the leaves: every leaf it must record is recorded with
    /// its frame, every record has its leaf, and the two indexes agree.
    fn audit_reverse_map(&self, mapped: &BTreeMap<GuestPhysAddr, Leaf>, report: &mut AuditReport) {
        report.recorded_mappings = self.reverse.len() as u64;
        let source = self.leaf_source();
        let mut find = |gpa, frame| {
            report.findings.push(Finding {
                gpa,
                frame,
                problem: Problem::ReverseMapWrong,
            })
        };
        for (&gpa, leaf) in mapped {
            if self.reverse.frame_at(gpa) != source.recorded_frame(gpa, Some(*leaf)) {
                find(gpa, Some(leaf.frame));
            }
        }
        for (gpa, frame) in self.reverse.iter() {
            if mapped.get(&gpa).map(|leaf| leaf.frame) != Some(frame) {
                find(gpa, Some(frame));
            }
        }
        if !self.reverse.is_consistent() {
            find(GuestPhysAddr::default(), None);
        }
    }

    /// The frames this VM holds, from its ownership records; records held frames the host has
    /// not got allocated.
    fn held_frames(
        &self,
        report: &mut AuditReport,
        host_holds: &impl Fn(HostPhysAddr) -> bool,
    ) -> BTreeMap<HostPhysAddr, Holder> {
        let mut held = BTreeMap::new();
        let mut hold = |frame: HostPhysAddr, holder: Holder, gpa: GuestPhysAddr, ask_host: bool| {
            if ask_host && !host_holds(frame) {
                report.findings.push(Finding {
                    gpa,
                    frame: Some(frame),
                    problem: Problem::HeldFrameFreed,
                });
            }
            held.insert(frame, holder);
        };
        let nowhere = GuestPhysAddr::default();
        hold(self.zero_frame, Holder::ReadOnlyShared, nowhere, true);
        if let Some(chunk) = self.zero_chunk {
            for page in 0..crate::frames::FRAMES_PER_LARGE_PAGE {
                let frame = HostPhysAddr::new_truncate(chunk.as_u64() + page * PAGE_SIZE);
                hold(frame, Holder::ReadOnlyShared, nowhere, true);
            }
        }
        for &frame in self.shared.keys() {
            hold(frame, Holder::ReadOnlyShared, nowhere, true);
        }
        for rom in &self.roms {
            for &frame in &rom.virgin {
                hold(frame, Holder::Owned, rom.base, true);
            }
        }
        for frame in self.mmio2_region_frames() {
            hold(frame, Holder::Owned, nowhere, true);
        }
        for range in self.ranges.iter() {
            for (index, page) in range.descriptors().enumerate() {
                let gpa = GuestPhysAddr::new_truncate(range.base().as_u64() + index as u64 * PAGE_SIZE);
                let Some(frame) = page.frame() else {
                    continue;
                };
                match page.page_type() {
                    PageType::Ram | PageType::RomShadow if page.state() != PageState::Shared => {
                        hold(frame, Holder::Owned, gpa, true)
                    }
                    PageType::SpecialAliasMmio => hold(frame, Holder::Owned, gpa, false),
                    // Shared frames, MMIO2 frames and MMIO2 aliases borrow their frame: held
                    // only if its owner (sharing, a live region) holds it.
                    _ => {}
                }
            }
        }
        held
    }

    /// Checks one mapped guest page (mapped by `leaf`, under table entries that grant
    /// `above`): the frame, the mapping its page calls for, and what the walk lets the guest
    /// write — a page write monitoring protects must not be writable, and the entries above
    /// may withhold writes only while monitoring is on (see `lazy_protection`).
    fn audit_leaf(
        &self,
        gpa: GuestPhysAddr,
        leaf: &Leaf,
        above: Permissions,
        held: &BTreeMap<HostPhysAddr, Holder>,
        report: &mut AuditReport,
    ) {
        let mut find = |problem| {
            report.findings.push(Finding {
                gpa,
                frame: Some(leaf.frame),
                problem,
            })
        };
        match held.get(&leaf.frame) {
            None => find(Problem::FrameNotHeld),
            Some(Holder::ReadOnlyShared) if leaf.permissions.contains(Permissions::WRITE) => {
                find(Problem::SharedFrameWritable)
            }
            Some(_) => {}
        }
        let may_withhold = if self.monitoring {
            Permissions::WRITE
        } else {
            Permissions::empty()
        };
        if !(above | may_withhold).is_all() {
            find(Problem::TableEntryRestricts);
        }
        let shown = self.a20_apply(gpa);
        let Some(location) = self.ranges.find(shown) else {
            find(Problem::OutsideRanges);
            return;
        };
        let page = self.ranges.page(location);
        if page.page_type() == PageType::Mmio || page.state() == PageState::Ballooned {
            find(Problem::MappedWithoutMemory);
        }
        if !self
            .leaf_source()
            .shows_as_called_for(gpa, *leaf, self.expected_leaf(gpa))
        {
            find(Problem::OutOfSync);
        }
        let writable = (above & leaf.permissions).contains(Permissions::WRITE);
        let page = self.logical_page(location);
        // Unwritten and not protected: a write would go unseen (RAM and shadows are protected
        // by monitoring itself, MMIO2 pages by the rule their region's tracking shares).
        let unseen = self.monitoring
            && self.dirty_log_mode == super::DirtyLogMode::WriteProtect
            && page.state() == PageState::Allocated
            && !page.written_to()
            && page.write_locks() == 0
            && matches!(page.page_type(), PageType::Ram | PageType::RomShadow);
        if writable && (page.state() == PageState::WriteMonitored || unseen) {
            find(Problem::MonitoredPageWritable);
        }
    }

    /// Checks every registered page: its mapping is the one its descriptor calls for (a
    /// missing one too), a locked page's frame is held, and shared counts add up.
    fn audit_pages(
        &self,
        mapped: &BTreeMap<GuestPhysAddr, Leaf>,
        held: &BTreeMap<HostPhysAddr, Holder>,
        report: &mut AuditReport,
    ) {
        let mut sharers: BTreeMap<HostPhysAddr, u64> = BTreeMap::new();
        for (range_index, range) in self.ranges.iter().enumerate() {
            for index in 0..range.page_count() {
                let location = PageLocation {
                    range: range_index,
                    page: index,
                };
                let gpa = self.ranges.gpa_of(location);
                let page = self.ranges.page(location);
                // Mapped pages were compared in `audit_leaf`; here the missing ones. A page the
                // A20 gate redirects is mapped on its first fault, so it may be missing.
                let redirected = self.a20_apply(gpa) != gpa;
                // A block left unmapped for want of a page table is mapped at its next access.
                let unmapped = self.unmapped_blocks.contains(&super::mapping::block_of(gpa));
                if !redirected && !unmapped && !mapped.contains_key(&gpa) && self.expected_leaf(gpa).is_some()
                {
                    report.findings.push(Finding {
                        gpa,
                        frame: page.frame(),
                        problem: Problem::OutOfSync,
                    });
                }
                if page.page_type() == PageType::Mmio2AliasMmio {
                    let frame = page.frame().unwrap_or(self.zero_frame);
                    if !held.contains_key(&frame) {
                        report.findings.push(Finding {
                            gpa,
                            frame: Some(frame),
                            problem: Problem::AliasFrameNotHeld,
                        });
                    }
                }
                if page.is_locked() {
                    let frame = self.read_source(location).unwrap_or(self.zero_frame);
                    if !held.contains_key(&frame) {
                        report.findings.push(Finding {
                            gpa,
                            frame: Some(frame),
                            problem: Problem::LockedFrameNotHeld,
                        });
                    }
                }
                if page.state() == PageState::Shared {
                    if let Some(frame) = page.frame() {
                        *sharers.entry(frame).or_default() += 1;
                    }
                }
            }
        }
        // Read locks of shared pages hold references of their own.
        for (&frame, &pins) in &self.share_pins {
            *sharers.entry(frame).or_default() += pins;
        }
        let frames: BTreeSet<HostPhysAddr> = sharers.keys().chain(self.shared.keys()).copied().collect();
        for frame in frames {
            if sharers.get(&frame) != self.shared.get(&frame) {
                report.findings.push(Finding {
                    gpa: GuestPhysAddr::default(),
                    frame: Some(frame),
                    problem: Problem::ShareCountWrong,
                });
            }
        }
    }
}
