//! Time budgets. A guest that never exits must not keep the CPU: every VM entry arms the
//! VMX-preemption timer with what is left of the run's time, so the host gets the CPU back
//! within a bounded number of ticks whatever the guest does.
//!
//! Three deadlines bound one run; the earliest arms the timer:
//! - the **slice** ([`Budget::slice`]): the run returns [`super::VmStop::Preempted`] with the
//!   guest state intact, and the next run resumes the guest where it was;
//! - the VM's **limit** ([`Budget::limit`], over all its runs): the VM is stopped with
//!   [`super::StopCause::TimeBudget`];
//! - the **host deadline** ([`set_host_deadline`]), a watchdog the host sets over a piece of
//!   work (the kernel-test harness: one per test): the VM is stopped with
//!   [`super::StopCause::HostDeadline`].
//!
//! All times are TSC ticks (deterministic in Bochs with `clock: sync=none`).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Ticks a VM may run in all by default (Bochs runs a few tens of millions of ticks per second).
pub const DEFAULT_LIMIT: u64 = 4_000_000_000;
/// Exits one run may take by default before it is stopped as runaway.
pub const DEFAULT_EXITS: u64 = 1_000_000;

/// The CPU time and exits a VM may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Ticks one call of `Vcpu::run_with` may take before it returns `Preempted`.
    pub slice: u64,
    /// Ticks the VM may take over all its runs before it is stopped with `TimeBudget`.
    pub limit: u64,
    /// Exits one run may take before it is stopped with `ExitBudget`.
    pub exits: u64,
}

impl Budget {
    /// No slice shorter than the limit: a run ends only when the guest finishes or stops, or
    /// when the limit (or the host deadline) is reached.
    pub const DEFAULT: Budget = Budget {
        slice: DEFAULT_LIMIT,
        limit: DEFAULT_LIMIT,
        exits: DEFAULT_EXITS,
    };

    /// A budget of `slice` ticks per run and `limit` ticks in all, with the default exits.
    pub const fn sliced(slice: u64, limit: u64) -> Budget {
        Budget {
            slice,
            limit,
            exits: DEFAULT_EXITS,
        }
    }
}

/// The host's deadline for the work in progress (0: none).
static HOST_DEADLINE: AtomicU64 = AtomicU64::new(0);
/// Set when a run was stopped because the host deadline passed.
static HOST_DEADLINE_HIT: AtomicBool = AtomicBool::new(false);

/// Sets (or with `None` clears) the TSC value no run may go past; returns the previous one.
/// Clears the record of an earlier deadline having been hit.
#[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
pub fn set_host_deadline(deadline: Option<u64>) -> Option<u64> {
    HOST_DEADLINE_HIT.store(false, Ordering::Relaxed);
    let previous = HOST_DEADLINE.swap(deadline.unwrap_or(0), Ordering::Relaxed);
    (previous != 0).then_some(previous)
}

/// Records that a run was stopped by the host deadline (what [`host_deadline_hit`] reports).
pub fn record_host_deadline_hit() {
    HOST_DEADLINE_HIT.store(true, Ordering::Relaxed);
}

/// True when a run was stopped by the host deadline since it was last set.
#[cfg_attr(not(feature = "kernel-tests"), allow(dead_code))]
pub fn host_deadline_hit() -> bool {
    HOST_DEADLINE_HIT.load(Ordering::Relaxed)
}

/// Which deadline a run reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// The run's slice: it is preempted, resumable.
    Slice,
    /// The VM's limit: it is stopped.
    Limit,
    /// The host's deadline: it is stopped.
    HostDeadline,
}

/// One run's deadlines, fixed when it starts.
#[derive(Clone, Copy, Debug)]
pub struct RunClock {
    slice_end: u64,
    limit_end: u64,
    host_deadline: u64,
    /// The backend timer's granularity: it counts once every 2^rate ticks.
    rate: u32,
}

impl RunClock {
    /// The deadlines of a run starting at `now` for a VM that has used `used` ticks, with a
    /// backend timer of granularity `rate` (VT-x: the preemption timer's rate, IA32_VMX_MISC).
    pub fn start(budget: &Budget, used: u64, now: u64, rate: u32) -> RunClock {
        let host_deadline = HOST_DEADLINE.load(Ordering::Relaxed);
        RunClock {
            slice_end: now.saturating_add(budget.slice),
            limit_end: now.saturating_add(budget.limit.saturating_sub(used)),
            host_deadline: if host_deadline == 0 {
                u64::MAX
            } else {
                host_deadline
            },
            rate,
        }
    }

    /// The earliest deadline.
    pub fn deadline(&self) -> u64 {
        self.slice_end.min(self.limit_end).min(self.host_deadline)
    }

    /// The deadline reached at `now`, if any; less than one timer count left counts as
    /// reached (the timer could not wait for it). The stopping deadlines come first.
    pub fn expired(&self, now: u64) -> Option<Expired> {
        let reached = |end: u64| now.saturating_add(1 << self.rate) > end;
        if reached(self.host_deadline) {
            Some(Expired::HostDeadline)
        } else if reached(self.limit_end) {
            Some(Expired::Limit)
        } else if reached(self.slice_end) {
            Some(Expired::Slice)
        } else {
            None
        }
    }
}
