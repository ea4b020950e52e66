//! Kernel-level tests: one boot runs them all on the emulated VT-x CPU. Each prints
//! `test NAME ... ok (T ticks)` or `test NAME ... FAILED: reason (T ticks)`; the run ends with
//! `N passed, N failed` and stops the emulator. Every test must give back every host frame it
//! took: the harness fails a test that leaks. Every test has a budget of [`TEST_BUDGET`] ticks:
//! it is the host deadline of every VM the test runs, so a guest that would run for ever is
//! stopped there and the harness fails that test by name and goes on.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use pgm::page::PageState;

use pgm::{Access, GuestPhysAddr, PgmError, RamError, RangeError, PAGE_SIZE};
use spin::Mutex;

use crate::arch::guests::{programs, GuestProgram};
use crate::arch::memory::{frame_counts, frames_in_use_outside_heap, heap_stats};
use crate::arch::power::{exit, ExitCode};
use crate::arch::registers::GuestRegisters;
use crate::arch::ticks;
use crate::vm::budget::{host_deadline_hit, set_host_deadline};
use crate::vm::{
    exit_costs_of_finished_vms, hypercall, overrun_of_finished_vms, shootdown_costs, Diagnostic, StopCause,
    Vcpu, VmError, VmStop,
};
use crate::{println, Host};

