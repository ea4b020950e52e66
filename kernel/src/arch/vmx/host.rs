//! The host state a VMCS needs (SDM 25.5): read from the running kernel.

use x86::msr::{
    rdmsr, IA32_EFER, IA32_FS_BASE, IA32_GS_BASE, IA32_SYSENTER_CS, IA32_SYSENTER_EIP, IA32_SYSENTER_ESP,
};
use x86_64::instructions::tables::{sgdt, sidt};
use x86_64::registers::control::{Cr0, Cr3, Cr4};

use crate::arch::{gdt, smp};

/// The kernel's control registers, segments, descriptor tables and MSRs, as the VMCS host-state
/// area holds them.
#[derive(Clone, Copy, Debug)]
pub struct HostState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub code_selector: u16,
    pub data_selector: u16,
    pub tr_selector: u16,
    pub fs_base: u64,
    pub gs_base: u64,
    pub tr_base: u64,
    pub gdtr_base: u64,
    pub idtr_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    pub efer: u64,
    /// Where VM exits land.
    pub rip: u64,
}

/// Reads the current host state. Call after `gdt::init`, `idt::init` and `vmx::enable`.
pub fn current() -> HostState {
    let selectors = gdt::selectors();
    let (cr3_frame, cr3_flags) = Cr3::read_raw();
    // SAFETY: these MSRs exist on every x86-64 CPU; reading them has no side effect.
    let (fs_base, gs_base, sysenter_cs, sysenter_esp, sysenter_eip, efer) = unsafe {
        (
            rdmsr(IA32_FS_BASE),
            rdmsr(IA32_GS_BASE),
            rdmsr(IA32_SYSENTER_CS),
            rdmsr(IA32_SYSENTER_ESP),
            rdmsr(IA32_SYSENTER_EIP),
            rdmsr(IA32_EFER),
        )
    };
    HostState {
        cr0: Cr0::read_raw(),
        cr3: cr3_frame.start_address().as_u64() | u64::from(cr3_flags),
        cr4: Cr4::read_raw(),
        code_selector: selectors.code.0,
        data_selector: selectors.data.0,
        tr_selector: selectors.tss.0,
        fs_base,
        gs_base,
        tr_base: smp::this_cpu().tss_base(),
        gdtr_base: sgdt().base.as_u64(),
        idtr_base: sidt().base.as_u64(),
        sysenter_cs,
        sysenter_esp,
        sysenter_eip,
        efer,
        rip: super::entry::exit_entry_point(),
    }
}
