//! Host exception and interrupt handlers. A host fault is a hypervisor bug, so each exception
//! handler prints what happened and ends the run with a failure instead of resetting the
//! machine. Host interrupts (the local APIC timer, NMIs) are taken by the host: the kernel runs
//! with interrupts disabled and opens a one-instruction window ([`deliver_pending`]) after a
//! guest exits because of one.

use core::sync::atomic::{AtomicU64, Ordering};

use spin::Once;
use x86_64::structures::idt::{InterruptDescriptorTable, InterruptStackFrame, PageFaultErrorCode};

use super::apic::{self, IPI_VECTOR, PIC_VECTOR_BASE, SPURIOUS_VECTOR, TIMER_VECTOR};
use super::gdt::DOUBLE_FAULT_IST;
use super::power::{exit, ExitCode};

/// Host timer interrupts taken since boot.
static TIMER_INTERRUPTS: AtomicU64 = AtomicU64::new(0);

static IDT: Once<InterruptDescriptorTable> = Once::new();

/// Builds and loads the IDT (shared by every CPU). Call once at boot, after the GDT (the
/// double-fault handler uses an IST stack).
pub fn init() {
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        idt.divide_error.set_handler_fn(divide_error);
        idt.invalid_opcode.set_handler_fn(invalid_opcode);
        idt.general_protection_fault.set_handler_fn(general_protection);
        idt.page_fault.set_handler_fn(page_fault);
        idt.non_maskable_interrupt.set_handler_fn(nmi);
        idt[TIMER_VECTOR].set_handler_fn(apic_timer);
        idt[IPI_VECTOR].set_handler_fn(host_ipi);
        idt[SPURIOUS_VECTOR].set_handler_fn(ignored_interrupt);
        // The masked PICs can still raise their spurious IRQ 7 and 15.
        idt[PIC_VECTOR_BASE + 7].set_handler_fn(ignored_interrupt);
        idt[PIC_VECTOR_BASE + 15].set_handler_fn(ignored_interrupt);
        // SAFETY: DOUBLE_FAULT_IST names a stack set up in the TSS by gdt::init.
        unsafe {
            idt.double_fault
                .set_handler_fn(double_fault)
                .set_stack_index(DOUBLE_FAULT_IST);
        }
        idt
    });
    idt.load();
}

/// Loads the IDT [`init`] built on an application processor.
pub fn load() {
    if let Some(idt) = IDT.get() {
        idt.load();
    }
}

/// Halts until an interrupt arrives and has been handled, then returns with interrupts off.
/// STI's shadow covers HLT, so an interrupt pending since before the call wakes it.
pub fn wait_for_interrupt() {
    // SAFETY: the handlers installed by `init` may run at any point outside a vCPU run (they
    // touch atomics and the local APIC only); interrupts are off again afterwards.
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

/// Host timer interrupts taken since boot.
pub fn timer_interrupts() -> u64 {
    TIMER_INTERRUPTS.load(Ordering::Relaxed)
}

/// Lets the host take the interrupts pending at the CPU: enables interrupts for exactly one
/// instruction (STI's shadow covers the NOP) and disables them again. The vCPU loop calls it
/// before every VM entry: an interrupt that made the guest exit stays pending (the exit does
/// not acknowledge it), and one that arrived while interrupts were masked is taken here too.
pub fn deliver_pending() {
    // SAFETY: the handlers installed by `init` only touch atomics and the local APIC, so they
    // may run at this point of the vCPU loop; interrupts are off again afterwards.
    unsafe { core::arch::asm!("sti", "nop", "cli", options(nomem, nostack)) };
}

/// Hands an NMI that made a guest exit to the host's NMI handler, as if it had arrived in the
/// host (NMI exiting delivers it to neither).
pub fn deliver_nmi() {
    // SAFETY: vector 2 has the host's NMI handler (`init`), which only counts it.
    unsafe { core::arch::asm!("int 2", options(nomem, nostack)) };
}

extern "x86-interrupt" fn apic_timer(_frame: InterruptStackFrame) {
    TIMER_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    crate::vm::host_timer_fired();
    apic::end_of_interrupt();
}

/// Wakes a CPU for work sent to it (its idle loop looks for work after every interrupt), and
/// carries out EPT-flush requests ([`super::smp::flush_ept_on`]).
extern "x86-interrupt" fn host_ipi(_frame: InterruptStackFrame) {
    super::smp::flush_request_received();
    apic::end_of_interrupt();
}

/// The host's NMIs are EPT-flush requests from other CPUs ([`super::smp::flush_ept_on`]); an
/// NMI that made a guest exit is handed here too, so it is never left to a guest.
extern "x86-interrupt" fn nmi(_frame: InterruptStackFrame) {
    super::smp::flush_request_received();
}

extern "x86-interrupt" fn ignored_interrupt(_frame: InterruptStackFrame) {}

fn host_fault(name: &str, frame: &InterruptStackFrame, detail: core::fmt::Arguments) -> ! {
    crate::println!(
        "HOST EXCEPTION {name} at RIP {:#x} (RSP {:#x}): {detail}",
        frame.instruction_pointer.as_u64(),
        frame.stack_pointer.as_u64()
    );
    crate::tests_report_abort("host exception");
    exit(ExitCode::Failure, "host exception")
}

extern "x86-interrupt" fn divide_error(frame: InterruptStackFrame) {
    host_fault("#DE", &frame, format_args!(""));
}

extern "x86-interrupt" fn invalid_opcode(frame: InterruptStackFrame) {
    host_fault("#UD", &frame, format_args!(""));
}

extern "x86-interrupt" fn general_protection(frame: InterruptStackFrame, code: u64) {
    host_fault("#GP", &frame, format_args!("error code {code:#x}"));
}

extern "x86-interrupt" fn page_fault(frame: InterruptStackFrame, code: PageFaultErrorCode) {
    let address = x86_64::registers::control::Cr2::read_raw();
    host_fault("#PF", &frame, format_args!("address {address:#x}, {code:?}"));
}

extern "x86-interrupt" fn double_fault(frame: InterruptStackFrame, _code: u64) -> ! {
    host_fault("#DF", &frame, format_args!(""))
}
