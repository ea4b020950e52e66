//! Test guest programs: small position-independent routines assembled into the kernel image and
//! copied into guest RAM before the guest starts. Each ends in a VMCALL (or a deliberate fault).
//!
//! Hypercall ABI (see `crate::vm`): RAX = number (0 done, 1 report), RBX = argument.
//! Inputs come in registers set by the host before entry.

use core::arch::global_asm;

/// The CPU mode a guest program is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestMode {
    /// 16-bit real mode, CS = 0 (the program is entered at its guest-physical address).
    Real,
    /// 32-bit protected mode, flat 4 GiB segments, paging off: linear = guest-physical.
    Flat32,
}

/// A guest routine: its code bytes and the mode it runs in.
#[derive(Clone, Copy, Debug)]
pub struct GuestProgram {
    /// For messages.
    pub name: &'static str,
    /// The mode the code was assembled for.
    pub mode: GuestMode,
    /// The machine code.
    pub code: &'static [u8],
}

macro_rules! guest_programs {
    ($($name:ident: $mode:ident, $directive:literal, [$($line:literal),* $(,)?];)*) => {
        $(
            global_asm!(
                ".pushsection .rodata.guest_programs, \"a\"",
                $directive,
                concat!(".global guest_", stringify!($name), "_start"),
                concat!(".global guest_", stringify!($name), "_end"),
                concat!("guest_", stringify!($name), "_start:"),
                $($line,)*
                concat!("guest_", stringify!($name), "_end:"),
                ".code64",
                ".popsection",
            );
        )*

        /// The guest programs, by name.
        pub mod programs {
            use super::{GuestMode, GuestProgram};
            $(
                /// Guest program (see the assembly in `arch/guests.rs`).
                pub fn $name() -> GuestProgram {
                    paste_symbols!($name, $mode)
                }
            )*
        }
    };
}

/// Looks up the start/end symbols of one program and builds its descriptor.
macro_rules! paste_symbols {
    ($name:ident, $mode:ident) => {{
        unsafe extern "C" {
            #[link_name = concat!("guest_", stringify!($name), "_start")]
            static START: u8;
            #[link_name = concat!("guest_", stringify!($name), "_end")]
            static END: u8;
        }
        let start = &raw const START;
        let len = (&raw const END as usize) - (start as usize);
        // SAFETY: START..END delimit bytes the assembler placed in read-only data; they are
        // never written and live as long as the kernel image.
        let code = unsafe { core::slice::from_raw_parts(start, len) };
        GuestProgram {
            name: stringify!($name),
            mode: GuestMode::$mode,
            code,
        }
    }};
}

guest_programs! {
    // Hypercall "done" with RBX = 0x600DF00D.
    done: Flat32, ".code32", [
        "mov eax, 0",
        "mov ebx, 0x600DF00D",
        "vmcall",
        "hlt",
    ];
    // Writes EDI, EDI+1, ... to the dwords at ESI, ESI+EDX, ... (ECX of them), then done(0).
    write_pages: Flat32, ".code32", [
        "1:",
        "mov dword ptr [esi], edi",
        "add esi, edx",
        "inc edi",
        "dec ecx",
        "jnz 1b",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // ORs together the dwords at ESI, ESI+EDX, ... (ECX of them), then done(result).
    read_pages: Flat32, ".code32", [
        "xor ebx, ebx",
        "1:",
        "or ebx, dword ptr [esi]",
        "add esi, edx",
        "dec ecx",
        "jnz 1b",
        "xor eax, eax",
        "vmcall",
        "hlt",
    ];
    // Loads the dword at ESI and reports it through done(value).
    load: Flat32, ".code32", [
        "mov ebx, dword ptr [esi]",
        "xor eax, eax",
        "vmcall",
        "hlt",
    ];
    // Real mode: stores 0x1234 at 0x600 (DS = 0), reports 0x5A5A, reads the word back into BX
    // and calls done(BX).
    real_mode: Real, ".code16", [
        "mov ax, 0x1234",
        "mov word ptr [0x600], ax",
        "mov eax, 1",
        "mov ebx, 0x5A5A",
        "vmcall",
        "xor ebx, ebx",
        "mov bx, word ptr [0x600]",
        "xor eax, eax",
        "vmcall",
        "hlt",
    ];
    // Halts (a HLT exit ends the VM).
    halt: Flat32, ".code32", [
        "hlt",
    ];
    // Undefined opcode with an empty IDT: #UD, #DF, then a triple fault.
    triple_fault: Flat32, ".code32", [
        "ud2",
    ];
    // An I/O port write: the hypervisor has no device behind it.
    port_io: Flat32, ".code32", [
        "mov al, 0x42",
        "out 0x80, al",
        "hlt",
    ];
    // Calls an unknown hypercall (RAX = 0x77) and reports what RAX came back as via done(RAX).
    bad_hypercall: Flat32, ".code32", [
        "mov eax, 0x77",
        "vmcall",
        "mov ebx, eax",
        "xor eax, eax",
        "vmcall",
        "hlt",
    ];
}
