//! Instruction emulation for the accesses pgm cannot map (MMIO, handlers, ROM writes): the
//! faulting instruction is fetched through the guest's paging, decoded and carried out through
//! pgm and the VM's devices.

use pgm::guest_paging::GuestPaging;
use pgm::manager::AccessHandlers;
use pgm::{GuestPhysAddr, Invalidation, PgmError, PAGE_SIZE};
use x86::vmx::vmcs::guest;

use emulator::{EmulationError, Machine, MemoryFault, Register};

use super::exits::exit_reason;
use super::memory::PgmGuard;
use super::setup::{CS_DEFAULT_32, CS_LONG, EFER_LMA};
use super::stop::{InstructionBytes, StopCause, VmStop};
use super::{KernelPgm, Vm};
use crate::arch::vmx::{GuestRegisters, VmxError};

impl Vm<'_> {
    /// Emulates the instruction whose access to `gpa` faulted: fetches it through the guest's
    /// paging, decodes it, performs its access through pgm and `devices`, and writes back
    /// registers, RFLAGS and RIP. An instruction the emulator does not support stops the VM
    /// with a diagnostic naming its bytes.
    /// `pgm` is the VM's lock, held from the fault's lookup to the device access and released
    /// before the flush the access may need.
    pub(super) fn emulate_access(
        &mut self,
        pgm: PgmGuard<'_>,
        gpa: GuestPhysAddr,
        devices: &mut impl AccessHandlers,
    ) -> Option<VmStop> {
        let stop = |vm: &Self, cause, bytes| {
            let mut diagnostic = vm.diagnostic(cause, exit_reason::EPT_VIOLATION);
            diagnostic.instruction = bytes;
            Some(VmStop::Stopped(diagnostic))
        };
        let Ok(cpu) = self.guest_cpu() else {
            return stop(self, StopCause::UnhandledExit, InstructionBytes::default());
        };
        let Some(bytes) = fetch_instruction(&pgm, &cpu) else {
            return stop(self, StopCause::InstructionFetch, InstructionBytes::default());
        };
        // Decoding needs no memory: other vCPUs' exits need not wait for it.
        drop(pgm);
        let Some(instruction) = emulator::decode(cpu.bitness, bytes.as_slice(), cpu.rip) else {
            return stop(self, StopCause::UnsupportedInstruction, bytes);
        };
        let mut used = bytes;
        used.len = instruction.len() as u8;
        let mut pgm = self.memory.lock();
        let gpa = pgm.a20_apply(gpa);
        let mut machine = VcpuMachine {
            regs: &mut self.regs,
            rsp: cpu.rsp,
            segment_bases: cpu.segment_bases,
            pgm: &mut pgm,
            devices,
            invalidation: Invalidation::None,
        };
        let result = emulator::execute(&instruction, gpa, cpu.rflags, &mut machine);
        let invalidation = machine.invalidation;
        drop(pgm);
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(EmulationError::Unsupported) => return stop(self, StopCause::UnsupportedInstruction, used),
            Err(EmulationError::Memory(fault)) => {
                let cause = match fault {
                    MemoryFault::NotGuestMemory => StopCause::NotGuestMemory,
                    MemoryFault::OutOfMemory => StopCause::OutOfMemory,
                    MemoryFault::Ballooned => StopCause::BalloonedPage,
                };
                return stop(self, cause, used);
            }
        };
        self.exits.emulated += 1;
        let written = self.vmcs.current().and_then(|vmcs| {
            vmcs.write(guest::RIP, outcome.rip)
                .and_then(|()| vmcs.write(guest::RFLAGS, outcome.rflags))
        });
        match written.and_then(|()| self.invalidate(invalidation)) {
            Ok(()) => None,
            Err(_) => stop(self, StopCause::UnhandledExit, used),
        }
    }

    /// Reads, once per emulated exit, the guest state the emulator needs.
    fn guest_cpu(&self) -> Result<GuestCpu, VmxError> {
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
        let mut segment_bases = [
            guest::ES_BASE,
            guest::CS_BASE,
            guest::SS_BASE,
            guest::DS_BASE,
            guest::FS_BASE,
            guest::GS_BASE,
        ]
        .map(|field| vmcs.read(field));
        if bitness == 64 {
            // The CPU ignores these bases in 64-bit code, whatever the VMCS holds.
            segment_bases[..4].fill(0);
        }
        Ok(GuestCpu {
            rip: vmcs.read(guest::RIP),
            rflags: vmcs.read(guest::RFLAGS),
            rsp: vmcs.read(guest::RSP),
            bitness,
            segment_bases,
            paging: GuestPaging::from_registers(vmcs.read(guest::CR0), vmcs.read(guest::CR4), efer),
            cr3: vmcs.read(guest::CR3),
        })
    }
}

