//! One vCPU: its VMCS, registers and the loop that enters the guest and handles its exits.

use alloc::sync::Arc;
use alloc::vec::Vec;

use emulator::DecodeCache;
use pgm::guest_paging::CodeTranslation;
use pgm::manager::{AccessHandlers, MmioTarget};
use pgm::{FaultOutcome, GuestPhysAddr, Invalidation, MemoryStats, Pgm, PgmError, Resolution};
use x86::vmx::vmcs::{guest, ro};

use super::budget::{self, Budget, Expired, RunClock};
use super::emulation::EmulatedMemory;
use super::exits::qualification::{
    is_page_walk, ENTRY_FAILURE, EPT_EXECUTE, EPT_WAS_READABLE, EPT_WRITE, INTERRUPTION_TYPE_MASK,
    INTERRUPTION_TYPE_NMI, INTERRUPTION_VALID, IO_IN, IO_REP, IO_SIZE_MASK, IO_STRING,
};
use super::exits::{exit_reason, ExitCost, ExitCosts, ExitCounts, ExitKind, FINISHED_VMS};
use super::memory::{PgmGuard, SharedPgm, VmMemory};
use super::requests::{Request, VcpuRequests};
use super::setup::EntryControlValues;
use super::stop::{Diagnostic, InstructionBytes, StopCause, VmStop};
use super::{hypercall, NoDevices, VmError};
use crate::arch::guests::{GuestMode, GuestProgram};
use crate::arch::memory::{KernelFrames, PhysMap};
use crate::arch::smp::this_cpu;
use crate::arch::vmx::{self, vmcs::Vmcs, GuestRegisters, VmxError, VmxOn};
use crate::arch::{idt, ticks};
use pgm::Access;

/// System Control Port A: bit 1 the A20 gate, bit 0 a fast reset.
const PORT_A20: u16 = 0x92;
const A20_GATE_BIT: u64 = 1 << 1;
const FAST_RESET_BIT: u64 = 1 << 0;
/// Guest interruptibility state, bit 3: blocking by NMI.
const BLOCKING_BY_NMI: u64 = 1 << 3;
/// Consecutive EPT violations at the same page before the VM is stopped as a fault loop.
const FAULT_LOOP_LIMIT: u32 = 4;
/// EPT violations kept in [`Vm::violations`] (the first ones; later ones are only counted).
/// The log is allocated whole with the vCPU (64 KiB): grown on the exit path, its reallocations
/// cost an MMIO exit 45–90 Bochs ticks on average and up to 1,400.
const VIOLATION_LOG_LIMIT: usize = 4096;

/// Why an access that reached emulation must not be emulated: an instruction fetch from a
/// handled page (there is no instruction there to run), or the CPU's own walk of the guest's
/// page tables (qualification bit 7 set, bit 8 clear) onto a page without memory: walks are
/// never handed to a device.
fn emulation_refused(access: Access, qualification: u64) -> Option<StopCause> {
    match access {
        Access::Execute => Some(StopCause::ExecuteFromHandledPage),
        _ if is_page_walk(qualification) => Some(StopCause::PageWalkOutsideMemory),
        _ => None,
    }
}

/// The exit kind an MMIO access is measured as.
fn mmio_exit_kind(access: Access) -> ExitKind {
    match access {
        Access::Write => ExitKind::MmioWrite,
        _ => ExitKind::MmioRead,
    }
}

