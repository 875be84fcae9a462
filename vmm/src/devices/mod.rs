//! Platform devices of the machine.

pub mod i8042;
pub mod serial;
pub mod test_devices;
