//! A VM's virtual PC on the kernel side: the device layer's port bus and CPUID policy (crate
//! `devices`), the [`Platform`] they reach the VM through on each exit, and the exit policy
//! for port I/O, CPUID and MSRs. Everything the guest can touch is checked in the device
//! layer; this file only connects it to the memory manager, the host clock and the console.
//!
//! Locking: the port bus has its own lock, taken per port exit; a device on it may take the
//! VM's memory lock inside it (the A20 gate), never the other way round. MMIO devices, which
//! run under the memory lock, never take the bus.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use devices::bus::DeviceIndex;
use devices::cpuid::{AskingVcpu, CpuidPolicy, CpuidRegs};
use devices::ioapic::IoApic;
use devices::lapic::{Effect, Ipi};
use devices::msr::MsrOutcome;
use devices::{pic, pit, testdev};
use devices::{Platform, PortBus, StopRequest};
use pgm::handlers::HandlerId;
use pgm::manager::AccessHandlers;
use pgm::Invalidation;
use spin::Mutex;

use super::apic::VmApics;
use super::backend::{vector, Direction, Event, PortIo, VirtualCpu};
use super::memory::VmMemory;
use super::stop::{StopCause, VmStop};
use super::{Vcpu, VmError};
use crate::arch::{clock, ticks};
use crate::println;

/// What a VM's devices are made from.
#[derive(Clone, Debug)]
pub struct MachineSpec {
    /// The VM's name: its console lines are prefixed with it.
    pub name: String,
    /// The vCPUs the VM will have (CPUID and fw_cfg report it).
    pub vcpus: u32,
    /// QEMU's `pc-testdev` MMIO memory ("ioram", 64 KiB at 0xFF00_0000), which kvm-unit-tests
    /// expects (its ports are always there).
    pub test_device: bool,
    /// The ACPI tables (RSDP, XSDT, FADT, DSDT, FACS, MADT) as ROM in the BIOS area
    /// (0xE0000–0xFFFFF), where a guest looks for them.
    pub acpi_tables: bool,
    /// The backend runs RDTSCP and RDPID (set from its capabilities when the VM is made).
    pub rdtscp: bool,
    /// VMCALL is the test harness's (`vm::hypercall`: DONE ends the run, REPORT records);
    /// without it every VMCALL returns KVM's "no such hypercall", as third-party guests expect.
    pub test_hypercalls: bool,
    /// Unassigned guest-physical space reads all ones and drops writes, as on a PC, instead
    /// of stopping the VM (which the memory core's own tests want: they probe for it).
    pub unassigned_reads_ones: bool,
    /// The CPU vendor string the guest sees instead of the host's (QEMU's `-cpu …,vendor=`).
    /// An AMD guest on an Intel host gets SYSCALL in compatibility mode, which Intel CPUs
    /// refuse with #UD: the hypervisor emulates it, as KVM does.
    pub vendor: Option<[u8; 12]>,
}

impl Default for MachineSpec {
    fn default() -> Self {
        MachineSpec {
            name: String::from("vm"),
            vcpus: 1,
            test_device: false,
            acpi_tables: false,
            rdtscp: false,
            test_hypercalls: true,
            unassigned_reads_ones: false,
            vendor: None,
        }
    }
}

