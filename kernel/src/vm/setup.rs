//! VMCS set-up: execution controls, host state and the initial guest state.

use x86::vmx::vmcs::control::{
    self, EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls, EPTP_FULL,
    EXCEPTION_BITMAP, PINBASED_EXEC_CONTROLS, PLE_GAP, PLE_WINDOW, PRIMARY_PROCBASED_EXEC_CONTROLS,
    SECONDARY_PROCBASED_EXEC_CONTROLS, VMENTRY_CONTROLS, VMEXIT_CONTROLS, VPID,
};
use x86::vmx::vmcs::{guest, host};

use super::{Vm, VmError};
use crate::arch::guests::GuestMode;
use crate::arch::vmx::{self, host::HostState, vmcs::CurrentVmcs, VmxError};

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
/// IA32_EFER: long mode enabled and active.
const EFER_LME: u64 = 1 << 8;
pub(super) const EFER_LMA: u64 = 1 << 10;
/// Code-segment access rights: L (64-bit code) and D/B (32-bit default size).
pub(super) const CS_LONG: u64 = 1 << 13;
pub(super) const CS_DEFAULT_32: u64 = 1 << 14;

/// The VM-entry control values for the two kinds of guest.
#[derive(Clone, Copy, Default)]
pub(super) struct EntryControlValues {
    legacy: u64,
    long_mode: u64,
}

impl Vm<'_> {
    /// VM-execution, exit and entry controls: HLT, MONITOR, MWAIT and all port I/O exit, and
    /// so do long PAUSE loops where the CPU offers it; host interrupts and NMIs exit (not
    /// acknowledged: the host takes them itself); the VMX-preemption timer bounds every entry;
    /// EPT, VPID and unrestricted guest on; EFER switched on entry and exit; 64-bit host.
    pub(super) fn write_controls(&mut self) -> Result<(), VmError> {
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
            (VPID, GUEST_VPID),
            (EPTP_FULL, self.memory.eptp()),
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
    pub(super) fn write_host_state(&mut self, state: &HostState) -> Result<(), VmError> {
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
    pub(super) fn write_guest_state(&mut self, mode: GuestMode, rip: u64, cr3: u64) -> Result<(), VmError> {
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
