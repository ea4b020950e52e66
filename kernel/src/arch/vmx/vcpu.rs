//! The VT-x backend of one vCPU: its VMCS (execution controls, host and guest state), guest
//! entry, the decoding of every exit into the neutral [`VmExit`], event injection, and the
//! page-modification log. Exit policy lives in `crate::vm` and reaches this only through
//! [`VirtualCpu`].

use alloc::vec::Vec;
use core::cell::Cell;

use pgm::frames::{HostFrameAllocator, HostMemory};
use pgm::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use x86::vmx::vmcs::control::{
    self, EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls, EPTP_FULL,
    EXCEPTION_BITMAP, PINBASED_EXEC_CONTROLS, PLE_GAP, PLE_WINDOW, PML_ADDR_FULL,
    PRIMARY_PROCBASED_EXEC_CONTROLS, SECONDARY_PROCBASED_EXEC_CONTROLS, VMENTRY_CONTROLS,
    VMENTRY_EXCEPTION_ERR_CODE, VMENTRY_INSTRUCTION_LEN, VMENTRY_INTERRUPTION_INFO_FIELD,
    VMENTRY_MSR_LOAD_ADDR_FULL, VMENTRY_MSR_LOAD_COUNT, VMEXIT_CONTROLS, VMEXIT_MSR_STORE_ADDR_FULL,
    VMEXIT_MSR_STORE_COUNT, VPID,
};
use x86::vmx::vmcs::{guest, host, ro};
use x86_64::registers::control::Cr2;

use super::exits::qualification::{
    has_translated_linear, is_page_walk, ENTRY_FAILURE, EPT_EXECUTE, EPT_WAS_READABLE, EPT_WRITE,
    INTERRUPTION_ERROR_CODE, INTERRUPTION_TYPE_EXTERNAL, INTERRUPTION_TYPE_HARD_EXCEPTION,
    INTERRUPTION_TYPE_MASK, INTERRUPTION_TYPE_NMI, INTERRUPTION_VALID, IO_IN, IO_REP, IO_SIZE_MASK,
    IO_STRING,
};
use super::exits::{exit_name, exit_reason};
use super::host::HostState;
use super::vmcs::{CurrentVmcs, Vmcs};
use super::{GuestRegisters, VmxError, VmxOn};
use devices::msr::index as msr;

use crate::arch::guests::GuestMode;
use crate::arch::memory::{KernelFrames, PhysMap};
use crate::vm::backend::{canonical, fault_access, load_snapshot_msrs, snapshot_msrs, ADDRESS_MSRS};
use crate::vm::backend::{
    BackendError, CpuSnapshot, CpuState, Direction, EntryFailure, Event, EventKind, PendingEvent, PortIo,
    RawExit, Segment, SegmentState, VirtualCpu, VmExit, SNAPSHOT_SEGMENTS,
};

/// PAUSE-loop exiting: PAUSEs at most this many ticks apart belong to one loop, and a loop
/// longer than the window exits (the values KVM uses).
const PAUSE_LOOP_GAP: u64 = 128;
const PAUSE_LOOP_WINDOW: u64 = 4096;
/// VPID of every vCPU; 0 is reserved for the host. One value serves all: each CPU tags its own
/// TLB, and two vCPUs of one VM on one CPU share the EPT the tags are combined with.
const GUEST_VPID: u64 = 1;
/// Guest CR0 bits: ET (bit 4) and NE (bit 5); PE is added for protected mode.
const CR0_PE: u64 = 1 << 0;
const CR0_ET_NE: u64 = (1 << 4) | (1 << 5);
const CR0_PG: u64 = 1 << 31;
const CR4_VMXE: u64 = 1 << 13;
const CR4_PAE: u64 = 1 << 5;
/// CR4.PCIDE.
const CR4_PCIDE: u64 = 1 << 17;
/// IA32_EFER: long mode enabled and active.
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Code-segment access rights: L (64-bit code) and D/B (32-bit default size).
const CS_LONG: u64 = 1 << 13;
const CS_DEFAULT_32: u64 = 1 << 14;

/// Guest interruptibility state: blocking by STI (bit 0), by MOV SS (bit 1), by NMI (bit 3).
const BLOCKING_BY_STI_OR_MOV_SS: u64 = 0b11;
const BLOCKING_BY_NMI: u64 = 1 << 3;
/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;
/// Page-modification log: entries per buffer, and the index the CPU logs the next address at
/// (the buffer's last entry).
const PML_ENTRIES: u64 = 512;
const PML_FIRST_INDEX: u64 = PML_ENTRIES - 1;
/// EPT pointer bit 6: the CPU sets accessed and dirty flags in EPT entries.
const EPTP_ACCESSED_DIRTY: u64 = 1 << 6;
/// EFER bits a guest may set: SYSCALL (0), long mode enable (8) and active (10, read-only),
/// no-execute (11).
const EFER_SCE: u64 = 1 << 0;
const EFER_NXE: u64 = 1 << 11;
/// The guest MSRs outside the VMCS's guest-state area, swapped by the VM-entry MSR-load area
/// and the VM-exit MSR-store area (one frame, 16 bytes an entry: index, reserved, value). The
/// host does not use SYSCALL or SWAPGS, so nothing restores its values at exit.
const SWAPPED_MSRS: [u32; 6] = [
    msr::STAR,
    msr::LSTAR,
    msr::CSTAR,
    msr::SFMASK,
    msr::KERNEL_GS_BASE,
    msr::TSC_AUX,
];

/// CR4 bits of features the guest's CPUID hides (VMX, SMX, XSAVE until XSETBV is handled):
/// setting one exits and is refused with #GP, as on a CPU without the feature. They read as
/// the guest wrote them (0).
const CR4_REFUSED: u64 = CR4_VMXE | (1 << 14) | (1 << 18);

/// A write the CPU would refuse with #GP.
struct Refused;

/// The VM-entry control values for the two kinds of guest.
#[derive(Clone, Copy, Default)]
struct EntryControlValues {
    legacy: u64,
    long_mode: u64,
}

/// One vCPU on VT-x: a VMCS active on the host CPU that made it.
pub struct VmxVcpu<'a> {
    vmx: &'a VmxOn,
    /// Dropped (VMCLEAR on its CPU) with the vCPU.
    vmcs: Vmcs,
    launched: bool,
    /// The guest's general-purpose registers (RSP and RIP live in the VMCS).
    regs: GuestRegisters,
    /// The EPT pointer of the VM's tables.
    eptp: u64,
    entry_controls: EntryControlValues,
    /// The primary processor-based controls without interrupt-window exiting.
    primary_controls: u64,
    /// The secondary processor-based controls without PML.
    secondary_controls: u64,
    /// The host's physical memory window (the page-modification log is read through it).
    phys: &'static PhysMap,
    /// This vCPU's page-modification log, when the CPU supports PML.
    pml_buffer: Option<HostPhysAddr>,
    /// PML is enabled in the VMCS.
    pml_on: bool,
    /// Interrupt-window exiting is on.
    window_exiting: bool,
    /// NMI-window exiting is on.
    nmi_window_exiting: bool,
    /// The CPU has virtual NMIs and NMI-window exiting (in use when it has).
    nmi_window_available: bool,
    /// The VM-entry controls name IA-32e mode (kept equal to the guest's EFER.LMA by the CR0
    /// writes that change it: CR0.PG is the host's).
    ia32e_entry: Cell<bool>,
    /// An event is queued in the VM-entry interruption information (injected, or requeued
    /// after an exit that interrupted its delivery); the entry consumes it.
    event_queued: Cell<bool>,
    /// The frame of the guest MSRs swapped at entry and exit ([`SWAPPED_MSRS`]).
    msr_area: HostPhysAddr,
    /// The VMCS TSC offset: the guest's TSC minus the host's.
    tsc_offset: u64,
    /// The guest's CR2, which VMX does not switch: put in the register before each entry
    /// when another vCPU's is there, and taken from it after each exit.
    cr2: u64,
    /// The guest's IA32_TSC_ADJUST.
    tsc_adjust: u64,
    /// The basic reason of the last exit.
    last_reason: u32,
}

