//! VMX capability discovery (SDM Vol. 3D, Appendix A): what the CPU offers, checked against what
//! this hypervisor needs, with a clear reason when something is missing.

use core::fmt;

use x86::msr::{
    rdmsr, IA32_VMX_BASIC, IA32_VMX_CR0_FIXED0, IA32_VMX_CR0_FIXED1, IA32_VMX_CR4_FIXED0,
    IA32_VMX_CR4_FIXED1, IA32_VMX_ENTRY_CTLS, IA32_VMX_EPT_VPID_CAP, IA32_VMX_EXIT_CTLS, IA32_VMX_MISC,
    IA32_VMX_PINBASED_CTLS, IA32_VMX_PROCBASED_CTLS, IA32_VMX_PROCBASED_CTLS2, IA32_VMX_TRUE_ENTRY_CTLS,
    IA32_VMX_TRUE_EXIT_CTLS, IA32_VMX_TRUE_PINBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS,
};
use x86::vmx::vmcs::control::{PinbasedControls, PrimaryControls, SecondaryControls};

/// IA32_VMX_BASIC bit 55: the TRUE_* control MSRs exist.
const BASIC_TRUE_CONTROLS: u64 = 1 << 55;
/// IA32_VMX_EPT_VPID_CAP bits this hypervisor relies on or reports.
const EPT_WALK_LENGTH_4: u64 = 1 << 6;
const EPT_WRITE_BACK: u64 = 1 << 14;
const EPT_2M_PAGES: u64 = 1 << 16;
const EPT_1G_PAGES: u64 = 1 << 17;
const EPT_INVEPT: u64 = 1 << 20;
const EPT_ACCESSED_DIRTY: u64 = 1 << 21;
const EPT_INVEPT_SINGLE: u64 = 1 << 25;
const EPT_INVEPT_ALL: u64 = 1 << 26;
/// Secondary control bit 17: page-modification logging.
const SECONDARY_PML: u32 = 1 << 17;
/// IA32_VMX_MISC bits 4:0: the VMX-preemption timer counts down once every 2^rate TSC ticks.
const MISC_PREEMPTION_TIMER_RATE: u64 = 0x1F;

/// Why VT-x cannot be used on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// CPUID.1:ECX.VMX is clear (e.g. QEMU's TCG, or an AMD CPU).
    NoVmx,
    /// The firmware locked IA32_FEATURE_CONTROL with VMX outside SMX disabled.
    DisabledByFirmware,
    /// A required feature is missing; the text names it.
    Missing(&'static str),
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::NoVmx => write!(f, "VT-x not available: CPUID reports no VMX on this CPU"),
            Unavailable::DisabledByFirmware => {
                write!(
                    f,
                    "VT-x not available: disabled and locked by firmware (IA32_FEATURE_CONTROL)"
                )
            }
            Unavailable::Missing(what) => write!(f, "VT-x not usable: the CPU lacks {what}"),
        }
    }
}

/// One control MSR pair: bits that must be 1 (`allowed0`) and bits that may be 1 (`allowed1`).
#[derive(Clone, Copy, Debug)]
pub struct ControlCaps {
    allowed0: u32,
    allowed1: u32,
}

impl ControlCaps {
    fn read(msr: u32) -> ControlCaps {
        // SAFETY: only called for VMX capability MSRs after CPUID reported VMX.
        let value = unsafe { rdmsr(msr) };
        ControlCaps {
            allowed0: value as u32,
            allowed1: (value >> 32) as u32,
        }
    }

    /// The control value with `wanted` set plus every bit the CPU forces on; `Err` names the
    /// wanted bits the CPU cannot set.
    pub fn adjust(&self, wanted: u32) -> Result<u32, u32> {
        let missing = wanted & !self.allowed1;
        if missing != 0 {
            return Err(missing);
        }
        Ok((wanted | self.allowed0) & self.allowed1)
    }

    /// True when every bit of `bits` may be set.
    pub fn allows(&self, bits: u32) -> bool {
        self.allowed1 & bits == bits
    }
}

/// Everything the VMX code needs to know about this CPU.
#[derive(Clone, Copy, Debug)]
pub struct VmxCaps {
    /// VMCS revision identifier (IA32_VMX_BASIC bits 30:0).
    pub revision: u32,
    /// Pin-based controls.
    pub pin: ControlCaps,
    /// Primary processor-based controls.
    pub primary: ControlCaps,
    /// Secondary processor-based controls.
    pub secondary: ControlCaps,
    /// VM-exit controls.
    pub exit: ControlCaps,
    /// VM-entry controls.
    pub entry: ControlCaps,
    /// IA32_VMX_EPT_VPID_CAP.
    pub ept_vpid: u64,
    /// CR0 bits fixed to 1 / allowed to be 1 in VMX operation.
    pub cr0_fixed: (u64, u64),
    /// CR4 bits fixed to 1 / allowed to be 1 in VMX operation.
    pub cr4_fixed: (u64, u64),
    /// IA32_VMX_MISC.
    pub misc: u64,
}

