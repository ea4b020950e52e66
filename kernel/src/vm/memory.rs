//! What the vCPUs of one VM share: the memory manager behind the VM's lock, the EPT pointer,
//! the host CPUs that may cache its translations (the TLB shootdown), the list of vCPUs (to
//! stop them all) and the rendezvous that parks them.
//!
//! Locking rules (the seed documents its PGM lock the same way):
//! - the VM's lock ([`VmMemory::lock`]) guards the memory manager. It is a reader-writer lock
//!   whose readers each have a counter of their own (`brlock`): a write to a page mapped
//!   read-only first tries the lock-free fault path on the read side with its CPU's slot
//!   ([`VmMemory::resolve_fault_lock_free`]), so write-monitor faults of vCPUs on different
//!   CPUs run in parallel; everything else takes the write side — a vCPU once per other EPT
//!   violation or one the lock-free path declined, port access or emulated access, the host for each
//!   change. Nobody holds either side across a flush, a rendezvous or a vCPU run, and nobody
//!   waits for anything while holding it: a CPU spinning on it with interrupts off still
//!   answers flush requests (they come as NMIs), so a flush never waits for a lock holder.
//! - the vCPU list has its own short lock, taken when a vCPU is made or dropped and to post
//!   requests to all of them.
//! - rendezvous callers are serialised by one more lock; inside the rendezvous every vCPU that
//!   is in a run waits in the host, outside the VM's lock.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use brlock::{BrLock, ReadGuard, WriteGuard};
use spin::Mutex;

use pgm::manager::DirtyLogMode;
use pgm::{Access, FaultOutcome, GuestPhysAddr, HostPhysAddr, Invalidation, Pgm, PgmError};

use super::devices::VmDevices;
use super::exits::ExitCost;
use super::requests::{Request, VcpuRequests};
use crate::arch::memory::{KernelFrames, PhysMap};
use crate::arch::smp::{self, this_cpu};
use crate::arch::virt;
use crate::arch::{idt, ticks};

/// The memory manager type of a kernel VM.
pub type KernelPgm = Pgm<KernelFrames, &'static PhysMap, virt::Format>;

/// Ticks between two kicks of a vCPU that has not yet parked for a rendezvous: a kick that
/// reached its CPU just before a VM entry was taken in the host and did not make the guest
/// exit, so it is sent again.
const REKICK_TICKS: u64 = 200_000;

/// What every vCPU of a VM shares. Dropped with the last vCPU: every CPU that ran one flushes
/// before the manager gives its frames back.
pub struct VmMemory {
    /// Gives its frames back when dropped, after `Drop for VmMemory` flushed every CPU.
    /// One reader slot and one written log per host CPU (a vCPU uses its CPU's).
    pgm: BrLock<KernelPgm>,
    /// The root of the VM's nested tables (what the EPT pointer or nCR3 names).
    nested_root: HostPhysAddr,
    /// Bit `i`: host CPU `i` may cache translations of this VM: it entered a vCPU of the VM
    /// (set before the entry) and has not been flushed since while not running one. A CPU
    /// whose bit is clear flushes before its next entry.
    ran_on: AtomicU64,
    /// Bit `i`: a vCPU of this VM is in a run on host CPU `i`.
    running_on: AtomicU64,
    /// Serialises this VM's flushes: one flush's pruning of `ran_on` must not hide a CPU from
    /// another that is under way.
    flushing: Mutex<()>,
    /// Each vCPU's host CPU and request word.
    vcpus: Mutex<Vec<(usize, Arc<VcpuRequests>)>>,
    /// Set while a rendezvous wants every vCPU parked.
    rendezvous: AtomicBool,
    /// Serialises rendezvous callers.
    rendezvous_owner: Mutex<()>,
    /// vCPUs waiting in a rendezvous.
    parked: AtomicUsize,
    /// Write monitoring takes its writes from the vCPUs' page-modification logs: each vCPU
    /// logs from its next entry (see [`VmMemory::start_dirty_log`]).
    pml_logging: AtomicBool,
    /// The VM's devices (port bus, CPUID policy, console).
    pub(super) devices: VmDevices,
    /// vCPUs ever added: the next one's index (its APIC ID).
    vcpus_added: AtomicU32,
}

