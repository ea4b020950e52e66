//! Typed addresses: guest-physical and host-physical addresses are different types and never mix.

use core::fmt;

/// log2 of the page size.
pub const PAGE_SHIFT: u32 = 12;
/// Size of a base page (and of a host frame) in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Guest-physical addresses must lie below 2^48: the reach of 4-level EPT.
pub const GUEST_PHYS_BITS: u32 = 48;
/// Host-physical addresses must lie below 2^52, the architectural maximum.
pub const HOST_PHYS_BITS: u32 = 52;

macro_rules! phys_addr_type {
    ($(#[$doc:meta])* $name:ident, $bits:expr, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(u64);

        impl $name {
            /// Number of address bits this type may use.
            pub const BITS: u32 = $bits;

            /// Wraps `addr`; returns `None` when it needs more than [`Self::BITS`] bits.
            pub const fn new(addr: u64) -> Option<Self> {
                if addr >> $bits == 0 { Some(Self(addr)) } else { None }
            }

            /// Wraps `addr` without the width check, for constants known to be in range.
            /// Keeps only the low [`Self::BITS`] bits.
            pub const fn new_truncate(addr: u64) -> Self {
                Self(addr & ((1 << $bits) - 1))
            }

            /// The raw address.
            pub const fn as_u64(self) -> u64 {
                self.0
            }

            /// True when the address is a multiple of [`PAGE_SIZE`].
            pub const fn is_page_aligned(self) -> bool {
                self.0.is_multiple_of(PAGE_SIZE)
            }

            /// The address rounded down to its page.
            pub const fn page_base(self) -> Self {
                Self(self.0 & !(PAGE_SIZE - 1))
            }

            /// Byte offset within the page.
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }

            /// The address `offset` bytes into this address's page (`offset` is taken modulo
            /// [`PAGE_SIZE`]).
            pub const fn at_page_offset(self, offset: u64) -> Self {
                Self(self.0 & !(PAGE_SIZE - 1) | (offset & (PAGE_SIZE - 1)))
            }

            /// Page (frame) number: the address shifted right by [`PAGE_SHIFT`].
            pub const fn page_number(self) -> u64 {
                self.0 >> PAGE_SHIFT
            }

            /// `self + bytes`, or `None` when the result would leave the address width.
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(sum) => Self::new(sum),
                    None => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

phys_addr_type!(
    /// An address in the guest's physical address space (what the guest's page tables, or the
    /// guest itself with paging off, produce). Translated by EPT to a [`HostPhysAddr`].
    GuestPhysAddr,
    GUEST_PHYS_BITS,
    "GPA"
);

phys_addr_type!(
    /// An address in the host's physical memory: host frames, EPT tables, the zero frame.
    HostPhysAddr,
    HOST_PHYS_BITS,
    "HPA"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn width_is_enforced() {
        assert!(GuestPhysAddr::new(1 << 47).is_some());
        assert!(GuestPhysAddr::new(1 << 48).is_none());
        assert!(HostPhysAddr::new(1 << 51).is_some());
        assert!(HostPhysAddr::new(1 << 52).is_none());
        assert_eq!(GuestPhysAddr::new((1 << 48) - 1).unwrap().checked_add(1), None);
    }

    #[test]
    fn page_helpers() {
        let gpa = GuestPhysAddr::new(0x12345).unwrap();
        assert_eq!(gpa.page_base().as_u64(), 0x12000);
        assert_eq!(gpa.page_offset(), 0x345);
        assert_eq!(gpa.page_number(), 0x12);
        assert!(!gpa.is_page_aligned());
        assert!(gpa.page_base().is_page_aligned());
    }
}
