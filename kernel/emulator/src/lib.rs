//! Instruction emulation for guest accesses the nested paging cannot simply map: MMIO and
//! access-handler pages, ROM writes that are ignored or go to the shadow, and the string port
//! I/O instructions. The vCPU loop decodes the instruction with iced-x86, and [`execute`]
//! carries it out through a [`Machine`] (which translates guest-linear addresses and routes
//! each access to `pgm` and the device handlers), updates registers and flags as the CPU
//! would, and says where the guest continues.
//!
//! Supported (see [`execute`] for the list): the data moves, the ALU group, INC/DEC/NEG/NOT,
//! XCHG, XADD, CMPXCHG, the bit tests and scans, SHLD/SHRD, the multiplies and divides,
//! CMOVcc and SETcc, PUSH/POP/CALL/RET/ENTER/LEAVE/JMP through memory, the string
//! instructions with their REP prefixes (one element per call, as the CPU restarts them),
//! INS/OUTS, SMSW, LTR, segment-register loads and stores, far JMP through memory, and the
//! SSE/MMX register moves. Anything else is [`EmulationError::Unsupported`]: the VM stops, the
//! host does not. What the CPU would fault on ([`EmulationError::Exception`], a page fault in
//! [`MemoryFault::PageFault`]) is the guest's to take.
//!
//! The crate is `no_std` and has no unsafe code, so it builds into the bare-metal kernel and is
//! tested on the host: unit tests per form, a differential test against the host CPU
//! (`tests/native.rs`) and a fuzz target (`fuzz/`).

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

mod exec;
mod flags;
mod system;

use iced_x86::{Decoder, DecoderOptions};
pub use iced_x86::{FlowControl, Instruction, Mnemonic, OpKind, Register};

pub use flags::rflags;
pub use system::{SegmentRegister, SegmentState};

/// The vCPU and guest memory as the emulator sees them. Memory is addressed by guest-linear
/// address (segment base included): the machine translates through the guest's paging and
/// reports what the guest's MMU would fault on. The optional parts say `None`/`false` when the
/// machine does not offer them, and the instructions that need them are then unsupported.
pub trait Machine {
    /// The 64-bit general-purpose register `full` (RAX ... R15, RSP).
    fn gpr(&mut self, full: Register) -> u64;
    /// Sets the 64-bit general-purpose register `full` (RSP included).
    fn set_gpr(&mut self, full: Register, value: u64);
    /// The base address of segment register `segment` (0 for ES, CS, SS and DS in 64-bit code).
    fn segment_base(&mut self, segment: Register) -> u64;
    /// Reads guest memory (devices included) at the guest-linear address `linear` into
    /// `data`. An access that spans two pages is translated in full before either is touched.
    fn read(&mut self, linear: u64, data: &mut [u8]) -> Result<(), MemoryFault>;
    /// Writes `data` to guest memory (devices included) at the guest-linear address `linear`,
    /// translated in full first as [`read`](Self::read) is.
    fn write(&mut self, linear: u64, data: &[u8]) -> Result<(), MemoryFault>;
    /// Reads `data.len()` (1, 2 or 4) bytes from I/O port `port` (INS).
    fn port_read(&mut self, _port: u16, _data: &mut [u8]) -> Result<(), EmulationError> {
        Err(EmulationError::Unsupported)
    }
    /// Writes `data` to I/O port `port` (OUTS).
    fn port_write(&mut self, _port: u16, _data: &[u8]) -> Result<(), EmulationError> {
        Err(EmulationError::Unsupported)
    }
    /// CR0 as the guest reads it (SMSW).
    fn cr0(&mut self) -> Option<u64> {
        None
    }
    /// The width of a canonical linear address in 64-bit code: 48 with 4-level paging, 57
    /// with 5-level paging (CR4.LA57).
    fn linear_address_bits(&mut self) -> u32 {
        48
    }
    /// The 128-bit value of XMM register `reg`, or the 64-bit value of MMX register `reg`.
    fn vector(&mut self, _reg: Register) -> Option<u128> {
        None
    }
    /// Sets XMM register `reg` (all 128 bits) or MMX register `reg` (the low 64); false when
    /// not offered.
    fn set_vector(&mut self, _reg: Register, _value: u128) -> bool {
        false
    }
    /// The state of segment register `segment`.
    fn segment(&mut self, _segment: SegmentRegister) -> Option<SegmentState> {
        None
    }
    /// Loads segment register `segment`; false when not offered.
    fn set_segment(&mut self, _segment: SegmentRegister, _state: SegmentState) -> bool {
        false
    }
    /// The GDTR: base and limit.
    fn gdt(&mut self) -> Option<(u64, u16)> {
        None
    }
}

