//! How a vCPU's run ends, and what the hypervisor says when it stops a VM.

use core::fmt;

use pgm::GuestPhysAddr;

/// Why a VM stopped without finishing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// The guest touched a guest-physical address outside its memory.
    NotGuestMemory,
    /// The guest needed a page and the host had no frame for it (or the VM's limit was reached).
    /// A pause, as the seed's VM_FF_PGM_NO_MEMORY: the guest's state is as before the access,
    /// and once frames are back (freed, or the limit raised) running the vCPU again retries it.
    OutOfMemory,
    /// The CPU's walk of the guest's page tables reached a page the guest had given to the
    /// balloon (instructions that touch such a page are emulated: reads see zeros, writes
    /// are dropped).
    BalloonedPage,
    /// The access needed the faulting instruction emulated (MMIO or handler access, ROM write
    /// to ignore or to route to the shadow) and the emulator does not support it; the
    /// diagnostic names the instruction bytes.
    UnsupportedInstruction,
    /// The guest fetched an instruction from a page whose accesses go to a handler (MMIO):
    /// there is no memory to execute.
    ExecuteFromHandledPage,
    /// The CPU's walk of the guest's own page tables reached a page with no memory behind it
    /// for that access (MMIO, a handler's page, a ROM page it had to set an A/D bit in): there is
    /// no instruction to emulate, and page walks are never handed to devices.
    PageWalkOutsideMemory,
    /// The instruction to emulate could not be fetched (its linear address has no mapping in
    /// the guest's page tables, or it lies outside guest RAM).
    InstructionFetch,
    /// The guest triple-faulted.
    TripleFault,
    /// An exit this hypervisor does not handle.
    UnhandledExit,
    /// VM entry failed (VMLAUNCH/VMRESUME error or invalid guest state).
    EntryFailed,
    /// The same page kept faulting after its fault was resolved.
    FaultLoop,
    /// The run took more exits than its budget allows ([`Budget::exits`]).
    ExitBudget,
    /// The VM used up its time limit ([`Budget::limit`]); the diagnostic's `ticks` says how
    /// much it ran.
    TimeBudget,
    /// The host's deadline for the work in progress passed ([`budget::set_host_deadline`]).
    HostDeadline,
    /// The vCPU was asked to run on a CPU other than the one its backend state lives on.
    WrongCpu,
    /// Another vCPU of the VM stopped it (its own diagnostic says why).
    VmStopped,
}

impl StopCause {
    /// True when the stop ends the whole VM, not only this vCPU's run: the guest did
    /// something the hypervisor cannot carry on from, so the VM's other vCPUs are stopped
    /// too. Budgets, the host deadline and a host mistake (the wrong CPU) end only the run.
    pub fn stops_vm(self) -> bool {
        !matches!(
            self,
            StopCause::ExitBudget
                | StopCause::TimeBudget
                | StopCause::HostDeadline
                | StopCause::WrongCpu
                | StopCause::VmStopped
        )
    }
}

/// What the hypervisor knew when it stopped a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// Why the VM stopped.
    pub cause: StopCause,
    /// The backend's exit reason (VMX: the basic exit reason, or the VM-instruction error for
    /// a failed VMLAUNCH/VMRESUME).
    pub exit_reason: u32,
    /// The backend's name for it.
    pub exit_name: &'static str,
    /// The exit qualification (VMX) or EXITINFO1 (SVM).
    pub qualification: u64,
    /// The guest-physical address of a nested-paging exit.
    pub gpa: Option<GuestPhysAddr>,
    /// The guest RIP at the exit.
    pub rip: u64,
    /// The bytes of the instruction the hypervisor tried to emulate (empty otherwise).
    pub instruction: InstructionBytes,
    /// TSC ticks the VM had run, over all its runs, when it was stopped.
    pub ticks: u64,
}

/// The bytes of one guest instruction (at most 15).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InstructionBytes {
    pub(super) bytes: [u8; 15],
    pub(super) len: u8,
}

impl InstructionBytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Display for InstructionBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.as_slice().iter().enumerate() {
            let separator = if i == 0 { "" } else { " " };
            write!(f, "{separator}{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "VM stopped ({:?}): exit reason {} ({}), qualification {:#x}, guest-physical ",
            self.cause, self.exit_reason, self.exit_name, self.qualification
        )?;
        match self.gpa {
            Some(gpa) => write!(f, "{gpa}")?,
            None => write!(f, "-")?,
        }
        write!(f, ", RIP {:#x}, after {} ticks", self.rip, self.ticks)?;
        if self.instruction.len > 0 {
            write!(f, ", instruction bytes [{}]", self.instruction)?;
        }
        Ok(())
    }
}

/// How a run of the vCPU ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmStop {
    /// The guest called the DONE hypercall with this result.
    Done(u64),
    /// The guest executed HLT at this RIP.
    Halted { rip: u64 },
    /// The run's time slice is used up, or the guest yielded it in a PAUSE loop. The guest
    /// state is intact: the next run resumes at `rip`.
    Preempted { rip: u64 },
    /// The host posted [`Request::STOP`]. Resumable like `Preempted`.
    StopRequested { rip: u64 },
    /// The guest wrote this code to the test-exit port (0xF4).
    TestExit(u32),
    /// The guest powered the machine off (ACPI sleep state S5).
    PowerOff,
    /// The guest reset the machine (port 0x92 bit 0, port 0xCF9).
    Reset,
    /// The hypervisor stopped the VM.
    Stopped(Diagnostic),
}

impl VmStop {
    /// True when the guest can be run on from where it is.
    pub fn is_resumable(&self) -> bool {
        matches!(self, VmStop::Preempted { .. } | VmStop::StopRequested { .. })
    }
}
