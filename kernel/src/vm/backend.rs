//! The seam between exit policy and a virtualization backend. A backend (VT-x in
//! `arch::vmx`; AMD SVM can sit beside it) owns its control structure (the VMCS), enters the
//! guest, and decodes every exit once into a [`VmExit`]. The vCPU loop, budgets, stops,
//! requests, emulation and devices speak only this vocabulary and the [`VirtualCpu`] trait:
//! none of them reads a VMCS field or knows an exit-reason number. Flushing the nested
//! translations is the VM's business, not one vCPU's: see `VmMemory::flush`.

use core::fmt;

use pgm::{Access, GuestPhysAddr};

pub use crate::arch::registers::GuestRegisters;

/// Which way a port access goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// IN / INS: the guest reads the port.
    In,
    /// OUT / OUTS: the guest writes the port.
    Out,
}

/// A port access that exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortIo {
    /// The port number.
    pub port: u16,
    /// The access size in bytes: 1, 2 or 4.
    pub size: u8,
    /// IN or OUT.
    pub direction: Direction,
    /// INS or OUTS (the data is in memory at RDI / RSI, not in RAX).
    pub string: bool,
    /// With a REP prefix (RCX counts the repetitions).
    pub rep: bool,
}

/// Why the guest stopped running, decoded by the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The nested page tables refused an access (EPT violation, NPT fault).
    NestedFault {
        /// The guest-physical address accessed.
        gpa: GuestPhysAddr,
        /// What the access was.
        access: Access,
        /// The entries the walk went through all granted read.
        was_readable: bool,
        /// The access was the CPU's own walk of the guest's page tables, not the guest's access.
        page_walk: bool,
        /// The guest-linear address of the access, when the backend reports it (VMX does for
        /// an access to a translated address): emulation then needs no guest walk for it.
        linear: Option<u64>,
        /// The backend's own description of the fault (VMX: the exit qualification), for
        /// logs and backend-specific tests.
        detail: u64,
    },
    /// IN, OUT, INS or OUTS.
    PortIo(PortIo),
    /// CPUID; the leaf is in RAX and the subleaf in RCX.
    Cpuid,
    /// RDMSR of the MSR in RCX.
    MsrRead {
        /// The MSR number.
        msr: u32,
    },
    /// WRMSR of `value` (EDX:EAX) to the MSR in RCX.
    MsrWrite {
        /// The MSR number.
        msr: u32,
        /// The value written.
        value: u64,
    },
    /// The hypercall instruction (VMCALL, VMMCALL).
    Hypercall,
    /// MOV to CR8 of the value in general-purpose register `register` (the task priority:
    /// the local APIC's, which the hypervisor emulates).
    #[cfg_attr(feature = "svm", allow(dead_code))] // VMX's only
    TprWrite {
        /// The source register (0 = RAX … 15 = R15).
        register: u8,
    },
    /// MOV from CR8 into general-purpose register `register`.
    #[cfg_attr(feature = "svm", allow(dead_code))] // VMX's only
    TprRead {
        /// The destination register.
        register: u8,
    },
    /// MOV to or from control register `cr` that the backend could not decode (SVM without
    /// decode assists: the exit names the register but neither the general-purpose register
    /// nor the instruction's length). The policy decodes the instruction, tells the backend
    /// its length ([`VirtualCpu::note_instruction_length`]) and carries it out.
    #[cfg_attr(not(feature = "svm"), allow(dead_code))] // SVM's only
    UndecodedControlRegister {
        /// The control register (4 or 8).
        cr: u8,
        /// A write (MOV to CRn), not a read.
        write: bool,
    },
    /// The backend handled an exit of its own (a control-register write it emulates): the
    /// loop goes round again.
    Absorbed,
    /// HLT.
    Hlt,
    /// The guest can take an interrupt (or an NMI) now (asked for with
    /// [`VirtualCpu::set_interrupt_window_exiting`] or [`VirtualCpu::set_nmi_window_exiting`]).
    InterruptWindow,
    /// The run's time is up (the backend's timer fired).
    Preemption,
    /// A host interrupt arrived while the guest ran; the host takes it after the exit.
    ExternalInterrupt,
    /// A host NMI arrived while the guest ran.
    Nmi,
    /// A PAUSE loop longer than the backend's window.
    Pause,
    /// MONITOR or MWAIT.
    MonitorMwait,
    /// A guest exception the backend intercepts.
    Exception {
        /// The vector.
        vector: u8,
        /// The error code, for the vectors that push one.
        error_code: Option<u32>,
    },
    /// The CPU's log of written pages is full (see [`VirtualCpu::drain_dirty_log`]).
    #[cfg_attr(feature = "svm", allow(dead_code))] // VMX's only
    DirtyLogFull,
    /// The guest shut down (triple fault).
    Shutdown,
    /// An exit this vocabulary has no word for: the raw reason, for the diagnostic.
    Fatal {
        /// The backend's exit reason.
        reason: u32,
    },
}

