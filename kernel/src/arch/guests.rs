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
    /// 64-bit long mode with the guest's own 4-level page tables (the host builds them).
    Long64,
}

/// A guest routine: its code bytes and the mode it runs in. The assembled programs below live
/// as long as the kernel; a test may also run bytes it made (random programs).
#[derive(Clone, Copy, Debug)]
pub struct GuestProgram<'a> {
    /// For messages.
    pub name: &'a str,
    /// The mode the code was assembled for.
    pub mode: GuestMode,
    /// The machine code.
    pub code: &'a [u8],
}

macro_rules! guest_programs {
    ($($name:ident: $mode:ident, $directive:literal, [$($line:expr),* $(,)?];)*) => {
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
                pub fn $name() -> GuestProgram<'static> {
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

/// One step of the xorshift32 generator (shifts 13, 17, 5) on EBX, through EAX: the guests
/// that write pseudo-random places share it (the kernel tests replay it to know the places).
macro_rules! xorshift32_ebx {
    () => {
        "
        mov eax, ebx
        shl eax, 13
        xor ebx, eax
        mov eax, ebx
        shr eax, 17
        xor ebx, eax
        mov eax, ebx
        shl eax, 5
        xor ebx, eax
        "
    };
}

/// The MMIO instruction forms the 32-bit and the 64-bit MMIO guests share (the same text
/// assembles in both modes; in 64-bit mode `[esi]` is a 32-bit address, the device lies below
/// 4 GiB). ESI is the test device, EDI a RAM area for results: dword k at EDI + 4k. The
/// expected device accesses, in order, are in the kernel tests (`MMIO_FORMS_ACCESSES`).
macro_rules! mmio_forms_32 {
    () => {
        "
        /* Stores: immediate forms of 1, 2 and 4 bytes. */
        mov byte ptr [esi + 0x00], 0x11
        mov word ptr [esi + 0x02], 0x2233
        mov dword ptr [esi + 0x04], 0x44556677
        /* Stores: register forms, a high-byte register included. */
        mov eax, 0x8899AABB
        mov dword ptr [esi + 0x08], eax
        mov bx, 0xCCDD
        mov word ptr [esi + 0x0C], bx
        mov ah, 0xEE
        mov byte ptr [esi + 0x0E], ah
        /* Loads: 8- and 16-bit loads keep the rest of the register. */
        mov ecx, 0xFFFFFFFF
        mov cl, byte ptr [esi + 0x00]
        mov dword ptr [edi + 0x00], ecx
        mov edx, 0xFFFFFFFF
        mov dx, word ptr [esi + 0x02]
        mov dword ptr [edi + 0x04], edx
        mov ebx, dword ptr [esi + 0x04]
        mov dword ptr [edi + 0x08], ebx
        mov eax, dword ptr [esi + 0x08]
        mov dword ptr [edi + 0x0C], eax
        /* MOVZX and MOVSX of bytes and words. */
        movzx eax, byte ptr [esi + 0x0E]
        mov dword ptr [edi + 0x10], eax
        movsx eax, byte ptr [esi + 0x0E]
        mov dword ptr [edi + 0x14], eax
        movzx eax, word ptr [esi + 0x0C]
        mov dword ptr [edi + 0x18], eax
        movsx eax, word ptr [esi + 0x0C]
        mov dword ptr [edi + 0x1C], eax
        /* A load into a high-byte register. */
        xor ebx, ebx
        mov bh, byte ptr [esi + 0x00]
        mov dword ptr [edi + 0x20], ebx
        /* Read-modify-write: OR, AND and XOR to memory. */
        or dword ptr [esi + 0x04], 0x0F00F000
        and byte ptr [esi + 0x00], 0x01
        mov eax, 0x80000000
        xor dword ptr [esi + 0x08], eax
        mov eax, dword ptr [esi + 0x04]
        mov dword ptr [edi + 0x24], eax
        /* Flags: AND to zero sets ZF; OR of a negative byte sets SF. */
        and word ptr [esi + 0x02], 0
        setz al
        movzx eax, al
        mov dword ptr [edi + 0x28], eax
        or ebx, dword ptr [esi + 0x08]
        mov dword ptr [edi + 0x2C], ebx
        or byte ptr [esi + 0x0E], 0
        sets al
        movzx eax, al
        mov dword ptr [edi + 0x30], eax
        /* STOS: REP STOSD of 4 dwords (one exit each), then one STOSB. */
        mov ebp, edi
        lea edi, [esi + 0x20]
        mov eax, 0xA5A5A5A5
        mov ecx, 4
        rep stosd
        mov al, 0x5A
        stosb
        mov eax, edi
        sub eax, esi
        mov edi, ebp
        mov dword ptr [edi + 0x34], eax
        mov dword ptr [edi + 0x38], ecx
        mov eax, dword ptr [esi + 0x2C]
        mov dword ptr [edi + 0x3C], eax
        "
    };
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
    // ECX writes of EDI, EDI+1, ... to the first dword of pseudo-random pages of the area at
    // ESI: EBX steps a xorshift32 (13, 17, 5) before each write, whose low bits masked by EDX
    // (pages - 1) pick the page. Then done(EBX), the next round's seed.
    random_writes: Flat32, ".code32", [
        "1:",
        xorshift32_ebx!(),
        "mov eax, ebx",
        "and eax, edx",
        "shl eax, 12",
        "mov dword ptr [esi + eax], edi",
        "inc edi",
        "dec ecx",
        "jnz 1b",
        "xor eax, eax",
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
    // Reads the dword at ESI and counts the reads in the dword at EDI, for ever.
    read_forever: Flat32, ".code32", [
        "1:",
        "mov eax, dword ptr [esi]",
        "inc dword ptr [edi]",
        "jmp 1b",
    ];
    // KVM's dirty_log_test guest: for ever, writes the iteration number the host keeps in the
    // dword at EDI to offset DX of a random page of ESI + 4 KiB * (0..=ECX) (ECX a mask: the
    // page count is a power of two; EBX seeds the generator) and counts its writes in the
    // dword at EDI + 4 (LOCK INC: several writers share it); done(0) once the iteration
    // reads 0xFFFFFFFF. Before each write it spins EDX >> 16 (+1) times, so that a host
    // round can leave part of the pages unwritten.
    dirty_log_writer: Flat32, ".code32", [
        "1:",
        "mov ebp, edx",
        "shr ebp, 16",
        "3:",
        "dec ebp",
        "jns 3b",
        "mov eax, dword ptr [edi]",
        "cmp eax, -1",
        "je 2f",
        "imul ebx, ebx, 1103515245",
        "add ebx, 12345",
        "mov ebp, ebx",
        "shr ebp, 16",
        "and ebp, ecx",
        "shl ebp, 12",
        "add ebp, esi",
        "movzx eax, dx",
        "add ebp, eax",
        "mov eax, dword ptr [edi]",
        "mov dword ptr [ebp], eax",
        "lock inc dword ptr [edi + 4]",
        "jmp 1b",
        "2:",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Copies the dword at ESI to the dword at EDI, for ever (no exit: its translations stay
    // cached).
    copy_forever: Flat32, ".code32", [
        "1:",
        "mov eax, dword ptr [esi]",
        "mov dword ptr [edi], eax",
        "jmp 1b",
    ];
    // Closes the A20 gate through System Control Port A (port 0x92, bit 1), then done(0).
    a20_close: Flat32, ".code32", [
        "in al, 0x92",
        "and al, 0xFD",
        "out 0x92, al",
        "xor eax, eax",
        "xor ebx, ebx",
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
    // INVD, an exit no policy handles (the guest may not drop caches it does not own).
    invd: Flat32, ".code32", [
        "mov al, 0x42",
        "invd",
        "hlt",
    ];
    // The PIC and PIT drive a guest's timer interrupt: IRQ 0 at about 1 kHz, vector 0x20,
    // handled by `irq0_handler` (offset 2: EBX counts, EOI to the master PIC). The guest halts
    // until 10 have come, then spins with interrupts off for EBP TSC ticks (longer than a
    // period: the test says how long that is on this machine) and turns them on for one
    // instruction: the interrupt that waited comes then. Dword 0 at EDI: the count before
    // that STI; the test exit's code: the count after it. Descriptor tables as for
    // `pc_devices`.
    pic_timer: Flat32, ".code32", [
        "jmp 3f",
        "inc ebx",
        "push eax",
        "mov al, 0x20",
        "out 0x20, al",
        "pop eax",
        "iretd",
        "3:",
        "lgdt [0x1800]",
        "lidt [0x1808]",
        "xor ebx, ebx",
        "mov al, 0x11",
        "out 0x20, al",
        "out 0xa0, al",
        "mov al, 0x20",
        "out 0x21, al",
        "mov al, 0x28",
        "out 0xa1, al",
        "mov al, 4",
        "out 0x21, al",
        "mov al, 2",
        "out 0xa1, al",
        "mov al, 1",
        "out 0x21, al",
        "out 0xa1, al",
        "mov al, 0xfe",
        "out 0x21, al",
        "mov al, 0xff",
        "out 0xa1, al",
        // Channel 0, rate generator, 1193 clocks (0x4A9).
        "mov al, 0x34",
        "out 0x43, al",
        "mov al, 0xa9",
        "out 0x40, al",
        "mov al, 0x04",
        "out 0x40, al",
        "sti",
        "4:",
        "hlt",
        "cmp ebx, 10",
        "jb 4b",
        "cli",
        "rdtsc",
        "mov ecx, eax",
        "5:",
        "rdtsc",
        "sub eax, ecx",
        "cmp eax, ebp",
        "jb 5b",
        "mov esi, ebx",
        "sti",
        "nop",
        "cli",
        "mov [edi], esi",
        "mov eax, ebx",
        "out 0xf4, eax",
        "hlt",
    ];
    // String port I/O (EDI at the results, a line of text 0x100 after them): REP OUTSB of the
    // line to the UART, REP INSW of two words from the unclaimed port 0x80 to EDI, one OUTSD
    // stepping down (DF set) to it, then the test exit with ECX (0 when every REP ran out).
    string_io: Flat32, ".code32", [
        "mov esi, edi",
        "add esi, 0x100",
        "cld",
        "mov dx, 0x3f8",
        "mov ecx, 6",
        "rep outsb",
        "mov dx, 0x80",
        "mov ecx, 2",
        "rep insw",
        "std",
        "mov esi, edi",
        "sub esi, 4",
        "outsd",
        "cld",
        "mov [edi], esi",
        "mov eax, ecx",
        "out 0xf4, eax",
        "hlt",
    ];
    // SYSCALL in legacy protected mode, which Intel CPUs refuse with #UD and AMD's run
    // (`#UD` handler at offset 2 counts in EBP and steps over a 2-byte UD2). EFER.SCE on, STAR
    // pointing at the block after the CALL (its address is what the CALL pushes) with CS 0x08;
    // there ECX (the SYSCALL's return address, at a HLT) and EFLAGS go to the results, then a
    // UD2 (reinjected: counted), then the test exit with EBP.
    syscall_legacy: Flat32, ".code32", [
        "jmp 3f",
        "inc ebp",
        "add dword ptr [esp], 2",
        "iretd",
        "3:",
        "lgdt [0x1800]",
        "lidt [0x1808]",
        "xor ebp, ebp",
        "mov ecx, 0xC0000080",
        "rdmsr",
        "or eax, 1",
        "wrmsr",
        "call 5f",
        "mov [edi], ecx",
        "pushfd",
        "pop dword ptr [edi + 4]",
        "ud2",
        "mov eax, ebp",
        "out 0xf4, eax",
        "hlt",
        "5:",
        "pop eax",
        "mov edx, 0x00100008",
        "mov ecx, 0xC0000081",
        "wrmsr",
        "sti",
        "syscall",
        "hlt",
    ];
    // Enables SSE (CR4.OSFXSR) and loads XMM0 from ESI, then done(0).
    xmm_load: Flat32, ".code32", [
        "mov eax, cr4",
        "or eax, 0x200",
        "mov cr4, eax",
        "movdqu xmm0, [esi]",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Enables SSE and stores XMM0 at EDI, then done(0).
    xmm_store: Flat32, ".code32", [
        "mov eax, cr4",
        "or eax, 0x200",
        "mov cr4, eax",
        "movdqu [edi], xmm0",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // The local APIC seen from a guest, vector 0x40 throughout, `apic_handler` at offset 2
    // (EBX counts; EOI through the xAPIC page, or the x2APIC MSR once ESI is 1). In order: a
    // one-shot timer, five periodic ones, a self IPI through the ICR, the version register;
    // then x2APIC mode: the version MSR, a TSC-deadline timer, a self IPI through the
    // SELF IPI MSR. Every timer is armed for EBP counts (or TSC ticks): longer than the
    // handler takes on this machine, which the test knows. Dword 0 at EDI: the xAPIC version;
    // dword 1: the x2APIC version. Ends with the test exit, code EBX (9). Descriptor tables as
    // for `pc_devices`.
    apic_timer: Flat32, ".code32", [
        "jmp 3f",
        "push eax",
        "push ecx",
        "push edx",
        "inc ebx",
        "test esi, esi",
        "jnz 1f",
        "mov dword ptr [0xfee000b0], 0",
        "jmp 2f",
        "1:",
        "mov ecx, 0x80b",
        "xor eax, eax",
        "xor edx, edx",
        "wrmsr",
        "2:",
        "pop edx",
        "pop ecx",
        "pop eax",
        "iretd",
        "3:",
        "lgdt [0x1800]",
        "lidt [0x1808]",
        "xor ebx, ebx",
        "xor esi, esi",
        "mov dword ptr [0xfee000f0], 0x1ff",
        "mov dword ptr [0xfee003e0], 0xb",
        "mov dword ptr [0xfee00320], 0x40",
        "mov dword ptr [0xfee00380], ebp",
        "sti",
        "4:",
        "hlt",
        "cmp ebx, 1",
        "jb 4b",
        "mov dword ptr [0xfee00320], 0x20040",
        "mov dword ptr [0xfee00380], ebp",
        "5:",
        "hlt",
        "cmp ebx, 6",
        "jb 5b",
        "mov dword ptr [0xfee00380], 0",
        "mov dword ptr [0xfee00300], 0x44040",
        "nop",
        "mov eax, dword ptr [0xfee00030]",
        "mov [edi], eax",
        "mov ecx, 0x1b",
        "rdmsr",
        "or eax, 0x400",
        "wrmsr",
        "mov esi, 1",
        "mov ecx, 0x803",
        "rdmsr",
        "mov [edi + 4], eax",
        "mov ecx, 0x832",
        "mov eax, 0x40040",
        "xor edx, edx",
        "wrmsr",
        "rdtsc",
        "add eax, ebp",
        "adc edx, 0",
        "add eax, ebp",
        "adc edx, 0",
        "mov ecx, 0x6e0",
        "wrmsr",
        "6:",
        "hlt",
        "cmp ebx, 8",
        "jb 6b",
        "mov ecx, 0x83f",
        "mov eax, 0x40",
        "xor edx, edx",
        "wrmsr",
        "nop",
        "cli",
        "mov eax, ebx",
        "out 0xf4, eax",
        "hlt",
    ];
    // The bootstrap side of starting an application processor: INIT and a startup message
    // (page 9: 0x9000) to APIC ID 1 through the xAPIC ICR, then a wait until the AP wrote its
    // marker at 0x500. Ends with the test exit, code the CS the AP saw.
    start_ap_bsp: Flat32, ".code32", [
        "mov dword ptr [0xfee000f0], 0x1ff",
        "mov dword ptr [0xfee00310], 0x01000000",
        "mov dword ptr [0xfee00300], 0x00004500",
        "mov dword ptr [0xfee00310], 0x01000000",
        "mov dword ptr [0xfee00300], 0x00004609",
        "1:",
        "pause",
        "cmp word ptr [0x500], 0x5a5a",
        "jne 1b",
        "movzx eax, word ptr [0x502]",
        "out 0xf4, eax",
        "hlt",
    ];
    // The application processor's side, at 0x9000 in real mode: the marker at 0x500 and its
    // CS at 0x502, then `cli; hlt`.
    start_ap_ap: Real, ".code16", [
        "mov ax, cs",
        "mov [0x502], ax",
        "mov ax, 0x5a5a",
        "mov [0x500], ax",
        "cli",
        "hlt",
    ];
    // A Multiboot kernel's first look at its boot information (the kernel test wraps it in an
    // ELF image): EAX must hold the bootloader magic; mem_upper, the command line's first
    // byte and the module count go to 0x3000, 0x3004 and 0x3008; the test exit's code is 0x2a,
    // or 1 for a wrong magic.
    multiboot_probe: Flat32, ".code32", [
        "cmp eax, 0x2badb002",
        "jne 1f",
        "mov ecx, [ebx + 8]",
        "mov [0x3000], ecx",
        "mov esi, [ebx + 16]",
        "movzx ecx, byte ptr [esi]",
        "mov [0x3004], ecx",
        "mov ecx, [ebx + 20]",
        "mov [0x3008], ecx",
        "mov eax, 0x2a",
        "out 0xf4, eax",
        "hlt",
        "1:",
        "mov eax, 1",
        "out 0xf4, eax",
        "hlt",
    ];
    // IA32_TSC_ADJUST from the guest: its first value at [EDI]; the TSC's move across a
    // write of 2^32 to it at [EDI + 8]; then, across a write of 0 to the TSC, the adjustment
    // plus the TSC read just before that write at [EDI + 16] (2^32 less the ticks between).
    tsc_adjust_probe: Flat32, ".code32", [
        "mov ecx, 0x3b",
        "rdmsr",
        "mov [edi], eax",
        "mov [edi + 4], edx",
        "rdtsc",
        "mov esi, eax",
        "mov ebp, edx",
        "mov ecx, 0x3b",
        "xor eax, eax",
        "mov edx, 1",
        "wrmsr",
        "rdtsc",
        "sub eax, esi",
        "sbb edx, ebp",
        "mov [edi + 8], eax",
        "mov [edi + 12], edx",
        "rdtsc",
        "mov esi, eax",
        "mov ebp, edx",
        "mov ecx, 0x10",
        "xor eax, eax",
        "xor edx, edx",
        "wrmsr",
        "mov ecx, 0x3b",
        "rdmsr",
        "add eax, esi",
        "adc edx, ebp",
        "mov [edi + 16], eax",
        "mov [edi + 20], edx",
        "mov eax, 0x3b",
        "out 0xf4, eax",
        "hlt",
    ];
    // Entered as the Linux boot protocol's 64-bit entry: stores CS, DS, SS, RSI (the zero
    // page), the zero page's e820 entry count and CR3 at 0x3000, then exits with 0x2b.
    linux_entry_probe: Long64, ".code64", [
        "mov eax, cs",
        "mov [0x3000], eax",
        "mov eax, ds",
        "mov [0x3004], eax",
        "mov eax, ss",
        "mov [0x3008], eax",
        "mov [0x300c], esi",
        "movzx eax, byte ptr [rsi + 0x1e8]",
        "mov [0x3010], eax",
        "mov rax, cr3",
        "mov [0x3014], eax",
        "mov eax, 0x2b",
        "out 0xf4, eax",
        "hlt",
    ];
    // A read and a write of unassigned space at 0x3000000 (above the PC's RAM): the read's
    // value goes to [EDI], and the test exit's code is 0x55.
    touch_unassigned: Flat32, ".code32", [
        "mov eax, dword ptr [0x3000000]",
        "mov [edi], eax",
        "mov dword ptr [0x3000000], 0x12345678",
        "mov eax, 0x55",
        "out 0xf4, eax",
        "hlt",
    ];
    // The virtual PC's CPUID, MSRs and ports, seen from a guest. The host has written a GDT
    // (pseudo-descriptor at 0x1800) and an IDT (0x1808) whose #GP gate is `gp_handler`, at
    // offset 2. Results go to dwords at EDI (see the kernel test `devices`); EBP counts the
    // #GPs. Ends with the test exit, code 0x11.
    pc_devices: Flat32, ".code32", [
        "jmp 3f",
        // #GP: drop the error code, step over the 2-byte RDMSR/WRMSR, count it.
        "add esp, 4",
        "add dword ptr [esp], 2",
        "inc ebp",
        "iretd",
        "3:",
        "lgdt [0x1800]",
        "lidt [0x1808]",
        "xor ebp, ebp",
        "mov eax, 0x40000000",
        "cpuid",
        "mov [edi + 0], ebx",
        "mov [edi + 4], ecx",
        "mov [edi + 8], edx",
        "mov eax, 1",
        "cpuid",
        "mov [edi + 12], ecx",
        "mov [edi + 16], ebx",
        "mov ecx, 0x1b",
        "rdmsr",
        "mov [edi + 20], eax",
        // Refused: IA32_SPEC_CTRL (nothing emulates it).
        "mov ecx, 0x48",
        "rdmsr",
        // Refused: PAT entry 0 of type 2 (undefined).
        "mov ecx, 0x277",
        "mov eax, 2",
        "xor edx, edx",
        "wrmsr",
        "mov eax, 0x06060606",
        "mov edx, 0x06060606",
        "wrmsr",
        "xor eax, eax",
        "rdmsr",
        "mov [edi + 24], eax",
        "mov ecx, 0xc0000080",
        "rdmsr",
        "mov [edi + 28], eax",
        // Refused: a non-canonical LSTAR (bit 63 alone: non-canonical with 48-bit and with
        // 57-bit linear addresses); then a canonical one, read back.
        "mov ecx, 0xc0000082",
        "mov eax, 0x12345678",
        "mov edx, 0x80000000",
        "wrmsr",
        "xor edx, edx",
        "wrmsr",
        "xor eax, eax",
        "rdmsr",
        "mov [edi + 32], eax",
        "mov [edi + 36], ebp",
        // "ok" and a newline through the UART, polling the transmitter-empty bit.
        "mov esi, 0x0a6b6f",
        "4:",
        "mov dx, 0x3fd",
        "5:",
        "in al, dx",
        "test al, 0x20",
        "jz 5b",
        "mov dx, 0x3f8",
        "mov eax, esi",
        "out dx, al",
        "shr esi, 8",
        "jnz 4b",
        // fw_cfg: the CPU count.
        "mov dx, 0x510",
        "mov ax, 5",
        "out dx, ax",
        "mov dx, 0x511",
        "in al, dx",
        "movzx eax, al",
        "mov [edi + 40], eax",
        // An unclaimed port reads all ones.
        "in al, 0x80",
        "movzx eax, al",
        "mov [edi + 44], eax",
        // The ACPI PM timer, twice.
        "mov dx, 0x608",
        "in eax, dx",
        "mov [edi + 48], eax",
        "mov ecx, 1000",
        "6:",
        "loop 6b",
        "in eax, dx",
        "mov [edi + 52], eax",
        "in al, 0x92",
        "movzx eax, al",
        "mov [edi + 56], eax",
        "mov eax, 0x11",
        "out 0xf4, eax",
        "hlt",
    ];
    // The MMIO instruction forms in 32-bit protected mode (see `mmio_forms_32`), then done(0).
    mmio_forms_flat32: Flat32, ".code32", [
        mmio_forms_32!(),
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Long mode, entered through the guest's own page tables: the shared forms, then the
    // 8-byte forms (results as qwords from RDI + 0x40), a REX register, and a store to RAM
    // at R12 (above 4 GiB in the test), then done(0).
    mmio_forms_long64: Long64, ".code64", [
        mmio_forms_32!(),
        "mov rax, 0x1122334455667788",
        "mov qword ptr [rsi + 0x40], rax",
        "mov qword ptr [rsi + 0x48], -2",
        "mov rbx, qword ptr [rsi + 0x40]",
        "mov qword ptr [rdi + 0x40], rbx",
        "movsxd rcx, dword ptr [rsi + 0x48]",
        "mov qword ptr [rdi + 0x48], rcx",
        "or qword ptr [rsi + 0x40], 0x0F",
        "mov r10, qword ptr [rsi + 0x40]",
        "mov qword ptr [rdi + 0x50], r10",
        "mov dword ptr [r12], 0x600DCAFE",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Sets CR0.WP, then MOVSQ from RSI (the device) to RDI (a read-only page the test
    // chose): the emulated store is refused by the guest's own page tables. Done(0) only if
    // the store went through.
    // Jumps to RAX.
    jump_to_rax_long64: Long64, ".code64", [
        "jmp rax",
    ];
    movs_to_read_only_long64: Long64, ".code64", [
        "mov rax, cr0",
        "or rax, 0x10000",
        "mov cr0, rax",
        "movsq",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Calls the routine at linear R9 five times, the 2 MiB page there mapped through the page
    // directory entry at R8 to physical 0x200000 three times, then 0x400000, then 0x200000
    // again (changed in memory, then INVLPG: no exit), RSI stepping by 4 after each call;
    // then done(0).
    mmio_code_remapped: Long64, ".code64", [
        "mov r10, 0x200083",
        "mov r11, 0x400083",
        "mov [r8], r10",
        "invlpg [r9]",
        "call r9",
        "add rsi, 4",
        "call r9",
        "add rsi, 4",
        "call r9",
        "add rsi, 4",
        "mov [r8], r11",
        "invlpg [r9]",
        "call r9",
        "add rsi, 4",
        "mov [r8], r10",
        "invlpg [r9]",
        "call r9",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Real mode: the test device at segment 0xA000 through DS and ES, results through FS = 0
    // at 0x9000 (words and dwords), then done(0).
    mmio_forms_real: Real, ".code16", [
        "mov ax, 0xA000",
        "mov ds, ax",
        "mov es, ax",
        "xor ax, ax",
        "mov fs, ax",
        "mov byte ptr [0x00], 0x11",
        "mov word ptr [0x02], 0x2233",
        "mov ax, 0x4455",
        "mov word ptr [0x04], ax",
        "mov dword ptr [0x08], 0x8899AABB",
        "mov bl, byte ptr [0x00]",
        "mov byte ptr fs:[0x9000], bl",
        "mov cx, word ptr [0x02]",
        "mov word ptr fs:[0x9002], cx",
        "mov edx, dword ptr [0x08]",
        "mov dword ptr fs:[0x9004], edx",
        "movzx eax, byte ptr [0x00]",
        "mov dword ptr fs:[0x9008], eax",
        "or word ptr [0x04], 0x0F00",
        "mov di, 0x10",
        "mov al, 0x77",
        "mov cx, 3",
        "rep stosb",
        "mov ax, word ptr [0x04]",
        "mov word ptr fs:[0x900C], ax",
        "mov word ptr fs:[0x900E], di",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Jumps to ESI.
    jump_to: Flat32, ".code32", [
        "jmp esi",
    ];
    // LGDT from memory, which the emulator does not support: against MMIO it stops the VM.
    lgdt_mmio: Flat32, ".code32", [
        "lgdt [esi]",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // CMPXCHG8B on memory, which the emulator does not support either.
    cmpxchg8b_mmio: Flat32, ".code32", [
        "cmpxchg8b qword ptr [esi]",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Writes EDI to the dwords at each address of the list at ESI (ECX dword addresses, maybe
    // none), and again 8 bytes further on (the same page: no second exit), then done(0).
    write_list: Flat32, ".code32", [
        "jecxz 2f",
        "1:",
        "mov ebx, dword ptr [esi]",
        "mov dword ptr [ebx], edi",
        "mov dword ptr [ebx + 8], edi",
        "add esi, 4",
        "dec ecx",
        "jnz 1b",
        "2:",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Reads the dword at ESI and reports it, writes EDI there, reads and reports it again,
    // then done(0): what a ROM did with the write is in the two reports.
    rom_probe: Flat32, ".code32", [
        "mov ebx, dword ptr [esi]",
        "mov eax, 1",
        "vmcall",
        "mov dword ptr [esi], edi",
        "mov ebx, dword ptr [esi]",
        "mov eax, 1",
        "vmcall",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Spins on one instruction (`jmp $`, EB FE) and never exits by itself: in real mode, in
    // protected mode and in long mode.
    spin_real: Real, ".code16", [
        "2:",
        "jmp 2b",
    ];
    spin_flat32: Flat32, ".code32", [
        "2:",
        "jmp 2b",
    ];
    // The same with interrupts enabled (the IDT is empty: an interrupt given to this guest
    // would triple-fault it).
    spin_interrupts_on: Flat32, ".code32", [
        "sti",
        "2:",
        "jmp 2b",
    ];
    spin_long64: Long64, ".code64", [
        "2:",
        "jmp 2b",
    ];
    // Counts ECX iterations: EBX counts up, EDX sums EBX; then done(EBX).
    count_loop: Flat32, ".code32", [
        "1:",
        "inc ebx",
        "add edx, ebx",
        "dec ecx",
        "jnz 1b",
        "xor eax, eax",
        "vmcall",
        "hlt",
    ];
    // A guest with state in every place a migration must carry: ECX rounds of a xorshift32
    // (13, 17, 5) in EBX, each adding EBX to the dword of the area at ESI that its low bits
    // masked by EDX (dwords - 1) pick and to the sum in XMM0; before them the UART's scratch
    // register gets 0xA5 and the APIC's TPR 0x20. Then it reports EBX, XMM0's low dword, the
    // scratch register and the TPR, and ends with done(0).
    migration_workload: Flat32, ".code32", [
        "mov eax, cr4",
        "or eax, 0x200",
        "mov cr4, eax",
        "pxor xmm0, xmm0",
        "mov ebp, edx",
        "mov dx, 0x3FF",
        "mov al, 0xA5",
        "out dx, al",
        "mov edx, ebp",
        "mov dword ptr [0xFEE00080], 0x20",
        "1:",
        xorshift32_ebx!(),
        "mov eax, ebx",
        "and eax, edx",
        "add dword ptr [esi + eax * 4], ebx",
        "movd xmm2, ebx",
        "paddd xmm0, xmm2",
        "dec ecx",
        "jnz 1b",
        "mov eax, 1",
        "vmcall",
        "movd ebx, xmm0",
        "mov eax, 1",
        "vmcall",
        "mov dx, 0x3FF",
        "xor eax, eax",
        "in al, dx",
        "mov ebx, eax",
        "mov eax, 1",
        "vmcall",
        "mov ebx, dword ptr [0xFEE00080]",
        "mov eax, 1",
        "vmcall",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Halts with interrupts off: nothing can ever wake it.
    hlt_interrupts_off: Flat32, ".code32", [
        "cli",
        "hlt",
    ];
    // Fills ECX bytes from EDI with AL (one REP STOSB), then done(0).
    fill_bytes: Flat32, ".code32", [
        "cld",
        "rep stosb",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // A spin-wait that never ends: PAUSE in a loop.
    pause_loop: Flat32, ".code32", [
        "1:",
        "pause",
        "jmp 1b",
    ];
    // Waits with MONITOR (on the address in ESI) and MWAIT for ever, counting wake-ups in EBX.
    monitor_mwait_loop: Flat32, ".code32", [
        "1:",
        "mov eax, esi",
        "xor ecx, ecx",
        "xor edx, edx",
        "monitor",
        "xor eax, eax",
        "mwait",
        "inc ebx",
        "jmp 1b",
    ];
    // Hostile: for ECX = 1..=EBX, flips the A20 gate through port 0x92, writes ECX to 0x100010
    // (0x10 while the gate is closed) and ECX * 0x10001 across the 1 MiB boundary at 0xFFFFE,
    // and stores what it then reads at 0x10 to EDI + 4 * ECX; then done(0).
    a20_toggle_writes: Flat32, ".code32", [
        "mov ecx, 1",
        "1:",
        "in al, 0x92",
        "xor al, 2",
        "out 0x92, al",
        "mov dword ptr [0x100010], ecx",
        "imul eax, ecx, 0x10001",
        "mov dword ptr [0xFFFFE], eax",
        "mov eax, dword ptr [0x10]",
        "mov dword ptr [edi + ecx * 4], eax",
        "inc ecx",
        "cmp ecx, ebx",
        "jbe 1b",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Hostile: probes guest-physical addresses from a list at RSI (RDI entries of 16 bytes:
    // the address, then 0 read, 1 read and write back, 2 call), from entry RBX on, writing the
    // index of the probe under way to [R12]. Each address is reached through a 1 GiB page the
    // guest writes into its own PDPT entry at [R13] (linear 5 GiB up); then done(0).
    probe_list: Long64, ".code64", [
        "1:",
        "cmp rbx, rdi",
        "jae 9f",
        "mov [r12], rbx",
        "mov rax, rbx",
        "shl rax, 4",
        "mov rdx, [rsi + rax]",
        "mov rcx, [rsi + rax + 8]",
        "mov rax, rdx",
        "shr rax, 30",
        "shl rax, 30",
        "or rax, 0x83",
        "mov [r13], rax",
        "mov eax, edx",
        "and eax, 0x3FFFFFFF",
        "mov r8, 0x140000000",
        "add rax, r8",
        "invlpg [rax]",
        "cmp rcx, 1",
        "je 2f",
        "cmp rcx, 2",
        "je 3f",
        "mov r9, [rax]",
        "jmp 4f",
        "2:",
        "mov r9, [rax]",
        "mov [rax], r9",
        "jmp 4f",
        "3:",
        "call rax",
        "4:",
        "inc rbx",
        "jmp 1b",
        "9:",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Hostile: turns paging on with CR3 = EAX (its page tables wherever EAX points), then
    // done(0) if it ever gets there.
    paging_from_eax: Flat32, ".code32", [
        "mov cr3, eax",
        "mov eax, cr0",
        "or eax, 0x80000000",
        "mov cr0, eax",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
        "hlt",
    ];
    // Hostile: stores EAX to the device at ESI, then ECX - 1 more times EBX once the store was
    // rewritten under it (the host's device rewrites `mov [esi], eax` into `mov [esi], ebx`
    // while it emulates it); then done(0).
    rewritten_store: Flat32, ".code32", [
        "1:",
        "mov dword ptr [esi], eax",
        "dec ecx",
        "jnz 1b",
        "xor eax, eax",
        "xor ebx, ebx",
        "vmcall",
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
