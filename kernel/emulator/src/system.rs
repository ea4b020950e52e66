//! Segment-register and task-register loads: the descriptor read from the GDT and the checks
//! the CPU makes before it loads one (Intel SDM vol. 2, MOV, JMP and LTR).

use iced_x86::Register;

use crate::exec::{exception, Exec, GENERAL_PROTECTION, STACK_FAULT};
use crate::{EmulationError, Machine};

/// #UD.
const INVALID_OPCODE: u8 = 6;
/// #NP.
const NOT_PRESENT: u8 = 11;

/// A segment register the emulator reads or loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentRegister {
    /// ES.
    Es,
    /// CS.
    Cs,
    /// SS.
    Ss,
    /// DS.
    Ds,
    /// FS.
    Fs,
    /// GS.
    Gs,
    /// The task register.
    Tr,
}

impl SegmentRegister {
    /// The segment register iced-x86 names `register`.
    pub fn from_register(register: Register) -> Option<SegmentRegister> {
        Some(match register {
            Register::ES => SegmentRegister::Es,
            Register::CS => SegmentRegister::Cs,
            Register::SS => SegmentRegister::Ss,
            Register::DS => SegmentRegister::Ds,
            Register::FS => SegmentRegister::Fs,
            Register::GS => SegmentRegister::Gs,
            _ => return None,
        })
    }
}

/// A segment register's visible and hidden parts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentState {
    /// The selector.
    pub selector: u16,
    /// The base address.
    pub base: u64,
    /// The limit in bytes (granularity applied).
    pub limit: u32,
    /// The descriptor's attribute bits: bits 0–7 its access byte (type, S, DPL, P) and bits
    /// 12–15 AVL, L, D/B and G (descriptor bits 40–47 and 52–55; VMX's access-rights layout).
    pub attributes: u16,
    /// False for a segment register holding a null selector (unusable).
    pub usable: bool,
}

impl SegmentState {
    /// The segment register's state after loading `selector` whose descriptor is `raw` (the
    /// eight bytes as the GDT holds them).
    pub fn from_descriptor(selector: u16, raw: u64) -> SegmentState {
        Descriptor::parse(raw).state(selector)
    }

    /// The descriptor privilege level.
    pub fn dpl(&self) -> u8 {
        (self.attributes >> 5) as u8 & 3
    }

    /// The L bit: a 64-bit code segment.
    pub fn long(&self) -> bool {
        self.attributes & (1 << 13) != 0
    }
}

/// A segment descriptor's fields.
struct Descriptor {
    /// The access byte.
    access: u8,
    /// AVL, L, D/B, G.
    flags: u8,
    base: u64,
    limit: u32,
}

impl Descriptor {
    fn parse(raw: u64) -> Descriptor {
        let flags = (raw >> 52) as u8 & 0xF;
        let limit = (raw & 0xFFFF) as u32 | ((raw >> 48) as u32 & 0xF) << 16;
        Descriptor {
            access: (raw >> 40) as u8,
            flags,
            base: (raw >> 16) & 0xFF_FFFF | ((raw >> 56) & 0xFF) << 24,
            limit: if flags & 0x8 != 0 {
                limit << 12 | 0xFFF
            } else {
                limit
            },
        }
    }

    fn dpl(&self) -> u16 {
        u16::from(self.access >> 5) & 3
    }
    fn present(&self) -> bool {
        self.access & 0x80 != 0
    }
    /// Code or data (S set), not a system descriptor.
    fn code_or_data(&self) -> bool {
        self.access & 0x10 != 0
    }
    fn code(&self) -> bool {
        self.access & 0x8 != 0
    }
    /// Writable data, readable code.
    fn read_write(&self) -> bool {
        self.access & 0x2 != 0
    }
    fn conforming(&self) -> bool {
        self.access & 0x4 != 0
    }

    fn state(&self, selector: u16) -> SegmentState {
        SegmentState {
            selector,
            base: self.base,
            limit: self.limit,
            attributes: u16::from(self.access) | u16::from(self.flags) << 12,
            usable: true,
        }
    }
}

