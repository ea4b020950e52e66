//! The SVM backend of one vCPU: its VMCB (intercepts, guest state, nested paging), guest
//! entry, the decoding of every #VMEXIT into the neutral [`VmExit`], event injection, and the
//! run timer. Exit policy lives in `crate::vm` and reaches this only through [`VirtualCpu`].
//!
//! Where SVM differs from the VMX backend, and how this copes:
//! - **Instruction lengths.** Without NRIP save (QEMU 7.2's TCG has none) an exit does not say
//!   where the next instruction starts; the length of each intercepted instruction is its
//!   encoding's without prefixes (IN/OUT exits always carry the next RIP). A prefixed CPUID,
//!   RDMSR, WRMSR, HLT or VMMCALL would be skipped short; compilers emit none.
//! - **Run budgets.** SVM has no preemption timer: the host's local APIC timer is armed for the
//!   budget before each entry, and its interrupt makes the guest exit (the INTR intercept).
//! - **Flushes.** SVM cannot flush a guest's translations from the host: a flush marks the
//!   CPU, and its next entry flushes the whole TLB (TLB_CONTROL), as does an entry into another
//!   VM than the CPU's last (every vCPU uses ASID 1).
//! - **NMI windows.** SVM has no NMI-window exit (QEMU 7.2's TCG has no vNMI). After an NMI
//!   is injected, the guest's IRET exits before it runs; NMIs stay blocked until the guest is
//!   seen past that IRET (any later exit at another RIP). When an NMI waits, the backend
//!   single-steps the IRET (RFLAGS.TF and the #DB intercept, as KVM does) so that the NMI
//!   arrives right after it, not inside the handler it ends.
//! - **CR8.** Writes reach the VMCB's virtual TPR, not the emulated APIC's TPR: without decode
//!   assists an intercepted MOV CR8 does not name its register.

use alloc::vec::Vec;
use core::cell::Cell;

use pgm::frames::{HostFrameAllocator, HostMemory};
use pgm::{GuestPhysAddr, HostPhysAddr};
use spin::Once;
use x86::msr::wrmsr;

use super::vmcb::{control, save, Vmcb};
use super::{GuestRegisters, SvmError, SvmOn, EFER_SVME};
use devices::msr::index as msr;

use crate::arch::guests::GuestMode;
use crate::arch::memory::{KernelFrames, PhysMap};
use crate::arch::smp::this_cpu;
use crate::arch::{apic, ticks};
use crate::vm::backend::{canonical, fault_access, load_snapshot_msrs, snapshot_msrs, ADDRESS_MSRS};
use crate::vm::backend::{
    BackendError, CpuSnapshot, CpuState, Direction, EntryFailure, Event, EventKind, PendingEvent, PortIo,
    RawExit, Segment, SegmentState, VirtualCpu, VmExit, SNAPSHOT_SEGMENTS,
};

/// Exit codes (APM vol. 2, appendix C).
mod code {
    pub const EXCEPTION_BASE: u64 = 0x40;
    pub const DEBUG_EXCEPTION: u64 = 0x41;
    pub const INTR: u64 = 0x60;
    pub const NMI: u64 = 0x61;
    pub const VINTR: u64 = 0x64;
    pub const READ_CR8: u64 = 0x08;
    pub const WRITE_CR4: u64 = 0x14;
    pub const WRITE_CR8: u64 = 0x18;
    pub const CPUID: u64 = 0x72;
    pub const IRET: u64 = 0x74;
    pub const PAUSE: u64 = 0x77;
    pub const HLT: u64 = 0x78;
    pub const INVLPGA: u64 = 0x7A;
    pub const IOIO: u64 = 0x7B;
    pub const MSR: u64 = 0x7C;
    pub const SHUTDOWN: u64 = 0x7F;
    pub const VMRUN: u64 = 0x80;
    pub const VMMCALL: u64 = 0x81;
    pub const VMLOAD: u64 = 0x82;
    pub const VMSAVE: u64 = 0x83;
    pub const STGI: u64 = 0x84;
    pub const CLGI: u64 = 0x85;
    pub const SKINIT: u64 = 0x86;
    pub const MONITOR: u64 = 0x8A;
    pub const MWAIT: u64 = 0x8B;
    pub const XSETBV: u64 = 0x8D;
    pub const NPF: u64 = 0x400;
    pub const INVALID: u64 = u64::MAX;
}

/// Intercept vector 3 bits.
const INTERCEPT_INTR: u32 = 1 << 0;
const INTERCEPT_NMI: u32 = 1 << 1;
const INTERCEPT_VINTR: u32 = 1 << 4;
const INTERCEPT_CPUID: u32 = 1 << 18;
const INTERCEPT_IRET: u32 = 1 << 20;
const INTERCEPT_INVD: u32 = 1 << 22;
const INTERCEPT_PAUSE: u32 = 1 << 23;
const INTERCEPT_HLT: u32 = 1 << 24;
const INTERCEPT_INVLPGA: u32 = 1 << 26;
const INTERCEPT_IOIO: u32 = 1 << 27;
const INTERCEPT_MSR: u32 = 1 << 28;
const INTERCEPT_SHUTDOWN: u32 = 1 << 31;
/// Intercept vector 4 bits: VMRUN (required by VMRUN itself) and the other SVM instructions,
/// which a guest (whose EFER.SVME must be set) could otherwise run; VMMCALL; MONITOR, MWAIT
/// and XSETBV.
const INTERCEPTS_4: u32 = 0b111_1111 | (1 << 10) | (1 << 11) | (1 << 13);

/// CR intercepts: reads of CR8 (bit 8) and writes of CR4 and CR8 (bits 20, 24). CR8 is the
/// emulated APIC's task priority; CR4 writes are checked here against what the guest's CPUID
/// offers (a native write could set a bit of a feature the guest is told it lacks).
const CR_INTERCEPTS: u32 = (1 << 8) | (1 << 20) | (1 << 24);
/// CR4 bits of features the guest's CPUID hides (VMX, SMX, XSAVE until XSETBV is handled,
/// PKS): a write setting one is refused with #GP, as on a CPU without the feature (as the VMX
/// backend refuses them).
const CR4_REFUSED: u64 = (1 << 13) | (1 << 14) | (1 << 18) | (1 << 24);
const CR4_LA57: u64 = 1 << 12;
const CR4_PCIDE: u64 = 1 << 17;

