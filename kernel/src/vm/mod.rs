//! One virtual machine: its memory manager (`pgm`), its VMCS and the vCPU loop that handles VM
//! exits. A guest can only stop its own VM: every exit the hypervisor cannot handle ends the run
//! with a [`Diagnostic`], never a host panic, and no guest keeps the CPU longer than its time
//! budget ([`budget`]); the host can kick a running vCPU out ([`requests`]).

pub mod budget;
pub mod requests;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicU64, Ordering};

use spin::{Mutex, MutexGuard};

use pgm::guest_paging::GuestPaging;
use pgm::manager::{AccessHandlers, HandlerAction};
use pgm::{
    Access, FaultOutcome, GuestPhysAddr, Invalidation, MemoryStats, Pgm, PgmError, Resolution, PAGE_SIZE,
};
use x86::vmx::vmcs::control::{
    EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls, EPTP_FULL,
    EXCEPTION_BITMAP, PINBASED_EXEC_CONTROLS, PLE_GAP, PLE_WINDOW, PRIMARY_PROCBASED_EXEC_CONTROLS,
    SECONDARY_PROCBASED_EXEC_CONTROLS, VMENTRY_CONTROLS, VMEXIT_CONTROLS, VPID,
};
use x86::vmx::vmcs::{control, guest, host, ro};

use crate::arch::guests::{GuestMode, GuestProgram};
use crate::arch::memory::{KernelFrames, PhysMap};
use crate::arch::smp::{self, this_cpu};
use crate::arch::vmx::{
    self,
    host::HostState,
    vmcs::{CurrentVmcs, Vmcs},
    GuestRegisters, InveptType, VmxError, VmxOn,
};
use crate::arch::{idt, ticks};
use crate::println;
use budget::{Budget, Expired, RunClock};
use emulator::{EmulationError, Machine, MemoryFault, Register};
pub use requests::host_timer_fired;
use requests::{Request, VcpuRequests};

/// Hypercall numbers (guest RAX at VMCALL).
pub mod hypercall {
    /// The guest is finished; RBX is its result. Ends the run with [`super::VmStop::Done`].
    pub const DONE: u64 = 0;
    /// Record RBX in [`super::Vm::reports`] and continue.
    pub const REPORT: u64 = 1;
    /// What RAX holds after an unknown hypercall.
    pub const UNKNOWN: u64 = u64::MAX;
}

/// Basic exit reasons this hypervisor handles or names (SDM Vol. 3D, Appendix C).
mod exit_reason {
    pub const EXCEPTION_OR_NMI: u32 = 0;
    pub const EXTERNAL_INTERRUPT: u32 = 1;
    pub const TRIPLE_FAULT: u32 = 2;
    pub const HLT: u32 = 12;
    pub const VMCALL: u32 = 18;
    pub const IO_INSTRUCTION: u32 = 30;
    pub const INVALID_GUEST_STATE: u32 = 33;
    pub const MWAIT: u32 = 36;
    pub const MONITOR: u32 = 39;
    pub const PAUSE: u32 = 40;
    pub const EPT_VIOLATION: u32 = 48;
    pub const EPT_MISCONFIGURATION: u32 = 49;
    pub const PREEMPTION_TIMER: u32 = 52;
}

/// Exit-reason bit 31: the VM entry failed.
const ENTRY_FAILURE: u64 = 1 << 31;
/// VM-exit interruption information: valid bit, and the NMI type in bits 10:8.
const INTERRUPTION_VALID: u64 = 1 << 31;
const INTERRUPTION_TYPE_NMI: u64 = 2 << 8;
const INTERRUPTION_TYPE_MASK: u64 = 7 << 8;
/// I/O-instruction exit qualification: size - 1 in bits 2:0, IN in bit 3, string and REP in
/// bits 4 and 5, the port in bits 31:16.
const IO_SIZE_MASK: u64 = 0b111;
const IO_IN: u64 = 1 << 3;
const IO_STRING: u64 = 1 << 4;
const IO_REP: u64 = 1 << 5;
/// System Control Port A: bit 1 the A20 gate, bit 0 a fast reset.
const PORT_A20: u16 = 0x92;
const A20_GATE_BIT: u64 = 1 << 1;
const FAST_RESET_BIT: u64 = 1 << 0;
/// PAUSE-loop exiting: PAUSEs at most this many ticks apart belong to one loop, and a loop
/// longer than the window exits (the values KVM uses).
const PAUSE_LOOP_GAP: u64 = 128;
const PAUSE_LOOP_WINDOW: u64 = 4096;
/// Consecutive EPT violations at the same page before the VM is stopped as a fault loop.
const FAULT_LOOP_LIMIT: u32 = 4;
/// EPT violations kept in [`Vm::violations`] (the first ones; later ones are only counted).
const VIOLATION_LOG_LIMIT: usize = 4096;
/// VPID of the (single) vCPU; 0 is reserved for the host.
const GUEST_VPID: u64 = 1;
/// Guest CR0 bits: ET (bit 4) and NE (bit 5); PE is added for protected mode.
const CR0_PE: u64 = 1 << 0;
const CR0_ET_NE: u64 = (1 << 4) | (1 << 5);
const CR0_PG: u64 = 1 << 31;
const CR4_VMXE: u64 = 1 << 13;
const CR4_PAE: u64 = 1 << 5;
/// IA32_EFER: long mode enabled and active.
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Code-segment access rights: L (64-bit code) and D/B (32-bit default size).
const CS_LONG: u64 = 1 << 13;
const CS_DEFAULT_32: u64 = 1 << 14;

/// This vCPU's VMCS, made current on this CPU (see [`Vmcs::current`]). The field is passed
/// rather than `self` so that the guard borrows only the VMCS.
fn current(vmcs: &Option<Vmcs>) -> Result<CurrentVmcs<'_>, VmxError> {
    vmcs.as_ref().expect("present until drop").current()
}

/// EPT-violation qualification: bit 7, the guest-linear address is valid; bit 8 (then), the
/// access was the translation of it rather than the CPU's access to a paging-structure entry.
const QUAL_LINEAR_VALID: u64 = 1 << 7;
const QUAL_TRANSLATED: u64 = 1 << 8;

/// True when an EPT violation was the CPU's own access to the guest's page tables.
fn is_page_walk(qualification: u64) -> bool {
    qualification & QUAL_LINEAR_VALID != 0 && qualification & QUAL_TRANSLATED == 0
}

