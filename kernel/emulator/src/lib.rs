//! Instruction emulation for guest accesses the EPT cannot simply map: MMIO and access-handler
//! pages, ROM writes that are ignored or go to the shadow. The vCPU loop decodes the faulting
//! instruction with iced-x86, and [`execute`] performs its one memory access through a
//! [`Machine`] (which routes it to `pgm` and the device handlers), updates registers and flags
//! as the CPU would, and says where the guest continues.
//!
//! Supported: MOV loads and stores of 1/2/4/8 bytes (register and immediate forms),
//! MOVZX, MOVSX, MOVSXD, OR/AND/XOR in both directions (memory destination is a
//! read-modify-write), and STOS with or without REP (one element per exit, as the CPU would
//! restart it). Anything else is [`EmulationError::Unsupported`]: the VM stops, the host does
//! not.
//!
//! The crate is `no_std` and has no unsafe code, so it builds into the bare-metal kernel and is
//! tested on the host: unit tests per form, a differential test against the host CPU
//! (`tests/native.rs`) and a fuzz target (`fuzz/`).

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
pub use iced_x86::{Instruction, OpKind, Register};
use pgm::GuestPhysAddr;

/// RFLAGS bits the emulated instructions read or change.
pub mod rflags {
    /// Carry.
    pub const CF: u64 = 1 << 0;
    /// Parity (of the low byte).
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry.
    pub const AF: u64 = 1 << 4;
    /// Zero.
    pub const ZF: u64 = 1 << 6;
    /// Sign.
    pub const SF: u64 = 1 << 7;
    /// Direction (string instructions step down when set).
    pub const DF: u64 = 1 << 10;
    /// Overflow.
    pub const OF: u64 = 1 << 11;
}
use rflags::{AF, CF, DF, OF, PF, SF, ZF};

/// The vCPU and guest memory as the emulator sees them.
pub trait Machine {
    /// The 64-bit general-purpose register `full` (RAX ... R15, RSP).
    fn gpr(&mut self, full: Register) -> u64;
    /// The base address of segment register `segment` (0 for ES, CS, SS and DS in 64-bit code).
    fn segment_base(&mut self, segment: Register) -> u64;
    /// Sets the 64-bit general-purpose register `full`.
    fn set_gpr(&mut self, full: Register, value: u64);
    /// Reads guest memory (devices included) at `gpa` into `data`.
    fn read(&mut self, gpa: GuestPhysAddr, data: &mut [u8]) -> Result<(), MemoryFault>;
    /// Writes `data` to guest memory (devices included) at `gpa`.
    fn write(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), MemoryFault>;
}

/// A memory access of an emulated instruction that failed; the VM stops with this cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryFault {
    /// The access left guest memory.
    NotGuestMemory,
    /// A page needed a frame and none could be had.
    OutOfMemory,
    /// The access reached a page the guest gave to the balloon.
    Ballooned,
}

/// Why an instruction was not emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulationError {
    /// The instruction (or this form of it) is not supported.
    Unsupported,
    /// Its memory access failed.
    Memory(MemoryFault),
}

impl From<MemoryFault> for EmulationError {
    fn from(fault: MemoryFault) -> Self {
        EmulationError::Memory(fault)
    }
}

/// What an emulated instruction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Where the guest continues (the instruction itself again for an unfinished REP).
    pub rip: u64,
    /// The guest's RFLAGS afterwards.
    pub rflags: u64,
}

/// Builds iced-x86's decoder tables (built lazily on first use, a few million ticks) at boot, so
/// the first emulated exit of a VM costs what every other one does.
pub fn warm_up() {
    let nop = [0x90];
    let _ = Decoder::new(64, &nop, DecoderOptions::NONE).decode();
}

/// Decodes the instruction at the start of `bytes`, fetched from `ip` by a CPU running
/// `bitness`-bit code (16, 32 or 64). `None` for bytes that are no valid instruction, or an
/// instruction longer than the bytes given. The emulator must act on these bytes only: the guest
/// (another vCPU, a device) may rewrite the instruction in memory while it is emulated, and the
/// CPU also executes what it fetched once.
pub fn decode(bitness: u32, bytes: &[u8], ip: u64) -> Option<Instruction> {
    let instruction = Decoder::with_ip(bitness, bytes, ip, DecoderOptions::NONE).decode();
    (!instruction.is_invalid()).then_some(instruction)
}

