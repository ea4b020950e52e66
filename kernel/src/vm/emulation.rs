//! Instruction emulation for the accesses pgm cannot map (MMIO, handlers, ROM writes) and for
//! string port I/O: the instruction is fetched through the guest's paging, decoded, and carried
//! out through pgm, the VM's devices and its port bus.
//!
//! An instruction whose one memory operand lies on the device page the exit named is emulated
//! holding just that page, on the shared manager (the fast path every MMIO register access
//! takes). Anything that reaches further (a second operand, the stack, an operand crossing
//! into another page, a descriptor table) goes through the guest's paging to pgm, locking the
//! VM's memory for each access.

use alloc::sync::Arc;

use pgm::guest_paging::{CodeTranslation, EntryUpdates, GuestAccess, GuestPaging, GuestWalkError};
use pgm::manager::{AccessHandlers, MmioTarget};
use pgm::{AccessError, GuestPhysAddr, Invalidation, PageError, PAGE_SIZE};

use emulator::{EmulationError, Instruction, Machine, MemoryFault, Mnemonic, Register, SegmentState};

use super::backend::{vector, CpuState, Direction, Event, Segment, VirtualCpu};
use super::devices::Ports;
use super::memory::{PgmGuard, SharedPgm, VmMemory};
use super::stop::{InstructionBytes, StopCause, VmStop};
use super::vcpu::Backend;
use super::{KernelPgm, Vcpu};
use crate::arch::vector as vector_registers;

/// The guest memory an emulated access goes through, as the fault's lookup left it.
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

/// The page an exit named: its guest-linear address (when the backend reported it) and
/// guest-physical address.
#[derive(Clone, Copy, Debug)]
pub(super) struct FaultPage {
    linear: Option<u64>,
    gpa: GuestPhysAddr,
}

impl FaultPage {
    /// The page of an access to `gpa` at the guest-linear address `linear`.
    pub(super) fn new(gpa: GuestPhysAddr, linear: Option<u64>) -> FaultPage {
        FaultPage {
            linear: linear.map(|linear| linear & !(PAGE_SIZE - 1)),
            gpa: gpa.page_base(),
        }
    }
}