impl<'a> VmxVcpu<'a> {
    /// Makes a VMCS on the calling CPU for a guest whose EPT tables are rooted at `nested_root`: controls, host
    /// state and the page-modification log (when the CPU has PML). On error everything taken
    /// is given back.
    pub fn new(
        vmx: &'a VmxOn,
        phys: &'static PhysMap,
        nested_root: HostPhysAddr,
    ) -> Result<VmxVcpu<'a>, VmxError> {
        let eptp = pgm::ept::pointer(nested_root, false);
        let msr_area = KernelFrames.allocate_frame().ok_or(VmxError::OutOfFrames)?;
        let vmcs = match Vmcs::new(vmx, &mut { phys }) {
            Ok(vmcs) => vmcs,
            Err(error) => {
                KernelFrames.free_frame(msr_area);
                return Err(error);
            }
        };
        let mut vcpu = VmxVcpu {
            vmx,
            vmcs,
            launched: false,
            regs: GuestRegisters::default(),
            eptp,
            entry_controls: EntryControlValues::default(),
            primary_controls: 0,
            secondary_controls: 0,
            phys,
            pml_buffer: None,
            pml_on: false,
            window_exiting: false,
            nmi_window_exiting: false,
            nmi_window_available: false,
            ia32e_entry: Cell::new(false),
            event_queued: Cell::new(false),
            msr_area,
            tsc_offset: 0,
            cr2: 0,
            tsc_adjust: 0,
            last_reason: 0,
        };
        vcpu.write_controls(eptp)?;
        vcpu.set_up_msr_area()?;
        vcpu.set_up_pml()?;
        vcpu.write_host_state(&super::host::current())?;
        Ok(vcpu)
    }

    /// Sets the guest up to start at `rip` in `mode` (see [`GuestMode`]) with CR3 `cr3` and the
    /// stack just below `rip`.
    pub fn reset_to(&mut self, mode: GuestMode, rip: u64, cr3: u64) -> Result<(), BackendError> {
        Ok(self.write_guest_state(mode, rip, cr3)?)
    }

    /// VM-execution, exit and entry controls: HLT, MONITOR, MWAIT and all port I/O exit, and
    /// so do long PAUSE loops where the CPU offers it; host interrupts and NMIs exit (not
    /// acknowledged: the host takes them itself); the VMX-preemption timer bounds every entry;
    /// EPT, VPID and unrestricted guest on; EFER switched on entry and exit; 64-bit host.
    fn write_controls(&mut self, eptp: u64) -> Result<(), VmxError> {
        let caps = self.vmx.caps();
        let adjust = |which, caps: &super::caps::ControlCaps, wanted: u32| {
            caps.adjust(wanted)
                .map(u64::from)
                .map_err(|missing| VmxError::Control { which, missing })
        };
        // Virtual NMIs: an NMI injected into the guest blocks the guest's NMIs until its IRET
        // (without them IRET unblocks nothing while NMI exiting is on, and a second NMI would
        // wait for ever), and NMI-window exiting tells when the next one may go in.
        let virtual_nmis = if caps.pin.allows(PinbasedControls::VIRTUAL_NMIS.bits())
            && caps.primary.allows(PrimaryControls::NMI_WINDOW_EXITING.bits())
        {
            PinbasedControls::VIRTUAL_NMIS
        } else {
            PinbasedControls::empty()
        };
        self.nmi_window_available = !virtual_nmis.is_empty();
        let pin = adjust(
            "pin-based",
            &caps.pin,
            (PinbasedControls::EXTERNAL_INTERRUPT_EXITING
                | PinbasedControls::NMI_EXITING
                | virtual_nmis
                | PinbasedControls::VMX_PREEMPTION_TIMER)
                .bits(),
        )?;
        let primary = adjust(
            "primary processor-based",
            &caps.primary,
            (PrimaryControls::HLT_EXITING
                | PrimaryControls::USE_TSC_OFFSETTING
                | PrimaryControls::CR8_LOAD_EXITING
                | PrimaryControls::CR8_STORE_EXITING
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
        let rdtscp = if caps.rdtscp() {
            SecondaryControls::ENABLE_RDTSCP
        } else {
            SecondaryControls::empty()
        };
        let secondary = adjust(
            "secondary processor-based",
            &caps.secondary,
            (SecondaryControls::ENABLE_EPT
                | SecondaryControls::ENABLE_VPID
                | SecondaryControls::UNRESTRICTED_GUEST
                | pause_loop
                | rdtscp)
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
        self.primary_controls = primary;
        self.secondary_controls = secondary;
        self.entry_controls = EntryControlValues {
            legacy: entry,
            long_mode: entry_long_mode,
        };
        let vmcs = self.vmcs.current()?;
        for (field, value) in [
            (PINBASED_EXEC_CONTROLS, pin),
            (PRIMARY_PROCBASED_EXEC_CONTROLS, primary),
            (SECONDARY_PROCBASED_EXEC_CONTROLS, secondary),
            (VMEXIT_CONTROLS, exit),
            (VMENTRY_CONTROLS, entry),
            (EXCEPTION_BITMAP, 0),
            (control::TSC_OFFSET_FULL, 0),
            (VPID, GUEST_VPID),
            (EPTP_FULL, eptp),
            (control::CR3_TARGET_COUNT, 0),
            // CR0 bits VMX requires set (NE) belong to the host: a guest clearing them exits
            // and sees its own value in the read shadow (`write_cr0`).
            (control::CR0_GUEST_HOST_MASK, self.cr0_host_owned()),
            // The guest sees CR4.VMXE (required by VMX) as clear.
            (control::CR4_GUEST_HOST_MASK, CR4_REFUSED),
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
    fn write_host_state(&mut self, state: &HostState) -> Result<(), VmxError> {
        let vmcs = self.vmcs.current()?;
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
    fn write_guest_state(&mut self, mode: GuestMode, rip: u64, cr3: u64) -> Result<(), VmxError> {
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
        self.ia32e_entry.set(mode == GuestMode::Long64);
        let entry_controls = self.entry_controls_for(self.ia32e_entry.get());
        let vmcs = self.vmcs.current()?;
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

    /// The primary controls with the interrupt and NMI windows as asked.
    fn write_window_controls(&self) -> Result<(), BackendError> {
        let mut controls = self.primary_controls;
        if self.window_exiting {
            controls |= u64::from(PrimaryControls::INTERRUPT_WINDOW_EXITING.bits());
        }
        if self.nmi_window_exiting {
            controls |= u64::from(PrimaryControls::NMI_WINDOW_EXITING.bits());
        }
        Ok(self
            .vmcs
            .current()?
            .write(PRIMARY_PROCBASED_EXEC_CONTROLS, controls)?)
    }

    /// Lists the swapped MSRs (all 0, their reset value) in the MSR area and points the
    /// VM-entry load and VM-exit store lists at it.
    fn set_up_msr_area(&mut self) -> Result<(), VmxError> {
        let mut phys = self.phys;
        phys.zero_frame(self.msr_area);
        for (slot, &index) in SWAPPED_MSRS.iter().enumerate() {
            let at = HostPhysAddr::new_truncate(self.msr_area.as_u64() + 16 * slot as u64);
            phys.write(at, &u64::from(index).to_le_bytes());
        }
        let vmcs = self.vmcs.current()?;
        let count = SWAPPED_MSRS.len() as u64;
        vmcs.write(VMENTRY_MSR_LOAD_ADDR_FULL, self.msr_area.as_u64())?;
        vmcs.write(VMENTRY_MSR_LOAD_COUNT, count)?;
        vmcs.write(VMEXIT_MSR_STORE_ADDR_FULL, self.msr_area.as_u64())?;
        vmcs.write(VMEXIT_MSR_STORE_COUNT, count)
    }

    /// The MSR area's value slot for `index`, if it is a swapped MSR.
    fn msr_slot(&self, index: u32) -> Option<HostPhysAddr> {
        let slot = SWAPPED_MSRS.iter().position(|&swapped| swapped == index)?;
        Some(HostPhysAddr::new_truncate(
            self.msr_area.as_u64() + 16 * slot as u64 + 8,
        ))
    }

    /// The VMCS guest-state field holding `index`, for the MSRs that have one.
    fn msr_field(index: u32) -> Option<u32> {
        Some(match index {
            msr::EFER => guest::IA32_EFER_FULL,
            msr::FS_BASE => guest::FS_BASE,
            msr::GS_BASE => guest::GS_BASE,
            msr::SYSENTER_CS => guest::IA32_SYSENTER_CS,
            msr::SYSENTER_ESP => guest::IA32_SYSENTER_ESP,
            msr::SYSENTER_EIP => guest::IA32_SYSENTER_EIP,
            _ => return None,
        })
    }

    /// The EFER a WRMSR of `value` leaves, or `None` when the CPU would refuse it: a bit
    /// other than SCE, LME, LMA and NXE, or LME changed while paging is on. LMA is the CPU's
    /// and keeps its value.
    fn checked_efer(&self, vmcs: &CurrentVmcs<'_>, value: u64) -> Option<u64> {
        let current = vmcs.read(guest::IA32_EFER_FULL);
        if value & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
            return None;
        }
        if vmcs.read(guest::CR0) & CR0_PG != 0 && (value ^ current) & EFER_LME != 0 {
            return None;
        }
        Some((value & !EFER_LMA) | (current & EFER_LMA))
    }

    /// Gives the vCPU its log buffer and points the VMCS at it, when the CPU supports PML
    /// (logging itself is enabled only while the VM's monitoring asks for it).
    fn set_up_pml(&mut self) -> Result<(), VmxError> {
        if !self.vmx.caps().pml() {
            return Ok(());
        }
        let frame = KernelFrames.allocate_frame().ok_or(VmxError::OutOfFrames)?;
        let mut phys = self.phys;
        phys.zero_frame(frame);
        self.pml_buffer = Some(frame);
        let vmcs = self.vmcs.current()?;
        vmcs.write(PML_ADDR_FULL, frame.as_u64())?;
        vmcs.write(guest::PML_INDEX, PML_FIRST_INDEX)
    }

    /// Decodes the exit that just happened, whose raw exit-reason field is `raw_reason`.
    fn decode_exit(&self, vmcs: &CurrentVmcs<'_>, raw_reason: u64) -> Result<VmExit, EntryFailure> {
        let reason = (raw_reason & 0xFFFF) as u32;
        if raw_reason & ENTRY_FAILURE != 0 {
            return Err(EntryFailure {
                code: reason,
                invalid_guest_state: true,
            });
        }
        // An instruction's own exit cannot interrupt an event's delivery: only the others
        // pay for the look at the IDT-vectoring information.
        let instruction_exit = matches!(
            reason,
            exit_reason::CPUID
                | exit_reason::HLT
                | exit_reason::INVD
                | exit_reason::VMCALL
                | exit_reason::CONTROL_REGISTER
                | exit_reason::IO_INSTRUCTION
                | exit_reason::RDMSR
                | exit_reason::WRMSR
                | exit_reason::PAUSE
                | exit_reason::MONITOR
                | exit_reason::MWAIT
                | exit_reason::INTERRUPT_WINDOW
                | exit_reason::NMI_WINDOW
        );
        if !instruction_exit {
            self.requeue_interrupted_event(vmcs);
        }
        let qualification = || vmcs.read(ro::EXIT_QUALIFICATION);
        Ok(match reason {
            exit_reason::EPT_VIOLATION => {
                let qualification = qualification();
                let access = fault_access(qualification & EPT_WRITE != 0, qualification & EPT_EXECUTE != 0);
                VmExit::NestedFault {
                    gpa: GuestPhysAddr::new_truncate(vmcs.read(ro::GUEST_PHYSICAL_ADDR_FULL)),
                    access,
                    was_readable: qualification & EPT_WAS_READABLE != 0,
                    page_walk: is_page_walk(qualification),
                    linear: has_translated_linear(qualification).then(|| vmcs.read(ro::GUEST_LINEAR_ADDR)),
                    detail: qualification,
                }
            }
            exit_reason::IO_INSTRUCTION => {
                let qualification = qualification();
                VmExit::PortIo(PortIo {
                    port: (qualification >> 16) as u16,
                    size: (qualification & IO_SIZE_MASK) as u8 + 1,
                    direction: if qualification & IO_IN != 0 {
                        Direction::In
                    } else {
                        Direction::Out
                    },
                    string: qualification & IO_STRING != 0,
                    rep: qualification & IO_REP != 0,
                })
            }
            exit_reason::CPUID => VmExit::Cpuid,
            exit_reason::CONTROL_REGISTER => self.control_register_access(vmcs, qualification()),
            exit_reason::RDMSR => VmExit::MsrRead {
                msr: self.regs.rcx as u32,
            },
            exit_reason::WRMSR => VmExit::MsrWrite {
                msr: self.regs.rcx as u32,
                value: (self.regs.rdx << 32) | (self.regs.rax & 0xFFFF_FFFF),
            },
            exit_reason::VMCALL => VmExit::Hypercall,
            exit_reason::HLT => VmExit::Hlt,
            exit_reason::INTERRUPT_WINDOW | exit_reason::NMI_WINDOW => VmExit::InterruptWindow,
            exit_reason::PREEMPTION_TIMER => VmExit::Preemption,
            exit_reason::EXTERNAL_INTERRUPT => VmExit::ExternalInterrupt,
            exit_reason::EXCEPTION_OR_NMI => self.decode_exception_or_nmi(vmcs),
            exit_reason::PAUSE => VmExit::Pause,
            exit_reason::MONITOR | exit_reason::MWAIT => VmExit::MonitorMwait,
            exit_reason::PML_FULL => VmExit::DirtyLogFull,
            exit_reason::TRIPLE_FAULT => VmExit::Shutdown,
            reason => VmExit::Fatal { reason },
        })
    }

    /// Makes the guest's TSC the host's plus `offset`; `false` if the VMCS refused it.
    fn set_tsc_offset(&mut self, offset: u64) -> bool {
        let written = self
            .vmcs
            .current()
            .and_then(|vmcs| vmcs.write(control::TSC_OFFSET_FULL, offset));
        if written.is_err() {
            return false;
        }
        self.tsc_offset = offset;
        true
    }

    /// CR0 bits that are the host's: those VMX fixes to 1 (but PE and PG, which unrestricted
    /// guest frees), and PG, whose changes switch EFER.LMA and with it the IA-32e entry
    /// control (`write_cr0`): so no entry needs to look at EFER first.
    fn cr0_host_owned(&self) -> u64 {
        (self.vmx.caps().cr0_fixed.0 & !(CR0_PE | CR0_PG)) | CR0_PG
    }

    /// A control-register access exit (SDM 28.2.1, table 28-3): CR8 goes to the exit policy
    /// (the APIC's TPR); writes to CR0 and CR4 are emulated here (they exit only for the bits
    /// the host owns), with #GP for what the CPU would refuse.
    fn control_register_access(&self, vmcs: &CurrentVmcs<'_>, qualification: u64) -> VmExit {
        let cr = qualification & 0xF;
        let kind = (qualification >> 4) & 3;
        let register = ((qualification >> 8) & 0xF) as u8;
        match (cr, kind) {
            (8, 0) => VmExit::TprWrite { register },
            (8, 1) => VmExit::TprRead { register },
            (0 | 4, 0) => {
                let value = self.gpr_in(vmcs, register);
                let done = if cr == 0 {
                    self.write_cr0(vmcs, value)
                } else {
                    self.write_cr4_in(vmcs, value)
                };
                let done = match done {
                    Ok(()) => self.skip_in(vmcs),
                    Err(Refused) => self.inject_in(
                        vmcs,
                        Event::Exception {
                            vector: 13,
                            error_code: Some(0),
                        },
                    ),
                };
                match done {
                    Ok(()) => VmExit::Absorbed,
                    Err(_) => VmExit::Fatal {
                        reason: exit_reason::CONTROL_REGISTER,
                    },
                }
            }
            _ => VmExit::Fatal {
                reason: exit_reason::CONTROL_REGISTER,
            },
        }
    }

    /// The VM-entry controls for a guest in IA-32e mode (`long_mode`) or not.
    fn entry_controls_for(&self, long_mode: bool) -> u64 {
        if long_mode {
            self.entry_controls.long_mode
        } else {
            self.entry_controls.legacy
        }
    }

    /// The CR0 the CPU runs the guest with when the guest's own value is `visible`: with ET,
    /// and the bits VMX requires set (PE and PG as the guest has them: unrestricted guest).
    fn hardware_cr0(&self, visible: u64) -> u64 {
        let (fixed0, fixed1) = self.vmx.caps().cr0_fixed;
        (visible | (1 << 4) | (fixed0 & !(CR0_PE | CR0_PG))) & fixed1
    }

    /// The CR4 the CPU runs the guest with when the guest's own value is `visible` (VMXE and
    /// the bits VMX requires set), or `Refused` for a bit of a feature the guest lacks or one
    /// the CPU does not allow.
    fn hardware_cr4(&self, visible: u64) -> Result<u64, Refused> {
        let (fixed0, fixed1) = self.vmx.caps().cr4_fixed;
        if visible & CR4_REFUSED != 0 || visible & !fixed1 != 0 {
            return Err(Refused);
        }
        Ok(visible | fixed0 | CR4_VMXE)
    }

    /// MOV to CR0 of `value`: refused (#GP) as the CPU refuses it (high bits, PG without PE,
    /// NW without CD, paging in long mode without PAE, paging off with PCIDs on); else the guest's value goes to the read
    /// shadow and CR0 gets it with the host's bits, and EFER.LMA follows CR0.PG and EFER.LME.
    fn write_cr0(&self, vmcs: &CurrentVmcs<'_>, value: u64) -> Result<(), Refused> {
        const CR0_NW: u64 = 1 << 29;
        const CR0_CD: u64 = 1 << 30;
        if value >> 32 != 0
            || (value & CR0_PG != 0 && value & CR0_PE == 0)
            || (value & CR0_NW != 0 && value & CR0_CD == 0)
        {
            return Err(Refused);
        }
        let efer = vmcs.read(guest::IA32_EFER_FULL);
        let paging_now = vmcs.read(guest::CR0) & CR0_PG != 0;
        let paging_next = value & CR0_PG != 0;
        // Leaving paging with PCIDs on is #GP (SDM, MOV to CR0), and VM entry would refuse it.
        if paging_now && !paging_next && vmcs.read(guest::CR4) & CR4_PCIDE != 0 {
            return Err(Refused);
        }
        let mut new_efer = efer;
        if paging_next && !paging_now && efer & EFER_LME != 0 {
            if vmcs.read(guest::CR4) & CR4_PAE == 0 {
                return Err(Refused);
            }
            new_efer |= EFER_LMA;
        }
        if !paging_next {
            new_efer &= !EFER_LMA;
        }
        let lma = new_efer & EFER_LMA != 0;
        let controls = self.entry_controls_for(lma);
        let written = vmcs
            .write(guest::CR0, self.hardware_cr0(value))
            .and_then(|()| vmcs.write(control::CR0_READ_SHADOW, value))
            .and_then(|()| vmcs.write(guest::IA32_EFER_FULL, new_efer))
            .and_then(|()| vmcs.write(VMENTRY_CONTROLS, controls));
        written.map_err(|_| Refused)?;
        self.ia32e_entry.set(lma);
        Ok(())
    }

    /// MOV to CR4 of `value` (it exits only when the guest tries to set a bit of a feature
    /// it does not have: [`CR4_REFUSED`]): #GP for those and for bits the CPU does not
    /// allow; else CR4 keeps VMXE and the read shadow the guest's value.
    fn write_cr4_in(&self, vmcs: &CurrentVmcs<'_>, value: u64) -> Result<(), Refused> {
        let actual = self.hardware_cr4(value)?;
        vmcs.write(guest::CR4, actual)
            .and_then(|()| vmcs.write(control::CR4_READ_SHADOW, value))
            .map_err(|_| Refused)
    }

    /// General-purpose register `index` (RSP from the VMCS).
    fn gpr_in(&self, vmcs: &CurrentVmcs<'_>, index: u8) -> u64 {
        if index == 4 {
            return vmcs.read(guest::RSP);
        }
        self.regs.by_number(index).unwrap_or(0)
    }

    fn skip_in(&self, vmcs: &CurrentVmcs<'_>) -> Result<(), VmxError> {
        let next_rip = vmcs.read(guest::RIP) + vmcs.read(ro::VMEXIT_INSTRUCTION_LEN);
        vmcs.write(guest::RIP, next_rip)
    }

    /// Queues `event` for the next entry. A real-mode guest (CR0.PE clear) takes exceptions
    /// without error codes, as a CPU in real mode delivers them (and as VM entry requires).
    fn inject_in(&self, vmcs: &CurrentVmcs<'_>, event: Event) -> Result<(), VmxError> {
        let real_mode = vmcs.read(guest::CR0) & CR0_PE == 0;
        let (kind, vector, error_code) = match event {
            Event::Exception { vector, error_code } => {
                (EventKind::Exception, vector, error_code.filter(|_| !real_mode))
            }
            Event::Interrupt(vector) => (EventKind::Interrupt, vector, None),
            Event::Nmi => (EventKind::Nmi, 2, None),
        };
        queue_event(
            vmcs,
            PendingEvent {
                kind,
                vector,
                error_code,
                instruction_len: 0,
            },
        )?;
        self.event_queued.set(true);
        Ok(())
    }

    /// An exception-or-NMI exit. After an NMI, clears blocking by NMI in the guest's
    /// interruptibility state: NMIs belong to the host (NMI exiting, no virtual NMIs), yet
    /// Bochs saves the blocking its NMI exit set as the guest's and restores it at the next
    /// entry; the guest, which never executes the IRET that would end it, would then hold back
    /// every later NMI, and with it every flush request and kick sent to this CPU.
    fn decode_exception_or_nmi(&self, vmcs: &CurrentVmcs<'_>) -> VmExit {
        let info = vmcs.read(ro::VMEXIT_INTERRUPTION_INFO);
        if info & INTERRUPTION_VALID != 0 && info & INTERRUPTION_TYPE_MASK == INTERRUPTION_TYPE_NMI {
            let state = vmcs.read(guest::INTERRUPTIBILITY_STATE);
            if state & BLOCKING_BY_NMI != 0
                && vmcs
                    .write(guest::INTERRUPTIBILITY_STATE, state & !BLOCKING_BY_NMI)
                    .is_err()
            {
                return VmExit::Fatal {
                    reason: exit_reason::EXCEPTION_OR_NMI,
                };
            }
            return VmExit::Nmi;
        }
        VmExit::Exception {
            vector: info as u8,
            error_code: (info & INTERRUPTION_ERROR_CODE != 0)
                .then(|| vmcs.read(ro::VMEXIT_INTERRUPTION_ERR_CODE) as u32),
        }
    }

    /// An exit that interrupted the delivery of an event (an EPT violation on the guest's IDT
    /// or stack while it took an interrupt) leaves the event undelivered: it is queued again
    /// for the next entry, as the CPU reports it in the IDT-vectoring information.
    fn requeue_interrupted_event(&self, vmcs: &CurrentVmcs<'_>) {
        let info = vmcs.read(ro::IDT_VECTORING_INFO);
        let Some(mut event) =
            decode_event(vmcs, info, ro::IDT_VECTORING_ERR_CODE, ro::VMEXIT_INSTRUCTION_LEN)
        else {
            return;
        };
        // A real-mode guest takes no error code (VM entry refuses one); Bochs reports the
        // error-code bit of #GP and the like whatever the mode.
        if vmcs.read(guest::CR0) & CR0_PE == 0 {
            event.error_code = None;
        }
        // A failed write leaves the field as the CPU cleared it: the event is lost, as it
        // would be without this.
        self.event_queued.set(queue_event(vmcs, event).is_ok());
    }

    fn write_pml_controls(&self, on: bool) -> Result<(), VmxError> {
        let vmcs = self.vmcs.current()?;
        let (pml, accessed_dirty) = if on {
            (SecondaryControls::ENABLE_PML.bits().into(), EPTP_ACCESSED_DIRTY)
        } else {
            (0, 0)
        };
        vmcs.write(SECONDARY_PROCBASED_EXEC_CONTROLS, self.secondary_controls | pml)?;
        vmcs.write(EPTP_FULL, self.eptp | accessed_dirty)?;
        vmcs.write(guest::PML_INDEX, PML_FIRST_INDEX)
    }
}

impl VirtualCpu for VmxVcpu<'_> {
    fn host_cpu(&self) -> usize {
        self.vmcs.cpu()
    }

    fn timer_granularity(&self) -> u32 {
        self.vmx.caps().preemption_timer_rate()
    }

    fn run(&mut self, ticks: u64) -> Result<VmExit, EntryFailure> {
        let failed = |code| EntryFailure {
            code,
            invalid_guest_state: false,
        };
        let vmcs = self.vmcs.current().map_err(|_| failed(0))?;
        // Capped at the field's 32 bits: the run then goes on after an early timer exit.
        let timer = (ticks >> self.timer_granularity()).min(u64::from(u32::MAX));
        vmcs.write(guest::VMX_PREEMPTION_TIMER_VALUE, timer)
            .map_err(|_| failed(0))?;
        // Another vCPU that ran on this CPU since may have left its own CR2 there.
        if Cr2::read_raw() != self.cr2 {
            write_cr2(self.cr2);
        }
        // SAFETY: `write_host_state` wrote this CPU's host state with RIP at the exit entry
        // point when the vCPU was made; the EPT pointer names the VM's tables, which map only
        // frames it holds; `launched` is set after the first successful entry and the VMCS is
        // VMCLEARed only when the vCPU is dropped.
        let entered = unsafe { super::run_guest(&vmcs, &mut self.regs, self.launched) };
        if entered.is_err() {
            return Err(failed(vmcs.read(ro::VM_INSTRUCTION_ERROR) as u32));
        }
        self.launched = true;
        self.cr2 = Cr2::read_raw();
        // The entry delivered what was queued; a requeue below may queue it again.
        self.event_queued.set(false);
        let raw_reason = vmcs.read(ro::EXIT_REASON);
        self.last_reason = (raw_reason & 0xFFFF) as u32;
        self.decode_exit(&vmcs, raw_reason)
    }

    fn regs(&self) -> &GuestRegisters {
        &self.regs
    }

    fn regs_mut(&mut self) -> &mut GuestRegisters {
        &mut self.regs
    }

    fn cpu_state(&self) -> Result<CpuState, BackendError> {
        let vmcs = self.vmcs.current()?;
        let efer = vmcs.read(guest::IA32_EFER_FULL);
        let access_rights = vmcs.read(guest::CS_ACCESS_RIGHTS);
        let bitness = if efer & EFER_LMA != 0 && access_rights & CS_LONG != 0 {
            64
        } else if access_rights & CS_DEFAULT_32 != 0 {
            32
        } else {
            16
        };
        Ok(CpuState {
            rip: vmcs.read(guest::RIP),
            rflags: vmcs.read(guest::RFLAGS),
            bitness,
            code_base: if bitness == 64 {
                0
            } else {
                vmcs.read(guest::CS_BASE)
            },
            cr0: vmcs.read(guest::CR0),
            cr3: vmcs.read(guest::CR3),
            cr4: vmcs.read(guest::CR4),
            efer,
        })
    }

    fn rsp(&self) -> u64 {
        self.vmcs.current().map_or(0, |vmcs| vmcs.read(guest::RSP))
    }

    fn gpr(&self, index: u8) -> u64 {
        self.vmcs.current().map_or(0, |vmcs| self.gpr_in(&vmcs, index))
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
        Ok(self.vmcs.current()?.write(guest::RSP, rsp)?)
    }

    fn segment_base(&self, segment: Segment) -> u64 {
        self.vmcs
            .current()
            .map_or(0, |vmcs| vmcs.read(segment_fields(segment).base))
    }

    fn segment(&self, segment: Segment) -> Result<SegmentState, BackendError> {
        let vmcs = self.vmcs.current()?;
        Ok(read_segment_state(&vmcs, segment_fields(segment)))
    }

    fn set_segment(&mut self, segment: Segment, state: SegmentState) -> Result<(), BackendError> {
        let vmcs = self.vmcs.current()?;
        Ok(write_segment_state(&vmcs, segment_fields(segment), state)?)
    }

    fn gdt(&self) -> Result<(u64, u16), BackendError> {
        let vmcs = self.vmcs.current()?;
        Ok((vmcs.read(guest::GDTR_BASE), vmcs.read(guest::GDTR_LIMIT) as u16))
    }

    fn set_gdt(&mut self, base: u64, limit: u16) -> Result<(), BackendError> {
        let vmcs = self.vmcs.current()?;
        vmcs.write(guest::GDTR_BASE, base)?;
        Ok(vmcs.write(guest::GDTR_LIMIT, u64::from(limit))?)
    }

    fn visible_cr0(&self) -> Result<u64, BackendError> {
        let vmcs = self.vmcs.current()?;
        Ok(guest_view(
            &vmcs,
            guest::CR0,
            control::CR0_GUEST_HOST_MASK,
            control::CR0_READ_SHADOW,
        ))
    }

    fn set_exception_exiting(&mut self, vector: u8, on: bool) -> Result<(), BackendError> {
        let vmcs = self.vmcs.current()?;
        let bitmap = vmcs.read(EXCEPTION_BITMAP);
        let bit = 1u64 << (vector & 31);
        Ok(vmcs.write(EXCEPTION_BITMAP, if on { bitmap | bit } else { bitmap & !bit })?)
    }

    fn set_fault_address(&mut self, linear: u64) -> Result<(), BackendError> {
        self.vmcs.current()?;
        // The next entry puts it in the register.
        self.cr2 = linear;
        Ok(())
    }

    fn set_rip_and_flags(&mut self, rip: u64, rflags: Option<u64>) -> Result<(), BackendError> {
        let vmcs = self.vmcs.current()?;
        vmcs.write(guest::RIP, rip)?;
        if let Some(rflags) = rflags {
            vmcs.write(guest::RFLAGS, rflags)?;
        }
        Ok(())
    }

    fn skip_instruction(&mut self) -> Result<(), BackendError> {
        let vmcs = self.vmcs.current()?;
        let next_rip = vmcs.read(guest::RIP) + vmcs.read(ro::VMEXIT_INSTRUCTION_LEN);
        vmcs.write(guest::RIP, next_rip)?;
        // The instruction is done: an STI or MOV SS shadow before it is over.
        let state = vmcs.read(guest::INTERRUPTIBILITY_STATE);
        if state & BLOCKING_BY_STI_OR_MOV_SS != 0 {
            vmcs.write(guest::INTERRUPTIBILITY_STATE, state & !BLOCKING_BY_STI_OR_MOV_SS)?;
        }
        Ok(())
    }

    fn inject(&mut self, event: Event) -> Result<(), BackendError> {
        let vmcs = self.vmcs.current()?;
        Ok(self.inject_in(&vmcs, event)?)
    }

    fn note_instruction_length(&mut self, _length: u64) {
        // The exit's own instruction-length field always says.
    }

    fn write_cr4(&mut self, value: u64) -> Result<bool, BackendError> {
        let vmcs = self.vmcs.current()?;
        Ok(self.write_cr4_in(&vmcs, value).is_ok())
    }

    fn event_pending(&self) -> bool {
        self.event_queued.get()
    }

    fn interruptible(&self) -> bool {
        self.vmcs.current().is_ok_and(|vmcs| {
            vmcs.read(guest::RFLAGS) & RFLAGS_IF != 0
                && vmcs.read(guest::INTERRUPTIBILITY_STATE) & BLOCKING_BY_STI_OR_MOV_SS == 0
        })
    }

    fn nmi_allowed(&self) -> bool {
        self.vmcs.current().is_ok_and(|vmcs| {
            vmcs.read(guest::INTERRUPTIBILITY_STATE) & (BLOCKING_BY_STI_OR_MOV_SS | BLOCKING_BY_NMI) == 0
        })
    }

    fn nmi_handler_running(&self) -> bool {
        self.vmcs
            .current()
            .is_ok_and(|vmcs| vmcs.read(guest::INTERRUPTIBILITY_STATE) & BLOCKING_BY_NMI != 0)
    }

    fn start_at_page(&mut self, page: u8) -> Result<(), BackendError> {
        self.write_guest_state(GuestMode::Real, 0, 0)?;
        let vmcs = self.vmcs.current()?;
        vmcs.write(guest::CS_SELECTOR, u64::from(page) << 8)?;
        vmcs.write(guest::CS_BASE, u64::from(page) << 12)?;
        vmcs.write(guest::RSP, 0)?;
        self.regs = GuestRegisters::default();
        Ok(())
    }

    fn set_interrupt_window_exiting(&mut self, on: bool) -> Result<(), BackendError> {
        if on == self.window_exiting {
            return Ok(());
        }
        self.window_exiting = on;
        self.write_window_controls()
    }

    fn set_nmi_window_exiting(&mut self, on: bool) -> Result<(), BackendError> {
        let on = on && self.nmi_window_available;
        if on == self.nmi_window_exiting {
            return Ok(());
        }
        self.nmi_window_exiting = on;
        self.write_window_controls()
    }

    fn tsc_offset(&self) -> u64 {
        self.tsc_offset
    }

    fn read_msr(&self, index: u32) -> Option<u64> {
        if index == msr::TSC {
            return Some(crate::arch::ticks().wrapping_add(self.tsc_offset));
        }
        if index == msr::TSC_ADJUST {
            return Some(self.tsc_adjust);
        }
        if let Some(slot) = self.msr_slot(index) {
            return Some(self.phys.read_u64(slot));
        }
        let field = VmxVcpu::msr_field(index)?;
        Some(self.vmcs.current().ok()?.read(field))
    }

    fn write_msr(&mut self, index: u32, value: u64) -> bool {
        if ADDRESS_MSRS.contains(&index) && !canonical(value) {
            return false;
        }
        if index == msr::TSC_AUX && value >> 32 != 0 {
            return false;
        }
        if index == msr::TSC {
            // The guest's TSC reads `value` now: the offset is what it adds to the host's.
            // TSC_ADJUST moves by as much as the TSC (SDM 17.17.3).
            let offset = value.wrapping_sub(crate::arch::ticks());
            let moved = offset.wrapping_sub(self.tsc_offset);
            if !self.set_tsc_offset(offset) {
                return false;
            }
            self.tsc_adjust = self.tsc_adjust.wrapping_add(moved);
            return true;
        }
        if index == msr::TSC_ADJUST {
            // The TSC moves by the adjustment's change.
            let moved = value.wrapping_sub(self.tsc_adjust);
            if !self.set_tsc_offset(self.tsc_offset.wrapping_add(moved)) {
                return false;
            }
            self.tsc_adjust = value;
            return true;
        }
        if let Some(slot) = self.msr_slot(index) {
            let mut phys = self.phys;
            phys.write(slot, &value.to_le_bytes());
            return true;
        }
        let (Some(field), Ok(vmcs)) = (VmxVcpu::msr_field(index), self.vmcs.current()) else {
            return false;
        };
        let value = match index {
            msr::EFER => match self.checked_efer(&vmcs, value) {
                Some(efer) => efer,
                None => return false,
            },
            msr::SYSENTER_CS => value & 0xFFFF_FFFF,
            _ => value,
        };
        vmcs.write(field, value).is_ok()
    }

    fn raw_exit(&self) -> RawExit {
        let mut raw = RawExit {
            reason: self.last_reason,
            name: exit_name(self.last_reason),
            ..RawExit::default()
        };
        // Without a VMCS to read, only the reason.
        if let Ok(vmcs) = self.vmcs.current() {
            raw.qualification = vmcs.read(ro::EXIT_QUALIFICATION);
            raw.rip = vmcs.read(guest::RIP);
            raw.gpa = matches!(
                self.last_reason,
                exit_reason::EPT_VIOLATION | exit_reason::EPT_MISCONFIGURATION
            )
            .then(|| GuestPhysAddr::new_truncate(vmcs.read(ro::GUEST_PHYSICAL_ADDR_FULL)));
        }
        raw
    }

    fn dirty_log_supported(&self) -> bool {
        self.pml_buffer.is_some()
    }

    fn set_dirty_logging(&mut self, on: bool) -> Result<(), BackendError> {
        if on && self.pml_buffer.is_none() {
            return Err(BackendError {
                what: "PML (the CPU has none)",
                code: None,
            });
        }
        self.write_pml_controls(on)?;
        self.pml_on = on;
        Ok(())
    }

    fn drain_dirty_log(&mut self, into: &mut Vec<GuestPhysAddr>) -> Result<(), BackendError> {
        let (Some(buffer), true) = (self.pml_buffer, self.pml_on) else {
            return Ok(());
        };
        let vmcs = self.vmcs.current()?;
        let index = vmcs.read(guest::PML_INDEX) & 0xFFFF;
        // Entries above the index are filled; an index past 511 (it wrapped below 0) means all.
        let first = if index > PML_FIRST_INDEX { 0 } else { index + 1 };
        into.extend((first..PML_ENTRIES).map(|entry| {
            let at = HostPhysAddr::new_truncate(buffer.as_u64() + entry * 8);
            GuestPhysAddr::new_truncate(self.phys.read_u64(at) & !(PAGE_SIZE - 1))
        }));
        Ok(vmcs.write(guest::PML_INDEX, PML_FIRST_INDEX)?)
    }

    fn save_state(&self) -> Result<CpuSnapshot, BackendError> {
        let vmcs = self.vmcs.current()?;
        let mut segments = [SegmentState::default(); SNAPSHOT_SEGMENTS.len()];
        for (slot, &segment) in segments.iter_mut().zip(SNAPSHOT_SEGMENTS.iter()) {
            *slot = read_segment_state(&vmcs, segment_fields(segment));
        }
        let msrs = snapshot_msrs(self)?;
        let interruptibility = vmcs.read(guest::INTERRUPTIBILITY_STATE);
        Ok(CpuSnapshot {
            regs: self.regs,
            rsp: vmcs.read(guest::RSP),
            rip: vmcs.read(guest::RIP),
            rflags: vmcs.read(guest::RFLAGS),
            cr0: self.visible_cr0()?,
            cr2: self.cr2,
            cr3: vmcs.read(guest::CR3),
            cr4: guest_view(
                &vmcs,
                guest::CR4,
                control::CR4_GUEST_HOST_MASK,
                control::CR4_READ_SHADOW,
            ),
            dr7: vmcs.read(guest::DR7),
            efer: vmcs.read(guest::IA32_EFER_FULL),
            segments,
            ldtr: read_segment_state(&vmcs, SegmentFields::LDTR),
            gdt: (vmcs.read(guest::GDTR_BASE), vmcs.read(guest::GDTR_LIMIT) as u16),
            idt: (vmcs.read(guest::IDTR_BASE), vmcs.read(guest::IDTR_LIMIT) as u16),
            msrs,
            tsc_offset: self.tsc_offset,
            tsc_adjust: self.tsc_adjust,
            interrupt_shadow: (interruptibility & BLOCKING_BY_STI_OR_MOV_SS) as u8,
            nmi_blocked: interruptibility & BLOCKING_BY_NMI != 0,
            pending_debug: vmcs.read(guest::PENDING_DBG_EXCEPTIONS),
            pending_event: queued_event(&vmcs),
            interrupt_window: self.window_exiting,
            nmi_window: self.nmi_window_exiting,
            exception_exits: vmcs.read(EXCEPTION_BITMAP) as u32,
        })
    }

    fn load_state(&mut self, state: &CpuSnapshot) -> Result<(), BackendError> {
        let refused = |what| BackendError { what, code: None };
        let cr4 = self
            .hardware_cr4(state.cr4)
            .map_err(|Refused| refused("loading CR4"))?;
        let long_mode = state.efer & EFER_LMA != 0;
        let entry_controls = self.entry_controls_for(long_mode);
        let interruptibility = u64::from(state.interrupt_shadow) & BLOCKING_BY_STI_OR_MOV_SS
            | if state.nmi_blocked { BLOCKING_BY_NMI } else { 0 };
        {
            let vmcs = self.vmcs.current()?;
            for (field, value) in [
                (VMENTRY_CONTROLS, entry_controls),
                (guest::CR0, self.hardware_cr0(state.cr0)),
                (control::CR0_READ_SHADOW, state.cr0),
                (guest::CR3, state.cr3),
                (guest::CR4, cr4),
                (control::CR4_READ_SHADOW, state.cr4),
                (guest::DR7, state.dr7),
                (guest::RSP, state.rsp),
                (guest::RIP, state.rip),
                (guest::RFLAGS, state.rflags),
                (guest::IA32_EFER_FULL, state.efer),
                (guest::GDTR_BASE, state.gdt.0),
                (guest::GDTR_LIMIT, u64::from(state.gdt.1)),
                (guest::IDTR_BASE, state.idt.0),
                (guest::IDTR_LIMIT, u64::from(state.idt.1)),
                (guest::INTERRUPTIBILITY_STATE, interruptibility),
                (guest::ACTIVITY_STATE, 0),
                (guest::PENDING_DBG_EXCEPTIONS, state.pending_debug),
                (EXCEPTION_BITMAP, u64::from(state.exception_exits)),
                // As `write_guest_state` sets them: no shadow VMCS, no debug controls.
                (guest::LINK_PTR_FULL, u64::MAX),
                (guest::IA32_DEBUGCTL_FULL, 0),
            ] {
                vmcs.write(field, value)?;
            }
            for (&segment, &saved) in SNAPSHOT_SEGMENTS.iter().zip(state.segments.iter()) {
                write_segment_state(&vmcs, segment_fields(segment), saved)?;
            }
            write_segment_state(&vmcs, SegmentFields::LDTR, state.ldtr)?;
            if let Some(event) = state.pending_event {
                queue_event(&vmcs, event)?;
            }
            self.event_queued.set(state.pending_event.is_some());
        }
        self.ia32e_entry.set(long_mode);
        load_snapshot_msrs(self, &state.msrs)?;
        if !self.set_tsc_offset(state.tsc_offset) {
            return Err(refused("loading the TSC offset"));
        }
        self.tsc_adjust = state.tsc_adjust;
        self.regs = state.regs;
        self.cr2 = state.cr2;
        self.window_exiting = state.interrupt_window;
        self.nmi_window_exiting = state.nmi_window && self.nmi_window_available;
        self.write_window_controls()
    }
}

/// The event queued in the VM-entry interruption information, if any (an exit clears its
/// valid bit, so a queued event there is one not yet delivered).
fn queued_event(vmcs: &CurrentVmcs<'_>) -> Option<PendingEvent> {
    let info = vmcs.read(VMENTRY_INTERRUPTION_INFO_FIELD);
    decode_event(vmcs, info, VMENTRY_EXCEPTION_ERR_CODE, VMENTRY_INSTRUCTION_LEN)
}

/// The event an interruption-information value `info` describes (the VM-entry field's or the
/// IDT-vectoring information's layout), its error code and instruction length read from the
/// fields `error_field` and `length_field`; `None` when `info` is not valid.
fn decode_event(
    vmcs: &CurrentVmcs<'_>,
    info: u64,
    error_field: u32,
    length_field: u32,
) -> Option<PendingEvent> {
    if info & INTERRUPTION_VALID == 0 {
        return None;
    }
    let &(_, kind) = EVENT_KINDS
        .iter()
        .find(|(bits, _)| *bits == info & INTERRUPTION_TYPE_MASK)?;
    Some(PendingEvent {
        kind,
        vector: info as u8,
        error_code: (info & INTERRUPTION_ERROR_CODE != 0).then(|| vmcs.read(error_field) as u32),
        instruction_len: vmcs.read(length_field) as u32,
    })
}

/// Queues `event` for the next entry in the VM-entry interruption information: its error
/// code, its instruction's length for the software kinds (the only ones that use it), and RF
/// in the guest's RFLAGS for a fault (see [`mark_fault_resumable`]). The one way every event
/// goes in: injected, re-queued after an exit interrupted its delivery, or restored.
fn queue_event(vmcs: &CurrentVmcs<'_>, event: PendingEvent) -> Result<(), VmxError> {
    let kind_bits = EVENT_KINDS
        .iter()
        .find(|(_, kind)| *kind == event.kind)
        .map_or(INTERRUPTION_TYPE_EXTERNAL, |&(bits, _)| bits);
    // Bit 12 of the IDT-vectoring information, undefined there, must be clear at entry: the
    // value is built anew.
    let mut info = INTERRUPTION_VALID | kind_bits | u64::from(event.vector);
    if let Some(code) = event.error_code {
        info |= INTERRUPTION_ERROR_CODE;
        vmcs.write(VMENTRY_EXCEPTION_ERR_CODE, u64::from(code))?;
    }
    match event.kind {
        EventKind::SoftwareInterrupt
        | EventKind::PrivilegedSoftwareException
        | EventKind::SoftwareException => {
            vmcs.write(VMENTRY_INSTRUCTION_LEN, u64::from(event.instruction_len))?
        }
        EventKind::Exception => mark_fault_resumable(vmcs, event.vector)?,
        EventKind::Interrupt | EventKind::Nmi => {}
    }
    vmcs.write(VMENTRY_INTERRUPTION_INFO_FIELD, info)
}

impl Drop for VmxVcpu<'_> {
    /// Gives the log buffer and the MSR area back. The VMCS that names them is still active
    /// here (it is VMCLEARed when the field drops, after this body), but the vCPU never runs
    /// again, so the CPU no longer reads or writes them.
    fn drop(&mut self) {
        if let Some(frame) = self.pml_buffer.take() {
            KernelFrames.free_frame(frame);
        }
        KernelFrames.free_frame(self.msr_area);
    }
}

impl From<VmxError> for BackendError {
    fn from(error: VmxError) -> Self {
        match error {
            VmxError::Failed { instruction, error } => BackendError {
                what: instruction,
                code: error,
            },
            VmxError::WrongCpu => BackendError {
                what: "VMCS access on another CPU",
                code: None,
            },
            _ => BackendError {
                what: "VMX",
                code: None,
            },
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

    const LDTR: Self = Self::of(
        guest::LDTR_SELECTOR,
        guest::LDTR_BASE,
        guest::LDTR_LIMIT,
        guest::LDTR_ACCESS_RIGHTS,
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

/// The access-rights bits a segment's attributes occupy (VMX's layout is the descriptor's).
const ACCESS_RIGHTS_ATTRIBUTES: u16 = 0xF0FF;
/// The access-rights bit of a segment register holding a null selector.
const ACCESS_RIGHTS_UNUSABLE: u64 = 1 << 16;

/// A segment register's state from its VMCS fields.
fn read_segment_state(vmcs: &CurrentVmcs<'_>, fields: SegmentFields) -> SegmentState {
    let access_rights = vmcs.read(fields.access);
    SegmentState {
        selector: vmcs.read(fields.selector) as u16,
        base: vmcs.read(fields.base),
        limit: vmcs.read(fields.limit) as u32,
        attributes: access_rights as u16 & ACCESS_RIGHTS_ATTRIBUTES,
        usable: access_rights & ACCESS_RIGHTS_UNUSABLE == 0,
    }
}

/// Writes a segment register's state to its VMCS fields.
fn write_segment_state(
    vmcs: &CurrentVmcs<'_>,
    fields: SegmentFields,
    state: SegmentState,
) -> Result<(), VmxError> {
    let unusable = if state.usable { 0 } else { ACCESS_RIGHTS_UNUSABLE };
    vmcs.write(fields.selector, u64::from(state.selector))?;
    vmcs.write(fields.base, state.base)?;
    vmcs.write(fields.limit, u64::from(state.limit))?;
    vmcs.write(
        fields.access,
        u64::from(state.attributes & ACCESS_RIGHTS_ATTRIBUTES) | unusable,
    )
}

/// RFLAGS.RF: the instruction at RIP takes no instruction breakpoint when it runs again.
const RFLAGS_RF: u64 = 1 << 16;

/// Exception vectors that are traps (#DB is one here, as KVM counts it: a data breakpoint
/// or single step) or aborts (#DF, #MC), and NMI: the others are faults.
const NOT_FAULTS: [u8; 6] = [1, 2, 3, 4, 8, 18];

/// Before hardware exception `vector` is injected: when it is a fault, sets RF in the guest's
/// RFLAGS, so that the image its handler finds has RF set, as the CPU's own delivery of a
/// fault leaves it (the SDM on EFLAGS.RF: a fault's handler returns to the faulting
/// instruction without a breakpoint firing again). VM entry does not set it; delivery then
/// clears it in RFLAGS itself.
fn mark_fault_resumable(vmcs: &CurrentVmcs<'_>, vector: u8) -> Result<(), VmxError> {
    if NOT_FAULTS.contains(&vector) {
        return Ok(());
    }
    let rflags = vmcs.read(guest::RFLAGS);
    vmcs.write(guest::RFLAGS, rflags | RFLAGS_RF)
}

/// A control register as the guest reads it: the bits the host owns (set in the mask field
/// `mask`) from the read shadow `shadow`, the rest from the register's guest field `value`.
fn guest_view(vmcs: &CurrentVmcs<'_>, value: u32, mask: u32, shadow: u32) -> u64 {
    let mask = vmcs.read(mask);
    vmcs.read(value) & !mask | vmcs.read(shadow) & mask
}

/// Puts `value` in CR2 (the guest's, before an entry).
fn write_cr2(value: u64) {
    // SAFETY: CR2 only reports the address of the last page fault; the host reads it nowhere
    // (its own page faults are fatal), so only the guest's view of it changes.
    unsafe { core::arch::asm!("mov cr2, {}", in(reg) value, options(nomem, nostack, preserves_flags)) };
}

/// VMX interruption types (SDM 24.8.3, bits 10:8 of the interruption information) of the
/// neutral event kinds.
const EVENT_KINDS: [(u64, EventKind); 6] = [
    (INTERRUPTION_TYPE_EXTERNAL, EventKind::Interrupt),
    (INTERRUPTION_TYPE_NMI, EventKind::Nmi),
    (INTERRUPTION_TYPE_HARD_EXCEPTION, EventKind::Exception),
    (4 << 8, EventKind::SoftwareInterrupt),
    (5 << 8, EventKind::PrivilegedSoftwareException),
    (6 << 8, EventKind::SoftwareException),
];
/// The VMCS fields of `segment`.
fn segment_fields(segment: Segment) -> SegmentFields {
    match segment {
        Segment::Es => SegmentFields::ES,
        Segment::Cs => SegmentFields::CS,
        Segment::Ss => SegmentFields::SS,
        Segment::Ds => SegmentFields::DS,
        Segment::Fs => SegmentFields::FS,
        Segment::Gs => SegmentFields::GS,
        Segment::Tr => SegmentFields::of(
            guest::TR_SELECTOR,
            guest::TR_BASE,
            guest::TR_LIMIT,
            guest::TR_ACCESS_RIGHTS,
        ),
    }
}
