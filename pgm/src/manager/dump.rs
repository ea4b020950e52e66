//! The guest-physical map as text, like QEMU's `info mtree` and VirtualBox's `info phys`: one
//! line per run of pages of one kind — RAM (with the handler over it), MMIO, MMIO2, ROM — with
//! its name, its registration and, for pages under the page-state machine, how many pages are
//! in each state.

use alloc::string::String;
use core::fmt::Write;

use super::{Mmio2Handle, Pgm, RomId, RomProtection};
use crate::addr::PAGE_SIZE;
use crate::frames::{HostFrameAllocator, HostMemory};
use crate::handlers::{HandlerId, HandlerKind};
use crate::page::{PageState, PageType};
use crate::paging::EntryFormat;
use crate::ram::PageLocation;

/// What a run of pages is: consecutive pages with the same kind form one line.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ram {
        handler: Option<(HandlerId, HandlerKind)>,
    },
    Mmio {
        region: Option<HandlerId>,
    },
    Mmio2 {
        region: Option<Mmio2Handle>,
    },
    Rom {
        id: Option<RomId>,
        shadowed: bool,
        protection: Option<RomProtection>,
    },
}

/// A run being collected: where it starts and ends, its kind and name, its page counts.
struct Run {
    start: u64,
    end: u64,
    kind: Kind,
    name: &'static str,
    /// Pages per state (ZERO, ALLOCATED, WRITE_MONITORED, SHARED, BALLOONED), for pages under
    /// the state machine.
    states: [u64; 5],
    /// MMIO pages aliased to memory.
    aliased: u64,
}

/// # The physical map dump (the seed's `info phys`)
impl<A: HostFrameAllocator, M: HostMemory, F: EntryFormat> Pgm<A, M, F> {
    /// The guest-physical map, one line per run of pages of one kind in address order
    /// (unassigned space is left out), after a header line with the A20 gate and write
    /// monitoring. Costs one pass over every page: a debugging aid, not for the fault path.
    pub fn physical_map(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "guest-physical map: A20 {}, write monitoring {}",
            if self.a20_enabled { "open" } else { "closed" },
            if self.monitoring { "on" } else { "off" }
        );
        let mut run: Option<Run> = None;
        for (range_index, range) in self.ranges.iter().enumerate() {
            for page in 0..range.page_count() {
                let location = PageLocation {
                    range: range_index,
                    page,
                };
                let gpa = self.ranges.gpa_of(location);
                let kind = self.kind_of(location);
                let continues = run
                    .as_ref()
                    .is_some_and(|r| r.end == gpa.as_u64() && r.kind == kind && r.name == range.name());
                if !continues {
                    if let Some(done) = run.take() {
                        self.write_run(&mut text, &done);
                    }
                    run = Some(Run {
                        start: gpa.as_u64(),
                        end: gpa.as_u64(),
                        kind,
                        name: range.name(),
                        states: [0; 5],
                        aliased: 0,
                    });
                }
                if let Some(current) = run.as_mut() {
                    current.end += PAGE_SIZE;
                    let descriptor = self.logical_page(location);
                    match descriptor.page_type() {
                        PageType::Ram | PageType::RomShadow => {
                            current.states[descriptor.state() as usize] += 1
                        }
                        PageType::Mmio2AliasMmio | PageType::SpecialAliasMmio => current.aliased += 1,
                        PageType::Mmio | PageType::Mmio2 | PageType::Rom => {}
                    }
                }
            }
        }
        if let Some(done) = run {
            self.write_run(&mut text, &done);
        }
        text
    }

    fn kind_of(&self, location: PageLocation) -> Kind {
        let page = self.ranges.page(location);
        let gpa = self.ranges.gpa_of(location);
        let registration = self.handlers.covering(gpa);
        match page.page_type() {
            PageType::Ram => Kind::Ram {
                handler: registration.map(|r| (r.id, r.kind)),
            },
            PageType::Mmio | PageType::Mmio2AliasMmio | PageType::SpecialAliasMmio => Kind::Mmio {
                region: registration.map(|r| r.id),
            },
            PageType::Mmio2 => Kind::Mmio2 {
                region: self.mmio2_at(gpa),
            },
            PageType::Rom | PageType::RomShadow => {
                let rom = self.rom_covering(gpa);
                Kind::Rom {
                    id: rom.map(|rom| rom.id),
                    shadowed: page.page_type() == PageType::RomShadow,
                    protection: self.rom_protection_at(gpa),
                }
            }
        }
    }

    fn write_run(&self, text: &mut String, run: &Run) {
        let _ = write!(text, "{:#014x}-{:#014x} ", run.start, run.end - 1);
        let _ = match run.kind {
            Kind::Ram { handler: None } => write!(text, "ram   {:<8}", run.name),
            Kind::Ram {
                handler: Some((id, kind)),
            } => write!(
                text,
                "ram   {:<8} handler #{} {}",
                run.name,
                id.0,
                kind_name(kind)
            ),
            Kind::Mmio { region } => write!(
                text,
                "mmio  {:<8} region #{}",
                run.name,
                id_or_dash(region.map(|r| r.0))
            ),
            Kind::Mmio2 { region } => {
                let _ = write!(
                    text,
                    "mmio2 {:<8} region #{}",
                    run.name,
                    id_or_dash(region.map(|r| r.0))
                );
                match region {
                    Some(handle) => write!(
                        text,
                        " device {} no {} tracking {}",
                        self.mmio2_device(handle).map_or(0, |d| d.0),
                        self.mmio2_region_no(handle).unwrap_or(0),
                        if self.mmio2_dirty_tracking(handle) == Some(true) {
                            "on"
                        } else {
                            "off"
                        }
                    ),
                    None => Ok(()),
                }
            }
            Kind::Rom {
                id,
                shadowed,
                protection,
            } => write!(
                text,
                "rom   {:<8} #{} {} {}",
                run.name,
                id_or_dash(id.map(|id| id.0)),
                if shadowed { "shadowed" } else { "unshadowed" },
                protection.map_or("-", protection_name)
            ),
        };
        const STATES: [(PageState, &str); 5] = [
            (PageState::Zero, "zero"),
            (PageState::Allocated, "allocated"),
            (PageState::WriteMonitored, "monitored"),
            (PageState::Shared, "shared"),
            (PageState::Ballooned, "ballooned"),
        ];
        for (state, name) in STATES {
            let count = run.states[state as usize];
            if count > 0 {
                let _ = write!(text, " {name} {count}");
            }
        }
        if run.aliased > 0 {
            let _ = write!(text, " aliased {}", run.aliased);
        }
        text.push('\n');
    }
}

fn kind_name(kind: HandlerKind) -> &'static str {
    match kind {
        HandlerKind::Write => "write",
        HandlerKind::All => "all",
    }
}

fn protection_name(protection: RomProtection) -> &'static str {
    match protection {
        RomProtection::ReadRomWriteIgnore => "read-rom/write-ignore",
        RomProtection::ReadRomWriteRam => "read-rom/write-ram",
        RomProtection::ReadRamWriteIgnore => "read-ram/write-ignore",
        RomProtection::ReadRamWriteRam => "read-ram/write-ram",
    }
}

fn id_or_dash(id: Option<u32>) -> String {
    id.map_or_else(|| String::from("-"), |id| alloc::format!("{id}"))
}