impl Vcpu<'_> {
    /// Emulates the instruction whose access to `fault` faulted: fetches it through the guest's
    /// paging, decodes it, performs its accesses through pgm and `devices`, and writes back
    /// registers, RFLAGS and RIP. What the CPU would fault on is injected; an instruction the
    /// emulator does not support stops the VM with a diagnostic naming its bytes.
    /// `memory` is the VM's lock as the fault's lookup took it: kept shared to the end on the
    /// fast path, else let go after the fetch (each access then locks for itself), and
    /// released before the flush the accesses may need.
    pub(super) fn emulate_access(
        &mut self,
        memory: EmulatedMemory<'_>,
        fault: FaultPage,
        devices: &mut impl AccessHandlers,
    ) -> Option<VmStop> {
        let Ok(state) = self.cpu.cpu_state() else {
            return self.stop_emulation(StopCause::UnhandledExit, InstructionBytes::default());
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
            return self.stop_emulation(StopCause::InstructionFetch, InstructionBytes::default());
        };
        self.exits.code_fetches_without_walk += u64::from(!walked);
        // Decoding needs no memory: a locked manager is let go, since other vCPUs' exits need it
        // (a shared one holds up only the host's changes).
        // (A guard let go must be dropped by name: a `_` pattern would keep it alive to the end
        // of the function, and the accesses below take the lock again.)
        let fast = match memory {
            EmulatedMemory::Mmio(pgm, target) => Some(FastMemory::Mmio(pgm, target)),
            EmulatedMemory::Unassigned(pgm) => {
                drop(pgm);
                Some(FastMemory::Unassigned)
            }
            EmulatedMemory::Locked(pgm) => {
                drop(pgm);
                None
            }
        };
        let Some(instruction) = self.decode(&cpu, &bytes) else {
            return self.stop_emulation(StopCause::UnsupportedInstruction, bytes);
        };
        let mut used = bytes;
        used.len = instruction.len() as u8;
        // The fast path only for an instruction that reaches nothing but its operand; when the
        // operand turns out to lie elsewhere it is refused before any access, and emulated
        // again through the guest's paging.
        let fast = fast.filter(|_| emulator::touches_only_its_operand(&instruction));
        // The fast path's hold on the shared manager ends with its closure: before the retry
        // (which locks) and the flush.
        let first =
            fast.map(|fast| self.execute(&instruction, &cpu, Some(fault), fast_memory(&fast), devices, None));
        let result = match first {
            Some((Err(EmulationError::Memory(MemoryFault::Retry)), _)) | None => self.execute(
                &instruction,
                &cpu,
                Some(fault),
                MachineMemory::PerAccess,
                devices,
                None,
            ),
            Some(result) => result,
        };
        self.finish_emulation(result, &cpu, used)
    }

    /// Emulates the string port I/O instruction (INS or OUTS) at RIP: one element, its memory
    /// operand reached through the guest's paging, pgm and `devices`.
    pub(super) fn emulate_string_io(&mut self, devices: &mut impl AccessHandlers) -> Option<VmStop> {
        let (state, instruction, bytes) = match self.instruction_at_rip() {
            Ok(found) => found,
            Err((cause, bytes)) => return self.stop_emulation(cause, bytes),
        };
        let cpu = GuestCpu::from(state);
        // Another vCPU may have rewritten the instruction since it exited: the CPU runs
        // whatever is there now.
        let string_io = matches!(
            instruction.mnemonic(),
            Mnemonic::Insb
                | Mnemonic::Insw
                | Mnemonic::Insd
                | Mnemonic::Outsb
                | Mnemonic::Outsw
                | Mnemonic::Outsd
        );
        if !string_io {
            return None;
        }
        let mut used = bytes;
        used.len = instruction.len() as u8;
        let memory = Arc::clone(&self.memory);
        let mut ports = Ports::new(&memory);
        let result = self.execute(
            &instruction,
            &cpu,
            None,
            MachineMemory::PerAccess,
            devices,
            Some(&mut ports),
        );
        let (invalidation, stop) = ports.finish();
        if let Some(stop) = self.finish_emulation((result.0, result.1.max(invalidation)), &cpu, used) {
            return Some(stop);
        }
        stop
    }

    /// A MOV to or from CR`cr` the backend could not decode: the instruction at RIP names the
    /// general-purpose register and its length; CR8 is the APIC's task priority, a CR4 write
    /// is checked by the backend (#GP where the CPU would refuse it).
    pub(super) fn handle_undecoded_control_register(&mut self, cr: u8, write: bool) -> Option<VmStop> {
        let (state, instruction, bytes) = match self.instruction_at_rip() {
            Ok(decoded) => decoded,
            Err((cause, bytes)) => return self.stop_emulation(cause, bytes),
        };
        // MOV CRn, r64 (write) or MOV r64, CRn (read): the other operand is the register.
        let general = if write {
            instruction.op1_register()
        } else {
            instruction.op0_register()
        };
        let is_mov = instruction.mnemonic() == Mnemonic::Mov && (general.is_gpr64() || general.is_gpr32());
        if !is_mov {
            return self.stop_emulation(StopCause::UnsupportedInstruction, bytes);
        }
        let register = (general.full_register() as usize - Register::RAX as usize) as u8;
        self.cpu
            .note_instruction_length(instruction.next_ip().wrapping_sub(state.rip));
        match (cr, write) {
            (8, true) => self.handle_tpr_write(register),
            (8, false) => self.handle_tpr_read(register),
            (4, true) => match self.cpu.write_cr4(self.cpu.gpr(register)) {
                Ok(true) => self.skip_or_stop(),
                Ok(false) => self.inject_or_stop(Event::Exception {
                    vector: vector::GP,
                    error_code: Some(0),
                }),
                Err(_) => self.stop_emulation(StopCause::UnhandledExit, bytes),
            },
            _ => self.stop_emulation(StopCause::UnhandledExit, bytes),
        }
    }

    /// A #UD the guest raised (always intercepted). Carried out instead: the other vendor's
    /// hypercall instruction, and, when the guest is told it runs on AMD while the host is
    /// Intel (`MachineSpec::vendor`), a SYSCALL outside 64-bit code, which AMD CPUs run and
    /// Intel CPUs refuse, as AMD's would. Anything else gets its #UD.
    pub(super) fn handle_invalid_opcode(&mut self) -> Option<VmStop> {
        let done = match self.instruction_at_rip() {
            Err((StopCause::UnhandledExit, bytes)) => {
                return self.stop_emulation(StopCause::UnhandledExit, bytes)
            }
            Ok((state, instruction, _))
                if instruction.mnemonic() == Mnemonic::Syscall
                    && state.efer & EFER_SCE != 0
                    && self.memory.devices.emulates_syscall =>
            {
                self.emulate_syscall(&state, instruction.next_ip())
            }
            // The other vendor's hypercall instruction (VMCALL on AMD, VMMCALL on Intel), which
            // the CPU refuses: a hypercall all the same, as KVM answers it, so that a guest
            // need not know which CPU runs it.
            Ok((_, instruction, _))
                if matches!(instruction.mnemonic(), Mnemonic::Vmcall | Mnemonic::Vmmcall) =>
            {
                return match self.cpu.set_rip_and_flags(instruction.next_ip(), None) {
                    Ok(()) => self.hypercall(),
                    Err(_) => self.stop_emulation(StopCause::UnhandledExit, InstructionBytes::default()),
                };
            }
            // Anything else, or an instruction that cannot be read or decoded: its #UD.
            _ => {
                self.exits.injected += 1;
                self.cpu.inject(Event::Exception {
                    vector: vector::UD,
                    error_code: None,
                })
            }
        };
        match done {
            Ok(()) => None,
            Err(_) => self.stop_emulation(StopCause::UnhandledExit, InstructionBytes::default()),
        }
    }

    /// SYSCALL as an AMD CPU runs it (APM vol. 3): RCX takes the next RIP and R11 RFLAGS; CS
    /// and SS become flat ring-0 segments from STAR[47:32]; RIP comes from LSTAR (64-bit
    /// code), CSTAR (compatibility mode) or STAR[31:0] (legacy mode); RFLAGS is masked by
    /// SFMASK (legacy mode: IF, VM and RF cleared).
    fn emulate_syscall(
        &mut self,
        state: &CpuState,
        next_rip: u64,
    ) -> Result<(), super::backend::BackendError> {
        let msr = |vcpu: &Self, index| vcpu.cpu.read_msr(index).unwrap_or(0);
        let star = msr(self, devices::msr::index::STAR);
        let long_mode = state.efer & EFER_LMA != 0;
        let (target, rflags) = if long_mode {
            let target = if state.bitness == 64 {
                msr(self, devices::msr::index::LSTAR)
            } else {
                msr(self, devices::msr::index::CSTAR)
            };
            (
                target,
                state.rflags & !msr(self, devices::msr::index::SFMASK) & !RFLAGS_RF,
            )
        } else {
            (
                star & 0xFFFF_FFFF,
                state.rflags & !(RFLAGS_IF | RFLAGS_VM | RFLAGS_RF),
            )
        };
        let selector = (star >> 32) as u16 & 0xFFFC;
        let flat = |selector, attributes| SegmentState {
            selector,
            base: 0,
            limit: u32::MAX,
            attributes,
            usable: true,
        };
        let code = if long_mode { CODE_64 } else { CODE_32 };
        let regs = self.cpu.regs_mut();
        regs.rcx = if long_mode {
            next_rip
        } else {
            next_rip & 0xFFFF_FFFF
        };
        if long_mode {
            regs.r11 = state.rflags & !RFLAGS_RF;
        }
        self.cpu.set_segment(Segment::Cs, flat(selector, code))?;
        self.cpu.set_segment(Segment::Ss, flat(selector + 8, DATA_32))?;
        self.cpu.set_rip_and_flags(target, Some(rflags))
    }

    /// The guest's state and the instruction at its RIP, fetched through its paging on the
    /// shared manager and decoded, with its bytes; or why not: the backend failed
    /// (`UnhandledExit`), nothing could be read (`InstructionFetch`) or the bytes are no
    /// instruction (`UnsupportedInstruction`, with the bytes).
    fn instruction_at_rip(
        &mut self,
    ) -> Result<(CpuState, Instruction, InstructionBytes), (StopCause, InstructionBytes)> {
        let none = InstructionBytes::default();
        let state = self
            .cpu
            .cpu_state()
            .map_err(|_| (StopCause::UnhandledExit, none))?;
        let cpu = GuestCpu::from(state);
        let memory = Arc::clone(&self.memory);
        let fetched = fetch_instruction(&memory.shared(self.cpu.host_cpu()), &cpu, None);
        let (bytes, _) = fetched.ok_or((StopCause::InstructionFetch, none))?;
        let instruction = self
            .decode(&cpu, &bytes)
            .ok_or((StopCause::UnsupportedInstruction, bytes))?;
        Ok((state, instruction, bytes))
    }

    /// Decodes `bytes` as the instruction at the guest's RIP, through the vCPU's decode cache.
    fn decode(&mut self, cpu: &GuestCpu, bytes: &InstructionBytes) -> Option<Instruction> {
        let (instruction, reused) = self.decoder.decode(cpu.bitness, bytes.as_slice(), cpu.rip)?;
        self.exits.decodes_reused += u64::from(reused);
        Some(instruction)
    }

    /// Runs the emulator over `memory`; returns its result and the invalidation its writes
    /// need (not yet carried out: the caller has let every lock go first).
    fn execute<H: AccessHandlers>(
        &mut self,
        instruction: &Instruction,
        cpu: &GuestCpu,
        fault: Option<FaultPage>,
        memory: MachineMemory<'_>,
        devices: &mut H,
        ports: Option<&mut Ports<'_>>,
    ) -> (Result<emulator::Outcome, EmulationError>, Invalidation) {
        let mut machine = VcpuMachine {
            cpu: &mut self.cpu,
            guest: cpu,
            fault,
            vm: &self.memory,
            memory,
            devices,
            ports,
            invalidation: Invalidation::None,
        };
        let result = emulator::execute(instruction, cpu.rflags, &mut machine);
        (result, machine.invalidation)
    }

    /// Carries out what the emulator decided: the new RIP and RFLAGS, an exception or page
    /// fault for the guest, or a stop naming the instruction `used`; then the invalidation.
    fn finish_emulation(
        &mut self,
        (result, invalidation): (Result<emulator::Outcome, EmulationError>, Invalidation),
        cpu: &GuestCpu,
        used: InstructionBytes,
    ) -> Option<VmStop> {
        let done = match result {
            Ok(outcome) => {
                self.exits.emulated += 1;
                let changed_flags = (outcome.rflags != cpu.rflags).then_some(outcome.rflags);
                self.cpu.set_rip_and_flags(outcome.rip, changed_flags)
            }
            Err(EmulationError::Exception { vector, error_code }) => {
                self.exits.injected += 1;
                self.cpu.inject(Event::Exception { vector, error_code })
            }
            Err(EmulationError::Memory(MemoryFault::PageFault { linear, error_code })) => {
                self.exits.injected += 1;
                self.cpu.set_fault_address(linear).and_then(|()| {
                    self.cpu.inject(Event::Exception {
                        vector: vector::PF,
                        error_code: Some(error_code),
                    })
                })
            }
            Err(error) => {
                let cause = match error {
                    EmulationError::Memory(MemoryFault::OutOfMemory) => StopCause::OutOfMemory,
                    EmulationError::Memory(MemoryFault::Ballooned) => StopCause::BalloonedPage,
                    EmulationError::Memory(_) => StopCause::NotGuestMemory,
                    _ => StopCause::UnsupportedInstruction,
                };
                // What the instruction wrote before it failed may still need its flush.
                let cause = match self.invalidate(invalidation) {
                    Ok(()) => cause,
                    Err(_) => StopCause::UnhandledExit,
                };
                return self.stop_emulation(cause, used);
            }
        };
        match done
            .map_err(Into::into)
            .and_then(|()| self.invalidate(invalidation))
        {
            Ok(()) => None,
            Err(_) => self.stop_emulation(StopCause::UnhandledExit, used),
        }
    }

    /// Stops the VM for `cause`, naming the instruction `bytes`.
    fn stop_emulation(&self, cause: StopCause, bytes: InstructionBytes) -> Option<VmStop> {
        let mut diagnostic = self.diagnostic(cause);
        diagnostic.instruction = bytes;
        Some(VmStop::Stopped(diagnostic))
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
/// segments) is read only by the instructions that use it.
struct GuestCpu {
    rip: u64,
    rflags: u64,
    /// 16, 32 or 64: the operand and address size of the code segment.
    bitness: u32,
    /// The CS base (0 in 64-bit code, where the CPU ignores it).
    code_base: u64,
    paging: GuestPaging,
    cr3: u64,
    /// CR0 (for CR0.WP).
    cr0: u64,
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
            cr0: state.cr0,
        }
    }
}

