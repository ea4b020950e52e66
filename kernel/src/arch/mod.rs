//! The architecture layer: everything that touches the CPU, ports or raw memory lives here.

pub mod power;
pub mod serial;