/// The CR4 bits this CPU accepts (SDM/APM: each needs its feature): VME … OSXMMEXCPT always,
/// the others as CPUID reports their features.
fn host_cr4_bits() -> u64 {
    let leaf1 = x86::cpuid::cpuid!(1);
    let leaf7 = x86::cpuid::cpuid!(7, 0);
    let has = |register: u32, bit: u32| register & (1 << bit) != 0;
    let mut bits = 0x7FF;
    for (present, cr4_bit) in [
        (has(leaf7.ecx, 2), 11),  // UMIP
        (has(leaf7.ecx, 16), 12), // LA57
        (has(leaf7.ebx, 0), 16),  // FSGSBASE
        (has(leaf1.ecx, 17), 17), // PCID
        (has(leaf1.ecx, 26), 18), // XSAVE
        (has(leaf7.ebx, 7), 20),  // SMEP
        (has(leaf7.ebx, 20), 21), // SMAP
        (has(leaf7.ecx, 3), 22),  // PKU
    ] {
        if present {
            bits |= 1 << cr4_bit;
        }
    }
    bits
}

/// Virtual interrupt control bits.
const V_IRQ: u64 = 1 << 8;
const V_INTR_PRIO_HIGHEST: u64 = 0xF << 16;
const V_IGN_TPR: u64 = 1 << 20;
const V_INTR_MASKING: u64 = 1 << 24;

/// EVENTINJ / EXITINTINFO layout.
const EVENT_VALID: u64 = 1 << 31;
const EVENT_ERROR_VALID: u64 = 1 << 11;
const EVENT_TYPE_SHIFT: u64 = 8;
const EVENT_TYPE_INTR: u64 = 0;
const EVENT_TYPE_NMI: u64 = 2;
const EVENT_TYPE_EXCEPTION: u64 = 3;
const EVENT_TYPE_SOFT_INT: u64 = 4;

/// Nested-page-fault EXITINFO1 bits.
const NPF_PRESENT: u64 = 1 << 0;
const NPF_WRITE: u64 = 1 << 1;
const NPF_FETCH: u64 = 1 << 4;
const NPF_IN_GUEST_WALK: u64 = 1 << 33;

/// IOIO EXITINFO1 bits.
const IO_IN: u64 = 1 << 0;
const IO_STRING: u64 = 1 << 2;
const IO_REP: u64 = 1 << 3;
const IO_SIZE_SHIFT: u64 = 4;

const CR0_PE: u64 = 1 << 0;
const CR0_ET_NE: u64 = (1 << 4) | (1 << 5);
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_SCE: u64 = 1 << 0;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_TF: u64 = 1 << 8;
/// DR6.BS: the #DB is a single-step trap.
const DR6_SINGLE_STEP: u64 = 1 << 14;
/// The exception intercept bit of #DB.
const DEBUG_INTERCEPT: u32 = 1 << 1;

/// What [`SvmVcpu::begin_single_step`] changed, to be undone at the next exit.
#[derive(Clone, Copy)]
struct SingleStep {
    /// The guest's own RFLAGS.TF and RF.
    guest_flags: u64,
    /// The guest's exception intercepts had #DB already.
    debug_intercepted: bool,
}
/// VMCB segment attributes: L (bit 9) and D/B (bit 10).
const ATTRIBUTE_LONG: u16 = 1 << 9;
const ATTRIBUTE_DEFAULT_32: u16 = 1 << 10;
const ATTRIBUTE_PRESENT: u16 = 1 << 7;
/// The guest PAT at reset: WB, WT, UC-, UC, repeated.
const PAT_AT_RESET: u64 = 0x0007_0406_0007_0406;
/// The PAUSE filter: this many PAUSEs in a loop before it exits (KVM's default).
const PAUSE_FILTER_COUNT: u16 = 3000;
/// Every vCPU's ASID (see the module docs on flushes).
const GUEST_ASID: u32 = 1;
/// TLB_CONTROL: flush the whole TLB at this VMRUN.
const FLUSH_ALL: u8 = 1;
/// TSC_AUX (RDTSCP's and RDPID's value), which no VMCB field holds: written before each entry.
const MSR_TSC_AUX: u32 = 0xC000_0103;
/// Vectors that are not faults (no RF in the frame a delivery pushes).
const NOT_FAULTS: [u8; 6] = [1, 2, 3, 4, 8, 18];

/// The I/O and MSR permission maps every vCPU shares: all ones, so every port access and every
/// RDMSR/WRMSR exits (the device layer and the MSR policy decide). One run of five frames
/// holds both (the IOPM's 12 KiB and the MSRPM's 8 KiB must each be contiguous); made when the
/// first CPU enables SVM, kept for the kernel's life.
static PERMISSION_MAPS: Once<Option<(HostPhysAddr, HostPhysAddr)>> = Once::new();

/// The shared permission maps (see [`PERMISSION_MAPS`]).
pub(super) fn permission_maps(phys: &'static PhysMap) -> Option<(HostPhysAddr, HostPhysAddr)> {
    *PERMISSION_MAPS.call_once(|| {
        let run = KernelFrames::allocate_run(5)?;
        let mut memory = phys;
        let ones = [0xFFu8; 4096];
        for page in 0..5 {
            memory.write(HostPhysAddr::new_truncate(run.as_u64() + page * 4096), &ones);
        }
        Some((run, HostPhysAddr::new_truncate(run.as_u64() + 3 * 4096)))
    })
}

/// One vCPU on SVM: a VMCB made on the host CPU that runs it.
pub struct SvmVcpu<'a> {
    on: &'a SvmOn,
    /// The host CPU the vCPU was made on and runs on.
    cpu: usize,
    vmcb: Vmcb,
    /// The guest's general-purpose registers (RAX is copied to and from the VMCB).
    regs: GuestRegisters,
    nested_root: HostPhysAddr,
    next_rip_save: bool,
    /// The CR4 bits the CPU accepts ([`host_cr4_bits`]).
    cr4_bits: u64,
    /// The length of the instruction the last exit was for (0: not an instruction's exit).
    exit_length: Cell<u64>,
    /// An event is queued in EVENTINJ.
    event_queued: Cell<bool>,
    /// An injected NMI's handler runs (until the guest is past its IRET).
    nmi_blocked: Cell<bool>,
    /// The RIP of the instruction an STI or MOV SS shadow covers, kept until the guest is
    /// past it ([`Self::note_interrupt_shadow`]).
    shadow_at: Cell<Option<u64>>,
    /// The RIP of the NMI handler's IRET that exited and has yet to complete.
    iret_at: Cell<Option<u64>>,
    /// The backend set RFLAGS.TF to step over that IRET: the guest's own TF and RF, and
    /// whether the guest's exception intercepts already had #DB.
    stepping: Cell<Option<SingleStep>>,
    window_exiting: bool,
    nmi_window_exiting: bool,
    tsc_offset: u64,
    tsc_adjust: u64,
    tsc_aux: u64,
    /// When the current run's budget ends (TSC).
    deadline: u64,
    last_code: u64,
}

