//! The host's interrupt sources: the legacy PICs are masked (their timer would otherwise make
//! every guest exit, or reach a guest), and the local APIC runs in x2APIC mode (MSRs) where the
//! CPU has it and in xAPIC mode (its MMIO page) elsewhere, with a one-shot timer the host uses
//! to kick a running vCPU.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use x86::msr::{rdmsr, wrmsr, IA32_APIC_BASE};
use x86_64::instructions::port::Port;

/// The vector of the local APIC timer.
pub const TIMER_VECTOR: u8 = 0xF0;
/// The local APIC's spurious-interrupt vector (needs no EOI).
pub const SPURIOUS_VECTOR: u8 = 0xFF;
/// Where the PICs' IRQs 0..15 land once remapped (masked, so only their spurious IRQ 7/15 can
/// arrive).
pub const PIC_VECTOR_BASE: u8 = 0x20;

/// IA32_APIC_BASE: APIC global enable and x2APIC mode; bits 12.. the xAPIC page.
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_PAGE: u64 = 0x000F_FFFF_FFFF_F000;
/// The vector of the host's inter-processor interrupts (work to run, EPT flushes to do).
pub const IPI_VECTOR: u8 = 0xF1;

/// Interrupt command register (SDM 10.6.1): delivery modes, level assert, and (xAPIC) the
/// delivery-status bit that stays set until the IPI is sent.
const ICR_FIXED: u64 = 0b000 << 8;
const ICR_NMI: u64 = 0b100 << 8;
const ICR_INIT: u64 = 0b101 << 8;
const ICR_STARTUP: u64 = 0b110 << 8;
const ICR_ASSERT: u64 = 1 << 14;
const ICR_SEND_PENDING: u32 = 1 << 12;

/// Spurious-interrupt vector register: APIC software enable.
const SIVR_ENABLE: u64 = 1 << 8;
/// LVT entry: masked.
const LVT_MASKED: u64 = 1 << 16;
/// Divide configuration 0b1011: divide by 1 (the timer counts at the APIC's base clock).
const DIVIDE_BY_1: u64 = 0b1011;

/// Local APIC registers by their xAPIC offset (SDM table 10-1); the x2APIC MSR of each is
/// 0x800 + offset / 16 (SDM 10.12.1.2), so one offset names both.
mod reg {
    pub const ID: u32 = 0x20;
    pub const TPR: u32 = 0x80;
    pub const EOI: u32 = 0xB0;
    pub const SIVR: u32 = 0xF0;
    pub const ICR: u32 = 0x300;
    /// xAPIC only: the destination half of the ICR (the x2APIC ICR is one 64-bit MSR).
    pub const ICR_HIGH: u32 = 0x310;
    pub const LVT_TIMER: u32 = 0x320;
    pub const INIT_COUNT: u32 = 0x380;
    pub const CURRENT_COUNT: u32 = 0x390;
    pub const DIVIDE: u32 = 0x3E0;
}

/// How the host reaches its local APIC: not at all, by MSRs (x2APIC), or through its MMIO page
/// (xAPIC: CPUs and emulators without x2APIC, such as QEMU 7.2's TCG).
const MODE_NONE: u8 = 0;
const MODE_X2APIC: u8 = 1;
const MODE_XAPIC: u8 = 2;

/// The mode [`init`] chose on the boot processor; the application processors use the same.
static MODE: AtomicU8 = AtomicU8::new(MODE_NONE);
/// xAPIC mode: the virtual address of the APIC page (through the physical-memory window).
static XAPIC_PAGE: AtomicU64 = AtomicU64::new(0);

/// Why the host cannot use its local APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicUnavailable {
    /// CPUID.1:EDX.APIC is clear: no local APIC at all.
    NoApic,
}

/// Remaps and masks both PICs, then enables the local APIC with every local interrupt masked:
/// in x2APIC mode where the CPU has it, else in xAPIC mode through its page, reached at
/// `phys_offset` + its physical address (all physical memory is mapped there). Call once at
/// boot, before interrupts are ever enabled. Returns the mode's name.
pub fn init(phys_offset: u64) -> Result<&'static str, ApicUnavailable> {
    mask_legacy_pics();
    let features = x86::cpuid::CpuId::new().get_feature_info();
    let mode = match features {
        Some(info) if info.has_x2apic() => MODE_X2APIC,
        Some(info) if info.has_apic() => MODE_XAPIC,
        _ => return Err(ApicUnavailable::NoApic),
    };
    if mode == MODE_XAPIC {
        // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (checked above).
        let base = unsafe { rdmsr(IA32_APIC_BASE) } & APIC_BASE_PAGE;
        XAPIC_PAGE.store(phys_offset + base, Ordering::Release);
    }
    MODE.store(mode, Ordering::Release);
    enable_local()?;
    calibrate();
    Ok(if mode == MODE_X2APIC { "x2APIC" } else { "xAPIC" })
}