type TestResult = Result<(), String>;
type TestFn = fn(&'static Host) -> TestResult;

/// Ticks each test may take (the slowest takes about a tenth of this).
const TEST_BUDGET: u64 = 1_500_000_000 * backend::TICK_SCALE;
/// Guest RAM of most tests: 640 KiB low memory and 15 MiB from 1 MiB up.
const PC_RAM: [(u64, u64); 2] = [(0, 0xA_0000), (0x10_0000, 0xF0_0000)];
/// Where test programs are loaded and entered (the stack grows down from just below).
const CODE: u64 = 0x8000;
const TESTS: &[(&str, TestFn)] = &[
    ("virtualization_capabilities_reported", backend::capabilities),
    ("guest_returns_through_vmcall", guest_returns_through_vmcall),
    (
        "real_mode_guest_runs_and_reports",
        real_mode_guest_runs_and_reports,
    ),
    (
        "writing_n_pages_allocates_n_frames_and_host_sees_data",
        writing_n_pages_allocates_n_frames,
    ),
    (
        "untouched_ram_reads_zero_without_allocating",
        untouched_ram_reads_zero_without_allocating,
    ),
    (
        "large_pages_fill_each_block_with_one_fault",
        large_pages_fill_each_block_with_one_fault,
    ),
    (
        "cpu_permissions_match_the_software_walker",
        cpu_permissions_match_the_software_walker,
    ),
    (
        "access_outside_ram_stops_the_vm_with_a_diagnostic",
        access_outside_ram_stops_the_vm,
    ),
    ("hlt_stops_the_vm", hlt_stops_the_vm),
    (
        "triple_fault_stops_the_vm_not_the_host",
        triple_fault_stops_the_vm,
    ),
    (
        "unhandled_exit_stops_the_vm_with_a_diagnostic",
        unhandled_exit_stops_the_vm,
    ),
    (
        "unknown_hypercall_returns_an_error_to_the_guest",
        unknown_hypercall_returns_an_error,
    ),
    (
        "bad_ram_layout_is_refused_without_leaking",
        bad_ram_layout_is_refused_without_leaking,
    ),
    (
        "heap_grows_for_a_large_guest_and_shrinks_when_it_goes",
        heap_grows_for_a_large_guest_and_shrinks_when_it_goes,
    ),
    (
        "mmio_instruction_forms_in_protected_mode",
        violations::mmio_forms_in_protected_mode,
    ),
    (
        "mmio_instruction_forms_in_long_mode_through_guest_paging",
        violations::mmio_forms_in_long_mode_through_guest_paging,
    ),
    (
        "mmio_loop_reuses_its_lookups_until_the_code_or_the_device_moves",
        violations::mmio_loop_reuses_its_lookups_until_the_code_or_the_device_moves,
    ),
    (
        "mmio_instruction_forms_in_real_mode",
        violations::mmio_forms_in_real_mode,
    ),
    (
        "unsupported_mmio_instruction_stops_the_vm_naming_its_bytes",
        violations::unsupported_mmio_instruction_stops_the_vm,
    ),
    (
        "an_emulated_write_the_guest_tables_refuse_is_its_page_fault",
        violations::an_emulated_write_the_guest_tables_refuse_is_its_page_fault,
    ),
    (
        "mmio_access_crossing_a_page_is_emulated_in_both_halves",
        violations::mmio_access_crossing_a_page_is_emulated_in_both_halves,
    ),
    (
        "an_exit_carrying_the_hosts_own_state_stops_the_vm",
        violations::an_exit_carrying_the_hosts_own_state_stops_the_vm,
    ),
    (
        "executing_from_mmio_stops_the_vm",
        violations::executing_from_mmio_stops_the_vm,
    ),
    (
        "first_write_to_a_zero_page_allocates_once",
        violations::first_write_to_a_zero_page_allocates_once,
    ),
    (
        "rom_reads_the_image_and_ignores_writes",
        violations::rom_reads_the_image_and_ignores_writes,
    ),
    (
        "rom_protection_modes_route_reads_and_writes",
        violations::rom_protection_modes_route_reads_and_writes,
    ),
    (
        "mmio2_dirty_tracking_reports_exactly_the_written_pages",
        violations::mmio2_dirty_tracking_reports_exactly_the_written_pages,
    ),
    (
        "write_monitoring_keeps_a_mirror_in_step",
        violations::write_monitoring_keeps_a_mirror_in_step,
    ),
    (
        "balloon_frees_frames_and_deflate_restores_pages",
        violations::balloon_frees_frames_and_deflate_restores_pages,
    ),
    (
        "large_pages_split_for_a_handler_and_merge_back",
        violations::large_pages_split_for_a_handler_and_merge_back,
    ),
    (
        "a20_gate_wraps_accesses_at_one_megabyte",
        violations::a20_gate_wraps_accesses_at_one_megabyte,
    ),
    (
        "out_of_frames_pauses_only_that_vm_until_frames_are_back",
        violations::out_of_frames_pauses_only_that_vm_until_frames_are_back,
    ),
    (
        "spinning_real_mode_guest_is_preempted_then_stopped",
        preemption::spinning_real_mode_guest_is_preempted_then_stopped,
    ),
    (
        "spinning_protected_mode_guest_is_preempted_then_stopped",
        preemption::spinning_protected_mode_guest_is_preempted_then_stopped,
    ),
    (
        "spinning_long_mode_guest_is_preempted_then_stopped",
        preemption::spinning_long_mode_guest_is_preempted_then_stopped,
    ),
    (
        "counting_guest_preempted_100_times_ends_with_the_exact_count",
        preemption::counting_guest_preempted_100_times_ends_with_the_exact_count,
    ),
    (
        "hlt_with_interrupts_off_ends_the_run_at_once",
        preemption::hlt_with_interrupts_off_ends_the_run_at_once,
    ),
    (
        "rep_stosb_longer_than_its_budget_is_preempted_then_stopped",
        preemption::rep_stosb_longer_than_its_budget_is_preempted_then_stopped,
    ),
    (
        "pause_loop_yields_and_is_stopped_at_its_limit",
        preemption::pause_loop_yields_and_is_stopped_at_its_limit,
    ),
    (
        "monitor_mwait_loop_is_bounded_by_its_budget",
        preemption::monitor_mwait_loop_is_bounded_by_its_budget,
    ),
    (
        "host_timer_kicks_a_running_vcpu",
        preemption::host_timer_kicks_a_running_vcpu,
    ),
    (
        "a_kick_is_taken_by_the_end_of_the_slice_at_the_latest",
        preemption::a_kick_is_taken_by_the_end_of_the_slice_at_the_latest,
    ),
    (
        "a_test_that_outlives_its_budget_is_failed_and_the_run_goes_on",
        preemption::a_test_that_outlives_its_budget_is_failed_and_the_run_goes_on,
    ),
    (
        "random_instruction_bytes_end_within_budget",
        preemption::random_instruction_bytes_end_within_budget,
    ),
    (
        "a_guest_executes_from_shadowed_rom_over_ram",
        fidelity::a_guest_executes_from_shadowed_rom_over_ram,
    ),
    (
        "an_mmio2_framebuffer_mapped_over_ram_and_unmapped_again",
        fidelity::an_mmio2_framebuffer_mapped_over_ram_and_unmapped_again,
    ),
    (
        "a_reset_in_the_middle_of_a_run_clears_ram_and_restores_rom",
        fidelity::a_reset_in_the_middle_of_a_run_clears_ram_and_restores_rom,
    ),
    ("smp_every_cpu_runs_a_guest", smp::every_cpu_runs_a_guest),
    (
        "smp_a_vcpu_refuses_to_run_on_another_cpu",
        smp::a_vcpu_refuses_to_run_on_another_cpu,
    ),
    (
        "smp_two_vcpus_writing_one_zero_page_at_once_get_one_frame",
        smp::two_vcpus_writing_one_zero_page_at_once_get_one_frame,
    ),
    (
        "smp_a_ballooned_frame_stays_out_of_the_allocator_until_the_other_cpu_flushed",
        smp::a_ballooned_frame_stays_out_of_the_allocator_until_the_other_cpu_flushed,
    ),
    (
        "smp_a_triple_fault_in_one_vcpu_stops_the_other",
        smp::a_triple_fault_in_one_vcpu_stops_the_other,
    ),
    (
        "smp_mmio_from_two_vcpus_reaches_the_device_once_each",
        smp::mmio_from_two_vcpus_reaches_the_device_once_each,
    ),
    (
        "dirty_log_pml_harvests_equal_write_protect_harvests",
        dirty_log::pml_harvests_equal_write_protect_harvests,
    ),
    (
        "migration_a_guest_moved_mid_run_ends_as_it_would_have",
        migration::a_guest_moved_mid_run_ends_as_it_would_have,
    ),
    (
        "smp_dirty_log_with_the_writer_on_another_cpu",
        smp::dirty_log_with_the_writer_on_another_cpu,
    ),
    (
        "smp_dirty_log_with_two_writers_and_a_balloon",
        smp::dirty_log_with_two_writers_and_a_balloon,
    ),
    (
        "smp_reset_of_a_two_vcpu_vm_parks_both_and_they_run_on",
        smp::reset_of_a_two_vcpu_vm_parks_both_and_they_run_on,
    ),
    (
        "smp_an_a20_change_by_one_vcpu_reaches_the_other_cpu",
        smp::an_a20_change_by_one_vcpu_reaches_the_other_cpu,
    ),
    (
        "smp_a_cpu_that_left_the_vm_is_flushed_once",
        smp::a_cpu_that_left_the_vm_is_flushed_once,
    ),
    (
        "devices_cpuid_msrs_and_ports_behave_as_the_policy_and_devices_say",
        devices::cpuid_msrs_and_ports_behave_as_the_policy_and_devices_say,
    ),
    (
        "devices_string_port_io_moves_each_element_between_memory_and_the_port",
        devices::string_port_io_moves_each_element_between_memory_and_the_port,
    ),
    (
        "devices_syscall_outside_64_bit_code_is_emulated_for_an_amd_guest",
        devices::syscall_outside_64_bit_code_is_emulated_for_an_amd_guest,
    ),
    (
        "devices_vector_registers_stay_with_their_vm",
        devices::vector_registers_stay_with_their_vm,
    ),
    (
        "devices_the_pit_interrupts_a_halted_guest_through_the_pic",
        devices::the_pit_interrupts_a_halted_guest_through_the_pic,
    ),
    (
        "devices_the_local_apic_timer_and_self_ipis_interrupt_the_guest",
        devices::the_local_apic_timer_and_self_ipis_interrupt_the_guest,
    ),
    (
        "smp_init_and_startup_ipis_start_an_application_processor",
        smp::init_and_startup_ipis_start_an_application_processor,
    ),
    (
        "devices_a_multiboot_image_starts_with_its_boot_information",
        devices::a_multiboot_image_starts_with_its_boot_information,
    ),
    (
        "devices_tsc_adjust_moves_with_the_tsc",
        devices::tsc_adjust_moves_with_the_tsc,
    ),
    (
        "devices_a_linux_bzimage_starts_at_its_64_bit_entry",
        devices::a_linux_bzimage_starts_at_its_64_bit_entry,
    ),
    (
        "devices_unassigned_space_reads_all_ones_on_a_pc",
        devices::unassigned_space_reads_all_ones_on_a_pc,
    ),
    (
        "hostile_a20_gate_flipped_through_port_0x92_while_writing_across_1_mib",
        hostile::a20_gate_flipped_through_port_0x92_while_writing_across_1_mib,
    ),
    (
        "hostile_probing_every_page_and_random_addresses_reaches_nothing_else",
        hostile::probing_every_page_and_random_addresses_reaches_nothing_else,
    ),
    (
        "hostile_random_bytes_run_against_mmio",
        hostile::random_bytes_run_against_mmio,
    ),
    (
        "hostile_page_tables_in_mmio_or_a_ballooned_page_stop_the_vm",
        hostile::page_tables_in_mmio_or_a_ballooned_page_stop_the_vm,
    ),
    (
        "hostile_an_instruction_rewritten_while_emulated_runs_as_fetched",
        hostile::an_instruction_rewritten_while_emulated_runs_as_fetched,
    ),
];

static CURRENT: Mutex<Option<&'static str>> = Mutex::new(None);
static PASSED: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);
static SKIPPED: AtomicUsize = AtomicUsize::new(0);

