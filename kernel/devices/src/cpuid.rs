//! The CPUID a guest sees: the host's values, filtered to what this hypervisor gives a guest.
//! Features the guest could not use safely or that nothing here emulates are hidden (VMX,
//! SVM, MONITOR/MWAIT, XSAVE and AVX until XSETBV is handled, INVPCID whose VMX control is
//! off, RDTSCP and RDPID where the backend cannot run them, machine checks, performance monitoring, the speculation-control MSRs);
//! the hypervisor bit is set with a signature at leaf 0x4000_0000; x2APIC and the TSC-deadline
//! timer are offered; each vCPU gets its own APIC ID (leaves 1 and 0xB); and the TSC frequency
//! is published (leaves 0x15, 0x16 and 0x4000_0010) so that a guest need not calibrate.
//! kernel/README.md's CPUID table lists every leaf.

/// One CPUID answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidRegs {
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

/// The signature at leaf 0x4000_0000 (EBX, ECX, EDX).
pub const SIGNATURE: &[u8; 12] = b"PgmRustHyper";
/// The highest hypervisor leaf.
pub const HYPERVISOR_MAX: u32 = 0x4000_0010;
/// The lowest basic leaf range this policy answers up to (leaves 0x15 and 0x16 publish the
/// TSC frequency even where the host stops below them).
const MIN_BASIC_MAX: u32 = 0x16;
/// The highest extended leaf given.
const EXTENDED_MAX: u32 = 0x8000_0008;

/// Leaf 1 ECX bits.
mod leaf1_ecx {
    pub const DTES64: u32 = 1 << 2;
    pub const MONITOR: u32 = 1 << 3;
    pub const DS_CPL: u32 = 1 << 4;
    pub const VMX: u32 = 1 << 5;
    pub const SMX: u32 = 1 << 6;
    pub const EST: u32 = 1 << 7;
    pub const TM2: u32 = 1 << 8;
    pub const SDBG: u32 = 1 << 11;
    pub const FMA: u32 = 1 << 12;
    pub const XTPR: u32 = 1 << 14;
    pub const PDCM: u32 = 1 << 15;
    pub const DCA: u32 = 1 << 18;
    pub const X2APIC: u32 = 1 << 21;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const XSAVE: u32 = 1 << 26;
    pub const OSXSAVE: u32 = 1 << 27;
    pub const AVX: u32 = 1 << 28;
    pub const F16C: u32 = 1 << 29;
    pub const HYPERVISOR: u32 = 1 << 31;
}

/// Leaf 1 EDX bits.
mod leaf1_edx {
    pub const MCE: u32 = 1 << 7;
    pub const APIC: u32 = 1 << 9;
    pub const MCA: u32 = 1 << 14;
    pub const DS: u32 = 1 << 21;
    pub const ACPI: u32 = 1 << 22;
    pub const HTT: u32 = 1 << 28;
    pub const TM: u32 = 1 << 29;
    pub const PBE: u32 = 1 << 31;
}

/// Leaf 7 subleaf 0: the EBX bits kept (FSGSBASE, TSC_ADJUST (the backend emulates the
/// MSR), BMI1, SMEP, BMI2, ERMS, SMAP, ADX, CLFLUSHOPT, CLWB, SHA and the other plain
/// instructions; not SGX, TSX, INVPCID, AVX2, AVX-512, MPX, resource monitoring or processor
/// trace). With TSC_ADJUST beside the invariant TSC, Linux trusts the TSC without checking
/// it against a slower clock (`check_system_tsc_reliable`), as on hardware.
const LEAF7_EBX_KEPT: u32 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 7)
    | (1 << 8)
    | (1 << 9)
    | (1 << 13)
    | (1 << 18)
    | (1 << 19)
    | (1 << 20)
    | (1 << 23)
    | (1 << 24)
    | (1 << 29);
