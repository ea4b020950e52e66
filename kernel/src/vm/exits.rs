//! What each vCPU counts and measures of its exits (the encodings are the backend's: see
//! `arch::vmx::exits`).

use spin::Mutex;

use crate::println;

/// Exit counts of one VM, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Every VM exit.
    pub total: u64,
    /// EPT violations.
    pub ept_violations: u64,
    /// VMCALLs.
    pub hypercalls: u64,
    /// INVEPTs executed.
    pub invepts: u64,
    /// Instructions emulated (MMIO, handler and ROM accesses).
    pub emulated: u64,
    /// VMX-preemption timer exits.
    pub preemption_timer: u64,
    /// Host interrupts that made the guest exit (kicks, host timers).
    pub external_interrupts: u64,
    /// NMIs that made the guest exit (handed to the host).
    pub nmis: u64,
    /// PAUSE-loop exits (the guest yielded its slice).
    pub pause_loops: u64,
    /// MONITOR and MWAIT exits (both are no-ops for the guest).
    pub monitor_mwait: u64,
    /// Port I/O through the VM's port bus.
    pub port_io: u64,
    /// CPUID exits.
    pub cpuid: u64,
    /// RDMSR and WRMSR exits.
    pub msr: u64,
    /// MOV to or from CR8 (the APIC's task priority).
    pub tpr: u64,
    /// Events injected into the guest (#GP for a refused MSR, interrupts).
    pub injected: u64,
    /// HLT exits.
    pub halts: u64,
    /// Interrupt-window exits (an interrupt waited for the guest to enable them).
    pub interrupt_windows: u64,
    /// Page-modification-log-full exits.
    pub pml_full: u64,
    /// Emulated exits whose instruction fetch used the vCPU's remembered code translation
    /// instead of walking the guest's paging.
    pub code_fetches_without_walk: u64,
    /// Emulated exits whose instruction was decoded before at the same address, reused.
    pub decodes_reused: u64,
    /// MMIO exits on the same page as the last one, with no change of the memory manager in
    /// between, which skipped the page's lookup.
    pub mmio_lookups_reused: u64,
}

/// Entries of a vCPU's page-modification log (one 4 KiB frame of addresses).
pub const PML_ENTRIES: usize = 512;

/// The exits whose handling cost is measured, from VM exit to the next VM entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// A write to a ZERO page: a frame is given and mapped.
    ZeroFill,
    /// The first write to a write-monitored page, taken under the VM's lock (the lock-free path
    /// declined: e.g. the vCPU's written log was full): marked written and made writable.
    WriteMonitor,
    /// The same, resolved lock-free on the read side of the VM's lock.
    WriteMonitorLockFree,
    /// A read of an MMIO or handler page, emulated through the device.
    MmioRead,
    /// A write to an MMIO or handler page, emulated through the device.
    MmioWrite,
    /// A write to ROM that is dropped; the guest continues after the instruction.
    RomWriteIgnore,
    /// A write to ROM that goes to its shadow while reads still see the image.
    RomWriteShadow,
    /// A VMCALL.
    Hypercall,
    /// A preemption: from the timer's exit to the next entry of the same vCPU, less the time
    /// the caller spent between the two runs (it returned `Preempted` and ran it again).
    Preemption,
    /// The page-modification log is full: its 512 addresses go to the memory manager.
    PmlFull,
    /// CPUID, answered by the VM's policy.
    Cpuid,
    /// RDMSR or WRMSR (emulated, the backend's, or refused with #GP).
    Msr,
    /// IN or OUT through the VM's port bus.
    PortIo,
    /// A read or write of the xAPIC page, emulated to the vCPU's local APIC.
    ApicAccess,
    /// An interrupt waited for the guest to take interrupts: the interrupt-window exit, to
    /// the entry that delivers it.
    InterruptWindow,
    /// An access to guest-physical space nothing claims, emulated as a PC's open bus (reads
    /// all ones, writes dropped) in VMs that ask for it.
    Unassigned,
    /// An access to a page the guest gave to the balloon, emulated as the seed does (reads
    /// zeros, writes dropped).
    Ballooned,
}

impl ExitKind {
    /// Every kind, in table order.
    pub const ALL: [ExitKind; 17] = [
        ExitKind::ZeroFill,
        ExitKind::WriteMonitor,
        ExitKind::WriteMonitorLockFree,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::RomWriteIgnore,
        ExitKind::RomWriteShadow,
        ExitKind::Hypercall,
        ExitKind::Preemption,
        ExitKind::PmlFull,
        ExitKind::Cpuid,
        ExitKind::Msr,
        ExitKind::PortIo,
        ExitKind::ApicAccess,
        ExitKind::InterruptWindow,
        ExitKind::Unassigned,
        ExitKind::Ballooned,
    ];