/// The fast path's hold on memory: the shared manager and the MMIO page, or nothing for
/// unassigned space.
enum FastMemory<'a> {
    Mmio(SharedPgm<'a>, MmioTarget),
    Unassigned,
}

/// The machine memory of the fast path `fast`.
fn fast_memory<'v>(fast: &'v FastMemory<'_>) -> MachineMemory<'v> {
    match fast {
        FastMemory::Mmio(pgm, target) => MachineMemory::Mmio(pgm, *target),
        FastMemory::Unassigned => MachineMemory::Unassigned,
    }
}

/// Guest memory as one emulated instruction reaches it.
enum MachineMemory<'v> {
    /// Only the MMIO page the exit named, on the shared manager.
    Mmio(&'v KernelPgm, MmioTarget),
    /// Only the unassigned page the exit named: reads are all ones, writes go nowhere.
    Unassigned,
    /// Anywhere, through the guest's paging; the VM's lock is taken for each access.
    PerAccess,
}

/// The vCPU and guest memory of one VM as the instruction emulator sees them: registers from
/// the backend, memory through the guest's paging, pgm and the VM's devices, ports through
/// the VM's bus.
struct VcpuMachine<'v, 'a, 'p, H> {
    cpu: &'v mut Backend<'a>,
    guest: &'v GuestCpu,
    /// The page the exit named, reached without a walk.
    fault: Option<FaultPage>,
    vm: &'v VmMemory,
    memory: MachineMemory<'v>,
    devices: &'v mut H,
    /// The port bus, for INS and OUTS.
    ports: Option<&'v mut Ports<'p>>,
    /// The invalidation the emulated writes need.
    invalidation: Invalidation,
}

