//! A migration's stop-and-copy on one host: a VM paused by its pre-copy
//! ([`crate::precopy`], ending in [`Ending::Migrate`](crate::precopy::Ending)) moves to a new
//! VM made from the same machine spec. The last round and the comparison run on the paused
//! source; its vCPUs' and machine's states are saved ([`crate::vm::snapshot`]); the source is
//! destroyed, giving its frames back; the new VM takes the pre-copy's mirror as its RAM and
//! the saved states, and `machine::run_to_end` runs it on.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use crate::arch::memory::is_allocated;
use crate::arch::ticks;
use crate::precopy::PreCopy;
use crate::vm::budget::Budget;
use crate::vm::devices::MachineSpec;
use crate::vm::snapshot::SavedVcpu;
use crate::vm::Vcpu;
use crate::{println, Host};

/// Audits the EPT of `vcpu`'s VM: every leaf maps a frame the VM holds.
pub fn audit(vcpu: &Vcpu<'_>, which: &str) -> Result<(), String> {
    let report = vcpu.pgm().audit(is_allocated);
    if !report.is_clean() {
        return Err(format!("{which}: EPT audit: {:?}", report.findings));
    }
    println!("{which}: EPT audit clean");
    Ok(())
}

/// A paused VM about to move: its bootstrap vCPU, its other vCPUs' states, and the pre-copy
/// that paused it.
pub struct Source<'a, 'p> {
    /// The bootstrap vCPU (not in a run).
    pub bsp: Vcpu<'a>,
    /// The other vCPUs' states, in index order.
    pub aps: Vec<SavedVcpu>,
    /// The pre-copy, asking for the pause, its mirror the guest's RAM but for the last round.
    pub precopy: &'p mut PreCopy,
}

/// What the VM a guest moves to is made of.
pub struct Target<'r> {
    /// The RAM ranges (the source's).
    pub ram: &'r [(u64, u64)],
    /// The machine (the source's).
    pub spec: &'r MachineSpec,
    /// 2 MiB pages on or off (see `Vcpu::new_with`).
    pub large_pages: bool,
    /// The time and exits each vCPU may use.
    pub budget: Budget,
}

/// A migrated guest's new VM, before it runs: its bootstrap vCPU, loaded, and the states its
/// other vCPUs start with.
pub struct Destination<'a> {
    /// The bootstrap vCPU, with its state.
    pub bsp: Vcpu<'a>,
    /// The states of vCPUs 1.., for `machine::run_to_end`.
    pub aps: Vec<SavedVcpu>,
}

/// The stop-and-copy of a migration: the pre-copy's last round and comparison on the paused
/// source, the source's vCPU and machine states saved, the source VM destroyed (its frames
/// go back to the host), and a new VM made from the same spec, given the copy as its RAM and
/// the saved states.
pub fn migrate<'a>(
    host: &'static Host,
    source: Source<'a, '_>,
    target: &Target<'_>,
) -> Result<Destination<'a>, String> {
    let began = ticks();
    let Source { bsp, aps, precopy } = source;
    let vcpus = 1 + aps.len() as u32;
    let memory = bsp.memory();
    precopy.finish_paused(&memory, vcpus)?;
    let last_round = ticks() - began;
    let bsp_state = bsp.save().map_err(|e| format!("migration: save vCPU 0: {e}"))?;
    let machine_state = memory.save_machine();
    let audit_began = ticks();
    audit(&bsp, "migration: the source")?;
    let audit_ticks = ticks() - audit_began;
    println!("migration: exits of the source's bootstrap vCPU: {:?}", bsp.exits);
    drop(memory);
    drop(bsp);
    let vmx = host.virt().map_err(|e| format!("{e}"))?;
    let mut destination = Vcpu::new_machine_from(
        vmx,
        &host.phys,
        target.ram,
        target.large_pages,
        target.spec,
        Some(machine_state),
    )
    .map_err(|e| format!("migration: the destination VM: {e}"))?;
    let load_began = ticks();
    let loaded = precopy.load_into(&destination.memory())?;
    let load_ticks = ticks() - load_began;
    destination
        .restore(&bsp_state)
        .map_err(|e| format!("migration: restore vCPU 0: {e}"))?;
    destination.set_budget(target.budget);
    println!(
        "migration: the source VM is gone; the guest resumed in a second VM on its copy: {loaded} \
         pages of RAM and {vcpus} vCPUs' state moved in {} ticks (the last round and the \
         comparison {last_round}, loading the copy {load_ticks}; the source's audit aside)",
        ticks() - began - audit_ticks
    );
    Ok(Destination {
        bsp: destination,
        aps,
    })
}
