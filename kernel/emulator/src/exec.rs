//! The executor: one instruction's operands, its memory accesses through the [`Machine`], and
//! the register writes it keeps until the instruction has succeeded.

use iced_x86::{Code, CodeSize, ConditionCode, Instruction, Mnemonic, OpKind, Register};

use crate::flags::rflags::{AF, CF, DF, OF, PF, SF, STATUS, ZF};
use crate::flags::{self, alu, inc_dec, mask, neg, sign_extend, sign_zero_parity, with, AluOp};
use crate::system;
use crate::{EmulationError, Machine, Outcome, SegmentRegister, SegmentState};

/// #DE.
pub(crate) const DIVIDE_ERROR: u8 = 0;
/// #SS.
pub(crate) const STACK_FAULT: u8 = 12;
/// #GP.
pub(crate) const GENERAL_PROTECTION: u8 = 13;

/// The exception `vector` with error code `error_code`.
pub(crate) fn exception(vector: u8, error_code: Option<u32>) -> EmulationError {
    EmulationError::Exception { vector, error_code }
}

/// True for the operand kinds that address memory (explicit or a string operand).
pub(crate) fn is_memory(kind: OpKind) -> bool {
    matches!(
        kind,
        OpKind::Memory
            | OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::MemorySegDI
            | OpKind::MemorySegEDI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI
    )
}

/// The largest number of registers one instruction writes (DIV: RAX, RDX; POP: RSP and the
/// destination; string instructions: RSI, RDI, RCX and the accumulator).
const MAX_REGISTER_WRITES: usize = 4;

/// One instruction being executed.
pub(crate) struct Exec<'a, M> {
    pub(crate) instruction: &'a Instruction,
    pub(crate) machine: &'a mut M,
    pub(crate) rflags: u64,
    /// Where the guest continues.
    pub(crate) rip: u64,
    /// Register writes, kept until the instruction succeeded.
    written: [(Register, u64); MAX_REGISTER_WRITES],
    writes: usize,
    vector: Option<(Register, u128)>,
    pub(crate) segment: Option<(SegmentRegister, SegmentState)>,
    /// The explicit memory operand's linear address, once computed (a read-modify-write
    /// reads and writes the same operand).
    explicit: Option<u64>,
}

/// See [`crate::execute`].
pub(crate) fn execute<M: Machine>(
    instruction: &Instruction,
    rflags: u64,
    machine: &mut M,
) -> Result<Outcome, EmulationError> {
    if matches!(
        instruction.mnemonic(),
        Mnemonic::Mov | Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd
    ) {
        if let Some(done) = register_move(instruction, rflags, machine) {
            return done;
        }
    }
    let mut exec = Exec {
        instruction,
        machine,
        rflags,
        rip: instruction.next_ip(),
        written: [(Register::None, 0); MAX_REGISTER_WRITES],
        writes: 0,
        vector: None,
        segment: None,
        explicit: None,
    };
    exec.run()?;
    exec.commit()
}

