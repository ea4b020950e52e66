//! One vCPU: its backend (registers, entry, exit decoding), the loop that enters the guest and
//! handles its exits through the backend-neutral `VmExit`, and what the vCPU keeps between runs.

use alloc::sync::Arc;
use alloc::vec::Vec;

use devices::msr::MsrState;
use emulator::DecodeCache;
use pgm::guest_paging::CodeTranslation;
use pgm::manager::{AccessHandlers, MmioTarget};
use pgm::{
    Access, AccessError, FaultOutcome, GuestPhysAddr, Invalidation, MemoryStats, Pgm, RamError, RangeError,
    Resolution,
};

use super::apic::VcpuHandlers;
use super::backend::{vector, GuestRegisters, VirtualCpu, VmExit};
use super::budget::{self, Budget, Expired, RunClock};
use super::devices::{MachineSpec, VmDevices};
use super::emulation::{EmulatedMemory, FaultPage};
use super::exits::{ExitCost, ExitCosts, ExitCounts, ExitKind, FINISHED_VMS};
use super::memory::{PgmGuard, SharedPgm, VmMemory};
use super::requests::{Request, VcpuRequests};
use super::snapshot::MachineSnapshot;
use super::stop::{Diagnostic, InstructionBytes, StopCause, VmStop};
use super::{hypercall, NoDevices, VmError};
use crate::arch::guests::{GuestMode, GuestProgram};
use crate::arch::idt;
use crate::arch::memory::{KernelFrames, PhysMap};
use crate::arch::smp::this_cpu;
use crate::arch::ticks;
use crate::arch::vector::VectorState;
use crate::arch::virt;

/// The backend a vCPU runs on.
pub(super) type Backend<'a> = virt::Vcpu<'a>;

/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// Consecutive nested-paging faults at the same page before the VM is stopped as a fault loop.
const FAULT_LOOP_LIMIT: u32 = 4;
/// Nested-paging faults kept in [`Vcpu::violations`] (the first ones; later ones are only
/// counted). The log is allocated whole with the vCPU (64 KiB): grown on the exit path, its
/// reallocations cost an MMIO exit 45–90 Bochs ticks on average and up to 1,400.
const VIOLATION_LOG_LIMIT: usize = 4096;

