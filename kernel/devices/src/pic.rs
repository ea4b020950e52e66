//! The 8259A programmable interrupt controller pair of a PC (Intel 8259A data sheet): the
//! master at ports 0x20–0x21 with the slave cascaded on its IRQ 2, the slave at 0xA0–0xA1.
//! Modelled: the initialisation sequence (ICW1–ICW4), the mask (OCW1), end of interrupt
//! (OCW2: non-specific and specific), reading IRR or ISR (OCW3), edge-triggered requests with
//! fixed priority, interrupt acknowledge and automatic EOI. Not modelled: rotation, special
//! mask mode, poll mode, level triggering (ELCR).

use crate::{all_ones, Platform, PortDevice};

/// The master's command port; its data port follows.
pub const MASTER: u16 = 0x20;
/// The slave's command port; its data port follows.
pub const SLAVE: u16 = 0xA0;
/// The master input the slave is cascaded on.
const CASCADE_IRQ: u8 = 2;

/// ICW1: bit 4 marks it; bit 0, ICW4 follows; bit 1, single (no ICW3).
const ICW1: u8 = 1 << 4;
const ICW1_IC4: u8 = 1 << 0;
const ICW1_SINGLE: u8 = 1 << 1;
/// ICW4 bit 1: automatic end of interrupt.
const ICW4_AEOI: u8 = 1 << 1;
/// OCW3: bit 3 marks it (with bit 4 clear); bits 1:0 = 0b10 read IRR, 0b11 read ISR.
const OCW3: u8 = 1 << 3;
/// OCW2 commands in bits 7:5: non-specific EOI (001), specific EOI (011).
const OCW2_EOI: u8 = 0b001 << 5;
const OCW2_SPECIFIC_EOI: u8 = 0b011 << 5;

/// Where a chip is in its initialisation sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Init {
    #[default]
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A.
#[derive(Clone, Copy, Debug, Default)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    vector_base: u8,
    init: Init,
    icw1: u8,
    auto_eoi: bool,
    read_isr: bool,
}

impl Chip {
    fn write_command(&mut self, value: u8) {
        if value & ICW1 != 0 {
            // Initialisation clears the mask, the in-service bits and the edge memory.
            *self = Chip {
                icw1: value,
                init: Init::Icw2,
                ..Chip::default()
            };
        } else if value & OCW3 != 0 {
            match value & 0b11 {
                0b10 => self.read_isr = false,
                0b11 => self.read_isr = true,
                _ => {}
            }
        } else if value & 0xE0 == OCW2_EOI {
            // Non-specific: the highest-priority bit in service.
            if self.isr != 0 {
                self.isr &= self.isr - 1;
            }
        } else if value & 0xE0 == OCW2_SPECIFIC_EOI {
            self.isr &= !(1 << (value & 7));
        }
    }

    fn write_data(&mut self, value: u8) {
        self.init = match self.init {
            Init::Ready => {
                self.imr = value;
                Init::Ready
            }
            Init::Icw2 => {
                self.vector_base = value & 0xF8;
                if self.icw1 & ICW1_SINGLE == 0 {
                    Init::Icw3
                } else if self.icw1 & ICW1_IC4 != 0 {
                    Init::Icw4
                } else {
                    Init::Ready
                }
            }
            Init::Icw3 if self.icw1 & ICW1_IC4 != 0 => Init::Icw4,
            Init::Icw3 => Init::Ready,
            Init::Icw4 => {
                self.auto_eoi = value & ICW4_AEOI != 0;
                Init::Ready
            }
        };
    }

    fn read_command(&self) -> u8 {
        if self.read_isr {
            self.isr
        } else {
            self.irr
        }
    }

    /// The highest-priority requested, unmasked input that no input of equal or higher
    /// priority in service blocks (IRQ 0 is the highest).
    fn pending(&self) -> Option<u8> {
        let requests = self.irr & !self.imr;
        if requests == 0 {
            return None;
        }
        let irq = requests.trailing_zeros() as u8;
        let blocking = self.isr & ((2u8 << irq).wrapping_sub(1));
        (blocking == 0).then_some(irq)
    }

    /// Acknowledges `irq`: from requested to in service (unless automatic EOI).
    fn acknowledge(&mut self, irq: u8) -> u8 {
        self.irr &= !(1 << irq);
        if !self.auto_eoi {
            self.isr |= 1 << irq;
        }
        self.vector_base | irq
    }
}

/// The master and slave 8259A.
#[derive(Clone, Debug, Default)]
pub struct Pic {
    chips: [Chip; 2],
}

impl Pic {
    /// An edge on input `irq` (0–15; others are ignored): it is requested until acknowledged.
    pub fn raise(&mut self, irq: u8) {
        match irq {
            0..=7 => self.chips[0].irr |= 1 << irq,
            8..=15 => self.chips[1].irr |= 1 << (irq - 8),
            _ => {}
        }
    }

    /// The vector the pair would deliver now, if any.
    pub fn pending_vector(&self) -> Option<u8> {
        let mut master = self.chips[0];
        let slave = self.chips[1];
        // The slave's request shows on the master's cascade input.
        if slave.pending().is_some() {
            master.irr |= 1 << CASCADE_IRQ;
        }
        let irq = master.pending()?;
        if irq == CASCADE_IRQ {
            let slave_irq = slave.pending()?;
            return Some(slave.vector_base | slave_irq);
        }
        Some(master.vector_base | irq)
    }

