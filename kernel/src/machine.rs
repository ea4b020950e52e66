//! Running a whole VM: its bootstrap vCPU on this host CPU and its application processors on
//! the others (in turns of one slice where there are more vCPUs than CPUs), until the run is
//! over. The kvm-unit-tests runner and the Linux boot share it.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::arch::smp;
use crate::vm::budget::Budget;
use crate::vm::snapshot::SavedVcpu;
use crate::vm::{StopCause, Vcpu, VmMemory, VmStop};
use crate::Host;

/// The RAM ranges of a PC with `bytes` of memory, as QEMU lays them out: 640 KiB low memory,
/// then from 1 MiB up to 3 GiB, the rest from 4 GiB (the hole holds the APIC page and the
/// test device).
#[cfg_attr(feature = "kernel-tests", allow(dead_code))]
pub fn pc_ram(bytes: u64) -> Vec<(u64, u64)> {
    const LOW_END: u64 = 0xC000_0000;
    let mut ram = alloc::vec![(0, 0xA_0000), (0x10_0000, bytes.min(LOW_END) - 0x10_0000)];
    if bytes > LOW_END {
        ram.push((0x1_0000_0000, bytes - LOW_END));
    }
    ram
}

/// What the host wants after a slice of the bootstrap vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// The VM runs on.
    Run,
    /// Every vCPU stops where it is, for good, with its state saved (a migration's
    /// stop-and-copy).
    Pause,
}