/// What a pgm error during an emulated access means for the guest.
fn memory_fault(error: AccessError) -> MemoryFault {
    match error {
        AccessError::NoMemory(_) => MemoryFault::OutOfMemory,
        AccessError::Page(PageError::State { .. }) => MemoryFault::Ballooned,
        AccessError::Page(_) | AccessError::Range(_) | AccessError::OutsideTarget(_) => {
            MemoryFault::NotGuestMemory
        }
    }
}

/// EFER.SCE: SYSCALL enabled.
const EFER_SCE: u64 = 1 << 0;
/// EFER.LMA: long mode active.
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_VM: u64 = 1 << 17;
/// Segment attributes (descriptor bits 40–47, 52–55) of the flat segments SYSCALL loads:
/// present ring-0 execute/read code, 64-bit (L) or 32-bit (D/B), 4 KiB granular; and
/// read/write data.
const CODE_64: u16 = 0xA09B;
const CODE_32: u16 = 0xC09B;
const DATA_32: u16 = 0xC093;

/// CR0.WP: supervisor writes honour read-only pages.
const CR0_WP: u64 = 1 << 16;

/// #PF error-code bits.
const PF_PRESENT: u32 = 1 << 0;
const PF_WRITE: u32 = 1 << 1;
const PF_USER: u32 = 1 << 2;

