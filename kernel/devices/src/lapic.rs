//! One vCPU's local APIC (SDM Vol. 3A, chapter 11), reached as the xAPIC page (32-bit
//! registers at 16-byte offsets from 0xFEE0_0000) or, in x2APIC mode, as MSRs 0x800–0x8FF.
//! Modelled: ID, version, TPR and PPR, EOI, LDR and DFR, the spurious-vector register (with
//! software disable), ISR, TMR and IRR, ESR, the ICR (fixed, lowest-priority, NMI, INIT and
//! SIPI messages, destination shorthands, physical and logical destinations), the LVT entries,
//! and the timer in one-shot, periodic and TSC-deadline modes.
//!
//! The timer runs on the TSC: its input clock is the TSC divided by the divide configuration,
//! and the caller passes the TSC value with each call. Nothing here runs on its own: the vCPU
//! asks [`LocalApic::next_timer`] when it must be back and calls [`LocalApic::fire_timer`]
//! then. A message written to the ICR comes back as an [`Ipi`] for the caller to route.

/// The xAPIC page's guest-physical base.
pub const XAPIC_BASE: u64 = 0xFEE0_0000;
/// The first x2APIC MSR; register offset `r` is MSR `X2APIC_MSR_BASE + r / 16`.
pub const X2APIC_MSR_BASE: u32 = 0x800;
/// The last x2APIC MSR.
pub const X2APIC_MSR_LAST: u32 = 0x8FF;

/// Register offsets in the xAPIC page.
pub mod reg {
    /// APIC ID.
    pub const ID: u32 = 0x020;
    /// Version.
    pub const VERSION: u32 = 0x030;
    /// Task priority.
    pub const TPR: u32 = 0x080;
    /// Arbitration priority.
    pub const APR: u32 = 0x090;
    /// Processor priority.
    pub const PPR: u32 = 0x0A0;
    /// End of interrupt.
    pub const EOI: u32 = 0x0B0;
    /// Remote read.
    pub const RRD: u32 = 0x0C0;
    /// Logical destination.
    pub const LDR: u32 = 0x0D0;
    /// Destination format (xAPIC only).
    pub const DFR: u32 = 0x0E0;
    /// Spurious-interrupt vector.
    pub const SVR: u32 = 0x0F0;
    /// In-service register, 8 words.
    pub const ISR: u32 = 0x100;
    /// Trigger-mode register, 8 words.
    pub const TMR: u32 = 0x180;
    /// Interrupt-request register, 8 words.
    pub const IRR: u32 = 0x200;
    /// Error status.
    pub const ESR: u32 = 0x280;
    /// Interrupt command, low word (in x2APIC mode: the whole 64-bit register).
    pub const ICR_LOW: u32 = 0x300;
    /// Interrupt command, high word (xAPIC only).
    pub const ICR_HIGH: u32 = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: u32 = 0x320;
    /// LVT thermal sensor.
    pub const LVT_THERMAL: u32 = 0x330;
    /// LVT performance counters.
    pub const LVT_PERF: u32 = 0x340;
    /// LVT LINT0.
    pub const LVT_LINT0: u32 = 0x350;
    /// LVT LINT1.
    pub const LVT_LINT1: u32 = 0x360;
    /// LVT error.
    pub const LVT_ERROR: u32 = 0x370;
    /// Timer initial count.
    pub const TIMER_INITIAL: u32 = 0x380;
    /// Timer current count.
    pub const TIMER_CURRENT: u32 = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: u32 = 0x3E0;
    /// Self IPI (x2APIC only).
    pub const SELF_IPI: u32 = 0x3F0;
}

/// Version register: version 0x14 (an integrated APIC), six LVT entries (max index 5).
pub const VERSION: u32 = 0x0005_0014;
/// The LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;
/// SVR bit 8: the APIC is software-enabled.
pub const SVR_ENABLED: u32 = 1 << 8;
/// ESR bits: send illegal vector (5), receive illegal vector (6), illegal register (7).
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// See [`ESR_SEND_ILLEGAL_VECTOR`].
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
/// See [`ESR_SEND_ILLEGAL_VECTOR`].
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

/// LVT timer modes (bits 18:17; 0 is one-shot).
const TIMER_MODE_SHIFT: u32 = 17;
const TIMER_PERIODIC: u32 = 1;
const TIMER_TSC_DEADLINE: u32 = 2;
/// Writable bits per LVT entry: vector, delivery mode, polarity, trigger, mask, timer mode.
const LVT_TIMER_BITS: u32 = 0xFF | LVT_MASKED | (3 << TIMER_MODE_SHIFT);
const LVT_LINT_BITS: u32 = 0xFF | (7 << 8) | (1 << 13) | (1 << 15) | LVT_MASKED;
const LVT_DELIVERY_BITS: u32 = 0xFF | (7 << 8) | LVT_MASKED;
const LVT_ERROR_BITS: u32 = 0xFF | LVT_MASKED;

/// How an interrupt message is delivered (ICR bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// To the destinations, at `vector`.
    Fixed,
    /// To the lowest-priority destination (here: the first that matches).
    LowestPriority,
    /// A non-maskable interrupt.
    Nmi,
    /// INIT: the destination waits for a startup IPI.
    Init,
    /// Startup: the destination starts in real mode at `vector << 12`.
    Startup,
}

/// Where an interrupt message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// The sender itself.
    ToSelf,
    /// Every APIC, the sender included.
    All,
    /// Every APIC but the sender.
    AllButSelf,
    /// APIC ID `id` (all ones: broadcast).
    Physical(u32),
    /// The APICs whose logical ID matches (flat or cluster model, as the receiver's DFR says;
    /// cluster in x2APIC mode).
    Logical(u32),
}