/// The current privilege level (SS.DPL, as VMX keeps it).
fn current_privilege<M: Machine>(exec: &mut Exec<'_, M>) -> Result<u16, EmulationError> {
    let ss = exec
        .machine
        .segment(SegmentRegister::Ss)
        .ok_or(EmulationError::Unsupported)?;
    Ok(u16::from(ss.dpl()))
}

/// True in protected mode (CR0.PE).
fn protected<M: Machine>(exec: &mut Exec<'_, M>) -> Result<bool, EmulationError> {
    Ok(exec.machine.cr0().ok_or(EmulationError::Unsupported)? & 1 != 0)
}

/// Reads the 8-byte GDT entry of `selector` (an LDT selector is not supported); #GP with the
/// selector when it lies beyond the GDT's limit. Returns the entry and its linear address.
fn read_descriptor<M: Machine>(
    exec: &mut Exec<'_, M>,
    selector: u16,
    bytes: u16,
) -> Result<(u64, u64, u64), EmulationError> {
    if selector & 4 != 0 {
        return Err(EmulationError::Unsupported);
    }
    let (base, limit) = exec.machine.gdt().ok_or(EmulationError::Unsupported)?;
    let index = selector & !7;
    if u32::from(index) + u32::from(bytes) - 1 > u32::from(limit) {
        return Err(exception(GENERAL_PROTECTION, Some(u32::from(selector & 0xFFFC))));
    }
    let at = base.wrapping_add(u64::from(index));
    let low = exec.load(at, 8)?;
    let high = if bytes == 16 {
        exec.load(at.wrapping_add(8), 8)?
    } else {
        0
    };
    Ok((at, low, high))
}

/// Loads `segment` (CS through a far JMP, SS, DS, ES, FS or GS through MOV) with `selector`,
/// after the CPU's checks; the state is staged in `exec` and written when the instruction
/// completes. The descriptor's accessed bit is set in the GDT as the CPU sets it.
pub(crate) fn load_segment<M: Machine>(
    exec: &mut Exec<'_, M>,
    segment: Register,
    selector: u16,
) -> Result<(), EmulationError> {
    let segment = SegmentRegister::from_register(segment).ok_or(EmulationError::Unsupported)?;
    if !protected(exec)? {
        let mut state = exec.machine.segment(segment).ok_or(EmulationError::Unsupported)?;
        state.selector = selector;
        state.base = u64::from(selector) << 4;
        state.usable = true;
        exec.segment = Some((segment, state));
        return Ok(());
    }
    let cpl = current_privilege(exec)?;
    let rpl = selector & 3;
    let fault = |vector: u8| exception(vector, Some(u32::from(selector & 0xFFFC)));
    if selector & !3 == 0 {
        let null = SegmentState {
            selector,
            attributes: cpl << 5,
            ..SegmentState::default()
        };
        return match segment {
            // A null SS is allowed only in 64-bit code below CPL 3, with RPL = CPL.
            SegmentRegister::Ss
                if exec.instruction.code_size() == iced_x86::CodeSize::Code64 && cpl != 3 && rpl == cpl =>
            {
                exec.segment = Some((segment, null));
                Ok(())
            }
            SegmentRegister::Ss | SegmentRegister::Cs => Err(exception(GENERAL_PROTECTION, Some(0))),
            _ => {
                exec.segment = Some((segment, null));
                Ok(())
            }
        };
    }
    let (at, raw, _) = read_descriptor(exec, selector, 8)?;
    let descriptor = Descriptor::parse(raw);
    let dpl = descriptor.dpl();
    let mut loaded = selector;
    match segment {
        SegmentRegister::Ss => {
            let writable_data = descriptor.code_or_data() && !descriptor.code() && descriptor.read_write();
            if rpl != cpl || !writable_data || dpl != cpl {
                return Err(fault(GENERAL_PROTECTION));
            }
            if !descriptor.present() {
                return Err(fault(STACK_FAULT));
            }
        }
        SegmentRegister::Cs => {
            if !descriptor.code_or_data() {
                // A call gate or a task: not emulated.
                return Err(EmulationError::Unsupported);
            }
            let allowed = descriptor.code()
                && if descriptor.conforming() {
                    dpl <= cpl
                } else {
                    rpl <= cpl && dpl == cpl
                };
            // L and D/B both set is reserved.
            if !allowed || descriptor.flags & 0b0110 == 0b0110 {
                return Err(fault(GENERAL_PROTECTION));
            }
            if !descriptor.present() {
                return Err(fault(NOT_PRESENT));
            }
            loaded = selector & !3 | cpl;
        }
        _ => {
            let readable = descriptor.code_or_data() && (!descriptor.code() || descriptor.read_write());
            let privileged = !descriptor.code() || !descriptor.conforming();
            if !readable || privileged && (rpl > dpl || cpl > dpl) {
                return Err(fault(GENERAL_PROTECTION));
            }
            if !descriptor.present() {
                return Err(fault(NOT_PRESENT));
            }
        }
    }
    let mut descriptor = descriptor;
    if descriptor.access & 1 == 0 {
        descriptor.access |= 1;
        exec.store(at.wrapping_add(5), 1, u64::from(descriptor.access))?;
    }
    exec.segment = Some((segment, descriptor.state(loaded)));
    Ok(())
}