/// An event to deliver to the guest at the next entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A hardware exception (#GP, #UD, #PF, …) with its error code if the vector has one.
    Exception {
        /// The vector (0–31).
        vector: u8,
        /// The error code.
        error_code: Option<u32>,
    },
    /// An external interrupt (maskable: deliver only when [`VirtualCpu::interruptible`]).
    Interrupt(u8),
    /// A non-maskable interrupt (deliver only when [`VirtualCpu::nmi_allowed`]).
    Nmi,
}

/// Exception vectors the exit policy injects.
pub mod vector {
    /// General protection.
    pub const GP: u8 = 13;
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// Page fault.
    pub const PF: u8 = 14;
}

pub use emulator::SegmentState;

/// The guest state instruction emulation needs, read once per emulated exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuState {
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// 16, 32 or 64: the operand and address size of the code segment.
    pub bitness: u32,
    /// The CS base (0 in 64-bit code, where the CPU ignores it).
    pub code_base: u64,
    /// CR0, CR3, CR4 and EFER as the guest set them.
    pub cr0: u64,
    /// See `cr0`.
    pub cr3: u64,
    /// See `cr0`.
    pub cr4: u64,
    /// See `cr0`.
    pub efer: u64,
}

/// A segment register (ES … GS, and the task register): the emulator's word for it.
pub use emulator::SegmentRegister as Segment;

/// What the backend knows of the last exit in its own terms, for a stop's diagnostic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawExit {
    /// The backend's exit reason (VMX basic exit reason, SVM exit code).
    pub reason: u32,
    /// The backend's name for it.
    pub name: &'static str,
    /// The exit qualification (VMX) or EXITINFO1 (SVM).
    pub qualification: u64,
    /// The guest-physical address of a nested-paging exit.
    pub gpa: Option<GuestPhysAddr>,
    /// The guest's RIP.
    pub rip: u64,
}

/// A backend's failure to do what was asked (a VMX instruction failed, a field is missing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendError {
    /// What failed, for the log.
    pub what: &'static str,
    /// The backend's error number, when it gave one.
    pub code: Option<u64>,
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "{} failed (error {code})", self.what),
            None => write!(f, "{} failed", self.what),
        }
    }
}

/// How a guest entry failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryFailure {
    /// The backend's error number (the VM-instruction error, the VMRUN exit code).
    pub code: u32,
    /// The entry was refused for the guest's state (checked after the instruction started).
    pub invalid_guest_state: bool,
}

/// How an event the backend had queued for the next entry is delivered (the kinds VMX and SVM
/// both name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// An external interrupt.
    Interrupt,
    /// A non-maskable interrupt.
    Nmi,
    /// A hardware exception.
    Exception,
    /// INT n.
    SoftwareInterrupt,
    /// INT1 (ICEBP).
    #[cfg_attr(feature = "svm", allow(dead_code))] // VMX's only
    PrivilegedSoftwareException,
    /// INT3 or INTO.
    SoftwareException,
}

/// An event queued for delivery at the next entry and not yet delivered when the vCPU's state
/// was saved (an exit interrupted its delivery, or the policy injected it before the run ended).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingEvent {
    /// How it is delivered.
    pub kind: EventKind,
    /// The vector.
    pub vector: u8,
    /// The error code, for the exceptions that push one.
    pub error_code: Option<u32>,
    /// The length of the instruction that raised a software event (its return address).
    pub instruction_len: u32,
}

