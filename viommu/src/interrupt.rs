// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Remapping-hardware event interrupts (VT-d 7.3, 7.4.x): fault events, invalidation
//! completion events and page request events. Each has a control register (IM, IP), data,
//! address and upper-address registers and is delivered as an MSI.

use crate::regs::{ectl, EADDR_WRITABLE, EDATA_WRITABLE};

use pci::MsiMessage;
pub use pci::MsiSink;

/// An MSI the unit decided to send; delivered after internal locks are released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msi {
    /// Message address (upper:lower).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

impl Msi {
    /// Send through `sink`.
    pub fn deliver(self, sink: &dyn MsiSink) {
        sink.send_msi(MsiMessage {
            address: self.address,
            data: self.data,
        });
    }
}

/// One event-interrupt register block (xECTL, xEDATA, xEADDR, xEUADDR).
#[derive(Clone, Debug)]
pub struct EventInterrupt {
    /// IM and IP bits.
    control: u32,
    data: u32,
    address: u32,
    upper_address: u32,
}

impl Default for EventInterrupt {
    /// Reset state: masked, nothing pending.
    fn default() -> Self {
        EventInterrupt {
            control: ectl::IM,
            data: 0,
            address: 0,
            upper_address: 0,
        }
    }
}

impl EventInterrupt {
    /// Value of the control register.
    pub fn control(&self) -> u32 {
        self.control
    }

    /// Register reads: index 0 control, 1 data, 2 address, 3 upper address.
    pub fn read(&self, index: u64) -> u32 {
        match index {
            0 => self.control,
            1 => self.data,
            2 => self.address,
            _ => self.upper_address,
        }
    }

    /// Register writes (same indices as [`read`](Self::read)). Clearing IM while IP is set
    /// sends the pending message.
    pub fn write(&mut self, index: u64, value: u32) -> Option<Msi> {
        match index {
            0 => {
                self.control = (self.control & ectl::IP) | (value & ectl::IM);
                if self.control == ectl::IP {
                    self.control = 0;
                    return Some(self.message());
                }
            }
            1 => self.data = value & EDATA_WRITABLE,
            2 => self.address = value & EADDR_WRITABLE,
            _ => self.upper_address = value,
        }
        None
    }

    /// An interrupt condition arose: send now, or leave it pending while masked. Does
    /// nothing if a message is already pending.
    pub fn raise(&mut self) -> Option<Msi> {
        if self.control & ectl::IP != 0 {
            return None;
        }
        if self.control & ectl::IM != 0 {
            self.control |= ectl::IP;
            None
        } else {
            Some(self.message())
        }
    }

    /// Software serviced every condition behind this event: forget a pending message.
    pub fn clear_pending(&mut self) {
        self.control &= !ectl::IP;
    }

    fn message(&self) -> Msi {
        Msi {
            address: (u64::from(self.upper_address) << 32) | u64::from(self.address),
            data: self.data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_event_is_held_pending_and_sent_on_unmask() {
        let mut ev = EventInterrupt::default();
        ev.write(1, 0x4041);
        ev.write(2, 0xfee0_0003);
        ev.write(3, 0);
        // Masked at reset.
        assert_eq!(ev.raise(), None);
        assert_eq!(ev.control(), ectl::IM | ectl::IP);
        // A second condition while pending sends nothing new.
        assert_eq!(ev.raise(), None);
        // Unmask: the pending message goes out once, IP clears.
        assert_eq!(
            ev.write(0, 0),
            Some(Msi {
                address: 0xfee0_0000,
                data: 0x4041
            })
        );
        assert_eq!(ev.control(), 0);
        // Unmasked: immediate delivery, nothing left pending.
        assert!(ev.raise().is_some());
        assert_eq!(ev.control(), 0);
        // IP is read-only.
        assert_eq!(ev.write(0, ectl::IP), None);
        assert_eq!(ev.control(), 0);
    }

    #[test]
    fn serviced_condition_cancels_pending_message() {
        let mut ev = EventInterrupt::default();
        ev.raise();
        ev.clear_pending();
        assert_eq!(ev.write(0, 0), None);
    }
}
