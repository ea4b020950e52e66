//! Guest entry and exit: the assembly that swaps general-purpose registers around
//! VMLAUNCH/VMRESUME and the VM-exit landing point (the VMCS host RIP).

use core::arch::global_asm;

use super::vmcs::CurrentVmcs;

pub use crate::arch::registers::GuestRegisters;

// vmx_enter(regs: *mut GuestRegisters /* rdi */, launched: u64 /* rsi */) -> u64
//   Saves the host's callee-saved registers, stores RSP as the VMCS host RSP, loads the guest's
//   registers and enters the guest. Returns 0 through vmx_exit after a VM exit, or 1 when
//   VMLAUNCH/VMRESUME itself failed (the VMCS's VM-instruction error says why).
// vmx_exit: the VMCS host RIP. RSP is the host RSP saved above, [rsp] holds `regs`.
global_asm!(
    ".global vmx_enter",
    ".global vmx_exit",
    "vmx_enter:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "mov rax, 0x6C14", // VMCS field: host RSP
    "vmwrite rax, rsp",
    "cmp rsi, 0", // flags survive the MOVs below
    "mov rax, [rdi + 0]",
    "mov rbx, [rdi + 8]",
    "mov rcx, [rdi + 16]",
    "mov rdx, [rdi + 24]",
    "mov rsi, [rdi + 32]",
    "mov rbp, [rdi + 48]",
    "mov r8, [rdi + 56]",
    "mov r9, [rdi + 64]",
    "mov r10, [rdi + 72]",
    "mov r11, [rdi + 80]",
    "mov r12, [rdi + 88]",
    "mov r13, [rdi + 96]",
    "mov r14, [rdi + 104]",
    "mov r15, [rdi + 112]",
    "mov rdi, [rdi + 40]",
    "je 2f",
    "vmresume",
    "jmp 3f",
    "2:",
    "vmlaunch",
    "3:", // entry failed; the host state is as before entry except the GPRs
    "pop rdi",
    "mov eax, 1",
    "jmp 4f",
    "vmx_exit:",
    "push rdi",
    "mov rdi, [rsp + 8]",
    "mov [rdi + 0], rax",
    "mov [rdi + 8], rbx",
    "mov [rdi + 16], rcx",
    "mov [rdi + 24], rdx",
    "mov [rdi + 32], rsi",
    "mov [rdi + 48], rbp",
    "mov [rdi + 56], r8",
    "mov [rdi + 64], r9",
    "mov [rdi + 72], r10",
    "mov [rdi + 80], r11",
    "mov [rdi + 88], r12",
    "mov [rdi + 96], r13",
    "mov [rdi + 104], r14",
    "mov [rdi + 112], r15",
    "pop rax",
    "mov [rdi + 40], rax",
    "pop rdi",
    "xor eax, eax",
    "4:", // both paths: restore the host's callee-saved registers
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
);

unsafe extern "sysv64" {
    fn vmx_enter(regs: *mut GuestRegisters, launched: u64) -> u64;
    static vmx_exit: u8;
}

/// The address the CPU jumps to on VM exit (the VMCS host RIP).
pub fn exit_entry_point() -> u64 {
    &raw const vmx_exit as u64
}

/// Enters the guest of `vmcs` (the current VMCS) with `regs` (VMLAUNCH first, VMRESUME when
/// `launched`) and returns after the next VM exit with the guest's registers in `regs`.
/// `Err(())` when the entry instruction failed; read the VM-instruction error from the VMCS.
///
/// # Safety
///
/// `vmcs` must hold complete host state for this CPU, with host RIP at [`exit_entry_point`]
/// and the host stack, segments and control registers of the running kernel, so that the exit
/// returns here. Its EPT pointer must name tables that map only frames this VM holds (the
/// isolation invariant pgm's auditor checks): the guest then reaches no host memory.
/// `launched` must be true exactly when this VMCS was launched since its last VMCLEAR.
pub unsafe fn run_guest(_vmcs: &CurrentVmcs, regs: &mut GuestRegisters, launched: bool) -> Result<(), ()> {
    // SAFETY: the caller vouches for the VMCS (see above); vmx_enter preserves every
    // callee-saved register and returns normally on both the exit and the failure path.
    let failed = unsafe { vmx_enter(regs, launched as u64) };
    if failed == 0 {
        Ok(())
    } else {
        Err(())
    }
}
