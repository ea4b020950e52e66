//! What the kernel tests check in a backend's own terms (its exit numbers, how it describes a
//! nested-paging fault, its capability report): one set of names with an implementation per
//! backend, so every test that uses them runs on both.

use alloc::format;
use alloc::string::String;

use pgm::paging::Permissions;

use crate::{println, Host};

#[cfg(not(feature = "svm"))]
mod facts {
    use super::*;
    use crate::arch::vmx::exits::{exit_reason, qualification};
    use crate::arch::vmx::VmxCaps;

    /// The exit reasons the tests name.
    pub const NESTED_FAULT: u32 = exit_reason::EPT_VIOLATION;
    /// See [`NESTED_FAULT`].
    pub const SHUTDOWN: u32 = exit_reason::TRIPLE_FAULT;
    /// See [`NESTED_FAULT`].
    pub const INVD: u32 = exit_reason::INVD;
    /// See [`NESTED_FAULT`].
    pub const RUN_TIMER: u32 = exit_reason::PREEMPTION_TIMER;
    /// How late a run may end after its deadline: the exit that notices it and the way back
    /// out (Bochs: one tick per instruction).
    pub const RUN_LATENESS: u64 = 20_000;
    /// The same for a guest of random bytes, whatever its code does.
    pub const RANDOM_CODE_LATENESS: u64 = RUN_LATENESS;
    /// What the tests' tick budgets, slices and timer delays (set for Bochs) are multiplied
    /// by on this backend.
    pub const TICK_SCALE: u64 = 1;
    /// The run timer is the VMX-preemption timer, not the host's local APIC timer.
    pub const RUN_TIMER_IS_THE_HOSTS: bool = false;

    /// Kernel tests this backend skips, with the reason.
    pub fn skipped(name: &str) -> Option<&'static str> {
        match name {
            "an_exit_carrying_the_hosts_own_state_stops_the_vm" => {
                Some("VM exits save the guest's state in the VMCS, apart from the host's")
            }
            _ => None,
        }
    }

    /// The RIP an exit would carry if it saved the host's state as the guest's: none on VMX.
    pub fn host_resume_address() -> Option<u64> {
        None
    }

    /// What the translation allowed, as a nested fault's detail (the exit qualification,
    /// bits 3..=5) reports it.
    pub fn permitted(detail: u64) -> Permissions {
        Permissions::from_bits_truncate(((detail >> 3) & 0b111) as u8)
    }

    /// The fault was a write.
    pub fn is_write(detail: u64) -> bool {
        detail & qualification::EPT_WRITE != 0
    }

    /// The fault was a read of a page nothing was mapped at.
    pub fn is_read_of_nothing(detail: u64) -> bool {
        detail & 0b11_1111 == qualification::EPT_READ
    }

    /// The capabilities as probed again, their report, and whether the report names what the
    /// kernel relies on.
    pub fn capabilities(host: &'static Host) -> Result<(), String> {
        let vmx = host.virt().map_err(|e| format!("{e}"))?;
        let again = VmxCaps::probe().map_err(|e| format!("{e}"))?;
        ensure!(vmx.caps().revision != 0, "VMCS revision identifier is 0");
        ensure_eq!(again.revision, vmx.caps().revision, "revision on a second probe");
        let report = format!("{}", vmx.caps());
        println!("  {report}");
        ensure!(
            report.contains("EPT 4-level WB yes"),
            "report lacks EPT: {report}"
        );
        let cr4 = x86_64::registers::control::Cr4::read_raw();
        ensure!(cr4 & (1 << 13) != 0, "CR4.VMXE is clear while VMX is on");
        Ok(())
    }
}

#[cfg(feature = "svm")]
mod facts {
    use super::*;
    use crate::arch::svm::SvmCaps;

