//! RFLAGS as the arithmetic and logic instructions leave them, and the condition codes that
//! read them.

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
    /// The six status flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
}
use rflags::{AF, CF, OF, PF, SF, STATUS, ZF};

/// The low `size` bytes.
pub(crate) fn mask(size: usize) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// The sign bit of a `size`-byte value.
fn sign_bit(size: usize) -> u64 {
    1u64 << (size * 8 - 1)
}

/// `value`'s low `size` bytes, sign-extended to 64 bits.
pub(crate) fn sign_extend(value: u64, size: usize) -> u64 {
    let shift = 64 - size as u32 * 8;
    (((value << shift) as i64) >> shift) as u64
}

/// SF, ZF and PF of a `size`-byte result.
pub(crate) fn sign_zero_parity(result: u64, size: usize) -> u64 {
    let result = result & mask(size);
    let mut flags = 0;
    if result == 0 {
        flags |= ZF;
    }
    if result & sign_bit(size) != 0 {
        flags |= SF;
    }
    if (result as u8).count_ones().is_multiple_of(2) {
        flags |= PF;
    }
    flags
}

/// `rflags` with the flags under `changed` replaced by `new`.
pub(crate) fn with(rflags: u64, changed: u64, new: u64) -> u64 {
    (rflags & !changed) | (new & changed)
}

/// The binary operations of the ALU group and their relatives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AluOp {
    Add,
    Adc,
    Sub,
    Sbb,
    And,
    Or,
    Xor,
}

/// `a op b` on `size`-byte operands with the carry of `rflags`: the result and RFLAGS after
/// (all six status flags defined; AF cleared after the logic operations, as the CPUs do).
pub(crate) fn alu(op: AluOp, a: u64, b: u64, size: usize, rflags: u64) -> (u64, u64) {
    let m = mask(size);
    let (a, b) = (a & m, b & m);
    let carry_in = rflags & CF;
    let (result, carry, overflow) = match op {
        AluOp::Add | AluOp::Adc => {
            let carry_in = if op == AluOp::Adc { carry_in } else { 0 };
            let wide = u128::from(a) + u128::from(b) + u128::from(carry_in);
            let result = wide as u64 & m;
            let overflow = (a ^ result) & (b ^ result) & sign_bit(size) != 0;
            (result, wide > u128::from(m), overflow)
        }
        AluOp::Sub | AluOp::Sbb => {
            let borrow_in = if op == AluOp::Sbb { carry_in } else { 0 };
            let result = a.wrapping_sub(b).wrapping_sub(borrow_in) & m;
            let borrow = u128::from(a) < u128::from(b) + u128::from(borrow_in);
            let overflow = (a ^ b) & (a ^ result) & sign_bit(size) != 0;
            (result, borrow, overflow)
        }
        AluOp::And => (a & b, false, false),
        AluOp::Or => (a | b, false, false),
        AluOp::Xor => (a ^ b, false, false),
    };
    let logic = matches!(op, AluOp::And | AluOp::Or | AluOp::Xor);
    let mut flags = sign_zero_parity(result, size);
    if carry {
        flags |= CF;
    }
    if overflow {
        flags |= OF;
    }
    if !logic && (a ^ b ^ result) & 0x10 != 0 {
        flags |= AF;
    }
    (result, with(rflags, STATUS, flags))
}

/// INC (`step` 1) or DEC (`step` -1): ADD or SUB of one that leaves CF alone.
pub(crate) fn inc_dec(value: u64, increment: bool, size: usize, rflags: u64) -> (u64, u64) {
    let op = if increment { AluOp::Add } else { AluOp::Sub };
    let (result, flags) = alu(op, value, 1, size, rflags);
    (result, with(flags, CF, rflags))
}

/// NEG: 0 - value, with CF set unless the value was zero.
pub(crate) fn neg(value: u64, size: usize, rflags: u64) -> (u64, u64) {
    let (result, flags) = alu(AluOp::Sub, 0, value, size, rflags);
    let carry = if value & mask(size) != 0 { CF } else { 0 };
    (result, with(flags, CF, carry))
}

/// True when the condition code `cc` (the low nibble of Jcc/SETcc/CMOVcc) holds in `rflags`.
pub(crate) fn condition(cc: u8, rflags: u64) -> bool {
    let set = |flag: u64| rflags & flag != 0;
    let holds = match cc >> 1 {
        0 => set(OF),
        1 => set(CF),
        2 => set(ZF),
        3 => set(CF) || set(ZF),
        4 => set(SF),
        5 => set(PF),
        6 => set(SF) != set(OF),
        _ => set(ZF) || set(SF) != set(OF),
    };
    holds != (cc & 1 != 0)
}