/// An interrupt message the guest wrote to the ICR, for the caller to route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipi {
    /// The vector (the start page for a startup IPI).
    pub vector: u8,
    /// The delivery mode.
    pub mode: DeliveryMode,
    /// The destination.
    pub destination: Destination,
    /// The sender was in x2APIC mode (a physical all-ones broadcast is 32 bits wide then).
    pub x2apic: bool,
    /// A level-triggered interrupt (from an I/O APIC pin): the receiver sets its TMR bit and
    /// broadcasts its EOI ([`Effect::LevelEoi`]).
    pub level: bool,
}

/// Why an x2APIC MSR access is refused with #GP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct X2apicFault;

/// What a register write asks of the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond the APIC.
    None,
    /// Route this message.
    Ipi(Ipi),
    /// The guest ended a level-triggered interrupt at this vector: the I/O APIC takes the EOI.
    LevelEoi(u8),
}

/// The timer's arming: when it next expires (TSC) and, periodic, its period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TimerArm {
    expires: u64,
    period: u64,
}

/// One local APIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalApic {
    id: u32,
    /// Enabled in the APIC base MSR (hardware enable); a disabled APIC does not answer.
    hardware_enabled: bool,
    x2apic: bool,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    /// Errors since the last ESR write, and those the last write latched for reading.
    esr_pending: u32,
    esr: u32,
    icr_high: u32,
    icr_low: u32,
    lvt: [u32; 6],
    timer_initial: u32,
    timer_divide: u32,
    /// When the initial count was written (TSC), for the current count.
    timer_start: u64,
    timer: Option<TimerArm>,
    tsc_deadline: u64,
    /// NMIs waiting for the vCPU (at most [`NMI_LATCH`]), an INIT, a startup vector.
    nmis_pending: u8,
    init_pending: bool,
    startup_vector: Option<u8>,
}

/// The NMIs a vCPU holds when it runs no NMI handler: the one it takes and the one it latches.
pub const NMI_LATCH: u8 = 2;

/// The LVT entries in register order from [`reg::LVT_TIMER`].
const LVT_TIMER: usize = 0;
const LVT_LINT0: usize = 3;
const LVT_ERROR: usize = 5;

impl LocalApic {
    /// An APIC with ID `id` in its reset state (xAPIC mode, software-disabled, every LVT
    /// entry masked).
    pub fn new(id: u32) -> LocalApic {
        LocalApic {
            id,
            hardware_enabled: true,
            x2apic: false,
            tpr: 0,
            ldr: 0,
            dfr: 0xFFFF_FFFF,
            svr: 0xFF,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr_pending: 0,
            esr: 0,
            icr_high: 0,
            icr_low: 0,
            lvt: [LVT_MASKED; 6],
            timer_initial: 0,
            timer_divide: 0,
            timer_start: 0,
            timer: None,
            tsc_deadline: 0,
            nmis_pending: 0,
            init_pending: false,
            startup_vector: None,
        }
    }

    /// The APIC ID.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// True when the APIC is software-enabled (SVR bit 8).
    pub fn enabled(&self) -> bool {
        self.svr & SVR_ENABLED != 0
    }

    /// Follows the APIC base MSR: `enabled` (bit 11) and `x2apic` (bit 10). Entering x2APIC
    /// mode makes the LDR the one derived from the ID (SDM 11.12.10.2); disabling the APIC
    /// resets it to its power-up state but for its ID (SDM 11.4.3).
    pub fn set_mode(&mut self, enabled: bool, x2apic: bool) {
        if !enabled {
            *self = LocalApic {
                hardware_enabled: false,
                ..LocalApic::new(self.id)
            };
            return;
        }
        if x2apic && !self.x2apic {
            self.ldr = ((self.id >> 4) << 16) | (1 << (self.id & 0xF));
        }
        self.hardware_enabled = true;
        self.x2apic = x2apic;
    }

    /// True when the PIC's interrupts reach this CPU through LINT0: the APIC is disabled
    /// (hardware or software), or LINT0 is unmasked with delivery mode ExtINT (virtual-wire
    /// mode).
    pub fn accepts_pic(&self) -> bool {
        let lint0 = self.lvt[LVT_LINT0];
        !self.hardware_enabled || !self.enabled() || (lint0 & LVT_MASKED == 0 && (lint0 >> 8) & 7 == 7)
    }

    /// True when an NMI, INIT or startup message waits for the vCPU.
    pub fn message_pending(&self) -> bool {
        self.nmis_pending != 0 || self.init_pending || self.startup_vector.is_some()
    }

    /// True in x2APIC mode.
    pub fn x2apic(&self) -> bool {
        self.x2apic
    }

    fn set_bit(words: &mut [u32; 8], vector: u8, on: bool) {
        let word = &mut words[usize::from(vector >> 5)];
        if on {
            *word |= 1 << (vector & 31);
        } else {
            *word &= !(1 << (vector & 31));
        }
    }

