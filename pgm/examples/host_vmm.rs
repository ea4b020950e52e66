//! A minimal VMM loop on the simulated host (`cargo run -p pgm --features sim --example
//! host_vmm`): the way a hypervisor drives pgm, with the CPU played by pgm's software walker.
//!
//! A guest program of loads and stores runs one access at a time. Each access is translated
//! through the nested tables as the CPU would; a violation goes to `Pgm::resolve_fault`, and
//! the loop does what the verdict says: retry after the invalidation, emulate the access
//! through the device (MMIO) or as the seed does (a ballooned page), pause until frames are
//! back, or stop. A round of write monitoring then harvests the pages the guest wrote. Every
//! result is checked: the program exits with a failure if pgm misbehaves.

use pgm::handlers::HandlerId;
use pgm::manager::{AccessHandlers, HandlerAction};
use pgm::sim::{FlatMemory, SimFrames};
use pgm::{Access, FaultOutcome, GuestPhysAddr, Invalidation, Pgm, PgmError};

/// Host frames of the simulated machine.
const FRAMES: u64 = 2048;
/// Guest RAM: 8 MiB from 0.
const RAM: u64 = 8 << 20;
/// A UART's page of registers.
const UART: u64 = 0xFEC0_0000;
/// The frames the VM may hold at first: few, so the guest pauses once for want of memory.
const FIRST_LIMIT: u64 = 3;

/// A UART: bytes written to its data register (offset 0) are transmitted; its line-status
/// register (offset 5) says the transmitter is empty.
#[derive(Default)]
struct Uart {
    transmitted: Vec<u8>,
}

impl AccessHandlers for Uart {
    fn access(&mut self, _: HandlerId, gpa: GuestPhysAddr, access: Access, data: &mut [u8]) -> HandlerAction {
        match (gpa.as_u64() - UART, access) {
            (0, Access::Write) => self.transmitted.extend_from_slice(data),
            (5, Access::Read) => data.fill(0x60),
            (_, Access::Read) => data.fill(0),
            _ => {}
        }
        HandlerAction::Handled
    }
}

/// One step of the guest program.
#[derive(Clone, Copy)]
enum Step {
    /// Store a byte.
    Store(u64, u8),
    /// Load a byte, which must read as given.
    Load(u64, u8),
}

/// What the loop saw, for the summary.
#[derive(Debug, Default)]
struct Exits {
    resolved: u32,
    emulated: u32,
    paused: u32,
}

fn gpa(at: u64) -> GuestPhysAddr {
    GuestPhysAddr::new(at).expect("the program's addresses are guest-physical")
}

/// Carries out an invalidation: a real VMM flushes (INVEPT / TLB control) every CPU that ran
/// the VM between the two calls; frames taken from the guest wait for the end.
fn flush(pgm: &mut Pgm<SimFrames, FlatMemory>, invalidation: Invalidation) {
    if invalidation != Invalidation::None {
        let flush = pgm.begin_tlb_flush();
        pgm.end_tlb_flush(flush);
    }
}

/// Carries out an access on guest memory through the host's accessors (which route ROM writes
/// and drop writes to ballooned pages as the guest's would land).
fn access_memory(
    pgm: &mut Pgm<SimFrames, FlatMemory>,
    at: GuestPhysAddr,
    access: Access,
    data: &mut [u8],
) -> Result<(), PgmError> {
    match access {
        Access::Write => pgm.write_phys(at, data).map(|i| flush(pgm, i)),
        _ => pgm.read_phys(at, data),
    }
    .map_err(PgmError::from)
}

