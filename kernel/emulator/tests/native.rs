//! Differential test against the host CPU: every supported instruction form runs natively on
//! a page of RAM and through the emulator on the fake device, from the same random registers,
//! flags and memory, and the two must agree on registers, the flags the instruction defines,
//! memory and where execution continues. The emulator decodes the very bytes the CPU ran (read
//! back from this test's code between two labels), so encoder and decoder cannot disagree.

#![cfg(target_arch = "x86_64")]

mod common;

use std::arch::asm;

use common::{Fake, XorShift};
use emulator::rflags::{AF, CF, DF, OF, PF, SF, ZF};
use emulator::Register;
use pgm::PAGE_SIZE;

/// The registers the forms use, laid out for the assembly below.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct State {
    rax: u64,
    rbx: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
    rflags: u64,
}

const STATE_REGS: [Register; 6] = [
    Register::RAX,
    Register::RBX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
];

/// The flags a test may set before the instruction (bit 1 is always one).
const STATUS: u64 = CF | PF | AF | ZF | SF | DF | OF;

/// One instruction form: its text, a function that runs it natively and returns the addresses
/// of its first byte and of the byte after it, and the flags it leaves undefined.
struct Form {
    text: &'static str,
    run: fn(&mut State) -> (u64, u64),
    undefined: u64,
}

/// Runs `$text` natively with the registers and flags of a `State`, and writes them back.
macro_rules! form {
    ($text:literal) => {
        form!($text, 0)
    };
    ($text:literal, $undefined:expr) => {{
        fn run(state: &mut State) -> (u64, u64) {
            let start: u64;
            let end: u64;
            // SAFETY: the block saves and restores RBX and RBP (which the compiler reserves),
            // declares every other register it changes, leaves DF clear as the ABI requires,
            // and the instruction touches only memory the caller's registers point to: the
            // test's own page.
            unsafe {
                asm!(
                    "lea {start}, [rip + 2f]",
                    "lea {end}, [rip + 3f]",
                    "push rbx",
                    "push rbp",
                    "mov rbp, {state}",
                    "push qword ptr [rbp + 48]",
                    "popfq",
                    "mov rax, [rbp]",
                    "mov rbx, [rbp + 8]",
                    "mov rcx, [rbp + 16]",
                    "mov rdx, [rbp + 24]",
                    "mov rsi, [rbp + 32]",
                    "mov rdi, [rbp + 40]",
                    "2:",
                    $text,
                    "3:",
                    "pushfq",
                    "pop qword ptr [rbp + 48]",
                    "cld",
                    "mov [rbp], rax",
                    "mov [rbp + 8], rbx",
                    "mov [rbp + 16], rcx",
                    "mov [rbp + 24], rdx",
                    "mov [rbp + 32], rsi",
                    "mov [rbp + 40], rdi",
                    "pop rbp",
                    "pop rbx",
                    state = in(reg) state as *mut State,
                    start = out(reg) start,
                    end = out(reg) end,
                    out("rax") _,
                    out("rcx") _,
                    out("rdx") _,
                    out("rsi") _,
                    out("rdi") _,
                );
            }
            (start, end)
        }
        Form { text: $text, run, undefined: $undefined }
    }};
}

