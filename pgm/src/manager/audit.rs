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
use crate::paging::EntryFormat;
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
    /// An A20-alias record (a page outside every range mapped as the alias of the page 1 MiB
    /// below) that the gate or the ranges no longer justify: the gate is open, the address
    /// lacks bit 20, a range covers it, or it is recorded twice.
    StaleA20Alias,
    /// A written-list entry (a page to report at the next harvest) for an address no range
    /// covers, listed twice, or listed while write monitoring is off.
    StaleWrittenEntry,
    /// A frame in the VM's pool (handy, free batch, or awaiting a TLB flush) that a page, ROM,
    /// MMIO2 region or shared-frame count also holds, or that the host has free.
    PoolFrameInUse,
    /// An overflow lock count for a page no range covers, or whose descriptor does not show
    /// the saturated count that sends its locks to the overflow table; or a count of locked
    /// pages that differs from the pages whose descriptors hold locks.
    StaleLockCount,
    /// A ROM or MMIO2 region record the ranges do not show: a ROM whose pages are not ROM
    /// pages of a range, or an MMIO2 region recorded as mapped whose pages are not its MMIO2
    /// pages with its frames. Or a kept count of MMIO or ROM pages that differs from the
    /// pages the MMIO registrations and ROMs cover.
    StaleRegionRecord,
    /// A page's handler state disagrees with the registrations: a page under a handler that
    /// neither shows its kind nor is disabled, a page outside every handler that shows one,
    /// or a registration over a page no range covers.
    HandlerStateWrong,
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

/// A map built once and then only read: a vector sorted by key (the auditor builds its maps
/// of every frame and every leaf anew on each call, where a B-tree's inserts cost most of
/// the audit).
struct SortedMap<K, V>(Vec<(K, V)>);

impl<K: Ord + Copy, V> SortedMap<K, V> {
    /// From `entries` in any order; of equal keys, the last one stays.
    fn from_unsorted(mut entries: Vec<(K, V)>) -> Self {
        entries.reverse();
        // Stable: of equal keys, the one given last comes first, and `dedup` keeps it.
        entries.sort_by_key(|&(key, _)| key);
        entries.dedup_by_key(|&mut (key, _)| key);
        SortedMap(entries)
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.0
            .binary_search_by_key(key, |&(key, _)| key)
            .ok()
            .map(|index| &self.0[index].1)
    }

    fn contains_key(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(key, value)| (key, value))
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

/// # Auditing (the isolation invariant, checked from the tables up)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// Audits the VM's EPT against its ownership records. `host_holds(frame)` tells whether the
    /// host's allocator has `frame` allocated (the simulated or kernel bitmap); special-alias
    /// frames are the caller's and are not asked about. Reads only.
    pub fn audit(&self, host_holds: impl Fn(HostPhysAddr) -> bool) -> AuditReport {
        let mut report = AuditReport::default();
        let held = self.held_frames(&mut report, &host_holds);
        report.held_frames = held.len() as u64;
        let mut leaves = Vec::new();
        self.tables
            .for_each_leaf(&self.memory, |gpa, pages, leaf, above| {
                for page in 0..pages {
                    let at = GuestPhysAddr::new_truncate(gpa.as_u64() + page * PAGE_SIZE);
                    let frame = HostPhysAddr::new_truncate(leaf.frame.as_u64() + page * PAGE_SIZE);
                    leaves.push((at, (Leaf { frame, ..leaf }, above)));
                }
            });
        let walked = SortedMap::from_unsorted(leaves);
        report.mapped_pages = walked.len() as u64;
        for (&gpa, &(leaf, above)) in walked.iter() {
            self.audit_leaf(gpa, &leaf, above, &held, &mut report);
        }
        let mapped = SortedMap(walked.0.into_iter().map(|(gpa, (leaf, _))| (gpa, leaf)).collect());
        self.audit_pages(&mapped, &held, &mut report);
        self.audit_reverse_map(&mapped, &mut report);
        self.audit_side_records(&held, &host_holds, &mut report);
        report
    }

