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
use crate::vm::{StopCause, Vcpu, VmMemory, VmStop};
use crate::Host;

/// The RAM ranges of a PC with `bytes` of memory, as QEMU lays them out: 640 KiB low memory,
/// then from 1 MiB up to 3 GiB, the rest from 4 GiB (the hole holds the APIC page and the
/// test device).
pub fn pc_ram(bytes: u64) -> Vec<(u64, u64)> {
    const LOW_END: u64 = 0xC000_0000;
    let mut ram = alloc::vec![(0, 0xA_0000), (0x10_0000, bytes.min(LOW_END) - 0x10_0000)];
    if bytes > LOW_END {
        ram.push((0x1_0000_0000, bytes - LOW_END));
    }
    ram
}

/// What the host does between two slices of the bootstrap vCPU (which is not in a run then;
/// the other vCPUs may be): an error ends the VM's run with it.
pub type BetweenSlices<'a> = &'a mut dyn FnMut(&Vcpu<'_>) -> Result<(), String>;

/// Runs the VM of `bsp` (its bootstrap vCPU, loaded and with its budget set) with `vcpus`
/// vCPUs in all until its run is over, calling `between_slices` after each slice of `bsp`, and
/// returns how it ended: the bootstrap vCPU's stop, or when that is only "stopped by another
/// vCPU", that vCPU's own. Every vCPU has ended when it returns; `bsp` (and its VM) remain for
/// the caller to inspect.
pub fn run_to_end(
    host: &'static Host,
    bsp: &mut Vcpu<'_>,
    vcpus: u32,
    between_slices: BetweenSlices<'_>,
) -> Result<VmStop, String> {
    let memory = bsp.memory();
    let aps = start_application_processors(host, &memory, vcpus, bsp.budget())?;
    let outcome = run_bootstrap(bsp, &aps.done, between_slices);
    aps.done.store(true, Ordering::SeqCst);
    memory.stop_all_vcpus();
    let mut ap_stops = Vec::new();
    for worker in aps.workers {
        ap_stops.extend(worker.join()?);
    }
    let mut stop = outcome?;
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
    Ok(stop)
}

/// Runs the bootstrap vCPU until the VM's run is over (a stop that is not a slice's end), with
/// `between_slices` after each slice.
fn run_bootstrap(
    bsp: &mut Vcpu<'_>,
    done: &AtomicBool,
    between_slices: BetweenSlices<'_>,
) -> Result<VmStop, String> {
    loop {
        match bsp.run() {
            VmStop::Preempted { .. } | VmStop::StopRequested { .. } if !done.load(Ordering::SeqCst) => {
                between_slices(bsp)?
            }
            stop => break Ok(stop),
        }
    }
}

/// The application processors' host threads.
struct ApWorkers {
    workers: Vec<smp::Task<Result<Vec<VmStop>, String>>>,
    /// Set when the VM's run is over: the workers return.
    done: Arc<AtomicBool>,
}

/// Creates vCPUs 1.. of the VM on the other host CPUs (round-robin; a CPU with several runs
/// them in turns of one slice), in index order so that each gets the APIC ID of its index,
/// each waiting for INIT and a startup message.
fn start_application_processors(
    host: &'static Host,
    memory: &Arc<VmMemory>,
    vcpus: u32,
    budget: Budget,
) -> Result<ApWorkers, String> {
    let done = Arc::new(AtomicBool::new(false));
    let others: Vec<usize> = smp::ready_cpus()
        .map(|cpu| cpu.index)
        .filter(|&index| index != smp::this_cpu().index)
        .collect();
    if vcpus > 1 && others.is_empty() {
        return Err(format!("{vcpus} vCPUs need a second host CPU"));
    }
    let next = Arc::new(AtomicU32::new(1));
    let mut workers = Vec::new();
    for (slot, &cpu) in others.iter().enumerate() {
        let mine: Vec<u32> = (1..vcpus)
            .filter(|i| (*i as usize - 1) % others.len() == slot)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let (memory, done, next) = (Arc::clone(memory), Arc::clone(&done), Arc::clone(&next));
        let task = smp::spawn_on(cpu, move || ap_worker(host, memory, mine, next, done, budget))
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
    Ok(ApWorkers { workers, done })
}

/// One host CPU's application processors: made in index order, then run in turns until the
/// VM's run is over. Returns how each one's run ended for good.
fn ap_worker(
    host: &'static Host,
    memory: Arc<VmMemory>,
    mine: Vec<u32>,
    next: Arc<AtomicU32>,
    done: Arc<AtomicBool>,
    budget: Budget,
) -> Result<Vec<VmStop>, String> {
    let vmx = host.vmx().map_err(|e| format!("{e}"))?;
    let mut vcpus = Vec::new();
    for index in mine {
        while next.load(Ordering::SeqCst) != index {
            core::hint::spin_loop();
        }
        let made = Vcpu::new_vcpu(vmx, Arc::clone(&memory), &host.phys);
        next.fetch_add(1, Ordering::SeqCst);
        let mut vcpu = made.map_err(|e| format!("vCPU {index}: {e}"))?;
        vcpu.wait_for_startup();
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
    Ok(vcpus.into_iter().filter_map(|(_, stop)| stop).collect())
}
