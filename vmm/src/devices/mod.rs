//! Platform devices of the machine.

pub mod i8042;
pub mod pvpanic;
pub mod serial;
pub mod virtio;
