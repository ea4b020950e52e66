//! Guest entry and exit: the assembly around VMRUN. VMRUN itself saves and restores the host's
//! RIP, RSP, RFLAGS, control registers and CS/SS/DS/ES; VMSAVE and VMLOAD swap the rest
//! (FS, GS, TR and LDTR with their hidden parts, KERNEL_GS_BASE and the SYSCALL and SYSENTER
//! MSRs) between the host's area and the guest's VMCB. The global interrupt flag is clear from
//! before the host's state leaves until it is back, so no interrupt or NMI reaches the host on
//! the guest's GS or TR. RFLAGS.IF is set across VMRUN so that host interrupts make the guest
//! exit (the INTR intercept with V_INTR_MASKING), and clear again before GIF opens, so that they
//! wait for the vCPU loop's own window.

use core::arch::global_asm;

use super::GuestRegisters;

// svm_enter(regs: *mut GuestRegisters /* rdi */, vmcb: u64 /* rsi */, host_area: u64 /* rdx */)
global_asm!(
    ".global svm_enter",
    "svm_enter:",
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdi",
    "push rdx",
    "push rsi",
    "clgi",
    "mov rax, rdx",
    "vmsave rax",
    "mov rax, [rsp]",
    "vmload rax",
    "sti",
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
    "vmrun rax",
    ".global svm_after_vmrun",
    "svm_after_vmrun:",
    // #VMEXIT: GIF is clear; RSP is the host's again, RAX is not the guest's (that is in the
    // VMCB), so the VMCB's address comes back from the stack.
    "mov rax, [rsp]",
    "vmsave rax",
    "push rdi",
    "mov rdi, [rsp + 24]",
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
    "mov rax, [rsp + 8]",
    "vmload rax",
    "cli",
    "stgi",
    "add rsp, 24",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
);

unsafe extern "sysv64" {
    fn svm_enter(regs: *mut GuestRegisters, vmcb: u64, host_area: u64);
    /// The instruction after the entry's VMRUN (only its address is used).
    static svm_after_vmrun: u8;
}

/// The address VMRUN saves as the host's RIP: the instruction after it in [`run_guest`].
pub fn host_resume_address() -> u64 {
    // Only the label's address is taken; nothing reads through it.
    core::ptr::addr_of!(svm_after_vmrun) as u64
}

/// CLGI: interrupts and NMIs wait until the next VMRUN (which sets GIF in the guest) or STGI.
/// [`run_guest`] clears it again and sets it after the guest's exit.
pub fn clear_global_interrupt_flag() {
    // SAFETY: SVM is on (only SVM vCPUs call this, on their CPU); CLGI only holds interrupts
    // and NMIs pending, and the entry that follows sets GIF again on every path.
    unsafe { core::arch::asm!("clgi", options(nomem, nostack)) };
}

/// Runs the guest of the VMCB at `vmcb` with `regs` (RAX aside, which the VMCB holds) until
/// its next #VMEXIT, with the host's extra state kept in `host_area`; the guest's registers are
/// in `regs` afterwards. A VMRUN the CPU refuses exits at once with VMEXIT_INVALID.
///
/// # Safety
///
/// SVM must be on for this CPU (EFER.SVME, a host save area) and interrupts disabled. `vmcb`
/// must be a complete VMCB whose intercepts include VMRUN and SHUTDOWN and every physical
/// interrupt and NMI, whose nested paging is on with nCR3 naming tables that map only frames
/// this VM holds (the isolation invariant pgm's auditor checks), and whose I/O and MSR
/// permission maps are the vCPU's own. `host_area` must be this CPU's VMSAVE area.
pub unsafe fn run_guest(vmcb: u64, host_area: u64, regs: &mut GuestRegisters) {
    // SAFETY: the caller vouches for the VMCB and the CPU (see above); svm_enter preserves
    // every callee-saved register, restores the host's segment and system state, and returns
    // with interrupts disabled as they were.
    unsafe { svm_enter(regs, vmcb, host_area) }
}
