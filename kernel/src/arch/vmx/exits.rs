//! VMX exit encodings (SDM Vol. 3D, Appendix C; Vol. 3C, 28.2), defined once for the backend's
//! decoder and the VMX-specific tests, and their names for diagnostics.

/// Basic exit reasons this hypervisor handles or names (SDM Vol. 3D, Appendix C).
pub mod exit_reason {
    pub const EXCEPTION_OR_NMI: u32 = 0;
    pub const EXTERNAL_INTERRUPT: u32 = 1;
    pub const TRIPLE_FAULT: u32 = 2;
    pub const INTERRUPT_WINDOW: u32 = 7;
    pub const NMI_WINDOW: u32 = 8;
    pub const CPUID: u32 = 10;
    pub const HLT: u32 = 12;
    pub const INVD: u32 = 13;
    pub const CONTROL_REGISTER: u32 = 28;
    pub const VMCALL: u32 = 18;
    pub const IO_INSTRUCTION: u32 = 30;
    pub const RDMSR: u32 = 31;
    pub const WRMSR: u32 = 32;
    pub const INVALID_GUEST_STATE: u32 = 33;
    pub const MWAIT: u32 = 36;
    pub const MONITOR: u32 = 39;
    pub const PAUSE: u32 = 40;
    pub const EPT_VIOLATION: u32 = 48;
    pub const EPT_MISCONFIGURATION: u32 = 49;
    pub const PREEMPTION_TIMER: u32 = 52;
    pub const PML_FULL: u32 = 62;
}

/// Exit-qualification and exit-information bits (SDM Vol. 3C, 28.2).
pub mod qualification {
    /// Exit-reason bit 31: the VM entry failed.
    pub const ENTRY_FAILURE: u64 = 1 << 31;
    /// VM-exit interruption information: valid bit, and the NMI type in bits 10:8.
    pub const INTERRUPTION_VALID: u64 = 1 << 31;
    pub const INTERRUPTION_TYPE_NMI: u64 = 2 << 8;
    pub const INTERRUPTION_TYPE_MASK: u64 = 7 << 8;
    /// Interruption types: external interrupt, hardware exception, software exception.
    pub const INTERRUPTION_TYPE_EXTERNAL: u64 = 0;
    pub const INTERRUPTION_TYPE_HARD_EXCEPTION: u64 = 3 << 8;
    /// Interruption information bit 11: an error code is delivered (or was pushed).
    pub const INTERRUPTION_ERROR_CODE: u64 = 1 << 11;
    /// I/O-instruction exit: size - 1 in bits 2:0, IN in bit 3, string and REP in bits 4 and
    /// 5, the port in bits 31:16.
    pub const IO_SIZE_MASK: u64 = 0b111;
    pub const IO_IN: u64 = 1 << 3;
    pub const IO_STRING: u64 = 1 << 4;
    pub const IO_REP: u64 = 1 << 5;
    /// EPT violation: the access was a read, a write, an instruction fetch.
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub const EPT_READ: u64 = 1 << 0;
    pub const EPT_WRITE: u64 = 1 << 1;
    pub const EPT_EXECUTE: u64 = 1 << 2;
    /// EPT violation: the guest-physical address was readable (its entries all grant read).
    pub const EPT_WAS_READABLE: u64 = 1 << 3;
    /// EPT violation: bit 7, the guest-linear address is valid; bit 8 (then), the access was
    /// the translation of it rather than the CPU's access to a paging-structure entry.
    pub const EPT_LINEAR_VALID: u64 = 1 << 7;
    pub const EPT_TRANSLATED: u64 = 1 << 8;

    /// True when an EPT violation was an access to a translated guest-linear address (the
    /// guest-linear address field holds it).
    pub fn has_translated_linear(qualification: u64) -> bool {
        qualification & EPT_LINEAR_VALID != 0 && qualification & EPT_TRANSLATED != 0
    }

    /// True when an EPT violation was the CPU's own access to the guest's page tables.
    pub fn is_page_walk(qualification: u64) -> bool {
        qualification & EPT_LINEAR_VALID != 0 && qualification & EPT_TRANSLATED == 0
    }
}

/// The name of a basic exit reason, for diagnostics.
pub fn exit_name(reason: u32) -> &'static str {
    match reason {
        exit_reason::EXCEPTION_OR_NMI => "exception or NMI",
        exit_reason::EXTERNAL_INTERRUPT => "external interrupt",
        exit_reason::TRIPLE_FAULT => "triple fault",
        exit_reason::INTERRUPT_WINDOW => "interrupt window",
        exit_reason::NMI_WINDOW => "NMI window",
        9 => "task switch",
        exit_reason::CPUID => "CPUID",
        exit_reason::HLT => "HLT",
        exit_reason::INVD => "INVD",
        exit_reason::VMCALL => "VMCALL",
        exit_reason::CONTROL_REGISTER => "control-register access",
        exit_reason::IO_INSTRUCTION => "I/O instruction",
        exit_reason::RDMSR => "RDMSR",
        exit_reason::WRMSR => "WRMSR",
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