/// MSRs whose value is an address the CPU checks for canonical form (WRMSR's #GP).
pub const ADDRESS_MSRS: [u32; 6] = [
    devices::msr::index::LSTAR,
    devices::msr::index::CSTAR,
    devices::msr::index::KERNEL_GS_BASE,
    devices::msr::index::FS_BASE,
    devices::msr::index::GS_BASE,
    devices::msr::index::SYSENTER_ESP,
];

/// The access a nested-paging fault reports through its write and fetch bits (EPT's exit
/// qualification and NPT's EXITINFO1 both have them): a write, else a fetch, else a read.
pub fn fault_access(write: bool, fetch: bool) -> Access {
    if write {
        Access::Write
    } else if fetch {
        Access::Execute
    } else {
        Access::Read
    }
}

/// True when `address`, written to an MSR, is canonical: its bits above the CPU's widest
/// linear address (57 where it has 5-level paging, else 48) repeat the top one. The CPU checks
/// MSR values against that width whatever CR4.LA57 says (kvm-unit-tests' `la57` checks it).
pub fn canonical(address: u64) -> bool {
    static BITS: spin::Once<u32> = spin::Once::new();
    let bits = *BITS.call_once(|| {
        // CPUID.(7,0):ECX.LA57 (bit 16).
        if x86::cpuid::cpuid!(7, 0).ecx & (1 << 16) != 0 {
            57
        } else {
            48
        }
    });
    let unused = 64 - bits;
    ((address << unused) as i64 >> unused) as u64 == address
}

/// MSRs a [`CpuSnapshot`] carries by value, beside EFER, the FS and GS bases (in their
/// segments) and the TSC (as its offset): the rest of [`devices::msr::BACKEND_HELD`].
pub const SNAPSHOT_MSRS: [u32; 9] = [
    devices::msr::index::SYSENTER_CS,
    devices::msr::index::SYSENTER_ESP,
    devices::msr::index::SYSENTER_EIP,
    devices::msr::index::STAR,
    devices::msr::index::LSTAR,
    devices::msr::index::CSTAR,
    devices::msr::index::SFMASK,
    devices::msr::index::KERNEL_GS_BASE,
    devices::msr::index::TSC_AUX,
];

/// Everything of one vCPU's architectural state that its backend holds, in neutral terms, so
/// that a vCPU of another VM (a migration's destination) can go on where it stopped. The
/// vCPU layer adds what it holds itself (its APIC, emulated MSRs, x87/SSE registers). Not
/// carried: DR0–DR3 and DR6, which the guest reads and writes without an exit and no backend
/// switches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuSnapshot {
    /// The general-purpose registers but RSP.
    pub regs: GuestRegisters,
    /// RSP.
    pub rsp: u64,
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CR0 as the guest reads it.
    pub cr0: u64,
    /// CR2.
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4 as the guest reads it.
    pub cr4: u64,
    /// DR7.
    pub dr7: u64,
    /// EFER (LMA included).
    pub efer: u64,
    /// ES, CS, SS, DS, FS, GS and TR, in [`Segment`]'s order.
    pub segments: [SegmentState; 7],
    /// The LDT register.
    pub ldtr: SegmentState,
    /// GDTR base and limit.
    pub gdt: (u64, u16),
    /// IDTR base and limit.
    pub idt: (u64, u16),
    /// The values of [`SNAPSHOT_MSRS`], in its order.
    pub msrs: [u64; SNAPSHOT_MSRS.len()],
    /// What the guest's TSC adds to the host's, and TSC_ADJUST.
    pub tsc_offset: u64,
    /// See `tsc_offset`.
    pub tsc_adjust: u64,
    /// An STI or MOV SS shadow holds back interrupts for one instruction.
    pub interrupt_shadow: u8,
    /// The guest runs an NMI handler: NMIs wait for its IRET.
    pub nmi_blocked: bool,
    /// Debug exceptions the CPU has recognised and not yet delivered.
    pub pending_debug: u64,
    /// An event queued for the next entry.
    pub pending_event: Option<PendingEvent>,
    /// The vCPU asked for an interrupt window and an NMI window.
    pub interrupt_window: bool,
    /// See `interrupt_window`.
    pub nmi_window: bool,
    /// Exception vectors that exit (bit n: vector n).
    pub exception_exits: u32,
}

