//! The I/O APIC (Intel 82093AA datasheet): 24 interrupt pins, each with a 64-bit redirection
//! entry, reached through an index register (IOREGSEL, offset 0x00) and a data window (IOWIN,
//! offset 0x10) in one MMIO page at 0xFEC0_0000.
//!
//! Modelled: the ID, version and arbitration registers; the redirection entries (vector,
//! delivery mode, destination mode and destination, polarity, trigger mode, mask) with the
//! read-only delivery status and remote IRR; edge-triggered pins deliver on a rising edge,
//! level-triggered ones while the line is asserted and no earlier message is in service
//! (remote IRR), until the local APIC's EOI of that vector clears it (the version 0x11 chip
//! has no EOI register: the APICs broadcast EOIs for level-triggered vectors). A pin with
//! active-low polarity is asserted by a low line.
//!
//! The device does not deliver itself: each message comes back as an [`Ipi`] for the caller
//! to route to the local APICs, as the chip's messages travel on the APIC bus.

use crate::lapic::{DeliveryMode, Destination, Ipi};

/// Where the chip's page is.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// The number of pins (redirection entries).
pub const PINS: usize = 24;
/// The version register: version 0x11, highest entry index 23.
pub const VERSION: u32 = 0x11 | ((PINS as u32 - 1) << 16);
/// IOREGSEL and IOWIN.
const SELECT: u64 = 0x00;
const WINDOW: u64 = 0x10;
/// Register indices.
const REG_ID: u8 = 0x00;
const REG_VERSION: u8 = 0x01;
const REG_ARBITRATION: u8 = 0x02;
const REG_REDIRECTION: u8 = 0x10;
/// Redirection entry bits.
const MASKED: u64 = 1 << 16;
const LEVEL_TRIGGERED: u64 = 1 << 15;
const REMOTE_IRR: u64 = 1 << 14;
const ACTIVE_LOW: u64 = 1 << 13;
const LOGICAL_DESTINATION: u64 = 1 << 11;
/// The bits software writes: vector, delivery mode, destination mode, polarity, trigger,
/// mask, destination (delivery status and remote IRR are the chip's).
const WRITABLE: u64 =
    0xFF | (7 << 8) | LOGICAL_DESTINATION | ACTIVE_LOW | LEVEL_TRIGGERED | MASKED | (0xFF << 56);

/// One I/O APIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoApic {
    id: u8,
    select: u8,
    redirection: [u64; PINS],
    /// The pins' input lines, as driven (bit per pin; before polarity).
    lines: u32,
}

impl IoApic {
    /// A chip with APIC ID `id` in its reset state: every entry masked.
    pub fn new(id: u8) -> IoApic {
        IoApic {
            id: id & 0xF,
            select: 0,
            redirection: [MASKED; PINS],
            lines: 0,
        }
    }

    /// A 32-bit read at `offset` in the page (other offsets read 0).
    pub fn mmio_read(&self, offset: u64) -> u32 {
        match offset {
            SELECT => u32::from(self.select),
            WINDOW => self.read_register(self.select),
            _ => 0,
        }
    }

    /// A 32-bit write at `offset`; returns the message an unmasked, asserted level-triggered
    /// pin now sends, if any.
    pub fn mmio_write(&mut self, offset: u64, value: u32) -> Option<Ipi> {
        match offset {
            SELECT => {
                self.select = value as u8;
                None
            }
            WINDOW => self.write_register(self.select, value),
            _ => None,
        }
    }

    fn read_register(&self, index: u8) -> u32 {
        match index {
            REG_ID => u32::from(self.id) << 24,
            REG_VERSION => VERSION,
            REG_ARBITRATION => u32::from(self.id) << 24,
            _ => match Self::entry_half(index) {
                Some((pin, false)) => self.redirection[pin] as u32,
                Some((pin, true)) => (self.redirection[pin] >> 32) as u32,
                None => 0,
            },
        }
    }

