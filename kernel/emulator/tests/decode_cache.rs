//! The per-vCPU decode cache: an instruction is reused only for the same bytes, address and
//! mode, so a rewritten instruction is decoded afresh.

use emulator::{decode, DecodeCache};

const IP: u64 = 0x40_0000;
/// mov [rbx], eax; then a NOP that is not part of it.
const STORE: [u8; 3] = [0x89, 0x03, 0x90];

#[test]
fn the_same_bytes_at_the_same_address_are_decoded_once() {
    let mut cache = DecodeCache::default();
    let (first, reused) = cache.decode(64, &STORE, IP).unwrap();
    assert!(!reused);
    assert_eq!(first, decode(64, &STORE, IP).unwrap());
    let (again, reused) = cache.decode(64, &STORE, IP).unwrap();
    assert!(reused);
    assert_eq!(again, first);
    // Bytes past the instruction's end do not matter.
    assert!(cache.decode(64, &[0x89, 0x03, 0xCC], IP).unwrap().1);
}

#[test]
fn other_bytes_another_address_or_another_mode_are_decoded_afresh() {
    let mut cache = DecodeCache::default();
    cache.decode(64, &STORE, IP).unwrap();
    // The ModRM rewritten to name EBX: the instruction changes, and so does the decode.
    let (rewritten, reused) = cache.decode(64, &[0x89, 0x1B, 0x90], IP).unwrap();
    assert!(!reused);
    assert_eq!(rewritten, decode(64, &[0x89, 0x1B], IP).unwrap());
    let (moved, reused) = cache.decode(64, &[0x89, 0x1B], IP + 0x10).unwrap();
    assert!(!reused);
    assert_eq!(moved.next_ip(), IP + 0x12);
    // In 16-bit code the same bytes address [bp+di].
    let (real_mode, reused) = cache.decode(16, &[0x89, 0x1B], IP + 0x10).unwrap();
    assert!(!reused);
    assert_eq!(real_mode, decode(16, &[0x89, 0x1B], IP + 0x10).unwrap());
    // Too few bytes for the cached instruction: decoded (and refused) afresh.
    assert_eq!(cache.decode(16, &[0x89], IP + 0x10), None);
}

#[test]
fn a_driver_loop_of_two_instructions_decodes_each_once() {
    let mut cache = DecodeCache::default();
    // A status read and a data write, one after the other, over and over.
    let status = [0x8B, 0x06]; // mov eax, [rsi]
    let data = [0x89, 0x5E, 0x04]; // mov [rsi + 4], ebx
    let reused: Vec<bool> = (0..4)
        .flat_map(|_| [(&status[..], IP), (&data[..], IP + 0x10)])
        .map(|(bytes, ip)| cache.decode(64, bytes, ip).unwrap().1)
        .collect();
    assert_eq!(reused, [false, false, true, true, true, true, true, true]);
}
