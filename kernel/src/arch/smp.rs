//! The host's processors: the list from the ACPI MADT, per-CPU state (found through the GS
//! base), starting the application processors (INIT, then start-up IPIs into a real-mode
//! trampoline in a low frame), and running work on a chosen CPU.
//!
//! Each CPU gets its own GDT, TSS, stack and VMXON region; the IDT and the kernel's page tables
//! are shared. A CPU that fails to start, or that starts without VMX, is reported and left out
//! of the CPUs work can be sent to.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use pgm::frames::HostFrameAllocator;
use pgm::HostPhysAddr;
use spin::{Mutex, Once};
use x86::msr::{rdmsr, wrmsr, IA32_GS_BASE};
use x86_64::registers::control::Cr3;
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

use super::memory::{KernelFrames, PhysMap};
use super::virt;
use super::{acpi, apic, gdt, idt, ticks};

/// Stack of each application processor (the boot processor's comes from the bootloader).
const AP_STACK_SIZE: usize = 256 * 1024;
/// Where the trampoline's parameters sit in its page (the code is below, its stack under them).
const PARAMS_OFFSET: usize = 0xF00;
/// TSC ticks to wait for a CPU to arrive after a start-up IPI before sending the second one,
/// and after the second before giving up (≥ 200 µs at any TSC rate up to 5 GHz; Bochs starts
/// a CPU at once).
const ARRIVAL_WAIT: u64 = 1_000_000;
/// TSC ticks a CPU that arrived may take to set itself up (GDT, APIC, VMXON).
const SETUP_WAIT: u64 = 2_000_000_000;

/// How far a CPU got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CpuState {
    /// Not started (or never arrived).
    Absent = 0,
    /// Running the kernel, setting itself up.
    Arrived = 1,
    /// Set up, with VMX on: takes work.
    Ready = 2,
    /// Started but unusable (no local APIC or no virtualization): reported and left out.
    Failed = 3,
}

/// Work sent to a CPU.
type Job = Box<dyn FnOnce() + Send>;

/// One host CPU's state. Reached on the CPU itself through [`this_cpu`], and by the others
/// through [`cpus`].
pub struct PerCpu {
    /// Position in [`cpus`] (0 is the boot processor).
    pub index: usize,
    /// APIC ID (from the MADT).
    pub apic_id: u32,
    state: AtomicU8,
    /// Why the CPU is [`CpuState::Failed`], or VMX root operation on it.
    virt: Once<Result<virt::On, virt::Error>>,
    /// Address of the CPU's TSS (the VMCS host TR base).
    tss_base: AtomicU64,
    /// The VMCS current on this CPU (0: none), so VMPTRLD is skipped when it already is.
    #[cfg_attr(feature = "svm", allow(dead_code))]
    pub current_vmcs: AtomicU64,
    /// Work waiting to run here, in order.
    jobs: Mutex<VecDeque<Job>>,
    /// EPT flushes asked of this CPU so far (raised by the CPU asking, before its IPI).
    flushes_requested: AtomicU64,
    /// The number of requested flushes this CPU has carried out (an INVEPT done after the
    /// request was raised covers every request up to it).
    flushes_done: AtomicU64,
    /// INVEPTs this CPU executed for other CPUs' requests.
    flushes_served: AtomicU64,
}

impl PerCpu {
    fn new(index: usize, apic_id: u32) -> PerCpu {
        PerCpu {
            index,
            apic_id,
            state: AtomicU8::new(CpuState::Absent as u8),
            virt: Once::new(),
            tss_base: AtomicU64::new(0),
            current_vmcs: AtomicU64::new(0),
            jobs: Mutex::new(VecDeque::new()),
            flushes_requested: AtomicU64::new(0),
            flushes_done: AtomicU64::new(0),
            flushes_served: AtomicU64::new(0),
        }
    }

    /// INVEPTs this CPU executed because another CPU asked ([`flush_ept_on`]).
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn flushes_served(&self) -> u64 {
        self.flushes_served.load(Ordering::Acquire)
    }