/// The devices of one VM, shared by its vCPUs.
pub struct VmDevices {
    name: String,
    /// The legacy PC's ports.
    pub(super) bus: Mutex<PortBus>,
    /// The CPUID every vCPU sees.
    pub(super) cpuid: CpuidPolicy,
    /// The guest's physical-address width (CPUID 0x8000_0008), for the MSR checks.
    pub(super) phys_bits: u32,
    /// When the VM was made (the devices' clocks start there).
    pub(super) created: u64,
    /// The PIC pair and the PIT on the bus.
    pic: DeviceIndex,
    pit: DeviceIndex,
    /// When the PIT's channel 0 next raises IRQ 0 (TSC; `u64::MAX`: it does not run), and its
    /// period in ticks.
    pub(super) next_irq0: AtomicU64,
    pub(super) irq0_period: AtomicU64,
    /// The PIC may have an interrupt to deliver (a request was raised, or its registers were
    /// written): the bootstrap vCPU looks before its next entry.
    pub(super) pic_changed: AtomicBool,
    /// The ISA interrupt lines' levels (bit n: line n), for edge detection.
    pub(super) irq_levels: core::sync::atomic::AtomicU32,
    /// See [`MachineSpec::test_hypercalls`].
    pub(super) test_hypercalls: bool,
    /// See [`MachineSpec::unassigned_reads_ones`].
    pub(super) unassigned_reads_ones: bool,
    /// The guest is told it runs on AMD while the host is Intel: SYSCALL outside 64-bit code
    /// #UDs on the CPU and is emulated (see [`MachineSpec::vendor`]).
    pub(super) emulates_syscall: bool,
    /// The vCPUs' local APICs.
    pub(super) apics: VmApics,
    /// The test device's MMIO memory and its pgm handler, when the machine has it.
    pub(super) ioram: Option<(HandlerId, Mutex<testdev::IoRam>)>,
    /// The I/O APIC and the pgm handler of its page.
    pub(super) ioapic: (HandlerId, Mutex<IoApic>),
    /// The console line being written, and the last lines printed (oldest first).
    pub(super) line: Mutex<(Vec<u8>, VecDeque<String>)>,
}

/// The longest console line kept before it is printed anyway.
const LINE_LIMIT: usize = 512;
/// Console lines a VM keeps for its stop report.
pub const KEPT_LINES: usize = 8;

impl VmDevices {
    /// The devices of a VM with `ram_bytes` of RAM, as `spec` says: the PC's legacy ports
    /// (A20 gate, UART, PIC, PIT, CMOS, PCI configuration, ACPI PM, the test exit, fw_cfg and
    /// the test device's ports).
    /// `apic_page` is the pgm MMIO handler of the xAPIC page, `ioapic_page` that of the I/O
    /// APIC's, `ioram` that of the test device's memory (if the machine has it).
    pub fn new(
        spec: &MachineSpec,
        ram_bytes: u64,
        apic_page: HandlerId,
        ioapic_page: HandlerId,
        ioram: Option<HandlerId>,
    ) -> Result<VmDevices, VmError> {
        let vcpus = u16::try_from(spec.vcpus.max(1)).unwrap_or(u16::MAX);
        let devices::pc::LegacyPc { bus, pic, pit } =
            devices::pc::legacy_pc(vcpus, ram_bytes).map_err(VmError::Devices)?;
        let extended_max = host_cpuid(0x8000_0000, 0).eax;
        Ok(VmDevices {
            name: spec.name.clone(),
            bus: Mutex::new(bus),
            cpuid: CpuidPolicy {
                vcpus: spec.vcpus.max(1),
                tsc_hz: clock::tsc_hz(),
                apic_timer_hz: clock::tsc_hz(),
                rdtscp: spec.rdtscp,
                vendor: spec.vendor,
            },
            phys_bits: devices::msr::phys_bits(host_cpuid(0x8000_0008, 0), extended_max),
            created: ticks(),
            pic,
            pit,
            next_irq0: AtomicU64::new(u64::MAX),
            irq0_period: AtomicU64::new(0),
            pic_changed: AtomicBool::new(false),
            irq_levels: core::sync::atomic::AtomicU32::new(0),
            test_hypercalls: spec.test_hypercalls,
            unassigned_reads_ones: spec.unassigned_reads_ones,
            emulates_syscall: spec.vendor == Some(*b"AuthenticAMD") && is_intel(host_cpuid(0, 0)),
            apics: VmApics::new(apic_page),
            ioram: ioram.map(|handler| (handler, Mutex::new(testdev::IoRam::default()))),
            ioapic: (ioapic_page, Mutex::new(IoApic::new(devices::acpi::IOAPIC_ID))),
            line: Mutex::new((Vec::new(), VecDeque::new())),
        })
    }

    /// After a guest write to `port`: a PIT write may have started or stopped channel 0's
    /// periodic interrupt, a PIC write may have unmasked a request or ended one in service.
    fn after_write(&self, bus: &mut PortBus, port: u16) {
        match port {
            pit::CHANNEL0..=pit::CONTROL => {
                let period_ns = bus
                    .device_mut::<pit::Pit>(self.pit)
                    .and_then(|pit| pit.channel0_period_ns());
                let period = period_ns.map_or(0, |ns| {
                    (u128::from(ns) * u128::from(clock::tsc_hz()) / 1_000_000_000) as u64
                });
                self.irq0_period.store(period, Ordering::Relaxed);
                let next = if period == 0 { u64::MAX } else { ticks() + period };
                self.next_irq0.store(next, Ordering::Relaxed);
            }
            0x20 | 0x21 | 0xA0 | 0xA1 => self.pic_changed.store(true, Ordering::Relaxed),
            _ => {}
        }
    }