/// Every form the emulator supports, with the operand sizes and register kinds that take
/// different paths (high-byte registers, 32-bit writes that clear the upper half, sign-extended
/// immediates, REP and the direction flag).
fn forms() -> Vec<Form> {
    vec![
        form!("mov byte ptr [rbx], al"),
        form!("mov byte ptr [rbx + 3], ah"),
        form!("mov byte ptr [rbx], dh"),
        form!("mov byte ptr [rbx], sil"),
        form!("mov word ptr [rbx], cx"),
        form!("mov dword ptr [rbx], edx"),
        form!("mov qword ptr [rbx], rsi"),
        form!("mov qword ptr [rbx + rcx * 8], rdi"),
        form!("mov byte ptr [rbx], 0x5a"),
        form!("mov word ptr [rbx], 0x8001"),
        form!("mov dword ptr [rbx], 0x80000001"),
        form!("mov qword ptr [rbx], -5"),
        form!("mov al, byte ptr [rbx]"),
        form!("mov ah, byte ptr [rbx]"),
        form!("mov cx, word ptr [rbx]"),
        form!("mov edx, dword ptr [rbx]"),
        form!("mov rsi, qword ptr [rbx + 16]"),
        form!("movzx eax, byte ptr [rbx]"),
        form!("movzx cx, byte ptr [rbx]"),
        form!("movzx rdx, word ptr [rbx]"),
        form!("movsx eax, byte ptr [rbx]"),
        form!("movsx cx, byte ptr [rbx]"),
        form!("movsx rdx, word ptr [rbx]"),
        form!("movsxd rsi, dword ptr [rbx]"),
        form!("or byte ptr [rbx], al", AF),
        form!("or word ptr [rbx], cx", AF),
        form!("or dword ptr [rbx], edx", AF),
        form!("or qword ptr [rbx], rsi", AF),
        form!("or byte ptr [rbx], 0x81", AF),
        form!("or dword ptr [rbx], -3", AF),
        form!("or al, byte ptr [rbx]", AF),
        form!("or ah, byte ptr [rbx]", AF),
        form!("and word ptr [rbx], 0x8001", AF),
        form!("and qword ptr [rbx], 0x7fffffff", AF),
        form!("and qword ptr [rbx], -16", AF),
        form!("and cx, word ptr [rbx]", AF),
        form!("and edx, dword ptr [rbx]", AF),
        form!("and byte ptr [rbx], dh", AF),
        form!("xor dword ptr [rbx], 0x12345678", AF),
        form!("xor qword ptr [rbx], rax", AF),
        form!("xor rsi, qword ptr [rbx]", AF),
        form!("xor eax, dword ptr [rbx]", AF),
        form!("xor byte ptr [rbx], 0xff", AF),
        form!("stosb"),
        form!("stosw"),
        form!("stosd"),
        form!("stosq"),
        form!("rep stosb"),
        form!("rep stosw"),
        form!("rep stosd"),
        form!("rep stosq"),
        form!("add dword ptr [rbx], eax"),
        form!("add byte ptr [rbx], 0x80"),
        form!("add rsi, qword ptr [rbx]"),
        form!("adc word ptr [rbx], cx"),
        form!("adc ah, byte ptr [rbx]"),
        form!("sub qword ptr [rbx], rdx"),
        form!("sub dword ptr [rbx], -1"),
        form!("sbb byte ptr [rbx], al"),
        form!("sbb edx, dword ptr [rbx]"),
        form!("cmp qword ptr [rbx], rax"),
        form!("cmp byte ptr [rbx], 0x7f"),
        form!("cmp cx, word ptr [rbx]"),
        form!("test dword ptr [rbx], edx", AF),
        form!("test byte ptr [rbx], 0x81", AF),
        form!("inc dword ptr [rbx]"),
        form!("dec byte ptr [rbx]"),
        form!("lock inc qword ptr [rbx]"),
        form!("neg word ptr [rbx]"),
        form!("not qword ptr [rbx]"),
        form!("xchg byte ptr [rbx], al"),
        form!("xchg qword ptr [rbx], rdx"),
        form!("lock xadd dword ptr [rbx], ecx"),
        form!("xadd word ptr [rbx], ax"),
        form!("cmpxchg qword ptr [rbx], rdx"),
        form!("lock cmpxchg dword ptr [rbx], esi"),
        form!("cmpxchg byte ptr [rbx], dl"),
        form!("bt dword ptr [rbx], 7", OF | SF | ZF | AF | PF),
        form!("bts qword ptr [rbx], 63", OF | SF | ZF | AF | PF),
        form!("btr dword ptr [rbx], ecx", OF | SF | ZF | AF | PF),
        form!("btc word ptr [rbx], cx", OF | SF | ZF | AF | PF),
        form!("bsf eax, dword ptr [rbx]", OF | SF | AF | PF | CF),
        form!("bsr rdx, qword ptr [rbx]", OF | SF | AF | PF | CF),
        form!("shld dword ptr [rbx], edx, cl", OF | AF),
        form!("shrd qword ptr [rbx], rsi, cl", OF | AF),
        form!("shld word ptr [rbx], ax, cl", OF | AF),
        form!("imul eax, dword ptr [rbx]", SF | ZF | AF | PF),
        form!("imul cx, word ptr [rbx], 311", SF | ZF | AF | PF),
        form!("imul rdx, qword ptr [rbx], -3", SF | ZF | AF | PF),
        form!("mul byte ptr [rbx]", SF | ZF | AF | PF),
        form!("mul qword ptr [rbx]", SF | ZF | AF | PF),
        form!("imul dword ptr [rbx]", SF | ZF | AF | PF),
        form!("cmovne eax, dword ptr [rbx]"),
        form!("cmovl rdx, qword ptr [rbx]"),
        form!("cmovbe cx, word ptr [rbx]"),
        form!("setg byte ptr [rbx]"),
        form!("setp byte ptr [rbx + 1]"),
        form!("movsb"),
        form!("rep movsq"),
        form!("cmpsw"),
        form!("repe cmpsb"),
        form!("repne cmpsd"),
        form!("scasq"),
        form!("repne scasb"),
        form!("lodsd"),
        form!("lodsb"),
    ]
}