impl VmxCaps {
    /// Reads the capabilities and checks for what this hypervisor needs: VMX, secondary
    /// controls, EPT (4-level walk, write-back tables, INVEPT single-context), unrestricted
    /// guest, VPID, and the VMX-preemption timer (without it a guest that never exits would
    /// keep the CPU).
    pub fn probe() -> Result<VmxCaps, Unavailable> {
        let has_vmx = x86::cpuid::CpuId::new()
            .get_feature_info()
            .is_some_and(|info| info.has_vmx());
        if !has_vmx {
            return Err(Unavailable::NoVmx);
        }
        // SAFETY: IA32_VMX_BASIC exists when CPUID reports VMX.
        let basic = unsafe { rdmsr(IA32_VMX_BASIC) };
        let true_controls = basic & BASIC_TRUE_CONTROLS != 0;
        let pick = |plain, true_msr| ControlCaps::read(if true_controls { true_msr } else { plain });
        let primary = pick(IA32_VMX_PROCBASED_CTLS, IA32_VMX_TRUE_PROCBASED_CTLS);
        if !primary.allows(PrimaryControls::SECONDARY_CONTROLS.bits()) {
            return Err(Unavailable::Missing("secondary processor-based controls"));
        }
        let secondary = ControlCaps::read(IA32_VMX_PROCBASED_CTLS2);
        let required = [
            (SecondaryControls::ENABLE_EPT.bits(), "EPT"),
            (SecondaryControls::UNRESTRICTED_GUEST.bits(), "unrestricted guest"),
            (SecondaryControls::ENABLE_VPID.bits(), "VPID"),
        ];
        for (bit, name) in required {
            if !secondary.allows(bit) {
                return Err(Unavailable::Missing(name));
            }
        }
        let pin = pick(IA32_VMX_PINBASED_CTLS, IA32_VMX_TRUE_PINBASED_CTLS);
        if !pin.allows(PinbasedControls::VMX_PREEMPTION_TIMER.bits()) {
            return Err(Unavailable::Missing("the VMX-preemption timer"));
        }
        // SAFETY: IA32_VMX_EPT_VPID_CAP exists when EPT or VPID may be enabled (checked above).
        let ept_vpid = unsafe { rdmsr(IA32_VMX_EPT_VPID_CAP) };
        let ept_required = [
            (EPT_WALK_LENGTH_4, "a 4-level EPT walk"),
            (EPT_WRITE_BACK, "write-back EPT tables"),
            (EPT_INVEPT | EPT_INVEPT_SINGLE, "single-context INVEPT"),
        ];
        for (bits, name) in ept_required {
            if ept_vpid & bits != bits {
                return Err(Unavailable::Missing(name));
            }
        }
        // SAFETY: the fixed-bit MSRs and IA32_VMX_MISC exist when CPUID reports VMX.
        let (cr0_fixed, cr4_fixed, misc) = unsafe {
            (
                (rdmsr(IA32_VMX_CR0_FIXED0), rdmsr(IA32_VMX_CR0_FIXED1)),
                (rdmsr(IA32_VMX_CR4_FIXED0), rdmsr(IA32_VMX_CR4_FIXED1)),
                rdmsr(IA32_VMX_MISC),
            )
        };
        Ok(VmxCaps {
            revision: (basic & 0x7FFF_FFFF) as u32,
            pin,
            primary,
            secondary,
            exit: pick(IA32_VMX_EXIT_CTLS, IA32_VMX_TRUE_EXIT_CTLS),
            entry: pick(IA32_VMX_ENTRY_CTLS, IA32_VMX_TRUE_ENTRY_CTLS),
            ept_vpid,
            cr0_fixed,
            cr4_fixed,
            misc,
        })
    }

    /// The VMX-preemption timer's rate: it counts down once every 2^rate TSC ticks.
    pub fn preemption_timer_rate(&self) -> u32 {
        (self.misc & MISC_PREEMPTION_TIMER_RATE) as u32
    }

    /// True when PAUSE-loop exiting may be enabled.
    pub fn pause_loop_exiting(&self) -> bool {
        self.secondary
            .allows(SecondaryControls::PAUSE_LOOP_EXITING.bits())
    }

    /// True when the CPU can log written guest-physical addresses (PML), which needs EPT
    /// accessed/dirty flags too.
    pub fn pml(&self) -> bool {
        self.secondary.allows(SECONDARY_PML) && self.ept_accessed_dirty()
    }

    /// True when RDTSCP (and RDPID) may run in a guest ("enable RDTSCP").
    pub fn rdtscp(&self) -> bool {
        self.secondary.allows(SecondaryControls::ENABLE_RDTSCP.bits())
    }

    /// True when EPT can set accessed/dirty flags.
    pub fn ept_accessed_dirty(&self) -> bool {
        self.ept_vpid & EPT_ACCESSED_DIRTY != 0
    }
}

impl fmt::Display for VmxCaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |present: bool| if present { "yes" } else { "no" };
        write!(
            f,
            "VMCS revision {:#x}; EPT 4-level WB yes, 2M {}, 1G {}, A/D {}, INVEPT all-context {}; \
             unrestricted guest yes; VPID yes; PML {}; preemption timer yes, 2^{} TSC ticks per \
             count; PAUSE-loop exiting {}",
            self.revision,
            yes(self.ept_vpid & EPT_2M_PAGES != 0),
            yes(self.ept_vpid & EPT_1G_PAGES != 0),
            yes(self.ept_accessed_dirty()),
            yes(self.ept_vpid & EPT_INVEPT_ALL != 0),
            yes(self.secondary.allows(SECONDARY_PML)),
            self.preemption_timer_rate(),
            yes(self.pause_loop_exiting()),
        )
    }
}