    /// Checks that every entry of the side lists is justified by the descriptors and the
    /// gate, each by the rule that ties it to them (see the manager's `Pgm` fields): a stale
    /// entry is a finding before it ever writes a wrong leaf. The reverse map is checked
    /// against the leaves in [`audit_reverse_map`](Self::audit_reverse_map), the shared-frame
    /// counts in `audit_pages`; a block left unmapped for want of a page table is recorded in
    /// its own directory entry, so it has no side record to drift.
    fn audit_side_records(
        &self,
        held: &SortedMap<HostPhysAddr, Holder>,
        host_holds: &impl Fn(HostPhysAddr) -> bool,
        report: &mut AuditReport,
    ) {
        let mut find = |gpa, frame, problem| report.findings.push(Finding { gpa, frame, problem });
        let mut aliases = BTreeSet::new();
        for &alias in &self.a20_aliases {
            let justified = !self.a20_enabled
                && alias.as_u64() & super::A20_BIT != 0
                && self.ranges.find(alias).is_none()
                && aliases.insert(alias);
            if !justified {
                find(alias, None, Problem::StaleA20Alias);
            }
        }
        let mut listed = BTreeSet::new();
        for &gpa in &self.written {
            if !self.monitoring || self.ranges.find(gpa).is_none() || !listed.insert(gpa) {
                find(gpa, None, Problem::StaleWrittenEntry);
            }
        }
        let nowhere = GuestPhysAddr::default();
        for frame in self.pool.frames() {
            if held.contains_key(&frame) || !host_holds(frame) {
                find(nowhere, Some(frame), Problem::PoolFrameInUse);
            }
        }
        for registration in self.handlers.iter() {
            for page in 0..registration.pages {
                let gpa = GuestPhysAddr::new_truncate(registration.base.as_u64() + page * PAGE_SIZE);
                if self.ranges.find(gpa).is_none() {
                    find(gpa, None, Problem::HandlerStateWrong);
                }
            }
        }
        for rom in &self.roms {
            for page in 0..rom.pages() {
                let gpa = GuestPhysAddr::new_truncate(rom.base.as_u64() + page * PAGE_SIZE);
                let shown = self
                    .ranges
                    .find(gpa)
                    .map(|location| self.ranges.page(location).page_type());
                if !matches!(shown, Some(PageType::Rom | PageType::RomShadow)) {
                    find(gpa, None, Problem::StaleRegionRecord);
                }
            }
        }
        for (base, frames) in self.mmio2_mappings() {
            for (page, &frame) in frames.iter().enumerate() {
                let gpa = GuestPhysAddr::new_truncate(base.as_u64() + page as u64 * PAGE_SIZE);
                let shown = self.ranges.find(gpa).map(|location| self.ranges.page(location));
                if !shown
                    .is_some_and(|page| page.page_type() == PageType::Mmio2 && page.frame() == Some(frame))
                {
                    find(gpa, Some(frame), Problem::StaleRegionRecord);
                }
            }
        }
        let mmio_pages: u64 = self
            .handlers
            .iter()
            .filter(|registration| registration.mmio.is_some())
            .map(|registration| registration.pages)
            .sum();
        let rom_pages: u64 = self.roms.iter().map(|rom| rom.pages()).sum();
        if (mmio_pages, rom_pages) != (self.counts.mmio, self.counts.rom) {
            find(GuestPhysAddr::default(), None, Problem::StaleRegionRecord);
        }
        let (mut read_locked, mut write_locked) = (0, 0);
        for range in self.ranges.iter() {
            for page in range.descriptors() {
                read_locked += u64::from(page.read_locks() > 0);
                write_locked += u64::from(page.write_locks() > 0);
            }
        }
        if (read_locked, write_locked) != (self.locked_pages.read, self.locked_pages.write) {
            find(GuestPhysAddr::default(), None, Problem::StaleLockCount);
        }
        for &(gpa, write) in self.lock_overflow.keys() {
            let saturated = self.ranges.find(gpa).is_some_and(|location| {
                let page = self.ranges.page(location);
                let inline = if write {
                    page.write_locks()
                } else {
                    page.read_locks()
                };
                inline >= crate::page::INLINE_LOCKS_MAX
            });
            if !saturated {
                find(gpa, None, Problem::StaleLockCount);
            }
        }
    }