/// A memory access of an emulated instruction that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryFault {
    /// The access left guest memory; the VM stops.
    NotGuestMemory,
    /// A page needed a frame and none could be had; the VM stops.
    OutOfMemory,
    /// The access reached a page the guest gave to the balloon; the VM stops.
    Ballooned,
    /// The guest's paging does not map the address: the guest takes #PF with this address
    /// (CR2) and error code.
    PageFault {
        /// The guest-linear address that faulted.
        linear: u64,
        /// The #PF error code (present, write, user bits).
        error_code: u32,
    },
    /// The machine cannot reach this address in its present state (it holds only the page
    /// the exit named); nothing was accessed, and the caller may emulate again with more.
    Retry,
}

/// Why an instruction was not emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulationError {
    /// The instruction (or this form of it) is not supported.
    Unsupported,
    /// A memory access failed.
    Memory(MemoryFault),
    /// The CPU would raise this exception: the guest takes it at the instruction.
    Exception {
        /// The vector (#DE 0, #UD 6, #SS 12, #GP 13, ...).
        vector: u8,
        /// The error code, for the vectors that push one.
        error_code: Option<u32>,
    },
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

/// Emulates `instruction` (decoded at the guest's RIP) on `machine`. `rflags` is the guest's
/// RFLAGS before. Returns the new RIP and RFLAGS; register, segment and vector-register
/// writes are made only when the whole instruction succeeded (memory written before a later
/// step failed stays written, as on the CPU).
pub fn execute(
    instruction: &Instruction,
    rflags: u64,
    machine: &mut impl Machine,
) -> Result<Outcome, EmulationError> {
    exec::execute(instruction, rflags, machine)
}

/// True when the only memory `instruction` touches is its one memory operand (read, written or
/// both; STOS, LODS and SCAS count): no stack, no second string operand, no bit string beyond the operand, no
/// descriptor table. Such an instruction faulting on a device page can be emulated holding
/// just that page; anything else may reach other memory.
pub fn touches_only_its_operand(instruction: &Instruction) -> bool {
    // The device-register moves first, cheaply: one explicit operand and a register or an
    // immediate (segment-register moves excluded).
    if matches!(
        instruction.mnemonic(),
        Mnemonic::Mov | Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd
    ) {
        let register_side = |op| match instruction.op_kind(op) {
            OpKind::Register => instruction.op_register(op).is_gpr(),
            kind => !exec::is_memory(kind),
        };
        return match (instruction.op0_kind(), instruction.op1_kind()) {
            (OpKind::Memory, _) => register_side(1),
            (_, OpKind::Memory) => register_side(0),
            _ => false,
        };
    }
    let memory_operands = (0..instruction.op_count())
        .filter(|&op| exec::is_memory(instruction.op_kind(op)))
        .count();
    let bit_string = matches!(
        instruction.mnemonic(),
        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
    ) && instruction.op1_kind() == OpKind::Register;
    let system = matches!(
        instruction.mnemonic(),
        Mnemonic::Ltr | Mnemonic::Jmp | Mnemonic::Call
    ) || instruction.op0_kind() == OpKind::Register
        && instruction.op0_register().is_segment_register();
    memory_operands == 1 && !bit_string && !system && instruction.stack_pointer_increment() == 0
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