/// Why a VM stopped without finishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// The guest touched a guest-physical address outside its memory.
    NotGuestMemory,
    /// The guest needed a page and the host had no frame for it (or the VM's limit was reached).
    OutOfMemory,
    /// The guest touched a page it had given to the balloon.
    BalloonedPage,
    /// The access needed the faulting instruction emulated (MMIO or handler access, ROM write
    /// to ignore or to route to the shadow) and the emulator does not support it; the
    /// diagnostic names the instruction bytes.
    UnsupportedInstruction,
    /// The guest fetched an instruction from a page whose accesses go to a handler (MMIO):
    /// there is no memory to execute.
    ExecuteFromHandledPage,
    /// The CPU's walk of the guest's own page tables reached a page with no memory behind it
    /// for that access (MMIO, a handler's page, a ROM page it had to set an A/D bit in): there is
    /// no instruction to emulate, and page walks are never handed to devices.
    PageWalkOutsideMemory,
    /// The instruction to emulate could not be fetched (its linear address has no mapping in
    /// the guest's page tables, or it lies outside guest RAM).
    InstructionFetch,
    /// The guest triple-faulted.
    TripleFault,
    /// An exit this hypervisor does not handle.
    UnhandledExit,
    /// VM entry failed (VMLAUNCH/VMRESUME error or invalid guest state).
    EntryFailed,
    /// The same page kept faulting after its fault was resolved.
    FaultLoop,
    /// The run took more exits than its budget allows ([`Budget::exits`]).
    ExitBudget,
    /// The VM used up its time limit ([`Budget::limit`]); the diagnostic's `ticks` says how
    /// much it ran.
    TimeBudget,
    /// The host's deadline for the work in progress passed ([`budget::set_host_deadline`]).
    HostDeadline,
    /// The vCPU was asked to run on a CPU other than the one its VMCS lives on.
    WrongCpu,
}

/// What the hypervisor knew when it stopped a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Why the VM stopped.
    pub cause: StopCause,
    /// The basic exit reason (or the VM-instruction error for a failed VMLAUNCH/VMRESUME).
    pub exit_reason: u32,
    /// The exit qualification.
    pub qualification: u64,
    /// The guest-physical address of an EPT exit.
    pub gpa: Option<GuestPhysAddr>,
    /// The guest RIP at the exit.
    pub rip: u64,
    /// The bytes of the instruction the hypervisor tried to emulate (empty otherwise).
    pub instruction: InstructionBytes,
    /// TSC ticks the VM had run, over all its runs, when it was stopped.
    pub ticks: u64,
}

/// The bytes of one guest instruction (at most 15).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstructionBytes {
    bytes: [u8; 15],
    len: u8,
}

impl InstructionBytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Display for InstructionBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.as_slice().iter().enumerate() {
            let separator = if i == 0 { "" } else { " " };
            write!(f, "{separator}{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VM stopped ({:?}): exit reason {} ({}), qualification {:#x}, guest-physical ",
            self.cause,
            self.exit_reason,
            exit_reason_name(self.exit_reason),
            self.qualification
        )?;
        match self.gpa {
            Some(gpa) => write!(f, "{gpa}")?,
            None => write!(f, "-")?,
        }
        write!(f, ", RIP {:#x}, after {} ticks", self.rip, self.ticks)?;
        if self.instruction.len > 0 {
            write!(f, ", instruction bytes [{}]", self.instruction)?;
        }
        Ok(())
    }
}

fn exit_reason_name(reason: u32) -> &'static str {
    match reason {
        exit_reason::EXCEPTION_OR_NMI => "exception or NMI",
        exit_reason::EXTERNAL_INTERRUPT => "external interrupt",
        exit_reason::TRIPLE_FAULT => "triple fault",
        9 => "task switch",
        10 => "CPUID",
        exit_reason::HLT => "HLT",
        exit_reason::VMCALL => "VMCALL",
        28 => "control-register access",
        exit_reason::IO_INSTRUCTION => "I/O instruction",
        31 => "RDMSR",
        32 => "WRMSR",
        exit_reason::INVALID_GUEST_STATE => "VM-entry failure: invalid guest state",
        exit_reason::MWAIT => "MWAIT",
        exit_reason::MONITOR => "MONITOR",
        exit_reason::PAUSE => "PAUSE",
        exit_reason::EPT_VIOLATION => "EPT violation",
        exit_reason::EPT_MISCONFIGURATION => "EPT misconfiguration",
        exit_reason::PREEMPTION_TIMER => "VMX-preemption timer",
        _ => "unnamed",
    }
}

/// How a run of the vCPU ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmStop {
    /// The guest called the DONE hypercall with this result.
    Done(u64),
    /// The guest executed HLT at this RIP.
    Halted { rip: u64 },
    /// The run's time slice is used up, or the guest yielded it in a PAUSE loop. The guest
    /// state is intact: the next run resumes at `rip`.
    Preempted { rip: u64 },
    /// The host posted [`Request::STOP`]. Resumable like `Preempted`.
    StopRequested { rip: u64 },
    /// The hypervisor stopped the VM.
    Stopped(Diagnostic),
}

impl VmStop {
    /// True when the guest can be run on from where it is.
    pub fn is_resumable(&self) -> bool {
        matches!(self, VmStop::Preempted { .. } | VmStop::StopRequested { .. })
    }
}

/// Exit counts of one VM, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Every VM exit.
    pub total: u64,
    /// EPT violations.
    pub ept_violations: u64,
    /// VMCALLs.
    pub hypercalls: u64,
    /// INVEPTs executed.
    pub invepts: u64,
    /// Instructions emulated (MMIO, handler and ROM accesses).
    pub emulated: u64,
    /// VMX-preemption timer exits.
    pub preemption_timer: u64,
    /// Host interrupts that made the guest exit (kicks, host timers).
    pub external_interrupts: u64,
    /// NMIs that made the guest exit (handed to the host).
    pub nmis: u64,
    /// PAUSE-loop exits (the guest yielded its slice).
    pub pause_loops: u64,
    /// MONITOR and MWAIT exits (both are no-ops for the guest).
    pub monitor_mwait: u64,
    /// Port I/O the hypervisor handled (the A20 gate at port 0x92).
    pub port_io: u64,
}

/// The exits whose handling cost is measured, from VM exit to the next VM entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// A write to a ZERO page: a frame is given and mapped.
    ZeroFill,
    /// The first write to a write-monitored page: it is marked written and made writable.
    WriteMonitor,
    /// A read of an MMIO or handler page, emulated through the device.
    MmioRead,
    /// A write to an MMIO or handler page, emulated through the device.
    MmioWrite,
    /// A write to ROM that is dropped; the guest continues after the instruction.
    RomWriteIgnore,
    /// A write to ROM that goes to its shadow while reads still see the image.
    RomWriteShadow,
    /// A VMCALL.
    Hypercall,
    /// A preemption: from the timer's exit to the next entry of the same vCPU, less the time
    /// the caller spent between the two runs (it returned `Preempted` and ran it again).
    Preemption,
}

