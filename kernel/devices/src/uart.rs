//! A 16550A UART (National Semiconductor PC16550D data sheet), as COM1 at ports 0x3F8–0x3FF.
//! Its registers behave like the chip's, so that Linux's 8250 probe finds a 16550A (scratch
//! and IER read-back, FIFO bits in IIR, the loopback test of MSR) and a polled driver sees the
//! transmitter always ready. Transmitted bytes go to the [`Platform`]'s console at once; in
//! loopback mode they come back to the receiver instead.
//!
//! The interrupt state (IIR's identification, [`Uart::interrupt_pending`]) follows the data
//! sheet's priorities; the line is gated by MCR.OUT2 as on a PC, and drives ISA IRQ 4
//! ([`COM1_IRQ`]) through the [`Platform`] whenever an access changes it.

use alloc::collections::VecDeque;

use crate::{all_ones, Platform, PortDevice};

/// COM1's base port.
pub const COM1: u16 = 0x3F8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u8 = 4;
/// The registers' offsets from the base.
pub mod reg {
    /// Receive buffer (read), transmit holding (write); divisor latch low with LCR.DLAB.
    pub const DATA: u16 = 0;
    /// Interrupt enable; divisor latch high with LCR.DLAB.
    pub const IER: u16 = 1;
    /// Interrupt identification (read), FIFO control (write).
    pub const IIR_FCR: u16 = 2;
    /// Line control.
    pub const LCR: u16 = 3;
    /// Modem control.
    pub const MCR: u16 = 4;
    /// Line status.
    pub const LSR: u16 = 5;
    /// Modem status.
    pub const MSR: u16 = 6;
    /// Scratch.
    pub const SCR: u16 = 7;
}

/// IER bits: received data, transmitter empty, line status, modem status.
const IER_RDI: u8 = 1 << 0;
const IER_THRI: u8 = 1 << 1;
const IER_MASK: u8 = 0x0F;
/// IIR: no interrupt pending, and the identifications by priority.
const IIR_NO_INT: u8 = 0x01;
const IIR_RDI: u8 = 0x04;
const IIR_THRI: u8 = 0x02;
/// IIR bits 7:6 with the FIFOs enabled.
const IIR_FIFOS: u8 = 0xC0;
/// FCR: enable FIFOs, clear the receiver, clear the transmitter.
const FCR_ENABLE: u8 = 1 << 0;
const FCR_CLEAR_RX: u8 = 1 << 1;
/// LCR bit 7: divisor latch access.
const LCR_DLAB: u8 = 1 << 7;
/// MCR: DTR, RTS, OUT1, OUT2, loopback.
const MCR_OUT2: u8 = 1 << 3;
const MCR_LOOP: u8 = 1 << 4;
const MCR_MASK: u8 = 0x1F;
/// LSR: data ready, transmitter holding register empty, transmitter empty.
const LSR_DR: u8 = 1 << 0;
const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;
/// MSR outside loopback: CTS, DSR and DCD asserted (a connected terminal).
const MSR_CONNECTED: u8 = 0xB0;
/// The receive FIFO's depth.
const RX_DEPTH: usize = 16;

/// One 16550A.
#[derive(Clone, Debug)]
pub struct Uart {
    base: u16,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scratch: u8,
    divisor: u16,
    fifos: bool,
    /// A transmitter-empty interrupt is pending (set when the holding register empties with
    /// the interrupt enabled; cleared by reading IIR while it is the one identified, or by a
    /// write to the holding register).
    thr_interrupt: bool,
    rx: VecDeque<u8>,
}

impl Uart {
    /// A UART at `base` in its reset state (divisor 12: 9600 baud).
    pub fn new(base: u16) -> Uart {
        Uart {
            base,
            ier: 0,
            lcr: 0,
            mcr: 0,
            scratch: 0,
            divisor: 12,
            fifos: false,
            thr_interrupt: false,
            rx: VecDeque::with_capacity(RX_DEPTH),
        }
    }

    /// The host gives the guest a byte (dropped when the receive FIFO is full, as the chip
    /// overruns).
    pub fn receive(&mut self, byte: u8) {
        if self.rx.len() < RX_DEPTH {
            self.rx.push_back(byte);
        }
    }

