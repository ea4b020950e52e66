//! The host GDT with a TSS. VMX needs a non-null host TR selector (SDM 27.2.3), and the TSS gives
//! the double-fault handler a known-good stack.

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

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();

/// Loads the GDT and TSS and reloads every segment register. Call once at boot.
pub fn init() {
    let tss = TSS.call_once(|| {
        static mut STACK: [u8; IST_STACK_SIZE] = [0; IST_STACK_SIZE];
        let mut tss = TaskStateSegment::new();
        let stack_start = VirtAddr::from_ptr(&raw const STACK);
        tss.interrupt_stack_table[DOUBLE_FAULT_IST as usize] = stack_start + IST_STACK_SIZE as u64;
        tss
    });
    let (gdt, selectors) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        (gdt, Selectors { code, data, tss })
    });
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

/// The selectors loaded by [`init`].
pub fn selectors() -> Selectors {
    GDT.get().expect("gdt::init ran at boot").1
}

/// Linear address of the TSS (the VMCS host TR base).
pub fn tss_base() -> u64 {
    TSS.get().map_or(0, |tss| tss as *const TaskStateSegment as u64)
}