    fn bit(words: &[u32; 8], vector: u8) -> bool {
        words[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
    }

    fn highest(words: &[u32; 8]) -> Option<u8> {
        (0..8).rev().find_map(|i| {
            let word = words[i];
            (word != 0).then(|| (i as u32 * 32 + 31 - word.leading_zeros()) as u8)
        })
    }

    /// The task priority register.
    pub fn task_priority(&self) -> u8 {
        self.tpr as u8
    }

    /// Sets the task priority register (MOV to CR8 writes it too); `_now` for symmetry with
    /// the register interface.
    pub fn set_task_priority(&mut self, tpr: u8, _now: u64) {
        self.tpr = u32::from(tpr);
    }

    /// The processor priority: the task priority, or the class of the highest vector in
    /// service if that is higher.
    pub fn ppr(&self) -> u32 {
        let isrv = Self::highest(&self.isr).map_or(0, u32::from);
        if self.tpr & 0xF0 >= isrv & 0xF0 {
            self.tpr & 0xFF
        } else {
            isrv & 0xF0
        }
    }

    /// A fixed interrupt at `vector` arrives (edge, or level when `level`). Vectors 0–15 are
    /// illegal: the receive error is recorded and the interrupt dropped.
    pub fn accept(&mut self, vector: u8, level: bool) {
        if vector < 16 {
            self.record_error(ESR_RECEIVE_ILLEGAL_VECTOR);
            return;
        }
        Self::set_bit(&mut self.irr, vector, true);
        Self::set_bit(&mut self.tmr, vector, level);
    }

    fn record_error(&mut self, bits: u32) {
        self.esr_pending |= bits;
    }

    /// The vector the APIC would deliver now: the highest requested one whose priority class
    /// is above the processor priority's.
    pub fn pending_vector(&self) -> Option<u8> {
        let vector = Self::highest(&self.irr)?;
        (u32::from(vector) & 0xF0 > self.ppr() & 0xF0).then_some(vector)
    }

    /// The CPU takes [`pending_vector`](Self::pending_vector): request to in service.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = self.pending_vector()?;
        Self::set_bit(&mut self.irr, vector, false);
        Self::set_bit(&mut self.isr, vector, true);
        Some(vector)
    }

    /// True when an NMI waits for the vCPU.
    pub fn nmi_pending(&self) -> bool {
        self.nmis_pending != 0
    }

    /// Takes a pending NMI.
    pub fn take_nmi(&mut self) -> bool {
        let pending = self.nmis_pending != 0;
        self.nmis_pending = self.nmis_pending.saturating_sub(1);
        pending
    }

    /// The vCPU runs an NMI handler: a CPU then holds one more NMI, latched until the handler's
    /// IRET, and drops the rest (SDM 6.7.1). The vCPU calls this while NMIs are blocked.
    pub fn nmi_blocked(&mut self) {
        self.nmis_pending = self.nmis_pending.min(1);
    }

    /// Takes a pending INIT: the vCPU resets and waits for a startup IPI.
    pub fn take_init(&mut self) -> bool {
        core::mem::take(&mut self.init_pending)
    }

    /// Takes a pending startup vector.
    pub fn take_startup(&mut self) -> Option<u8> {
        self.startup_vector.take()
    }

