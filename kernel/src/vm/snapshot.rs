//! A VM's state outside its RAM, taken while none of its vCPUs runs, for a migration: each
//! vCPU's ([`SavedVcpu`]: the backend's [`CpuSnapshot`], its local APIC, emulated MSRs and
//! x87/SSE registers, and whether it waits for an interrupt or a startup message) and the
//! machine's ([`MachineSnapshot`]: the port bus with every device's state, the PIT's schedule,
//! the I/O APIC, the test device's memory, the A20 gate, the console line). A VM made from the
//! same [`MachineSpec`](super::devices::MachineSpec) and RAM layout, given these and a copy of
//! the RAM, goes on where the first one stopped. Both stay in this host's memory (one
//! machine): they are values, not a byte stream.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use devices::ioapic::IoApic;
use devices::lapic::LocalApic;
use devices::msr::MsrState;
use devices::{testdev, PortBus};

use super::backend::{BackendError, CpuSnapshot, VirtualCpu};
use super::devices::VmDevices;
use super::memory::VmMemory;
use super::Vcpu;
use crate::arch::vector::VectorState;

/// One vCPU's state between runs (see the module docs).
#[derive(Clone)]
pub struct SavedVcpu {
    /// The vCPU's index in its VM (its APIC ID).
    pub index: u32,
    cpu: CpuSnapshot,
    apic: LocalApic,
    msrs: MsrState,
    vector_state: Box<VectorState>,
    halted: bool,
    waiting_for_startup: bool,
    ticks_used: u64,
}

/// Why a vCPU's state could not be taken or given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotError {
    /// The backend refused (a VMCS access failed, a value was out of range).
    Backend(BackendError),
    /// The state is of the vCPU with another index (APIC ID).
    WrongVcpu {
        /// The vCPU's index.
        vcpu: u32,
        /// The saved state's.
        saved: u32,
    },
    /// The VM has no APIC for the vCPU.
    NoApic(u32),
}

impl core::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SnapshotError::Backend(error) => write!(f, "{error}"),
            SnapshotError::WrongVcpu { vcpu, saved } => {
                write!(f, "vCPU {vcpu} cannot take the state of vCPU {saved}")
            }
            SnapshotError::NoApic(index) => write!(f, "vCPU {index} has no local APIC"),
        }
    }
}

impl From<BackendError> for SnapshotError {
    fn from(error: BackendError) -> Self {
        SnapshotError::Backend(error)
    }
}

impl Vcpu<'_> {
    /// This vCPU's state, between runs, on its own CPU (the backend's structure is there).
    /// Its log of written pages was handed over at the end of its last run.
    pub fn save(&self) -> Result<SavedVcpu, SnapshotError> {
        let apic = self
            .memory
            .devices
            .apics
            .with(self.index, |apic| apic.clone())
            .ok_or(SnapshotError::NoApic(self.index))?;
        Ok(SavedVcpu {
            index: self.index,
            cpu: self.cpu.save_state()?,
            apic,
            msrs: self.msrs.clone(),
            vector_state: self.vector_state.clone(),
            halted: self.halted,
            waiting_for_startup: self.waiting_for_startup,
            ticks_used: self.ticks_used,
        })
    }

    /// Gives this vCPU, made and not yet run, the state `saved` (of the vCPU with the same
    /// index in another VM), on its own CPU. On error the vCPU is left as it was made or half
    /// loaded: drop it.
    pub fn restore(&mut self, saved: &SavedVcpu) -> Result<(), SnapshotError> {
        if saved.index != self.index {
            return Err(SnapshotError::WrongVcpu {
                vcpu: self.index,
                saved: saved.index,
            });
        }
        self.cpu.load_state(&saved.cpu)?;
        self.memory
            .devices
            .apics
            .with(self.index, |apic| *apic = saved.apic.clone())
            .ok_or(SnapshotError::NoApic(self.index))?;
        self.msrs = saved.msrs.clone();
        self.vector_state = saved.vector_state.clone();
        self.halted = saved.halted;
        self.waiting_for_startup = saved.waiting_for_startup;
        self.ticks_used = saved.ticks_used;
        // The APIC may have something to deliver, and its timer a deadline.
        self.refresh_apic_timer();
        self.apic_changed = true;
        Ok(())
    }
}

/// A VM's machine state outside RAM and the vCPUs (see the module docs).
pub struct MachineSnapshot {
    bus: PortBus,
    created: u64,
    next_irq0: u64,
    irq0_period: u64,
    irq_levels: u32,
    ioram: Option<testdev::IoRam>,
    ioapic: IoApic,
    line: (Vec<u8>, VecDeque<String>),
    a20: bool,
}

impl VmMemory {
    /// The VM's machine state, taken while none of its vCPUs runs. Locking: takes the port
    /// bus's, the devices' and the VM's locks one at a time.
    pub fn save_machine(&self) -> MachineSnapshot {
        let devices = &self.devices;
        MachineSnapshot {
            bus: devices.bus.lock().clone(),
            created: devices.created,
            next_irq0: devices.next_irq0.load(Ordering::Relaxed),
            irq0_period: devices.irq0_period.load(Ordering::Relaxed),
            irq_levels: devices.irq_levels.load(Ordering::Relaxed),
            ioram: devices.ioram.as_ref().map(|(_, ram)| ram.lock().clone()),
            ioapic: devices.ioapic.1.lock().clone(),
            line: devices.line.lock().clone(),
            a20: self.lock().a20_enabled(),
        }
    }
}

impl VmDevices {
    /// Takes the machine state `saved` (of a VM made from the same spec) before the VM's first
    /// run, and returns the A20 gate's state for its memory manager.
    pub(super) fn restore(&mut self, saved: MachineSnapshot) -> bool {
        *self.bus.get_mut() = saved.bus;
        self.created = saved.created;
        *self.next_irq0.get_mut() = saved.next_irq0;
        *self.irq0_period.get_mut() = saved.irq0_period;
        // Whatever the PIC holds is looked at before the first entry.
        *self.pic_changed.get_mut() = true;
        *self.irq_levels.get_mut() = saved.irq_levels;
        if let (Some((_, ram)), Some(saved)) = (&mut self.ioram, saved.ioram) {
            *ram.get_mut() = saved;
        }
        *self.ioapic.1.get_mut() = saved.ioapic;
        *self.line.get_mut() = saved.line;
        saved.a20
    }
}