/// Enables this CPU's local APIC in the mode [`init`] chose, with every local interrupt
/// masked. The boot processor does it in [`init`]; each application processor when it starts.
pub fn enable_local() -> Result<(), ApicUnavailable> {
    let mode = MODE.load(Ordering::Acquire);
    if mode == MODE_NONE {
        return Err(ApicUnavailable::NoApic);
    }
    // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC (`init` checked); the mode
    // change follows SDM 10.12.5 (xAPIC enabled first, then x2APIC where chosen).
    unsafe {
        let base = rdmsr(IA32_APIC_BASE);
        if base & APIC_BASE_ENABLE == 0 {
            wrmsr(IA32_APIC_BASE, base | APIC_BASE_ENABLE);
        }
        if mode == MODE_X2APIC {
            wrmsr(IA32_APIC_BASE, base | APIC_BASE_ENABLE | APIC_BASE_X2APIC);
        }
    }
    write(reg::TPR, 0);
    write(reg::LVT_TIMER, LVT_MASKED | u64::from(TIMER_VECTOR));
    write(reg::DIVIDE, DIVIDE_BY_1);
    write(reg::SIVR, SIVR_ENABLE | u64::from(SPURIOUS_VECTOR));
    Ok(())
}

/// Reads local APIC register `offset` in the mode in use.
fn read(offset: u32) -> u64 {
    match MODE.load(Ordering::Relaxed) {
        // SAFETY: x2APIC mode is on; every register this module reads has an MSR.
        MODE_X2APIC => unsafe { rdmsr(0x800 + (offset >> 4)) },
        MODE_XAPIC => {
            let at = (XAPIC_PAGE.load(Ordering::Relaxed) + u64::from(offset)) as *const u32;
            // SAFETY: the APIC page is mapped in the physical-memory window (`init`); its
            // registers are 32-bit and 16-byte aligned, read with one aligned access.
            u64::from(unsafe { core::ptr::read_volatile(at) })
        }
        _ => 0,
    }
}

/// Writes local APIC register `offset` in the mode in use (nothing without an APIC).
fn write(offset: u32, value: u64) {
    match MODE.load(Ordering::Relaxed) {
        // SAFETY: x2APIC mode is on; every register this module writes has an MSR, and the
        // values written are the ones this module documents.
        MODE_X2APIC => unsafe { wrmsr(0x800 + (offset >> 4), value) },
        MODE_XAPIC => {
            let at = (XAPIC_PAGE.load(Ordering::Relaxed) + u64::from(offset)) as *mut u32;
            // SAFETY: as in `read`; one aligned 32-bit store per register.
            unsafe { core::ptr::write_volatile(at, value as u32) };
        }
        _ => {}
    }
}

/// This CPU's APIC ID. Only after [`enable_local`] succeeded on this CPU.
pub fn id() -> u32 {
    let id = read(reg::ID) as u32;
    if MODE.load(Ordering::Relaxed) == MODE_XAPIC {
        id >> 24
    } else {
        id
    }
}

/// Sends the host's IPI ([`IPI_VECTOR`]) to the CPU with APIC ID `destination`.
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

/// One IPI (SDM 10.6.1): x2APIC takes destination and command in one MSR write; xAPIC takes
/// the destination's 8-bit ID first, sends at the write of the low half, and is ready for
/// the next once its delivery status clears.
fn send(destination: u32, command: u64) {
    match MODE.load(Ordering::Relaxed) {
        MODE_X2APIC => write(reg::ICR, (u64::from(destination) << 32) | command),
        MODE_XAPIC => {
            write(reg::ICR_HIGH, u64::from(destination) << 24);
            write(reg::ICR, command);
            while read(reg::ICR) as u32 & ICR_SEND_PENDING != 0 {
                core::hint::spin_loop();
            }
        }
        _ => {}
    }
}

/// True when the local APIC (its timer and IPIs) can be used.
pub fn available() -> bool {
    MODE.load(Ordering::Acquire) != MODE_NONE
}