/// ECX kept: PREFETCHWT1, UMIP, PKU, LA57 (not PKS, whose IA32_PKRS no backend switches,
/// WAITPKG, SGX launch control or the AVX-512 extensions); RDPID only with RDTSCP. OSPKE
/// (bit 4) follows the guest's CR4.PKE.
const LEAF7_ECX_KEPT: u32 = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 16);
const LEAF7_ECX_RDPID: u32 = 1 << 22;
const LEAF7_ECX_OSPKE: u32 = 1 << 4;
/// EDX kept: fast short REP MOV, MD_CLEAR, SERIALIZE (not the speculation-control MSRs or
/// IA32_ARCH_CAPABILITIES, which nothing here emulates).
const LEAF7_EDX_KEPT: u32 = (1 << 4) | (1 << 10) | (1 << 14);
/// Extended leaf 0x8000_0001: ECX SVM (bit 2) hidden; EDX RDTSCP (bit 27) hidden.
const EXT1_ECX_SVM: u32 = 1 << 2;
const EXT1_EDX_RDTSCP: u32 = 1 << 27;
/// Extended leaf 0x8000_0007 EDX: the invariant TSC (bit 8), the only bit kept.
const EXT7_EDX_INVARIANT_TSC: u32 = 1 << 8;
/// CR4.OSXSAVE and CR4.PKE, which CPUID reflects.
const CR4_OSXSAVE: u64 = 1 << 18;
const CR4_PKE: u64 = 1 << 22;

/// The guest's CPUID, fixed when the VM is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidPolicy {
    /// vCPUs in the VM.
    pub vcpus: u32,
    /// The guest's TSC frequency in Hz.
    pub tsc_hz: u64,
    /// The local APIC timer's input clock in Hz (before its divider).
    pub apic_timer_hz: u64,
    /// The backend lets a guest run RDTSCP and RDPID (else both are hidden: they would #UD).
    pub rdtscp: bool,
    /// The vendor string leaf 0 reports instead of the host's (QEMU's `-cpu …,vendor=`), for
    /// a guest that takes another vendor's paths.
    pub vendor: Option<[u8; 12]>,
}

/// The state of the asking vCPU that CPUID reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AskingVcpu {
    /// Its (x2)APIC ID.
    pub apic_id: u32,
    /// Its CR4.
    pub cr4: u64,
    /// Its local APIC is enabled in the APIC base MSR (CPUID.1:EDX.APIC follows it).
    pub apic_enabled: bool,
}

impl CpuidPolicy {
    /// The answer to CPUID leaf `leaf` (EAX), subleaf `subleaf` (ECX), asked by `vcpu`;
    /// `host` gives the host's answer to any leaf.
    pub fn answer(
        &self,
        leaf: u32,
        subleaf: u32,
        vcpu: AskingVcpu,
        host: &dyn Fn(u32, u32) -> CpuidRegs,
    ) -> CpuidRegs {
        let host_basic_max = host(0, 0).eax;
        let basic_max = host_basic_max.clamp(MIN_BASIC_MAX, 0x1F);
        let zero = CpuidRegs::default();
        match leaf {
            0 => {
                let mut regs = CpuidRegs {
                    eax: basic_max,
                    ..host(0, 0)
                };
                if let Some(vendor) = self.vendor {
                    let word = |at: usize| {
                        u32::from_le_bytes([vendor[at], vendor[at + 1], vendor[at + 2], vendor[at + 3]])
                    };
                    (regs.ebx, regs.edx, regs.ecx) = (word(0), word(4), word(8));
                }
                regs
            }
            1 => self.leaf1(host(1, 0), vcpu),
            2 if leaf <= host_basic_max => host(2, 0),
            4 if leaf <= host_basic_max => {
                let mut regs = host(4, subleaf);
                // Cores per package - 1 in bits 31:26; every cache private to its core.
                regs.eax = (regs.eax & 0x3FFF) | ((self.vcpus.clamp(1, 64) - 1) << 26);
                regs
            }
            7 if subleaf == 0 && leaf <= host_basic_max => {
                let regs = host(7, 0);
                let ospke = if vcpu.cr4 & CR4_PKE != 0 && regs.ecx & (1 << 3) != 0 {
                    LEAF7_ECX_OSPKE
                } else {
                    0
                };
                let rdpid = if self.rdtscp { LEAF7_ECX_RDPID } else { 0 };
                CpuidRegs {
                    eax: 0,
                    ebx: regs.ebx & LEAF7_EBX_KEPT,
                    ecx: (regs.ecx & (LEAF7_ECX_KEPT | rdpid)) | ospke,
                    edx: regs.edx & LEAF7_EDX_KEPT,
                }
            }
            0xB => self.topology(subleaf, vcpu.apic_id),
            0x15 => CpuidRegs {
                eax: 1,
                ebx: 1,
                ecx: self.tsc_hz.min(u64::from(u32::MAX)) as u32,
                edx: 0,
            },
            0x16 => {
                let mhz = (self.tsc_hz / 1_000_000).min(0xFFFF) as u32;
                CpuidRegs {
                    eax: mhz,
                    ebx: mhz,
                    ecx: (self.apic_timer_hz / 1_000_000).min(0xFFFF) as u32,
                    edx: 0,
                }
            }
            0x4000_0000 => {
                let word = |i: usize| {
                    u32::from_le_bytes([SIGNATURE[i], SIGNATURE[i + 1], SIGNATURE[i + 2], SIGNATURE[i + 3]])
                };
                CpuidRegs {
                    eax: HYPERVISOR_MAX,
                    ebx: word(0),
                    ecx: word(4),
                    edx: word(8),
                }
            }
            HYPERVISOR_MAX => CpuidRegs {
                eax: (self.tsc_hz / 1000).min(u64::from(u32::MAX)) as u32,
                ebx: (self.apic_timer_hz / 1000).min(u64::from(u32::MAX)) as u32,
                ..zero
            },
            0x8000_0000 => CpuidRegs {
                eax: host(0x8000_0000, 0).eax.min(EXTENDED_MAX),
                ..zero
            },
            0x8000_0001..=EXTENDED_MAX if leaf <= host(0x8000_0000, 0).eax => self.extended(leaf, host),
            _ => zero,
        }
    }