    /// The CPU takes the pending interrupt: its vector, with the request moved to in service.
    pub fn acknowledge(&mut self) -> Option<u8> {
        let vector = self.pending_vector()?;
        let slave_irq = self.chips[1].pending();
        match self.chips[0].pending() {
            Some(CASCADE_IRQ) | None => {
                let slave_irq = slave_irq?;
                self.chips[0].acknowledge(CASCADE_IRQ);
                self.chips[1].acknowledge(slave_irq);
            }
            Some(irq) => {
                self.chips[0].acknowledge(irq);
            }
        }
        Some(vector)
    }

    /// The interrupt mask of the master (low byte) and slave (high byte).
    pub fn mask(&self) -> u16 {
        u16::from(self.chips[0].imr) | (u16::from(self.chips[1].imr) << 8)
    }
}

impl PortDevice for Pic {
    fn name(&self) -> &'static str {
        "8259A PIC pair"
    }

    fn read(&mut self, port: u16, size: u8, _: &mut dyn Platform) -> u32 {
        let chip = &self.chips[usize::from(port >= SLAVE)];
        match (port & 1, size) {
            (0, 1) => u32::from(chip.read_command()),
            (1, 1) => u32::from(chip.imr),
            _ => all_ones(size),
        }
    }

    fn write(&mut self, port: u16, size: u8, value: u32, _: &mut dyn Platform) {
        if size != 1 {
            return;
        }
        let chip = &mut self.chips[usize::from(port >= SLAVE)];
        if port & 1 == 0 {
            chip.write_command(value as u8);
        } else {
            chip.write_data(value as u8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestPlatform;

    /// The sequence Linux and every BIOS use: ICW1 0x11, vector bases 0x20/0x28, cascade on
    /// IRQ 2 (ICW3 0x04 / 0x02), 8086 mode (ICW4 0x01).
    fn initialised() -> (Pic, TestPlatform) {
        let mut pic = Pic::default();
        let mut p = TestPlatform::default();
        for (port, value) in [
            (MASTER, 0x11),
            (SLAVE, 0x11),
            (MASTER + 1, 0x20),
            (SLAVE + 1, 0x28),
            (MASTER + 1, 0x04),
            (SLAVE + 1, 0x02),
            (MASTER + 1, 0x01),
            (SLAVE + 1, 0x01),
        ] {
            pic.write(port, 1, value, &mut p);
        }
        (pic, p)
    }

    #[test]
    fn the_icw_sequence_sets_the_vector_bases_and_leaves_everything_unmasked() {
        let (mut pic, mut p) = initialised();
        assert_eq!(pic.mask(), 0);
        pic.raise(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        pic.raise(9);
        assert_eq!(
            pic.pending_vector(),
            None,
            "IRQ 0 in service blocks the cascade input"
        );
        pic.write(MASTER, 1, 0x20, &mut p);
        assert_eq!(pic.acknowledge(), Some(0x29));
    }

    #[test]
    fn masked_inputs_stay_requested_and_are_delivered_when_unmasked() {
        let (mut pic, mut p) = initialised();
        pic.write(MASTER + 1, 1, 0xFB, &mut p);
        pic.write(SLAVE + 1, 1, 0xFF, &mut p);
        assert_eq!(pic.read(MASTER + 1, 1, &mut p), 0xFB);
        assert_eq!(pic.mask(), 0xFFFB);
        pic.raise(1);
        pic.raise(12);
        assert_eq!(pic.pending_vector(), None);
        pic.write(SLAVE + 1, 1, !(1 << 4), &mut p);
        assert_eq!(pic.pending_vector(), Some(0x2C));
        pic.write(MASTER + 1, 1, 0, &mut p);
        assert_eq!(
            pic.acknowledge(),
            Some(0x21),
            "IRQ 1 outranks the cascade (IRQ 2)"
        );
    }

    #[test]
    fn ocw3_selects_irr_or_isr_and_eoi_clears_in_service() {
        let (mut pic, mut p) = initialised();
        pic.raise(3);
        pic.raise(5);
        pic.write(MASTER, 1, 0x0A, &mut p);
        assert_eq!(pic.read(MASTER, 1, &mut p), 0b10_1000);
        assert_eq!(pic.acknowledge(), Some(0x23));
        pic.write(MASTER, 1, 0x0B, &mut p);
        assert_eq!(pic.read(MASTER, 1, &mut p), 0b1000);
        assert_eq!(pic.pending_vector(), None, "IRQ 3 in service blocks IRQ 5");
        pic.write(MASTER, 1, 0x63, &mut p);
        assert_eq!(pic.read(MASTER, 1, &mut p), 0);
        assert_eq!(pic.acknowledge(), Some(0x25));
    }

    #[test]
    fn automatic_eoi_leaves_nothing_in_service() {
        let mut pic = Pic::default();
        let mut p = TestPlatform::default();
        for (port, value) in [(MASTER, 0x13), (MASTER + 1, 0x08), (MASTER + 1, 0x03)] {
            pic.write(port, 1, value, &mut p);
        }
        pic.raise(0);
        assert_eq!(pic.acknowledge(), Some(0x08));
        pic.raise(0);
        assert_eq!(pic.acknowledge(), Some(0x08));
        pic.raise(42);
        assert_eq!(pic.acknowledge(), None);
        assert_eq!(pic.read(MASTER, 2, &mut p), 0xFFFF);
    }
}
