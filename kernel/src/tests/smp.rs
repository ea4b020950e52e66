//! Multi-CPU scenarios: guests on the application processors, a VM with a vCPU on each of two
//! CPUs, and the TLB shootdown that must come before a frame a vCPU on another CPU could still
//! reach goes back to the host.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use spin::Once;

use super::{gpa, new_vm, run_program, stopped, TestResult, CODE, PC_RAM};
use crate::arch::guests::programs;
use crate::arch::memory::is_allocated;
use crate::arch::smp::{self, this_cpu};
use crate::arch::ticks;
use crate::arch::vmx::GuestRegisters;
use crate::vm::{StopCause, Vm, VmMemory, VmStop};
use crate::Host;

/// Ticks a test waits for the other CPU to get somewhere before it gives up.
const WAIT_LIMIT: u64 = 500_000_000;

/// The first ready CPU other than the boot processor.
fn second_cpu() -> Result<usize, String> {
    smp::ready_cpus()
        .map(|cpu| cpu.index)
        .find(|&index| index != 0)
        .ok_or_else(|| String::from("needs a second CPU with VMX (cargo xtask run --cpus 2)"))
}

/// Spins until `probe` gives a value, at most [`WAIT_LIMIT`] ticks.
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> Result<T, String> {
    let start = ticks();
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if ticks() - start > WAIT_LIMIT {
            return Err(format!("gave up waiting for {what}"));
        }
        core::hint::spin_loop();
    }
}

/// Runs the vCPU until it stops for a reason other than the end of a time slice.
fn run_to_stop(vm: &mut Vm<'_>) -> VmStop {
    loop {
        match vm.run() {
            VmStop::Preempted { .. } => continue,
            stop => return stop,
        }
    }
}

fn read_u32(memory: &VmMemory, at: u64) -> Option<u32> {
    let mut bytes = [0u8; 4];
    memory.lock().read_phys(gpa(at), &mut bytes).ok()?;
    Some(u32::from_le_bytes(bytes))
}

pub fn every_cpu_runs_a_guest(host: &'static Host) -> TestResult {
    let ready: Vec<usize> = smp::ready_cpus().map(|cpu| cpu.index).collect();
    println_cpus(&ready);
    ensure!(
        ready.len() >= 2,
        "only {} CPU ready: {}",
        ready.len(),
        second_cpu().unwrap_err()
    );
    for &cpu in &ready[1..] {
        let task = smp::spawn_on(cpu, move || -> Result<(VmStop, usize), String> {
            let (_vm, stop) = run_program(host, programs::done(), GuestRegisters::default())?;
            Ok((stop, this_cpu().index))
        })
        .map_err(|e| format!("{e}"))?;
        let (stop, ran_on) = task.join()?;
        ensure_eq!(
            stop,
            VmStop::Done(0x600D_F00D),
            "stop of the guest on an application processor"
        );
        ensure_eq!(ran_on, cpu, "the CPU the guest ran on");
    }
    Ok(())
}

fn println_cpus(ready: &[usize]) {
    for cpu in smp::cpus() {
        crate::println!(
            "  CPU {} (APIC {}): {:?}{}",
            cpu.index,
            cpu.apic_id,
            cpu.state(),
            if ready.contains(&cpu.index) {
                ", VMX on"
            } else {
                ""
            }
        );
    }
}

pub fn a_vcpu_refuses_to_run_on_another_cpu(host: &'static Host) -> TestResult {
    let cpu = second_cpu()?;
    let mut vm = new_vm(host, &PC_RAM)?;
    vm.start(&programs::done(), CODE, GuestRegisters::default())
        .map_err(|e| format!("start: {e}"))?;
    let memory = vm.memory();
    // A vCPU made on CPU 1 and handed back to CPU 0 must not run there.
    let task = smp::spawn_on(cpu, move || -> Result<Vm<'static>, String> {
        let vmx = host.vmx().map_err(|e| format!("{e}"))?;
        Vm::new_vcpu(vmx, memory, &host.phys).map_err(|e| format!("second vCPU: {e}"))
    })
    .map_err(|e| format!("{e}"))?;
    let mut foreign = task.join()?;
    let diagnostic = stopped(foreign.run())?;
    ensure_eq!(diagnostic.cause, StopCause::WrongCpu, "cause");
    // Dropping it here sends the VMCLEAR to the CPU the VMCS lives on.
    drop(foreign);
    ensure_eq!(vm.run(), VmStop::Done(0x600D_F00D), "the VM's own vCPU");
    Ok(())
}