impl<'a> SvmVcpu<'a> {
    /// Makes a VMCB on the calling CPU for a guest whose nested tables are rooted at
    /// `nested_root`: intercepts, nested paging, the shared permission maps.
    pub fn new(
        on: &'a SvmOn,
        phys: &'static PhysMap,
        nested_root: HostPhysAddr,
    ) -> Result<SvmVcpu<'a>, SvmError> {
        let (iopm, msrpm) = permission_maps(phys).ok_or(SvmError::OutOfFrames)?;
        let frame = KernelFrames.allocate_frame().ok_or(SvmError::OutOfFrames)?;
        let mut memory = phys;
        memory.zero_frame(frame);
        let vcpu = SvmVcpu {
            on,
            cpu: this_cpu().index,
            vmcb: Vmcb::new(frame, phys),
            regs: GuestRegisters::default(),
            nested_root,
            next_rip_save: on.caps().next_rip_save(),
            cr4_bits: host_cr4_bits(),
            exit_length: Cell::new(0),
            event_queued: Cell::new(false),
            nmi_blocked: Cell::new(false),
            shadow_at: Cell::new(None),
            iret_at: Cell::new(None),
            stepping: Cell::new(None),
            window_exiting: false,
            nmi_window_exiting: false,
            tsc_offset: 0,
            tsc_adjust: 0,
            tsc_aux: 0,
            deadline: 0,
            last_code: 0,
        };
        vcpu.write_controls(iopm, msrpm);
        Ok(vcpu)
    }

    /// Sets the guest up to start at `rip` in `mode` with CR3 `cr3` and the stack just below.
    pub fn reset_to(&mut self, mode: GuestMode, rip: u64, cr3: u64) -> Result<(), BackendError> {
        self.write_guest_state(mode, rip, cr3);
        Ok(())
    }

    fn write_controls(&self, iopm: HostPhysAddr, msrpm: HostPhysAddr) {
        let v = &self.vmcb;
        let pause = if self.on.caps().pause_loop_exiting() {
            v.write16(control::PAUSE_FILTER_COUNT, PAUSE_FILTER_COUNT);
            INTERCEPT_PAUSE
        } else {
            0
        };
        v.write32(
            control::INTERCEPTS_3,
            INTERCEPT_INTR
                | INTERCEPT_NMI
                | INTERCEPT_CPUID
                | INTERCEPT_INVD
                | INTERCEPT_HLT
                | INTERCEPT_INVLPGA
                | INTERCEPT_IOIO
                | INTERCEPT_MSR
                | INTERCEPT_SHUTDOWN
                | pause,
        );
        v.write32(control::INTERCEPTS_4, INTERCEPTS_4);
        v.write32(control::CR_INTERCEPTS, CR_INTERCEPTS);
        v.write32(control::EXCEPTION_INTERCEPTS, 0);
        v.write64(control::IOPM_BASE, iopm.as_u64());
        v.write64(control::MSRPM_BASE, msrpm.as_u64());
        v.write32(control::ASID, GUEST_ASID);
        v.write64(control::NESTED_CONTROL, 1);
        v.write64(control::NESTED_CR3, self.nested_root.as_u64());
        self.write_virtual_interrupt();
        v.write64(save::G_PAT, PAT_AT_RESET);
    }

    /// V_INTR_MASKING always (host interrupts exit whatever the guest's IF), and a virtual
    /// interrupt request while an interrupt window is asked for (its VINTR exit says the guest
    /// can take one).
    fn write_virtual_interrupt(&self) {
        let request = if self.window_exiting {
            V_IRQ | V_INTR_PRIO_HIGHEST | V_IGN_TPR
        } else {
            0
        };
        self.vmcb
            .write64(control::VIRTUAL_INTERRUPT, V_INTR_MASKING | request);
        self.set_intercept(INTERCEPT_VINTR, self.window_exiting);
    }

    fn set_intercept(&self, bit: u32, on: bool) {
        let now = self.vmcb.read32(control::INTERCEPTS_3);
        let next = if on { now | bit } else { now & !bit };
        self.vmcb.write32(control::INTERCEPTS_3, next);
    }

    fn write_guest_state(&mut self, mode: GuestMode, rip: u64, cr3: u64) {
        let (cr0, cr4, efer) = match mode {
            GuestMode::Real => (CR0_ET_NE, 0, 0),
            GuestMode::Flat32 => (CR0_ET_NE | CR0_PE, 0, 0),
            GuestMode::Long64 => (CR0_ET_NE | CR0_PE | CR0_PG, CR4_PAE, EFER_LME | EFER_LMA),
        };
        let (code, data) = match mode {
            GuestMode::Flat32 => ((0x08, 0xFFFF_FFFF, 0xC09B), (0x10, 0xFFFF_FFFF, 0xC093)),
            GuestMode::Long64 => ((0x08, 0xFFFF_FFFF, 0xA09B), (0x10, 0xFFFF_FFFF, 0xC093)),
            GuestMode::Real => ((0, 0xFFFF, 0x9B), (0, 0xFFFF, 0x93)),
        };
        let v = &self.vmcb;
        v.write64(save::CR0, cr0);
        v.write64(save::CR3, cr3);
        v.write64(save::CR4, cr4);
        v.write64(save::EFER, efer | EFER_SVME);
        v.write64(save::DR7, 0x400);
        v.write64(save::DR6, 0xFFFF_0FF0);
        v.write64(save::RFLAGS, 0x2);
        v.write64(save::RIP, rip);
        v.write64(save::RSP, rip.saturating_sub(0x10));
        v.write64(save::CR2, 0);
        v.write8(save::CPL, 0);
        v.write64(control::INTERRUPT_SHADOW, 0);
        v.write64(control::EVENT_INJECTION, 0);
        for field in [
            save::STAR,
            save::LSTAR,
            save::CSTAR,
            save::SFMASK,
            save::KERNEL_GS_BASE,
        ] {
            v.write64(field, 0);
        }
        for field in [save::SYSENTER_CS, save::SYSENTER_ESP, save::SYSENTER_EIP] {
            v.write64(field, 0);
        }
        write_table(v, save::GDTR, 0, 0xFFFF);
        write_table(v, save::IDTR, 0, 0);
        let segment = |(selector, limit, attributes): (u16, u32, u16)| SegmentState {
            selector,
            base: 0,
            limit,
            attributes,
            usable: true,
        };
        write_segment(v, save::CS, segment(code));
        for field in [save::SS, save::DS, save::ES, save::FS, save::GS] {
            write_segment(v, field, segment(data));
        }
        write_segment(v, save::TR, segment((0, 0xFF, 0x8B)));
        write_segment(
            v,
            save::LDTR,
            SegmentState {
                usable: false,
                ..SegmentState::default()
            },
        );
        self.event_queued.set(false);
        self.nmi_blocked.set(false);
        self.iret_at.set(None);
        self.shadow_at.set(None);
    }

    /// Decodes the #VMEXIT whose code is `exit_code`.
    fn decode_exit(&self, exit_code: u64) -> Result<VmExit, EntryFailure> {
        let v = &self.vmcb;
        self.exit_length.set(0);
        // VMEXIT_INVALID is -1; QEMU's TCG stores it as a 32-bit value.
        if exit_code as u32 == code::INVALID as u32 {
            return Err(EntryFailure {
                code: u32::MAX,
                invalid_guest_state: true,
            });
        }
        if v.read64(save::RIP) == super::host_resume_address() {
            // The exit saved the host's own state (RIP after VMRUN, host stack, IDT, CR3) where
            // the guest's belongs: QEMU 7.2's TCG now and then takes a second #VMEXIT right
            // after one, whose first host instruction fetch still walks the nested tables.
            // The guest's state is gone; entering with this one would hand the guest host
            // addresses. Stop instead.
            log::error!(
                "SVM: exit {exit_code:#x} saved the host's state as the guest's (RIP {:#x})",
                v.read64(save::RIP)
            );
            return Err(EntryFailure {
                code: exit_code as u32,
                invalid_guest_state: true,
            });
        }
        self.requeue_interrupted_event();
        let stepped_over_iret = self.end_single_step(exit_code);
        self.note_iret_progress();
        self.note_interrupt_shadow();
        let info1 = v.read64(control::EXIT_INFO_1);
        let length = |len: u64| {
            self.exit_length.set(len);
        };
        Ok(match exit_code {
            code::NPF => {
                let access = fault_access(info1 & NPF_WRITE != 0, info1 & NPF_FETCH != 0);
                VmExit::NestedFault {
                    gpa: GuestPhysAddr::new_truncate(v.read64(control::EXIT_INFO_2)),
                    access,
                    was_readable: info1 & NPF_PRESENT != 0,
                    page_walk: info1 & NPF_IN_GUEST_WALK != 0,
                    linear: None,
                    detail: info1,
                }
            }
            code::IOIO => {
                let next = v.read64(control::EXIT_INFO_2);
                length(next.wrapping_sub(v.read64(save::RIP)));
                VmExit::PortIo(PortIo {
                    port: (info1 >> 16) as u16,
                    size: match (info1 >> IO_SIZE_SHIFT) & 0b111 {
                        0b001 => 1,
                        0b010 => 2,
                        _ => 4,
                    },
                    direction: if info1 & IO_IN != 0 {
                        Direction::In
                    } else {
                        Direction::Out
                    },
                    string: info1 & IO_STRING != 0,
                    rep: info1 & IO_REP != 0,
                })
            }
            code::CPUID => {
                length(2);
                VmExit::Cpuid
            }
            code::READ_CR8 => VmExit::UndecodedControlRegister { cr: 8, write: false },
            code::WRITE_CR8 => VmExit::UndecodedControlRegister { cr: 8, write: true },
            code::WRITE_CR4 => VmExit::UndecodedControlRegister { cr: 4, write: true },
            code::MSR => {
                length(2);
                if info1 & 1 == 0 {
                    VmExit::MsrRead {
                        msr: self.regs.rcx as u32,
                    }
                } else {
                    VmExit::MsrWrite {
                        msr: self.regs.rcx as u32,
                        value: (self.regs.rdx << 32) | (self.regs.rax & 0xFFFF_FFFF),
                    }
                }
            }
            code::VMMCALL => {
                length(3);
                VmExit::Hypercall
            }
            code::HLT => {
                length(1);
                VmExit::Hlt
            }
            code::PAUSE => {
                length(2);
                VmExit::Pause
            }
            code::MONITOR | code::MWAIT => {
                length(3);
                VmExit::MonitorMwait
            }
            code::VMRUN
            | code::VMLOAD
            | code::VMSAVE
            | code::STGI
            | code::CLGI
            | code::SKINIT
            | code::INVLPGA
            | code::XSETBV => {
                // The guest's CPUID offers neither SVM nor XSAVE: #UD, as such a CPU raises.
                self.absorb(|vcpu| {
                    vcpu.queue(Event::Exception {
                        vector: 6,
                        error_code: None,
                    })
                })
            }
            // The virtual request only asks when the guest can take an interrupt: it stays
            // until the policy withdraws it (as VMX's interrupt-window exiting does), and the
            // intercept keeps it from ever being delivered.
            code::VINTR => VmExit::InterruptWindow,
            code::IRET => {
                // The IRET has not run yet: NMIs stay blocked until it has.
                self.set_intercept(INTERCEPT_IRET, false);
                self.iret_at.set(Some(v.read64(save::RIP)));
                VmExit::Absorbed
            }
            code::DEBUG_EXCEPTION if stepped_over_iret => {
                if self.nmi_window_exiting {
                    VmExit::InterruptWindow
                } else {
                    VmExit::Absorbed
                }
            }
            code::INTR if ticks() >= self.deadline => VmExit::Preemption,
            code::INTR => VmExit::ExternalInterrupt,
            code::NMI => VmExit::Nmi,
            code::SHUTDOWN => VmExit::Shutdown,
            exception @ code::EXCEPTION_BASE..=0x5F => {
                let vector = (exception - code::EXCEPTION_BASE) as u8;
                VmExit::Exception {
                    vector,
                    error_code: has_error_code(vector).then_some(info1 as u32),
                }
            }
            other => VmExit::Fatal { reason: other as u32 },
        })
    }

    /// Remembers an STI or MOV SS shadow until the guest is past the instruction it covers.
    /// A CPU that drops the VMCB's shadow at VMRUN (QEMU 7.2's TCG does) may exit again before
    /// that instruction runs and report the guest there without the shadow; an NMI injected
    /// then would arrive inside it. Only NMIs wait for the remembered shadow: a maskable
    /// interrupt's window would exit at once on such a CPU, before the instruction, for ever.
    fn note_interrupt_shadow(&self) {
        let v = &self.vmcb;
        let rip = v.read64(save::RIP);
        if v.read64(control::INTERRUPT_SHADOW) & 1 != 0 {
            self.shadow_at.set(Some(rip));
        } else if self.shadow_at.get() != Some(rip) {
            self.shadow_at.set(None);
        }
    }

    /// Unblocks NMIs once the guest is seen past the NMI handler's IRET that exited.
    fn note_iret_progress(&self) {
        if let Some(rip) = self.iret_at.get() {
            if self.vmcb.read64(save::RIP) != rip {
                self.iret_at.set(None);
                self.nmi_blocked.set(false);
            }
        }
    }

    /// Sets RFLAGS.TF (and RF, so that a breakpoint on the IRET does not fire again) before an
    /// entry, when an NMI waits for the handler's IRET that exited and no event goes in at this
    /// entry (its delivery would push the TF the guest did not set).
    fn begin_single_step(&self) {
        if self.iret_at.get().is_none() || !self.nmi_window_exiting || self.event_queued.get() {
            return;
        }
        let v = &self.vmcb;
        let rflags = v.read64(save::RFLAGS);
        let intercepts = v.read32(control::EXCEPTION_INTERCEPTS);
        self.stepping.set(Some(SingleStep {
            guest_flags: rflags & (RFLAGS_TF | RFLAGS_RF),
            debug_intercepted: intercepts & DEBUG_INTERCEPT != 0,
        }));
        v.write64(save::RFLAGS, rflags | RFLAGS_TF | RFLAGS_RF);
        v.write32(control::EXCEPTION_INTERCEPTS, intercepts | DEBUG_INTERCEPT);
    }

    /// Undoes [`Self::begin_single_step`] after the exit `exit_code`: the guest gets back its
    /// #DB intercept, and its own TF and RF where the IRET has not run (an IRET that ran loaded
    /// the guest's RFLAGS from its stack). Returns true when the exit is the step's
    /// single-step trap, which the guest does not see; when the guest was stepping itself, the
    /// trap is its own too and goes in as the #DB it would have taken.
    fn end_single_step(&self, exit_code: u64) -> bool {
        let Some(step) = self.stepping.take() else {
            return false;
        };
        let v = &self.vmcb;
        if self.iret_at.get() == Some(v.read64(save::RIP)) {
            let rflags = v.read64(save::RFLAGS) & !(RFLAGS_TF | RFLAGS_RF);
            v.write64(save::RFLAGS, rflags | step.guest_flags);
        }
        if !step.debug_intercepted {
            let intercepts = v.read32(control::EXCEPTION_INTERCEPTS);
            v.write32(control::EXCEPTION_INTERCEPTS, intercepts & !DEBUG_INTERCEPT);
        }
        let dr6 = v.read64(save::DR6);
        if exit_code != code::DEBUG_EXCEPTION || dr6 & DR6_SINGLE_STEP == 0 {
            return false;
        }
        if step.guest_flags & RFLAGS_TF == 0 {
            v.write64(save::DR6, dr6 & !DR6_SINGLE_STEP);
        } else {
            // Queuing needs no more than EVENTINJ, which cannot fail.
            let _ = self.queue(Event::Exception {
                vector: 1,
                error_code: None,
            });
        }
        true
    }

    /// Runs `op` for an exit the backend handles itself: [`VmExit::Absorbed`], or a fatal exit
    /// when it could not.
    fn absorb(&self, op: impl FnOnce(&Self) -> Result<(), BackendError>) -> VmExit {
        match op(self) {
            Ok(()) => VmExit::Absorbed,
            Err(_) => VmExit::Fatal {
                reason: self.last_code as u32,
            },
        }
    }

    /// An exit that interrupted an event's delivery (a nested page fault on the guest's IDT or
    /// stack) leaves it undelivered: it goes in again at the next entry. INT n, INT3 and INTO
    /// are not re-injected: their instruction runs again.
    fn requeue_interrupted_event(&self) {
        let info = self.vmcb.read64(control::EXIT_INT_INFO);
        if info & EVENT_VALID == 0 {
            return;
        }
        let kind = (info >> EVENT_TYPE_SHIFT) & 0b111;
        let vector = info as u8;
        let soft = kind == EVENT_TYPE_SOFT_INT || (kind == EVENT_TYPE_EXCEPTION && matches!(vector, 3 | 4));
        if soft {
            return;
        }
        let real_mode = self.vmcb.read64(save::CR0) & CR0_PE == 0;
        let info = if real_mode {
            info & !EVENT_ERROR_VALID
        } else {
            info
        };
        self.vmcb.write64(control::EVENT_INJECTION, info);
        self.event_queued.set(true);
    }

    /// Moves RIP past the instruction that exited.
    fn skip(&self) -> Result<(), BackendError> {
        let rip = self.vmcb.read64(save::RIP);
        let next = if self.next_rip_save && self.exit_length.get() != 0 {
            self.vmcb.read64(control::NEXT_RIP)
        } else {
            match self.exit_length.get() {
                0 => {
                    return Err(BackendError {
                        what: "skipping an instruction whose length the exit did not give",
                        code: Some(self.last_code),
                    })
                }
                length => rip.wrapping_add(length),
            }
        };
        self.vmcb.write64(save::RIP, next);
        // The instruction is done: an STI or MOV SS shadow before it is over.
        self.vmcb.write64(control::INTERRUPT_SHADOW, 0);
        self.shadow_at.set(None);
        Ok(())
    }

    /// Queues `event` in EVENTINJ. A real-mode guest takes exceptions without error codes; a
    /// fault's frame gets RF, as the CPU's own delivery of a fault sets it.
    fn queue(&self, event: Event) -> Result<(), BackendError> {
        let real_mode = self.vmcb.read64(save::CR0) & CR0_PE == 0;
        let (kind, vector, error_code) = match event {
            Event::Exception { vector, error_code } => {
                if !NOT_FAULTS.contains(&vector) {
                    let rflags = self.vmcb.read64(save::RFLAGS);
                    self.vmcb.write64(save::RFLAGS, rflags | RFLAGS_RF);
                }
                (EVENT_TYPE_EXCEPTION, vector, error_code.filter(|_| !real_mode))
            }
            Event::Interrupt(vector) => (EVENT_TYPE_INTR, vector, None),
            Event::Nmi => {
                // The guest's NMI handler runs until its IRET, which exits.
                self.nmi_blocked.set(true);
                self.set_intercept(INTERCEPT_IRET, true);
                (EVENT_TYPE_NMI, 2, None)
            }
        };
        let mut info = EVENT_VALID | (kind << EVENT_TYPE_SHIFT) | u64::from(vector);
        if let Some(code) = error_code {
            info |= EVENT_ERROR_VALID | (u64::from(code) << 32);
        }
        self.vmcb.write64(control::EVENT_INJECTION, info);
        self.event_queued.set(true);
        Ok(())
    }

    fn wrong_cpu(&self) -> bool {
        this_cpu().index != self.cpu
    }

    fn checked(&self) -> Result<(), BackendError> {
        if self.wrong_cpu() {
            return Err(SvmError::WrongCpu.into());
        }
        Ok(())
    }

    /// The EFER a WRMSR of `value` leaves (SVME kept, LMA the CPU's), or `None` when the CPU
    /// would refuse it.
    fn checked_efer(&self, value: u64) -> Option<u64> {
        let current = self.vmcb.read64(save::EFER);
        if value & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
            return None;
        }
        if self.vmcb.read64(save::CR0) & CR0_PG != 0 && (value ^ current) & EFER_LME != 0 {
            return None;
        }
        Some((value & !EFER_LMA) | (current & EFER_LMA) | EFER_SVME)
    }

    /// The VMCB field holding MSR `index`, for the MSRs that have one.
    fn msr_field(index: u32) -> Option<u64> {
        Some(match index {
            msr::FS_BASE => save::FS + 8,
            msr::GS_BASE => save::GS + 8,
            msr::SYSENTER_CS => save::SYSENTER_CS,
            msr::SYSENTER_ESP => save::SYSENTER_ESP,
            msr::SYSENTER_EIP => save::SYSENTER_EIP,
            msr::STAR => save::STAR,
            msr::LSTAR => save::LSTAR,
            msr::CSTAR => save::CSTAR,
            msr::SFMASK => save::SFMASK,
            msr::KERNEL_GS_BASE => save::KERNEL_GS_BASE,
            _ => return None,
        })
    }
}