    fn write_register(&mut self, index: u8, value: u32) -> Option<Ipi> {
        if index == REG_ID {
            self.id = (value >> 24) as u8 & 0xF;
            return None;
        }
        let (pin, high) = Self::entry_half(index)?;
        let old = self.redirection[pin];
        let written = if high {
            (old & 0xFFFF_FFFF) | (u64::from(value) << 32)
        } else {
            (old & !0xFFFF_FFFF) | u64::from(value)
        };
        self.redirection[pin] = (written & WRITABLE) | (old & REMOTE_IRR);
        if self.redirection[pin] & LEVEL_TRIGGERED == 0 {
            self.redirection[pin] &= !REMOTE_IRR;
        }
        // Unmasking a level-triggered pin whose line is asserted sends its message.
        self.level_message(pin)
    }

    /// The entry (pin) and half (`true`: bits 63:32) register `index` names.
    fn entry_half(index: u8) -> Option<(usize, bool)> {
        let offset = usize::from(index.checked_sub(REG_REDIRECTION)?);
        (offset < 2 * PINS).then_some((offset / 2, offset % 2 == 1))
    }

    /// True when `pin`'s line is asserted (its polarity applied).
    fn asserted(&self, pin: usize) -> bool {
        let high = self.lines & (1 << pin) != 0;
        high != (self.redirection[pin] & ACTIVE_LOW != 0)
    }

    /// Drives `pin`'s input line to `high`; returns the message it sends, if any. Pins past
    /// the last are not wired.
    pub fn set_line(&mut self, pin: usize, high: bool) -> Option<Ipi> {
        if pin >= PINS {
            return None;
        }
        let was = self.asserted(pin);
        if high {
            self.lines |= 1 << pin;
        } else {
            self.lines &= !(1 << pin);
        }
        let entry = self.redirection[pin];
        if entry & LEVEL_TRIGGERED != 0 {
            return self.level_message(pin);
        }
        let rising = self.asserted(pin) && !was;
        (rising && entry & MASKED == 0).then(|| Self::message(entry))
    }

    /// A level-triggered `pin` that is asserted, unmasked and not in service sends its
    /// message and is in service (remote IRR) until its EOI.
    fn level_message(&mut self, pin: usize) -> Option<Ipi> {
        let entry = self.redirection[pin];
        let sends = entry & LEVEL_TRIGGERED != 0 && entry & (MASKED | REMOTE_IRR) == 0 && self.asserted(pin);
        if !sends {
            return None;
        }
        self.redirection[pin] |= REMOTE_IRR;
        Some(Self::message(entry))
    }