/// The instructions a vCPU decoded last, with the bytes and the address each was decoded from:
/// a device driver's MMIO accesses come from a few instructions run again and again (a status
/// read and a data write in turn, say), and decoding costs more than the rest of an emulated
/// access (about 370 Bochs ticks). Eight entries, placed by address.
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeCache {
    entries: [Option<Decoded>; DECODE_CACHE_ENTRIES],
}

const DECODE_CACHE_ENTRIES: usize = 8;

#[derive(Clone, Copy, Debug)]
struct Decoded {
    bitness: u32,
    /// The instruction's bytes, zero past its end (one 16-byte compare checks them all).
    bytes: u128,
    instruction: Instruction,
}

/// The first `len` (at most 16) of `bytes`, as a little-endian number zero past them.
fn prefix(bytes: &[u8], len: usize) -> u128 {
    let mut padded = [0u8; 16];
    padded[..len].copy_from_slice(&bytes[..len]);
    u128::from_le_bytes(padded)
}

/// The entry an instruction at `ip` goes to (a multiplicative hash: nearby instructions, a
/// few bytes apart, land apart).
fn entry_of(ip: u64) -> usize {
    (ip.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61) as usize % DECODE_CACHE_ENTRIES
}

impl DecodeCache {
    /// [`decode`], reusing an instruction decoded before for the same `bitness` and `ip` from
    /// the same bytes. Decoding reads an instruction's bytes and nothing past them, so bytes
    /// beyond its length may differ. Returns the instruction and whether it was reused.
    pub fn decode(&mut self, bitness: u32, bytes: &[u8], ip: u64) -> Option<(Instruction, bool)> {
        let entry = &mut self.entries[entry_of(ip)];
        let same = |kept: &&Decoded| {
            let len = kept.instruction.len();
            kept.bitness == bitness
                && kept.instruction.ip() == ip
                && bytes.len() >= len
                && prefix(bytes, len) == kept.bytes
        };
        if let Some(kept) = entry.as_ref().filter(same) {
            return Some((kept.instruction, true));
        }
        let instruction = decode(bitness, bytes, ip)?;
        *entry = Some(Decoded {
            bitness,
            bytes: prefix(bytes, instruction.len()),
            instruction,
        });
        Some((instruction, false))
    }
}

/// Emulates `instruction`, whose memory operand is at `gpa` (from the EPT violation), on
/// `machine`. `rflags` is the guest's RFLAGS before. Returns the new RIP and RFLAGS; on error
/// nothing was written back to registers (a device may have seen a read).
///
/// An operand that crosses a page boundary is [`EmulationError::Unsupported`]: its two halves
/// may lie on unrelated guest-physical pages, and the exit names only the one that faulted.
pub fn execute(
    instruction: &Instruction,
    gpa: GuestPhysAddr,
    rflags: u64,
    machine: &mut impl Machine,
) -> Result<Outcome, EmulationError> {
    let size = instruction.memory_size().size();
    let linear = operand_linear_address(instruction, machine).ok_or(EmulationError::Unsupported)?;
    let offset = linear % pgm::PAGE_SIZE;
    // The faulting byte must be the operand's first (else the operand crossed into this page).
    let starts_here = offset == gpa.page_offset();
    if !matches!(size, 1 | 2 | 4 | 8) || !starts_here || offset as usize + size > pgm::PAGE_SIZE as usize {
        return Err(EmulationError::Unsupported);
    }
    let next = Outcome {
        rip: instruction.next_ip(),
        rflags,
    };
    match instruction.mnemonic() {
        Mnemonic::Mov => mov(instruction, gpa, size, machine).map(|()| next),
        Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd => {
            let destination = gpr_operand(instruction, 0)?;
            let value = load(machine, gpa, size)?;
            let signed = instruction.mnemonic() != Mnemonic::Movzx;
            let value = if signed { sign_extend(value, size) } else { value };
            set_register(machine, destination, value);
            Ok(next)
        }
        Mnemonic::Or | Mnemonic::And | Mnemonic::Xor => logic(instruction, gpa, size, rflags, machine),
        Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => {
            stos(instruction, gpa, size, rflags, machine)
        }
        _ => Err(EmulationError::Unsupported),
    }
}

