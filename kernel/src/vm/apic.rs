//! The local APICs of a VM's vCPUs (the device layer's `LocalApic`, one per vCPU) and what
//! connects them to the vCPU loop: the xAPIC page as a pgm MMIO range whose accesses go to the
//! accessing vCPU's APIC, the x2APIC MSRs, interrupt messages routed between vCPUs (a message
//! to a vCPU running on another CPU kicks that CPU), the APIC timer's deadline, and INIT and
//! startup messages, which stop a vCPU and start it in real mode at the startup page.
//!
//! Locking: all APICs of the VM sit under one lock, held for a register access or a delivery
//! and never across another lock; an xAPIC access takes it inside the memory manager's (it is
//! an MMIO access), so nothing holds it while taking the manager's.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use devices::ioapic::IOAPIC_BASE;
use devices::lapic::{Ipi, LocalApic, XAPIC_BASE};
use pgm::handlers::HandlerId;
use pgm::manager::{AccessHandlers, HandlerAction};
use pgm::{Access, GuestPhysAddr};
use spin::Mutex;

use super::backend::{Event, VirtualCpu};
use super::devices::Delivery;
use super::memory::VmMemory;
use super::stop::{StopCause, VmStop};
use super::Vcpu;
use crate::arch::{smp, ticks};

/// vCPUs a VM can have (host CPU sets are 64-bit masks).
pub const MAX_VCPUS: usize = 64;

/// One vCPU's APIC and the host CPU the vCPU runs on.
struct Slot {
    apic: LocalApic,
    cpu: usize,
}

/// The APICs of one VM.
pub struct VmApics {
    slots: Mutex<Vec<Slot>>,
    /// Something arrived for vCPU `i` from elsewhere (a message): it looks before its next
    /// entry, or wakes if halted.
    poked: [AtomicBool; MAX_VCPUS],
    /// The xAPIC page's MMIO handler.
    page: HandlerId,
}

impl VmApics {
    /// The APICs of a VM whose xAPIC page is pgm MMIO handler `page`.
    pub fn new(page: HandlerId) -> VmApics {
        VmApics {
            slots: Mutex::new(Vec::new()),
            poked: [const { AtomicBool::new(false) }; MAX_VCPUS],
            page,
        }
    }

    /// The xAPIC page's MMIO handler.
    pub(super) fn page(&self) -> HandlerId {
        self.page
    }

    /// Gives vCPU `index` (the next one) its APIC, with ID `index`; it runs on host CPU `cpu`.
    /// `false` past [`MAX_VCPUS`].
    pub(super) fn add(&self, index: u32, cpu: usize) -> bool {
        let mut slots = self.slots.lock();
        if index as usize != slots.len() || slots.len() >= MAX_VCPUS {
            return false;
        }
        slots.push(Slot {
            apic: LocalApic::new(index),
            cpu,
        });
        true
    }

    /// Runs `op` on vCPU `index`'s APIC (`None` if it has none).
    pub(super) fn with<R>(&self, index: u32, op: impl FnOnce(&mut LocalApic) -> R) -> Option<R> {
        self.slots
            .lock()
            .get_mut(index as usize)
            .map(|slot| op(&mut slot.apic))
    }

    /// True when something was sent to vCPU `index` since it last looked.
    fn poked(&self, index: u32) -> bool {
        self.poked
            .get(index as usize)
            .is_some_and(|flag| flag.load(Ordering::Acquire))
    }

    fn take_poke(&self, index: u32) -> bool {
        self.poked
            .get(index as usize)
            .is_some_and(|flag| flag.swap(false, Ordering::AcqRel))
    }

    /// Delivers `ipi`, sent by vCPU `sender`, to every APIC it names; pokes each receiver and
    /// kicks the host CPUs of those running elsewhere so that they take it now. Returns how
    /// many APICs received it.
    pub(super) fn route(&self, sender: u32, ipi: &Ipi) -> usize {
        let mut kicks = 0u64;
        let mut received = 0;
        {
            let mut slots = self.slots.lock();
            for (index, slot) in slots.iter_mut().enumerate() {
                if !slot.apic.is_destination(ipi, index as u32 == sender) {
                    continue;
                }
                slot.apic.receive(ipi);
                received += 1;
                self.poked[index].store(true, Ordering::Release);
                if slot.cpu != smp::this_cpu().index {
                    kicks |= 1 << slot.cpu;
                }
            }
        }
        for cpu in (0..MAX_VCPUS).filter(|cpu| kicks & (1 << cpu) != 0) {
            smp::kick(cpu);
        }
        received
    }
}

/// The access handlers of one vCPU's run: the test device's memory, the vCPU's own xAPIC
/// page, then the caller's.
pub(super) struct VcpuHandlers<'h, H> {
    pub(super) caller: &'h mut H,
    pub(super) memory: Arc<VmMemory>,
    pub(super) index: u32,
    /// Messages the guest wrote to its ICR during the exit, to route after it.
    pub(super) sent: Vec<Ipi>,
    /// The guest accessed its APIC during the exit.
    pub(super) touched: bool,
}