    /// How far the CPU got.
    pub fn state(&self) -> CpuState {
        match self.state.load(Ordering::Acquire) {
            1 => CpuState::Arrived,
            2 => CpuState::Ready,
            3 => CpuState::Failed,
            _ => CpuState::Absent,
        }
    }

    /// Virtualization (VMX root operation, or SVM) enabled on this CPU, or why it is not.
    pub fn virt(&self) -> Result<&virt::On, virt::Error> {
        match self.virt.get() {
            Some(Ok(on)) => Ok(on),
            Some(Err(error)) => Err(*error),
            None => Err(virt::Error::NotStarted),
        }
    }

    /// Address of this CPU's TSS (VMX's host state names it).
    #[cfg_attr(feature = "svm", allow(dead_code))]
    pub fn tss_base(&self) -> u64 {
        self.tss_base.load(Ordering::Relaxed)
    }

    fn set_state(&self, state: CpuState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// Enables virtualization on the calling CPU (which must be this one) and records the
    /// outcome.
    fn enable_virt(&self, phys: &'static PhysMap) -> bool {
        self.virt.call_once(|| virt::enable_this_cpu(phys)).is_ok()
    }
}

/// Why a job could not be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmpError {
    /// No CPU with that index, or it is not ready (failed or never started).
    CpuUnavailable(usize),
}

impl fmt::Display for SmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmpError::CpuUnavailable(cpu) => write!(f, "host CPU {cpu} is not available"),
        }
    }
}

static CPUS: Once<&'static [PerCpu]> = Once::new();
/// The window onto physical memory, for the application processors' VMXON regions.
static PHYS: Once<&'static PhysMap> = Once::new();

/// Every CPU the MADT lists (the boot processor first), ready or not.
pub fn cpus() -> &'static [PerCpu] {
    CPUS.get().copied().unwrap_or(&[])
}

/// The CPUs that take work, in index order.
pub fn ready_cpus() -> impl Iterator<Item = &'static PerCpu> {
    cpus().iter().filter(|cpu| cpu.state() == CpuState::Ready)
}

/// The calling CPU's state.
pub fn this_cpu() -> &'static PerCpu {
    try_this_cpu().expect("smp::init set up this CPU")
}

/// The calling CPU's state, if [`init`] (or the CPU's start) has set it up yet.
fn try_this_cpu() -> Option<&'static PerCpu> {
    // SAFETY: reading IA32_GS_BASE has no side effect.
    let base = unsafe { rdmsr(IA32_GS_BASE) };
    // SAFETY: `init` and `application_processor_main` set GS base to this CPU's `PerCpu`, in the
    // leaked (never freed) `CPUS` slice, and nothing else writes it (VM exits restore the value
    // they found at VMCS set-up on the same CPU); 0 means not set up yet.
    (base != 0).then(|| unsafe { &*(base as *const PerCpu) })
}

/// CPUs the hypervisor uses at most (its CPU sets are `u64` masks).
pub const MAX_CPUS: usize = 64;

/// What [`init`] found.
#[derive(Debug)]
pub struct SmpReport {
    /// Processors the MADT lists as enabled (1 when there is no MADT); those past
    /// [`MAX_CPUS`] are left out.
    pub listed: usize,
    /// Why the MADT could not be read, if it could not.
    pub madt_error: Option<acpi::CpuListError>,
    /// Why the application processors could not be started at all, if they could not.
    pub start_error: Option<&'static str>,
}

