//! The MSR policy: what RDMSR and WRMSR of each MSR do in a guest. Every MSR access exits
//! (no MSR bitmap yet), and each MSR is one of:
//! - **emulated** here, per vCPU: the APIC base (with the xAPIC/x2APIC mode transitions of
//!   SDM Vol. 3A 11.12.5), PAT, the MTRRs (capabilities, default type,
//!   8 variable and 11 fixed ranges, held for the guest: EPT maps RAM write-back whatever they
//!   say), MISC_ENABLE, FEATURE_CONTROL (locked, VMX off), the microcode signature and
//!   platform ID;
//! - **absent counters**: AMD's four legacy performance counters and their event selects
//!   (0xC001_0000–0xC001_0007), which every AMD CPU has and no CPUID bit announces, read 0
//!   and drop writes, as KVM does for a guest without a virtual PMU (an AMD-vendor guest
//!   resets them at boot);
//! - **the local APIC's** (`lapic`): the TSC deadline and the x2APIC registers 0x800–0x8FF;
//! - **held by the backend** in the guest state it loads at entry and saves at exit (EFER,
//!   the FS and GS bases, the SYSENTER MSRs, the SYSCALL MSRs with the swap-GS base, TSC_AUX,
//!   and the TSC as an offset from the host's);
//! - **refused**: every other MSR, which injects #GP as a CPU does for an MSR it lacks (and as
//!   KVM does by default). The VM does not stop.
//!
//! A write with reserved bits set, a PAT entry with an undefined memory type, or a forbidden
//! APIC mode transition is refused the same way.

use crate::cpuid::CpuidRegs;

/// MSR numbers.
pub mod index {
    /// Time-stamp counter.
    pub const TSC: u32 = 0x10;
    /// The TSC's adjustment (SDM 17.17.3): written, it moves the TSC by the change.
    pub const TSC_ADJUST: u32 = 0x3B;
    /// Platform ID.
    pub const PLATFORM_ID: u32 = 0x17;
    /// Local APIC base and mode.
    pub const APIC_BASE: u32 = 0x1B;
    /// Feature control (VMX enable and lock).
    pub const FEATURE_CONTROL: u32 = 0x3A;
    /// Microcode update signature.
    pub const BIOS_SIGN_ID: u32 = 0x8B;
    /// MTRR capabilities.
    pub const MTRR_CAP: u32 = 0xFE;
    /// SYSENTER CS, ESP, EIP.
    pub const SYSENTER_CS: u32 = 0x174;
    /// See `SYSENTER_CS`.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// See `SYSENTER_CS`.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// Miscellaneous features.
    pub const MISC_ENABLE: u32 = 0x1A0;
    /// The first variable-range MTRR (base/mask pairs up to 0x20F).
    pub const MTRR_PHYS_BASE0: u32 = 0x200;
    /// Fixed-range MTRR covering 0–0x7FFFF.
    pub const MTRR_FIX_64K: u32 = 0x250;
    /// Fixed-range MTRRs covering 0x80000–0xBFFFF.
    pub const MTRR_FIX_16K_80000: u32 = 0x258;
    /// See `MTRR_FIX_16K_80000`.
    pub const MTRR_FIX_16K_A0000: u32 = 0x259;
    /// The first of the eight 4 KiB fixed-range MTRRs (0xC0000–0xFFFFF).
    pub const MTRR_FIX_4K_C0000: u32 = 0x268;
    /// Page attribute table.
    pub const PAT: u32 = 0x277;
    /// MTRR default type.
    pub const MTRR_DEF_TYPE: u32 = 0x2FF;
    /// TSC deadline of the local APIC timer.
    pub const TSC_DEADLINE: u32 = 0x6E0;
    /// Extended features (long mode, NX, SYSCALL).
    pub const EFER: u32 = 0xC000_0080;
    /// SYSCALL target segments.
    pub const STAR: u32 = 0xC000_0081;
    /// 64-bit SYSCALL target.
    pub const LSTAR: u32 = 0xC000_0082;
    /// Compatibility-mode SYSCALL target.
    pub const CSTAR: u32 = 0xC000_0083;
    /// SYSCALL RFLAGS mask.
    pub const SFMASK: u32 = 0xC000_0084;
    /// FS base.
    pub const FS_BASE: u32 = 0xC000_0100;
    /// GS base.
    pub const GS_BASE: u32 = 0xC000_0101;
    /// The GS base SWAPGS exchanges with.
    pub const KERNEL_GS_BASE: u32 = 0xC000_0102;
    /// The value RDTSCP and RDPID return.
    pub const TSC_AUX: u32 = 0xC000_0103;
}