/// Why an access that reached emulation must not be emulated: an instruction fetch from a
/// handled page (there is no instruction there to run), or the CPU's own walk of the guest's
/// page tables (which includes its delivery of an event through the IDT) onto a page without
/// memory: walks are never handed to a device.
fn emulation_refused(access: Access, page_walk: bool) -> Option<StopCause> {
    match access {
        Access::Execute => Some(StopCause::ExecuteFromHandledPage),
        _ if page_walk => Some(StopCause::PageWalkOutsideMemory),
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

/// One vCPU of a VM; the first one, made by [`Vcpu::new`], creates the VM's memory, and
/// [`Vcpu::new_vcpu`] adds more that share it. A vCPU runs only on the host CPU it was created
/// on (its backend's control structure lives there).
pub struct Vcpu<'a> {
    /// The virtualization backend: registers, entry, exit decoding. Dropped (VMCLEAR on its
    /// CPU) before the memory.
    pub(super) cpu: Backend<'a>,
    pub(super) memory: Arc<VmMemory>,
    /// The vCPU's index in its VM, which is also its APIC ID (0: the bootstrap processor).
    pub(super) index: u32,
    /// The MSRs this vCPU's device layer emulates.
    pub(super) msrs: MsrState,
    /// Values the guest passed with the REPORT hypercall, in order.
    pub reports: Vec<u64>,
    /// Exit counts since creation.
    pub exits: ExitCounts,
    /// The first nested-paging faults as (guest-physical address, the backend's raw exit
    /// qualification), oldest first.
    pub violations: Vec<(GuestPhysAddr, u64)>,
    last_fault: Option<(u64, u32)>,
    /// The kind and exit time of the exit being handled, when its cost is measured.
    pub(super) measuring: Option<(ExitKind, u64)>,
    /// What this VM's exits cost so far.
    pub exit_costs: ExitCosts,
    /// The time and exits this VM may use.
    budget: Budget,
    /// Ticks this VM has run, over all finished runs.
    pub(super) ticks_used: u64,
    /// When the current run started.
    run_started: u64,
    /// How far past its deadline each run that ended at one returned, in ticks.
    pub overrun: ExitCost,
    /// Requests posted to this VM's vCPU, taken before every entry.
    requests: Arc<VcpuRequests>,
    /// The kind and host ticks so far of an exit whose handling the last (resumable) run left
    /// unfinished: the next run's entry completes its cost.
    carried: Option<(ExitKind, u64)>,
    /// The guest executed HLT with interrupts enabled and waits for one (RIP still at the HLT).
    pub(super) halted: bool,
    /// The vCPU took INIT and waits for a startup message (an application processor before
    /// the bootstrap processor starts it).
    pub(super) waiting_for_startup: bool,
    /// When this vCPU's APIC timer next expires (TSC; `u64::MAX`: not armed).
    pub(super) apic_timer: u64,
    /// The APIC may have something to deliver: the next entry looks.
    pub(super) apic_changed: bool,
    /// The CPU logs written pages (the VM's monitoring asked for it at the last entry).
    pub(super) dirty_logging: bool,
    /// The translation of the code page of the last emulated instruction (see
    /// `Pgm::read_code`).
    pub(super) code_translation: Option<CodeTranslation>,
    /// The last emulated instructions, decoded.
    pub(super) decoder: DecodeCache,
    /// The last MMIO page an exit fell on: (faulting page number, the lock's count of
    /// exclusive accesses then), and its target.
    last_mmio_target: Option<((u64, u64), MmioTarget)>,
    /// The guest's x87/MMX/SSE registers while the vCPU is not running (see
    /// [`VectorState`]).
    pub(super) vector_state: alloc::boxed::Box<VectorState>,
}

impl<'a> Vcpu<'a> {
    /// Creates a VM whose RAM is the `(base, size)` ranges, and its first vCPU on the calling
    /// CPU, ready for [`Vcpu::start`]. On error every frame taken so far is given back.
    pub fn new(vmx: &'a virt::On, phys: &'static PhysMap, ram: &[(u64, u64)]) -> Result<Vcpu<'a>, VmError> {
        Vcpu::new_with(vmx, phys, ram, true)
    }

    /// [`Vcpu::new`] with 2 MiB pages on (pgm's default) or off (`large_pages`: every page is
    /// mapped and filled at 4 KiB, as tests that count pages and faults one by one expect).
    pub fn new_with(
        vmx: &'a virt::On,
        phys: &'static PhysMap,
        ram: &[(u64, u64)],
        large_pages: bool,
    ) -> Result<Vcpu<'a>, VmError> {
        Vcpu::new_machine(vmx, phys, ram, large_pages, &MachineSpec::default())
    }

    /// [`Vcpu::new_with`] for a machine described by `spec` (its name and vCPU count, which
    /// its devices report).
    pub fn new_machine(
        vmx: &'a virt::On,
        phys: &'static PhysMap,
        ram: &[(u64, u64)],
        large_pages: bool,
        spec: &MachineSpec,
    ) -> Result<Vcpu<'a>, VmError> {
        Vcpu::new_machine_from(vmx, phys, ram, large_pages, spec, None)
    }

    /// [`Vcpu::new_machine`] whose devices (and A20 gate) take the state `saved` of a VM made
    /// from the same `spec` and `ram` (a migration's destination; its vCPUs then take their
    /// own with [`Vcpu::restore`]).
    pub fn new_machine_from(
        vmx: &'a virt::On,
        phys: &'static PhysMap,
        ram: &[(u64, u64)],
        large_pages: bool,
        spec: &MachineSpec,
        saved: Option<MachineSnapshot>,
    ) -> Result<Vcpu<'a>, VmError> {
        let spec = &MachineSpec {
            rdtscp: vmx.caps().rdtscp(),
            ..spec.clone()
        };
        let mut pgm = Pgm::new(KernelFrames, phys)?;
        pgm.set_large_pages(large_pages);
        for &(base, size) in ram {
            // On error the manager is dropped here, giving back what it took.
            let base =
                GuestPhysAddr::new(base).ok_or(RamError::Range(RangeError::BeyondAddressWidth(base)))?;
            pgm.register_ram(base, size, "ram")?;
        }
        let ram_bytes = ram.iter().map(|&(_, size)| size).sum();
        let apic_base = GuestPhysAddr::new_truncate(devices::lapic::XAPIC_BASE);
        // Nothing has run yet: no translation to invalidate.
        let (apic_page, _) = pgm.register_mmio(apic_base, pgm::PAGE_SIZE)?;
        let ioapic_base = GuestPhysAddr::new_truncate(devices::ioapic::IOAPIC_BASE);
        let (ioapic_page, _) = pgm.register_mmio(ioapic_base, pgm::PAGE_SIZE)?;
        let ioram = if spec.test_device {
            let base = GuestPhysAddr::new_truncate(devices::testdev::IORAM_BASE);
            Some(pgm.register_mmio(base, devices::testdev::IORAM_SIZE as u64)?.0)
        } else {
            None
        };
        if spec.acpi_tables {
            let image = devices::acpi::bios_area(spec.vcpus);
            let base = GuestPhysAddr::new_truncate(devices::acpi::BIOS_AREA);
            let size = devices::acpi::BIOS_AREA_SIZE;
            // Nothing has run yet: no translation to invalidate.
            let _ = pgm.register_rom(base, size, pgm::manager::RomImage::Copy(&image), false)?;
        }
        let mut devices = VmDevices::new(spec, ram_bytes, apic_page, ioapic_page, ioram)?;
        if let Some(saved) = saved {
            let a20 = devices.restore(saved);
            // Nothing has run yet: no translation to invalidate.
            let _ = pgm.set_a20(a20);
        }
        Vcpu::new_vcpu(vmx, Arc::new(VmMemory::new(pgm, devices)), phys)
    }

    /// Adds a vCPU on the calling CPU to the VM whose memory is `memory` (see
    /// [`Vcpu::memory`]).
    pub fn new_vcpu(
        vmx: &'a virt::On,
        memory: Arc<VmMemory>,
        phys: &'static PhysMap,
    ) -> Result<Vcpu<'a>, VmError> {
        let cpu = virt::Vcpu::new(vmx, phys, memory.nested_root())?;
        let requests = Arc::new(VcpuRequests::default());
        let index = memory.add_vcpu(cpu.host_cpu(), &requests);
        let msrs = MsrState::new(index, memory.devices.phys_bits);
        let has_apic = memory.devices.apics.add(index, cpu.host_cpu());
        // From here on Drop gives everything back on error.
        let mut vcpu = Vcpu {
            cpu,
            memory,
            index,
            msrs,
            reports: Vec::new(),
            exits: ExitCounts::default(),
            violations: Vec::with_capacity(VIOLATION_LOG_LIMIT),
            last_fault: None,
            measuring: None,
            exit_costs: ExitCosts::NONE,
            budget: Budget::DEFAULT,
            ticks_used: 0,
            run_started: 0,
            overrun: ExitCost::NONE,
            requests,
            carried: None,
            halted: false,
            waiting_for_startup: false,
            apic_timer: u64::MAX,
            apic_changed: false,
            dirty_logging: false,
            code_translation: None,
            decoder: DecodeCache::default(),
            last_mmio_target: None,
            vector_state: VectorState::reset(),
        };
        if !has_apic {
            return Err(VmError::TooManyVcpus);
        }
        // #UD exits: the other vendor's hypercall instruction, and SYSCALL where the CPU
        // refuses what the guest's vendor allows, are carried out (see `handle_invalid_opcode`).
        vcpu.cpu.set_exception_exiting(vector::UD, true)?;
        // The root frame may have served an earlier VM with the same EPTP value and VPID: drop
        // whatever the CPU still caches for it.
        vcpu.invalidate(Invalidation::SingleContext)?;
        Ok(vcpu)
    }

    /// The guest's general-purpose registers (RSP and RIP aside).
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn regs(&self) -> &GuestRegisters {
        self.cpu.regs()
    }

    /// The vCPU's index in its VM, which is also its APIC ID (0: the bootstrap processor).
    pub fn index(&self) -> u32 {
        self.index
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

    /// The VM's shared memory, for [`Vcpu::new_vcpu`] or for host work on another CPU.
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
    /// [`GuestMode::Long64`] programs, which need page tables: see [`Vcpu::start_paged`].
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
        let gpa =
            GuestPhysAddr::new(load_at).ok_or(AccessError::Range(RangeError::BeyondAddressWidth(load_at)))?;
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
        self.cpu.reset_to(mode, rip, cr3)?;
        *self.cpu.regs_mut() = regs;
        Ok(())
    }

    /// Leaves the vCPU waiting for INIT and a startup message from another vCPU's APIC, as an
    /// application processor waits after power-on.
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn wait_for_startup(&mut self) {
        self.waiting_for_startup = true;
    }

    /// Sets the guest's RSP (after [`start`](Self::start), which puts the stack just below the
    /// code).
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn set_stack_pointer(&mut self, rsp: u64) -> Result<(), VmError> {
        Ok(self.cpu.set_rsp(rsp)?)
    }

    /// Sets the time and exits this VM may use from now on (ticks already used count against
    /// the new limit).
    pub fn set_budget(&mut self, budget: Budget) {
        self.budget = budget;
    }

    /// The time and exits this vCPU may use.
    #[cfg_attr(feature = "kernel-tests", allow(dead_code))]
    pub fn budget(&self) -> Budget {
        self.budget
    }

    /// Ticks this VM has run, over all its finished runs.
    pub fn ticks_used(&self) -> u64 {
        self.ticks_used
    }

    /// The requests of this VM's vCPU: post to them and kick the vCPU (see [`requests`]).
    pub fn requests(&self) -> Arc<VcpuRequests> {
        Arc::clone(&self.requests)
    }

    /// Runs the vCPU with no devices behind MMIO pages; see [`Vcpu::run_with`].
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
        if this_cpu().index != self.cpu.host_cpu() {
            return VmStop::Stopped(self.diagnostic(StopCause::WrongCpu));
        }
        self.memory.set_running(self.cpu.host_cpu(), true);
        // The CPU's x87/SSE registers may hold another vCPU's (of this VM or another).
        self.vector_state.load();
        let mut handlers = VcpuHandlers {
            caller: devices,
            memory: Arc::clone(&self.memory),
            index: self.index,
            sent: Vec::new(),
            touched: false,
        };
        let mut stop = self.run_loop(&mut handlers);
        self.vector_state.store();
        self.memory.set_running(self.cpu.host_cpu(), false);
        // Out of its run, the vCPU has handed every address it logged to the host.
        if self.drain_dirty_log().is_err() && !matches!(stop, VmStop::Stopped(_)) {
            stop = VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit));
        }
        if let VmStop::Stopped(diagnostic) = &stop {
            if diagnostic.cause.stops_vm() {
                self.memory
                    .post_to_others(Some(&self.requests), Request::VM_STOPPED);
            }
        }
        stop
    }

    /// Waits while a rendezvous asks the vCPUs to park, with this vCPU's page-modification log
    /// handed to pgm first, so that what the host does while every vCPU is parked (the last
    /// round of a pre-copy) sees every write. Only a flag seen raised leads to the park, and it
    /// is looked at again after each park, so no park skips the hand-over. Returns the ticks
    /// it waited; `Err` stops the run when the log cannot be read.
    fn park_if_asked(&mut self) -> Result<u64, VmStop> {
        let mut waited = 0;
        while self.memory.rendezvous_asked() {
            if self.drain_dirty_log().is_err() {
                return Err(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit)));
            }
            waited += self.memory.park_if_asked();
        }
        Ok(waited)
    }

    /// The body of [`Vcpu::run_with`], on the vCPU's own CPU, counted as running.
    fn run_loop<H: AccessHandlers>(&mut self, handlers: &mut VcpuHandlers<'_, H>) -> VmStop {
        let rate = self.cpu.timer_granularity();
        let clock = RunClock::start(&self.budget, self.ticks_used, self.run_started, rate);
        if let Some((kind, host_ticks)) = self.carried.take() {
            // Measured as if the exit had happened `host_ticks` before this run started.
            self.measuring = Some((kind, self.run_started - host_ticks));
        }
        let exit_budget_end = self.exits.total.saturating_add(self.budget.exits);
        let stop = loop {
            // Host interrupts pending since the last exit (a kick among them) are taken before
            // the requests they may have posted are looked at.
            idt::deliver_pending();
            if let Some(stop) = self.take_requests() {
                break stop;
            }
            if let Some(stop) = self.follow_dirty_log_mode() {
                break stop;
            }
            let parked = match self.park_if_asked() {
                Ok(waited) => waited,
                Err(stop) => break stop,
            };
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
                break VmStop::Stopped(self.diagnostic(StopCause::ExitBudget));
            }
            if self.waiting_for_startup && !self.apic_waiting(now) {
                core::hint::spin_loop();
                continue;
            }
            if self.halted {
                match self.stay_halted(now) {
                    Ok(true) => {
                        core::hint::spin_loop();
                        continue;
                    }
                    Ok(false) => {}
                    Err(stop) => break stop,
                }
            }
            if let Some(stop) = self.deliver_interrupts() {
                break stop;
            }
            if self.waiting_for_startup {
                // INIT came, the startup message not yet: nothing to run.
                core::hint::spin_loop();
                continue;
            }
            let stop = self.enter_and_handle_exit(handlers, &clock);
            if handlers.touched {
                handlers.touched = false;
                let mut sent = core::mem::take(&mut handlers.sent);
                self.after_apic_access(&mut sent);
                handlers.sent = sent;
            }
            if let Some(stop) = stop {
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
            return Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit)));
        }
        if request.contains(Request::VM_STOPPED) {
            return Some(VmStop::Stopped(self.diagnostic(StopCause::VmStopped)));
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
        VmStop::Stopped(self.diagnostic(cause))
    }

    /// The guest's RIP (where a resumable run continues).
    pub fn guest_rip(&self) -> u64 {
        self.cpu.cpu_state().map_or(0, |state| state.rip)
    }

    /// Enters the guest once, with the backend's timer set for `clock`'s earliest deadline,
    /// and handles the exit; `Some` when the run is over.
    fn enter_and_handle_exit(
        &mut self,
        devices: &mut impl AccessHandlers,
        clock: &RunClock,
    ) -> Option<VmStop> {
        if let Some((kind, exit_tick)) = self.measuring.take() {
            self.exit_costs.0[kind as usize].add(ticks() - exit_tick);
        }
        if self.memory.entering_on(self.cpu.host_cpu()).is_err() {
            return Some(VmStop::Stopped(self.diagnostic(StopCause::EntryFailed)));
        }
        // Read last, so the host work above does not eat into the guest's time. The guest is
        // back by the next device interrupt, to take it.
        let deadline = clock.deadline().min(self.next_interrupt());
        let left = deadline.saturating_sub(ticks());
        let exit = self.cpu.run(left);
        let exit_tick = ticks();
        let exit = match exit {
            Ok(exit) => exit,
            Err(failure) => {
                let mut diagnostic = self.diagnostic(StopCause::EntryFailed);
                if !failure.invalid_guest_state {
                    diagnostic.exit_reason = failure.code;
                    diagnostic.exit_name = "entry instruction error";
                    log::error!("guest entry failed with error {}", failure.code);
                }
                return Some(VmStop::Stopped(diagnostic));
            }
        };
        self.exits.total += 1;
        if !matches!(exit, VmExit::NestedFault { .. }) {
            self.last_fault = None;
        }
        self.handle_exit(exit, exit_tick, devices)
    }

    /// Carries out the exit policy for `exit`, which happened at `exit_tick`.
    fn handle_exit(
        &mut self,
        exit: VmExit,
        exit_tick: u64,
        devices: &mut impl AccessHandlers,
    ) -> Option<VmStop> {
        match exit {
            VmExit::NestedFault {
                gpa,
                access,
                was_readable,
                page_walk,
                linear,
                detail,
            } => {
                if self.violations.len() < VIOLATION_LOG_LIMIT {
                    self.violations.push((gpa, detail));
                }
                self.handle_nested_fault((gpa, linear), access, was_readable, page_walk, exit_tick, devices)
            }
            VmExit::Hypercall => {
                self.measuring = Some((ExitKind::Hypercall, exit_tick));
                self.handle_hypercall()
            }
            VmExit::Preemption => {
                // The run loop decides whether a deadline passed (the timer may have been
                // capped short of it).
                self.exits.preemption_timer += 1;
                self.measuring = Some((ExitKind::Preemption, exit_tick));
                None
            }
            VmExit::ExternalInterrupt => {
                // Not acknowledged by the exit: the run loop lets the host take it, then takes
                // whatever requests its handler posted.
                self.exits.external_interrupts += 1;
                None
            }
            VmExit::Nmi => {
                self.exits.nmis += 1;
                idt::deliver_nmi();
                None
            }
            VmExit::Pause => {
                // A PAUSE loop longer than the window: the guest waits for something only
                // another vCPU or the host could give it, so it yields its slice.
                self.exits.pause_loops += 1;
                Some(VmStop::Preempted {
                    rip: self.guest_rip(),
                })
            }
            VmExit::MonitorMwait => {
                // Both may complete at once architecturally (MWAIT may wake for any reason),
                // so the guest never sleeps on the CPU; its budget bounds a wait loop.
                self.exits.monitor_mwait += 1;
                self.skip_or_stop()
            }
            VmExit::PortIo(io) => {
                self.measuring = Some((ExitKind::PortIo, exit_tick));
                self.handle_port_io(io, devices)
            }
            VmExit::DirtyLogFull => self.handle_dirty_log_full(exit_tick),
            VmExit::Hlt => self.handle_hlt(),
            VmExit::Shutdown => Some(VmStop::Stopped(self.diagnostic(StopCause::TripleFault))),
            VmExit::Cpuid => {
                self.measuring = Some((ExitKind::Cpuid, exit_tick));
                self.handle_cpuid()
            }
            VmExit::TprWrite { register } => self.handle_tpr_write(register),
            VmExit::UndecodedControlRegister { cr, write } => {
                self.handle_undecoded_control_register(cr, write)
            }
            VmExit::TprRead { register } => self.handle_tpr_read(register),
            VmExit::Absorbed => None,
            VmExit::MsrRead { msr } => {
                self.measuring = Some((ExitKind::Msr, exit_tick));
                self.handle_msr_read(msr)
            }
            VmExit::MsrWrite { msr, value } => {
                self.measuring = Some((ExitKind::Msr, exit_tick));
                self.handle_msr_write(msr, value)
            }
            VmExit::InterruptWindow => {
                // The interrupt waiting for it is delivered before the next entry.
                self.exits.interrupt_windows += 1;
                self.measuring = Some((ExitKind::InterruptWindow, exit_tick));
                None
            }
            // The exception bitmap is empty: an exception exit is unexpected.
            VmExit::Exception {
                vector: vector::UD, ..
            } => self.handle_invalid_opcode(),
            VmExit::Exception { .. } | VmExit::Fatal { .. } => {
                Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit)))
            }
        }
    }

    /// HLT. With interrupts enabled the vCPU waits for the next one (see
    /// [`stay_halted`](Self::stay_halted)); with them disabled nothing can wake it, and the run
    /// ends as `Halted` at the HLT.
    fn handle_hlt(&mut self) -> Option<VmStop> {
        self.exits.halts += 1;
        let interrupts_on = self
            .cpu
            .cpu_state()
            .is_ok_and(|state| state.rflags & RFLAGS_IF != 0);
        if !interrupts_on {
            return Some(VmStop::Halted {
                rip: self.guest_rip(),
            });
        }
        self.halted = true;
        None
    }

    /// A halted vCPU before an entry: `Ok(true)` while it keeps waiting (the run loop goes
    /// round again, taking requests and deadlines); `Ok(false)` once an interrupt woke it (RIP
    /// past the HLT, the interrupt delivered next); `Err` ends the run as `Halted` when no
    /// interrupt is armed that could wake it.
    fn stay_halted(&mut self, now: u64) -> Result<bool, VmStop> {
        if self.interrupt_waiting(now) {
            self.halted = false;
            return match self.cpu.skip_instruction() {
                Ok(()) => Ok(false),
                Err(_) => Err(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit))),
            };
        }
        // Alone in its VM with no timer armed, nothing can wake it.
        if self.next_interrupt() == u64::MAX && self.memory.vcpus_in_vm() == 1 {
            self.halted = false;
            return Err(VmStop::Halted {
                rip: self.guest_rip(),
            });
        }
        Ok(true)
    }

    /// Moves the guest past the instruction that exited; a backend failure stops the VM.
    pub(super) fn skip_or_stop(&mut self) -> Option<VmStop> {
        match self.cpu.skip_instruction() {
            Ok(()) => None,
            Err(_) => Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit))),
        }
    }

    /// Hands a nested-paging fault (`access` to `gpa`, at the guest-linear `linear` when known;
    /// `was_readable` and `page_walk` as in [`VmExit::NestedFault`]) to `pgm` and carries out the invalidation it asks for; accesses
    /// pgm cannot map (MMIO, handlers, ROM writes) are emulated through `devices`.
    fn handle_nested_fault(
        &mut self,
        (gpa, linear): (GuestPhysAddr, Option<u64>),
        access: Access,
        was_readable: bool,
        page_walk: bool,
        exit_tick: u64,
        devices: &mut impl AccessHandlers,
    ) -> Option<VmStop> {
        self.exits.ept_violations += 1;
        // An exit in the middle of delivering an event (the backend queued it again) is the
        // CPU's own access, like a page walk: there is no instruction to emulate.
        let page_walk = page_walk || self.cpu.event_pending();
        let stop = |vcpu: &Self, cause| Some(VmStop::Stopped(vcpu.diagnostic(cause)));
        // Without the lock first, where that can help. A write to a page mapped read-only
        // (write monitoring, or a fault another vCPU resolved meanwhile) may be resolved
        // lock-free; an access to an entry that was not even readable is most likely MMIO,
        // emulated on the shared manager. Anything else goes to the lock.
        let lock_free = if !was_readable {
            // Shared anew (an `Arc` count) so the guard outlives the borrow of `self`; the
            // lock-free path pays for no count.
            let memory = Arc::clone(&self.memory);
            let shared = memory.shared(self.cpu.host_cpu());
            if let Some(target) = self.mmio_target(&shared, gpa) {
                if let Some(cause) = emulation_refused(access, page_walk) {
                    return stop(self, cause);
                }
                let kind = if target.handler() == self.memory.devices.apics.page() {
                    ExitKind::ApicAccess
                } else {
                    mmio_exit_kind(access)
                };
                self.measuring = Some((kind, exit_tick));
                return self.emulate_access(
                    EmulatedMemory::Mmio(shared, target),
                    FaultPage::new(gpa, linear),
                    devices,
                );
            }
            None
        } else if access == Access::Write {
            self.memory
                .resolve_fault_lock_free(self.cpu.host_cpu(), gpa, access)
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
            FaultOutcome::Handler { .. }
                | FaultOutcome::WriteIgnored
                | FaultOutcome::EmulateWrite
                | FaultOutcome::Ballooned
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
            FaultOutcome::NotGuestMemory if self.memory.devices.unassigned_reads_ones => {
                if let Some(cause) = emulation_refused(access, page_walk) {
                    return stop(self, cause);
                }
                self.measuring = Some((ExitKind::Unassigned, exit_tick));
                let memory = Arc::clone(&self.memory);
                let shared = memory.shared(self.cpu.host_cpu());
                return self.emulate_access(
                    EmulatedMemory::Unassigned(shared),
                    FaultPage::new(gpa, linear),
                    devices,
                );
            }
            FaultOutcome::NotGuestMemory => return stop(self, StopCause::NotGuestMemory),
            FaultOutcome::OutOfMemory => return stop(self, StopCause::OutOfMemory),
            // The CPU's own walk of the guest's tables has no instruction to emulate.
            FaultOutcome::Ballooned if page_walk => return stop(self, StopCause::BalloonedPage),
            outcome @ (FaultOutcome::Handler { .. }
            | FaultOutcome::WriteIgnored
            | FaultOutcome::EmulateWrite
            | FaultOutcome::Ballooned) => {
                if let Some(cause) = emulation_refused(access, page_walk) {
                    return stop(self, cause);
                }
                let kind = match outcome {
                    FaultOutcome::Handler { .. } => mmio_exit_kind(access),
                    FaultOutcome::WriteIgnored => ExitKind::RomWriteIgnore,
                    // Emulated as the seed does: reads see zeros, writes are dropped (pgm's
                    // `read_phys` / `write_phys` on a ballooned page).
                    FaultOutcome::Ballooned => ExitKind::Ballooned,
                    _ => ExitKind::RomWriteShadow,
                };
                self.measuring = Some((kind, exit_tick));
                // The lock-free path resolves nothing that needs emulating.
                let Some(pgm) = locked else {
                    return stop(self, StopCause::UnhandledExit);
                };
                return self.emulate_access(
                    EmulatedMemory::Locked(pgm),
                    FaultPage::new(gpa, linear),
                    devices,
                );
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
        self.invalidate(invalidation)
    }

    /// Carries out `invalidation` for the VM (see [`VmMemory::flush`]).
    pub(super) fn invalidate(&mut self, invalidation: Invalidation) -> Result<(), VmError> {
        if invalidation != Invalidation::None {
            self.exits.invepts += 1;
        }
        Ok(self.memory.flush(invalidation)?)
    }

    /// Handles VMCALL: DONE ends the run, REPORT records RBX, anything else returns
    /// [`hypercall::UNKNOWN`] in RAX. RIP moves past the VMCALL. A machine without the test
    /// hypercalls ([`MachineSpec::test_hypercalls`]) answers every VMCALL as KVM answers an
    /// unknown one: -1000 (-KVM_ENOSYS) in RAX.
    fn handle_hypercall(&mut self) -> Option<VmStop> {
        if let Some(stop) = self.skip_or_stop() {
            return Some(stop);
        }
        self.hypercall()
    }

    /// The hypercall whose instruction is done (RIP past it): see
    /// [`handle_hypercall`](Self::handle_hypercall).
    pub(super) fn hypercall(&mut self) -> Option<VmStop> {
        self.exits.hypercalls += 1;
        let regs = self.cpu.regs_mut();
        if !self.memory.devices.test_hypercalls {
            regs.rax = hypercall::NO_SUCH_HYPERCALL;
            return None;
        }
        match regs.rax {
            hypercall::DONE => return Some(VmStop::Done(regs.rbx)),
            hypercall::REPORT => self.reports.push(regs.rbx),
            _ => regs.rax = hypercall::UNKNOWN,
        }
        None
    }

    /// Collects what the backend says about the last exit.
    pub(super) fn diagnostic(&self, cause: StopCause) -> Diagnostic {
        let raw = self.cpu.raw_exit();
        Diagnostic {
            cause,
            exit_reason: raw.reason,
            exit_name: raw.name,
            qualification: raw.qualification,
            gpa: raw.gpa,
            rip: raw.rip,
            instruction: InstructionBytes::default(),
            ticks: self.ticks_used + ticks().saturating_sub(self.run_started),
        }
    }
}

impl Drop for Vcpu<'_> {
    /// Leaves the VM's vCPU list and adds this vCPU's exit statistics to the totals; the
    /// VMCS (cleared on its own CPU) and, with the last vCPU, the VM's memory go with the
    /// fields.
    fn drop(&mut self) {
        self.memory.remove_vcpu(&self.requests);
        let mut finished = FINISHED_VMS.lock();
        finished.0.merge(&self.exit_costs);
        finished.1.merge(&self.overrun);
    }
}
