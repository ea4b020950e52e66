//! Host exception handlers: a host fault is a hypervisor bug, so each one prints what happened
//! and ends the run with a failure instead of resetting the machine.

use spin::Once;
use x86_64::structures::idt::{InterruptDescriptorTable, InterruptStackFrame, PageFaultErrorCode};

use super::gdt::DOUBLE_FAULT_IST;
use super::power::{exit, ExitCode};

static IDT: Once<InterruptDescriptorTable> = Once::new();

/// Loads the IDT. Call once at boot, after the GDT (the double-fault handler uses an IST stack).
pub fn init() {
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        idt.divide_error.set_handler_fn(divide_error);
        idt.invalid_opcode.set_handler_fn(invalid_opcode);
        idt.general_protection_fault.set_handler_fn(general_protection);
        idt.page_fault.set_handler_fn(page_fault);
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