impl<M: Machine> Exec<'_, M> {
    /// Carries the staged writes out: the segment and vector registers first (the machine may
    /// not offer them), then the general-purpose registers.
    #[inline]
    fn commit(&mut self) -> Result<Outcome, EmulationError> {
        if let Some((segment, state)) = self.segment {
            if !self.machine.set_segment(segment, state) {
                return Err(EmulationError::Unsupported);
            }
        }
        if let Some((reg, value)) = self.vector {
            if !self.machine.set_vector(reg, value) {
                return Err(EmulationError::Unsupported);
            }
        }
        for &(reg, value) in &self.written[..self.writes] {
            self.machine.set_gpr(reg, value);
        }
        Ok(Outcome {
            rip: self.rip,
            rflags: self.rflags,
        })
    }

    /// Dispatches on the instruction.
    fn run(&mut self) -> Result<(), EmulationError> {
        let i = self.instruction;
        // The device-register access of every driver first, before the general dispatch.
        if i.mnemonic() == Mnemonic::Mov {
            return self.mov();
        }
        if (0..i.op_count()).any(|op| is_memory(i.op_kind(op)) && i.op_kind(op) != OpKind::Memory)
            || matches!(i.mnemonic(), Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd)
            || matches!(i.mnemonic(), Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd)
        {
            return self.string();
        }
        if i.condition_code() != ConditionCode::None {
            return self.conditional();
        }
        match i.mnemonic() {
            Mnemonic::Mov => self.mov(),
            Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd => self.extend(),
            Mnemonic::Add => self.binary(AluOp::Add, true),
            Mnemonic::Adc => self.binary(AluOp::Adc, true),
            Mnemonic::Sub => self.binary(AluOp::Sub, true),
            Mnemonic::Sbb => self.binary(AluOp::Sbb, true),
            Mnemonic::And => self.binary(AluOp::And, true),
            Mnemonic::Or => self.binary(AluOp::Or, true),
            Mnemonic::Xor => self.binary(AluOp::Xor, true),
            Mnemonic::Cmp => self.binary(AluOp::Sub, false),
            Mnemonic::Test => self.binary(AluOp::And, false),
            Mnemonic::Inc | Mnemonic::Dec | Mnemonic::Neg | Mnemonic::Not => self.unary(),
            Mnemonic::Xchg => self.xchg(),
            Mnemonic::Xadd => self.xadd(),
            Mnemonic::Cmpxchg => self.cmpxchg(),
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc => self.bit_test(),
            Mnemonic::Bsf | Mnemonic::Bsr => self.bit_scan(),
            Mnemonic::Shld | Mnemonic::Shrd => self.double_shift(),
            Mnemonic::Imul if i.op_count() > 1 => self.imul_truncated(),
            Mnemonic::Mul | Mnemonic::Imul => self.multiply(),
            Mnemonic::Div | Mnemonic::Idiv => self.divide(),
            Mnemonic::Push => self.push(),
            Mnemonic::Pop => self.pop(),
            Mnemonic::Ret => self.ret(),
            Mnemonic::Leave => self.leave(),
            Mnemonic::Enter => self.enter(),
            Mnemonic::Call if !i.is_call_far() && !i.is_call_far_indirect() => self.call(),
            Mnemonic::Jmp if i.is_jmp_far_indirect() => self.far_jump(),
            Mnemonic::Jmp if i.is_jmp_near_indirect() => self.jump(),
            Mnemonic::Smsw => self.smsw(),
            Mnemonic::Ltr => self.ltr(),
            Mnemonic::Movdqu
            | Mnemonic::Movdqa
            | Mnemonic::Movups
            | Mnemonic::Movaps
            | Mnemonic::Movupd
            | Mnemonic::Movapd
            | Mnemonic::Movq
            | Mnemonic::Movd => self.vector_move(),
            _ => Err(EmulationError::Unsupported),
        }
    }

    // ---- Registers, operands, memory ----

    /// 16, 32 or 64.
    #[inline]
    fn bitness(&self) -> u32 {
        match self.instruction.code_size() {
            CodeSize::Code16 => 16,
            CodeSize::Code32 => 32,
            _ => 64,
        }
    }

    /// The full register's value, with this instruction's earlier writes.
    #[inline]
    fn full(&mut self, full: Register) -> u64 {
        if self.writes == 0 {
            return self.machine.gpr(full);
        }
        match self.written[..self.writes]
            .iter()
            .rev()
            .find(|(reg, _)| *reg == full)
        {
            Some(&(_, value)) => value,
            None => self.machine.gpr(full),
        }
    }

    /// Stages a write of the full register.
    #[inline]
    fn set_full(&mut self, full: Register, value: u64) {
        if let Some(slot) = self.written[..self.writes]
            .iter_mut()
            .find(|(reg, _)| *reg == full)
        {
            slot.1 = value;
            return;
        }
        // Every instruction here writes at most MAX_REGISTER_WRITES distinct registers; should
        // one ever write more, the rest go straight to the machine rather than panic the host.
        match self.written.get_mut(self.writes) {
            Some(slot) => {
                *slot = (full, value);
                self.writes += 1;
            }
            None => self.machine.set_gpr(full, value),
        }
    }

    /// A general-purpose register of any width.
    #[inline]
    pub(crate) fn reg(&mut self, reg: Register) -> u64 {
        let full = self.full(reg.full_register());
        if is_high_byte(reg) {
            (full >> 8) & 0xFF
        } else {
            full & mask(reg.size())
        }
    }

    /// Writes a general-purpose register as the CPU does: 8- and 16-bit writes keep the other
    /// bits, 32-bit writes clear bits 63:32.
    #[inline]
    pub(crate) fn set_reg(&mut self, reg: Register, value: u64) {
        let full = reg.full_register();
        let old = self.full(full);
        let new = match reg.size() {
            1 if is_high_byte(reg) => merge(old, value << 8, 0xFF00),
            4 => value & 0xFFFF_FFFF,
            size => merge(old, value, mask(size)),
        };
        self.set_full(full, new);
    }

    /// True when `address` is canonical: its bits above the machine's linear-address width
    /// repeat the top one.
    fn canonical(&mut self, address: u64) -> bool {
        let unused = 64 - self.machine.linear_address_bits();
        ((address << unused) as i64 >> unused) as u64 == address
    }

    /// Masks an effective address to the code's address width (64-bit addresses are checked
    /// for canonical form: #GP(0), or #SS(0) through SS).
    #[inline]
    fn linear(&mut self, address: u64, through_stack: impl FnOnce() -> bool) -> Result<u64, EmulationError> {
        if self.bitness() != 64 {
            return Ok(address & 0xFFFF_FFFF);
        }
        if !self.canonical(address) {
            let vector = if through_stack() {
                STACK_FAULT
            } else {
                GENERAL_PROTECTION
            };
            return Err(exception(vector, Some(0)));
        }
        Ok(address)
    }

    /// The guest-linear address of memory operand `op` (element 0 of a string operand).
    #[inline]
    pub(crate) fn address(&mut self, op: u32) -> Result<u64, EmulationError> {
        let i = self.instruction;
        let explicit = i.op_kind(op) == OpKind::Memory;
        if let Some(linear) = self.explicit.filter(|_| explicit) {
            return Ok(linear);
        }
        let linear = self.compute_address(op)?;
        if explicit {
            self.explicit = Some(linear);
        }
        Ok(linear)
    }

    /// [`address`](Self::address), computed.
    fn compute_address(&mut self, op: u32) -> Result<u64, EmulationError> {
        let i = self.instruction;
        if let Some(address) = self.plain_address(op) {
            return self.linear(address, || i.memory_segment() == Register::SS);
        }
        let address = i
            .virtual_address(op, 0, |reg, _, _| {
                if reg.is_segment_register() {
                    Some(self.machine.segment_base(reg))
                } else if reg.is_gpr() {
                    Some(self.reg(reg))
                } else {
                    None
                }
            })
            .ok_or(EmulationError::Unsupported)?;
        self.linear(address, || i.memory_segment() == Register::SS)
    }

    /// [`plain_address`] with this instruction's staged register writes.
    #[inline]
    fn plain_address(&mut self, op: u32) -> Option<u64> {
        plain_address(self.instruction, op, |reg| {
            if reg.is_segment_register() {
                self.machine.segment_base(reg)
            } else {
                self.reg(reg)
            }
        })
    }

    /// The index of the explicit memory operand.
    fn memory_operand(&self) -> Result<u32, EmulationError> {
        let i = self.instruction;
        (0..i.op_count())
            .find(|&op| i.op_kind(op) == OpKind::Memory)
            .ok_or(EmulationError::Unsupported)
    }

    /// Reads `size` (at most 8) bytes at `linear`.
    #[inline]
    pub(crate) fn load(&mut self, linear: u64, size: usize) -> Result<u64, EmulationError> {
        let mut bytes = [0u8; 8];
        self.machine.read(linear, &mut bytes[..size])?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// Writes the low `size` bytes of `value` at `linear`.
    #[inline]
    pub(crate) fn store(&mut self, linear: u64, size: usize, value: u64) -> Result<(), EmulationError> {
        Ok(self.machine.write(linear, &value.to_le_bytes()[..size])?)
    }

    /// The size in bytes of operand `op`.
    #[inline]
    fn size_of(&self, op: u32) -> usize {
        let i = self.instruction;
        match i.op_kind(op) {
            OpKind::Register => i.op_register(op).size(),
            kind if is_memory(kind) => i.memory_size().size(),
            _ => i.op0_register().size().max(1),
        }
    }

    /// The value of operand `op`: a register, an immediate (sign-extended as the CPU does) or
    /// memory.
    #[inline]
    fn get(&mut self, op: u32) -> Result<u64, EmulationError> {
        let i = self.instruction;
        match i.op_kind(op) {
            OpKind::Register => {
                let reg = i.op_register(op);
                if reg.is_gpr() {
                    Ok(self.reg(reg))
                } else if let Some(segment) = SegmentRegister::from_register(reg) {
                    let state = self.machine.segment(segment).ok_or(EmulationError::Unsupported)?;
                    Ok(u64::from(state.selector))
                } else {
                    Err(EmulationError::Unsupported)
                }
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => Ok(i.immediate(op)),
            OpKind::Memory => self.load_operand(op),
            _ => Err(EmulationError::Unsupported),
        }
    }

    /// Reads the explicit memory operand `op` (1, 2, 4 or 8 bytes).
    #[inline]
    fn load_operand(&mut self, op: u32) -> Result<u64, EmulationError> {
        let size = self.instruction.memory_size().size();
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(EmulationError::Unsupported);
        }
        let linear = self.address(op)?;
        self.load(linear, size)
    }

    /// Writes `value` to the explicit memory operand `op` (1, 2, 4 or 8 bytes).
    #[inline]
    fn store_operand(&mut self, op: u32, value: u64) -> Result<(), EmulationError> {
        let size = self.instruction.memory_size().size();
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(EmulationError::Unsupported);
        }
        let linear = self.address(op)?;
        self.store(linear, size, value)
    }

    /// Writes `value` to operand `op` (a general-purpose register or memory).
    #[inline]
    fn put(&mut self, op: u32, value: u64) -> Result<(), EmulationError> {
        let i = self.instruction;
        match i.op_kind(op) {
            OpKind::Register if i.op_register(op).is_gpr() => {
                self.set_reg(i.op_register(op), value);
                Ok(())
            }
            OpKind::Memory => self.store_operand(op, value),
            _ => Err(EmulationError::Unsupported),
        }
    }

    /// Sets the status flags under `changed` from `new`.
    fn flags(&mut self, changed: u64, new: u64) {
        self.rflags = with(self.rflags, changed, new);
    }

    // ---- Data moves and the ALU ----

    /// MOV between memory and a general-purpose register, an immediate or a segment register
    /// (a store of the selector, or a segment load).
    fn mov(&mut self) -> Result<(), EmulationError> {
        let i = self.instruction;
        match (i.op0_kind(), i.op1_kind()) {
            // A device register's store and load: the commonest exit, spelled out.
            (OpKind::Memory, OpKind::Register) if i.op1_register().is_gpr() => {
                let value = self.reg(i.op1_register());
                self.store_operand(0, value)
            }
            (OpKind::Register, OpKind::Memory) if i.op0_register().is_gpr() => {
                let value = self.load_operand(1)?;
                self.set_reg(i.op0_register(), value);
                Ok(())
            }
            (OpKind::Register, _) if i.op0_register().is_segment_register() => {
                let selector = self.get(1)? as u16;
                system::load_segment(self, i.op0_register(), selector)
            }
            _ => {
                let value = self.get(1)?;
                self.put(0, value)
            }
        }
    }

    /// MOVZX, MOVSX, MOVSXD.
    fn extend(&mut self) -> Result<(), EmulationError> {
        let size = self.size_of(1);
        let value = self.get(1)?;
        let value = if self.instruction.mnemonic() == Mnemonic::Movzx {
            value
        } else {
            sign_extend(value, size)
        };
        self.put(0, value)
    }

    /// The ALU group; `write` false for CMP and TEST.
    fn binary(&mut self, op: AluOp, write: bool) -> Result<(), EmulationError> {
        let size = self.size_of(0);
        let (a, b) = (self.get(0)?, self.get(1)?);
        let (result, rflags) = alu(op, a, b, size, self.rflags);
        if write {
            self.put(0, result)?;
        }
        self.rflags = rflags;
        Ok(())
    }

    /// INC, DEC, NEG, NOT.
    fn unary(&mut self) -> Result<(), EmulationError> {
        let size = self.size_of(0);
        let value = self.get(0)?;
        let (result, rflags) = match self.instruction.mnemonic() {
            Mnemonic::Inc => inc_dec(value, true, size, self.rflags),
            Mnemonic::Dec => inc_dec(value, false, size, self.rflags),
            Mnemonic::Neg => neg(value, size, self.rflags),
            _ => (!value & mask(size), self.rflags),
        };
        self.put(0, result)?;
        self.rflags = rflags;
        Ok(())
    }

    /// XCHG of memory and a register.
    fn xchg(&mut self) -> Result<(), EmulationError> {
        let (a, b) = (self.get(0)?, self.get(1)?);
        self.put(0, b)?;
        self.put(1, a)
    }

    /// XADD: the destination gets the sum, the source the destination's old value.
    fn xadd(&mut self) -> Result<(), EmulationError> {
        let size = self.size_of(0);
        let (destination, source) = (self.get(0)?, self.get(1)?);
        let (sum, rflags) = alu(AluOp::Add, destination, source, size, self.rflags);
        self.put(0, sum)?;
        self.put(1, destination)?;
        self.rflags = rflags;
        Ok(())
    }

    /// CMPXCHG: compares the accumulator with the destination; equal, the destination takes
    /// the source; else the accumulator takes the destination (which is written back with
    /// its own value, as the processor's bus cycle does).
    fn cmpxchg(&mut self) -> Result<(), EmulationError> {
        let size = self.size_of(0);
        let accumulator = accumulator(size);
        let (destination, source) = (self.get(0)?, self.get(1)?);
        let compared = self.reg(accumulator);
        let (_, rflags) = alu(AluOp::Sub, compared, destination, size, self.rflags);
        if rflags & ZF != 0 {
            self.put(0, source)?;
        } else {
            self.put(0, destination)?;
            self.set_reg(accumulator, destination);
        }
        self.rflags = rflags;
        Ok(())
    }

    /// BT, BTS, BTR, BTC. With a register offset the bit may lie beyond the operand: the
    /// offset is signed and selects the operand-sized unit it falls in.
    fn bit_test(&mut self) -> Result<(), EmulationError> {
        let i = self.instruction;
        let size = self.size_of(0);
        let bits = size as u64 * 8;
        let offset = self.get(1)?;
        let (linear, bit) = if i.op0_kind() == OpKind::Memory {
            let base = self.address(0)?;
            if i.op1_kind() == OpKind::Register {
                let signed = sign_extend(offset, size) as i64;
                let unit = signed.div_euclid(bits as i64);
                let at = base.wrapping_add(unit.wrapping_mul(size as i64) as u64);
                (
                    Some(self.linear(at, || false)?),
                    signed.rem_euclid(bits as i64) as u64,
                )
            } else {
                (Some(base), offset % bits)
            }
        } else {
            (None, offset % bits)
        };
        let value = match linear {
            Some(at) => self.load(at, size)?,
            None => self.get(0)?,
        };
        let carry = value >> bit & 1;
        let new = match i.mnemonic() {
            Mnemonic::Bts => value | 1 << bit,
            Mnemonic::Btr => value & !(1 << bit),
            Mnemonic::Btc => value ^ 1 << bit,
            _ => value,
        };
        if i.mnemonic() != Mnemonic::Bt {
            match linear {
                Some(at) => self.store(at, size, new)?,
                None => self.put(0, new)?,
            }
        }
        self.flags(CF, carry);
        Ok(())
    }

    /// BSF, BSR: a zero source sets ZF and leaves the destination alone.
    fn bit_scan(&mut self) -> Result<(), EmulationError> {
        let source = self.get(1)?;
        if source == 0 {
            self.flags(ZF, ZF);
            return Ok(());
        }
        let index = if self.instruction.mnemonic() == Mnemonic::Bsf {
            source.trailing_zeros()
        } else {
            63 - source.leading_zeros()
        };
        self.put(0, u64::from(index))?;
        self.flags(ZF, 0);
        Ok(())
    }

    /// SHLD, SHRD: the destination shifted, filled from the source; the count is masked to 5
    /// bits (6 for 64-bit operands), and a zero count changes nothing.
    fn double_shift(&mut self) -> Result<(), EmulationError> {
        let size = self.size_of(0);
        let bits = size as u32 * 8;
        let count = (self.get(2)? as u32) & if size == 8 { 63 } else { 31 };
        if count == 0 {
            return Ok(());
        }
        if count > bits {
            // Undefined for 16-bit operands; no guest relies on it.
            return Err(EmulationError::Unsupported);
        }
        let (destination, source) = (self.get(0)?, self.get(1)?);
        let both = if self.instruction.mnemonic() == Mnemonic::Shld {
            (u128::from(destination) << bits | u128::from(source)) << count >> bits
        } else {
            (u128::from(source) << bits | u128::from(destination)) >> count
        };
        let result = both as u64 & mask(size);
        let carry = if self.instruction.mnemonic() == Mnemonic::Shld {
            destination >> (bits - count) & 1
        } else {
            destination >> (count - 1) & 1
        };
        self.put(0, result)?;
        let overflow = if (result ^ destination) >> (bits - 1) & 1 != 0 {
            OF
        } else {
            0
        };
        self.flags(STATUS & !AF, sign_zero_parity(result, size) | carry | overflow);
        Ok(())
    }

    /// IMUL with two or three operands: the truncated signed product; CF and OF set when it
    /// did not fit.
    fn imul_truncated(&mut self) -> Result<(), EmulationError> {
        let i = self.instruction;
        let size = self.size_of(0);
        let (a, b) = if i.op_count() == 3 {
            (self.get(1)?, self.get(2)?)
        } else {
            (self.get(0)?, self.get(1)?)
        };
        let product = i128::from(sign_extend(a, size) as i64) * i128::from(sign_extend(b, size) as i64);
        let result = product as u64 & mask(size);
        let overflowed = i128::from(sign_extend(result, size) as i64) != product;
        self.put(0, result)?;
        let carry = if overflowed { CF | OF } else { 0 };
        self.flags(CF | OF | SF | ZF | PF, carry | sign_zero_parity(result, size));
        Ok(())
    }

    /// The one-operand MUL and IMUL: rDX:rAX (AX for bytes) takes the full product.
    fn multiply(&mut self) -> Result<(), EmulationError> {
        let size = self.size_of(0);
        let source = self.get(0)?;
        let multiplier = self.reg(accumulator(size));
        let signed = self.instruction.mnemonic() == Mnemonic::Imul;
        let product = if signed {
            (i128::from(sign_extend(source, size) as i64) * i128::from(sign_extend(multiplier, size) as i64))
                as u128
        } else {
            u128::from(source) * u128::from(multiplier)
        };
        let bits = size as u32 * 8;
        let low = product as u64 & mask(size);
        let high = (product >> bits) as u64 & mask(size);
        let overflowed = if signed {
            high != if sign_extend(low, size) >> 63 != 0 {
                mask(size)
            } else {
                0
            }
        } else {
            high != 0
        };
        self.set_product(size, low, high);
        let carry = if overflowed { CF | OF } else { 0 };
        self.flags(CF | OF | SF | ZF | PF, carry | sign_zero_parity(low, size));
        Ok(())
    }

    /// DIV, IDIV: rDX:rAX (AX for bytes) divided by the operand; #DE on a zero divisor or a
    /// quotient that does not fit.
    fn divide(&mut self) -> Result<(), EmulationError> {
        let size = self.size_of(0);
        let bits = size as u32 * 8;
        let divisor = self.get(0)?;
        if divisor == 0 {
            return Err(exception(DIVIDE_ERROR, None));
        }
        let (low, high) = if size == 1 {
            let ax = self.reg(Register::AX);
            (ax & 0xFF, ax >> 8)
        } else {
            (self.reg(accumulator(size)), self.reg(data_register(size)))
        };
        let dividend = u128::from(high) << bits | u128::from(low);
        let (quotient, remainder) = if self.instruction.mnemonic() == Mnemonic::Idiv {
            let shift = 128 - 2 * bits;
            let dividend = ((dividend << shift) as i128) >> shift;
            let divisor = i128::from(sign_extend(divisor, size) as i64);
            let quotient = dividend
                .checked_div(divisor)
                .ok_or(exception(DIVIDE_ERROR, None))?;
            let limit = 1i128 << (bits - 1);
            if quotient >= limit || quotient < -limit {
                return Err(exception(DIVIDE_ERROR, None));
            }
            (
                quotient as u64 & mask(size),
                (dividend % divisor) as u64 & mask(size),
            )
        } else {
            let quotient = dividend / u128::from(divisor);
            if quotient > u128::from(mask(size)) {
                return Err(exception(DIVIDE_ERROR, None));
            }
            (quotient as u64, (dividend % u128::from(divisor)) as u64)
        };
        self.set_product(size, quotient, remainder);
        Ok(())
    }

    /// Writes a double-width result: AL and AH for bytes, else rAX and rDX.
    fn set_product(&mut self, size: usize, low: u64, high: u64) {
        if size == 1 {
            self.set_reg(Register::AX, high << 8 | low);
        } else {
            self.set_reg(accumulator(size), low);
            self.set_reg(data_register(size), high);
        }
    }

    /// CMOVcc (the source is read whatever the condition; a 32-bit destination is written
    /// even when the condition fails, clearing its upper half), SETcc.
    fn conditional(&mut self) -> Result<(), EmulationError> {
        let holds = flags::condition(self.instruction.condition_code() as u8 - 1, self.rflags);
        match self.instruction.mnemonic() {
            Mnemonic::Seto
            | Mnemonic::Setno
            | Mnemonic::Setb
            | Mnemonic::Setae
            | Mnemonic::Sete
            | Mnemonic::Setne
            | Mnemonic::Setbe
            | Mnemonic::Seta
            | Mnemonic::Sets
            | Mnemonic::Setns
            | Mnemonic::Setp
            | Mnemonic::Setnp
            | Mnemonic::Setl
            | Mnemonic::Setge
            | Mnemonic::Setle
            | Mnemonic::Setg => self.put(0, u64::from(holds)),
            Mnemonic::Cmovo
            | Mnemonic::Cmovno
            | Mnemonic::Cmovb
            | Mnemonic::Cmovae
            | Mnemonic::Cmove
            | Mnemonic::Cmovne
            | Mnemonic::Cmovbe
            | Mnemonic::Cmova
            | Mnemonic::Cmovs
            | Mnemonic::Cmovns
            | Mnemonic::Cmovp
            | Mnemonic::Cmovnp
            | Mnemonic::Cmovl
            | Mnemonic::Cmovge
            | Mnemonic::Cmovle
            | Mnemonic::Cmovg => {
                let source = self.get(1)?;
                let value = if holds { source } else { self.get(0)? };
                self.put(0, value)
            }
            _ => Err(EmulationError::Unsupported),
        }
    }

    // ---- The stack and control transfers ----

    /// The stack pointer register as wide as the code's stack addressing (SS.B is assumed to
    /// match the code segment's default size outside 64-bit code).
    fn stack_pointer(&self) -> Register {
        match self.bitness() {
            64 => Register::RSP,
            32 => Register::ESP,
            _ => Register::SP,
        }
    }

    /// The linear address of stack offset `rsp` (SS base added outside 64-bit code).
    fn stack_linear(&mut self, rsp: u64) -> Result<u64, EmulationError> {
        let base = self.machine.segment_base(Register::SS);
        self.linear(base.wrapping_add(rsp), || true)
    }

    /// Pushes the low `size` bytes of `value`.
    fn push_value(&mut self, value: u64, size: usize) -> Result<(), EmulationError> {
        let sp = self.stack_pointer();
        let rsp = self.reg(sp).wrapping_sub(size as u64) & mask(sp.size());
        let linear = self.stack_linear(rsp)?;
        self.store(linear, size, value)?;
        self.set_reg(sp, rsp);
        Ok(())
    }

    /// Pops `size` bytes.
    fn pop_value(&mut self, size: usize) -> Result<u64, EmulationError> {
        let sp = self.stack_pointer();
        let rsp = self.reg(sp);
        let linear = self.stack_linear(rsp)?;
        let value = self.load(linear, size)?;
        self.set_reg(sp, rsp.wrapping_add(size as u64));
        Ok(value)
    }

    /// The size of the value a stack instruction moves.
    fn stack_size(&self) -> usize {
        self.instruction.stack_pointer_increment().unsigned_abs() as usize
    }

    /// PUSH of memory, a register or an immediate (onto a stack in emulated memory).
    fn push(&mut self) -> Result<(), EmulationError> {
        let size = self.stack_size();
        if self.instruction.op0_kind() == OpKind::Register && !self.instruction.op0_register().is_gpr() {
            return Err(EmulationError::Unsupported);
        }
        let value = self.get(0)?;
        self.push_value(value, size)
    }

    /// POP into memory or a register; a memory destination addressed through RSP is
    /// computed after the increment, as the CPU does.
    fn pop(&mut self) -> Result<(), EmulationError> {
        let size = self.stack_size();
        let value = self.pop_value(size)?;
        self.put(0, value)
    }

    /// A near branch to `target` (#GP(0) for a non-canonical one, at the branch).
    fn branch(&mut self, target: u64) -> Result<(), EmulationError> {
        let target = match self.bitness() {
            64 => target,
            32 => target & 0xFFFF_FFFF,
            _ => target & 0xFFFF,
        };
        if self.bitness() == 64 && !self.canonical(target) {
            return Err(exception(GENERAL_PROTECTION, Some(0)));
        }
        self.rip = target;
        Ok(())
    }

    /// The near RET, with its optional release of stack bytes.
    fn ret(&mut self) -> Result<(), EmulationError> {
        let size = self.branch_size();
        let target = self.pop_value(size)?;
        if self.instruction.op_count() == 1 {
            let sp = self.stack_pointer();
            let rsp = self.reg(sp).wrapping_add(self.instruction.immediate(0));
            self.set_reg(sp, rsp);
        }
        self.branch(target)
    }

    /// The size of a return address: 8 in 64-bit code, else the operand size.
    fn branch_size(&self) -> usize {
        let increment = self.instruction.stack_pointer_increment().unsigned_abs() as usize;
        match self.bitness() {
            64 => 8,
            _ if increment == 2 || increment == 4 => increment,
            bits => bits as usize / 8,
        }
    }

    /// LEAVE: RSP from RBP, then RBP popped.
    fn leave(&mut self) -> Result<(), EmulationError> {
        let sp = self.stack_pointer();
        let size = frame_size(self.instruction);
        let frame = self.reg(frame_register(sp.size()));
        self.set_reg(sp, frame);
        let saved = self.pop_value(size)?;
        self.set_reg(frame_register(size), saved);
        Ok(())
    }

    /// ENTER with nesting level 0: RBP pushed, RBP set to the frame, RSP lowered.
    fn enter(&mut self) -> Result<(), EmulationError> {
        let i = self.instruction;
        if i.immediate8_2nd() & 31 != 0 {
            return Err(EmulationError::Unsupported);
        }
        let size = frame_size(i);
        let saved = self.reg(frame_register(size));
        self.push_value(saved, size)?;
        let sp = self.stack_pointer();
        let frame = self.reg(sp);
        let locals = i.immediate(0) & 0xFFFF;
        self.set_reg(frame_register(sp.size()), frame);
        self.set_reg(sp, frame.wrapping_sub(locals));
        Ok(())
    }

    /// A near CALL (the return address pushed onto emulated memory, or the target read from
    /// it).
    fn call(&mut self) -> Result<(), EmulationError> {
        let i = self.instruction;
        let target = if i.is_call_near_indirect() {
            self.get(0)?
        } else {
            i.near_branch_target()
        };
        let size = self.branch_size();
        self.push_value(i.next_ip(), size)?;
        self.branch(target)
    }

    /// A near JMP through memory.
    fn jump(&mut self) -> Result<(), EmulationError> {
        let target = self.get(0)?;
        self.branch(target)
    }

    /// A far JMP through a pointer in memory (offset, then selector): CS is loaded from the
    /// descriptor tables.
    fn far_jump(&mut self) -> Result<(), EmulationError> {
        let op = self.memory_operand()?;
        let pointer = self.address(op)?;
        // m16:16, m16:32 or m16:64: the offset, then the selector.
        let offset_size = match self.instruction.memory_size().size().checked_sub(2) {
            Some(size @ (2 | 4 | 8)) => size,
            _ => return Err(EmulationError::Unsupported),
        };
        let offset = self.load(pointer, offset_size)?;
        let selector_at = self.linear(pointer.wrapping_add(offset_size as u64), || false)?;
        let selector = self.load(selector_at, 2)? as u16;
        system::load_segment(self, Register::CS, selector)?;
        let long = self.segment.is_some_and(|(_, state)| state.long());
        self.rip = if long { offset } else { offset & mask(offset_size) };
        Ok(())
    }

    // ---- System instructions ----

    /// SMSW to memory: the low 16 bits of CR0.
    fn smsw(&mut self) -> Result<(), EmulationError> {
        let cr0 = self.machine.cr0().ok_or(EmulationError::Unsupported)?;
        self.put(0, cr0 & 0xFFFF)
    }

    /// LTR from memory.
    fn ltr(&mut self) -> Result<(), EmulationError> {
        let selector = self.get(0)? as u16;
        system::load_task_register(self, selector)
    }

    // ---- Vector registers ----

    /// The SSE and MMX moves between a register and memory; the aligned forms raise #GP(0)
    /// on an unaligned address.
    fn vector_move(&mut self) -> Result<(), EmulationError> {
        let i = self.instruction;
        let op = self.memory_operand()?;
        let size = i.memory_size().size();
        if !matches!(size, 4 | 8 | 16) || i.op_count() != 2 {
            return Err(EmulationError::Unsupported);
        }
        let reg_op = 1 - op;
        let reg = i.op_register(reg_op);
        let is_vector = reg.is_xmm() || reg.is_mm();
        if i.op_kind(reg_op) != OpKind::Register || !is_vector {
            return Err(EmulationError::Unsupported);
        }
        let linear = self.address(op)?;
        let aligned = matches!(
            i.mnemonic(),
            Mnemonic::Movdqa | Mnemonic::Movaps | Mnemonic::Movapd
        );
        if aligned && linear % 16 != 0 {
            return Err(exception(GENERAL_PROTECTION, Some(0)));
        }
        let mut bytes = [0u8; 16];
        if op == 0 {
            let value = self.machine.vector(reg).ok_or(EmulationError::Unsupported)?;
            bytes = value.to_le_bytes();
            self.machine.write(linear, &bytes[..size])?;
        } else {
            self.machine.read(linear, &mut bytes[..size])?;
            // A load into an XMM register of less than 16 bytes (MOVD, MOVQ) zeroes the rest.
            self.vector = Some((reg, u128::from_le_bytes(bytes)));
        }
        Ok(())
    }

    // ---- String instructions ----

    /// One element of MOVS, CMPS, SCAS, LODS, STOS, INS or OUTS: RSI and RDI step by the
    /// direction flag and, under a REP prefix, RCX counts down; an unfinished REP resumes at
    /// the same instruction (the CPU re-executes it, taking interrupts in between).
    fn string(&mut self) -> Result<(), EmulationError> {
        let i = self.instruction;
        let address_size = self.string_address_size();
        let counter = match address_size {
            2 => Register::CX,
            4 => Register::ECX,
            _ => Register::RCX,
        };
        let address_mask = mask(address_size);
        let rep = i.has_rep_prefix() || i.has_repne_prefix();
        let count = self.reg(counter);
        if rep && count == 0 {
            return Ok(());
        }
        let size = i.memory_size().size();
        let step = if self.rflags & DF != 0 {
            (size as u64).wrapping_neg()
        } else {
            size as u64
        };
        let advance = |exec: &mut Self, index: Register| {
            let full = index.full_register();
            let value = exec.full(full);
            exec.set_full(full, merge(value, value.wrapping_add(step), address_mask));
        };
        let mnemonic = i.mnemonic();
        let compares = matches!(
            mnemonic,
            Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd | Mnemonic::Cmpsq
        ) || matches!(
            mnemonic,
            Mnemonic::Scasb | Mnemonic::Scasw | Mnemonic::Scasd | Mnemonic::Scasq
        );
        match mnemonic {
            Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => {
                let (from, to) = (self.address(1)?, self.address(0)?);
                let value = self.load(from, size)?;
                self.store(to, size, value)?;
                advance(self, Register::RSI);
                advance(self, Register::RDI);
            }
            Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd | Mnemonic::Cmpsq => {
                let (first, second) = (self.address(0)?, self.address(1)?);
                let a = self.load(first, size)?;
                let b = self.load(second, size)?;
                self.rflags = alu(AluOp::Sub, a, b, size, self.rflags).1;
                advance(self, Register::RSI);
                advance(self, Register::RDI);
            }
            Mnemonic::Scasb | Mnemonic::Scasw | Mnemonic::Scasd | Mnemonic::Scasq => {
                let at = self.address(1)?;
                let value = self.load(at, size)?;
                let a = self.reg(accumulator(size));
                self.rflags = alu(AluOp::Sub, a, value, size, self.rflags).1;
                advance(self, Register::RDI);
            }
            Mnemonic::Lodsb | Mnemonic::Lodsw | Mnemonic::Lodsd | Mnemonic::Lodsq => {
                let at = self.address(1)?;
                let value = self.load(at, size)?;
                self.set_reg(accumulator(size), value);
                advance(self, Register::RSI);
            }
            Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => {
                let at = self.address(0)?;
                let value = self.reg(accumulator(size));
                self.store(at, size, value)?;
                advance(self, Register::RDI);
            }
            Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => {
                let at = self.address(0)?;
                let port = self.reg(Register::DX) as u16;
                let mut bytes = [0u8; 4];
                self.machine.port_read(port, &mut bytes[..size])?;
                self.machine.write(at, &bytes[..size])?;
                advance(self, Register::RDI);
            }
            Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => {
                let at = self.address(1)?;
                let port = self.reg(Register::DX) as u16;
                let mut bytes = [0u8; 4];
                self.machine.read(at, &mut bytes[..size])?;
                self.machine.port_write(port, &bytes[..size])?;
                advance(self, Register::RSI);
            }
            _ => return Err(EmulationError::Unsupported),
        }
        if !rep {
            return Ok(());
        }
        let left = count.wrapping_sub(1) & address_mask;
        self.set_reg(counter, left);
        let stopped_by_compare = compares
            && if i.has_repne_prefix() {
                self.rflags & ZF != 0
            } else {
                self.rflags & ZF == 0
            };
        if left != 0 && !stopped_by_compare {
            self.rip = i.ip();
        }
        Ok(())
    }

    /// The address size of a string instruction (2, 4 or 8), from its memory operand kind.
    fn string_address_size(&self) -> usize {
        let i = self.instruction;
        let kinds = (0..i.op_count()).map(|op| i.op_kind(op));
        for kind in kinds {
            match kind {
                OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI => return 2,
                OpKind::MemorySegESI | OpKind::MemorySegEDI | OpKind::MemoryESEDI => return 4,
                OpKind::MemorySegRSI | OpKind::MemorySegRDI | OpKind::MemoryESRDI => return 8,
                _ => {}
            }
        }
        8
    }
}