    /// The local APICs' EOI of a level-triggered `vector`: every entry with that vector leaves
    /// service; one whose line is still asserted sends again. Returns the messages sent.
    pub fn end_of_interrupt(&mut self, vector: u8) -> impl Iterator<Item = Ipi> + '_ {
        (0..PINS).filter_map(move |pin| {
            let entry = self.redirection[pin];
            if entry as u8 != vector || entry & REMOTE_IRR == 0 {
                return None;
            }
            self.redirection[pin] &= !REMOTE_IRR;
            self.level_message(pin)
        })
    }

    /// The message of redirection entry `entry`. The delivery modes the APIC model has no use
    /// for here (SMI, ExtINT) are sent as fixed.
    fn message(entry: u64) -> Ipi {
        let mode = match (entry >> 8) & 7 {
            1 => DeliveryMode::LowestPriority,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            _ => DeliveryMode::Fixed,
        };
        let target = (entry >> 56) as u32;
        Ipi {
            vector: entry as u8,
            mode,
            destination: if entry & LOGICAL_DESTINATION != 0 {
                Destination::Logical(target)
            } else {
                Destination::Physical(target)
            },
            x2apic: false,
            level: entry & LEVEL_TRIGGERED != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_entry(chip: &mut IoApic, pin: usize, entry: u64) -> Option<Ipi> {
        let index = REG_REDIRECTION as u32 + 2 * pin as u32;
        chip.mmio_write(SELECT, index + 1);
        chip.mmio_write(WINDOW, (entry >> 32) as u32);
        chip.mmio_write(SELECT, index);
        chip.mmio_write(WINDOW, entry as u32)
    }

    fn read_entry(chip: &mut IoApic, pin: usize) -> u64 {
        let index = REG_REDIRECTION as u32 + 2 * pin as u32;
        chip.mmio_write(SELECT, index);
        let low = chip.mmio_read(WINDOW);
        chip.mmio_write(SELECT, index + 1);
        u64::from(low) | u64::from(chip.mmio_read(WINDOW)) << 32
    }

    #[test]
    fn reset_state_masks_every_entry_and_reports_id_and_version() {
        let mut chip = IoApic::new(2);
        chip.mmio_write(SELECT, u32::from(REG_VERSION));
        assert_eq!(chip.mmio_read(WINDOW), 0x0017_0011);
        chip.mmio_write(SELECT, u32::from(REG_ID));
        assert_eq!(chip.mmio_read(WINDOW), 2 << 24);
        chip.mmio_write(WINDOW, 5 << 24);
        assert_eq!(chip.mmio_read(WINDOW), 5 << 24);
        for pin in 0..PINS {
            assert_eq!(read_entry(&mut chip, pin), MASKED);
        }
        assert_eq!(chip.set_line(4, true), None, "masked pins send nothing");
    }

    #[test]
    fn an_edge_triggered_pin_sends_on_each_rising_edge_to_its_destination() {
        let mut chip = IoApic::new(0);
        write_entry(&mut chip, 2, (1 << 56) | 0x30);
        let sent = chip.set_line(2, true).unwrap();
        assert_eq!(
            sent,
            Ipi {
                vector: 0x30,
                mode: DeliveryMode::Fixed,
                destination: Destination::Physical(1),
                x2apic: false,
                level: false,
            }
        );
        assert_eq!(chip.set_line(2, true), None, "no edge");
        assert_eq!(chip.set_line(2, false), None);
        assert!(chip.set_line(2, true).is_some());
        // Logical destination, lowest priority.
        write_entry(&mut chip, 4, (3 << 56) | LOGICAL_DESTINATION | (1 << 8) | 0x41);
        let sent = chip.set_line(4, true).unwrap();
        assert_eq!(
            (sent.mode, sent.destination),
            (DeliveryMode::LowestPriority, Destination::Logical(3))
        );
    }

    #[test]
    fn a_level_triggered_pin_waits_for_the_eoi_and_sends_again_while_asserted() {
        let mut chip = IoApic::new(0);
        write_entry(&mut chip, 9, LEVEL_TRIGGERED | 0x29);
        let sent = chip.set_line(9, true).unwrap();
        assert!(sent.level);
        assert_ne!(read_entry(&mut chip, 9) & REMOTE_IRR, 0);
        assert_eq!(chip.set_line(9, true), None, "in service");
        assert_eq!(chip.end_of_interrupt(0x28).count(), 0, "another vector");
        let again: Vec<Ipi> = chip.end_of_interrupt(0x29).collect();
        assert_eq!(again.len(), 1, "still asserted: sent again");
        chip.set_line(9, false);
        assert_eq!(chip.end_of_interrupt(0x29).count(), 0);
        assert_eq!(read_entry(&mut chip, 9) & REMOTE_IRR, 0);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_sends_and_active_low_inverts_the_line() {
        let mut chip = IoApic::new(0);
        write_entry(&mut chip, 5, MASKED | LEVEL_TRIGGERED | 0x35);
        assert_eq!(chip.set_line(5, true), None);
        assert!(write_entry(&mut chip, 5, LEVEL_TRIGGERED | 0x35).is_some());
        // Active low: a line driven low is asserted.
        write_entry(&mut chip, 6, ACTIVE_LOW | 0x36);
        chip.set_line(6, true);
        assert!(
            chip.set_line(6, false).is_some(),
            "falling line = rising assertion"
        );
    }

    #[test]
    fn the_chips_own_bits_are_read_only_and_bad_indices_are_harmless() {
        let mut chip = IoApic::new(0);
        write_entry(&mut chip, 1, u64::MAX);
        let entry = read_entry(&mut chip, 1);
        assert_eq!(
            entry & (REMOTE_IRR | (1 << 12)),
            0,
            "remote IRR and delivery status"
        );
        assert_eq!(entry & !WRITABLE, 0);
        for index in [0x03, 0x0F, 0x40, 0xFF] {
            chip.mmio_write(SELECT, index);
            assert_eq!(chip.mmio_read(WINDOW), 0);
            assert_eq!(chip.mmio_write(WINDOW, u32::MAX), None);
        }
        assert_eq!(chip.mmio_read(0x20), 0);
        assert_eq!(chip.set_line(PINS, true), None);
        assert_eq!(chip.set_line(usize::MAX, true), None);
    }
}
