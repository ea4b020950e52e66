//! The host GDT with a TSS, one pair per CPU (a TSS descriptor is marked busy when loaded, so
//! CPUs cannot share one). VMX needs a non-null host TR selector (SDM 27.2.3), and the TSS gives
//! the double-fault handler a known-good stack. Every CPU's GDT has the same layout, so the
//! selectors are the same everywhere.

use alloc::boxed::Box;
use alloc::vec;

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, FS, GS, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::SegmentSelector;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot used by the double-fault handler.
pub const DOUBLE_FAULT_IST: u16 = 0;
const IST_STACK_SIZE: usize = 16 * 1024;

/// The selectors the host runs with, as the VMCS host-state area needs them.
#[derive(Clone, Copy, Debug)]
pub struct Selectors {
    /// 64-bit kernel code.
    pub code: SegmentSelector,
    /// Kernel data (SS, DS, ES).
    pub data: SegmentSelector,
    /// The TSS.
    pub tss: SegmentSelector,
}

static BOOT_TSS: Once<TaskStateSegment> = Once::new();
static BOOT_GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();

/// Loads the boot processor's GDT and TSS and reloads every segment register. Call once at
/// boot, before the heap exists (its tables are statics). Returns the TSS's address.
pub fn init() -> u64 {
    let tss = BOOT_TSS.call_once(|| {
        static mut STACK: [u8; IST_STACK_SIZE] = [0; IST_STACK_SIZE];
        tss_with_stack(VirtAddr::from_ptr(&raw const STACK))
    });
    let (gdt, selectors) = BOOT_GDT.call_once(|| gdt_for(tss));
    load(gdt, *selectors);
    tss as *const TaskStateSegment as u64
}

/// Loads a new GDT and TSS (with their own double-fault stack, on the heap, kept for the
/// kernel's life) on an application processor. Returns the TSS's address.
pub fn init_application_processor() -> u64 {
    let stack: &'static mut [u8] = vec![0; IST_STACK_SIZE].leak();
    let tss: &'static TaskStateSegment =
        Box::leak(Box::new(tss_with_stack(VirtAddr::from_ptr(stack.as_ptr()))));
    let (gdt, selectors) = Box::leak(Box::new(gdt_for(tss)));
    load(gdt, *selectors);
    tss as *const TaskStateSegment as u64
}

/// The selectors every CPU's GDT has (VMX's host state names them).
#[cfg_attr(feature = "svm", allow(dead_code))]
pub fn selectors() -> Selectors {
    BOOT_GDT.get().expect("gdt::init ran at boot").1
}

fn tss_with_stack(stack_start: VirtAddr) -> TaskStateSegment {
    let mut tss = TaskStateSegment::new();
    tss.interrupt_stack_table[DOUBLE_FAULT_IST as usize] = stack_start + IST_STACK_SIZE as u64;
    tss
}

fn gdt_for(tss: &'static TaskStateSegment) -> (GlobalDescriptorTable, Selectors) {
    let mut gdt = GlobalDescriptorTable::new();
    let code = gdt.append(Descriptor::kernel_code_segment());
    let data = gdt.append(Descriptor::kernel_data_segment());
    let tss = gdt.append(Descriptor::tss_segment(tss));
    (gdt, Selectors { code, data, tss })
}

fn load(gdt: &'static GlobalDescriptorTable, selectors: Selectors) {
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, whose descriptors are valid 64-bit kernel
    // code/data and an available TSS; FS and GS are unused (null is valid in 64-bit mode).
    unsafe {
        CS::set_reg(selectors.code);
        SS::set_reg(selectors.data);
        DS::set_reg(selectors.data);
        ES::set_reg(selectors.data);
        FS::set_reg(SegmentSelector(0));
        GS::set_reg(SegmentSelector(0));
        load_tss(selectors.tss);
    }
}
