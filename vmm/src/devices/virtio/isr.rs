//! The ISR status register (virtio 1.2, 4.1.4.5): which kind of interrupt
//! the device raised; reading it clears it. With MSI-X (the only interrupt
//! this transport delivers) drivers do not need it, but it stays correct.

/// Bit 0: a queue interrupt.
pub const ISR_QUEUE: u8 = 1;
/// Bit 1: a configuration change.
pub const ISR_CONFIG: u8 = 2;

/// The ISR status byte.
#[derive(Debug, Default)]
pub struct IsrStatus {
    value: u8,
}

impl IsrStatus {
    /// Records an interrupt of kind `bit`.
    pub fn raise(&mut self, bit: u8) {
        self.value |= bit;
    }

    /// A guest read: returns the bits and clears them.
    pub fn read_and_clear(&mut self, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = std::mem::take(&mut self.value);
        }
    }

    /// Clears everything (device reset).
    pub fn reset(&mut self) {
        self.value = 0;
    }
}
