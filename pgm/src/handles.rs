//! The handles the manager gives out for what it registers: ROMs and MMIO2 regions (access
//! handlers have theirs in [`crate::handlers`]). Defined below the manager so that the error type
//! can name them without depending on it.

/// The handle of a registered ROM. Only the manager makes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RomId(pub(crate) u32);

/// The handle of an MMIO2 region. Only the manager makes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mmio2Handle(pub(crate) u32);

/// The device instance that owns MMIO2 regions (PDMDEVINS in the seed): a device's region
/// numbers are unique, and its regions can be deregistered together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);