    /// Checks the reverse map against the leaves: every leaf it must record is recorded with
    /// its frame, every record has its leaf, and the two indexes agree.
    fn audit_reverse_map(&self, mapped: &SortedMap<GuestPhysAddr, Leaf>, report: &mut AuditReport) {
        report.recorded_mappings = self.reverse.len() as u64;
        let source = self.leaf_source();
        let mut find = |gpa, frame| {
            report.findings.push(Finding {
                gpa,
                frame,
                problem: Problem::ReverseMapWrong,
            })
        };
        for (&gpa, leaf) in mapped.iter() {
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
    ) -> SortedMap<HostPhysAddr, Holder> {
        let mut held = Vec::new();
        let mut hold = |frame: HostPhysAddr, holder: Holder, gpa: GuestPhysAddr, ask_host: bool| {
            if ask_host && !host_holds(frame) {
                report.findings.push(Finding {
                    gpa,
                    frame: Some(frame),
                    problem: Problem::HeldFrameFreed,
                });
            }
            held.push((frame, holder));
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
        SortedMap::from_unsorted(held)
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
        held: &SortedMap<HostPhysAddr, Holder>,
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
        // Only write-protect mode arms protection above the leaves; PML leaves them writable.
        let may_withhold = if self.monitoring && self.dirty_log_mode == super::DirtyLogMode::WriteProtect {
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
        mapped: &SortedMap<GuestPhysAddr, Leaf>,
        held: &SortedMap<HostPhysAddr, Holder>,
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
                // A block awaiting tables is mapped at its next access.
                let unmapped = self.tables.awaits_tables(&self.memory, gpa);
                if !redirected && !unmapped && !mapped.contains_key(&gpa) && self.expected_leaf(gpa).is_some()
                {
                    report.findings.push(Finding {
                        gpa,
                        frame: page.frame(),
                        problem: Problem::OutOfSync,
                    });
                }
                let handler = page.handler();
                let agrees = match self.handlers.covering(gpa) {
                    Some(registration) => {
                        handler == registration.kind.page_state()
                            || handler == crate::page::HandlerState::Disabled
                    }
                    None => handler == crate::page::HandlerState::None,
                };
                if !agrees {
                    report.findings.push(Finding {
                        gpa,
                        frame: page.frame(),
                        problem: Problem::HandlerStateWrong,
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

#[cfg(test)]
#[allow(unused_must_use)] // no TLB to flush in the simulation (see lib.rs)
mod tests {
    use super::*;
    use crate::handlers::HandlerKind;
    use crate::paging::Access;
    use crate::test_support::*;

    fn problems(pgm: &SimPgm) -> Vec<Problem> {
        pgm.audit_simulated().findings.iter().map(|f| f.problem).collect()
    }

    /// A planted record must be the only thing wrong, and found as `problem`.
    fn only(pgm: &SimPgm, problem: Problem) {
        let found = problems(pgm);
        assert!(!found.is_empty(), "the planted {problem:?} went unnoticed");
        assert!(found.iter().all(|&p| p == problem), "{found:?}");
    }

    #[test]
    fn the_auditor_finds_a_planted_a20_alias_record_the_gate_does_not_justify() {
        let mut pgm = pgm_with_frames(1024);
        pgm.register_ram(gpa(0), MIB, "low").unwrap();
        pgm.register_ram(gpa(MIB), MIB, "high").unwrap();
        assert!(problems(&pgm).is_empty());
        // Gate open: no alias may be recorded.
        pgm.a20_aliases.push(gpa(0x30_0000 | MIB));
        only(&pgm, Problem::StaleA20Alias);
        // Gate closed, but the address lies in a range (a record that outlived the space it
        // was made for).
        pgm.a20_aliases.clear();
        let _ = pgm.set_a20(false);
        assert!(problems(&pgm).is_empty());
        pgm.a20_aliases.push(gpa(MIB + 0x1000));
        only(&pgm, Problem::StaleA20Alias);
    }

    #[test]
    fn the_auditor_finds_a_planted_written_entry_for_space_no_range_covers() {
        let mut pgm = pgm_with_frames(1024);
        pgm.register_ram(gpa(0), MIB, "low").unwrap();
        let _ = pgm.start_write_monitoring();
        guest_write(&mut pgm, gpa(0x2000), &[1]);
        assert!(problems(&pgm).is_empty());
        pgm.written.push(gpa(0x20_0000));
        only(&pgm, Problem::StaleWrittenEntry);
        pgm.written.retain(|&gpa| gpa.as_u64() < MIB);
        let _ = pgm.stop_write_monitoring();
        assert!(problems(&pgm).is_empty());
        pgm.written.push(gpa(0x2000));
        only(&pgm, Problem::StaleWrittenEntry);
    }

    #[test]
    fn the_auditor_finds_a_planted_pool_frame_a_page_still_holds() {
        let mut pgm = pgm_with_frames(1024);
        pgm.register_ram(gpa(0), MIB, "low").unwrap();
        guest_write(&mut pgm, gpa(0x3000), &[1]);
        let frame = pgm.translate(gpa(0x3000), Access::Read).unwrap();
        assert!(problems(&pgm).is_empty());
        // As if the frame had been released to the pool while its page kept it.
        pgm.pool.discard(frame);
        only(&pgm, Problem::PoolFrameInUse);
        // Teardown would free the frame twice (the simulated host panics on that).
        core::mem::forget(pgm);
    }

    #[test]
    fn the_auditor_finds_a_planted_overflow_lock_count() {
        let mut pgm = pgm_with_frames(1024);
        pgm.register_ram(gpa(0), MIB, "low").unwrap();
        let lock = pgm.lock_page_for_read(gpa(0x4000)).unwrap().lock;
        assert!(problems(&pgm).is_empty());
        pgm.lock_overflow.insert((gpa(0x4000), false), 100);
        only(&pgm, Problem::StaleLockCount);
        pgm.lock_overflow.clear();
        pgm.release_page_lock(lock);
        assert!(problems(&pgm).is_empty());
    }

    #[test]
    fn the_auditor_finds_planted_region_records_and_counts() {
        let mut pgm = pgm_with_frames(1024);
        pgm.register_ram(gpa(0), MIB, "low").unwrap();
        let region = pgm.create_mmio2(mmio2_spec(2 * PAGE_SIZE, 0)).unwrap();
        pgm.map_mmio2(region, gpa(0x20_0000)).unwrap();
        let rom = register_rom_copy(&mut pgm, gpa(0x30_0000), &[0xAB; 4096], false).unwrap();
        assert!(problems(&pgm).is_empty());
        // A ROM record moved off its pages.
        let base = pgm.roms[0].base;
        pgm.roms[0].base = gpa(0x5000);
        assert!(problems(&pgm).contains(&Problem::StaleRegionRecord));
        pgm.roms[0].base = base;
        // A kept MMIO count off by one.
        pgm.counts.mmio += 1;
        only(&pgm, Problem::StaleRegionRecord);
        pgm.counts.mmio -= 1;
        // A locked-page count with no locked page.
        pgm.locked_pages.read += 1;
        only(&pgm, Problem::StaleLockCount);
        pgm.locked_pages.read -= 1;
        assert!(problems(&pgm).is_empty());
        // An MMIO2 region recorded as mapped where its page now names another frame.
        let location = pgm.ranges.find(gpa(0x20_1000)).unwrap();
        let page = pgm.ranges.page(location);
        let other = pgm.translate(gpa(0x20_0000), Access::Read).unwrap();
        pgm.ranges.set_page(
            location,
            crate::page::PageDescriptor::allocated(PageType::Mmio2, other),
        );
        assert!(problems(&pgm).contains(&Problem::StaleRegionRecord));
        pgm.ranges.set_page(location, page);
        assert!(problems(&pgm).is_empty());
        let _ = pgm.deregister_rom(rom).unwrap();
    }

    #[test]
    fn the_auditor_finds_page_handler_states_the_registrations_do_not_justify() {
        let mut pgm = pgm_with_frames(1024);
        pgm.register_ram(gpa(0), MIB, "low").unwrap();
        let (id, _) = pgm
            .register_handler(HandlerKind::Write, gpa(0x5000), 2 * PAGE_SIZE)
            .unwrap();
        assert!(problems(&pgm).is_empty());
        // The registration forgotten, its pages still handled.
        let registration = pgm.handlers.remove(id).unwrap();
        only(&pgm, Problem::HandlerStateWrong);
        // A registration over space no range covers.
        let _ = pgm.handlers.insert(registration.kind, gpa(0x20_0000), 1, None);
        assert!(problems(&pgm).contains(&Problem::HandlerStateWrong));
    }

    #[test]
    #[cfg(not(feature = "sim-npt"))] // PML is EPT's
    fn the_auditor_finds_protection_armed_above_the_leaves_in_pml_mode() {
        let mut pgm = pgm_with_frames(1024);
        pgm.register_ram(gpa(0), MIB, "low").unwrap();
        guest_write(&mut pgm, gpa(0x2000), &[1]);
        pgm.set_dirty_log_mode(crate::manager::DirtyLogMode::Pml).unwrap();
        let _ = pgm.start_write_monitoring();
        assert!(problems(&pgm).is_empty());
        // PML leaves every page writable: nothing may be withheld above the leaves.
        let _ = pgm.tables.withhold_writes_from_root(&mut pgm.memory);
        assert!(problems(&pgm).contains(&Problem::TableEntryRestricts));
    }

    /// The state the stale "unmapped block" record used to describe now lives in the block's
    /// directory entry, so it cannot outlive the mapping. A block whose entry is simply
    /// absent, not marked as awaiting tables, is a mapping lost, and found.
    #[test]
    fn the_auditor_tells_a_block_awaiting_tables_from_a_lost_one() {
        let mut pgm = pgm_with_defaults(2048);
        pgm.register_ram(gpa(0x60_0000), 2 * MIB, "block").unwrap();
        pgm.frames_mut().fail_after = Some(0);
        let _ = pgm
            .register_handler(HandlerKind::All, gpa(0x60_5000), PAGE_SIZE)
            .unwrap();
        assert!(pgm.awaits_tables(gpa(0x60_0000)));
        assert!(problems(&pgm).is_empty(), "awaiting tables is a sound state");
        // Clear the marker: the directory entry is now just absent.
        let marker = pgm
            .tables
            .directory_entry_addr(&pgm.memory, gpa(0x60_0000))
            .unwrap();
        pgm.memory.write_u64(marker, 0);
        assert!(!pgm.awaits_tables(gpa(0x60_0000)));
        only(&pgm, Problem::OutOfSync);
    }
}