    /// The divisor latch (baud rate = 115200 / divisor).
    pub fn divisor(&self) -> u16 {
        self.divisor
    }

    /// The identification IIR would give now (without clearing anything).
    fn identification(&self) -> u8 {
        if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            IIR_RDI
        } else if self.ier & IER_THRI != 0 && self.thr_interrupt {
            IIR_THRI
        } else {
            IIR_NO_INT
        }
    }

    /// True when the UART drives its interrupt line (an interrupt is identified and MCR.OUT2
    /// connects the line, as on a PC).
    pub fn interrupt_pending(&self) -> bool {
        self.identification() != IIR_NO_INT && self.mcr & MCR_OUT2 != 0
    }

    fn read_register(&mut self, offset: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            reg::DATA if dlab => self.divisor as u8,
            reg::DATA => self.rx.pop_front().unwrap_or(0),
            reg::IER if dlab => (self.divisor >> 8) as u8,
            reg::IER => self.ier,
            reg::IIR_FCR => {
                let id = self.identification();
                if id == IIR_THRI {
                    self.thr_interrupt = false;
                }
                id | if self.fifos { IIR_FIFOS } else { 0 }
            }
            reg::LCR => self.lcr,
            reg::MCR => self.mcr,
            reg::LSR => LSR_THRE | LSR_TEMT | if self.rx.is_empty() { 0 } else { LSR_DR },
            reg::MSR if self.mcr & MCR_LOOP != 0 => {
                // Loopback wires RTS to CTS, DTR to DSR, OUT1 to RI and OUT2 to DCD.
                let m = self.mcr;
                ((m & 0b10) << 3) | ((m & 0b01) << 5) | ((m & 0b100) << 4) | ((m & 0b1000) << 4)
            }
            reg::MSR => MSR_CONNECTED,
            _ => self.scratch,
        }
    }

    fn write_register(&mut self, offset: u16, value: u8, platform: &mut dyn Platform) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            reg::DATA if dlab => self.divisor = (self.divisor & 0xFF00) | u16::from(value),
            reg::DATA => {
                if self.mcr & MCR_LOOP != 0 {
                    self.receive(value);
                } else {
                    platform.console(value);
                }
                // The byte leaves at once: the holding register is empty again.
                self.thr_interrupt = true;
            }
            reg::IER if dlab => self.divisor = (self.divisor & 0x00FF) | (u16::from(value) << 8),
            reg::IER => {
                let enabling_thri = value & IER_THRI != 0 && self.ier & IER_THRI == 0;
                self.ier = value & IER_MASK;
                // The holding register is always empty: enabling its interrupt raises it.
                if enabling_thri {
                    self.thr_interrupt = true;
                }
            }
            reg::IIR_FCR => {
                self.fifos = value & FCR_ENABLE != 0;
                if value & FCR_CLEAR_RX != 0 {
                    self.rx.clear();
                }
            }
            reg::LCR => self.lcr = value,
            reg::MCR => self.mcr = value & MCR_MASK,
            // LSR and MSR are read-only (writes are for factory test).
            reg::LSR | reg::MSR => {}
            _ => self.scratch = value,
        }
    }
}

impl Uart {
    /// Drives the interrupt line to its new level when an access changed it from `was`.
    fn follow_line(&self, was: bool, platform: &mut dyn Platform) {
        let now = self.interrupt_pending();
        if now != was {
            platform.set_irq(COM1_IRQ, now);
        }
    }
}