/// Lists the CPUs, sets up the boot processor's per-CPU state and VMX, and starts every other
/// enabled CPU, one at a time. Call once at boot, after the heap, the frame allocator and the
/// boot processor's GDT (`boot_tss`), IDT and APIC.
pub fn init(
    phys: &'static PhysMap,
    rsdp: Option<u64>,
    boot_tss: u64,
    trampoline: Option<HostPhysAddr>,
) -> SmpReport {
    let boot_id = if apic::available() { apic::id() } else { 0 };
    let (mut ids, madt_error) = match acpi::enabled_apic_ids(phys, rsdp) {
        Ok(ids) if ids.contains(&boot_id) => (ids, None),
        Ok(_) => (Vec::new(), None),
        Err(error) => (Vec::new(), Some(error)),
    };
    ids.retain(|&id| id != boot_id);
    ids.insert(0, boot_id);
    let listed = ids.len();
    // CPU sets are 64-bit masks (which CPUs ran a VM, which to flush): CPUs past the 64th are
    // left out, and reported.
    ids.truncate(MAX_CPUS);
    let list: Vec<PerCpu> = ids
        .iter()
        .enumerate()
        .map(|(index, &id)| PerCpu::new(index, id))
        .collect();
    let list: &'static [PerCpu] = CPUS.call_once(|| list.leak());
    PHYS.call_once(|| phys);
    let boot = &list[0];
    boot.tss_base.store(boot_tss, Ordering::Relaxed);
    set_gs_base(boot);
    boot.set_state(CpuState::Arrived);
    let ready = boot.enable_virt(phys);
    boot.set_state(if ready { CpuState::Ready } else { CpuState::Failed });
    let start_error = if list.len() == 1 {
        None
    } else {
        start_application_processors(phys, &list[1..], trampoline).err()
    };
    SmpReport {
        listed,
        madt_error,
        start_error,
    }
}

/// Runs `job` on CPU `cpu` (queued behind any work already sent there) and returns a handle
/// to wait for its result. Jobs sent to the calling CPU itself are refused: it would wait for
/// itself.
pub fn spawn_on<T: Send + 'static>(
    cpu: usize,
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<Task<T>, SmpError> {
    let target = cpus().get(cpu).filter(|target| target.state() == CpuState::Ready);
    let target = match target {
        Some(target) if target.index != this_cpu().index => target,
        _ => return Err(SmpError::CpuUnavailable(cpu)),
    };
    let slot = Arc::new(TaskSlot {
        done: AtomicBool::new(false),
        result: Mutex::new(None),
    });
    let filled = Arc::clone(&slot);
    target.jobs.lock().push_back(Box::new(move || {
        let result = job();
        *filled.result.lock() = Some(result);
        filled.done.store(true, Ordering::Release);
    }));
    apic::send_ipi(target.apic_id);
    Ok(Task { slot })
}

/// A job sent with [`spawn_on`].
pub struct Task<T> {
    slot: Arc<TaskSlot<T>>,
}

struct TaskSlot<T> {
    done: AtomicBool,
    result: Mutex<Option<T>>,
}

impl<T> Task<T> {
    /// True once the job has returned.
    pub fn is_done(&self) -> bool {
        self.slot.done.load(Ordering::Acquire)
    }

    /// Waits for the job and returns its result.
    pub fn join(self) -> T {
        while !self.is_done() {
            serve_flush_requests();
            core::hint::spin_loop();
        }
        self.slot
            .result
            .lock()
            .take()
            .expect("a finished job left its result")
    }
}

/// Called by the host's NMI and IPI handlers: carries out the EPT flushes asked of this CPU.
pub fn flush_request_received() {
    serve_flush_requests();
}

