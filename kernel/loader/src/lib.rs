//! Guest images, as pure logic tested on the host: the archive the boot image carries them in
//! ([`archive`]: a ustar file the bootloader hands over as its ramdisk), and the Multiboot v1
//! loader ([`multiboot`]) that turns an ELF32 Multiboot kernel, a command line, a module and
//! the VM's memory layout into the bytes to write into guest RAM and the registers to start
//! with. Nothing here touches guest memory: the kernel writes what the loader plans through
//! the memory manager. Every length and address in an image is checked; a bad image is an
//! error, never a panic.

#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

pub mod archive;
pub mod layout;
pub mod linux;
pub mod multiboot;