/// The VM's memory manager, locked (see [`VmMemory::lock`]).
pub type PgmGuard<'a> = WriteGuard<'a, KernelPgm>;

/// The VM's memory manager, shared (see [`VmMemory::shared`]).
pub type SharedPgm<'a> = ReadGuard<'a, KernelPgm>;

/// Shootdowns of every VM so far (count, and the ticks from first IPI to last flush).
static SHOOTDOWNS: Mutex<ExitCost> = Mutex::new(ExitCost::NONE);

/// What remote EPT flushes have cost so far (only flushes that reached another CPU count).
#[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
pub fn shootdown_costs() -> ExitCost {
    *SHOOTDOWNS.lock()
}

/// What one rendezvous took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RendezvousCost {
    /// vCPUs that were in a run and had to park.
    pub parked: usize,
    /// Ticks from the request to the last vCPU parked.
    pub ticks_to_park: u64,
    /// Kicks sent (more than one per vCPU when a kick was taken just before an entry).
    pub kicks: u64,
}

impl VmMemory {
    /// The shared state of a new VM whose memory is `pgm` and whose devices are `devices`.
    pub(super) fn new(mut pgm: KernelPgm, devices: VmDevices) -> VmMemory {
        let cpus = smp::cpus().len();
        pgm.set_lock_free_vcpus(cpus);
        VmMemory {
            nested_root: pgm.nested_root(),
            pgm: BrLock::new(pgm, cpus),
            ran_on: AtomicU64::new(0),
            running_on: AtomicU64::new(0),
            flushing: Mutex::new(()),
            vcpus: Mutex::new(Vec::new()),
            rendezvous: AtomicBool::new(false),
            rendezvous_owner: Mutex::new(()),
            parked: AtomicUsize::new(0),
            pml_logging: AtomicBool::new(false),
            devices,
            vcpus_added: AtomicU32::new(0),
        }
    }

    /// Starts write monitoring in `mode` (pgm's `DirtyLogMode`). With PML, every vCPU logs its
    /// writes from its next entry; the returned invalidation, carried out with
    /// [`VmMemory::flush`], makes every running vCPU exit and enter again first, so a copy
    /// taken after the flush misses no write. The caller checks that the CPUs support PML
    /// (`Vcpu::pml_supported`). Fails, changing nothing, while monitoring is on in another mode.
    /// Locking: takes the VM's lock.
    pub fn start_dirty_log(&self, mode: DirtyLogMode) -> Result<Invalidation, PgmError> {
        let mut pgm = self.lock();
        pgm.set_dirty_log_mode(mode)?;
        let invalidation = pgm.start_write_monitoring();
        // Before the flush that makes the vCPUs enter again: they see it at that entry.
        self.pml_logging.store(pgm.is_pml_logging(), Ordering::SeqCst);
        Ok(invalidation)
    }

    /// Ends write monitoring (and the vCPUs' logging with it). Locking: takes the VM's lock.
    pub fn stop_dirty_log(&self) -> Invalidation {
        let mut pgm = self.lock();
        let invalidation = pgm.stop_write_monitoring();
        self.pml_logging.store(false, Ordering::SeqCst);
        invalidation
    }

    /// True while the vCPUs must log their writes (PML).
    pub(super) fn pml_logging(&self) -> bool {
        self.pml_logging.load(Ordering::Relaxed)
    }

    /// The root of the nested tables every vCPU of the VM uses.
    pub(super) fn nested_root(&self) -> HostPhysAddr {
        self.nested_root
    }