    fn leaf1(&self, host: CpuidRegs, vcpu: AskingVcpu) -> CpuidRegs {
        use leaf1_ecx::*;
        use leaf1_edx::*;
        let hidden_ecx = DTES64
            | MONITOR
            | DS_CPL
            | VMX
            | SMX
            | EST
            | TM2
            | SDBG
            | FMA
            | XTPR
            | PDCM
            | DCA
            | XSAVE
            | OSXSAVE
            | AVX
            | F16C;
        let mut ecx = (host.ecx & !hidden_ecx) | X2APIC | TSC_DEADLINE | HYPERVISOR;
        // OSXSAVE mirrors CR4.OSXSAVE, but XSAVE is hidden: a guest cannot set it.
        if vcpu.cr4 & CR4_OSXSAVE != 0 && host.ecx & XSAVE != 0 && ecx & XSAVE != 0 {
            ecx |= OSXSAVE;
        }
        let mut edx = host.edx & !(MCE | MCA | DS | ACPI | TM | PBE | HTT | APIC);
        if vcpu.apic_enabled {
            edx |= APIC;
        }
        if self.vcpus > 1 {
            edx |= HTT;
        }
        let logical = self.vcpus.clamp(1, 255);
        CpuidRegs {
            eax: host.eax,
            ebx: (host.ebx & 0xFFFF) | (logical << 16) | ((vcpu.apic_id & 0xFF) << 24),
            ecx,
            edx,
        }
    }

    /// Leaf 0xB: one thread per core (SMT level) and `vcpus` cores in the package.
    fn topology(&self, subleaf: u32, apic_id: u32) -> CpuidRegs {
        let core_bits = self.vcpus.max(1).next_power_of_two().trailing_zeros();
        match subleaf {
            0 => CpuidRegs {
                eax: 0,
                ebx: 1,
                ecx: 1 << 8,
                edx: apic_id,
            },
            1 => CpuidRegs {
                eax: core_bits,
                ebx: self.vcpus,
                ecx: (2 << 8) | 1,
                edx: apic_id,
            },
            _ => CpuidRegs {
                eax: 0,
                ebx: 0,
                ecx: subleaf & 0xFF,
                edx: apic_id,
            },
        }
    }