/// True for the exception vectors that push an error code.
fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

/// The VMCB attribute word of `state` (its 12 packed bits: the access byte and AVL, L, D/B, G).
fn packed_attributes(state: SegmentState) -> u16 {
    if !state.usable {
        return 0;
    }
    (state.attributes & 0xFF) | ((state.attributes >> 4) & 0xF00)
}

fn write_segment(v: &Vmcb, field: u64, state: SegmentState) {
    v.write16(field, state.selector);
    v.write16(field + 2, packed_attributes(state));
    v.write32(field + 4, state.limit);
    v.write64(field + 8, state.base);
}

fn read_segment(v: &Vmcb, field: u64) -> SegmentState {
    let packed = v.read16(field + 2);
    SegmentState {
        selector: v.read16(field),
        base: v.read64(field + 8),
        limit: v.read32(field + 4),
        attributes: (packed & 0xFF) | ((packed & 0xF00) << 4),
        usable: packed & ATTRIBUTE_PRESENT != 0,
    }
}

fn write_table(v: &Vmcb, field: u64, base: u64, limit: u16) {
    v.write32(field + 4, u32::from(limit));
    v.write64(field + 8, base);
}

fn read_table(v: &Vmcb, field: u64) -> (u64, u16) {
    (v.read64(field + 8), v.read32(field + 4) as u16)
}