    /// Drives ISA line `line` to `level`: a rising edge raises the PIC's request.
    fn drive_irq(&self, bus: &mut PortBus, line: u8, level: bool) {
        let bit = 1u32 << (line & 15);
        let was = if level {
            self.irq_levels.fetch_or(bit, Ordering::Relaxed)
        } else {
            self.irq_levels.fetch_and(!bit, Ordering::Relaxed)
        };
        let rising = level && was & bit == 0;
        if rising {
            if let Some(pic) = bus.device_mut::<pic::Pic>(self.pic) {
                pic.raise(line);
            }
            self.pic_changed.store(true, Ordering::Relaxed);
        }
        self.drive_ioapic(line, level);
    }

    /// Drives the I/O APIC pin ISA line `line` is wired to (the MADT's interrupt source
    /// override puts IRQ 0 on pin 2; the others on their own number) and routes the message
    /// it sends, if any.
    fn drive_ioapic(&self, line: u8, level: bool) {
        let pin = devices::acpi::isa_irq_pin(line);
        let sent = self.ioapic.1.lock().set_line(usize::from(pin), level);
        if let Some(ipi) = sent {
            self.apics.route(u32::MAX, &ipi);
        }
    }

    /// What an APIC register write asks of the VM, added to the messages `sent` to route
    /// after the exit: the message written to the ICR, or the I/O APIC's messages after the
    /// EOI of a level-triggered vector.
    pub(super) fn apic_effect(&self, effect: Effect, sent: &mut Vec<Ipi>) {
        match effect {
            Effect::None => {}
            Effect::Ipi(ipi) => sent.push(ipi),
            Effect::LevelEoi(vector) => sent.extend(self.ioapic.1.lock().end_of_interrupt(vector)),
        }
    }

    /// The TSC at which a device next raises an interrupt (`u64::MAX`: none is armed): a
    /// running guest exits by then, a halted one wakes.
    pub(super) fn next_interrupt(&self) -> u64 {
        self.next_irq0.load(Ordering::Relaxed)
    }

    /// True when the PIC may have an interrupt for the bootstrap vCPU at `now`.
    fn pic_may_interrupt(&self, now: u64) -> bool {
        self.pic_changed.load(Ordering::Relaxed) || now >= self.next_irq0.load(Ordering::Relaxed)
    }

    /// Raises IRQ 0 if the PIT's period ran out by `now` (once, however many periods passed:
    /// edges coalesce as on a real PIC) and returns the vector the PIC would deliver, taking
    /// it (interrupt acknowledge) when `take`.
    fn pic_vector(&self, now: u64, take: bool) -> Option<u8> {
        let mut bus = self.bus.lock();
        self.raise_due_irq0(&mut bus, now);
        let pic = bus.device_mut::<pic::Pic>(self.pic)?;
        let vector = if take {
            pic.acknowledge()
        } else {
            pic.pending_vector()
        };
        if vector.is_none() {
            self.pic_changed.store(false, Ordering::Relaxed);
        }
        vector
    }

    /// Raises IRQ 0 on the PIC if the PIT's period ran out by `now`, and moves the PIT's next
    /// edge past `now`.
    fn raise_due_irq0(&self, bus: &mut PortBus, now: u64) {
        let next = self.next_irq0.load(Ordering::Relaxed);
        if now >= next {
            let period = self.irq0_period.load(Ordering::Relaxed).max(1);
            let missed = (now - next) / period;
            self.next_irq0
                .store(next + (missed + 1) * period, Ordering::Relaxed);
            if let Some(pic) = bus.device_mut::<pic::Pic>(self.pic) {
                pic.raise(0);
            }
            // Until the PIC has nothing to deliver, every entry looks.
            self.pic_changed.store(true, Ordering::Relaxed);
            // The same edge on the I/O APIC's pin.
            self.drive_ioapic(0, true);
            self.drive_ioapic(0, false);
        }
    }