    fn extended(&self, leaf: u32, host: &dyn Fn(u32, u32) -> CpuidRegs) -> CpuidRegs {
        let regs = host(leaf, 0);
        match leaf {
            0x8000_0001 => CpuidRegs {
                ecx: regs.ecx & !EXT1_ECX_SVM,
                edx: if self.rdtscp {
                    regs.edx
                } else {
                    regs.edx & !EXT1_EDX_RDTSCP
                },
                ..regs
            },
            0x8000_0007 => CpuidRegs {
                edx: regs.edx & EXT7_EDX_INVARIANT_TSC,
                ..CpuidRegs::default()
            },
            0x8000_0008 => CpuidRegs {
                eax: regs.eax & 0xFFFF,
                ..CpuidRegs::default()
            },
            _ => regs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with every feature bit set and maximum leaves 0xD and 0x8000_0008.
    fn host(leaf: u32, subleaf: u32) -> CpuidRegs {
        match leaf {
            0 => CpuidRegs {
                eax: 0xD,
                ebx: u32::from_le_bytes(*b"Genu"),
                ecx: u32::from_le_bytes(*b"ntel"),
                edx: u32::from_le_bytes(*b"ineI"),
            },
            0x8000_0000 => CpuidRegs {
                eax: 0x8000_0008,
                ..CpuidRegs::default()
            },
            1 => CpuidRegs {
                eax: 0x50654,
                ebx: 0x0010_0800,
                ecx: u32::MAX,
                edx: u32::MAX,
            },
            4 => CpuidRegs {
                eax: 0xFC00_4121 + subleaf,
                ebx: 1,
                ecx: 2,
                edx: 3,
            },
            _ => CpuidRegs {
                eax: u32::MAX,
                ebx: u32::MAX,
                ecx: u32::MAX,
                edx: u32::MAX,
            },
        }
    }

    const POLICY: CpuidPolicy = CpuidPolicy {
        vcpus: 2,
        tsc_hz: 2_100_000_000,
        apic_timer_hz: 1_000_000_000,
        rdtscp: false,
        vendor: None,
    };

    fn ask(leaf: u32, subleaf: u32, apic_id: u32) -> CpuidRegs {
        let asking = AskingVcpu {
            apic_id,
            cr4: 0,
            apic_enabled: true,
        };
        POLICY.answer(leaf, subleaf, asking, &host)
    }

    #[test]
    fn leaf_1_hides_vmx_and_offers_x2apic_tsc_deadline_and_the_hypervisor_bit() {
        let regs = ask(1, 0, 1);
        assert_eq!(regs.ecx & leaf1_ecx::VMX, 0);
        assert_eq!(regs.ecx & leaf1_ecx::MONITOR, 0);
        assert_eq!(regs.ecx & leaf1_ecx::XSAVE, 0);
        assert_ne!(regs.ecx & leaf1_ecx::X2APIC, 0);
        assert_ne!(regs.ecx & leaf1_ecx::TSC_DEADLINE, 0);
        assert_ne!(regs.ecx & leaf1_ecx::HYPERVISOR, 0);
        assert_eq!(regs.eax, 0x50654, "family, model and stepping are the host's");
        assert_eq!(regs.ebx >> 24, 1, "the asking vCPU's APIC ID");
        assert_eq!((regs.ebx >> 16) & 0xFF, 2, "logical processors");
        assert_ne!(regs.edx & leaf1_edx::HTT, 0);
        assert_eq!(regs.edx & (leaf1_edx::MCE | leaf1_edx::MCA), 0);
        assert_ne!(regs.edx & leaf1_edx::APIC, 0);
        let disabled = AskingVcpu::default();
        assert_eq!(
            POLICY.answer(1, 0, disabled, &host).edx & leaf1_edx::APIC,
            0,
            "APIC disabled"
        );
    }

    #[test]
    fn the_hypervisor_leaves_give_the_signature_and_the_tsc_frequency() {
        let regs = ask(0x4000_0000, 0, 0);
        assert_eq!(regs.eax, HYPERVISOR_MAX);
        let mut signature = [0u8; 12];
        signature[..4].copy_from_slice(&regs.ebx.to_le_bytes());
        signature[4..8].copy_from_slice(&regs.ecx.to_le_bytes());
        signature[8..].copy_from_slice(&regs.edx.to_le_bytes());
        assert_eq!(&signature, SIGNATURE);
        assert_eq!(ask(HYPERVISOR_MAX, 0, 0).eax, 2_100_000);
        assert_eq!(ask(HYPERVISOR_MAX, 0, 0).ebx, 1_000_000);
    }

    #[test]
    fn leaves_0x15_and_0x16_publish_the_tsc_even_above_the_hosts_maximum() {
        assert_eq!(ask(0, 0, 0).eax, MIN_BASIC_MAX);
        assert_eq!(ask(0, 0, 0).ebx, u32::from_le_bytes(*b"Genu"));
        let crystal = ask(0x15, 0, 0);
        assert_eq!(
            u64::from(crystal.ecx) * u64::from(crystal.ebx) / u64::from(crystal.eax),
            POLICY.tsc_hz
        );
        assert_eq!(ask(0x16, 0, 0).eax, 2100);
        assert_eq!(
            ask(0xE, 0, 0),
            CpuidRegs::default(),
            "a leaf above the host's maximum"
        );
    }

    #[test]
    fn leaf_0xb_describes_each_vcpu_as_a_core_of_one_package() {
        let smt = ask(0xB, 0, 1);
        assert_eq!((smt.ebx, smt.ecx >> 8, smt.edx), (1, 1, 1));
        let core = ask(0xB, 1, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (1, 2, 0x201, 1));
        let end = ask(0xB, 2, 0);
        assert_eq!((end.ebx, end.ecx >> 8, end.ecx & 0xFF), (0, 0, 2));
    }

    #[test]
    fn leaf_7_keeps_plain_instructions_and_hides_what_needs_emulating() {
        let regs = ask(7, 0, 0);
        assert_eq!(regs.eax, 0, "no subleaves beyond 0");
        assert_ne!(regs.ebx & (1 << 7), 0, "SMEP");
        assert_eq!(regs.ebx & (1 << 10), 0, "INVPCID");
        assert_eq!(regs.ebx & (1 << 2), 0, "SGX");
        assert_ne!(regs.ebx & (1 << 1), 0, "TSC_ADJUST: the backend holds the MSR");
        assert_eq!(regs.edx & (1 << 29), 0, "IA32_ARCH_CAPABILITIES");
        assert_eq!(regs.ecx & LEAF7_ECX_OSPKE, 0, "CR4.PKE is clear");
        assert_eq!(regs.ecx & (1 << 31), 0, "PKS: IA32_PKRS is not switched");
        assert_ne!(regs.ecx & (1 << 16), 0, "LA57: the guest walker has 5 levels");
        let pke = AskingVcpu {
            cr4: CR4_PKE,
            ..AskingVcpu::default()
        };
        let with_pke = POLICY.answer(7, 0, pke, &host);
        assert_ne!(with_pke.ecx & LEAF7_ECX_OSPKE, 0);
        assert_eq!(ask(7, 1, 0), CpuidRegs::default());
    }

    #[test]
    fn the_extended_leaves_hide_svm_and_rdtscp_and_stop_at_0x8000_0008() {
        assert_eq!(ask(0x8000_0000, 0, 0).eax, EXTENDED_MAX);
        let ext1 = ask(0x8000_0001, 0, 0);
        assert_eq!(ext1.ecx & EXT1_ECX_SVM, 0);
        assert_eq!(ext1.edx & EXT1_EDX_RDTSCP, 0);
        assert_eq!(ask(7, 0, 0).ecx & LEAF7_ECX_RDPID, 0, "RDPID goes with RDTSCP");
        let with = CpuidPolicy {
            rdtscp: true,
            ..POLICY
        };
        let asking = AskingVcpu::default();
        assert_ne!(
            with.answer(0x8000_0001, 0, asking, &host).edx & EXT1_EDX_RDTSCP,
            0
        );
        assert_ne!(with.answer(7, 0, asking, &host).ecx & LEAF7_ECX_RDPID, 0);
        assert_eq!(ask(0x8000_0007, 0, 0).edx, EXT7_EDX_INVARIANT_TSC);
        assert_eq!(ask(0x8000_0008, 0, 0).eax, 0xFFFF);
        assert_eq!(ask(0x8000_000A, 0, 0), CpuidRegs::default(), "SVM's leaf");
    }

    #[test]
    fn leaf_4_reports_the_vcpu_count_as_cores() {
        assert_eq!(ask(4, 1, 0).eax >> 26, 1);
        assert_eq!(ask(4, 1, 0).eax & 0x3FFF, 0x0122);
    }

    #[test]
    fn a_vendor_string_replaces_the_hosts_in_leaf_0_and_nothing_else() {
        let amd = CpuidPolicy {
            vendor: Some(*b"AuthenticAMD"),
            ..POLICY
        };
        let asking = AskingVcpu::default();
        let leaf0 = amd.answer(0, 0, asking, &host);
        let text: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        assert_eq!(text, b"AuthenticAMD");
        assert_eq!(leaf0.eax, ask(0, 0, 0).eax);
        assert_eq!(
            amd.answer(1, 0, asking, &host),
            POLICY.answer(1, 0, asking, &host)
        );
    }
}