/// Flushes the EPT-derived translations of every CPU in `cpus` (a bit mask of indices; the
/// calling CPU's bit is ignored) and returns once each has: after this, no translation those
/// CPUs cached before the call is left. The request is an NMI followed by the host's IPI: the
/// NMI reaches a CPU spinning with interrupts off, and a guest exits on it whatever its
/// interrupt flag (Bochs holds external interrupts back while the guest has IF clear); the
/// IPI reaches a CPU whose NMIs are still blocked after an earlier NMI exit (seen in Bochs: an
/// idle CPU then slept through the NMI until an interrupt's IRET unblocked it). Whichever
/// handler runs first executes an all-context INVEPT and answers the request. While
/// waiting, the caller serves flushes asked of itself, so two CPUs flushing each other do not
/// wait for ever. The caller must hold no lock a target could be waiting for with interrupts
/// off (the VM's memory lock in particular).
pub fn flush_ept_on(targets: u64) -> FlushCost {
    let start = ticks();
    let me = this_cpu().index;
    let mut waiting: [(usize, u64); 64] = [(0, 0); 64];
    let mut count = 0;
    for cpu in ready_cpus().filter(|cpu| cpu.index != me && targets & (1 << cpu.index) != 0) {
        let ticket = cpu.flushes_requested.fetch_add(1, Ordering::AcqRel) + 1;
        interrupt(cpu);
        waiting[count] = (cpu.index, ticket);
        count += 1;
    }
    for &(index, ticket) in &waiting[..count] {
        let target = &cpus()[index];
        while target.flushes_done.load(Ordering::Acquire) < ticket {
            serve_flush_requests();
            core::hint::spin_loop();
        }
    }
    FlushCost {
        cpus: count,
        ticks: ticks() - start,
    }
}

/// Makes CPU `cpu` leave the guest it may be running, so that its vCPU loop takes the
/// requests posted to it: the same NMI plus IPI as a flush request (see [`flush_ept_on`]).
/// Nothing is waited for; a kick that arrives just before a VM entry is taken in the host and
/// does not make that guest exit, so whoever waits for an answer kicks again.
pub fn kick(cpu: usize) {
    if let Some(target) = cpus().get(cpu) {
        interrupt(target);
    }
}

/// An NMI, then the host IPI, to `cpu`.
fn interrupt(cpu: &PerCpu) {
    apic::send_nmi(cpu.apic_id);
    apic::send_ipi(cpu.apic_id);
}

/// What one [`flush_ept_on`] took.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlushCost {
    /// Other CPUs that flushed.
    pub cpus: usize,
    /// TSC ticks from the first IPI to the last CPU's flush.
    pub ticks: u64,
}

/// Carries out the flushes other CPUs asked of this one, if any are outstanding.
fn serve_flush_requests() {
    let Some(cpu) = try_this_cpu() else {
        return;
    };
    let requested = cpu.flushes_requested.load(Ordering::Acquire);
    if cpu.flushes_done.load(Ordering::Acquire) >= requested {
        return;
    }
    if let Ok(on) = cpu.virt() {
        if let Err(error) = virt::flush_this_cpu(on, None) {
            log::error!(
                "CPU {}: requested nested-translation flush failed: {error}",
                cpu.index
            );
        }
    }
    cpu.flushes_served.fetch_add(1, Ordering::AcqRel);
    cpu.flushes_done.fetch_max(requested, Ordering::AcqRel);
}

fn set_gs_base(cpu: &'static PerCpu) {
    // SAFETY: IA32_GS_BASE is the host's per-CPU pointer (see `this_cpu`); the kernel does not
    // otherwise use GS.
    unsafe { wrmsr(IA32_GS_BASE, cpu as *const PerCpu as u64) };
}

/// What the trampoline reads from its page at [`PARAMS_OFFSET`].
#[repr(C)]
struct TrampolineParams {
    /// The kernel's CR3 (the trampoline loads it in 32-bit mode: below 4 GiB).
    cr3: u64,
    /// Top of the stack the CPU enters Rust on.
    stack_top: u64,
    /// [`application_processor_main`].
    entry: u64,
    /// The CPU's index (the entry's argument).
    index: u64,
}

