//! The handles the manager gives out for what it registers: ROMs and MMIO2 regions (access
//! handlers have theirs in [`crate::handlers`]). Defined below the manager so that the error type
//! can name them without depending on it.

/// The handle of a registered ROM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RomId(pub u32);

/// The handle of an MMIO2 region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mmio2Handle(pub u32);