/// Runs one guest access of `data` at `at` as a vCPU loop does: the CPU's translation, then
/// on a violation the manager's verdict.
fn run_access(
    pgm: &mut Pgm<SimFrames, FlatMemory>,
    uart: &mut Uart,
    exits: &mut Exits,
    at: GuestPhysAddr,
    access: Access,
    data: &mut [u8],
) -> Result<(), PgmError> {
    loop {
        if pgm.translate(at, access).is_ok() {
            // The CPU reaches the frame the entry names; the host's accessors reach the same.
            return access_memory(pgm, at, access, data);
        }
        match pgm.resolve_fault(at, access) {
            FaultOutcome::Resolved { invalidation, .. } => {
                exits.resolved += 1;
                flush(pgm, invalidation);
            }
            FaultOutcome::Handler { .. } => {
                exits.emulated += 1;
                let target = pgm.mmio_target(at).expect("a handler's fault is on its page");
                return match access {
                    Access::Write => pgm.write_mmio(target, at, data, uart),
                    _ => pgm.read_mmio(target, at, data, uart),
                }
                .map_err(PgmError::from);
            }
            // Emulated as the seed does: reads see zeros, writes are dropped.
            FaultOutcome::Ballooned | FaultOutcome::WriteIgnored | FaultOutcome::EmulateWrite => {
                exits.emulated += 1;
                return access_memory(pgm, at, access, data);
            }
            // The VM pauses; the host finds memory (here: lifts the limit) and resumes it at
            // the same access.
            FaultOutcome::OutOfMemory => {
                exits.paused += 1;
                pgm.set_frame_limit(None);
            }
            FaultOutcome::NotGuestMemory => panic!("the guest left its memory at {at}"),
        }
    }
}

fn run(
    pgm: &mut Pgm<SimFrames, FlatMemory>,
    uart: &mut Uart,
    exits: &mut Exits,
    program: &[Step],
) -> Result<(), PgmError> {
    for &step in program {
        match step {
            Step::Store(at, byte) => run_access(pgm, uart, exits, gpa(at), Access::Write, &mut [byte])?,
            Step::Load(at, expected) => {
                let mut byte = [0];
                run_access(pgm, uart, exits, gpa(at), Access::Read, &mut byte)?;
                assert_eq!(byte[0], expected, "the guest's load at {at:#x}");
            }
        }
    }
    Ok(())
}

fn main() -> Result<(), PgmError> {
    let mut pgm = Pgm::new(SimFrames::new(FRAMES), FlatMemory::new(FRAMES))?;
    pgm.register_ram(gpa(0), RAM, "ram")?;
    let (_uart, invalidation) = pgm.register_mmio(gpa(UART), 0x1000)?;
    flush(&mut pgm, invalidation);
    pgm.set_frame_limit(Some(FIRST_LIMIT));
    let (mut uart, mut exits) = (Uart::default(), Exits::default());

    // Five pages written (the fourth finds the VM at its limit), read back, "hi" sent to the
    // UART once its line status says it can take it.
    let mut program: Vec<Step> = (0..5)
        .map(|page| Step::Store(page * 0x1000 + 0x10, b'a' + page as u8))
        .collect();
    program.extend((0..5).map(|page| Step::Load(page * 0x1000 + 0x10, b'a' + page as u8)));
    program.extend([
        Step::Load(UART + 5, 0x60),
        Step::Store(UART, b'h'),
        Step::Store(UART, b'i'),
    ]);
    run(&mut pgm, &mut uart, &mut exits, &program)?;
    assert_eq!(uart.transmitted, b"hi", "what the UART sent");
    assert_eq!(exits.paused, 1, "pauses for want of frames");

    // The guest gives page 2 to the balloon: it reads as zeros and drops writes from then on.
    let invalidation = pgm.balloon_inflate(&[gpa(0x2000)])?;
    flush(&mut pgm, invalidation);
    run(
        &mut pgm,
        &mut uart,
        &mut exits,
        &[Step::Store(0x2010, b'z'), Step::Load(0x2010, 0)],
    )?;

    // A round of write monitoring: the harvest names exactly the pages written since.
    let invalidation = pgm.start_write_monitoring();
    flush(&mut pgm, invalidation);
    run(
        &mut pgm,
        &mut uart,
        &mut exits,
        &[
            Step::Store(0x3000, 1),
            Step::Load(0x4010, b'e'),
            Step::Store(0x6000, 2),
        ],
    )?;
    let mut written = Vec::new();
    let invalidation = pgm.harvest_written(&mut written);
    flush(&mut pgm, invalidation);
    let invalidation = pgm.stop_write_monitoring();
    flush(&mut pgm, invalidation);
    assert_eq!(written, [gpa(0x3000), gpa(0x6000)], "the harvest");

    // Every nested-paging leaf maps a frame this VM holds and the host has lent out.
    let report = pgm.audit(|frame| pgm.frames().inner.is_allocated(frame));
    assert!(report.is_clean(), "the auditor's findings: {:?}", report.findings);
    println!(
        "host_vmm: {exits:?}; UART sent {:?}; harvest {written:?}; {} private frames; audit clean",
        String::from_utf8_lossy(&uart.transmitted),
        pgm.stats().private_frames()
    );
    Ok(())
}
