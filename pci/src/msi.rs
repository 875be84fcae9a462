//! Message-signalled interrupt delivery.

use std::sync::Mutex;

/// An MSI message: the address and data a device writes to raise it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// The message address (0xFEEx_xxxx on x86).
    pub address: u64,
    /// The message data (vector and delivery mode on x86).
    pub data: u32,
}

/// Where a device sends its message-signalled interrupts.
///
/// The VMM implements this with KVM_SIGNAL_MSI; tests record the messages.
pub trait MsiSink: Send + Sync {
    /// Delivers one MSI write.
    fn send_msi(&self, msg: MsiMessage);
}

/// An [`MsiSink`] that records every message, for tests of device models.
#[derive(Debug, Default)]
pub struct MsiRecorder {
    messages: Mutex<Vec<MsiMessage>>,
}

impl MsiRecorder {
    /// Creates an empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns and forgets the messages received so far.
    pub fn take(&self) -> Vec<MsiMessage> {
        std::mem::take(&mut *self.lock())
    }

    /// The number of messages received so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no message was received.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<MsiMessage>> {
        // A panic while holding this lock can only come from a failing test.
        self.messages.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MsiSink for MsiRecorder {
    fn send_msi(&self, msg: MsiMessage) {
        self.lock().push(msg);
    }
}