/// The MSRs the backend holds in the guest state it loads and saves around each run (the TSC
/// as its offset from the host's, and TSC_ADJUST beside it).
pub const BACKEND_HELD: [u32; 14] = [
    index::TSC,
    index::TSC_ADJUST,
    index::TSC_AUX,
    index::EFER,
    index::FS_BASE,
    index::GS_BASE,
    index::SYSENTER_CS,
    index::SYSENTER_ESP,
    index::SYSENTER_EIP,
    index::STAR,
    index::LSTAR,
    index::CSTAR,
    index::SFMASK,
    index::KERNEL_GS_BASE,
];

/// The local APIC's architectural base address.
pub const APIC_DEFAULT_BASE: u64 = 0xFEE0_0000;
/// APIC base MSR: bootstrap processor (bit 8), x2APIC mode (bit 10), enabled (bit 11).
pub const APIC_BSP: u64 = 1 << 8;
/// See [`APIC_BSP`].
pub const APIC_X2APIC: u64 = 1 << 10;
/// See [`APIC_BSP`].
pub const APIC_ENABLED: u64 = 1 << 11;
/// PAT at reset: WB, WT, UC-, UC, repeated.
pub const PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// MTRR capabilities: 8 variable ranges, fixed ranges (bit 8), write-combining (bit 10).
pub const MTRR_CAPABILITIES: u64 = 8 | (1 << 8) | (1 << 10);
/// AMD's legacy event selects (0xC001_0000–3) and counters (0xC001_0004–7).
const AMD_LEGACY_COUNTERS_FIRST: u32 = 0xC001_0000;
const AMD_LEGACY_COUNTERS_LAST: u32 = 0xC001_0007;

/// MISC_ENABLE as read: fast strings (bit 0), branch trace and PEBS unavailable (bits 11,
/// 12).
const MISC_ENABLE_RESET: u64 = 1 | (1 << 11) | (1 << 12);
/// The only MISC_ENABLE bit a guest may change: fast strings.
const MISC_ENABLE_WRITABLE: u64 = 1;
/// FEATURE_CONTROL: locked (bit 0), VMX off.
const FEATURE_CONTROL_LOCKED: u64 = 1;

/// What the caller does with an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrOutcome {
    /// Done: a read's value is this (a write's is 0).
    Done(u64),
    /// The MSR lives in the backend's guest state: read or write it there.
    Backend,
    /// The MSR is the vCPU's local APIC's (the TSC deadline, the x2APIC registers).
    Apic,
    /// Inject #GP(0).
    Refused,
}

/// The emulated MSRs of one vCPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsrState {
    /// The APIC base MSR.
    pub apic_base: u64,
    pat: u64,
    mtrr_def_type: u64,
    mtrr_variable: [u64; 16],
    mtrr_fixed: [u64; 11],
    misc_enable: u64,
    /// The guest's physical-address width: APIC base and MTRR bits above it are reserved.
    phys_bits: u32,
}

/// An MTRR or PAT memory type is defined: UC, WC, WT, WP, WB (and UC- for PAT).
fn memory_type_valid(kind: u64, pat: bool) -> bool {
    matches!(kind, 0 | 1 | 4 | 5 | 6) || (pat && kind == 7)
}

impl MsrState {
    /// The reset state of vCPU `index` (vCPU 0 is the bootstrap processor) on a guest with
    /// `phys_bits` physical-address bits.
    pub fn new(index: u32, phys_bits: u32) -> MsrState {
        let bsp = if index == 0 { APIC_BSP } else { 0 };
        MsrState {
            apic_base: APIC_DEFAULT_BASE | APIC_ENABLED | bsp,
            pat: PAT_RESET,
            mtrr_def_type: 0,
            mtrr_variable: [0; 16],
            mtrr_fixed: [0; 11],
            misc_enable: MISC_ENABLE_RESET,
            phys_bits: phys_bits.clamp(36, 52),
        }
    }

    /// Bits at and above the physical-address width.
    fn above_phys(&self) -> u64 {
        !((1u64 << self.phys_bits) - 1)
    }