/// A page of RAM the native run works on.
#[repr(C, align(4096))]
struct Page([u8; PAGE_SIZE as usize]);

/// Random registers pointing into `page`: RBX at an offset that leaves room for the largest
/// displacement, RSI at a quarter and RDI in the middle (room for 200 elements either way), a small RCX.
fn random_state(random: &mut XorShift, page: u64) -> State {
    State {
        rax: random.next(),
        rbx: page + random.below(PAGE_SIZE - 64),
        rcx: random.below(4),
        rdx: random.next(),
        rsi: page + 1024 + random.below(64),
        rdi: page + 2048 + random.below(64),
        rflags: (random.next() & STATUS) | 0x2,
    }
}

/// Runs the form through the emulator until it moves past the instruction (a REP takes one
/// exit per element, as on the CPU), as the vCPU loop would.
fn emulate(form: &Form, fake: &mut Fake, bytes: &[u8], start: u64, end: u64, rflags: u64) -> u64 {
    let mut rip = start;
    let mut rflags = rflags;
    for _ in 0..1024 {
        if rip == end {
            return rflags;
        }
        assert_eq!(rip, start, "{}: resumed somewhere else", form.text);
        let instruction = emulator::decode(64, bytes, start).expect("valid");
        let outcome = emulator::execute(&instruction, rflags, fake)
            .unwrap_or_else(|error| panic!("{}: {error:?}", form.text));
        rip = outcome.rip;
        rflags = outcome.rflags;
    }
    panic!("{}: did not finish", form.text);
}

#[test]
fn every_supported_form_matches_the_host_cpu() {
    let mut random = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut page = Box::new(Page([0; PAGE_SIZE as usize]));
    let base = page.0.as_ptr() as u64;
    for form in forms() {
        for round in 0..200 {
            page.0.iter_mut().for_each(|byte| *byte = random.next() as u8);
            let before = random_state(&mut random, base);
            let mut fake = Fake::new(base);
            fake.memory[..PAGE_SIZE as usize].copy_from_slice(&page.0);
            for (reg, value) in STATE_REGS.iter().zip([
                before.rax, before.rbx, before.rcx, before.rdx, before.rsi, before.rdi,
            ]) {
                fake.set(*reg, value);
            }

            let mut native = before;
            let (start, end) = (form.run)(&mut native);
            // SAFETY: `start..end` is the instruction between the two labels of the form's own
            // code, which is mapped and readable.
            let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
            let rflags = emulate(&form, &mut fake, bytes, start, end, before.rflags);

            let context = format!("{} (round {round}, before {before:x?})", form.text);
            for (reg, value) in STATE_REGS.iter().zip([
                native.rax, native.rbx, native.rcx, native.rdx, native.rsi, native.rdi,
            ]) {
                assert_eq!(fake.get(*reg), value, "{reg:?} after {context}");
            }
            let defined = STATUS & !form.undefined;
            assert_eq!(rflags & defined, native.rflags & defined, "flags after {context}");
            assert!(
                fake.memory[..PAGE_SIZE as usize] == page.0[..],
                "memory after {context}"
            );
        }
    }
}
