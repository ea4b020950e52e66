//! A fake vCPU and memory for the emulator's host tests: sixteen registers, a few pages of
//! device memory at a fixed guest-linear address (the first is "the device page"), the
//! segment and vector state the system instructions use, a port, and a log of every memory
//! access the emulator made.

#![allow(dead_code)] // Each test file uses part of it.

use emulator::{
    EmulationError, Instruction, Machine, MemoryFault, Outcome, Register, SegmentRegister, SegmentState,
};
use pgm::PAGE_SIZE;

/// How many pages the fake's memory has.
pub const PAGES: usize = 4;

/// The 64-bit general-purpose registers in encoding order.
pub const GPRS: [Register; 16] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RBX,
    Register::RSP,
    Register::RBP,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

/// One access the emulator made to memory, at an offset from the fake's base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Read { offset: u64, len: usize },
    Write { offset: u64, bytes: Vec<u8> },
}

/// The fake vCPU with its memory.
pub struct Fake {
    pub regs: [u64; 16],
    /// The guest-linear address the memory starts at (what the registers point into).
    pub linear_base: u64,
    /// `PAGES` pages.
    pub memory: Vec<u8>,
    pub log: Vec<Access>,
    /// Accesses fail with this fault when set.
    pub fault: Option<MemoryFault>,
    pub cr0: u64,
    /// The linear-address width (48; 57 with 5-level paging).
    pub linear_bits: u32,
    pub segments: [SegmentState; 7],
    pub gdt: (u64, u16),
    pub vectors: [u128; 16],
    /// Bytes read from the port (INS), and written to it (OUTS).
    pub port_in: Vec<u8>,
    pub port_out: Vec<u8>,
}

/// Index of a segment register in `Fake::segments`.
pub fn segment_index(segment: SegmentRegister) -> usize {
    segment as usize
}

impl Fake {
    pub fn new(linear_base: u64) -> Self {
        Fake {
            regs: [0; 16],
            linear_base,
            memory: vec![0; PAGES * PAGE_SIZE as usize],
            log: Vec::new(),
            fault: None,
            cr0: 0x8000_0011,
            linear_bits: 48,
            segments: [SegmentState::default(); 7],
            gdt: (0, 0),
            vectors: [0; 16],
            port_in: Vec::new(),
            port_out: Vec::new(),
        }
    }

    /// The first page.
    pub fn page(&mut self) -> &mut [u8] {
        &mut self.memory[..PAGE_SIZE as usize]
    }

    pub fn set(&mut self, reg: Register, value: u64) {
        self.set_gpr(reg, value);
    }

    pub fn get(&mut self, reg: Register) -> u64 {
        self.gpr(reg)
    }

    /// The offset of `linear` in the memory, checked for `len` bytes.
    fn offset(&self, linear: u64, len: usize) -> Result<usize, MemoryFault> {
        if let Some(fault) = self.fault {
            return Err(fault);
        }
        let offset = linear.wrapping_sub(self.linear_base);
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.memory.len() as u64)
        {
            return Err(MemoryFault::PageFault {
                linear,
                error_code: 0,
            });
        }
        Ok(offset as usize)
    }
}

fn index(reg: Register) -> usize {
    GPRS.iter()
        .position(|&r| r == reg)
        .unwrap_or_else(|| panic!("not a 64-bit GPR: {reg:?}"))
}

impl Machine for Fake {
    fn gpr(&mut self, full: Register) -> u64 {
        self.regs[index(full)]
    }

    fn segment_base(&mut self, segment: Register) -> u64 {
        match SegmentRegister::from_register(segment) {
            Some(fs_or_gs @ (SegmentRegister::Fs | SegmentRegister::Gs)) => {
                self.segments[segment_index(fs_or_gs)].base
            }
            _ => 0,
        }
    }

    fn set_gpr(&mut self, full: Register, value: u64) {
        self.regs[index(full)] = value;
    }

    fn read(&mut self, linear: u64, data: &mut [u8]) -> Result<(), MemoryFault> {
        let offset = self.offset(linear, data.len())?;
        data.copy_from_slice(&self.memory[offset..offset + data.len()]);
        self.log.push(Access::Read {
            offset: offset as u64,
            len: data.len(),
        });
        Ok(())
    }

    fn write(&mut self, linear: u64, data: &[u8]) -> Result<(), MemoryFault> {
        let offset = self.offset(linear, data.len())?;
        self.memory[offset..offset + data.len()].copy_from_slice(data);
        self.log.push(Access::Write {
            offset: offset as u64,
            bytes: data.to_vec(),
        });
        Ok(())
    }

    fn port_read(&mut self, _port: u16, data: &mut [u8]) -> Result<(), EmulationError> {
        for byte in data {
            *byte = self.port_in.pop().unwrap_or(0xFF);
        }
        Ok(())
    }

    fn port_write(&mut self, _port: u16, data: &[u8]) -> Result<(), EmulationError> {
        self.port_out.extend_from_slice(data);
        Ok(())
    }

    fn cr0(&mut self) -> Option<u64> {
        Some(self.cr0)
    }

    fn linear_address_bits(&mut self) -> u32 {
        self.linear_bits
    }

    fn vector(&mut self, reg: Register) -> Option<u128> {
        let n = if reg.is_xmm() {
            reg as usize - Register::XMM0 as usize
        } else {
            reg as usize - Register::MM0 as usize
        };
        Some(self.vectors[n])
    }

    fn set_vector(&mut self, reg: Register, value: u128) -> bool {
        let n = if reg.is_xmm() {
            reg as usize - Register::XMM0 as usize
        } else {
            reg as usize - Register::MM0 as usize
        };
        self.vectors[n] = value;
        true
    }

    fn segment(&mut self, segment: SegmentRegister) -> Option<SegmentState> {
        Some(self.segments[segment_index(segment)])
    }

    fn set_segment(&mut self, segment: SegmentRegister, state: SegmentState) -> bool {
        self.segments[segment_index(segment)] = state;
        true
    }

    fn gdt(&mut self) -> Option<(u64, u16)> {
        Some(self.gdt)
    }
}

/// Decodes 64-bit `bytes` at `ip` and emulates them once.
pub fn step(fake: &mut Fake, bytes: &[u8], ip: u64, rflags: u64) -> Result<Outcome, EmulationError> {
    let instruction: Instruction = emulator::decode(64, bytes, ip).expect("valid instruction");
    emulator::execute(&instruction, rflags, fake)
}

/// A small deterministic generator, so that a failure names a seed that reproduces it.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// The guest-linear address of the instruction's memory operand, from the fake's registers;
/// `None` when it is addressed through other than general-purpose registers (a vector index).
pub fn operand_linear(fake: &mut Fake, instruction: &Instruction) -> Option<u64> {
    use emulator::OpKind;
    let operand = (0..instruction.op_count()).find(|&op| {
        matches!(
            instruction.op_kind(op),
            OpKind::Memory | OpKind::MemoryESDI | OpKind::MemoryESEDI | OpKind::MemoryESRDI
        )
    })?;
    instruction.virtual_address(operand, 0, |reg, _, _| {
        if reg.is_segment_register() {
            return Some(0);
        }
        if !reg.is_gpr() {
            return None;
        }
        let value = fake.gpr(reg.full_register());
        Some(if reg.size() >= 8 {
            value
        } else {
            value & ((1u64 << (reg.size() * 8)) - 1)
        })
    })
}