impl<H: AccessHandlers> AccessHandlers for VcpuHandlers<'_, H> {
    fn access(
        &mut self,
        handler: HandlerId,
        gpa: GuestPhysAddr,
        access: Access,
        data: &mut [u8],
    ) -> HandlerAction {
        if let Some((ioram_handler, ioram)) = &self.memory.devices.ioram {
            if handler == *ioram_handler {
                let offset = gpa.as_u64().wrapping_sub(devices::testdev::IORAM_BASE);
                match access {
                    Access::Write => ioram.lock().write(offset, data),
                    _ => ioram.lock().read(offset, data),
                }
                return HandlerAction::Handled;
            }
        }
        if handler == self.memory.devices.ioapic.0 {
            self.ioapic_access(gpa, access, data);
            return HandlerAction::Handled;
        }
        if handler != self.memory.devices.apics.page {
            return self.caller.access(handler, gpa, access, data);
        }
        self.touched = true;
        let offset = gpa.as_u64().wrapping_sub(XAPIC_BASE) & 0xFFF;
        let now = ticks();
        let apics = &self.memory.devices.apics;
        match access {
            Access::Write => {
                // The registers take aligned dword writes; anything else is dropped.
                let Ok(bytes) = <[u8; 4]>::try_from(&*data) else {
                    return HandlerAction::Handled;
                };
                if !offset.is_multiple_of(4) {
                    return HandlerAction::Handled;
                }
                let value = u32::from_le_bytes(bytes);
                let effect = apics.with(self.index, |apic| apic.mmio_write(offset, value, now));
                if let Some(effect) = effect {
                    self.memory.devices.apic_effect(effect, &mut self.sent);
                }
            }
            _ => {
                let value = apics
                    .with(self.index, |apic| apic.mmio_read(offset & !3, now))
                    .unwrap_or(u32::MAX);
                let bytes = value.to_le_bytes();
                let start = (offset & 3) as usize;
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = bytes.get(start + i).copied().unwrap_or(0);
                }
            }
        }
        HandlerAction::Handled
    }
}

impl<H> VcpuHandlers<'_, H> {
    /// An access to the I/O APIC's page: its registers take aligned dword accesses (others
    /// read 0 and are dropped, as the chip ignores them); a message a write sends is routed
    /// after the exit.
    fn ioapic_access(&mut self, gpa: GuestPhysAddr, access: Access, data: &mut [u8]) {
        let offset = gpa.as_u64().wrapping_sub(IOAPIC_BASE) & 0xFFF;
        let dword = offset.is_multiple_of(4) && data.len() == 4;
        let ioapic = &self.memory.devices.ioapic.1;
        match access {
            Access::Write if dword => {
                let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                if let Some(ipi) = ioapic.lock().mmio_write(offset, value) {
                    self.sent.push(ipi);
                    self.touched = true;
                }
            }
            Access::Write => {}
            _ if dword => data.copy_from_slice(&ioapic.lock().mmio_read(offset).to_le_bytes()),
            _ => data.fill(0),
        }
    }
}