pub fn two_vcpus_writing_one_zero_page_at_once_get_one_frame(host: &'static Host) -> TestResult {
    const PAGE: u64 = 0x20_0000;
    let cpu = second_cpu()?;
    let mut vm = new_vm(host, &PC_RAM)?;
    let regs = |offset: u64, value: u64| GuestRegisters {
        rsi: PAGE + offset,
        rdi: value,
        rcx: 1,
        ..GuestRegisters::default()
    };
    vm.start(&programs::write_pages(), CODE, regs(0, 0xA0A0))
        .map_err(|e| format!("start: {e}"))?;
    let allocated_before = vm.stats().allocated_pages;
    let arrived = Arc::new(AtomicUsize::new(0));
    let memory = vm.memory();
    let arrived_there = Arc::clone(&arrived);
    let other = smp::spawn_on(cpu, move || -> Result<VmStop, String> {
        let vmx = host.vmx().map_err(|e| format!("{e}"))?;
        let mut vcpu = Vm::new_vcpu(vmx, memory, &host.phys).map_err(|e| format!("second vCPU: {e}"))?;
        vcpu.start(&programs::write_pages(), CODE, regs(8, 0xB0B0))
            .map_err(|e| format!("start: {e}"))?;
        rendezvous(&arrived_there)?;
        Ok(run_to_stop(&mut vcpu))
    })
    .map_err(|e| format!("{e}"))?;
    rendezvous(&arrived)?;
    let stop = run_to_stop(&mut vm);
    let other_stop = other.join()?;
    ensure_eq!(stop, VmStop::Done(0), "vCPU 0");
    ensure_eq!(other_stop, VmStop::Done(0), "vCPU 1");
    ensure_eq!(
        vm.stats().allocated_pages - allocated_before,
        1,
        "pages given a frame by the two writes"
    );
    let memory = vm.memory();
    ensure_eq!(read_u32(&memory, PAGE), Some(0xA0A0), "vCPU 0's value");
    ensure_eq!(read_u32(&memory, PAGE + 8), Some(0xB0B0), "vCPU 1's value");
    Ok(())
}

/// Both vCPUs enter at (nearly) the same time: each waits here for the other.
fn rendezvous(arrived: &AtomicUsize) -> Result<(), String> {
    arrived.fetch_add(1, Ordering::AcqRel);
    wait_for("the other vCPU", || {
        (arrived.load(Ordering::Acquire) >= 2).then_some(())
    })
}

pub fn a_ballooned_frame_stays_out_of_the_allocator_until_the_other_cpu_flushed(
    host: &'static Host,
) -> TestResult {
    const PAGE: u64 = 0x20_0000;
    const COUNTER: u64 = 0x30_0000;
    let cpu = second_cpu()?;
    let published: Arc<Once<Arc<VmMemory>>> = Arc::new(Once::new());
    let publish = Arc::clone(&published);
    let guest = smp::spawn_on(cpu, move || -> Result<VmStop, String> {
        let mut vm = new_vm(host, &PC_RAM)?;
        // The page gets a frame of its own, so ballooning it frees a frame.
        let written = vm.pgm_mut().write_phys(gpa(PAGE), &0x5EED_u32.to_le_bytes());
        written
            .map_err(|e| format!("{e}"))
            .and_then(|invalidation| vm.flush(invalidation).map_err(|e| format!("{e}")))?;
        let regs = GuestRegisters {
            rsi: PAGE,
            rdi: COUNTER,
            ..GuestRegisters::default()
        };
        vm.start(&programs::read_forever(), CODE, regs)
            .map_err(|e| format!("start: {e}"))?;
        publish.call_once(|| vm.memory());
        Ok(run_to_stop(&mut vm))
    })
    .map_err(|e| format!("{e}"))?;
    let memory = wait_for("the VM on the other CPU", || published.get().cloned())?;
    // The guest has read the page many times: its CPU caches the translation.
    wait_for("the guest's reads", || {
        read_u32(&memory, COUNTER).filter(|&n| n >= 1000)
    })?;
    let frame = memory
        .lock()
        .page(gpa(PAGE))
        .and_then(|page| page.frame())
        .ok_or("the page has no frame")?;
    let flushes_before = smp::cpus()[cpu].flushes_served();
    let invalidation = memory
        .lock()
        .balloon_inflate(&[gpa(PAGE)])
        .map_err(|e| format!("balloon: {e}"))?;
    ensure!(
        is_allocated(frame),
        "the frame went back to the host while the other CPU could still reach it"
    );
    ensure_eq!(
        memory.lock().frames_awaiting_flush(),
        1,
        "frames awaiting the flush"
    );
    memory.flush(invalidation).map_err(|e| format!("flush: {e}"))?;
    ensure!(
        smp::cpus()[cpu].flushes_served() > flushes_before,
        "the CPU running the vCPU was not asked to flush"
    );
    ensure!(!is_allocated(frame), "the frame did not go back after the flush");
    let diagnostic = stopped(guest.join()?)?;
    ensure_eq!(diagnostic.cause, StopCause::BalloonedPage, "cause");
    ensure_eq!(diagnostic.gpa, Some(gpa(PAGE)), "faulting address");
    Ok(())
}