/// At most two pieces: an access crossing a page boundary.
type Pieces = [(GuestPhysAddr, usize); 2];

impl<H: AccessHandlers> VcpuMachine<'_, '_, '_, H> {
    /// The guest-physical address of the guest-linear `linear`: the exit's own page without a
    /// walk (the CPU checked and marked it), else through the guest's paging with its rights
    /// checked (what they refuse, or a page not mapped, is the guest's #PF); the accessed and
    /// dirty bits the walk found clear go to `updates`, for the caller to set.
    fn translate(
        &self,
        pgm: &KernelPgm,
        linear: u64,
        write: bool,
        updates: &mut [EntryUpdates; 2],
    ) -> Result<GuestPhysAddr, MemoryFault> {
        if let Some(fault) = self.fault {
            if fault.linear == Some(linear & !(PAGE_SIZE - 1)) {
                return Ok(fault.gpa.at_page_offset(linear & (PAGE_SIZE - 1)));
            }
        }
        if self.guest.paging == GuestPaging::Off {
            // Linear is physical: no walk, and no rights to check (nor CPL to read for them).
            return Ok(pgm.a20_apply(GuestPhysAddr::new_truncate(linear & 0xFFFF_FFFF)));
        }
        let user = self.cpu.segment(Segment::Ss).is_ok_and(|ss| ss.dpl() == 3);
        let access = GuestAccess {
            write,
            user,
            write_protect: self.guest.cr0 & CR0_WP != 0,
        };
        let error_code = if write { PF_WRITE } else { 0 } | if user { PF_USER } else { 0 };
        match pgm.guest_translate_access(self.guest.paging, self.guest.cr3, linear, access) {
            Ok((gpa, found)) => {
                let slot = if updates[0].is_empty() { 0 } else { 1 };
                updates[slot] = found;
                Ok(gpa)
            }
            Err(GuestWalkError::NotPresent { .. }) => Err(MemoryFault::PageFault { linear, error_code }),
            Err(GuestWalkError::Protection) => Err(MemoryFault::PageFault {
                linear,
                error_code: error_code | PF_PRESENT,
            }),
            Err(_) => Err(MemoryFault::NotGuestMemory),
        }
    }

    /// The guest-physical pieces of `len` bytes at `linear` (two when they cross a page).
    fn pieces(
        &self,
        pgm: &KernelPgm,
        linear: u64,
        len: usize,
        write: bool,
        updates: &mut [EntryUpdates; 2],
    ) -> Result<(Pieces, usize), MemoryFault> {
        let first = len.min((PAGE_SIZE - (linear & (PAGE_SIZE - 1))) as usize);
        let mut pieces = [
            (self.translate(pgm, linear, write, updates)?, first),
            (GuestPhysAddr::new_truncate(0), 0),
        ];
        if first == len {
            return Ok((pieces, 1));
        }
        let rest = linear.wrapping_add(first as u64);
        let rest = if self.guest.bitness == 64 {
            rest
        } else {
            rest & 0xFFFF_FFFF
        };
        pieces[1] = (self.translate(pgm, rest, write, updates)?, len - first);
        Ok((pieces, 2))
    }

    /// The guest-physical address of `len` bytes at `linear` when they lie on the page the exit
    /// named, at the linear address it reported: the fast path's every access, with no walk.
    fn on_named_page(&self, linear: u64, len: usize) -> Option<GuestPhysAddr> {
        let fault = self.fault?;
        let offset = linear & (PAGE_SIZE - 1);
        let fits = offset as usize + len <= PAGE_SIZE as usize;
        (fault.linear == Some(linear - offset) && fits).then(|| fault.gpa.at_page_offset(offset))
    }

    /// True when the fast path holds `gpa`'s page.
    fn on_fault_page(&self, gpa: GuestPhysAddr) -> bool {
        self.fault.is_some_and(|fault| fault.gpa == gpa.page_base())
    }

    /// Reads or writes (`data` given) `len` bytes at `linear`: every piece translated first,
    /// then accessed.
    fn access(
        &mut self,
        linear: u64,
        read: Option<&mut [u8]>,
        write: Option<&[u8]>,
    ) -> Result<(), MemoryFault> {
        let len = read
            .as_ref()
            .map_or_else(|| write.map_or(0, <[u8]>::len), |buf| buf.len());
        let is_write = write.is_some();
        match self.memory {
            MachineMemory::Mmio(pgm, target) => {
                let gpa = match self.on_named_page(linear, len) {
                    Some(gpa) => gpa,
                    // A backend that reports no linear address: a walk finds the page (its
                    // bits are not set here: the shared manager writes nothing, and the CPU
                    // walked to this page itself).
                    None if self.fault.is_some_and(|fault| fault.linear.is_none()) => {
                        let (pieces, count) =
                            self.pieces(pgm, linear, len, is_write, &mut Default::default())?;
                        if count != 1 || !self.on_fault_page(pieces[0].0) {
                            return Err(MemoryFault::Retry);
                        }
                        pieces[0].0
                    }
                    None => return Err(MemoryFault::Retry),
                };
                let devices = &mut *self.devices;
                match (read, write) {
                    (Some(buf), _) => pgm.read_mmio(target, gpa, buf, devices),
                    (None, Some(data)) => pgm.write_mmio(target, gpa, data, devices),
                    _ => Ok(()),
                }
                .map_err(memory_fault)
            }
            MachineMemory::Unassigned => {
                // Only the named page is held; anything else is tried again with more.
                self.on_named_page(linear, len).ok_or(MemoryFault::Retry)?;
                if let Some(buf) = read {
                    buf.fill(0xFF);
                }
                Ok(())
            }
            MachineMemory::PerAccess => {
                let vm = self.vm;
                let reads_ones = vm.devices.unassigned_reads_ones;
                let mut pgm = vm.lock();
                let mut updates = <[EntryUpdates; 2]>::default();
                let (pieces, count) = self.pieces(&pgm, linear, len, is_write, &mut updates)?;
                for found in updates.iter().filter(|found| !found.is_empty()) {
                    let invalidation = pgm.set_accessed_dirty(found).map_err(memory_fault)?;
                    self.invalidation = self.invalidation.max(invalidation);
                }
                let devices = &mut *self.devices;
                let mut done = 0;
                let mut read = read;
                for &(gpa, size) in &pieces[..count] {
                    match (&mut read, write) {
                        (Some(buf), _) => {
                            let buf = &mut buf[done..done + size];
                            if reads_ones {
                                pgm.read_phys_external(gpa, buf, devices)
                            } else {
                                pgm.read_phys_handled(gpa, buf, devices)
                            }
                            .map_err(memory_fault)?;
                        }
                        (None, Some(data)) => {
                            let data = &data[done..done + size];
                            let invalidation = if reads_ones {
                                pgm.write_phys_external(gpa, data, devices)
                            } else {
                                pgm.write_phys_handled(gpa, data, devices)
                            }
                            .map_err(memory_fault)?;
                            self.invalidation = self.invalidation.max(invalidation);
                        }
                        _ => {}
                    }
                    done += size;
                }
                Ok(())
            }
        }
    }

    /// The general-purpose register slot of `full` (RSP aside, which the backend keeps).
    #[inline]
    fn slot(&mut self, full: Register) -> Option<&mut u64> {
        let regs = self.cpu.regs_mut();
        Some(match full {
            Register::RAX => &mut regs.rax,
            Register::RCX => &mut regs.rcx,
            Register::RDX => &mut regs.rdx,
            Register::RBX => &mut regs.rbx,
            Register::RBP => &mut regs.rbp,
            Register::RSI => &mut regs.rsi,
            Register::RDI => &mut regs.rdi,
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

impl<H: AccessHandlers> Machine for VcpuMachine<'_, '_, '_, H> {
    fn gpr(&mut self, full: Register) -> u64 {
        if full == Register::RSP {
            return self.cpu.rsp();
        }
        self.slot(full).map_or(0, |slot| *slot)
    }

    fn segment_base(&mut self, segment: Register) -> u64 {
        match Segment::from_register(segment) {
            Some(Segment::Fs) => self.cpu.segment_base(Segment::Fs),
            Some(Segment::Gs) => self.cpu.segment_base(Segment::Gs),
            // The CPU ignores the other bases in 64-bit code, whatever the backend holds.
            _ if self.guest.bitness == 64 => 0,
            Some(other) => self.cpu.segment_base(other),
            None => 0,
        }
    }

    fn set_gpr(&mut self, full: Register, value: u64) {
        if full == Register::RSP {
            // A failed write leaves RSP as it was; the VMCS write fails only if the VMCS is
            // not current, which the next entry reports.
            let _ = self.cpu.set_rsp(value);
        } else if let Some(slot) = self.slot(full) {
            *slot = value;
        }
    }

    fn read(&mut self, linear: u64, data: &mut [u8]) -> Result<(), MemoryFault> {
        self.access(linear, Some(data), None)
    }

    fn write(&mut self, linear: u64, data: &[u8]) -> Result<(), MemoryFault> {
        self.access(linear, None, Some(data))
    }

    fn port_read(&mut self, port: u16, data: &mut [u8]) -> Result<(), EmulationError> {
        let ports = self.ports.as_deref_mut().ok_or(EmulationError::Unsupported)?;
        let value = ports.access(port, data.len() as u8, Direction::In, 0);
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
        Ok(())
    }

    fn port_write(&mut self, port: u16, data: &[u8]) -> Result<(), EmulationError> {
        let ports = self.ports.as_deref_mut().ok_or(EmulationError::Unsupported)?;
        let mut value = [0u8; 4];
        value[..data.len()].copy_from_slice(data);
        ports.access(port, data.len() as u8, Direction::Out, u32::from_le_bytes(value));
        Ok(())
    }

    fn cr0(&mut self) -> Option<u64> {
        self.cpu.visible_cr0().ok()
    }

    fn linear_address_bits(&mut self) -> u32 {
        if self.guest.paging == GuestPaging::Level5 {
            57
        } else {
            48
        }
    }

    fn vector(&mut self, reg: Register) -> Option<u128> {
        if reg.is_xmm() {
            Some(vector_registers::read_xmm(
                (reg as u32 - Register::XMM0 as u32) as u8,
            ))
        } else if reg.is_mm() {
            Some(u128::from(vector_registers::read_mm(
                (reg as u32 - Register::MM0 as u32) as u8,
            )))
        } else {
            None
        }
    }

    fn set_vector(&mut self, reg: Register, value: u128) -> bool {
        if reg.is_xmm() {
            vector_registers::write_xmm((reg as u32 - Register::XMM0 as u32) as u8, value);
        } else if reg.is_mm() {
            vector_registers::write_mm((reg as u32 - Register::MM0 as u32) as u8, value as u64);
        } else {
            return false;
        }
        true
    }

    fn segment(&mut self, segment: Segment) -> Option<SegmentState> {
        self.cpu.segment(segment).ok()
    }

    fn set_segment(&mut self, segment: Segment, state: SegmentState) -> bool {
        self.cpu.set_segment(segment, state).is_ok()
    }

    fn gdt(&mut self) -> Option<(u64, u16)> {
        self.cpu.gdt().ok()
    }
}