/// Runs every test, prints the closing line and stops the emulator.
pub fn run_all(host: &'static Host) -> ! {
    // Substring filters fixed at build time (`KERNEL_TESTS=mmio,balloon cargo xtask run
    // --test`: a test runs when its name holds one of them), for measuring or debugging a few
    // tests without the whole run.
    let filter = option_env!("KERNEL_TESTS").unwrap_or("");
    let selected = || {
        TESTS
            .iter()
            .filter(|(name, _)| filter.split(',').any(|part| name.contains(part)))
    };
    match filter {
        "" => println!("running {} kernel tests", TESTS.len()),
        _ => println!(
            "running {} of {} kernel tests (KERNEL_TESTS={filter})",
            selected().count(),
            TESTS.len()
        ),
    }
    for &(name, test) in selected() {
        if let Some(reason) = backend::skipped(name) {
            SKIPPED.fetch_add(1, Ordering::Relaxed);
            println!("test {name} ... skipped: {reason}");
            continue;
        }
        let start = ticks();
        let result = run_one(host, name, test, TEST_BUDGET);
        let elapsed = ticks() - start;
        match result {
            Ok(()) => {
                PASSED.fetch_add(1, Ordering::Relaxed);
                println!("test {name} ... ok ({elapsed} ticks)");
            }
            Err(reason) => {
                FAILED.fetch_add(1, Ordering::Relaxed);
                println!("test {name} ... FAILED: {reason} ({elapsed} ticks)");
            }
        }
    }
    exit_costs_of_finished_vms().print("every VM of the test run");
    let (clears, clear_ticks) = crate::arch::memory::frame_clears();
    let zero_fill = exit_costs_of_finished_vms().of(crate::vm::exits::ExitKind::ZeroFill);
    let clear_mean = clear_ticks.checked_div(clears).unwrap_or(0);
    println!(
        "4 KiB frame clears: {clears}, ticks mean {clear_mean}; zero-fill exits without their \
         clear: mean {} (with it {})",
        zero_fill.mean().saturating_sub(clear_mean),
        zero_fill.mean()
    );
    let shootdowns = shootdown_costs();
    println!(
        "TLB shootdowns (IPI to the last CPU's flush): {}, ticks mean {}, max {}",
        shootdowns.count,
        shootdowns.mean(),
        shootdowns.max
    );
    let overrun = overrun_of_finished_vms();
    println!(
        "time budgets: {} runs ended at a deadline, ticks past it: mean {}, max {}",
        overrun.count,
        overrun.mean(),
        overrun.max
    );
    let failed = print_summary();
    if failed == 0 {
        exit(ExitCode::Success, "")
    } else {
        exit(ExitCode::Failure, &format!("{failed} kernel test(s) failed"))
    }
}

