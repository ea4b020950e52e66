//! The long run of the whole-API script (`make soak`): random operation sequences against the
//! simulated host, with the EPT auditor, the side-record checks and the frame accounting after
//! every step, on every core, for a given time or number of sequences. Prints the state
//! coverage (how often each operation met each state) and fails if any sequence finds a
//! problem or any operation never met a state.
//!
//! `cargo run --release -p pgm --features sim --example soak -- [--seconds N] [--cases N]`
//! (default: one hour, no case limit).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pgm::sim::script::{self, ByteSource, Coverage};

/// Longest byte string a sequence is decoded from (as the property test's).
const MAX_BYTES: usize = 400;

/// What to run: until the time is up or the cases are done, whichever comes first.
struct Limits {
    seconds: u64,
    cases: u64,
}

fn parse_args() -> Result<Limits, String> {
    let mut limits = Limits {
        seconds: 3600,
        cases: u64::MAX,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let number = value
            .parse::<u64>()
            .map_err(|_| format!("{flag}: {value:?} is not a whole number"))?;
        match flag.as_str() {
            "--seconds" => limits.seconds = number,
            "--cases" => limits.cases = number,
            _ => return Err(format!("unknown option {flag} (use --seconds N, --cases N)")),
        }
    }
    Ok(limits)
}

/// A byte string of 1 to [`MAX_BYTES`] bytes from `random`.
fn sequence(random: &mut ByteSource) -> Vec<u8> {
    let len = 1 + (random.next_u64() as usize) % MAX_BYTES;
    random.bytes(len)
}

fn main() -> ExitCode {
    let limits = match parse_args() {
        Ok(limits) => limits,
        Err(message) => {
            eprintln!("soak: {message}");
            return ExitCode::from(2);
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let deadline = Instant::now() + Duration::from_secs(limits.seconds);
    let started = Instant::now();
    let (done, failed) = (AtomicU64::new(0), AtomicBool::new(false));
    let coverage = Mutex::new(Coverage::default());
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let (done, failed, coverage) = (&done, &failed, &coverage);
            scope.spawn(move || {
                let mut random =
                    ByteSource::new(0x9E37_79B9_7F4A_7C15 ^ ((thread as u64 + 1) * 0x2545_F491_4F6C_DD1D));
                let mut mine = Coverage::default();
                while Instant::now() < deadline && !failed.load(Ordering::Relaxed) {
                    if done.fetch_add(1, Ordering::Relaxed) >= limits.cases {
                        done.fetch_sub(1, Ordering::Relaxed);
                        break;
                    }
                    let bytes = sequence(&mut random);
                    if let Err(failure) = script::run_counting(&bytes, &mut mine) {
                        failed.store(true, Ordering::Relaxed);
                        eprintln!("soak: FINDING {failure}\nsoak: sequence bytes {bytes:?}");
                    }
                }
                coverage.lock().expect("no thread panics holding it").merge(&mine);
            });
        }
    });
    let coverage = coverage.into_inner().expect("no thread panicked");
    let sequences = done.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let operations: u64 = coverage
        .counts
        .values()
        .map(|cells| {
            cells[script::State::MonitoringOn as usize] + cells[script::State::MonitoringOff as usize]
        })
        .sum();
    println!("{coverage}");
    println!(
        "soak: {sequences} sequences, {operations} operations in {elapsed:.0} s on {threads} threads ({:.0} sequences/s)",
        sequences as f64 / elapsed
    );
    let unmet = coverage.unmet();
    if !unmet.is_empty() {
        println!("soak: never met: {unmet:?}");
    }
    if failed.load(Ordering::Relaxed) || !unmet.is_empty() {
        println!("soak: 0 passed, 1 failed");
        ExitCode::FAILURE
    } else {
        println!("soak: {sequences} passed, 0 failed");
        ExitCode::SUCCESS
    }
}