/// The guest-linear address of explicit memory operand `op` in its commonest shape, computed
/// here rather than by iced-x86's general `virtual_address` (which serves every operand kind
/// and costs an MMIO exit about a hundred ticks more): 32- or 64-bit code, a base and/or index
/// register of the code's width (or RIP), no address-size override. `value` reads a
/// general-purpose register (at its own width) or a segment register's base. `None` for any
/// other shape; the 64-bit canonical check is the caller's.
#[inline]
pub(crate) fn plain_address(i: &Instruction, op: u32, mut value: impl FnMut(Register) -> u64) -> Option<u64> {
    let width = match i.code_size() {
        CodeSize::Code64 => 8,
        CodeSize::Code32 => 4,
        _ => return None,
    };
    let (base, index) = (i.memory_base(), i.memory_index());
    let plain = |reg: Register| reg == Register::None || (reg.is_gpr() && reg.size() == width);
    let rip_relative = matches!(base, Register::RIP | Register::EIP);
    if i.op_kind(op) != OpKind::Memory || (base == Register::None && index == Register::None) {
        return None;
    }
    if !(plain(base) || (rip_relative && width == 8 && base == Register::RIP)) || !plain(index) {
        return None;
    }
    // iced-x86 folds RIP into a RIP-relative operand's displacement.
    let mut address = i.memory_displacement64();
    if base != Register::None && !rip_relative {
        address = address.wrapping_add(value(base));
    }
    if index != Register::None {
        address = address.wrapping_add(value(index) << i.memory_index_scale().trailing_zeros());
    }
    let segment = i.memory_segment();
    if width == 4 || matches!(segment, Register::FS | Register::GS) {
        address = address.wrapping_add(value(segment));
    }
    Some(if width == 4 {
        address & 0xFFFF_FFFF
    } else {
        address
    })
}