/// MOV between memory and a general-purpose register or an immediate.
fn mov(
    instruction: &Instruction,
    gpa: GuestPhysAddr,
    size: usize,
    machine: &mut impl Machine,
) -> Result<(), EmulationError> {
    if is_memory(instruction.op0_kind()) {
        let value = source_value(instruction, 1, machine)?;
        Ok(store(machine, gpa, size, value)?)
    } else {
        let destination = gpr_operand(instruction, 0)?;
        let value = load(machine, gpa, size)?;
        set_register(machine, destination, value);
        Ok(())
    }
}

/// OR, AND and XOR with memory as destination (read-modify-write) or as source.
fn logic(
    instruction: &Instruction,
    gpa: GuestPhysAddr,
    size: usize,
    rflags: u64,
    machine: &mut impl Machine,
) -> Result<Outcome, EmulationError> {
    let memory_is_destination = is_memory(instruction.op0_kind());
    let other = if memory_is_destination {
        source_value(instruction, 1, machine)?
    } else {
        let destination = gpr_operand(instruction, 0)?;
        register(machine, destination)
    };
    let memory = load(machine, gpa, size)?;
    let result = match instruction.mnemonic() {
        Mnemonic::Or => memory | other,
        Mnemonic::And => memory & other,
        _ => memory ^ other,
    } & mask(size);
    if memory_is_destination {
        store(machine, gpa, size, result)?;
    } else {
        set_register(machine, instruction.op0_register(), result);
    }
    Ok(Outcome {
        rip: instruction.next_ip(),
        rflags: logic_flags(rflags, result, size),
    })
}

/// One element of STOS: store AL/AX/EAX/RAX, step RDI by the direction flag and, under REP,
/// count RCX down; an unfinished REP resumes at the same instruction (the CPU re-executes it).
fn stos(
    instruction: &Instruction,
    gpa: GuestPhysAddr,
    size: usize,
    rflags: u64,
    machine: &mut impl Machine,
) -> Result<Outcome, EmulationError> {
    let address_mask = match instruction.op0_kind() {
        OpKind::MemoryESDI => mask(2),
        OpKind::MemoryESEDI => mask(4),
        _ => mask(8),
    };
    let rep = instruction.has_rep_prefix();
    let count = machine.gpr(Register::RCX) & address_mask;
    let outcome = |rip| Outcome { rip, rflags };
    if rep && count == 0 {
        return Ok(outcome(instruction.next_ip()));
    }
    let value = machine.gpr(Register::RAX);
    store(machine, gpa, size, value)?;
    let step = if rflags & DF != 0 {
        (size as u64).wrapping_neg()
    } else {
        size as u64
    };
    let rdi = machine.gpr(Register::RDI);
    machine.set_gpr(Register::RDI, merge(rdi, rdi.wrapping_add(step), address_mask));
    if !rep {
        return Ok(outcome(instruction.next_ip()));
    }
    let rcx = machine.gpr(Register::RCX);
    machine.set_gpr(Register::RCX, merge(rcx, count - 1, address_mask));
    let rip = if count == 1 {
        instruction.next_ip()
    } else {
        instruction.ip()
    };
    Ok(outcome(rip))
}

/// The value of operand `operand` (a register or an immediate, sign-extended as the CPU does).
fn source_value(
    instruction: &Instruction,
    operand: u32,
    machine: &mut impl Machine,
) -> Result<u64, EmulationError> {
    match instruction.op_kind(operand) {
        OpKind::Register => Ok(register(machine, gpr_operand(instruction, operand)?)),
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => Ok(instruction.immediate(operand)),
        _ => Err(EmulationError::Unsupported),
    }
}