/// Reports the running test as failed by `reason` and prints the closing line (the host
/// cannot go on after a panic or a host exception).
pub fn report_abort(reason: &str) {
    let current = CURRENT.try_lock().and_then(|current| *current);
    if let Some(name) = current {
        FAILED.fetch_add(1, Ordering::Relaxed);
        println!("test {name} ... FAILED: {reason}");
        print_summary();
    }
}

/// Runs one test under `name` with `budget` ticks as the host deadline of its VMs: fails it
/// when a VM had to be stopped at that deadline, or when it leaves host frames allocated.
/// Restores the deadline and the running test's name it found (tests may nest).
fn run_one(host: &'static Host, name: &'static str, test: TestFn, budget: u64) -> TestResult {
    let outer_name = CURRENT.lock().replace(name);
    let frames_before = frames_in_use_outside_heap();
    let outer_deadline = set_host_deadline(Some(ticks() + budget));
    let mut result = test(host);
    let out_of_time = host_deadline_hit();
    set_host_deadline(outer_deadline);
    *CURRENT.lock() = outer_name;
    let leaked = frames_in_use_outside_heap() as i64 - frames_before as i64;
    if out_of_time {
        let detail = result.err().map(|e| format!(" ({e})")).unwrap_or_default();
        result = Err(format!(
            "did not finish within its budget of {budget} ticks: a guest was stopped at the \
             deadline{detail}"
        ));
    } else if result.is_ok() && leaked != 0 {
        result = Err(format!("host frames in use changed by {leaked} (leak)"));
    }
    result
}