impl Vcpu<'_> {
    /// After an exit that touched the APIC: routes the messages it sent and has the next
    /// entry look at the APIC again (an EOI or a TPR write may let a waiting interrupt in; a
    /// timer write moves its deadline).
    pub(super) fn after_apic_access(&mut self, sent: &mut Vec<Ipi>) {
        self.apic_changed = true;
        for ipi in sent.drain(..) {
            self.memory.devices.apics.route(self.index, &ipi);
        }
        self.refresh_apic_timer();
    }

    /// MOV to CR8: the APIC's task priority is the value's low four bits, shifted into bits
    /// 7:4 (SDM 10.8.6.1); setting bits 63:4 is #GP.
    pub(super) fn handle_tpr_write(&mut self, register: u8) -> Option<VmStop> {
        self.exits.tpr += 1;
        let value = self.cpu.gpr(register);
        if value >> 4 != 0 {
            return self.inject_or_stop(Event::Exception {
                vector: super::backend::vector::GP,
                error_code: Some(0),
            });
        }
        let now = ticks();
        self.memory.devices.apics.with(self.index, |apic| {
            apic.set_task_priority((value as u8) << 4, now);
        });
        // A lower priority may let a waiting interrupt in.
        self.apic_changed = true;
        self.skip_or_stop()
    }

    /// MOV from CR8: the task priority's class.
    pub(super) fn handle_tpr_read(&mut self, register: u8) -> Option<VmStop> {
        self.exits.tpr += 1;
        let tpr = self
            .memory
            .devices
            .apics
            .with(self.index, |apic| apic.task_priority())
            .unwrap_or(0);
        if self.cpu.set_gpr(register, u64::from(tpr >> 4)).is_err() {
            return Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit)));
        }
        self.skip_or_stop()
    }

    /// Re-reads when this vCPU's APIC timer next expires.
    pub(super) fn refresh_apic_timer(&mut self) {
        self.apic_timer = self
            .memory
            .devices
            .apics
            .with(self.index, |apic| apic.next_timer())
            .flatten()
            .unwrap_or(u64::MAX);
    }

    /// True when this vCPU's APIC may have something to deliver at `now`.
    #[inline]
    pub(super) fn apic_may_interrupt(&self, now: u64) -> bool {
        self.apic_changed || now >= self.apic_timer || self.memory.devices.apics.poked(self.index)
    }

    /// The APIC part of the delivery before an entry: fires the timer if due, takes INIT and
    /// startup messages (`Some` ends the run only on a backend failure), then an NMI, then the
    /// highest fixed interrupt if the guest can take it now (else it is `Waiting`, for an
    /// interrupt-window exit).
    pub(super) fn deliver_apic(&mut self) -> Result<Delivery, VmStop> {
        let now = ticks();
        let apics = Arc::clone(&self.memory);
        let apics = &apics.devices.apics;
        apics.take_poke(self.index);
        self.apic_changed = false;
        let Some((init, startup)) = apics.with(self.index, |apic| {
            apic.fire_timer(now);
            (apic.take_init(), apic.take_startup())
        }) else {
            return Ok(Delivery::Nothing);
        };
        self.refresh_apic_timer();
        if init {
            self.waiting_for_startup = true;
            self.halted = false;
        }
        if let Some(page) = startup.filter(|_| self.waiting_for_startup) {
            self.start_at_page(page)?;
        }
        if self.waiting_for_startup {
            return Ok(Delivery::Nothing);
        }
        if self.cpu.event_pending() {
            // Looked at again after the event is in.
            self.apic_changed = true;
            return Ok(Delivery::Nothing);
        }
        let nmi_waiting = apics.with(self.index, |apic| apic.nmi_pending()).unwrap_or(false);
        if nmi_waiting && self.cpu.nmi_allowed() {
            apics.with(self.index, LocalApic::take_nmi);
            self.cpu
                .set_nmi_window_exiting(false)
                .map_err(|_| VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit)))?;
            self.inject_or_fail(Event::Nmi)?;
            self.apic_changed = true;
            return Ok(Delivery::Injected);
        }
        if nmi_waiting {
            if self.cpu.nmi_handler_running() {
                // The CPU latches one NMI behind the running handler and drops the rest.
                apics.with(self.index, LocalApic::nmi_blocked);
            }
            // Blocked by the NMI handler still running (or a shadow): the window says when.
            self.cpu
                .set_nmi_window_exiting(true)
                .map_err(|_| VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit)))?;
        }
        let interruptible = self.cpu.interruptible();
        let vector = apics
            .with(self.index, |apic| {
                if interruptible {
                    apic.acknowledge()
                } else {
                    apic.pending_vector()
                }
            })
            .flatten();
        let still_waiting = apics
            .with(self.index, |apic| {
                apic.pending_vector().is_some() || apic.message_pending()
            })
            .unwrap_or(false);
        // A message or a masked request keeps the next entry looking.
        self.apic_changed = still_waiting;
        match vector {
            Some(vector) if interruptible => {
                self.inject_or_fail(Event::Interrupt(vector))?;
                Ok(Delivery::Injected)
            }
            Some(_) => Ok(Delivery::Waiting),
            None => Ok(Delivery::Nothing),
        }
    }

    /// Starts the vCPU in real mode at `page << 12` (a startup message after INIT).
    fn start_at_page(&mut self, page: u8) -> Result<(), VmStop> {
        self.waiting_for_startup = false;
        self.cpu
            .start_at_page(page)
            .map_err(|_| VmStop::Stopped(self.diagnostic(StopCause::EntryFailed)))
    }

    /// Injects `event` at the next entry with the interrupt window closed (it is what the
    /// window waited for); a backend failure stops the VM.
    pub(super) fn inject_or_fail(&mut self, event: Event) -> Result<(), VmStop> {
        self.exits.injected += 1;
        self.cpu
            .set_interrupt_window_exiting(false)
            .and_then(|()| self.cpu.inject(event))
            .map_err(|_| VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit)))
    }

    pub(super) fn window_or_fail(&mut self, on: bool) -> Result<(), VmStop> {
        self.cpu
            .set_interrupt_window_exiting(on)
            .map_err(|_| VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit)))
    }

    /// True when an interrupt or message waits for this vCPU at `now` (a halted vCPU wakes;
    /// one waiting for a startup message wakes only for INIT or startup).
    pub(super) fn apic_waiting(&self, now: u64) -> bool {
        if !self.apic_may_interrupt(now) {
            return false;
        }
        self.memory
            .devices
            .apics
            .with(self.index, |apic| {
                apic.fire_timer(now);
                apic.message_pending() || (!self.waiting_for_startup && apic.pending_vector().is_some())
            })
            .unwrap_or(false)
    }
}