/// The values of [`SNAPSHOT_MSRS`] as `cpu` reads them ([`VirtualCpu::read_msr`]), for its
/// [`CpuSnapshot`]; an MSR the backend does not hold fails, naming it.
pub fn snapshot_msrs(cpu: &impl VirtualCpu) -> Result<[u64; SNAPSHOT_MSRS.len()], BackendError> {
    let mut msrs = [0; SNAPSHOT_MSRS.len()];
    for (slot, &index) in msrs.iter_mut().zip(SNAPSHOT_MSRS.iter()) {
        *slot = cpu.read_msr(index).ok_or(BackendError {
            what: "reading a held MSR",
            code: Some(u64::from(index)),
        })?;
    }
    Ok(msrs)
}

/// Writes a snapshot's `values` of [`SNAPSHOT_MSRS`] through [`VirtualCpu::write_msr`]; a value
/// the CPU would refuse fails, naming its MSR.
pub fn load_snapshot_msrs(
    cpu: &mut impl VirtualCpu,
    values: &[u64; SNAPSHOT_MSRS.len()],
) -> Result<(), BackendError> {
    for (&index, &value) in SNAPSHOT_MSRS.iter().zip(values.iter()) {
        if !cpu.write_msr(index, value) {
            return Err(BackendError {
                what: "loading a held MSR",
                code: Some(u64::from(index)),
            });
        }
    }
    Ok(())
}

/// The segment registers a [`CpuSnapshot`] holds, in its order.
pub const SNAPSHOT_SEGMENTS: [Segment; 7] = [
    Segment::Es,
    Segment::Cs,
    Segment::Ss,
    Segment::Ds,
    Segment::Fs,
    Segment::Gs,
    Segment::Tr,
];

/// One virtual CPU as the exit policy drives it. Every method works on the vCPU's own host CPU
/// only (its control structure lives there); a call elsewhere fails.
pub trait VirtualCpu {
    /// The host CPU this vCPU runs on.
    fn host_cpu(&self) -> usize;

    /// Deadlines are kept to 2^this ticks (the granularity of the backend's run timer).
    fn timer_granularity(&self) -> u32;

    /// Enters the guest for at most `ticks` TSC ticks and returns how it exited.
    fn run(&mut self, ticks: u64) -> Result<VmExit, EntryFailure>;

    /// The general-purpose registers (RSP aside).
    fn regs(&self) -> &GuestRegisters;

    /// The general-purpose registers, for a change.
    fn regs_mut(&mut self) -> &mut GuestRegisters;

    /// The guest state emulation needs.
    fn cpu_state(&self) -> Result<CpuState, BackendError>;

    /// RSP.
    fn rsp(&self) -> u64;

    /// General-purpose register `index` (0 = RAX … 15 = R15, 4 = RSP).
    fn gpr(&self, index: u8) -> u64;

    /// Sets general-purpose register `index`.
    fn set_gpr(&mut self, index: u8, value: u64) -> Result<(), BackendError>;

    /// Sets RSP.
    fn set_rsp(&mut self, rsp: u64) -> Result<(), BackendError>;

    /// The base of `segment`.
    fn segment_base(&self, segment: Segment) -> u64;

    /// The whole of `segment`: selector, base, limit and attributes.
    fn segment(&self, segment: Segment) -> Result<SegmentState, BackendError>;

    /// Loads `segment` (an emulated segment load, LTR or far jump).
    fn set_segment(&mut self, segment: Segment, state: SegmentState) -> Result<(), BackendError>;

    /// The GDTR: base and limit.
    fn gdt(&self) -> Result<(u64, u16), BackendError>;

    /// Loads the GDTR (a loader's entry state: the guest's own LGDT runs natively).
    fn set_gdt(&mut self, base: u64, limit: u16) -> Result<(), BackendError>;

    /// CR0 as the guest reads it: the bits the host owns shown as the guest last wrote them.
    fn visible_cr0(&self) -> Result<u64, BackendError>;

    /// Makes exception `vector` exit (`on`) or go to the guest as usual.
    fn set_exception_exiting(&mut self, vector: u8, on: bool) -> Result<(), BackendError>;

    /// Sets CR2, for a page fault the exit policy injects.
    fn set_fault_address(&mut self, linear: u64) -> Result<(), BackendError>;