impl PortDevice for Uart {
    fn name(&self) -> &'static str {
        "16550A UART"
    }

    /// Byte registers: a wider access reads consecutive registers (as an 8-bit ISA device
    /// answers a 16-bit IN), past the last one all ones.
    fn read(&mut self, port: u16, size: u8, platform: &mut dyn Platform) -> u32 {
        let line = self.interrupt_pending();
        let mut value = all_ones(size);
        for byte in 0..u16::from(size) {
            let offset = port.wrapping_sub(self.base).wrapping_add(byte);
            if offset <= reg::SCR {
                let shift = 8 * u32::from(byte);
                value = (value & !(0xFF << shift)) | (u32::from(self.read_register(offset)) << shift);
            }
        }
        self.follow_line(line, platform);
        value
    }

    fn write(&mut self, port: u16, size: u8, value: u32, platform: &mut dyn Platform) {
        let line = self.interrupt_pending();
        for byte in 0..u16::from(size) {
            let offset = port.wrapping_sub(self.base).wrapping_add(byte);
            if offset <= reg::SCR {
                self.write_register(offset, (value >> (8 * u32::from(byte))) as u8, platform);
            }
        }
        self.follow_line(line, platform);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPlatform;

    fn uart() -> (Uart, TestPlatform) {
        (Uart::new(COM1), TestPlatform::default())
    }

    fn inb(uart: &mut Uart, platform: &mut TestPlatform, offset: u16) -> u8 {
        uart.read(COM1 + offset, 1, platform) as u8
    }

    fn outb(uart: &mut Uart, platform: &mut TestPlatform, offset: u16, value: u8) {
        uart.write(COM1 + offset, 1, u32::from(value), platform);
    }

    #[test]
    fn transmitted_bytes_reach_the_console_and_the_transmitter_is_always_ready() {
        let (mut uart, mut platform) = uart();
        for &byte in b"ok\n" {
            assert_eq!(inb(&mut uart, &mut platform, reg::LSR) & LSR_THRE, LSR_THRE);
            outb(&mut uart, &mut platform, reg::DATA, byte);
        }
        assert_eq!(platform.console, b"ok\n");
        assert_eq!(inb(&mut uart, &mut platform, reg::LSR), LSR_THRE | LSR_TEMT);
    }

    /// Linux's `autoconfig` (drivers/tty/serial/8250/8250_port.c): IER keeps exactly its low
    /// four bits, and the scratch register holds what was written.
    #[test]
    fn the_scratch_and_ier_read_back_as_linux_probes_them() {
        let (mut uart, mut platform) = uart();
        outb(&mut uart, &mut platform, reg::IER, 0);
        assert_eq!(inb(&mut uart, &mut platform, reg::IER) & 0x0F, 0);
        outb(&mut uart, &mut platform, reg::IER, 0xFF);
        assert_eq!(
            inb(&mut uart, &mut platform, reg::IER),
            0x0F,
            "no UUE bit (not an XScale)"
        );
        for value in [0x55, 0xAA] {
            outb(&mut uart, &mut platform, reg::SCR, value);
            assert_eq!(inb(&mut uart, &mut platform, reg::SCR), value);
        }
    }

    /// Linux's loopback test: MCR = LOOP | RTS | OUT2 must read MSR bits 7:4 as 0x9 (DCD and
    /// CTS), and a byte sent in loopback comes back to the receiver, not to the console.
    #[test]
    fn loopback_wires_the_modem_lines_and_the_data_back() {
        let (mut uart, mut platform) = uart();
        outb(&mut uart, &mut platform, reg::MCR, MCR_LOOP | 0x0A);
        assert_eq!(inb(&mut uart, &mut platform, reg::MSR) & 0xF0, 0x90);
        outb(&mut uart, &mut platform, reg::MCR, MCR_LOOP | 0x05);
        assert_eq!(inb(&mut uart, &mut platform, reg::MSR) & 0xF0, 0x60, "DSR and RI");
        outb(&mut uart, &mut platform, reg::DATA, 0x5A);
        assert!(platform.console.is_empty());
        assert_eq!(inb(&mut uart, &mut platform, reg::LSR) & LSR_DR, LSR_DR);
        assert_eq!(inb(&mut uart, &mut platform, reg::DATA), 0x5A);
        assert_eq!(inb(&mut uart, &mut platform, reg::LSR) & LSR_DR, 0);
        outb(&mut uart, &mut platform, reg::MCR, 0);
        assert_eq!(inb(&mut uart, &mut platform, reg::MSR), MSR_CONNECTED);
    }

    /// With FIFOs enabled IIR bits 7:6 read 11 (a 16550A); bit 5 stays clear (not a 16750).
    #[test]
    fn fifo_control_shows_in_iir_as_on_a_16550a() {
        let (mut uart, mut platform) = uart();
        assert_eq!(inb(&mut uart, &mut platform, reg::IIR_FCR), IIR_NO_INT);
        outb(&mut uart, &mut platform, reg::IIR_FCR, FCR_ENABLE | 0x20);
        assert_eq!(
            inb(&mut uart, &mut platform, reg::IIR_FCR),
            IIR_FIFOS | IIR_NO_INT
        );
    }

    /// Linux's THRE test: enabling the transmitter interrupt with the holding register empty
    /// raises it at once; reading IIR identifies and clears it; the line needs OUT2.
    #[test]
    fn the_transmitter_interrupt_is_raised_by_enabling_it_and_cleared_by_reading_iir() {
        let (mut uart, mut platform) = uart();
        outb(&mut uart, &mut platform, reg::IER, IER_THRI);
        assert!(!uart.interrupt_pending(), "OUT2 clear: the line is not connected");
        outb(&mut uart, &mut platform, reg::MCR, MCR_OUT2);
        assert!(uart.interrupt_pending());
        assert_eq!(inb(&mut uart, &mut platform, reg::IIR_FCR), IIR_THRI);
        assert_eq!(inb(&mut uart, &mut platform, reg::IIR_FCR), IIR_NO_INT);
        outb(&mut uart, &mut platform, reg::DATA, b'x');
        assert_eq!(inb(&mut uart, &mut platform, reg::IIR_FCR), IIR_THRI);
    }

    /// The line follows the interrupt state: raised when the transmitter interrupt is enabled
    /// with OUT2 set, lowered when reading IIR clears it, raised again by the next byte.
    #[test]
    fn the_interrupt_line_follows_the_interrupt_state() {
        let (mut uart, mut platform) = uart();
        outb(&mut uart, &mut platform, reg::MCR, MCR_OUT2);
        outb(&mut uart, &mut platform, reg::IER, IER_THRI);
        assert_eq!(platform.irqs, [(COM1_IRQ, true)]);
        inb(&mut uart, &mut platform, reg::IIR_FCR);
        assert_eq!(platform.irqs, [(COM1_IRQ, true), (COM1_IRQ, false)]);
        inb(&mut uart, &mut platform, reg::LSR);
        assert_eq!(platform.irqs.len(), 2, "no change, no edge");
        outb(&mut uart, &mut platform, reg::DATA, b'x');
        assert_eq!(platform.irqs.last(), Some(&(COM1_IRQ, true)));
        outb(&mut uart, &mut platform, reg::MCR, 0);
        assert_eq!(
            platform.irqs.last(),
            Some(&(COM1_IRQ, false)),
            "OUT2 disconnects the line"
        );
    }

    #[test]
    fn received_data_outranks_the_transmitter_interrupt() {
        let (mut uart, mut platform) = uart();
        outb(&mut uart, &mut platform, reg::IER, IER_RDI | IER_THRI);
        uart.receive(b'a');
        assert_eq!(inb(&mut uart, &mut platform, reg::IIR_FCR), IIR_RDI);
        assert_eq!(inb(&mut uart, &mut platform, reg::DATA), b'a');
        assert_eq!(inb(&mut uart, &mut platform, reg::IIR_FCR), IIR_THRI);
        for byte in 0..40 {
            uart.receive(byte);
        }
        outb(&mut uart, &mut platform, reg::IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX);
        assert_eq!(inb(&mut uart, &mut platform, reg::LSR) & LSR_DR, 0);
    }

    #[test]
    fn the_divisor_latch_sits_under_dlab() {
        let (mut uart, mut platform) = uart();
        outb(&mut uart, &mut platform, reg::LCR, LCR_DLAB | 0x03);
        outb(&mut uart, &mut platform, reg::DATA, 0x01);
        outb(&mut uart, &mut platform, reg::IER, 0x00);
        assert_eq!(uart.divisor(), 1);
        assert_eq!(inb(&mut uart, &mut platform, reg::DATA), 0x01);
        outb(&mut uart, &mut platform, reg::LCR, 0x03);
        assert!(platform.console.is_empty(), "divisor writes are not data");
        assert_eq!(inb(&mut uart, &mut platform, reg::IER), 0);
    }

    #[test]
    fn a_word_access_covers_two_registers_and_nothing_past_the_last() {
        let (mut uart, mut platform) = uart();
        uart.write(COM1 + reg::SCR, 2, 0xBEEF, &mut platform);
        assert_eq!(uart.read(COM1 + reg::SCR, 2, &mut platform), 0xFFEF);
        assert_eq!(uart.read(COM1 + reg::LSR, 2, &mut platform) & 0xFF, 0x60);
    }
}