/// LTR: loads the task register from an available TSS descriptor (16 bytes in 64-bit code)
/// and marks the descriptor busy in the GDT.
pub(crate) fn load_task_register<M: Machine>(
    exec: &mut Exec<'_, M>,
    selector: u16,
) -> Result<(), EmulationError> {
    if !protected(exec)? {
        return Err(exception(INVALID_OPCODE, None));
    }
    if current_privilege(exec)? != 0 || selector & !3 == 0 {
        return Err(exception(GENERAL_PROTECTION, Some(0)));
    }
    let fault = |vector: u8| exception(vector, Some(u32::from(selector & 0xFFFC)));
    if selector & 4 != 0 {
        return Err(fault(GENERAL_PROTECTION));
    }
    let long = exec.instruction.code_size() == iced_x86::CodeSize::Code64;
    let (at, raw, high) = read_descriptor(exec, selector, if long { 16 } else { 8 })?;
    let mut descriptor = Descriptor::parse(raw);
    let kind = descriptor.access & 0x1F;
    // An available TSS: 32/64-bit (9), or 16-bit (1) outside long mode.
    if kind != 9 && (long || kind != 1) {
        return Err(fault(GENERAL_PROTECTION));
    }
    if !descriptor.present() {
        return Err(fault(NOT_PRESENT));
    }
    descriptor.access |= 2;
    exec.store(at.wrapping_add(5), 1, u64::from(descriptor.access))?;
    descriptor.base |= (high & 0xFFFF_FFFF) << 32;
    exec.segment = Some((SegmentRegister::Tr, descriptor.state(selector)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flat 64-bit code descriptor and a flat data descriptor, as a GDT holds them: the
    /// access byte and flags become VMX's attribute layout, the 4 KiB-granular limit is in
    /// bytes.
    #[test]
    fn a_descriptor_gives_the_state_a_load_would() {
        let code = SegmentState::from_descriptor(0x10, 0x00AF_9B00_0000_FFFF);
        assert_eq!(
            (code.selector, code.base, code.limit, code.attributes),
            (0x10, 0, u32::MAX, 0xA09B)
        );
        assert!(code.long() && code.usable);
        let data = SegmentState::from_descriptor(0x18, 0x00CF_9300_0000_FFFF);
        assert_eq!((data.limit, data.attributes, data.dpl()), (u32::MAX, 0xC093, 0));
        let based = SegmentState::from_descriptor(8, 0xAB40_9312_3456_0FFF);
        assert_eq!(
            (based.base, based.limit),
            (0xAB12_3456, 0xFFF),
            "byte-granular, base in three parts"
        );
    }
}