/// The VMCB field of `segment`.
fn segment_field(segment: Segment) -> u64 {
    match segment {
        Segment::Es => save::ES,
        Segment::Cs => save::CS,
        Segment::Ss => save::SS,
        Segment::Ds => save::DS,
        Segment::Fs => save::FS,
        Segment::Gs => save::GS,
        Segment::Tr => save::TR,
    }
}

/// A name for exit code `code`, for diagnostics.
pub fn exit_name(exit_code: u64) -> &'static str {
    match exit_code {
        code::NPF => "nested page fault",
        code::IOIO => "IOIO",
        code::CPUID => "CPUID",
        code::MSR => "MSR",
        code::VMMCALL => "VMMCALL",
        code::HLT => "HLT",
        code::INTR => "INTR",
        code::NMI => "NMI",
        code::VINTR => "VINTR",
        code::IRET => "IRET",
        code::PAUSE => "PAUSE",
        code::SHUTDOWN => "SHUTDOWN",
        code::INVALID => "VMEXIT_INVALID",
        code::EXCEPTION_BASE..=0x5F => "exception",
        _ => "other",
    }
}

impl VirtualCpu for SvmVcpu<'_> {
    fn host_cpu(&self) -> usize {
        self.cpu
    }

    fn timer_granularity(&self) -> u32 {
        0
    }

    fn run(&mut self, ticks_allowed: u64) -> Result<VmExit, EntryFailure> {
        if self.wrong_cpu() {
            return Err(EntryFailure {
                code: 0,
                invalid_guest_state: false,
            });
        }
        let v = &self.vmcb;
        v.write64(save::RAX, self.regs.rax);
        // From here to VMRUN no NMI may run the host's flush handler: one that marked this CPU
        // after the look below, and acknowledged the flush, would let the guest run on
        // translations the flush was for while their frames go back. With GIF clear the NMI
        // waits; VMRUN then takes it as an exit at once, and the next entry flushes.
        super::entry::clear_global_interrupt_flag();
        let flush = self.on.take_flush(self.nested_root);
        v.write8(control::TLB_CONTROL, if flush { FLUSH_ALL } else { 0 });
        v.write32(control::CLEAN_BITS, 0);
        v.write64(control::TSC_OFFSET, self.tsc_offset);
        // SAFETY: TSC_AUX exists on every CPU with RDTSCP (every CPU with SVM); the host does
        // not read it.
        unsafe { wrmsr(MSR_TSC_AUX, self.tsc_aux) };
        self.begin_single_step();
        self.deadline = ticks().saturating_add(ticks_allowed);
        apic::arm_run_timer(self.deadline);
        // SAFETY: SVM is on for this CPU (`self.on`, made here: checked above) and the vCPU
        // loop runs with interrupts disabled; the VMCB intercepts VMRUN, SHUTDOWN, INTR and NMI
        // (`write_controls`), its nCR3 names the VM's tables, which map only frames it holds,
        // and its permission maps are the shared all-intercepting ones.
        unsafe { super::entry::run_guest(v.address().as_u64(), self.on.host_area.as_u64(), &mut self.regs) };
        apic::disarm_run_timer();
        self.regs.rax = v.read64(save::RAX);
        // The entry delivered what was queued; a requeue may queue it again.
        self.event_queued.set(false);
        v.write64(control::EVENT_INJECTION, 0);
        let exit_code = v.read64(control::EXIT_CODE);
        self.last_code = exit_code;
        self.decode_exit(exit_code)
    }

    fn regs(&self) -> &GuestRegisters {
        &self.regs
    }

    fn regs_mut(&mut self) -> &mut GuestRegisters {
        &mut self.regs
    }

    fn cpu_state(&self) -> Result<CpuState, BackendError> {
        self.checked()?;
        let v = &self.vmcb;
        let efer = v.read64(save::EFER);
        let attributes = v.read16(save::CS + 2);
        let bitness = if efer & EFER_LMA != 0 && attributes & ATTRIBUTE_LONG != 0 {
            64
        } else if attributes & ATTRIBUTE_DEFAULT_32 != 0 {
            32
        } else {
            16
        };
        Ok(CpuState {
            rip: v.read64(save::RIP),
            rflags: v.read64(save::RFLAGS),
            bitness,
            code_base: if bitness == 64 { 0 } else { v.read64(save::CS + 8) },
            cr0: v.read64(save::CR0),
            cr3: v.read64(save::CR3),
            cr4: v.read64(save::CR4),
            efer: efer & !EFER_SVME,
        })
    }

    fn rsp(&self) -> u64 {
        self.vmcb.read64(save::RSP)
    }

    fn gpr(&self, index: u8) -> u64 {
        if index == 4 {
            return self.rsp();
        }
        self.regs.by_number(index).unwrap_or(0)
    }

    fn set_gpr(&mut self, index: u8, value: u64) -> Result<(), BackendError> {
        if index == 4 {
            return self.set_rsp(value);
        }
        if let Some(slot) = self.regs.by_number_mut(index) {
            *slot = value;
        }
        Ok(())
    }

    fn set_rsp(&mut self, rsp: u64) -> Result<(), BackendError> {
        self.vmcb.write64(save::RSP, rsp);
        Ok(())
    }

    fn segment_base(&self, segment: Segment) -> u64 {
        self.vmcb.read64(segment_field(segment) + 8)
    }

    fn segment(&self, segment: Segment) -> Result<SegmentState, BackendError> {
        Ok(read_segment(&self.vmcb, segment_field(segment)))
    }

    fn set_segment(&mut self, segment: Segment, state: SegmentState) -> Result<(), BackendError> {
        write_segment(&self.vmcb, segment_field(segment), state);
        if segment == Segment::Ss {
            // The VMCB's CPL is SS's DPL (APM 15.5.1), as KVM keeps it.
            self.vmcb.write8(save::CPL, ((state.attributes >> 5) & 3) as u8);
        }
        Ok(())
    }

    fn gdt(&self) -> Result<(u64, u16), BackendError> {
        Ok(read_table(&self.vmcb, save::GDTR))
    }

    fn set_gdt(&mut self, base: u64, limit: u16) -> Result<(), BackendError> {
        write_table(&self.vmcb, save::GDTR, base, limit);
        Ok(())
    }

    fn visible_cr0(&self) -> Result<u64, BackendError> {
        Ok(self.vmcb.read64(save::CR0))
    }

    fn set_exception_exiting(&mut self, vector: u8, on: bool) -> Result<(), BackendError> {
        let bitmap = self.vmcb.read32(control::EXCEPTION_INTERCEPTS);
        let bit = 1u32 << (vector & 31);
        self.vmcb.write32(
            control::EXCEPTION_INTERCEPTS,
            if on { bitmap | bit } else { bitmap & !bit },
        );
        Ok(())
    }

    fn set_fault_address(&mut self, linear: u64) -> Result<(), BackendError> {
        // VMRUN loads the guest's CR2 from the VMCB.
        self.vmcb.write64(save::CR2, linear);
        Ok(())
    }

    fn set_rip_and_flags(&mut self, rip: u64, rflags: Option<u64>) -> Result<(), BackendError> {
        self.vmcb.write64(save::RIP, rip);
        if let Some(rflags) = rflags {
            self.vmcb.write64(save::RFLAGS, rflags);
        }
        Ok(())
    }

    fn skip_instruction(&mut self) -> Result<(), BackendError> {
        self.skip()
    }

    fn inject(&mut self, event: Event) -> Result<(), BackendError> {
        self.queue(event)
    }

    fn note_instruction_length(&mut self, length: u64) {
        self.exit_length.set(length);
    }

    fn write_cr4(&mut self, value: u64) -> Result<bool, BackendError> {
        let current = self.vmcb.read64(save::CR4);
        let long_mode = self.vmcb.read64(save::EFER) & EFER_LMA != 0;
        let enabling_pcid = value & CR4_PCIDE != 0 && current & CR4_PCIDE == 0;
        // The checks of MOV to CR4 (SDM vol. 2B, MOV—Move to/from Control Registers).
        let refused = value & (CR4_REFUSED | !self.cr4_bits) != 0
            || (long_mode && value & CR4_PAE == 0)
            || (long_mode && (value ^ current) & CR4_LA57 != 0)
            || (enabling_pcid && (!long_mode || self.vmcb.read64(save::CR3) & 0xFFF != 0));
        if refused {
            return Ok(false);
        }
        self.vmcb.write64(save::CR4, value);
        // The CPU flushes the guest's TLB on such a write; emulated, it must be asked to.
        super::flush_this_cpu(self.on, None)?;
        Ok(true)
    }

    fn event_pending(&self) -> bool {
        self.event_queued.get()
    }

    fn interruptible(&self) -> bool {
        self.vmcb.read64(save::RFLAGS) & RFLAGS_IF != 0
            && self.vmcb.read64(control::INTERRUPT_SHADOW) & 1 == 0
    }

    fn nmi_allowed(&self) -> bool {
        let in_shadow = self.vmcb.read64(control::INTERRUPT_SHADOW) & 1 != 0
            || self.shadow_at.get() == Some(self.vmcb.read64(save::RIP));
        !self.nmi_blocked.get() && !in_shadow
    }

    fn nmi_handler_running(&self) -> bool {
        self.nmi_blocked.get()
    }

    fn start_at_page(&mut self, page: u8) -> Result<(), BackendError> {
        self.write_guest_state(GuestMode::Real, 0, 0);
        let code = SegmentState {
            selector: u16::from(page) << 8,
            base: u64::from(page) << 12,
            limit: 0xFFFF,
            attributes: 0x9B,
            usable: true,
        };
        write_segment(&self.vmcb, save::CS, code);
        self.vmcb.write64(save::RSP, 0);
        self.regs = GuestRegisters::default();
        Ok(())
    }

    fn set_nmi_window_exiting(&mut self, on: bool) -> Result<(), BackendError> {
        // The IRET intercept stands while an injected NMI's handler runs (`queue`); the window
        // is that IRET.
        self.nmi_window_exiting = on;
        Ok(())
    }

    fn set_interrupt_window_exiting(&mut self, on: bool) -> Result<(), BackendError> {
        if on != self.window_exiting {
            self.window_exiting = on;
            self.write_virtual_interrupt();
        }
        Ok(())
    }

    fn read_msr(&self, index: u32) -> Option<u64> {
        match index {
            msr::TSC => Some(ticks().wrapping_add(self.tsc_offset)),
            msr::TSC_ADJUST => Some(self.tsc_adjust),
            msr::TSC_AUX => Some(self.tsc_aux),
            msr::EFER => Some(self.vmcb.read64(save::EFER) & !EFER_SVME),
            _ => Some(self.vmcb.read64(SvmVcpu::msr_field(index)?)),
        }
    }

    fn write_msr(&mut self, index: u32, value: u64) -> bool {
        if ADDRESS_MSRS.contains(&index) && !canonical(value) {
            return false;
        }
        match index {
            msr::TSC_AUX if value >> 32 != 0 => false,
            msr::TSC_AUX => {
                self.tsc_aux = value;
                true
            }
            msr::TSC => {
                let offset = value.wrapping_sub(ticks());
                self.tsc_adjust = self.tsc_adjust.wrapping_add(offset.wrapping_sub(self.tsc_offset));
                self.tsc_offset = offset;
                true
            }
            msr::TSC_ADJUST => {
                self.tsc_offset = self.tsc_offset.wrapping_add(value.wrapping_sub(self.tsc_adjust));
                self.tsc_adjust = value;
                true
            }
            msr::EFER => match self.checked_efer(value) {
                Some(efer) => {
                    self.vmcb.write64(save::EFER, efer);
                    true
                }
                None => false,
            },
            _ => match SvmVcpu::msr_field(index) {
                Some(field) => {
                    let value = if index == msr::SYSENTER_CS {
                        value & 0xFFFF_FFFF
                    } else {
                        value
                    };
                    self.vmcb.write64(field, value);
                    true
                }
                None => false,
            },
        }
    }

    fn tsc_offset(&self) -> u64 {
        self.tsc_offset
    }

    fn raw_exit(&self) -> RawExit {
        let v = &self.vmcb;
        RawExit {
            reason: self.last_code as u32,
            name: exit_name(self.last_code),
            qualification: v.read64(control::EXIT_INFO_1),
            gpa: (self.last_code == code::NPF)
                .then(|| GuestPhysAddr::new_truncate(v.read64(control::EXIT_INFO_2))),
            rip: v.read64(save::RIP),
        }
    }

    fn dirty_log_supported(&self) -> bool {
        false
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<(), BackendError> {
        if on {
            return Err(BackendError {
                what: "a CPU write log (SVM has none)",
                code: None,
            });
        }
        Ok(())
    }

    fn drain_dirty_log(&mut self, _into: &mut Vec<GuestPhysAddr>) -> Result<(), BackendError> {
        Ok(())
    }

    fn save_state(&self) -> Result<CpuSnapshot, BackendError> {
        self.checked()?;
        let v = &self.vmcb;
        let mut segments = [SegmentState::default(); SNAPSHOT_SEGMENTS.len()];
        for (slot, &segment) in segments.iter_mut().zip(SNAPSHOT_SEGMENTS.iter()) {
            *slot = read_segment(v, segment_field(segment));
        }
        let msrs = snapshot_msrs(self)?;
        let injection = v.read64(control::EVENT_INJECTION);
        Ok(CpuSnapshot {
            regs: self.regs,
            rsp: v.read64(save::RSP),
            rip: v.read64(save::RIP),
            rflags: v.read64(save::RFLAGS),
            cr0: v.read64(save::CR0),
            cr2: v.read64(save::CR2),
            cr3: v.read64(save::CR3),
            cr4: v.read64(save::CR4),
            dr7: v.read64(save::DR7),
            efer: v.read64(save::EFER) & !EFER_SVME,
            segments,
            ldtr: read_segment(v, save::LDTR),
            gdt: read_table(v, save::GDTR),
            idt: read_table(v, save::IDTR),
            msrs,
            tsc_offset: self.tsc_offset,
            tsc_adjust: self.tsc_adjust,
            interrupt_shadow: (v.read64(control::INTERRUPT_SHADOW) & 1) as u8,
            nmi_blocked: self.nmi_blocked.get(),
            pending_debug: 0,
            pending_event: (self.event_queued.get() && injection & EVENT_VALID != 0)
                .then(|| decode_event(injection)),
            interrupt_window: self.window_exiting,
            nmi_window: self.nmi_window_exiting,
            exception_exits: v.read32(control::EXCEPTION_INTERCEPTS),
        })
    }

    fn load_state(&mut self, state: &CpuSnapshot) -> Result<(), BackendError> {
        self.checked()?;
        {
            let v = &self.vmcb;
            v.write64(save::CR0, state.cr0);
            v.write64(save::CR2, state.cr2);
            v.write64(save::CR3, state.cr3);
            v.write64(save::CR4, state.cr4);
            v.write64(save::DR7, state.dr7);
            v.write64(save::EFER, state.efer | EFER_SVME);
            v.write64(save::RSP, state.rsp);
            v.write64(save::RIP, state.rip);
            v.write64(save::RFLAGS, state.rflags);
            write_table(v, save::GDTR, state.gdt.0, state.gdt.1);
            write_table(v, save::IDTR, state.idt.0, state.idt.1);
            for (&segment, &saved) in SNAPSHOT_SEGMENTS.iter().zip(state.segments.iter()) {
                write_segment(v, segment_field(segment), saved);
            }
            write_segment(v, save::LDTR, state.ldtr);
            let ss = state.segments[2];
            v.write8(save::CPL, ((ss.attributes >> 5) & 3) as u8);
            v.write64(control::INTERRUPT_SHADOW, u64::from(state.interrupt_shadow != 0));
            v.write32(control::EXCEPTION_INTERCEPTS, state.exception_exits);
        }
        load_snapshot_msrs(self, &state.msrs)?;
        self.tsc_offset = state.tsc_offset;
        self.tsc_adjust = state.tsc_adjust;
        self.regs = state.regs;
        // A snapshot is taken at an exit, where an IRET that exited has not completed yet:
        // its intercept goes back on and it exits again.
        self.nmi_blocked.set(state.nmi_blocked);
        self.iret_at.set(None);
        self.shadow_at.set(None);
        self.set_intercept(INTERCEPT_IRET, state.nmi_blocked);
        self.nmi_window_exiting = state.nmi_window;
        self.window_exiting = state.interrupt_window;
        self.write_virtual_interrupt();
        match state.pending_event {
            Some(event) => {
                self.vmcb.write64(control::EVENT_INJECTION, encode_event(event));
                self.event_queued.set(true);
            }
            None => self.event_queued.set(false),
        }
        Ok(())
    }
}