impl ExitKind {
    /// Every kind, in table order.
    pub const ALL: [ExitKind; 8] = [
        ExitKind::ZeroFill,
        ExitKind::WriteMonitor,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::RomWriteIgnore,
        ExitKind::RomWriteShadow,
        ExitKind::Hypercall,
        ExitKind::Preemption,
    ];

    /// The table name.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::ZeroFill => "zero-fill",
            ExitKind::WriteMonitor => "write-monitor",
            ExitKind::MmioRead => "MMIO read",
            ExitKind::MmioWrite => "MMIO write",
            ExitKind::RomWriteIgnore => "ROM write ignore",
            ExitKind::RomWriteShadow => "ROM write to shadow",
            ExitKind::Hypercall => "hypercall",
            ExitKind::Preemption => "preemption (exit, return, run, entry)",
        }
    }
}

/// Count, sum and maximum of the handling cost of one kind of exit, in TSC ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCost {
    /// Exits measured.
    pub count: u64,
    /// Sum of their costs.
    pub total: u64,
    /// The largest cost.
    pub max: u64,
}

impl ExitCost {
    const NONE: ExitCost = ExitCost {
        count: 0,
        total: 0,
        max: 0,
    };

    fn add(&mut self, ticks: u64) {
        self.count += 1;
        self.total += ticks;
        self.max = self.max.max(ticks);
    }

    fn merge(&mut self, other: &ExitCost) {
        self.count += other.count;
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The mean cost (0 when nothing was measured).
    pub fn mean(&self) -> u64 {
        self.total.checked_div(self.count).unwrap_or(0)
    }
}

/// Exit costs by [`ExitKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitCosts([ExitCost; ExitKind::ALL.len()]);

impl ExitCosts {
    const NONE: ExitCosts = ExitCosts([ExitCost::NONE; ExitKind::ALL.len()]);

    /// The costs of `kind`.
    pub fn of(&self, kind: ExitKind) -> ExitCost {
        self.0[kind as usize]
    }

    /// Prints the table (Markdown, as the README shows it) under `title`.
    pub fn print(&self, title: &str) {
        println!("exit costs, {title} (TSC ticks from VM exit to the next VM entry):");
        println!("| exit kind | count | mean | max |");
        println!("|---|---:|---:|---:|");
        for kind in ExitKind::ALL {
            let cost = self.of(kind);
            println!(
                "| {} | {} | {} | {} |",
                kind.name(),
                cost.count,
                cost.mean(),
                cost.max
            );
        }
    }

    fn merge(&mut self, other: &ExitCosts) {
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            mine.merge(theirs);
        }
    }
}

/// Exit costs and deadline overruns of every VM destroyed since boot: each VM measures its own
/// (no lock on the exit path) and adds them here when it is dropped, so a test run can print
/// one table.
static FINISHED_VMS: Mutex<(ExitCosts, ExitCost)> = Mutex::new((ExitCosts::NONE, ExitCost::NONE));

/// The exit costs of every VM destroyed since boot.
#[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
pub fn exit_costs_of_finished_vms() -> ExitCosts {
    FINISHED_VMS.lock().0
}

/// How far past their deadline the runs of every VM destroyed since boot ended (see
/// [`Vm::overrun`]).
#[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
pub fn overrun_of_finished_vms() -> ExitCost {
    FINISHED_VMS.lock().1
}

/// Access handlers for a VM without devices: handler pages behave as pgm's default (MMIO reads
/// all ones and drops writes; handled RAM is plain memory).
pub struct NoDevices;

impl AccessHandlers for NoDevices {
    fn access(
        &mut self,
        _: pgm::handlers::HandlerId,
        _: GuestPhysAddr,
        _: Access,
        _: &mut [u8],
    ) -> HandlerAction {
        HandlerAction::Default
    }
}

/// Why a VM could not be created.
#[derive(Debug)]
pub enum VmError {
    /// The memory manager refused (bad range, no frames).
    Memory(PgmError),
    /// A VMX instruction failed or a control is unsupported.
    Vmx(VmxError),
    /// The CPU cannot set a VMX control this VM needs.
    Control { which: &'static str, missing: u32 },
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Memory(error) => write!(f, "memory: {error}"),
            VmError::Vmx(error) => write!(f, "{error}"),
            VmError::Control { which, missing } => {
                write!(f, "the CPU cannot set {which} control bits {missing:#x}")
            }
        }
    }
}

impl From<PgmError> for VmError {
    fn from(error: PgmError) -> Self {
        VmError::Memory(error)
    }
}

impl From<VmxError> for VmError {
    fn from(error: VmxError) -> Self {
        VmError::Vmx(error)
    }
}

/// The memory manager type of a kernel VM.
pub type KernelPgm = Pgm<KernelFrames, &'static PhysMap>;

/// What every vCPU of a VM shares: the memory manager, behind the VM's lock, and the set of
/// host CPUs that may cache translations of its EPT. Dropped with the last vCPU: every such
/// CPU flushes before the manager gives its frames back.
pub struct VmMemory {
    /// `None` only while dropping.
    pgm: Mutex<Option<KernelPgm>>,
    eptp: u64,
    /// Bit `i`: host CPU `i` has entered a vCPU of this VM (set before the entry).
    ran_on: AtomicU64,
}

/// The VM's memory manager, locked (see [`VmMemory::lock`]).
pub struct PgmGuard<'a>(MutexGuard<'a, Option<KernelPgm>>);

impl Deref for PgmGuard<'_> {
    type Target = KernelPgm;
    fn deref(&self) -> &KernelPgm {
        self.0.as_ref().expect("present until drop")
    }
}

impl DerefMut for PgmGuard<'_> {
    fn deref_mut(&mut self) -> &mut KernelPgm {
        self.0.as_mut().expect("present until drop")
    }
}

/// Shootdowns of every VM so far (count, and the ticks from first IPI to last flush).
static SHOOTDOWNS: Mutex<ExitCost> = Mutex::new(ExitCost::NONE);

/// What remote EPT flushes have cost so far (only flushes that reached another CPU count).
#[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
pub fn shootdown_costs() -> ExitCost {
    *SHOOTDOWNS.lock()
}