    /// Locks the memory manager. Locking: the VM's one lock; taken by a vCPU for each EPT
    /// violation, port access or emulated access, and by the host for every change. Never
    /// hold it across [`VmMemory::flush`], [`VmMemory::with_vcpus_parked`] or a vCPU run.
    pub fn lock(&self) -> PgmGuard<'_> {
        self.pgm.write()
    }

    /// The memory manager, shared with the other vCPUs' lock-free faults and emulated MMIO
    /// accesses, for work that changes nothing in it (`&KernelPgm`); host changes wait for it.
    /// Locking: the read side of the VM's lock, with host CPU `cpu`'s slot; never hold it
    /// across [`VmMemory::lock`], a flush or a vCPU run.
    pub(super) fn shared(&self, cpu: usize) -> SharedPgm<'_> {
        self.pgm.read(cpu)
    }

    /// Resolves an EPT violation of the vCPU on host CPU `cpu` without the VM's lock when the
    /// lock-free path can ([`Pgm::resolve_fault_lock_free`]); `None`: take [`VmMemory::lock`]
    /// and call `resolve_fault`. Locking: the read side of the VM's lock, with `cpu`'s slot.
    /// Inline: it runs on every lock-free write-monitor exit.
    #[inline]
    pub(super) fn resolve_fault_lock_free(
        &self,
        cpu: usize,
        gpa: GuestPhysAddr,
        access: Access,
    ) -> Option<FaultOutcome> {
        self.pgm.read(cpu).resolve_fault_lock_free(cpu, gpa, access)
    }

    /// Carries out `invalidation` everywhere it is needed: INVEPT on this CPU (unless the
    /// fault path already flushed it: [`Invalidation::OtherCpus`]) and on every other CPU that
    /// may cache the VM's translations — those that ran a vCPU of it since they were last
    /// flushed while not running one. A complete flush (this CPU included) then lets the
    /// manager reuse the frames retired before it began; an `OtherCpus` flush leaves them for
    /// the next complete one, since this CPU may still cache their translations. Locking: the
    /// VM's flushes are serialised; takes the VM's lock twice, briefly; never call it with the
    /// lock held.
    pub fn flush(&self, invalidation: Invalidation) -> Result<(), virt::Error> {
        let local = match invalidation {
            Invalidation::None => return Ok(()),
            // Only where the backend's fault left the faulting CPU without a stale translation
            // (an EPT violation does, SDM 29.4.3.1); an NPT fault does not, and the frame
            // behind a present entry changed: this CPU flushes too.
            Invalidation::OtherCpus if virt::FAULT_FLUSHES_FAULTING_CPU => None,
            Invalidation::OtherCpus | Invalidation::SingleContext => Some(Some(self.nested_root)),
            Invalidation::AllContexts => Some(None),
        };
        let _serial = self.flushing.lock();
        let ticket = local.map(|_| self.lock().begin_tlb_flush());
        let me = this_cpu();
        let flushed_here = match local {
            Some(root) => me.virt().and_then(|on| virt::flush_this_cpu(on, root)),
            None => Ok(()),
        };
        let others = self.ran_on.load(Ordering::SeqCst) & !(1 << me.index);
        if others != 0 {
            let cost = smp::flush_ept_on(others);
            if cost.cpus > 0 {
                SHOOTDOWNS.lock().add(cost.ticks);
            }
            self.forget_idle(others);
        }
        // Only now can no CPU reach the frames retired before the ticket.
        if let (Some(ticket), Ok(())) = (ticket, &flushed_here) {
            self.lock().end_tlb_flush(ticket);
        }
        flushed_here
    }

    /// After `flushed` CPUs flushed: those not running a vCPU of the VM now hold none of its
    /// translations and leave the set, until their next entry (which flushes first). A CPU
    /// that began a run after the look at `running_on` may have marked itself before the
    /// clear: it is marked again (no other flush can look meanwhile: flushes are serialised).
    fn forget_idle(&self, flushed: u64) {
        let idle = flushed & !self.running_on.load(Ordering::SeqCst);
        if idle == 0 {
            return;
        }
        self.ran_on.fetch_and(!idle, Ordering::SeqCst);
        let started = self.running_on.load(Ordering::SeqCst) & idle;
        if started != 0 {
            self.ran_on.fetch_or(started, Ordering::SeqCst);
        }
    }

    /// Records that the calling CPU `cpu` is about to enter a vCPU of this VM, before the
    /// entry, so that a change made after this flushes it too. A CPU that was not in the set
    /// may still cache translations from before it left it: it flushes them first.
    pub(super) fn entering_on(&self, cpu: usize) -> Result<(), virt::Error> {
        let bit = 1 << cpu;
        if self.ran_on.load(Ordering::Relaxed) & bit != 0 {
            return Ok(());
        }
        if self.ran_on.fetch_or(bit, Ordering::SeqCst) & bit != 0 {
            return Ok(());
        }
        this_cpu()
            .virt()
            .and_then(|on| virt::flush_this_cpu(on, Some(self.nested_root)))
    }

    /// The host CPUs that may cache the VM's translations (see `ran_on`).
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn cpus_to_flush(&self) -> u64 {
        self.ran_on.load(Ordering::SeqCst)
    }

    /// Adds a vCPU living on host CPU `cpu` with request word `requests`.
    /// Returns the vCPU's index in the VM (0 for the first: the bootstrap processor).
    pub(super) fn add_vcpu(&self, cpu: usize, requests: &Arc<VcpuRequests>) -> u32 {
        self.vcpus.lock().push((cpu, Arc::clone(requests)));
        self.vcpus_added.fetch_add(1, Ordering::SeqCst)
    }

    /// The vCPUs the VM has now.
    pub(super) fn vcpus_in_vm(&self) -> usize {
        self.vcpus.lock().len()
    }

    /// Removes the vCPU whose request word is `requests`.
    pub(super) fn remove_vcpu(&self, requests: &Arc<VcpuRequests>) {
        self.vcpus
            .lock()
            .retain(|(_, theirs)| !Arc::ptr_eq(theirs, requests));
    }

    /// Asks every vCPU of the VM to end its run (`VmStop::StopRequested`, resumable) and kicks
    /// the CPUs they are on; a vCPU not in a run ends its next one at once. Locking: takes the
    /// vCPU list's lock.
    #[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
    pub fn stop_all_vcpus(&self) {
        self.post_to_others(None, Request::STOP);
    }

    /// Posts `request` to every vCPU but the one whose request word is `except` and kicks the
    /// CPUs they live on, so that a vCPU in the guest exits and takes it.
    pub(super) fn post_to_others(&self, except: Option<&Arc<VcpuRequests>>, request: Request) {
        for (_, requests) in self.vcpus.lock().iter() {
            if !except.is_some_and(|except| Arc::ptr_eq(except, requests)) {
                requests.post(request);
            }
        }
        self.kick_vcpus(except);
    }

    /// Kicks the CPUs of every vCPU but the one whose request word is `except`, once each (a
    /// vCPU on this CPU is not in the guest now), so that a vCPU in the guest exits to its
    /// loop. Returns the number of kicks sent.
    fn kick_vcpus(&self, except: Option<&Arc<VcpuRequests>>) -> u64 {
        let me = this_cpu().index;
        let mut kicked = 0u64;
        for (cpu, requests) in self.vcpus.lock().iter() {
            if except.is_some_and(|except| Arc::ptr_eq(except, requests)) {
                continue;
            }
            if *cpu != me {
                kicked |= 1 << cpu;
            }
        }
        for cpu in (0..u64::BITS as usize).filter(|cpu| kicked & (1 << cpu) != 0) {
            smp::kick(cpu);
        }
        u64::from(kicked.count_ones())
    }

    /// Stops every vCPU of the VM that is in a run, runs `op`, and lets them go on: the seed's
    /// rendezvous (`VMMR3EmtRendezvous`) for changes that must not happen under a running
    /// guest (a VM reset, a migration's last round). A vCPU parks in the host before its next
    /// VM entry, outside the VM's lock, answering flush requests, with its page-modification
    /// log handed to pgm (so a harvest in `op` misses no write); vCPUs not in a run park if
    /// they start one meanwhile.
    /// Locking: call without the VM's lock (`op` may take it) and not from a vCPU's own run;
    /// rendezvous callers are serialised.
    pub fn with_vcpus_parked<R>(&self, op: impl FnOnce() -> R) -> (R, RendezvousCost) {
        let _owner = self.rendezvous_owner.lock();
        let start = ticks();
        self.rendezvous.store(true, Ordering::SeqCst);
        let mut kicks = self.kick_vcpus(None);
        let mut last_kick = ticks();
        let mut parked = self.parked.load(Ordering::SeqCst);
        while parked < self.vcpus_running() {
            if ticks() - last_kick > REKICK_TICKS {
                kicks += self.kick_vcpus(None);
                last_kick = ticks();
            }
            smp::flush_request_received();
            core::hint::spin_loop();
            parked = self.parked.load(Ordering::SeqCst);
        }
        let cost = RendezvousCost {
            parked,
            ticks_to_park: ticks() - start,
            kicks,
        };
        let result = op();
        self.rendezvous.store(false, Ordering::SeqCst);
        // Every parked vCPU leaves before another rendezvous can begin: one that has seen the
        // flag clear but is still counted would otherwise pass for parked and enter its guest.
        while self.parked.load(Ordering::SeqCst) != 0 {
            smp::flush_request_received();
            core::hint::spin_loop();
        }
        (result, cost)
    }

    /// vCPUs inside a run now.
    pub fn vcpus_running(&self) -> usize {
        // A CPU runs one vCPU at a time.
        self.running_on.load(Ordering::SeqCst).count_ones() as usize
    }

    /// True while a rendezvous asks the vCPUs to park.
    pub(super) fn rendezvous_asked(&self) -> bool {
        self.rendezvous.load(Ordering::SeqCst)
    }

    /// Called by a vCPU before each VM entry: waits while a rendezvous is under way. Returns
    /// the ticks it waited.
    pub(super) fn park_if_asked(&self) -> u64 {
        if !self.rendezvous.load(Ordering::SeqCst) {
            return 0;
        }
        let start = ticks();
        self.parked.fetch_add(1, Ordering::SeqCst);
        while self.rendezvous.load(Ordering::SeqCst) {
            // Host interrupts (kicks among them) and flush requests are served while waiting.
            idt::deliver_pending();
            smp::flush_request_received();
            core::hint::spin_loop();
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
        ticks() - start
    }

    /// Counts a vCPU on host CPU `cpu` into (`true`) or out of a run, for the rendezvous and
    /// the flush set (a CPU runs one vCPU at a time).
    pub(super) fn set_running(&self, cpu: usize, running: bool) {
        if running {
            self.running_on.fetch_or(1 << cpu, Ordering::SeqCst);
        } else {
            self.running_on.fetch_and(!(1 << cpu), Ordering::SeqCst);
        }
    }
}

impl Drop for VmMemory {
    /// Flushes every CPU that ran the VM; the manager, dropped with the fields right after,
    /// then gives back every frame its memory used.
    fn drop(&mut self) {
        let everywhere = self.ran_on.load(Ordering::SeqCst);
        if let Ok(on) = this_cpu().virt() {
            let _ = virt::flush_this_cpu(on, Some(self.nested_root));
        }
        if everywhere & !(1 << this_cpu().index) != 0 {
            smp::flush_ept_on(everywhere);
        }
    }
}