    /// The table name.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::ZeroFill => "zero-fill",
            ExitKind::WriteMonitor => "write-monitor, locked",
            ExitKind::WriteMonitorLockFree => "write-monitor, lock-free",
            ExitKind::MmioRead => "MMIO read",
            ExitKind::MmioWrite => "MMIO write",
            ExitKind::RomWriteIgnore => "ROM write ignore",
            ExitKind::RomWriteShadow => "ROM write to shadow",
            ExitKind::Hypercall => "hypercall",
            ExitKind::Preemption => "preemption (exit, return, run, entry)",
            ExitKind::PmlFull => "PML full (512 addresses logged)",
            ExitKind::Cpuid => "CPUID",
            ExitKind::Msr => "RDMSR/WRMSR",
            ExitKind::PortIo => "port I/O",
            ExitKind::ApicAccess => "xAPIC access",
            ExitKind::InterruptWindow => "interrupt window (exit to injection)",
            ExitKind::Unassigned => "unassigned space (all ones)",
            ExitKind::Ballooned => "ballooned page (zeros, writes dropped)",
        }
    }
}

/// Count, sum and maximum of the handling cost of one kind of exit, in TSC ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCost {
    /// Exits measured.
    pub count: u64,
    /// Sum of their costs.
    pub total: u64,
    /// The largest cost.
    pub max: u64,
}

impl ExitCost {
    pub(super) const NONE: ExitCost = ExitCost {
        count: 0,
        total: 0,
        max: 0,
    };

    pub(super) fn add(&mut self, ticks: u64) {
        self.count += 1;
        self.total += ticks;
        self.max = self.max.max(ticks);
    }

    pub(super) fn merge(&mut self, other: &ExitCost) {
        self.count += other.count;
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The mean cost (0 when nothing was measured).
    pub fn mean(&self) -> u64 {
        self.total.checked_div(self.count).unwrap_or(0)
    }
}

/// Exit costs by [`ExitKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitCosts(pub(super) [ExitCost; ExitKind::ALL.len()]);

impl ExitCosts {
    pub(super) const NONE: ExitCosts = ExitCosts([ExitCost::NONE; ExitKind::ALL.len()]);

    /// The costs of `kind`.
    pub fn of(&self, kind: ExitKind) -> ExitCost {
        self.0[kind as usize]
    }

    /// Ticks spent handling every kind of exit.
    #[cfg_attr(feature = "kernel-tests", allow(dead_code))]
    pub fn total_ticks(&self) -> u64 {
        self.0.iter().map(|cost| cost.total).sum()
    }

    /// These costs and `other`'s together (one table for several vCPUs).
    #[cfg_attr(feature = "kernel-tests", allow(dead_code))]
    pub fn with(mut self, other: &ExitCosts) -> ExitCosts {
        self.merge(other);
        self
    }

    /// Prints the table (Markdown, as kernel/README.md shows it) under `title`.
    pub fn print(&self, title: &str) {
        println!("exit costs, {title} (TSC ticks from VM exit to the next VM entry):");
        println!("| exit kind | count | mean | max |");
        println!("|---|---:|---:|---:|");
        for kind in ExitKind::ALL {
            let cost = self.of(kind);
            println!(
                "| {} | {} | {} | {} |",
                kind.name(),
                cost.count,
                cost.mean(),
                cost.max
            );
        }
    }

    pub(super) fn merge(&mut self, other: &ExitCosts) {
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            mine.merge(theirs);
        }
    }
}

/// Exit costs and deadline overruns of every VM destroyed since boot: each VM measures its own
/// (no lock on the exit path) and adds them here when it is dropped, so a test run can print
/// one table.
pub(super) static FINISHED_VMS: Mutex<(ExitCosts, ExitCost)> = Mutex::new((ExitCosts::NONE, ExitCost::NONE));

/// The exit costs of every VM destroyed since boot.
pub fn exit_costs_of_finished_vms() -> ExitCosts {
    FINISHED_VMS.lock().0
}

/// How far past their deadline the runs of every VM destroyed since boot ended (see
/// [`Vcpu::overrun`](super::Vcpu::overrun)).
#[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
pub fn overrun_of_finished_vms() -> ExitCost {
    FINISHED_VMS.lock().1
}
