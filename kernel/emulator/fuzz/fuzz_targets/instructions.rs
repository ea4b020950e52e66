//! Random instruction bytes and register state against the fake machine. The emulator must
//! not panic, and must either refuse cleanly (an unsupported instruction writes no memory and
//! changes no register; a fault changes no register) or complete, continuing at the next
//! instruction, the same one for an unfinished REP, or a branch's target.

#![no_main]

#[path = "../../tests/common/mod.rs"]
mod common;

use common::{operand_linear, Access, Fake, GPRS};
use emulator::{EmulationError, MemoryFault};
use emulator::FlowControl;
use libfuzzer_sys::fuzz_target;
use pgm::PAGE_SIZE;

/// Where the fake memory is seen in guest-linear space when no operand places it.
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
    // Place the fake's memory under the first memory operand, as an exit would find it.
    if let Some(linear) = operand_linear(&mut fake, &instruction) {
        fake.linear_base = linear - linear % PAGE_SIZE;
    }
    let before = fake.regs;
    match emulator::execute(&instruction, rflags, &mut fake) {
        Ok(outcome) => {
            let continues = outcome.rip == instruction.next_ip()
                || (instruction.has_rep_prefix() || instruction.has_repne_prefix()) && outcome.rip == ip
                || instruction.flow_control() != FlowControl::Next;
            assert!(continues, "continues at {:#x} after {code:02x?}", outcome.rip);
        }
        Err(EmulationError::Unsupported) => {
            let wrote = fake.log.iter().any(|access| matches!(access, Access::Write { .. }));
            assert!(!wrote, "{code:02x?} refused after {:?}", fake.log);
            assert_eq!(fake.regs, before, "{code:02x?} refused after changing registers");
        }
        Err(_) => {
            assert_eq!(fake.regs, before, "{code:02x?} failed after changing registers");
        }
    }
});