fn start_application_processors(
    phys: &'static PhysMap,
    cpus: &'static [PerCpu],
    trampoline: Option<HostPhysAddr>,
) -> Result<(), &'static str> {
    if !apic::available() {
        return Err("no local APIC to send start-up IPIs with");
    }
    let page = trampoline.ok_or("no free frame below 1 MiB for the start-up trampoline")?;
    let (cr3, _) = Cr3::read_raw();
    if cr3.start_address().as_u64() >= 1 << 32 {
        return Err("the kernel's page tables lie above 4 GiB, out of the trampoline's reach");
    }
    identity_map(phys, page)?;
    copy_trampoline(phys, page);
    for cpu in cpus {
        let stack: &'static mut [u8] = vec![0; AP_STACK_SIZE].leak();
        let stack_top = (stack.as_ptr() as u64 + AP_STACK_SIZE as u64) & !0xF;
        let params = TrampolineParams {
            cr3: cr3.start_address().as_u64(),
            stack_top,
            entry: application_processor_main as *const () as u64,
            index: cpu.index as u64,
        };
        // SAFETY: the trampoline page is a low frame reserved for it (never in the frame
        // allocator), reached through the physical window; the parameter block lies inside it.
        unsafe {
            phys.virt(page)
                .add(PARAMS_OFFSET)
                .cast::<TrampolineParams>()
                .write_volatile(params)
        };
        start_one(cpu, page);
    }
    unmap_identity(phys, page);
    Ok(())
}

/// INIT, then up to two start-up IPIs (SDM 8.4.4.1); waits for the CPU to set itself up.
fn start_one(cpu: &PerCpu, page: HostPhysAddr) {
    let vector = (page.as_u64() >> 12) as u8;
    apic::send_init(cpu.apic_id);
    wait_for(ARRIVAL_WAIT / 10, || false);
    for _ in 0..2 {
        apic::send_startup(cpu.apic_id, vector);
        if wait_for(ARRIVAL_WAIT, || cpu.state() != CpuState::Absent) {
            break;
        }
    }
    wait_for(SETUP_WAIT, || {
        matches!(cpu.state(), CpuState::Ready | CpuState::Failed)
    });
}

/// Spins until `done` holds or `limit` TSC ticks passed; returns whether it held.
fn wait_for(limit: u64, done: impl Fn() -> bool) -> bool {
    let start = ticks();
    while ticks() - start < limit {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

/// Where an application processor enters Rust from the trampoline, on its own stack.
extern "C" fn application_processor_main(index: u64) -> ! {
    let cpu = &cpus()[index as usize];
    cpu.set_state(CpuState::Arrived);
    cpu.tss_base
        .store(gdt::init_application_processor(), Ordering::Relaxed);
    idt::load();
    set_gs_base(cpu);
    let phys = PHYS
        .get()
        .expect("smp::init keeps the window before starting CPUs");
    let ready = apic::enable_local().is_ok() && cpu.enable_virt(phys);
    cpu.set_state(if ready { CpuState::Ready } else { CpuState::Failed });
    if !ready {
        halt_forever();
    }
    run_jobs(cpu)
}

/// Runs the CPU's jobs as they come; halts (interrupts on) while there are none.
fn run_jobs(cpu: &PerCpu) -> ! {
    loop {
        let job = cpu.jobs.lock().pop_front();
        match job {
            Some(job) => job(),
            None => idt::wait_for_interrupt(),
        }
    }
}

fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Frames for the kernel's page tables when the trampoline page is mapped.
struct TableFrames;

// SAFETY: `KernelFrames` hands out each frame once, unused, until it is freed.
unsafe impl FrameAllocator<Size4KiB> for TableFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let frame = KernelFrames.allocate_frame()?;
        PhysFrame::from_start_address(PhysAddr::new(frame.as_u64())).ok()
    }
}

/// The kernel's page tables, through the physical window.
fn kernel_page_tables(phys: &PhysMap) -> OffsetPageTable<'_> {
    let (frame, _) = Cr3::read();
    let offset = phys.virt(HostPhysAddr::new_truncate(0)) as u64;
    // SAFETY: CR3 holds the kernel's PML4, reached through the window onto all physical memory
    // (PhysMap's contract); only the boot processor edits the tables, while the others are
    // stopped or not yet started.
    unsafe {
        let pml4 = &mut *phys
            .virt(HostPhysAddr::new_truncate(frame.start_address().as_u64()))
            .cast::<PageTable>();
        OffsetPageTable::new(pml4, VirtAddr::new(offset))
    }
}

