//! Instruction emulation for the accesses pgm cannot map (MMIO, handlers, ROM writes): the
//! faulting instruction is fetched through the guest's paging, decoded and carried out through
//! pgm and the VM's devices.

use pgm::guest_paging::{CodeTranslation, GuestPaging};
use pgm::manager::{AccessHandlers, MmioTarget};
use pgm::{GuestPhysAddr, Invalidation, PgmError};

use emulator::{EmulationError, Machine, MemoryFault, Register};

use super::backend::{CpuState, Segment, VirtualCpu};
use super::memory::{PgmGuard, SharedPgm};
use super::stop::{InstructionBytes, StopCause, VmStop};
use super::vcpu::Backend;
use super::{KernelPgm, Vcpu};

/// The guest memory an emulated access goes through.
pub(super) enum EmulatedMemory<'a> {
    /// The manager shared, and the MMIO page the fault fell on, found once: an MMIO page has
    /// no memory, so nothing the access does changes the manager, and other vCPUs' MMIO
    /// exits and lock-free faults go on meanwhile.
    Mmio(SharedPgm<'a>, MmioTarget),
    /// The manager locked, for accesses that may change it (ROM writes, handlers over RAM).
    Locked(PgmGuard<'a>),
    /// Unassigned guest-physical space, on a machine where it reads all ones and drops
    /// writes as on a PC (`MachineSpec::unassigned_reads_ones`); the manager shared, for the
    /// instruction fetch only.
    Unassigned(SharedPgm<'a>),
}

impl Vcpu<'_> {
    /// Emulates the instruction whose access to `gpa` faulted: fetches it through the guest's
    /// paging, decodes it, performs its access through pgm and `devices`, and writes back
    /// registers, RFLAGS and RIP. An instruction the emulator does not support stops the VM
    /// with a diagnostic naming its bytes.
    /// `memory` is the VM's lock as the fault's lookup took it: kept shared to the end, or, when
    /// locked, let go for the decode and taken again for the access, and released before the
    /// flush the access may need.
    pub(super) fn emulate_access(
        &mut self,
        memory: EmulatedMemory<'_>,
        gpa: GuestPhysAddr,
        devices: &mut impl AccessHandlers,
    ) -> Option<VmStop> {
        let stop = |vcpu: &Self, cause, bytes| {
            let mut diagnostic = vcpu.diagnostic(cause);
            diagnostic.instruction = bytes;
            Some(VmStop::Stopped(diagnostic))
        };
        let Ok(state) = self.cpu.cpu_state() else {
            return stop(self, StopCause::UnhandledExit, InstructionBytes::default());
        };
        let cpu = GuestCpu::from(state);
        let fetched = match &memory {
            EmulatedMemory::Mmio(pgm, _) => {
                let cache = (&mut self.code_translation, pgm.writes());
                fetch_instruction(pgm, &cpu, Some(cache))
            }
            EmulatedMemory::Locked(pgm) => fetch_instruction(pgm, &cpu, None),
            EmulatedMemory::Unassigned(pgm) => fetch_instruction(pgm, &cpu, None),
        };
        let Some((bytes, walked)) = fetched else {
            return stop(self, StopCause::InstructionFetch, InstructionBytes::default());
        };
        self.exits.code_fetches_without_walk += u64::from(!walked);
        // Decoding needs no memory: a locked manager is let go meanwhile, since other vCPUs'
        // exits need it (a shared one holds up only the host's changes).
        let unassigned = matches!(memory, EmulatedMemory::Unassigned(_));
        let mut shared = match memory {
            EmulatedMemory::Mmio(pgm, target) => Some((pgm, target)),
            EmulatedMemory::Locked(pgm) => {
                drop(pgm);
                None
            }
            EmulatedMemory::Unassigned(pgm) => {
                drop(pgm);
                None
            }
        };
        let Some((instruction, reused)) = self.decoder.decode(cpu.bitness, bytes.as_slice(), cpu.rip) else {
            return stop(self, StopCause::UnsupportedInstruction, bytes);
        };
        self.exits.decodes_reused += u64::from(reused);
        let mut used = bytes;
        used.len = instruction.len() as u8;
        let mut locked = None;
        let (memory, gpa) = match &mut shared {
            Some((pgm, target)) => (MachineMemory::Mmio(pgm, *target), pgm.a20_apply(gpa)),
            None if unassigned => (MachineMemory::Unassigned, gpa),
            None => {
                let pgm = locked.insert(self.memory.lock());
                let gpa = pgm.a20_apply(gpa);
                (MachineMemory::Locked(pgm), gpa)
            }
        };
        let mut machine = VcpuMachine {
            cpu: &mut self.cpu,
            bitness: cpu.bitness,
            memory,
            devices,
            invalidation: Invalidation::None,
        };
        let result = emulator::execute(&instruction, gpa, cpu.rflags, &mut machine);
        let invalidation = machine.invalidation;
        // The flush below must not run under the lock.
        drop((shared, locked));
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
        let changed_flags = (outcome.rflags != cpu.rflags).then_some(outcome.rflags);
        let written = self.cpu.set_rip_and_flags(outcome.rip, changed_flags);
        match written
            .map_err(Into::into)
            .and_then(|()| self.invalidate(invalidation))
        {
            Ok(()) => None,
            Err(_) => stop(self, StopCause::UnhandledExit, used),
        }
    }
}

/// Reads the (up to 15) instruction bytes at RIP through CS and the guest's paging as the guest
/// would fetch them. Bytes on a following page that is not mapped are left out (the instruction
/// may end before it). `None` when not even the first byte can be read; else the bytes, and
/// whether the guest's paging was walked. `cache` is the vCPU's remembered code translation and
/// the count of exclusive accesses of the VM's lock (see `Pgm::read_code`): given only while
/// the manager is held shared, so that the count cannot change under the fetch.
fn fetch_instruction(
    pgm: &KernelPgm,
    cpu: &GuestCpu,
    cache: Option<(&mut Option<CodeTranslation>, u64)>,
) -> Option<(InstructionBytes, bool)> {
    let linear = if cpu.bitness == 64 {
        cpu.rip
    } else {
        cpu.code_base.wrapping_add(cpu.rip) & 0xFFFF_FFFF
    };
    let mut fetched = InstructionBytes::default();
    let (mut unkept, mut next_page) = (None, None);
    let (cache, epoch) = cache.unwrap_or((&mut unkept, 0));
    let mut walked = false;
    let mut done = 0;
    while done < fetched.bytes.len() {
        let at = linear.wrapping_add(done as u64);
        let buf = &mut fetched.bytes[done..];
        // Only the first page is remembered: an instruction rarely crosses into the next.
        let page_cache = if done == 0 { &mut *cache } else { &mut next_page };
        let Ok(read) = pgm.read_code(cpu.paging, cpu.cr3, at, buf, page_cache, epoch) else {
            break;
        };
        walked |= !read.reused;
        done += read.len;
    }
    fetched.len = done as u8;
    (done > 0).then_some((fetched, walked))
}

/// The guest state every emulated exit needs, read from the backend once. The rest (RSP,
/// data segment bases) is read only by the instructions that use it.
struct GuestCpu {
    rip: u64,
    rflags: u64,
    /// 16, 32 or 64: the operand and address size of the code segment.
    bitness: u32,
    /// The CS base (0 in 64-bit code, where the CPU ignores it).
    code_base: u64,
    paging: GuestPaging,
    cr3: u64,
}

impl From<CpuState> for GuestCpu {
    fn from(state: CpuState) -> GuestCpu {
        GuestCpu {
            rip: state.rip,
            rflags: state.rflags,
            bitness: state.bitness,
            code_base: state.code_base,
            paging: GuestPaging::from_registers(state.cr0, state.cr4, state.efer),
            cr3: state.cr3,
        }
    }
}

/// Guest memory as one emulated access reaches it (see [`EmulatedMemory`]).
enum MachineMemory<'v> {
    Mmio(&'v KernelPgm, MmioTarget),
    Locked(&'v mut KernelPgm),
    /// Nothing there: reads are all ones, writes go nowhere.
    Unassigned,
}

/// The vCPU and guest memory of one VM as the instruction emulator sees them: registers from
/// the backend (RSP read-only), memory through pgm and the VM's devices.
struct VcpuMachine<'v, 'a, H> {
    /// The registers; RSP and the segment bases are read from it when an instruction needs
    /// them.
    cpu: &'v mut Backend<'a>,
    bitness: u32,
    memory: MachineMemory<'v>,
    devices: &'v mut H,
    /// The invalidation the emulated writes need.
    invalidation: Invalidation,
}

impl<H> VcpuMachine<'_, '_, H> {
    fn slot(&mut self, full: Register) -> Option<&mut u64> {
        let regs = self.cpu.regs_mut();
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
        // NotHandled: an access off the MMIO page found for the fault (the emulator keeps
        // operands on the faulting page, so this is a guard, not a path).
        PgmError::NotGuestMemory(_) | PgmError::NotRam(_) | PgmError::NotHandled(_) => {
            MemoryFault::NotGuestMemory
        }
        PgmError::PageState { .. } => MemoryFault::Ballooned,
        _ => MemoryFault::OutOfMemory,
    }
}

impl<H: AccessHandlers> Machine for VcpuMachine<'_, '_, H> {
    fn gpr(&mut self, full: Register) -> u64 {
        if full == Register::RSP {
            return self.cpu.rsp();
        }
        self.slot(full).map_or(0, |slot| *slot)
    }

    fn segment_base(&mut self, segment: Register) -> u64 {
        let segment = match segment {
            Register::FS => Segment::Fs,
            Register::GS => Segment::Gs,
            // The CPU ignores the other bases in 64-bit code, whatever the backend holds.
            _ if self.bitness == 64 => return 0,
            Register::ES => Segment::Es,
            Register::CS => Segment::Cs,
            Register::SS => Segment::Ss,
            _ => Segment::Ds,
        };
        self.cpu.segment_base(segment)
    }

    fn set_gpr(&mut self, full: Register, value: u64) {
        // RSP is never the destination of a supported instruction.
        if let Some(slot) = self.slot(full) {
            *slot = value;
        }
    }

    fn read(&mut self, gpa: GuestPhysAddr, data: &mut [u8]) -> Result<(), MemoryFault> {
        let devices = &mut *self.devices;
        match &mut self.memory {
            MachineMemory::Mmio(pgm, target) => pgm.read_mmio(*target, gpa, data, devices),
            MachineMemory::Locked(pgm) => pgm.read_phys_handled(gpa, data, devices),
            MachineMemory::Unassigned => {
                data.fill(0xFF);
                Ok(())
            }
        }
        .map_err(memory_fault)
    }

    fn write(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), MemoryFault> {
        let devices = &mut *self.devices;
        let invalidation = match &mut self.memory {
            MachineMemory::Mmio(pgm, target) => pgm
                .write_mmio(*target, gpa, data, devices)
                .map(|()| Invalidation::None),
            MachineMemory::Locked(pgm) => pgm.write_phys_handled(gpa, data, devices),
            MachineMemory::Unassigned => Ok(Invalidation::None),
        }
        .map_err(memory_fault)?;
        self.invalidation = self.invalidation.max(invalidation);
        Ok(())
    }
}