/// One vCPU of a VM; the first one, made by [`Vm::new`], creates the VM's memory, and
/// [`Vm::new_vcpu`] adds more that share it. A vCPU runs only on the host CPU it was created
/// on (its VMCS lives there).
pub struct Vm<'a> {
    pub(super) vmx: &'a VmxOn,
    /// Active on the host CPU that made the vCPU; dropped (VMCLEAR there) before the memory.
    pub(super) vmcs: Vmcs,
    pub(super) memory: Arc<VmMemory>,
    launched: bool,
    /// The guest's general-purpose registers (RSP and RIP live in the VMCS).
    pub regs: GuestRegisters,
    /// Values the guest passed with the REPORT hypercall, in order.
    pub reports: Vec<u64>,
    /// Exit counts since creation.
    pub exits: ExitCounts,
    /// The first EPT violations as (guest-physical address, exit qualification), oldest first.
    pub violations: Vec<(GuestPhysAddr, u64)>,
    last_fault: Option<(u64, u32)>,
    /// VM-entry controls for a guest outside and inside IA-32e mode.
    pub(super) entry_controls: EntryControlValues,
    /// The kind and exit time of the exit being handled, when its cost is measured.
    pub(super) measuring: Option<(ExitKind, u64)>,
    /// What this VM's exits cost so far.
    pub exit_costs: ExitCosts,
    /// The time and exits this VM may use.
    budget: Budget,
    /// Ticks this VM has run, over all finished runs.
    ticks_used: u64,
    /// When the current run started.
    run_started: u64,
    /// The basic reason of the last exit.
    last_exit_reason: u32,
    /// How far past its deadline each run that ended at one returned, in ticks.
    pub overrun: ExitCost,
    /// Requests posted to this VM's vCPU, taken before every entry.
    requests: Arc<VcpuRequests>,
    /// The kind and host ticks so far of an exit whose handling the last (resumable) run left
    /// unfinished: the next run's entry completes its cost.
    carried: Option<(ExitKind, u64)>,
    /// The host's physical memory window (the page-modification log is read through it).
    pub(super) phys: &'static PhysMap,
    /// The secondary processor-based controls without PML (see `pml`).
    pub(super) secondary_controls: u64,
    /// This vCPU's page-modification log, when the CPU supports PML.
    pub(super) pml_buffer: Option<pgm::HostPhysAddr>,
    /// PML is enabled in the VMCS (the VM's monitoring asked for it at the last entry).
    pub(super) pml_on: bool,
    /// The translation of the code page of the last emulated instruction (see
    /// `Pgm::read_code`).
    pub(super) code_translation: Option<CodeTranslation>,
    /// The last emulated instructions, decoded.
    pub(super) decoder: DecodeCache,
    /// The last MMIO page an exit fell on: (faulting page number, the lock's count of
    /// exclusive accesses then), and its target.
    last_mmio_target: Option<((u64, u64), MmioTarget)>,
}