    /// A message routed to this APIC arrives.
    pub fn receive(&mut self, ipi: &Ipi) {
        match ipi.mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => self.accept(ipi.vector, ipi.level),
            // One NMI the CPU takes now and one it latches: two NMIs sent at once both arrive
            // (KVM's limit too).
            DeliveryMode::Nmi => self.nmis_pending = (self.nmis_pending + 1).min(NMI_LATCH),
            DeliveryMode::Init => self.init_pending = true,
            DeliveryMode::Startup => self.startup_vector = Some(ipi.vector),
        }
    }

    /// True when this APIC is one of `ipi`'s destinations; `is_sender` says whether it sent it.
    pub fn is_destination(&self, ipi: &Ipi, is_sender: bool) -> bool {
        match ipi.destination {
            Destination::ToSelf => is_sender,
            Destination::All => true,
            Destination::AllButSelf => !is_sender,
            Destination::Physical(id) => {
                let broadcast = if ipi.x2apic { 0xFFFF_FFFF } else { 0xFF };
                id == broadcast || id == self.id
            }
            Destination::Logical(dest) if self.x2apic => {
                dest >> 16 == self.ldr >> 16 && dest & self.ldr & 0xFFFF != 0
            }
            Destination::Logical(dest) => {
                let logical = self.ldr >> 24;
                let dest = dest & 0xFF;
                if self.dfr >> 28 == 0xF {
                    dest & logical != 0
                } else {
                    // Cluster model: cluster in bits 7:4, members in bits 3:0.
                    dest >> 4 == logical >> 4 && dest & logical & 0xF != 0
                }
            }
        }
    }

    // ---------- the timer ----------

    fn timer_mode(&self) -> u32 {
        (self.lvt[LVT_TIMER] >> TIMER_MODE_SHIFT) & 3
    }

    /// The timer's divider (divide configuration bits 3, 1:0).
    fn divider(&self) -> u64 {
        let code = (self.timer_divide & 3) | ((self.timer_divide >> 1) & 4);
        if code == 7 {
            1
        } else {
            2 << code
        }
    }

    /// The TSC at which the timer next expires, if it is armed and not masked.
    pub fn next_timer(&self) -> Option<u64> {
        let arm = self.timer?;
        (self.lvt[LVT_TIMER] & LVT_MASKED == 0).then_some(arm.expires)
    }

    /// Expires the timer if its time came by `now`: the timer vector is requested (unless the
    /// entry is masked), a periodic timer rearms (missed periods coalesce into one
    /// interrupt), a one-shot or deadline timer disarms.
    pub fn fire_timer(&mut self, now: u64) {
        let Some(arm) = self.timer else { return };
        if now < arm.expires {
            return;
        }
        if self.lvt[LVT_TIMER] & LVT_MASKED == 0 {
            self.accept(self.lvt[LVT_TIMER] as u8, false);
        }
        self.timer = match (now - arm.expires).checked_div(arm.period) {
            Some(missed) => Some(TimerArm {
                expires: arm.expires + (missed + 1) * arm.period,
                period: arm.period,
            }),
            None => {
                if self.timer_mode() == TIMER_TSC_DEADLINE {
                    self.tsc_deadline = 0;
                }
                None
            }
        };
    }

    fn current_count(&self, now: u64) -> u32 {
        if self.timer_initial == 0 || self.timer_mode() == TIMER_TSC_DEADLINE {
            return 0;
        }
        let elapsed = now.saturating_sub(self.timer_start) / self.divider();
        let initial = u64::from(self.timer_initial);
        match self.timer_mode() {
            TIMER_PERIODIC => (initial - elapsed % initial) as u32,
            _ => initial.saturating_sub(elapsed) as u32,
        }
    }

    fn start_count(&mut self, count: u32, now: u64) {
        self.timer_initial = count;
        self.timer_start = now;
        let mode = self.timer_mode();
        if mode == TIMER_TSC_DEADLINE {
            return;
        }
        self.timer = (count != 0).then(|| {
            let span = u64::from(count) * self.divider();
            TimerArm {
                expires: now + span,
                period: if mode == TIMER_PERIODIC { span } else { 0 },
            }
        });
    }

    /// The TSC-deadline MSR (0 once the deadline fired or when disarmed).
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TIMER_TSC_DEADLINE {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// WRMSR to the TSC-deadline MSR: arms the timer at `deadline` (0 disarms). Ignored
    /// outside TSC-deadline mode.
    pub fn set_tsc_deadline(&mut self, deadline: u64) {
        if self.timer_mode() != TIMER_TSC_DEADLINE {
            return;
        }
        self.tsc_deadline = deadline;
        self.timer = (deadline != 0).then_some(TimerArm {
            expires: deadline,
            period: 0,
        });
    }

    // ---------- registers ----------

    fn lvt_index(offset: u32) -> Option<usize> {
        (reg::LVT_TIMER..=reg::LVT_ERROR)
            .contains(&offset)
            .then(|| ((offset - reg::LVT_TIMER) >> 4) as usize)
    }

    /// Reads the register at `offset` (`None`: no register there).
    fn read_register(&self, offset: u32, now: u64) -> Option<u32> {
        let word = |base: u32| ((offset - base) >> 4) as usize;
        Some(match offset {
            reg::ID if self.x2apic => self.id,
            reg::ID => self.id << 24,
            reg::VERSION => VERSION,
            reg::TPR => self.tpr,
            reg::APR | reg::RRD => 0,
            reg::PPR => self.ppr(),
            reg::LDR => self.ldr,
            reg::DFR if !self.x2apic => self.dfr,
            reg::SVR => self.svr,
            0x100..=0x170 => self.isr[word(reg::ISR)],
            0x180..=0x1F0 => self.tmr[word(reg::TMR)],
            0x200..=0x270 => self.irr[word(reg::IRR)],
            reg::ESR => self.esr,
            reg::ICR_LOW => self.icr_low,
            reg::ICR_HIGH if !self.x2apic => self.icr_high,
            reg::TIMER_INITIAL => self.timer_initial,
            reg::TIMER_CURRENT => self.current_count(now),
            reg::TIMER_DIVIDE => self.timer_divide,
            _ => return Some(self.lvt[Self::lvt_index(offset)?]),
        })
    }

    /// Writes the register at `offset`; `Err` when it is read-only or absent.
    fn write_register(&mut self, offset: u32, value: u32, now: u64) -> Result<Effect, ()> {
        match offset {
            reg::ID if !self.x2apic => self.id = value >> 24,
            reg::TPR => self.tpr = value & 0xFF,
            reg::EOI => return Ok(self.end_of_interrupt()),
            reg::LDR if !self.x2apic => self.ldr = value & 0xFF00_0000,
            reg::DFR if !self.x2apic => self.dfr = value | 0x0FFF_FFFF,
            reg::SVR => {
                self.svr = value & (0xFF | SVR_ENABLED | (1 << 9) | (1 << 12));
                if !self.enabled() {
                    for entry in &mut self.lvt {
                        *entry |= LVT_MASKED;
                    }
                }
            }
            reg::ESR => {
                self.esr = core::mem::take(&mut self.esr_pending);
            }
            reg::ICR_LOW if !self.x2apic => {
                self.icr_low = value & !(1 << 12);
                return Ok(self.send(u64::from(self.icr_high) << 32 | u64::from(value)));
            }
            reg::ICR_HIGH if !self.x2apic => self.icr_high = value & 0xFF00_0000,
            reg::TIMER_INITIAL => self.start_count(value, now),
            reg::TIMER_DIVIDE => {
                // Keep the current count across a divider change: restart from it.
                let current = self.current_count(now);
                self.timer_divide = value & 0b1011;
                if self.timer.is_some() && self.timer_mode() != TIMER_TSC_DEADLINE {
                    let initial = self.timer_initial;
                    self.start_count(current, now);
                    self.timer_initial = initial;
                }
            }
            _ => {
                let index = Self::lvt_index(offset).ok_or(())?;
                self.write_lvt(index, value);
            }
        }
        Ok(Effect::None)
    }

    fn write_lvt(&mut self, index: usize, value: u32) {
        let writable = match index {
            LVT_TIMER => LVT_TIMER_BITS,
            LVT_LINT0 | 4 => LVT_LINT_BITS,
            LVT_ERROR => LVT_ERROR_BITS,
            _ => LVT_DELIVERY_BITS,
        };
        let mut value = value & writable;
        if !self.enabled() {
            value |= LVT_MASKED;
        }
        if index == LVT_TIMER {
            let old_mode = self.timer_mode();
            self.lvt[index] = value;
            if self.timer_mode() != old_mode {
                // A mode change disarms the timer (SDM 11.5.4.1).
                self.timer = None;
                self.timer_initial = 0;
                self.tsc_deadline = 0;
            }
            return;
        }
        self.lvt[index] = value;
    }

    /// Retires the highest vector in service; a level-triggered one (its TMR bit set: TMR
    /// keeps the trigger mode of the vector's last accepted interrupt, EOI leaves it) is
    /// broadcast.
    fn end_of_interrupt(&mut self) -> Effect {
        let Some(vector) = Self::highest(&self.isr) else {
            return Effect::None;
        };
        Self::set_bit(&mut self.isr, vector, false);
        if Self::bit(&self.tmr, vector) {
            return Effect::LevelEoi(vector);
        }
        Effect::None
    }

    /// The message the ICR value `icr` sends (level de-assert INITs send nothing).
    fn send(&mut self, icr: u64) -> Effect {
        let vector = icr as u8;
        let mode = match (icr >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::Startup,
            // SMI and the reserved modes: nothing to deliver here.
            _ => return Effect::None,
        };
        let level_assert = icr & (1 << 14) != 0;
        let level_trigger = icr & (1 << 15) != 0;
        if mode == DeliveryMode::Init && level_trigger && !level_assert {
            return Effect::None;
        }
        if matches!(mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority) && vector < 16 {
            self.record_error(ESR_SEND_ILLEGAL_VECTOR);
            return Effect::None;
        }
        let target = if self.x2apic {
            (icr >> 32) as u32
        } else {
            (icr >> 56) as u32
        };
        let logical = icr & (1 << 11) != 0;
        let destination = match (icr >> 18) & 3 {
            1 => Destination::ToSelf,
            2 => Destination::All,
            3 => Destination::AllButSelf,
            _ if logical => Destination::Logical(target),
            _ => Destination::Physical(target),
        };
        Effect::Ipi(Ipi {
            vector,
            mode,
            destination,
            x2apic: self.x2apic,
            level: false,
        })
    }

    /// A 32-bit read of the xAPIC page at `offset` (misaligned or absent registers read 0;
    /// in x2APIC mode the page is not the APIC: all ones).
    pub fn mmio_read(&self, offset: u64, now: u64) -> u32 {
        if self.x2apic || !self.hardware_enabled {
            return u32::MAX;
        }
        let offset = (offset & 0xFF0) as u32;
        self.read_register(offset, now).unwrap_or(0)
    }

    /// A 32-bit write to the xAPIC page at `offset` (writes to read-only or absent registers
    /// are dropped; in x2APIC mode the page is not the APIC).
    pub fn mmio_write(&mut self, offset: u64, value: u32, now: u64) -> Effect {
        if self.x2apic || !self.hardware_enabled {
            return Effect::None;
        }
        let offset = (offset & 0xFF0) as u32;
        self.write_register(offset, value, now).unwrap_or(Effect::None)
    }

    /// RDMSR of x2APIC MSR `msr`: #GP outside x2APIC mode, for write-only and absent registers.
    pub fn msr_read(&self, msr: u32, now: u64) -> Result<u64, X2apicFault> {
        let offset = self.x2apic_offset(msr)?;
        if offset == reg::ICR_LOW {
            return Ok(u64::from(self.icr_high) << 32 | u64::from(self.icr_low));
        }
        if matches!(offset, reg::EOI | reg::SELF_IPI) {
            return Err(X2apicFault);
        }
        self.read_register(offset, now).map(u64::from).ok_or(X2apicFault)
    }

    /// WRMSR of x2APIC MSR `msr`: #GP outside x2APIC mode, for read-only and absent registers,
    /// and for reserved bits (the upper half of every register but the ICR, a non-zero EOI).
    pub fn msr_write(&mut self, msr: u32, value: u64, now: u64) -> Result<Effect, X2apicFault> {
        let offset = self.x2apic_offset(msr)?;
        match offset {
            reg::ICR_LOW => {
                self.icr_low = value as u32 & !(1 << 12);
                self.icr_high = (value >> 32) as u32;
                return Ok(self.send(value));
            }
            reg::SELF_IPI => {
                if value >> 8 != 0 {
                    return Err(X2apicFault);
                }
                self.accept(value as u8, false);
                return Ok(Effect::None);
            }
            reg::EOI if value != 0 => return Err(X2apicFault),
            reg::ESR if value != 0 => return Err(X2apicFault),
            _ => {}
        }
        if value >> 32 != 0 {
            return Err(X2apicFault);
        }
        self.write_register(offset, value as u32, now)
            .map_err(|()| X2apicFault)
    }

    /// The register offset of x2APIC MSR `msr`, in x2APIC mode.
    fn x2apic_offset(&self, msr: u32) -> Result<u32, X2apicFault> {
        if !self.x2apic || !(X2APIC_MSR_BASE..=X2APIC_MSR_LAST).contains(&msr) {
            return Err(X2apicFault);
        }
        Ok((msr - X2APIC_MSR_BASE) << 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(id: u32) -> LocalApic {
        let mut apic = LocalApic::new(id);
        apic.mmio_write(u64::from(reg::SVR), SVR_ENABLED | 0xFF, 0);
        apic
    }

    fn msr(offset: u32) -> u32 {
        X2APIC_MSR_BASE + (offset >> 4)
    }

    /// A level-triggered interrupt sets its TMR bit; its EOI is broadcast for the I/O APIC.
    #[test]
    fn the_eoi_of_a_level_triggered_vector_is_broadcast() {
        let mut apic = enabled(0);
        apic.accept(0x41, true);
        apic.accept(0x32, false);
        assert_eq!(apic.mmio_read(u64::from(reg::TMR) + 0x20, 0), 1 << 1);
        assert_eq!(apic.acknowledge(), Some(0x41));
        assert_eq!(apic.mmio_write(u64::from(reg::EOI), 0, 0), Effect::LevelEoi(0x41));
        assert_eq!(
            apic.mmio_read(u64::from(reg::TMR) + 0x20, 0),
            1 << 1,
            "TMR keeps the last trigger mode past the EOI"
        );
        assert_eq!(apic.acknowledge(), Some(0x32));
        assert_eq!(apic.mmio_write(u64::from(reg::EOI), 0, 0), Effect::None, "edge");
        // The next edge-triggered interrupt at the vector clears its TMR bit.
        apic.accept(0x41, false);
        assert_eq!(apic.mmio_read(u64::from(reg::TMR) + 0x20, 0), 0);
    }

    #[test]
    fn reset_state_id_version_and_masked_lvts() {
        let apic = LocalApic::new(3);
        assert_eq!(apic.mmio_read(u64::from(reg::ID), 0), 3 << 24);
        assert_eq!(apic.mmio_read(u64::from(reg::VERSION), 0), VERSION);
        assert_eq!(apic.mmio_read(u64::from(reg::SVR), 0), 0xFF);
        assert_eq!(apic.mmio_read(u64::from(reg::DFR), 0), 0xFFFF_FFFF);
        for offset in (reg::LVT_TIMER..=reg::LVT_ERROR).step_by(16) {
            assert_eq!(apic.mmio_read(u64::from(offset), 0), LVT_MASKED);
        }
        assert!(!apic.enabled());
    }

    /// SDM 11.8.3.1: PPR is TPR when its class is at least the in-service class; an interrupt
    /// is delivered only above PPR's class; EOI retires the highest in service.
    #[test]
    fn priorities_gate_delivery_and_eoi_retires_the_highest_in_service() {
        let mut apic = enabled(0);
        apic.accept(0x31, false);
        apic.accept(0x52, false);
        apic.mmio_write(u64::from(reg::TPR), 0x50, 0);
        assert_eq!(apic.pending_vector(), None, "0x52 is in TPR's class");
        apic.mmio_write(u64::from(reg::TPR), 0x40, 0);
        assert_eq!(apic.acknowledge(), Some(0x52));
        assert_eq!(apic.ppr(), 0x50);
        assert_eq!(apic.pending_vector(), None, "0x31 is below the in-service class");
        assert_eq!(apic.mmio_read(u64::from(reg::ISR) + 0x20, 0), 1 << 0x12);
        apic.mmio_write(u64::from(reg::EOI), 0, 0);
        assert_eq!(apic.ppr(), 0x40);
        apic.mmio_write(u64::from(reg::TPR), 0, 0);
        assert_eq!(apic.acknowledge(), Some(0x31));
        assert_eq!(apic.mmio_read(u64::from(reg::IRR) + 0x10, 0), 0);
    }

    #[test]
    fn illegal_vectors_are_recorded_in_esr_after_a_write_latches_them() {
        let mut apic = enabled(0);
        apic.accept(7, false);
        assert_eq!(apic.pending_vector(), None);
        let effect = apic.mmio_write(u64::from(reg::ICR_LOW), 0x0000_4005, 0);
        assert_eq!(effect, Effect::None, "a fixed IPI with vector 5 is not sent");
        assert_eq!(apic.mmio_read(u64::from(reg::ESR), 0), 0, "not latched yet");
        apic.mmio_write(u64::from(reg::ESR), 0, 0);
        assert_eq!(
            apic.mmio_read(u64::from(reg::ESR), 0),
            ESR_SEND_ILLEGAL_VECTOR | ESR_RECEIVE_ILLEGAL_VECTOR
        );
        apic.mmio_write(u64::from(reg::ESR), 0, 0);
        assert_eq!(apic.mmio_read(u64::from(reg::ESR), 0), 0);
    }

    #[test]
    fn software_disable_masks_every_lvt_entry_and_keeps_them_masked() {
        let mut apic = enabled(0);
        apic.mmio_write(u64::from(reg::LVT_TIMER), 0x40, 0);
        assert_eq!(apic.mmio_read(u64::from(reg::LVT_TIMER), 0), 0x40);
        apic.mmio_write(u64::from(reg::SVR), 0xFF, 0);
        assert_eq!(apic.mmio_read(u64::from(reg::LVT_TIMER), 0), 0x40 | LVT_MASKED);
        apic.mmio_write(u64::from(reg::LVT_TIMER), 0x41, 0);
        assert_eq!(apic.mmio_read(u64::from(reg::LVT_TIMER), 0), 0x41 | LVT_MASKED);
    }

    #[test]
    fn the_icr_sends_fixed_nmi_init_and_startup_messages_with_their_destinations() {
        let mut apic = enabled(0);
        apic.mmio_write(u64::from(reg::ICR_HIGH), 2 << 24, 0);
        let ipi = |mode, vector, destination| {
            Effect::Ipi(Ipi {
                vector,
                mode,
                destination,
                x2apic: false,
                level: false,
            })
        };
        assert_eq!(
            apic.mmio_write(u64::from(reg::ICR_LOW), 0x0000_4040, 0),
            ipi(DeliveryMode::Fixed, 0x40, Destination::Physical(2))
        );
        assert_eq!(
            apic.mmio_write(u64::from(reg::ICR_LOW), 0x000C_4400, 0),
            ipi(DeliveryMode::Nmi, 0, Destination::AllButSelf)
        );
        assert_eq!(
            apic.mmio_write(u64::from(reg::ICR_LOW), 0x000C_4500, 0),
            ipi(DeliveryMode::Init, 0, Destination::AllButSelf)
        );
        assert_eq!(
            apic.mmio_write(u64::from(reg::ICR_LOW), 0x0000_8500, 0),
            Effect::None,
            "INIT level de-assert"
        );
        assert_eq!(
            apic.mmio_write(u64::from(reg::ICR_LOW), 0x000C_4609, 0),
            ipi(DeliveryMode::Startup, 9, Destination::AllButSelf)
        );
        assert_eq!(
            apic.mmio_write(u64::from(reg::ICR_LOW), 0x0004_0020, 0),
            ipi(DeliveryMode::Fixed, 0x20, Destination::ToSelf)
        );
        assert_eq!(apic.mmio_read(u64::from(reg::ICR_LOW), 0), 0x0004_0020);
    }

    #[test]
    fn received_messages_queue_for_the_vcpu() {
        let mut apic = enabled(1);
        let message = |mode, vector| Ipi {
            vector,
            mode,
            destination: Destination::All,
            x2apic: false,
            level: false,
        };
        apic.receive(&message(DeliveryMode::Fixed, 0x61));
        apic.receive(&message(DeliveryMode::Nmi, 0));
        apic.receive(&message(DeliveryMode::Init, 0));
        apic.receive(&message(DeliveryMode::Startup, 0x9A));
        assert_eq!(apic.pending_vector(), Some(0x61));
        assert!(apic.take_nmi());
        assert!(!apic.take_nmi());
        assert!(apic.take_init());
        assert_eq!(apic.take_startup(), Some(0x9A));
        assert_eq!(apic.take_startup(), None);
    }

    /// SDM 6.7.1: of NMIs sent at once, the CPU takes one and latches one; while its NMI
    /// handler runs it latches one and drops the others.
    #[test]
    fn nmis_sent_at_once_latch_one_behind_the_one_taken() {
        let mut apic = enabled(1);
        let nmi = Ipi {
            vector: 0,
            mode: DeliveryMode::Nmi,
            destination: Destination::All,
            x2apic: false,
            level: false,
        };
        for _ in 0..3 {
            apic.receive(&nmi);
        }
        assert!(apic.take_nmi());
        assert!(apic.take_nmi());
        assert!(!apic.take_nmi());
        assert!(!apic.message_pending());

        apic.receive(&nmi);
        assert!(apic.take_nmi());
        for _ in 0..10 {
            apic.receive(&nmi);
            apic.nmi_blocked();
        }
        assert!(apic.take_nmi());
        assert!(!apic.take_nmi());
    }

    /// SDM 11.6.2: physical (with the 0xFF broadcast), flat and cluster logical destinations.
    #[test]
    fn destinations_match_physical_flat_and_cluster_addresses() {
        let mut apic = enabled(2);
        let to = |destination| Ipi {
            vector: 0x40,
            mode: DeliveryMode::Fixed,
            destination,
            x2apic: false,
            level: false,
        };
        assert!(apic.is_destination(&to(Destination::Physical(2)), false));
        assert!(!apic.is_destination(&to(Destination::Physical(3)), false));
        assert!(apic.is_destination(&to(Destination::Physical(0xFF)), false));
        assert!(!apic.is_destination(&to(Destination::AllButSelf), true));
        assert!(apic.is_destination(&to(Destination::ToSelf), true));
        apic.mmio_write(u64::from(reg::LDR), 0x0400_0000, 0);
        assert!(
            apic.is_destination(&to(Destination::Logical(0x06)), false),
            "flat"
        );
        assert!(!apic.is_destination(&to(Destination::Logical(0x01)), false));
        apic.mmio_write(u64::from(reg::DFR), 0x0FFF_FFFF, 0);
        apic.mmio_write(u64::from(reg::LDR), 0x2100_0000, 0);
        assert!(
            apic.is_destination(&to(Destination::Logical(0x23)), false),
            "cluster 2, member 0"
        );
        assert!(
            !apic.is_destination(&to(Destination::Logical(0x13)), false),
            "cluster 1"
        );
    }

    #[test]
    fn the_one_shot_timer_counts_down_by_its_divider_and_fires_once() {
        let mut apic = enabled(0);
        apic.mmio_write(u64::from(reg::LVT_TIMER), 0xEC, 0);
        apic.mmio_write(u64::from(reg::TIMER_DIVIDE), 0b0001, 0);
        apic.mmio_write(u64::from(reg::TIMER_INITIAL), 1000, 100);
        assert_eq!(apic.next_timer(), Some(100 + 4000), "divide by 4");
        assert_eq!(apic.mmio_read(u64::from(reg::TIMER_CURRENT), 2100), 500);
        apic.fire_timer(4099);
        assert_eq!(apic.pending_vector(), None, "not yet");
        apic.fire_timer(4100);
        assert_eq!(apic.pending_vector(), Some(0xEC));
        assert_eq!(apic.next_timer(), None);
        assert_eq!(apic.mmio_read(u64::from(reg::TIMER_CURRENT), 9000), 0);
    }

    #[test]
    fn the_periodic_timer_rearms_and_coalesces_missed_periods() {
        let mut apic = enabled(0);
        apic.mmio_write(
            u64::from(reg::LVT_TIMER),
            (TIMER_PERIODIC << TIMER_MODE_SHIFT) | 0x30,
            0,
        );
        apic.mmio_write(u64::from(reg::TIMER_DIVIDE), 0b1011, 0);
        apic.mmio_write(u64::from(reg::TIMER_INITIAL), 100, 0);
        apic.fire_timer(350);
        assert_eq!(apic.acknowledge(), Some(0x30));
        assert_eq!(
            apic.next_timer(),
            Some(400),
            "three periods missed, one interrupt"
        );
        assert_eq!(apic.mmio_read(u64::from(reg::TIMER_CURRENT), 430), 70);
        apic.mmio_write(u64::from(reg::TIMER_INITIAL), 0, 430);
        assert_eq!(apic.next_timer(), None, "a zero count stops it");
    }

    #[test]
    fn tsc_deadline_mode_arms_from_the_msr_and_disarms_on_a_mode_change() {
        let mut apic = enabled(0);
        apic.set_tsc_deadline(500);
        assert_eq!(apic.next_timer(), None, "not in deadline mode: ignored");
        apic.mmio_write(
            u64::from(reg::LVT_TIMER),
            (TIMER_TSC_DEADLINE << TIMER_MODE_SHIFT) | 0x50,
            0,
        );
        apic.mmio_write(u64::from(reg::TIMER_INITIAL), 77, 0);
        assert_eq!(
            apic.next_timer(),
            None,
            "the initial count is ignored in deadline mode"
        );
        apic.set_tsc_deadline(500);
        assert_eq!(apic.tsc_deadline(), 500);
        apic.fire_timer(600);
        assert_eq!(apic.pending_vector(), Some(0x50));
        assert_eq!(apic.tsc_deadline(), 0, "fired");
        apic.set_tsc_deadline(900);
        apic.mmio_write(u64::from(reg::LVT_TIMER), 0x50, 0);
        assert_eq!(apic.next_timer(), None, "a mode change disarms");
    }

    #[test]
    fn a_masked_timer_does_not_interrupt() {
        let mut apic = enabled(0);
        apic.mmio_write(u64::from(reg::LVT_TIMER), LVT_MASKED | 0x30, 0);
        apic.mmio_write(u64::from(reg::TIMER_INITIAL), 10, 0);
        assert_eq!(apic.next_timer(), None);
        apic.fire_timer(1000);
        assert_eq!(apic.pending_vector(), None);
    }

    /// SDM 11.12: in x2APIC mode the registers are MSRs, the ID is 32 bits and read-only,
    /// the LDR is derived from it, the ICR is one 64-bit write, DFR and ICR_HIGH are gone, and
    /// reserved accesses #GP; the MMIO page no longer answers.
    #[test]
    fn x2apic_mode_moves_the_registers_to_msrs() {
        let mut apic = enabled(0x23);
        assert_eq!(apic.msr_read(msr(reg::ID), 0), Err(X2apicFault), "xAPIC mode");
        apic.set_mode(true, true);
        assert_eq!(apic.msr_read(msr(reg::ID), 0), Ok(0x23));
        assert_eq!(apic.msr_read(msr(reg::LDR), 0), Ok((2 << 16) | (1 << 3)));
        assert_eq!(apic.msr_write(msr(reg::ID), 5, 0), Err(X2apicFault));
        assert_eq!(apic.msr_read(msr(reg::DFR), 0), Err(X2apicFault));
        assert_eq!(apic.msr_read(msr(reg::EOI), 0), Err(X2apicFault), "write-only");
        assert_eq!(
            apic.msr_write(msr(reg::EOI), 1, 0),
            Err(X2apicFault),
            "non-zero EOI"
        );
        assert_eq!(apic.msr_write(msr(reg::TPR), 1 << 32, 0), Err(X2apicFault));
        assert_eq!(
            apic.msr_write(msr(reg::ICR_LOW), (7u64 << 32) | 0x4041, 0),
            Ok(Effect::Ipi(Ipi {
                vector: 0x41,
                mode: DeliveryMode::Fixed,
                destination: Destination::Physical(7),
                x2apic: true,
                level: false,
            }))
        );
        assert_eq!(apic.msr_read(msr(reg::ICR_LOW), 0), Ok((7u64 << 32) | 0x4041));
        apic.msr_write(msr(reg::SELF_IPI), 0x77, 0).unwrap();
        assert_eq!(apic.pending_vector(), Some(0x77));
        assert_eq!(apic.msr_read(0x900, 0), Err(X2apicFault));
        assert_eq!(apic.mmio_read(u64::from(reg::ID), 0), u32::MAX);
    }

    #[test]
    fn a_hardware_disabled_apic_answers_nothing_and_comes_back_reset() {
        let mut apic = enabled(4);
        apic.accept(0x40, false);
        assert!(!apic.accepts_pic(), "enabled, LINT0 masked");
        apic.set_mode(false, false);
        assert_eq!(apic.mmio_read(u64::from(reg::ID), 0), u32::MAX);
        assert!(apic.accepts_pic());
        apic.set_mode(true, false);
        assert_eq!(apic.mmio_read(u64::from(reg::ID), 0), 4 << 24);
        assert_eq!(apic.pending_vector(), None, "reset");
        assert!(!apic.enabled(), "software-disabled after the reset");
        apic.mmio_write(u64::from(reg::SVR), SVR_ENABLED, 0);
        apic.mmio_write(u64::from(reg::LVT_LINT0), 7 << 8, 0);
        assert!(apic.accepts_pic(), "virtual wire through LINT0");
    }
}
