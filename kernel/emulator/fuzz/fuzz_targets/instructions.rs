//! Random instruction bytes and register state against the fake device. The emulator must not
//! panic, and must either refuse cleanly (touching nothing for an unsupported instruction) or
//! make only accesses that match the decoded memory operand: its address, its size, at most one
//! read and one write, and continue at the next instruction (or the same one for an unfinished
//! REP).

#![no_main]

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{operand_linear, Access, Fake, GPRS};
use emulator::{EmulationError, MemoryFault};
use libfuzzer_sys::fuzz_target;
use pgm::PAGE_SIZE;

/// Where the fake device page is seen in guest-linear space.
const LINEAR_BASE: u64 = 0x7FFF_0000_0000;

fuzz_target!(|bytes: &[u8]| {
    // 16 registers of 8 bytes, a mode byte, RFLAGS, then the instruction.
    if bytes.len() < 16 * 8 + 1 + 8 + 1 {
        return;
    }
    let (registers, rest) = bytes.split_at(16 * 8);
    let mode = rest[0];
    let rflags = u64::from_le_bytes(rest[1..9].try_into().unwrap());
    let code = &rest[9..rest.len().min(9 + 15)];
    let bitness = [16, 32, 64][mode as usize % 3];

    let mut fake = Fake::new(LINEAR_BASE);
    for (reg, value) in GPRS.iter().zip(registers.chunks_exact(8)) {
        fake.set(*reg, u64::from_le_bytes(value.try_into().unwrap()));
    }
    if mode & 0x80 != 0 {
        fake.fault = Some(MemoryFault::NotGuestMemory);
    }
    let ip = 0x1000;
    let Some(instruction) = emulator::decode(bitness, code, ip) else {
        return;
    };
    let has_memory_operand = (0..instruction.op_count()).any(|op| {
        use emulator::OpKind::*;
        matches!(instruction.op_kind(op), Memory | MemoryESDI | MemoryESEDI | MemoryESRDI)
    });
    if !has_memory_operand {
        return;
    }
    let Some(linear) = operand_linear(&mut fake, &instruction) else {
        // Addressed through vector registers: no supported form is.
        let result = emulator::execute(&instruction, fake.gpa_of(LINEAR_BASE), rflags, &mut fake);
        assert_eq!(result, Err(EmulationError::Unsupported), "{code:02x?}");
        assert!(fake.log.is_empty());
        return;
    };
    // Point the operand into the device page the way an EPT violation would name it.
    let offset = linear % PAGE_SIZE;
    fake.linear_base = linear - offset;
    let gpa = fake.gpa_of(linear);
    let before = fake.regs;

    match emulator::execute(&instruction, gpa, rflags, &mut fake) {
        Ok(outcome) => {
            assert!(
                outcome.rip == instruction.next_ip() || (instruction.has_rep_prefix() && outcome.rip == ip),
                "continues at {:#x} after {code:02x?}",
                outcome.rip
            );
            let size = instruction.memory_size().size();
            assert!(fake.log.len() <= 2, "{code:02x?}: {:?}", fake.log);
            for access in &fake.log {
                let (at, len) = match access {
                    Access::Read { offset, len } => (*offset, *len),
                    Access::Write { offset, bytes } => (*offset, bytes.len()),
                };
                assert_eq!((at, len), (offset, size), "{code:02x?}: {access:?}");
            }
        }
        Err(EmulationError::Unsupported) => {
            assert!(fake.log.is_empty(), "{code:02x?} refused after {:?}", fake.log);
            assert_eq!(fake.regs, before, "{code:02x?} refused after changing registers");
        }
        Err(EmulationError::Memory(_)) => {
            assert_eq!(fake.regs, before, "{code:02x?} failed after changing registers");
        }
    }
});