    /// The fixed-range MTRR slot of `msr`.
    fn fixed_slot(msr: u32) -> Option<usize> {
        match msr {
            index::MTRR_FIX_64K => Some(0),
            index::MTRR_FIX_16K_80000 => Some(1),
            index::MTRR_FIX_16K_A0000 => Some(2),
            0x268..=0x26F => Some(3 + (msr - index::MTRR_FIX_4K_C0000) as usize),
            _ => None,
        }
    }

    /// RDMSR of `msr`.
    pub fn read(&self, msr: u32) -> MsrOutcome {
        let value = match msr {
            index::PLATFORM_ID | index::BIOS_SIGN_ID => 0,
            index::APIC_BASE => self.apic_base,
            index::FEATURE_CONTROL => FEATURE_CONTROL_LOCKED,
            index::MTRR_CAP => MTRR_CAPABILITIES,
            index::MISC_ENABLE => self.misc_enable,
            0x200..=0x20F => self.mtrr_variable[(msr - index::MTRR_PHYS_BASE0) as usize],
            index::PAT => self.pat,
            index::MTRR_DEF_TYPE => self.mtrr_def_type,
            AMD_LEGACY_COUNTERS_FIRST..=AMD_LEGACY_COUNTERS_LAST => 0,
            _ if is_apic_msr(msr) => return MsrOutcome::Apic,
            _ if BACKEND_HELD.contains(&msr) => return MsrOutcome::Backend,
            _ => match MsrState::fixed_slot(msr) {
                Some(slot) => self.mtrr_fixed[slot],
                None => return MsrOutcome::Refused,
            },
        };
        MsrOutcome::Done(value)
    }

    /// WRMSR of `value` to `msr`. A refused write changes nothing.
    pub fn write(&mut self, msr: u32, value: u64) -> MsrOutcome {
        let accepted = match msr {
            // Linux clears the signature before asking CPUID for the microcode revision.
            index::BIOS_SIGN_ID => true,
            index::APIC_BASE => self.write_apic_base(value),
            index::MISC_ENABLE => {
                let accepted = value & !MISC_ENABLE_WRITABLE == MISC_ENABLE_RESET & !MISC_ENABLE_WRITABLE;
                if accepted {
                    self.misc_enable = value;
                }
                accepted
            }
            0x200..=0x20F => {
                let slot = (msr - index::MTRR_PHYS_BASE0) as usize;
                // Even: base (type in bits 7:0, bits 11:8 reserved); odd: mask (valid bit
                // 11, bits 10:0 reserved).
                let is_base = slot.is_multiple_of(2);
                let reserved = self.above_phys() | if is_base { 0xF00 } else { 0x7FF };
                let accepted = value & reserved == 0 && (!is_base || memory_type_valid(value & 0xFF, false));
                if accepted {
                    self.mtrr_variable[slot] = value;
                }
                accepted
            }
            index::PAT => {
                let accepted = (0..8).all(|i| memory_type_valid((value >> (8 * i)) & 0xFF, true));
                if accepted {
                    self.pat = value;
                }
                accepted
            }
            index::MTRR_DEF_TYPE => {
                // Type in bits 7:0, fixed-range enable (bit 10), enable (bit 11).
                let accepted = value & !0xCFF == 0 && memory_type_valid(value & 0xFF, false);
                if accepted {
                    self.mtrr_def_type = value;
                }
                accepted
            }
            AMD_LEGACY_COUNTERS_FIRST..=AMD_LEGACY_COUNTERS_LAST => true,
            _ if is_apic_msr(msr) => return MsrOutcome::Apic,
            _ if BACKEND_HELD.contains(&msr) => return MsrOutcome::Backend,
            _ => match MsrState::fixed_slot(msr) {
                Some(slot) => {
                    let accepted = (0..8).all(|i| memory_type_valid((value >> (8 * i)) & 0xFF, false));
                    if accepted {
                        self.mtrr_fixed[slot] = value;
                    }
                    accepted
                }
                None => false,
            },
        };
        if accepted {
            MsrOutcome::Done(0)
        } else {
            MsrOutcome::Refused
        }
    }

