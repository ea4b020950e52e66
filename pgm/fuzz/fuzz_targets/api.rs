//! The whole pgm API driven from the fuzzer's bytes (`pgm::sim::script`), with the EPT auditor
//! and the frame accounting checked after every operation: any finding, leak or panic is a crash.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Err(failure) = pgm::sim::script::run(bytes) {
        panic!("{failure}");
    }
});