    /// The PIT's edges when the PIC reaches no vCPU (the bootstrap vCPU's LINT0 masked, as an
    /// OS using the I/O APIC leaves it): each edge still latches in the PIC as on a PC, and
    /// goes no further; no entry looks at the PIC again until its next edge. (Without this the
    /// PIT's past deadline would bound every entry: an exit at each one.)
    fn latch_pic_edges(&self, now: u64) {
        let mut bus = self.bus.lock();
        self.raise_due_irq0(&mut bus, now);
        self.pic_changed.store(false, Ordering::Relaxed);
    }

    /// Accesses to unclaimed ports so far, as (port, count).
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn unclaimed_ports(&self) -> Vec<(u16, u64)> {
        self.bus.lock().unclaimed().collect()
    }

    /// One byte of the guest's console: lines go to the host's serial, prefixed with the VM's
    /// name.
    fn console(&self, byte: u8) {
        let mut guard = self.line.lock();
        let (line, last) = &mut *guard;
        match byte {
            b'\r' => return,
            b'\n' => {}
            _ => {
                line.push(byte);
                if line.len() < LINE_LIMIT {
                    return;
                }
            }
        }
        let text = String::from_utf8_lossy(line).into_owned();
        line.clear();
        println!("[{}] {}", self.name, text);
        if last.len() == KEPT_LINES {
            last.pop_front();
        }
        last.push_back(text);
    }

    /// The last line the guest printed on its console.
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn last_console_line(&self) -> String {
        self.line.lock().1.back().cloned().unwrap_or_default()
    }

    /// The last lines the guest printed (at most [`KEPT_LINES`]), oldest first.
    #[cfg_attr(feature = "kernel-tests", allow(dead_code))]
    pub fn recent_console_lines(&self) -> Vec<String> {
        self.line.lock().1.iter().cloned().collect()
    }
}

/// The host's CPUID.
fn host_cpuid(leaf: u32, subleaf: u32) -> CpuidRegs {
    let regs = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    CpuidRegs {
        eax: regs.eax,
        ebx: regs.ebx,
        ecx: regs.ecx,
        edx: regs.edx,
    }
}

/// The [`Platform`] of one port exit: the VM's memory, clock and console, and what the access
/// asked of the VM (an invalidation to carry out, a stop).
struct ExitPlatform<'a> {
    memory: &'a VmMemory,
    invalidation: Invalidation,
    stop: Option<StopRequest>,
    /// Interrupt lines the access drove, applied to the PIC after it (the PIC is on the bus
    /// the access holds).
    irqs: Vec<(u8, bool)>,
}

impl Platform for ExitPlatform<'_> {
    fn now_ns(&self) -> u64 {
        clock::ticks_to_ns(self.memory.devices.created, ticks())
    }

    fn a20(&self) -> bool {
        self.memory.lock().a20_enabled()
    }

    fn set_a20(&mut self, open: bool) {
        let invalidation = self.memory.lock().set_a20(open);
        self.invalidation = self.invalidation.max(invalidation);
    }

    fn console(&mut self, byte: u8) {
        self.memory.devices.console(byte);
    }

    fn stop(&mut self, why: StopRequest) {
        self.stop.get_or_insert(why);
    }

    fn wall_clock(&self) -> u64 {
        clock::wall_clock()
    }

    fn set_irq(&mut self, line: u8, level: bool) {
        self.irqs.push((line, level));
    }

    /// pgm has no call that drops one page's mapping and keeps its state, so the whole VM's
    /// translations are flushed instead: the page's next access walks the EPT again, but does
    /// not fault into the hypervisor as it would under QEMU.
    fn evict_page(&mut self, _gpa: u64) {
        self.invalidation = self.invalidation.max(Invalidation::SingleContext);
    }
}

/// What one interrupt controller's delivery did.
pub(super) enum Delivery {
    /// An interrupt was injected.
    Injected,
    /// One is pending but the guest cannot take it now.
    Waiting,
    /// Nothing to deliver.
    Nothing,
}