/// What the host does between two slices of the bootstrap vCPU (which is not in a run then;
/// the other vCPUs may be): an error ends the VM's run with it.
pub type BetweenSlices<'a> = &'a mut dyn FnMut(&Vcpu<'_>) -> Result<Next, String>;

/// How a VM's run ended.
pub enum RunEnd {
    /// The guest's run is over: the bootstrap vCPU's stop, or when that is only "stopped by
    /// another vCPU", that vCPU's own.
    Stopped(VmStop),
    /// The host paused the VM ([`Next::Pause`]): every vCPU stopped between two
    /// instructions. The application processors' states, in index order (the bootstrap
    /// vCPU's is still in it).
    Paused(Vec<SavedVcpu>),
}

impl RunEnd {
    /// The stop of a run that nothing could pause (its `between_slices` never asks to); a
    /// pause is an error naming `what` ran.
    pub fn into_stop(self, what: &str) -> Result<VmStop, String> {
        match self {
            RunEnd::Stopped(stop) => Ok(stop),
            RunEnd::Paused(_) => Err(format!("{what}: the run was paused, which nothing asked for")),
        }
    }
}

/// Runs the VM of `bsp` (its bootstrap vCPU, loaded and with its budget set) with `vcpus`
/// vCPUs in all until its run is over or the host pauses it, calling `between_slices` after
/// each slice of `bsp`. The application processors start waiting for INIT and a startup
/// message, or with the states `saved` (of vCPUs 1.. of a paused VM whose guest this one
/// takes over: a migration's destination). Every vCPU has ended when it returns; `bsp` (and its VM)
/// remain for the caller to inspect or save.
pub fn run_to_end(
    host: &'static Host,
    bsp: &mut Vcpu<'_>,
    vcpus: u32,
    saved: Vec<SavedVcpu>,
    between_slices: BetweenSlices<'_>,
) -> Result<RunEnd, String> {
    let memory = bsp.memory();
    let aps = start_application_processors(host, &memory, vcpus, bsp.budget(), saved)?;
    let outcome = run_bootstrap(bsp, &aps.done, between_slices);
    let pause = matches!(outcome, Ok(BootstrapEnd::Paused));
    aps.pause.store(pause, Ordering::SeqCst);
    aps.done.store(true, Ordering::SeqCst);
    memory.stop_all_vcpus();
    let mut ap_stops = Vec::new();
    let mut ap_states = Vec::new();
    for worker in aps.workers {
        let (stops, states) = worker.join()?;
        ap_stops.extend(stops);
        ap_states.extend(states);
    }
    let mut stop = match outcome? {
        BootstrapEnd::Stopped(stop) => stop,
        BootstrapEnd::Paused => {
            if let Some(stop) = ap_stops.first() {
                return Err(format!("a vCPU had stopped for good before the pause: {stop:?}"));
            }
            ap_states.sort_by_key(|state| state.index);
            return Ok(RunEnd::Paused(ap_states));
        }
    };
    if let VmStop::Stopped(diagnostic) = &stop {
        if diagnostic.cause == StopCause::VmStopped {
            if let Some(cause) = ap_stops
                .into_iter()
                .find(|s| matches!(s, VmStop::Stopped(d) if d.cause.stops_vm()))
            {
                stop = cause;
            }
        }
    }
    Ok(RunEnd::Stopped(stop))
}

/// How the bootstrap vCPU's part of a run ended.
enum BootstrapEnd {
    /// It stopped for good.
    Stopped(VmStop),
    /// The host paused the VM.
    Paused,
}

/// Runs the bootstrap vCPU until the VM's run is over (a stop that is not a slice's end) or
/// the host pauses it, with `between_slices` after each slice.
fn run_bootstrap(
    bsp: &mut Vcpu<'_>,
    done: &AtomicBool,
    between_slices: BetweenSlices<'_>,
) -> Result<BootstrapEnd, String> {
    loop {
        match bsp.run() {
            VmStop::Preempted { .. } | VmStop::StopRequested { .. } if !done.load(Ordering::SeqCst) => {
                if between_slices(bsp)? == Next::Pause {
                    break Ok(BootstrapEnd::Paused);
                }
            }
            stop => break Ok(BootstrapEnd::Stopped(stop)),
        }
    }
}

/// What an application processors' host thread returns: how each of its vCPUs' runs ended
/// for good, and, after a pause, the states of the others.
type ApOutcome = (Vec<VmStop>, Vec<SavedVcpu>);

/// The application processors' host threads.
struct ApWorkers {
    workers: Vec<smp::Task<Result<ApOutcome, String>>>,
    /// Set when the VM's run is over: the workers return.
    done: Arc<AtomicBool>,
    /// Set (before `done`) when the run ends in a pause: the workers save their vCPUs.
    pause: Arc<AtomicBool>,
}

/// Creates vCPUs 1.. of the VM on the other host CPUs (round-robin; a CPU with several runs
/// them in turns of one slice), in index order so that each gets the APIC ID of its index,
/// each waiting for INIT and a startup message or with its state from `saved`.
fn start_application_processors(
    host: &'static Host,
    memory: &Arc<VmMemory>,
    vcpus: u32,
    budget: Budget,
    saved: Vec<SavedVcpu>,
) -> Result<ApWorkers, String> {
    let done = Arc::new(AtomicBool::new(false));
    let pause = Arc::new(AtomicBool::new(false));
    let others: Vec<usize> = smp::ready_cpus()
        .map(|cpu| cpu.index)
        .filter(|&index| index != smp::this_cpu().index)
        .collect();
    if vcpus > 1 && others.is_empty() {
        return Err(format!("{vcpus} vCPUs need a second host CPU"));
    }
    if let Some(state) = saved.iter().find(|state| !(1..vcpus).contains(&state.index)) {
        return Err(format!("a saved state for vCPU {} of {vcpus}", state.index));
    }
    let next = Arc::new(AtomicU32::new(1));
    let mut workers = Vec::new();
    for (slot, &cpu) in others.iter().enumerate() {
        let mine: Vec<(u32, Option<SavedVcpu>)> = (1..vcpus)
            .filter(|i| (*i as usize - 1) % others.len() == slot)
            .map(|i| (i, saved.iter().find(|state| state.index == i).cloned()))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let (memory, next) = (Arc::clone(memory), Arc::clone(&next));
        let ends = (Arc::clone(&done), Arc::clone(&pause));
        let task = smp::spawn_on(cpu, move || ap_worker(host, memory, mine, next, ends, budget))
            .map_err(|e| format!("{e}"))?;
        workers.push(task);
    }
    // Every vCPU exists before the bootstrap vCPU can send it INIT.
    while next.load(Ordering::SeqCst) < vcpus {
        if workers.iter().any(|w| w.is_done()) {
            break;
        }
        core::hint::spin_loop();
    }
    Ok(ApWorkers { workers, done, pause })
}

/// One host CPU's application processors: made in index order (each waiting for a startup
/// message, or with its saved state), then run in turns until the VM's run is over
/// (`ends.0`). Returns how each one's run ended for good and, when the run ended in a pause
/// (`ends.1`), the states of the others.
fn ap_worker(
    host: &'static Host,
    memory: Arc<VmMemory>,
    mine: Vec<(u32, Option<SavedVcpu>)>,
    next: Arc<AtomicU32>,
    ends: (Arc<AtomicBool>, Arc<AtomicBool>),
    budget: Budget,
) -> Result<ApOutcome, String> {
    let (done, pause) = ends;
    let vmx = host.virt().map_err(|e| format!("{e}"))?;
    let mut vcpus = Vec::new();
    for (index, saved) in mine {
        while next.load(Ordering::SeqCst) != index {
            core::hint::spin_loop();
        }
        let made = Vcpu::new_vcpu(vmx, Arc::clone(&memory), &host.phys);
        next.fetch_add(1, Ordering::SeqCst);
        let mut vcpu = made.map_err(|e| format!("vCPU {index}: {e}"))?;
        match saved {
            Some(state) => vcpu
                .restore(&state)
                .map_err(|e| format!("vCPU {index}: restore: {e}"))?,
            None => vcpu.wait_for_startup(),
        }
        vcpu.set_budget(budget);
        vcpus.push((vcpu, None));
    }
    while !done.load(Ordering::SeqCst) {
        for (vcpu, finished) in vcpus.iter_mut().filter(|(_, finished)| finished.is_none()) {
            match vcpu.run() {
                VmStop::Preempted { .. } | VmStop::StopRequested { .. } => {}
                // An AP that halted for good or stopped leaves the others running; a stop of
                // the whole VM reaches the bootstrap vCPU through its requests.
                stop => *finished = Some(stop),
            }
        }
        if vcpus.iter().all(|(_, finished)| finished.is_some()) {
            break;
        }
    }
    let mut states = Vec::new();
    if pause.load(Ordering::SeqCst) {
        for (vcpu, _) in vcpus.iter().filter(|(_, finished)| finished.is_none()) {
            states.push(
                vcpu.save()
                    .map_err(|e| format!("vCPU {}: save: {e}", vcpu.index()))?,
            );
        }
    }
    let stops = vcpus.into_iter().filter_map(|(_, stop)| stop).collect();
    Ok((stops, states))
}