impl<'a> Vm<'a> {
    /// Creates a VM whose RAM is the `(base, size)` ranges, with a VMCS ready for [`Vm::start`].
    /// On error every frame taken so far is given back.
    pub fn new(vmx: &'a VmxOn, phys: &'static PhysMap, ram: &[(u64, u64)]) -> Result<Vm<'a>, VmError> {
        Vm::new_with(vmx, phys, ram, true)
    }

    /// [`Vm::new`] with 2 MiB pages on (pgm's default) or off (`large_pages`: every page is
    /// mapped and filled at 4 KiB, as tests that count pages and faults one by one expect).
    pub fn new_with(
        vmx: &'a VmxOn,
        phys: &'static PhysMap,
        ram: &[(u64, u64)],
        large_pages: bool,
    ) -> Result<Vm<'a>, VmError> {
        let mut pgm = Pgm::new(KernelFrames, phys)?;
        pgm.set_large_pages(large_pages);
        for &(base, size) in ram {
            // On error the manager is dropped here, giving back what it took.
            let base = GuestPhysAddr::new(base).ok_or(PgmError::BeyondAddressWidth)?;
            pgm.register_ram(base, size, "ram")?;
        }
        Vm::new_vcpu(vmx, Arc::new(VmMemory::new(pgm)), phys)
    }

    /// Adds a vCPU on the calling CPU to the VM whose memory is `memory` (see [`Vm::memory`]).
    pub fn new_vcpu(
        vmx: &'a VmxOn,
        memory: Arc<VmMemory>,
        phys: &'static PhysMap,
    ) -> Result<Vm<'a>, VmError> {
        let vmcs = Vmcs::new(vmx, &mut { phys })?;
        let requests = Arc::new(VcpuRequests::default());
        memory.add_vcpu(vmcs.cpu(), &requests);
        // From here on Drop gives everything back on error.
        let mut vm = Vm {
            vmx,
            vmcs,
            memory,
            launched: false,
            regs: GuestRegisters::default(),
            reports: Vec::new(),
            exits: ExitCounts::default(),
            violations: Vec::with_capacity(VIOLATION_LOG_LIMIT),
            last_fault: None,
            entry_controls: EntryControlValues::default(),
            measuring: None,
            exit_costs: ExitCosts::NONE,
            budget: Budget::DEFAULT,
            ticks_used: 0,
            run_started: 0,
            last_exit_reason: 0,
            overrun: ExitCost::NONE,
            requests,
            carried: None,
            phys,
            secondary_controls: 0,
            pml_buffer: None,
            pml_on: false,
            code_translation: None,
            decoder: DecodeCache::default(),
            last_mmio_target: None,
        };
        vm.write_controls()?;
        vm.set_up_pml()?;
        vm.write_host_state(&vmx::host::current())?;
        // The root frame may have served an earlier VM with the same EPTP value and VPID: drop
        // whatever the CPU still caches for it.
        vm.invalidate(Invalidation::SingleContext)?;
        Ok(vm)
    }

    /// The memory manager, locked (see [`VmMemory::lock`]).
    pub fn pgm(&self) -> PgmGuard<'_> {
        self.memory.lock()
    }

    /// The memory manager, locked, for a change (the `&mut` keeps a caller from running the
    /// vCPU or flushing while it holds the lock).
    pub fn pgm_mut(&mut self) -> PgmGuard<'_> {
        self.memory.lock()
    }

    /// The VM's shared memory, for [`Vm::new_vcpu`] or for host work on another CPU.
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn memory(&self) -> Arc<VmMemory> {
        Arc::clone(&self.memory)
    }

    /// Page and frame counts of this VM.
    pub fn stats(&self) -> MemoryStats {
        self.pgm().stats()
    }

    /// Copies `program` into guest RAM at `at` and sets the guest up to start there in the
    /// program's mode with the given registers (RSP points just below `at`). Not for
    /// [`GuestMode::Long64`] programs, which need page tables: see [`Vm::start_paged`].
    pub fn start(&mut self, program: &GuestProgram, at: u64, regs: GuestRegisters) -> Result<(), VmError> {
        self.start_paged(program, at, at, 0, regs)
    }

    /// Copies `program` into guest RAM at guest-physical `load_at` and sets the guest up to
    /// start at `rip` (linear; the same as `load_at` unless the guest's page tables at `cr3`
    /// map it elsewhere) in the program's mode, with RSP just below `rip`.
    pub fn start_paged(
        &mut self,
        program: &GuestProgram,
        load_at: u64,
        rip: u64,
        cr3: u64,
        regs: GuestRegisters,
    ) -> Result<(), VmError> {
        let gpa = GuestPhysAddr::new(load_at).ok_or(PgmError::BeyondAddressWidth)?;
        let invalidation = self.pgm_mut().write_phys(gpa, program.code)?;
        self.invalidate(invalidation)?;
        self.enter_at(program.mode, rip, cr3, regs)
    }

    /// Sets the guest up to start at `rip` in `mode` with the given registers, RSP just below
    /// `rip`, without loading anything (the code is already in guest memory: a ROM, or another
    /// vCPU's program).
    pub fn enter_at(
        &mut self,
        mode: GuestMode,
        rip: u64,
        cr3: u64,
        regs: GuestRegisters,
    ) -> Result<(), VmError> {
        self.write_guest_state(mode, rip, cr3)?;
        self.regs = regs;
        Ok(())
    }

    /// Sets the guest's RSP (after [`start`](Self::start), which puts the stack just below the
    /// code).
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn set_stack_pointer(&mut self, rsp: u64) -> Result<(), VmError> {
        let vmcs = self.vmcs.current()?;
        Ok(vmcs.write(guest::RSP, rsp)?)
    }

    /// Sets the time and exits this VM may use from now on (ticks already used count against
    /// the new limit).
    pub fn set_budget(&mut self, budget: Budget) {
        self.budget = budget;
    }

    /// Ticks this VM has run, over all its finished runs.
    pub fn ticks_used(&self) -> u64 {
        self.ticks_used
    }

    /// The requests of this VM's vCPU: post to them and kick the vCPU (see [`requests`]).
    pub fn requests(&self) -> Arc<VcpuRequests> {
        Arc::clone(&self.requests)
    }

    /// Runs the vCPU with no devices behind MMIO pages; see [`Vm::run_with`].
    pub fn run(&mut self) -> VmStop {
        self.run_with(&mut NoDevices)
    }

    /// Runs the vCPU until the guest finishes, halts or is stopped, its time slice is used up
    /// (`Preempted`), or the host asks it to stop (`StopRequested`); after the last two, the
    /// next call resumes the guest where it was. MMIO and handler accesses are emulated
    /// through `devices`. The run never takes longer than the earliest of its slice, the VM's
    /// time limit and the host deadline ([`budget`]), plus the cost of one exit. A stop the
    /// guest caused ([`StopCause::stops_vm`]) ends the runs of the VM's other vCPUs too
    /// (`StopCause::VmStopped`). Locking: takes the VM's lock per exit that needs it, never
    /// across the guest's run; waits in a rendezvous before an entry while one is under way.
    pub fn run_with(&mut self, devices: &mut impl AccessHandlers) -> VmStop {
        self.run_started = ticks();
        if this_cpu().index != self.vmcs.cpu() {
            return VmStop::Stopped(self.diagnostic(StopCause::WrongCpu, self.last_exit_reason));
        }
        self.memory.set_running(self.vmcs.cpu(), true);
        let mut stop = self.run_loop(devices);
        self.memory.set_running(self.vmcs.cpu(), false);
        // Out of its run, the vCPU has handed every address it logged to the host.
        if self.drain_pml().is_err() && !matches!(stop, VmStop::Stopped(_)) {
            stop = VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit, exit_reason::PML_FULL));
        }
        if let VmStop::Stopped(diagnostic) = &stop {
            if diagnostic.cause.stops_vm() {
                self.memory
                    .post_to_others(Some(&self.requests), Request::VM_STOPPED);
            }
        }
        stop
    }

    /// The body of [`Vm::run_with`], on the vCPU's own CPU, counted as running.
    fn run_loop(&mut self, devices: &mut impl AccessHandlers) -> VmStop {
        let rate = self.vmx.caps().preemption_timer_rate();
        let clock = RunClock::start(&self.budget, self.ticks_used, self.run_started, rate);
        if let Some((kind, host_ticks)) = self.carried.take() {
            // Measured as if the exit had happened `host_ticks` before this run started.
            self.measuring = Some((kind, self.run_started - host_ticks));
        }
        let exit_budget_end = self.exits.total + self.budget.exits;
        let stop = loop {
            // Host interrupts pending since the last exit (a kick among them) are taken before
            // the requests they may have posted are looked at.
            idt::deliver_pending();
            if let Some(stop) = self.take_requests() {
                break stop;
            }
            if let Some(stop) = self.follow_pml_mode() {
                break stop;
            }
            let parked = self.memory.park_if_asked();
            if let Some((_, exit_tick)) = self.measuring.as_mut() {
                // Waiting in a rendezvous is not part of handling the exit.
                *exit_tick += parked;
            }
            let now = ticks();
            if let Some(expired) = clock.expired(now) {
                self.overrun.add(now.saturating_sub(clock.deadline()));
                break self.out_of_time(expired);
            }
            if self.exits.total >= exit_budget_end {
                break VmStop::Stopped(self.diagnostic(StopCause::ExitBudget, self.last_exit_reason));
            }
            if let Some(stop) = self.enter_and_handle_exit(devices, &clock) {
                break stop;
            }
        };
        let now = ticks();
        self.carried = match self.measuring.take() {
            Some((kind, exit_tick)) if stop.is_resumable() => Some((kind, now - exit_tick)),
            _ => None,
        };
        self.ticks_used += now - self.run_started;
        stop
    }

    /// Carries out the requests posted to this vCPU: a flush now; the VM stopped by another
    /// vCPU, or a stop, as the run's end. (A rendezvous posts nothing: the loop parks before
    /// the entry while one is under way.)
    /// Inline, so that the usual case (nothing posted) costs one exchange on every exit, not a
    /// call.
    #[inline]
    fn take_requests(&mut self) -> Option<VmStop> {
        let request = self.requests.take()?;
        self.carry_out(request)
    }

    /// [`take_requests`](Self::take_requests) with something posted.
    #[inline(never)]
    fn carry_out(&mut self, request: Request) -> Option<VmStop> {
        if request.contains(Request::FLUSH) && self.invalidate(Invalidation::SingleContext).is_err() {
            return Some(VmStop::Stopped(
                self.diagnostic(StopCause::UnhandledExit, self.last_exit_reason),
            ));
        }
        if request.contains(Request::VM_STOPPED) {
            return Some(VmStop::Stopped(
                self.diagnostic(StopCause::VmStopped, self.last_exit_reason),
            ));
        }
        request.contains(Request::STOP).then(|| VmStop::StopRequested {
            rip: self.guest_rip(),
        })
    }

    /// How a run ends at the deadline it reached.
    fn out_of_time(&self, expired: Expired) -> VmStop {
        let cause = match expired {
            Expired::Slice => {
                return VmStop::Preempted {
                    rip: self.guest_rip(),
                }
            }
            Expired::Limit => StopCause::TimeBudget,
            Expired::HostDeadline => {
                budget::record_host_deadline_hit();
                StopCause::HostDeadline
            }
        };
        VmStop::Stopped(self.diagnostic(cause, self.last_exit_reason))
    }

    /// The guest's RIP as the VMCS holds it (where a resumable run continues).
    pub fn guest_rip(&self) -> u64 {
        self.vmcs.current().map_or(0, |vmcs| vmcs.read(guest::RIP))
    }

    /// Enters the guest once, with the preemption timer set for `clock`'s earliest deadline,
    /// and handles the exit; `Some` when the run is over.
    fn enter_and_handle_exit(
        &mut self,
        devices: &mut impl AccessHandlers,
        clock: &RunClock,
    ) -> Option<VmStop> {
        let vmcs = match self.vmcs.current() {
            Ok(vmcs) => vmcs,
            Err(error) => {
                log::error!("{error}");
                return Some(VmStop::Stopped(self.diagnostic(StopCause::EntryFailed, 0)));
            }
        };
        if let Some((kind, exit_tick)) = self.measuring.take() {
            self.exit_costs.0[kind as usize].add(ticks() - exit_tick);
        }
        // Armed last, so the host work above does not eat into the guest's time.
        let timer = clock.timer_value(ticks());
        if vmcs
            .write(guest::VMX_PREEMPTION_TIMER_VALUE, u64::from(timer))
            .is_err()
        {
            return Some(VmStop::Stopped(self.diagnostic(StopCause::EntryFailed, 0)));
        }
        if self.memory.entering_on(self.vmcs.cpu()).is_err() {
            return Some(VmStop::Stopped(self.diagnostic(StopCause::EntryFailed, 0)));
        }
        // SAFETY: `write_host_state` wrote this CPU's host state with RIP at the exit entry
        // point when the VM was created; the EPT pointer names this VM's tables, which map only
        // frames it holds; `launched` is set after the first successful entry and the VMCS is
        // VMCLEARed only when the VM is dropped.
        let entered = unsafe { vmx::run_guest(&vmcs, &mut self.regs, self.launched) };
        let exit_tick = ticks();
        if entered.is_err() {
            let error = vmcs.read(ro::VM_INSTRUCTION_ERROR) as u32;
            let mut diagnostic = self.diagnostic(StopCause::EntryFailed, 0);
            diagnostic.exit_reason = error;
            log::error!("VMLAUNCH/VMRESUME failed with VM-instruction error {error}");
            return Some(VmStop::Stopped(diagnostic));
        }
        self.launched = true;
        self.exits.total += 1;
        let raw_reason = vmcs.read(ro::EXIT_REASON);
        let reason = (raw_reason & 0xFFFF) as u32;
        self.last_exit_reason = reason;
        if raw_reason & ENTRY_FAILURE != 0 {
            return Some(VmStop::Stopped(self.diagnostic(StopCause::EntryFailed, reason)));
        }
        if reason != exit_reason::EPT_VIOLATION {
            self.last_fault = None;
        }
        match reason {
            exit_reason::EPT_VIOLATION => {
                let qualification = vmcs.read(ro::EXIT_QUALIFICATION);
                let gpa = GuestPhysAddr::new_truncate(vmcs.read(ro::GUEST_PHYSICAL_ADDR_FULL));
                self.handle_ept_violation(qualification, gpa, exit_tick, devices)
            }
            exit_reason::VMCALL => {
                self.measuring = Some((ExitKind::Hypercall, exit_tick));
                self.handle_hypercall()
            }
            exit_reason::PREEMPTION_TIMER => {
                // The run loop decides whether a deadline passed (the timer may have been
                // capped short of it).
                self.exits.preemption_timer += 1;
                self.measuring = Some((ExitKind::Preemption, exit_tick));
                None
            }
            exit_reason::EXTERNAL_INTERRUPT => {
                // Not acknowledged by the exit: the run loop lets the host take it, then takes
                // whatever requests its handler posted.
                self.exits.external_interrupts += 1;
                None
            }
            exit_reason::EXCEPTION_OR_NMI if self.exit_was_nmi() => {
                self.exits.nmis += 1;
                idt::deliver_nmi();
                match self.unblock_host_nmis() {
                    Ok(()) => None,
                    Err(_) => Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit, reason))),
                }
            }
            exit_reason::PAUSE => {
                // A PAUSE loop longer than the window: the guest waits for something only
                // another vCPU or the host could give it, so it yields its slice.
                self.exits.pause_loops += 1;
                Some(VmStop::Preempted {
                    rip: vmcs.read(guest::RIP),
                })
            }
            exit_reason::MONITOR | exit_reason::MWAIT => {
                // Both may complete at once architecturally (MWAIT may wake for any reason),
                // so the guest never sleeps on the CPU; its budget bounds a wait loop.
                self.exits.monitor_mwait += 1;
                match self.skip_instruction() {
                    Ok(()) => None,
                    Err(_) => Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit, reason))),
                }
            }
            exit_reason::IO_INSTRUCTION => self.handle_port_io(reason),
            exit_reason::PML_FULL => self.handle_pml_full(exit_tick),
            exit_reason::HLT => Some(VmStop::Halted {
                rip: vmcs.read(guest::RIP),
            }),
            exit_reason::TRIPLE_FAULT => {
                Some(VmStop::Stopped(self.diagnostic(StopCause::TripleFault, reason)))
            }
            _ => Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit, reason))),
        }
    }

    /// Clears blocking by NMI in the guest's interruptibility state after an NMI exit. NMIs
    /// belong to the host (NMI exiting, no virtual NMIs), yet Bochs saves the blocking its NMI
    /// exit set as the guest's and restores it at the next entry: the guest, which never
    /// executes the IRET that would end it, would then hold back every later NMI, and with it
    /// every flush request and kick sent to this CPU.
    fn unblock_host_nmis(&self) -> Result<(), VmxError> {
        let vmcs = self.vmcs.current()?;
        let state = vmcs.read(guest::INTERRUPTIBILITY_STATE);
        if state & BLOCKING_BY_NMI != 0 {
            vmcs.write(guest::INTERRUPTIBILITY_STATE, state & !BLOCKING_BY_NMI)?;
        }
        Ok(())
    }

    /// True when the current exception-or-NMI exit was an NMI (the exception bitmap is empty,
    /// so any other exception exit is unexpected).
    fn exit_was_nmi(&self) -> bool {
        let info = self
            .vmcs
            .current()
            .map_or(0, |vmcs| vmcs.read(ro::VMEXIT_INTERRUPTION_INFO));
        info & INTERRUPTION_VALID != 0 && info & INTERRUPTION_TYPE_MASK == INTERRUPTION_TYPE_NMI
    }

    /// Port I/O. The one port the hypervisor answers itself is System Control Port A (0x92),
    /// whose bit 1 is the A20 gate: a byte OUT opens or closes the gate through pgm (with the
    /// INVEPT that needs), a byte IN reads it back. Every other port, string or REP form, and
    /// the fast-reset bit (bit 0) stop the VM with the exit's diagnostic: there is no device.
    fn handle_port_io(&mut self, reason: u32) -> Option<VmStop> {
        let Ok(vmcs) = self.vmcs.current() else {
            return Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit, reason)));
        };
        let qualification = vmcs.read(ro::EXIT_QUALIFICATION);
        let port = (qualification >> 16) as u16;
        let byte_sized = qualification & IO_SIZE_MASK == 0;
        let plain = qualification & (IO_STRING | IO_REP) == 0;
        let unhandled = |vm: &Self| Some(VmStop::Stopped(vm.diagnostic(StopCause::UnhandledExit, reason)));
        if port != PORT_A20 || !byte_sized || !plain {
            return unhandled(self);
        }
        let mut pgm = self.memory.lock();
        let invalidation = if qualification & IO_IN != 0 {
            let gate = if pgm.a20_enabled() { A20_GATE_BIT } else { 0 };
            self.regs.rax = (self.regs.rax & !0xFF) | gate;
            Invalidation::None
        } else {
            let value = self.regs.rax & 0xFF;
            if value & FAST_RESET_BIT != 0 {
                return unhandled(self);
            }
            pgm.set_a20(value & A20_GATE_BIT != 0)
        };
        drop(pgm);
        self.exits.port_io += 1;
        match self
            .skip_instruction()
            .and_then(|()| self.invalidate(invalidation))
        {
            Ok(()) => None,
            Err(_) => unhandled(self),
        }
    }

    /// Moves the guest's RIP past the instruction that caused the current exit.
    fn skip_instruction(&self) -> Result<(), VmxError> {
        let vmcs = self.vmcs.current()?;
        let next_rip = vmcs.read(guest::RIP) + vmcs.read(ro::VMEXIT_INSTRUCTION_LEN);
        vmcs.write(guest::RIP, next_rip)
    }

    /// Hands an EPT violation to `pgm` and carries out the invalidation it asks for; accesses
    /// pgm cannot map (MMIO, handlers, ROM writes) are emulated through `devices`. The exit
    /// qualification and guest-physical address are read by the caller, which holds the VMCS.
    fn handle_ept_violation(
        &mut self,
        qualification: u64,
        gpa: GuestPhysAddr,
        exit_tick: u64,
        devices: &mut impl AccessHandlers,
    ) -> Option<VmStop> {
        self.exits.ept_violations += 1;
        if self.violations.len() < VIOLATION_LOG_LIMIT {
            self.violations.push((gpa, qualification));
        }
        let access = if qualification & EPT_WRITE != 0 {
            Access::Write
        } else if qualification & EPT_EXECUTE != 0 {
            Access::Execute
        } else {
            Access::Read
        };
        let stop = |vm: &Self, cause| Some(VmStop::Stopped(vm.diagnostic(cause, exit_reason::EPT_VIOLATION)));
        // Without the lock first, where that can help. A write to a page mapped read-only
        // (write monitoring, or a fault another vCPU resolved meanwhile) may be resolved
        // lock-free; an access to an entry that was not even readable is most likely MMIO,
        // emulated on the shared manager. Anything else goes to the lock.
        let lock_free = if qualification & EPT_WAS_READABLE == 0 {
            // Shared anew (an `Arc` count) so the guard outlives the borrow of `self`; the
            // lock-free path pays for no count.
            let memory = Arc::clone(&self.memory);
            let shared = memory.shared(self.vmcs.cpu());
            if let Some(target) = self.mmio_target(&shared, gpa) {
                if let Some(cause) = emulation_refused(access, qualification) {
                    return stop(self, cause);
                }
                self.measuring = Some((mmio_exit_kind(access), exit_tick));
                return self.emulate_access(EmulatedMemory::Mmio(shared, target), gpa, devices);
            }
            None
        } else if access == Access::Write {
            self.memory.resolve_fault_lock_free(self.vmcs.cpu(), gpa, access)
        } else {
            None
        };
        // An access to emulate keeps the lock from the lookup to the instruction fetch (see
        // `emulate_access`).
        let memory: Arc<VmMemory>;
        let mut locked = None;
        let outcome = match lock_free {
            Some(outcome) => outcome,
            None => {
                memory = Arc::clone(&self.memory);
                let mut pgm = memory.lock();
                let outcome = pgm.resolve_fault(gpa, access);
                locked = Some(pgm);
                outcome
            }
        };
        if !matches!(
            outcome,
            FaultOutcome::Handler { .. } | FaultOutcome::WriteIgnored | FaultOutcome::EmulateWrite
        ) {
            // Flushes below must not run under the lock.
            drop(locked.take());
        }
        let mut invalidation = match outcome {
            FaultOutcome::Resolved {
                invalidation,
                resolution,
            } => {
                self.measuring = match resolution {
                    Resolution::ZeroFill => Some((ExitKind::ZeroFill, exit_tick)),
                    Resolution::WriteMonitor if lock_free.is_some() => {
                        Some((ExitKind::WriteMonitorLockFree, exit_tick))
                    }
                    Resolution::WriteMonitor => Some((ExitKind::WriteMonitor, exit_tick)),
                    Resolution::CopyOnWrite | Resolution::Remap => None,
                };
                invalidation
            }
            FaultOutcome::NotGuestMemory => return stop(self, StopCause::NotGuestMemory),
            FaultOutcome::OutOfMemory => return stop(self, StopCause::OutOfMemory),
            FaultOutcome::Ballooned => return stop(self, StopCause::BalloonedPage),
            outcome @ (FaultOutcome::Handler { .. }
            | FaultOutcome::WriteIgnored
            | FaultOutcome::EmulateWrite) => {
                if let Some(cause) = emulation_refused(access, qualification) {
                    return stop(self, cause);
                }
                let kind = match outcome {
                    FaultOutcome::Handler { .. } => mmio_exit_kind(access),
                    FaultOutcome::WriteIgnored => ExitKind::RomWriteIgnore,
                    _ => ExitKind::RomWriteShadow,
                };
                self.measuring = Some((kind, exit_tick));
                // The lock-free path resolves nothing that needs emulating.
                let Some(pgm) = locked else {
                    return stop(self, StopCause::UnhandledExit);
                };
                return self.emulate_access(EmulatedMemory::Locked(pgm), gpa, devices);
            }
        };
        // The same page faulting again right after a resolution means a translation outlived
        // the violation: flush this VM's translations, and give up if even that does not help.
        let page = gpa.page_number();
        let repeats = match self.last_fault {
            Some((last, count)) if last == page => count + 1,
            _ => 1,
        };
        self.last_fault = Some((page, repeats));
        if repeats >= FAULT_LOOP_LIMIT {
            return stop(self, StopCause::FaultLoop);
        }
        if repeats > 1 {
            invalidation = invalidation.max(Invalidation::SingleContext);
        }
        match self.invalidate(invalidation) {
            Ok(()) => None,
            Err(_) => stop(self, StopCause::UnhandledExit),
        }
    }

    /// The MMIO page behind a fault at `gpa` (see `Pgm::mmio_target`), looked up again only when
    /// the fault is on another page than the last one, or the manager may have changed since
    /// (its lock's count of exclusive accesses moved): a driver's accesses go to the same few
    /// registers, and nothing but an exclusive change can move or remove a device.
    fn mmio_target(&mut self, pgm: &SharedPgm<'_>, gpa: GuestPhysAddr) -> Option<MmioTarget> {
        let key = (gpa.page_number(), pgm.writes());
        if let Some((last, target)) = self.last_mmio_target {
            if last == key {
                self.exits.mmio_lookups_reused += 1;
                return Some(target);
            }
        }
        let target = pgm.mmio_target(gpa)?;
        self.last_mmio_target = Some((key, target));
        Some(target)
    }

    /// Carries out an invalidation a host-side memory change asked for (pgm returns one from
    /// every call that changes mappings the CPU may cache).
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn flush(&mut self, invalidation: Invalidation) -> Result<(), VmError> {
        Ok(self.invalidate(invalidation)?)
    }

    /// Executes the INVEPT that `invalidation` names.
    pub(super) fn invalidate(&mut self, invalidation: Invalidation) -> Result<(), VmxError> {
        if invalidation != Invalidation::None {
            self.exits.invepts += 1;
        }
        self.memory.flush(invalidation)
    }

    /// Handles VMCALL: DONE ends the run, REPORT records RBX, anything else returns
    /// [`hypercall::UNKNOWN`] in RAX. RIP moves past the VMCALL.
    fn handle_hypercall(&mut self) -> Option<VmStop> {
        self.exits.hypercalls += 1;
        if self.skip_instruction().is_err() {
            return Some(VmStop::Stopped(
                self.diagnostic(StopCause::UnhandledExit, exit_reason::VMCALL),
            ));
        }
        match self.regs.rax {
            hypercall::DONE => return Some(VmStop::Done(self.regs.rbx)),
            hypercall::REPORT => self.reports.push(self.regs.rbx),
            _ => self.regs.rax = hypercall::UNKNOWN,
        }
        None
    }

    /// Collects what the VMCS says about the current exit.
    pub(super) fn diagnostic(&self, cause: StopCause, exit_reason: u32) -> Diagnostic {
        let mut diagnostic = Diagnostic {
            cause,
            exit_reason,
            qualification: 0,
            gpa: None,
            rip: 0,
            instruction: InstructionBytes::default(),
            ticks: self.ticks_used + ticks().saturating_sub(self.run_started),
        };
        // Without a VMCS to read, the diagnostic says only why and when.
        if let Ok(vmcs) = self.vmcs.current() {
            diagnostic.qualification = vmcs.read(ro::EXIT_QUALIFICATION);
            diagnostic.rip = vmcs.read(guest::RIP);
            diagnostic.gpa = matches!(
                exit_reason,
                exit_reason::EPT_VIOLATION | exit_reason::EPT_MISCONFIGURATION
            )
            .then(|| GuestPhysAddr::new_truncate(vmcs.read(ro::GUEST_PHYSICAL_ADDR_FULL)));
        }
        diagnostic
    }
}

impl Drop for Vm<'_> {
    /// Leaves the VM's vCPU list and adds this vCPU's exit statistics to the totals; the
    /// VMCS (cleared on its own CPU) and, with the last vCPU, the VM's memory go with the
    /// fields.
    fn drop(&mut self) {
        self.memory.remove_vcpu(&self.requests);
        self.release_pml();
        let mut finished = FINISHED_VMS.lock();
        finished.0.merge(&self.exit_costs);
        finished.1.merge(&self.overrun);
    }
}