/// RAX with its low `size` bytes replaced by `value`, as IN leaves it (a 32-bit IN zeroes the
/// upper half, like every 32-bit register write).
fn merge_in(rax: u64, size: u8, value: u32) -> u64 {
    match size {
        1 => (rax & !0xFF) | u64::from(value & 0xFF),
        2 => (rax & !0xFFFF) | u64::from(value & 0xFFFF),
        _ => u64::from(value),
    }
}

/// The VM's port bus as the accesses of one exit reach it (one IN or OUT, or the elements of
/// an emulated INS or OUTS): what they asked of the VM is gathered for the end of the exit.
pub(super) struct Ports<'a> {
    platform: ExitPlatform<'a>,
}

impl<'a> Ports<'a> {
    /// The bus of the VM whose memory is `memory`.
    pub(super) fn new(memory: &'a VmMemory) -> Ports<'a> {
        Ports {
            platform: ExitPlatform {
                memory,
                invalidation: Invalidation::None,
                stop: None,
                irqs: Vec::new(),
            },
        }
    }

    /// One access of `size` (1, 2 or 4) bytes to `port`: reads when `direction` is in (the
    /// value returned), else writes `value`. An unclaimed port reads all ones and drops
    /// writes. Locking: the VM's bus lock, for the access; never call it holding the VM's
    /// memory lock (port 0x92 takes it).
    pub(super) fn access(&mut self, port: u16, size: u8, direction: Direction, value: u32) -> u32 {
        let memory = self.platform.memory;
        let mut bus = memory.devices.bus.lock();
        let read = match direction {
            Direction::In => bus.read(port, size, &mut self.platform),
            Direction::Out => {
                bus.write(port, size, value, &mut self.platform);
                memory.devices.after_write(&mut bus, port);
                0
            }
        };
        for (line, level) in core::mem::take(&mut self.platform.irqs) {
            memory.devices.drive_irq(&mut bus, line, level);
        }
        read
    }

    /// What the accesses asked of the VM: an invalidation to carry out, and a stop.
    pub(super) fn finish(self) -> (Invalidation, Option<VmStop>) {
        let stop = self.platform.stop.map(|why| match why {
            StopRequest::TestExit(code) => VmStop::TestExit(code),
            StopRequest::PowerOff => VmStop::PowerOff,
            StopRequest::Reset => VmStop::Reset,
        });
        (self.platform.invalidation, stop)
    }
}

impl Vcpu<'_> {
    /// Port I/O through the VM's port bus. IN and OUT of 1, 2 or 4 bytes go to the device
    /// holding the port (an unclaimed port reads all ones and drops writes); a device's
    /// request to stop ends the run as that stop. The string forms (INS, OUTS) are emulated,
    /// one element per exit, their memory reached through pgm and `devices`.
    pub(super) fn handle_port_io(&mut self, io: PortIo, devices: &mut impl AccessHandlers) -> Option<VmStop> {
        self.exits.port_io += 1;
        if io.string {
            return self.emulate_string_io(devices);
        }
        let memory = alloc::sync::Arc::clone(&self.memory);
        let mut ports = Ports::new(&memory);
        let value = ports.access(io.port, io.size, io.direction, self.cpu.regs().rax as u32);
        if io.direction == Direction::In {
            let regs = self.cpu.regs_mut();
            regs.rax = merge_in(regs.rax, io.size, value);
        }
        let (invalidation, stop) = ports.finish();
        let done = self
            .cpu
            .skip_instruction()
            .map_err(VmError::from)
            .and_then(|()| self.invalidate(invalidation));
        if done.is_err() {
            return Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit)));
        }
        stop
    }

    /// CPUID: the VM's policy over the host's values, for this vCPU's APIC ID and CR4.
    pub(super) fn handle_cpuid(&mut self) -> Option<VmStop> {
        self.exits.cpuid += 1;
        let cr4 = self.cpu.cpu_state().map_or(0, |state| state.cr4);
        let regs = self.cpu.regs();
        let (leaf, subleaf) = (regs.rax as u32, regs.rcx as u32);
        let asking = AskingVcpu {
            apic_id: self.index,
            cr4,
            apic_enabled: self.msrs.apic_base & devices::msr::APIC_ENABLED != 0,
        };
        let answer = self
            .memory
            .devices
            .cpuid
            .answer(leaf, subleaf, asking, &host_cpuid);
        let regs = self.cpu.regs_mut();
        regs.rax = u64::from(answer.eax);
        regs.rbx = u64::from(answer.ebx);
        regs.rcx = u64::from(answer.ecx);
        regs.rdx = u64::from(answer.edx);
        self.skip_or_stop()
    }

    /// RDMSR: emulated, the backend's, or refused with #GP(0).
    pub(super) fn handle_msr_read(&mut self, msr: u32) -> Option<VmStop> {
        self.exits.msr += 1;
        let value = match self.msrs.read(msr) {
            MsrOutcome::Done(value) => Some(value),
            MsrOutcome::Backend => self.cpu.read_msr(msr),
            MsrOutcome::Apic => self.read_apic_msr(msr),
            MsrOutcome::Refused => None,
        };
        let Some(value) = value else {
            return self.inject_or_stop(Event::Exception {
                vector: vector::GP,
                error_code: Some(0),
            });
        };
        let regs = self.cpu.regs_mut();
        regs.rax = value & 0xFFFF_FFFF;
        regs.rdx = value >> 32;
        self.skip_or_stop()
    }

    /// WRMSR: emulated, the backend's, or refused with #GP(0) (a refused write changes
    /// nothing).
    pub(super) fn handle_msr_write(&mut self, msr: u32, value: u64) -> Option<VmStop> {
        self.exits.msr += 1;
        let accepted = match self.msrs.write(msr, value) {
            MsrOutcome::Done(_) => {
                if msr == devices::msr::index::APIC_BASE {
                    self.follow_apic_base();
                }
                true
            }
            MsrOutcome::Backend => self.cpu.write_msr(msr, value),
            MsrOutcome::Apic => self.write_apic_msr(msr, value),
            MsrOutcome::Refused => false,
        };
        if !accepted {
            return self.inject_or_stop(Event::Exception {
                vector: vector::GP,
                error_code: Some(0),
            });
        }
        self.skip_or_stop()
    }

    /// Before an entry: delivers the interrupt this vCPU's local APIC or (on the bootstrap
    /// vCPU, through LINT0) the PIC has for it if the guest can take it now, or asks the
    /// backend to exit as soon as it can. An event the backend is still delivering goes
    /// first. Inline: with nothing pending it costs a few loads and compares.
    #[inline]
    pub(super) fn deliver_interrupts(&mut self) -> Option<VmStop> {
        let now = ticks();
        let apic = self.apic_may_interrupt(now);
        let pic = self.index == 0 && self.memory.devices.pic_may_interrupt(now);
        if !apic && !pic {
            return None;
        }
        self.deliver(apic, pic).err()
    }

    #[inline(never)]
    fn deliver(&mut self, apic: bool, pic: bool) -> Result<(), VmStop> {
        let mut waiting = false;
        // The PIT's edges first when the PIC does not reach this vCPU: the I/O APIC may route
        // them here, for the APIC below to deliver.
        let pic = pic && !self.waiting_for_startup;
        let through_pic = pic && self.accepts_pic();
        let latched = pic && !through_pic;
        if latched {
            self.memory.devices.latch_pic_edges(ticks());
        }
        let apic = apic || (latched && self.apic_may_interrupt(ticks()));
        if apic {
            match self.deliver_apic()? {
                Delivery::Injected => return Ok(()),
                Delivery::Waiting => waiting = true,
                Delivery::Nothing => {}
            }
        }
        if through_pic {
            match self.deliver_pic()? {
                Delivery::Injected => return Ok(()),
                Delivery::Waiting => waiting = true,
                Delivery::Nothing => {}
            }
        }
        // Only a blocked interrupt keeps the window open: an open window with nothing behind
        // it would exit at every instruction boundary.
        self.window_or_fail(waiting)
    }

    /// True when the PIC's interrupts reach this vCPU (see `LocalApic::accepts_pic`).
    fn accepts_pic(&self) -> bool {
        self.memory
            .devices
            .apics
            .with(self.index, |apic| apic.accepts_pic())
            .unwrap_or(true)
    }

    /// The PIC's part of [`deliver`](Self::deliver).
    fn deliver_pic(&mut self) -> Result<Delivery, VmStop> {
        if self.cpu.event_pending() {
            return Ok(Delivery::Nothing);
        }
        let can_take = self.cpu.interruptible();
        match (self.memory.devices.pic_vector(ticks(), can_take), can_take) {
            (None, _) => Ok(Delivery::Nothing),
            (Some(vector), true) => {
                self.inject_or_fail(Event::Interrupt(vector))?;
                Ok(Delivery::Injected)
            }
            (Some(_), false) => Ok(Delivery::Waiting),
        }
    }

    /// True when an interrupt or message is waiting for this vCPU at `now` (a halted vCPU
    /// wakes).
    pub(super) fn interrupt_waiting(&self, now: u64) -> bool {
        if self.apic_waiting(now) {
            return true;
        }
        self.index == 0
            && !self.waiting_for_startup
            && self.memory.devices.pic_may_interrupt(now)
            && self.accepts_pic()
            && self.memory.devices.pic_vector(now, false).is_some()
    }

    /// The TSC by which this vCPU must be back in the hypervisor for a timer interrupt.
    pub(super) fn next_interrupt(&self) -> u64 {
        let pic = if self.index == 0 {
            self.memory.devices.next_interrupt()
        } else {
            u64::MAX
        };
        pic.min(self.apic_timer)
    }

    /// RDMSR of the TSC deadline or an x2APIC register (`None`: #GP).
    fn read_apic_msr(&self, msr: u32) -> Option<u64> {
        let now = ticks();
        let offset = self.cpu.tsc_offset();
        self.memory
            .devices
            .apics
            .with(self.index, |apic| {
                if msr == devices::msr::index::TSC_DEADLINE {
                    // The APIC keeps host time; the guest reads its own.
                    let deadline = apic.tsc_deadline();
                    Some(if deadline == 0 {
                        0
                    } else {
                        deadline.wrapping_add(offset)
                    })
                } else {
                    apic.msr_read(msr, now).ok()
                }
            })
            .flatten()
    }

    /// WRMSR of the TSC deadline or an x2APIC register (`false`: #GP); a message written to
    /// the ICR is routed at once.
    fn write_apic_msr(&mut self, msr: u32, value: u64) -> bool {
        let now = ticks();
        let offset = self.cpu.tsc_offset();
        let effect = self.memory.devices.apics.with(self.index, |apic| {
            if msr == devices::msr::index::TSC_DEADLINE {
                // The guest's deadline is in its TSC; the APIC keeps host time. A deadline
                // the host's TSC has passed already fires at once.
                let host = if value == 0 {
                    0
                } else {
                    value.wrapping_sub(offset).max(1)
                };
                apic.set_tsc_deadline(host);
                Ok(devices::lapic::Effect::None)
            } else {
                apic.msr_write(msr, value, now)
            }
        });
        let mut sent = Vec::new();
        match effect {
            Some(Ok(effect)) => self.memory.devices.apic_effect(effect, &mut sent),
            _ => return false,
        }
        self.after_apic_access(&mut sent);
        true
    }

    /// The APIC base MSR changed: the APIC follows its enable and x2APIC bits.
    fn follow_apic_base(&mut self) {
        let base = self.msrs.apic_base;
        let enabled = base & devices::msr::APIC_ENABLED != 0;
        let x2apic = base & devices::msr::APIC_X2APIC != 0;
        self.memory
            .devices
            .apics
            .with(self.index, |apic| apic.set_mode(enabled, x2apic));
        self.after_apic_access(&mut Vec::new());
    }

    /// Delivers `event` at the next entry (the instruction that exited does not complete); a
    /// backend failure stops the VM.
    pub(super) fn inject_or_stop(&mut self, event: Event) -> Option<VmStop> {
        self.exits.injected += 1;
        match self.cpu.inject(event) {
            Ok(()) => None,
            Err(_) => Some(VmStop::Stopped(self.diagnostic(StopCause::UnhandledExit))),
        }
    }

    /// The VM's devices.
    pub fn devices(&self) -> &VmDevices {
        &self.memory.devices
    }
}

/// True when leaf 0 names Intel.
fn is_intel(leaf0: CpuidRegs) -> bool {
    (leaf0.ebx, leaf0.edx, leaf0.ecx)
        == (
            u32::from_le_bytes(*b"Genu"),
            u32::from_le_bytes(*b"ineI"),
            u32::from_le_bytes(*b"ntel"),
        )
}