impl VmMemory {
    /// Locks the memory manager. Locking: the VM's one lock; taken by a vCPU for each EPT
    /// violation, port access or emulated access, and by the host for every change. Never
    /// hold it across [`VmMemory::flush`] or a vCPU run.
    pub fn lock(&self) -> PgmGuard<'_> {
        PgmGuard(self.pgm.lock())
    }

    /// Carries out `invalidation` everywhere it is needed: INVEPT on this CPU (unless the
    /// fault path already flushed it: [`Invalidation::OtherCpus`]) and on every other CPU that
    /// ran a vCPU of this VM, then lets the manager reuse the frames the change retired. Takes
    /// the VM's lock twice, briefly; never call it with the lock held.
    pub fn flush(&self, invalidation: Invalidation) -> Result<(), VmxError> {
        let kind = match invalidation {
            Invalidation::None => return Ok(()),
            Invalidation::OtherCpus => None,
            Invalidation::SingleContext => Some(InveptType::SingleContext),
            Invalidation::AllContexts => Some(InveptType::AllContexts),
        };
        let ticket = self.lock().begin_tlb_flush();
        let me = this_cpu();
        let local = match kind {
            Some(kind) => me.vmx().and_then(|vmx| vmx::invept(vmx, kind, self.eptp)),
            None => Ok(()),
        };
        let others = self.ran_on.load(Ordering::SeqCst) & !(1 << me.index);
        if others != 0 {
            let cost = smp::flush_ept_on(others);
            if cost.cpus > 0 {
                SHOOTDOWNS.lock().add(cost.ticks);
            }
        }
        // Only now can no CPU reach the frames the change took away.
        self.lock().end_tlb_flush(ticket);
        local
    }

    /// Records that the calling CPU is about to enter a vCPU of this VM. Before the entry, so
    /// that a change made after this flushes this CPU too.
    fn entering_on(&self, cpu: usize) {
        let bit = 1 << cpu;
        if self.ran_on.load(Ordering::Relaxed) & bit == 0 {
            self.ran_on.fetch_or(bit, Ordering::SeqCst);
        }
    }
}

impl Drop for VmMemory {
    /// Flushes every CPU that ran the VM, then gives back every frame its memory used.
    fn drop(&mut self) {
        let everywhere = self.ran_on.load(Ordering::SeqCst);
        if let Ok(vmx) = this_cpu().vmx() {
            let _ = vmx::invept(vmx, InveptType::SingleContext, self.eptp);
        }
        if everywhere & !(1 << this_cpu().index) != 0 {
            smp::flush_ept_on(everywhere);
        }
        if let Some(pgm) = self.pgm.lock().take() {
            pgm.terminate();
        }
    }
}

/// One vCPU of a VM; the first one, made by [`Vm::new`], creates the VM's memory, and
/// [`Vm::new_vcpu`] adds more that share it. A vCPU runs only on the host CPU it was created
/// on (its VMCS lives there).
pub struct Vm<'a> {
    vmx: &'a VmxOn,
    memory: Arc<VmMemory>,
    vmcs: Option<Vmcs>,
    /// The host CPU this vCPU's VMCS lives on.
    cpu: usize,
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
    entry_controls: EntryControlValues,
    /// The kind and exit time of the exit being handled, when its cost is measured.
    measuring: Option<(ExitKind, u64)>,
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
}

/// The VM-entry control values for the two kinds of guest.
#[derive(Clone, Copy, Default)]
struct EntryControlValues {
    legacy: u64,
    long_mode: u64,
}