/// Starts the one-shot local APIC timer: [`TIMER_VECTOR`] arrives after `count` ticks of the
/// APIC clock (the TSC rate in Bochs; the bus clock on hardware, 1 GHz in QEMU). A count of 0
/// stops it. Does nothing when [`init`] failed.
fn arm_timer(count: u32) {
    // One-shot mode with our vector, unmasked; writing the initial count starts or stops it.
    write(reg::LVT_TIMER, u64::from(TIMER_VECTOR));
    write(reg::INIT_COUNT, u64::from(count));
}

/// What is left of the timer's count (0: it fired or was never armed).
fn timer_count() -> u32 {
    read(reg::CURRENT_COUNT) as u32
}

/// Local APIC timer counts per TSC tick, as a 32.32 fixed-point ratio (measured by `init`).
static APIC_PER_TSC: AtomicU64 = AtomicU64::new(1 << 32);
/// TSC ticks the measurement waits.
const CALIBRATION_TICKS: u64 = 4_000_000;
/// When the host kick is due (TSC; `u64::MAX`: none armed). The timer serves two users on the
/// CPU that runs vCPUs: this kick, and the SVM backend's run budget ([`arm_run_timer`]); it is
/// always armed for the earlier of the two.
static KICK_AT: AtomicU64 = AtomicU64::new(u64::MAX);
/// How early the kick's interrupt may come and still count as due: the measured ratio and
/// the count's rounding put it a little off (a sixty-fourth of the delay armed).
static KICK_SLACK: AtomicU64 = AtomicU64::new(0);

/// Measures how fast the timer counts against the TSC, so that deadlines in TSC ticks can be
/// armed on it.
fn calibrate() {
    arm_timer(u32::MAX);
    let start = super::ticks();
    while super::ticks() - start < CALIBRATION_TICKS {
        core::hint::spin_loop();
    }
    let counted = u64::from(u32::MAX - timer_count());
    let elapsed = super::ticks() - start;
    arm_timer(0);
    APIC_PER_TSC.store(((counted << 32) / elapsed.max(1)).max(1), Ordering::Release);
}

/// Arms the timer to fire at TSC `deadline` (at once if it has passed), a little late rather
/// than early (a thousandth): the measured ratio is a little off either way, and an early
/// interrupt would need another.
fn arm_until(deadline: u64) {
    let left = deadline.saturating_sub(super::ticks());
    let left = left + left / 1024;
    let ratio = APIC_PER_TSC.load(Ordering::Relaxed);
    let count = (u128::from(left) * u128::from(ratio)) >> 32;
    arm_timer(count.clamp(1, u128::from(u32::MAX)) as u32);
}

/// Arms the host kick: the timer interrupt after `ticks` TSC ticks, which [`kick_due`] then
/// reports once. Returns false when the host has no local APIC.
pub fn arm_kick(ticks: u64) -> bool {
    if !available() {
        return false;
    }
    let at = super::ticks().saturating_add(ticks);
    KICK_SLACK.store(ticks / 64, Ordering::Release);
    KICK_AT.store(at, Ordering::Release);
    arm_until(at);
    true
}

/// Called by the timer's interrupt handler: true once when the kick is due. An interrupt that
/// came early for it (the run timer's, or rounding) arms the timer again for the rest.
pub fn kick_due() -> bool {
    let at = KICK_AT.load(Ordering::Acquire);
    if at == u64::MAX {
        return false;
    }
    if super::ticks() + KICK_SLACK.load(Ordering::Acquire) >= at {
        KICK_AT.store(u64::MAX, Ordering::Release);
        return true;
    }
    arm_until(at);
    false
}

/// Arms the timer for a vCPU run that must end by TSC `deadline` (or for the host kick, if
/// that is due first).
#[cfg_attr(not(feature = "svm"), allow(dead_code))]
pub fn arm_run_timer(deadline: u64) {
    arm_until(deadline.min(KICK_AT.load(Ordering::Acquire)));
}

/// After a run: the timer stays armed only for a host kick still to come. A kick whose time
/// has come has its interrupt pending already (the timer was armed for it, or for an earlier
/// run deadline that has passed too): arming it again would raise a second one.
#[cfg_attr(not(feature = "svm"), allow(dead_code))]
pub fn disarm_run_timer() {
    match KICK_AT.load(Ordering::Acquire) {
        at if at != u64::MAX && at > super::ticks() => arm_until(at),
        _ => arm_timer(0),
    }
}

/// Signals the end of the interrupt being handled to the local APIC.
pub fn end_of_interrupt() {
    write(reg::EOI, 0);
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