fn print_summary() -> usize {
    let (passed, failed) = (PASSED.load(Ordering::Relaxed), FAILED.load(Ordering::Relaxed));
    let skipped = SKIPPED.load(Ordering::Relaxed);
    if skipped > 0 {
        println!("{skipped} skipped on this backend (reasons above)");
    }
    println!("{passed} passed, {failed} failed");
    failed
}

/// Fails the test with a formatted message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(format!($($arg)*));
        }
    };
}

/// Fails the test unless `left == right`, showing both.
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $what:literal) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(format!(
                concat!($what, ": got {:x?}, expected {:x?}"),
                left, right
            ));
        }
    }};
}

// After the macros: the scenario modules use them.
mod backend;
mod devices;
mod dirty_log;
mod fidelity;
mod hostile;
mod migration;
mod pc;
mod preemption;
mod smp;
mod violations;

fn new_vm(host: &'static Host, ram: &[(u64, u64)]) -> Result<Vcpu<'static>, String> {
    let vmx = host.virt().map_err(|e| format!("{e}"))?;
    // 4 KiB pages: the tests count pages, frames and faults one by one (large pages, the
    // default, have a test of their own).
    Vcpu::new_with(vmx, &host.phys, ram, false).map_err(|e| format!("VM creation: {e}"))
}

/// Creates a PC-like VM, loads `program` at [`CODE`] with `regs` and runs it to its stop.
fn run_program(
    host: &'static Host,
    program: GuestProgram<'_>,
    regs: GuestRegisters,
) -> Result<(Vcpu<'static>, VmStop), String> {
    let mut vm = new_vm(host, &PC_RAM)?;
    vm.start(&program, CODE, regs)
        .map_err(|e| format!("start {}: {e}", program.name))?;
    let stop = vm.run();
    Ok((vm, stop))
}

/// The diagnostic of a VM the hypervisor stopped (printed for the log), or an error naming how
/// the run ended instead.
fn stopped(stop: VmStop) -> Result<Diagnostic, String> {
    let VmStop::Stopped(diagnostic) = stop else {
        return Err(format!("the VM was not stopped: {stop:?}"));
    };
    println!("  {diagnostic}");
    Ok(diagnostic)
}

/// A small xorshift generator: the tests' "random" pages and programs, reproducible.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A value below `bound`.
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

fn gpa(addr: u64) -> GuestPhysAddr {
    GuestPhysAddr::new_truncate(addr)
}

fn guest_returns_through_vmcall(host: &'static Host) -> TestResult {
    let (vm, stop) = run_program(host, programs::done(), GuestRegisters::default())?;
    ensure_eq!(stop, VmStop::Done(0x600D_F00D), "stop");
    ensure_eq!(vm.exits.hypercalls, 1, "hypercalls");
    Ok(())
}

fn real_mode_guest_runs_and_reports(host: &'static Host) -> TestResult {
    let (vm, stop) = run_program(host, programs::real_mode(), GuestRegisters::default())?;
    ensure_eq!(stop, VmStop::Done(0x1234), "stop");
    ensure_eq!(vm.reports, [0x5A5A], "reports");
    let mut word = [0u8; 2];
    vm.pgm()
        .read_phys(gpa(0x600), &mut word)
        .map_err(|e| format!("{e}"))?;
    ensure_eq!(
        u16::from_le_bytes(word),
        0x1234,
        "guest word at 0x600 seen by the host"
    );
    Ok(())
}

fn writing_n_pages_allocates_n_frames(host: &'static Host) -> TestResult {
    const PAGES: u64 = 40;
    const BASE: u64 = 0x40_0000;
    const STRIDE: u64 = 2 * PAGE_SIZE;
    const FIRST_VALUE: u64 = 0xC0DE_0000;
    let mut vm = new_vm(host, &PC_RAM)?;
    let regs = GuestRegisters {
        rsi: BASE,
        rcx: PAGES,
        rdx: STRIDE,
        rdi: FIRST_VALUE,
        ..Default::default()
    };
    vm.start(&programs::write_pages(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    let (stats_before, used_before) = (vm.stats(), frames_in_use_outside_heap());
    let stop = vm.run();
    ensure_eq!(stop, VmStop::Done(0), "stop");
    let stats = vm.stats();
    ensure_eq!(
        stats.private_allocations - stats_before.private_allocations,
        PAGES,
        "frames given to pages"
    );
    // The handy pool takes frames from the host in batches, so host and VM counts move
    // together but not one by one: check they agree.
    ensure_eq!(
        frames_in_use_outside_heap() - used_before,
        stats.host_frames() - stats_before.host_frames(),
        "host allocator frames vs the VM's accounting"
    );
    ensure_eq!(vm.exits.ept_violations, PAGES, "EPT violations");
    ensure_eq!(
        vm.stats().allocated_pages,
        PAGES + 1,
        "allocated pages (the code page too)"
    );
    for i in 0..PAGES {
        let at = gpa(BASE + i * STRIDE);
        let mut value = [0u8; 4];
        vm.pgm().read_phys(at, &mut value).map_err(|e| format!("{e}"))?;
        ensure_eq!(
            u64::from(u32::from_le_bytes(value)),
            FIRST_VALUE + i,
            "value the host reads"
        );
        let page = vm.pgm().page(at).ok_or("page vanished")?;
        ensure_eq!(page.state(), PageState::Allocated, "page state");
    }
    Ok(())
}

/// Large pages, the default: RAM's whole 2 MiB blocks are mapped on the zero chunk without page
/// tables, and a guest writing every page of them takes one fault per block (a 2 MiB fill).
fn large_pages_fill_each_block_with_one_fault(host: &'static Host) -> TestResult {
    const FIRST: u64 = 0x20_0000;
    const PAGES: u64 = (0x100_0000 - FIRST) / PAGE_SIZE;
    let vmx = host.virt().map_err(|e| format!("{e}"))?;
    let mut vm = Vcpu::new(vmx, &host.phys, &PC_RAM).map_err(|e| format!("VM creation: {e}"))?;
    let before = vm.stats();
    ensure_eq!(before.zero_chunk_frames, 512, "zero chunk frames");
    let regs = GuestRegisters {
        rsi: FIRST,
        rcx: PAGES,
        rdx: PAGE_SIZE,
        rdi: 0x1A46_0000,
        ..Default::default()
    };
    vm.start(&programs::write_pages(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    let violations = vm.exits.ept_violations;
    ensure_eq!(vm.run(), VmStop::Done(0), "stop");
    let stats = vm.stats();
    ensure_eq!(vm.exits.ept_violations - violations, PAGES / 512, "write faults");
    ensure_eq!(stats.table_frames, before.table_frames, "EPT table frames");
    for page in [0, 511, 512, PAGES - 1] {
        let mut value = [0u8; 4];
        vm.pgm()
            .read_phys(gpa(FIRST + page * PAGE_SIZE), &mut value)
            .map_err(|e| format!("{e}"))?;
        ensure_eq!(
            u64::from(u32::from_le_bytes(value)),
            0x1A46_0000 + page,
            "value written"
        );
    }
    crate::println!(
        "  {PAGES} pages written in {} faults; EPT tables {} frames, zero chunk {} frames",
        PAGES / 512,
        stats.table_frames,
        stats.zero_chunk_frames
    );
    hostile::audit_memory(&vm.memory(), "the large fills")
}

fn untouched_ram_reads_zero_without_allocating(host: &'static Host) -> TestResult {
    const PAGES: u64 = 100;
    const BASE: u64 = 0x80_0000;
    let mut vm = new_vm(host, &PC_RAM)?;
    let regs = GuestRegisters {
        rsi: BASE,
        rcx: PAGES,
        rdx: PAGE_SIZE,
        ..Default::default()
    };
    vm.start(&programs::read_pages(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    let allocations_before = frame_counts().allocations;
    let stop = vm.run();
    ensure_eq!(stop, VmStop::Done(0), "OR of every dword read");
    ensure_eq!(
        frame_counts().allocations,
        allocations_before,
        "frame allocations"
    );
    ensure_eq!(vm.exits.ept_violations, 0, "EPT violations");
    for i in 0..PAGES {
        let page = vm.pgm().page(gpa(BASE + i * PAGE_SIZE)).ok_or("page vanished")?;
        ensure_eq!(page.state(), PageState::Zero, "page state");
    }
    Ok(())
}

/// The CPU reports in the exit qualification what the EPT entry allowed; pgm's software walker
/// must predict exactly that for every page, before the guest touches it.
fn cpu_permissions_match_the_software_walker(host: &'static Host) -> TestResult {
    const PAGES: u64 = 8;
    const BASE: u64 = 0x20_0000;
    let mut vm = new_vm(host, &PC_RAM)?;
    let regs = GuestRegisters {
        rsi: BASE,
        rcx: PAGES,
        rdx: PAGE_SIZE,
        rdi: 1,
        ..Default::default()
    };
    vm.start(&programs::write_pages(), CODE, regs)
        .map_err(|e| format!("{e}"))?;
    let mut predicted = Vec::new();
    for i in 0..PAGES {
        match vm.pgm().translate(gpa(BASE + i * PAGE_SIZE), Access::Write) {
            Ok(hpa) => return Err(format!("walker lets the guest write a ZERO page (to {hpa})")),
            Err(violation) => predicted.push((violation.gpa, violation.permitted)),
        }
    }
    ensure_eq!(vm.run(), VmStop::Done(0), "stop");
    let observed: Vec<_> = vm
        .violations
        .iter()
        .map(|&(gpa, detail)| (gpa, backend::permitted(detail)))
        .collect();
    ensure_eq!(
        observed,
        predicted,
        "(GPA, permitted) per violation, CPU vs walker"
    );
    ensure!(
        vm.violations.iter().all(|&(_, detail)| backend::is_write(detail)),
        "a violation was not reported as a write"
    );
    Ok(())
}

fn access_outside_ram_stops_the_vm(host: &'static Host) -> TestResult {
    const OUTSIDE: u64 = 0x4000_0000;
    let regs = GuestRegisters {
        rsi: OUTSIDE,
        ..Default::default()
    };
    let (vm, stop) = run_program(host, programs::load(), regs)?;
    let diagnostic = stopped(stop)?;
    ensure_eq!(diagnostic.cause, StopCause::NotGuestMemory, "cause");
    ensure_eq!(diagnostic.exit_reason, backend::NESTED_FAULT, "exit reason");
    ensure_eq!(diagnostic.gpa, Some(gpa(OUTSIDE)), "guest-physical address");
    ensure_eq!(diagnostic.rip, CODE, "RIP of the faulting load");
    ensure!(
        backend::is_read_of_nothing(diagnostic.qualification),
        "not a read with nothing permitted: {:#x}",
        diagnostic.qualification
    );
    ensure_eq!(
        vm.stats().allocated_pages,
        1,
        "allocated pages (only the code page)"
    );
    Ok(())
}

fn hlt_stops_the_vm(host: &'static Host) -> TestResult {
    let (_, stop) = run_program(host, programs::halt(), GuestRegisters::default())?;
    // HLT exits are fault-like: RIP still names the HLT.
    ensure_eq!(stop, VmStop::Halted { rip: CODE }, "stop");
    Ok(())
}

fn triple_fault_stops_the_vm(host: &'static Host) -> TestResult {
    let (_, stop) = run_program(host, programs::triple_fault(), GuestRegisters::default())?;
    let diagnostic = stopped(stop)?;
    ensure_eq!(diagnostic.cause, StopCause::TripleFault, "cause");
    ensure_eq!(diagnostic.exit_reason, backend::SHUTDOWN, "exit reason");
    Ok(())
}

/// INVD exits unconditionally and no policy handles it: the VM stops with a diagnostic that
/// names the exit and the instruction's address.
fn unhandled_exit_stops_the_vm(host: &'static Host) -> TestResult {
    let (_, stop) = run_program(host, programs::invd(), GuestRegisters::default())?;
    let diagnostic = stopped(stop)?;
    ensure_eq!(diagnostic.cause, StopCause::UnhandledExit, "cause");
    ensure_eq!(diagnostic.exit_reason, backend::INVD, "exit reason");
    ensure_eq!(diagnostic.rip, CODE + 2, "RIP of the INVD (after the 2-byte MOV)");
    Ok(())
}

fn unknown_hypercall_returns_an_error(host: &'static Host) -> TestResult {
    let (vm, stop) = run_program(host, programs::bad_hypercall(), GuestRegisters::default())?;
    let VmStop::Done(value) = stop else {
        return Err(format!("the guest did not finish: {stop:?}"));
    };
    ensure_eq!(
        value & 0xFFFF_FFFF,
        hypercall::UNKNOWN & 0xFFFF_FFFF,
        "RAX after an unknown hypercall"
    );
    ensure_eq!(vm.exits.hypercalls, 2, "hypercalls");
    Ok(())
}

fn bad_ram_layout_is_refused_without_leaking(host: &'static Host) -> TestResult {
    let cases: [(&[(u64, u64)], RangeError); 3] = [
        (
            &[(0, 0x10_0000), (0xF_F000, 0x2000)],
            RangeError::Overlap { existing: gpa(0) },
        ),
        (&[(0x1000, 0x1800)], RangeError::Misaligned(0x1800)),
        (&[(0x10_0000, 0)], RangeError::ZeroSize(gpa(0x10_0000))),
    ];
    for (ram, expected) in cases {
        let used = frames_in_use_outside_heap();
        let vmx = host.virt().map_err(|e| format!("{e}"))?;
        match Vcpu::new(vmx, &host.phys, ram) {
            Err(VmError::Memory(error)) => {
                ensure_eq!(error, PgmError::Ram(RamError::Range(expected)), "error")
            }
            Err(other) => return Err(format!("wrong error for {ram:x?}: {other}")),
            Ok(_) => return Err(format!("layout {ram:x?} was accepted")),
        }
        ensure_eq!(
            frames_in_use_outside_heap(),
            used,
            "host frames in use after the refusal"
        );
    }
    Ok(())
}

/// A VM whose page descriptors outgrow the heap's 8 MiB seed (6 GiB of RAM, 12 MiB of
/// descriptors) gets them from heap chunks of host frames, and its destruction gives the chunks
/// back to the frame allocator, all but one 2 MiB spare.
fn heap_grows_for_a_large_guest_and_shrinks_when_it_goes(host: &'static Host) -> TestResult {
    const GIB: u64 = 1 << 30;
    const MIB: usize = 1 << 20;
    let ram = [
        (0, 0xA_0000),
        (0x10_0000, 3 * GIB - 0x10_0000),
        (4 * GIB, 3 * GIB),
    ];
    let before = heap_stats();
    let vm = new_vm(host, &ram)?;
    let grown = heap_stats();
    ensure!(
        grown.chunk_bytes >= before.chunk_bytes + 6 * MIB,
        "the heap did not grow for 6 GiB of descriptors: {before:?} -> {grown:?}"
    );
    let mut top = [0xFFu8; 8];
    vm.pgm()
        .read_phys(gpa(7 * GIB - 8), &mut top)
        .map_err(|e| format!("reading the last RAM page: {e}"))?;
    ensure_eq!(top, [0u8; 8], "the last RAM page (never written)");
    let frames_with_vm = frame_counts().used();
    drop(vm);
    let after = heap_stats();
    ensure!(
        after.chunk_bytes <= heap::CHUNK_GRAIN && after.returns > grown.returns,
        "the chunks were not given back: {grown:?} -> {after:?}"
    );
    let returned = ((grown.chunk_bytes - after.chunk_bytes) / MIB) as u64 * 256;
    ensure!(
        frame_counts().used() + returned <= frames_with_vm,
        "the frame allocator did not get the chunks' {returned} frames back"
    );
    Ok(())
}