/// MOV between a general-purpose register or an immediate and a plainly addressed memory
/// operand ([`plain_address`]), and MOVZX, MOVSX, MOVSXD from one: a device driver's every
/// register access, carried out without the general machinery of [`Exec`] (the register write
/// comes after the one access, so a failed access still changes nothing). `None` for any
/// other form, or an address that is not canonical (the general path raises the fault).
#[inline]
pub(crate) fn register_move<M: Machine>(
    i: &Instruction,
    rflags: u64,
    machine: &mut M,
) -> Option<Result<Outcome, EmulationError>> {
    let store = i.op0_kind() == OpKind::Memory;
    if store && i.mnemonic() != Mnemonic::Mov {
        return None;
    }
    let (memory, other) = if store {
        (0, 1)
    } else if i.op1_kind() == OpKind::Memory {
        (1, 0)
    } else {
        return None;
    };
    let reg = i.op_register(other);
    let from_register = i.op_kind(other) == OpKind::Register && reg.is_gpr();
    let immediate = store
        && matches!(
            i.op_kind(other),
            OpKind::Immediate8 | OpKind::Immediate16 | OpKind::Immediate32 | OpKind::Immediate32to64
        );
    let size = i.memory_size().size();
    if !(from_register || immediate) || !matches!(size, 1 | 2 | 4 | 8) {
        return None;
    }
    let read = |machine: &mut M, reg: Register| {
        let full = machine.gpr(reg.full_register());
        if is_high_byte(reg) {
            (full >> 8) & 0xFF
        } else {
            full & mask(reg.size())
        }
    };
    let linear = plain_address(i, memory, |r| {
        if r.is_segment_register() {
            machine.segment_base(r)
        } else {
            read(machine, r)
        }
    })?;
    if i.code_size() == CodeSize::Code64 && sign_extend(linear, 6) != linear {
        return None;
    }
    let done = if store {
        let value = if immediate {
            i.immediate(other)
        } else {
            read(machine, reg)
        };
        machine.write(linear, &value.to_le_bytes()[..size])
    } else {
        let mut bytes = [0u8; 8];
        machine.read(linear, &mut bytes[..size]).map(|()| {
            let value = u64::from_le_bytes(bytes);
            let value = match i.mnemonic() {
                Mnemonic::Movsx | Mnemonic::Movsxd => sign_extend(value, size),
                _ => value,
            };
            let full = reg.full_register();
            let old = machine.gpr(full);
            let new = match reg.size() {
                1 if is_high_byte(reg) => merge(old, value << 8, 0xFF00),
                4 => value & 0xFFFF_FFFF,
                size => merge(old, value, mask(size)),
            };
            machine.set_gpr(full, new);
        })
    };
    Some(
        done.map(|()| Outcome {
            rip: i.next_ip(),
            rflags,
        })
        .map_err(EmulationError::from),
    )
}