    /// The APIC base: the base stays at its architectural address (nothing here relocates
    /// the APIC page), bits 0–7 and 9 are reserved, the BSP flag is read-only, and only the
    /// mode transitions of SDM 11.12.5 are allowed (x2APIC is entered from xAPIC only; leaving
    /// it goes through disabled).
    fn write_apic_base(&mut self, value: u64) -> bool {
        let reserved = 0x2FF | self.above_phys();
        let mode = |base: u64| base & (APIC_ENABLED | APIC_X2APIC);
        let (from, to) = (mode(self.apic_base), mode(value));
        let transition_ok = match to {
            // x2APIC without the enable bit is invalid.
            APIC_X2APIC => false,
            // xAPIC from x2APIC must go through disabled.
            APIC_ENABLED => from != APIC_ENABLED | APIC_X2APIC,
            // x2APIC is entered from xAPIC only.
            _ if to == APIC_ENABLED | APIC_X2APIC => from & APIC_ENABLED != 0,
            _ => true,
        };
        let base_kept = value & !0xFFF & !self.above_phys() == APIC_DEFAULT_BASE;
        let bsp_kept = value & APIC_BSP == self.apic_base & APIC_BSP;
        let accepted = value & reserved == 0 && transition_ok && base_kept && bsp_kept;
        if accepted {
            self.apic_base = value;
        }
        accepted
    }

    /// True while the vCPU's local APIC is in x2APIC mode.
    pub fn x2apic(&self) -> bool {
        self.apic_base & (APIC_ENABLED | APIC_X2APIC) == APIC_ENABLED | APIC_X2APIC
    }
}

/// True for the MSRs of the local APIC: the TSC deadline and the x2APIC registers.
pub fn is_apic_msr(msr: u32) -> bool {
    msr == index::TSC_DEADLINE || (0x800..=0x8FF).contains(&msr)
}