/// The EVENTINJ value of `event`.
fn encode_event(event: PendingEvent) -> u64 {
    let kind = match event.kind {
        EventKind::Interrupt => EVENT_TYPE_INTR,
        EventKind::Nmi => EVENT_TYPE_NMI,
        EventKind::SoftwareInterrupt => EVENT_TYPE_SOFT_INT,
        EventKind::Exception | EventKind::PrivilegedSoftwareException | EventKind::SoftwareException => {
            EVENT_TYPE_EXCEPTION
        }
    };
    let mut info = EVENT_VALID | (kind << EVENT_TYPE_SHIFT) | u64::from(event.vector);
    if let Some(code) = event.error_code {
        info |= EVENT_ERROR_VALID | (u64::from(code) << 32);
    }
    info
}

/// The event an EVENTINJ value describes.
fn decode_event(info: u64) -> PendingEvent {
    let vector = info as u8;
    let kind = match (info >> EVENT_TYPE_SHIFT) & 0b111 {
        EVENT_TYPE_NMI => EventKind::Nmi,
        EVENT_TYPE_SOFT_INT => EventKind::SoftwareInterrupt,
        EVENT_TYPE_EXCEPTION if matches!(vector, 3 | 4) => EventKind::SoftwareException,
        EVENT_TYPE_EXCEPTION => EventKind::Exception,
        _ => EventKind::Interrupt,
    };
    PendingEvent {
        kind,
        vector,
        error_code: (info & EVENT_ERROR_VALID != 0).then_some((info >> 32) as u32),
        instruction_len: 0,
    }
}

impl Drop for SvmVcpu<'_> {
    /// Gives the VMCB back: the vCPU never runs again, so the CPU no longer reads it.
    fn drop(&mut self) {
        KernelFrames.free_frame(self.vmcb.address());
    }
}

impl From<SvmError> for BackendError {
    fn from(error: SvmError) -> Self {
        BackendError {
            what: match error {
                SvmError::Unavailable(_) => "SVM (unavailable)",
                SvmError::OutOfFrames => "an SVM structure (no frame)",
                SvmError::NotStarted => "SVM (not started)",
                SvmError::WrongCpu => "a VMCB access (wrong CPU)",
            },
            code: None,
        }
    }
}