    /// Sets RIP, and RFLAGS when `rflags` is `Some` (after an emulated instruction; most
    /// leave the flags as they were).
    fn set_rip_and_flags(&mut self, rip: u64, rflags: Option<u64>) -> Result<(), BackendError>;

    /// Moves RIP past the instruction that exited.
    fn skip_instruction(&mut self) -> Result<(), BackendError>;

    /// Tells the backend the length of the instruction that exited, for the exits whose
    /// length it could not learn itself ([`VmExit::UndecodedControlRegister`]); a backend that
    /// always knows ignores it.
    fn note_instruction_length(&mut self, length: u64);

    /// MOV to CR4 of `value`, carried out as the CPU would: `Ok(false)` (nothing changed) for
    /// a value the CPU refuses with #GP.
    fn write_cr4(&mut self, value: u64) -> Result<bool, BackendError>;

    /// Delivers `event` at the next entry. Only one event is delivered per entry.
    fn inject(&mut self, event: Event) -> Result<(), BackendError>;

    /// True when an event injected at the next entry is still pending delivery (injection
    /// after an exit that interrupted a delivery re-delivers it first).
    fn event_pending(&self) -> bool;

    /// True when the guest would take a maskable interrupt now (RFLAGS.IF set, no STI or MOV
    /// SS shadow).
    fn interruptible(&self) -> bool;

    /// True when the guest would take an NMI now (no NMI handler running, no MOV SS or STI
    /// shadow).
    fn nmi_allowed(&self) -> bool;

    /// True while the guest runs an NMI handler: NMIs wait for its IRET.
    fn nmi_handler_running(&self) -> bool;

    /// Puts the vCPU where a startup message (SIPI) after INIT leaves a CPU: real mode, CS
    /// selector `page << 8` (base `page << 12`), IP 0, the general-purpose registers cleared.
    fn start_at_page(&mut self, page: u8) -> Result<(), BackendError>;

    /// Asks for (or stops asking for) [`VmExit::InterruptWindow`] as soon as the guest can take
    /// an NMI (where the backend can tell; elsewhere the next exit looks again).
    fn set_nmi_window_exiting(&mut self, on: bool) -> Result<(), BackendError>;

    /// Asks for (or stops asking for) [`VmExit::InterruptWindow`] as soon as the guest can take
    /// an interrupt.
    fn set_interrupt_window_exiting(&mut self, on: bool) -> Result<(), BackendError>;

    /// RDMSR of an MSR the backend holds in the guest state it loads and saves around each
    /// run (`devices::msr::BACKEND_HELD`); `None` for any other.
    fn read_msr(&self, msr: u32) -> Option<u64>;

    /// WRMSR of such an MSR; false (nothing changed) for another MSR or a value the CPU would
    /// refuse with #GP (reserved bits, a non-canonical address, a forbidden EFER change).
    fn write_msr(&mut self, msr: u32, value: u64) -> bool;

    /// What the guest's TSC adds to the host's (wrapping): the guest set its TSC.
    fn tsc_offset(&self) -> u64;

    /// The last exit in the backend's terms, for a diagnostic.
    fn raw_exit(&self) -> RawExit;

    /// True when the CPU can log the guest-physical addresses the guest writes.
    fn dirty_log_supported(&self) -> bool;

    /// Turns the CPU's write logging on or off (the nested root's accessed and dirty flags with
    /// it). Turning it on without support fails.
    fn set_dirty_logging(&mut self, on: bool) -> Result<(), BackendError>;

    /// Moves the addresses logged since the last drain into `into` and empties the log.
    fn drain_dirty_log(&mut self, into: &mut alloc::vec::Vec<GuestPhysAddr>) -> Result<(), BackendError>;

    /// The vCPU's architectural state, between runs (for a migration). The CPU's log of
    /// written pages is not part of it: drain it first.
    fn save_state(&self) -> Result<CpuSnapshot, BackendError>;

    /// Loads `state`, saved by [`save_state`](Self::save_state) on a vCPU of this backend
    /// (of any VM), into this vCPU, which has not run yet. A value the CPU would refuse fails
    /// the load.
    fn load_state(&mut self, state: &CpuSnapshot) -> Result<(), BackendError>;
}