/// Reads the (up to 15) instruction bytes at RIP through CS and the guest's paging as the guest
/// would fetch them. Bytes on a following page that is not mapped are left out (the instruction
/// may end before it). `None` when not even the first byte can be read.
fn fetch_instruction(pgm: &KernelPgm, cpu: &GuestCpu) -> Option<InstructionBytes> {
    let code_base = cpu.segment_bases[1];
    let linear = if cpu.bitness == 64 {
        cpu.rip
    } else {
        code_base.wrapping_add(cpu.rip) & 0xFFFF_FFFF
    };
    let mut fetched = InstructionBytes::default();
    let mut done = 0;
    while done < fetched.bytes.len() {
        let at = linear.wrapping_add(done as u64);
        let Ok(gpa) = pgm.guest_linear_to_phys(cpu.paging, cpu.cr3, at) else {
            break;
        };
        let gpa = pgm.a20_apply(gpa);
        let len = (fetched.bytes.len() - done).min((PAGE_SIZE - gpa.page_offset()) as usize);
        if pgm.read_phys(gpa, &mut fetched.bytes[done..done + len]).is_err() {
            break;
        }
        done += len;
    }
    fetched.len = done as u8;
    (done > 0).then_some(fetched)
}

/// The guest state an emulated exit needs, read from the VMCS once.
struct GuestCpu {
    rip: u64,
    rflags: u64,
    rsp: u64,
    /// 16, 32 or 64: the operand and address size of the code segment.
    bitness: u32,
    /// ES, CS, SS, DS, FS, GS (the first four 0 in 64-bit code).
    segment_bases: [u64; 6],
    paging: GuestPaging,
    cr3: u64,
}

/// The vCPU and guest memory of one VM as the instruction emulator sees them: registers from
/// [`Vm::regs`] (RSP read-only from the VMCS), memory through pgm and the VM's devices.
struct VcpuMachine<'v, H> {
    regs: &'v mut GuestRegisters,
    rsp: u64,
    /// ES, CS, SS, DS, FS, GS.
    segment_bases: [u64; 6],
    pgm: &'v mut KernelPgm,
    devices: &'v mut H,
    /// The invalidation the emulated writes need.
    invalidation: Invalidation,
}

impl<H> VcpuMachine<'_, H> {
    fn slot(&mut self, full: Register) -> Option<&mut u64> {
        let regs = &mut *self.regs;
        Some(match full {
            Register::RAX => &mut regs.rax,
            Register::RBX => &mut regs.rbx,
            Register::RCX => &mut regs.rcx,
            Register::RDX => &mut regs.rdx,
            Register::RSI => &mut regs.rsi,
            Register::RDI => &mut regs.rdi,
            Register::RBP => &mut regs.rbp,
            Register::R8 => &mut regs.r8,
            Register::R9 => &mut regs.r9,
            Register::R10 => &mut regs.r10,
            Register::R11 => &mut regs.r11,
            Register::R12 => &mut regs.r12,
            Register::R13 => &mut regs.r13,
            Register::R14 => &mut regs.r14,
            Register::R15 => &mut regs.r15,
            _ => return None,
        })
    }
}

/// What a pgm error during an emulated access means for the guest.
fn memory_fault(error: PgmError) -> MemoryFault {
    match error {
        PgmError::NotGuestMemory(_) | PgmError::NotRam(_) => MemoryFault::NotGuestMemory,
        PgmError::PageState { .. } => MemoryFault::Ballooned,
        _ => MemoryFault::OutOfMemory,
    }
}

impl<H: AccessHandlers> Machine for VcpuMachine<'_, H> {
    fn gpr(&mut self, full: Register) -> u64 {
        if full == Register::RSP {
            return self.rsp;
        }
        self.slot(full).map_or(0, |slot| *slot)
    }

    fn segment_base(&mut self, segment: Register) -> u64 {
        let index = match segment {
            Register::ES => 0,
            Register::CS => 1,
            Register::SS => 2,
            Register::DS => 3,
            Register::FS => 4,
            _ => 5,
        };
        self.segment_bases[index]
    }

    fn set_gpr(&mut self, full: Register, value: u64) {
        // RSP is never the destination of a supported instruction.
        if let Some(slot) = self.slot(full) {
            *slot = value;
        }
    }

    fn read(&mut self, gpa: GuestPhysAddr, data: &mut [u8]) -> Result<(), MemoryFault> {
        self.pgm
            .read_phys_handled(gpa, data, &mut *self.devices)
            .map_err(memory_fault)
    }

    fn write(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), MemoryFault> {
        let invalidation = self
            .pgm
            .write_phys_handled(gpa, data, &mut *self.devices)
            .map_err(memory_fault)?;
        self.invalidation = self.invalidation.max(invalidation);
        Ok(())
    }
}