impl<'a> Vm<'a> {
    /// Creates a VM whose RAM is the `(base, size)` ranges, with a VMCS ready for [`Vm::start`].
    /// On error every frame taken so far is given back.
    pub fn new(vmx: &'a VmxOn, phys: &'static PhysMap, ram: &[(u64, u64)]) -> Result<Vm<'a>, VmError> {
        let mut pgm = Pgm::new(KernelFrames, phys)?;
        for &(base, size) in ram {
            let base = GuestPhysAddr::new(base).ok_or(PgmError::BeyondAddressWidth);
            if let Err(error) = base.and_then(|base| pgm.register_ram(base, size, "ram")) {
                pgm.terminate();
                return Err(error.into());
            }
        }
        let eptp = pgm.ept_pointer(false);
        let memory = Arc::new(VmMemory {
            pgm: Mutex::new(Some(pgm)),
            eptp,
            ran_on: AtomicU64::new(0),
        });
        Vm::new_vcpu(vmx, memory, phys)
    }

    /// Adds a vCPU on the calling CPU to the VM whose memory is `memory` (see [`Vm::memory`]).
    pub fn new_vcpu(
        vmx: &'a VmxOn,
        memory: Arc<VmMemory>,
        phys: &'static PhysMap,
    ) -> Result<Vm<'a>, VmError> {
        let mut vm = Vm {
            vmx,
            memory,
            vmcs: None,
            cpu: this_cpu().index,
            launched: false,
            regs: GuestRegisters::default(),
            reports: Vec::new(),
            exits: ExitCounts::default(),
            violations: Vec::new(),
            last_fault: None,
            entry_controls: EntryControlValues::default(),
            measuring: None,
            exit_costs: ExitCosts::NONE,
            budget: Budget::DEFAULT,
            ticks_used: 0,
            run_started: 0,
            last_exit_reason: 0,
            overrun: ExitCost::NONE,
            requests: Arc::new(VcpuRequests::default()),
            carried: None,
        };
        // From here on Drop gives every frame back on error.
        let vmcs = Vmcs::new(vmx, &mut KernelFrames, &mut { phys })?;
        vm.vmcs = Some(vmcs);
        vm.write_controls()?;
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
        self.write_guest_state(program.mode, rip, cr3)?;
        self.regs = regs;
        Ok(())
    }

    /// Sets the guest's RSP (after [`start`](Self::start), which puts the stack just below the
    /// code).
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn set_stack_pointer(&mut self, rsp: u64) -> Result<(), VmError> {
        let vmcs = current(&self.vmcs)?;
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
    /// time limit and the host deadline ([`budget`]), plus the cost of one exit.
    pub fn run_with(&mut self, devices: &mut impl AccessHandlers) -> VmStop {
        self.run_started = ticks();
        if this_cpu().index != self.cpu {
            return VmStop::Stopped(self.diagnostic(StopCause::WrongCpu, self.last_exit_reason));
        }
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

    /// Carries out the requests posted to this vCPU: a flush now, a stop as the run's end.
    fn take_requests(&mut self) -> Option<VmStop> {
        let request = self.requests.take()?;
        if request.contains(Request::FLUSH) && self.invalidate(Invalidation::SingleContext).is_err() {
            return Some(VmStop::Stopped(
                self.diagnostic(StopCause::UnhandledExit, self.last_exit_reason),
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
        current(&self.vmcs).map_or(0, |vmcs| vmcs.read(guest::RIP))
    }

    /// Enters the guest once, with the preemption timer set for `clock`'s earliest deadline,
    /// and handles the exit; `Some` when the run is over.
    fn enter_and_handle_exit(
        &mut self,
        devices: &mut impl AccessHandlers,
        clock: &RunClock,
    ) -> Option<VmStop> {
        let vmcs = match current(&self.vmcs) {
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
        // SAFETY: `write_host_state` wrote this CPU's host state with RIP at the exit entry
        // point when the VM was created; the EPT pointer names this VM's tables, which map only
        // frames it holds; `launched` is set after the first successful entry and the VMCS is
        // VMCLEARed only when the VM is dropped.
        self.memory.entering_on(self.cpu);
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
            exit_reason::EPT_VIOLATION => self.handle_ept_violation(exit_tick, devices),
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
                None
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
            exit_reason::HLT => Some(VmStop::Halted {
                rip: vmcs.read(guest::RIP),
            }),
            exit_reason::TRIPLE_FAULT => {
                Some(VmStop::Stopped(self.diagnostic(StopCause::TripleFault, reason)))
            }
            _ => Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit, reason))),
        }
    }

    /// True when the current exception-or-NMI exit was an NMI (the exception bitmap is empty,
    /// so any other exception exit is unexpected).
    fn exit_was_nmi(&self) -> bool {
        let info = current(&self.vmcs).map_or(0, |vmcs| vmcs.read(ro::VMEXIT_INTERRUPTION_INFO));
        info & INTERRUPTION_VALID != 0 && info & INTERRUPTION_TYPE_MASK == INTERRUPTION_TYPE_NMI
    }

    /// Port I/O. The one port the hypervisor answers itself is System Control Port A (0x92),
    /// whose bit 1 is the A20 gate: a byte OUT opens or closes the gate through pgm (with the
    /// INVEPT that needs), a byte IN reads it back. Every other port, string or REP form, and
    /// the fast-reset bit (bit 0) stop the VM with the exit's diagnostic: there is no device.
    fn handle_port_io(&mut self, reason: u32) -> Option<VmStop> {
        let Ok(vmcs) = current(&self.vmcs) else {
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
        let vmcs = current(&self.vmcs)?;
        let next_rip = vmcs.read(guest::RIP) + vmcs.read(ro::VMEXIT_INSTRUCTION_LEN);
        vmcs.write(guest::RIP, next_rip)
    }

    /// Hands an EPT violation to `pgm` and carries out the invalidation it asks for; accesses
    /// pgm cannot map (MMIO, handlers, ROM writes) are emulated through `devices`.
    fn handle_ept_violation(&mut self, exit_tick: u64, devices: &mut impl AccessHandlers) -> Option<VmStop> {
        self.exits.ept_violations += 1;
        let Ok(vmcs) = current(&self.vmcs) else {
            return Some(VmStop::Stopped(
                self.diagnostic(StopCause::UnhandledExit, exit_reason::EPT_VIOLATION),
            ));
        };
        let qualification = vmcs.read(ro::EXIT_QUALIFICATION);
        let gpa = GuestPhysAddr::new_truncate(vmcs.read(ro::GUEST_PHYSICAL_ADDR_FULL));
        if self.violations.len() < VIOLATION_LOG_LIMIT {
            self.violations.push((gpa, qualification));
        }
        let access = if qualification & 0b010 != 0 {
            Access::Write
        } else if qualification & 0b100 != 0 {
            Access::Execute
        } else {
            Access::Read
        };
        let stop = |vm: &Self, cause| Some(VmStop::Stopped(vm.diagnostic(cause, exit_reason::EPT_VIOLATION)));
        let outcome = self.memory.lock().resolve_fault(gpa, access);
        let mut invalidation = match outcome {
            FaultOutcome::Resolved {
                invalidation,
                resolution,
            } => {
                self.measuring = match resolution {
                    Resolution::ZeroFill => Some((ExitKind::ZeroFill, exit_tick)),
                    Resolution::WriteMonitor => Some((ExitKind::WriteMonitor, exit_tick)),
                    Resolution::CopyOnWrite | Resolution::Remap => None,
                };
                invalidation
            }
            FaultOutcome::NotGuestMemory => return stop(self, StopCause::NotGuestMemory),
            FaultOutcome::OutOfMemory => return stop(self, StopCause::OutOfMemory),
            FaultOutcome::Ballooned => return stop(self, StopCause::BalloonedPage),
            FaultOutcome::Handler { .. } if access == Access::Execute => {
                return stop(self, StopCause::ExecuteFromHandledPage);
            }
            FaultOutcome::Handler { .. } | FaultOutcome::WriteIgnored | FaultOutcome::EmulateWrite
                if is_page_walk(qualification) =>
            {
                return stop(self, StopCause::PageWalkOutsideMemory);
            }
            outcome @ (FaultOutcome::Handler { .. }
            | FaultOutcome::WriteIgnored
            | FaultOutcome::EmulateWrite) => {
                let kind = match outcome {
                    FaultOutcome::Handler { .. } if access == Access::Write => ExitKind::MmioWrite,
                    FaultOutcome::Handler { .. } => ExitKind::MmioRead,
                    FaultOutcome::WriteIgnored => ExitKind::RomWriteIgnore,
                    _ => ExitKind::RomWriteShadow,
                };
                self.measuring = Some((kind, exit_tick));
                return self.emulate_access(gpa, devices);
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

    /// Emulates the instruction whose access to `gpa` faulted: fetches it through the guest's
    /// paging, decodes it, performs its access through pgm and `devices`, and writes back
    /// registers, RFLAGS and RIP. An instruction the emulator does not support stops the VM
    /// with a diagnostic naming its bytes.
    fn emulate_access(&mut self, gpa: GuestPhysAddr, devices: &mut impl AccessHandlers) -> Option<VmStop> {
        let stop = |vm: &Self, cause, bytes| {
            let mut diagnostic = vm.diagnostic(cause, exit_reason::EPT_VIOLATION);
            diagnostic.instruction = bytes;
            Some(VmStop::Stopped(diagnostic))
        };
        let Ok(cpu) = self.guest_cpu() else {
            return stop(self, StopCause::UnhandledExit, InstructionBytes::default());
        };
        let Some(bytes) = self.fetch_instruction(&cpu) else {
            return stop(self, StopCause::InstructionFetch, InstructionBytes::default());
        };
        let Some(instruction) = emulator::decode(cpu.bitness, bytes.as_slice(), cpu.rip) else {
            return stop(self, StopCause::UnsupportedInstruction, bytes);
        };
        let mut used = bytes;
        used.len = instruction.len() as u8;
        let mut pgm = self.memory.lock();
        let gpa = pgm.a20_apply(gpa);
        let mut machine = VcpuMachine {
            regs: &mut self.regs,
            rsp: cpu.rsp,
            segment_bases: cpu.segment_bases,
            pgm: &mut pgm,
            devices,
            invalidation: Invalidation::None,
        };
        let result = emulator::execute(&instruction, gpa, cpu.rflags, &mut machine);
        let invalidation = machine.invalidation;
        drop(pgm);
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(EmulationError::Unsupported) => return stop(self, StopCause::UnsupportedInstruction, used),
            Err(EmulationError::Memory(fault)) => {
                let cause = match fault {
                    MemoryFault::NotGuestMemory => StopCause::NotGuestMemory,
                    MemoryFault::OutOfMemory => StopCause::OutOfMemory,
                    MemoryFault::Ballooned => StopCause::BalloonedPage,
                };
                return stop(self, cause, used);
            }
        };
        self.exits.emulated += 1;
        let written = current(&self.vmcs).and_then(|vmcs| {
            vmcs.write(guest::RIP, outcome.rip)
                .and_then(|()| vmcs.write(guest::RFLAGS, outcome.rflags))
        });
        match written.and_then(|()| self.invalidate(invalidation)) {
            Ok(()) => None,
            Err(_) => stop(self, StopCause::UnhandledExit, used),
        }
    }

    /// Reads, once per emulated exit, the guest state the emulator needs.
    fn guest_cpu(&self) -> Result<GuestCpu, VmxError> {
        let vmcs = current(&self.vmcs)?;
        let efer = vmcs.read(guest::IA32_EFER_FULL);
        let access_rights = vmcs.read(guest::CS_ACCESS_RIGHTS);
        let bitness = if efer & EFER_LMA != 0 && access_rights & CS_LONG != 0 {
            64
        } else if access_rights & CS_DEFAULT_32 != 0 {
            32
        } else {
            16
        };
        let mut segment_bases = [
            guest::ES_BASE,
            guest::CS_BASE,
            guest::SS_BASE,
            guest::DS_BASE,
            guest::FS_BASE,
            guest::GS_BASE,
        ]
        .map(|field| vmcs.read(field));
        if bitness == 64 {
            // The CPU ignores these bases in 64-bit code, whatever the VMCS holds.
            segment_bases[..4].fill(0);
        }
        Ok(GuestCpu {
            rip: vmcs.read(guest::RIP),
            rflags: vmcs.read(guest::RFLAGS),
            rsp: vmcs.read(guest::RSP),
            bitness,
            segment_bases,
            paging: GuestPaging::from_registers(vmcs.read(guest::CR0), vmcs.read(guest::CR4), efer),
            cr3: vmcs.read(guest::CR3),
        })
    }

    /// Reads the (up to 15) instruction bytes at RIP through CS and the guest's paging as the
    /// guest would fetch them. Bytes on a following page that is not mapped are left out (the
    /// instruction may end before it). `None` when not even the first byte can be read.
    fn fetch_instruction(&self, cpu: &GuestCpu) -> Option<InstructionBytes> {
        let code_base = cpu.segment_bases[1];
        let linear = if cpu.bitness == 64 {
            cpu.rip
        } else {
            code_base.wrapping_add(cpu.rip) & 0xFFFF_FFFF
        };
        let pgm = self.pgm();
        let mut fetched = InstructionBytes::default();
        let mut done = 0;
        while done < fetched.bytes.len() {
            let at = linear.wrapping_add(done as u64);
            let Ok(gpa) = pgm.guest_linear_to_phys(cpu.paging, cpu.cr3, at) else {
                break;
            };
            let gpa = pgm.a20_apply(gpa);
            let len = (fetched.bytes.len() - done).min((PAGE_SIZE - gpa.page_offset()) as usize);
            if pgm.read_phys(gpa, &mut fetched.bytes[done..done + len]).is_err() {
                break;
            }
            done += len;
        }
        fetched.len = done as u8;
        (done > 0).then_some(fetched)
    }

    /// Carries out an invalidation a host-side memory change asked for (pgm returns one from
    /// every call that changes mappings the CPU may cache).
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn flush(&mut self, invalidation: Invalidation) -> Result<(), VmError> {
        Ok(self.invalidate(invalidation)?)
    }

    /// Executes the INVEPT that `invalidation` names.
    fn invalidate(&mut self, invalidation: Invalidation) -> Result<(), VmxError> {
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
    fn diagnostic(&self, cause: StopCause, exit_reason: u32) -> Diagnostic {
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
        if let Ok(vmcs) = current(&self.vmcs) {
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

    /// VM-execution, exit and entry controls: HLT, MONITOR, MWAIT and all port I/O exit, and
    /// so do long PAUSE loops where the CPU offers it; host interrupts and NMIs exit (not
    /// acknowledged: the host takes them itself); the VMX-preemption timer bounds every entry;
    /// EPT, VPID and unrestricted guest on; EFER switched on entry and exit; 64-bit host.
    fn write_controls(&mut self) -> Result<(), VmError> {
        let caps = self.vmx.caps();
        let adjust = |which, caps: &vmx::caps::ControlCaps, wanted: u32| {
            caps.adjust(wanted)
                .map(u64::from)
                .map_err(|missing| VmError::Control { which, missing })
        };
        let pin = adjust(
            "pin-based",
            &caps.pin,
            (PinbasedControls::EXTERNAL_INTERRUPT_EXITING
                | PinbasedControls::NMI_EXITING
                | PinbasedControls::VMX_PREEMPTION_TIMER)
                .bits(),
        )?;
        let primary = adjust(
            "primary processor-based",
            &caps.primary,
            (PrimaryControls::HLT_EXITING
                | PrimaryControls::UNCOND_IO_EXITING
                | PrimaryControls::MWAIT_EXITING
                | PrimaryControls::MONITOR_EXITING
                | PrimaryControls::SECONDARY_CONTROLS)
                .bits(),
        )?;
        let pause_loop_exiting = caps.pause_loop_exiting();
        let pause_loop = if pause_loop_exiting {
            SecondaryControls::PAUSE_LOOP_EXITING
        } else {
            SecondaryControls::empty()
        };
        let secondary = adjust(
            "secondary processor-based",
            &caps.secondary,
            (SecondaryControls::ENABLE_EPT
                | SecondaryControls::ENABLE_VPID
                | SecondaryControls::UNRESTRICTED_GUEST
                | pause_loop)
                .bits(),
        )?;
        let exit = adjust(
            "VM-exit",
            &caps.exit,
            (ExitControls::HOST_ADDRESS_SPACE_SIZE
                | ExitControls::SAVE_IA32_EFER
                | ExitControls::LOAD_IA32_EFER)
                .bits(),
        )?;
        let entry = adjust("VM-entry", &caps.entry, EntryControls::LOAD_IA32_EFER.bits())?;
        let entry_long_mode = adjust(
            "VM-entry",
            &caps.entry,
            (EntryControls::LOAD_IA32_EFER | EntryControls::IA32E_MODE_GUEST).bits(),
        )?;
        self.entry_controls = EntryControlValues {
            legacy: entry,
            long_mode: entry_long_mode,
        };
        let vmcs = current(&self.vmcs)?;
        for (field, value) in [
            (PINBASED_EXEC_CONTROLS, pin),
            (PRIMARY_PROCBASED_EXEC_CONTROLS, primary),
            (SECONDARY_PROCBASED_EXEC_CONTROLS, secondary),
            (VMEXIT_CONTROLS, exit),
            (VMENTRY_CONTROLS, entry),
            (EXCEPTION_BITMAP, 0),
            (VPID, GUEST_VPID),
            (EPTP_FULL, self.memory.eptp),
            (control::CR3_TARGET_COUNT, 0),
            (control::CR0_GUEST_HOST_MASK, 0),
            // The guest sees CR4.VMXE (required by VMX) as clear.
            (control::CR4_GUEST_HOST_MASK, CR4_VMXE),
            (control::CR4_READ_SHADOW, 0),
        ] {
            vmcs.write(field, value)?;
        }
        if pause_loop_exiting {
            vmcs.write(PLE_GAP, PAUSE_LOOP_GAP)?;
            vmcs.write(PLE_WINDOW, PAUSE_LOOP_WINDOW)?;
        }
        Ok(())
    }

    /// The host-state area: exits return to `vmx_exit` on the kernel's own state.
    fn write_host_state(&mut self, state: &HostState) -> Result<(), VmError> {
        let vmcs = current(&self.vmcs)?;
        for (field, value) in [
            (host::CR0, state.cr0),
            (host::CR3, state.cr3),
            (host::CR4, state.cr4),
            (host::CS_SELECTOR, u64::from(state.code_selector)),
            (host::SS_SELECTOR, u64::from(state.data_selector)),
            (host::DS_SELECTOR, u64::from(state.data_selector)),
            (host::ES_SELECTOR, u64::from(state.data_selector)),
            (host::FS_SELECTOR, 0),
            (host::GS_SELECTOR, 0),
            (host::TR_SELECTOR, u64::from(state.tr_selector)),
            (host::FS_BASE, state.fs_base),
            (host::GS_BASE, state.gs_base),
            (host::TR_BASE, state.tr_base),
            (host::GDTR_BASE, state.gdtr_base),
            (host::IDTR_BASE, state.idtr_base),
            (host::IA32_SYSENTER_CS, state.sysenter_cs),
            (host::IA32_SYSENTER_ESP, state.sysenter_esp),
            (host::IA32_SYSENTER_EIP, state.sysenter_eip),
            (host::IA32_EFER_FULL, state.efer),
            (host::RIP, state.rip),
        ] {
            vmcs.write(field, value)?;
        }
        Ok(())
    }

    /// Guest state for entering `mode` at `rip`: flat segments (protected and long mode) or
    /// real-mode segments with CS = 0; paging only in long mode (tables at `cr3`); an empty IDT
    /// (any exception triple-faults) and the stack just below `rip`.
    fn write_guest_state(&mut self, mode: GuestMode, rip: u64, cr3: u64) -> Result<(), VmError> {
        let caps = self.vmx.caps();
        let (cr0_fixed0, cr0_fixed1) = caps.cr0_fixed;
        let (cr4_fixed0, cr4_fixed1) = caps.cr4_fixed;
        let (mode_cr0, mode_cr4, efer) = match mode {
            GuestMode::Real => (0, 0, 0),
            GuestMode::Flat32 => (CR0_PE, 0, 0),
            GuestMode::Long64 => (CR0_PE | CR0_PG, CR4_PAE, EFER_LME | EFER_LMA),
        };
        // Unrestricted guest lets PE and PG be clear whatever CR0_FIXED0 says.
        let cr0 = (CR0_ET_NE | mode_cr0 | (cr0_fixed0 & !(CR0_PE | CR0_PG))) & cr0_fixed1;
        let cr4 = (cr4_fixed0 | CR4_VMXE | mode_cr4) & cr4_fixed1;
        let segments = match mode {
            GuestMode::Flat32 => SegmentSetup {
                code: (0x08, 0xFFFF_FFFF, 0xC09B),
                data: (0x10, 0xFFFF_FFFF, 0xC093),
            },
            GuestMode::Long64 => SegmentSetup {
                code: (0x08, 0xFFFF_FFFF, 0xA09B),
                data: (0x10, 0xFFFF_FFFF, 0xC093),
            },
            GuestMode::Real => SegmentSetup {
                code: (0, 0xFFFF, 0x9B),
                data: (0, 0xFFFF, 0x93),
            },
        };
        let entry_controls = if mode == GuestMode::Long64 {
            self.entry_controls.long_mode
        } else {
            self.entry_controls.legacy
        };
        let vmcs = current(&self.vmcs)?;
        for (field, value) in [
            (VMENTRY_CONTROLS, entry_controls),
            (guest::CR0, cr0),
            (guest::CR3, cr3),
            (guest::CR4, cr4),
            (control::CR0_READ_SHADOW, cr0),
            (guest::DR7, 0x400),
            (guest::RFLAGS, 0x2),
            (guest::RIP, rip),
            (guest::RSP, rip.saturating_sub(0x10)),
            (guest::IA32_EFER_FULL, efer),
            (guest::IA32_DEBUGCTL_FULL, 0),
            (guest::LINK_PTR_FULL, u64::MAX),
            (guest::INTERRUPTIBILITY_STATE, 0),
            (guest::ACTIVITY_STATE, 0),
            (guest::PENDING_DBG_EXCEPTIONS, 0),
            (guest::IA32_SYSENTER_CS, 0),
            (guest::IA32_SYSENTER_ESP, 0),
            (guest::IA32_SYSENTER_EIP, 0),
            (guest::GDTR_BASE, 0),
            (guest::GDTR_LIMIT, 0xFFFF),
            (guest::IDTR_BASE, 0),
            (guest::IDTR_LIMIT, 0),
            // 32-bit busy TSS and an unusable LDT: the minimum VM entry accepts.
            (guest::TR_SELECTOR, 0),
            (guest::TR_BASE, 0),
            (guest::TR_LIMIT, 0xFF),
            (guest::TR_ACCESS_RIGHTS, 0x8B),
            (guest::LDTR_SELECTOR, 0),
            (guest::LDTR_BASE, 0),
            (guest::LDTR_LIMIT, 0),
            (guest::LDTR_ACCESS_RIGHTS, 0x1_0000),
        ] {
            vmcs.write(field, value)?;
        }
        let (selector, limit, access) = segments.code;
        write_segment(&vmcs, SegmentFields::CS, selector, limit, access)?;
        let (selector, limit, access) = segments.data;
        for fields in [
            SegmentFields::SS,
            SegmentFields::DS,
            SegmentFields::ES,
            SegmentFields::FS,
            SegmentFields::GS,
        ] {
            write_segment(&vmcs, fields, selector, limit, access)?;
        }
        Ok(())
    }
}

/// The guest state an emulated exit needs, read from the VMCS once.
struct GuestCpu {
    rip: u64,
    rflags: u64,
    rsp: u64,
    /// 16, 32 or 64: the operand and address size of the code segment.
    bitness: u32,
    /// ES, CS, SS, DS, FS, GS (the first four 0 in 64-bit code).
    segment_bases: [u64; 6],
    paging: GuestPaging,
    cr3: u64,
}

/// The vCPU and guest memory of one VM as the instruction emulator sees them: registers from
/// [`Vm::regs`] (RSP read-only from the VMCS), memory through pgm and the VM's devices.
struct VcpuMachine<'v, H> {
    regs: &'v mut GuestRegisters,
    rsp: u64,
    /// ES, CS, SS, DS, FS, GS.
    segment_bases: [u64; 6],
    pgm: &'v mut KernelPgm,
    devices: &'v mut H,
    /// The invalidation the emulated writes need.
    invalidation: Invalidation,
}

impl<H> VcpuMachine<'_, H> {
    fn slot(&mut self, full: Register) -> Option<&mut u64> {
        let regs = &mut *self.regs;
        Some(match full {
            Register::RAX => &mut regs.rax,
            Register::RBX => &mut regs.rbx,
            Register::RCX => &mut regs.rcx,
            Register::RDX => &mut regs.rdx,
            Register::RSI => &mut regs.rsi,
            Register::RDI => &mut regs.rdi,
            Register::RBP => &mut regs.rbp,
            Register::R8 => &mut regs.r8,
            Register::R9 => &mut regs.r9,
            Register::R10 => &mut regs.r10,
            Register::R11 => &mut regs.r11,
            Register::R12 => &mut regs.r12,
            Register::R13 => &mut regs.r13,
            Register::R14 => &mut regs.r14,
            Register::R15 => &mut regs.r15,
            _ => return None,
        })
    }
}

/// What a pgm error during an emulated access means for the guest.
fn memory_fault(error: PgmError) -> MemoryFault {
    match error {
        PgmError::NotGuestMemory(_) | PgmError::NotRam(_) => MemoryFault::NotGuestMemory,
        PgmError::PageState { .. } => MemoryFault::Ballooned,
        _ => MemoryFault::OutOfMemory,
    }
}

impl<H: AccessHandlers> Machine for VcpuMachine<'_, H> {
    fn gpr(&mut self, full: Register) -> u64 {
        if full == Register::RSP {
            return self.rsp;
        }
        self.slot(full).map_or(0, |slot| *slot)
    }

    fn segment_base(&mut self, segment: Register) -> u64 {
        let index = match segment {
            Register::ES => 0,
            Register::CS => 1,
            Register::SS => 2,
            Register::DS => 3,
            Register::FS => 4,
            _ => 5,
        };
        self.segment_bases[index]
    }

    fn set_gpr(&mut self, full: Register, value: u64) {
        // RSP is never the destination of a supported instruction.
        if let Some(slot) = self.slot(full) {
            *slot = value;
        }
    }

    fn read(&mut self, gpa: GuestPhysAddr, data: &mut [u8]) -> Result<(), MemoryFault> {
        self.pgm
            .read_phys_handled(gpa, data, &mut *self.devices)
            .map_err(memory_fault)
    }

    fn write(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), MemoryFault> {
        let invalidation = self
            .pgm
            .write_phys_handled(gpa, data, &mut *self.devices)
            .map_err(memory_fault)?;
        self.invalidation = self.invalidation.max(invalidation);
        Ok(())
    }
}

impl Drop for Vm<'_> {
    /// Gives back the VMCS and every frame the VM's memory used.
    fn drop(&mut self) {
        {
            let mut finished = FINISHED_VMS.lock();
            finished.0.merge(&self.exit_costs);
            finished.1.merge(&self.overrun);
        }
        if let Some(vmcs) = self.vmcs.take() {
            if this_cpu().index == self.cpu {
                vmcs.release(&mut KernelFrames);
            } else {
                // VMCLEAR only works on the CPU the VMCS is active on.
                match smp::spawn_on(self.cpu, move || vmcs.release(&mut KernelFrames)) {
                    Ok(task) => task.join(),
                    Err(error) => log::error!("vCPU dropped away from its CPU; VMCS kept: {error}"),
                }
            }
        }
    }
}

/// Selector, limit and access rights of the code segment and of the data segments.
struct SegmentSetup {
    code: (u64, u64, u64),
    data: (u64, u64, u64),
}

/// The four VMCS fields of one guest segment register.
struct SegmentFields {
    selector: u32,
    base: u32,
    limit: u32,
    access: u32,
}

impl SegmentFields {
    const CS: Self = Self::of(
        guest::CS_SELECTOR,
        guest::CS_BASE,
        guest::CS_LIMIT,
        guest::CS_ACCESS_RIGHTS,
    );
    const SS: Self = Self::of(
        guest::SS_SELECTOR,
        guest::SS_BASE,
        guest::SS_LIMIT,
        guest::SS_ACCESS_RIGHTS,
    );
    const DS: Self = Self::of(
        guest::DS_SELECTOR,
        guest::DS_BASE,
        guest::DS_LIMIT,
        guest::DS_ACCESS_RIGHTS,
    );
    const ES: Self = Self::of(
        guest::ES_SELECTOR,
        guest::ES_BASE,
        guest::ES_LIMIT,
        guest::ES_ACCESS_RIGHTS,
    );
    const FS: Self = Self::of(
        guest::FS_SELECTOR,
        guest::FS_BASE,
        guest::FS_LIMIT,
        guest::FS_ACCESS_RIGHTS,
    );
    const GS: Self = Self::of(
        guest::GS_SELECTOR,
        guest::GS_BASE,
        guest::GS_LIMIT,
        guest::GS_ACCESS_RIGHTS,
    );

    const fn of(selector: u32, base: u32, limit: u32, access: u32) -> Self {
        SegmentFields {
            selector,
            base,
            limit,
            access,
        }
    }
}

/// Writes one guest segment register with base 0 (real mode: selector 0 means base 0 too).
fn write_segment(
    vmcs: &CurrentVmcs,
    fields: SegmentFields,
    selector: u64,
    limit: u64,
    access: u64,
) -> Result<(), VmxError> {
    vmcs.write(fields.selector, selector)?;
    vmcs.write(fields.base, 0)?;
    vmcs.write(fields.limit, limit)?;
    vmcs.write(fields.access, access)
}
