//! The host's interrupt sources: the legacy PICs are masked (their timer would otherwise make
//! every guest exit, or reach a guest), and the local APIC runs in x2APIC mode (MSRs only, so no
//! MMIO mapping is needed) with a one-shot timer the host uses to kick a running vCPU.

use core::sync::atomic::{AtomicBool, Ordering};

use x86::msr::{
    rdmsr, wrmsr, IA32_APIC_BASE, IA32_X2APIC_APICID, IA32_X2APIC_DIV_CONF, IA32_X2APIC_EOI, IA32_X2APIC_ICR,
    IA32_X2APIC_INIT_COUNT, IA32_X2APIC_LVT_TIMER, IA32_X2APIC_SIVR, IA32_X2APIC_TPR,
};
use x86_64::instructions::port::Port;

/// The vector of the local APIC timer.
pub const TIMER_VECTOR: u8 = 0xF0;
/// The local APIC's spurious-interrupt vector (needs no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xFF;
/// Where the PICs' IRQs 0..15 land once remapped (masked, so only their spurious IRQ 7/15 can
/// arrive).
pub const PIC_VECTOR_BASE: u8 = 0x20;

/// IA32_APIC_BASE: APIC global enable and x2APIC mode.
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
/// The vector of the host's inter-processor interrupts (work to run, EPT flushes to do).
pub const IPI_VECTOR: u8 = 0xF1;

/// Interrupt command register (SDM 10.6.1): delivery modes, level assert; the destination
/// x2APIC ID is in bits 32..64.
const ICR_FIXED: u64 = 0b000 << 8;
const ICR_NMI: u64 = 0b100 << 8;
const ICR_INIT: u64 = 0b101 << 8;
const ICR_STARTUP: u64 = 0b110 << 8;
const ICR_ASSERT: u64 = 1 << 14;

/// Spurious-interrupt vector register: APIC software enable.
const SIVR_ENABLE: u64 = 1 << 8;
/// LVT entry: masked.
const LVT_MASKED: u64 = 1 << 16;
/// Divide configuration 0b1011: divide by 1 (the timer counts at the APIC's base clock).
const DIVIDE_BY_1: u64 = 0b1011;

/// True once [`init`] put the boot processor's local APIC in x2APIC mode (the application
/// processors only start when it did).
static X2APIC: AtomicBool = AtomicBool::new(false);

/// Why the host cannot use its local APIC timer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicUnavailable {
    /// CPUID.1:ECX.x2APIC is clear.
    NoX2Apic,
}

/// Remaps and masks both PICs, then enables the local APIC in x2APIC mode with every local
/// interrupt masked. Call once at boot, before interrupts are ever enabled.
pub fn init() -> Result<(), ApicUnavailable> {
    mask_legacy_pics();
    enable_local()?;
    X2APIC.store(true, Ordering::Release);
    Ok(())
}

/// Enables this CPU's local APIC in x2APIC mode with every local interrupt masked. The boot
/// processor does it in [`init`]; each application processor when it starts.
pub fn enable_local() -> Result<(), ApicUnavailable> {
    let has_x2apic = x86::cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|info| info.has_x2apic());
    if !has_x2apic {
        return Err(ApicUnavailable::NoX2Apic);
    }
    // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (all x86-64 CPUs); the mode
    // change follows SDM 10.12.5 (xAPIC enabled first, then x2APIC), and the x2APIC MSRs exist
    // once x2APIC mode is on (CPUID checked above). Every local interrupt stays masked.
    unsafe {
        let base = rdmsr(IA32_APIC_BASE);
        if base & APIC_BASE_ENABLE == 0 {
            wrmsr(IA32_APIC_BASE, base | APIC_BASE_ENABLE);
        }
        wrmsr(IA32_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
        wrmsr(IA32_X2APIC_TPR, 0);
        wrmsr(IA32_X2APIC_LVT_TIMER, LVT_MASKED | u64::from(TIMER_VECTOR));
        wrmsr(IA32_X2APIC_DIV_CONF, DIVIDE_BY_1);
        wrmsr(IA32_X2APIC_SIVR, SIVR_ENABLE | u64::from(SPURIOUS_VECTOR));
    }
    Ok(())
}

