//! A fake vCPU and device for the emulator's host tests: sixteen registers, one page of device
//! memory at a fixed guest-physical address, and a log of every access the emulator made.

#![allow(dead_code)] // Each test file uses part of it.

use emulator::{EmulationError, Instruction, Machine, MemoryFault, Outcome, Register};
use pgm::{GuestPhysAddr, PAGE_SIZE};

/// Where the device page sits in guest-physical space.
pub const DEVICE_GPA: u64 = 0xFEB0_0000;

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

/// One access the emulator made to the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Read { offset: u64, len: usize },
    Write { offset: u64, bytes: Vec<u8> },
}

/// The fake vCPU with its device page.
pub struct Fake {
    pub regs: [u64; 16],
    /// The guest-linear address the device page is seen at (what the registers point into).
    pub linear_base: u64,
    pub page: Box<[u8; PAGE_SIZE as usize]>,
    pub log: Vec<Access>,
    /// Accesses fail with this fault when set.
    pub fault: Option<MemoryFault>,
}

impl Fake {
    pub fn new(linear_base: u64) -> Self {
        Fake {
            regs: [0; 16],
            linear_base,
            page: Box::new([0; PAGE_SIZE as usize]),
            log: Vec::new(),
            fault: None,
        }
    }

    pub fn set(&mut self, reg: Register, value: u64) {
        self.set_gpr(reg, value);
    }

    pub fn get(&mut self, reg: Register) -> u64 {
        self.gpr(reg)
    }

    /// The guest-physical address the CPU would report for a linear address in the page.
    pub fn gpa_of(&self, linear: u64) -> GuestPhysAddr {
        GuestPhysAddr::new(DEVICE_GPA + (linear - self.linear_base) % PAGE_SIZE).unwrap()
    }

    fn offset(&self, gpa: GuestPhysAddr, len: usize) -> Result<usize, MemoryFault> {
        if let Some(fault) = self.fault {
            return Err(fault);
        }
        let offset = gpa.as_u64().wrapping_sub(DEVICE_GPA);
        assert!(
            offset + len as u64 <= PAGE_SIZE,
            "access outside the device page: {gpa:?} + {len}"
        );
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

    fn segment_base(&mut self, _: Register) -> u64 {
        0
    }

    fn set_gpr(&mut self, full: Register, value: u64) {
        self.regs[index(full)] = value;
    }

    fn read(&mut self, gpa: GuestPhysAddr, data: &mut [u8]) -> Result<(), MemoryFault> {
        let offset = self.offset(gpa, data.len())?;
        data.copy_from_slice(&self.page[offset..offset + data.len()]);
        self.log.push(Access::Read {
            offset: offset as u64,
            len: data.len(),
        });
        Ok(())
    }

    fn write(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), MemoryFault> {
        let offset = self.offset(gpa, data.len())?;
        self.page[offset..offset + data.len()].copy_from_slice(data);
        self.log.push(Access::Write {
            offset: offset as u64,
            bytes: data.to_vec(),
        });
        Ok(())
    }
}

/// Decodes 64-bit `bytes` at `ip` and emulates them once, with the fault address the CPU would
/// report for the memory operand at `linear`.
pub fn step(
    fake: &mut Fake,
    bytes: &[u8],
    ip: u64,
    linear: u64,
    rflags: u64,
) -> Result<Outcome, EmulationError> {
    let instruction: Instruction = emulator::decode(64, bytes, ip).expect("valid instruction");
    let gpa = fake.gpa_of(linear);
    emulator::execute(&instruction, gpa, rflags, fake)
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