/// Maps the trampoline's page at its own address: the CPU turns paging on while running it.
fn identity_map(phys: &PhysMap, page: HostPhysAddr) -> Result<(), &'static str> {
    let mut tables = kernel_page_tables(phys);
    let frame = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(page.as_u64()));
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
    // SAFETY: the frame is reserved for the trampoline and nothing else refers to it; mapping
    // it at its own (low, otherwise unmapped) address aliases no Rust object.
    let mapped = unsafe { tables.identity_map(frame, flags, &mut TableFrames) };
    mapped
        .map(|flush| flush.flush())
        .map_err(|_| "the trampoline's low page is already mapped")
}

fn unmap_identity(phys: &PhysMap, page: HostPhysAddr) {
    let mut tables = kernel_page_tables(phys);
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(page.as_u64()));
    if let Ok((_, flush)) = tables.unmap(page) {
        flush.flush();
    }
}

fn copy_trampoline(phys: &PhysMap, page: HostPhysAddr) {
    // SAFETY: both symbols are defined by the assembly below, in one section, start first.
    let code = unsafe {
        let start = &raw const AP_TRAMPOLINE_START;
        let end = &raw const AP_TRAMPOLINE_END;
        core::slice::from_raw_parts(start, end.offset_from(start) as usize)
    };
    assert!(
        code.len() <= PARAMS_OFFSET - 0x100,
        "the trampoline fits below its stack"
    );
    // SAFETY: the page is the reserved trampoline frame, reached through the physical window.
    unsafe { core::ptr::copy_nonoverlapping(code.as_ptr(), phys.virt(page), code.len()) };
}

unsafe extern "C" {
    static AP_TRAMPOLINE_START: u8;
    static AP_TRAMPOLINE_END: u8;
}

// The start-up trampoline: copied to a low page at run time, entered by a start-up IPI in
// real mode at CS = page >> 4, IP = 0. Position-independent: EBX keeps the page's linear
// address, and each mode switch is a far return to EBX + offset. Real mode → 32-bit protected
// mode (its own small GDT) → PAE, the kernel's CR3, EFER.LME|NXE, paging → 64-bit mode, then
// the kernel's stack and entry from the parameter block at PARAMS_OFFSET (0xF00).
core::arch::global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .global AP_TRAMPOLINE_START
    .global AP_TRAMPOLINE_END
    .code16
AP_TRAMPOLINE_START:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    movw %ax, %ss
    movw $0xE00, %sp
    xorl %ebx, %ebx
    movw %ax, %bx
    shll $4, %ebx
    leal (3f - AP_TRAMPOLINE_START)(%ebx), %eax
    movl %eax, (4f - AP_TRAMPOLINE_START + 2)
    lgdtl (4f - AP_TRAMPOLINE_START)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    leal (1f - AP_TRAMPOLINE_START)(%ebx), %eax
    pushl $0x08
    pushl %eax
    lretl
    .code32
1:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    leal 0xE00(%ebx), %esp
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl 0xF00(%ebx), %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x900, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80010000, %eax
    movl %eax, %cr0
    leal (2f - AP_TRAMPOLINE_START)(%ebx), %eax
    pushl $0x18
    pushl %eax
    lretl
    .code64
2:
    movl %ebx, %ebx
    movq 0xF08(%rbx), %rsp
    movq 0xF18(%rbx), %rdi
    movq 0xF10(%rbx), %rax
    callq *%rax
5:
    hlt
    jmp 5b
    .balign 8
3:
    .quad 0
    .quad 0x00CF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00AF9A000000FFFF
4:
    .word 31
    .long 0
AP_TRAMPOLINE_END:
    .code64
    .text
"#,
    options(att_syntax)
);