/// The physical-address width a guest sees: CPUID 0x8000_0008 EAX bits 7:0, where the host
/// answers that leaf, else 36.
pub fn phys_bits(extended: CpuidRegs, extended_max: u32) -> u32 {
    if extended_max >= 0x8000_0008 {
        extended.eax & 0xFF
    } else {
        36
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> MsrState {
        MsrState::new(0, 39)
    }

    #[test]
    fn amd_legacy_counters_read_zero_and_drop_writes() {
        let mut msrs = state();
        for msr in 0xC001_0000..=0xC001_0007 {
            assert_eq!(msrs.write(msr, 0x43_0076), MsrOutcome::Done(0), "{msr:#x}");
            assert_eq!(msrs.read(msr), MsrOutcome::Done(0), "{msr:#x}");
        }
        assert_eq!(msrs.read(0xC001_0008), MsrOutcome::Refused);
    }

    #[test]
    fn unknown_msrs_are_refused_and_backend_ones_are_sent_there() {
        let mut msrs = state();
        for msr in [0x48, 0x179, 0xC000_0104, 0x4000_0000, 0x900] {
            assert_eq!(msrs.read(msr), MsrOutcome::Refused, "{msr:#x}");
            assert_eq!(msrs.write(msr, 0), MsrOutcome::Refused, "{msr:#x}");
        }
        for msr in BACKEND_HELD {
            assert_eq!(msrs.read(msr), MsrOutcome::Backend);
            assert_eq!(msrs.write(msr, 1), MsrOutcome::Backend);
        }
        assert_eq!(msrs, state(), "nothing changed");
    }

    #[test]
    fn the_apic_base_starts_enabled_at_its_address_with_bsp_on_vcpu_0_only() {
        assert_eq!(state().read(index::APIC_BASE), MsrOutcome::Done(0xFEE0_0900));
        assert_eq!(
            MsrState::new(1, 39).read(index::APIC_BASE),
            MsrOutcome::Done(0xFEE0_0800)
        );
    }

    /// SDM Vol. 3A, 11.12.5, figure 11-27: the valid transitions between disabled, xAPIC and
    /// x2APIC, and the invalid state (x2APIC set, enable clear).
    #[test]
    fn apic_mode_transitions_follow_the_sdm() {
        let base = APIC_DEFAULT_BASE | APIC_BSP;
        let (disabled, xapic, x2apic) = (base, base | APIC_ENABLED, base | APIC_ENABLED | APIC_X2APIC);
        let mut msrs = state();
        assert_eq!(
            msrs.write(index::APIC_BASE, base | APIC_X2APIC),
            MsrOutcome::Refused
        );
        assert_eq!(msrs.write(index::APIC_BASE, x2apic), MsrOutcome::Done(0));
        assert!(msrs.x2apic());
        assert_eq!(
            msrs.write(index::APIC_BASE, xapic),
            MsrOutcome::Refused,
            "x2APIC to xAPIC"
        );
        assert_eq!(msrs.write(index::APIC_BASE, disabled), MsrOutcome::Done(0));
        assert_eq!(
            msrs.write(index::APIC_BASE, x2apic),
            MsrOutcome::Refused,
            "disabled to x2APIC (kvm-unit-tests' apic test checks it)"
        );
        assert_eq!(msrs.write(index::APIC_BASE, xapic), MsrOutcome::Done(0));
        assert!(!msrs.x2apic());
    }

    #[test]
    fn apic_base_writes_with_reserved_bits_a_new_base_or_a_bsp_change_are_refused() {
        let mut msrs = state();
        let now = 0xFEE0_0900;
        for bad in [
            now | 1,
            now | (1 << 9),
            now | (1 << 39),
            0xFED0_0900,
            now & !APIC_BSP,
        ] {
            assert_eq!(msrs.write(index::APIC_BASE, bad), MsrOutcome::Refused, "{bad:#x}");
        }
        assert_eq!(msrs.read(index::APIC_BASE), MsrOutcome::Done(now));
    }

    #[test]
    fn pat_and_mtrrs_hold_valid_values_and_refuse_undefined_types() {
        let mut msrs = state();
        assert_eq!(msrs.read(index::PAT), MsrOutcome::Done(PAT_RESET));
        assert_eq!(msrs.write(index::PAT, 0x0606_0606_0606_0606), MsrOutcome::Done(0));
        assert_eq!(
            msrs.write(index::PAT, 0x0606_0606_0606_0602),
            MsrOutcome::Refused,
            "type 2"
        );
        assert_eq!(msrs.read(index::PAT), MsrOutcome::Done(0x0606_0606_0606_0606));
        assert_eq!(msrs.write(index::MTRR_DEF_TYPE, 0xC06), MsrOutcome::Done(0));
        assert_eq!(msrs.write(index::MTRR_DEF_TYPE, 0x1006), MsrOutcome::Refused);
        assert_eq!(msrs.write(0x200, 0x8000_0006), MsrOutcome::Done(0));
        assert_eq!(msrs.write(0x201, 0x7F_8000_0800), MsrOutcome::Done(0));
        assert_eq!(msrs.write(0x201, 1 << 40), MsrOutcome::Refused, "above 39 bits");
        assert_eq!(
            msrs.write(0x200, 0x8000_0007),
            MsrOutcome::Refused,
            "UC- is PAT-only"
        );
        assert_eq!(msrs.read(0x201), MsrOutcome::Done(0x7F_8000_0800));
        assert_eq!(msrs.write(0x26F, 0x0606_0606_0606_0606), MsrOutcome::Done(0));
        assert_eq!(msrs.read(0x26F), MsrOutcome::Done(0x0606_0606_0606_0606));
        assert_eq!(msrs.read(index::MTRR_CAP), MsrOutcome::Done(MTRR_CAPABILITIES));
        assert_eq!(msrs.write(index::MTRR_CAP, 0), MsrOutcome::Refused, "read-only");
    }

    #[test]
    fn misc_enable_feature_control_and_the_tsc() {
        let mut msrs = state();
        assert_eq!(msrs.read(index::FEATURE_CONTROL), MsrOutcome::Done(1));
        assert_eq!(
            msrs.write(index::FEATURE_CONTROL, 5),
            MsrOutcome::Refused,
            "locked"
        );
        assert_eq!(
            msrs.write(index::MISC_ENABLE, MISC_ENABLE_RESET & !1),
            MsrOutcome::Done(0)
        );
        assert_eq!(
            msrs.write(index::MISC_ENABLE, MISC_ENABLE_RESET | (1 << 18)),
            MsrOutcome::Refused
        );
        assert_eq!(msrs.read(index::TSC), MsrOutcome::Backend);
        assert_eq!(msrs.write(index::TSC, 0), MsrOutcome::Backend);
        for msr in [index::TSC_DEADLINE, 0x802, 0x830, 0x8FF] {
            assert_eq!(msrs.write(msr, 99), MsrOutcome::Apic);
            assert_eq!(msrs.read(msr), MsrOutcome::Apic);
        }
        assert_eq!(msrs.write(index::BIOS_SIGN_ID, 0), MsrOutcome::Done(0));
    }

    #[test]
    fn the_physical_width_comes_from_the_extended_leaf() {
        let leaf = CpuidRegs {
            eax: 0x3027,
            ..CpuidRegs::default()
        };
        assert_eq!(phys_bits(leaf, 0x8000_0008), 39);
        assert_eq!(phys_bits(leaf, 0x8000_0004), 36);
    }
}
