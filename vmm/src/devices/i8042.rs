//! The i8042 keyboard controller, reduced to what a guest uses to reset the
//! machine: command 0xFE (pulse the reset line) on port 0x64.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bus::BusDevice;

/// I/O port of the i8042 command/status register.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Command: pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// Sets `reset` when the guest asks for a reset.
pub struct I8042 {
    reset: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl I8042 {
    /// A controller that raises `reset` and `stop`.
    pub fn new(reset: Arc<AtomicBool>, stop: Arc<AtomicBool>) -> Self {
        Self { reset, stop }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        if data.first() == Some(&CMD_RESET_CPU) {
            self.reset.store(true, Ordering::SeqCst);
            self.stop.store(true, Ordering::SeqCst);
        }
    }
}