/// Operand `operand` as a general-purpose register; anything else (a segment, control or
/// vector register) is not emulated.
fn gpr_operand(instruction: &Instruction, operand: u32) -> Result<Register, EmulationError> {
    let reg = instruction.op_register(operand);
    if instruction.op_kind(operand) == OpKind::Register && reg.is_gpr() {
        Ok(reg)
    } else {
        Err(EmulationError::Unsupported)
    }
}

/// True for an explicit memory operand (`[base + index * scale + displacement]`).
fn is_memory(kind: OpKind) -> bool {
    kind == OpKind::Memory
}

/// The guest-linear address of the instruction's memory operand (explicit, or the implicit
/// one of a string instruction), segment base included.
fn operand_linear_address(instruction: &Instruction, machine: &mut impl Machine) -> Option<u64> {
    let operand = (0..instruction.op_count()).find(|&operand| {
        matches!(
            instruction.op_kind(operand),
            OpKind::Memory | OpKind::MemoryESDI | OpKind::MemoryESEDI | OpKind::MemoryESRDI
        )
    })?;
    // Only general-purpose registers address memory here: a vector index (VSIB, as gathers
    // use) makes the form unsupported rather than a question the machine cannot answer.
    instruction.virtual_address(operand, 0, |reg, _, _| {
        if reg.is_segment_register() {
            Some(machine.segment_base(reg))
        } else if reg.is_gpr() {
            Some(register(machine, reg))
        } else {
            None
        }
    })
}

/// Reads `size` bytes at `gpa` as a little-endian value.
fn load(machine: &mut impl Machine, gpa: GuestPhysAddr, size: usize) -> Result<u64, MemoryFault> {
    let mut bytes = [0u8; 8];
    machine.read(gpa, &mut bytes[..size])?;
    Ok(u64::from_le_bytes(bytes))
}

/// Writes the low `size` bytes of `value` at `gpa`.
fn store(machine: &mut impl Machine, gpa: GuestPhysAddr, size: usize, value: u64) -> Result<(), MemoryFault> {
    machine.write(gpa, &value.to_le_bytes()[..size])
}

/// True for AH, CH, DH and BH: bits 15:8 of their full register.
fn is_high_byte(reg: Register) -> bool {
    matches!(reg, Register::AH | Register::CH | Register::DH | Register::BH)
}

/// The value of a general-purpose register of any width.
fn register(machine: &mut impl Machine, reg: Register) -> u64 {
    let full = machine.gpr(reg.full_register());
    if is_high_byte(reg) {
        (full >> 8) & 0xFF
    } else {
        full & mask(reg.size())
    }
}

/// Writes a general-purpose register of any width as the CPU does: 8- and 16-bit writes keep
/// the other bits, 32-bit writes clear bits 63:32.
fn set_register(machine: &mut impl Machine, reg: Register, value: u64) {
    let full = reg.full_register();
    let old = machine.gpr(full);
    let new = match reg.size() {
        1 if is_high_byte(reg) => merge(old, value << 8, 0xFF00),
        4 => value & 0xFFFF_FFFF,
        size => merge(old, value, mask(size)),
    };
    machine.set_gpr(full, new);
}

/// `old` with the bits under `mask` taken from `new`.
fn merge(old: u64, new: u64, mask: u64) -> u64 {
    (old & !mask) | (new & mask)
}

/// The low `size` bytes.
fn mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// `value`'s low `size` bytes, sign-extended to 64 bits.
fn sign_extend(value: u64, size: usize) -> u64 {
    let shift = 64 - size as u32 * 8;
    (((value << shift) as i64) >> shift) as u64
}

/// RFLAGS after OR/AND/XOR: CF and OF clear, SF, ZF and PF from the result, AF (undefined)
/// cleared.
fn logic_flags(rflags: u64, result: u64, size: usize) -> u64 {
    let mut flags = rflags & !(CF | OF | AF | SF | ZF | PF);
    if result == 0 {
        flags |= ZF;
    }
    if result >> (size * 8 - 1) & 1 != 0 {
        flags |= SF;
    }
    if (result as u8).count_ones().is_multiple_of(2) {
        flags |= PF;
    }
    flags
}