/// AL, AX, EAX or RAX.
fn accumulator(size: usize) -> Register {
    match size {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    }
}

/// DX, EDX or RDX: the high half of a double-width product or dividend.
fn data_register(size: usize) -> Register {
    match size {
        2 => Register::DX,
        4 => Register::EDX,
        _ => Register::RDX,
    }
}

/// True for AH, CH, DH and BH: bits 15:8 of their full register.
fn is_high_byte(reg: Register) -> bool {
    matches!(reg, Register::AH | Register::CH | Register::DH | Register::BH)
}

/// `old` with the bits under `mask` taken from `new`.
fn merge(old: u64, new: u64, mask: u64) -> u64 {
    (old & !mask) | (new & mask)
}

/// The operand size of ENTER and LEAVE (2, 4 or 8), from the instruction's code.
fn frame_size(instruction: &Instruction) -> usize {
    match instruction.code() {
        Code::Enterw_imm16_imm8 | Code::Leavew => 2,
        Code::Enterd_imm16_imm8 | Code::Leaved => 4,
        _ => 8,
    }
}

/// BP, EBP or RBP.
fn frame_register(size: usize) -> Register {
    match size {
        8 => Register::RBP,
        4 => Register::EBP,
        _ => Register::BP,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryFault;

    /// Registers from a seed, segment bases of their own (DS, FS, GS differ).
    struct Registers([u64; 16]);

    impl Machine for Registers {
        fn gpr(&mut self, full: Register) -> u64 {
            self.0[(full as usize - Register::RAX as usize) % 16]
        }
        fn set_gpr(&mut self, _: Register, _: u64) {}
        fn segment_base(&mut self, segment: Register) -> u64 {
            match segment {
                Register::FS => 0x1_0000_0000,
                Register::GS => 0x2_0000_0000,
                Register::DS => 0x3000,
                Register::SS => 0x5000,
                _ => 0x7000,
            }
        }
        fn read(&mut self, _: u64, _: &mut [u8]) -> Result<(), MemoryFault> {
            Ok(())
        }
        fn write(&mut self, _: u64, _: &[u8]) -> Result<(), MemoryFault> {
            Ok(())
        }
    }

    /// The shortcut agrees with iced-x86's `virtual_address` on every operand it takes, over
    /// random instruction bytes in 32- and 64-bit code.
    #[test]
    fn plain_addresses_match_iced_x86() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut compared = 0;
        for _ in 0..200_000 {
            let bytes: [u8; 16] = core::array::from_fn(|_| next() as u8);
            let bitness = if next() % 2 == 0 { 64 } else { 32 };
            let Some(instruction) = crate::decode(bitness, &bytes, next() & 0xFFFF_FFFF) else {
                continue;
            };
            // LEA's operand is an offset, not an access: iced-x86 adds no segment base.
            if instruction.mnemonic() == Mnemonic::Lea {
                continue;
            }
            let mut machine = Registers(core::array::from_fn(|_| next()));
            for op in 0..instruction.op_count() {
                if instruction.op_kind(op) != OpKind::Memory {
                    continue;
                }
                let mut exec = Exec {
                    instruction: &instruction,
                    machine: &mut machine,
                    rflags: 2,
                    rip: 0,
                    written: [(Register::None, 0); MAX_REGISTER_WRITES],
                    writes: 0,
                    vector: None,
                    segment: None,
                    explicit: None,
                };
                let Some(plain) = exec.plain_address(op) else {
                    continue;
                };
                let regs = &mut exec.machine;
                let general = instruction
                    .virtual_address(op, 0, |reg, _, _| {
                        if reg.is_segment_register() {
                            let skip = bitness == 64 && !matches!(reg, Register::FS | Register::GS);
                            Some(if skip { 0 } else { regs.segment_base(reg) })
                        } else {
                            Some(regs.gpr(reg.full_register()) & mask(reg.size()))
                        }
                    })
                    .unwrap();
                let general = if bitness == 32 {
                    general & 0xFFFF_FFFF
                } else {
                    general
                };
                assert_eq!(
                    plain,
                    general,
                    "{:?} ({bitness}-bit, {bytes:02x?})",
                    instruction.code()
                );
                compared += 1;
            }
        }
        assert!(compared > 10_000, "only {compared} operands compared");
    }
}