/// This CPU's x2APIC ID. Only after [`enable_local`] succeeded on this CPU.
pub fn id() -> u32 {
    // SAFETY: x2APIC mode is on (the caller's precondition); reading the ID has no side effect.
    unsafe { rdmsr(IA32_X2APIC_APICID) as u32 }
}

/// Sends the host's IPI ([`IPI_VECTOR`]) to the CPU with x2APIC ID `destination`.
pub fn send_ipi(destination: u32) {
    send(destination, ICR_FIXED | ICR_ASSERT | u64::from(IPI_VECTOR));
}

/// Sends an NMI to `destination`. It reaches the host there even with interrupts disabled,
/// and a guest running there exits at once whatever its own interrupt flag (NMI exiting).
pub fn send_nmi(destination: u32) {
    send(destination, ICR_NMI | ICR_ASSERT);
}

/// Sends INIT to `destination` (the first step of starting an application processor).
pub fn send_init(destination: u32) {
    send(destination, ICR_INIT | ICR_ASSERT);
}

/// Sends a start-up IPI: `destination` starts in real mode at `page * 4096`.
pub fn send_startup(destination: u32, page: u8) {
    send(destination, ICR_STARTUP | ICR_ASSERT | u64::from(page));
}

fn send(destination: u32, command: u64) {
    if !available() {
        return;
    }
    // SAFETY: x2APIC mode is on; one ICR write sends one IPI (SDM 10.12.9), and the host only
    // sends the IPIs above.
    unsafe { wrmsr(IA32_X2APIC_ICR, (u64::from(destination) << 32) | command) };
}

/// True when the local APIC timer can be used.
pub fn available() -> bool {
    X2APIC.load(Ordering::Acquire)
}

/// Starts the one-shot local APIC timer: [`TIMER_VECTOR`] arrives after `count` ticks of the
/// APIC clock (the TSC rate in Bochs; the bus clock on hardware). A count of 0 stops it.
/// Does nothing when [`init`] failed.
pub fn arm_timer(count: u32) {
    if !available() {
        return;
    }
    // SAFETY: x2APIC mode is on (checked above); one-shot mode with our vector, unmasked, and
    // writing the initial count only starts or stops the timer.
    unsafe {
        wrmsr(IA32_X2APIC_LVT_TIMER, u64::from(TIMER_VECTOR));
        wrmsr(IA32_X2APIC_INIT_COUNT, u64::from(count));
    }
}

/// Signals the end of the interrupt being handled to the local APIC.
pub fn end_of_interrupt() {
    if available() {
        // SAFETY: x2APIC mode is on; writing 0 to EOI only retires the in-service interrupt.
        unsafe { wrmsr(IA32_X2APIC_EOI, 0) };
    }
}

/// Reprograms the two 8259 PICs to vectors [`PIC_VECTOR_BASE`].. (away from the CPU
/// exceptions the BIOS left them on) and masks all their IRQs.
fn mask_legacy_pics() {
    const MASTER: u16 = 0x20;
    const SLAVE: u16 = 0xA0;
    const INIT: u8 = 0x11; // ICW1: edge, cascade, ICW4 follows
    const MODE_8086: u8 = 0x01;
    let commands: [(u16, u8); 10] = [
        (MASTER, INIT),
        (SLAVE, INIT),
        (MASTER + 1, PIC_VECTOR_BASE),
        (SLAVE + 1, PIC_VECTOR_BASE + 8),
        (MASTER + 1, 4), // the slave is on IRQ 2
        (SLAVE + 1, 2),  // its cascade identity
        (MASTER + 1, MODE_8086),
        (SLAVE + 1, MODE_8086),
        (MASTER + 1, 0xFF),
        (SLAVE + 1, 0xFF),
    ];
    for (port, value) in commands {
        // SAFETY: the PIC command and data ports; this is the standard initialisation sequence
        // and leaves every IRQ masked, so no interrupt can come from the PICs afterwards.
        unsafe { Port::<u8>::new(port).write(value) };
    }
}