    /// The exit codes the tests name.
    pub const NESTED_FAULT: u32 = 0x400;
    /// See [`NESTED_FAULT`].
    pub const SHUTDOWN: u32 = 0x7F;
    /// See [`NESTED_FAULT`].
    pub const INVD: u32 = 0x76;
    /// See [`NESTED_FAULT`]: the run timer is the local APIC's, so its exit is INTR.
    pub const RUN_TIMER: u32 = 0x60;
    /// How late a run may end after its deadline: the host's local APIC timer reaches a vCPU
    /// typically 0.1–1 ms late in QEMU's TCG, and now and then a few milliseconds (its timers
    /// run on the host's clock and reach the vCPU thread between translation blocks; its TSC
    /// counts 2.1·10⁹ a second here): ten milliseconds.
    pub const RUN_LATENESS: u64 = 20_000_000;
    /// The same for a guest of random bytes: one that writes over the code it runs keeps
    /// QEMU's TCG retranslating, and the timer's interrupt waits for that (up to 0.15 s
    /// seen): 0.3 s.
    pub const RANDOM_CODE_LATENESS: u64 = 600_000_000;
    /// What the tests' tick budgets, slices and timer delays (set for Bochs, whose TSC counts
    /// about one instruction a tick) are multiplied by on this backend: in QEMU's TCG the TSC
    /// follows the host's clock at 2.1·10⁹ a second, so the Bochs values are a tenth of a
    /// millisecond, below the run timer's lateness, and short of the time the hypervisor's
    /// own work takes there.
    pub const TICK_SCALE: u64 = 200;
    /// The run timer is the host's local APIC timer: each preemption is a host timer interrupt.
    pub const RUN_TIMER_IS_THE_HOSTS: bool = true;

    /// Kernel tests this backend skips, with the reason.
    pub fn skipped(name: &str) -> Option<&'static str> {
        match name {
            "dirty_log_pml_harvests_equal_write_protect_harvests" => {
                Some("PML is VT-x's: SVM has no CPU write log (pgm refuses PML mode on NPT)")
            }
            "unhandled_exit_stops_the_vm_with_a_diagnostic" if under_qemu_tcg() => {
                Some("QEMU 7.2's TCG checks the WBINVD intercept for INVD, so INVD never exits there")
            }
            _ => None,
        }
    }

    /// The RIP an exit carries when it saved the host's state as the guest's: the instruction
    /// after the entry's VMRUN.
    pub fn host_resume_address() -> Option<u64> {
        Some(crate::arch::svm::host_resume_address())
    }

    /// True under QEMU's TCG (CPUID leaf 4000_0000h says "TCGTCGTCGTCG").
    fn under_qemu_tcg() -> bool {
        let leaf = x86::cpuid::cpuid!(0x4000_0000);
        [leaf.ebx, leaf.ecx, leaf.edx] == [0x5447_4354, 0x4354_4743, 0x4743_5447]
    }

    /// EXITINFO1 bits: the translation was present; the access was a write, a fetch.
    const PRESENT: u64 = 1 << 0;
    const WRITE: u64 = 1 << 1;
    const FETCH: u64 = 1 << 4;

    /// What the translation allowed, as far as a nested page fault's EXITINFO1 tells: only
    /// whether a translation was present, which (pgm maps no page execute-only or no-execute)
    /// allowed reads and fetches.
    pub fn permitted(detail: u64) -> Permissions {
        if detail & PRESENT != 0 {
            Permissions::READ | Permissions::EXECUTE
        } else {
            Permissions::empty()
        }
    }

    /// The fault was a write.
    pub fn is_write(detail: u64) -> bool {
        detail & WRITE != 0
    }

    /// The fault was a read of a page nothing was mapped at.
    pub fn is_read_of_nothing(detail: u64) -> bool {
        detail & (PRESENT | WRITE | FETCH) == 0
    }

    /// The capabilities as probed again, their report, and whether the report names what the
    /// kernel relies on.
    pub fn capabilities(host: &'static Host) -> Result<(), String> {
        let svm = host.virt().map_err(|e| format!("{e}"))?;
        let again = SvmCaps::probe().map_err(|e| format!("{e}"))?;
        ensure!(svm.caps().asids > 1, "fewer than two ASIDs");
        ensure_eq!(again.revision, svm.caps().revision, "revision on a second probe");
        let report = format!("{}", svm.caps());
        println!("  {report}");
        ensure!(report.contains("nested paging yes"), "report lacks NPT: {report}");
        // SAFETY: reading EFER has no side effect.
        let efer = unsafe { x86::msr::rdmsr(0xC000_0080) };
        ensure!(efer & (1 << 12) != 0, "EFER.SVME is clear while SVM is on");
        Ok(())
    }
}

pub use facts::*;
